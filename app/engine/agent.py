"""`mirrorsetup serve-target --root DIR`: the target side of a remote replica.

sshd starts it per connection as the forced command of the replication key (`command=…,restrict`
in authorized_keys): no port of ours listens and no daemon runs on the target. It speaks
app/engine/wire.py on stdin/stdout, logs to stderr, and exits when its input ends or the
source's heartbeats stop (so a connection lost in a network fault never keeps a replica
locked for long).

A replica is a directory (file-system entry) or a file (block entry) named by the source
relative to --root; nothing is ever written outside --root: names are checked (no absolute
paths, no `..`), every path is resolved one component at a time without following symlinks.
Its bookkeeping lives in ROOT/.mirrorsetup/replicas/ID/: the agent's own journal (records are
durable there before they are acknowledged as received), state.json (whose replica it is, its
generation, whether it is consistent, and at which seq) and a lock (one source at a time; a
second source is refused by name; the same source reconnecting takes over from its old,
stale session).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections import deque
from pathlib import Path

from app.services import wire
from app.engine.journal import (KIND_BLOCK, KIND_FS, LEGACY_APPLIED_FILE, RELEASED_FILE,
                                RESERVED_FILE, Journal, JournalGap, decode_at, held_on_disk,
                                read_small_file, write_small_file)
from app.engine.lowlevel import open_beneath, safe_relpath
from app.engine.shipper import TargetUnavailable
from app.engine.target import CATCHING_UP, Queried

log = logging.getLogger("mirrorsetup.agent")
META = ".mirrorsetup"
HEARTBEAT_TIMEOUT = 15.0  # no frame from the source for this long: the session is dead
APPLY_SYNC_SECONDS = 1.0  # the applied position is made durable (syncfs) this often
APPLY_SYNC_MIN_SECONDS = 0.05  # ... and when caught up, but not more often than this
APPLY_IDLE_WAIT = 0.2  # the applier, caught up and synced, waits this long for records at a time
PAUSE_RETRY_SECONDS = 2.0
TAKE_OVER_SECONDS = 10.0  # a stale session of the same source is ended within this
PATH_ARGS = ("path", "old", "new", "src")
QUERY_THREADS = 8  # queries answered at a time (a walk sends many ahead of itself)
READ_AHEAD_BYTES = 8 << 20  # frames read while an earlier one is handled (Agent._frames)
# a replica's bookkeeping without its state (remove() finds it by name: _stateless)
STATELESS = "no state.json: left by a session that ended before it wrote one"


def replica_id(rel: str) -> str:
    from app.services.layout import entry_id
    return entry_id(rel)


class AgentError(Exception):
    def __init__(self, code: str, message: str, err: int | None = None, **extra):
        super().__init__(message)
        self.code, self.errno, self.extra = code, err, extra  # extra: said beside the message


class DamagedState(Exception):
    """A replica's state.json that cannot be read as its state (a damaged disk, a hand edit)."""

    def __init__(self, message: str, err: int):
        super().__init__(message)
        self.errno = err

    def refusal(self, rel: str) -> AgentError:
        """How a session or a command for the replica `rel` is refused."""
        return AgentError("state", f"replica {rel}: {self}: nothing was changed", self.errno)


def read_state(directory: Path, dir_fd: int | None = None) -> dict | None:
    """A replica's state.json, the one reader of it: None when there is none (or it is empty),
    DamagedState (its errno kept, EUCLEAN for its contents) when it is not a JSON object.
    `dir_fd`: `directory` opened already (beneath the root), read through it."""
    path = directory / "state.json"
    try:
        text = read_small_file(directory, "state.json", dir_fd=dir_fd)
    except OSError as exc:
        raise DamagedState(f"its state file {path} could not be read: {exc.strerror} "
                           f"({errno.errorcode.get(exc.errno, exc.errno)})", exc.errno) from None
    if not text:
        return None
    try:
        state = json.loads(text)
    except ValueError as exc:
        raise DamagedState(f"its state file {path} is damaged (not JSON: {exc})", errno.EUCLEAN) \
            from None
    if not isinstance(state, dict):
        raise DamagedState(f"its state file {path} is damaged (not a JSON object)", errno.EUCLEAN)
    return state


class Replica:
    """One replica's bookkeeping under ROOT/.mirrorsetup/replicas/ID."""

    def __init__(self, root_fd: int, root: str, rel: str, kind: str):
        self.root_fd, self.root, self.rel, self.kind = root_fd, root, rel, kind
        self.id = replica_id(rel)
        self.dir = Path(root) / META / "replicas" / self.id
        self.lock_fd: int | None = None
        self._save_lock = threading.Lock()
        self._make_dir()

    def _make_dir(self) -> None:
        os.close(open_beneath(self.root_fd, f"{META}/replicas/{self.id}".encode(), make_dirs=True))

    def _open_lock(self) -> int:
        return os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def state(self) -> dict:
        """Its state ({} for a new replica); a damaged state file refuses the session or the
        command, naming the file (AgentError "state"), rather than raising out of it."""
        try:
            return read_state(self.dir) or {}
        except DamagedState as exc:
            raise exc.refusal(self.rel) from None

    def save(self, state: dict) -> None:
        """Written whole, one writer at a time: the session's reader (a MARK) and its applier
        (consistent once applied) both save it, through the same temporary file, and the
        second rename found it gone (FileNotFoundError, the agent ended: a traceback in
        tests/test_remote.py's source-crash test under load). The dict is copied first (one
        step under the GIL): the other thread may be changing it."""
        with self._save_lock:
            text = json.dumps(dict(state), indent=1, sort_keys=True) + "\n"
            write_small_file(self.dir, "state.json", text)

    def lock(self, source: dict, action: str = "replicate") -> None:
        """One session per replica. The same source's stale session (a lost connection not yet
        noticed here) is ended; another source is refused by name. A replication session never
        ends the same source's fail-over session (promote, discard, failback: an
        administrator's command, whose ssh would end with status 255): it waits for it, then
        is refused as busy, and its capture tries again later."""
        fd = self._open_lock()
        deadline = time.monotonic() + TAKE_OVER_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if self._lock_is_there(fd):
                    break
                os.close(fd)  # a session that could not create this replica removed it (forget)
                self._make_dir()
                fd = self._open_lock()
                continue
            except BlockingIOError:
                holder = _holder(fd)
                who = holder.get("source")  # None: its holder has not said who it is yet
                ours = who == source and _is_agent(holder.get("pid"))
                theirs = holder.get("action", "replicate")
                waits = ours and action == "replicate" and theirs != "replicate"
                if waits and time.monotonic() > deadline:
                    os.close(fd)
                    raise AgentError("busy", f"replica {self.rel} is busy with a {theirs} of this "
                                     f"source (agent pid {holder['pid']})", errno.EBUSY)
                if (who is not None and who != source) or time.monotonic() > deadline:
                    os.close(fd)
                    who = who or {}
                    raise AgentError("locked", f"replica {self.rel} is locked by agent pid "
                                     f"{holder.get('pid', '?')} for {who.get('entry', '?').split(':', 1)[-1]} "
                                     f"on {who.get('host', '?')} (another source)", errno.EBUSY) from None
                if ours and not waits:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(holder["pid"]), signal.SIGTERM)  # our own stale session
                time.sleep(0.2)
        # who holds it, written whole over the last holder's words (never an empty file: a
        # session that looks then would take a moment's silence for another source)
        said = json.dumps({"pid": os.getpid(), "source": source, "action": action}).encode()
        os.pwrite(fd, said, 0)
        os.ftruncate(fd, len(said))
        self.lock_fd = fd

    def _lock_is_there(self, fd: int) -> bool:
        try:
            st = os.stat(self.dir / "lock", follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)

    def forget(self) -> None:
        """The bookkeeping of a replica whose creation failed (it holds no data yet): the lock
        goes last, still held; a session waiting for it finds its file gone and makes it again."""
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                if name != "lock":
                    os.unlink(self.dir / name)
            os.unlink(self.dir / "lock")
            os.rmdir(self.dir)


def _is_agent(pid) -> bool:
    """Is `pid` a running agent? (a lock file may name a session long gone, whose pid another
    process has since; that one is never signalled)"""
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            return b"serve-target" in f.read()
    except (OSError, TypeError, ValueError):
        return False


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def check_beneath(dir_fd: int, text: str, checked: set[bytes] | None = None) -> bytes:
    """`text` as a path below `dir_fd` that a remote source chose: normal and relative, its
    parent directories reached without a symlink (ENOTDIR otherwise). `checked`: parents
    known to be good, skipped, and added to."""
    rel = safe_relpath(text)
    parent = rel.rpartition(b"/")[0]
    if checked is None or parent not in checked:
        os.close(open_beneath(dir_fd, parent))
        if checked is not None:
            checked.add(parent)
    return rel


class ConfinedFsApplier:
    """FsApplier whose record paths a remote source chose: checked, and their parent
    directories resolved without symlinks, before anything is done."""

    # What can turn a checked directory into something else (a symlink put in its place
    # later needs one of these first: nothing the applier does replaces a directory otherwise).
    GONE_OPS = {"rename", "unlink", "rmdir", "remove", "prune", "put"}

    def __init__(self, target_fd: int):
        from app.engine.applier import FsApplier
        self.inner = FsApplier(target_fd)
        self.fd = target_fd
        self._safe: set[bytes] = {b""}
        self._above: set[bytes] = {b""}  # the checked parents and every directory above them

    def _check(self, text: str) -> bytes:
        rel = check_beneath(self.fd, text, self._safe)
        parent = rel.rpartition(b"/")[0]
        while parent not in self._above:
            self._above.add(parent)
            parent = parent.rpartition(b"/")[0]
        return rel

    def apply(self, rec) -> None:
        args, checked = rec.args, {}
        for key in PATH_ARGS:
            if args.get(key):
                checked[key] = self._check(args[key])
        if rec.op in self.GONE_OPS and any(checked.get(key) in self._above
                                             for key in ("path", "old", "new")):
            # a checked directory, or one above it, goes or moves: every check again from
            # here on (any other name's removal, the usual case in a mirror, keeps them; an
            # lstat of each such name to see whether it was a directory cost a fifth of the
            # agent's time in a first copy)
            self._safe, self._above = {b""}, {b""}
        self.inner.apply(rec)

    def apply_run(self, records, start: int, skip=None, instead=None) -> int:
        """The inner applier's compiled runs, each record's paths checked as `apply` checks
        them first. A run's records make and remove files, never a directory or a symlink, so
        what a check found stays true while the run is applied; a record that could undo a
        check (a name removed or put over that is, or is above, a checked directory) ends the
        run, and `apply` does it."""
        return self.inner.apply_run(records, start, skip, instead, check=self._run_check)

    def _run_check(self, rec) -> bool:
        try:
            checked = [self._check(rec.args[key]) for key in PATH_ARGS if rec.args.get(key)]
        except (OSError, ValueError):
            return False  # (`apply` checks it again and says why)
        return not (rec.op in self.GONE_OPS and any(c in self._above for c in checked))

    def sync(self) -> None:
        self.inner.sync()

    def close_files(self) -> None:
        self.inner.close_files()

    def close(self) -> None:
        self.inner.close()


