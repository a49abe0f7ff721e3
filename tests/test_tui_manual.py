"""Manual replication: attach and detach a loop now; nothing is written to the configuration."""

from __future__ import annotations

import pytest
from test_tui_support import (  # noqa: F401 (fixtures)
    config_bytes, loops_backed_by, pilot_test, protected_device, settle, static_text,
    table_keys, tui, wait_until)
from textual.widgets import DataTable, Input

from app.screens.dialogs import ResultsDialog
from app.screens.manual import ManualScreen

pytestmark = pytest.mark.root


async def open_manual(pilot) -> ManualScreen:
    await pilot.press("3")
    await settle(pilot)
    screen = pilot.app.screen
    assert type(screen) is ManualScreen
    assert "NOT PERSISTED" in static_text(screen.query_one("#not-persisted"))
    return screen


@pilot_test
async def test_attach_now_and_detach_now_leave_the_config_alone(tui, protected_device, config_bytes):
    disk = protected_device()
    app = tui()
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_manual(pilot)
        screen.query_one("#device", Input).value = disk
        await pilot.click("#attach")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "attach results")
        [result] = app.screen.results
        assert result.outcome.value == "ok", result.message
        loop = result.details["loop"]
        assert loops_backed_by(disk) == [loop]
        await pilot.press("enter")
        loops = screen.query_one("#loops", DataTable)
        await wait_until(pilot, lambda: loop in table_keys(loops), "the loop in the table")

        loops.focus()
        loops.move_cursor(row=loops.get_row_index(loop))
        await pilot.press("ctrl+d")  # detach the selected loop
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "detach results")
        assert app.screen.results[0].outcome.value == "ok", app.screen.results[0].message
        assert loops_backed_by(disk) == []
    assert config_bytes() is None


@pytest.mark.parametrize("field,value,words", [
    ("device", "/dev/mirrorsetup-no-such-disk", "mirrorsetup-no-such-disk"),
    ("offset", "ten", "offset: not a size"),
    ("offset", "513", "multiple of 512"),
    ("sizelimit", "1.5G", "size limit: not a size"),
    ("loop", "/dev/sda", "/dev/loopN"),
])
@pilot_test
async def test_bad_input_is_refused_with_a_message(tui, protected_device, config_bytes,
                                                   field, value, words):
    """Each wrong input is refused with a message that names the device: "✘ refused", as the
    CLI refuses it (exit 2, nothing changed); it said "✘ failed", the word of an attach that
    failed while it was done."""
    disk = protected_device()
    app = tui()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_manual(pilot)
        screen.query_one("#device", Input).value = disk
        screen.query_one(f"#{field}", Input).value = value
        await pilot.click("#attach")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "the refusal")
        [result] = app.screen.results
        assert result.failed and words in result.message
        # the device it is about, also when the call raised (a loop that is not /dev/loopN:
        # "✘ failed" had an empty subject)
        assert result.target == (value if field == "device" else disk), result
        assert result.refused, result
        assert static_text(app.screen.query_one(".result")).startswith(
            f"✘ refused   {result.target}\n")
    assert loops_backed_by(disk) == []
    assert config_bytes() is None


@pilot_test
async def test_detach_now_of_a_loop_that_is_not_attached(tui):
    app = tui()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_manual(pilot)
        screen.query_one("#detach-loop", Input).value = "/dev/loop-what"
        await pilot.click("#detach")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "the refusal")
        [result] = app.screen.results
        assert result.failed and "/dev/loop-what" in result.message
