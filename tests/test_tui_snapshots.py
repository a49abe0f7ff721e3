"""SVG snapshots of every screen, dialog and detail view at 80×24 and 120×36.

A snapshot must look the same on every machine and must never touch the host, so *only here*
the App gets fakes for everything that reads or changes the host: the block-device list, the
attached loops, the status snapshot, the daemon's description, the block-entry check and the
Replication service (it answers with results shaped like the real ones, and changes nothing:
no device named here is ever opened, so a host that has a /dev/sdb is safe). The clock and
the time zone are fixed (the event log's timestamps), the header shows a fixed config path,
and the configuration file and the directory picker live in the test's own temp directory.
Kernel watchers and I/O-rate sampling are off. Screens, dialogs and the registry are real.
Update with `pytest --snapshot-update`.
"""

from __future__ import annotations

import errno
import time

import pytest
from test_tui_support import settle

from app.services import blockdevs
from app.services.config import ROOT_REFUSAL, BlockEntry, ConfigStore, FsEntry
from app.services.control import ControlClient
from app.services.daemonctl import DaemonInfo, DaemonSettings
from app.services.entries import BlockCheck
from app.services.loop import LoopStatus
from app.services.layout import entry_id as capture_id
from app.services.protocol import CaptureRow
from app.services.results import Outcome, Result
from app.services.status import BlockState, FsState, StatusSnapshot, StatusWarning
from app.ui import Services, make_app

FIXED_TIME = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC
SHOWN_CONFIG = "/etc/mirrorsetup/replication.toml"  # in the header, whatever the temp path is
SIZES = {"80x24": (80, 24), "120x36": (120, 36)}
GIB = 1 << 30
ODD = "/srv/two\nlines"  # a legal newline in a path: shown as \n, never as a line break


def _device(name, size, type_, fstype=None, mounts=(), excluded=None, in_use=(), backing=None):
    return blockdevs.BlockDevice(path=f"/dev/{name}", name=name, size=size, type=type_, major=8,
                                 minor=0, read_only=False, fstype=fstype, model=None,
                                 mountpoints=tuple(mounts), holders=(), backing_file=backing,
                                 excluded=excluded, in_use=tuple(in_use))


# The daemon's capture of /dev/sdb1: loop7 sits on this FUSE file, not on the device.
CAPTURE_FILE = f"/run/mirrorsetup/block/{capture_id('/dev/sdb1')}/disk"
DEVICES = [
    _device("sda", 64 * GIB, "disk", in_use=("partition sda1 root file system",)),
    _device("sda1", 63 * GIB, "part", "ext4", ["/"], in_use=("root file system",)),
    _device("sdb", 200 * GIB, "disk"),
    _device("sdb1", 200 * GIB, "part", "xfs"),  # held by the daemon's capture worker (O_EXCL)
    _device("sdc", 500 * GIB, "disk", "ext4", in_use=("backs /dev/loop8",)),
    _device("sdd", 8 * GIB, "part", "swap", excluded="swap (active)"),
    _device("sde", 100 * GIB, "part", "LVM2_member", excluded="LVM2 physical volume"),
    _device("sdf", 500 * GIB, "disk"),
    _device("sdg", 20 * GIB, "disk", "ext4", ["/mnt/scratch"], in_use=("mounted on /mnt/scratch",)),
    _device("loop7", 200 * GIB, "loop", "xfs", ["/srv/db"], backing=CAPTURE_FILE),
    _device("loop8", 500 * GIB - (1 << 20), "loop", "ext4",
            in_use=("loop access point for /dev/sdc",), backing="/dev/sdc"),
]
LOOP7 = LoopStatus("/dev/loop7", 7, CAPTURE_FILE, 0, 0, 200 * GIB, False, False, False, False)
LOOP8 = LoopStatus("/dev/loop8", 8, "/dev/sdc", 1 << 20, 0, 500 * GIB - (1 << 20), False, False,
                   False, False)
ENGINE_SDB1 = CaptureRow("block", "/dev/sdb1", target="/backup/sdb1.img", captured=True,
                         state="capturing", loop="/dev/loop7", file=CAPTURE_FILE, worker_pid=4243,
                         captured_ops=1532, bytes_queued=6 << 20, lag_seconds=0.4, applied_seq=1490,
                         last_seq=1532, connection="local", replication="established",
                         target_data="consistent")
