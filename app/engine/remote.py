"""A replica on another host: the source side of `mirrorsetup serve-target`, over OpenSSH.

OpenSSH runs as a subprocess (the rsync / borg / `zfs send | ssh` pattern): the administrator's
keys, agent, ProxyJump and ssh_config work as they expect, no port of ours listens, the host
key is pinned in the target's own known_hosts file (StrictHostKeyChecking=yes, BatchMode=yes),
dead peers are noticed by ServerAliveInterval/CountMax and by our own heartbeats.

This is one more `Target`: the shipper hands it batches of journal records, which go out as
DATA frames (zstd per batch when that is smaller, zero runs as their length), pipelined within
a window of bytes in flight, under a token bucket on wire bytes. The agent acknowledges two
positions: received (durable in its journal) and applied (durable on the replica); the journal
frees records only up to what the agent received. On reconnect the agent's positions say where
to resume; records the source no longer holds make a resync (SKIP, then catching up). The
reconciler and verify ask for listings and hashes (REQ/REP) on the same session.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import threading
import time
from collections import deque
from dataclasses import asdict

from app.engine import sync
from app.services import wire
from app.services.targets import Settings, session_error_text, ssh_failure_text
from app.engine.journal import JournalGap, Record
from app.engine.journal import decode_at as decode_record
from app.engine.shipper import BACKOFF_MAX_LOCAL, TargetUnavailable
from app.engine.target import Positions, Queried, Target, listing_from_wire

log = logging.getLogger("mirrorsetup.remote")
BEAT_SECONDS = 1.0
PEER_TIMEOUT = 15.0  # no frame from the agent for this long: the session is dead
CONNECT_SECONDS = 30.0  # ssh + greeting + WELCOME
PREPARED_SECONDS = 10.0  # a prepared session not opened by then is started again (the agent
# ends a session that sends nothing for 15 s)
WINDOW_MIN = 8 << 20
QUERY_SECONDS = 300.0
STDERR_SECONDS = 1.0  # an ended ssh's last words are read for at most this long
LIVE_SETTINGS = {"bandwidth", "resync_bandwidth"}  # taken by a running session (adjust)


_NONE = object()


def ssh_failure(stderr: str, status: int | None, target: str = "TARGET") -> TargetUnavailable:
    """What an ssh to `target` that ended before the agent answered means, in status words."""
    state, retry = ssh_failure_text(stderr, status, target)
    return TargetUnavailable(state, retry=retry)


def paused_text(reason: str, s: Settings) -> str:
    """The agent's reason for a pause, with the next step when it is room (the agent knows
    neither the name we reach its host by nor that the administrator reads it here)."""
    if reason.startswith("target full"):
        return f"{reason}: free space below {s.root} on {s.host}"
    if reason.startswith("target over quota"):
        return f"{reason}: free space below {s.root} on {s.host}, or raise the quota there"
    return reason


class RemoteTarget(Queried, Target):
    def __init__(self, settings: Settings, kind: str, size: int | None, claim, *, state_dir=None,
                 generation: str | None = None, journal_seqs=None):
        self.s = settings
        self.kind = kind
        self.size = size
        self.claim = claim
        self.generation = generation
        self.journal_seqs = journal_seqs  # () -> (last, released): what the HELLO says we hold
        # () -> bool: every change of the source is in its journal (no catch-up pending or
        # running, nothing dropped): its last seq then says whether it moved on (a fail-over
        # is told from a split brain by it)
        self.settled = None
        self.label = f"{settings.name}:{settings.path}"
        # uncapped: compressed only while the link is the slower part (wire.Codec)
        self.codec = wire.Codec(settings.compression, adaptive=not settings.bandwidth)
        self.proc: subprocess.Popen | None = None
        self._wlock = threading.Lock()
        self._cv = threading.Condition()
        self._inflight: deque[tuple[int, int]] = deque()  # (last seq of a DATA frame, its bytes)
        self._inflight_bytes = 0
        self._expect = 0  # the next seq the agent expects
        self._order = threading.Lock()  # a SKIP of dropped records, and `_expect`, in order
        self._hashed = False  # listings bring hash lists (compare_by_hashes)
        self._hash_lists: dict[str, list[str] | None] = {}  # path -> hashes, from a listing
        self._failure: TargetUnavailable | None = None
        # a pause or a rewind is the shipper's business, not a query's: only a failure ends one
        self.queries = wire.Queries(lambda req: self._send(wire.jframe(wire.REQ, req)),
                                    lambda: self._failure, TargetUnavailable, window=wire.AHEAD_WINDOW,
                                    timeout=QUERY_SECONDS, label=self.label, cv=self._cv)
        self._gap: str | None = None
        self.paused: str | None = None
        self._rewind: int | None = None
        self.pos = Positions(0, 0)
        self.welcome: dict = {}
        self.rtt: float | None = None
        self.last_frame = 0.0
        self.errors = 0  # records the agent could not apply (divergences), over all sessions
        self._errors_before = 0
        self.superseded = 0  # catch-up records the agent found no place for (sent whole instead)
        self._superseded_before = 0
        self.pending_mark: int | None = None  # a catch-up's end, until the agent says it is consistent
        self.last_error: str | None = None
        self.consistent = False
        self._tokens = 0.0
        self._tokens_at = time.monotonic()
        self._stderr: deque[str] = deque(maxlen=50)
        self.on_positions = None  # (Positions) -> None, called by the reader as they arrive

    @classmethod
    def from_spec(cls, spec: dict, kind: str, size: int | None, claim, **kw) -> RemoteTarget:
        known = {f for f in Settings.__dataclass_fields__}
        return cls(Settings(**{k: v for k, v in spec.items() if k in known}), kind, size, claim, **kw)

    # -- session ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Start ssh and let the agent start and greet while the caller does something else
        (capture mounts meanwhile): the first open() then only shakes hands."""
        if self.proc is None:
            self._spawn()

    def _spawn(self) -> None:
        proc = subprocess.Popen(self.s.ssh_argv("mirrorsetup-agent"), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                                start_new_session=True)
        self.proc = proc
        self._spawned_with = self.s  # (adjust() during a connect: that session is not kept)
        self._stderr = deque(maxlen=50)  # this session's own: an old one's words do not color it
        self._stderr_reader = threading.Thread(target=self._read_stderr, args=(proc, self._stderr),
                                               daemon=True)
        self._stderr_reader.start()
        greeting = {"go": threading.Event(), "done": threading.Event(), "since": time.monotonic(),
                    "proc": proc}

        def greet() -> None:
            try:
                wire.skip_to_greeting(proc.stdout.read)
                greeting["go"].wait()  # until open() says what the session is for
                if greeting.get("action") is None:
                    return  # closed before any open()
                greeting["sent"] = True  # (from here on the agent may have acted on it)
                self._send(wire.jframe(wire.HELLO, self._hello(greeting["action"])))
                greeting["frame"] = wire.read_frame(proc.stdout.read)
            except (wire.WireError, OSError) as exc:
                greeting["error"] = exc
            finally:
                greeting["done"].set()
        self._greeting = greeting
        threading.Thread(target=greet, daemon=True).start()

    def request_sent(self) -> bool:
        """Was the last open()'s hello (its request: promote, ...) written to the session? Until
        then the agent cannot have acted on it; after, a failure leaves that unknown."""
        return bool((getattr(self, "_greeting", None) or {}).get("sent"))

    def open(self, action: str = "replicate", **extra) -> Positions:
        """Connect and shake hands. `action` other than "replicate": the agent's answer is in
        `self.welcome` and the session is the caller's (promote, discard, failback)."""
        g = getattr(self, "_greeting", None)
        fresh = (g is not None and g["proc"] is self.proc and self.proc.poll() is None
                 and "action" not in g and time.monotonic() - g["since"] < PREPARED_SECONDS)
        if not fresh:  # nothing prepared, or that one is used, ended or too old
            self.close()
            self._spawn()
        g = self._greeting
        self._extra = extra
        self._failure, self._gap, self.paused, self._rewind = None, None, None, None
        self.queries.new_session()
        self._errors_before, self._superseded_before = self.errors, self.superseded
        g["action"] = action
        g["go"].set()
        if not g["done"].wait(CONNECT_SECONDS):
            self.close()
            raise TargetUnavailable(f"disconnected: no answer from {self.s.host} within "
                                    f"{CONNECT_SECONDS:.0f} s")
        got = g.get("frame")
        if got is None:
            status = self._end_ssh()
            raise ssh_failure(self._said(), status, self.s.name)
        kind, payload = got
        msg = json.loads(payload)
        if kind == wire.ERROR:
            self._end_ssh()
            raise _agent_error(msg)
        if kind != wire.WELCOME:
            self._end_ssh()
            raise TargetUnavailable(f"disconnected: the agent answered {wire.NAMES.get(kind)}")
        self.welcome = msg
        self.last_frame = time.monotonic()
        if action != "replicate":
            return Positions(0, 0)
        if self._spawned_with is not self.s:  # target set while it connected: a new one
            self.close()
            raise TargetUnavailable("connecting: the target's settings changed (target set): "
                                    "a new session takes them", delay=0.0)
        self.pos = Positions(msg["received"], msg["applied"])
        self.consistent = bool(msg.get("consistent"))
        with self._order:
            self._expect = self.pos.received + 1
        self._inflight.clear()
        self._inflight_bytes = 0
        self._marked()
        threading.Thread(target=self._read_loop, args=(self.proc,), daemon=True).start()
        threading.Thread(target=self._beat_loop, args=(self.proc,), daemon=True).start()
        if self.journal_seqs is not None:
            last, released = self.journal_seqs()
            if self.pos.received > last:
                self.close()
                raise TargetUnavailable(f"refused: the target holds records up to "
                                        f"{self.pos.received} but this source only up to {last}: "
                                        "its history is not ours (adopt_target replaces it)", retry=False)
        self._say_mark_again()
        return self.pos

    def _hello(self, action: str) -> dict:
        last, released = self.journal_seqs() if self.journal_seqs else (0, 0)
        return {"version": wire.VERSION, "action": action, "path": self.s.path, "kind": self.kind,
                "size": self.size, "compression": self.s.compression,
                "source": {"host": self.claim.host, "entry": self.claim.entry} if self.claim else {},
                "adopt": bool(self.claim and self.claim.adopt), "generation": self.generation,
                "last_seq": last, "released_seq": released,
                "settled": bool(self.settled and self.settled()), **getattr(self, "_extra", {})}

    def _said(self) -> str:
        """What the ended ssh wrote on stderr: all of it (its reader is given a moment to read
        the rest; the verdict, e.g. "Host key verification failed.", comes last)."""
        reader = getattr(self, "_stderr_reader", None)
        if reader is not None and reader is not threading.current_thread():
            reader.join(STDERR_SECONDS)
        return "\n".join(self._stderr)

    def _read_stderr(self, proc, lines: deque) -> None:
        for line in proc.stderr:
            text = line.decode(errors="replace").rstrip()
            lines.append(text)
            if text and not text.startswith("mirrorsetup-agent") or "ERROR" in text:
                log.info("%s: ssh: %s", self.label, text.removeprefix("ssh: "))  # (ssh's own)

    def _read_loop(self, proc) -> None:
        try:
            while True:
                got = wire.read_frame(proc.stdout.read)
                if got is None:
                    raise wire.WireError("the session ended")
                kind, payload = got
                self.last_frame = time.monotonic()
                msg = json.loads(payload) if payload else {}
                if kind in (wire.ACK, wire.BEAT, wire.RESUME, wire.PAUSE):
                    self._positions(msg)
                    seen = self.on_positions
                    if seen is not None and "received" in msg and proc is self.proc:
                        seen(self.pos)
                if kind == wire.BEAT and msg.get("echo"):
                    self.rtt = max(0.0, time.time() - msg["echo"])
                elif kind == wire.PAUSE:
                    self.paused = paused_text(msg.get("reason", "target full"), self.s)
                elif kind == wire.RESUME:
                    self.paused = None
                elif kind == wire.REWIND:
                    self._rewind = msg["received"]
                elif kind == wire.REP:
                    self.queries.answer(msg)
                elif kind == wire.ERROR:
                    if msg.get("code") == "gap":
                        self._gap = msg.get("message")
                    else:
                        self._fail(_agent_error(msg))
                    return
        except (wire.WireError, OSError, ValueError) as exc:
            if proc is self.proc:
                # ssh's stdout ends as it exits: its last words (e.g. "Timeout, server … not
                # responding.") and its exit status are waited for a moment before the reason
                # is chosen. Looked at at once, both were often not there yet, and a blackhole
                # was told as "the session ended" (helper-35's walk, several entries at once)
                said = self._said()
                status = proc.poll()
                if status is None:
                    try:
                        status = proc.wait(STDERR_SECONDS)
                    except subprocess.TimeoutExpired:
                        pass
                self._fail(ssh_failure(said, status, self.s.name) if said.strip() and status is not None
                           else TargetUnavailable(f"disconnected: {session_error_text(exc)}"))

    def _positions(self, msg: dict) -> None:
        if "received" not in msg:
            return
        with self._cv:
            self.pos = Positions(msg["received"], msg["applied"])
            self.consistent = bool(msg.get("consistent"))
            self._marked()
            if msg.get("apply_errors"):  # this session's agent's; those before it are kept
                self.errors = self._errors_before + msg["apply_errors"]
                self.last_error = msg.get("last_error") or self.last_error
            if msg.get("superseded"):
                self.superseded = self._superseded_before + msg["superseded"]
            while self._inflight and self._inflight[0][0] <= self.pos.received:
                self._inflight_bytes -= self._inflight.popleft()[1]
            self._cv.notify_all()

    def _beat_loop(self, proc) -> None:
        while proc is self.proc and proc.poll() is None and self._failure is None:
            try:
                self._send(wire.jframe(wire.BEAT, {"ts": time.time()}))
            except OSError:
                return
            if time.monotonic() - self.last_frame > PEER_TIMEOUT:
                self._fail(TargetUnavailable(f"disconnected: no answer from the agent for "
                                             f"{PEER_TIMEOUT:.0f} s"))
                return
            time.sleep(BEAT_SECONDS)

    def _fail(self, exc: TargetUnavailable) -> None:
        with self._cv:
            if self._failure is None:
                self._failure = exc
            self._cv.notify_all()
        self._end_ssh()  # (said by the shipper, which clears it when a session is back)

    def _send(self, data: bytes) -> None:
        self._send_parts([data])

    def _send_parts(self, parts: list) -> None:
        with self._wlock:
            proc = self.proc
            if proc is None or proc.stdin is None:
                raise OSError("no session")
            try:
                fd = proc.stdin.fileno()  # unbuffered (bufsize=0): nothing waits in Python
            except ValueError:  # closed meanwhile (the session ended): like a broken pipe
                raise OSError(errno.EPIPE, "the session is closed") from None
            wire.write_all(fd, parts)

    def _check(self) -> None:
        if self._gap:
            self._gap = None
            raise JournalGap(self._expect, self._expect)  # the agent lost records: resync
        if self._failure is not None:
            raise self._failure
        if self.paused:
            raise TargetUnavailable(f"paused: {self.paused}", taken=self.pos.received, disconnect=False)
        if self._rewind is not None:
            taken, self._rewind = self._rewind, None
            with self._cv:
                self._inflight.clear()
                self._inflight_bytes = 0
            with self._order:
                self._expect = taken + 1
            raise TargetUnavailable("connected", taken=taken, disconnect=False, delay=0.0)

    def adjust(self, spec: dict) -> tuple[list[str], bool]:
        """`target set` while the capture runs (the daemon's target_settings): new settings of
        the same target and replica. (changed setting names, whether the session started
        again). The rates are taken by the next batch; what ssh or the agent was started with
        (port, user, identity, known_hosts, ssh_config, compression, keep-alive) needs a new
        session: the current one ends and the shipper (kicked by the caller) connects again at
        once with them, resuming from the target's own position as after any fault. Blocking
        (ssh is waited for): called from a thread."""
        known = Settings.__dataclass_fields__
        new = Settings(**{k: v for k, v in {**asdict(self.s), **spec}.items() if k in known})
        if (new.name, new.host, new.root, new.path) != (self.s.name, self.s.host, self.s.root,
                                                         self.s.path):
            raise ValueError(f"{new.name}:{new.path} is not {self.label}: not a change of settings")
        changed = [k for k in known if getattr(new, k) != getattr(self.s, k)]
        if not changed:
            return [], False
        self.s = new
        if {"compression", "bandwidth"} & set(changed):  # (adaptive only while uncapped)
            self.codec = wire.Codec(new.compression, adaptive=not new.bandwidth)
        with self._cv:
            self._tokens = min(self._tokens, (new.bandwidth or 0) * 0.25)
        reconnect = bool(set(changed) - LIVE_SETTINGS)
        if reconnect:
            g = getattr(self, "_greeting", None)
            if g is not None and "action" not in g:  # prepared with the old settings: unused
                self.close()
            elif self.proc is not None:
                self._fail(TargetUnavailable(f"connecting: {', '.join(changed)} changed "
                                             "(target set): a new session takes them", delay=0.0))
        return changed, reconnect

    # -- shipping ---------------------------------------------------------------------------
    def send(self, records: list[Record]) -> int:
        self._check()
        with self._order:
            self._skip_dropped(records[0].seq - 1)  # records the journal dropped for a resync
            # (max: records read before a drop that begin_catch_up said already go as well;
            # the agent drops them as held)
            self._expect = max(self._expect, records[-1].seq + 1)
        parts: list = []
        for r in records:
            parts += self._wire_record(r).encode_parts()  # the data is never copied here
        size = sum(map(len, parts))
        payload = self.codec.pack_parts(parts, size)
        wire_size = sum(map(len, payload)) + wire.HEAD.size
        self._throttle(wire_size)
        window = max(WINDOW_MIN, int(2 * (self.s.bandwidth or 0) * (self.rtt or 0.1)))
        deadline = time.monotonic() + PEER_TIMEOUT
        with self._cv:
            while self._inflight_bytes > window and self._failure is None and not self.paused:
                if not self._cv.wait(max(0.0, deadline - time.monotonic())):
                    raise TargetUnavailable(f"disconnected: no acknowledgement for {PEER_TIMEOUT:.0f} s",
                                            taken=self.pos.received)
            self._check()
            self._inflight.append((records[-1].seq, size))
            self._inflight_bytes += size
        try:
            t = time.monotonic()
            self._send_parts(wire.frame_parts(wire.DATA, payload))
            self.codec.wrote(wire_size, time.monotonic() - t)
        except OSError as exc:
            self._fail(TargetUnavailable(f"disconnected: {session_error_text(exc)}"))
            raise self._failure from exc
        return wire_size

    def _wire_record(self, rec: Record) -> Record:
        """A block write of zeros travels as its length."""
        if self.kind == "block" and rec.op == "write" and wire.is_zeros(rec.data):
            return Record(rec.seq, rec.kind, "zero", {"offset": rec.args["offset"],
                                                      "length": len(rec.data)})
        return rec

    @property
    def batch_bytes(self) -> int | None:
        """The largest batch worth sending at once: under a bandwidth cap, a quarter second of
        it (the token bucket's depth), so the rate holds over any second, not in 4 MiB steps."""
        rate = self.s.bandwidth
        return max(64 << 10, int(rate * 0.25)) if rate else None

    def _throttle(self, nbytes: int) -> None:
        """Token bucket on wire bytes: the configured bandwidth, averaged over ~0.25 s."""
        rate = self.s.bandwidth
        if not rate:
            return
        now = time.monotonic()
        self._tokens = min(rate * 0.25, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        self._tokens -= nbytes
        if self._tokens < 0:
            time.sleep(-self._tokens / rate)

    def flush(self) -> Positions:
        self._check()
        return self.pos

    def skip_to(self, seq: int) -> None:
        """Records up to `seq` will never come: the agent forgets its own, a resync follows."""
        with self._order:
            self._send(wire.jframe(wire.SKIP, {"through": seq}))
            self._expect = seq + 1

    def _skip_dropped(self, through: int) -> None:
        """Under `_order`: records up to `through` that the agent has not had were dropped
        from the journal for a resync (Capture.request_catch_up): the agent is told (SKIP) it
        will never get them. It forgets a catch-up's marks then, so a SKIP must never follow
        the MARK of the catch-up that covers them (begin_catch_up)."""
        if through >= max(self._expect, 1):
            self._send(wire.jframe(wire.SKIP, {"through": through}))
            self._expect = through + 1

    def mark_consistent(self, seq: int) -> None:
        """The catch-up has emitted everything: consistent once the agent applied `seq`. Said
        again to the next session until the agent says it is (a session that ended first may
        have lost it: the replica stayed inconsistent until the next catch-up)."""
        self.pending_mark = seq
        self._send(wire.jframe(wire.MARK, {"seq": seq}))

    def _say_mark_again(self) -> None:
        """To a new session: a catch-up's end told to one that ended before the agent said it
        had applied it (it may never have read it). Only to an agent that takes it as such
        ("mark-again": it honours it only while that catch-up is still the replica's last
        word, not after a SKIP or a demotion); an older one stays inconsistent until the next
        catch-up, as before (and status no longer says the target applies it)."""
        if self.pending_mark is None:
            return
        if "mark-again" not in self.welcome.get("features", ()):
            self.pending_mark = None
            return
        self._send(wire.jframe(wire.MARK, {"seq": self.pending_mark, "again": True}))

    def _marked(self) -> None:
        if self.pending_mark is not None and self.consistent and self.pos.applied >= self.pending_mark:
            self.pending_mark = None  # (an answer from before the catch-up's MARK is none)

    def begin_catch_up(self, dropped_through: int = 0) -> None:
        """A catch-up begins: the replica is inconsistent until a MARK's seq is applied (the
        agent refuses to promote it meanwhile), and a record that finds no such name there
        is superseded by what the catch-up sends, not an apply error. Only to an agent that
        says "catch-up-marks"; an older one learns it only after a gap (SKIP).
        Records up to `dropped_through` were dropped for this catch-up: said first (SKIP).
        The shipper said it only with the next records it sent, and a SKIP that came after
        this catch-up's end MARK made the agent forget that MARK: the replica stayed
        inconsistent for good (status: "catching up (the target applies the rest)")."""
        self.pending_mark = None
        with self._order:
            self._skip_dropped(dropped_through)
            if "catch-up-marks" in self.welcome.get("features", ()):
                self._send(wire.jframe(wire.MARK, {"begin": True}))

    # -- queries (wire.Queries: asked ahead by a walk, see sync.Ahead) ------------------------
    def compare_by_hashes(self, on: bool) -> None:
        """A walk that compares every file by hashes begins (or ends): the listings it asks
        for then bring the hash lists of their small files along (an agent that says
        "hashed-listings"), so a directory's files cost it no query, and no wait, each."""
        with self._cv:
            self._hashed = on and "hashed-listings" in self.welcome.get("features", ())
            self._hash_lists.clear()

    def ask_ahead(self, method: str, rel: bytes) -> bool:
        if self._hashed and method == "file_hashes":
            with self._cv:
                if os.fsdecode(rel) in self._hash_lists:
                    return True  # came with its directory's listing
        if self._hashed and method == "children":
            return self.queries.ask_ahead(method, rel, hashes=True)
        return super().ask_ahead(method, rel)

    def forget_ahead(self, keys) -> None:
        with self._cv:
            for method, rel in keys:
                if method == "file_hashes":
                    self._hash_lists.pop(os.fsdecode(rel), None)
        super().forget_ahead(keys)

    def children(self, rel: bytes) -> dict[bytes, sync.Info] | None:
        if not self._hashed:
            return super().children(rel)
        d = self.queries.asked("children", rel, hashes=True)
        if d is not None:
            prefix = os.fsdecode(rel) + "/" if rel else ""
            with self._cv:
                for name, hashes in d["hashes"].items():
                    self._hash_lists[prefix + name] = hashes
            d = d["entries"]
        return listing_from_wire(d)

    def file_hashes(self, rel: bytes) -> list[str] | None:
        if self._hashed:
            with self._cv:
                got = self._hash_lists.pop(os.fsdecode(rel), _NONE)
            if got is not _NONE:
                return got
        return super().file_hashes(rel)

    def scan(self, *, hashes: bool = True) -> dict[bytes, sync.Info]:
        return listing_from_wire(self.queries.call("scan", hashes=hashes))

    def apply_ops(self, ops) -> None:
        raise TargetUnavailable("refused: a remote replica is written only by its capture; mount "
                                "or attach the entry first", retry=False)

    # -- end --------------------------------------------------------------------------------
    def _end_ssh(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        with self._wlock:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            return proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def close(self) -> None:
        g = getattr(self, "_greeting", None)
        if g is not None:
            g["go"].set()  # a greeting thread still waiting for open() ends
        if self.proc is not None:
            self._end_ssh()
            self.proc = None

    def figures(self) -> dict:
        return {"rtt": self.rtt, "agent": self.welcome.get("agent"),
                "free_bytes": self.welcome.get("free_bytes"), "target_consistent": self.consistent}


def _agent_error(msg: dict) -> TargetUnavailable:
    code, text = msg.get("code", "error"), msg.get("message", "the agent refused")
    if code in ("locked", "not-ours", "path", "version", "root", "split-brain", "in-use",
                "not-promoted", "promoted", "incomplete", "action", "no-data"):
        exc = TargetUnavailable(f"refused: {text}", retry=False)
        exc.code, exc.said = code, msg
        return exc
    if code == "full":  # no room for the replica there: tried again as often as a local target
        # that was full, not with the reconnect back-off (it waited up to a minute after room
        # was made, where a replica paused in its session goes on within seconds)
        return TargetUnavailable(f"paused: {text}", delay=BACKOFF_MAX_LOCAL)
    return TargetUnavailable(f"disconnected: {text}")


def receive_failback(target: RemoteTarget, local, *, new_generation: str,
                     last_seq: int) -> tuple[dict, int]:
    """Fail back, the source's side: the agent compares its promoted replica with `local`
    (this host's data: a LocalDirTarget or LocalBlockTarget), asking us (REQ), and sends what
    differs (DATA records) which we apply; then it demotes its replica. Returns its counts and
    the seq the demoted replica is at, which this host's records go on from (above `last_seq`
    when this host was rebuilt without its journal and its seqs started again)."""
    target.open("failback", new_generation=new_generation, last_seq=last_seq)
    proc = target.proc
    stop = threading.Event()

    def beats() -> None:  # the agent ends a session it does not hear from
        while not stop.wait(BEAT_SECONDS):
            try:
                target._send(wire.jframe(wire.BEAT, {"ts": time.time()}))
            except OSError:
                return
    threading.Thread(target=beats, daemon=True).start()
    codec = wire.Codec(target.s.compression)
    applied = 0  # records written to this host's data: an end after one leaves it a mix
    try:
        while True:
            got = wire.read_frame(proc.stdout.read)
            if got is None:
                raise TargetUnavailable("disconnected: the agent ended the fail-back early")
            kind, payload = got
            if kind == wire.REQ:
                req = json.loads(payload)
                target._send(wire.jframe(wire.REP, _answer(local, req)))
            elif kind == wire.DATA:
                raw, pos, recs = codec.unpack(payload), 0, []
                while pos < len(raw):
                    rec, pos = decode_record(raw, pos)
                    recs.append(rec)
                local.send(recs)
                applied += len(recs)
            elif kind == wire.ACK:
                msg = json.loads(payload)
                if "done" in msg:
                    return msg["done"], int(msg["received"])
            elif kind == wire.ERROR:
                raise _agent_error(json.loads(payload))
    except (wire.WireError, ConnectionError) as exc:  # the link or the agent went away mid-way
        lost = TargetUnavailable(f"disconnected: the session to {target.s.host} ended during the "
                                 f"fail-back ({session_error_text(exc)})")
        lost.applied = applied
        raise lost from None
    except TargetUnavailable as exc:
        exc.applied = applied
        raise
    finally:
        stop.set()
        target.close()


def _answer(local, req: dict) -> dict:
    rid, method, args = req.get("id"), req.get("method"), req.get("args") or {}
    try:
        rel = os.fsencode(args.get("rel", ""))
        if method == "info":
            info = local.info(rel)
            result = None if info is None else info.to_wire()
        elif method == "children":
            kids = local.children(rel)
            result = None if kids is None else {os.fsdecode(k): v.to_wire() for k, v in kids.items()}
        elif method == "file_hashes":
            result = local.file_hashes(rel)
        elif method == "block_hashes_of":
            result = local.block_hashes_of([int(b) for b in args["blocks"]])
        elif method == "flush":
            local.flush()
            result = True
        else:
            raise ValueError(f"unknown method {method!r}")
        return {"id": rid, "result": result}
    except Exception as exc:  # said to the agent, which stops
        return {"id": rid, "error": f"{type(exc).__name__}: {exc}", "errno": getattr(exc, "errno", None)}
