"""One snapshot of what is configured against what the kernel says is true right now.

Sources: the config file, /proc/self/mountinfo, loop attachments from sysfs, /proc/*/fd for
writers that bypass a loop, and the daemon's figures when it runs. The CLI's `status` and the
TUI's dashboard both render this.
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from app.services import loop as loopdev
from app.services import mounts
from app.services.config import BlockEntry, ConfigStore, FsEntry
from app.services.results import DaemonNotAnswering
from app.services.socketpath import ANSWER_SECONDS, STATUS_ANSWER_SECONDS
from app.services.blockplan import View
from app.services.entries import problems
from app.services.layout import (CONNECTING_AGAIN, WRITERS_WAIT, FSTYPE_FS, command, entry_id,
                                  entry_state, is_door, mix_words, switched_marker, with_failback)
from app.services.protocol import (CAPTURE_AGAIN, TARGET_SETTINGS_AT_START, CaptureRow,
                                   replicating)


Figures = CaptureRow  # the daemon's typed row for one entry (app/services/protocol.py)


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
        rows = [CaptureRow.from_json(e) for e in reply.get("filesystem") or []]
        lags = [f.lag_seconds for f in rows if f and f.lag_seconds is not None]
        return cls(reply.get("pid"), len(rows), sum(f.captured_ops for f in rows if f),
                   sum(f.bytes_queued for f in rows if f), max(lags) if lags else None)


@dataclass(frozen=True)
class StatusWarning:
    subject: str
    message: str
    level: str = "warning"  # "warning" | "error"


LAZY = "lazily unmounted"  # its capture serves files still open there (the daemon's row says who)


@dataclass(frozen=True)
class FsState:
    entry: FsEntry
    state: str  # "mounted" | "not mounted" | "path missing" | "switched over" | "switch-over interrupted"
    #             | "lazily unmounted" | "fail-back interrupted"
    other_fstype: str | None = None  # what is mounted at the path when it is not us
    engine: CaptureRow | None = None  # the daemon's figures
    problem: str | None = None  # why the (hand-edited) entry is not valid as it stands
    switched: dict | None = None  # its switch-over marker, read without a daemon (else engine's)

    @property
    def figures(self) -> CaptureRow | None:
        return self.engine


@dataclass(frozen=True)
class BlockState:
    entry: BlockEntry
    state: str  # "attached" | "detached" | "detach pending" | "device missing" | "switched over"
    #             | "switch-over interrupted" | "fail-back interrupted" (detached, handed
    #             over to its replica)
    loops: tuple[loopdev.LoopStatus, ...] = ()
    raw_mounts: tuple[str, ...] = ()
    loop_mounts: tuple[str, ...] = ()
    capture: str = ""  # "captured" | "not captured" | "no daemon" (worker alive, daemon gone)
    #                    | "lost" (worker dead too) | "" (no loop)
    engine: CaptureRow | None = None  # the daemon's figures for a captured entry
    problem: str | None = None  # why the (hand-edited) entry is not valid as it stands
    switched: dict | None = None  # its switch-over marker, read without a daemon (else engine's)

    @property
    def loop(self) -> str | None:
        return self.loops[0].device if self.loops else None

    @property
    def figures(self) -> CaptureRow | None:
        return self.engine


@dataclass
class StatusSnapshot:
    taken_at: float
    filesystem: list[FsState] = field(default_factory=list)
    block: list[BlockState] = field(default_factory=list)
    loops: list[loopdev.LoopStatus] = field(default_factory=list)
    warnings: list[StatusWarning] = field(default_factory=list)
    engine: dict[str, Any] | None = None  # the daemon's whole status reply
    engine_error: str | None = None
    engine_silent: int | None = None  # the pid of a daemon that holds its socket, silent
    orphans: list[CaptureRow] = field(default_factory=list)

    def daemon_silent(self, exc: DaemonNotAnswering) -> None:
        """The daemon did not answer (stopped by a signal, stuck, still starting): said."""
        self.engine_error, self.engine_silent = exc.said, exc.pid or 0

    @property
    def summary(self) -> EngineSummary | None:
        return EngineSummary.from_reply(self.engine)

    def fs_state(self, path: str | None) -> FsState | None:
        return next((s for s in self.filesystem if s.entry.path == path), None)

    def block_state(self, device: str | None) -> BlockState | None:
        return next((s for s in self.block if s.entry.device == device), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at,
            "filesystem": [{**asdict(s.entry), "state": s.state, "mounted": s.state == "mounted",
                            "other_fstype": s.other_fstype,
                            "engine": s.engine.to_json() if s.engine else None,
                            "problem": s.problem}
                           for s in self.filesystem],
            "block": [{**asdict(s.entry), "state": s.state, "attached_loop": s.loop,
                       "capture": s.capture, "engine": s.engine.to_json() if s.engine else None,
                       "loops": [lp.to_json() for lp in s.loops],
                       "raw_mounts": list(s.raw_mounts), "loop_mounts": list(s.loop_mounts),
                       "problem": s.problem}
                      for s in self.block],
            "loops": [lp.to_json() for lp in self.loops],
            "warnings": [asdict(w) for w in self.warnings],
            "engine": self.engine,
            "engine_error": self.engine_error,
            "orphans": [o.to_json() for o in self.orphans],
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


def worker_specs():
    """(pid, spec) of every capture worker running, as their command lines say (a worker is
    `python -m app.engine.capture --spec JSON`, also when forked from the daemon's template)."""
    for pid in sorted(filter(str.isdigit, os.listdir("/proc")), key=int):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"app.engine.capture" not in argv[:3] or b"--spec" not in argv:
                continue
            spec = json.loads(argv[argv.index(b"--spec") + 1])
        except (OSError, IndexError, ValueError):
            continue
        if isinstance(spec, dict):
            yield int(pid), spec


def capture_workers(kind: str, key: str) -> frozenset[int]:
    """The pids of the capture workers of an entry."""
    return frozenset(pid for pid, spec in worker_specs()
                     if spec.get("kind") == kind and spec.get("key") == key)


def writers_of(device: str, exclude: set[int] | frozenset[int] = frozenset(),
               also: dict[int, str] | None = None) -> list[tuple[int, str, str]]:
    """(pid, command, node) of processes holding `device`, or one of the devices `also` names
    ({device number: node}: its disk, its partitions), open for writing, via /proc/*/fd."""
    try:
        rdevs = {os.stat(device).st_rdev: device, **(also or {})}
    except OSError:
        return []
    return _openers(rdevs, writing=True, exclude=exclude)


def openers_of(device: str, *, writing: bool = False,
               exclude: set[int] | frozenset[int] = frozenset()) -> list[tuple[int, str]]:
    """(pid, command) of processes holding `device` open (for writing only, when asked)."""
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return []
    return [(pid, comm) for pid, comm, _node in _openers({rdev: device}, writing=writing,
                                                         exclude=exclude)]


def _openers(rdevs: dict[int, str], *, writing: bool,
             exclude: set[int] | frozenset[int]) -> list[tuple[int, str, str]]:
    """(pid, command, node) of processes holding one of the devices `rdevs` names open.

    A descriptor is stat'ed (its rdev compared) only when its fdinfo says it is on a local
    file system of its process's mount table (read once per mount namespace): a stat of
    every descriptor asked a FUSE or NFS server for the attributes of each file open there,
    and one that does not answer (a stopped capture, an sshfs whose server is gone) hung
    `status`, the dashboard's refresh, detach and switch-over. Sockets, pipes and anonymous
    inodes (mounts of no table) are not stat'ed either."""
    found = []
    local_of: dict[str, frozenset[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) in exclude:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
            local = mounts.namespace_mount_ids(pid, local_of,
                                               lambda m: m.fstype in mounts.LOCAL_FSTYPES)
        except OSError:
            continue
        for fd in fds:
            try:
                info = mounts.fdinfo(f"/proc/{pid}/fdinfo/{fd}")
                if int(info[b"mnt_id"]) not in local:
                    continue
                node = rdevs.get(os.stat(f"{fd_dir}/{fd}").st_rdev)
                if node is None:
                    continue
                flags = int(info[b"flags"], 8) if writing else os.O_RDWR
            except (OSError, ValueError, KeyError):
                continue
            if flags & (os.O_WRONLY | os.O_RDWR):
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                found.append((int(pid), comm, node))
                break
    return found


def daemon_answering(control) -> tuple[bool, DaemonNotAnswering | None]:
    """(does the daemon answer a ping within ANSWER_SECONDS, the error when one holds the socket
    and stays silent): asked before a snapshot, whose daemon figures need it to answer."""
    from app.services.results import MirrorError
    try:
        control.request("ping", answer_within=ANSWER_SECONDS)
        return True, None
    except DaemonNotAnswering as exc:
        return False, exc
    except MirrorError:
        return False, None


def snapshot(store: ConfigStore, control=None, *, scan_writers: bool = True,
             state_dir: str | None = None) -> StatusSnapshot:
    """Read everything once; `control` is a ControlClient or None (engine figures omitted;
    then the markers the daemon left in its `state_dir` say which entries were switched over)."""
    marks = None if control is not None else state_dir
    config = store.load()
    table = mounts.read_mountinfo()
    loops = loopdev.list_attached()
    snap = StatusSnapshot(taken_at=time.time(), loops=loops)

    if control is not None:
        try:  # (a daemon that does not answer, e.g. stopped by a signal, is said, not waited on)
            snap.engine = control.request("status", answer_within=STATUS_ANSWER_SECONDS)
        except DaemonNotAnswering as exc:
            snap.daemon_silent(exc)
        except Exception as exc:  # the daemon's absence is a state to show, not a crash
            snap.engine_error = str(exc)
    rows = {(r["kind"], r["key"]): CaptureRow.from_json(r) for table in ("filesystem", "block")
            for r in (snap.engine or {}).get(table, [])}
    snap.orphans = [CaptureRow.from_json(r) for r in (snap.engine or {}).get("orphans", [])]
    for o in snap.orphans:
        snap.warnings.append(StatusWarning(o.key, f"orphaned capture (pid {o.worker_pid}): "
                                                  f"{o.last_error}", "error"))
    for d in (snap.engine or {}).get("dead_loops", []):
        # a worker died under it: its I/O fails; the entry itself is captured again (another loop)
        snap.warnings.append(StatusWarning(d.get("key") or d["loop"], f"{d['loop']} served a "
                                           f"capture whose worker died: its I/O fails (EIO); "
                                           f"{d['use']} (the kernel then detaches it)", "error"))

    flawed = problems(config, store)
    for entry in (*config.filesystem, *config.block):
        if id(entry) in flawed:
            subject = entry.path if isinstance(entry, FsEntry) else entry.device
            snap.warnings.append(StatusWarning(subject, f"invalid entry: {flawed[id(entry)]}; "
                                               "remove it or correct the file", "error"))

    by_point = {m.mount_point: m for m in table}  # later lines win: the top mount of a path
    index = None  # (other_ways_in's, made at the first mounted entry)
    for entry in config.filesystem:
        top = by_point.get(entry.path)
        if top is None and not os.path.isdir(entry.path):  # (a mount point is not looked at)
            state, other = "path missing", None
            snap.warnings.append(StatusWarning(entry.path, "the directory does not exist", "error"))
        elif top is not None and top.fstype == FSTYPE_FS:
            state, other = "mounted", None
        else:
            state, other = "not mounted", (top.fstype if top is not None else None)
        row = rows.get(("fs", entry.path))
        sw = None
        if state == "not mounted" and row is not None and row.captured \
                and row.state.startswith(LAZY):  # its detached capture still serves open files
            state = LAZY
            snap.warnings.append(StatusWarning(entry.path, f"{row.state} (worker pid "
                                               f"{row.worker_pid}); mount it again once that capture has ended"))
        elif state == "not mounted":
            sw = _switched(row, marks, "fs", entry.path)
            snap.warnings.append(_not_captured_warning(entry.path, row, sw, entry.target))
            if (shown := _switched_state(sw)) is not None:
                state, other = shown, None  # not "not mounted": Mount all would fork its history
        elif state == "mounted" and snap.engine is None:  # no daemon: is its worker there?
            if _serving("fs", entry.path):
                snap.warnings.append(StatusWarning(entry.path, "its capture goes on without a daemon "
                                                   "(the daemon stopped or died); start the daemon "
                                                   "to take it over"))
            else:
                snap.warnings.append(StatusWarning(entry.path, "mirrorfs is mounted here but its "
                                                   "capture is gone (its worker died): I/O there "
                                                   "fails; unmount it and start the daemon", "error"))
        if state == "mounted":
            index = index or door_index(table)
            snap.warnings += [StatusWarning(entry.path, text) for text in
                              other_ways_in(entry.path, table, index)]
        if row is not None:
            _replication_warnings(entry.path, row, snap.warnings)
        if row is not None and row.captured and row.nested_mounts:  # passed through unrecorded
            snap.warnings.append(StatusWarning(entry.path, f"not captured below it: "
                                               f"{', '.join(row.nested_mounts)} (another file "
                                               "system mounted there: what is written there is "
                                               "not replicated; add it as an entry of its own "
                                               "to replicate it)"))
        snap.filesystem.append(FsState(entry, state, other, row, flawed.get(id(entry)),
                                       sw if row is None else None))

    view = View(attached=loops, table=table)
    ours_pids = frozenset((snap.engine or {}).get("pids", []))
    for entry in config.block:
        state = _block_state(entry, view, table, snap.warnings, scan_writers,
                             rows.get(("block", entry.device)), ours_pids, marks)
        snap.block.append(replace(state, problem=flawed.get(id(entry))))
    return snap


def door_index(table: list[mounts.MountEntry]) -> tuple[dict, dict]:
    """For other_ways_in over many entries, the table read once: the captures' doors by entry
    id, and the other mounts (not mirrorfs, not doors) by device."""
    doors, by_dev = {}, {}
    for m in table:
        if m.fstype == FSTYPE_FS:
            continue
        if is_door(m.mount_point):
            doors[m.mount_point.rsplit("/", 2)[1]] = m
        else:
            by_dev.setdefault((m.major, m.minor), []).append(m)
    return doors, by_dev


def other_ways_in(path: str, table: list[mounts.MountEntry],
                  index: tuple[dict, dict] | None = None) -> list[str]:
    """A captured directory is also reachable beside its capture, in this mount namespace:
    its file system mounted a second time (the same disk at /mnt/disk and, by a bind, at the
    entry), or a bind of it or of a directory below it made before Mount all (an application's
    or a container's). What is written there is not captured, and the replica misses it
    without a word, as a raw device written beside its loop. The directory beneath mirrorfs
    is known by the capture's own door (its bind below the run directory), so nothing of the
    entry is looked up (a capture that does not answer would hang us)."""
    doors, by_dev = index or door_index(table)
    door = doors.get(entry_id(path))
    if door is None:  # (not placed yet, or of an older worker)
        return []
    inside, said = door.root.rstrip("/") or "/", []
    for m in by_dev.get((door.major, door.minor), ()):
        if mounts._contains(inside, m.root):  # a bind of the entry or of a directory in it
            shown, what = m.mount_point, "a bind of " + (
                "it" if m.root.rstrip("/") == inside else f"{os.path.relpath(m.root, inside)} in it")
        elif mounts._contains(m.root, inside):  # its file system, or a directory above it, mounted there
            rel = "" if inside == (m.root.rstrip("/") or "/") else os.path.relpath(inside, m.root)
            shown = os.path.join(m.mount_point, rel).rstrip("/") or "/"
            what = f"{m.source} mounted at {m.mount_point}" + (
                f" (a bind of {m.root})" if m.root != "/" else "")
        else:
            continue
        if _covered(shown, m, table):  # mirrorfs there (the entry itself), or hidden
            continue
        said.append(f"also reachable beside its capture at {shown} ({what}): changes made there "
                    "are not captured and its replica misses them; unmount it there, or mount "
                    "it again after Mount all (it then shows the capture)")
    return said


def _covered(shown: str, m: mounts.MountEntry, table: list[mounts.MountEntry]) -> bool:
    """Is `shown` (a path through `m`) hidden by another mount, on it or on a directory above
    it below `m`'s mount point (mirrorfs on the entry is one)?"""
    return any(x is not m and x.mount_id != m.parent_id and mounts._contains(x.mount_point, shown)
               and len(x.mount_point) >= len(m.mount_point) for x in table)


def _not_captured_warning(path: str, row: CaptureRow | None, sw: dict | None, target: str | None,
                          what: str = "not mounted as mirrorfs: changes there are not captured "
                                      "(Mount all)") -> StatusWarning:
    """An entry without its capture: Mount all / Attach all, unless it was handed over to its
    replica (`sw`: _switched(); `target`: the entry's, when its marker does not name it)."""
    if sw:
        target = row.target if row is not None else target
        if sw.get("failback") == "interrupted":  # this side's data may not be its own any more
            return StatusWarning(path, _switched_text(sw, target, path),
                                 "warning" if sw.get("failback_applied") == 0 else "error")
        keys = ("s runs it again, o keeps this side" if sw.get("state") == "switching" else
                "f fails back, o keeps this side, m: moved there for good")
        return StatusWarning(path, _switched_text(sw, target) + f" (Targets screen: {keys})")
    if row is not None and row.last_errno == errno.EMEDIUMTYPE:  # Mount all is refused too
        what = what.rpartition(" (")[0] + (" (its capture is refused: it is not on the file "
                                           "system or device recorded for it; see below)")
    return StatusWarning(path, what)


def _switched(row: CaptureRow | None, state_dir: str | None, kind: str, key: str) -> dict | None:
    """An entry's switch-over: the daemon's word, else (no daemon) its marker in `state_dir`;
    read once per entry, for both its warning and its state."""
    return row.switched if row is not None else _switched_marker(state_dir, kind, key)


def _switched_state(sw: dict | None) -> str | None:
    """An entry's STATE when it was handed over to its replica (`sw`: _switched()):
    "switched over", "switch-over interrupted" or "fail-back interrupted"; None when it was
    not."""
    if not sw:
        return None
    if sw.get("failback") == "interrupted":
        return "fail-back interrupted"
    return "switch-over interrupted" if sw.get("state") == "switching" else "switched over"


# What the replica of an entry handed over to it is, by the entry's STATE (_switched_state)
REPLICA_HANDED_OVER = {"switched over": "primary (switched over)",
                       "fail-back interrupted": "primary (fail-back interrupted)",
                       "switch-over interrupted": "primary or not (switch-over interrupted)"}


def replica_text(state: FsState | BlockState) -> str | None:
    """An entry's REPLICA (status, the dashboard's text): the target's data while captured
    (consistent, inconsistent, not ours, split-brain, promoted); of an entry handed over to
    its replica, that the replica is primary there (it said nothing: "-"); else None."""
    row = state.engine
    handed = _switched_state(row.switched if row is not None else state.switched)
    if handed is not None:
        return REPLICA_HANDED_OVER[handed]
    if row is None or not row.captured or row.error:
        return None
    return row.target_data or None


def _switched_marker(state_dir: str | None, kind: str, key: str) -> dict | None:
    """The switch-over marker the daemon keeps in an entry's state directory, with the
    fail-back's beside it (no daemon: none is under way)."""
    if not state_dir:
        return None
    entry_dir = entry_state(state_dir, kind, key)
    return with_failback(switched_marker(entry_dir), entry_dir)


def _serving(kind: str, key: str) -> bool:
    """Is the capture worker of this entry still there? By the workers' command lines, not
    by asking its mount (a statvfs of it: ENOTCONN when the worker is dead, but no answer at
    all, and `status` hung, when it is stopped or hung)."""
    return bool(capture_workers(kind, key))


def _sysfs_size(dev: str) -> int | None:
    """A block device's size now, from sysfs (the device is not opened: status must not hold
    up a detach); None when it cannot be read."""
    try:
        with open(f"/sys/class/block/{os.path.basename(os.path.realpath(dev))}/size") as f:
            return int(f.read()) * 512
    except (OSError, ValueError):
        return None


def _plain_loop_text(loop: str, view: View, engine: CaptureRow | None) -> str:
    """A loop straight on the device: attached while no daemon ran (the daemon takes it over
    at its start), or one the running daemon did not take over because it is in use."""
    text = f"{loop} is attached without capture"
    if engine is None:
        return text + " (daemon not running then): its writes are not replicated"
    from app.services.blockplan import loop_use
    use = loop_use(loop, view)
    if use is None:
        return text + ": its writes are not replicated (Attach all takes it over)"
    return (text + f": its writes are not replicated, and the daemon takes over only an idle loop: "
            f"it is {use}; unmount (or close) it, then Attach all")


def _size_changed(dev: str, entry: BlockEntry, window: int, now: int | None,
                  warnings: list[StatusWarning]) -> None:
    """A device resized under its capture: grown, its loop and replica miss the rest (an
    entry without a size limit); shrunk below the window, I/O past its end through the loop
    fails, and a file system there loses writes."""
    from app.services.units import human_size
    if now is None:
        return
    if now < entry.offset + window:
        left = max(0, now - entry.offset)
        warnings.append(StatusWarning(dev, f"the device shrank to {human_size(now)} since its capture "
                                     f"started; its loop still has {human_size(window)}: reads and "
                                     f"writes past {human_size(left)} of it fail (EIO, ENOSPC). Give "
                                     "the device its size back, or unmount the loop and detach it",
                                "error"))
    elif not entry.sizelimit and now - entry.offset > window:
        warnings.append(StatusWarning(dev, f"the device grew to {human_size(now)} since its capture "
                                     f"started; its loop and replica still have "
                                     f"{human_size(window)}: detach it and attach it again "
                                     "(Detach all, Attach all) to use and replicate the rest"))


def _block_state(entry: BlockEntry, view: View, table,
                 warnings: list[StatusWarning], scan_writers: bool, engine: CaptureRow | None,
                 ours_pids: frozenset[int], marks: str | None = None) -> BlockState:
    dev = entry.device
    if not os.path.exists(dev):
        warnings.append(StatusWarning(dev, "the device does not exist", "error"))
        return BlockState(entry, "device missing")
    captured = tuple(view.captures_of(dev))  # indexed once, not compared per loop of the host
    raw_loops = view.loops_on(dev)  # loops straight on the raw device: no capture
    plain = tuple(s for s in raw_loops if s.offset == entry.offset)
    ours = captured + plain
    raw_mounts = _device_mounts(dev, table)
    loop_mounts = tuple(mp for s in ours for mp in _device_mounts(s.device, table))
    live = bool(engine and engine.captured)
    capture = ""
    sw = None
    if not ours:
        sw = _switched(engine, marks, "block", dev)
        state = _switched_state(sw) or "detached"
        warnings.append(_not_captured_warning(dev, engine, sw, entry.target, "not attached to a "
                                              "loop device: its writes are not captured (Attach "
                                              "all)"))
    elif all(s.autoclear for s in ours) or (engine is not None and engine.pending_detach):
        # We never attach with autoclear, so it being set means a deferred LOOP_CLR_FD.
        state = "detach pending"
        warnings.append(StatusWarning(dev, f"{ours[0].device}: detach pending (still open)"))
    else:
        state = "attached"
    if captured and live:
        capture = "captured"
    elif captured and _serving("block", dev):
        capture = "no daemon"
        warnings.append(StatusWarning(dev, f"{captured[0].device}: its capture goes on without a daemon "
                                     "(the daemon stopped or died); start the daemon to take it over"))
    elif captured:
        capture = "lost"
        warnings.append(StatusWarning(dev, f"{captured[0].device} serves a capture whose daemon is gone: "
                                     "its I/O fails; unmount/close it and start the daemon", "error"))
    elif plain:
        capture = "not captured"
        warnings.append(StatusWarning(dev, _plain_loop_text(plain[0].device, view, engine)))
    if live and engine.size:  # against the window its capture runs with (not a hand edit's)
        running = replace(entry, offset=engine.offset, sizelimit=engine.not_applied.get(
            "sizelimit", [entry.sizelimit])[0])
        _size_changed(dev, running, engine.size, _sysfs_size(dev), warnings)
    if captured and raw_loops:
        warnings.append(StatusWarning(dev, f"{', '.join(s.device for s in raw_loops)} reach the raw "
                                     "device directly: writes there bypass capture and corrupt the "
                                     "target", "error"))
    if raw_mounts:
        warnings.append(StatusWarning(dev, f"the raw device is mounted on {', '.join(raw_mounts)}: "
                                     "writes there bypass the loop device and corrupt the target",
                                "error"))
    if scan_writers and ours:
        if capture == "no daemon":  # the daemon cannot name its workers: they say who they are
            ours_pids = ours_pids | capture_workers("block", dev)
        window = (engine.offset, engine.size) if live and engine.size else \
            (entry.offset, entry.sizelimit)
        from app.services.blockdevs import sharing_nodes
        for pid, comm, node in writers_of(dev, exclude=ours_pids,
                                          also=sharing_nodes(dev, *window)):
            what = "the raw device" if node == dev else f"{node}, which holds bytes of it,"
            warnings.append(StatusWarning(dev, f"{comm} (pid {pid}) has {what} open for writing, "
                                         f"bypassing {ours[0].device}", "error"))
    if engine is not None and engine.raw_writes and engine.raw_writes.get("overflows"):
        n = engine.raw_writes["overflows"]
        warnings.append(StatusWarning(dev, "writers outside its loop may have been missed: the "
                                     f"watch's event queue overflowed ({n} time"
                                     f"{'s' if n != 1 else ''}); the entry was compared with its "
                                     "replica then and what differed sent"))
    if engine is not None and engine.raw_writes and engine.raw_writes.get("count"):
        n, last = engine.raw_writes["count"], engine.raw_writes.get("last") or 0
        nodes = engine.raw_writes.get("nodes") or ()
        others = [node for node in nodes if node != dev]
        via = "" if not others else (f" ({'itself, and ' if dev in nodes else ''}through "
                                     f"{', '.join(others)}, which hold"
                                     f"{'s' if len(others) == 1 else ''} bytes of it)")
        warnings.append(StatusWarning(dev, f"the raw device{via} was opened for writing outside "
                                     f"{ours[0].device if ours else 'its loop'} and closed "
                                     f"({n} time{'s' if n != 1 else ''}, last at "
                                     f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last))}): "
                                     "those writes bypassed capture; the entry was compared with "
                                     "its replica then and what differed sent. Use the loop device"))
    if engine is not None:
        _replication_warnings(dev, engine, warnings)
    return BlockState(entry, state, ours, raw_mounts, loop_mounts, capture, engine,
                      switched=sw if engine is None else None)


