"""What every task screen shares: back/quit keys, the read-only banner, thread-worker actions
with a per-entry results dialog, and tables updated in place by row key."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from rich.text import Text
from textual import on, work
from textual.worker import get_current_worker
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Static

from app.services.results import MirrorError, Outcome, Result

OUTCOME_STYLE = {
    Outcome.OK: ("✔", "green"),
    Outcome.UNCHANGED: ("=", "cyan"),
    Outcome.PENDING: ("…", "yellow"),
    Outcome.SKIPPED: ("-", "grey62"),
    Outcome.FAILED: ("✘", "bold red"),
}
STATE_STYLE = {
    "mounted": "green", "attached": "green",
    "not mounted": "yellow", "detached": "yellow", "detach pending": "yellow",
    "path missing": "red", "device missing": "red",
}
CAPTURE_STYLE = {"captured": "green", "not captured": "bold yellow", "no daemon": "yellow",
                 "lost": "bold red"}


def outcome_text(result: Result) -> Text:
    mark, style = OUTCOME_STYLE[result.outcome]
    return Text(f"{mark} {result.outcome.value}", style=style)


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state.split(" (")[0], ""))


def capture_text(capture: str) -> Text:
    """A block entry's capture ("captured" | "not captured" | "lost"), or a dash without a loop."""
    return Text(capture or "—", style=CAPTURE_STYLE.get(capture, ""))


def elide(path: str, width: int = 28) -> str:
    """`path` in at most `width` characters, its end kept (the file name tells targets apart)."""
    return path if len(path) <= width else "…" + path[-(width - 1):]


def sync_table(table: DataTable, rows: dict[str, tuple]) -> None:
    """Make `table` show `rows` (key -> cells) by updating, adding and removing keyed rows,
    so the cursor and scroll position survive a refresh."""
    columns = list(table.columns)
    with table.app.batch_update():
        for key in [k.value for k in table.rows if k.value not in rows]:
            table.remove_row(key)
        existing = {k.value for k in table.rows}
        for key, cells in rows.items():
            if key in existing:
                for column, value in zip(columns, cells):
                    if table.get_cell(key, column) != value:
                        table.update_cell(key, column, value, update_width=True)
            else:
                table.add_row(*cells, key=key)


def selected_key(table: DataTable) -> str | None:
    if table.row_count == 0:
        return None
    try:
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    except Exception:  # the cursor points past a row that was just removed
        return None


class RootBanner(Static):
    """Shown when not root: everything is read-only, and why."""

    DEFAULT_CLASSES = "banner"

    def on_mount(self) -> None:
        self.display = not self.app.is_root
        self.update("Read-only: not running as root. Configuration, loop devices and mounts "
                    "belong to root; run `sudo mirrorsetup` to change them.")


class TaskScreen(Screen):
    """A screen under the main menu. Subclasses implement `load()` (thread) and `show(data)`."""

    BINDINGS = [
        Binding("escape", "app.back", "Back"),
        Binding("q", "app.back", "Back", show=False),
    ]

    class Loaded(Message):
        def __init__(self, data) -> None:
            super().__init__()
            self.data = data

    class ActionDone(Message):
        def __init__(self, title: str, results: list[Result], notes: Sequence[str] = ()) -> None:
            super().__init__()
            self.title = title
            self.results = results
            self.notes = list(notes)  # extra lines under the results (e.g. differing ranges)

    busy_target = "DataTable"  # what shows the loading indicator while an action runs

    def on_mount(self) -> None:
        self.reload()

    def reload_on(self, *signals) -> None:
        """Read the state again whenever one of the App's signals fires (kernel or daemon events)."""
        for signal in signals:
            signal.subscribe(self, lambda _event: self.reload())

    @property
    def services(self):
        return self.app.services

    _loading = False
    _reload_pending = False

    def reload(self) -> None:
        """Read the state again; while a read is running, ask for one more after it (so a
        burst of kernel events costs at most two reads, never a pile of threads)."""
        if self._loading:
            self._reload_pending = True
            return
        self._loading = True
        self._load_worker()

    @work(thread=True, exit_on_error=False, group="load",
          description="read configuration and kernel state")
    def _load_worker(self) -> None:
        try:
            data = self.load()
        except MirrorError as exc:  # e.g. a corrupt config: shown, never rewritten
            data = exc
        except Exception as exc:  # shown in the banner rather than lost in a worker
            data = MirrorError(f"unexpected error: {exc!r}")
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
            self.reload()
        error = self.query("#load-error")
        if isinstance(event.data, MirrorError):
            if error:
                error.first().update(f"Cannot read the current state: {event.data}")
                error.first().display = True
            return
        if error:
            error.first().display = False
        self.show(event.data)

    def run_action(self, title: str, call: Callable[[], Iterable[Result] | Result],
                   *, root: bool = True) -> None:
        """Run a service call in a thread; show its per-entry results, then reload."""
        if root and self.app.needs_root(title):
            return
        self._set_busy(True)
        self._action_worker(title, call)

    @work(thread=True, exclusive=True, exit_on_error=False, group="action",
          description="apply an administrator's action")
    def _action_worker(self, title: str, call) -> None:
        try:
            out = call()
            results = [out] if isinstance(out, Result) else list(out)
        except MirrorError as exc:
            results = [Result.from_error(title, "", exc)]
        except Exception as exc:  # a bug below us must not leave the screen busy forever
            results = [Result(title, "", Outcome.FAILED, f"unexpected error: {exc!r}")]
        self.post_message(self.ActionDone(title, results))

    def _set_busy(self, busy: bool) -> None:
        for widget in self.query(self.busy_target):
            widget.loading = busy

    @on(ActionDone)
    def _on_action_done(self, event: ActionDone) -> None:
        from app.screens.dialogs import ResultsDialog
        self._set_busy(False)
        self.reload()
        self.app.push_screen(ResultsDialog(event.title, event.results, event.notes))
