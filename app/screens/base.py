"""What every task screen shares: back keys, the read-only banner, thread-worker reads and
actions with a per-entry results dialog (offering Force where the services name it), a line
that says what a running action waits for, and tables that keep their rows by key."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from rich.cells import cell_len
from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable

from app.screens import actions
from app.services.results import MirrorError, Outcome, Result
from app.services.units import shown

OUTCOME_STYLE = {  # by Result.word: a refusal (nothing was changed) is no failure
    Outcome.OK.value: ("✔", "green"),
    Outcome.UNCHANGED.value: ("=", "cyan"),
    Outcome.PENDING.value: ("…", "yellow"),
    Outcome.SKIPPED.value: ("-", "grey62"),
    Outcome.FAILED.value: ("✘", "bold red"),
    "refused": ("✘", "bold yellow"),
}
STATE_STYLE = {
    "mounted": "green", "attached": "green",
    "not mounted": "yellow", "lazily unmounted": "yellow", "detached": "yellow", "detach pending": "yellow",
    "path missing": "red", "device missing": "red", "invalid": "bold red",
    "switched over": "cyan", "switch-over interrupted": "bold yellow",
    "fail-back interrupted": "bold red",
}
CAPTURE_STYLE = {"captured": "green", "not captured": "bold yellow", "no daemon": "yellow",
                 "lost": "bold red"}
MAX_READ_GAP = 2.0  # seconds: the longest a pending re-read waits after a slow read
MIN_READ_GAP = 0.5  # seconds: the shortest (events during a read: a storm of them, maybe)
READ_SHARE = 0.25  # under a storm of events, the reading thread is busy at most this share


def read_gap(last_read: float) -> float:
    """How long a re-read asked for during a read waits after it: at least MIN_READ_GAP, and
    long enough that reads take at most READ_SHARE of the time, up to MAX_READ_GAP. With
    half (a wait as long as the read), the Block screen on a host churning 200 loops used
    40-48 % of a CPU (bench/busy_host.py)."""
    return max(MIN_READ_GAP, min(last_read * (1 - READ_SHARE) / READ_SHARE, MAX_READ_GAP))
REBUILD_OVER = 24  # rows added + removed at once: clearing and refilling beats row by row


def outcome_text(result: Result) -> Text:
    mark, style = OUTCOME_STYLE[result.word]
    return Text(f"{mark} {result.word}", style=style)


def state_text(state: str, problem: str | None = None) -> Text:
    """An entry's state; an invalid entry says so first (the detail view says why)."""
    if problem:
        return Text("invalid", style=STATE_STYLE["invalid"])
    return Text(state, style=STATE_STYLE.get(state.split(" (")[0], ""))


def capture_text(capture: str) -> Text:
    """A block entry's capture ("captured" | "not captured" | "lost"), or a dash without a loop."""
    return Text(capture or "—", style=CAPTURE_STYLE.get(capture, ""))


def elide(path: str, width: int = 28) -> str:
    """`path` shown safely in at most `width` characters, its end kept (the file name tells
    targets apart)."""
    path = shown(path)
    return path if len(path) <= width else "…" + path[-(width - 1):]


