"""File system replication: the configured directories, their live mirrorfs state, and the
seed's four actions (add, remove, mount all, unmount all)."""

from __future__ import annotations

import errno

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, DataTable, Footer, Header, Static

from app.screens.base import RootBanner, TaskScreen, selected_key, state_text, sync_table
from app.screens.dialogs import AddFsEntryDialog, ConfirmDialog
from app.services.results import Outcome, Result

COLUMNS = (("Path", "path"), ("Access times", "atime"), ("Target", "target"), ("State", "state"))
NO_ENGINE = ("the replication engine (daemon) is not installed here, so nothing can mount "
             "mirrorfs; the entries are kept and mounted when it runs")


def fs_row(state) -> tuple:
    entry = state.entry
    label = state.state
    if state.other_fstype:
        label += f" ({state.other_fstype} here)"
    return (entry.path, "replicated" if entry.replicate_atime else "off",
            entry.target or "—", state_text(label))


class FilesystemScreen(TaskScreen):
    CSS_PATH = "filesystem.tcss"
    BINDINGS = TaskScreen.BINDINGS + [
        Binding("a", "add", "Add"),
        Binding("r,delete", "remove", "Remove"),
        Binding("t", "toggle_atime", "Atime on/off"),
        Binding("m", "mount_all", "Mount all"),
        Binding("u", "unmount_all", "Unmount all"),
    ]
    busy_target = "#fs-entries"

    def compose(self) -> ComposeResult:
        yield Header()
        yield RootBanner()
        yield Static("", id="load-error", classes="banner error")
        yield Static("File system replication: directories captured by mirrorfs",
                     classes="section-title")
        table = DataTable(id="fs-entries", cursor_type="row", zebra_stripes=True)
        for label, key in COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Static("", id="fs-empty", classes="notes")
        yield Static("Stop applications before changing entries and start them after Mount all. "
                     "NFS/Samba go above mirrorfs. Never /.", classes="notes")
        with Horizontal(classes="buttons"):
            yield Button("Add", id="add", compact=True)
            yield Button("Remove", id="remove", compact=True)
            yield Button("Mount all", id="mount_all", compact=True)
            yield Button("Unmount all", id="unmount_all", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        super().on_mount()
        self.reload_on(self.app.mounts_signal, self.app.daemon_signal)
        self.query_one("#fs-entries").focus()

    def load(self):
        return self.services.status()

    def show(self, snap) -> None:
        sync_table(self.query_one("#fs-entries", DataTable),
                   {s.entry.path: fs_row(s) for s in snap.filesystem})
        self.query_one("#fs-empty", Static).update(
            "" if snap.filesystem else "No directories are replicated yet: press a to add one.")

    @on(Button.Pressed)
    def _button(self, event: Button.Pressed) -> None:
        getattr(self, f"action_{event.button.id}")()

    def action_add(self) -> None:
        if self.app.needs_root("Adding a directory"):
            return
        self.app.push_screen(AddFsEntryDialog(self.services.browse_root), self._added)

    def _added(self, result: Result | None) -> None:
        if result is not None:
            self.notify(result.message, title="Added")
            self.reload()

    def _selected(self) -> str | None:
        path = selected_key(self.query_one("#fs-entries", DataTable))
        if path is None:
            self.notify("No entry is selected.", severity="warning")
        return path

    def action_remove(self) -> None:
        path = self._selected()
        if path is None or self.app.needs_root("Removing a directory"):
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.run_action(f"Remove {path}",
                                lambda: self.services.replication.remove_filesystem(path))
        self.app.push_screen(ConfirmDialog(
            f"Stop replicating {path}?\nIf mirrorfs is mounted there it is unmounted first; "
            "stop the applications using it before you do this.", yes="Remove"), confirmed)

    def action_toggle_atime(self) -> None:
        path = self._selected()
        if path is None:
            return

        def toggle() -> Result:
            from dataclasses import replace
            store = self.services.store
            entry = next(e for e in store.load().filesystem if e.path == path)
            new = store.set_filesystem(replace(entry, replicate_atime=not entry.replicate_atime))
            word = "replicated" if new.replicate_atime else "not replicated"
            return Result("edit", path, Outcome.OK, f"access times are now {word} for {path} "
                          "(takes effect at the next mount)")
        self.run_action(f"Access times for {path}", toggle)

    def _engine(self, action: str, call) -> None:
        if self.services.control is None:
            self.run_action(f"{action.capitalize()} all", lambda: [Result(
                action, "all file-system entries", Outcome.FAILED, NO_ENGINE, errno.ENOSYS)])
        else:
            self.run_action(f"{action.capitalize()} all", call)

    def action_mount_all(self) -> None:
        self._engine("mount", lambda: self.services.replication.mount_all())

    def action_unmount_all(self) -> None:
        self._engine("unmount", lambda: self.services.replication.unmount_all())