ENGINE_SRV = CaptureRow("fs", "/srv/data", target="backup1:data", captured=True,
                        state="capturing", captured_ops=87, worker_pid=4244, last_seq=87,
                        sent_seq=87, received_seq=85, applied_seq=85, bytes_queued=12 << 10,
                        lag_seconds=0.1, connection="connected", replication="established",
                        target_data="consistent", rtt=0.0021)
ENGINE_SHARED = CaptureRow("fs", "/home/shared", target="backup1:shared", state="switched over",
                           switched={"state": "switched", "time": FIXED_TIME - 7200, "seq": 20417,
                                     "target": "backup1:shared"},
                           last_error="/home/shared was switched over to backup1:shared at "
                           "2026-09-21 12:13:20 (seq 20417): the replica there is primary")

SRV, SHARED = FsEntry("/srv/data", False, "backup1:data"), FsEntry("/home/shared", True,
                                                                   "backup1:shared")
SDB1 = BlockEntry("/dev/sdb1", "/dev/loop7", target="/backup/sdb1.img")
SDC = BlockEntry("/dev/sdc", offset=1 << 20, target="/dev/sdf")
SDG = BlockEntry("/dev/sdg")
CONFIG = """\
schema = 1

[[target]]
name = "backup1"
host = "backup1.example.net"
root = "/srv/replicas"
bandwidth = "100Mbit/s"

[[filesystem]]
path = "/srv/data"
target = "backup1:data"

[[filesystem]]
path = "/home/shared"
replicate_atime = true
target = "backup1:shared"

[[filesystem]]
path = "/srv/two\\nlines"

[[filesystem]]
path = "/"

[[block]]
device = "/dev/sdb1"
loop = "/dev/loop7"
target = "/backup/sdb1.img"

[[block]]
device = "/dev/sdc"
offset = 1048576
target = "/dev/sdf"

[[block]]
device = "/dev/sdg"
"""


def fake_status() -> StatusSnapshot:
    """One captured block entry with the daemon's figures, one attached while the daemon was
    down (not captured), one detached; two hand-edited file-system entries (a newline in one,
    `/` the other: invalid); the daemon runs (its pid is fake)."""
    odd, root = FsEntry(ODD), FsEntry("/")
    return StatusSnapshot(
        taken_at=FIXED_TIME,
        filesystem=[FsState(SRV, "mounted", None, ENGINE_SRV),
                    FsState(SHARED, "not mounted", "ext4", ENGINE_SHARED),
                    FsState(odd, "not mounted"),
                    FsState(root, "not mounted", "ext4", problem=ROOT_REFUSAL)],
        block=[BlockState(SDB1, "attached", (LOOP7,), (), ("/srv/db",), "captured", ENGINE_SDB1),
               BlockState(SDC, "attached", (LOOP8,), (), (), "not captured",
                          CaptureRow("block", "/dev/sdc", state="not captured")),
               BlockState(SDG, "detached", raw_mounts=("/mnt/scratch",))],
        loops=[LOOP7, LOOP8],
        warnings=[StatusWarning("/", f"invalid entry: {ROOT_REFUSAL}; remove it or correct the "
                                     "file", "error"),
                  StatusWarning("/home/shared", "switched over to backup1:shared: primary there; "
                                                "fail back to capture here (Targets screen: f "
                                                "fails back, o keeps this side)"),
                  StatusWarning(ODD, "not mounted as mirrorfs: changes there are not captured "
                                     "(Mount all)"),
                  StatusWarning("/dev/sdc", "/dev/loop8 is attached without capture (daemon not "
                                            "running then): its writes are not replicated"),
                  StatusWarning("/dev/sdg", "the raw device is mounted on /mnt/scratch: writes "
                                            "there bypass the loop device and corrupt the target",
                                "error")],
        engine={"pid": 4242, "filesystem": [ENGINE_SRV.to_json()], "block": [ENGINE_SDB1.to_json()]})


