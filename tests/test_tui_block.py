"""Block device screen on real loop devices: pick a device, add it (with a target), attach all
and detach all (checked in sysfs), remove it, refused input, the excluded devices toggle, and
mirror / verify of an entry, without a daemon and through a real one."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
from test_engine_support import Engine, block_mounts, write_config
from test_tui_support import (  # noqa: F401 (fixtures)
    cell, config_bytes, loops_backed_by, notices, own_devices, pilot_test, protected_device, run,
    settle, static_text, store, table_keys, tui, wait_until)
from textual.widgets import DataTable, Input, ProgressBar

from app.screens.base import elide, natural_key, selected_key
from app.screens.block import MAX_RANGES_SHOWN, BlockScreen, range_lines
from app.screens.dashboard import DashboardScreen
from app.screens.dialogs import AddBlockEntryDialog, ConfirmDialog, DetailsDialog, ResultsDialog
from app.services.config import BlockEntry
from app.services.results import ConfigError
from app.services.units import parse_size
from app.ui import default_services, make_app

pytestmark = pytest.mark.root
MiB = 1 << 20


@pytest.fixture
def no_daemon_tui(tui):
    """make(devices) -> the real App whose daemon socket is a temp path where nothing listens
    (so a daemon that happens to run on the host is never asked)."""
    def make(devices):
        app = tui(devices=devices, is_root=True)
        assert not app.services.daemon_running()
        return app
    return make


def daemon_app(cfg, eng, devices):
    """The real App talking to a test's own daemon; the picker lists `devices` only."""
    services = default_services(cfg, eng.socket)
    services.device_lister = own_devices(devices)
    return make_app(services=services, is_root=True)


def sha(path, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


async def open_block_screen(pilot) -> BlockScreen:
    await pilot.press("2")
    await settle(pilot)
    assert type(pilot.app.screen) is BlockScreen
    return pilot.app.screen


async def pick(pilot, screen: BlockScreen, device: str) -> AddBlockEntryDialog:
    """Put the picker's cursor on `device` and press a: the add dialog opens for it."""
    devices = screen.query_one("#devices", DataTable)
    await wait_until(pilot, lambda: device in table_keys(devices), f"{device} in the picker")
    devices.focus()
    devices.move_cursor(row=devices.get_row_index(device))
    await pilot.press("a")
    await settle(pilot)
    dialog = pilot.app.screen
    assert type(dialog) is AddBlockEntryDialog
    assert dialog.query_one("#device", Input).value == device
    return dialog


@pilot_test
async def test_add_attach_all_detach_all_remove_on_a_real_device(tui, store, protected_device):
    disk = protected_device()
    app = tui(devices=[disk])
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_block_screen(pilot)
        dialog = await pick(pilot, screen, disk)
        await wait_until(pilot, lambda: "can be added" in static_text(dialog.query_one("#problem")),
                         "the inline check to accept the device")
        await pilot.press("enter")  # in the target input, left empty: no target, first free loop
        await wait_until(pilot, lambda: app.screen is screen, "the dialog to close")
        assert store.load().block == (BlockEntry(disk),)
        entries = screen.query_one("#block-entries", DataTable)
        await wait_until(pilot, lambda: disk in table_keys(entries), "the entry row")
        assert cell(entries, disk, "state") == "detached"
        assert cell(entries, disk, "capture") == "—" and cell(entries, disk, "target") == "—"

        await pilot.click("#attach_all")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "attach results")
        [result] = app.screen.results
        assert result.outcome.value == "ok", result.message
        loop = result.details["loop"]
        assert loops_backed_by(disk) == [loop]  # the kernel's word, from sysfs
        await pilot.press("enter")
        await wait_until(pilot, lambda: cell(entries, disk, "actual") == loop, "the loop in the row")
        assert cell(entries, disk, "state") == "attached"

        await pilot.press("d")
        await settle(pilot)
        assert type(app.screen) is ConfirmDialog  # it ends what is attached: asked first
        await pilot.press("y")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "detach results")
        assert [r.outcome.value for r in app.screen.results] == ["ok"]
        assert loops_backed_by(disk) == []
        await pilot.press("enter")
        await wait_until(pilot, lambda: cell(entries, disk, "state") == "detached", "detached row")

        await pilot.click("#block-entries", offset=(3, 1))  # a click on the selected row:
        await settle(pilot)                                  # its details
        assert type(app.screen) is DetailsDialog
        assert disk in static_text(app.screen.query_one("#details-text"))
        await pilot.press("escape")
        await pilot.click("#remove")
        await settle(pilot)
        assert type(app.screen) is ConfirmDialog
        await pilot.click("#yes")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "remove results")
        assert app.screen.results[-1].outcome.value == "ok"
        await pilot.press("enter")
        await wait_until(pilot, lambda: entries.row_count == 0, "the row to go")
    assert store.load().block == ()


