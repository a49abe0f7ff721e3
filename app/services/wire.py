"""The wire between a source's capture worker and `mirrorsetup serve-target` on another host:
frames over the stdin/stdout of an OpenSSH session.

    frame   = u32 length of payload | u8 type | u32 crc32(type, payload) | payload

The agent opens with a greeting line (GREETING), so whatever a login shell prints before it
(a real target's ~/.bashrc) is skipped, never taken for a frame. Then:

    HELLO  source → agent   JSON: version, replica path, kind, size, source claim, generation,
                            last/released seq, what to do (replicate | test | promote …)
    WELCOME agent → source  JSON: version, generation, received, applied, consistent, free bytes;
                            to a test naming a path, what the image there takes (replica_bytes)
    DATA   source → agent   u8 flags (1: zstd) | records in the journal's on-disk encoding
    SKIP   source → agent   JSON {through}: records up to there never come (a resync replaces them)
    MARK   source → agent   JSON {seq}: the target is consistent once it has applied seq;
                            {begin: true}: a catch-up begins, it is inconsistent until then;
                            {seq, again: true}: the first one, to a new session (FEATURES)
    ACK    agent → source   JSON {received, applied, ts, consistent, apply_errors?, last_error?,
                            superseded?}: durable in its journal / on its data; records it
                            could not apply; catch-up records sent whole by the walk instead
    BEAT   both ways        JSON {ts, echo}: liveness, round-trip time, lag while idle
    PAUSE / RESUME          JSON {reason}: the agent cannot take more (disk full) / can again
    REWIND agent → source   JSON {received}: a batch was dropped (it came while paused, or after
                            one that was): send again from there
    REQ / REP               JSON {id, method, args} / {id, result | error}: hashes and listings
    ERROR                   JSON {code, message, errno}: the session ends
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass

GREETING = b"MIRRORSETUP-AGENT 1\n"
VERSION = 2  # 2: a walk may send a whole small file as one "put" record
ACCEPTED = (1, 2)  # what an agent takes from a source (an older source never sends "put")
HEAD = struct.Struct("<IBI")
MAX_FRAME = 256 << 20

HELLO, WELCOME, DATA, SKIP, MARK, ACK, BEAT, PAUSE, RESUME, REQ, REP, ERROR, REWIND = range(1, 14)
NAMES = {v: k for k, v in dict(HELLO=HELLO, WELCOME=WELCOME, DATA=DATA, SKIP=SKIP, MARK=MARK, ACK=ACK,
                                BEAT=BEAT, PAUSE=PAUSE, RESUME=RESUME, REQ=REQ, REP=REP,
                                ERROR=ERROR, REWIND=REWIND).items()}
FLAG_ZSTD = 1
IOV_MAX = 1024  # pieces per writev (Linux's UIO_MAXIOV)
# what an agent does beyond its wire version (said in its WELCOME; a source asks only what the
# agent says): "hashed-listings": a `children` query with {"hashes": true} is answered
# {"entries": listing, "hashes": {name: hash list}} for the regular files up to HASHED_LISTING_FILE;
# "catch-up-marks": a MARK {"begin": true} makes the replica inconsistent (a catch-up begins);
# "mark-again": a MARK {"seq", "again": true} (a catch-up's end said again to a new session) is
# taken only while that catch-up is still the replica's last word
FEATURES = ("hashed-listings", "catch-up-marks", "mark-again")
HASHED_LISTING_FILE = 4 << 20
AHEAD_WINDOW = 1024  # queries a walk may have asked before it needs their answers (Queries)
SAMPLE_FROM = 256 << 10  # a batch this big is compressed only when a sample of it compresses
SAMPLE_WINDOWS, SAMPLE_WIDTH = 16, 4096  # the sample: windows spread evenly over the batch


class WireError(Exception):
    """A broken or unexpected frame: the session cannot go on."""


def frame(kind: int, payload: bytes) -> bytes:
    return b"".join(frame_parts(kind, [payload]))


def frame_parts(kind: int, parts: list) -> list:
    """frame() of a payload given in pieces, none of them copied: [head, *parts]."""
    crc, length = zlib.crc32(bytes([kind])), 0
    for part in parts:
        crc = zlib.crc32(part, crc)
        length += len(part)
    return [HEAD.pack(length, kind, crc), *parts]


def write_all(fd: int, parts: list) -> None:
    """Write the pieces in order with as few system calls as the kernel allows (writev, at
    most IOV_MAX pieces a call), a short write resumed where it stopped."""
    views, at = [memoryview(p) for p in parts if len(p)], 0
    while at < len(views):
        done = os.writev(fd, views[at:at + IOV_MAX])
        while at < len(views) and done >= len(views[at]):
            done -= len(views[at])
            at += 1
        if done:
            views[at] = views[at][done:]


def jframe(kind: int, obj: dict) -> bytes:
    return frame(kind, json.dumps(obj, separators=(",", ":")).encode())


def read_exact(read, n: int) -> bytes:
    """`read(n)` until n bytes; b"" at a clean end of stream before the first byte."""
    parts, have = [], 0
    while have < n:
        chunk = read(n - have)
        if not chunk:
            if have == 0:
                return b""
            raise WireError(f"stream ended inside a frame ({have} of {n} bytes)")
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def read_frame(read) -> tuple[int, bytes] | None:
    """The next frame from a blocking `read(n)`; None at end of stream."""
    head = read_exact(read, HEAD.size)
    if not head:
        return None
    length, kind, crc = HEAD.unpack(head)
    if length > MAX_FRAME or kind not in NAMES:
        raise WireError(f"not a frame (type {kind}, length {length})")
    payload = read_exact(read, length) if length else b""
    if len(payload) != length:
        raise WireError("stream ended inside a frame")
    if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
        raise WireError(f"checksum mismatch in a {NAMES[kind]} frame")
    return kind, payload


def skip_to_greeting(read) -> None:
    """Drop what a login shell printed before the agent started."""
    seen = b""
    while not seen.endswith(GREETING):
        b = read(1)
        if not b:
            raise WireError("the other side ended before the mirrorsetup agent greeted"
                            + (f" (it said: {seen[-200:].decode(errors='replace').strip()!r})"
                               if seen.strip() else ""))
        seen = (seen + b)[-4096:]


@dataclass
class Codec:
    """zstd level 1 per DATA batch, kept only when it is smaller (random data passes through).

    `adaptive` (a sender without a bandwidth cap): a batch is compressed only while the link
    is the slower part, as `zstd --adaptive` does: when sending a byte costs more time than
    compressing it saves (the link's rate, from the time the sender's writes took, under the
    compressor's rate times the share it saves). Measured on the tests' two-namespace bed
    (both hosts on one 2-CPU machine): ssh took raw data at 113-119 MB/s, zstd -1 ran at 224
    MB/s saving 75 %, so it compresses there; a link faster than ~170 MB/s through ssh (10 GbE)
    made zstd the slower part, and it is left off then. On a slow or congested link the writes
    block and compression comes back within a few batches. A capped sender always compresses
    (the cap makes the link the slower part)."""

    compression: str = "zstd"
    adaptive: bool = False

    def __post_init__(self) -> None:
        self._c = self._d = None
        if self.compression == "zstd":
            import zstandard
            self._c = zstandard.ZstdCompressor(level=1)
        import zstandard as zs
        self._d = zs.ZstdDecompressor()
        self._link = [0, 0.0]  # bytes written lately, seconds the writes took
        self._zip = [0, 0.0, 0]  # bytes compressed lately, seconds it took, bytes it made

    @property
    def compresses(self) -> bool:
        """Does the next compressible batch go out compressed?"""
        if self._c is None:
            return False
        if not self.adaptive:
            return True
        sent, took = self._link
        done, spent, made = self._zip
        if not sent or not done or spent <= 0:
            return True  # not measured yet: compressed (a slow link is the one it matters on)
        link_rate, zip_rate = sent / max(took, 1e-6), done / spent
        return link_rate < zip_rate * (1 - made / done)

    @property
    def state(self) -> str:
        """In status words: "none" (the configuration's), "zstd", or why zstd is off now."""
        if self._c is None:
            return "none"
        return "zstd" if self.compresses else "zstd off: link faster"

    def wrote(self, nbytes: int, seconds: float) -> None:
        """A frame of `nbytes` took the sender `seconds` to write (the link's rate)."""
        _decay(self._link, nbytes, seconds)

    def _compress(self, data, size: int) -> bytes:
        t = time.perf_counter()
        out = self._c.compress(data)
        _decay(self._zip, size, time.perf_counter() - t, len(out))
        return out

    def pack(self, raw: bytes) -> bytes:
        return b"".join(self.pack_parts([raw], len(raw)))

    def pack_parts(self, parts: list, size: int) -> list:
        """A DATA payload of `size` bytes given in pieces: [flags, *pieces], not copied, or
        [flags, compressed]. A big batch is compressed only when a sample of it compresses
        to under 90 % (random data, or compressed files, cost no compression attempt)."""
        if self._c is not None and size > 256 and (
                size < SAMPLE_FROM or self._worth_it(parts, size)) and self.compresses:
            packed = self._compress(b"".join(parts), size)
            if len(packed) < size:
                return [bytes([FLAG_ZSTD]), packed]
        return [b"\0", *parts]

    def _worth_it(self, parts: list, size: int) -> bool:
        sample, want, pos, step = [], 0, 0, size // SAMPLE_WINDOWS
        for part in parts:
            end = pos + len(part)
            while want < SAMPLE_WINDOWS and want * step < end:
                start = want * step - pos
                sample.append(memoryview(part)[start:start + SAMPLE_WIDTH])
                want += 1
            pos = end
        sample = b"".join(sample)
        return len(self._compress(sample, len(sample))) < 0.9 * len(sample)

    def unpack(self, payload: bytes) -> bytes | memoryview:
        """The records of a DATA payload (a view of it when it was not compressed: a batch
        is not copied to drop its flag byte)."""
        if not payload:
            raise WireError("empty DATA frame")
        view = memoryview(payload)[1:]
        if payload[0] & FLAG_ZSTD:
            return self._d.decompress(view, max_output_size=MAX_FRAME)
        return view


def _decay(sums: list, *add) -> None:
    """Running sums of the last few MiB: halved once their bytes pass 16 MiB, so a rate follows
    the link or the data as they change."""
    for i, v in enumerate(add):
        sums[i] += v
    if sums[0] > 16 << 20:
        for i in range(len(sums)):
            sums[i] /= 2


def is_zeros(data: bytes) -> bool:
    return bool(data) and data.count(0) == len(data)


class Queries:
    """The REQ/REP half of a session, asked from either end (a source asks its agent during a
    catch-up or verify; an agent asks the old source during a fail-back): ids, answers, and
    queries a walk sends ahead of itself so that many share one round trip.

    `send(obj)` sends one REQ; `failure()` says why no answer will come any more (or None);
    `lost(text)` makes the exception for an answer that will never come (asked of a session
    that ended, or none within `timeout` seconds; None: wait as long as the session lives).
    Answers arrive by `answer(msg)` from the session's reader; every wait wakes on `cv`, which
    the owner also notifies when the session fails."""

    def __init__(self, send, failure, lost, *, window: int, timeout: float | None, label: str,
                 cv: threading.Condition | None = None):
        self._send, self._failure, self._lost = send, failure, lost
        self.window, self.timeout, self.label = window, timeout, label
        self.cv = cv or threading.Condition()
        self._ids = itertools.count(1)
        self._answers: dict[int, dict] = {}
        self._ahead: dict[tuple[str, str], int] = {}  # (method, rel) -> id of a query asked ahead
        self._dropped: set[int] = set()  # ids asked ahead whose answers nobody will take
        self._first_id = next(self._ids)  # the first id of this session

    def new_session(self) -> None:
        """What the last session was asked is never answered in the next one: a wait for
        such an answer is told so at once (it waited the whole timeout)."""
        with self.cv:
            self._ahead.clear()
            self._dropped.clear()
            self._first_id = next(self._ids)
            self.cv.notify_all()

    def answer(self, msg: dict) -> None:
        with self.cv:
            if msg["id"] in self._dropped:
                self._dropped.discard(msg["id"])
            else:
                self._answers[msg["id"]] = msg
                self.cv.notify_all()

    def ask(self, method: str, args: dict) -> int:
        failure = self._failure()
        if failure is not None:
            raise failure
        rid = next(self._ids)
        self._send({"id": rid, "method": method, "args": args})
        return rid

    def call(self, method: str, **args):
        return self.wait(self.ask(method, args), method)

    def ask_ahead(self, method: str, rel: bytes, **extra) -> bool:
        """Send now a `children` or `file_hashes` query a walk is about to make (sync.Ahead).
        An answer asked early is as good: the walk's proof (sync.py) takes the other side's
        state at any moment after the walk began. At most `window` wait at a time: False when
        the window is full (or the session failed), and nothing was sent."""
        key = (method, os.fsdecode(rel))
        if key in self._ahead:
            return True
        if len(self._ahead) >= self.window or self._failure() is not None:
            return False
        rid = self.ask(method, {"rel": key[1], **extra})
        with self.cv:
            self._ahead[key] = rid
        return True

    def forget_ahead(self, keys) -> None:
        """Queries asked ahead that the walk did not use after all: their answers are dropped."""
        with self.cv:
            for method, rel in keys:
                rid = self._ahead.pop((method, os.fsdecode(rel)), None)
                if rid is not None and self._answers.pop(rid, None) is None:
                    self._dropped.add(rid)

    def asked(self, method: str, rel: bytes, **extra):
        """The answer to a query, asked ahead or now (with the same `extra` arguments)."""
        with self.cv:
            rid = self._ahead.pop((method, os.fsdecode(rel)), None)
        if rid is None:
            return self.call(method, rel=os.fsdecode(rel), **extra)
        return self.wait(rid, method)

    def wait(self, rid: int, method: str):
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with self.cv:
            while rid not in self._answers:
                failure = self._failure()
                if failure is not None:
                    raise failure
                if rid < self._first_id:
                    raise self._lost(f"disconnected: {method} was asked of a session that ended")
                left = 1.0 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    raise self._lost(f"disconnected: {method} got no answer in {self.timeout:.0f} s")
                self.cv.wait(min(left, 1.0))
            rep = self._answers.pop(rid)
        if "error" in rep:
            raise OSError(rep.get("errno") or errno.EIO, f"{self.label}: {method}: {rep['error']}")
        return rep["result"]
