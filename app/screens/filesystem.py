"""File system replication: the configured directories, their live mirrorfs state, the seed's
four actions (add, remove, mount all, unmount all), and mirror / verify of one entry."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Button, DataTable, Footer, Header, Static

from app.screens import actions
from app.screens.accept import AcceptsIdentity, state_label
from app.screens.banner import RootBanner
from app.screens.base import (Col, ForceOffer, KeyedTable, TaskScreen, counted, elide,
                              handed_over_removal, listed, selected_key, state_text)
from app.screens.dialogs import AddFsEntryDialog, ConfirmDialog
from app.services.entries import describe_difference
from app.services.events import Interest, MountsChanged
from app.services.results import Result
from app.services.status import LAZY, replication_lines
from app.services.units import shown

COLUMNS = (Col("path", "Path", 9, 48, path=True), Col("state", "State", 8, 30),
           Col("target", "Target", 5, 32, path=True), Col("atime", "Access times", 3))
LAZY_UNMOUNT = (
    "Unmount lazily (MNT_DETACH) where files are still open?\n\nThe path is detached now: new "
    "opens see the directory below, not mirrorfs, and their changes are NOT replicated. Files "
    "already open stay open through mirrorfs and their changes are still captured until they "
    "close. Prefer stopping the applications that hold them.")
MAX_DIFFERENCES_SHOWN = 100


def fs_row(state) -> tuple:
    entry = state.entry
    return (shown(entry.path), state_text(state_label("fs", state), state.problem),
            elide(entry.target, 32) if entry.target else "—",
            "replicated" if entry.replicate_atime else "off")


def fs_details(state) -> list[tuple[str, str]]:
    """Every field of an entry and its live state, for the detail view."""
    entry, figures = state.entry, state.figures
    lines = [("Path", entry.path), ("State", state.state + (f" ({state.other_fstype} mounted "
                                                              "here)" if state.other_fstype else "")),
             ("Target", entry.target or "none (captured only)"),
             ("Access times", "replicated" if entry.replicate_atime else "not replicated")]
    if state.problem:
        lines.insert(1, ("INVALID", state.problem))
    return lines + replication_lines(figures)


def difference_lines(diffs: list[dict]) -> list[str]:
    lines = [describe_difference(d) for d in diffs[:MAX_DIFFERENCES_SHOWN]]
    if len(diffs) > MAX_DIFFERENCES_SHOWN:
        lines.append(f"… and {len(diffs) - MAX_DIFFERENCES_SHOWN} more differences")
    return lines


class FilesystemScreen(AcceptsIdentity, TaskScreen):
    NAME = "filesystem"
    CSS_PATH = ["task.tcss", "filesystem.tcss"]
    busy_target = "#fs-entries"

    def __init__(self) -> None:
        super().__init__()
        self._snap = None
        self._interest: Interest | None = None  # which mount events can change the rows

    def compose(self) -> ComposeResult:
        yield Header()
        yield RootBanner()
        yield Static("", id="load-error", classes="banner error")
        yield Static("File system replication: directories captured by mirrorfs",
                     classes="section-title")
        yield KeyedTable(COLUMNS, id="fs-entries", zebra_stripes=True)
        yield Static("", id="fs-empty", classes="notes")
        yield Static("", id="waiting")
        yield Static("Stop applications before changing entries and start them after Mount all. "
                     "NFS/Samba go above mirrorfs. Never /.", classes="notes")
        with Horizontal(classes="buttons"):
            yield Button("Add", id="add", compact=True)
            yield Button("Remove", id="remove", compact=True)
            yield Button("Mount all", id="mount_all", compact=True)
            yield Button("Unmount all", id="unmount_all", compact=True)
            yield Button("Mirror", id="mirror", compact=True)
            yield Button("Verify", id="verify", compact=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        super().on_mount()
        self.reload_on(self.app.daemon_signal, self.app.config_signal)
        self.app.mounts_signal.subscribe(self, self._mounts_changed)
        self.query_one("#fs-entries").focus()

    def load(self):
        snap = self.services.status(scan_writers=False)  # no block rows shown here
        self._interest = Interest.of(snap)
        return snap

    def show(self, snap) -> None:
        self._snap = snap
        self.query_one("#fs-entries", KeyedTable).show_rows(
            {s.entry.path: fs_row(s) for s in snap.filesystem})
        empty = self.query_one("#fs-empty", Static)
        empty.update("No directories are replicated yet: press a to add one.")
        empty.display = not snap.filesystem
        self.refresh_accept()

    @on(Button.Pressed)
    def _button(self, event: Button.Pressed) -> None:
        getattr(self, f"action_{event.button.id}")()

    def action_add(self) -> None:
        if self.app.needs_root("Adding a directory"):
            return
        self.app.push_screen(AddFsEntryDialog(self.services.browse_root), self._added)

    def _added(self, result: Result | None) -> None:
        if result is not None:
            self.notify(shown(result.message), title="Added", markup=False)
            self.reload()

    def accept_subject(self):
        state = self._snap and self._snap.fs_state(selected_key(self.query_one("#fs-entries",
                                                                               DataTable)))
        return None if state is None else ("fs", state)

    def _selected_state(self):
        path = selected_key(self.query_one("#fs-entries", DataTable))
        if path is None or self._snap is None:
            self.notify("No entry is selected.", severity="warning")
            return None
        return self._snap.fs_state(path)

    @on(DataTable.RowSelected, "#fs-entries")
    def action_details(self) -> None:
        state = self._selected_state()
        if state is not None:
            path = state.entry.path
            self.push_details(f"File system entry {shown(path)}", lambda: (
                s := self._snap.fs_state(path)) and fs_details(s))

    def action_remove(self) -> None:
        state = self._selected_state()
        if state is None or self.app.needs_root("Removing a directory"):
            return
        path = state.entry.path
        replication = self.services.replication
        handed = handed_over_removal(path, state.entry.target, state)
        if handed:  # nothing to ask: the daemon would refuse it
            self.notify(handed, title=f"Remove {shown(path)}", severity="warning", markup=False)
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.run_action(
                    f"Remove {shown(path)}", lambda: replication.remove_filesystem(path),
                    waiting=f"removing {shown(path)}: the daemon drains and unmounts it first",
                    subject=path,
                    force=ForceOffer("Force: lazy unmount", LAZY_UNMOUNT,
                                     lambda: replication.remove_filesystem(path, force=True),
                                     f"Remove {shown(path)} (lazy unmount)", path))
        self.app.push_screen(ConfirmDialog(
            f"Stop replicating {shown(path)}?\nIf mirrorfs is mounted there it is unmounted "
            "first; stop the applications using it before you do this.", yes="Remove"),
            confirmed)

    def action_toggle_atime(self) -> None:
        state = self._selected_state()
        if state is None:
            return
        from app.services.entries import toggle_atime
        path = state.entry.path
        self.run_action(f"Access times for {shown(path)}",
                        lambda: toggle_atime(self.services.store, path), subject=path)

    def action_set_target(self) -> None:
        state = self._selected_state()
        if state is not None:
            self.ask_target("fs", state.entry.path, state.entry.target)

    def action_mount_all(self) -> None:
        self.run_action("Mount all", lambda: self.services.replication.mount_all(),
                        waiting=self._waiting_text("mount"))

    def action_unmount_all(self) -> None:
        """Asked first: it ends the capture of every directory mounted (nothing else does that
        to all entries at once); with none mounted there is nothing to ask."""
        if self.app.needs_root("Unmount all"):
            return
        replication = self.services.replication
        say = self.waits_said("Unmount all")
        self.ask_first("Unmount all", self._unmount_all_question(),
                       "Nothing to unmount: no directory is mounted as mirrorfs.",
                       lambda: self.run_action(
                           "Unmount all", lambda: replication.unmount_all(say=say),
                           waiting=self._waiting_text("unmount"),
                           force=ForceOffer("Force: lazy unmount", LAZY_UNMOUNT,
                                            lambda: replication.unmount_all(force=True, say=say),
                                            "Unmount all (lazy where busy)")))

    def _unmount_all_question(self) -> str | None:
        """What Unmount all stops, entry by entry; None when no directory is captured."""
        after = ("From then on, changes made there are neither captured nor replicated to "
                 "their targets until Mount all (which compares each directory with its target "
                 "and copies what differs). Stop the applications that write there first.")
        if self._snap is None:  # not read yet: ask without the list
            return f"Unmount mirrorfs from every directory?\n{after}"
        # a mirrorfs mount is its capture (a lazily unmounted one still serves open files)
        going = [s for s in self._snap.filesystem
                 if s.state in ("mounted", LAZY) or (s.engine and s.engine.captured)]
        lines = [f"  {shown(s.entry.path)} → {shown(s.entry.target or 'no target')}"
                 + ("" if s.state == "mounted" else f" ({s.state})") for s in going]
        # Unmount all ends these too: captures whose entry was removed
        lines += [f"  {shown(o.key)} (orphaned: no longer configured)"
                  for o in self._snap.orphans if o.kind == "fs"]
        if not lines:
            return None
        return (f"Unmount all: {counted(len(lines), 'directory is', 'directories are')} "
                f"captured now; {'its' if len(lines) == 1 else 'their'} capture ends.\n"
                + "\n".join(listed(lines)) + f"\n{after}")

    _pending: tuple[str, set[str]] | None = None  # (verb, paths not done) while Mount/Unmount all runs

    def _waiting_text(self, verb: str) -> str:
        """What Mount all / Unmount all waits for: the daemon, entry by entry; the line is
        updated on each mount-table change."""
        paths = {s.entry.path for s in (self._snap.filesystem if self._snap else ())
                 if (s.state == "mounted") == (verb == "unmount")}
        self._pending = (verb, paths)
        return self._pending_words()

    def _pending_words(self) -> str:
        verb, paths = self._pending
        if not paths:
            return f"{verb} all: waiting for the daemon's answer"
        how = ("drains each entry's journal to its target, then unmounts it" if verb == "unmount"
               else "mounts mirrorfs on each entry")
        return (f"{verb} all: the daemon {how}; still to do: "
                + ", ".join(shown(p) for p in sorted(paths)))

    def _mounts_changed(self, diff) -> None:
        if self._interest is None or self._interest.wants(MountsChanged(diff)):
            self.reload()  # (not for another tool's mounts: events.Interest)
        if self._pending is None:
            return
        verb, paths = self._pending
        changed = {m.mount_point for m in (diff.removed if verb == "unmount" else diff.added)}
        if paths & changed:
            paths -= changed
            self.set_waiting(self._pending_words())

    def _on_action_done(self, event) -> None:
        self._pending = None
        super()._on_action_done(event)

    # -- mirror / verify through the daemon ---------------------------------------------

    def _sync_target(self, verb: str):
        state = self._selected_state()
        if state is None:
            return None
        if not state.entry.target:
            self.notify(f"{shown(state.entry.path)} has no target to {verb}: its changes are "
                        "captured only. Give it one with e (Target).",
                        severity="warning", title="No target", markup=False)
            return None
        return state.entry

    def action_mirror(self) -> None:
        entry = self._sync_target("mirror")
        if entry is None or self.app.needs_root("Mirroring a directory"):
            return
        from app.services.entries import fs_mirror

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.run_action(f"Mirror {shown(entry.path)}",
                                lambda: fs_mirror(self.services.replication, entry.path),
                                waiting=f"copying {shown(entry.path)} to {shown(entry.target)}: "
                                "files that differ are copied, files the source no longer has "
                                "are deleted on the target", subject=entry.path)
        self.app.push_screen(ConfirmDialog(
            f"Make {shown(entry.target)} equal to {shown(entry.path)}?\nFiles that differ are "
            "copied over the target's, and files the source does not have are deleted from the "
            "target.", yes="Mirror"), confirmed)

    def action_verify(self) -> None:
        entry = self._sync_target("verify")
        if entry is None or self.app.needs_root("Verifying a directory"):
            return
        from app.services.entries import fs_verify
        key = actions.key_of(self.NAME, "mirror")

        def verify():
            results, diffs = fs_verify(self.services.replication, entry.path)
            notes = difference_lines(diffs)
            if diffs:
                notes.append(f"Press {key} (Mirror) to make the target equal to the source.")
            if any(r.failed for r in results) and not self.services.daemon_running():
                notes.append("Verify goes through the daemon: the Daemon screen (5 in the "
                             "main menu) starts it.")
            return results, notes

        self.run_action(f"Verify {shown(entry.path)}", verify,
                        waiting=f"comparing {shown(entry.path)} with {shown(entry.target)} "
                        "(every file is hashed)", subject=entry.path)
