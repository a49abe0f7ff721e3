"""Edit a remote target (e on Targets): its settings as `mirrorsetup target set` changes them,
filled in with what the file says now; its host and root shown, not changed (its replicas are
there: remove and add it again)."""

from __future__ import annotations

from dataclasses import replace

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from app.screens.dialogs import labelled
from app.services.units import shown

# the inputs' ids: TargetHost's own names (targets.SETTABLE)
FIELDS = ("port", "user", "identity", "known_hosts", "bandwidth", "resync_bandwidth", "compression")


class EditTargetDialog(ModalScreen["dict | None"]):
    """Dismissed with the settings changed ({name: new value}, as `target set` takes them;
    {} when none is), or None (Cancel)."""

    CSS_PATH = "dialogs.tcss"
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, host) -> None:
        super().__init__()
        self.host = host  # the TargetHost as the file says it now

    def compose(self) -> ComposeResult:
        h = self.host
        with Vertical(classes="dialog wide", id="edit-target"):
            yield Label(Text(f"Edit the remote target {shown(h.name)}", style="bold"))
            yield Static(Text.assemble(("Host ", "dim"), shown(h.host), ("   Root ", "dim"),
                                       shown(h.root)), id="fixed")
            yield labelled(("Port", Input(id="port", compact=True)),
                           ("user", Input(placeholder="ssh's default", id="user", compact=True)))
            yield labelled(("Key", Input(id="identity", compact=True)))
            yield labelled(("Pins", Input(placeholder="known_hosts next to the configuration",
                                          id="known_hosts", compact=True)))
            yield labelled(("Rate", Input(placeholder="no cap", id="bandwidth", compact=True)),
                           ("resync", Input(placeholder="no cap", id="resync_bandwidth",
                                            compact=True)),
                           ("compression", Input(placeholder="zstd or none", id="compression",
                                                 compact=True)))
            yield Static("", id="problem")
            yield Static("Host and root are where the replicas are: not changed here (remove "
                         "the target and add it again). The daemon's running captures take the "
                         "new settings at once.", classes="notes")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save", id="save", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        for field in FIELDS:
            value = getattr(self.host, field)
            self.query_one(f"#{field}", Input).value = "" if value is None else str(value)
        self.query_one("#port").focus()

    def _changes(self) -> dict:
        """The fields that differ from the file, as `target set` takes them (an empty rate or
        user: none)."""
        out = {}
        for field in FIELDS:
            text = self.query_one(f"#{field}", Input).value.strip()
            value = (int(text) if text.isdigit() else text) if field == "port" else text or None
            if value != getattr(self.host, field):
                out[field] = value
        return out

    def _problem(self, changes: dict) -> str | None:
        """Every problem of the values typed, by the rules `target set` checks them with."""
        from app.services.config import target_errors  # (no file is read here: Save's
        # worker checks the key and known_hosts files, as `target set` does)
        if "port" in changes and not isinstance(changes["port"], int):
            return f"port {changes['port']!r} is not a port number"
        if not changes.get("compression", "zstd"):
            return "compression is zstd or none"
        emptied = [f for f in ("identity", "known_hosts") if f in changes and changes[f] is None]
        if emptied:  # (as `target set` takes them: a file, not none)
            return f"{' and '.join(emptied)} {'are files' if len(emptied) > 1 else 'is a file'}"
        errors = target_errors(replace(self.host, **changes))
        return "; ".join(str(e) for e in errors) or None

    @on(Input.Changed)
    def _typed(self) -> None:
        changes = self._changes()
        problem = self._problem(changes)
        said = self.query_one("#problem", Static)
        if problem:
            said.update(Text("✘ " + problem, style="bold red"))
        elif changes:
            said.update(Text("✔ changes " + ", ".join(changes), style="green"))
        else:
            said.update("")

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)
    def action_save(self) -> None:
        changes = self._changes()
        problem = self._problem(changes)
        if problem:
            self.query_one("#problem", Static).update(Text("✘ " + problem, style="bold red"))
            return
        self.dismiss(changes)  # nothing changed: `target set` says "unchanged"

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
