"""Live status: configured entries against the kernel's mounts and loops, warnings, an event
log of mount-table changes and block uevents, per-device I/O rates, and engine figures.

Redraws happen on events (the App's watchers publish them). Two timers run, only while this
screen is visible, for what changes without any event to wake us: the I/O-rate sampler (disk
counters) and the daemon's figures (base.TaskScreen.follow_daemon_figures: queued bytes, lag,
positions, connection move with every write). At 80 columns the side panel (engine, rates) and the
full log and warnings are one key away (g, e, w); at 120 everything is on screen.
"""

from __future__ import annotations

import time
from collections import deque

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Footer, Header, Label, RichLog, Sparkline, Static

from app.screens.accept import AcceptsIdentity, state_label
from app.screens.banner import RootBanner
from app.screens.base import (Col, KeyedTable, TaskScreen, capture_text, elide,
                              selected_key, state_text)
from app.screens.dialogs import DetailsDialog, accept_hint
from app.screens.manual import loop_flags
from app.services.events import BlockUevents, Interest, MountsChanged
from app.services.status import replication_text
from app.services.units import human_size, shown

RATE_INTERVAL = 1.0  # seconds between disk-counter samples while the dashboard is shown
RATE_HISTORY = 30  # samples kept per sparkline
EVENTS_KEPT = 500
OTHER_MOUNT_LINES = 5  # other tools' mount changes logged one by one a second; more: counted
NARROW_WARNINGS = 3  # warnings shown at 80 columns; `w` shows them all
# An entry's replication (Engine) is what the dashboard is for: at 80 columns it is cut short,
# not dropped (keep 7); `g` shows it whole.
FS_COLUMNS = (Col("path", "Path", 9, 30, path=True), Col("state", "State", 8, 26),
              Col("engine", "Engine", 7, 40))  # a path's end tells entries apart
BLOCK_COLUMNS = (Col("device", "Device", 9, 24, path=True), Col("loop", "Loop", 8),
                 Col("state", "State", 7, 18), Col("capture", "Capture", 8),
                 Col("engine", "Engine", 7, 24), Col("mounted", "Mounted", 4, 20, path=True),
                 Col("offset", "Offset", 2), Col("flags", "Flags", 1))


def mount_diff_lines(diff, interest=None) -> tuple[list[str], list[str]]:
    """The log's lines for a mount-table change: those of the entries (all of them without an
    events.Interest), and those of other tools' mounts."""
    items = [(f"mounted {m.fstype} {shown(m.source)} on {shown(m.mount_point)}", (m,))
             for m in diff.added]
    items += [(f"unmounted {m.fstype} {shown(m.source)} from {shown(m.mount_point)}", (m,))
              for m in diff.removed]
    items += [(f"remounted {shown(new.mount_point)} ({old.options} → {new.options})", (old, new))
              for old, new in diff.changed]
    if interest is None:
        return [line for line, _ in items], []
    ours, others = [], []
    for line, ms in items:
        (ours if any(interest.mount(m) for m in ms) else others).append(line)
    return ours, others


def engine_cell(figures) -> str:
    """One entry's replication in a table cell (the daemon's typed row), or a dash."""
    return shown(replication_text(figures))


def block_engine_cell(figures) -> str:
    """One captured block entry's replication, positions and apply errors."""
    return shown(replication_text(figures, long=True))


def engine_text(snap) -> Text:
    """The daemon as a whole, then each captured block entry's figures."""
    summary = snap.summary
    if summary is None:
        why = snap.engine_error or "the daemon is not running (menu 5 starts it)"
        return Text(shown(why), style="yellow")
    text = Text()
    text.append(f"running (pid {summary.pid})", style="green")
    if summary.fs_entries:
        text.append(f"\n{summary.fs_entries} file-system "
                    f"{'entry' if summary.fs_entries == 1 else 'entries'}, "
                    f"{summary.captured_ops} operations captured\n"
                    f"queued {human_size(summary.bytes_queued)}")
        if summary.max_lag is not None:
            text.append(f", lag up to {summary.max_lag:.1f} s")
    for s in snap.block:
        f = s.figures
        if f and (f.captured or f.error):
            text.append(f"\n{shown(s.entry.device)}", style="bold")
            text.append(f" via {s.loop}" if s.loop else "")
            text.append(f"\n  {block_engine_cell(f)}")
    return text