@pilot_test
async def test_attach_all_with_a_fixed_loop_uses_that_loop(tui, store, protected_device, unused_loop):
    disk = protected_device()
    free = unused_loop
    app = tui(devices=[disk])
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_block_screen(pilot)
        dialog = await pick(pilot, screen, disk)
        dialog.query_one("#loop", Input).value = free
        dialog.query_one("#offset", Input).value = "1M"
        await pilot.click("#add")
        await wait_until(pilot, lambda: app.screen is screen, "the dialog to close")
        assert store.load().block == (BlockEntry(disk, loop=free, offset=1 << 20),)
        await pilot.press("t")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "attach results")
        assert app.screen.results[0].details.get("loop") == free, app.screen.results[0].message
    assert loops_backed_by(disk) == [free]
    with open(f"/sys/block/{free.removeprefix('/dev/')}/loop/offset") as f:
        assert int(f.read()) == 1 << 20


def _bad_fields(disk: str) -> dict[str, dict[str, str]]:
    return {
        "offset-unaligned": {"offset": "1000"},
        "offset-not-a-size": {"offset": "ten"},
        "offset-past-end": {"offset": "1G"},
        "sizelimit-not-a-size": {"sizelimit": "1.5G"},
        "loop-not-a-loop": {"loop": "/dev/sda"},
        "loop-is-itself": {"loop": disk},
        "missing-device": {"device": "/dev/mirrorsetup-no-such-disk"},
    }


def _expected_message(store, disk: str, fields: dict[str, str]) -> str:
    """What the services say about the same input (parse_size, then ConfigStore.validate_block)."""
    try:  # (named as the dialog labels them)
        offset = parse_size(fields.get("offset", "0"), what="offset")
        parse_size(fields.get("sizelimit", "0"), what="sizelimit")
    except ValueError as exc:
        return str(exc)
    entry = BlockEntry(fields.get("device", disk), fields.get("loop"), offset)
    with pytest.raises(ConfigError) as refused:
        store.validate_block(entry)
    return str(refused.value)


async def add_with(pilot, disk: str, fields: dict[str, str]) -> AddBlockEntryDialog:
    """The Add dialog for `disk` (picked on the Block screen), `fields` typed, Add pressed."""
    screen = await open_block_screen(pilot)
    dialog = await pick(pilot, screen, disk)
    for name, value in fields.items():
        dialog.query_one(f"#{name}", Input).value = value
    await pilot.click("#add")
    return dialog


@pytest.mark.parametrize("case", list(_bad_fields("/dev/x")))
@pilot_test
async def test_refused_input_shows_the_service_message_and_changes_nothing(
        tui, store, protected_device, config_bytes, case):
    disk = protected_device()
    fields = _bad_fields(disk)[case]
    expected = _expected_message(store, disk, fields)
    app = tui(devices=[disk])
    async with app.run_test(size=(120, 36)) as pilot:
        dialog = await add_with(pilot, disk, fields)
        await wait_until(pilot, lambda: expected in static_text(dialog.query_one("#problem")),
                         f"the message {expected!r}")
        assert app.screen is dialog
    assert config_bytes() is None
    assert loops_backed_by(disk) == []


