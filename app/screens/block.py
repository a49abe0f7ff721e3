"""Block device replication: the device picker and the configured entries, with the seed's
actions (list devices, add, remove/detach, attach all, detach all), and the daemon's mirror
and verify of the selected entry against its target, with a progress bar.

The picker stays usable on a host where hundreds of loops come and go: the list is read in a
thread, uevents arrive in batches, rows are updated in place by key and the cursor stays on
the device the administrator chose (if that device goes away, a notice says so)."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, DataTable, Footer, Header, Label, ProgressBar, Static, Switch

from app.screens import actions
from app.screens.accept import AcceptsIdentity, state_label
from app.screens.banner import RootBanner
from app.screens.base import (Col, ForceOffer, KeyedTable, TaskScreen, capture_text, counted,
                              elide, handed_over_removal, listed, natural_key, selected_key,
                              state_text)
from app.screens.dialogs import AddBlockEntryDialog, ConfirmDialog, switch_text
from app.services.entries import picker_note, picker_notes
from app.services.results import MirrorError, Outcome, Result
from app.services.status import replication_lines
from app.services.units import exact_size, human_size, shown

DEVICE_COLUMNS = (Col("path", "Device", 9, 32, path=True), Col("size", "Size", 8),
                  Col("type", "Type", 6), Col("fstype", "FS", 5, 12),
                  Col("mounts", "Mounted on", 4, 28, path=True),
                  Col("notes", "In use / excluded", 7, 48))
NOTES_WIDTH = 48
# What the kernel and the daemon say first (readable at 80 columns), the configuration after;
# what does not fit is in the entry's detail view (i or Enter).
ENTRY_COLUMNS = (Col("device", "Device", 9, 28, path=True), Col("actual", "Loop now", 8),
                 Col("capture", "Capture", 7), Col("state", "State", 8, 24),
                 Col("target", "Target", 5, 28, path=True), Col("wanted", "Loop wanted", 3),
                 Col("offset", "Offset", 2), Col("sizelimit", "Size limit", 1),
                 Col("ro", "RO", 0))
MAX_RANGES_SHOWN = 100  # a verify of a very different target lists the first ones, then a count
FORCED_ATTACH = (
    "Attach even where the device is mounted or held?\n\nThen two paths write to the same "
    "device: writes through the mount or the holder bypass the loop device, are NOT captured, "
    "and corrupt the target. Only do this if you know the other user writes nothing.")


def device_row(dev, note: str | None = None) -> tuple:
    style = "grey50" if dev.excluded else ""
    # a loop bound to a file (another program's, often): said, though it is not "in use" (a
    # device's loop access point is said by in_use); the file's name, the end, is what tells
    backed = [f"loop of {elide(dev.backing_file, NOTES_WIDTH - 8)}"] \
        if dev.backing_file and not dev.backing_file.startswith("/dev/") and not note else []
    notes = f"excluded: {dev.excluded}" if dev.excluded else "; ".join(
        ([note] if note else []) + list(dev.in_use) + backed)
    notes = shown(notes)
    if len(notes) > NOTES_WIDTH:  # the start says most (root file system, mounted on …)
        notes = notes[:NOTES_WIDTH - 1] + "…"
    cells = (dev.path, human_size(dev.size), dev.type, dev.fstype or "",
             elide(", ".join(dev.mountpoints), 28), notes)
    if note and not dev.excluded:
        return tuple(Text(c, style="cyan") if i == 5 else c for i, c in enumerate(cells))
    if dev.in_use and not dev.excluded:
        return tuple(Text(c, style="yellow") if i == 5 else c for i, c in enumerate(cells))
    return tuple(Text(c, style=style) for c in cells)


def entry_row(state) -> tuple:
    e = state.entry
    return (elide(e.device, 28), state.loop or "—", capture_text(state.capture),
            state_text(state_label("block", state), state.problem),
            elide(e.target) if e.target else "—",
            e.loop or "first free", human_size(e.offset) if e.offset else "0",
            human_size(e.sizelimit) if e.sizelimit else "whole", "yes" if e.read_only else "")


def entry_details(state) -> list[tuple[str, str]]:
    """Every field of a block entry and its live state, for the detail view."""
    e, f = state.entry, state.figures
    figures = replication_lines(f)
    lines = [("Device", e.device), ("State", state.state), ("Loop now", state.loop or "none"),
             ("Capture", capture_words(state.capture, figures)),
             ("Target", e.target or "none (captured only)"),
             ("Loop wanted", e.loop or "the first free one"),
             ("Offset", f"{human_size(e.offset)} ({e.offset} bytes)" if e.offset else "0"),
             ("Size limit", human_size(e.sizelimit) if e.sizelimit else "the whole device"),
             ("Read-only", "yes" if e.read_only else "no")]
    if state.problem:
        lines.insert(1, ("INVALID", state.problem))
    if state.loop_mounts:
        lines.append(("Mounted via loop", ", ".join(state.loop_mounts)))
    if state.raw_mounts:
        lines.append(("RAW DEVICE MOUNTED", ", ".join(state.raw_mounts)))
    return lines + figures


def capture_words(capture: str, figures: list[tuple[str, str]]) -> str:
    """One Capture line: the entry's capture as the table says it, with the daemon's word for
    it (taken out of `figures`, which would say "Capture" a second time)."""
    daemon = figures.pop(0)[1] if figures and figures[0][0] == "Capture" else ""
    if not capture:
        return daemon or "none: no loop is attached"
    if not daemon or daemon.startswith(capture):  # "not captured: <why>" says it all
        return daemon or capture
    return f"{capture}: {daemon}"


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


class BlockScreen(AcceptsIdentity, TaskScreen):
    NAME = "block"
    CSS_PATH = ["task.tcss", "block.tcss"]
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
        self._notes: dict = {}  # entries.picker_notes of the snapshot
        self._sync: tuple[str, str, str] | None = None  # (verb, device, target) while one runs

    def compose(self) -> ComposeResult:
        yield Header()
        yield RootBanner()
        yield Static("", id="load-error", classes="banner error")
        with Vertical(id="picker-box"):
            with Horizontal(id="picker-head"):
                yield Label("Block devices on this system (Enter or a adds)",
                            classes="section-title")
                yield Switch(False, id="show-excluded")
                yield Label(self._excluded_words(False), id="excluded-state")
            yield KeyedTable(DEVICE_COLUMNS, id="devices",
                             sort_key=lambda path: natural_key(path))
        with Vertical(id="entries-box"):
            yield Label("Replicated block devices (i or Enter: details)", classes="section-title")
            yield KeyedTable(ENTRY_COLUMNS, id="block-entries", zebra_stripes=True)
            yield Static("", id="block-empty", classes="notes")
            yield Static("", id="waiting")
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
        yield Footer(compact=True)

    @staticmethod
    def _excluded_words(on_: bool) -> Text:
        return switch_text(on_, "Swap / LVM", "shown, greyed", "hidden")

    def on_mount(self) -> None:
        super().on_mount()
        self.reload_on(self.app.mounts_signal, self.app.daemon_signal, self.app.block_signal,
                       self.app.config_signal)
        self.query_one("#devices").focus()

    def load(self):
        devices, snap = self.services.list_devices(include_excluded=True), self.services.status()
        return devices, snap, picker_notes(snap)

    def show(self, data) -> None:
        self._devices, self._snap, self._notes = data
        self._show_devices()
        self.query_one("#block-entries", KeyedTable).show_rows(
            {s.entry.device: entry_row(s) for s in self._snap.block})
        empty = self.query_one("#block-empty", Static)
        empty.update("No block devices are replicated yet: pick one above.")
        empty.display = not self._snap.block
        self.refresh_accept()

    def _show_devices(self) -> None:
        show_all = self.query_one("#show-excluded", Switch).value
        self.query_one("#devices", KeyedTable).show_rows(
            {d.path: device_row(d, picker_note(self._notes, d)) for d in self._devices
             if show_all or not d.excluded})

    @on(Switch.Changed, "#show-excluded")
    def _excluded_toggled(self, event: Switch.Changed) -> None:
        self.query_one("#excluded-state", Label).update(self._excluded_words(event.value))
        self._show_devices()

    def action_toggle_excluded(self) -> None:
        switch = self.query_one("#show-excluded", Switch)
        switch.value = not switch.value

    @on(KeyedTable.SelectionGone, "#devices")
    def _device_gone(self, event: KeyedTable.SelectionGone) -> None:
        now = selected_key(event.table)
        self._fell_on = now  # not chosen: the first Enter or a on it only says so
        self.notify(f"{event.key} went away (another program detached or removed it); the "
                    f"cursor is on {now or 'nothing'} now.", severity="warning",
                    title="Device gone", markup=False)

    @on(Button.Pressed)
    def _button(self, event: Button.Pressed) -> None:
        getattr(self, f"action_{event.button.id}")()

    @on(DataTable.RowSelected, "#devices")
    def _device_chosen(self) -> None:
        self.action_add()

    @on(DataTable.RowSelected, "#block-entries")
    def action_details(self) -> None:
        state = self._selected_state()
        if state is None:
            self.notify("Select a replicated device in the lower table first.",
                        severity="warning")
            return
        device = state.entry.device
        self.push_details(f"Block entry {shown(device)}", lambda: (
            s := self._snap.block_state(device)) and entry_details(s))

    def action_add(self) -> None:
        if self.app.needs_root("Adding a block device"):
            return
        from app.services.entries import device_refusal
        path = selected_key(self.query_one("#devices", DataTable)) or ""
        fell_on, self._fell_on = getattr(self, "_fell_on", None), None
        if path and path == fell_on:  # the key was meant for the device that went away
            self.notify(f"The device you chose went away; the cursor fell on {path}: press "
                        f"Enter again to add {path}.", severity="warning", title="Not added",
                        markup=False)
            return
        device = next((d for d in self._devices if d.path == path), None)
        refusal = device_refusal(device) if device is not None else None
        if refusal:
            self.notify(refusal, severity="error", title="Cannot be replicated", markup=False)
            return
        self.app.push_screen(AddBlockEntryDialog(path), self._added)

    def _added(self, result) -> None:
        if result is not None:
            self.notify(shown(result.message), title="Added", markup=False)
            for warning in result.details.get("warnings", ()):  # a remote target without room
                self.notify(shown(warning), title="Added, but", severity="warning", markup=False)
            self.reload()

    def action_remove(self) -> None:
        device = selected_key(self.query_one("#block-entries", DataTable))
        if device is None:
            self.notify("Select a replicated device in the lower table first.", severity="warning")
            return
        if self.app.needs_root("Removing a block device"):
            return
        state = self._snap.block_state(device) if self._snap is not None else None
        handed = state and handed_over_removal(device, state.entry.target, state)
        if handed:  # nothing to ask: the daemon would refuse it
            self.notify(handed, title=f"Remove {shown(device)}", severity="warning", markup=False)
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.run_action(f"Remove {shown(device)}",
                                lambda: self.services.replication.remove_block(device),
                                waiting=f"detaching {shown(device)}, then removing the entry",
                                subject=device)
        self.app.push_screen(ConfirmDialog(
            f"Detach and stop replicating {shown(device)}?\nA loop device that is still mounted "
            "is not detached, and the entry is then kept.", yes="Remove"), confirmed)

    def action_attach_all(self) -> None:
        replication = self.services.replication
        self.run_action("Attach all", lambda: replication.attach_all(),
                        waiting="attaching every entry (through the daemon's capture when it "
                        "runs: a device with a target is compared with it first)",
                        force=ForceOffer("Force: attach anyway", FORCED_ATTACH,
                                         lambda: replication.attach_all(force=True),
                                         "Attach all (forced)"))

    def action_detach_all(self) -> None:
        """Asked first: it ends the capture of every attached entry at once; with no loop
        attached there is nothing to ask."""
        if self.app.needs_root("Detach all") or self._refuse_while_syncing():
            return
        say = self.waits_said("Detach all")
        self.ask_first("Detach all", self._detach_all_question(),
                       "Nothing to detach: no block entry is attached to a loop device.",
                       lambda: self.run_action(
                           "Detach all", lambda: self.services.replication.detach_all(say=say),
                           waiting="detaching every entry's loop (a capture drains its journal "
                           "to the target first)"))

    def _detach_all_question(self) -> str | None:
        """What Detach all stops, entry by entry; None when no entry has a loop."""
        after = ("From then on, their writes are neither captured nor replicated until Attach "
                 "all, and applications no longer have their /dev/loopN. A loop still mounted "
                 "or open is not forced: it goes at its last close (detach pending) and keeps "
                 "its capture until then. Nothing is unmounted.")
        if self._snap is None:  # not read yet: ask without the list
            return f"Detach the loop devices of every block entry?\n{after}"
        going = [s for s in self._snap.block if s.loops]
        captured = sum(1 for s in going if s.capture in ("captured", "no daemon"))
        lines = [f"  {shown(s.entry.device)} → {shown(s.entry.target or 'no target')}: "
                 f"{', '.join(lp.device for lp in s.loops)}, {s.capture or 'not captured'}"
                 + (f", mounted on {', '.join(s.loop_mounts)}" if s.loop_mounts else "")
                 for s in going]
        # Detach all ends these too: captures whose entry was removed
        orphans = [o for o in self._snap.orphans if o.kind == "block"]
        lines += [f"  {shown(o.key)}: {o.loop or 'its loop'}, captured (orphaned: no longer "
                  "configured)" for o in orphans]
        if not lines:
            return None
        captured += len(orphans)
        how = (f"{captured} of them captured now" if len(lines) > 1 else
               "captured now" if captured else "not captured")
        return (f"Detach all: {counted(len(lines), 'block entry is', 'block entries are')} "
                f"attached, {how}; "
                f"{'its loop is' if len(lines) == 1 else 'their loops are'} detached.\n"
                + "\n".join(listed(lines)) + f"\n{after}")

    def run_action(self, title, call, **kw) -> None:
        if self._refuse_while_syncing():
            return
        super().run_action(title, call, **kw)

    def _refuse_while_syncing(self) -> bool:
        if self._sync is None:
            return False
        verb, device, _ = self._sync
        self.notify(f"{verb.capitalize()} of {shown(device)} is still running: wait until it "
                    "is done.", severity="warning", title="Busy", markup=False)
        return True

    # -- mirror / verify through the daemon -------------------------------------------------

    def _selected_state(self):
        device = selected_key(self.query_one("#block-entries", DataTable))
        if device is None or self._snap is None:
            return None
        return self._snap.block_state(device)

    def accept_subject(self):
        state = self._selected_state()
        return None if state is None else ("block", state)

    def action_set_target(self) -> None:
        state = self._selected_state()
        if state is None:
            self.notify("Select a replicated device in the lower table first.",
                        severity="warning")
            return
        self.ask_target("block", state.entry.device, state.entry.target)

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
            self.notify(f"{shown(entry.device)} has no target to {verb}: its writes are captured "
                        "only. Give it one with e (Target), while it is detached.",
                        severity="warning", title="No target", markup=False)
            return
        if verb == "verify":
            self._run_sync(verb, entry.device, entry.target)
            return
        window = f"from offset {exact_size(entry.offset) if entry.offset else 0}" + (
            f", {exact_size(entry.sizelimit)}" if entry.sizelimit else "")
        going = (f"\nWrites through {state.loop} go on meanwhile." if state.capture == "captured"
                 else "")

        def confirmed(yes: bool | None) -> None:
            if yes:
                self._run_sync(verb, entry.device, entry.target)
        self.app.push_screen(ConfirmDialog(
            f"Make {shown(entry.target)} equal to {shown(entry.device)} ({window})?\nThe two are "
            f"compared 1 MiB at a time by hashes; blocks that differ are copied over the "
            f"target's.{going}", yes="Mirror"), confirmed)

    def _run_sync(self, verb: str, device: str, target: str) -> None:
        if self._refuse_while_syncing():  # a second confirm dialog answered late
            return
        self._sync = (verb, device, target)
        self.query_one("#sync-progress", ProgressBar).update(total=None, progress=0)
        self._show_sync_label()
        self.query_one("#sync-box").display = True
        self._sync_worker(self.app, verb, device)

    def _show_sync_label(self, done: int | None = None, total: int | None = None) -> None:
        verb, device, target = self._sync
        head = (f"Mirroring {shown(device)} to {shown(target)}" if verb == "mirror"
                else f"Verifying {shown(device)} against {shown(target)}")
        tail = f": {human_size(done)} of {human_size(total)}" if total else " …"
        self.query_one("#sync-label", Label).update(Text(head + tail))

    @work(thread=True, exit_on_error=False, group="sync",
          description="mirror or verify a block entry through the daemon")
    def _sync_worker(self, app, verb: str, device: str) -> None:
        def progress(p: dict) -> None:  # from this thread; never blocks on the UI
            self.post_message(self.SyncProgress(dict(p)))

        replication = app.services.replication  # (self.app is not found once the screen is left)
        notes: list[str] = []
        try:
            if verb == "mirror":
                results = list(replication.block_mirror(device, progress=progress))
            else:
                results, ranges = replication.block_verify(device, progress=progress)
                results, notes = list(results), range_lines(ranges)
                if ranges:
                    notes.append(f"Press {actions.key_of(self.NAME, 'mirror')} (Mirror) to copy "
                                 "the blocks that differ over the target's.")
        except MirrorError as exc:
            results = [Result.from_error(verb, device, exc)]
        except Exception as exc:  # a bug below us must not leave the progress bar up forever
            results = [Result(verb, device, Outcome.FAILED, f"unexpected error: {exc!r}")]
        if any(r.failed for r in results) and not app.services.daemon_running():
            notes.append("Mirror and verify go through the daemon: the Daemon screen (5 in the "
                         "main menu) starts it.")
        title = f"{verb.capitalize()} {shown(device)}"
        self.finish_from_thread(app, title, results, lambda: self.post_message(
            self.SyncDone(title, results, notes)))

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
