"""Moving around like an administrator: number keys, arrows + Enter, mouse clicks, q/Escape
back one level, ctrl+q from anywhere, the command palette, and the read-only mode off root."""

from __future__ import annotations

import pytest

from test_tui_support import (  # noqa: F401 (fixtures)
    config_bytes, pilot_test, settle, static_text, tui, wait_until, wait_while_a_worker_waits)
from textual.widgets import OptionList

from app.screens.block import BlockScreen
from app.screens.daemon import DaemonScreen
from app.screens.dashboard import DashboardScreen
from app.screens.dialogs import AddFsEntryDialog, ResultsDialog
from app.screens.filesystem import FilesystemScreen
from app.screens.help import HelpScreen
from app.screens import actions
from app.screens.main_menu import MainMenuScreen
from app.screens.manual import ManualScreen

BY_KEY = {"1": FilesystemScreen, "2": BlockScreen, "3": ManualScreen, "4": DashboardScreen,
          "5": DaemonScreen, "6": HelpScreen}
OPTION_HEIGHT = 2  # each menu option is its label line plus its hint line
MENU_TOP = 1  # the menu's border


@pilot_test
async def test_number_keys_open_each_task_and_escape_or_q_comes_back(tui):
    app = tui()
    async with app.run_test(size=(120, 36)) as pilot:
        for key, screen in BY_KEY.items():
            await pilot.press(key)
            await settle(pilot)
            assert type(app.screen) is screen
            await pilot.press("escape" if int(key) % 2 else "q")
            assert type(app.screen) is MainMenuScreen
        assert app.is_running
        await pilot.press("escape")  # Esc on the main menu does not quit: it says how
        await pilot.pause()
        assert app.is_running and type(app.screen) is MainMenuScreen
        assert any("q (or ctrl+q) quits" in n.message for n in app._notifications)
        await pilot.press("q")  # from the top, q quits
    assert not app.is_running


@pilot_test
async def test_arrows_and_enter_choose_the_highlighted_task(tui):
    app = tui()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("down", "down", "enter")  # third item: manual replication
        await settle(pilot)
        assert type(app.screen) is ManualScreen
        await pilot.press("escape")
        await pilot.press("up", "enter")
        await settle(pilot)
        assert type(app.screen) is BlockScreen


@pilot_test
async def test_mouse_click_on_a_menu_item_and_on_a_button(tui):
    app = tui()
    async with app.run_test(size=(120, 36)) as pilot:
        index = [s.name for s in actions.menu()].index("dashboard")
        assert await pilot.click(OptionList, offset=(6, MENU_TOP + index * OPTION_HEIGHT))
        await settle(pilot)
        assert type(app.screen) is DashboardScreen
        await pilot.press("escape")
        assert await pilot.click(OptionList, offset=(6, MENU_TOP))
        await settle(pilot)
        assert type(app.screen) is FilesystemScreen
        assert await pilot.click("#add")
        await settle(pilot)
        assert type(app.screen) is AddFsEntryDialog
        assert await pilot.click("#cancel")
        assert type(app.screen) is FilesystemScreen


@pilot_test
async def test_ctrl_q_quits_from_a_dialog_deep_down(tui):
    app = tui()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("1", "a")
        await settle(pilot)
        assert type(app.screen) is AddFsEntryDialog
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert not app.is_running


async def mount_all_on_filesystem(pilot, monkeypatch, mount_all) -> None:
    """On the File system screen, m (Mount all), whose service call is `mount_all`."""
    await pilot.press("1")
    await settle(pilot)
    monkeypatch.setattr(pilot.app.services.replication, "mount_all", mount_all)
    await pilot.press("m")


@pytest.mark.parametrize("refused,said,severity", [
    (False, "mount of /srv/data failed: Input/output error", "error"),
    # a refusal (nothing was changed: the CLI's exit 2) said as one; it read as a failure
    (True, "refused: /srv/data is in use: pid 3190 (vim)", "warning")])