def _replication_warnings(subject: str, row: CaptureRow, warnings: list[StatusWarning]) -> None:
    """What an administrator must know about replication (never silent): catching up, behind,
    paused or refused targets, apply errors, a capture lost, a capture that does not answer."""
    if row.error:
        stuck = "not answered" in row.error
        warnings.append(StatusWarning(subject, f"capture: {row.error}" + (
            "; writes through it wait until it does" if stuck else ""), "error"))
    if row.catch_up is not None:
        warnings.append(StatusWarning(subject, f"catching up ({row.catch_up.get('reason')}): the "
                                               f"target is not yet equal to the source "
                                               f"[{row.catch_up.get('stage', '')}]"))
    if row.behind and row.replication.startswith("behind: "):  # its journal's disk is full
        warnings.append(StatusWarning(subject, f"{row.replication}; changes are tracked and "
                                               "resynced when there is room there again"))
    elif row.behind:
        warnings.append(StatusWarning(subject, "behind: the queue limit was reached; changes are "
                                               "tracked and resynced when the target catches up"))
    if row.replication == WRITERS_WAIT:
        warnings.append(StatusWarning(subject, "queue full: the queue limit was reached and "
                                               "on_full is \"block\": writers wait until the "
                                               "target takes what is queued"))
    last = last_failure(row.connection)  # while it connects again: as the last attempt ended
    if last.startswith(("paused", "refused", "disconnected", "error")):
        warnings.append(StatusWarning(subject, f"target: {row.connection}",
                                      "error" if last.startswith("refused") else "warning"))
    if row.read_only_here is True:
        warnings.append(StatusWarning(subject, "read-only here: its replica was promoted and "
                                      "nothing changed here since (a fail-over), so writes are "
                                      + ("refused (EROFS)" if row.kind == "fs" else
                                         "refused (its loop fails them: EIO)")
                                      + " rather than fork its history; "
                                      f"{command('failback', row.key, '--yes')} brings the "
                                      "replica's data here, "
                                      f"{command('replica', 'resolve', row.key, '--discard-target', '--yes')}"
                                      " keeps this host's data and makes it writable"))
    elif isinstance(row.read_only_here, str):
        warnings.append(StatusWarning(subject, "its replica was promoted and nothing changed "
                                      "here since (a fail-over), but it could NOT be made "
                                      f"read-only ({row.read_only_here}): a write here now is a "
                                      "split brain", "error"))
    if row.not_applied:
        warnings.append(StatusWarning(subject, _not_applied_text(row)))
    if row.apply_errors:
        warnings.append(StatusWarning(subject, f"{row.apply_errors} records failed to apply to the "
                                               f"target (last: {row.last_error}); run mirror", "error"))
    if not row.captured and row.last_error and not row.switched:  # switched: said once, above
        warnings.append(StatusWarning(subject, f"not captured: {row.last_error}", "error"))


