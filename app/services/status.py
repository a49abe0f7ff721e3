"""One snapshot of what is configured against what the kernel says is true right now.

Sources: the config file, /proc/self/mountinfo, loop attachments from sysfs, /proc/*/fd for
writers that bypass a loop, and the daemon's figures when it runs. The CLI's `status` and the
TUI's dashboard both render this.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from app.services import loop as loopdev
from app.services import mounts
from app.services.config import BlockEntry, ConfigStore, FsEntry
from app.services.entries import problems
from app.services.replication import LoopIndex, index_by_backing, is_capture_of, loops_backed_by

MIRRORFS_TYPE = "fuse.mirrorfs"


@dataclass(frozen=True)
class Figures:
    """The daemon's figures for one entry. The only reader of its untyped status rows: when
    the protocol gets typed rows, this is the one place that changes."""

    captured_ops: int = 0
    bytes_queued: int = 0
    lag_seconds: float | None = None
    captured: bool = False  # a block entry's capture is live
    pending_detach: bool = False
    error: str | None = None  # the daemon could not ask the entry's worker
    apply_errors: int = 0
    last_apply_error: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any] | None) -> Figures | None:
        if not row:
            return None
        return cls(int(row.get("captured_ops") or 0), int(row.get("bytes_queued") or 0),
                   row.get("lag_seconds"), bool(row.get("captured")),
                   bool(row.get("pending_detach")), row.get("error"),
                   int(row.get("apply_errors") or 0), row.get("last_apply_error"))


@dataclass(frozen=True)
class EngineSummary:
    """The running daemon as a whole: its pid and the totals over its file-system entries."""

    pid: int | None
    fs_entries: int
    captured_ops: int
    bytes_queued: int
    max_lag: float | None

    @classmethod
    def from_reply(cls, reply: dict[str, Any] | None) -> EngineSummary | None:
        if reply is None:
            return None
        rows = [Figures.from_row(e) for e in reply.get("entries") or []]
        lags = [f.lag_seconds for f in rows if f and f.lag_seconds is not None]
        return cls(reply.get("pid"), len(rows), sum(f.captured_ops for f in rows if f),
                   sum(f.bytes_queued for f in rows if f), max(lags) if lags else None)


@dataclass(frozen=True)
class StatusWarning:
    subject: str
    message: str
    level: str = "warning"  # "warning" | "error"


@dataclass(frozen=True)
class FsState:
    entry: FsEntry
    state: str  # "mounted" | "not mounted" | "path missing"
    other_fstype: str | None = None  # what is mounted at the path when it is not us
    engine: dict[str, Any] | None = None
    problem: str | None = None  # why the (hand-edited) entry is not valid as it stands

    @property
    def figures(self) -> Figures | None:
        return Figures.from_row(self.engine)


@dataclass(frozen=True)
class BlockState:
    entry: BlockEntry
    state: str  # "attached" | "detached" | "detach pending" | "device missing"
    loops: tuple[loopdev.LoopStatus, ...] = ()
    raw_mounts: tuple[str, ...] = ()
    loop_mounts: tuple[str, ...] = ()
    capture: str = ""  # "captured" | "not captured" | "no daemon" (worker alive, daemon gone)
    #                    | "lost" (worker dead too) | "" (no loop)
    engine: dict[str, Any] | None = None  # the daemon's figures for a captured entry
    problem: str | None = None  # why the (hand-edited) entry is not valid as it stands

    @property
    def loop(self) -> str | None:
        return self.loops[0].device if self.loops else None

    @property
    def figures(self) -> Figures | None:
        return Figures.from_row(self.engine)


@dataclass
class StatusSnapshot:
    taken_at: float
    filesystem: list[FsState] = field(default_factory=list)
    block: list[BlockState] = field(default_factory=list)
    loops: list[loopdev.LoopStatus] = field(default_factory=list)
    warnings: list[StatusWarning] = field(default_factory=list)
    engine: dict[str, Any] | None = None
    engine_error: str | None = None

    @property
    def summary(self) -> EngineSummary | None:
        return EngineSummary.from_reply(self.engine)

    def to_json(self) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at,
            "filesystem": [{**asdict(s.entry), "state": s.state, "mounted": s.state == "mounted",
                            "other_fstype": s.other_fstype, "engine": s.engine,
                            "problem": s.problem}
                           for s in self.filesystem],
            "block": [{**asdict(s.entry), "state": s.state, "attached_loop": s.loop,
                       "capture": s.capture, "engine": s.engine,
                       "loops": [lp.to_json() for lp in s.loops],
                       "raw_mounts": list(s.raw_mounts), "loop_mounts": list(s.loop_mounts),
                       "problem": s.problem}
                      for s in self.block],
            "loops": [lp.to_json() for lp in self.loops],
            "warnings": [asdict(w) for w in self.warnings],
            "engine": self.engine,
            "engine_error": self.engine_error,
        }


def disk_counters() -> dict:
    """Per-disk I/O counters (kernel name -> psutil's sdiskio), for the dashboard's rates."""
    import psutil
    return psutil.disk_io_counters(perdisk=True, nowrap=True)


def kernel_name(path: str) -> str:
    """The kernel's name for a device path (a /dev/disk/by-id/… link resolved): what the
    per-disk I/O counters are keyed by."""
    return os.path.basename(os.path.realpath(path))


def _device_mounts(path: str, table: list[mounts.MountEntry]) -> tuple[str, ...]:
    try:
        rdev = os.stat(path).st_rdev
    except OSError:
        return ()
    return tuple(m.mount_point for m in
                 mounts.mounts_of_device(os.major(rdev), os.minor(rdev), table))


def writers_of(device: str, exclude: set[int] | frozenset[int] = frozenset()) -> list[tuple[int, str]]:
    """(pid, command) of processes holding `device` open for writing, found via /proc/*/fd."""
    return openers_of(device, writing=True, exclude=exclude)


def openers_of(device: str, *, writing: bool = False,
               exclude: set[int] | frozenset[int] = frozenset()) -> list[tuple[int, str]]:
    """(pid, command) of processes holding `device` open (for writing only, when asked)."""
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return []
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) in exclude:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.stat(f"{fd_dir}/{fd}").st_rdev != rdev:
                    continue
                flags = os.O_RDWR
                if writing:
                    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                        flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
            except (OSError, ValueError, IndexError, StopIteration):
                continue
            if flags & (os.O_WRONLY | os.O_RDWR):
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                found.append((int(pid), comm))
                break
    return found


def snapshot(store: ConfigStore, control=None, *, scan_writers: bool = True) -> StatusSnapshot:
    """Read everything once; `control` is a ControlClient or None (engine figures omitted)."""
    config = store.load()
    table = mounts.read_mountinfo()
    loops = loopdev.list_attached()
    snap = StatusSnapshot(taken_at=time.time(), loops=loops)

    if control is not None:
        try:
            snap.engine = control.request("status")
        except Exception as exc:  # the daemon's absence is a state to show, not a crash
            snap.engine_error = str(exc)
    engine_by_path = {e.get("path"): e for e in (snap.engine or {}).get("entries", [])}

    flawed = problems(config, store)
    for entry in (*config.filesystem, *config.block):
        if id(entry) in flawed:
            subject = entry.path if isinstance(entry, FsEntry) else entry.device
            snap.warnings.append(StatusWarning(subject, f"invalid entry: {flawed[id(entry)]}; "
                                               "remove it or correct the file", "error"))

    by_point = {m.mount_point: m for m in table}  # later lines win: the top mount of a path
    for entry in config.filesystem:
        top = by_point.get(entry.path)
        if not os.path.isdir(entry.path) and top is None:
            state, other = "path missing", None
            snap.warnings.append(StatusWarning(entry.path, "the directory does not exist", "error"))
        elif top is not None and top.fstype == MIRRORFS_TYPE:
            state, other = "mounted", None
        else:
            state, other = "not mounted", (top.fstype if top is not None else None)
            snap.warnings.append(StatusWarning(entry.path, "not mounted as mirrorfs: changes there are "
                                                     "not captured (Mount all)"))
        snap.filesystem.append(FsState(entry, state, other, engine_by_path.get(entry.path),
                                       flawed.get(id(entry))))

    index = index_by_backing(loops)
    engine_block = {row.get("device"): row for row in (snap.engine or {}).get("block", [])}
    ours_pids = frozenset((snap.engine or {}).get("pids", []))
    for entry in config.block:
        state = _block_state(entry, index, loops, table, snap.warnings, scan_writers,
                             engine_block.get(entry.device), ours_pids)
        snap.block.append(replace(state, problem=flawed.get(id(entry))))
    return snap


def _serving(capture_file: str | None) -> bool:
    """Is the capture worker behind this FUSE file still answering? (a dead one: ENOTCONN)"""
    try:
        os.statvfs(os.path.dirname(capture_file or "/nonexistent/x"))
        return bool(capture_file)
    except OSError:
        return False


def _block_state(entry: BlockEntry, index: LoopIndex, loops: list[loopdev.LoopStatus], table,
                 warnings: list[StatusWarning], scan_writers: bool, engine: dict | None,
                 ours_pids: frozenset[int]) -> BlockState:
    dev = entry.device
    if not os.path.exists(dev):
        warnings.append(StatusWarning(dev, "the device does not exist", "error"))
        return BlockState(entry, "device missing")
    captured = tuple(s for s in loops if is_capture_of(dev, s.backing_file))
    raw_loops = loops_backed_by(dev, index)  # loops straight on the raw device: no capture
    plain = tuple(s for s in raw_loops if s.offset == entry.offset)
    ours = captured + plain
    raw_mounts = _device_mounts(dev, table)
    loop_mounts = tuple(mp for s in ours for mp in _device_mounts(s.device, table))
    live = bool(engine and engine.get("captured"))
    capture = ""
    if not ours:
        state = "detached"
        warnings.append(StatusWarning(dev, "not attached to a loop device: its writes are not captured"))
    elif all(s.autoclear for s in ours) or (engine or {}).get("pending_detach"):
        # We never attach with autoclear, so it being set means a deferred LOOP_CLR_FD.
        state = "detach pending"
        warnings.append(StatusWarning(dev, f"{ours[0].device}: detach pending (still open)"))
    else:
        state = "attached"
    if captured and live:
        capture = "captured"
    elif captured and _serving(captured[0].backing_file):
        capture = "no daemon"
        warnings.append(StatusWarning(dev, f"{captured[0].device}: its capture goes on without a daemon "
                                     "(the daemon stopped or died); start the daemon to take it over"))
    elif captured:
        capture = "lost"
        warnings.append(StatusWarning(dev, f"{captured[0].device} serves a capture whose daemon is gone: "
                                     "its I/O fails; unmount/close it and start the daemon", "error"))
    elif plain:
        capture = "not captured"
        warnings.append(StatusWarning(dev, f"{plain[0].device} is attached without capture (daemon not "
                                     "running then): its writes are not replicated"))
    if captured and raw_loops:
        warnings.append(StatusWarning(dev, f"{', '.join(s.device for s in raw_loops)} reach the raw "
                                     "device directly: writes there bypass capture and corrupt the "
                                     "target", "error"))
    if raw_mounts:
        warnings.append(StatusWarning(dev, f"the raw device is mounted on {', '.join(raw_mounts)}: "
                                     "writes there bypass the loop device and corrupt the target",
                                "error"))
    if scan_writers and ours:
        for pid, comm in writers_of(dev, exclude=ours_pids):
            warnings.append(StatusWarning(dev, f"{comm} (pid {pid}) has the raw device open for writing, "
                                         f"bypassing {ours[0].device}", "error"))
    return BlockState(entry, state, ours, raw_mounts, loop_mounts, capture, engine)
