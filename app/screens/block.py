"""Block device replication: the device picker and the configured entries, with the seed's
actions (list devices, add, remove/detach, attach all, detach all)."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, DataTable, Footer, Header, Label, Static, Switch

from app.screens.base import RootBanner, TaskScreen, selected_key, state_text, sync_table
from app.screens.dialogs import AddBlockEntryDialog, ConfirmDialog
from app.services.units import human_size

DEVICE_COLUMNS = (("Device", "path"), ("Size", "size"), ("Type", "type"), ("FS", "fstype"),
                  ("Mounted on", "mounts"), ("In use / excluded", "notes"))
ENTRY_COLUMNS = (("Device", "device"), ("Loop wanted", "wanted"), ("Loop now", "actual"),
                 ("Offset", "offset"), ("Size limit", "sizelimit"), ("RO", "ro"), ("State", "state"))


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
    return (e.device, e.loop or "first free", state.loop or "—",
            human_size(e.offset) if e.offset else "0",
            human_size(e.sizelimit) if e.sizelimit else "whole", "yes" if e.read_only else "",
            state_text(state.state))


class BlockScreen(TaskScreen):
    CSS_PATH = "block.tcss"
    BINDINGS = TaskScreen.BINDINGS + [
        Binding("a", "add", "Add"),
        Binding("r,delete", "remove", "Remove/detach"),
        Binding("t", "attach_all", "Attach all"),
        Binding("d", "detach_all", "Detach all"),
        Binding("x", "toggle_excluded", "Show excluded"),
    ]
    busy_target = "#block-entries"

    def __init__(self) -> None:
        super().__init__()
        self._devices: list = []
        self._snap = None

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
        yield Static("Use the loop device, never the device itself; mount it from a script after "
                     "the daemon, not from /etc/fstab.", classes="notes")
        with Horizontal(classes="buttons"):
            yield Button("Add", id="add", compact=True)
            yield Button("Remove/detach", id="remove", compact=True)
            yield Button("Attach all", id="attach_all", compact=True)
            yield Button("Detach all", id="detach_all", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        super().on_mount()
        self.app.mounts_signal.subscribe(self, lambda _diff: self.reload())
        self.app.block_signal.subscribe(self, lambda _event: self.reload())
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