def engine_line(snap) -> Text:
    """The engine in one line, for 80 columns (`g` shows it all)."""
    summary = snap.summary
    if snap.engine_silent is not None:  # (what resumes or ends it is long: `g` says it)
        pid = f" (pid {snap.engine_silent})" if snap.engine_silent else ""
        return Text(f"daemon: not answering{pid}; g says why and what to do", style="yellow")
    if summary is None:
        return Text("daemon: " + shown(snap.engine_error or "not running (menu 5 starts it)"),
                    style="yellow")
    line = Text(f"daemon: running (pid {summary.pid})", style="green")
    captured = sum(1 for s in snap.block if s.figures and s.figures.captured)
    queued = summary.bytes_queued + sum(s.figures.bytes_queued for s in snap.block
                                        if s.figures and s.figures.captured)
    line.append(f" · {summary.captured_ops} fs ops · {captured} captured "
                f"{'device' if captured == 1 else 'devices'} · {human_size(queued)} queued")
    return line


def warnings_text(warnings, limit: int | None = None) -> Text:
    if not warnings:
        return Text("none", style="green")
    text = Text()
    for w in warnings[:limit]:
        style = "bold red" if w.level == "error" else "yellow"
        text.append("✘ " if w.level == "error" else "! ", style=style)
        text.append(f"{shown(w.subject)}: ", style="bold")
        text.append(shown(accept_hint(w.message)) + "\n")
    if limit is not None and len(warnings) > limit:
        text.append(f"… {len(warnings) - limit} more: w shows all", style="dim")
    text.rstrip()
    return text


class DeviceRate(Vertical):
    """Read and write bytes/s of one device as two sparklines."""

    def __init__(self, name: str, label: str) -> None:
        super().__init__(id=f"rate-{name}", classes="rate")
        self.label = label
        self.reads: deque[float] = deque([0.0] * RATE_HISTORY, maxlen=RATE_HISTORY)
        self.writes: deque[float] = deque([0.0] * RATE_HISTORY, maxlen=RATE_HISTORY)

    def compose(self) -> ComposeResult:
        yield Label(Text(shown(self.label)), classes="rate-label")
        with Horizontal(classes="rate-row"):
            yield Label("r 0 B/s", classes="rate-value reads-value")
            yield Sparkline(list(self.reads), classes="reads")
        with Horizontal(classes="rate-row"):
            yield Label("w 0 B/s", classes="rate-value writes-value")
            yield Sparkline(list(self.writes), classes="writes")

    def add(self, read: float, write: float) -> None:
        self.reads.append(read)
        self.writes.append(write)
        self.query_one(".reads", Sparkline).data = list(self.reads)
        self.query_one(".writes", Sparkline).data = list(self.writes)
        self.query_one(".reads-value", Label).update(f"r {human_size(int(read))}/s")
        self.query_one(".writes-value", Label).update(f"w {human_size(int(write))}/s")

    def line(self) -> str:
        return (f"{shown(self.label)}: read {human_size(int(self.reads[-1]))}/s, "
                f"write {human_size(int(self.writes[-1]))}/s")


