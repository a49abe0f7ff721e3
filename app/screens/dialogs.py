"""Typed modal dialogs: confirm, per-entry results (with Force where it applies), details of
one entry, add a file-system entry, add a block entry.

The add dialogs check as the administrator types, with the rules Add and Attach all use (the
services' own words, in a thread because they stat paths and probe devices; one check at a
time, the latest input checked last), and submit through Replication, so a refused entry
shows the service's message and leaves the file untouched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Label, Static, Switch

from app.screens import actions
from app.screens.base import OUTCOME_STYLE, check_text
from app.services.config import BlockEntry, FsEntry
from app.services.entries import window_fields
from app.services.results import MirrorError, Result
from app.services.units import parse_size, shown

FS_NOTES = (
    "Never / itself: add the directories under it. Stop the applications using it first and "
    "start them after Mount all. NFS/Samba export the mirrorfs mount and start after the daemon."
)
BLOCK_NOTES = (
    "Applications must use the loop device (/dev/loopN), never the device itself: writes there "
    "are not captured and corrupt the target. Do not mount it from /etc/fstab; mount the loop "
    "device from a script that runs after the daemon."
)
# The services word their hints for the command line; the results dialog has a Force button.
CLI_HINTS = (("(--force overrides)", "(Force… below overrides)"),
             ("or unmount with --force (lazy unmount)", "or use Force… below (lazy unmount)"),
             ("start it with `mirrorsetup daemon start` (or `systemctl start mirrorsetup`)",
              "start it on the Daemon screen (5 in the main menu)"))


def labelled(*fields: tuple[str, Input], then=(), classes: str = "field") -> Horizontal:
    """One line of a form: each input after its name, then the widgets `then` (a switch, a
    button). A placeholder alone names an empty field only: once typed in or filled in
    advance (port 22, user root), its name is gone."""
    children = []
    for n, (name, field) in enumerate(fields):
        children += [Label(name, classes="field-name next" if n else "field-name"), field]
    return Horizontal(*children, *then, classes=classes)


# An identity refusal (capture.check_identity) names the CLI's accept; the TUI's is a key on
# the entry's row (app/screens/accept.py), on the screens that show its results and warnings
ACCEPT_COMMAND = re.compile(r"`mirrorsetup (?:fs accept-filesystem|block accept-device) [^`]*`")


def accept_hint(message: str) -> str:
    return ACCEPT_COMMAND.sub(f"Accept ({actions.key_of('filesystem', 'accept')} on its row)",
                              message)


def tui_words(message: str) -> str:
    for cli, tui in CLI_HINTS:
        message = message.replace(cli, tui)
    return shown(accept_hint(message))


class ConfirmDialog(ModalScreen[bool]):
    """Yes/No; Escape and n say no. The question is plain text (paths may hold brackets)."""

    CSS_PATH = "dialogs.tcss"
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, yes: str = "Yes") -> None:
        super().__init__(classes="dialog-screen")
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(self.question), id="question")
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.yes, id="yes", variant="error", compact=True)
                yield Button("No", id="no", compact=True)

    def on_mount(self) -> None:
        self.query_one("#no").focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class ResultsDialog(ModalScreen[str | None]):
    """One line per entry, in the words the CLI prints; dismissed with "force" when the
    administrator chooses the offered Force button."""

    CSS_PATH = "dialogs.tcss"
    BINDINGS = [Binding("escape,enter,q", "close", "Close")]

    def __init__(self, title: str, results: list[Result], notes: Sequence[str] = (),
                 force: str | None = None) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.results = results
        self.notes = list(notes)  # lines shown under the results, e.g. a verify's differing ranges
        self.force = force

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog results"):
            yield Label(Text(self.title_text, style="bold"), id="results-title")
            with VerticalScroll(id="results-list"):
                if not self.results:
                    yield Static("Nothing to do: no entries are configured.")
                for r in self.results:
                    mark, style = OUTCOME_STYLE[r.word]
                    line = Text.assemble((f"{mark} {r.word:<10}", style),
                                         (shown(r.target), "bold"), "\n  ", tui_words(r.message))
                    yield Static(line, classes=f"result {r.word}")
                if self.notes:
                    yield Static(Text("\n".join(shown(n) for n in self.notes)), id="results-notes")
            with Horizontal(classes="dialog-buttons"):
                if self.force:
                    yield Button(self.force, id="force", variant="error", compact=True)
                yield Button("OK", id="ok", variant="primary", compact=True)

    def on_mount(self) -> None:
        self.query_one("#ok").focus()

    @on(Button.Pressed, "#force")
    def _force(self) -> None:
        self.dismiss("force")

    @on(Button.Pressed, "#ok")
    def action_close(self) -> None:
        self.dismiss(None)


class DetailsDialog(ModalScreen[None]):
    """Everything about one entry (what a narrow table leaves out), or one of the dashboard's
    panels in full."""

    CSS_PATH = "dialogs.tcss"
    BINDINGS = [Binding("escape,enter,q,i", "close", "Close")]

    def __init__(self, title: str, body: Text | Sequence[tuple[str, str]], *,
                 follow: Callable[[], Text | Sequence[tuple[str, str]] | None] | None = None
                 ) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.body = body
        self.follow = follow  # the body read again (TaskScreen.push_details); None: gone
        self.gone = False

    def follow_up(self) -> None:
        """Show the body as `follow` reads it now; once it reads nothing the entry is gone:
        the last body stays, and the title says so."""
        if self.follow is None:
            return
        body = self.follow()
        if (body is None) != self.gone:
            self.gone = body is None
            self.query_one("#details-title", Label).update(self._title())
        if body is not None and body != self.body:
            self.body = body
            self.query_one("#details-text", Static).update(self._text())

    def _title(self) -> Text:
        return Text(self.title_text + (" (no longer configured: as last seen)" if self.gone
                                       else ""), style="bold")

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog details"):
            yield Label(self._title(), id="details-title")
            with VerticalScroll(id="details-body"):
                yield Static(self._text(), id="details-text")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Close", id="close", variant="primary", compact=True)

    def _text(self) -> Text:
        if isinstance(self.body, Text):
            return self.body
        width = max((len(label) for label, _ in self.body), default=0) + 2
        text = Text()
        for label, value in self.body:
            text.append(f"{label + ':':<{width}}", style="bold")
            text.append(shown(value) + "\n")
        text.rstrip()
        return text

    def on_mount(self) -> None:
        self.query_one("#details-body").focus()

    @on(Button.Pressed, "#close")
    def action_close(self) -> None:
        self.dismiss(None)


class _EntryDialog(ModalScreen[Result | None]):
    """Shared: checked as typed in a thread (one at a time), submitted in a thread, the
    service's message shown in the one style of every check."""

    CSS_PATH = "dialogs.tcss"
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    class Checked(Message):
        def __init__(self, problem: str | None, warnings: Sequence[str] = (),
                     submitted: Result | None = None) -> None:
            super().__init__()
            self.problem = problem
            self.warnings = list(warnings)
            self.submitted = submitted

    _checking = False
    _check_again = False
    _submitting = False  # Add pressed and its worker not back yet: it cannot be taken back

    def entry(self):
        """The entry as typed; raises ValueError/MirrorError with the message to show."""
        raise NotImplementedError

    def check_entry(self, entry) -> tuple[str | None, list[str]]:
        """(refusal or None, warnings) for the entry as typed."""
        raise NotImplementedError

    def submit(self, entry) -> Result:
        raise NotImplementedError

    def recheck(self) -> None:
        """Check the input as it is now; while a check runs, check once more after it."""
        if self._checking:
            self._check_again = True
            return
        self._checking = True
        self._check_worker(False)

    @work(thread=True, exit_on_error=False, group="validate",
          description="check the entry with the services")
    def _check_worker(self, submit: bool) -> None:
        try:
            entry = self.app.call_from_thread(self.entry)
            problem, warnings = self.check_entry(entry)
        except (ValueError, MirrorError) as exc:
            self.post_message(self.Checked(str(exc)))
            return
        except Exception as exc:  # never leave the Add button spinning
            self.post_message(self.Checked(f"unexpected error: {exc!r}"))
            return
        if problem or not submit:
            self.post_message(self.Checked(problem, warnings))
            return
        result = self.submit(entry)
        self.post_message(self.Checked(result.message if result.failed else None, warnings,
                                       result))

    @on(Checked)
    def _checked(self, event: Checked) -> None:
        self._checking = self._submitting = False
        self.query_one("#add", Button).loading = False
        if event.submitted is not None and not event.submitted.failed:
            self.dismiss(event.submitted)
            return
        if self._check_again:  # the input changed meanwhile: this answer is stale
            self._check_again = False
            self.recheck()
            return
        self.query_one("#problem", Static).update(check_text(
            event.problem and shown(event.problem), [shown(w) for w in event.warnings]))

    @on(Button.Pressed, "#add")
    @on(Input.Submitted)
    def action_add(self) -> None:
        if self.app.needs_root("Adding an entry"):
            return
        self.query_one("#add", Button).loading = True
        self._check_again = False
        self._checking = self._submitting = True
        self._check_worker(True)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        if self._submitting:  # closed now, the entry might still be added, its result unseen
            self.notify("The entry is being added: its result is shown here in a moment.",
                        title="Add", severity="warning", markup=False)
            return
        self.dismiss(None)