def _not_applied_text(row: CaptureRow) -> str:
    """A hand edit of the entry while its capture runs: what it still does, what the file
    says, and what applies it (a capture reads its entry when it starts)."""
    from app.services.units import human_size

    def said(name: str, value) -> str:
        if name.endswith("bandwidth") and isinstance(value, int):  # a target's, in bytes/s
            return f"{human_size(value)}/s"
        return "unset" if value is None else str(value).lower() if isinstance(value, bool) \
            else str(value)
    changes = ", ".join(f"{name} {said(name, new)} (running: {said(name, old)})"
                        for name, (old, new) in row.not_applied.items())
    doing = (f"its capture replicates to {row.target}" if "target" in row.not_applied
             else "its capture runs")
    what, applies = "the entry was", CAPTURE_AGAIN[row.kind]
    if row.not_applied.keys() & set(TARGET_SETTINGS_AT_START):  # `target set` (or a hand edit)
        name = (row.target or '').partition(':')[0]
        what = f"the entry and its target {name} were"
        if row.not_applied.keys() <= set(TARGET_SETTINGS_AT_START):  # the daemon applies those
            applies = f"{command('target', 'apply', name)} (or {applies})"
    elif row.kind == "fs" and "target" in row.not_applied:  # this entry alone, made again
        wanted = row.not_applied["target"][1]
        how = ("--target", wanted) if wanted else ("--no-target",)
        applies = f"{command('fs', 'set', row.key, *how)} (or {applies})"
    return (f"{doing} as {what} when it started; the configuration now says {changes}: "
            f"{applies} applies it")


