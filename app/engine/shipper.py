"""Ships one entry's journal to its target, in order, from a thread of the capture process.

Records are read with the journal's cursor and handed to the target; they are released (freed
from the journal) only once the target holds them durably: a local target after syncfs /
fdatasync (at most every PERSIST_SECONDS, whenever the queue runs dry, and whenever what it
applied since fills FLUSH_SHARE of the journal's memory or queue limit), a remote one when its
agent acknowledges them. A target that cannot take more (disk full, read-only, link down)
pauses the shipper: the cursor goes back to the first record it did not take, nothing is
skipped, and the shipper tries again with exponential back-off and jitter. A hole in the
journal stops shipping and asks the capture for a resync (`on_gap`), never skipping it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from app.engine.journal import Journal, JournalGap

log = logging.getLogger("mirrorsetup.shipper")
# How far a busy local target's durable position may trail (replay is idempotent). It bounds
# the replication lag status shows: once a second, the oldest record not yet durable on the
# target was up to 1.5 s old in a steady stream (bench/apps.py lag p99 1.10-1.18 s at half the
# capture's maximum rate); every 0.25 s it is 0.29-0.30 s, and the app workloads took the same
# time (3 interleaved runs: git 2.68/2.66 s, SQLite 5.01/5.06, tar x 1.82/1.82).
PERSIST_SECONDS = 0.25
# ... or sooner, once the records applied since the last flush fill this share of the journal's
# memory (or of its queue limit, when that is smaller: else a writer faster than the limit per
# PERSIST_SECONDS put a target that keeps up "behind"). Until a flush releases them they stay
# queued; a fast writer filled the queue with them between two flushes, and from then on every
# append spilled the queue to its segment file (encoded, checksummed, written) in the capture's
# request loop, which the writer waits for.
# bench/apps.py, 3 interleaved runs against flushing by time alone: fio 64 KiB qd16 on a captured
# loop 752 vs 294 MB/s, mirrorfs 1 MiB sequential writes 270 vs 208 MB/s, lag p99 at half of
# those rates 0.06 vs 0.30 s and 0.15 vs 0.32 s; 4 KiB fio (which did not fill it) 93 vs 92.
# A share of one half still left a twelfth of the samples spilling at 64 KiB (py-spy).
FLUSH_SHARE = 0.25
BATCH = 512
BATCH_BYTES = 4 << 20
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0  # remote targets (reconnects)
BACKOFF_MAX_LOCAL = 5.0  # a local target that was full is tried again this often
RATE_WINDOW = 5.0  # seconds over which rates are averaged
# A local target's shipper that got a small batch (fewer than LINGER_UNDER records: it keeps up
# with the writer) lets the next records gather for LINGER_SECONDS before it reads again. Woken
# for every record of an application that writes small ones, it applied them one by one, and the
# applier and the FUSE request loop took the GIL from each other at every record: 2 ms cut the
# capture's CPU by a fifth to a third (bench/apps.py, SQLite 6.24 -> 4.76 s, tar x 2.58 -> 1.83 s);
# 5 ms was no better. Replication lag grows by at most that.
LINGER_SECONDS = 0.002
LINGER_UNDER = 64
# A local target's applier yields to the capture's request loop: while the loop answers requests
# (its session's `idle` clear), the shipper waits up to YIELD_SECONDS for it to park before it
# reads, as long as little waits (fewer than YIELD_UNDER records and YIELD_UNDER_BYTES bytes) and
# nobody waits for it (a drain, wait_applied: a freeze's holder is one). Both take the GIL in
# turn; the loop's requests are what the application waits for (bench/dispatch.py: a small file
# 217 us without the applier thread, 305 us with it).
YIELD_SECONDS = 0.05
# ... and the loop counts as parked only once it stayed so, answering nothing, for QUIET_SECONDS:
# between two requests of tar or rm -rf it parks for some tens of microseconds each time, and an
# applier that went at every such pause took the GIL and a CPU from the next request. bench/apps.py,
# 3 interleaved runs against going at once, three times: rm -rf 0.52 vs 0.58, 0.50 vs 0.56 and
# (with QUIET_UNDER_BYTES) 0.52 vs 0.61 s; tar x 2.20 vs 2.33, 2.10 vs 2.15 and 2.25 vs 2.18 s
# (noise); 5,000 small files 1.69 vs 1.76 and 1.71 vs 1.69 s. 5 ms was no better than 1.
QUIET_SECONDS = 0.001
# ... but only while the records are small (the last batch's data under QUIET_UNDER_BYTES a record
# on average): an applier of large writes spends its time in pwrite, without the GIL, and waiting
# cost a sequential writer (256 MiB in 1 MiB writes) about a third more capture CPU (0.92 vs
# 0.70 s, twice).
QUIET_UNDER_BYTES = 16 << 10
YIELD_SLICE = 0.005  # how often a yielding shipper looks at the other conditions
YIELD_UNDER = 4096
YIELD_UNDER_BYTES = 8 << 20


class TargetUnavailable(Exception):
    """The target cannot take records now. `state` is what status shows ("paused: target
    full", "disconnected: …", "refused: …"); `taken` is the last seq it did take (or None)."""

    def __init__(self, state: str, *, taken: int | None = None, retry: bool = True,
                 disconnect: bool = True, delay: float | None = None):
        super().__init__(state)
        self.delay = delay  # go again after exactly this long (None: back off)
        self.state = state
        self.taken = taken
        self.retry = retry  # False: a refusal an administrator must resolve (we still re-check)
        self.disconnect = disconnect  # False: the session stays (a paused agent says when to go on)


@dataclass
class Figures:
    connection: str = "local"
    sent_seq: int = 0
    received_seq: int = 0
    applied_seq: int = 0
    reconnects: int = 0  # sessions established again after one was lost
    attempts: int = 0  # connection attempts that failed
    resent_bytes: int = 0
    logical_bytes: int = 0
    wire_bytes: int = 0
    last_error: str | None = None
    retry_at: float | None = None
    refusal: str | None = None  # the agent's code when it refused us ("split-brain", "not-ours", …)
    refusal_said: dict | None = None  # ... and what it said beside it (e.g. changes_here)


class Shipper:
    def __init__(self, journal: Journal, target, *, on_gap=None, on_connect=None,
                 on_refused=None, local: bool = True, loop=None):
        self.journal = journal
        self.target = target
        self.on_gap = on_gap
        self.on_connect = on_connect  # from this thread, each time a session is up
        self.on_refused = on_refused  # (code, said) from this thread, each time it is refused
        self.local = local
        self._linger = False  # the last batch was small: let the next gather first (LINGER_SECONDS)
        self._small = True  # the last batch's records were small (QUIET_UNDER_BYTES)
        # A local capture's request loop (its fusewire.Session: `idle` set while it is parked,
        # `wakeups` counting its wake-ups from there), which the applier yields to; None: none
        self.loop = loop
        self._waiters = 0  # drains and wait_applied calls under way: no yielding meanwhile
        self._waiters_lock = threading.Lock()
        journal.track_applied = not local  # the lag counts until applied there, not received
        self.fig = Figures(connection="local" if local else "connecting",
                           sent_seq=journal.released_seq, received_seq=journal.released_seq,
                           applied_seq=journal.released_seq)
        self._stop = threading.Event()
        self._hold = threading.Event()  # set: ship nothing (a gap awaits its resync)
        # set: connect, but ship nothing yet (a first copy walked before the session was up:
        # only once the replica is known to be empty do its records go)
        self._gate = threading.Event()
        self._wake = threading.Event()
        self._kick = threading.Event()  # set: try the target again now (an administrator resolved it)
        self._thread: threading.Thread | None = None
        self._last_flush = time.monotonic()
        self._unflushed = 0  # bytes of records a local target applied since its last flush
        self._rates: deque[tuple[float, int, int]] = deque()  # (time, logical, wire)
        self._connected = local
        self._ever_connected = local
        self._positions_lock = threading.Lock()
        if not local:  # the agent's acknowledgements show in status as they arrive
            target.on_positions = self._positions_seen

    # -- control ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shipper", daemon=True)
        self._thread.start()

    def stop(self, *, drain_seconds: float = 0.0) -> bool:
        """Stop; first ship what is queued for up to `drain_seconds` (not when the target
        refuses us: that needs an administrator). True when drained."""
        if self.fig.refusal is not None and not self._connected or self._gate.is_set():
            drain_seconds = 0.0
        with self._waiters_lock:
            self._waiters += 1
        drained = self._drain(drain_seconds) if drain_seconds else \
            self.journal.released_seq >= self.journal.last_seq
        self._stop.set()
        self._wake.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join()
        return drained

    def _drain(self, seconds: float) -> bool:
        """Until the target holds everything queued, for up to `seconds`; given up as soon as
        the session is found lost (the keep-alive's seconds): a detach with the link down
        waited the whole time for a target it could not reach. What is left stays queued."""
        end, seq = time.monotonic() + seconds, self.journal.last_seq
        while not self.journal.wait_released(seq, max(0.0, min(0.2, end - time.monotonic()))):
            if time.monotonic() >= end or self.lost:
                return False
        return True

    @property
    def lost(self) -> bool:
        """A remote target's session was lost (not a first connect still under way)."""
        return not self.local and not self._connected and self.fig.connection != "connecting"

    def kick(self) -> None:
        """Connect again now instead of at the end of the back-off."""
        self._kick.set()

    def hold(self) -> None:
        self._hold.set()

    def release_hold(self) -> None:
        self._hold.clear()
        self._wake.set()

    def close_gate(self) -> None:
        self._gate.set()

    def open_gate(self) -> None:
        self._gate.clear()
        self._wake.set()

    def wait_applied(self, seq: int, timeout: float | None) -> bool:
        """Until the target has applied (durably) everything up to `seq`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._waiters_lock:
            self._waiters += 1
        try:
            while self.fig.applied_seq < seq:
                if self._stop.is_set():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.journal.wait_released(seq, min(0.1, left) if left is not None else 0.1)
                if self.local:
                    self.fig.applied_seq = self.fig.received_seq = self.journal.released_seq
            return True
        finally:
            with self._waiters_lock:
                self._waiters -= 1

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def rates(self) -> tuple[float, float]:
        """(logical, wire) bytes per second over the last RATE_WINDOW seconds."""
        now = time.monotonic()
        while self._rates and now - self._rates[0][0] > RATE_WINDOW:
            self._rates.popleft()
        if len(self._rates) < 2:
            return 0.0, 0.0
        t0, l0, w0 = self._rates[0]
        span = max(now - t0, 1e-3)
        return (self.fig.logical_bytes - l0) / span, (self.fig.wire_bytes - w0) / span

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while not self._stop.is_set():
            if self._hold.is_set():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                if not self._connected:
                    self._connect()
                if self._gate.is_set():
                    if not self.local:
                        self.target.flush()  # a session that ended meanwhile is said here
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                self._ship_once()
                backoff = BACKOFF_FIRST
                self.fig.retry_at = None
            except JournalGap as gap:
                log.error("%s; asking for a resync", gap)
                self._hold.set()
                if self.on_gap is not None:
                    self.on_gap(gap)
            except TargetUnavailable as exc:
                self._unavailable(exc)
                cap = BACKOFF_MAX_LOCAL if self.local or not exc.disconnect else BACKOFF_MAX
                import random  # here, not above: the agent imports this module too
                # jittered (sources that lost the same target do not come back in step), and
                # never above the cap the README promises (1 s doubling to 60 s)
                delay = min(min(backoff, cap) * random.uniform(0.8, 1.2), cap)
                backoff = min(backoff * 2, cap)
                if exc.delay is not None:
                    delay = exc.delay
                self.fig.retry_at = time.time() + delay
                self._kick.wait(delay)
                self._kick.clear()
            except Exception as exc:  # a bug must not end replication silently
                log.exception("shipper")
                self._unavailable(TargetUnavailable(f"error: {exc}"))
                self._stop.wait(BACKOFF_FIRST)

    def _connect(self) -> None:
        pos = self.target.open()
        lost = None
        unused = False  # the seqs it lacks were only reserved here, never records we held
        if pos is not None:  # a remote target: resume from what it holds durably
            released = self.journal.released_seq
            if pos.received < released:  # it lacks records we no longer hold: skip, then resync
                self.target.skip_to(released)
                self.journal.rewind(released)
                lost = JournalGap(pos.received + 1, released)
                skipped = self.journal.skipped
                unused = skipped is not None and skipped[1] == released and \
                    pos.received + 1 >= skipped[0]
            else:
                self.journal.rewind(pos.received)
            with self._positions_lock:  # this session's: an acknowledgement since is newer
                latest = self.target.pos
                self.fig.received_seq, self.fig.applied_seq = latest.received, latest.applied
            self.journal.applied(pos.applied)
            self.fig.reconnects += 1 if self._ever_connected else 0
        if lost is not None and self.on_gap is not None:  # asked while a catch-up still waits
            if unused:  # a capture after an unclean stop went on above its reservation
                log.info("seqs %d..%d were reserved ahead by the previous capture, which did not "
                         "stop cleanly, and no record of them is here or on the target: skipped; "
                         "the catch-up compares the data with the replica", lost.expected, lost.found)
            else:
                log.error("the target lost records %d..%d; a resync replaces them", lost.expected,
                          lost.found)
            self.on_gap(lost)
        self._connected = self._ever_connected = True
        self.fig.connection = "local" if self.local else "connected"
        self.fig.last_error = self.fig.refusal = None
        if self.on_connect is not None:  # the catch-up that waited starts: it covers the gap
            self.on_connect()

    def _unavailable(self, exc: TargetUnavailable) -> None:
        self.fig.connection = exc.state
        self.fig.last_error = exc.state
        self.fig.refusal = getattr(exc, "code", None) if not exc.retry else None
        self.fig.refusal_said = getattr(exc, "said", None) if not exc.retry else None
        if self.fig.refusal is not None and self.on_refused is not None:
            self.on_refused(self.fig.refusal, self.fig.refusal_said)
        if exc.taken is not None:  # everything after it goes again
            self.journal.rewind(max(exc.taken, self.journal.released_seq))
        else:
            self.journal.rewind(self.journal.released_seq)
        if not self.local and exc.disconnect:
            self._connected = False
            self.fig.attempts += 1
            with contextlib.suppress(Exception):
                self.target.close()

    def _ship_once(self) -> None:
        if self._linger:
            self._stop.wait(LINGER_SECONDS)
        if self.loop is not None:
            self._yield()
        batch = self.journal.read(BATCH, max_bytes=min(BATCH_BYTES, getattr(
            self.target, "batch_bytes", None) or BATCH_BYTES), timeout=0.1)
        self._linger = self.local and 0 < len(batch) < LINGER_UNDER
        if batch:
            if batch[0].seq <= self.fig.sent_seq:  # sent before a rewind: resent
                self.fig.resent_bytes += sum(r.size for r in batch if r.seq <= self.fig.sent_seq)
            wire = self.target.send(batch)
            if self.local:
                self._unflushed += sum(r.size for r in batch)
            self.fig.sent_seq = max(self.fig.sent_seq, batch[-1].seq)
            logical = sum(len(r.data) for r in batch)
            self._small = logical < QUIET_UNDER_BYTES * len(batch)
            self.fig.logical_bytes += logical
            self.fig.wire_bytes += wire if isinstance(wire, int) else logical
            self._rates.append((time.monotonic(), self.fig.logical_bytes, self.fig.wire_bytes))
        if self.local:
            self._local_durable(bool(batch))
        else:
            pos = self.target.flush()
            self._positions_seen(pos)
            self.journal.release(pos.received, persist=False)  # the target keeps its own
        if self.fig.connection.startswith("paused") and batch:
            self.fig.connection = "local" if self.local else "connected"

    def _yield(self) -> None:
        """Wait (up to YIELD_SECONDS, in slices) until the request loop has parked (and, after
        small records, stayed parked for QUIET_SECONDS), or something says to go on: many
        records waiting, a waiter, a stop."""
        loop, j = self.loop, self.journal
        parked = loop.idle
        deadline = None
        while not self._waiters and not self._stop.is_set() \
                and j.last_seq - j.sent_seq < YIELD_UNDER and j.queued_bytes < YIELD_UNDER_BYTES:
            now = time.monotonic()
            if deadline is None:
                deadline = now + YIELD_SECONDS
            elif now >= deadline:
                return
            if parked.is_set():
                if not self._small:
                    return
                seen = loop.wakeups
                self._stop.wait(min(QUIET_SECONDS, deadline - now))
                if parked.is_set() and loop.wakeups == seen:
                    return
                continue
            parked.wait(min(YIELD_SLICE, deadline - now))

    def _positions_seen(self, pos) -> None:
        """The agent's positions, from this thread's turn or from the session's reader as an
        acknowledgement arrives (status shows it then, not up to the idle wait of this
        thread's next read later). Within a session they only grow."""
        with self._positions_lock:
            self.fig.received_seq = max(self.fig.received_seq, pos.received)
            self.fig.applied_seq = max(self.fig.applied_seq, pos.applied)
        self.journal.applied(pos.applied)

    def _local_durable(self, busy: bool) -> None:
        """Local targets apply as they receive: sync the target now and then, then release."""
        j = self.journal
        done = j.sent_seq
        if done <= j.released_seq:
            return
        room = j.memory_bytes if j.limit_bytes is None else min(j.memory_bytes, j.limit_bytes)
        if busy and time.monotonic() - self._last_flush < PERSIST_SECONDS and \
                self._unflushed < FLUSH_SHARE * room:
            return
        self.target.flush()
        self._last_flush = time.monotonic()
        self._unflushed = 0
        j.release(done, persist=True)
        self.fig.sent_seq = self.fig.received_seq = self.fig.applied_seq = done