class Agent:
    def __init__(self, root: str, rfile, wfile):
        self.root = os.path.realpath(root)
        self.rfile, self.wfile = rfile, wfile
        self.wlock = threading.Lock()
        self.replica: Replica | None = None
        self.journal: Journal | None = None
        self.target = None
        self.stop = threading.Event()
        self.last_frame = time.monotonic()
        self.paused: str | None = None
        self.codec = wire.Codec("none")
        self.state: dict = {}
        self.quiet = False  # applying before a promotion: the source waits for WELCOME only
        self.source_version = wire.VERSION  # the wire version the source speaks (its HELLO)
        self._queries: deque[dict] = deque()  # asked, not yet being answered
        self._queries_lock = threading.Lock()
        self._query_threads = 0

    # -- output
    def send(self, kind: int, obj: dict) -> None:
        self.send_raw(wire.jframe(kind, obj))

    def send_raw(self, data: bytes) -> None:
        with self.wlock:
            self.wfile.write(data)
            self.wfile.flush()

    def positions(self) -> dict:
        j = self.journal
        t = getattr(self, "target", None)
        return {"received": j.last_seq, "applied": j.released_seq, "ts": time.time(),
                "consistent": bool(self.state.get("consistent")), "paused": self.paused,
                **({"apply_errors": t.errors, "last_error": t.last_error}
                   if getattr(t, "errors", 0) else {}),
                **({"superseded": t.superseded} if getattr(t, "superseded", 0) else {})}

    # -- session
    def run(self) -> int:
        with self.wlock:
            self.wfile.write(wire.GREETING)
            self.wfile.flush()
        try:
            self.root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            self.send(wire.ERROR, {"code": "root", "message": f"serve-target root {self.root}: "
                                   f"{exc.strerror}", "errno": exc.errno})
            return 1
        threading.Thread(target=self._watchdog, daemon=True).start()
        try:
            first = wire.read_frame(self.rfile.read)
            if first is None:
                return 0
            kind, payload = first
            if kind != wire.HELLO:
                raise AgentError("protocol", f"expected HELLO, got {wire.NAMES.get(kind)}")
            hello = json.loads(payload)
            self.hello(hello)
            if hello.get("action", "replicate") in ("replicate", "test"):
                self.serve()
        except AgentError as exc:
            log.error("%s", exc)
            self.send(wire.ERROR, {**exc.extra, "code": exc.code, "message": str(exc),
                                   "errno": exc.errno})
            return 1
        except (wire.WireError, ValueError) as exc:
            log.error("protocol: %s", exc)
            with contextlib.suppress(OSError):
                self.send(wire.ERROR, {"code": "protocol", "message": str(exc), "errno": errno.EPROTO})
            return 1
        finally:
            self.finish()
        return 0

    def _watchdog(self) -> None:
        removed_said = False
        while not self.stop.wait(1.0):
            self._say_heard()
            if time.monotonic() - self.last_frame > HEARTBEAT_TIMEOUT:
                log.error("no frame from the source for %.0f s: ending the session", HEARTBEAT_TIMEOUT)
                self.finish()
                os._exit(3)
            if not removed_said and self._data_removed():
                # what is written now goes to a file no name leads to: a replica nobody could
                # promote, verified "equal" all the same. The source ends the session at this
                # word; the next one makes the data anew and the source copies it whole.
                removed_said = True
                text = (f"replica {self.replica.rel}: its data was removed on the target "
                        f"({self.root}); the next session makes it anew and the source copies it whole")
                log.error("%s", text)
                with contextlib.suppress(OSError):
                    self.send(wire.ERROR, {"code": "gone", "message": text, "errno": errno.ENOENT})

    def _say_heard(self) -> None:
        """The replica's lock file's mtime: when the last frame came from the source (its
        heartbeats come every second). `replica promote` refuses as soon as it sees a frame
        come while it waits for the lock, instead of waiting out this session's timeout."""
        fd = self.replica.lock_fd if self.replica is not None else None
        if fd is not None:
            heard = time.time_ns() - int((time.monotonic() - self.last_frame) * 1e9)
            with contextlib.suppress(OSError):
                os.utime(fd, ns=(heard, heard))

    def _data_removed(self) -> bool:
        """The replica's data (image or directory) this session writes has no name any more."""
        fd = getattr(getattr(self, "target", None), "fd", None)
        if fd is None or getattr(self, "replica", None) is None:
            return False
        try:
            return os.fstat(fd).st_nlink == 0
        except OSError:
            return False

    def hello(self, h: dict) -> None:
        """A target too full to create (or open) the replica refuses it as full, as a full disk
        pauses an existing one; what this session made of a new replica is removed again. The
        source tries again later, and the replica is made once there is room."""
        self._made: tuple[int, bytes] | None = None  # (parent fd, name): the data this session made
        self._fresh: bool | None = None  # whether the replica had no state when this session came
        try:
            self._hello(h)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            new = self.replica is not None and (
                self._fresh if self._fresh is not None else not self.replica.state())
            if new:
                self._unmake()
                self.replica.forget()
            raise AgentError("full", f"target full ({exc.strerror}): no room below {self.root} "
                             f"for {'the new ' if new else ''}replica {h.get('path')}",
                             exc.errno) from None
        finally:
            if self._made is not None:
                os.close(self._made[0])

    def _unmake(self) -> None:
        """The replica's directory or image this session created (nothing was written in it)."""
        if self._made is None:
            return
        pfd, name = self._made
        with contextlib.suppress(OSError):
            if self.target is not None:
                self.target.close()
                self.target = None
            if self.replica.kind == "fs":
                os.rmdir(name, dir_fd=pfd)
            else:
                os.unlink(name, dir_fd=pfd)

    def _hello(self, h: dict) -> None:
        if h.get("version") not in wire.ACCEPTED:
            raise AgentError("version", f"the source speaks wire version {h.get('version')}, this "
                             f"agent {wire.VERSION}: upgrade one side", errno.EPROTO)
        self.source_version = h["version"]  # what a fail-back may send it (wire.VERSION)
        action = h.get("action", "replicate")
        st = os.statvfs(self.root)
        self.info = {"version": wire.VERSION, "agent": _version(), "host": os.uname().nodename,
                     "free_bytes": st.f_bavail * st.f_frsize, "root": self.root,
                     "features": list(wire.FEATURES)}
        if action == "test":
            self.send(wire.WELCOME, {**self.info, **journal_space(self.root), **self._held(h)})
            return
        if action not in ("replicate", "promote", "discard", "failback", "probe"):
            raise AgentError("action", f"unknown action {action!r}")
        try:
            rel = safe_relpath(h["path"]).decode(errors="surrogateescape")
        except (KeyError, ValueError) as exc:
            raise AgentError("path", f"replica path refused: {exc}", errno.EINVAL) from None
        if rel.split("/")[0] == META:
            raise AgentError("path", f"replica path refused: {META} is the agent's own", errno.EINVAL)
        kind = h.get("kind")
        if kind not in ("fs", "block"):
            raise AgentError("protocol", f"unknown replica kind {kind!r}")
        source = h.get("source") or {}
        if action == "probe":
            return self._probe(rel, kind, source)
        self.replica = Replica(self.root_fd, self.root, rel, kind)
        self.replica.lock(source, action)
        self.state = state = self.replica.state()
        self._fresh = not state
        # adopt_target: a replica of another history (another source, or this one rebuilt
        # without its state) becomes this source's; what its journal held is none of it
        adopt = bool(state) and action == "replicate" and bool(h.get("adopt")) and \
            state.get("role") != "primary"
        adopting = adopt and (state.get("source") != source or
                              state.get("generation") != h.get("generation"))
        if state and state.get("source") != source and not h.get("adopt"):
            theirs = state.get("source", {})
            raise AgentError("not-ours", f"replica {rel} is the replica of "
                             f"{theirs.get('entry', '?').split(':', 1)[-1]} on {theirs.get('host', '?')}, "
                             "not of this source: refusing to overwrite it", errno.EEXIST)
        if state and state.get("kind", kind) != kind:
            raise AgentError("not-ours", f"replica {rel} is a {state.get('kind')} replica, not {kind}",
                             errno.EEXIST)
        if state.get("role") == "primary" and action == "replicate":
            self._split_brain(source, h)
        # A source rebuilt after its host was lost keeps no history the promoted replica came
        # from: its fail-back takes the replica back whole only when its entry says adopt_target
        rebuilt = action == "failback" and bool(h.get("adopt")) and state.get("role") == "primary"
        if action in ("discard", "failback") and state.get("role") == "primary" and not rebuilt \
                and (state.get("promoted") or {}).get("from_generation") != h.get("generation"):
            raise AgentError("not-ours", f"replica {rel} was promoted from another history than "
                             "this source's: refusing" + (
                                 " (a source rebuilt without its state: adopt_target on its entry "
                                 "takes the promoted replica back whole)"
                                 if action == "failback" else ""), errno.EEXIST)
        if rebuilt and state.get("source") != source:
            log.info("replica %s: fail-back to %s, a source rebuilt without its history (adopt)",
                     rel, source)
            state["source"] = source  # its promoted data goes back to the rebuilt source
            self.replica.save(state)
        promoted = state.get("promoted") or {}
        if action == "promote" and state.get("role") == "primary" \
                and promoted.get("from_generation") == h.get("generation") \
                and int(promoted.get("seq") or 0) >= int(h.get("last_seq") or 0):
            # asked again by the switch-over that promoted it (its answer was lost): done already
            raise AgentError("promoted", f"replica {rel} is already primary (promoted from this "
                             f"source's history at seq {promoted.get('seq')})", errno.EEXIST,
                             generation=state.get("generation"), host=self.info.get("host"))
        if action == "promote" and state.get("generation") != h.get("generation"):
            raise AgentError("not-ours", f"replica {rel} belongs to another history (generation "
                             f"{state.get('generation')}): not promoted", errno.EEXIST)
        if state and action == "replicate" and state.get("generation") != h.get("generation") \
                and not h.get("adopt"):
            raise AgentError("not-ours", f"replica {rel} belongs to another history (generation "
                             f"{state.get('generation')}, the source's is {h.get('generation')}): "
                             "refusing to overwrite it (adopt_target replaces it)", errno.EEXIST)
        # as a local target that carries no marker: a directory or image that was here before
        # and is no replica of ours is never overwritten by accident (its first copy removed
        # whatever the source did not have)
        self._open_data(rel, kind, h, guard=not state and action == "replicate" and not h.get("adopt"))
        if not state or state.get("source") != source:
            self.state = state = {"source": source, "kind": kind, "path": rel, "role": "secondary",
                                  "generation": h.get("generation") or _new_generation(),
                                  "created": time.time(), "consistent": False, "consistent_seq": 0}
            self.replica.save(state)
        self.journal = Journal(self.replica.dir, kind=KIND_FS if kind == "fs" else KIND_BLOCK)
        last = h.get("last_seq")
        held = self.journal.last_seq or self.journal.released_seq
        if adopting and held or adopt and \
                isinstance(last, int) and self.journal.last_seq > last:  # (adopted before)
            self._forget_positions(kind)
        elif held and self._made is not None and action in ("promote", "failback"):
            self._unmake()  # (left, the next session would take it for the replica's data)
            # a refusal the source shows as such (not a lost session), in its own words
            raise AgentError("no-data", f"replica {rel} holds no data: it was removed on the "
                             f"target ({os.path.join(self.root, rel)}; records up to "
                             f"{self.journal.released_seq} had been applied to it); nothing was "
                             f"{'promoted' if action == 'promote' else 'sent back'}", errno.ENOENT)
        elif held and self._made is not None:  # its data was removed here behind our back
            log.warning("replica %s: its data was gone (removed on this host) though %d records "
                        "were applied to it: made anew, empty; the source copies it whole", rel,
                        self.journal.released_seq)
            self._forget_positions(kind)
        if self.journal.gap or self.journal.torn_bytes:  # our journal lost records: ask for a resync
            self.journal.skip_to(self.journal.last_seq)
            self._forget_mark()
            self._inconsistent()
        self.codec = wire.Codec(h.get("compression", "zstd"))
        if action == "promote":
            return self._promote_for_switchover(h)
        if action == "discard":
            return self._discard_promotion(h)
        if action == "failback":
            return self._failback(h)
        if state.get("generation") != h.get("generation"):  # adopted: the source's history now
            state.update(generation=h.get("generation"), consistent=False)
            self.replica.save(state)
        self.send(wire.WELCOME, {**self.info, **self.positions(), "generation": state["generation"],
                                 "consistent_seq": state.get("consistent_seq", 0)})
        threading.Thread(target=self._apply_loop, daemon=True).start()

    def _forget_positions(self, kind: str) -> None:
        """The replica starts again from position 0: an adopted one, whose records (received,
        applied) are of another history (kept, they made the source refuse the replica as ahead
        of it, "its history is not ours", for good), or one whose data was made anew. The
        source, which holds more, resyncs it (the replica is inconsistent until then)."""
        log.info("replica %s: its journal's positions (received %d, applied %d) are forgotten",
                 self.replica.rel, self.journal.last_seq, self.journal.released_seq)
        self.journal.close()
        for name in os.listdir(self.replica.dir):
            if name.endswith(".seg") or name in (RELEASED_FILE, RESERVED_FILE, LEGACY_APPLIED_FILE):
                os.unlink(self.replica.dir / name)
        self.journal = Journal(self.replica.dir, kind=KIND_FS if kind == "fs" else KIND_BLOCK)
        self._forget_mark()  # a catch-up's end in the old numbering says nothing now
        self._inconsistent()
        self.state["consistent_seq"] = 0
        self.replica.save(self.state)

    # -- fail-over and fail-back ------------------------------------------------------------
    def _split_brain(self, source: dict, h: dict) -> None:
        """The old source came back after this replica was promoted: both have moved on. Say
        so (here too: `replica list` shows it), write nothing. When the source says it holds
        every change it has (no catch-up pending, nothing dropped) and none after what this
        replica had applied when it was promoted, only this side moved on: a fail-over, said
        as such (nothing is marked here); the same choices end it."""
        promoted = self.state.get("promoted", {})
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(promoted.get("time", 0)))
        from app.services.layout import command
        entry = str(source.get("entry") or "ENTRY").split(":", 1)[-1]
        back = command("failback", entry, "--yes")
        keep = command("replica", "resolve", entry, "--discard-target", "--yes")
        last = h.get("last_seq")
        if h.get("settled") is True and isinstance(last, int) and \
                h.get("generation") == promoted.get("from_generation") and \
                last <= int(promoted.get("seq") or 0):
            raise AgentError("split-brain", f"failed over: the target was promoted at {when} "
                             f"(generation {self.state.get('generation')}) and this source has "
                             f"no change since (its last, position {last}, was there before); "
                             "nothing was written. The replica's data is the newer: "
                             f"{back} brings it here (only what differs); {keep} discards it",
                             errno.EEXIST, changes_here=False)
        self.state["split_brain"] = {"time": time.time(), "source": source}
        self.replica.save(self.state)
        raise AgentError("split-brain", f"split brain: the target was promoted at {when} "
                         f"(generation {self.state.get('generation')}); nothing was written. "
                         f"Choose: {keep} (the source wins) or {back} (the promoted replica "
                         "wins)", errno.EEXIST)

    def _settle(self, seq: int, deadline: float = 60) -> None:
        """Apply what our journal holds (everything up to `seq` must be there)."""
        self.quiet = True
        self.journal_applier = threading.Thread(target=self._apply_loop, daemon=True)
        self.journal_applier.start()
        end = time.monotonic() + deadline
        while self.journal.released_seq < max(seq, self.journal.last_seq):
            if time.monotonic() > end:
                raise AgentError("incomplete", f"replica {self.replica.rel} holds records up to "
                                 f"{self.journal.last_seq}, applied {self.journal.released_seq}; "
                                 f"the source said {seq}", errno.EIO)
            if self.paused:
                raise AgentError("incomplete", f"replica {self.replica.rel} cannot apply what it "
                                 f"holds: {self.paused}; nothing was promoted", errno.ENOSPC)
            time.sleep(0.05)
        self.stop.set()  # the applier ends; the state is ours alone from here
        self.journal_applier.join()
        self.stop.clear()

    def _promote_for_switchover(self, h: dict) -> None:
        """A planned switch-over: the source has drained and lifted capture; once everything
        it sent is applied here, this replica becomes primary in a generation of its own."""
        seq = int(h.get("last_seq") or 0)
        if self.state.get("role") == "primary":
            raise AgentError("promoted", f"replica {self.replica.rel} is already primary", errno.EEXIST)
        if self.journal.last_seq < seq:
            raise AgentError("incomplete", f"the replica received records up to {self.journal.last_seq} "
                             f"of {seq}: nothing was promoted", errno.EIO)
        self._settle(seq)
        self._consistent_if_applied()
        if not self.state.get("consistent"):
            raise AgentError("incomplete", f"replica {self.replica.rel} is inconsistent (its resync "
                             "did not finish): nothing was promoted", errno.EIO)
        promote_state(self.state, by="switch-over", seq=seq)
        self.replica.save(self.state)
        # tests only (tests/test_failover.py): the reply is held so that a test can cut the
        # link between the promotion and its answer (this machine has no netem to time it)
        time.sleep(float(os.environ.get("MIRRORSETUP_TEST_PROMOTE_REPLY_DELAY") or 0))
        self.send(wire.WELCOME, {**self.info, **self.positions(), "generation": self.state["generation"],
                                 "promoted": self.state["promoted"]})

    def _discard_promotion(self, h: dict) -> None:
        """`replica resolve --discard-target`: the source wins; this replica is its secondary
        again (inconsistent until the source's resync has made it equal)."""
        if self.state.get("role") != "primary":  # no split brain: its data is left as it is
            raise AgentError("not-promoted", f"replica {self.replica.rel} is not promoted: there "
                             "is no promotion to discard", errno.EINVAL,
                             generation=self.state.get("generation"))
        users = replica_users(self.root, self.replica.rel, self.replica.kind)
        if users:
            raise AgentError("in-use", f"the promoted replica {self.replica.rel} is in use on the "
                             f"target: {'; '.join(users)}: stop using it first", errno.EBUSY)
        demote_state(self.state, generation=h.get("generation"), consistent=False)
        self.replica.save(self.state)
        self.send(wire.WELCOME, {**self.info, **self.positions(), "generation": self.state["generation"]})

    def _held(self, h: dict) -> dict:
        """What the image at a `test` HELLO's path takes below the root already (a `block add`'s
        room check): a re-added entry reuses it, so that room is its own. Nothing when it cannot
        be told (no path asked, none there, not a regular file, a path refused)."""
        if not h.get("path"):
            return {}
        try:
            fd = open_beneath(self.root_fd, safe_relpath(str(h["path"])), os.O_PATH)
        except (OSError, ValueError):
            return {}
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return {"replica_bytes": st.st_blocks * 512} if stat.S_ISREG(st.st_mode) else {}

    def _probe(self, rel: str, kind: str, source: dict) -> None:
        """What a fail-back asks before it lifts its capture: is the replica promoted, and who
        uses it then (a fail-back would be refused)? Read only: no lock is taken (the same
        source's replication session goes on), nothing made."""
        state = {}
        books = f"{META}/replicas/{replica_id(rel)}"
        with contextlib.suppress(FileNotFoundError):
            fd = open_beneath(self.root_fd, books.encode())
            try:
                state = read_state(Path(self.root) / books, dir_fd=fd) or {}
            except DamagedState as exc:
                raise exc.refusal(rel) from None
            finally:
                os.close(fd)
        self.send(wire.WELCOME, {**self.info, "exists": bool(state), "role": state.get("role"),
                                 "generation": state.get("generation"),
                                 "ours": state.get("source") == source,
                                 "promoted": state.get("promoted"),
                                 "users": (replica_users(self.root, rel, kind)
                                           if state.get("role") == "primary" else [])})

    def _failback(self, h: dict) -> None:
        """Fail back: the promoted replica is sent to the source, only what differs (the source
        answers the comparisons and applies), then this replica is the source's secondary
        again, consistent at the source's position."""
        if self.state.get("role") != "primary":
            # its generation tells the source whether an interrupted fail-back of its own
            # finished here (the one it chose) or this replica was never handed over
            raise AgentError("not-promoted", f"replica {self.replica.rel} is not promoted: nothing "
                             "to fail back from", errno.EINVAL, generation=self.state.get("generation"))
        users = replica_users(self.root, self.replica.rel, self.replica.kind)
        if users:
            raise AgentError("in-use", f"the promoted replica {self.replica.rel} is in use on the "
                             f"target: {'; '.join(users)}: stop using it there first", errno.EBUSY)
        self.send(wire.WELCOME, {**self.info, **self.positions(), "generation": self.state["generation"]})
        back = Reverse(self)
        threading.Thread(target=self._read_replies, args=(back,), daemon=True).start()
        counts = back.run()
        # the source's records go on above anything this replica saw (a source rebuilt
        # without its journal starts its seqs again; it skips to here)
        seq = max(int(h.get("last_seq") or 0), self.journal.last_seq)
        demote_state(self.state, generation=h.get("new_generation"), consistent=True, seq=seq)
        self.journal.skip_to(seq)
        self.replica.save(self.state)
        self.send(wire.ACK, {**self.positions(), "done": counts})  # received: seq

    def _read_replies(self, back: Reverse) -> None:
        try:
            while (got := wire.read_frame(self.rfile.read)) is not None:
                self.last_frame = time.monotonic()
                kind, payload = got
                if kind == wire.REP:
                    back.reply(json.loads(payload))
                elif kind == wire.BEAT:
                    pass
        except (wire.WireError, OSError, ValueError):
            pass
        back.reply(None)

    @staticmethod
    def _refuse_foreign(rel: str, kind: str, fd: int) -> None:
        """Refuse data that was here before this replica (`fd`, closed then) unless it is
        empty: a directory with nothing in it (but an empty lost+found), an image whose first
        MiB is zeros (a new sparse file)."""
        try:
            empty = Agent._data_empty(kind, fd)
        except BaseException:
            os.close(fd)
            raise
        if not empty:
            os.close(fd)
            raise AgentError("not-ours", f"replica {rel} is not empty and is no replica of a "
                             "mirrorsetup source: refusing to overwrite it (adopt_target on the "
                             "entry takes it over, e.g. a replica seeded by hand)", errno.ENOTEMPTY)

    @staticmethod
    def _data_empty(kind: str, data_fd: int) -> bool:
        """As a local target's claim judges it (LocalDirTarget.open, target._zeros)."""
        from app.engine.target import _zeros
        from app.services.layout import dir_is_empty
        return dir_is_empty(f"/proc/self/fd/{data_fd}") if kind == "fs" else _zeros(data_fd)

    def _open_data(self, rel: str, kind: str, h: dict, *, guard: bool = False) -> None:
        """Open (or make) the replica's data; `guard`: data that was here already must be
        empty (_refuse_foreign), checked before anything is changed in it."""
        from app.engine.target import LocalBlockTarget, LocalDirTarget
        raw = rel.encode(errors="surrogateescape")
        parent, _, name = raw.rpartition(b"/")
        pfd = open_beneath(self.root_fd, parent, make_dirs=True)
        try:
            if kind == "fs":
                try:
                    os.mkdir(name, 0o700, dir_fd=pfd)
                    self._made, pfd = (pfd, name), os.dup(pfd)  # (hello closes the one it keeps)
                except FileExistsError:
                    pass
                fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                if guard and self._made is None:
                    self._refuse_foreign(rel, kind, fd)
                self.target = LocalDirTarget.on_fd(fd, rel)
                self.target.applier.close()  # (its own fd: one leaked per session)
                self.target.applier = ConfinedFsApplier(fd)
            else:
                size = int(h.get("size") or 0)
                flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
                try:
                    fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=pfd)
                    self._made, pfd = (pfd, name), os.dup(pfd)
                except FileExistsError:
                    fd = os.open(name, flags, dir_fd=pfd)
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    os.close(fd)
                    raise AgentError("path", f"replica {rel} is not a regular file", errno.EINVAL)
                if guard and self._made is None:
                    self._refuse_foreign(rel, kind, fd)
                if st.st_size < size:
                    os.ftruncate(fd, size)
                self.target = LocalBlockTarget.on_fd(fd, rel, size)
        finally:
            os.close(pfd)

    def _frames(self):
        """The session's frames in order, read by a thread of their own up to READ_AHEAD_BYTES
        ahead of the one being handled. Read only between batches (the session's pipes and
        sshd hold a few hundred KiB), a 4 MiB batch crossed ssh while its predecessor was
        decoded and journalled, and neither side worked meanwhile; now the next batch
        arrives during that work. A read's error is raised here, in its place in the order."""
        cv = threading.Condition()
        ahead: deque = deque()
        held = 0

        def read() -> None:
            nonlocal held
            try:
                while True:
                    got = wire.read_frame(self.rfile.read)
                    self.last_frame = time.monotonic()
                    with cv:
                        ahead.append(got)
                        cv.notify_all()
                        if got is None:
                            return
                        held += len(got[1])
                        while held > READ_AHEAD_BYTES:
                            if self.stop.is_set():  # (nobody takes them any more)
                                return
                            cv.wait(1.0)
            except BaseException as exc:  # (the session ends: raised where it is handled)
                with cv:
                    ahead.append(exc)
                    cv.notify_all()
        threading.Thread(target=read, name="reader", daemon=True).start()
        while True:
            with cv:
                while not ahead:
                    if self.stop.is_set():  # finished meanwhile (the watchdog): no more
                        return
                    cv.wait(1.0)
                got = ahead.popleft()
                if isinstance(got, tuple):
                    held -= len(got[1])
                    cv.notify_all()
            if isinstance(got, BaseException):
                raise got
            yield got
            if got is None:
                return

    def serve(self) -> None:
        for got in self._frames():
            if got is None:
                return
            kind, payload = got
            if kind == wire.DATA:
                self._data(payload)
            elif kind == wire.BEAT:
                beat = json.loads(payload)
                self.send(wire.BEAT, {"ts": time.time(), "echo": beat.get("ts"),
                                      **(self.positions() if self.journal else {})})
            elif kind == wire.SKIP:
                through = int(json.loads(payload)["through"])
                self.journal.skip_to(through)
                self._forget_mark()
                self._inconsistent()
                self.send(wire.ACK, self.positions())
            elif kind == wire.MARK:
                mark = json.loads(payload)
                if mark.get("begin"):  # a catch-up begins: inconsistent until its MARK {seq}
                    self.state.pop("mark_seq", None)
                    self.state["catching_up"] = True
                    if self.state.get("consistent"):
                        self._inconsistent()  # (saves)
                    else:
                        self.replica.save(self.state)
                elif not mark.get("again") or self.state.get("catching_up"):
                    # (said again to a new session: only while the catch-up it ended is still
                    # the replica's last word, not after a SKIP, a demotion or its own end)
                    self.state["mark_seq"] = int(mark["seq"])
                    self._consistent_if_applied()
                    self.replica.save(self.state)
                self.send(wire.ACK, self.positions())
            elif kind == wire.REQ:
                self.ask(json.loads(payload))
            else:
                raise wire.WireError(f"unexpected {wire.NAMES.get(kind)} frame")

    def _data(self, payload: bytes) -> None:
        raw = memoryview(self.codec.unpack(payload))
        recs, encoded, pos = [], [], 0
        while pos < len(raw):
            rec, end = decode_at(raw, pos)
            recs.append(rec)
            encoded.append(raw[pos:end])  # written to our journal as it came (checked above)
            pos = end
        if recs and recs[0].seq <= self.journal.last_seq:  # resent after a reconnect: drop what we hold
            keep = [i for i, r in enumerate(recs) if r.seq > self.journal.last_seq]
            recs, encoded = [recs[i] for i in keep], [encoded[i] for i in keep]
        if not recs:
            self.send(wire.ACK, self.positions())
            return
        if self.paused:
            return  # dropped, not acknowledged: the source sends it again after RESUME
        if recs[0].seq > self.journal.last_seq + 1:  # an earlier batch was dropped: resend from there
            self.send(wire.REWIND, self.positions())
            return
        try:
            self.journal.ingest_durably(recs, encoded)
        except JournalGap as gap:
            raise AgentError("gap", f"records missing: {gap}; the source must resync", errno.EPROTO) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._pause(f"target full ({exc.strerror})")
                return  # not acknowledged: the source sends it again after RESUME
            raise
        self.send(wire.ACK, self.positions())

    def _pause(self, reason: str) -> None:
        if self.paused != reason:
            self.paused = reason
            log.warning("paused: %s", reason)
            if not self.quiet:
                self.send(wire.PAUSE, {"reason": reason, **self.positions()})

    def _resume(self) -> None:
        if self.paused:
            self.paused = None
            self.send(wire.RESUME, self.positions())

    def _consistent_if_applied(self) -> bool:
        """The source's catch-up ended at `mark_seq`: once that is applied the replica is
        consistent (a prefix of the source's history) again."""
        mark = self.state.get("mark_seq")
        if mark is None or self.journal.released_seq < mark:
            return False
        self.state.update(consistent=True, consistent_seq=self.journal.released_seq,
                          consistent_time=time.time())
        self.state.pop("mark_seq")
        self.state.pop("catching_up", None)
        self.state.pop("inconsistent_since", None)  # (replica list said both)
        return True

    def _catch_up_through(self) -> int:
        """Records up to this seq are a catch-up's (target._apply_all): all of them while the
        replica is inconsistent, up to the MARK's seq once the source has sent it."""
        if self.state.get("consistent"):
            return -1
        return self.state.get("mark_seq", CATCHING_UP)

    def _forget_mark(self) -> None:
        """Records will never come (SKIP), or our journal lost some: a resync follows, and a
        catch-up's end said before it is no word for what follows (applied past it, the
        skipped seqs counted as released, the replica was called consistent)."""
        if (self.state.pop("mark_seq", None), self.state.pop("catching_up", None)) != (None, None):
            self.replica.save(self.state)

    def _inconsistent(self) -> None:
        if self.state.get("consistent"):
            self.state["consistent"] = False
            self.state["inconsistent_since"] = time.time()
            self.replica.save(self.state)

    def _apply_loop(self) -> None:
        """Apply what is durable in our journal, in order; make it durable on the data now and
        then, then say so (applied). A full disk pauses, nothing is skipped."""
        last_sync = time.monotonic()
        j = self.journal
        while not self.stop.is_set():
            try:
                # Applied but not yet synced: wait for more only until that flush is due (a
                # burst that ends within APPLY_SYNC_MIN_SECONDS of the last flush would
                # otherwise be acknowledged a whole idle wait later).
                wait = APPLY_IDLE_WAIT if j.sent_seq <= j.released_seq else min(
                    APPLY_IDLE_WAIT, max(0.0, APPLY_SYNC_MIN_SECONDS - (time.monotonic() - last_sync)))
                batch = j.read(512, timeout=wait)
                if batch:
                    self.target.catch_up_through = self._catch_up_through()
                    self.target.send(batch)
                # Durable and acknowledged at least every APPLY_SYNC_SECONDS under a stream,
                # and as soon as the applier has caught up with what arrived (a trickle of
                # records must not wait a second for its flush), at most every
                # APPLY_SYNC_MIN_SECONDS.
                since = time.monotonic() - last_sync
                due = since > APPLY_SYNC_SECONDS or not batch or (
                    j.sent_seq >= j.last_seq and since > APPLY_SYNC_MIN_SECONDS)
                if j.sent_seq > j.released_seq and due:
                    self.target.flush()
                    j.release(j.sent_seq)
                    last_sync = time.monotonic()
                    if self._consistent_if_applied():
                        self.replica.save(self.state)
                    if not self.quiet:
                        self.send(wire.ACK, self.positions())
                if not batch and self.paused:
                    self.target.close_files()
                    if _has_room(self.root):
                        self._resume()
            except TargetUnavailable as exc:
                j.rewind(max(exc.taken or 0, j.released_seq))
                self._pause(exc.state.removeprefix("paused: "))
                self.target.close_files()
                self.stop.wait(PAUSE_RETRY_SECONDS)
            except JournalGap as gap:
                log.error("%s", gap)
                self.stop.wait(PAUSE_RETRY_SECONDS)
            except OSError as exc:
                log.error("apply: %s", exc)
                self.stop.wait(PAUSE_RETRY_SECONDS)

    def ask(self, req: dict) -> None:
        """A query of the source's: answered by one of QUERY_THREADS threads (a walk asks up
        to a thousand ahead of itself; each was a thread of its own, all reading at once).
        Daemon threads, not a ThreadPoolExecutor's: the agent's exit must not wait for the
        hashes of a big file nobody will read."""
        with self._queries_lock:
            self._queries.append(req)
            if self._query_threads < QUERY_THREADS:
                self._query_threads += 1
                threading.Thread(target=self._answer_queries, daemon=True).start()

    def _answer_queries(self) -> None:
        while True:
            with self._queries_lock:
                if not self._queries:
                    self._query_threads -= 1
                    return
                req = self._queries.popleft()
            try:
                self._query(req)
            except BaseException:  # its answer could not be sent: the session is ending
                with self._queries_lock:
                    self._query_threads -= 1
                raise

    def _query(self, req: dict) -> None:
        rid = req.get("id")
        try:
            result = self.answer(req.get("method"), req.get("args") or {})
            self.send(wire.REP, {"id": rid, "result": result})
        except Exception as exc:  # said to the source, which raises it there
            self.send(wire.REP, {"id": rid, "error": f"{type(exc).__name__}: {exc}",
                                 "errno": getattr(exc, "errno", None)})

    def answer(self, method: str, args: dict):
        t = self.target
        rel = os.fsencode(args.get("rel", ""))
        if rel and getattr(t, "fd", None) is not None:  # a file-system replica: looked at only
            rel = check_beneath(t.fd, os.fsdecode(rel))  # below it, never through a symlink
        if method == "info":
            info = t.info(rel)
            return None if info is None else info.to_wire()
        if method == "children":
            kids = t.children(rel)
            listing = None if kids is None else {os.fsdecode(k): v.to_wire() for k, v in kids.items()}
            if not args.get("hashes") or kids is None:
                return listing
            # a walk comparing every file by hashes: those of the small files come along,
            # each reached as a file_hashes query's is (its directory checked, once)
            checked: set[bytes] = set()
            hashes = {}
            for k, v in kids.items():
                if stat.S_ISREG(v.mode) and v.size <= wire.HASHED_LISTING_FILE:
                    path = check_beneath(t.fd, os.fsdecode(rel + b"/" + k if rel else k), checked)
                    hashes[os.fsdecode(k)] = t.file_hashes(path)
            return {"entries": listing, "hashes": hashes}
        if method == "file_hashes":
            return t.file_hashes(rel)
        if method == "scan":
            return {os.fsdecode(k): v.to_wire() for k, v in t.scan(hashes=bool(args.get("hashes"))).items()}
        if method == "block_hashes_of":
            return t.block_hashes_of([int(b) for b in args["blocks"]])
        if method == "free":
            st = os.statvfs(self.root)
            return st.f_bavail * st.f_frsize
        raise ValueError(f"unknown method {method!r}")

    def finish(self) -> None:
        """End of input: apply what we hold (bounded), make it durable, release the lock."""
        if self.stop.is_set():
            return
        j = self.journal
        if j is not None:
            deadline = time.monotonic() + 20
            while j.released_seq < j.last_seq and time.monotonic() < deadline and not self.paused:
                time.sleep(0.05)
        self.stop.set()
        if j is not None:
            with contextlib.suppress(OSError):
                j.close()
        if self.target is not None:
            with contextlib.suppress(OSError):
                self.target.close()