WWW = FsEntry("/srv/www", False, "backup1:www")
# What two entries' first captures recorded, and what they are now: their captures are refused
IDENTITY_CHANGES = {
    ("fs", "/srv/www"): ({"file system": "ext4 mounted on /srv/www"},
                         {"file system": "ext4 mounted on /"}),
    ("block", "/dev/sdg"): ({"WWID": "naa.5000c500a1b2c3d4"}, {"WWID": "naa.5000c500e5f60718"}),
}


def refused_row(kind: str, key: str) -> CaptureRow:
    (was,), (now,) = (d.values() for d in IDENTITY_CHANGES[(kind, key)])
    what = "the device" if kind == "block" else "on the file system"
    return CaptureRow(kind, key, state="not captured", last_errno=errno.EMEDIUMTYPE,
                      last_error=f"{key} is not {what} this entry was made for: its "
                      f"{next(iter(IDENTITY_CHANGES[(kind, key)][0]))} was {was}, it is now "
                      f"{now}; nothing was captured or written")


def refused_status() -> StatusSnapshot:
    """fake_status(), with a directory and /dev/sdg first in their tables, whose captures were
    refused: each is not on what its first capture recorded (IDENTITY_CHANGES)."""
    snap = fake_status()
    www, sdg = refused_row("fs", WWW.path), refused_row("block", SDG.device)
    snap.filesystem.insert(0, FsState(WWW, "not mounted", None, www))
    snap.block = [BlockState(SDG, "detached", raw_mounts=("/mnt/scratch",), engine=sdg),
                  *snap.block[:-1]]
    snap.warnings[:0] = [StatusWarning(r.key, f"not captured: {r.last_error}", "error")
                         for r in (www, sdg)]
    return snap


class SnapshotReplication:
    """Answers like Replication does for the fake host above; changes nothing, opens nothing."""

    def __init__(self, store: ConfigStore) -> None:
        self.store = store

    def mount_all(self, force: bool = False) -> list[Result]:
        return [Result("mount", "/srv/data", Outcome.UNCHANGED, "/srv/data is already mounted"),
                Result("mount", "/home/shared", Outcome.FAILED, "mount mirrorfs on /home/shared: "
                       "ext4 is mounted there; unmount it first", errno.EBUSY)]

    def unmount_all(self, force: bool = False, say=None) -> list[Result]:
        return [Result("unmount", "/srv/data", Outcome.FAILED, "/srv/data is busy: bash (pid "
                       "3112), vim (pid 3190) have files open there; close them or unmount "
                       "with --force (lazy unmount)", errno.EBUSY),
                Result("unmount", "/home/shared", Outcome.UNCHANGED, "/home/shared is not mounted")]

    def remove_filesystem(self, path: str, force: bool = False) -> list[Result]:
        return [Result("remove", path, Outcome.OK, f"removed {path}")]

    def attach_all(self, dry_run: bool = False, force: bool = False) -> list[Result]:
        return [Result("attach", "/dev/sdb1", Outcome.UNCHANGED, "/dev/sdb1 is already "
                       "attached as /dev/loop7 (captured)"),
                Result("attach", "/dev/sdc", Outcome.UNCHANGED, "/dev/sdc is already attached "
                       "as /dev/loop8"),
                Result("attach", "/dev/sdg", Outcome.FAILED, "refused: /dev/sdg is mounted on "
                       "/mnt/scratch; writes there would bypass the loop device and corrupt the "
                       "target (--force overrides)", errno.EBUSY)]

    def detach_all(self, dry_run: bool = False, say=None) -> list[Result]:
        return [Result("detach", "/dev/sdb1", Outcome.PENDING, "/dev/loop7: detach pending "
                       "(still mounted on /srv/db)")]

    def block_verify(self, device: str, progress=None):
        return ([Result("verify", device, Outcome.FAILED, "2 of 204800 blocks differ",
                        errno.EIO)], [[5 << 20, 6 << 20], [(1 << 30), (1 << 30) + (1 << 20)]])

    def block_mirror(self, device: str, progress=None) -> list[Result]:
        return [Result("mirror", device, Outcome.OK, "mirrored 200 GiB")]

    def switchover(self, entry: str, progress=None) -> list[Result]:
        return [Result("switchover", entry, Outcome.FAILED, f"{entry} is in use: pid 3190 (vim) "
                       f"holds {entry}/notes.txt: stop them first (nothing was changed)",
                       errno.EBUSY)]

    def failback(self, entry: str, progress=None) -> list[Result]:
        return [Result("failback", entry, Outcome.OK, "failed back from backup1:shared: 12 of "
                       "20417 files differed, 1 removed, 3145728 bytes of data came back (1204113 "
                       "bytes on the wire); the replica "
                       "is secondary again"),
                Result("mount", entry, Outcome.OK, f"mounted mirrorfs on {entry}")]

    def resolve(self, entry: str, discard_target: bool = False) -> list[Result]:
        return [Result("resolve", entry, Outcome.OK, "discarded the promotion of the replica")]

    def daemon(self):
        return None

    def identity_change(self, kind: str, key: str):
        return IDENTITY_CHANGES.get((kind, key))


