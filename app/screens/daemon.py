"""The replication engine: is it running, and start / stop / restart it."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Footer, Header, Label, Static

from app.screens.base import RootBanner, TaskScreen

ABOUT = ("The daemon mounts mirrorfs on the file system entries, captures writes to the block "
         "entries' loop devices, and applies the journal to the targets. Start it before the "
         "applications (and before NFS/Samba) so no change is missed.")


class DaemonScreen(TaskScreen):
    CSS_PATH = "daemon.tcss"
    BINDINGS = TaskScreen.BINDINGS + [
        Binding("s", "start", "Start"),
        Binding("p", "stop", "Stop"),
        Binding("r", "restart", "Restart"),
    ]
    busy_target = "#daemon-state"

    def compose(self) -> ComposeResult:
        yield Header()
        yield RootBanner()
        yield Static("", id="load-error", classes="banner error")
        with Vertical(id="daemon-box"):
            yield Label("Replication engine (daemon)", classes="section-title")
            yield Static("checking…", id="daemon-state")
            yield Static(ABOUT, classes="notes")
            with Horizontal(classes="buttons"):
                yield Button("Start", id="start", compact=True)
                yield Button("Stop", id="stop", compact=True)
                yield Button("Restart", id="restart", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#start").focus()

    def load(self):
        services = self.services
        if services.control is None:
            return None, "the replication engine is not installed here"
        if not services.daemon_running():
            return False, f"not running (socket {getattr(services.control, 'socket_path', '?')})"
        try:
            return True, services.control.request("status")
        except Exception as exc:  # it went away between the two calls
            return False, str(exc)

    def show(self, data) -> None:
        running, detail = data
        if running:
            text = Text("● running\n", style="bold green")
            if isinstance(detail, dict):
                for key, value in detail.items():
                    if not isinstance(value, (list, dict)):
                        text.append(f"  {key}: {value}\n")
            text.rstrip()
        else:
            text = Text.assemble(("○ " + str(detail), "yellow"))
        self.query_one("#daemon-state", Static).update(text)

    @on(Button.Pressed)
    def _button(self, event: Button.Pressed) -> None:
        getattr(self, f"action_{event.button.id}")()

    def action_start(self) -> None:
        self.run_action("Start the daemon", lambda: self.app.daemon_command("start"))

    def action_stop(self) -> None:
        self.run_action("Stop the daemon", lambda: self.app.daemon_command("stop"))

    def action_restart(self) -> None:
        self.run_action("Restart the daemon", lambda: self.app.daemon_command("restart"))