@pilot_test
async def test_an_action_that_ends_after_its_screen_was_left_says_how_it_ended(
        tui, monkeypatch, refused, said, severity):
    """Mount all may take a while; the administrator may go back meanwhile. Its results must
    not be lost with the screen (a message to a screen that is gone is dropped): a notice on
    whatever is shown says how it ended, and nothing is pushed over that screen."""
    import threading

    from app.services.results import Outcome, Result
    release, asked = threading.Event(), threading.Event()

    def slow_mount_all():
        asked.set()
        release.wait(20)
        return [Result("mount", "/srv/data", Outcome.FAILED, said.removeprefix("refused: "),
                       16 if refused else 5, {"refused": True} if refused else {})]
    app = tui(is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await mount_all_on_filesystem(pilot, monkeypatch, slow_mount_all)
        await wait_while_a_worker_waits(pilot, asked.is_set, "the action to start")
        await pilot.press("escape")
        await pilot.pause(0.2)
        assert asked.is_set() and type(app.screen) is MainMenuScreen
        release.set()
        await settle(pilot)
        await wait_while_a_worker_waits(pilot, lambda: any(n.title == "Mount all" for n in
                                                           app._notifications), "the notice")
        [notice] = [n for n in app._notifications if n.title == "Mount all"]
        assert (notice.message, notice.severity) == (said, severity)
        assert type(app.screen) is MainMenuScreen


@pilot_test
async def test_the_results_say_refused_for_what_the_daemon_refused(tui, monkeypatch):
    """An entry the daemon refused before it changed anything (in use at a switch-over, a
    mount of an entry switched over: the CLI exits 2) said "✘ failed" in the results, the
    word of what failed while it was done. It says "✘ refused"; a failure still "✘ failed"."""
    from app.services.results import Outcome, Result

    def mount_all():
        return [Result("mount", "/srv/data", Outcome.FAILED, "/srv/data was switched over to "
                       "backup1:data: fail back first", 66, {"refused": True}),
                Result("mount", "/srv/logs", Outcome.FAILED, "mount mirrorfs on /srv/logs: "
                       "Input/output error (EIO)", 5)]
    app = tui(is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await mount_all_on_filesystem(pilot, monkeypatch, mount_all)
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "the results")
        lines = [static_text(r) for r in app.screen.query(".result")]
        assert lines[0].startswith("✘ refused   /srv/data\n"), lines
        assert lines[1].startswith("✘ failed    /srv/logs\n"), lines


@pilot_test
async def test_command_palette_runs_a_screen_action(tui, config_bytes):
    app = tui()
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("ctrl+p")
        await pilot.press(*"attach all")
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)
        assert type(app.screen) is ResultsDialog
        assert type(app.screen_stack[-2]) is BlockScreen
        assert app.screen.results == []  # nothing configured: nothing attached
        await pilot.press("escape")
        assert type(app.screen) is BlockScreen
    assert config_bytes() is None


@pilot_test
async def test_not_root_opens_read_only_and_says_why(tui, config_bytes):
    app = tui(is_root=False)
    async with app.run_test(size=(120, 36)) as pilot:
        banner = app.screen.query_one("RootBanner")
        assert banner.display and "not running as root" in static_text(banner)
        await pilot.press("1", "a")  # add needs root: no dialog, a notice instead
        await settle(pilot)
        assert type(app.screen) is FilesystemScreen
        assert app.refusals and "needs root" in app.refusals[-1]
        await pilot.press("m")
        await settle(pilot)
        assert type(app.screen) is FilesystemScreen
    assert config_bytes() is None