ROOM_BYTES = 8 << 20  # the free space below which the agent applies nothing (it pauses)


def _has_room(root: str, need: int = ROOM_BYTES) -> bool:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize >= need


def _version() -> str:
    """What `mirrorsetup -V` says (not importlib.metadata's answer: that took 29 ms of every
    session's start, in series with the ssh handshake; a test holds the two equal)."""
    from app import __version__
    return __version__


def _new_generation() -> str:
    import uuid  # here, not above: 4 ms of every session's start, for a rare new replica
    return uuid.uuid4().hex


def main(root: str) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"mirrorsetup-agent[{os.getpid()}] %(levelname)s %(message)s")
    os.umask(0)  # replicated modes are set explicitly; our own files name theirs
    if not os.path.isdir(root):
        sys.stdout.buffer.write(wire.GREETING)
        import shlex
        how = (f"create it there (mkdir -m 700 -p {shlex.quote(root)})" if not os.path.lexists(root)
               else "it is something else there")
        sys.stdout.buffer.write(wire.jframe(wire.ERROR, {"code": "root", "message":
                                f"serve-target root {root} is not a directory on "
                                f"{os.uname().nodename}: {how}, or correct the --root of the "
                                "key's command= line there", "errno": errno.ENOENT}))
        sys.stdout.buffer.flush()
        return 1
    agent = Agent(root, sys.stdin.buffer, sys.stdout.buffer)
    return agent.run()