def window_sizes(value) -> tuple[int, int]:
    """The offset and size limit typed into the #offset and #sizelimit fields (`value(id)`: a
    field's text), empty meaning 0; ValueError names the field as it is labelled."""
    return (parse_size(value("offset") or "0", what="offset"),
            parse_size(value("sizelimit") or "0", what="size limit"))


def path_parts(path: str) -> list[str] | None:
    """An absolute path's names, as the kernel walks them ("." and empty names dropped, ".."
    going up); None for a relative path. Strings only: no file is looked at."""
    if not path.startswith("/"):
        return None
    parts: list[str] = []
    for name in path.split("/"):
        if name == "..":
            parts = parts[:-1]
        elif name not in ("", "."):
            parts.append(name)
    return parts


def switch_text(on_: bool, name: str, on_words: str, off_words: str) -> Text:
    """A switch's name and state in words beside it (never by colour alone)."""
    return Text.assemble((f"{name}: ", "bold"), ("ON" if on_ else "off", "bold" if on_ else ""),
                         f" — {on_words if on_ else off_words}")


class AddFsEntryDialog(_EntryDialog):
    """Path (typed or picked), access-time switch (off), optional target."""

    def __init__(self, start: str = "/") -> None:
        super().__init__(classes="dialog-screen")
        self.start = start

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="add-fs"):
            yield Label(Text("Add a directory to replicate", style="bold"))
            yield labelled(("Path", Input(placeholder="/srv/data  (highest directory to capture)",
                                          id="path", compact=True)))
            yield DirectoryTree(self.start, id="picker")
            with Horizontal(classes="field"):
                yield Switch(False, id="atime")
                yield Label(self._atime_words(False), id="atime-state")
            yield labelled(("Target", Input(placeholder="(optional) directory, or NAME:PATH on a "
                                            "remote target", id="target",
                                            compact=True)))
            yield Static("", id="problem")
            yield Static(FS_NOTES, classes="notes")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Add", id="add", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    @staticmethod
    def _atime_words(on_: bool) -> Text:
        return switch_text(on_, "Access times", "replicated: each read is a change to ship",
                           "only those set at close (recommended)")

    def on_mount(self) -> None:
        self.query_one("#path").focus()

    @on(DirectoryTree.DirectorySelected)
    def _picked(self, event: DirectoryTree.DirectorySelected) -> None:
        self.query_one("#path", Input).value = str(event.path)

    @on(Input.Changed, "#path")
    def _typed(self, event: Input.Changed) -> None:
        self._follow(event.value.strip())

    @work(exclusive=True, group="follow", exit_on_error=False,
          description="show the typed directory in the picker")
    async def _follow(self, typed: str) -> None:
        """The picker opens its way down to a directory typed into Path (one below the
        picker's top), expands it and puts its cursor there; the input is left as typed. The
        tree reads each level its own way (in a thread) and says what is a directory; a path
        that leads nowhere leaves the tree as it was."""
        tree = self.query_one("#picker", DirectoryTree)
        parts, top = path_parts(typed), path_parts(str(tree.root.data.path))
        if parts is None or top is None or parts[:len(top)] != top:
            return
        node, opened = tree.root, []
        for part in parts[len(top):]:
            if not node.is_expanded:
                opened.append(node)
            if not node.children and node is not tree.root:  # not read yet
                await tree.reload_node(node)
            node.expand()
            child = next((c for c in node.children
                          if c.allow_expand and c.data and c.data.path.name == part), None)
            if child is None:  # no such directory (yet: e.g. still being typed)
                for was_closed in reversed(opened):
                    was_closed.collapse()
                return
            node = child
        if not node.children and node is not tree.root:
            await tree.reload_node(node)  # its subdirectories, to go on picking below it
        node.expand()
        tree.move_cursor(node, animate=False)

    @on(Switch.Changed, "#atime")
    def _atime(self, event: Switch.Changed) -> None:
        self.query_one("#atime-state", Label).update(self._atime_words(event.value))

    @on(Input.Changed)
    @on(Switch.Changed)
    def _changed(self) -> None:
        if self.query_one("#path", Input).value:
            self.recheck()

    def entry(self) -> FsEntry:
        path = self.query_one("#path", Input).value.strip()
        if not path:
            raise ValueError("type the path of a directory, or pick one")
        target = self.query_one("#target", Input).value.strip() or None
        return FsEntry(path, self.query_one("#atime", Switch).value, target)

    def check_entry(self, entry: FsEntry) -> tuple[str | None, list[str]]:
        try:
            self.app.services.store.validate_filesystem(entry)
        except MirrorError as exc:
            return exc.message, []
        return None, []

    def submit(self, entry: FsEntry) -> Result:
        return self.app.services.replication.add_filesystem(
            entry.path, replicate_atime=entry.replicate_atime, target=entry.target)


