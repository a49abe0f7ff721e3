"""Live status: configured entries against the kernel's mounts and loops, warnings, an event
log of mount-table changes and block uevents, per-device I/O rates, and engine figures.

Redraws happen on kernel events (the App's MountWatcher and uevent workers publish them),
never on a fixed timer. The one timer is the I/O-rate sampler, and it runs only while this
screen is visible: disk counters change without any event to wake us.
"""

from __future__ import annotations

import os
import time
from collections import deque

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Footer, Header, Label, RichLog, Sparkline, Static

from app.screens.base import RootBanner, TaskScreen, capture_text, state_text, sync_table
from app.screens.manual import loop_flags
from app.services.units import human_size

RATE_INTERVAL = 1.0  # seconds between disk-counter samples while the dashboard is shown
RATE_HISTORY = 30  # samples kept per sparkline


def mount_diff_lines(diff) -> list[str]:
    lines = [f"mounted {m.fstype} {m.source} on {m.mount_point}" for m in diff.added]
    lines += [f"unmounted {m.fstype} {m.source} from {m.mount_point}" for m in diff.removed]
    lines += [f"remounted {new.mount_point} ({old.options} → {new.options})" for old, new in diff.changed]
    return lines


def kernel_name(path: str) -> str:
    return os.path.basename(os.path.realpath(path))


class DeviceRate(Vertical):
    """Read and write bytes/s of one device as two sparklines."""

    def __init__(self, name: str, label: str) -> None:
        super().__init__(id=f"rate-{name}", classes="rate")
        self.label = label
        self.reads: deque[float] = deque([0.0] * RATE_HISTORY, maxlen=RATE_HISTORY)
        self.writes: deque[float] = deque([0.0] * RATE_HISTORY, maxlen=RATE_HISTORY)

    def compose(self) -> ComposeResult:
        yield Label(self.label, classes="rate-label")
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


