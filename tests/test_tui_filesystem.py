"""File system replication screen: add a directory, remove it, refused input, mount all."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import pytest
from test_engine_support import engine_maker, mirrorfs_mounts
from test_tui_support import (  # noqa: F401 (fixtures)
    cell, config_bytes, notices, pilot_test, run, settle, static_text, store, table_keys, tui,
    wait_until, wait_while_a_worker_waits)
from textual.widgets import DataTable, Input, Switch

from app.screens.dialogs import AddFsEntryDialog, ConfirmDialog, ResultsDialog
from app.screens.filesystem import FilesystemScreen
from app.services.config import ROOT_REFUSAL, FsEntry
from app.services.results import ConfigError


async def open_add_dialog(pilot) -> AddFsEntryDialog:
    await pilot.press("1")
    await settle(pilot)
    await pilot.press("a")
    await settle(pilot)
    assert type(pilot.app.screen) is AddFsEntryDialog
    return pilot.app.screen


@pilot_test
async def test_add_a_directory_with_the_form_then_remove_it(tui, store, tmp_path):
    data = tmp_path / "srv data"  # a space, as real paths have
    data.mkdir()
    app = tui()
    async with app.run_test(size=(120, 36)) as pilot:
        dialog = await open_add_dialog(pilot)
        dialog.query_one("#path", Input).value = str(data)
        await wait_until(pilot, lambda: "can be added" in static_text(dialog.query_one("#problem")),
                         "the inline check to accept the path")
        await pilot.click("#atime")
        assert dialog.query_one("#atime", Switch).value
        await pilot.click("#add")
        await wait_until(pilot, lambda: type(app.screen) is FilesystemScreen, "the dialog to close")
        table = app.screen.query_one("#fs-entries", DataTable)
        await wait_until(pilot, lambda: str(data) in table_keys(table), "the new row")
        assert cell(table, str(data), "atime") == "replicated"
        assert cell(table, str(data), "state") == "not mounted"
        assert store.load().filesystem == (FsEntry(str(data), True, None),)

        await pilot.press("r")
        await settle(pilot)
        assert type(app.screen) is ConfirmDialog
        await pilot.press("y")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "the results")
        assert [r.outcome.value for r in app.screen.results] == ["ok"]
        await pilot.press("enter")
        await wait_until(pilot, lambda: table.row_count == 0, "the row to go")
    assert store.load().filesystem == ()


@pilot_test
async def test_escape_while_an_add_runs_waits_for_its_result(tui, store, tmp_path, monkeypatch):
    """Add cannot be taken back once pressed: Escape then says so and the dialog stays, so
    the add's result is seen (closed, the entry might be added with nobody told, or, its
    worker finding no App any more, not added with nobody told either)."""
    data = tmp_path / "data"
    data.mkdir()
    release, asked = threading.Event(), threading.Event()
    app = tui()
    async with app.run_test(size=(80, 24)) as pilot:
        dialog = await open_add_dialog(pilot)
        real = app.services.replication.add_filesystem

        def slow_add(*args, **kw):
            asked.set()
            release.wait(20)
            return real(*args, **kw)
        monkeypatch.setattr(app.services.replication, "add_filesystem", slow_add)
        dialog.query_one("#path", Input).value = str(data)
        await wait_until(pilot, lambda: "can be added" in static_text(dialog.query_one("#problem")),
                         "the inline check to accept the path")
        await pilot.click("#add")
        await wait_while_a_worker_waits(pilot, asked.is_set, "the add to start")
        await pilot.press("escape")
        await pilot.pause(0.2)
        assert asked.is_set() and app.screen is dialog
        assert any("being added" in str(n.message) for n in app._notifications)
        release.set()
        await wait_until(pilot, lambda: type(app.screen) is FilesystemScreen, "the dialog to close")
        table = app.screen.query_one("#fs-entries", DataTable)
        await wait_until(pilot, lambda: str(data) in table_keys(table), "the new row")
    assert store.load().filesystem == (FsEntry(str(data), False, None),)


@pilot_test
async def test_remove_asks_first_and_no_keeps_the_entry(tui, store, tmp_path, config_bytes):
    store.add_filesystem(tmp_path)
    before = config_bytes()
    app = tui()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)
        await pilot.press("n")
        await settle(pilot)
        assert type(app.screen) is FilesystemScreen
        assert table_keys(app.screen.query_one("#fs-entries", DataTable)) == [str(tmp_path)]
    assert config_bytes() == before


class RaisingReplication:
    """The real Replication, whose forced remove raises (a service call that fails without a
    result) after the plain one was refused as busy (EBUSY: Force is offered)."""

    def __init__(self, real) -> None:
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def remove_filesystem(self, path: str, force: bool = False):
        from app.services.results import MirrorError, Outcome, Result
        if force:
            raise MirrorError("umount2: Operation not permitted", errno=1, obj=path)
        return [Result("remove", path, Outcome.FAILED, "mirrorfs is still mounted there", 16)]


@pilot_test
async def test_actions_that_raise_name_the_entry_they_are_about(tui, store, tmp_path,
                                                                monkeypatch):
    """A call that raises instead of returning results (a forced remove; a fault below the
    access-time toggle) was shown as "✘ failed" with an empty subject. It names the entry."""
    store.add_filesystem(tmp_path)
    app = tui(is_root=True)
    app.services._replication = RaisingReplication(app.services.replication)

    def broken(entry):
        raise RuntimeError("a fault below")
    monkeypatch.setattr(app.services.store, "set_filesystem", broken)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        await pilot.press("t")  # the access-time toggle
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "the toggle's results")
        [result] = app.screen.results
        assert result.failed and result.target == str(tmp_path), result
        assert "a fault below" in result.message, result
        assert static_text(app.screen.query_one(".result")).startswith(
            f"✘ failed    {tmp_path}\n")
        await pilot.press("enter")
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)
        await pilot.press("y")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "the remove's results")
        await pilot.click("#force")
        await settle(pilot)
        await pilot.press("y")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog and app.screen.results[
            0].errno == 1, "the forced remove's results")
        [result] = app.screen.results
        assert result.failed and result.target == str(tmp_path), result
        assert result.message == "umount2: Operation not permitted", result


def _bad_paths(tmp_path):
    (tmp_path / "a-file").write_text("not a directory\n")
    return {"root": "/", "missing": str(tmp_path / "missing"), "file": str(tmp_path / "a-file"),
            "relative": "relative/dir"}


@pytest.mark.parametrize("case", ["root", "missing", "file", "relative"])
@pilot_test
async def test_refused_path_shows_the_service_message_and_changes_nothing(
        tui, store, tmp_path, config_bytes, case):
    bad = _bad_paths(tmp_path)[case]
    with pytest.raises(ConfigError) as refused:  # the words the service uses
        store.validate_filesystem(FsEntry(bad))
    if case == "root":
        assert str(refused.value) == ROOT_REFUSAL
    app = tui()
    async with app.run_test(size=(80, 24)) as pilot:
        dialog = await open_add_dialog(pilot)
        dialog.query_one("#path", Input).value = bad
        await pilot.press("enter")  # submit anyway: the service refuses it again
        await wait_until(pilot, lambda: str(refused.value) in static_text(dialog.query_one("#problem")),
                         "the service's message")
        assert app.screen is dialog
        await pilot.press("escape")
        assert type(app.screen) is FilesystemScreen
    assert config_bytes() is None


@pilot_test
async def test_refused_target_inside_the_directory(tui, store, tmp_path, config_bytes):
    inner = tmp_path / "inner"
    inner.mkdir()
    with pytest.raises(ConfigError) as refused:
        store.validate_filesystem(FsEntry(str(tmp_path), target=str(inner)))
    app = tui()
    async with app.run_test(size=(120, 36)) as pilot:
        dialog = await open_add_dialog(pilot)
        dialog.query_one("#path", Input).value = str(tmp_path)
        dialog.query_one("#target", Input).value = str(inner)
        await pilot.click("#add")
        await wait_until(pilot, lambda: str(refused.value) in static_text(dialog.query_one("#problem")),
                         "the target refusal")
    assert config_bytes() is None


@pilot_test
async def test_access_time_toggle_rewrites_the_entry(tui, store, tmp_path):
    store.add_filesystem(tmp_path)
    app = tui()
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        await pilot.press("t")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "the results")
        await pilot.press("escape")
        table = app.screen.query_one("#fs-entries", DataTable)
        await wait_until(pilot, lambda: cell(table, str(tmp_path), "atime") == "replicated",
                         "the row to show it")
    assert store.load().filesystem[0].replicate_atime is True


@pilot_test
async def test_an_entrys_target_is_set_with_e_checked_as_typed(tui, store, tmp_path):
    """e (Target): the selected entry's target, checked as typed as an add checks it (a
    directory that holds something that is not our replica is refused), then set; the row
    shows it. The add's hint had said: remove the entry and add it again."""
    from app.screens.dialogs import SetTargetDialog
    src, full, new = tmp_path / "src", tmp_path / "full", tmp_path / "new"
    src.mkdir()
    full.mkdir()
    (full / "theirs").write_text("not ours")
    store.add_filesystem(src)
    app = tui(control_socket=str(tmp_path / "no-daemon.sock"))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        await pilot.press("e")
        await wait_until(pilot, lambda: type(app.screen) is SetTargetDialog, "the target dialog")
        dialog = app.screen
        problem = lambda: static_text(dialog.query_one("#problem"))  # noqa: E731
        assert "it has no target now" in problem()
        bottom = dialog.query_one("#set").region.bottom  # usable at 80x24: Set on screen
        assert 0 < bottom <= 23, dialog.query_one("#set").region
        field = dialog.query_one("#target", Input)
        field.value = str(full)
        await wait_until(pilot, lambda: f"✘ target {full} is not empty" in problem(),
                         "the refusal of a target that is not ours")
        field.value = str(new)
        await wait_until(pilot, lambda: f"can be set: {new}" in problem(), "the check to pass")
        await pilot.click("#set")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "the results")
        [result] = app.screen.results
        assert result.outcome.value == "ok" and f"replicates to {new} now" in result.message, result
        await pilot.press("escape")
        await pilot.press("i")  # (at 80 columns the table leaves the target to the details)
        await wait_until(pilot, lambda: app.screen.query("#details-text") and str(new) in
                         static_text(app.screen.query_one("#details-text")), "the details to show it")
    assert store.load().filesystem[0].target == str(new) and (full / "theirs").exists()