def fake_check(entry: BlockEntry) -> BlockCheck:
    if entry.device == "/dev/sdg":
        return BlockCheck(None, ["mounted on /mnt/scratch"])
    if entry.device == "/dev/sdb1":
        return BlockCheck("/dev/sdb1 is already configured")
    return BlockCheck()


@pytest.fixture
def snap_services(monkeypatch, tmp_path):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    for sub in ("browse/home", "browse/srv/data", "browse/srv/www", "browse/var"):
        (tmp_path / sub).mkdir(parents=True)
    config = tmp_path / "replication.toml"
    config.write_text(CONFIG)
    store = ConfigStore(config)
    control = ControlClient(str(tmp_path / "control.sock"))  # the real client; no daemon there
    info = DaemonInfo(True, "/run/mirrorsetup/control.sock", 4242, FIXED_TIME - 3725,
                      SHOWN_CONFIG, "/var/lib/mirrorsetup", "/run/mirrorsetup/daemon.log")
    yield Services(store, SnapshotReplication(store), control,
                   daemon=DaemonSettings(SHOWN_CONFIG, "/run/mirrorsetup/control.sock",
                                         "/var/lib/mirrorsetup"),
                   list_devices=lambda **_: list(DEVICES), status=fake_status,
                   list_loops=lambda: [LOOP7, LOOP8], disk_counters=None, check_block=fake_check,
                   describe_daemon=lambda: info, watch_kernel=False, clock=lambda: FIXED_TIME,
                   browse_root=str(tmp_path / "browse"))
    monkeypatch.undo()
    time.tzset()


def keys(*presses, click: str | None = None):
    async def run_before(pilot):
        await settle(pilot)
        for key in presses:
            await pilot.press(key)
            await settle(pilot)
        if click:
            await pilot.click(click)
            await settle(pilot)
        # A focused input's cursor blinks: on a loaded host the picture was taken in its dark
        # half now and then (filesystem_add, block_add_busy_device failed so); held visible
        from textual.widgets import Input
        for field in pilot.app.screen.query(Input):
            field.cursor_blink = False
        await pilot.pause()
    return run_before


SCREENS = {
    "main_menu": keys(),
    "main_menu_escape": keys("escape"),
    "filesystem": keys("1"),
    "filesystem_details": keys("1", "i"),
    "filesystem_add": keys("1", "a"),
    "filesystem_remove_confirm": keys("1", "r"),
    "filesystem_set_target": keys("1", "e"),
    "filesystem_unmount_all_confirm": keys("1", "u"),
    "filesystem_unmount_all_force": keys("1", "u", "y"),
    "filesystem_lazy_unmount_confirm": keys("1", "u", "y", click="#force"),
    "block": keys("2"),
    "block_show_excluded": keys("2", "x"),
    "block_root_disk_refused": keys("2", "down", "down", "a"),  # loop7, loop8, sda
    "block_add_busy_device": keys("2", *["down"] * 8, "a"),  # … sdf, sdg
    "block_details": keys("2", "i"),
    "block_set_target": keys("2", "e"),
    "block_attach_all_force": keys("2", "t"),
    "block_detach_all_confirm": keys("2", "d"),
    "block_mirror_confirm": keys("2", "m"),
    "block_verify_differs": keys("2", "v"),
    "manual": keys("3"),
    "dashboard": keys("4"),
    "dashboard_engine": keys("4", "g"),
    "dashboard_warnings": keys("4", "w"),
    "daemon": keys("5"),
    "help": keys("6"),
    "targets": keys("7"),
    "targets_details": keys("7", "i"),
    "targets_switchover_confirm": keys("7", "s"),
    "targets_failback_confirm": keys("7", "down", "f"),
    "targets_failback_done": keys("7", "down", "f", "y"),
    "targets_add": keys("7", "a"),
    "targets_edit": keys("7", "e"),
}


