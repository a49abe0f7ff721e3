"""Block device replication: the device picker and the configured entries, with the seed's
actions (list devices, add, remove/detach, attach all, detach all), and the daemon's mirror
and verify of the selected entry against its target, with a progress bar."""

from __future__ import annotations


from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, DataTable, Footer, Header, Label, ProgressBar, Static, Switch

from app.screens.base import (RootBanner, TaskScreen, capture_text, elide, selected_key, state_text,
                              sync_table)
from app.screens.dialogs import AddBlockEntryDialog, ConfirmDialog
from app.services.results import MirrorError, Outcome, Result
from app.services.units import human_size

DEVICE_COLUMNS = (("Device", "path"), ("Size", "size"), ("Type", "type"), ("FS", "fstype"),
                  ("Mounted on", "mounts"), ("In use / excluded", "notes"))
# What the kernel and the daemon say first (readable at 80 columns), the configuration after.
ENTRY_COLUMNS = (("Device", "device"), ("Loop now", "actual"), ("Capture", "capture"),
                 ("State", "state"), ("Target", "target"), ("Loop wanted", "wanted"),
                 ("Offset", "offset"), ("Size limit", "sizelimit"), ("RO", "ro"))
MAX_RANGES_SHOWN = 100  # a verify of a very different target lists the first ones, then a count


def device_row(dev) -> tuple:
    style = "grey50" if dev.excluded else ""
    notes = f"excluded: {dev.excluded}" if dev.excluded else "; ".join(dev.in_use)
    cells = (dev.path, human_size(dev.size), dev.type, dev.fstype or "",
             ", ".join(dev.mountpoints), notes)
    if dev.in_use and not dev.excluded:
        return tuple(Text(c, style="yellow") if i == 5 else c for i, c in enumerate(cells))
    return tuple(Text(c, style=style) for c in cells)


def entry_row(state) -> tuple:
    e = state.entry
    return (e.device, state.loop or "—", capture_text(state.capture), state_text(state.state),
            elide(e.target) if e.target else "—", e.loop or "first free",
            human_size(e.offset) if e.offset else "0",
            human_size(e.sizelimit) if e.sizelimit else "whole", "yes" if e.read_only else "")


def range_lines(ranges) -> list[str]:
    """A verify's differing [start, end) byte ranges (target offsets, end exclusive) as lines:
    a count, then inclusive byte ranges as the CLI prints them."""
    if not ranges:
        return []
    total = sum(end - start for start, end in ranges)
    lines = [f"{len(ranges)} range{'s' if len(ranges) > 1 else ''} of the target "
             f"differ{'' if len(ranges) > 1 else 's'} ({human_size(total)} in all):"]
    lines += [f"  bytes {start}-{end - 1} ({human_size(end - start)})"
              for start, end in ranges[:MAX_RANGES_SHOWN]]
    if len(ranges) > MAX_RANGES_SHOWN:
        lines.append(f"  … and {len(ranges) - MAX_RANGES_SHOWN} more ranges")
    return lines