@pilot_test
async def test_mount_all_without_a_daemon_says_so_per_entry(tui, store, tmp_path, config_bytes):
    """No daemon runs in the test (none is started): the results say how to start it."""
    store.add_filesystem(tmp_path)
    before = config_bytes()
    app = tui(control_socket=str(tmp_path / "no-daemon.sock"))
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        await pilot.click("#mount_all")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "the results")
        results = app.screen.results
        assert results and all(r.failed for r in results)
        assert "not running" in results[0].message or "not installed" in results[0].message
    assert config_bytes() == before


@pilot_test
async def test_a_corrupt_config_is_shown_with_its_line_and_never_rewritten(
        tui, store, tmp_path, config_path, config_bytes):
    config_path.parent.mkdir(parents=True)
    config_path.write_text('schema = 1\n\n[[filesystem]]\npath = "relative"\n')
    before = config_bytes()
    with pytest.raises(ConfigError) as refused:
        store.load()
    app = tui()
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        banner = app.screen.query_one("#load-error")
        assert banner.display and str(refused.value) in static_text(banner)
        dialog = await open_add_dialog_here(pilot)
        dialog.query_one("#path", Input).value = str(tmp_path)
        await pilot.press("enter")
        await wait_until(pilot, lambda: "line 4" in static_text(dialog.query_one("#problem")),
                         "the add to be refused with the file's line")
    assert config_bytes() == before


