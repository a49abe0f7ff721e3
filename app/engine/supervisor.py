"""The daemon's capture workers: started, taken over, watched and stopped here; and the
file-system entries' mount / unmount on top of that (block entries: blocksup.py).

A worker is `python -m app.engine.capture` with one end of a socketpair (forked from the worker
template, app/engine/zygote.py, or started anew when that cannot answer); it says "ready" once
capture is in place (its catching-up goes on in the background). Workers outlive the daemon:
at start the daemon first connects to every take-over socket in its own run directory and
adopts what it finds; a worker whose entry is no longer configured is ended (when nothing uses
it) or shown as orphaned with the way to end it, never left running unseen.

Only what this installation made is touched: its workers (found through its run directory),
mounts tagged with its installation tag, loops on its capture files.
"""

from __future__ import annotations

import array
import contextlib
import errno
import glob
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field, replace

import trio

from app.engine import zygote as zygote_mod
from app.services import layout as layout_mod
from app.services import mounts, protocol
from app.services.config import FsEntry
from app.services.host import process_state
from app.services.layout import Layout, capture_end
from app.services.results import REFUSED, MirrorError, Outcome, Result

log = logging.getLogger("mirrorsetup.daemon")
READY_SECONDS = 120  # a worker mounts (and claims its target) within this
STOP_WAIT_SECONDS = 45  # a worker drains its journal (up to 30 s) and exits within this
ABORT_AFTER_SECONDS = 2  # still alive after our unmount: a copy lives in another namespace
RESPAWN_LIMIT = 3  # a worker that dies this often within RESPAWN_WINDOW is not restarted
RESPAWN_WINDOW = 60.0


class AdoptedProcess:
    """A worker left by a previous daemon: not our child, watched through a pidfd. trio lets
    one task wait on an fd at a time: the others check back every 50 ms."""

    def __init__(self, pid: int, pidfd: int | None = None):
        self.pid = pid
        self._fd = os.pidfd_open(pid) if pidfd is None else pidfd
        self._waiting = False
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._fd], [], [], 0)[0]:
            # The pidfd is closed; a task parked on it is woken first (`wait` then sees the
            # end): closed under a waiter, it never woke it, and the dead worker was never
            # replaced.
            if self._waiting:
                trio.lowlevel.notify_closing(self._fd)
            os.close(self._fd)
            self.returncode = self._status()
        return self.returncode

    def _status(self) -> int:
        return -1  # not our child: its exit status is not ours to read

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, signal.SIGKILL)

    async def wait(self) -> int:
        while self.poll() is None:
            if self._waiting:
                await trio.sleep(0.05)
                continue
            self._waiting = True
            try:
                await trio.lowlevel.wait_readable(self._fd)
            except trio.ClosedResourceError:
                pass  # a poll found the end first and closed the pidfd
            finally:
                self._waiting = False
        return self.returncode


class SpawnedChild(AdoptedProcess):
    """Our child started with subprocess (the worker template, also before trio ran):
    watched through a pidfd like an adopted worker, and reaped, with its exit status, once
    it ended."""

    def __init__(self, popen):
        super().__init__(popen.pid)
        self.popen = popen

    def _status(self) -> int:
        return self.popen.wait()  # ended: reaped at once


