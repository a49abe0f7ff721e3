"""The replication engine: is it running (pid, uptime, config, socket, state directory, log),
and start / stop / restart it. Follows a daemon started or stopped elsewhere (its socket
appearing, its watch connection ending) without polling."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Footer, Header, Label, Static

from app.screens.banner import RootBanner
from app.screens.base import TaskScreen
from app.screens.dialogs import ConfirmDialog
from app.services.units import shown

ABOUT = ("The daemon mounts mirrorfs on the file system entries, captures writes to the block "
         "entries' loop devices, and applies the journal to the targets. Start it before the "
         "applications (and before NFS/Samba) so no change is missed.")


STOP_QUESTION = (
    "Stop the replication daemon?\n\nEntries nothing is using stop being captured: mirrorfs is "
    "unmounted from those directories and those block devices' loops are detached. What is "
    "written there before the daemon starts again is not replicated until then (its next start "
    "catches up by comparing with the targets). Captures in use keep running for the next "
    "daemon.")


def info_text(info, now: float) -> Table:
    """Label and value in two columns: a long path wraps under its value, not its label."""
    from app.services.daemonctl import info_lines
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    mark, style = ("● ", "bold green") if info.running and not info.problem else ("○ ", "yellow")
    for i, (label, value) in enumerate(info_lines(info, now)):
        grid.add_row(f"{label}:", Text((mark if i == 0 else "") + shown(value),
                                       style=style if i == 0 else ""))
    if info.problem:
        grid.add_row("problem:", Text(shown(info.problem), style="bold red"))
    return grid


class DaemonScreen(TaskScreen):
    NAME = "daemon"
    CSS_PATH = ["task.tcss", "daemon.tcss"]
    busy_target = "#daemon-state"
    _info = None  # what describe_daemon said last

    def compose(self) -> ComposeResult:
        yield Header()
        yield RootBanner()
        yield Static("", id="load-error", classes="banner error")
        with Vertical(id="daemon-box"):
            yield Label("Replication engine (daemon)", classes="section-title")
            yield Static("checking…", id="daemon-state")
            yield Static("", id="waiting")
            yield Static(ABOUT, classes="notes")
            with Horizontal(classes="buttons"):
                yield Button("Start", id="start", compact=True)
                yield Button("Stop", id="stop", compact=True)
                yield Button("Restart", id="restart", compact=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        super().on_mount()
        self.reload_on(self.app.daemon_signal)
        self.query_one("#start").focus()
        self.set_interval(1.0, self._tick)

    def load(self):
        return self.services.describe_daemon()

    def show(self, info) -> None:
        self._info = info
        self._tick()

    def _tick(self) -> None:
        """Also once a second: "up N" is counted here from what was read, not read again."""
        if self._info is not None:
            self.query_one("#daemon-state", Static).update(info_text(self._info, self.services.clock()))

    @on(Button.Pressed)
    def _button(self, event: Button.Pressed) -> None:
        getattr(self, f"action_{event.button.id}")()

    def _control(self, action: str, title: str, waiting: str) -> None:
        say = self.waits_said("Stopping the daemon")  # what a stop waits for

        def call():
            try:
                return self.services.daemon_action(action, **({"say": say} if action == "stop"
                                                              else {}))
            finally:
                self.app.call_from_thread(self.app.daemon_changed_here)
        self.run_action(title, call, waiting=waiting, subject="daemon")  # as its results

    def action_start(self) -> None:
        self._control("start", "Start the daemon", "starting the daemon: waiting for it to "
                      "answer on its socket (up to 10 s)")

    def action_stop(self) -> None:
        """One key ends replication: asked first while the daemon runs."""
        def stop(confirmed: bool | None = True) -> None:
            if confirmed:
                self._control("stop", "Stop the daemon", "stopping the daemon: it drains every "
                              "entry to its target and unmounts it first (what it waits for "
                              "is said as it waits)")
        if self._info is not None and not self._info.running:
            stop()  # nothing to lose: it says so
            return
        self.app.push_screen(ConfirmDialog(STOP_QUESTION, yes="Stop"), stop)

    def action_restart(self) -> None:
        # (the old daemon leaves every capture to the new one, under systemd too: nothing is
        # unmounted; a bare `systemctl restart` stops it as Stop does)
        self._control("restart", "Restart the daemon", "restarting the daemon (up to 20 s)")