async def open_add_dialog_here(pilot) -> AddFsEntryDialog:
    await pilot.press("a")
    await settle(pilot)
    assert type(pilot.app.screen) is AddFsEntryDialog
    return pilot.app.screen


# -- what other programs change, and invalid entries --------------------------------------------

@pilot_test
async def test_an_entry_added_with_the_cli_appears_without_a_key(tui, tmp_path, config_path):
    """The screen follows the configuration file (inotify), not a timer and not a keypress."""
    data = tmp_path / "data"
    data.mkdir()
    app = tui()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        table = app.screen.query_one("#fs-entries", DataTable)
        await wait_until(pilot, lambda: app.watchers is not None, "the watchers")
        r = run(sys.executable, "-m", "app", "--config", str(config_path), "fs", "add", str(data))
        assert r.returncode == 0, r.stderr
        await wait_until(pilot, lambda: str(data) in table_keys(table), "the new row")


@pilot_test
async def test_a_hand_edited_slash_is_flagged_and_a_newline_stays_on_one_line(
        tui, tmp_path, config_path, config_bytes):
    odd = tmp_path / "two\nlines"
    odd.mkdir()
    config_path.parent.mkdir(parents=True)
    escaped = str(odd).replace("\n", "\\n")  # TOML's escape for the newline
    config_path.write_text(f'schema = 1\n[[filesystem]]\npath = "/"\n[[filesystem]]\n'
                           f'path = "{escaped}"\n')
    before = config_bytes()
    app = tui()
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        table = app.screen.query_one("#fs-entries", DataTable)
        await wait_until(pilot, lambda: table.row_count == 2, "both rows")
        assert cell(table, "/", "state") == "invalid"
        assert cell(table, str(odd), "path") == str(tmp_path / "two\\nlines")
        assert "\n" not in cell(table, str(odd), "path")
        table.move_cursor(row=table.get_row_index("/"))
        await pilot.press("i")
        await settle(pilot)
        details = static_text(app.screen.query_one("#details-text"))
        assert "INVALID" in details and "Do not select the root" in details
        await pilot.press("escape", "escape", "4")
        await settle(pilot)
        warnings = static_text(app.screen.query_one("#warnings"))
        assert "/: invalid entry: Do not select the root" in warnings
        dash = app.screen.query_one("#dash-fs", DataTable)
        assert cell(dash, "/", "state") == "invalid"
    assert config_bytes() == before