@pilot_test
async def test_as_root_there_is_no_banner(tui):
    app = tui(is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert not app.screen.query_one("RootBanner").display


@pilot_test
async def test_full_garbage_collections_wait_until_nobody_types(tui):
    """A full collection (50-100 ms under a device storm, bench/picker_stress.py) runs only
    when keys and clicks have paused, at the latest after GC_LATEST; the collector is as it
    was once the app ends."""
    import gc
    import time
    before = gc.get_threshold()
    full: list[int] = []

    def seen(phase, info):
        if phase == "stop" and info["generation"] == 2:
            full.append(1)
    app = tui()
    gc.callbacks.append(seen)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot)
            assert gc.get_threshold()[2] > 1 << 20 and gc.get_freeze_count() > 0
            await pilot.press("down")  # typing now
            app._last_collect = time.monotonic() - app.GC_QUIET_EVERY - 1
            full.clear()
            app._collect_when_quiet()
            assert full == []  # due, but a key came just now
            app._last_input = time.monotonic() - app.GC_QUIET_SECONDS - 1
            app._collect_when_quiet()
            assert full == [1]  # quiet: done now
            app._last_input = time.monotonic()
            app._collect_when_quiet()
            assert full == [1]  # not again so soon
            app._last_collect = time.monotonic() - app.GC_LATEST - 1
            app._collect_when_quiet()
            assert full == [1, 1]  # typing for GC_LATEST: done anyway
    finally:
        gc.callbacks.remove(seen)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


@pilot_test
async def test_a_table_gives_its_room_to_a_capped_column_and_marks_what_it_cuts():
    """A wordy cell uses the room the table has (not only its column's cap); when the screen is
    too narrow it ends in "…", so nobody reads a cut sentence as the whole state."""
    from textual.app import App

    from app.screens.base import Col, KeyedTable
    wordy = "since 2026-09-21 12:13 (seq 20417); not captured here"

    class One(App):
        def compose(self):
            yield KeyedTable((Col("key", "Key", 9, 10), Col("state", "State", 8, 20)))

    app = One()
    async with app.run_test(size=(120, 10)) as pilot:
        table = app.query_one(KeyedTable)
        table.show_rows({"/srv/a": ("/srv/a", wordy), "/srv/b": ("/srv/b", "short")})
        await pilot.pause()
        assert str(table.get_cell("/srv/a", "state")) == wordy
        assert table.columns["state"].width == len(wordy)  # 54 columns, beyond its cap of 20
        await pilot.resize_terminal(40, 10)
        await pilot.pause()
        cut = str(table.get_cell("/srv/a", "state"))
        assert cut.endswith("…") and wordy.startswith(cut[:-1]) and len(cut) < len(wordy), cut
        assert str(table.get_cell("/srv/b", "state")) == "short"
        await pilot.resize_terminal(120, 10)
        await pilot.pause()
        assert str(table.get_cell("/srv/a", "state")) == wordy
        assert table.columns["state"].width == len(wordy)


@pilot_test
async def test_a_table_narrows_an_important_column_before_it_drops_it():
    """At 80 columns a long loop name (/dev/loop99999) left the picker one character short
    and it dropped its "In use / excluded": a column kept 7 or more is now cut ("…") down to
    16 characters before it goes; less important ones still go first, whole."""
    from textual.app import App

    from app.screens.base import Col, KeyedTable
    notes = "the loop of replicated /dev/loop0, captured by the daemon"

    class Picker(App):
        def compose(self):
            yield KeyedTable((Col("path", "Device", 9, 32), Col("size", "Size", 8),
                              Col("type", "Type", 8), Col("mounts", "Mounted on", 4, 28),
                              Col("notes", "In use", 7, 48)))

    app = Picker()
    async with app.run_test(size=(80, 10)) as pilot:
        table = app.query_one(KeyedTable)
        table.show_rows({"/dev/loop99999": ("/dev/loop99999", "1.0 MiB", "loop",
                                            "/mnt/somewhere/deep", notes)})
        await pilot.pause()
        assert table.shown_columns == ("path", "size", "type", "notes")  # "Mounted on" went first
        cut = str(table.get_cell("/dev/loop99999", "notes"))
        assert cut.endswith("…") and notes.startswith(cut[:-1]), cut
        await pilot.resize_terminal(40, 10)  # 16 characters of it do not fit either: it goes
        await pilot.pause()
        assert table.shown_columns == ("path", "size", "type")
        await pilot.resize_terminal(120, 10)
        await pilot.pause()
        assert table.shown_columns == ("path", "size", "type", "mounts", "notes")
        assert str(table.get_cell("/dev/loop99999", "notes")) == notes


WORDY = "switched over to b1:data3: primary there; read-only here"