class DashboardScreen(AcceptsIdentity, TaskScreen):
    NAME = "dashboard"
    CSS_PATH = ["task.tcss", "dashboard.tcss"]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]  # the layout at 80 columns
    busy_target = "#dash-fs"

    class Rates(Message):
        def __init__(self, counters: dict, at: float) -> None:
            super().__init__()
            self.counters = counters
            self.at = at

    def __init__(self) -> None:
        super().__init__()
        self.events: deque[str] = deque(maxlen=EVENTS_KEPT)  # the log as plain text
        self._devices: dict[str, str] = {}  # kernel name -> label, shown with rates
        self._watched: set[str] = set()  # kernel names of protected devices and their loops
        self._states: dict[str, str] | None = None  # entry -> state at the last read
        self._last: tuple[dict, float] | None = None
        self._rate_timer = None
        self._snap = None
        self._interest: Interest | None = None  # which events can change the picture
        self._other_lines: deque[float] = deque()  # when other tools' mounts were logged
        self._other_mounts = 0  # other tools' mount changes counted, not logged yet
        self._other_uevents = 0  # other loops' uevents, the same
        self._others_timer = None  # logs both counts (_log_others)

    def compose(self) -> ComposeResult:
        yield Header()
        yield RootBanner()
        yield Static("", id="load-error", classes="banner error")
        with Horizontal(id="dash-top"):
            with VerticalScroll(id="dash-left"):
                yield Label("File system entries", classes="section-title")
                yield KeyedTable(FS_COLUMNS, id="dash-fs")
                yield Label("Block entries and their loops", classes="section-title")
                yield KeyedTable(BLOCK_COLUMNS, id="dash-block")
                yield Static("", id="engine-line")
                yield Label("Warnings", classes="section-title")
                yield Static("", id="warnings")
            with VerticalScroll(id="dash-right"):
                yield Label("Engine", classes="section-title")
                yield Static("", id="engine")
                yield Label("I/O rates", classes="section-title")
                yield Static("no replicated block devices", id="rates-empty", classes="notes")
                yield Vertical(id="rates")
        yield Label("Events", classes="section-title")
        yield RichLog(id="events", max_lines=EVENTS_KEPT, wrap=False)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        super().on_mount()
        self.reload_on(self.app.config_signal)
        self.app.mounts_signal.subscribe(self, self._mounts_changed)
        self.app.block_signal.subscribe(self, self._block_events)
        self.app.daemon_signal.subscribe(self, self._daemon_changed)
        watching = ("watching the mount table, block uevents, the daemon and the configuration"
                    if self.services.watch_kernel
                    else "kernel events are not watched in this session")
        self.log_event(watching)
        if not self.services.samples_rates:
            self.query_one("#rates").mount(Static("rates are not sampled in this session",
                                                  classes="notes"))
        else:
            self._rate_timer = self.set_interval(RATE_INTERVAL, self.sample_rates)
        self.follow_daemon_figures()
        self.query_one("#dash-fs").focus()

    def on_screen_suspend(self) -> None:
        super().on_screen_suspend()
        if self._rate_timer is not None:
            self._rate_timer.pause()

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        if self._rate_timer is not None:
            self._last = None  # a gap in sampling is not a rate
            self._rate_timer.resume()

    def log_event(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.services.clock()))
        self.events.append(f"{stamp} {line}")
        self.query_one("#events", RichLog).write(Text.assemble((stamp, "cyan"), " ", line))

    def _mounts_changed(self, diff) -> None:
        ours, others = mount_diff_lines(diff, self._interest)
        for line in ours:
            self.log_event(line)
        # Other tools' mounts: one by one up to OTHER_MOUNT_LINES a second; beyond, counted
        # and the count logged once a second (a host churning mounts flooded the log, and
        # redrawing it kept a CPU busy)
        now = time.monotonic()
        while self._other_lines and self._other_lines[0] < now - 1.0:
            self._other_lines.popleft()
        for line in others:
            if not self._other_mounts and len(self._other_lines) < OTHER_MOUNT_LINES:
                self._other_lines.append(now)
                self.log_event(line)
            else:
                self._other_mounts += 1
                if self._others_timer is None:
                    self._others_timer = self.set_timer(1.0, self._log_others)
        self._reload_if(MountsChanged(diff))

    def _log_others(self) -> None:
        """What other tools did in the last second, counted."""
        self._others_timer = None
        if self._other_mounts:
            self.log_event(f"{self._other_mounts} changes of other mounts (none of an entry's)")
            # still counted for the next second: one by one again after a quiet one
            self._other_lines = deque([time.monotonic()] * OTHER_MOUNT_LINES)
        if self._other_uevents > 1:  # (one alone is another tool's everyday business)
            self.log_event(f"{self._other_uevents} uevents of other loop devices")
        self._other_mounts = self._other_uevents = 0

    def _reload_if(self, event) -> None:
        """Read the state again when the event can change it (events.Interest): every event
        is logged or counted, but another tool's loops and mounts leave the entries as they are."""
        if self._interest is None or self._interest.wants(event):
            self.reload()

    def _daemon_changed(self, running: bool) -> None:
        self.log_event("the daemon started: capture state read again" if running else
                       "the daemon stopped or died: capture state read again")
        self.reload()

    def _block_events(self, batch) -> None:
        """Log uevents of protected devices, their loops and real disks; other loops' are
        counted, the count logged at most once a second. Read the state again when one can
        change it (events.Interest)."""
        for action, name in batch:
            if name in self._watched or not name.startswith("loop"):
                self.log_event(f"uevent {action} {name}")
            else:
                self._other_uevents += 1
        if self._other_uevents and self._others_timer is None:
            self._others_timer = self.set_timer(1.0, self._log_others)
        self._reload_if(BlockUevents(tuple(batch)))

    def load(self):
        from app.services.status import kernel_name
        snap = self.services.status()
        self._interest = Interest.of(snap)
        devices: dict[str, str] = {}
        for state in snap.block:
            devices[kernel_name(state.entry.device)] = state.entry.device
            for lp in state.loops:
                devices[kernel_name(lp.device)] = f"{lp.device} ← {state.entry.device}"
        return snap, devices

    def show(self, data) -> None:
        snap, devices = data
        self._snap = snap
        self._watched = set(devices)
        self._log_transitions(snap)
        self.query_one("#dash-fs", KeyedTable).show_rows({
            s.entry.path: (elide(s.entry.path, 30),
                           state_text(state_label("fs", s), s.problem),
                           engine_cell(s.figures)) for s in snap.filesystem})
        rows = {}
        for s in snap.block:
            lp = s.loops[0] if s.loops else None
            # The entry's offset: a captured loop sits at 0 of the capture file, which starts
            # at the entry's offset on the device (a plain loop has the entry's offset itself).
            rows[s.entry.device] = (elide(s.entry.device, 24), lp.device if lp else "—",
                                    state_text(state_label("block", s), s.problem),
                                    capture_text(s.capture),
                                    engine_cell(s.figures),
                                    ", ".join(shown(m) for m in s.loop_mounts) or "—",
                                    human_size(s.entry.offset) if s.entry.offset else "0",
                                    loop_flags(lp) if lp else "")
        self.query_one("#dash-block", KeyedTable).show_rows(rows)
        narrow = self.has_class("-narrow")
        self.query_one("#warnings", Static).update(
            warnings_text(snap.warnings, NARROW_WARNINGS if narrow else None))
        self.query_one("#engine", Static).update(engine_text(snap))
        self.query_one("#engine-line", Static).update(engine_line(snap))
        self._show_rate_devices(devices)
        self.query_one("#rates-empty", Static).display = not devices
        self.refresh_accept()

    def _log_transitions(self, snap) -> None:
        """Log each entry whose state changed since the last read (not on the first read)."""
        states = {s.entry.path: s.state for s in snap.filesystem}
        states.update({s.entry.device: s.state + (f" as {s.loop}" if s.loop else "")
                       + (f", {s.capture}" if s.capture else "") for s in snap.block})
        if self._states is not None:
            for subject, state in states.items():
                before = self._states.get(subject)
                if before is not None and before != state:
                    self.log_event(f"{shown(subject)}: {before} → {state}")
        self._states = states

    def on_resize(self) -> None:
        if self._snap is not None:  # the number of warnings shown depends on the width
            narrow = self.has_class("-narrow")
            self.query_one("#warnings", Static).update(
                warnings_text(self._snap.warnings, NARROW_WARNINGS if narrow else None))

    # -- detail views -----------------------------------------------------------------------

    def action_events(self) -> None:
        self.app.push_screen(DetailsDialog("Events since the dashboard opened",
                                           Text("\n".join(self.events))))

    def action_warnings(self) -> None:
        if self._snap is not None:
            self.app.push_screen(DetailsDialog("Warnings", warnings_text(self._snap.warnings)))

    def action_engine(self) -> None:
        if self._snap is None:
            return
        text = engine_text(self._snap)
        rates = [w.line() for w in self.query(DeviceRate)]
        text.append("\n\nI/O rates (last sample)\n", style="bold")
        text.append("\n".join(rates) if rates else "no replicated block devices"
                    if self.services.samples_rates else "rates are not sampled in this session")
        self.app.push_screen(DetailsDialog("Engine and I/O rates", text))

    def _selected(self) -> tuple[bool, str | None]:
        """(a block entry?, its key) of the row selected in the focused table (the file-system
        table's when neither is focused)."""
        focused = self.focused
        table = focused if isinstance(focused, KeyedTable) else self.query_one("#dash-fs",
                                                                               KeyedTable)
        return table.id == "dash-block", selected_key(table)

    def accept_subject(self):
        if self._snap is None:
            return None
        block, key = self._selected()
        state = self._snap.block_state(key) if block else self._snap.fs_state(key)
        return None if state is None else ("block" if block else "fs", state)

    @on(DataTable.RowSelected)
    def action_details(self) -> None:
        from app.screens.block import entry_details
        from app.screens.filesystem import fs_details
        if self._snap is None:
            return
        block, key = self._selected()

        def follow():
            state = self._snap.block_state(key) if block else self._snap.fs_state(key)
            return None if state is None else (entry_details if block else fs_details)(state)
        if key is not None:
            self.push_details(f"Entry {shown(key)}", follow)

    # -- rates ------------------------------------------------------------------------------

    def _show_rate_devices(self, devices: dict[str, str]) -> None:
        if devices == self._devices or not self.services.samples_rates:
            return
        box = self.query_one("#rates")
        for name in set(self._devices) - set(devices):
            box.query(f"#rate-{name}").remove()
        for name in devices:
            if name not in self._devices:
                box.mount(DeviceRate(name, devices[name]))
        self._devices = dict(devices)

    def sample_rates(self) -> None:
        self._rates_worker()

    @work(thread=True, exclusive=True, exit_on_error=False, group="rates",
          description="read per-disk I/O counters")
    def _rates_worker(self) -> None:
        self.post_message(self.Rates(self.services.disk_counters(), time.monotonic()))

    @on(Rates)
    def _rates(self, event: Rates) -> None:
        last, self._last = self._last, (event.counters, event.at)
        if last is None:
            return
        before, then = last
        elapsed = max(event.at - then, 1e-3)
        for name in self._devices:
            now, old = event.counters.get(name), before.get(name)
            if now is None or old is None:
                continue
            widget = self.query(f"#rate-{name}")
            if widget:
                widget.first(DeviceRate).add((now.read_bytes - old.read_bytes) / elapsed,
                                             (now.write_bytes - old.write_bytes) / elapsed)