@pytest.fixture
def fs_daemon(tmp_path):
    """(engine, src, tgt): a real daemon over the test's config (the `tui` fixture's file) with
    one entry src -> tgt holding a file; stopped and unmounted at teardown."""
    with engine_maker(tmp_path) as make:
        eng, src, tgt = make(seed=lambda s: (s / "a").write_text("alpha"))
        yield eng, src, tgt


@pytest.mark.root
@pilot_test
async def test_verify_then_mirror_a_directory_through_a_real_daemon(tui, fs_daemon):
    eng, src, tgt = fs_daemon
    eng.drain(src)
    os.unlink(os.path.join(tgt, "a"))  # the target drifts behind the engine's back
    app = tui(control_socket=eng.socket, is_root=True)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        table = app.screen.query_one("#fs-entries", DataTable)
        await wait_until(pilot, lambda: src in table_keys(table), "the entry row")
        await pilot.press("v")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "verify results")
        [result] = app.screen.results
        assert result.failed, result.message
        notes = static_text(app.screen.query_one("#results-notes"))
        assert "a: missing at target" in notes and "Press c (Mirror)" in notes
        await pilot.press("enter")
        await pilot.press("c")
        await settle(pilot)
        assert type(app.screen) is ConfirmDialog
        await pilot.press("y")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "mirror results")
        assert [r.outcome.value for r in app.screen.results] == ["ok"]
        assert open(os.path.join(tgt, "a")).read() == "alpha"  # the files, not the UI, say so
        await pilot.press("enter")
        await pilot.press("v")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "second verify")
        assert app.screen.results[0].message == "target matches"


