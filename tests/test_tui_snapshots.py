"""SVG snapshots of every screen and dialog at 80×24 and 120×36.

A snapshot must look the same on every machine, so *only here* the App gets fakes for what
differs between hosts: the block-device list, the attached loops and the status snapshot
(host devices, loops and mounts), the clock and the time zone (the event
log's timestamps), a fixed config path (shown in the header) and a fixed directory for the
picker. Kernel watchers and I/O-rate sampling are off. Everything else is the real App:
screens, dialogs, the config store and Replication (its results below come from real calls
that fail because the fake devices do not exist and no daemon listens on the socket). Update with `pytest --snapshot-update`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from test_tui_support import settle

from app.services import blockdevs
from app.services.config import BlockEntry, ConfigStore, FsEntry
from app.services.control import ControlClient
from app.services.loop import LoopStatus
from app.services.layout import entry_id as capture_id
from app.services.protocol import CaptureRow
from app.services.replication import Replication
from app.services.status import BlockState, FsState, StatusSnapshot, StatusWarning
from app.ui import Services, make_app

SNAP_DIR = Path("/tmp/mirrorsetup-tui-snapshots")  # fixed: the header shows the config path
FIXED_TIME = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC
SIZES = {"80x24": (80, 24), "120x36": (120, 36)}
GIB = 1 << 30

CONFIG = """\
schema = 1

[[filesystem]]
path = "/srv/data"

[[filesystem]]
path = "/home/shared"
replicate_atime = true
target = "/backup/shared"

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


def _device(name, size, type_, fstype=None, mounts=(), excluded=None, in_use=(), backing=None):
    return blockdevs.BlockDevice(path=f"/dev/{name}", name=name, size=size, type=type_, major=8,
                                 minor=0, read_only=False, fstype=fstype, model=None,
                                 mountpoints=tuple(mounts), holders=(), backing_file=backing,
                                 excluded=excluded, in_use=tuple(in_use))


# The daemon's capture of /dev/sdb1: loop7 sits on this FUSE file, not on the device.
CAPTURE_FILE = f"/run/mirrorsetup/block/{capture_id('/dev/sdb1')}/disk"
DEVICES = [
    _device("sda", 64 * GIB, "disk", in_use=("root file system",)),
    _device("sda1", 63 * GIB, "part", "ext4", ["/"], in_use=("mounted on /", "root file system")),
    _device("sdb", 200 * GIB, "disk"),
    _device("sdb1", 200 * GIB, "part", "xfs"),  # held by the daemon's capture worker (O_EXCL)
    _device("sdc", 500 * GIB, "disk", "ext4", in_use=("backs /dev/loop8",)),
    _device("sdd", 8 * GIB, "part", "swap", excluded="swap (active)"),
    _device("sde", 100 * GIB, "part", "LVM2_member", excluded="LVM2 physical volume"),
    _device("sdf", 500 * GIB, "disk"),
    _device("sdg", 20 * GIB, "disk"),
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
ENGINE_SRV = CaptureRow("fs", "/srv/data", captured=True, state="capturing", captured_ops=87,
                        bytes_queued=12 << 10, lag_seconds=0.1, connection="local",
                        replication="established", target_data="consistent")


def fake_status() -> StatusSnapshot:
    """One captured block entry with the daemon's figures, one attached while the daemon was
    down (not captured), one detached; the daemon runs (its pid is fake)."""
    srv, shared = FsEntry("/srv/data"), FsEntry("/home/shared", True, "/backup/shared")
    sdb1 = BlockEntry("/dev/sdb1", "/dev/loop7", target="/backup/sdb1.img")
    sdc = BlockEntry("/dev/sdc", offset=1 << 20, target="/dev/sdf")
    sdg = BlockEntry("/dev/sdg")
    return StatusSnapshot(
        taken_at=FIXED_TIME,
        filesystem=[FsState(srv, "mounted", None, ENGINE_SRV),
                    FsState(shared, "not mounted", "ext4")],
        block=[BlockState(sdb1, "attached", (LOOP7,), (), ("/srv/db",), "captured", ENGINE_SDB1),
               BlockState(sdc, "attached", (LOOP8,), (), (), "not captured",
                          CaptureRow("block", "/dev/sdc", state="not captured")),
               BlockState(sdg, "detached")],
        loops=[LOOP7, LOOP8],
        warnings=[StatusWarning("/home/shared", "not mounted as mirrorfs: changes there are not "
                                                "captured (Mount all)"),
                  StatusWarning("/dev/sdc", "/dev/loop8 is attached without capture (daemon not "
                                            "running then): its writes are not replicated"),
                  StatusWarning("/dev/sdg", "not attached to a loop device: its writes are not "
                                            "captured")],
        engine={"pid": 4242, "entries": [ENGINE_SRV], "block": [ENGINE_SDB1]})


@pytest.fixture
def snap_services(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    shutil.rmtree(SNAP_DIR, ignore_errors=True)
    for sub in ("browse/home", "browse/srv/data", "browse/srv/www", "browse/var"):
        (SNAP_DIR / sub).mkdir(parents=True)
    config = SNAP_DIR / "replication.toml"
    config.write_text(CONFIG)
    store = ConfigStore(config)
    control = ControlClient(str(SNAP_DIR / "control.sock"))  # the real client; no daemon there
    yield Services(store=store, replication=Replication(store, control), control=control, list_devices=lambda **_: list(DEVICES),
                   status=fake_status, list_loops=lambda: [LOOP7, LOOP8], disk_counters=None,
                   watch_kernel=False, clock=lambda: FIXED_TIME,
                   browse_root=str(SNAP_DIR / "browse"))
    shutil.rmtree(SNAP_DIR, ignore_errors=True)
    monkeypatch.undo()
    time.tzset()


def keys(*presses):
    async def run_before(pilot):
        await settle(pilot)
        for key in presses:
            await pilot.press(key)
            await settle(pilot)
        await pilot.pause()
    return run_before


SCREENS = {
    "main_menu": keys(),
    "filesystem": keys("1"),
    "filesystem_add": keys("1", "a"),
    "filesystem_remove_confirm": keys("1", "r"),
    "filesystem_mount_all_results": keys("1", "m"),
    "block": keys("2"),
    "block_show_excluded": keys("2", "x"),
    "block_add": keys("2", "down", "down", "down", "a"),
    "block_attach_all_results": keys("2", "t"),
    "block_mirror_confirm": keys("2", "m"),
    "block_verify_no_daemon": keys("2", "v"),
    "manual": keys("3"),
    "dashboard": keys("4"),
    "daemon": keys("5"),
    "help": keys("6"),
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("screen", SCREENS)
def test_screen(snap_compare, snap_services, screen, size):
    app = make_app(services=snap_services, is_root=True)
    assert snap_compare(app, terminal_size=SIZES[size], run_before=SCREENS[screen])


@pytest.mark.parametrize("size", SIZES)
def test_main_menu_not_root(snap_compare, snap_services, size):
    app = make_app(services=snap_services, is_root=False)
    assert snap_compare(app, terminal_size=SIZES[size], run_before=keys())
