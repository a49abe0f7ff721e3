"""The setup tasks, numbered as the old DTSetup menu: arrows + Enter, the number, or a click.
The entries come from the action registry (app.screens.actions)."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, OptionList
from textual.widgets.option_list import Option

from app.screens import actions
from app.screens.banner import RootBanner


class MainMenuScreen(Screen):
    """Its CSS is in app.tcss, and its widgets are all direct children: the first frame
    registers every style in one pass (each pass re-parses the whole stylesheet)."""

    BINDINGS = [
        Binding("q", "app.quit", "Quit"),
        Binding("escape", "esc", "", show=False),
        *[Binding(s.menu_key, f"choose('{s.name}')", s.label, show=False)
          for s in actions.menu()],
    ]

    def compose(self) -> ComposeResult:
        entries = actions.menu()
        yield Header()
        yield RootBanner()
        menu = OptionList(*[
            Option(Text.assemble((f" {s.menu_key}  ", "bold"), s.label, "\n",
                                 (f"    {s.hint}", "dim")), id=s.name)
            for s in entries], id="menu")
        menu.border_title = "Setup tasks"
        menu.border_subtitle = (f"↑↓ Enter or {entries[0].menu_key}–{entries[-1].menu_key} · "
                                "q quits · Esc: back in screens · ctrl+p commands")
        yield menu
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#menu").focus()

    @on(OptionList.OptionSelected, "#menu")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.action_choose(event.option.id)

    def action_choose(self, name: str) -> None:
        self.app.open_screen(name)

    def action_esc(self) -> None:
        """Esc on the menu does not quit (it did, and administrators pressed it once too
        often); it says how."""
        self.notify("q (or ctrl+q) quits; Esc goes back one level inside a screen.",
                    title="Quit?")