class HeldReplication:
    """The real Replication, with unmount_all held until the test has read the screen: a
    running action cannot otherwise be caught at a known moment."""

    def __init__(self, real) -> None:
        self.real = real
        self.go = threading.Event()

    def __getattr__(self, name):
        return getattr(self.real, name)

    def unmount_all(self, force: bool = False, **kw):
        assert self.go.wait(60)
        return self.real.unmount_all(force=force, **kw)


async def unmount_all_of_the_mounted(app, pilot, src: str) -> None:
    """On the Filesystem screen, once `src` shows mounted: Unmount all, asked first, Yes."""
    await pilot.press("1")
    await settle(pilot)
    table = app.screen.query_one("#fs-entries", DataTable)
    await wait_until(pilot, lambda: cell(table, src, "state") == "mounted", "mounted")
    await pilot.press("u")
    await settle(pilot)
    assert type(app.screen) is ConfirmDialog  # it ends the capture: asked first
    await pilot.press("y")


@pytest.mark.root
@pilot_test
async def test_unmount_all_says_what_it_waits_for_then_offers_a_lazy_unmount(tui, fs_daemon):
    eng, src, tgt = fs_daemon
    app = tui(control_socket=eng.socket, is_root=True)
    held = HeldReplication(app.services.replication)
    app.services._replication = held
    busy = open(os.path.join(src, "a"))  # a file open under the entry: unmount refuses
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await unmount_all_of_the_mounted(app, pilot, src)
            await pilot.pause()
            waiting = app.screen.query_one("#waiting")
            assert waiting.display
            assert src in static_text(waiting) and "drains" in static_text(waiting)
            held.go.set()
            await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "the results")
            [result] = app.screen.results
            assert result.failed and result.errno == 16, result.message
            assert "Force… below" in static_text(app.screen.query_one(".result"))
            await pilot.click("#force")
            await settle(pilot)
            assert type(app.screen) is ConfirmDialog
            assert "lazily" in static_text(app.screen.query_one("#question"))
            await pilot.press("y")
            await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "forced results")
            assert [r.outcome.value for r in app.screen.results] == ["ok"], app.screen.results
            assert src not in mirrorfs_mounts()
    finally:
        busy.close()


@pytest.mark.root
@pilot_test
async def test_unmount_all_says_the_worker_it_waits_for_as_a_notice(tui, fs_daemon):
    """Unmount all waits where a daemon stop waits (a worker that does not answer: 45 s, then
    it is killed) and said nothing meanwhile: the wait is a notice now, as the Daemon screen's
    stop says it, naming the worker and how to resume it."""
    eng, src, tgt = fs_daemon
    pid = eng.status(src)["worker_pid"]
    app = tui(control_socket=eng.socket, is_root=True)
    os.kill(pid, signal.SIGSTOP)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await unmount_all_of_the_mounted(app, pilot, src)
            said = f"{src}: asked its capture to end"
            await wait_until(pilot, lambda: any(said in n and f"kill -CONT {pid} resumes it" in n
                                                for n in notices(app)), "the notice")
            # (a worker the screen's refresh asked already is given 5 s, then killed)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "the results")
            assert [r.target for r in app.screen.results] == [src], app.screen.results
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def write_files(src: str, n: int = 20) -> None:
    """Changes no event the console hears tells of (no mount, no uevent): only the daemon's
    figures move."""
    for i in range(n):
        with open(os.path.join(src, f"new{i}"), "w") as f:
            f.write("x")