class Reverse(Queried):
    """The source host, seen from here during a fail-back: what the reconciler compares
    against and writes to. Questions go out as REQ and are answered by the source; writes go
    out as DATA records that the source applies."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.kind = agent.replica.kind
        self._gone: AgentError | None = None
        # no deadline: the source answers while the session lives (heartbeats say it does)
        self.queries = wire.Queries(lambda req: agent.send(wire.REQ, req), lambda: self._gone,
                                    lambda text: AgentError("gone", text, errno.EPIPE),
                                    window=wire.AHEAD_WINDOW, timeout=None, label="the source")
        self.sent = 0  # bytes of DATA frames on the wire (compressed as sent)
        self.data = 0  # of which file contents, extended attribute values, block data

    def reply(self, msg: dict | None) -> None:
        """An answer from the source; None: its session ended."""
        if msg is not None:
            self.queries.answer(msg)
            return
        with self.queries.cv:
            self._gone = AgentError("gone", "the source went away during the fail-back", errno.EPIPE)
            self.queries.cv.notify_all()

    def apply_ops(self, ops) -> None:
        from app.engine.journal import Record
        raw = b"".join(Record(0, 0, op, args, data).encode() for op, args, data in ops)
        packed = self.agent.codec.pack(raw)
        self.sent += len(packed)
        self.data += sum(len(data) for _op, _args, data in ops if data)
        self.agent.send_raw(wire.frame(wire.DATA, packed))

    def run(self) -> dict:
        from app.engine import blocksync, sync
        if self.kind == "fs":
            counts = sync.Reconciler(self.agent.target.fd, self, sync.DirectSink(self),
                                     put=self.agent.source_version >= 2).run()
        else:
            t = self.agent.target

            def commit(block, data, gen):
                self.apply_ops([("write", {"offset": block * sync.BLOCK}, data)])
                return True
            counts = blocksync.reconcile(t.fd, 0, t.size, self, commit)
        self.queries.call("flush")  # the source made it all durable
        return {**counts, "sent_bytes": self.sent, "data_bytes": self.data}


def promote_state(state: dict, *, by: str, seq: int) -> None:
    """This replica becomes primary in a generation of its own: the old source's history
    (its generation) can never write over it by accident."""
    state["promoted"] = {"time": time.time(), "by": by, "seq": seq,
                         "from_generation": state.get("generation")}
    state.setdefault("history", []).append({"promoted": state["promoted"]})
    state.update(role="primary", generation=_new_generation())
    state.pop("split_brain", None)


def demote_state(state: dict, *, generation: str | None, consistent: bool, seq: int = 0) -> None:
    state.setdefault("history", []).append({"demoted": time.time(), "from": state.get("generation")})
    state.update(role="secondary", generation=generation or _new_generation(), consistent=consistent,
                 consistent_seq=seq if consistent else 0, consistent_time=time.time())
    for key in ("promoted", "split_brain", "mark_seq", "catching_up") + (
            ("inconsistent_since",) if consistent else ()):
        state.pop(key, None)
    if not consistent:
        state["inconsistent_since"] = time.time()


def replica_users(root: str, rel: str, kind: str) -> list[str]:
    """Who uses a (promoted) replica on this host: mounts of it (a bind of the directory, the
    file system on its loop; in any mount namespace: a container's too), loops on it (by any
    name: a hard link of the image too), processes with files open there (named). Agents
    (serve-target sessions) are not users: the replica's lock decides about them (the same
    source's stale session, e.g. of a fail-back whose link dropped, is ended by the next;
    another source's is refused by name)."""
    return path_users(os.path.join(root, rel), block=kind == "block", namespaces=True,
                      agents=False)