@dataclass
class WorkerLink:
    """The daemon's end of one worker's socket."""

    proc: object  # trio.Process or AdoptedProcess
    lines: protocol.TrioLines
    info: dict
    lock: trio.Lock = field(default_factory=trio.Lock)  # one call at a time
    busy: str | None = None  # the long command a call is waiting for now
    _send_lock: trio.Lock = field(default_factory=trio.Lock)
    _figures: tuple[float, dict] | None = None  # (when, the worker's status figures)
    _waiters: list = field(default_factory=list)  # status asks waiting for figures
    _owed: int = 0  # replies to calls given up after sending (a status's 10 s): not ours
    silent_since: float | None = None  # when the first call still unanswered was sent

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def unanswered(self) -> bool:
        """A call was given up on and its answer has not come yet."""
        return self._owed > 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def call(self, cmd: str, progress=None, **args) -> dict:
        if cmd == "status" and self.busy is not None and \
                protocol.FIGURES_WHILE_BUSY in self.info.get("features", ()):
            figures = await self._figures_while_busy()
            if figures is not None:
                return protocol.ok(**figures)
        async with self.lock:
            self.busy = None if cmd == "status" else cmd
            sent = answered = False
            asked = time.monotonic()
            try:
                async with self._send_lock:
                    await self.lines.send({"cmd": cmd, "args": args})
                sent = True
                while True:
                    msg = await self.lines.next()
                    if msg is None:
                        raise MirrorError(f"capture worker pid {self.pid} ended", errno=errno.EPIPE)
                    if "figures" in msg and "ok" not in msg:  # a status asked meanwhile
                        self._figures = (time.monotonic(), msg["figures"])
                        self._wake()
                        continue
                    if protocol.is_progress(msg):
                        if progress and not self._owed:
                            await progress(msg["progress"])
                        continue
                    if self._owed:  # the late answer of a call given up before (the worker
                        # answers in order): taken as this one's, every later status showed
                        # old figures, and a drain or mirror could take a status's answer
                        self._owed -= 1
                        continue
                    answered, self.silent_since = True, None
                    return msg
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise MirrorError(f"capture worker pid {self.pid}: {exc}", errno=errno.EPIPE) from exc
            finally:
                if sent and not answered:
                    self._owed += 1  # (cancelled: its answer is still to come)
                    self.silent_since = self.silent_since or asked
                self.busy = None
                self._wake()  # a status ask still waiting goes the ordinary way now

    async def _figures_while_busy(self) -> dict | None:
        """A long call holds the link (a mirror, a verify, a switch-over's drain): ask the
        worker for its figures; the long call's reader hands them over. None when that call
        ended first (then status is asked the ordinary way)."""
        asked = time.monotonic()
        woken = trio.Event()
        self._waiters.append(woken)
        try:
            async with self._send_lock:
                await self.lines.send({"cmd": "status", "args": {"figures": True}})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        await woken.wait()
        if self._figures is not None and self._figures[0] >= asked:
            return self._figures[1]
        return None

    def _wake(self) -> None:
        for woken in self._waiters:
            woken.set()
        self._waiters.clear()

    async def close(self) -> None:
        try:
            await self.lines.stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@dataclass
class Captured:
    """One entry under capture, as the daemon knows it."""

    kind: str
    key: str
    entry: object  # FsEntry or BlockEntry (None: orphaned)
    link: WorkerLink
    loop: str | None = None  # block: the loop device on the capture file
    pending: bool = False  # block: a deferred detach waits for the last close
    ending: bool = False  # being stopped: its death is expected
    holders: list[str] = field(default_factory=list)
    adopted: bool = False
    end: dict | None = None  # what the worker marked when it ended (capture.CLEAN_MARKER)

    def ended(self) -> str:
        """How the capture ended, as its own end marker says (never assumed)."""
        end = self.end
        if not end:
            return "its end was not marked (the worker did not finish cleanly): the next start resyncs"
        conn = end.get("connection")  # (ends marked before these two were kept: not said)
        off = conn not in (None, "connected", "local")
        if end.get("drained") and self.entry is not None and not self.entry.target:
            # (it said "drained to the target" of an entry that has none)
            return f"it has no target: nothing was replicated (seq {end.get('seq')})"
        if end.get("drained"):
            if off:  # nothing was queued, and nothing reached it either (a split brain)
                return (f"nothing was left in its journal (seq {end.get('seq')}), but the target "
                        f"is not known to be a copy of it ({conn})")
            if end.get("consistent") is False:  # a catch-up (a first copy) did not end
                return (f"nothing was left in its journal (seq {end.get('seq')}), but the target "
                        "is not known to be a copy yet (its catch-up had not ended): the next "
                        "start catches up")
            return f"its journal was drained to the target (seq {end.get('seq')})"
        why = "" if not off else \
            f"the target was unreachable ({conn}): " if conn == "connecting" or \
            conn.startswith("disconnected") else f"the target did not take them ({conn}): "
        return (f"{why}{end.get('seq', 0) - end.get('released', 0)} changes not yet at the "
                f"target {KEPT}")


KEPT = "are kept in its journal for the next start"  # a lift's words: others match on them


def forced_end(note: str, cap: Captured) -> str:
    """What a stop that had to end a capture (Supervisor.stop's `note`: who kept its mount, or
    "still busy") says: that it was ended, why, and what became of its journal."""
    copies = "" if note == "still busy" or note.startswith("not answering") else \
        " (those copies now answer ENOTCONN)"
    return f"its capture was ended although it was {note}{copies}; {cap.ended()}"


ZYGOTE_ENV = zygote_mod.ENV
ZYGOTE_ANSWER_SECONDS = 60  # the first answer waits for the template's imports