@pilot_test
async def test_the_add_dialog_says_every_malformed_field_at_once(
        tui, store, protected_device, config_bytes):
    """The dialog said the first malformed field (an offset that is no size hid a bad loop
    and size limit until it was fixed); now every one, as `block add` says them."""
    disk = protected_device()
    fields = {"loop": "/dev/sda", "offset": "ten", "sizelimit": "100"}
    app = tui(devices=[disk])
    async with app.run_test(size=(120, 36)) as pilot:
        dialog = await add_with(pilot, disk, fields)

        def said() -> str:
            return static_text(dialog.query_one("#problem")).replace("\n", " ")
        await wait_until(pilot, lambda: all(f"{k}: " in said() for k in fields), "every field")
        for key, value in fields.items():
            assert f"{key}: " in said() and value in said(), said()
        assert app.screen is dialog
    assert config_bytes() is None
    assert loops_backed_by(disk) == []


@pilot_test
async def test_swap_is_hidden_until_show_excluded_then_greyed_with_its_reason(
        tui, protected_device):
    swap, plain = protected_device(), protected_device()
    run("mkswap", swap)
    app = tui(devices=[swap, plain])
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_block_screen(pilot)
        devices = screen.query_one("#devices", DataTable)
        await wait_until(pilot, lambda: plain in table_keys(devices), "the device list")
        assert swap not in table_keys(devices)
        await pilot.press("x")
        await wait_until(pilot, lambda: swap in table_keys(devices), "the swap row")
        assert "excluded: swap" in cell(devices, swap, "notes")
        assert devices.get_cell(swap, "path").style == "grey50"
        devices.move_cursor(row=devices.get_row_index(swap))
        await pilot.press("a")  # an excluded device does not open the dialog
        await settle(pilot)
        assert app.screen is screen


@pilot_test
async def test_a_target_typed_in_the_dialog_is_saved_and_shown(no_daemon_tui, store, tmp_path,
                                                                 protected_device):
    disk = protected_device()
    target = tmp_path / "replica" / "disk-copy.img"  # a new file in an existing directory
    target.parent.mkdir()
    app = no_daemon_tui([disk])
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_block_screen(pilot)
        dialog = await pick(pilot, screen, disk)
        assert app.focused is dialog.query_one("#target", Input)  # the next thing to type
        await pilot.press(*str(target))
        problem = dialog.query_one("#problem")
        await wait_until(pilot, lambda: "can be added" in static_text(problem),
                         "the inline check to accept the target (it says "
                         f"{static_text(problem)!r})")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen is screen, "the dialog to close")
        assert store.load().block == (BlockEntry(disk, target=str(target)),)
        entries = screen.query_one("#block-entries", DataTable)
        await wait_until(pilot, lambda: disk in table_keys(entries), "the entry row")
        assert cell(entries, disk, "target") == elide(str(target))
        assert cell(entries, disk, "target").endswith("/replica/disk-copy.img")

        await pilot.press("t")  # no daemon: attached, and the Capture column says it is not captured
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "attach results")
        [result] = app.screen.results
        assert result.outcome.value == "ok" and "NOT captured" in result.message, result.message
        loop = result.details["loop"]
        await pilot.press("enter")
        await wait_until(pilot, lambda: cell(entries, disk, "actual") == loop, "the loop in the row")
        assert cell(entries, disk, "capture") == "not captured"
        for key, text in (("actual", loop), ("capture", "not captured")):  # widened, not cut
            assert entries.columns[key].content_width >= len(text), key
    assert not target.exists()  # nothing is replicated without the daemon


@pilot_test
async def test_a_remote_target_whose_room_cannot_be_checked_is_added_with_a_warning(
        no_daemon_tui, store, protected_device):
    """`block add` to a remote target checks the room there (as `target test` tells it); the
    dialog's add says what that found, here that the target could not be reached (a port held
    closed by this test), and the entry is added all the same."""
    import socket

    from app.services.config_toml import TargetHost
    disk = protected_device()
    with socket.socket() as closed:  # bound, never listening: a connect to it is refused
        closed.bind(("127.0.0.1", 0))
        store.add_target(TargetHost(name="backup1", host="127.0.0.1", root="/srv/r",
                                    port=closed.getsockname()[1]))
        app = no_daemon_tui([disk])
        async with app.run_test(size=(80, 24)) as pilot:
            screen = await open_block_screen(pilot)
            dialog = await pick(pilot, screen, disk)
            await pilot.press(*"backup1:disk.img")
            problem = dialog.query_one("#problem")
            await wait_until(pilot, lambda: "can be added" in static_text(problem),
                             f"the inline check to accept the target ({static_text(problem)!r})")
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.screen is screen, "the dialog to close")
            said = [n for n in notices(app) if "the room for backup1:disk.img could not be "
                    "checked (target backup1: " in n]
            assert said and "mirrorsetup target test backup1" in said[0], notices(app)
    assert [e.device for e in store.load().block] == [disk]