@pytest.mark.root
@pilot_test
async def test_the_dashboard_shows_the_daemons_figures_move_without_any_event(
        tui, fs_daemon, config_path):
    """Writes into a captured directory raise no kernel event the console hears (no mount, no
    uevent): the dashboard still shows the engine's figures moving while it is on screen, and
    so do an entry's details (i) while they are open; once the entry is removed (here with the
    CLI) the details keep their last sight and say the entry is gone."""
    from app.screens.dashboard import DashboardScreen
    from app.screens.dialogs import DetailsDialog
    eng, src, _tgt = fs_daemon
    eng.drain(src)
    app = tui(control_socket=eng.socket, is_root=True)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("4")
        await settle(pilot)
        assert type(app.screen) is DashboardScreen
        engine = app.screen.query_one("#engine")
        await wait_until(pilot, lambda: "running (pid" in static_text(engine), "the engine panel")
        before = static_text(engine)
        write_files(src)
        await wait_until(pilot, lambda: static_text(engine) != before, "the figures to move")
        assert "operations captured" in static_text(engine)

        table = app.screen.query_one("#dash-fs", DataTable)
        table.focus()
        table.move_cursor(row=table.get_row_index(src))
        await pilot.press("i")
        await wait_until(pilot, lambda: type(app.screen) is DetailsDialog, "the details")
        dialog = app.screen
        text = lambda: static_text(dialog.query_one("#details-text"))  # noqa: E731
        await wait_until(pilot, lambda: "Operations:" in text(), "the engine's lines")
        before = text()
        write_files(src, 40)
        await wait_until(pilot, lambda: text() != before, "the details to move")
        assert app.screen is dialog  # the same dialog, never reopened
        r = run(sys.executable, "-m", "app", "--config", str(config_path), "--socket", eng.socket,
                "fs", "remove", src)
        assert r.returncode == 0, r.stdout + r.stderr
        title = lambda: str(dialog.query_one("#details-title").render())  # noqa: E731
        await wait_until(pilot, lambda: "no longer configured" in title(), "the entry gone")
        assert "Operations:" in text()  # its last sight stays
        await pilot.press("escape")
        await settle(pilot)
        assert type(app.screen) is DashboardScreen


@pilot_test
async def test_a_toast_at_80x24_leaves_the_button_row_uncovered(tui, store, tmp_path):
    """Found by a walk: at 80x24 the toast of an add covered Unmount all, Mirror and Verify for
    its five seconds (a click there went to the toast). Toasts end above the button row."""
    from textual.widgets import Button
    from textual.widgets._toast import Toast
    data = tmp_path / "data"
    data.mkdir()
    app = tui()
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        dialog = await open_add_dialog(pilot)
        dialog.query_one("#path", Input).value = str(data)
        await wait_until(pilot, lambda: "can be added" in static_text(dialog.query_one("#problem")),
                         "the inline check to accept the path")
        await pilot.click("#add")
        await wait_until(pilot, lambda: type(app.screen) is FilesystemScreen, "the dialog to close")
        await wait_until(pilot, lambda: notices(app), "the add's toast")
        await settle(pilot)
        # (queries leave Textual's own widgets out: the rack is found by its id)
        rack = app.screen.get_child_by_id("textual-toastrack")
        await wait_until(pilot, lambda: any(isinstance(w, Toast) for w in rack.walk_children()),
                         "the toast to be shown")
        toast = [w for w in rack.walk_children() if isinstance(w, Toast)][-1].region
        buttons = [b.region for b in app.screen.query(Button)]
        assert len(buttons) == 6 and all(b.height for b in buttons), buttons
        assert not any(toast.overlaps(b) for b in buttons), (toast, buttons)
        assert toast.bottom <= min(b.y for b in buttons), (toast, buttons)
        # Where a long word (the path) folds depends on its length: the project's CI, whose
        # temporary path was a digit shorter, drew this toast a row lower than Textual measured
        # it, over the buttons. The same message cut at each of 16 places covers the folds.
        message = notices(app)[-1]
        for cut in range(16):
            app.clear_notifications()
            app.notify(message[cut:], title="Added", markup=False)
            await wait_until(pilot, lambda: [w for w in rack.walk_children() if isinstance(w, Toast)
                                             and w.region.height], "the cut toast to be shown")
            await pilot.pause()
            toast = [w for w in rack.walk_children() if isinstance(w, Toast)][-1].region
            assert toast.bottom <= min(b.y for b in buttons), (cut, toast, buttons)