class Zygote:
    """The daemon's end of the worker template (app/engine/zygote.py): started on the first
    spawn, asked for a forked worker per spawn; None from fork() when it cannot answer (then
    the worker is started anew, and the template restarted at the next spawn)."""

    def __init__(self):
        self.proc = None  # SpawnedChild
        self.sock = None  # trio socket
        self.lock = trio.Lock()

    async def _start(self) -> None:
        started = zygote_mod.take_early()  # the one started with the daemon's process
        if started is None or started[0].poll() is not None:
            if started is not None:
                started[1].close()
            started = await trio.to_thread.run_sync(zygote_mod.spawn)
        self.proc = SpawnedChild(started[0])
        self.sock = trio.socket.from_stdlib_socket(started[1])
        trio.lowlevel.spawn_system_task(self._reap, self.proc)

    async def _reap(self, proc) -> None:
        """Reaped as soon as it ends (killed, or after the daemon let it go)."""
        try:
            await proc.wait()  # cancelled at the run's end (then the template ends on its own)
        except OSError as exc:
            log.error("worker template pid %s: %s", proc.pid, exc)
            return
        if proc is self.proc:
            log.warning("worker template pid %s ended (status %s): another starts with the next "
                        "worker", proc.pid, proc.returncode)
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.proc = None  # it ends when its socket closes; _reap waits for it

    async def fork(self, spec_arg: str, fd: int) -> AdoptedProcess | None:
        """A forked worker holding `fd`; None when the template could not say (then `fd` may
        be held by a worker whose answer was lost: the caller starts one anew on a new socket)."""
        async with self.lock:
            for _attempt in range(2):  # a template found dead before the ask: another, once
                try:
                    if self.sock is None:
                        await self._start()
                    await self.sock.sendmsg([json.dumps({"spec": spec_arg}).encode()],
                                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
                except OSError as exc:
                    log.error("worker template pid %s: %s", getattr(self.proc, "pid", None), exc)
                    self.close()
                    continue
                try:
                    return await self._answer()
                except (OSError, ValueError, trio.TooSlowError) as exc:
                    log.error("worker template pid %s: %s", getattr(self.proc, "pid", None), exc)
                    self.close()
                    return None
            return None

    async def _answer(self) -> AdoptedProcess:
        with trio.fail_after(ZYGOTE_ANSWER_SECONDS):
            data, anc, _flags, _addr = await self.sock.recvmsg(65536, socket.CMSG_SPACE(4))
        fds = array.array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        answer = json.loads(data) if data else {"error": "it ended"}
        if "pid" in answer and len(fds) == 1:
            return AdoptedProcess(int(answer["pid"]), pidfd=fds[0])
        for extra in fds:
            os.close(extra)
        raise OSError(answer.get("errno") or errno.EPROTO, str(answer.get("error", answer)))


_zygote: tuple[object, Zygote] | None = None  # (the trio run it belongs to, the template)


def zygote() -> Zygote | None:
    global _zygote
    if os.environ.get(ZYGOTE_ENV, "1") == "0":
        return None
    token = trio.lowlevel.current_trio_token()
    if _zygote is None or _zygote[0] is not token:
        if _zygote is not None:
            _zygote[1].close()
        _zygote = (token, Zygote())
    return _zygote[1]


def close_zygote() -> None:
    global _zygote
    if _zygote is not None:
        _zygote[1].close()
        _zygote = None


async def spawn(spec) -> tuple[WorkerLink | None, dict]:
    """Start a capture worker (forked from the template, or anew when that cannot answer);
    wait for its "ready" (or error) event."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = None
    template = zygote()
    if template is not None:
        proc = await template.fork(spec.to_arg(), theirs.fileno())
        if proc is None:  # whatever may hold that socket now, the new worker gets its own
            ours.close()
            theirs.close()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if proc is None:
        argv = [sys.executable, "-m", "app.engine.capture", "--spec", spec.to_arg(),
                "--fd", str(theirs.fileno())]
        proc = await trio.lowlevel.open_process(argv, pass_fds=(theirs.fileno(),),
                                                start_new_session=True, env=zygote_mod.worker_env())
    theirs.close()
    lines = protocol.TrioLines(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    msg = None
    with trio.move_on_after(READY_SECONDS):
        try:
            msg = await lines.next()
        except (trio.BrokenResourceError, protocol.ProtocolError):
            msg = None
    if msg is None or msg.get("event") != "ready":
        if msg is None:
            with trio.move_on_after(5):
                await proc.wait()
            status = (f" with status {proc.returncode}" if proc.returncode is not None and proc.returncode >= 0
                      else "")
            msg = {"event": "error", "message": f"capture worker for {spec.key} exited{status}"
                   if proc.returncode is not None else
                   f"capture worker for {spec.key} did not get ready within {READY_SECONDS} s"}
        if proc.returncode is None:
            proc.kill()
        await lines.stream.aclose()
        return None, msg
    return WorkerLink(proc, lines, msg), msg


async def adopt(path: str) -> WorkerLink | None:
    """Connect to a worker's take-over socket; None when nobody answers (a dead worker's)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except OSError:
        sock.close()
        return None
    lines = protocol.TrioLines(trio.SocketStream(sock))
    with trio.move_on_after(10):
        msg = await lines.next()
        if msg and msg.get("event") == "ready" and msg.get("pid"):
            if msg.get("version") != protocol.VERSION:
                log.error("%s: worker pid %s speaks protocol %s, not %s: left running, not taken over",
                          path, msg.get("pid"), msg.get("version"), protocol.VERSION)
                await lines.stream.aclose()
                return None
            return WorkerLink(AdoptedProcess(msg["pid"]), lines, msg)
    await lines.stream.aclose()
    return None