@pytest.mark.parametrize("case", ["the-device-itself", "no-such-directory", "smaller-device"])
@pilot_test
async def test_a_refused_target_shows_the_service_message_and_changes_nothing(
        no_daemon_tui, store, tmp_path, protected_device, config_bytes, case):
    disk = protected_device(64 * MiB)
    target = {"the-device-itself": lambda: disk,
              "no-such-directory": lambda: str(tmp_path / "missing" / "copy.img"),
              "smaller-device": lambda: protected_device(32 * MiB)}[case]()
    with pytest.raises(ConfigError) as refused:  # the config service's own words
        store.validate_block(BlockEntry(disk, target=target))
    app = no_daemon_tui([disk])
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_block_screen(pilot)
        dialog = await pick(pilot, screen, disk)
        dialog.query_one("#target", Input).value = target
        await pilot.click("#add")
        await wait_until(pilot, lambda: str(refused.value) in static_text(dialog.query_one("#problem")),
                         f"the message {str(refused.value)!r}")
        assert app.screen is dialog
    assert config_bytes() is None
    assert not (tmp_path / "missing").exists()


@pilot_test
async def test_mirror_and_verify_without_a_daemon_fail_clearly_and_change_nothing(
        no_daemon_tui, store, tmp_path, protected_device, config_bytes):
    disk = protected_device()
    target = tmp_path / "target.img"
    store.add_block(disk, target=str(target))
    before = config_bytes()
    app = no_daemon_tui([disk])
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_block_screen(pilot)
        entries = screen.query_one("#block-entries", DataTable)
        await wait_until(pilot, lambda: disk in table_keys(entries), "the entry row")

        await pilot.press("v")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "verify results")
        [result] = app.screen.results
        assert result.outcome.value == "failed" and result.target == disk
        assert "daemon is not running" in result.message, result.message
        assert any("Daemon screen" in line for line in app.screen.notes)
        await pilot.press("enter")

        await pilot.click("#mirror")
        await settle(pilot)
        assert type(app.screen) is ConfirmDialog
        assert str(target) in static_text(app.screen.query_one("#question"))
        await pilot.press("y")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "mirror results")
        [result] = app.screen.results
        assert result.outcome.value == "failed" and "daemon is not running" in result.message
        await pilot.press("enter")
        await settle(pilot)
        assert app.screen is screen
        assert not screen.query_one("#sync-box").display  # the progress bar is gone again
    assert not target.exists()
    assert config_bytes() == before
    assert loops_backed_by(disk) == []


@pilot_test
async def test_mirror_and_verify_say_what_is_missing(no_daemon_tui, store, protected_device):
    made: list[str] = []
    app = no_daemon_tui(lambda: made)
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_block_screen(pilot)
        await pilot.press("m")  # no entries at all
        await settle(pilot)
        assert app.screen is screen
        assert any("Select a replicated device" in n for n in notices(app))

        disk = protected_device()
        made.append(disk)
        store.add_block(disk)  # captured only: no target
        screen.reload()
        entries = screen.query_one("#block-entries", DataTable)
        await wait_until(pilot, lambda: disk in table_keys(entries), "the entry row")
        await pilot.press("v")
        await settle(pilot)
        assert app.screen is screen
        assert any(f"{disk} has no target to verify" in n for n in notices(app))


@pytest.fixture
def block_daemon(tmp_path, disks):
    """(engine, disk, target, config): a 64 MiB disk in one [[block]] entry with a target,
    captured by a real daemon on a temp socket; stopped (loops, FUSE mount) at teardown."""
    disk = disks(64 * MiB)
    target = tmp_path / "target.img"
    cfg = write_config(tmp_path / "etc" / "replication.toml", [],
                       [{"device": disk, "target": str(target)}])
    eng = Engine(tmp_path, cfg)
    try:
        eng.start()
        yield eng, disk, target, cfg
    finally:
        eng.cleanup()
    assert not [m for m in block_mounts() if m.startswith(str(tmp_path))]