def snapshot_app(services, is_root: bool = True):
    app = make_app(services=services, is_root=is_root)
    app.sub_title = SHOWN_CONFIG
    return app


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("screen", SCREENS)
def test_screen(snap_compare, snap_services, screen, size):
    assert snap_compare(snapshot_app(snap_services), terminal_size=SIZES[size],
                        run_before=SCREENS[screen])


ACCEPT_SCREENS = {"filesystem_refused": keys("1"), "filesystem_accept_confirm": keys("1", "n"),
                  "block_accept_confirm": keys("2", "n")}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("screen", ACCEPT_SCREENS)
def test_accept(snap_compare, snap_services, screen, size):
    """A directory and a device whose captures were refused (not what their first capture
    recorded): n on the row, and its question."""
    snap_services._status = refused_status
    assert snap_compare(snapshot_app(snap_services), terminal_size=SIZES[size],
                        run_before=ACCEPT_SCREENS[screen])


@pytest.mark.parametrize("size", SIZES)
def test_main_menu_not_root(snap_compare, snap_services, size):
    assert snap_compare(snapshot_app(snap_services, is_root=False), terminal_size=SIZES[size],
                        run_before=keys())


LAYOUT_SCREENS = {"filesystem": keys("1"), "block": keys("2"), "block_excluded": keys("2", "x"),
                  "manual": keys("3"), "dashboard": keys("4"), "daemon": keys("5"),
                  "targets": keys("7")}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("screen", LAYOUT_SCREENS)
def test_nothing_hides_off_screen(snap_services, screen, size):
    """Every table fits its width (no sideways scrolling: what does not fit is in the detail
    view) and every footer key is on screen."""
    from textual.widgets import DataTable, Footer
    from textual.widgets._footer import FooterKey
    from test_tui_support import pilot_test

    @pilot_test
    async def check():
        app = snapshot_app(snap_services)
        async with app.run_test(size=SIZES[size]) as pilot:
            await LAYOUT_SCREENS[screen](pilot)
            width = SIZES[size][0]
            tables = [t for t in app.screen.query(DataTable) if t.display]
            assert tables or screen == "daemon"
            for table in tables:
                assert table.virtual_size.width <= table.scrollable_content_region.width, \
                    (table.id, table.virtual_size.width, table.scrollable_content_region.width)
            footer = app.screen.query_one(Footer)
            assert list(footer.query(FooterKey))
            assert footer.virtual_size.width <= footer.size.width == width, \
                (footer.virtual_size.width, footer.size.width)
    check()


@pytest.mark.parametrize("size", SIZES)
def test_the_dashboard_keeps_each_entrys_replication_at_every_size(snap_services, size):
    """The Engine column (is it replicating? connected?) is what the dashboard is for: at 80
    columns it is cut short, not dropped (it was dropped whenever one entry's text was long,
    e.g. a switched-over entry, or a disconnected one with its retry time); the block table has
    one too (it had none: a block entry's replication was only in the side panel)."""
    from app.screens.base import KeyedTable
    from test_tui_support import pilot_test

    @pilot_test
    async def check():
        app = snapshot_app(snap_services)
        async with app.run_test(size=SIZES[size]) as pilot:
            await LAYOUT_SCREENS["dashboard"](pilot)
            fs, block = app.screen.query_one("#dash-fs", KeyedTable), \
                app.screen.query_one("#dash-block", KeyedTable)
            assert "engine" in fs.shown_columns, fs.shown_columns
            assert "engine" in block.shown_columns, block.shown_columns
            cell = str(fs.get_cell("/srv/data", "engine"))
            assert cell.startswith("established · queued 12.0 KiB"), cell
            assert str(block.get_cell("/dev/sdb1", "engine")).startswith("established"), \
                block.get_cell("/dev/sdb1", "engine")
    check()