def healthy_secondary(row: CaptureRow | None) -> bool:
    """A replica its capture is connected to and replicating into: not switched over, not
    split brain (a fail-back or keep-this-host has nothing to do)."""
    return (row is not None and row.captured and not row.switched
            and replicating(row.connection, row.target_data))


def nothing_to_fail_back(key: str, target: str) -> str:
    return (f"{key} was not switched over and its replica {target} is not promoted: its capture "
            "is connected to it. There is nothing to fail back or keep; nothing was changed")


def _switched_text(sw: dict, target: str | None, key: str = "ENTRY") -> str:
    where = sw.get("target") or target or "its replica"
    if sw.get("failback") == "interrupted":
        if sw.get("failback_applied") == 0:
            return (f"fail-back from {where} interrupted: this host's copy {mix_words(0)}; the "
                    f"replica there is still primary: run {command('failback', key, '--yes')} "
                    f"again, or keep this host's data with "
                    f"{command('replica', 'resolve', key, '--discard-target', '--yes')}")
        return (f"fail-back from {where} interrupted: this host's copy "
                f"{mix_words(sw.get('failback_applied'))} until a fail-back finishes: run "
                f"{command('failback', key, '--yes')} again")
    if sw.get("state") == "switching":
        return f"switch-over to {where} interrupted: run it again, or resolve"
    fence = sw.get("fence") or {}
    here = ("; NOT read-only here" if "unfenced" in fence else "; read-only here" if fence else "")
    return f"switched over to {where}: primary there{here}; fail back to capture here"