@pilot_test
async def test_verify_then_mirror_through_a_real_daemon(block_daemon):
    eng, disk, target, cfg = block_daemon
    loop = eng.block(disk)["loop"]
    eng.block_drain(disk)
    with open(target, "r+b") as f:  # the target drifts: 4 KiB inside its sixth MiB
        f.seek(5 * MiB + 4096)
        f.write(b"\xff" * 4096)
    assert sha(target, 64 * MiB) != sha(disk, 64 * MiB)

    app = daemon_app(cfg, eng, [disk])
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_block_screen(pilot)
        entries = screen.query_one("#block-entries", DataTable)
        await wait_until(pilot, lambda: disk in table_keys(entries), "the entry row")
        assert cell(entries, disk, "capture") == "captured"
        assert cell(entries, disk, "actual") == loop
        assert cell(entries, disk, "target") == elide(str(target))

        await pilot.press("v")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "verify results")
        [result] = app.screen.results
        assert result.outcome.value == "failed" and "1 of 64 blocks differ" in result.message
        assert app.screen.notes == ["1 range of the target differs (1.0 MiB in all):",
                                    "  bytes 5242880-6291455 (1.0 MiB)",
                                    "Press m (Mirror) to copy the blocks that differ over the target's."]
        assert "bytes 5242880-6291455 (1.0 MiB)" in static_text(
            app.screen.query_one("#results-notes"))
        await pilot.press("enter")

        await pilot.press("m")
        await settle(pilot)
        assert type(app.screen) is ConfirmDialog
        question = static_text(app.screen.query_one("#question"))
        assert "blocks that differ are copied" in question  # as it does: 1 of 64 below
        assert f"Writes through {loop} go on meanwhile" in question
        await pilot.click("#yes")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "mirror results")
        [result] = app.screen.results
        assert result.outcome.value == "ok", result.message
        assert f"mirrored {MiB} bytes (1 of 64 blocks differed)" in result.message  # only that
        bar = screen.query_one("#sync-progress", ProgressBar)
        assert (bar.total, bar.progress) == (64 * MiB, 64 * MiB)  # fed by the daemon's progress
        assert not screen.query_one("#sync-box").display
        assert sha(target, 64 * MiB) == sha(disk, 64 * MiB)  # the bytes, not the UI, say so
        await pilot.press("enter")

        await pilot.press("v")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "second verify")
        [result] = app.screen.results
        assert result.outcome.value == "ok" and result.message == "target matches"
        assert app.screen.notes == []
        await pilot.press("enter")

        await pilot.press("escape", "4")  # the dashboard shows the capture and the daemon's figures
        await settle(pilot)
        assert type(app.screen) is DashboardScreen
        block = app.screen.query_one("#dash-block", DataTable)
        await wait_until(pilot, lambda: disk in table_keys(block), "the dashboard row")
        assert cell(block, disk, "capture") == "captured"
        engine = static_text(app.screen.query_one("#engine"))
        assert f"{disk} via {loop}" in engine and "queued 0 B" in engine, engine


def test_range_lines_count_merge_and_cap():
    assert range_lines([]) == []
    assert range_lines([[0, MiB]]) == ["1 range of the target differs (1.0 MiB in all):",
                                       "  bytes 0-1048575 (1.0 MiB)"]
    many = [[2 * i * MiB, (2 * i + 1) * MiB] for i in range(MAX_RANGES_SHOWN + 5)]
    lines = range_lines(many)
    assert lines[0] == f"{MAX_RANGES_SHOWN + 5} ranges of the target differ (105.0 MiB in all):"
    assert len(lines) == 1 + MAX_RANGES_SHOWN + 1 and lines[-1] == "  … and 5 more ranges"


