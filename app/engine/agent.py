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
import socket
import stat
import sys
import threading
import time
import uuid
from pathlib import Path

from app.services import wire
from app.engine.journal import KIND_BLOCK, KIND_FS, Journal, JournalGap, decode_at, read_small_file, write_small_file
from app.engine.lowlevel import open_beneath, safe_relpath
from app.engine.shipper import TargetUnavailable

log = logging.getLogger("mirrorsetup.agent")
META = ".mirrorsetup"
HEARTBEAT_TIMEOUT = 15.0  # no frame from the source for this long: the session is dead
APPLY_SYNC_SECONDS = 1.0  # the applied position is made durable (syncfs) this often
PAUSE_RETRY_SECONDS = 2.0
TAKE_OVER_SECONDS = 10.0  # a stale session of the same source is ended within this
PATH_ARGS = ("path", "old", "new", "src")


def replica_id(rel: str) -> str:
    from app.services.layout import entry_id
    return entry_id(rel)


class AgentError(Exception):
    def __init__(self, code: str, message: str, err: int | None = None):
        super().__init__(message)
        self.code, self.errno = code, err


class Replica:
    """One replica's bookkeeping under ROOT/.mirrorsetup/replicas/ID."""

    def __init__(self, root_fd: int, root: str, rel: str, kind: str):
        self.root_fd, self.root, self.rel, self.kind = root_fd, root, rel, kind
        self.id = replica_id(rel)
        meta = open_beneath(root_fd, f"{META}/replicas/{self.id}".encode(), make_dirs=True)
        os.close(meta)
        self.dir = Path(root) / META / "replicas" / self.id
        self.lock_fd: int | None = None

    def state(self) -> dict:
        text = read_small_file(self.dir, "state.json")
        return json.loads(text) if text else {}

    def save(self, state: dict) -> None:
        write_small_file(self.dir, "state.json", json.dumps(state, indent=1, sort_keys=True) + "\n")

    def lock(self, source: dict) -> None:
        """One session per replica. The same source's stale session (a lost connection not yet
        noticed here) is ended; another source is refused by name."""
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + TAKE_OVER_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(fd)
                if holder.get("source") != source or time.monotonic() > deadline:
                    os.close(fd)
                    who = holder.get("source", {})
                    raise AgentError("locked", f"replica {self.rel} is locked by agent pid "
                                     f"{holder.get('pid', '?')} for {who.get('entry', '?').split(':', 1)[-1]} "
                                     f"on {who.get('host', '?')} (another source)", errno.EBUSY) from None
                with contextlib.suppress(ProcessLookupError, TypeError):
                    os.kill(int(holder.get("pid")), signal.SIGTERM)  # our own stale session
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "source": source}).encode(), 0)
        self.lock_fd = fd


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