def last_failure(text: str) -> str:
    """A connection state, or while the capture connects again ("connecting again (last:
    WHY)"), WHY: how its last attempt ended."""
    if text.startswith(CONNECTING_AGAIN) and text.endswith(")"):
        return text[len(CONNECTING_AGAIN):-1]
    return text


def short_connection(text: str) -> str:
    """A connection state in a table cell: its kind and first reason ("refused: split brain",
    "disconnected: the target stopped answering"), with the retry time or "connecting again
    (last: …)"; the whole of it is in the warnings, `status --json` and the details."""
    if (last := last_failure(text)) != text:
        return f"{CONNECTING_AGAIN}{short_connection(last)})"
    head, sep, retry = text.partition(", retry in ")
    if not sep:  # the retry is due: being tried now
        head, sep, retry = text.partition(", trying again now")
    parts = head.split(": ")
    if len(parts) > 3 and parts[1] == "ssh" and parts[2].startswith("connect to host"):
        parts = [parts[0], parts[-1]]  # "disconnected: Connection refused", not "…: ssh"
    short = ": ".join(parts[:2]).split(" (")[0].split(". ")[0]
    if len(short) > 60:
        short = short[:59] + "…"
    return short + (sep + retry if sep else "")


def replication_text(row: CaptureRow | None, *, long: bool = False) -> str:
    """One entry's replication as the CLI and the dashboard both say it."""
    from app.services.units import human_size
    if row is None:
        return "—"
    if row.error:
        return f"error: {row.error}"
    if row.switched:
        return _switched_text(row.switched, row.target, row.key)
    if not row.captured:
        return f"not captured{': ' + row.last_error if row.last_error else ''}"
    text = row.replication or row.state
    if row.connection and row.connection not in ("local", "none", "connected"):
        text += f" ({row.connection if long else short_connection(row.connection)})"
    text += f" · queued {human_size(row.bytes_queued)}"
    if row.lag_seconds:
        text += f" · lag {row.lag_seconds:.1f} s"
    if long:
        text += f" · ops {row.captured_ops} · seq {row.applied_seq}/{row.last_seq}"
        if row.target_data:
            text += f" · target {row.target_data}"
        if row.apply_errors:
            text += f"\n  {row.apply_errors} apply errors: {row.last_error or '?'}"
    return text



