"""Manual replication (deprecated, as in the seed): attach or detach a loop device now.
Nothing here is written to the configuration, so it is gone after a restart."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, Static, Switch

from app.screens.banner import RootBanner
from app.screens.base import (Col, KeyedTable, TaskScreen, elide, natural_key,
                              selected_key)
from app.screens.dialogs import ResultsDialog, labelled, switch_text, window_sizes
from app.services.results import Result
from app.services.units import human_size, shown

LOOP_COLUMNS = (Col("loop", "Loop", 9), Col("backing", "Backing", 8, 48, path=True),
                Col("offset", "Offset", 3), Col("size", "Size", 5), Col("flags", "Flags", 4))
NOT_PERSISTED = ("DEPRECATED · NOT PERSISTED: what you attach or detach here is not written to "
                 "the configuration and is lost at the next restart. Use block device "
                 "replication (menu 2) to keep it.")


def loop_flags(status) -> str:
    flags = [name for name, on_ in (("ro", status.read_only), ("autoclear", status.autoclear),
                                    ("partscan", status.partscan), ("dio", status.direct_io)) if on_]
    return ",".join(flags)


def loop_row(status) -> tuple:
    return (status.device, elide(status.backing_file or "", 48), str(status.offset),
            human_size(status.size), loop_flags(status))


class ManualScreen(TaskScreen):
    NAME = "manual"
    CSS_PATH = ["task.tcss", "manual.tcss"]
    busy_target = "#loops"

    def compose(self) -> ComposeResult:
        yield Header()
        yield RootBanner()
        yield Static(NOT_PERSISTED, id="not-persisted", classes="banner")
        yield Static("", id="load-error", classes="banner error")
        with Vertical(classes="form"):
            yield Label("Attach a device now", classes="section-title")
            yield labelled(("Device", Input(placeholder="e.g. /dev/sdb1", id="device", compact=True)),
                           ("loop", Input(placeholder="first free", id="loop", compact=True)),
                           classes="row")
            yield labelled(("Offset", Input(placeholder="0", id="offset", compact=True)),
                           ("size limit", Input(placeholder="whole", id="sizelimit", compact=True)),
                           then=(Switch(False, id="read-only"),
                                 Label(self._ro_words(False), id="read-only-state",
                                       classes="switch-label"),
                                 Button("Attach now", id="attach", compact=True, variant="warning")),
                           classes="row")
            yield Label("Detach a loop device now", classes="section-title")
            yield labelled(("Loop", Input(placeholder="/dev/loopN", id="detach-loop", compact=True)),
                           then=(Button("Detach now", id="detach", compact=True,
                                        variant="warning"),), classes="row")
        yield Label("Attached loop devices (all, from sysfs)", classes="section-title")
        yield KeyedTable(LOOP_COLUMNS, id="loops", sort_key=natural_key)
        yield Static("", id="waiting")
        yield Footer(compact=True)

    @staticmethod
    def _ro_words(on_: bool):
        return switch_text(on_, "Read-only", "yes", "no")

    @on(Switch.Changed, "#read-only")
    def _read_only(self, event: Switch.Changed) -> None:
        self.query_one("#read-only-state", Label).update(self._ro_words(event.value))

    def on_mount(self) -> None:
        super().on_mount()
        self.reload_on(self.app.block_signal)
        self.query_one("#device").focus()

    def load(self):
        return self.services.list_loops()

    def show(self, loops) -> None:
        self.query_one("#loops", KeyedTable).show_rows({s.device: loop_row(s) for s in loops})

    def _value(self, name: str) -> str:
        return self.query_one(f"#{name}", Input).value.strip()

    @on(Button.Pressed, "#attach")
    @on(Input.Submitted, "#device, #loop, #offset, #sizelimit")
    def action_attach(self) -> None:
        device = self._value("device")
        if not device:
            self.notify("Type the path of the block device to attach, e.g. /dev/sdb1.",
                        severity="warning")
            self.query_one("#device").focus()
            return
        try:
            offset, sizelimit = window_sizes(self._value)
        except ValueError as exc:
            self.app.push_screen(ResultsDialog("Manual attach", [
                Result.from_error("manual attach", device or "(no device)", exc, refused=True)]))
            return
        loop = self._value("loop") or None
        read_only = self.query_one("#read-only", Switch).value
        self.run_action(f"Manual attach {shown(device)} (not persisted)",
                        lambda: self.services.replication.manual_attach(
                            device, loop=loop, offset=offset, sizelimit=sizelimit,
                            read_only=read_only), subject=device)

    @on(Button.Pressed, "#detach")
    @on(Input.Submitted, "#detach-loop")
    def action_detach(self) -> None:
        loop = self._value("detach-loop")
        if not loop:
            self.notify("Type the loop device to detach (/dev/loopN), or select one in the "
                        "table and press ctrl+d.", severity="warning")
            self.query_one("#detach-loop").focus()
            return
        self.run_action(f"Manual detach {shown(loop)} (not persisted)",
                        lambda: self.services.replication.manual_detach(loop), subject=loop)

    def action_detach_selected(self) -> None:
        loop = selected_key(self.query_one("#loops", DataTable))
        if loop:
            self.query_one("#detach-loop", Input).value = loop
            self.action_detach()
