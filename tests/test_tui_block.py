"""Block device screen on real loop devices: pick a device, add it, attach all and detach all
(checked in sysfs), remove it, refused input, and the excluded devices toggle."""

from __future__ import annotations

import pytest
from test_tui_support import (  # noqa: F401 (fixtures)
    cell, config_bytes, loops_backed_by, pilot_test, protected_device, run, settle,
    static_text, store, table_keys, tui, wait_until)
from textual.widgets import DataTable, Input

from app.screens.block import BlockScreen
from app.screens.dialogs import AddBlockEntryDialog, ConfirmDialog, ResultsDialog
from app.services.config import ENCRYPTION_REFUSAL, BlockEntry
from app.services.results import ConfigError
from app.services.units import parse_size

pytestmark = pytest.mark.root


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
    app = tui()
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_block_screen(pilot)
        dialog = await pick(pilot, screen, disk)
        await wait_until(pilot, lambda: "can be added" in static_text(dialog.query_one("#problem")),
                         "the inline check to accept the device")
        await pilot.press("enter")  # in the loop input: first free
        await wait_until(pilot, lambda: app.screen is screen, "the dialog to close")
        assert store.load().block == (BlockEntry(disk),)
        entries = screen.query_one("#block-entries", DataTable)
        await wait_until(pilot, lambda: disk in table_keys(entries), "the entry row")
        assert cell(entries, disk, "state") == "detached"

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
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "detach results")
        assert [r.outcome.value for r in app.screen.results] == ["ok"]
        assert loops_backed_by(disk) == []
        await pilot.press("enter")
        await wait_until(pilot, lambda: cell(entries, disk, "state") == "detached", "detached row")

        await pilot.click("#block-entries", offset=(3, 1))  # the first row, under the header
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
async def test_attach_all_with_a_fixed_loop_uses_that_loop(tui, store, protected_device):
    disk = protected_device()
    free = run("losetup", "--find").stdout.strip()
    app = tui()
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
        "loop-not-a-loop": {"loop": "/dev/sda"},
        "loop-is-itself": {"loop": disk},
        "encryption": {"encryption": "aes"},
        "missing-device": {"device": "/dev/mirrorsetup-no-such-disk"},
    }


def _expected_message(store, disk: str, fields: dict[str, str]) -> str:
    """What the services say about the same input (parse_size, then ConfigStore.validate_block)."""
    try:
        offset = parse_size(fields.get("offset", "0"))
    except ValueError as exc:
        return str(exc)
    entry = BlockEntry(fields.get("device", disk), fields.get("loop"), offset,
                       encryption=fields.get("encryption"))
    with pytest.raises(ConfigError) as refused:
        store.validate_block(entry)
    return str(refused.value)


@pytest.mark.parametrize("case", list(_bad_fields("/dev/x")))
@pilot_test
async def test_refused_input_shows_the_service_message_and_changes_nothing(
        tui, store, protected_device, config_bytes, case):
    disk = protected_device()
    fields = _bad_fields(disk)[case]
    expected = _expected_message(store, disk, fields)
    if case == "encryption":
        assert expected == ENCRYPTION_REFUSAL
    app = tui()
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_block_screen(pilot)
        dialog = await pick(pilot, screen, disk)
        for name, value in fields.items():
            dialog.query_one(f"#{name}", Input).value = value
        await pilot.click("#add")
        await wait_until(pilot, lambda: expected in static_text(dialog.query_one("#problem")),
                         f"the message {expected!r}")
        assert app.screen is dialog
    assert config_bytes() is None
    assert loops_backed_by(disk) == []


@pilot_test
async def test_swap_is_hidden_until_show_excluded_then_greyed_with_its_reason(
        tui, protected_device):
    swap = protected_device()
    run("mkswap", swap)
    app = tui()
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_block_screen(pilot)
        devices = screen.query_one("#devices", DataTable)
        await wait_until(pilot, lambda: devices.row_count > 0, "the device list")
        assert swap not in table_keys(devices)
        await pilot.press("x")
        await wait_until(pilot, lambda: swap in table_keys(devices), "the swap row")
        assert "excluded: swap" in cell(devices, swap, "notes")
        assert devices.get_cell(swap, "path").style == "grey50"
        devices.move_cursor(row=devices.get_row_index(swap))
        await pilot.press("a")  # an excluded device does not open the dialog
        await settle(pilot)
        assert app.screen is screen
