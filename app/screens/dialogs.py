"""Typed modal dialogs: confirm, add a file-system entry, add a block entry, per-entry results.

The add dialogs validate as the administrator types (the config service's own words, checked
in a thread because it stats paths and reads the file) and submit through Replication, so a
refused entry shows the service's message and leaves the file untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual import on, work
from textual.worker import get_current_worker
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Label, Static, Switch

from app.screens.base import OUTCOME_STYLE
from app.services.config import BlockEntry, FsEntry
from app.services.results import MirrorError, Result
from app.services.units import parse_size

FS_NOTES = (
    "Never / itself: add the directories under it. Stop the applications using it first and "
    "start them after Mount all. NFS/Samba export the mirrorfs mount and start after the daemon."
)
BLOCK_NOTES = (
    "Applications must use the loop device (/dev/loopN), never the device itself: writes there "
    "are not captured and corrupt the target. Do not mount it from /etc/fstab; mount the loop "
    "device from a script that runs after the daemon."
)


class ConfirmDialog(ModalScreen[bool]):
    """Yes/No; Escape and n say no."""

    DEFAULT_CSS = "ConfirmDialog { align: center middle; }"
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, yes: str = "Yes") -> None:
        super().__init__(classes="dialog-screen")
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, id="question")
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


class ResultsDialog(ModalScreen[None]):
    """One line per entry, in the words the CLI prints."""

    BINDINGS = [Binding("escape,enter,q", "close", "Close")]

    def __init__(self, title: str, results: list[Result], notes: Sequence[str] = ()) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.results = results
        self.notes = list(notes)  # lines shown under the results, e.g. a verify's differing ranges

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog results"):
            yield Label(Text(self.title_text, style="bold"), id="results-title")
            with VerticalScroll(id="results-list"):
                if not self.results:
                    yield Static("Nothing to do: no entries are configured.")
                for r in self.results:
                    mark, style = OUTCOME_STYLE[r.outcome]
                    line = Text.assemble((f"{mark} {r.outcome.value:<9}", style), (r.target, "bold"),
                                         "\n  ", r.message)
                    yield Static(line, classes=f"result {r.outcome.value}")
                if self.notes:
                    yield Static("\n".join(self.notes), id="results-notes")
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK", id="ok", variant="primary", compact=True)

    def on_mount(self) -> None:
        self.query_one("#ok").focus()

    @on(Button.Pressed)
    def action_close(self) -> None:
        self.dismiss(None)


class _EntryDialog(ModalScreen[Result | None]):
    """Shared: inline validation in a thread, submit in a thread, the service's message shown."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    class Checked(Message):
        def __init__(self, problem: str | None, submitted: Result | None = None) -> None:
            super().__init__()
            self.problem = problem
            self.submitted = submitted

    def entry(self):
        """The entry as typed; raises ValueError/MirrorError with the message to show."""
        raise NotImplementedError

    def validate_entry(self, entry) -> None:
        raise NotImplementedError

    def submit(self, entry) -> Result:
        raise NotImplementedError

    def recheck(self) -> None:
        self._check_worker(False)

    @work(thread=True, exclusive=True, exit_on_error=False, group="validate",
          description="check the entry with the config service")
    def _check_worker(self, submit: bool) -> None:
        try:
            entry = self.app.call_from_thread(self.entry)
            self.validate_entry(entry)
        except (ValueError, MirrorError) as exc:
            if submit or not get_current_worker().is_cancelled:  # else stale: input changed
                self.post_message(self.Checked(str(exc)))
            return
        except Exception as exc:  # never leave the Add button spinning
            self.post_message(self.Checked(f"unexpected error: {exc!r}"))
            return
        result = self.submit(entry) if submit else None
        problem = result.message if result is not None and result.failed else None
        if submit or not get_current_worker().is_cancelled:
            self.post_message(self.Checked(problem, result))

    @on(Checked)
    def _checked(self, event: Checked) -> None:
        problem = self.query_one("#problem", Static)
        self.query_one("#add", Button).loading = False
        if event.problem:
            problem.update(Text("✘ " + event.problem, style="bold red"))
        elif event.submitted is not None:
            self.dismiss(event.submitted)
        else:
            problem.update(Text("✔ can be added", style="green"))

    @on(Button.Pressed, "#add")
    @on(Input.Submitted)
    def action_add(self) -> None:
        if self.app.needs_root("Adding an entry"):
            return
        self.query_one("#add", Button).loading = True
        self._check_worker(True)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class AddFsEntryDialog(_EntryDialog):
    """Path (typed or picked), access-time switch (off), optional target."""

    def __init__(self, start: str = "/") -> None:
        super().__init__(classes="dialog-screen")
        self.start = start

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="add-fs"):
            yield Label(Text("Add a directory to replicate", style="bold"))
            yield Input(placeholder="/srv/data  (highest directory to capture)", id="path", compact=True)
            yield DirectoryTree(self.start, id="picker")
            with Horizontal(classes="field"):
                yield Switch(False, id="atime")
                yield Label("Replicate access times (slower: off is recommended)")
            yield Input(placeholder="target directory (optional)", id="target", compact=True)
            yield Static("", id="problem")
            yield Static(FS_NOTES, classes="notes")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Add", id="add", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#path").focus()

    @on(DirectoryTree.DirectorySelected)
    def _picked(self, event: DirectoryTree.DirectorySelected) -> None:
        self.query_one("#path", Input).value = str(event.path)

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

    def validate_entry(self, entry: FsEntry) -> None:
        self.app.services.store.validate_filesystem(entry)

    def submit(self, entry: FsEntry) -> Result:
        return self.app.services.replication.add_filesystem(
            entry.path, replicate_atime=entry.replicate_atime, target=entry.target)