def path_users(path: str, *, block: bool = False, namespaces: bool = False,
               agents: bool = True, own: frozenset[int] = frozenset()) -> list[str]:
    """Mounts on or of `path` (binds of it too; `namespaces`: those of other mount namespaces
    as well), loops on it (`block`: a file, told by device and inode), processes with a file
    or their working directory there (a block image: by device and inode, whatever the name
    or a lazy unmount made of the path); `agents`: serve-target processes too. Mounts whose
    ids are in `own` are the path's own (not users)."""
    from app.services import loop as loopdev
    from app.services import mounts
    users = []
    table = mounts.read_mountinfo()
    home = mounts.mount_containing(path, table)
    inside = os.path.join(home.root, os.path.relpath(path, home.mount_point)).rstrip("/")

    def bound(m) -> bool:  # a bind of `path` or of something below it
        return (m.major, m.minor) == (home.major, home.minor) and \
            (m.root == inside or m.root.startswith(inside + "/"))
    for m in table:
        if m is home or m.mount_id in own:
            continue
        if bound(m) or m.mount_point == path or m.mount_point.startswith(path + "/"):
            users.append(f"mounted at {m.mount_point}")
    if namespaces:  # copies of our own binds (a namespace made since) are said once, above
        ours = {(m.mount_point, m.root) for m in table if bound(m)}
        for pid, name, other in mounts.other_mount_tables():
            users += [f"mounted at {m.mount_point} in the mount namespace of pid {pid} ({name})"
                      for m in other if bound(m) and (m.mount_point, m.root) not in ours]
    img = os.stat(path) if block else None
    if block:
        for s in loopdev.list_attached():
            if s.backing_file != path and not _same_file(s.backing_file, img, table):
                continue
            where = [m.mount_point for m in table
                     if (m.major, m.minor) == (7, s.index) or m.source == s.device]
            # how to free it, said here: `replica promote` attached it, and nothing else says
            # that a loop keeps the image busy after the file system on it is unmounted
            free = f"umount {' '.join(where)}; losetup -d {s.device}" if where else \
                f"losetup -d {s.device}"
            users.append(f"attached to {s.device}" + "".join(f", mounted at {w}" for w in where)
                         + f" (to free it: {free})")
    return users + _process_users(path, img, agents)