class DashboardScreen(TaskScreen):
    CSS_PATH = "dashboard.tcss"
    busy_target = "#dash-fs"

    class Rates(Message):
        def __init__(self, counters: dict, at: float) -> None:
            super().__init__()
            self.counters = counters
            self.at = at

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []  # the log's lines as plain text (tests and screenshots read it)
        self._devices: dict[str, str] = {}  # kernel name -> label, shown with rates
        self._watched: set[str] = set()  # kernel names of protected devices and their loops
        self._states: dict[str, str] | None = None  # entry -> state at the last read
        self._last: tuple[dict, float] | None = None
        self._rate_timer = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield RootBanner()
        yield Static("", id="load-error", classes="banner error")
        with Horizontal(id="dash-top"):
            with VerticalScroll(id="dash-left"):
                yield Label("File system entries", classes="section-title")
                fs = DataTable(id="dash-fs", cursor_type="row")
                for label, key in (("Path", "path"), ("State", "state"), ("Engine", "engine")):
                    fs.add_column(label, key=key)
                yield fs
                yield Label("Block entries and their loops", classes="section-title")
                block = DataTable(id="dash-block", cursor_type="row")
                for label, key in (("Device", "device"), ("Loop", "loop"), ("State", "state"),
                                   ("Capture", "capture"), ("Mounted", "mounted"),
                                   ("Offset", "offset"), ("Flags", "flags")):
                    block.add_column(label, key=key)
                yield block
                yield Label("Warnings", classes="section-title")
                yield Static("", id="warnings")
            with VerticalScroll(id="dash-right"):
                yield Label("Engine", classes="section-title")
                yield Static("", id="engine")
                yield Label("I/O rates", classes="section-title")
                yield Static("no replicated block devices", id="rates-empty", classes="notes")
                yield Vertical(id="rates")
        yield Label("Events", classes="section-title")
        yield RichLog(id="events", max_lines=500, wrap=False)
        yield Footer()

    def on_mount(self) -> None:
        super().on_mount()
        self.app.mounts_signal.subscribe(self, self._mounts_changed)
        self.app.block_signal.subscribe(self, self._block_event)
        self.app.daemon_signal.subscribe(self, self._daemon_gone)
        watching = "watching the mount table and block uevents" if self.services.watch_kernel \
            else "kernel events are not watched in this session"
        self.log_event(watching)
        if self.services.disk_counters is None:
            self.query_one("#rates").mount(Static("rates are not sampled in this session",
                                                  classes="notes"))
        else:
            self._rate_timer = self.set_interval(RATE_INTERVAL, self.sample_rates)
        self.query_one("#dash-fs").focus()

    def on_screen_suspend(self) -> None:
        if self._rate_timer is not None:
            self._rate_timer.pause()

    def on_screen_resume(self) -> None:
        if self._rate_timer is not None:
            self._last = None  # a gap in sampling is not a rate
            self._rate_timer.resume()

    def log_event(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.services.clock()))
        self.events.append(f"{stamp} {line}")
        self.query_one("#events", RichLog).write(Text.assemble((stamp, "cyan"), " ", line))

    def _mounts_changed(self, diff) -> None:
        for line in mount_diff_lines(diff):
            self.log_event(line)
        self.reload()

    def _daemon_gone(self, _event) -> None:
        self.log_event("the daemon stopped or died: capture state read again")
        self.reload()

    def _block_event(self, event: tuple[str, str]) -> None:
        """Log uevents of protected devices, their loops and real disks (not every loop
        another tool makes); any of them may change the picture, so reload on all."""
        action, name = event
        if name in self._watched or not name.startswith("loop"):
            self.log_event(f"uevent {action} {name}")
        self.reload()

    def load(self):
        snap = self.services.status()
        devices: dict[str, str] = {}
        for state in snap.block:
            devices[kernel_name(state.entry.device)] = state.entry.device
            for lp in state.loops:
                devices[kernel_name(lp.device)] = f"{lp.device} ← {state.entry.device}"
        return snap, devices

    def show(self, data) -> None:
        snap, devices = data
        self._watched = set(devices)
        self._log_transitions(snap)
        sync_table(self.query_one("#dash-fs", DataTable), {
            s.entry.path: (s.entry.path, state_text(s.state + (f" ({s.other_fstype} here)"
                                                                if s.other_fstype else "")),
                           _engine_cell(s.engine)) for s in snap.filesystem})
        rows = {}
        for s in snap.block:
            lp = s.loops[0] if s.loops else None
            # The entry's offset: a captured loop sits at 0 of the capture file, which starts
            # at the entry's offset on the device (a plain loop has the entry's offset itself).
            rows[s.entry.device] = (s.entry.device, lp.device if lp else "—", state_text(s.state),
                                    capture_text(s.capture), ", ".join(s.loop_mounts),
                                    human_size(s.entry.offset) if s.entry.offset else "0",
                                    loop_flags(lp) if lp else "")
        sync_table(self.query_one("#dash-block", DataTable), rows)
        self._show_warnings(snap.warnings)
        self._show_engine(snap)
        self._show_rate_devices(devices)
        self.query_one("#rates-empty", Static).display = not devices

    def _log_transitions(self, snap) -> None:
        """Log each entry whose state changed since the last read (not on the first read)."""
        states = {s.entry.path: s.state for s in snap.filesystem}
        states.update({s.entry.device: s.state + (f" as {s.loop}" if s.loop else "")
                       + (f", {s.capture}" if s.capture else "") for s in snap.block})
        if self._states is not None:
            for subject, state in states.items():
                before = self._states.get(subject)
                if before is not None and before != state:
                    self.log_event(f"{subject}: {before} → {state}")
        self._states = states

    def _show_warnings(self, warnings) -> None:
        if not warnings:
            self.query_one("#warnings", Static).update(Text("none", style="green"))
            return
        text = Text()
        for w in warnings:
            style = "bold red" if w.level == "error" else "yellow"
            text.append("✘ " if w.level == "error" else "! ", style=style)
            text.append(f"{w.subject}: ", style="bold")
            text.append(w.message + "\n")
        text.rstrip()
        self.query_one("#warnings", Static).update(text)

    def _show_engine(self, snap) -> None:
        if snap.engine is None:
            why = snap.engine_error or "the daemon is not running (menu 5 starts it)"
            self.query_one("#engine", Static).update(Text(why, style="yellow"))
            return
        from app.services.status import replication_text
        entries = [s.engine for s in snap.filesystem if s.engine is not None]
        queued = sum(e.bytes_queued for e in entries)
        lags = [e.lag_seconds for e in entries if e.lag_seconds is not None]
        text = Text()
        text.append(f"running (pid {snap.engine.get('pid', '?')})", style="green")
        if entries:
            text.append(f"\n{len(entries)} file-system {'entry' if len(entries) == 1 else 'entries'}"
                        f", {sum(e.captured_ops for e in entries)} operations "
                        f"captured\nqueued {human_size(queued)}")
            if lags:
                text.append(f", lag up to {max(lags):.1f} s")
        for s in snap.block:  # the daemon's figures for each captured block entry
            if s.engine and (s.engine.captured or s.engine.error):
                text.append(f"\n{s.entry.device}", style="bold")
                text.append(f" via {s.loop}" if s.loop else "")
                text.append(f"\n  {replication_text(s.engine, long=True)}")
        self.query_one("#engine", Static).update(text)

    def _show_rate_devices(self, devices: dict[str, str]) -> None:
        if devices == self._devices or self.services.disk_counters is None:
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


def _engine_cell(row) -> str:
    """One entry's replication figures (the daemon's typed row), or a dash."""
    from app.services.status import replication_text
    return replication_text(row)