def replication_lines(row: CaptureRow | None) -> list[tuple[str, str]]:
    """An entry's capture and replication, field by field, for a detail view."""
    from app.services.units import human_size
    if row is None:
        return []
    if row.error:
        return [("Engine error", row.error)]
    if not row.captured:
        return [("Capture", "not captured" + (f": {row.last_error}" if row.last_error else ""))]
    lines = [("Capture", row.state + (f" (worker pid {row.worker_pid})" if row.worker_pid else "")),
             ("Replication", row.replication or "—"),
             ("Connection", row.connection or "—"),
             ("Target data", row.target_data or "—"),
             ("Positions", f"captured {row.last_seq} · sent {row.sent_seq} · received "
                           f"{row.received_seq} · applied {row.applied_seq}"),
             ("Queued", human_size(row.bytes_queued)),
             ("Lag", "—" if row.lag_seconds is None else f"{row.lag_seconds:.1f} s"),
             ("Operations", str(row.captured_ops))]
    if row.catch_up:
        c = row.catch_up
        lines.append(("Catching up", f"{c.get('reason')}: {c.get('stage')}"))
    if row.wire_bytes:
        ratio = row.logical_bytes / row.wire_bytes if row.wire_bytes else 0
        squeeze = f"×{ratio:.1f}"
        if row.compression and row.compression != "zstd":  # why it is not compressed now
            squeeze += f", {row.compression}"
        lines.append(("Traffic", f"{human_size(row.logical_bytes)} logical, {human_size(row.wire_bytes)} "
                                 f"on the wire ({squeeze}); now {human_size(int(row.logical_rate))}/s"))
    if row.reconnects or row.attempts or row.resent_bytes or row.resync_bytes:
        lines.append(("Recovery", f"{row.reconnects} reconnects, {row.attempts} failed attempts, "
                                  f"{human_size(row.resent_bytes)} resent, "
                                  f"{human_size(row.resync_bytes)} resynced"))
    if row.superseded:
        lines.append(("Superseded", f"{row.superseded} catch-up records found no place at the "
                                    "target yet; the catch-up sent those names whole"))
    if row.rtt is not None:
        lines.append(("Round trip", f"{row.rtt * 1000:.1f} ms"))
    if row.apply_errors:
        lines.append(("Apply errors", f"{row.apply_errors}: {row.last_error or '?'}"))
    elif row.last_error:
        lines.append(("Last error", row.last_error))
    return lines


FIGURES_INTERVAL = 2.0  # seconds between asks for the daemon's figures (dashboard, Targets, --watch)
MOVING = ("captured", "captured_ops", "last_seq", "applied_seq", "bytes_queued", "behind",
          "connection", "replication", "target_data", "catch_up", "last_error", "switched")


def moving_figures(control) -> list | None:
    """What of the daemon's figures moves with the data (positions, queue, lag in whole
    seconds, connection and replication states), one tuple per capture; None when the daemon
    does not answer. The figures change with every write and no event says so: a live view
    asks for these every FIGURES_INTERVAL and reads everything again only when they moved."""
    try:
        reply = control.request("status", answer_within=STATUS_ANSWER_SECONDS)
    except Exception:  # noqa: BLE001 - not running, or busy: the daemon watch says when it is back
        return None
    return [(r.get("key"), int(r.get("lag_seconds") or 0), *(r.get(k) for k in MOVING))
            for table in ("filesystem", "block") for r in reply.get(table) or ()]