def holders(path: str, dev: tuple[int, int], exclude: set[int], *,
            writing: bool = False) -> list[dict]:
    """Processes with a file or cwd on the mount of device `dev` at `path` (in any namespace);
    `writing`: only those with a file there open for writing.

    Matched by mount, not by name: a file opened in the lower tree before the mount has the
    same path but does not hold the mount. Nothing is looked up or stat'ed on any file system
    (another FUSE mount that does not answer would hang the caller): each process's mount
    namespace says which mount ids are `dev` (/proc/PID/mountinfo, read once per namespace);
    a file's mount id is in /proc/PID/fdinfo, a working directory's is read from an O_PATH
    descriptor of /proc/PID/cwd, which opens nothing on its file system."""
    want = dev
    ids_of: dict[str, frozenset[int]] = {}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        pid = int(name)
        try:
            ids = mounts.namespace_mount_ids(pid, ids_of, lambda m: (m.major, m.minor) == want)
        except OSError:
            continue
        if not ids:  # its namespace does not see the mount: nothing of it can be held there
            continue
        held = _held_in(pid, ids, path, writing)
        if held is not None:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            found.append({"pid": pid, "name": comm, "file": held})
    return found


def _fdinfo_mount_id(path: str) -> int | None:
    try:
        return int(mounts.fdinfo(path)[b"mnt_id"])
    except (OSError, ValueError, KeyError):
        return None


def _held_in(pid: int, ids: frozenset[int], path: str, writing: bool = False) -> str | None:
    """What of `pid` is on one of the mounts `ids`: its working directory or an open file
    (`writing`: a file open for writing only)."""
    try:
        fd = None if writing else os.open(f"/proc/{pid}/cwd", os.O_PATH | os.O_CLOEXEC)
    except OSError:
        fd = None
    if fd is not None:
        try:
            if _fdinfo_mount_id(f"/proc/self/fdinfo/{fd}") in ids:
                return f"{path} (working directory)"
        finally:
            os.close(fd)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for n in fds:
        if writing:
            try:
                info = mounts.fdinfo(f"/proc/{pid}/fdinfo/{n}")
                if int(info[b"mnt_id"]) not in ids or not int(info[b"flags"], 8) & 3:
                    continue  # (O_WRONLY or O_RDWR)
            except (OSError, ValueError, KeyError):
                continue
        elif _fdinfo_mount_id(f"/proc/{pid}/fdinfo/{n}") not in ids:
            continue
        try:
            return os.readlink(f"/proc/{pid}/fd/{n}")  # the kernel's name: no lookup
        except OSError:
            return f"{path} (fd {n})"
    return None


def mount_dev(path: str, fsname: str) -> tuple[int, int] | None:
    for m in reversed(mounts.read_mountinfo()):
        if m.mount_point == path and m.source == fsname:
            return m.major, m.minor
    return None


def nested_mounts(path: str, table=None) -> list[str]:
    prefix = path.rstrip("/") + "/"
    return [m.mount_point for m in (table if table is not None else mounts.read_mountinfo())
            if m.mount_point.startswith(prefix)]


