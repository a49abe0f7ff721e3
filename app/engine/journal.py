"""The change journal of one entry: ordered, checksummed records, memory first, spilled to disk.

A record is (seq, kind, op, args, data). `kind` says which engine wrote it (file system or
block), `op` is the operation name, `args` a small JSON object and `data` the raw bytes (a
write's payload). The file-system engine writes records now; the block engine reuses the format.

Records live in a bounded in-memory queue. When the queue is full, or when an application asks
for durability (fsync), everything queued moves to append-only segment files
(`<seq>.seg`, about 5 MB each, like the seed product's spill files) and later records keep going
to disk until the applier has read them all, so the order is never broken. On disk a record is

    u32 length | u32 crc32(seq..end) | u64 seq | u8 kind | u16 op_len | u32 args_len | op | args | data

A torn or corrupt tail (the daemon died mid-append) is detected on open and truncated.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

KIND_FS = 1
KIND_BLOCK = 2
SEGMENT_BYTES = 5 * 1000 * 1000  # the seed product's spill files were 5 MB each
MEMORY_BYTES = 64 << 20  # in-memory queue bound; beyond it records spill to disk
HEADER = struct.Struct("<IIQ")  # length of the rest, crc32 of the rest, seq
BODY = struct.Struct("<BHI")  # kind, op length, args length
APPLIED_FILE = "applied"
MAX_UNSYNCED_SEGMENTS = 64  # rolled segments (5 MB each) kept open, unsynced, for the next sync()
LAG_SAMPLE_SECONDS = 0.005  # lag is measured to this resolution, not per record


@dataclass
class Record:
    seq: int
    kind: int
    op: str
    args: dict
    data: bytes = b""
    size: int = field(default=0, compare=False)

    def encode(self) -> bytes:
        """The on-disk form; only spilled records pay for it (memory records are kept as is)."""
        op = self.op.encode()
        args = json.dumps(self.args, separators=(",", ":")).encode()
        head = struct.pack("<Q", self.seq) + BODY.pack(self.kind, len(op), len(args)) + op + args
        crc = zlib.crc32(self.data, zlib.crc32(head))
        return b"".join((struct.pack("<II", len(head) + len(self.data), crc), head, self.data))

    def estimate_size(self) -> int:
        """Bytes this record occupies in the queue: its data plus a small fixed allowance for
        the header and arguments (exact sizes are only needed on disk)."""
        return HEADER.size + BODY.size + 64 + len(self.data)


class CorruptRecord(Exception):
    """A record whose length runs past the end or whose checksum does not match."""


def decode_at(buf: bytes | memoryview, pos: int) -> tuple[Record, int]:
    """Decode the record at `pos`; return it and the position after it."""
    if len(buf) - pos < HEADER.size:
        raise CorruptRecord("torn header")
    length, crc = struct.unpack_from("<II", buf, pos)
    end = pos + 8 + length
    if length < 8 + BODY.size or end > len(buf):
        raise CorruptRecord("torn record")
    rest = bytes(buf[pos + 8:end])
    if zlib.crc32(rest) != crc:
        raise CorruptRecord("checksum mismatch")
    seq = struct.unpack_from("<Q", rest, 0)[0]
    kind, op_len, args_len = BODY.unpack_from(rest, 8)
    at = 8 + BODY.size
    op = rest[at:at + op_len].decode()
    args = json.loads(rest[at + op_len:at + op_len + args_len])
    data = rest[at + op_len + args_len:]
    rec = Record(seq, kind, op, args, data)
    rec.size = rec.estimate_size()
    return rec, end


def scan_segment(path: Path) -> tuple[list[int], int]:
    """Seqs of the valid records in a segment and the length of its valid prefix."""
    buf = path.read_bytes()
    pos, seqs = 0, []
    while pos < len(buf):
        try:
            rec, nxt = decode_at(buf, pos)
        except (CorruptRecord, ValueError, UnicodeDecodeError):
            break
        seqs.append(rec.seq)
        pos = nxt
    return seqs, pos


def encode_path(path: bytes) -> str:
    """File names are bytes; JSON carries them as surrogate-escaped text (lossless)."""
    return os.fsdecode(path)


def decode_path(text: str) -> bytes:
    return os.fsencode(text)


class Journal:
    """One entry's journal; `append` from the capture side, `take` and `applied` from the applier."""

    def __init__(self, directory: str | os.PathLike, *, kind: int = KIND_FS,
                 memory_bytes: int = MEMORY_BYTES, segment_bytes: int = SEGMENT_BYTES):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.kind = kind
        self.memory_bytes = memory_bytes
        self.segment_bytes = segment_bytes
        self._cv = threading.Condition()
        self._mem: deque[Record] = deque()
        self._mem_bytes = 0
        self._segments: list[tuple[int, Path]] = []  # (first seq, path), oldest first
        self._writer: int | None = None
        self._unsynced_fds: list[int] = []  # rolled segments not yet made durable
        self._writer_size = 0
        self._unsynced = False
        self._disk_last = 0  # highest seq written to disk
        self._reader: tuple[int, Path, int] | None = None  # segment index, path, offset
        self.torn_bytes = 0  # bytes cut off a torn tail at open
        self.applied_seq = self._read_applied()
        self.taken_seq = self.applied_seq
        self.last_seq = self.applied_seq
        self.captured_ops = 0
        self.queued_bytes = 0
        self._samples: deque[tuple[int, float]] = deque()  # (seq, monotonic time) for the lag
        self._open_segments()

    # -- opening --------------------------------------------------------------------------
    def _read_applied(self) -> int:
        try:
            return int((self.dir / APPLIED_FILE).read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def _open_segments(self) -> None:
        for path in sorted(self.dir.glob("*.seg")):
            seqs, valid = scan_segment(path)
            size = path.stat().st_size
            if valid < size:  # torn tail: the daemon died mid-append; cut it off
                self.torn_bytes += size - valid
                with open(path, "r+b") as f:
                    f.truncate(valid)
                    os.fsync(f.fileno())
            if not seqs:
                path.unlink()
                continue
            if seqs[-1] <= self.applied_seq:
                path.unlink()  # fully applied: nothing left to replay
                continue
            self._segments.append((seqs[0], path))
            self._disk_last = max(self._disk_last, seqs[-1])
            self.queued_bytes += valid
        self.last_seq = max(self.last_seq, self._disk_last)

    # -- capture side ---------------------------------------------------------------------
    def append(self, op: str, args: dict, data: bytes = b"") -> int:
        """Queue one record, in order; returns its seq. Never blocks on the applier."""
        with self._cv:
            seq = self.last_seq + 1
            rec = Record(seq, self.kind, op, args, data)
            rec.size = rec.estimate_size()
            self.last_seq = seq
            self.captured_ops += 1
            self.queued_bytes += rec.size
            now = time.monotonic()
            if not self._samples or now - self._samples[-1][1] >= LAG_SAMPLE_SECONDS:
                self._samples.append((seq, now))
            if self._disk_last > self.taken_seq:  # disk backlog: keep order, go to disk too
                self._write(rec.encode(), seq)
            elif self._mem_bytes + rec.size > self.memory_bytes:
                self._spill()
                self._write(rec.encode(), seq)
            else:
                self._mem.append(rec)
                self._mem_bytes += rec.size
            self._cv.notify_all()
            return seq

    def sync(self) -> int:
        """Make every record so far durable on disk (an application's fsync); returns last seq."""
        with self._cv:
            self._spill()
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
        while self._mem:
            rec = self._mem.popleft()
            self._mem_bytes -= rec.size
            self._write(rec.encode(), rec.seq)

    def _write(self, raw: bytes, seq: int) -> None:
        if self._writer is None or self._writer_size + len(raw) > self.segment_bytes:
            self._roll(seq)
        os.write(self._writer, raw)
        self._writer_size += len(raw)
        self._disk_last = seq
        self._unsynced = True

    def _roll(self, seq: int) -> None:
        if self._writer is not None:
            if self._unsynced:  # made durable by the next sync(), not here: a roll is no fsync
                self._unsynced_fds.append(self._writer)
                if len(self._unsynced_fds) > MAX_UNSYNCED_SEGMENTS:
                    self._sync_rolled(1)
            else:
                os.close(self._writer)
        path = self.dir / f"{seq:020d}.seg"
        self._writer = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._writer_size = os.fstat(self._writer).st_size
        self._segments.append((seq, path))
        self._unsynced = False

    # -- applier side ---------------------------------------------------------------------
    def take(self, max_records: int = 256, timeout: float | None = None) -> list[Record]:
        """The next records after the last taken one, in order (waits up to `timeout`)."""
        with self._cv:
            if self.taken_seq >= self.last_seq and timeout:
                self._cv.wait_for(lambda: self.taken_seq < self.last_seq, timeout)
            out: list[Record] = []
            if self._disk_last > self.taken_seq:
                out = self._read_disk(max_records)
            while len(out) < max_records and self._mem and self._disk_last <= self.taken_seq:
                rec = self._mem.popleft()
                self._mem_bytes -= rec.size
                out.append(rec)
                self.taken_seq = rec.seq
            return out

    def _read_disk(self, max_records: int) -> list[Record]:
        out: list[Record] = []  # our own O_APPEND writes are visible through the page cache
        index = 0 if self._reader is None else self._reader[0]
        offset = 0 if self._reader is None else self._reader[2]
        while len(out) < max_records and index < len(self._segments):
            path = self._segments[index][1]
            with open(path, "rb") as f:
                f.seek(offset)
                buf = f.read()
            pos = 0
            while len(out) < max_records and pos < len(buf):
                try:
                    rec, nxt = decode_at(buf, pos)
                except CorruptRecord:
                    break
                pos = nxt
                if rec.seq > self.taken_seq:
                    out.append(rec)
                    self.taken_seq = rec.seq
            offset += pos
            if len(out) < max_records and index + 1 < len(self._segments):
                index, offset = index + 1, 0
            else:
                break
        self._reader = (index, self._segments[index][1], offset) if index < len(self._segments) else None
        return out

    def applied(self, seq: int, nbytes: int, *, persist: bool = False) -> None:
        """The applier finished everything up to `seq` (`nbytes` of records)."""
        with self._cv:
            self.applied_seq = seq
            self.queued_bytes = max(0, self.queued_bytes - nbytes)
            while self._samples and self._samples[0][0] <= seq:
                self._samples.popleft()
            if persist:
                self.persist_applied()
            self._cv.notify_all()

    def persist_applied(self) -> None:
        """Write the applied seq atomically (temp + fsync + rename) and drop applied segments."""
        tmp = self.dir / (APPLIED_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{self.applied_seq}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.dir / APPLIED_FILE)
        self._drop_applied_segments()

    def _drop_applied_segments(self) -> None:
        """A segment is garbage once the next one starts at or below the applied seq + 1."""
        while len(self._segments) > 1 and self._segments[1][0] <= self.applied_seq + 1:
            _, path = self._segments.pop(0)
            path.unlink(missing_ok=True)
            if self._reader is not None:
                self._reader = (self._reader[0] - 1, self._reader[1], self._reader[2])
        if (self._segments and self._disk_last <= self.applied_seq and self._writer is not None
                and not self._mem):
            self._forget_segments()

    def _forget_segments(self) -> None:
        """Close the spill writer and delete every segment: nothing on disk is still needed."""
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None
        for fd in self._unsynced_fds:  # their segments are deleted: nothing left to make durable
            os.close(fd)
        self._unsynced_fds.clear()
        for _, path in self._segments:
            path.unlink(missing_ok=True)
        self._segments.clear()
        self._reader = None

    def wait_applied(self, seq: int, timeout: float | None = None) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self.applied_seq >= seq, timeout)

    def discard_pending(self) -> None:
        """Forget every unapplied record (a difference mirror has made the target whole)."""
        with self._cv:
            self._mem.clear()
            self._mem_bytes = 0
            self.taken_seq = self.applied_seq = self.last_seq
            self._disk_last = min(self._disk_last, self.last_seq)
            self.queued_bytes = 0
            self._samples.clear()
            self.persist_applied()
            self._forget_segments()

    def lag_seconds(self) -> float:
        """Time since the oldest unapplied record was captured (0 when caught up)."""
        with self._cv:
            if self.applied_seq >= self.last_seq or not self._samples:
                return 0.0
            return time.monotonic() - self._samples[0][1]

    def stats(self) -> dict:
        with self._cv:
            return {"captured_ops": self.captured_ops, "bytes_queued": self.queued_bytes,
                    "applied_seq": self.applied_seq, "last_seq": self.last_seq,
                    "lag_seconds": round(self.lag_seconds(), 3)}

    def close(self) -> None:
        with self._cv:
            self._sync_rolled()
            if self._writer is not None:
                if self._unsynced:
                    os.fdatasync(self._writer)
                os.close(self._writer)
                self._writer = None
