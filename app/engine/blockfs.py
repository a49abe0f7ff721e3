"""A block entry's capture file system: one file, `disk`, whose bytes are the entry's window
[offset, offset + size) of the raw device (held O_EXCL by the worker). The loop device is
attached to that file. Every write is written to the raw device and, if that worked, appended
to the journal before the reply goes back to the kernel; fsync through the loop (a file
system's flush) makes the device and the journal durable.

Per 1 MiB block it keeps a write generation (catching up and verify read a block, then check
no write reached it before they commit or conclude) and, while the journal is behind (its
queue limit reached in pull-ahead mode), a dirty map of the blocks whose writes were not
journalled: the resync sends exactly those.

The writes are answered by the compiled request loop when it is built (fusewire's
`_fuseread.serve_writes`, here `serve_writes`): it writes the device, keeps the bytes in a batch
and replies; the batch is journalled before the next other request is answered or another task
runs. It is used only while the journal has room for a whole batch (never behind, never waiting),
the file system is not frozen and nothing waits at its gate; otherwise `write` below answers.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import time
from array import array
from types import SimpleNamespace

from app.engine import fusewire
from app.engine.journal import RECORD_OVERHEAD, Journal
from app.engine.sync import BLOCK

FILE_NAME = b"disk"
ROOT_INO = fusewire.ROOT_ID
FILE_INO = ROOT_INO + 1
FOPEN_DIRECT_IO = 1 << 0
BATCH_RECORDS = fusewire.CHECKPOINT_EVERY  # writes answered in C between two journal appends
# Writes up to this size are answered in C. The bytes are copied twice there (into the batch,
# then into the journal's record), once on the Python path. bench/apps.py, fio qd16 on a
# captured loop, 3 interleaved runs against answering all in Python: every size in C, 4 KiB
# 126 vs 78 MB/s but 64 KiB 241 vs 273; up to 16 KiB in C, 114 vs 77 and 299 vs 278.
SMALL_WRITE = 16 << 10
BATCH_BYTES = BATCH_RECORDS * SMALL_WRITE  # the batch's data buffer


class BlockFS(fusewire.Gate):
    """A directory with one file: the window of the raw device. Served by fusewire.Session
    (the FUSE protocol spoken directly: one request costs a read, a few unpacks and a write,
    not pyfuse3's and trio's dispatch). While frozen, the session holds writes back, in order."""

    # the file's data goes straight to us: no second page cache under the loop device's own,
    # every write reaches us
    open_flags = FOPEN_DIRECT_IO

    def __init__(self, raw_fd: int, offset: int, size: int, journal: Journal, read_only: bool):
        self.raw_fd, self.offset, self.size = raw_fd, offset, size
        self.journal = journal
        self.read_only = read_only
        # after a fail-over, while nothing held its loop for writing (capture.py _fence_block):
        # writes refused here, in this process only (a BLKROSET of the loop would outlive it)
        self.fenced = False
        self.opened = 0
        self.writes = 0
        nblocks = (size + BLOCK - 1) // BLOCK
        self.gen = array("Q", bytes(8 * nblocks))  # per block: the clock at its last write
        self.clock = 0
        self.dirty = bytearray(nblocks)  # written while the journal was behind
        super().__init__()  # closed while a block that kept changing is held still
        self.dev = os.fstat(raw_fd).st_rdev  # what fusewire compares inode numbers' devices with
        self._serve = None if read_only else getattr(fusewire._fuseread, "serve_writes", None)
        self._batch: tuple | None = None  # (data, meta), made at the first write answered in C
        now = time.time_ns()
        self._stat = {
            FILE_INO: SimpleNamespace(
                st_ino=FILE_INO, st_dev=self.dev, st_mode=stat.S_IFREG | (0o400 if read_only else 0o600),
                st_nlink=1, st_uid=0, st_gid=0, st_rdev=0, st_size=size, st_blocks=(size + 511) // 512,
                st_blksize=4096, st_atime_ns=now, st_mtime_ns=now, st_ctime_ns=now),
            ROOT_INO: SimpleNamespace(
                st_ino=ROOT_INO, st_dev=self.dev, st_mode=stat.S_IFDIR | 0o700, st_nlink=2, st_uid=0,
                st_gid=0, st_rdev=0, st_size=0, st_blocks=0, st_blksize=4096, st_atime_ns=now,
                st_mtime_ns=now, st_ctime_ns=now)}

    def generation(self, block: int) -> int:
        return self.gen[block]

    def dirty_blocks(self) -> list[int]:
        return [b for b, d in enumerate(self.dirty) if d]

    # -- the session's questions --------------------------------------------------------------
    def init(self) -> None:
        pass

    def answered(self) -> None:
        pass

    # -- requests -----------------------------------------------------------------------------
    def getattr(self, ino: int, fh: int | None):
        try:
            return self._stat[ino]
        except KeyError:
            raise OSError(errno.ENOENT, "no such node") from None

    def statx(self, ino: int, fh: int | None, mask: int):
        raise OSError(errno.ENOSYS, "GETATTR answers")  # the kernel asks GETATTR from then on

    def lookup(self, parent: int, name: bytes):
        if parent != ROOT_INO or name != FILE_NAME:
            raise OSError(errno.ENOENT, "no such file")
        return FILE_INO, self._stat[FILE_INO]

    def forget(self, ino: int, count: int) -> None:
        pass

    def opendir(self, ino: int) -> int:
        if ino != ROOT_INO:
            raise OSError(errno.ENOTDIR, "not a directory")
        return ino

    def readdir(self, fh: int, offset: int):
        if offset == 0:
            yield FILE_NAME, FILE_INO, self._stat[FILE_INO], 1, True

    def unsent_entry(self, ino: int) -> None:
        pass

    def releasedir(self, fh: int) -> None:
        pass

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    def setattr(self, ino: int, ch, ctx):
        if ch.size is not None and ch.size != self.size:  # (Changes has no `valid`: it raised)
            raise OSError(errno.EPERM, "the window's size is the device's")
        return self.getattr(ino, None)

    def open(self, ino: int, flags: int) -> int:
        if ino != FILE_INO:
            raise OSError(errno.EISDIR, "a directory")
        if self.read_only and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "read-only entry")
        self.opened += 1
        return FILE_INO

    def release(self, fh: int) -> None:
        self.opened -= 1

    def read(self, fh: int, off: int, size: int) -> bytes:
        size = max(0, min(size, self.size - off))
        return os.pread(self.raw_fd, size, self.offset + off) if size else b""

    def write(self, fh: int, off: int, buf: memoryview) -> int:
        if self.fenced:
            raise OSError(errno.EROFS, "its replica was promoted (a fail-over)")
        if off >= self.size and len(buf):
            raise OSError(errno.ENOSPC, "past the end of the window")
        data = bytes(buf[:self.size - off])
        done = os.pwrite(self.raw_fd, data, self.offset + off)
        if done:
            self.clock += 1
            for b in _blocks(off, done):
                self.gen[b] = self.clock
            if not self.journal.append("write", {"offset": off}, data[:done]):
                for b in _blocks(off, done):
                    self.dirty[b] = 1  # behind: the resync sends this block
            self.writes += 1
        return done

    def serve_writes(self, fd: int, buf: mmap.mmap, spin_ns: int) -> int | None:
        """The session's next read, WRITEs answered in C (see the module), asked only while
        nothing is frozen or waits at the gate: None when that is not possible now (the session
        then reads and answers as usual), else what its read would have returned (-ENOBUFS: a
        batch was full, read again)."""
        if self._serve is None or self.fenced or \
                not self.journal.has_room(BATCH_BYTES + BATCH_RECORDS * RECORD_OVERHEAD):
            return None
        if self._batch is None:  # anonymous memory: resident only as far as batches have used it
            self._batch = (mmap.mmap(-1, BATCH_BYTES), array("Q", bytes(16 * BATCH_RECORDS)))
        data, meta = self._batch
        n, count, clock = self._serve(fd, buf, spin_ns, self.raw_fd, self.offset, self.size, FILE_INO,
                                   self.gen, self.clock, data, meta, BATCH_RECORDS, SMALL_WRITE)
        if count:
            self.clock = clock
            self.writes += count
            view, pos, items = memoryview(data), 0, []
            for i in range(count):
                off, done = meta[2 * i], meta[2 * i + 1]
                items.append(({"offset": off}, bytes(view[pos:pos + done])))
                pos += done
            stored = self.journal.append_many("write", items)
            for args, rec in items[stored:]:  # behind meanwhile (has_room said there was room)
                for b in _blocks(args["offset"], len(rec)):
                    self.dirty[b] = 1
        return n

    def fsync(self, fh: int, datasync: bool) -> None:
        os.fdatasync(self.raw_fd)
        self.journal.sync()

    def getxattr(self, ino: int, name: bytes) -> bytes:
        raise OSError(errno.ENOSYS, "no attributes")  # the kernel stops asking (one request less per write)

    def listxattr(self, ino: int) -> list:
        raise OSError(errno.ENOSYS, "no attributes")

    def statfs(self):
        blocks = (self.size + 4095) // 4096
        return SimpleNamespace(f_blocks=blocks, f_bfree=0, f_bavail=0, f_files=1, f_ffree=0,
                               f_bsize=4096, f_namemax=255, f_frsize=4096)


def _blocks(offset: int, length: int) -> range:
    """The 1 MiB blocks a write of `length` (> 0) bytes at `offset` touches."""
    return range(offset // BLOCK, (offset + length - 1) // BLOCK + 1)


def open_raw(device: str, read_only: bool) -> int:
    """The raw device, exclusively: EBUSY when it is mounted or held (by a file system, a
    device-mapper table, another exclusive opener)."""
    mode = os.O_RDONLY if read_only else os.O_RDWR
    try:
        return os.open(device, mode | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        why = " (mounted, or held open exclusively by another program)" if exc.errno == errno.EBUSY else ""
        raise OSError(exc.errno, f"open {device} exclusively: {exc.strerror}{why}", device) from None