def _process_users(path: str, img: os.stat_result | None, agents: bool) -> list[str]:
    """"open by pid N (comm)" for every process with a descriptor or its working directory
    at `path` or below (by the kernel's names of them), or a descriptor on the file `img` (by
    its mount and inode, whatever the name). Nothing is stat'ed or looked up on any file
    system: psutil's open_files() stat'ed every descriptor of every process, and one on a
    FUSE mount whose server does not answer hung the agent (a fail-back's hello: no WELCOME,
    the source's session ended after 15 s; a scan on a busy host took 8 minutes)."""
    me, found, ids_of = os.getpid(), [], {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:  # (the agent, which has the replica open)
            continue
        base = f"/proc/{name}"
        try:
            if not agents:
                with open(f"{base}/cmdline", "rb") as f:
                    if b"serve-target" in f.read().split(b"\0"):
                        continue  # another session
            fds = os.listdir(f"{base}/fd")
        except OSError:
            continue
        held = False
        with contextlib.suppress(OSError):
            cwd = os.readlink(f"{base}/cwd")
            held = cwd == path or cwd.startswith(path + "/")
        for n in fds if not held else ():
            with contextlib.suppress(OSError):
                there = os.readlink(f"{base}/fd/{n}")  # the kernel's name: no lookup
                if there == path or there.startswith(path + "/") or \
                        (img is not None and _fd_is(base, n, img, ids_of)):
                    held = True
                    break
        if held:
            try:
                with open(f"{base}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            found.append(f"open by pid {name} ({comm})")
    return found


def _fd_is(base: str, fd: str, st: os.stat_result, ids_of: dict) -> bool:
    """Is descriptor `fd` of process `base` (/proc/PID) the file `st`? Its fdinfo gives its
    mount id and inode; the mount ids that are st's file system come from the process's own
    mount table (read once per mount namespace)."""
    from app.services import mounts
    info = mounts.fdinfo(f"{base}/fdinfo/{fd}")
    if int(info.get(b"ino", b"-1")) != st.st_ino:
        return False
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    ids = mounts.namespace_mount_ids(base.rsplit("/", 1)[1], ids_of,
                                     lambda m: (m.major, m.minor) == dev)
    return int(info.get(b"mnt_id", b"-1")) in ids


def _same_file(name: str | None, st: os.stat_result, table) -> bool:
    """Is the file `name` the file `st`? Stat'ed only when the mount `name` is on (by the
    mount table) is st's file system: a loop's backing file on a FUSE mount that does not
    answer (another capture's, stopped) would hang the caller."""
    from app.services import mounts
    home = mounts.mount_by_name(name, table) if name else None
    if home is None or (home.major, home.minor) != (os.major(st.st_dev), os.minor(st.st_dev)):
        return False
    try:
        there = os.stat(name) if name else None
    except OSError:
        return False
    return there is not None and (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino)


# -- the target host's own commands: what replicas are kept here, promote one -------------------

def list_replicas(root: str) -> list[dict]:
    """Every replica serve-target keeps below `root`, with its state."""
    base = Path(os.path.realpath(root)) / META / "replicas"
    out = []
    for d in sorted(base.glob("*")) if base.is_dir() else []:
        try:
            state = read_state(d)
        except DamagedState as exc:  # listed as such (by its ID: its name is in that file)
            out.append({"name": None, "id": d.name, "damaged": str(exc), "errno": exc.errno,
                        "pending_bytes": None})
            continue
        if not state:
            continue
        released = read_small_file(d, "released")
        applied = int(released.strip()) if released and released.strip().isdigit() else 0
        # received (durable in the agent's journal) but not applied to the data yet: a
        # target too full for the data, or a session at work
        received, pending = held_on_disk(d, applied)
        holder = _holder_of(d / "lock")
        out.append({"name": state.get("path"), "id": d.name, "kind": state.get("kind"),
                    "role": state.get("role", "secondary"), "generation": state.get("generation"),
                    "source": state.get("source"), "consistent": bool(state.get("consistent")),
                    "consistent_seq": state.get("consistent_seq"), "consistent_time":
                    state.get("consistent_time"), "inconsistent_since": state.get("inconsistent_since"),
                    "received_seq": received, "applied_seq": applied, "pending_bytes": pending,
                    "promoted": state.get("promoted"),
                    "split_brain": state.get("split_brain"),
                    "session_pid": (holder or {}).get("pid"),
                    "path": os.path.join(os.path.realpath(root), state.get("path", ""))})
    return out


def journal_space(root: str) -> dict:
    """What the agent's own journals take from the free space below `root` that replicas
    cannot use: the room it keeps (it pauses below it) and the records its journals hold not
    yet applied (applying them takes as much again before the journal lets them go)."""
    return {"journal_room_bytes": ROOM_BYTES,
            "journal_pending_bytes": sum(r["pending_bytes"] or 0 for r in list_replicas(root))}


def _source_heard(rep: Replica) -> float | None:
    """When the replication session holding `rep` last heard from its source (the time its
    agent gives the lock file, Agent._say_heard), or None (no such session, or an action's)."""
    try:
        fd = os.open(rep.dir / "lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if _holder(fd).get("action", "replicate") != "replicate":
            return None
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)


def _holder_of(lock: Path) -> dict | None:
    """Who holds a replica's lock, in its words (the session's pid, source and action; {}
    when it has not said yet), or None when nobody does."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)


def replica_line(r: dict) -> str:
    """One replica as `replica list` says it."""
    from app.services.units import human_size
    def when(t):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "?"
    if r.get("stateless"):
        return f"{r['name']} ({STATELESS})"
    if r.get("damaged"):
        return f"replica {r['id']}: {r['damaged']}"
    src = (r.get("source") or {}).get("entry", "?").split(":", 1)[-1]
    if r["role"] == "primary":
        p = r.get("promoted") or {}
        state = f"PROMOTED at {when(p.get('time'))} ({p.get('by')}, from seq {p.get('seq')})"
        if r.get("split_brain"):
            state += f"; SPLIT BRAIN: the old source connected at {when(r['split_brain'].get('time'))}"
    elif r["consistent"]:
        state = (f"consistent, applied up to position {r['applied_seq']} (consistent since "
                 f"{when(r.get('consistent_time'))}, from position {r.get('consistent_seq')})")
    else:
        state = (f"inconsistent: {catch_up_said(r)}" + (f" (inconsistent since "
                 f"{when(r['inconsistent_since'])})" if r.get("inconsistent_since") else ""))
    received, applied = r.get("received_seq") or 0, r.get("applied_seq") or 0
    if r["role"] != "primary" and received > applied:
        n = received - applied
        state += (f"; received up to position {received}, of which {n} record{'s' if n != 1 else ''} "
                  f"({human_size(r.get('pending_bytes') or 0)}) not applied yet")
    busy = f"; a session is writing it (agent pid {r['session_pid']})" if r.get("session_pid") else ""
    return f"{r['name']} ({r['kind']}, replica of {src}): {state}{busy}"


def catch_up_said(r: dict) -> str:
    """Why a replica (as list_replicas gives it) is inconsistent, in the tense that is true:
    its first copy or a resync runs while a session holds it, and was interrupted when none
    does (its source went away before the end; it goes on when the source is back)."""
    what = "a resync" if r.get("consistent_time") or r.get("inconsistent_since") else "the initial copy"
    return f"{what} {'is running' if r.get('session_pid') else 'was interrupted'}"


def promote(root: str, name: str, *, mount_at: str | None = None, loop: str | None = None,
            force: bool = False) -> tuple[dict, list[str]]:
    """Fail-over: make a replica usable on this host. An inconsistent one only with `force`.
    Returns the replica's new state and what was done (lines to print)."""
    from app.services import mounts
    from app.services.results import MirrorError
    found = next((r for r in list_replicas(root) if r["name"] == name), None)
    if found is None:
        raise AgentError("path", f"no replica named {name!r} below {root} (mirrorsetup replica list "
                         f"--root {root})", errno.ENOENT)
    if mount_at is not None:  # before anything changes: a bad one refused, not met half-way
        mount_at = mount_point(mount_at, root, os.path.join(os.path.realpath(root), name),
                               found["kind"])
    if loop is not None:
        _free_loop(loop, os.path.join(os.path.realpath(root), name), found["kind"])
    root_fd = os.open(os.path.realpath(root), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        rep = Replica(root_fd, os.path.realpath(root), name, found["kind"])
        began = time.time()
        deadline = time.monotonic() + HEARTBEAT_TIMEOUT + 5  # a lost session ends on its own
        while True:
            try:
                rep.lock({"promote": os.getpid()})
                break
            except AgentError:
                heard = _source_heard(rep)  # a source that died lately is still waited for
                if time.monotonic() > deadline or (heard is not None and heard > began):
                    raise AgentError("locked", f"replica {name} is being written by agent pid "
                                     f"{found.get('session_pid')} (its source is connected"
                                     f"{': it sent a frame while promote waited' if heard else ''}): "
                                     "use `mirrorsetup switchover` on the source instead",
                                     errno.EBUSY) from None
                time.sleep(0.5)
        state = rep.state()
        if state.get("role") == "primary":  # a switch-over (or an earlier promote) made it primary
            done = []
            try:
                _make_usable(rep, name, found["kind"], state, mount_at=mount_at, loop=loop, done=done)
            except AgentError as exc:
                if exc.code == "promoted":  # asked nothing new: refused, nothing done
                    raise
                raise _not_usable(exc, done, state) from None
            except (OSError, MirrorError) as exc:
                raise _not_usable(exc, done, state) from None
            return state, done
        if not state.get("consistent") and not force:
            raise AgentError("inconsistent", f"replica {name} is inconsistent "
                             f"({catch_up_said({**found, 'session_pid': None})}): its files or "
                             "blocks mix old and new states. Promote with --force --yes only if "
                             "that is acceptable (check it first: e2fsck -fn, an application's "
                             "own check)", errno.EAGAIN)
        try:  # its data must be there: a new generation over nothing is no fail-over
            os.lstat(os.path.join(os.path.realpath(root), name))
        except FileNotFoundError:
            raise AgentError("gone", f"replica {name} holds no data: "
                             f"{os.path.join(os.path.realpath(root), name)} was removed on this "
                             "host; nothing was promoted", errno.ENOENT) from None
        journal = Journal(rep.dir, kind=KIND_FS if found["kind"] == "fs" else KIND_BLOCK)
        done = []
        try:
            pending = journal.last_seq - journal.released_seq
            if pending:  # what arrived but was not applied yet: apply it first
                _apply_received(rep, journal, found["kind"], state)
                done.append(f"applied the {pending} record{'s' if pending != 1 else ''} received but "
                            "not yet applied")
            promote_state(state, by="fail-over" + (" (forced, inconsistent)" if not state.get("consistent")
                                                   else ""), seq=journal.released_seq)
            try:
                rep.save(state)
            except OSError as exc:  # (the state file is replaced whole or not at all)
                if exc.errno not in CANNOT_WRITE:
                    raise
                raise _cannot_promote(rep, state, "its new state cannot be written", exc) from None
        finally:
            with contextlib.suppress(OSError):  # (its positions were written as they moved)
                journal.close()
        path = os.path.join(os.path.realpath(root), name)
        done.append(f"promoted {name}: generation {state['generation']} (the old source can no longer "
                    "write to it)")
        try:
            if found["kind"] == "block":
                _attach_and_mount(path, loop, mount_at, done)
            elif mount_at:
                _make_mount_point(mount_at, done)
                mounts.mount(path, mount_at, None, mounts.MS_BIND)
                done.append(f"bind-mounted {path} on {mount_at}")
            else:
                done.append(f"use it at {path}")
        except (AgentError, OSError, MirrorError) as exc:  # promoted all the same: say so
            raise _not_usable(exc, done, state) from None
        return state, done
    finally:
        os.close(root_fd)


def _apply_received(rep: Replica, journal: Journal, kind: str, state: dict) -> None:
    """Before a promotion: apply what the replica received and had not applied yet. A target
    that cannot take it (full, read-only, failing) is refused: nothing is promoted, what was
    applied of it is made durable and counted as applied (the source's next session goes on
    after it, as the agent's own applier would), and the rest stays in the journal."""
    from app.engine.target import LocalBlockTarget, LocalDirTarget
    path = os.path.join(rep.root, rep.rel)
    if kind == "fs":
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        target = LocalDirTarget.on_fd(fd, rep.rel)
        target.applier.close()
        target.applier = ConfinedFsApplier(fd)  # the source chose its paths, as in a session
    else:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        target = LocalBlockTarget.on_fd(fd, rep.rel, os.fstat(fd).st_size)
    try:
        try:
            while batch := journal.read(512):
                target.send(batch)
            target.flush()
            journal.release(journal.sent_seq)
        except TargetUnavailable as exc:
            with contextlib.suppress(OSError):  # (full: then the next session applies it again)
                if exc.taken is not None and exc.taken > journal.released_seq:
                    target.flush()
                    journal.release(exc.taken)
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else OSError(errno.EIO, str(exc))
            raise _cannot_promote(rep, state, "", cause, journal) from None
        except OSError as exc:  # the flush (a full thin disk, an I/O error)
            if exc.errno not in CANNOT_WRITE:
                raise
            raise _cannot_promote(rep, state, "", exc, journal) from None
    finally:
        target.close()


CANNOT_WRITE = {errno.ENOSPC: "is full", errno.EDQUOT: "is over its quota",
                errno.EROFS: "is read-only", errno.EIO: "fails (I/O error)"}


def _cannot_promote(rep: Replica, state: dict, what: str, exc: OSError,
                    journal: Journal | None = None) -> AgentError:
    """A promotion the replica's file system cannot take: what could not be done, why, that
    nothing was promoted, and what to do (a failure, exit 1: nothing was wrong with the ask)."""
    if journal is not None:  # what it received and cannot apply
        from app.services.units import human_size
        received, held = held_on_disk(rep.dir, journal.released_seq)
        n = received - journal.released_seq
        what = (f"{n} record{'s' if n != 1 else ''} ({human_size(held)}) it received cannot be "
                "applied" if n > 0 else "the position of what it applied cannot be written")
    name = errno.errorcode.get(exc.errno or 0, "E?")
    fix = {errno.ENOSPC: "free space below", errno.EDQUOT: "raise the quota or free space below",
           errno.EROFS: "make the file system writable below",
           errno.EIO: "check the disk below"}.get(exc.errno, "check the file system below")
    role = "consistent" if state.get("consistent") else "inconsistent"
    return AgentError("unapplied", f"{what}: the file system below {rep.root} "
                      f"{CANNOT_WRITE.get(exc.errno, 'fails')} ({exc.strerror or exc}, {name}); "
                      f"nothing was promoted, it stays its source's {role} secondary (the source "
                      f"resumes into it). {fix[0].upper()}{fix[1:]} {rep.root}, then promote again",
                      exc.errno or errno.EIO)


def _make_usable(rep: Replica, name: str, kind: str, state: dict, *, mount_at: str | None,
                 loop: str | None, done: list[str]) -> None:
    """`replica promote` of a replica that is primary already (after a switch-over the source
    promoted it): it is only made usable, as asked (said in `done` step by step); asked
    nothing new, it is refused."""
    from app.services import loop as loopdev
    from app.services import mounts
    p = state.get("promoted") or {}
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.get("time", 0)))
    path = os.path.join(rep.root, name)
    said = f"replica {name} is already promoted ({p.get('by', '?')} at {when})"
    if kind == "fs":
        if not mount_at:
            raise AgentError("promoted", f"{said}: use it at {path} (--mount DIR bind-mounts it "
                             "there)", errno.EEXIST)
        done.append(said)
        if _shown_at(mount_at, os.stat(path)):  # asked twice: one mount, not two stacked
            done.append(f"{path} is bind-mounted on {mount_at} already")
            return
        _make_mount_point(mount_at, done)
        mounts.mount(path, mount_at, None, mounts.MS_BIND)
        done.append(f"bind-mounted {path} on {mount_at}")
        return
    real = os.path.realpath(path)
    bound = [f"/dev/loop{i}" for i, backing in loopdev.bound_backing().items() if backing == real]
    if bound and (loop is None or loop in bound):
        if not mount_at:
            raise AgentError("promoted", f"{said} and attached as {', '.join(bound)} (--mount DIR "
                             "mounts it)", errno.EEXIST)
        done += [said, f"attached as {', '.join(bound)}"]
        if any(_shown_at(mount_at, os.stat(dev), block=True) for dev in bound):
            done.append(f"{path} is attached and mounted on {mount_at} already")
            return
        _make_mount_point(mount_at, done)
        subprocess_mount(bound[0], mount_at)
        done.append(f"mounted {bound[0]} on {mount_at}")
        return
    if bound:  # two loops on one image would be two caches of it
        raise AgentError("promoted", f"{said} and attached as {', '.join(bound)}, not {loop}",
                         errno.EEXIST)
    done.append(said)
    _attach_and_mount(path, loop, mount_at, done)


def _attach_and_mount(image: str, loop: str | None, mount_at: str | None, done: list[str]) -> None:
    """A block replica made usable: attached (to `loop`, else the first free one), its file
    system mounted at `mount_at` if asked; each step said in `done` as it is done."""
    from app.services import loop as loopdev
    st = loopdev.attach(image, loop=loop)
    done.append(f"attached {image} as {st.device}")
    if mount_at:
        _make_mount_point(mount_at, done)
        subprocess_mount(st.device, mount_at)
        done.append(f"mounted {st.device} on {mount_at}")


def _not_usable(exc: Exception, done: list[str], state: dict) -> AgentError:
    """The replica is promoted, a step making it usable failed: said as both (exit 1)."""
    return AgentError("usable", f"{'; '.join(done)}; but then: {exc}",
                      getattr(exc, "errno", None) or errno.EIO, done=done, state=state, failed=str(exc))


def mount_point(mount_at: str, root: str, image: str, kind: str) -> str:
    """`replica promote --mount DIR`, checked before anything changes: an absolute path, not
    `/`, not in or above the replicas' root; an empty directory that is no mount point, one
    showing this replica already (asked twice), or a missing one whose parent is a directory
    (made then, and said). What would hide files or break the host is refused. Returns it
    resolved."""
    from app.services import loop as loopdev
    from app.services import mounts

    def refused(why: str, err: int) -> AgentError:
        return AgentError("path", f"--mount {mount_at}: {why}", err)
    if not os.path.isabs(mount_at):
        raise refused("not an absolute path (where on this host should it be?)", errno.EINVAL)
    real = os.path.realpath(mount_at)
    top = os.path.realpath(root)
    if real == "/":
        raise refused("the root directory: mount it elsewhere", errno.EINVAL)
    if real == top or real.startswith(top.rstrip("/") + "/"):
        raise refused(f"inside the replicas' root {top}; mount it elsewhere", errno.EINVAL)
    if top.startswith(real.rstrip("/") + "/"):
        raise refused(f"above the replicas' root {top} (it would hide what the agent serves); "
                      "mount it elsewhere", errno.EINVAL)
    if not os.path.lexists(real):
        parent = os.path.dirname(real)
        if not os.path.isdir(parent):
            raise refused(f"its parent {parent} " + ("is not a directory" if os.path.lexists(parent)
                          else "does not exist (make the directory first)"),
                          errno.ENOTDIR if os.path.lexists(parent) else errno.ENOENT)
        return real
    if not os.path.isdir(real):
        raise refused("not a directory", errno.ENOTDIR)
    there = [m for m in mounts.read_mountinfo() if m.mount_point == real]
    if there:
        if kind == "fs":
            shows = _shown_at(real, os.stat(image))
        else:
            bound = [f"/dev/loop{i}" for i, b in loopdev.bound_backing().items() if b == image]
            shows = any(_shown_at(real, os.stat(dev), block=True) for dev in bound)
        if not shows:
            m = there[-1]
            raise refused(f"something is mounted there already ({m.source}, {m.fstype}); mount "
                          "the replica elsewhere", errno.EBUSY)
        return real
    with os.scandir(real) as it:
        if next(it, None) is not None:
            raise refused("not empty: the replica mounted there would hide its files; name an "
                          "empty directory", errno.ENOTEMPTY)
    return real


def _free_loop(loop: str, image: str, kind: str) -> None:
    """`replica promote --loop`, checked before anything changes: a loop device path, of a
    block replica, free or attached to this very image already."""
    from app.services import loop as loopdev
    from app.services.results import MirrorError
    if kind != "block":
        raise AgentError("path", f"--loop {loop}: {os.path.basename(image)} is a directory replica "
                         "(--mount DIR bind-mounts it)", errno.EINVAL)
    try:
        index = loopdev.parse_loop_path(loop)
    except MirrorError as exc:
        raise AgentError("path", f"--loop {exc.message}", exc.errno or errno.EINVAL) from None
    backing = loopdev.bound_backing().get(index)
    if backing is not None and backing != os.path.realpath(image):
        raise AgentError("path", f"--loop {loop} is busy (attached to {backing}): name a free one "
                         "or leave --loop out", errno.EBUSY)


def _make_mount_point(mount_at: str, done: list[str]) -> None:
    if not os.path.isdir(mount_at):
        os.mkdir(mount_at, 0o755)
        done.append(f"made the directory {mount_at}")


def _shown_at(mount_at: str, st: os.stat_result, *, block: bool = False) -> bool:
    """Whether `mount_at` is a mount point showing the replica: the directory itself (a bind
    mount, `st` its stat) or the file system on its loop (`block`, `st` the loop's stat)."""
    from app.services import mounts
    try:  # mountinfo, not os.path.ismount: a bind mount from the same file system is one too
        real = os.path.realpath(mount_at)
        if not any(m.mount_point == real for m in mounts.read_mountinfo()):
            return False
        at = os.stat(real)
    except OSError:
        return False
    if block:
        return at.st_dev == st.st_rdev
    return (at.st_dev, at.st_ino) == (st.st_dev, st.st_ino)


def subprocess_mount(device: str, where: str) -> None:
    """mount(8) for a file system on a loop (it knows every file system's type)."""
    import subprocess
    r = subprocess.run(["mount", "--", device, where], capture_output=True, text=True)
    if r.returncode != 0:
        said = "; ".join(line.strip() for line in r.stderr.splitlines() if line.strip())
        raise AgentError("mount", f"mount {device} on {where}: {said}", errno.EIO)


# -- `replica remove`: a replica no source needs any more, gone with its bookkeeping ------------

def remove(root: str, name: str, *, confirm=lambda found: None) -> dict:
    """Remove the replica `name` (as list_replicas names it): its data, then its journal and
    state. Refused, nothing removed, while a session holds its lock (said by whom) or anything
    uses it on this host (replica_users), and for a name that would leave the root. `confirm`
    (the replica as listed) is asked once those checks pass; it raises to say no. Returns what
    was removed and the space that freed."""
    from app.services.layout import command
    top = os.path.realpath(root)
    listed = list_replicas(top)
    found = next((r for r in listed if r["name"] == name), None) or _stateless(top, name)
    if found is None:
        names = ", ".join(sorted(str(r["name"]) for r in listed if r["name"] is not None))
        raise AgentError("path", f"no replica named {name!r} below {top}: " +
                         (f"the replicas there are {names}" if names else "it keeps none") +
                         f" ({command('replica', 'list', '--root', top)})", errno.ENOENT)
    root_fd = os.open(top, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        data = _data_beneath(root_fd, top, found)
        try:
            _refuse_held(found, _holder_of(Path(top) / META / "replicas" / found["id"] / "lock"))
            _refuse_used(top, found, data)
            confirm(found)
            rep = Replica(root_fd, top, found["name"], found["kind"])
            try:
                rep.lock({"remove": os.getpid()}, "remove")
            except AgentError:  # a session came meanwhile
                _refuse_held(found, _holder_of(rep.dir / "lock") or {})
                raise
            try:
                _refuse_used(top, found, data)
                kept = _stateless_data_kept(rep, found, data) if found.get("stateless") else ""
                return _remove_locked(rep, found, data, kept)
            finally:
                os.close(rep.lock_fd)  # (its file is gone once the bookkeeping is)
        finally:
            if data is not None:
                os.close(data[0])
    except OSError as exc:  # a name that leaves the root: refused as the agent refuses it
        why = ("a directory on its way there is a symlink or no directory (a session refuses "
               "it too)" if exc.errno in (errno.ENOTDIR, errno.ELOOP) else exc.strerror)
        raise AgentError("path", f"replica {name} ({os.path.join(top, name)}): {why} "
                         f"({errno.errorcode.get(exc.errno, 'E?')}); nothing was removed",
                         exc.errno) from None
    finally:
        os.close(root_fd)


def _data_beneath(root_fd: int, top: str, found: dict) -> tuple[int, bytes] | None:
    """(its parent's fd, its name) of a replica's data, reached as a session reaches it (no
    `..`, no symlink on the way, not the agent's own directory), or None when it is gone.
    Its bookkeeping must be the agent's too: the directory named after it (no symlink)."""
    name = found["name"]
    try:
        rel = safe_relpath(name)
    except ValueError as exc:
        raise AgentError("path", f"replica {name}: {exc}: refused, nothing was removed",
                         errno.EINVAL) from None
    if rel.split(b"/")[0] == META.encode() or replica_id(name) != found["id"]:
        raise AgentError("path", f"replica {name}: {top}/{META}/replicas/{found['id']} is not "
                         "the agent's bookkeeping of that name: refused, nothing was removed",
                         errno.EINVAL)
    os.close(open_beneath(root_fd, f"{META}/replicas/{found['id']}".encode()))
    parent, _, base = rel.rpartition(b"/")
    try:
        pfd = open_beneath(root_fd, parent)
    except FileNotFoundError:  # (a directory above it was removed, and it with it)
        return None
    try:
        st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        os.close(pfd)
        return None
    if stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR(st.st_mode) if found["kind"] == "fs"
                                        else stat.S_ISREG(st.st_mode)):
        os.close(pfd)
        raise AgentError("path", f"replica {name}: {os.path.join(top, name)} is not the "
                         f"{'directory' if found['kind'] == 'fs' else 'image file'} a session "
                         "makes (a symlink or something else put there): refused, nothing was "
                         "removed", errno.ELOOP if stat.S_ISLNK(st.st_mode) else errno.EINVAL)
    return pfd, base


def _stateless(top: str, name: str) -> dict | None:
    """The replica `name` as remove() needs it when its bookkeeping has no state.json (so
    list_replicas does not show it): a session makes ROOT/.mirrorsetup/replicas/ID, takes its
    lock and makes the data before it writes its state, and one killed (or refused the data it
    found there) in between leaves them so. Found by its name's ID; None when there is no such
    bookkeeping (or it has a state: then it is listed under the name that state says). Its
    kind is what is at its place (a directory: fs; else block: _data_beneath judges it)."""
    try:
        safe_relpath(name)
    except ValueError:
        return None
    rid = replica_id(name)
    bookkeeping = Path(top) / META / "replicas" / rid
    try:
        if not stat.S_ISDIR(os.lstat(bookkeeping).st_mode) \
                or read_small_file(bookkeeping, "state.json") is not None:
            return None
    except (FileNotFoundError, NotADirectoryError):
        return None
    path = os.path.join(top, name)
    try:
        kind = "fs" if stat.S_ISDIR(os.lstat(path).st_mode) else "block"
    except (FileNotFoundError, NotADirectoryError):
        kind = None
    return {"name": name, "id": rid, "kind": kind, "role": "secondary", "source": None,
            "consistent": False, "path": path, "stateless": True}


def _stateless_data_kept(rep: Replica, found: dict, data) -> str:
    """Under the replica's lock: why the data of a replica without state is kept ("" when it
    goes with the bookkeeping). A session writes into the data only after its state, so what
    it left is empty (a directory with nothing in it, an image whose first MiB is zeros, as a
    session judges data it finds); anything else was there before (the data a session refused)
    or is not known to be a replica's: it is kept. A state written meanwhile (a session came
    and went before we locked it) is refused: it is a replica now, to be looked at again."""
    if read_small_file(rep.dir, "state.json") is not None:
        from app.services.layout import command
        raise AgentError("changed", f"replica {found['name']} has a state now (a session wrote "
                         "it meanwhile): nothing was removed; look at it again "
                         f"({command('replica', 'list', '--root', rep.root)})", errno.EAGAIN)
    if data is None:
        return ""
    pfd, base = data
    fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC |
                 (os.O_DIRECTORY if found["kind"] == "fs" else 0), dir_fd=pfd)
    try:
        empty = Agent._data_empty(found["kind"], fd)
    finally:
        os.close(fd)
    return "" if empty else ("not empty, and no state says a session wrote it (data that was "
                             "there before the replica, which a session refuses to overwrite): "
                             "look at it, and remove it yourself if nothing needs it")


