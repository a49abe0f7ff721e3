"""The change journal of one entry: ordered, checksummed records, memory first, spilled to disk.

A record is (seq, kind, op, args, data). `kind` says which engine wrote it (file system or
block), `op` is the operation name, `args` a small JSON object and `data` the raw bytes (a
write's payload). Capture appends; the shipper reads with a cursor (`read`), may go back
(`rewind`, after a reconnect the target says where it is), and frees records only once the
target holds them durably (`release`). So a record leaves the journal when, and only when,
the target has it.

Records live in a bounded in-memory queue. When the queue is full, or when an application asks
for durability (fsync), everything queued moves to append-only segment files
(`<first seq>.seg`, about 5 MB each, like the seed product's spill files); the disk always
holds a prefix of the unreleased records and memory the rest, so order is never broken. On
disk a record is

    u32 length | u32 crc32(seq..end) | u64 seq | u8 kind | u16 op_len | u32 args_len | op | args | data

A torn or corrupt tail (the process died mid-append) is detected on open and truncated. Seqs
are consecutive; a hole (records lost) is never skipped: `read` raises JournalGap and the
capture turns it into a resync.

Queue limit: past `limit_bytes` of unreleased records the journal either makes writers wait
("block") or stops storing records and says so ("pull-ahead": the capture keeps a dirty map
instead and resyncs it later). Every state change happens under one lock.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from app.services.layout import write_small_file

KIND_FS = 1
KIND_BLOCK = 2
SEGMENT_BYTES = 5 * 1000 * 1000  # the seed product's spill files were 5 MB each
IOV_MAX = 1024  # pieces per writev(2) (Linux's UIO_MAXIOV)
MEMORY_BYTES = 64 << 20  # in-memory queue bound; beyond it records spill to disk
HEADER = struct.Struct("<IIQ")  # length of the rest, crc32 of the rest, seq
BODY = struct.Struct("<BHI")  # kind, op length, args length
# seq, then BODY: what a record's checksum starts with
_SEQ_BODY = struct.Struct("<Q" + BODY.format.lstrip("<"))
_LENGTH_CRC = struct.Struct("<II")
# json.dumps(args, separators=…) makes a JSONEncoder per call; one kept gives the same text in
# about half the time (16.6 -> 9.2 us a record here), and every record sent is encoded once
_ARGS_JSON = json.JSONEncoder(separators=(",", ":")).encode
_ARGS_DECODE = json.JSONDecoder().decode  # (json.loads makes none, but detects an encoding)
RECORD_OVERHEAD = HEADER.size + BODY.size + 64  # what the queue counts for a record beyond its data
RELEASED_FILE = "released"  # the highest seq the target holds durably
RESERVED_FILE = "reserved"  # seqs up to here may have been handed out (and reached the target)
SEQ_RESERVE = 1 << 20  # seqs reserved at a time: one durable small write per this many records
SEQ_RESERVE_RETRY = 1 << 12  # a reservation that could not be written is tried again this soon
TAIL_BYTES = 16 << 20  # ingested records kept in memory for the applier (an agent per replica)
LEGACY_APPLIED_FILE = "applied"  # its name before the journal could be rewound
MAX_UNSYNCED_SEGMENTS = 64  # rolled segments (5 MB each) kept open, unsynced, for the next sync()
MARK_BYTES = 64 << 10  # queued bytes are counted to this precision
LAG_SAMPLE_SECONDS = 0.005
READ_CHUNK = 1 << 20  # lag is measured to this resolution, not per record
ON_FULL = ("pull-ahead", "block")
FILE_MODE = 0o600
CRC_KEPT_OVER = 4096  # data bytes from which a record keeps its checksum (see Record)


@dataclass
class Record:
    seq: int
    kind: int
    op: str
    args: dict
    data: bytes = b""
    size: int = field(default=0, compare=False)
    # (head, data, crc) of the last encoding or decoding of a record with CRC_KEPT_OVER bytes
    # of data or more: its checksum is not computed again when it is sent on (it is used only
    # for the same head and the very same data object: a record changed since is checksummed
    # anew). Small records keep nothing: their checksum is cheap, their count large.
    _crc: tuple | None = field(default=None, compare=False, repr=False)

    def encode(self) -> bytes:
        """The on-disk (and on-the-wire) form."""
        return b"".join(self.encode_parts())

    def encode_parts(self) -> tuple[bytes, bytes, bytes]:
        """The encoded form in three pieces (length and crc, head, data), the data not copied."""
        op = self.op.encode()
        args = _ARGS_JSON(self.args).encode()
        head = b"".join((_SEQ_BODY.pack(self.seq, self.kind, len(op), len(args)), op, args))
        known = self._crc
        if known is not None and known[1] is self.data and known[0] == head:
            crc = known[2]
        else:
            crc = zlib.crc32(self.data, zlib.crc32(head))
            if len(self.data) >= CRC_KEPT_OVER:
                self._crc = (head, self.data, crc)
        return _LENGTH_CRC.pack(len(head) + len(self.data), crc), head, self.data

    def estimate_size(self) -> int:
        """Bytes this record occupies in the queue: its data plus a small fixed allowance for
        the header and arguments (exact sizes are only needed on disk)."""
        return RECORD_OVERHEAD + len(self.data)


class CorruptRecord(Exception):
    """A record whose length runs past the end or whose checksum does not match."""


def _write_pieces(fd: int, pieces: list) -> None:
    """All of `pieces` appended to `fd`, IOV_MAX at a time; a short write (a full file
    system) raises ENOSPC, as the caller cuts the file back."""
    for k in range(0, len(pieces), IOV_MAX):
        chunk = pieces[k:k + IOV_MAX]
        if os.writev(fd, chunk) != sum(map(len, chunk)):
            raise OSError(errno.ENOSPC, "short write to the journal")


class JournalGap(Exception):
    """Records between two seqs are missing: the target can no longer be brought up to date by
    replay alone (a resync is due)."""

    def __init__(self, expected: int, found: int):
        super().__init__(f"journal gap: expected seq {expected}, found {found}")
        self.expected, self.found = expected, found


def decode_at(buf: bytes | memoryview, pos: int) -> tuple[Record, int]:
    """Decode the record at `pos`; return it and the position after it (its data is the one
    copy made of it). Every agent decodes each record it receives here, in series with its
    reads: the structs are precompiled and the args (ASCII JSON, as Record.encode_parts
    writes them) go to a decoder kept, not through json.loads' encoding detection."""
    if len(buf) - pos < HEADER.size:
        raise CorruptRecord("torn header")
    length, crc = _LENGTH_CRC.unpack_from(buf, pos)
    start, end = pos + 8, pos + 8 + length
    if length < _SEQ_BODY.size or end > len(buf):
        raise CorruptRecord("torn record")
    view = memoryview(buf)
    if zlib.crc32(view[start:end]) != crc:
        raise CorruptRecord("checksum mismatch")
    seq, kind, op_len, args_len = _SEQ_BODY.unpack_from(buf, start)
    at = _SEQ_BODY.size + op_len  # in `head`: where the args begin
    head = bytes(view[start:start + at + args_len])
    try:
        op = head[_SEQ_BODY.size:at].decode()
        args = _ARGS_DECODE(head[at:].decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptRecord(f"undecodable record: {exc}") from None
    data = bytes(view[start + at + args_len:end])
    return Record(seq, kind, op, args, data, RECORD_OVERHEAD + len(data),
                  (head, data, crc) if len(data) >= CRC_KEPT_OVER else None), end


def scan_segment(path: Path) -> tuple[list[int], int]:
    """Seqs of the valid records in a segment and the length of its valid prefix."""
    buf = path.read_bytes()
    pos, seqs = 0, []
    while pos < len(buf):
        try:
            rec, nxt = decode_at(buf, pos)
        except CorruptRecord:
            break
        seqs.append(rec.seq)
        pos = nxt
    return seqs, pos


def held_on_disk(directory: str | os.PathLike, released: int) -> tuple[int, int]:
    """What a journal's segment files hold above `released`, read only (nothing is cut or
    removed: its writer may be appending now): (the last seq, the bytes of the records above
    `released`). Only the segment holding `released` and the last one are read; the ones
    between are wholly above it and count by their size."""
    segs = sorted((int(p.stem), p) for p in Path(directory).glob("*.seg") if p.stem.isdigit())
    last, held = released, 0
    for i, (first, path) in enumerate(segs):
        if i + 1 < len(segs):  # not the last one
            if first > released:  # wholly above it
                with contextlib.suppress(FileNotFoundError):
                    held += path.stat().st_size
                continue
            if segs[i + 1][0] <= released + 1:  # wholly at or below it
                continue
        try:
            buf = path.read_bytes()
        except FileNotFoundError:  # released and removed meanwhile
            continue
        pos = 0
        while pos < len(buf):
            try:
                rec, nxt = decode_at(buf, pos)
            except CorruptRecord:  # a torn tail, or one being written
                break
            if rec.seq > released:
                held += nxt - pos
                last = max(last, rec.seq)
            pos = nxt
    return last, held


def encode_path(path: bytes) -> str:
    """File names are bytes; JSON carries them as surrogate-escaped text (lossless)."""
    return os.fsdecode(path)


def decode_path(text: str) -> bytes:
    return os.fsencode(text)


def read_small_file(directory: Path, name: str, dir_fd: int | None = None) -> str | None:
    """`name` in `directory` (not followed through a symbolic link), None when it is not
    there; `dir_fd`: that directory opened already (then `name` is opened through it)."""
    try:
        fd = os.open(name if dir_fd is not None else directory / name,
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, 1 << 16).decode(errors="replace")
    finally:
        os.close(fd)


@dataclass
class _Segment:
    first: int  # first seq in the file
    path: Path
    last: int = 0  # last seq written to it


class Journal:
    """One entry's journal; `append`/`sync` from capture, `read`/`rewind`/`release` from the shipper."""

    def __init__(self, directory: str | os.PathLike, *, kind: int = KIND_FS,
                 memory_bytes: int = MEMORY_BYTES, segment_bytes: int = SEGMENT_BYTES,
                 limit_bytes: int | None = None, on_full: str = "pull-ahead"):
        if on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {ON_FULL}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.kind = kind
        self.memory_bytes = memory_bytes
        self.segment_bytes = segment_bytes
        self.limit_bytes = limit_bytes
        self.on_full = on_full
        self.full_error: str | None = None  # why the last record could not be stored (its disk)
        self._cv = threading.Condition()
        self._mem: deque[Record] = deque()  # unreleased records not on disk, oldest first
        self._mem_bytes = 0
        self._tail: deque[Record] = deque()  # ingested records (on disk) kept for the reader
        self._tail_bytes = 0
        self._segments: list[_Segment] = []  # oldest first
        self._writer: int | None = None
        self._writer_size = 0
        self._unsynced = False
        self._unsynced_fds: list[int] = []  # rolled segments not yet made durable
        self._disk_last = 0  # highest seq on disk
        self._reader: tuple[int, int] | None = None  # (segment index, byte offset) of the cursor
        self.torn_bytes = 0  # bytes cut off a torn tail at open
        self.gap: tuple[int, int] | None = None  # (expected, found) seen at open or while reading
        self.released_seq = self._read_released()
        self._persisted = self.released_seq  # what the released file says
        self.sent_seq = self.released_seq  # the shipper's cursor: read up to here
        self.last_seq = self.released_seq
        self.captured_ops = 0
        self._cum = 0  # bytes appended since open (disk records found at open included)
        self._released_cum = 0  # of which the target holds
        self._marks: deque[tuple[int, int]] = deque()  # (seq, _cum after it), every MARK_BYTES
        self.behind = False  # pull-ahead: records are not being stored (the capture keeps a dirty map)
        self.behind_since: float | None = None  # when the first record was not stored (time.time())
        self.dropped = 0  # records not stored while behind
        self.unstored = 0  # records close() could not write (they are lost with the process)
        # (first, last): seqs the last skip_to passed over, no record of which was ever here
        # (after an unclean stop: those the dead capture reserved ahead)
        self.skipped: tuple[int, int] | None = None
        self._samples: deque[tuple[int, float]] = deque()  # (seq, monotonic time) for the lag
        # A remote target acknowledges records received (released here) before it has applied
        # them: its shipper sets track_applied and says what is applied, and the lag counts
        # from the oldest record not yet applied, not merely received.
        self.track_applied = False
        self._applied_seq = 0
        self._open_segments()
        # Records in memory are lost with the process, but a remote target may have received
        # them: a journal that assigns seqs reserves them durably ahead (`reserved_seq`), so a
        # capture that starts after an unclean stop can go on above every seq that may have
        # been handed out, never giving one the target may hold to another change.
        text = read_small_file(self.dir, RESERVED_FILE)
        self._reserved = int(text) if text and text.strip().isdigit() else 0

    # -- opening --------------------------------------------------------------------------
    def _read_released(self) -> int:
        for name in (RELEASED_FILE, LEGACY_APPLIED_FILE):
            text = read_small_file(self.dir, name)
            if text is not None and text.strip().isdigit():
                return int(text.strip())
        return 0

    def _open_segments(self) -> None:
        expected = self.released_seq + 1
        for path in sorted(self.dir.glob("*.seg")):
            seqs, valid = scan_segment(path)
            size = path.stat().st_size
            if valid < size:  # torn tail: the process died mid-append; cut it off
                self.torn_bytes += size - valid
                with open(path, "r+b") as f:
                    f.truncate(valid)
                    os.fsync(f.fileno())
            if not seqs or seqs[-1] <= self.released_seq:
                path.unlink()  # empty, or wholly held by the target already
                continue
            live = [s for s in seqs if s > self.released_seq]
            if live[0] != expected and self.gap is None:
                self.gap = (expected, live[0])
            expected = live[-1] + 1
            self._segments.append(_Segment(seqs[0], path, seqs[-1]))
            self._disk_last = seqs[-1]
            self._cum += valid
            self._marks.append((seqs[-1], self._cum))
        self.last_seq = max(self.last_seq, self._disk_last)

    # -- capture side ---------------------------------------------------------------------
    def append(self, op: str, args: dict, data: bytes = b"") -> int:
        """Queue one record, in order; returns its seq, or 0 when it was not stored (behind:
        the caller records what changed in its dirty map instead)."""
        with self._cv:
            seq = self._append(op, args, data)
            self._cv.notify_all()
            return seq

    def append_many(self, op: str, items) -> int:
        """Queue records of one op, (args, data) each, in order, under one lock: how many were
        stored (the first ones; once behind, none of the rest)."""
        stored = 0
        with self._cv:
            for args, data in items:
                if not self._append(op, args, data):
                    break
                stored += 1
            self._cv.notify_all()
        return stored

    def has_room(self, nbytes: int) -> bool:
        """Whether records of `nbytes` bytes in all (their estimate_size) would all be stored
        now, without waiting and without falling behind."""
        with self._cv:
            return not self.behind and not self._full(nbytes)

    def writers_wait(self, nbytes: int) -> bool:
        """"block" mode: whether a change of about `nbytes` would wait for room now. The FUSE
        session holds such a change at its gate (fusewire.Gate) rather than let it wait inside
        its request: that wait stopped the capture's whole event loop, so status, a mirror or
        a stop got no answer until the target took the queue (a link down: for good)."""
        return self.on_full == "block" and not self.behind and \
            self._full(nbytes + RECORD_OVERHEAD + 4096)  # its path (PATH_MAX) and its times

    def wait_room(self, nbytes: int, timeout: float) -> None:
        """Wait (in a thread) until writers_wait(nbytes) is over, or `timeout` seconds."""
        with self._cv:
            self._cv.wait_for(lambda: not self.writers_wait(nbytes), timeout)

    def _append(self, op: str, args: dict, data: bytes) -> int:
        rec = Record(0, self.kind, op, args, data)
        rec.size = rec.estimate_size()
        if self.behind or self._full(rec.size):
            if self.on_full == "block" and not self.behind:
                self._cv.wait_for(lambda: not self._full(rec.size))
            else:
                self._go_behind()
                return 0  # (the caller notifies the waiters, as after every append)
        seq = rec.seq = self.last_seq + 1
        if seq > self._reserved:
            try:
                self._reserve(seq + SEQ_RESERVE - 1)
            except OSError as exc:  # its file system is full: capture goes on regardless
                logging.getLogger("mirrorsetup.journal").warning(
                    "%s: could not reserve record numbers (%s): after a crash a remote "
                    "target may refuse this source until it is adopted", self.dir, exc)
                self._reserved = seq + SEQ_RESERVE_RETRY - 1
        try:
            if self._mem_bytes + rec.size > self.memory_bytes:
                self._spill()
            if rec.size > self.memory_bytes:  # one record larger than the whole memory bound
                self._write(rec)
        except OSError as exc:
            # Its file system is full: as a full queue (the change is done below already; a
            # resync sends it later). Not stored, its seq not used.
            self._disk_full(exc)
            self._go_behind()
            return 0
        self.last_seq = seq
        self.captured_ops += 1
        self._cum += rec.size
        if not self._marks or self._cum - self._marks[-1][1] >= MARK_BYTES:
            self._marks.append((seq, self._cum))
        now = time.monotonic()
        if not self._samples or now - self._samples[-1][1] >= LAG_SAMPLE_SECONDS:
            self._samples.append((seq, now))
        if rec.size <= self.memory_bytes:  # (a larger one was written above)
            self._mem.append(rec)
            self._mem_bytes += rec.size
        return seq

    @property
    def queued_bytes(self) -> int:
        """Bytes of records the target does not hold yet (to MARK_BYTES' precision)."""
        return self._cum - self._released_cum if self.last_seq > self.released_seq else 0

    def ingest_durably(self, records: list[Record], encoded: list | None = None) -> int:
        """The agent's side: store records that arrive with the source's seqs (they must follow
        on from the last one: a hole raises JournalGap) and make them durable. All or nothing:
        on an error (a full disk) the journal is as it was before, and the error is raised.
        `encoded`: each record's on-disk form as it arrived (decoded and checked already), so
        it is written as it is, a segment's share in one write. The records stay in memory
        too (up to `memory_bytes`) for the reader that applies them: it does not read back
        and decode what was just written."""
        if encoded is None:
            encoded = [r.encode_parts() for r in records]
        with self._cv:
            mark = (self.last_seq, len(self._segments), self._writer, self._writer_size,
                    len(self._mem), self._mem_bytes, self._cum, len(self._marks), self.captured_ops,
                    self._disk_last)
            try:
                self._spill()  # everything goes to disk: received means durable
                expect = self.last_seq + 1
                for rec in records:
                    if rec.seq != expect:
                        raise JournalGap(expect, rec.seq)
                    expect += 1
                self._write_run(records, encoded)
                for rec in records:
                    rec.size = rec.size or rec.estimate_size()
                    self.last_seq = rec.seq
                    self.captured_ops += 1
                    self._cum += rec.size
                    if not self._marks or self._cum - self._marks[-1][1] >= MARK_BYTES:
                        self._marks.append((rec.seq, self._cum))
                self._sync_rolled()
                if self._writer is not None and self._unsynced:
                    os.fdatasync(self._writer)
                    self._unsynced = False
            except BaseException:
                self._roll_back(mark)
                raise
            for rec in records:
                self._keep_for_reader(rec)
            self._cv.notify_all()
            return self.last_seq

    def _write_run(self, records: list[Record], encoded: list) -> None:
        """Append consecutive records, already encoded (each as bytes, or as the pieces
        encode_parts() gives, which go to the file as they are): one write per segment they
        fall in. Joined first, a spill of 1 MiB records copied every byte twice more, into
        fresh memory each time."""
        parts = [(e,) if isinstance(e, (bytes, bytearray, memoryview)) else e for e in encoded]
        sizes = [sum(map(len, p)) for p in parts]
        i = 0
        while i < len(records):
            if self._writer is None or self._writer_size + sizes[i] > self.segment_bytes:
                self._roll(records[i].seq)
            room, j = self.segment_bytes - self._writer_size, i
            while j < len(records) and (j == i or sizes[j] <= room):
                room -= sizes[j]
                j += 1
            try:
                _write_pieces(self._writer, list(itertools.chain.from_iterable(parts[i:j])))
            except OSError:
                os.ftruncate(self._writer, self._writer_size)  # no torn record stays behind
                raise
            self._writer_size += sum(sizes[i:j])
            self._segments[-1].last = self._disk_last = records[j - 1].seq
            self._unsynced = True
            i = j
        self.full_error = None  # (room again: said again when it is full again)

    def _roll_back(self, mark) -> None:
        """Undo an ingest: segments made since go, the one it wrote to is cut back, and the
        next record starts a new segment."""
        (last, nsegs, writer, writer_size, nmem, mem_bytes, cum, nmarks, ops, disk_last) = mark
        for fd in self._unsynced_fds + ([self._writer] if self._writer is not None else []):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._unsynced_fds, self._writer, self._unsynced, self._writer_size = [], None, False, 0
        for seg in self._segments[nsegs:]:
            seg.path.unlink(missing_ok=True)
        del self._segments[nsegs:]
        if writer is not None and self._segments:
            os.truncate(self._segments[-1].path, writer_size)
            self._segments[-1].last = min(self._segments[-1].last, last)
        while len(self._mem) > nmem:
            self._mem.pop()
        self._mem_bytes, self._cum, self.captured_ops = mem_bytes, cum, ops
        while len(self._marks) > nmarks:
            self._marks.pop()
        self.last_seq, self._disk_last = last, disk_last
        self.sent_seq = min(self.sent_seq, last)
        self._reader = None

    @property
    def reserved_seq(self) -> int:
        """No seq above this was handed out (by this journal or one that died before it)."""
        return max(self._reserved, self.last_seq)

    def _reserve(self, seq: int) -> None:
        """Say durably that seqs up to `seq` may be handed out (before the first of them is)."""
        write_small_file(self.dir, RESERVED_FILE, f"{seq}\n")  # (the rename synced too)
        self._reserved = seq

    def skip_to(self, seq: int) -> None:
        """Records up to `seq` will never come (the source resyncs instead): forget ours."""
        with self._cv:
            if seq > self.last_seq:
                self.skipped = (self.last_seq + 1, seq)
                self.last_seq = seq
        self.discard_through(seq)

    def _full(self, size: int) -> bool:
        return self.limit_bytes is not None and self.queued_bytes + size > self.limit_bytes \
            and self.queued_bytes > 0

    def catch_up_from_behind(self) -> int:
        """Store records again (a resync of the dirty map starts now); returns the last seq."""
        with self._cv:
            self.behind = False
            return self.last_seq

    def _go_behind(self) -> None:
        if not self.behind:
            self.behind_since = time.time()
        self.behind = True
        self.dropped += 1

    def _disk_full(self, exc: OSError) -> None:
        """Its file system is full: said once (status shows it), or `exc` raised if it is
        another error."""
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise exc
        if self.full_error is None:
            self.full_error = (f"the journal's file system is full ({os.strerror(exc.errno)}, "
                               f"{errno.errorcode[exc.errno]}: {self.dir})")
            logging.getLogger("mirrorsetup.journal").warning(
                "%s: changes are not journalled but resynced later", self.full_error)

    def sync(self) -> int:
        """Make every record so far durable on disk (an application's fsync); returns last seq.
        When its file system is full, those it cannot write stay in memory, in order, and go
        to the target from there: the application's own fsync did not fail, nor does its
        fsync here (a crash before they are stored is an unclean stop: resynced)."""
        with self._cv:
            try:
                self._spill()
            except OSError as exc:
                self._disk_full(exc)
            self._sync_rolled()
            if self._writer is not None and self._unsynced:
                os.fdatasync(self._writer)
                self._unsynced = False
            return self.last_seq

    def _sync_rolled(self, count: int | None = None) -> None:
        """fdatasync and close segments rolled over since the last sync (oldest first)."""
        while self._unsynced_fds and (count is None or count > 0):
            fd = self._unsynced_fds.pop(0)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if count is not None:
                count -= 1

    def _spill(self) -> None:
        """Write the records in memory to disk, one write per segment (an fsync of an
        application used to cost a write per record). A failed write keeps the records it did
        not store where they were. Those the reader has not read yet stay in memory too (the
        tail, as an agent's ingested records do): it does not read back and decode them."""
        if not self._mem:
            return
        recs = list(self._mem)
        try:
            self._write_run(recs, [r.encode_parts() for r in recs])
        finally:
            while self._mem and self._mem[0].seq <= self._disk_last:
                rec = self._mem.popleft()
                self._mem_bytes -= rec.size
                if rec.seq > self.sent_seq:
                    self._keep_for_reader(rec)

    def _keep_for_reader(self, rec: Record) -> None:
        """Keep a record that is on disk in memory for the reader too (its seqs consecutive,
        at most TAIL_BYTES of them)."""
        if self._tail and self._tail[-1].seq != rec.seq - 1:
            self._tail.clear()
            self._tail_bytes = 0
        self._tail.append(rec)
        self._tail_bytes += rec.size
        while self._tail and self._tail_bytes > min(self.memory_bytes, TAIL_BYTES):
            self._tail_bytes -= self._tail.popleft().size

    def _write(self, rec: Record) -> None:
        self._write_run([rec], [rec.encode_parts()])

    def _roll(self, seq: int) -> None:
        if self._writer is not None:
            if self._unsynced:  # made durable by the next sync(), not here: a roll is no fsync
                self._unsynced_fds.append(self._writer)
                if len(self._unsynced_fds) > MAX_UNSYNCED_SEGMENTS:
                    self._sync_rolled(1)
            else:
                os.close(self._writer)
        path = self.dir / f"{seq:020d}.seg"
        self._writer = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                               | os.O_CLOEXEC, FILE_MODE)
        self._writer_size = os.fstat(self._writer).st_size
        self._segments.append(_Segment(seq, path, seq))
        self._unsynced = False

    # -- shipper side ---------------------------------------------------------------------
    def read(self, max_records: int = 256, *, max_bytes: int = 8 << 20,
             timeout: float | None = None) -> list[Record]:
        """The next records after the cursor, in order, without freeing them (waits up to
        `timeout` for one). Raises JournalGap when the next seq is missing."""
        with self._cv:
            if self.sent_seq >= self.last_seq and timeout:
                self._cv.wait_for(lambda: self.sent_seq < self.last_seq, timeout)
            out: list[Record] = []
            try:
                if self._tail and self._tail[0].seq <= self.sent_seq + 1 <= self._tail[-1].seq:
                    self._read_tail(out, max_records, max_bytes)
                elif self.sent_seq < self._disk_last:
                    self._read_disk(out, max_records, max_bytes)
                if self.sent_seq >= self._disk_last and self._mem:
                    nbytes = sum(r.size for r in out)
                    start = max(0, self.sent_seq + 1 - self._mem[0].seq)  # memory seqs are consecutive
                    for rec in itertools.islice(self._mem, start, None):
                        if len(out) >= max_records or nbytes >= max_bytes:
                            break
                        self._check_next(rec.seq)
                        out.append(rec)
                        nbytes += rec.size
                        self.sent_seq = rec.seq
            except JournalGap:
                if out:  # what came before the hole goes now; the next read says the gap
                    self._reader = None
                    return out
                raise
            return out

    def _read_tail(self, out: list[Record], max_records: int, max_bytes: int) -> None:
        """Ingested records from memory (their seqs are consecutive); the disk cursor is
        found again if a later read needs the disk."""
        nbytes = 0
        for rec in itertools.islice(self._tail, self.sent_seq + 1 - self._tail[0].seq, None):
            if len(out) >= max_records or nbytes >= max_bytes:
                break
            out.append(rec)
            nbytes += rec.size
            self.sent_seq = rec.seq
        self._reader = None

    def _check_next(self, seq: int) -> None:
        if seq != self.sent_seq + 1:
            self.gap = (self.sent_seq + 1, seq)
            raise JournalGap(self.sent_seq + 1, seq)

    def _read_disk(self, out: list[Record], max_records: int, max_bytes: int) -> None:
        if self._reader is None:
            self._reader = self._seek(self.sent_seq + 1)
        index, offset = self._reader
        nbytes = 0
        while index < len(self._segments) and len(out) < max_records and nbytes < max_bytes:
            seg = self._segments[index]
            with open(seg.path, "rb") as f:  # our own O_APPEND writes show through the page cache
                f.seek(offset)
                buf, pos = f.read(READ_CHUNK), 0
                while len(out) < max_records and nbytes < max_bytes:
                    need = 8 if len(buf) - pos < 8 else 8 + struct.unpack_from("<I", buf, pos)[0]
                    if len(buf) - pos < need:  # a record runs past what we read: read on
                        more = f.read(max(READ_CHUNK, need - (len(buf) - pos)))
                        if not more:
                            break
                        buf, offset, pos = buf[pos:] + more, offset + pos, 0
                        continue
                    try:
                        rec, nxt = decode_at(buf, pos)
                    except CorruptRecord as exc:  # in a live journal: damage, never skipped
                        self.gap = (self.sent_seq + 1, self._disk_last + 1)
                        raise JournalGap(self.sent_seq + 1, self._disk_last + 1) from exc
                    pos = nxt
                    if rec.seq <= self.sent_seq:
                        continue
                    self._check_next(rec.seq)
                    out.append(rec)
                    nbytes += rec.size
                    self.sent_seq = rec.seq
                offset += pos
            if self.sent_seq >= seg.last and index + 1 < len(self._segments):
                index, offset = index + 1, 0
            else:
                break
        self._reader = (index, offset)
        if not out and self.sent_seq < self._disk_last:  # records said to be there are not
            self.gap = (self.sent_seq + 1, self._disk_last)
            raise JournalGap(self.sent_seq + 1, self._disk_last)

    def _seek(self, seq: int) -> tuple[int, int]:
        """(segment index, 0) of the segment that holds `seq` (records before it are skipped)."""
        for i in range(len(self._segments) - 1, -1, -1):
            if self._segments[i].first <= seq:
                return i, 0
        return 0, 0

    def rewind(self, seq: int) -> None:
        """Read again from after `seq` (the target's durable position after a reconnect)."""
        with self._cv:
            if seq < self.released_seq:
                raise JournalGap(seq + 1, self.released_seq + 1)
            self.sent_seq = min(seq, self.last_seq)
            self._reader = None

    def release(self, seq: int, *, persist: bool = True) -> None:
        """The target holds everything up to `seq` durably: free those records. `persist`
        writes the released seq down now (a local target: where a restart resumes); without it
        it is written only before a segment file goes (a remote target reports its own
        position on every connect, so a stale file only keeps records a little longer, never
        leaves a hole), which spares an fsync'd rename per acknowledgement."""
        with self._cv:
            seq = min(seq, self.sent_seq)
            if seq <= self.released_seq:
                return
            while self._mem and self._mem[0].seq <= seq:
                rec = self._mem.popleft()
                self._mem_bytes -= rec.size
            while self._tail and self._tail[0].seq <= seq:
                self._tail_bytes -= self._tail.popleft().size
            self.released_seq = seq
            if not self.track_applied:
                self._drop_samples(seq)
            while self._marks and self._marks[0][0] <= seq:
                self._released_cum = self._marks.popleft()[1]
            if seq >= self.last_seq:
                self._released_cum = self._cum
            if persist or self._droppable():
                write_small_file(self.dir, RELEASED_FILE, f"{seq}\n", sync_dir=False)
                self._persisted = seq
            self._drop_released_segments()
            self._cv.notify_all()

    def _droppable(self) -> bool:
        return bool(self._segments) and self._segments[0].last <= self.released_seq and \
            (len(self._segments) > 1 or self._disk_last <= self.released_seq)

    def _drop_released_segments(self) -> None:
        """Delete segments wholly at or below the released seq (the released file says so
        first: a reopen must not find a hole where they were)."""
        while self._droppable():
            seg = self._segments.pop(0)
            if not self._segments:  # the writer's own segment: close it first
                self._close_writer()
            seg.path.unlink(missing_ok=True)
            if self._reader is not None:
                self._reader = None if self._reader[0] == 0 else (self._reader[0] - 1, self._reader[1])

    def _close_writer(self) -> None:
        for fd in self._unsynced_fds:  # their segments are released: nothing left to make durable
            os.close(fd)
        self._unsynced_fds.clear()
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None
            self._unsynced = False

    def wait_released(self, seq: int, timeout: float | None = None) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self.released_seq >= seq, timeout)

    def discard_through(self, seq: int) -> None:
        """Forget every record up to `seq` without shipping it: a resync has made the target
        hold their effect (or they were lost: the gap is closed by the resync)."""
        with self._cv:
            seq = min(seq, self.last_seq)
            self.sent_seq = max(self.sent_seq, seq)
            self._reader = None
            self.gap = None
        self.release(seq)

    def applied(self, seq: int) -> None:
        """The target has applied (durably) every record up to `seq` (track_applied)."""
        with self._cv:
            self._applied_seq = max(self._applied_seq, seq)
            self._drop_samples(seq)

    def _drop_samples(self, seq: int) -> None:
        """Forget the capture times of records up to `seq`; a sample also stands for the
        records after it up to the next sample (captured within LAG_SAMPLE_SECONDS of it), so
        it stays while one of those is still to go."""
        samples = self._samples
        while samples and (samples[1][0] <= seq + 1 if len(samples) > 1 else seq >= self.last_seq):
            samples.popleft()

    def lag_seconds(self) -> float:
        """Time since the oldest record not yet on the target was captured (0 when caught up):
        not yet released, or with track_applied not yet applied there."""
        with self._cv:
            done = self._applied_seq if self.track_applied else self.released_seq
            if done >= self.last_seq or not self._samples:
                return 0.0
            return time.monotonic() - self._samples[0][1]

    def close(self) -> None:
        """Everything not released goes to disk first: records that were only in memory (no
        application fsync'd since) were lost by a close while the target was away, and the
        next start reused their seqs. `unstored` says how many could not be written."""
        with self._cv:
            try:
                self._spill()
            except OSError as exc:  # a full or failing disk: said by the caller (an unclean end)
                logging.getLogger("mirrorsetup.journal").error(
                    "journal %s: %d records could not be stored at close: %s", self.dir,
                    len(self._mem), exc)
            self.unstored = len(self._mem)
            if self.released_seq > self._persisted:  # what release() left unwritten
                write_small_file(self.dir, RELEASED_FILE, f"{self.released_seq}\n", sync_dir=False)
                self._persisted = self.released_seq
            self._sync_rolled()
            if self._writer is not None:
                if self._unsynced:
                    os.fdatasync(self._writer)
                os.close(self._writer)
                self._writer = None
            if self._reserved > self.last_seq and not self._mem:
                # every seq handed out is on disk or released: the next open starts right here
                with contextlib.suppress(OSError):  # else a later crash only jumps further
                    self._reserve(self.last_seq)