class AddBlockEntryDialog(_EntryDialog):
    """Device (from the picker), loop (first free or /dev/loopN), offset, size limit, ro,
    encryption, and the optional target the daemon replicates the captured writes to."""

    def __init__(self, device: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self.device = device

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="add-block"):
            yield Label(Text("Add a block device to replicate", style="bold"))
            yield Input(self.device, placeholder="device, e.g. /dev/sdb1", id="device", compact=True)
            yield Input(placeholder="target (optional): file or block device the writes are "
                        "replicated to", id="target", compact=True)
            yield Input(placeholder="loop: first free, or /dev/loopN to keep the same one "
                        "across restarts", id="loop", compact=True)
            with Horizontal(classes="field"):
                yield Input(placeholder="offset: 0  (512, 4K, 1M…)", id="offset", compact=True)
                yield Input(placeholder="size limit: whole device", id="sizelimit", compact=True)
            with Horizontal(classes="field"):
                yield Switch(False, id="read-only")
                yield Label("Read-only")
                yield Input(placeholder="encryption: none (the kernel has no loop encryption)",
                            id="encryption", compact=True)
            yield Static("", id="problem")
            yield Static(BLOCK_NOTES, classes="notes")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Add", id="add", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#target" if self.device else "#device").focus()
        self.query_one("#device", Input).tooltip = "the block device to replicate"
        if self.device:
            self.recheck()

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
        sizes = {}
        for name in ("offset", "sizelimit"):
            try:
                sizes[name] = parse_size(self._value(name) or "0")
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return BlockEntry(device, self._value("loop") or None, sizes["offset"], sizes["sizelimit"],
                          self.query_one("#read-only", Switch).value,
                          self._value("encryption") or None, self._value("target") or None)

    def validate_entry(self, entry: BlockEntry) -> None:
        self.app.services.store.validate_block(entry)

    def submit(self, entry: BlockEntry) -> Result:
        return self.app.services.replication.add_block(
            entry.device, loop=entry.loop, offset=entry.offset, sizelimit=entry.sizelimit,
            read_only=entry.read_only, encryption=entry.encryption, target=entry.target)