class AddBlockEntryDialog(_EntryDialog):
    """Device (from the picker), target, loop (first free or /dev/loopN), offset, size limit
    and read-only. The legacy encryption field is not offered: the kernel has none."""

    def __init__(self, device: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self.device = device

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="add-block"):
            yield Label(Text("Add a block device to replicate", style="bold"))
            yield labelled(("Device", Input(self.device, placeholder="e.g. /dev/sdb1", id="device",
                                            compact=True)))
            yield labelled(("Target", Input(placeholder="(optional) file or device, or "
                                            "NAME:PATH on a remote target", id="target",
                                            compact=True)))
            yield labelled(("Loop", Input(placeholder="first free, or /dev/loopN to keep the same "
                                          "one across restarts", id="loop", compact=True)))
            yield labelled(("Offset", Input(placeholder="0  (512, 4K, 1M…)", id="offset",
                                            compact=True)),
                           ("size limit", Input(placeholder="whole device", id="sizelimit",
                                                compact=True)))
            with Horizontal(classes="field"):
                yield Switch(False, id="read-only")
                yield Label(self._ro_words(False), id="read-only-state")
            yield Static("", id="problem")
            yield Static(BLOCK_NOTES, classes="notes")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Add", id="add", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    @staticmethod
    def _ro_words(on_: bool) -> Text:
        return switch_text(on_, "Read-only", "the loop device refuses writes",
                           "writes allowed")

    def on_mount(self) -> None:
        self.query_one("#target" if self.device else "#device").focus()
        self.query_one("#device", Input).tooltip = "the block device to replicate"
        if self.device:
            self.recheck()

    @on(Switch.Changed, "#read-only")
    def _read_only(self, event: Switch.Changed) -> None:
        self.query_one("#read-only-state", Label).update(self._ro_words(event.value))

    @on(Input.Changed)
    @on(Switch.Changed)
    def _changed(self) -> None:
        if self.query_one("#device", Input).value:
            self.recheck()

    def _value(self, name: str) -> str:
        return self.query_one(f"#{name}", Input).value.strip()

    def entry(self) -> BlockEntry:
        device = self._value("device")
        if not device:
            raise ValueError("type the path of a block device, or pick one in the list")
        # an offset or size limit that is no size is said with the entry's other problems
        offset, sizelimit, self._malformed = window_fields(self._value("offset"),
                                                           self._value("sizelimit"))
        return BlockEntry(device, self._value("loop") or None, offset,
                          sizelimit, self.query_one("#read-only", Switch).value,
                          None, self._value("target") or None)

    def check_entry(self, entry: BlockEntry) -> tuple[str | None, list[str]]:
        check = self.app.services.check_block(entry).with_typed(self._malformed)
        return check.refusal, [f"{entry.device} is {w}: Attach all refuses it until that "
                               "ends (Force… overrides)" for w in check.warnings]

    def submit(self, entry: BlockEntry) -> Result:
        return self.app.services.replication.add_block(
            entry.device, loop=entry.loop, offset=entry.offset, sizelimit=entry.sizelimit,
            read_only=entry.read_only, target=entry.target)