class Supervisor:
    """Every capture of this daemon, by (kind, key)."""

    def __init__(self, lay: Layout, host: str, store):
        self.layout = lay
        self.host = host
        self.store = store  # the daemon's configuration (remote targets are looked up there)
        self.captures: dict[tuple[str, str], Captured] = {}
        self.locks: dict[tuple[str, str], trio.Lock] = {}
        self.nursery: trio.Nursery | None = None
        self.on_death = None  # async (Captured) -> None: set by the daemon
        self.deaths: dict[tuple[str, str], list[float]] = {}
        self.lost: dict[tuple[str, str], str] = {}  # why a capture is not running (its worker
        # died, or the start of a worker failed: the newest of them)
        self.refused: dict[tuple[str, str], int] = {}  # the errno of that failed start (e.g.
        # EMEDIUMTYPE: not the device the entry was made for), while it is the newest
        self.died: dict[tuple[str, str], str] = {}  # its worker died (and none runs since)
        self.detached: list[Captured] = []  # lazily unmounted, still serving files open there
        self.waits: dict[tuple[str, str], tuple[str, float]] = {}  # what a stop waits for now:
        # (words, when it gives up: monotonic); `ping` says it while the daemon stops, and
        # unmount-all / detach-all as it begins (says_waits)
        self._waits_changed = trio.Event()

    @contextlib.contextmanager
    def waiting(self, cap: Captured, what: str, seconds: float, then: str = ""):
        """A stop's wait on a worker, said in the log and by `ping`: a `daemon stop` sat in
        these up to 45 s per entry without a word (the CLI gave up after 10 s: 'still running')."""
        words = (f"{cap.key}: {what}; worker pid {cap.link.pid}{process_state(cap.link.pid)}; "
                 f"given up after {seconds:.0f} s{then}")
        log.info("%s", words)
        self.waits[(cap.kind, cap.key)] = (words, time.monotonic() + seconds)
        self._waits_changed.set()
        self._waits_changed = trio.Event()
        try:
            with trio.move_on_after(seconds):
                yield
        finally:
            self.waits.pop((cap.kind, cap.key), None)

    def waits_now(self, kind: str | None = None) -> list[dict]:
        now = time.monotonic()
        return [{"entry": key, "what": words, "seconds_left": max(0, round(until - now, 1))}
                for (k, key), (words, until) in self.waits.items() if kind in (None, k)]

    async def says_waits(self, kind: str, say, work):
        """`await work()`, and each wait of a stop of a `kind` capture meanwhile told to
        `say(words)` once, as it begins (unmount-all and detach-all sat in them without a word,
        up to 45 s each: a capture shipping its queue, a worker that does not answer)."""
        async def tell() -> None:
            said: set[str] = set()
            while True:
                changed = self._waits_changed  # (the one a new wait sets: taken before looking)
                for w in self.waits_now(kind):
                    if w["what"] not in said:
                        said.add(w["what"])
                        await say(w["what"])
                await changed.wait()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tell)
            try:
                return await work()
            finally:
                nursery.cancel_scope.cancel()

    def lock(self, kind: str, key: str) -> trio.Lock:
        return self.locks.setdefault((kind, key), trio.Lock())

    def get(self, kind: str, key: str) -> Captured | None:
        cap = self.captures.get((kind, key))
        if cap is not None and not cap.link.alive():
            return None
        return cap

    def pids(self) -> set[int]:
        return {c.link.pid for c in self.captures.values()}

    def spec(self, kind: str, key: str, entry, **extra):
        from app.engine.capture import Spec
        from app.services.units import parse_size
        target = getattr(entry, "target", None)
        limit = getattr(entry, "queue_limit", None)
        return Spec(kind=kind, key=key, state=self.layout.state(kind, key),
                    queue_limit=parse_size(limit) if limit else
                    layout_mod.default_queue_limit(self.layout.state_dir),
                    on_full=getattr(entry, "on_full", None) or "pull-ahead",
                    run=self.layout.run(kind, key), adopt=self.layout.adopt_socket(kind, key),
                    fsname=self.layout.fsname(kind),
                    target=None if not target else target_spec(target, self.store.load()),
                    claim={"entry": f"{kind}:{key}", "host": self.host,
                           "adopt": bool(getattr(entry, "adopt_target", False))}, **extra)

    def register(self, cap: Captured) -> None:
        self.captures[(cap.kind, cap.key)] = cap
        self.lost.pop((cap.kind, cap.key), None)
        self.died.pop((cap.kind, cap.key), None)
        self.refused.pop((cap.kind, cap.key), None)
        if self.nursery is not None:
            self.nursery.start_soon(self._watch, cap)

    async def _watch(self, cap: Captured) -> None:
        await cap.link.proc.wait()
        if self.captures.get((cap.kind, cap.key)) is not cap:
            return
        del self.captures[(cap.kind, cap.key)]
        if cap.ending:
            return
        log.error("capture of %s stopped unexpectedly (worker pid %s)", cap.key, cap.link.pid)
        deaths = [t for t in self.deaths.get((cap.kind, cap.key), []) if time.monotonic() - t < RESPAWN_WINDOW]
        deaths.append(time.monotonic())
        self.deaths[(cap.kind, cap.key)] = deaths
        self.lost[(cap.kind, cap.key)] = self.died[(cap.kind, cap.key)] = \
            f"its worker (pid {cap.link.pid}) died"
        self.refused.pop((cap.kind, cap.key), None)
        if self.on_death is not None and len(deaths) < RESPAWN_LIMIT:
            await self.on_death(cap)
        elif len(deaths) >= RESPAWN_LIMIT:
            self.lost[(cap.kind, cap.key)] = (f"its worker died {len(deaths)} times within "
                                              f"{RESPAWN_WINDOW:.0f} s: not restarted (see the log)")

    async def adopt_all(self) -> list[tuple[str, WorkerLink]]:
        """Every worker waiting on a take-over socket in our run directory."""
        found = []
        for kind in ("fs", "block"):
            for path in sorted(glob.glob(os.path.join(self.layout.run_dir, kind, "*.sock"))):
                link = await adopt(path)
                if link is not None:
                    found.append((kind, link))
        return found

    async def stop(self, cap: Captured, *, abort: bool = False, lifted: bool = True) -> str:
        """Let a worker end (its mount is gone) or end it (`abort`: its mount lives on in other
        mount namespaces): it drains its journal and marks the end first. Returns a note
        naming who kept the mount, or "". `lifted`: our unmount was not a lazy one."""
        cap.ending = True
        with trio.move_on_after(0 if abort else ABORT_AFTER_SECONDS):
            await cap.link.proc.wait()
        note = ""
        copies = []
        if cap.link.alive():
            dev = cap.link.info.get("fuse_dev")
            copies = mounts.namespace_holders(*dev) if dev else []
            if not copies and lifted and not abort and not cap.link.unanswered and \
                    not process_state(cap.link.pid):
                # its mount is gone everywhere: it ships what is queued (up to 30 s, less once
                # it finds its target unreachable) and ends. That is not "still busy" (a detach
                # with the target's link down said so after 30 s)
                with self.waiting(cap, "waiting for its capture to ship what is queued to "
                                  "its target and end", STOP_WAIT_SECONDS):
                    await cap.link.proc.wait()
        if cap.link.alive():
            cap.holders = [mounts.describe_holders([h]) for h in copies]
            note = mounts.describe_holders(copies) if copies else "still busy"
            answered = False
            # a worker that does not answer (stopped, hung) is not waited for without end (an
            # unmount-all hung on it for good, its mount already gone); one that left a call
            # unanswered already is given a few seconds
            with self.waiting(cap, f"asked its capture to end ({note}), waiting for its answer",
                              5 if cap.link.unanswered else STOP_WAIT_SECONDS,
                              ", then it is killed"):
                try:
                    await cap.link.call("stop", abort=True)
                except MirrorError:
                    pass
                answered = True
            if not answered:
                note = f"not answering{process_state(cap.link.pid)}"
                with trio.move_on_after(0):
                    await cap.link.proc.wait()
            else:
                with self.waiting(cap, "waiting for its capture to drain its journal and end",
                                  STOP_WAIT_SECONDS, ", then it is killed"):
                    await cap.link.proc.wait()
            if cap.link.alive():
                log.error("%s: worker pid %s did not end; killing it", cap.key, cap.link.pid)
                os.kill(cap.link.pid, 9)
        self.captures.pop((cap.kind, cap.key), None)
        await cap.link.close()
        cap.end = capture_end(self.layout.state(cap.kind, cap.key))
        return note

    async def figures_of(self, caps: list[Captured]) -> list[dict]:
        """Every worker of `caps` asked at once: a status waited for each worker that does not
        answer in turn (N of them stopped or hung: N x 10 s), now one patience for all."""
        return await gather(*[lambda cap=cap: self.figures(cap) for cap in caps])

    async def figures(self, cap: Captured) -> dict:
        link = cap.link
        # A worker that left a call unanswered is given a second, not ten, by every status
        # after (the dashboard's refresh and `status` waited 10 s each time it was asked)
        patience = 1 if link.unanswered else 10
        try:
            with trio.move_on_after(patience):
                reply = await link.call("status")
                return {k: v for k, v in reply.items() if k != "ok"}
            since = link.silent_since or time.monotonic()
            return {"error": f"the worker (pid {link.pid}) has not answered for "
                             f"{max(patience, round(time.monotonic() - since))} s"
                             f"{process_state(link.pid)}"}
        except MirrorError as exc:
            return {"error": str(exc)}

    # -- file-system entries ----------------------------------------------------------------
    def start_failed(self, kind: str, key: str, r: Result) -> Result:
        """A worker that could not be started: its reason is why status says the entry is not
        captured (last_error) until one runs, the newest failure, after a death before it."""
        died = self.died.get((kind, key))
        self.lost[(kind, key)] = f"{died}, and starting it again failed: {r.message}" if died \
            else r.message
        if r.errno:
            self.refused[(kind, key)] = r.errno
        else:
            self.refused.pop((kind, key), None)
        return r

    async def mount(self, entry: FsEntry) -> Result:
        path = entry.path
        async with self.lock("fs", path):
            cap = self.get("fs", path)
            if cap is not None:
                return Result("mount", path, Outcome.UNCHANGED, f"mirrorfs already mounted on {path}")
            from app.engine.failover import refusal
            refused = refusal(self.layout, "fs", path, "mount")
            if refused is not None:
                return refused
            old = self.detached_busy(path)
            if old is not None:  # it still owns the journal and target
                who = ", ".join(old.holders) or "processes"
                return Result("mount", path, Outcome.FAILED, f"{path} was lazily unmounted and its "
                              f"capture (worker pid {old.link.pid}) still serves files that {who} "
                              "keep open there; mount again once they are closed", errno.EBUSY,
                              REFUSED)
            try:
                if mount_dev(path, self.layout.fsname("fs")) is None:  # not a dead mount of ours
                    check_entry(entry)
                # (its target resolved here: one naming no configured [[target]] is this
                # entry's failure, not mount-all's, which went on with the others)
                spec = self.spec("fs", path, entry, atime=entry.replicate_atime)
            except MirrorError as exc:
                return Result.from_error("mount", path, exc)
            link, msg = await spawn(spec)
            if link is None:
                return self.start_failed("fs", path, Result(
                    "mount", path, Outcome.FAILED, msg.get("message", "worker failed"),
                    msg.get("errno")))
            self.register(Captured("fs", path, entry, link))
        note = f"; catching up in the background ({msg.get('reason')})" if msg.get("reason") else ""
        nested = nested_mounts(path)
        if nested:
            note += f"; not captured (mounted below): {', '.join(nested)}"
        return Result("mount", path, Outcome.OK, f"mounted mirrorfs on {path}{note}",
                      details={"pid": link.pid, "reason": msg.get("reason")})

    async def unmount(self, path: str, force: bool = False) -> Result:
        async with self.lock("fs", path):
            cap = self.get("fs", path)
            dev = mount_dev(path, self.layout.fsname("fs"))
            if cap is None and dev is None:
                return Result("unmount", path, Outcome.UNCHANGED, f"mirrorfs is not mounted on {path}")
            held = await trio.to_thread.run_sync(  # a scan of /proc: off the event loop
                holders, path, dev, {os.getpid()} | self.pids()) if dev else []
            if held and not force:
                names = "; ".join(f"pid {h['pid']} ({h['name']}) holds {h['file']}" for h in held)
                return Result("unmount", path, Outcome.FAILED, f"files are open under {path}: {names}; "
                              "close them or unmount with --force (lazy unmount); nothing was "
                              "changed", errno.EBUSY, details={"holders": held, **REFUSED})
            lazy = False
            if dev is not None:
                try:
                    mounts.umount(path, 0)
                except MirrorError as exc:
                    if exc.errno != errno.EBUSY or not force:
                        return Result.from_error("unmount", path, exc)
                    mounts.umount(path, mounts.MNT_DETACH)
                    lazy = True
            if cap is None:
                return Result("unmount", path, Outcome.OK, f"unmounted a dead mirrorfs from {path}")
            if lazy:
                cap.ending = True
                cap.holders = [f"pid {h['pid']} ({h['name']})" for h in held]
                self.captures.pop(("fs", path), None)
                self.detached.append(cap)
                return Result("unmount", path, Outcome.OK, f"lazy unmount of {path}: detached now, "
                              f"capture ends when {_who(cap.holders)} close their files",
                              details={"lazy": True, "holders": held})
            note = await self.stop(cap)
        if note:
            return Result("unmount", path, Outcome.OK, f"unmounted mirrorfs from {path}; "
                          f"{forced_end(note, cap)}", details={"holders": cap.holders})
        return Result("unmount", path, Outcome.OK, f"unmounted mirrorfs from {path}; {cap.ended()}")

    def detached_busy(self, path: str) -> Captured | None:
        self.detached = [c for c in self.detached if c.link.alive()]
        return next((c for c in self.detached if c.key == path), None)