def _refuse_held(found: dict, holder: dict | None) -> None:
    """A session holds the replica's lock: refused, saying whose and what to do first."""
    from app.services.layout import command
    if holder is None:
        return
    name, pid, who = found["name"], holder.get("pid", "?"), holder.get("source") or {}
    action = holder.get("action", "replicate")
    kind, _, entry = str(who.get("entry", "")).partition(":")
    if entry:
        what = "replication" if action == "replicate" else action
        said = (f"the {what} session of {entry} on {who.get('host', '?')} (agent pid {pid}): "
                f"stop that entry on its source first (on {who.get('host', '?')}: "
                f"{command('fs' if kind == 'fs' else 'block', 'remove', entry)} ends its "
                "replication), then remove the replica here")
    elif "promote" in who or "remove" in who:
        said = f"a replica {next(iter(who))} of it (pid {pid}): let it end first"
    else:
        said = f"pid {pid}, which has not said whose session it is yet: try again in a moment"
    raise AgentError("locked", f"replica {name} is locked by {said}; nothing was removed",
                     errno.EBUSY)


def _refuse_used(top: str, found: dict, data) -> None:
    """Anything on this host that uses the replica's data (a mount, a loop, an open file) keeps
    it: its space would not be freed, and what uses it would lose it."""
    users = replica_users(top, found["name"], found["kind"]) if data is not None else []
    if users:
        promoted = "promoted and " if found["role"] == "primary" else ""
        raise AgentError("in-use", f"replica {found['name']} is {promoted}in use on this host: "
                         f"{'; '.join(users)}: stop using it first; nothing was removed",
                         errno.EBUSY)