SET_TARGET_NOTES = (
    "Empty: no target (its changes are captured only). The next capture makes the new target "
    "equal to the entry (what differs is copied); the old replica is left as it is, no longer "
    "updated. A directory captured now is unmounted and mounted again (refused while something "
    "uses it); a block entry is set while detached.")


class SetTargetDialog(ModalScreen[tuple[str | None, bool] | None]):
    """An entry's target (`fs set / block set --target`): typed, prefilled with the one it
    has, checked as typed as an add checks it; Adopt replaces what a target holds that is not
    a replica of ours. Dismissed with (target or None, adopt); the screen sets it."""

    CSS_PATH = "dialogs.tcss"
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, kind: str, key: str, current: str | None) -> None:
        super().__init__(classes="dialog-screen")
        self.kind, self.key, self.current = kind, key, current

    def compose(self) -> ComposeResult:
        what = "directory" if self.kind == "fs" else "file or device"
        with Vertical(classes="dialog wide", id="set-target"):
            yield Label(Text(f"Target of {shown(self.key)}", style="bold"))
            yield labelled(("Target", Input(self.current or "", placeholder=f"{what}, or "
                                            "NAME:PATH on a remote target; empty: none",
                                            id="target", compact=True)))
            with Horizontal(classes="field"):
                yield Switch(False, id="adopt")
                yield Label(self._adopt_words(False), id="adopt-state")
            yield Static(check_text(None, (), ok=self._unchanged_words()), id="problem")
            yield Static(SET_TARGET_NOTES, classes="notes")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Set", id="set", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def _unchanged_words(self) -> str:
        return f"its target now: {shown(self.current)}" if self.current else "it has no target now"

    @staticmethod
    def _adopt_words(on_: bool) -> Text:
        return switch_text(on_, "Adopt", "a target that holds something else is replaced",
                           "a target that holds something else is refused")

    def on_mount(self) -> None:
        self.query_one("#target").focus()

    def wanted(self) -> tuple[str | None, bool]:
        return (self.query_one("#target", Input).value.strip() or None,
                self.query_one("#adopt", Switch).value)

    @on(Switch.Changed, "#adopt")
    def _adopt(self, event: Switch.Changed) -> None:
        self.query_one("#adopt-state", Label).update(self._adopt_words(event.value))

    @on(Input.Changed)
    @on(Switch.Changed)
    def _changed(self) -> None:
        self._check(*self.wanted())

    @work(thread=True, exclusive=True, exit_on_error=False, group="validate",
          description="check the target with the services")
    def _check(self, target: str | None, adopt: bool) -> None:
        try:
            old, new = self.app.services.store.check_entry_target(self.kind, self.key, target,
                                                                  adopt)
        except MirrorError as exc:
            text = check_text(shown(exc.message))
        except Exception as exc:  # never leave the dialog without a word
            text = check_text(f"unexpected error: {exc!r}")
        else:
            text = check_text(None, (), ok=self._unchanged_words() if old == new else
                              f"can be set: {shown(new.target)}" if new.target else
                              "can be set: no target")
        self.app.call_from_thread(self._show, text, (target, adopt))

    def _show(self, text: Text, checked: tuple[str | None, bool]) -> None:
        if self.is_attached and checked == self.wanted():  # (an older check's answer: dropped)
            self.query_one("#problem", Static).update(text)

    @on(Button.Pressed, "#set")
    @on(Input.Submitted)
    def action_set(self) -> None:
        self.dismiss(self.wanted())

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