async def gather(*thunks) -> list:
    """Each async thunk run at once, their results in the thunks' order. An exception is
    raised as itself (the first one, once all have ended), not in a nursery's ExceptionGroup:
    callers catch MirrorError as they did when these ran one after another."""
    results: list = [None] * len(thunks)
    errors: list[BaseException] = []

    async def one(i, thunk):
        try:
            results[i] = await thunk()
        except Exception as exc:  # noqa: BLE001 - raised below, unwrapped
            errors.append(exc)
    async with trio.open_nursery() as nursery:
        for i, thunk in enumerate(thunks):
            nursery.start_soon(one, i, thunk)
    if errors:
        raise errors[0]
    return results


def _who(names: list[str]) -> str:
    return ", ".join(names) or "open files"


def lazy_state(names: list[str]) -> str:
    """A lazily unmounted entry's state while its detached capture serves files open there."""
    if not names:
        return "lazily unmounted: capture goes on until the files open there are closed"
    return (f"lazily unmounted: capture goes on until {', '.join(names)} "
            f"{'closes its' if len(names) == 1 else 'close their'} files")


def target_spec(target: str, config) -> dict:
    """An entry's target as a worker spec: a local path, or NAME:PATH of a configured remote."""
    if target.startswith("/"):
        return {"local": target}
    name, _, rel = target.partition(":")
    remote = config.target_host(name)
    if remote is None:
        raise MirrorError(f"target {target}: no remote target named {name!r} is configured",
                          errno=errno.ENOENT, obj=target)
    return {"remote": {**remote.to_spec(), "path": rel}}


