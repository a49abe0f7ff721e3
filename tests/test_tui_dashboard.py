"""The live dashboard sees what other processes do: a mount (mountinfo POLLPRI) and a loop
attached by losetup (kernel uevent). Waits are bounded loops on the UI, never timings."""

from __future__ import annotations

import pytest
from test_tui_support import (  # noqa: F401 (fixtures)
    cell, loops_backed_by, pilot_test, protected_device, run, settle, static_text, store,
    table_keys, tui, wait_until)
from textual.widgets import DataTable

from app.screens.dashboard import DashboardScreen

pytestmark = pytest.mark.root


@pytest.fixture
def foreign_mount(tmp_path):
    """mount(path): a tmpfs mounted by another process (util-linux mount); unmounted at teardown."""
    made = []

    def mount(path) -> None:
        run("mount", "-t", "tmpfs", "-o", "size=1m", "tui-dashboard-test", str(path))
        made.append(path)

    yield mount
    for path in reversed(made):
        run("umount", "-l", str(path), check=False)


async def open_dashboard(pilot) -> DashboardScreen:
    await pilot.press("4")
    await settle(pilot)
    assert type(pilot.app.screen) is DashboardScreen
    return pilot.app.screen


@pilot_test
async def test_a_mount_made_by_another_process_shows_in_the_log_and_the_row(
        tui, store, tmp_path, foreign_mount):
    data = tmp_path / "data"
    data.mkdir()
    store.add_filesystem(data)
    app = tui()
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_dashboard(pilot)
        fs = screen.query_one("#dash-fs", DataTable)
        await wait_until(pilot, lambda: str(data) in table_keys(fs), "the entry row")
        assert cell(fs, str(data), "state") == "not mounted"
        assert "not mounted as mirrorfs" in static_text(screen.query_one("#warnings"))

        foreign_mount(data)
        await wait_until(pilot, lambda: any(f"on {data}" in line for line in screen.events),
                         "the mount in the event log")
        await wait_until(pilot, lambda: cell(fs, str(data), "state") == "not mounted (tmpfs here)",
                         "the row to show the tmpfs")
        line = next(line for line in screen.events if f"on {data}" in line)
        assert line.split()[1:3] == ["mounted", "tmpfs"]


@pilot_test
async def test_a_loop_attached_by_losetup_shows_as_attached(tui, store, protected_device):
    disk = protected_device()
    store.add_block(disk)
    app = tui()
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_dashboard(pilot)
        block = screen.query_one("#dash-block", DataTable)
        await wait_until(pilot, lambda: disk in table_keys(block), "the entry row")
        assert cell(block, disk, "state") == "detached"
        assert cell(block, disk, "capture") == "—"
        cursor = block.cursor_coordinate

        loop = run("losetup", "--find", "--show", disk).stdout.strip()
        assert loops_backed_by(disk) == [loop]
        await wait_until(pilot, lambda: cell(block, disk, "loop") == loop, "the loop in the row")
        assert cell(block, disk, "state") == "attached"
        assert cell(block, disk, "capture") == "not captured"  # losetup's loop is on the raw device
        assert "attached without capture" in static_text(screen.query_one("#warnings"))
        assert block.cursor_coordinate == cursor  # updated in place, not rebuilt
        await wait_until(pilot, lambda: any(f"{disk}: detached → attached as {loop}, not captured"
                                            in e for e in screen.events), "the transition in the log")