def _path_columns():
    """(columns, the path's column, what the other cells say): the paths that lead their
    table are narrowed beside wordy cells; every path is cut by its cap beside short ones."""
    from app.screens import block, dashboard, filesystem, targets
    leading = [(dashboard.FS_COLUMNS, "path"), (dashboard.BLOCK_COLUMNS, "device"),
               (filesystem.COLUMNS, "path"), (block.ENTRY_COLUMNS, "device"),
               (targets.REPLICA_COLUMNS, "entry")]
    return [(*c, WORDY) for c in leading] + [(*c, "x") for c in leading] + [
        (filesystem.COLUMNS, "target", "x"), (block.ENTRY_COLUMNS, "target", "x"),
        (targets.REPLICA_COLUMNS, "target", "x"), (targets.TARGET_COLUMNS, "root", "x")]


@pytest.mark.parametrize("columns,path_key,filler", _path_columns(),
                         ids=lambda v: v if isinstance(v, str) and len(v) < 10 else "")
@pilot_test
async def test_a_path_cut_to_fit_keeps_its_end_so_rows_stay_apart(columns, path_key, filler):
    """Found by a walk at 80x24: the dashboard showed three directory entries as the same
    '…r/tmp/helper44-bHv5/work/…' once one of them was switched over (its state wider): the
    path, already shortened to its end, was narrowed to fit and cut at its end as prose is.
    A path is cut at its start; the rest of the row (prose) still at its end."""
    from textual.app import App

    from app.screens.base import KeyedTable
    prefix = "/var/tmp/a-long-common-prefix/of-every-entry/in-this-table"
    names = ("alpha", "beta", "gamma")

    class Screen80(App):
        def compose(self):
            yield KeyedTable(columns)

    app = Screen80()
    async with app.run_test(size=(80, 10)) as pilot:
        table = app.query_one(KeyedTable)
        table.show_rows({name: tuple(f"{prefix}/{name}" if c.key == path_key else filler
                                     for c in columns) for name in names})
        await pilot.pause()
        assert path_key in table.shown_columns
        shown = {name: str(table.get_cell(name, path_key)) for name in names}
        for name, text in shown.items():
            assert text.startswith("…") and text.endswith("/" + name), shown
            assert f"{prefix}/{name}".endswith(text[1:]), shown
        prose = [k for k in table.shown_columns if k != path_key and filler == WORDY]
        for key in prose:  # the prose beside it is still cut at its end
            text = str(table.get_cell(names[0], key))
            assert text == WORDY or (text.endswith("…") and WORDY.startswith(text[:-1])), text


@pilot_test
async def test_a_long_details_dialog_keeps_close_on_an_80x24_screen(tui):
    """Found by a walk: at 80x24 a remote entry's details (its live figures, some 25 lines)
    filled the dialog and its Close button was below the screen's edge."""
    from textual.widgets import Button

    from app.screens.dialogs import DetailsDialog
    app = tui(is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        app.push_screen(DetailsDialog("many", [(f"field {i}", f"value {i}") for i in range(40)]))
        await wait_until(pilot, lambda: type(app.screen) is DetailsDialog, "the details")
        await pilot.pause()
        close = app.screen.query_one("#close", Button)
        assert 0 <= close.region.y < 24 and close.region.height == 1, close.region
        assert app.screen.query_one("#details-body").max_scroll_y > 0  # the rest scrolls


def test_a_re_read_asked_for_during_a_slow_read_waits_three_times_as_long():
    """Under a storm of events (a host churning loops) a screen reads again at most twice a
    second and its reading thread is busy at most a quarter of the time: the Block screen
    read 200 loops in 0.15-0.4 s on a loaded host and, waiting only as long as its read (half
    the time busy), used 40-48 % of a CPU. Slow reads wait up to MAX_READ_GAP."""
    from app.screens.base import MAX_READ_GAP, MIN_READ_GAP, read_gap
    assert read_gap(0.0) == read_gap(0.05) == MIN_READ_GAP == 0.5
    for took in (0.2, 0.3, 0.5):
        assert took / (took + read_gap(took)) <= 0.25 + 1e-9, took
    assert read_gap(0.3) == pytest.approx(0.9)
    assert read_gap(5.0) == MAX_READ_GAP == 2.0