class ConfinedFsApplier:
    """FsApplier whose record paths a remote source chose: checked, and their parent
    directories resolved without symlinks, before anything is done."""

    NAME_OPS = {"rename", "unlink", "rmdir", "remove", "prune", "symlink", "mkdir", "link", "create", "mknod"}

    def __init__(self, target_fd: int):
        from app.engine.applier import FsApplier
        self.inner = FsApplier(target_fd)
        self.fd = target_fd
        self._safe: set[bytes] = {b""}

    def _check(self, text: str) -> None:
        rel = safe_relpath(text)
        parent = rel.rpartition(b"/")[0]
        if parent in self._safe:
            return
        os.close(open_beneath(self.fd, parent))  # ENOTDIR on a symlinked directory
        self._safe.add(parent)

    def apply(self, rec) -> None:
        for key in PATH_ARGS:
            if key in rec.args and rec.args[key]:
                self._check(rec.args[key])
        if rec.op in self.NAME_OPS:
            self._safe = {b""}  # a name changed: check again
        self.inner.apply(rec)

    def sync(self) -> None:
        self.inner.sync()

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

    # -- output
    def send(self, kind: int, obj: dict) -> None:
        with self.wlock:
            self.wfile.write(wire.jframe(kind, obj))
            self.wfile.flush()

    def positions(self) -> dict:
        j = self.journal
        return {"received": j.last_seq, "applied": j.released_seq, "ts": time.time(),
                "consistent": bool(self.state.get("consistent")), "paused": self.paused}

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
            self.serve()
        except AgentError as exc:
            log.error("%s", exc)
            self.send(wire.ERROR, {"code": exc.code, "message": str(exc), "errno": exc.errno})
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
        while not self.stop.wait(1.0):
            if time.monotonic() - self.last_frame > HEARTBEAT_TIMEOUT:
                log.error("no frame from the source for %.0f s: ending the session", HEARTBEAT_TIMEOUT)
                self.finish()
                os._exit(3)

    def hello(self, h: dict) -> None:
        if h.get("version") != wire.VERSION:
            raise AgentError("version", f"the source speaks wire version {h.get('version')}, this "
                             f"agent {wire.VERSION}: upgrade one side", errno.EPROTO)
        action = h.get("action", "replicate")
        st = os.statvfs(self.root)
        info = {"version": wire.VERSION, "agent": _version(), "host": socket.gethostname(),
                "free_bytes": st.f_bavail * st.f_frsize, "root": self.root}
        if action == "test":
            self.send(wire.WELCOME, info)
            return
        if action != "replicate":
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
        self.replica = Replica(self.root_fd, self.root, rel, kind)
        self.replica.lock(source)
        self.state = state = self.replica.state()
        if state and state.get("source") != source and not h.get("adopt"):
            theirs = state.get("source", {})
            raise AgentError("not-ours", f"replica {rel} is the replica of "
                             f"{theirs.get('entry', '?').split(':', 1)[-1]} on {theirs.get('host', '?')}, "
                             "not of this source: refusing to overwrite it", errno.EEXIST)
        if state and state.get("kind", kind) != kind:
            raise AgentError("not-ours", f"replica {rel} is a {state.get('kind')} replica, not {kind}",
                             errno.EEXIST)
        self._open_data(rel, kind, h)
        if not state or state.get("source") != source:
            self.state = state = {"source": source, "kind": kind, "path": rel,
                                  "generation": h.get("generation") or uuid.uuid4().hex,
                                  "created": time.time(), "consistent": False, "consistent_seq": 0}
            self.replica.save(state)
        self.journal = Journal(self.replica.dir, kind=KIND_FS if kind == "fs" else KIND_BLOCK)
        if self.journal.gap or self.journal.torn_bytes:  # our journal lost records: ask for a resync
            self.journal.skip_to(self.journal.last_seq)
            self._inconsistent()
        self.codec = wire.Codec(h.get("compression", "zstd"))
        self.send(wire.WELCOME, {**info, **self.positions(), "generation": state["generation"],
                                 "consistent_seq": state.get("consistent_seq", 0)})
        threading.Thread(target=self._apply_loop, daemon=True).start()

    def _open_data(self, rel: str, kind: str, h: dict) -> None:
        from app.engine.target import LocalBlockTarget, LocalDirTarget
        raw = rel.encode(errors="surrogateescape")
        parent, _, name = raw.rpartition(b"/")
        pfd = open_beneath(self.root_fd, parent, make_dirs=True)
        try:
            if kind == "fs":
                try:
                    os.mkdir(name, 0o700, dir_fd=pfd)
                except FileExistsError:
                    pass
                fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                self.target = LocalDirTarget.on_fd(fd, rel)
                self.target.applier = ConfinedFsApplier(fd)
            else:
                size = int(h.get("size") or 0)
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    os.close(fd)
                    raise AgentError("path", f"replica {rel} is not a regular file", errno.EINVAL)
                if st.st_size < size:
                    os.ftruncate(fd, size)
                self.target = LocalBlockTarget.on_fd(fd, rel, size)
        finally:
            os.close(pfd)

    def serve(self) -> None:
        while True:
            got = wire.read_frame(self.rfile.read)
            self.last_frame = time.monotonic()
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
                self._inconsistent()
                self.send(wire.ACK, self.positions())
            elif kind == wire.MARK:
                self.state["mark_seq"] = int(json.loads(payload)["seq"])
                self._consistent_if_applied()
                self.replica.save(self.state)
                self.send(wire.ACK, self.positions())
            elif kind == wire.REQ:
                req = json.loads(payload)
                threading.Thread(target=self._query, args=(req,), daemon=True).start()
            else:
                raise wire.WireError(f"unexpected {wire.NAMES.get(kind)} frame")

    def _data(self, payload: bytes) -> None:
        raw = self.codec.unpack(payload)
        recs, pos = [], 0
        while pos < len(raw):
            rec, pos = decode_at(raw, pos)
            recs.append(rec)
        if recs and recs[0].seq <= self.journal.last_seq:  # resent after a reconnect: drop what we hold
            recs = [r for r in recs if r.seq > self.journal.last_seq]
        if not recs:
            self.send(wire.ACK, self.positions())
            return
        if self.paused:
            return  # dropped, not acknowledged: the source sends it again after RESUME
        if recs[0].seq > self.journal.last_seq + 1:  # an earlier batch was dropped: resend from there
            self.send(wire.REWIND, self.positions())
            return
        try:
            self.journal.ingest_durably(recs)
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
        return True

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
                batch = j.read(512, timeout=0.2)
                if batch:
                    self.target.send(batch)
                due = time.monotonic() - last_sync > APPLY_SYNC_SECONDS or not batch
                if j.sent_seq > j.released_seq and due:
                    self.target.flush()
                    j.release(j.sent_seq)
                    last_sync = time.monotonic()
                    if self._consistent_if_applied():
                        self.replica.save(self.state)
                    self.send(wire.ACK, self.positions())
                if not batch and self.paused and _has_room(self.root):
                    self._resume()
            except TargetUnavailable as exc:
                j.rewind(max(exc.taken or 0, j.released_seq))
                self._pause(exc.state.removeprefix("paused: "))
                self.stop.wait(PAUSE_RETRY_SECONDS)
            except JournalGap as gap:
                log.error("%s", gap)
                self.stop.wait(PAUSE_RETRY_SECONDS)
            except OSError as exc:
                log.error("apply: %s", exc)
                self.stop.wait(PAUSE_RETRY_SECONDS)

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
        if method == "info":
            info = t.info(rel)
            return None if info is None else info.to_wire()
        if method == "children":
            kids = t.children(rel)
            return None if kids is None else {os.fsdecode(k): v.to_wire() for k, v in kids.items()}
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


def _has_room(root: str, need: int = 8 << 20) -> bool:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize >= need


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("mirrorsetup")
    except Exception:
        return "unknown"


def main(root: str) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"mirrorsetup-agent[{os.getpid()}] %(levelname)s %(message)s")
    os.umask(0)  # replicated modes are set explicitly; our own files name theirs
    if not os.path.isdir(root):
        sys.stdout.buffer.write(wire.GREETING)
        sys.stdout.buffer.write(wire.jframe(wire.ERROR, {"code": "root", "message":
                                f"serve-target root {root} is not a directory", "errno": errno.ENOENT}))
        sys.stdout.buffer.flush()
        return 1
    agent = Agent(root, sys.stdin.buffer, sys.stdout.buffer)
    return agent.run()

