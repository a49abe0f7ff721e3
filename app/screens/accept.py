"""Accept an entry's new device or file system: the TUI's `block accept-device` and `fs
accept-filesystem`. A capture refuses an entry whose device (or the file system its directory
lies on) is not what was recorded for it (app/engine/capture.py check_identity); the
daemon's row says so (last_errno EMEDIUMTYPE), and the screens that show the entry (File
systems, Block devices, the dashboard) then offer n on its row. What was recorded and what it
is now are read in a thread and shown before anything is done; Cancel is the default."""

from __future__ import annotations

import errno

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.widgets import Button, Label, Static

from app.screens import actions
from app.screens.dialogs import ConfirmDialog
from app.services.layout import IDENTITY_WORDS, identity_words, identity_words_of
from app.services.protocol import CAPTURE
from app.services.results import MirrorError, Outcome
from app.services.units import shown

# Where the next capture is started, after an accept (the daemon does not try again by itself)
CAPTURE_ON = {"fs": ("filesystem", "mount_all", "File systems", "1"),
              "block": ("block", "attach_all", "Block devices", "2")}


def identity_refused(row) -> bool:
    """The daemon's row (CaptureRow or None) says its capture was refused as not the device or
    file system the entry was made for."""
    return row is not None and not row.captured and row.last_errno == errno.EMEDIUMTYPE


def state_label(kind: str, state) -> str:
    """An entry's state in a table (FsState, BlockState): what is mounted at a directory that
    is not ours, and that its capture is refused as not its file system or device (n)."""
    label = state.state
    if kind == "fs" and state.other_fstype:
        label += f" ({state.other_fstype} here)"
    if identity_refused(state.engine):
        label += " (other FS)" if kind == "fs" else " (other device)"
    return label


def next_capture(kind: str) -> str:
    """Mount all / Attach all, with its key and where it is."""
    screen, name, where, menu = CAPTURE_ON[kind]
    return (f"{CAPTURE[kind]} ({actions.key_of(screen, name)} on the {where} screen, {menu} in the "
            "main menu)")


def accept_question(kind: str, key: str, target: str | None, was: dict, now: dict) -> str:
    """What was recorded, what it is now, and what Accept does."""
    what, _why, fix, right = identity_words_of(kind, was, now)
    replica = (f"makes its replica ({target}) equal to what is there now" + (
        ": files the replica has and the directory lacks are deleted from it" if kind == "fs"
        else ": the blocks that differ are copied over the replica's")
        if target else "captures it (it has no target: nothing is copied)")
    return (f"{key} is not {'' if kind == 'block' else 'on '}the {what} "
            f"recorded for it, so its capture is refused.\n"
            f"  recorded: {shown(identity_words(was))}\n"
            f"  now:      {shown(identity_words(now))}\n\n"
            f"Accept only if this is right ({right}). If it is not: Cancel, {fix}.\n\n"
            f"Accept forgets the record: the next capture ({CAPTURE[kind]}) records the "
            f"{what} as it is now and {replica}.")


def accept_notes(kind: str, key: str, daemon_running: bool) -> list[str]:
    """The next step after an accept: nothing captures the entry until then."""
    if daemon_running:
        return [f"Nothing captures {key} until {next_capture(kind)} does: press it now."]
    return [f"The daemon captures {key} when it starts (the Daemon screen, 5 in the main menu); "
            f"while it runs, {next_capture(kind)} does."]


class AcceptDialog(ConfirmDialog):
    """Accept or Cancel (focused: the safe answer; Escape and n say it too). The question
    scrolls: at 80x24 the buttons stay on screen."""

    def __init__(self, title: str, question: str) -> None:
        super().__init__(question, yes="Accept")
        self.title_text = title

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="accept"):
            yield Label(Text(self.title_text, style="bold"))
            with VerticalScroll(id="accept-body"):
                yield Static(Text(self.question), id="question")
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.yes, id="yes", variant="error", compact=True)
                yield Button("Cancel", id="no", compact=True)


class AcceptsIdentity:
    """The accept action (n) of a TaskScreen whose rows are entries: shown in the footer only
    on an entry whose capture was refused so. `accept_subject()` gives the selected entry's
    (kind, FsState or BlockState), or None."""

    def accept_subject(self):
        raise NotImplementedError

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "accept":
            try:
                subject = self.accept_subject()
            except NoMatches:  # not composed yet, or being taken down
                return False
            return subject is not None and identity_refused(subject[1].engine)
        return super().check_action(action, parameters)

    def on_data_table_row_highlighted(self) -> None:
        self.refresh_accept()

    def on_descendant_focus(self) -> None:
        self.refresh_accept()  # the dashboard's entry is the focused table's

    def action_accept(self) -> None:
        subject = self.accept_subject()
        if subject is None:
            self.notify("No entry is selected.", severity="warning")
            return
        kind, state = subject
        what = IDENTITY_WORDS[kind][0]
        if self.app.needs_root(f"Accepting a new {what}"):
            return
        key = state.entry.path if kind == "fs" else state.entry.device
        self._identity_worker(self.app, kind, key, state.entry.target)

    @work(thread=True, exclusive=True, exit_on_error=False, group="accept",
          description="read what an entry's device or file system is now")
    def _identity_worker(self, app, kind: str, key: str, target: str | None) -> None:
        try:
            change = app.services.replication.identity_change(kind, key)
        except MirrorError as exc:
            change = exc
        self.from_thread(app, lambda: self._ask_accept(kind, key, target, change), lambda: None)

    def _ask_accept(self, kind: str, key: str, target: str | None, change) -> None:
        what = IDENTITY_WORDS[kind][0]
        title = f"Accept the {what} of {shown(key)}"
        if isinstance(change, MirrorError):
            self.notify(shown(str(change)), title=title, severity="error", markup=False)
            return
        if change is None:
            self.notify(f"Nothing to accept: {shown(key)} is on the {what} recorded for it "
                        f"(or none was recorded). {next_capture(kind)} captures it.",
                        title=title, markup=False)
            return
        was, now = change
        services = self.app.services

        def accept():
            result = services.replication.accept_identity(kind, key, expected=now)
            if result.outcome is not Outcome.OK:
                return result, []
            return result, accept_notes(kind, shown(key), services.daemon_running())

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.run_action(title, accept, subject=key)
        self.app.push_screen(AcceptDialog(title, accept_question(
            kind, shown(key), target and shown(target), was, now)), confirmed)

    def refresh_accept(self) -> None:
        """The footer as the selected entry and the state read say (n shown or not)."""
        self.refresh_bindings()
        self._fit_footer(self.app.size.width)