class BlockScreen(TaskScreen):
    CSS_PATH = "block.tcss"
    BINDINGS = TaskScreen.BINDINGS + [
        Binding("a", "add", "Add"),
        Binding("r,delete", "remove", "Remove/detach"),
        Binding("t", "attach_all", "Attach all"),
        Binding("d", "detach_all", "Detach all"),
        Binding("m", "mirror", "Mirror"),
        Binding("v", "verify", "Verify"),
        Binding("x", "toggle_excluded", "Show excluded"),
    ]
    busy_target = "#block-entries"

    class SyncProgress(Message):
        """A mirror's or verify's progress, posted from its worker thread."""

        def __init__(self, progress: dict) -> None:
            super().__init__()
            self.progress = progress

    class SyncDone(Message):
        def __init__(self, title: str, results: list[Result], notes: list[str]) -> None:
            super().__init__()
            self.title = title
            self.results = results
            self.notes = notes

    def __init__(self) -> None:
        super().__init__()
        self._devices: list = []
        self._snap = None
        self._sync: tuple[str, str, str] | None = None  # (verb, device, target) while one runs

    def compose(self) -> ComposeResult:
        yield Header()
        yield RootBanner()
        yield Static("", id="load-error", classes="banner error")
        with Vertical(id="picker-box"):
            with Horizontal(id="picker-head"):
                yield Label("Block devices on this system (Enter or a adds)", classes="section-title")
                yield Switch(False, id="show-excluded")
                yield Label("show swap / LVM")
            table = DataTable(id="devices", cursor_type="row")
            for label, key in DEVICE_COLUMNS:
                table.add_column(label, key=key)
            yield table
        with Vertical(id="entries-box"):
            yield Label("Replicated block devices", classes="section-title")
            entries = DataTable(id="block-entries", cursor_type="row", zebra_stripes=True)
            for label, key in ENTRY_COLUMNS:
                entries.add_column(label, key=key)
            yield entries
            yield Static("", id="block-empty", classes="notes")
            with Vertical(id="sync-box"):
                yield Label("", id="sync-label")
                yield ProgressBar(id="sync-progress", show_eta=True)
        yield Static("Use the loop device, never the device itself; mount it from a script after "
                     "the daemon, not from /etc/fstab.", classes="notes")
        with Horizontal(classes="buttons"):
            yield Button("Add", id="add", compact=True)
            yield Button("Remove/detach", id="remove", compact=True)
            yield Button("Attach all", id="attach_all", compact=True)
            yield Button("Detach all", id="detach_all", compact=True)
            yield Button("Mirror", id="mirror", compact=True)
            yield Button("Verify", id="verify", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        super().on_mount()
        self.reload_on(self.app.mounts_signal, self.app.daemon_signal, self.app.block_signal)
        self.query_one("#devices").focus()

    def load(self):
        return self.services.list_devices(include_excluded=True), self.services.status()

    def show(self, data) -> None:
        self._devices, self._snap = data
        self._show_devices()
        sync_table(self.query_one("#block-entries", DataTable),
                   {s.entry.device: entry_row(s) for s in self._snap.block})
        self.query_one("#block-empty", Static).update(
            "" if self._snap.block else "No block devices are replicated yet: pick one above.")

    def _show_devices(self) -> None:
        show_all = self.query_one("#show-excluded", Switch).value
        sync_table(self.query_one("#devices", DataTable),
                   {d.path: device_row(d) for d in self._devices if show_all or not d.excluded})

    @on(Switch.Changed, "#show-excluded")
    def _excluded_toggled(self) -> None:
        self._show_devices()

    def action_toggle_excluded(self) -> None:
        switch = self.query_one("#show-excluded", Switch)
        switch.value = not switch.value

    @on(Button.Pressed)
    def _button(self, event: Button.Pressed) -> None:
        getattr(self, f"action_{event.button.id}")()

    @on(DataTable.RowSelected, "#devices")
    def _device_chosen(self) -> None:
        self.action_add()

    def action_add(self) -> None:
        if self.app.needs_root("Adding a block device"):
            return
        path = selected_key(self.query_one("#devices", DataTable)) or ""
        device = next((d for d in self._devices if d.path == path), None)
        if device is not None and device.excluded:
            self.notify(f"{path} is {device.excluded}: it cannot be replicated.",
                        severity="error", title="Excluded")
            return
        self.app.push_screen(AddBlockEntryDialog(path), self._added)

    def _added(self, result) -> None:
        if result is not None:
            self.notify(result.message, title="Added")
            self.reload()

    def action_remove(self) -> None:
        device = selected_key(self.query_one("#block-entries", DataTable))
        if device is None:
            self.notify("Select a replicated device in the lower table first.", severity="warning")
            return
        if self.app.needs_root("Removing a block device"):
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.run_action(f"Remove {device}",
                                lambda: self.services.replication.remove_block(device))
        self.app.push_screen(ConfirmDialog(
            f"Detach and stop replicating {device}?\nA loop device that is still mounted is "
            "not detached, and the entry is then kept.", yes="Remove"), confirmed)

    def action_attach_all(self) -> None:
        self.run_action("Attach all", lambda: self.services.replication.attach_all())

    def action_detach_all(self) -> None:
        self.run_action("Detach all", lambda: self.services.replication.detach_all())

    def run_action(self, title, call, *, root: bool = True) -> None:
        if self._refuse_while_syncing():
            return
        super().run_action(title, call, root=root)

    def _refuse_while_syncing(self) -> bool:
        if self._sync is None:
            return False
        verb, device, _ = self._sync
        self.notify(f"{verb.capitalize()} of {device} is still running: wait until it is done.",
                    severity="warning", title="Busy")
        return True

    # -- mirror / verify through the daemon -------------------------------------------------

    def _selected_state(self):
        device = selected_key(self.query_one("#block-entries", DataTable))
        if device is None or self._snap is None:
            return None
        return next((s for s in self._snap.block if s.entry.device == device), None)

    def action_mirror(self) -> None:
        self._start_sync("mirror")

    def action_verify(self) -> None:
        self._start_sync("verify")

    def _start_sync(self, verb: str) -> None:
        state = self._selected_state()
        if state is None:
            self.notify(f"Select a replicated device in the lower table first: {verb} works on "
                        "one entry.", severity="warning")
            return
        if self._refuse_while_syncing():
            return
        what = "Mirroring" if verb == "mirror" else "Verifying"
        if self.app.needs_root(f"{what} a block device"):
            return
        entry = state.entry
        if not entry.target:
            self.notify(f"{entry.device} has no target to {verb}: its writes are captured only. "
                        "Remove the entry and add it again with a target.", severity="warning",
                        title="No target")
            return
        if verb == "verify":
            self._run_sync(verb, entry.device, entry.target)
            return
        window = f"from offset {human_size(entry.offset) if entry.offset else 0}" + (
            f", {human_size(entry.sizelimit)}" if entry.sizelimit else "")
        held = (f"\nWrites through {state.loop} wait until it is done." if state.capture ==
                "captured" else "")

        def confirmed(yes: bool | None) -> None:
            if yes:
                self._run_sync(verb, entry.device, entry.target)
        self.app.push_screen(ConfirmDialog(
            f"Copy all of {entry.device} ({window}) to {entry.target}?\nEvery block of the "
            f"target is overwritten.{held}", yes="Mirror"), confirmed)

    def _run_sync(self, verb: str, device: str, target: str) -> None:
        if self._refuse_while_syncing():  # a second confirm dialog answered late
            return
        self._sync = (verb, device, target)
        self.query_one("#sync-progress", ProgressBar).update(total=None, progress=0)
        self._show_sync_label()
        self.query_one("#sync-box").display = True
        self._sync_worker(verb, device)

    def _show_sync_label(self, done: int | None = None, total: int | None = None) -> None:
        verb, device, target = self._sync
        head = (f"Mirroring {device} to {target}" if verb == "mirror"
                else f"Verifying {device} against {target}")
        tail = f": {human_size(done)} of {human_size(total)}" if total else " …"
        self.query_one("#sync-label", Label).update(head + tail)

    @work(thread=True, exit_on_error=False, group="sync",
          description="mirror or verify a block entry through the daemon")
    def _sync_worker(self, verb: str, device: str) -> None:
        def progress(p: dict) -> None:  # from this thread; never blocks on the UI
            self.post_message(self.SyncProgress(dict(p)))

        replication = self.services.replication
        notes: list[str] = []
        try:
            if verb == "mirror":
                results = list(replication.block_mirror(device, progress=progress))
            else:
                results, ranges = replication.block_verify(device, progress=progress)
                results, notes = list(results), range_lines(ranges)
        except MirrorError as exc:
            results = [Result.from_error(verb, device, exc)]
        except Exception as exc:  # a bug below us must not leave the progress bar up forever
            results = [Result(verb, device, Outcome.FAILED, f"unexpected error: {exc!r}")]
        if any(r.failed for r in results) and not self.services.daemon_running():
            notes.append("Mirror and verify go through the daemon: the Daemon screen (5 in the "
                         "main menu) starts it.")
        title = f"{verb.capitalize()} {device}"
        if self.is_attached:
            self.post_message(self.SyncDone(title, results, notes))
        elif self.app.is_running:  # the screen was left while it ran: say how it ended anyway
            failed = any(r.failed for r in results)
            summary = "; ".join(r.message for r in results) or "done"
            try:
                self.app.call_from_thread(self.app.notify, summary, title=title,
                                          severity="error" if failed else "information")
            except RuntimeError:  # the App itself has ended
                pass

    @on(SyncProgress)
    def _sync_progress(self, event: SyncProgress) -> None:
        if self._sync is None:
            return
        total, done = event.progress.get("total"), event.progress.get("bytes")
        if total and done is not None:
            self.query_one("#sync-progress", ProgressBar).update(total=total, progress=done)
            self._show_sync_label(done, total)

    @on(SyncDone)
    def _sync_done(self, event: SyncDone) -> None:
        self._sync = None
        self.query_one("#sync-box").display = False
        self._on_action_done(TaskScreen.ActionDone(event.title, event.results, event.notes))