def counted(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


MOST_LISTED = 8  # lines of a confirmation's list; the rest are counted


def listed(lines: Sequence[str], most: int = MOST_LISTED) -> list[str]:
    """The first `most` lines, then how many more (a dialog stays on an 80x24 screen)."""
    if len(lines) <= most:
        return list(lines)
    return list(lines[:most - 1]) + [f"  … and {len(lines) - most + 1} more"]


def natural_key(name: str) -> list:
    """loop2 before loop10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def check_text(problem: str | None, warnings: Sequence[str] = (), ok: str = "can be added"
               ) -> Text:
    """The one style of every inline check: ✘ refused (red), ! allowed with a caveat (yellow),
    ✔ fine (green)."""
    if problem:
        return Text("✘ " + problem, style="bold red")
    if warnings:
        return Text("\n".join("! " + w for w in warnings), style="yellow")
    return Text("✔ " + ok, style="green")


# -- tables ------------------------------------------------------------------------------------

ELIDE_BEFORE_DROPPING = 7  # a column kept this much is narrowed (its cells end in "…") first
ELIDED_WIDTH = 16  # ... but not below this (or its label's width)


@dataclass(frozen=True)
class Col:
    key: str
    label: str
    keep: int = 0  # which columns go first when the table is too narrow: lowest keep first;
    #                keep=9 is never dropped. What is dropped is in the row's detail view.
    cap: int = 40  # widest the column grows (cells are elided by the caller)
    path: bool = False  # a cell cut to fit keeps its end, which tells paths apart (as elide)


class KeyedTable(DataTable):
    """A table of rows by key that stays where the administrator is: rows are updated in
    place (or refilled at once for a big change), kept sorted when asked, the cursor stays on
    the same key, and the columns are chosen to fit the width (none hide off screen)."""

    class SelectionGone(Message):
        """The row under the cursor went away (e.g. another tool detached that loop)."""

        def __init__(self, table: KeyedTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> KeyedTable:
            return self.table

    def __init__(self, columns: Sequence[Col], *, sort_key: Callable[[str], object] | None = None,
                 **kw) -> None:
        super().__init__(cursor_type="row", **kw)
        self.spec = tuple(columns)
        # row key -> sort key; None keeps the order rows are given in. A sorted table's first
        # column shows its row key (DataTable.sort sees cells, not keys).
        self.sort_key = sort_key
        self._cells: dict[str, tuple] = {}  # every column's cell, spec order
        self._layout: tuple[tuple[str, int], ...] = ()  # (column key, width) shown now
        self._index = {c.key: i for i, c in enumerate(self.spec)}

    @property
    def shown_columns(self) -> tuple[str, ...]:
        return tuple(key for key, _ in self._layout)

    def show_rows(self, rows: dict[str, tuple]) -> None:
        """Make the table show `rows` (key -> one cell per column of the spec)."""
        self._cells = dict(rows) if self.sort_key is None else {
            k: rows[k] for k in sorted(rows, key=self.sort_key)}
        if not self._relayout():
            self._sync()

    def on_resize(self) -> None:
        self._relayout()

    def _natural_widths(self) -> list[int]:
        """Each column's widest cell (or label), before any cap."""
        widths = [cell_len(c.label) for c in self.spec]
        for cells in self._cells.values():
            for i, cell in enumerate(cells):
                widths[i] = max(widths[i], _cell_width(cell))
        return widths

    def _fit(self) -> tuple[tuple[str, int], ...]:
        """The columns that fit the table's width (each takes its width plus padding),
        dropping the lowest `keep` first, but narrowing wide columns before an important one
        goes (_elide); room left over goes to columns cut by their cap, the last (wordiest)
        first."""
        room = (self.size.width or self.app.size.width) - 2  # the vertical scrollbar
        natural = dict(zip((c.key for c in self.spec), self._natural_widths()))
        columns = [(c, min(natural[c.key], c.cap)) for c in self.spec]
        pad = 2 * self.cell_padding
        while len(columns) > 1 and sum(w + pad for _, w in columns) > room:
            drop = min((c for c in columns if c[0].keep < 9), key=lambda c: c[0].keep,
                       default=None)
            if drop is None or drop[0].keep >= ELIDE_BEFORE_DROPPING:
                if self._elide(columns, sum(w + pad for _, w in columns) - room) or drop is None:
                    break
            columns.remove(drop)
        spare = room - sum(w + pad for _, w in columns)
        for i in reversed(range(len(columns))):
            c, w = columns[i]
            more = min(spare, natural[c.key] - w)
            if more > 0:
                columns[i] = (c, w + more)
                spare -= more
        return tuple((c.key, w) for c, w in columns)

    @staticmethod
    def _elide(columns: list, excess: int) -> bool:
        """Narrow the widest columns, none below ELIDED_WIDTH (or its label), by `excess` in
        all, if they can give that much: their cells then end in "…". An important column
        (an entry's state, a device's use) is worth more cut than gone: at 80 columns a
        /dev/loop99999 made the picker drop its "In use / excluded" for one character."""
        floor = [max(ELIDED_WIDTH, cell_len(c.label)) for c, _ in columns]
        if sum(max(0, w - f) for (_, w), f in zip(columns, floor)) < excess:
            return False
        while excess > 0:
            i = max(range(len(columns)), key=lambda n: columns[n][1] - floor[n])
            c, w = columns[i]
            columns[i] = (c, w - 1)
            excess -= 1
        return True

    def _relayout(self) -> bool:
        """Rebuild the columns when the fitting set or a width changed; True if it did."""
        layout = self._fit()
        if layout == self._layout:
            return False
        selected = selected_key(self)
        with self.app.batch_update():
            self.clear(columns=True)
            labels = {c.key: c.label for c in self.spec}
            for key, width in layout:
                self.add_column(labels[key], key=key, width=width)
            self._layout = layout
            self._fill()
        self._restore(selected)
        return True

    def keys_in_order(self) -> list[str]:
        """The row keys as displayed, top to bottom."""
        return [row.key.value for row in self.ordered_rows]

    def _project(self, cells: tuple) -> tuple:
        """The shown columns' cells; one wider than its column ends in "…" (the row's details
        say it all), a path's begins with it, except a sorted table's first column, which its
        sort reads."""
        shown = []
        for n, (key, width) in enumerate(self._layout):
            cell = cells[self._index[key]]
            cut = _cell_width(cell) > width and "\n" not in _plain(cell)
            if cut and (n or self.sort_key is None):
                cell = cell.copy() if isinstance(cell, Text) else Text(str(cell))
                if self.spec[self._index[key]].path:
                    cell = _cut_start(cell, width)
                else:
                    cell.truncate(width, overflow="ellipsis")
            shown.append(cell)
        return tuple(shown)

    def _fill(self) -> None:
        for key, cells in self._cells.items():
            self.add_row(*self._project(cells), key=key)

    def _sync(self) -> None:
        selected = selected_key(self)
        present = self.keys_in_order()
        gone = [k for k in present if k not in self._cells]
        have = set(present)
        new = [k for k in self._cells if k not in have]
        with self.app.batch_update():
            if len(gone) + len(new) > REBUILD_OVER:
                self.clear()
                self._fill()
            else:
                for key in gone:
                    self.remove_row(key)
                columns = [key for key, _ in self._layout]
                for key, cells in self._cells.items():
                    cells = self._project(cells)
                    if key not in have:
                        self.add_row(*cells, key=key)
                        continue
                    for column, value in zip(columns, cells):
                        if self.get_cell(key, column) != value:
                            self.update_cell(key, column, value)  # fixed widths: no re-measure
                if self.sort_key is not None and self.keys_in_order() != list(self._cells):
                    sort_key = self.sort_key
                    self.sort(self._layout[0][0], key=lambda cell: sort_key(_plain(cell)))
        self._restore(selected)

    def _restore(self, selected: str | None) -> None:
        if selected is None or self.row_count == 0:
            return
        if selected in self._cells:
            index = self.get_row_index(selected)
            if index != self.cursor_row:
                self.move_cursor(row=index)
        else:
            self.post_message(self.SelectionGone(self, selected))


def _cut_start(cell: Text, width: int) -> Text:
    """`cell` in `width` columns: "…" and as much of its end as fits (its style kept)."""
    start = len(cell.plain)
    while start > 0 and cell_len(cell.plain[start - 1:]) <= width - 1:
        start -= 1
    return Text("…", style=cell.style) + cell[start:]


def _plain(cell) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def _cell_width(cell) -> int:
    if isinstance(cell, Text):
        return max((cell_len(line) for line in cell.plain.splitlines()), default=0)
    return cell_len(str(cell))


def selected_key(table: DataTable) -> str | None:
    if table.row_count == 0:
        return None
    try:
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    except Exception:  # the cursor points past a row that was just removed
        return None


# -- screens -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ForceOffer:
    """What the results dialog offers when a refusal can be overridden: the button's words,
    the confirmation's explanation, and the forced call."""

    label: str
    explain: str
    call: Callable[[], Iterable[Result] | Result]
    title: str
    subject: str = ""  # what the forced call is about (run_action's subject)


PALETTE_KEY_WIDTH = 12  # the footer's "│^p palette", docked right


class TaskScreen(Screen):
    """A screen under the main menu. Subclasses implement `load()` (thread) and `show(data)`;
    their keys come from app.screens.actions under the screen's `NAME`."""

    NAME = ""
    # Esc/q are the same on every screen (the menu's key line and Help say so): the footer's
    # room at 80 columns goes to the screen's own keys.
    BINDINGS = [
        Binding("escape", "app.back", "Back", show=False),
        Binding("q", "app.back", "Back", show=False),
    ]

    def __init_subclass__(cls, **kw) -> None:
        if cls.__dict__.get("NAME"):  # before Textual merges the class's bindings
            cls.BINDINGS = TaskScreen.BINDINGS + actions.bindings(cls.NAME)
        super().__init_subclass__(**kw)

    class Loaded(Message):
        def __init__(self, data) -> None:
            super().__init__()
            self.data = data

    class ActionDone(Message):
        def __init__(self, title: str, results: list[Result], notes: Sequence[str] = (),
                     force: ForceOffer | None = None) -> None:
            super().__init__()
            self.title = title
            self.results = results
            self.notes = list(notes)  # extra lines under the results (e.g. differing ranges)
            self.force = force

    busy_target = "DataTable"  # what shows the loading indicator while an action runs

    def on_mount(self) -> None:
        self.reload()
        self._fit_footer(self.app.size.width)

    def on_resize(self, event) -> None:
        self._fit_footer(event.size.width)

    def _fit_footer(self, width: int) -> None:
        """The screen's own keys before "^p palette": where they need the room (the Targets
        screen at 80 columns) the palette's hint goes; ctrl+p, the header's icon and Help
        still say it. A key its screen hides (check_action) takes none."""
        from textual.widgets import Footer
        keys = sum(cell_len(actions.key_of(self.NAME, a.name)) + cell_len(a.label) + 2
                   for a in actions.actions(self.NAME)
                   if a.footer and self.check_action(a.name, ()) is not False)
        fits = keys + PALETTE_KEY_WIDTH <= width
        for footer in self.query(Footer):
            if footer.show_command_palette != fits:
                footer.show_command_palette = fits
                footer.refresh(recompose=True)

    # -- the daemon's figures: they move with every write and no event says so -----------------
    _figures_timer = None
    _figures: list | None = None  # the daemon's moving figures at the last ask

    def follow_daemon_figures(self) -> None:
        """While this screen is shown, ask the daemon for its figures every FIGURES_INTERVAL
        (one request, in a thread) and read everything again only when they moved. Live
        sessions only (not snapshots)."""
        from app.services.status import FIGURES_INTERVAL
        if self.services.watch_kernel:
            self._figures_timer = self.set_interval(FIGURES_INTERVAL, self._ask_figures)

    def on_screen_suspend(self) -> None:
        if self._figures_timer is not None and self._details is None:  # (shown live in it)
            self._figures_timer.pause()

    def on_screen_resume(self) -> None:
        if self._figures_timer is not None:
            self._figures_timer.resume()
            self._ask_figures()  # what moved while another screen was shown

    def _ask_figures(self) -> None:
        self._figures_worker()

    @work(thread=True, exclusive=True, exit_on_error=False, group="figures",
          description="ask the daemon for its figures")
    def _figures_worker(self) -> None:
        from app.services.status import moving_figures
        rows = moving_figures(self.services.control)
        if rows is not None and rows != self._figures:
            self._figures = rows
            self.post_message(self.FiguresMoved())

    class FiguresMoved(Message):
        pass

    @on(FiguresMoved)
    def _figures_moved(self) -> None:
        self.reload()

    def reload_on(self, *signals) -> None:
        """Read the state again whenever one of the App's signals fires (kernel, daemon or
        configuration events)."""
        for signal in signals:
            signal.subscribe(self, lambda _event: self.reload())

    @property
    def services(self):
        return self.app.services

    _loading = False
    _reload_pending = False
    _last_read = 0.0  # seconds the last read took

    def reload(self) -> None:
        """Read the state again; while a read is running, ask for one more after it (so a
        burst of events costs at most two reads, never a pile of threads), and that one
        waits read_gap() after it: under a storm of events (a host churning loops: the block
        screens list them all) the reading thread is busy at most a quarter of the time,
        reads at most twice a second, and the keys stay quick."""
        if self._loading:
            self._reload_pending = True
            return
        self._loading = True
        self._load_worker()

    @work(thread=True, exit_on_error=False, group="load",
          description="read configuration and kernel state")
    def _load_worker(self) -> None:
        started = time.monotonic()
        try:
            data = self.load()
        except MirrorError as exc:  # e.g. a corrupt config: shown, never rewritten
            data = exc
        except Exception as exc:  # shown in the banner rather than lost in a worker
            data = MirrorError(f"unexpected error: {exc!r}")
        self._last_read = time.monotonic() - started
        self.post_message(self.Loaded(data))

    def load(self):
        raise NotImplementedError

    def show(self, data) -> None:
        raise NotImplementedError

    @on(Loaded)
    def _on_loaded(self, event: Loaded) -> None:
        self._loading = False
        if self._reload_pending:
            self._reload_pending = False
            self._loading = True  # no other read starts before the delayed one
            self.set_timer(read_gap(self._last_read), self._load_worker)
        error = self.query("#load-error")
        if isinstance(event.data, MirrorError):
            if error:
                error.first().update(Text(f"Cannot read the current state: {shown(str(event.data))}"))
                error.first().display = True
            return
        if error:
            error.first().display = False
        self.show(event.data)
        if self._details is not None and self._details.is_attached:
            self._details.follow_up()  # the entry's details as this state says

    # -- details that stay live -----------------------------------------------------------
    _details = None  # the DetailsDialog push_details() opened, while it is open

    def push_details(self, title: str, follow: Callable[[], object]) -> None:
        """Everything about one entry, read again from every state this screen loads while
        the dialog is open (and the daemon's figures still asked for): a resync's percentage,
        the queue and the lag move in it as in the table. `follow()` gives the body from the
        screen's latest state, None once the entry is gone."""
        from app.screens.dialogs import DetailsDialog
        body = follow()
        if body is None:
            return
        dialog = self._details = DetailsDialog(title, body, follow=follow)

        def closed(_result) -> None:
            if self._details is dialog:
                self._details = None
        self.app.push_screen(dialog, closed)

    # -- actions -------------------------------------------------------------------------

    def ask_target(self, kind: str, key: str, current: str | None) -> None:
        """e (Target) on an entry: its target asked for (SetTargetDialog), then set through
        the service (`fs set / block set --target`), its results shown."""
        if self.app.needs_root("Setting a target"):
            return
        from app.screens.dialogs import SetTargetDialog

        def chosen(wanted) -> None:
            if wanted is not None:
                target, adopt = wanted
                self.run_action(f"Target of {shown(key)}",
                                lambda: self.services.replication.set_entry_target(
                                    kind, key, target, adopt=adopt), subject=key,
                                waiting=f"setting the target of {shown(key)}" + (
                                    ": a capture is unmounted and mounted again"
                                    if kind == "fs" else ""))
        self.app.push_screen(SetTargetDialog(kind, key, current), chosen)

    def run_action(self, title: str, call: Callable[[], Iterable[Result] | Result | tuple],
                   *, root: bool = True, waiting: str | None = None,
                   force: ForceOffer | None = None, subject: str = "") -> None:
        """Run a service call in a thread; show its per-entry results (and notes, when it
        returns (results, notes)), then reload. `waiting` says what it waits for while it
        runs; `force` is offered when a result was refused as busy (EBUSY); `subject` names
        what failed when the call raises instead of returning a result."""
        if root and self.app.needs_root(title):
            return
        self._set_busy(True, waiting or f"{title}: working…")
        self._action_worker(self.app, title, call, force, subject)

    def from_thread(self, app, done: Callable[[], None], gone: Callable[[], None]) -> None:
        """From a worker thread that `app` (taken before it started) runs: on the UI thread,
        `done()` while this screen is still in the App, else `gone()`. The administrator may
        leave the screen while it works; a message to a screen that is gone is dropped, and in
        the worker `self.app` is not even found any more."""
        try:
            app.call_from_thread(lambda: done() if self.is_attached else gone())
        except RuntimeError:  # the App itself has ended
            pass

    def finish_from_thread(self, app, title: str, results: Sequence[Result],
                           done: Callable[[], None]) -> None:
        """from_thread(), with a notice of how `title` ended once the screen is gone."""
        def gone() -> None:
            # a refusal says so (its severity is a warning's: nothing was changed)
            summary = "; ".join(f"refused: {shown(r.message)}" if r.refused else shown(r.message)
                                for r in results) or "done"
            failed = [r for r in results if r.failed]
            app.notify(summary, title=title, markup=False,
                       severity="information" if not failed else
                       "warning" if all(r.refused for r in failed) else "error")
        self.from_thread(app, done, gone)

    @work(thread=True, exclusive=True, exit_on_error=False, group="action",
          description="apply an administrator's action")
    def _action_worker(self, app, title: str, call, force, subject: str = "") -> None:
        notes: list[str] = []
        try:
            out = call()
            if isinstance(out, tuple):
                out, notes = out
            results = [out] if isinstance(out, Result) else list(out)
        except MirrorError as exc:
            results = [Result.from_error(title, subject, exc)]
        except Exception as exc:  # a bug below us must not leave the screen busy forever
            results = [Result(title, subject, Outcome.FAILED, f"unexpected error: {exc!r}")]
        busy = any(r.failed and r.errno == EBUSY for r in results)
        self.finish_from_thread(app, title, results, lambda: self.post_message(
            self.ActionDone(title, results, notes, force if busy else None)))

    def _set_busy(self, busy: bool, waiting: str = "") -> None:
        for widget in self.query(self.busy_target):
            widget.loading = busy
        for line in self.query("#waiting"):
            line.update(Text("… " + waiting, style="yellow") if busy else "")
            line.display = busy

    def ask_first(self, title: str, question: str | None, nothing: str,
                  act: Callable[[], None]) -> None:
        """An action that ends captures, asked first (its Yes says `title`); `question` None:
        nothing it would change, and `nothing` says so instead of asking."""
        from app.screens.dialogs import ConfirmDialog
        if question is None:
            self.notify(nothing, title=title, markup=False)
            return
        self.app.push_screen(ConfirmDialog(question, yes=title),
                             lambda yes: act() if yes else None)

    def waits_said(self, title: str) -> Callable[[str], None]:
        """For a service call's `say` (in its worker thread): each thing the daemon waits for
        (a capture shipping its queue to its target, a worker that does not answer: up to 45 s
        each) shown as a notice titled `title`, as it begins."""
        app = self.app

        def say(what: str) -> None:
            try:
                app.call_from_thread(app.notify, what, title=title, severity="warning",
                                     timeout=30, markup=False)
            except RuntimeError:  # the App itself has ended
                pass
        return say

    def set_waiting(self, text: str) -> None:
        """Say what a running action waits for now (e.g. which entries are still mounted)."""
        for line in self.query("#waiting"):
            if line.display:
                line.update(Text("… " + text, style="yellow"))

    @on(ActionDone)
    def _on_action_done(self, event: ActionDone) -> None:
        from app.screens.dialogs import ConfirmDialog, ResultsDialog
        self._set_busy(False)
        self.reload()

        def closed(choice: str | None) -> None:
            if choice == "force" and event.force is not None:
                offer = event.force

                def confirmed(yes: bool | None) -> None:
                    if yes:
                        self.run_action(offer.title, offer.call, subject=offer.subject)
                self.app.push_screen(ConfirmDialog(offer.explain, yes=offer.label), confirmed)
        self.app.push_screen(ResultsDialog(event.title, event.results, event.notes,
                                           force=event.force.label if event.force else None),
                             closed)


EBUSY = 16  # errno.EBUSY: the refusals Force can override


HANDED_OVER = ("switched over", "switch-over interrupted", "fail-back interrupted")


def handed_over_removal(key: str, target: str | None, entry_state) -> str | None:
    """Why Remove on the File system / Block device screen is refused for an entry handed over
    to its replica (`entry_state`: its FsState / BlockState), and what ends the hand-over on the
    Targets screen; None for any other entry. (The daemon refuses that remove too, naming a CLI
    option: said here before a question, with the keys.)"""
    from app.services.layout import mix_words
    state = entry_state.state
    if state not in HANDED_OVER:
        return None
    row = entry_state.engine
    sw = (row.switched if row is not None else entry_state.switched) or {}
    where = "On Remote targets and fail-over (7 in the main menu)"
    if state == "switch-over interrupted":
        return (f"a switch-over of {key} to {target} did not finish (its replica there may be "
                f"primary): removing the entry here would not end it. {where}: s runs it again "
                "to finish it, o keeps this host's data. Nothing was changed.")
    if state == "fail-back interrupted":
        return (f"a fail-back of {key} from {target} was interrupted (this host's copy "
                f"{mix_words(sw.get('failback_applied'))}): "
                f"removing the entry here would not end the hand-over. {where}: f fails back "
                "again to finish it; m leaves the service there for good and removes the entry "
                "here. Nothing was changed.")
    return (f"{key} was switched over to {target}: removing the entry here would not end the "
            f"hand-over (its replica stays primary there, {key} read-only here). {where}: f fails "
            "back, o keeps this host's data, m leaves the service there for good and removes the "
            "entry here. Nothing was changed.")