def running_entry(entry, info: dict):
    """The entry an adopted worker captures, as its hello says it (its target): the file may
    have been edited while no daemon ran, and the worker still replicates where it did."""
    spec = info.get("target", ...)
    if entry is None or spec is ...:  # (a worker of before the hello said it)
        return entry
    target = None if spec is None else spec.get("local") or \
        f"{spec['remote']['name']}:{spec['remote']['path']}"
    return replace(entry, target=target)


def _inside(inner: str, outer: str) -> bool:
    return inner != outer and inner.startswith(outer.rstrip("/") + "/")


def check_entry(entry: FsEntry) -> None:
    """What a mount needs beyond the configuration's own checks: the directory still there."""
    path = entry.path
    if not os.path.isabs(path) or os.path.normpath(path) == "/":
        raise MirrorError(f"{path}: not an absolute directory other than /", errno=errno.EINVAL, obj=path)
    if not os.path.isdir(path):
        raise MirrorError(f"entry path {path} does not exist or is not a directory",
                          errno=errno.ENOENT, obj=path)
    why = mounts.pseudo_fs_refusal(os.path.realpath(path), path)  # (a hand-made entry)
    if why:
        raise MirrorError(why, errno=errno.EINVAL, obj=path)
    if entry.target is None or not entry.target.startswith("/"):
        return
    real, target = os.path.realpath(path), os.path.realpath(entry.target)
    if target == real:
        raise MirrorError(f"target {entry.target} is the replicated directory itself",
                          errno=errno.EINVAL, obj=entry.target)
    if _inside(target, real):
        raise MirrorError(f"target {entry.target} is inside the replicated directory {path}",
                          errno=errno.EINVAL, obj=entry.target)
    if _inside(real, target):
        raise MirrorError(f"target {entry.target} contains the replicated directory {path}",
                          errno=errno.EINVAL, obj=entry.target)
    probe = target if os.path.isdir(target) else os.path.dirname(target)
    if not os.path.isdir(probe):
        raise MirrorError(f"target {entry.target}: parent {probe} does not exist",
                          errno=errno.ENOENT, obj=entry.target)
    if not os.access(probe, os.W_OK) or os.statvfs(probe).f_flag & os.ST_RDONLY:
        ro = os.statvfs(probe).f_flag & os.ST_RDONLY
        raise MirrorError(f"target {entry.target} is not writable"
                          + (" (read-only file system)" if ro else ""), errno=errno.EROFS if ro
                          else errno.EACCES, obj=entry.target)


__all__ = ["Supervisor", "Captured", "lazy_state", "WorkerLink", "Zygote", "spawn", "close_zygote", "adopt", "holders",
           "layout_mod"]