@pilot_test
async def test_the_dashboard_notices_a_killed_daemon_without_polling(block_daemon):
    eng, disk, target, cfg = block_daemon
    app = daemon_app(cfg, eng, [disk])
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("4")
        await settle(pilot)
        dash = app.screen
        assert type(dash) is DashboardScreen
        block = dash.query_one("#dash-block", DataTable)
        await wait_until(pilot, lambda: disk in table_keys(block), "the dashboard row")
        assert cell(block, disk, "capture") == "captured"
        await wait_until(pilot, lambda: app.watchers is not None and app.watchers.watching_daemon,
                         "the daemon watch")
        eng.kill9()  # no mount changes, no uevent: only the watch connection's end tells
        await wait_until(pilot, lambda: cell(block, disk, "capture") == "no daemon",
                         "capture without a daemon")
        assert any("the daemon stopped or died" in line for line in dash.events)
        assert "capture goes on without a daemon" in static_text(dash.query_one("#warnings"))


# -- the picker on a busy host, and the checks as typed ----------------------------------------

@pilot_test
async def test_the_picker_keeps_the_cursor_on_the_chosen_device_when_others_go(
        tui, protected_device):
    """Another program detaches a loop above the cursor and attaches a new one: the rows stay
    sorted, the cursor stays on the device the administrator chose (not on whatever row now
    sits at its old place); when that one goes, a notice says so."""
    made = sorted((protected_device() for _ in range(4)), key=natural_key)
    chosen = made[2]
    app = tui(devices=lambda: made)
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_block_screen(pilot)
        devices = screen.query_one("#devices", DataTable)
        await wait_until(pilot, lambda: table_keys(devices) == made, "the four devices")
        backing = Path(f"/sys/block/{Path(chosen).name}/loop/backing_file").read_text().strip()
        said = cell(devices, chosen, "notes")  # whose loop it is: its file, the name kept
        assert said.startswith("loop of ") and backing.endswith(said.removeprefix("loop of ").lstrip("…")), said
        devices.focus()
        devices.move_cursor(row=devices.get_row_index(chosen))
        await settle(pilot)

        run("losetup", "-d", made.pop(0))  # uevents, not keys: the screen reloads by itself
        await wait_until(pilot, lambda: table_keys(devices) == made, "the first row to go")
        assert selected_key(devices) == chosen
        made.append(protected_device())  # most likely takes the freed, lower number
        await wait_until(pilot, lambda: table_keys(devices) == sorted(made, key=natural_key),
                         "the new row, in order")
        assert selected_key(devices) == chosen
        await pilot.press("a")
        await settle(pilot)
        assert type(app.screen) is AddBlockEntryDialog
        assert app.screen.query_one("#device", Input).value == chosen
        await pilot.press("escape")

        run("losetup", "-d", chosen)
        made.remove(chosen)
        await wait_until(pilot, lambda: chosen not in table_keys(devices), "the chosen row to go")
        now = selected_key(devices)
        assert any(f"{chosen} went away" in n and f"cursor is on {now}" in n
                   for n in notices(app)), notices(app)
        # Enter meant for the device that went: no dialog for one the administrator did not
        # choose (found by a walk: Add opened for the row the cursor fell on); a second adds it
        await pilot.press("enter")
        await settle(pilot)
        assert app.screen is screen, type(app.screen)
        assert any(f"press Enter again to add {now}" in n for n in notices(app)), notices(app)
        await pilot.press("enter")
        await settle(pilot)
        assert type(app.screen) is AddBlockEntryDialog
        assert app.screen.query_one("#device", Input).value == now
        await pilot.press("escape")


@pilot_test
async def test_the_root_disk_is_refused_by_the_picker_with_its_reason(tui):
    """The picker knows the disk holds the root file system: it says so, no dialog opens (no
    open of the device, no EPERM). A listed device that cannot exist stands in for it."""
    from app.services.blockdevs import BlockDevice
    root = BlockDevice("/dev/mirrorsetup-test-rootdisk", "mirrorsetup-test-rootdisk", 64 << 30,
                       "disk", 252, 0, False, None, None,
                       in_use=("partition mirrorsetup-test-rootdisk1 root file system",))
    app = tui(is_root=True)
    app.services.device_lister = lambda **_: [root]
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_block_screen(pilot)
        devices = screen.query_one("#devices", DataTable)
        await wait_until(pilot, lambda: table_keys(devices) == [root.path], "the root disk row")
        devices.focus()
        await pilot.press("enter")
        await settle(pilot)
        assert app.screen is screen
        assert any(f"{root.path} holds the root file system" in n for n in notices(app))
        assert not any("EPERM" in n for n in notices(app))