def _remove_locked(rep: Replica, found: dict, data, kept: str = "") -> dict:
    """The data, then the bookkeeping (its lock last, still held), each measured first. A
    failure on the way is said with what was removed by then (code "removing"). `kept`: why
    the data stays (a replica without state whose data is not what its session left)."""
    from app.engine.applier import _remove_tree
    from app.services.units import human_size
    path = os.path.join(rep.root, found["name"])
    done = {"name": found["name"], "id": found["id"], "kind": found["kind"],
            "role": found["role"], "source": found.get("source"), "data": path,
            "data_bytes": 0, "bookkeeping": str(rep.dir), "bookkeeping_bytes": 0, "removed": []}
    try:
        if data is not None and not kept:
            done["data_bytes"] = _bytes_freed(*data)
            _remove_tree(*data)
            done["removed"].append(path)
        bfd = open_beneath(rep.root_fd, f"{META}/replicas".encode())
        try:
            done["bookkeeping_bytes"] = _bytes_freed(bfd, rep.id.encode())
        finally:
            os.close(bfd)
        rep.forget()
        done["removed"].append(str(rep.dir))
    except OSError as exc:
        raise AgentError("removing", f"replica {found['name']}: {exc.strerror} "
                         f"({exc.filename or path}, {errno.errorcode.get(exc.errno, 'E?')}); "
                         f"removed by then: {', '.join(done['removed']) or 'nothing'}",
                         exc.errno, done=done) from None
    done["freed_bytes"] = done["data_bytes"] + done["bookkeeping_bytes"]
    if found.get("stateless"):
        head, bookkeeping = f"{found['name']} ({STATELESS})", "its bookkeeping"
    else:
        src = (found.get("source") or {}).get("entry", "?").split(":", 1)[-1]
        head = f"{found['name']} ({found['kind']}, replica of {src})"
        bookkeeping = "its journal and state"
    bookkeeping += f" {rep.dir} ({human_size(done['bookkeeping_bytes'])})"
    freed = f"{human_size(done['freed_bytes'])} freed"
    if kept:
        done["message"] = (f"removed {bookkeeping} of replica {head}, {freed}; its data {path} "
                           f"was kept: {kept}")
        return done
    data_said = (f"its data {path} ({human_size(done['data_bytes'])})" if data is not None else
                 f"its data {path} was not there")
    done["message"] = f"removed replica {head}: {data_said} and {bookkeeping}; {freed}"
    return done


def _bytes_freed(parent_fd: int, name: bytes) -> int:
    """What removing `name` below `parent_fd` frees: its blocks, and those of every file and
    directory under it (a file with a name outside it too frees nothing)."""
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_blocks * 512 if st.st_nlink <= 1 else 0
    seen: dict[tuple[int, int], list] = {}
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        for _, dirs, files, dfd in os.fwalk(".", dir_fd=fd):
            for n in dirs + files:
                s = os.stat(n, dir_fd=dfd, follow_symlinks=False)
                seen.setdefault((s.st_dev, s.st_ino), [s, 0])[1] += 1
    finally:
        os.close(fd)
    return st.st_blocks * 512 + sum(s.st_blocks * 512 for s, names in seen.values()
                                    if stat.S_ISDIR(s.st_mode) or names >= s.st_nlink)
