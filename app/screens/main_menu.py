"""The setup tasks, numbered as the old DTSetup menu: arrows + Enter, 1–6, or a click."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, OptionList, Static
from textual.widgets.option_list import Option

from app.screens.base import RootBanner

# (key, screen, label, hint)
MENU = [
    ("1", "filesystem", "Configure file system replication",
     "directories captured by mirrorfs; add, remove, mount/unmount all"),
    ("2", "block", "Configure block device replication",
     "devices used through /dev/loopN; add, remove, attach/detach all"),
    ("3", "manual", "Manual replication (deprecated)",
     "attach or detach a loop now; not persisted across restarts"),
    ("4", "dashboard", "Status dashboard", "live mounts, loops, warnings, events and rates"),
    ("5", "daemon", "Daemon", "start, stop or restart the replication engine"),
    ("6", "help", "Help", "keys, and what to know before replicating"),
]


class MainMenuScreen(Screen):
    CSS_PATH = "main_menu.tcss"
    BINDINGS = [
        Binding("escape", "app.back", "Quit"),
        Binding("q", "app.back", "Quit", show=False),
        *[Binding(key, f"choose('{name}')", label, show=False) for key, name, label, _ in MENU],
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield RootBanner()
        with Vertical(id="menu-box"):
            yield Static(Text("Setup tasks", style="bold"), id="menu-title")
            yield OptionList(*[
                Option(Text.assemble((f" {key}  ", "bold"), label, "\n", (f"    {hint}", "dim")), id=name)
                for key, name, label, hint in MENU], id="menu")
            yield Static("↑↓ Enter or 1–6 to choose · q / Esc back and quit · ctrl+p commands",
                         id="menu-keys")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#menu").focus()

    @on(OptionList.OptionSelected, "#menu")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.action_choose(event.option.id)

    def action_choose(self, name: str) -> None:
        self.app.open_screen(name)
