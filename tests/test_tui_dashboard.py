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


@pilot_test
async def test_other_tools_loops_and_mounts_are_logged_without_reading_the_state_again(
        tui, store, tmp_path, foreign_mount, scratch_loop, protected_device):
    """On a host churning loops and mounts of other tools, each event read every entry's
    state again (every loop, every process's descriptors): a dashboard nobody touched kept
    about a third of a CPU busy. Those events are logged; only what concerns an entry reads again."""
    data = tmp_path / "data"
    data.mkdir()
    store.add_filesystem(data)
    disk = protected_device()
    store.add_block(disk)
    app = tui()
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_dashboard(pilot)
        fs = screen.query_one("#dash-fs", DataTable)
        await wait_until(pilot, lambda: str(data) in table_keys(fs), "the entry row")
        await wait_until(pilot, lambda: screen._interest is not None and not screen._loading,
                         "the first read")
        reads, uevents = [], []
        real = screen.reload
        screen.reload = lambda: (reads.append(1), real())[1]
        app.block_signal.subscribe(app, lambda batch: uevents.extend(n for _, n in batch))
        mounted = []  # (on a busy host the line itself may be counted with others, not shown)
        app.mounts_signal.subscribe(app, lambda diff: mounted.extend(
            m.mount_point for m in diff.added))

        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        foreign_mount(elsewhere)
        other = scratch_loop(1 << 20)  # another tool's loop, on a file of its own
        await wait_until(pilot, lambda: str(elsewhere) in mounted, "the other mount's event")
        name = other.removeprefix("/dev/")
        await wait_until(pilot, lambda: name in uevents, "the other loop's uevent")
        await settle(pilot)
        assert reads == [], screen.events

        loop = run("losetup", "--find", "--show", disk).stdout.strip()  # onto the entry's device
        await wait_until(pilot, lambda: reads, "a read after a loop onto the entry's device")
        block = screen.query_one("#dash-block", DataTable)
        await wait_until(pilot, lambda: cell(block, disk, "loop") == loop, "the loop in the row")
        reads.clear()
        foreign_mount(data)  # at the entry's directory
        await wait_until(pilot, lambda: cell(fs, str(data), "state") == "not mounted (tmpfs here)",
                         "the row to show the tmpfs")
        assert reads


@pilot_test
async def test_other_tools_mounts_beyond_five_a_second_are_counted_in_one_line(tui, store, tmp_path):
    """A host churning mounts wrote a log line for each (hundreds a second), and redrawing
    the log kept a CPU busy: beyond five a second, other tools' mounts are counted, the count
    logged once a second; an entry's own mounts are always logged one by one."""
    from app.services.mounts import MountDiff, MountEntry
    data = tmp_path / "data"
    data.mkdir()
    store.add_filesystem(data)
    app = tui()

    def tmpfs(point) -> MountEntry:
        return MountEntry(9000, 1, 0, 9000, "/", str(point), "rw", (), "tmpfs", "churn", "rw")

    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_dashboard(pilot)
        await wait_until(pilot, lambda: screen._interest is not None, "the first read")
        # (the host's own mounts may have been counted just before: a fresh second here;
        # nothing else runs on the UI between these calls)
        screen.events.clear()
        screen._other_lines.clear()
        screen._other_mounts = 0
        for i in range(20):
            screen._mounts_changed(MountDiff(added=(tmpfs(tmp_path / "churn" / f"m{i}"),)))
        screen._mounts_changed(MountDiff(added=(tmpfs(data),)))  # the entry's
        shown = [line for line in screen.events if str(tmp_path / "churn") in line]
        assert len(shown) == 5, list(screen.events)
        assert any(line.endswith(f"on {data}") for line in screen.events), list(screen.events)

        def counted() -> int:
            return sum(int(line.split()[1]) for line in screen.events
                       if line.endswith("changes of other mounts (none of an entry's)"))
        await wait_until(pilot, lambda: counted() >= 15, "the count")  # (and the host's, if any)


def test_a_daemon_that_does_not_answer_is_said_in_the_line_and_why_behind_g():
    """The daemon line at 80 columns cut 'the daemon (pid N) on SOCKET does …' before what
    matters (a tmux walk with a SIGSTOPped daemon): it says 'not answering (pid N)' and where
    the rest is; the Engine view (g) has the whole text, with what resumes it."""
    from app.screens.dashboard import engine_line, engine_text
    from app.services.results import DaemonNotAnswering
    from app.services.status import StatusSnapshot
    snap = StatusSnapshot(taken_at=0.0)
    exc = DaemonNotAnswering("the daemon (pid 4242) on /run/mirrorsetup/control.sock does not "
                             "answer (no reply to ping in 10 s)", pid=4242,
                             obj="/run/mirrorsetup/control.sock")
    snap.daemon_silent(exc)
    line = engine_line(snap).plain
    assert line == "daemon: not answering (pid 4242); g says why and what to do", line
    assert len(line) <= 78
    assert engine_text(snap).plain.startswith("the daemon (pid 4242) on /run/mirrorsetup/"
                                              "control.sock does not answer (no reply to ping")
    assert StatusSnapshot(taken_at=0.0, engine_error="gone").engine_silent is None