@pilot_test
async def test_the_add_dialog_checks_the_loop_and_the_device_as_typed(
        tui, store, protected_device, tmp_path, config_bytes):
    """A loop attached to something else is refused as it is typed; a mounted device can be
    added, with the warning that Attach all refuses it until it is unmounted."""
    disk, busy_loop = protected_device(), protected_device()
    run("mkfs.ext4", "-q", disk)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    app = tui(devices=[disk], is_root=True)
    try:
        async with app.run_test(size=(120, 36)) as pilot:
            screen = await open_block_screen(pilot)
            dialog = await pick(pilot, screen, disk)
            problem = dialog.query_one("#problem")
            dialog.query_one("#loop", Input).value = busy_loop
            await wait_until(pilot, lambda: f"loop {busy_loop} is in use" in static_text(problem),
                             "the busy loop refused as typed")
            assert static_text(problem).startswith("✘ ")
            await pilot.click("#add")
            await settle(pilot)
            assert app.screen is dialog and config_bytes() is None  # refused at Add as well

            dialog.query_one("#loop", Input).value = ""
            await settle(pilot)  # its re-check opens the disk O_EXCL for a moment: not during mount
            run("mount", "-t", "ext4", disk, str(mnt))
            dialog.query_one("#target", Input).value = str(tmp_path / "t.img")  # re-check
            await wait_until(pilot, lambda: f"mounted on {mnt}" in static_text(problem),
                             "the mount named as typed")
            assert static_text(problem).startswith("! ") and "Attach all refuses" in \
                static_text(problem)
            await pilot.click("#add")
            await wait_until(pilot, lambda: app.screen is screen, "the dialog to close")
        assert [e.device for e in store.load().block] == [disk]
    finally:
        run("umount", "-l", str(mnt), check=False)


@pilot_test
async def test_attach_all_of_a_mounted_device_offers_force_and_says_what_it_means(
        no_daemon_tui, store, protected_device, tmp_path):
    disk = protected_device()
    run("mkfs.ext4", "-q", disk)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", "-t", "ext4", disk, str(mnt))
    store.add_block(disk)
    app = no_daemon_tui([disk])
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            screen = await open_block_screen(pilot)
            await pilot.press("t")
            await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "attach results")
            [result] = app.screen.results
            assert result.failed and result.errno == 16 and f"mounted on {mnt}" in result.message
            shown = static_text(app.screen.query_one(".result"))
            assert "--force" not in shown and "Force… below overrides" in shown
            assert loops_backed_by(disk) == []
            await pilot.click("#force")
            await settle(pilot)
            assert type(app.screen) is ConfirmDialog
            assert "NOT captured" in static_text(app.screen.query_one("#question"))
            await pilot.press("y")
            await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "forced results")
            [result] = app.screen.results
            assert result.outcome.value == "ok" and "forced over" in result.message, result.message
            assert loops_backed_by(disk) == [result.details["loop"]]
            await pilot.press("enter")
            assert app.screen is screen
    finally:
        run("umount", "-l", str(mnt), check=False)


@pilot_test
async def test_an_entry_removed_with_the_cli_leaves_the_block_screen(tui, store,
                                                                     protected_device,
                                                                     config_path):
    """The screen follows the configuration file (inotify): no key is pressed after the CLI."""
    disk = protected_device()
    store.add_block(disk)
    app = tui(devices=[disk])
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_block_screen(pilot)
        entries = screen.query_one("#block-entries", DataTable)
        await wait_until(pilot, lambda: disk in table_keys(entries), "the entry row")
        await wait_until(pilot, lambda: app.watchers is not None, "the watchers")
        r = run(sys.executable, "-m", "app", "--config", str(config_path), "block", "remove",
                disk, check=False)
        assert r.returncode == 0, r.stderr
        await wait_until(pilot, lambda: table_keys(entries) == [], "the row to go")
