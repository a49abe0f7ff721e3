"""A block entry's capture file system: one file, `disk`, whose bytes are the entry's window
[offset, offset + size) of the raw device (held O_EXCL by the worker). The loop device is
attached to that file. Every write is written to the raw device and, if that worked, appended
to the journal before the reply goes back to the kernel; fsync through the loop (a file
system's flush) makes the device and the journal durable.

Per 1 MiB block it keeps a write generation (catching up and verify read a block, then check
no write reached it before they commit or conclude) and, while the journal is behind (its
queue limit reached in pull-ahead mode), a dirty map of the blocks whose writes were not
journalled: the resync sends exactly those.
"""

from __future__ import annotations

import errno
import os
import stat
from array import array

import pyfuse3
import trio

from app.engine.journal import Journal
from app.engine.sync import BLOCK

FILE_NAME = b"disk"
FILE_INO = pyfuse3.ROOT_INODE + 1


class BlockFS(pyfuse3.Operations):
    """A directory with one file: the window of the raw device."""

    enable_writeback_cache = False

    def __init__(self, raw_fd: int, offset: int, size: int, journal: Journal, read_only: bool):
        super().__init__()
        self.raw_fd, self.offset, self.size = raw_fd, offset, size
        self.journal = journal
        self.read_only = read_only
        self.opened = 0
        self.writes = 0
        nblocks = (size + BLOCK - 1) // BLOCK
        self.gen = array("Q", bytes(8 * nblocks))  # per block: the clock at its last write
        self.clock = 0
        self.dirty = bytearray(nblocks)  # written while the journal was behind
        self.unfrozen = trio.Event()
        self.unfrozen.set()
        self.stopping = False

    def generation(self, block: int) -> int:
        return self.gen[block]

    def dirty_blocks(self) -> list[int]:
        return [b for b, d in enumerate(self.dirty) if d]

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.entry_timeout = e.attr_timeout = 3600  # nothing else changes the window's size
        e.st_uid = e.st_gid = 0
        if ino == FILE_INO:
            e.st_mode = stat.S_IFREG | (0o400 if self.read_only else 0o600)
            e.st_size = self.size
            e.st_blocks = (self.size + 511) // 512
            e.st_nlink = 1
        else:
            e.st_mode = stat.S_IFDIR | 0o700
            e.st_nlink = 2
        e.st_blksize = 4096
        return e

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, FILE_INO):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INO)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attr(FILE_INO), 1)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size and attr.st_size != self.size:
            raise pyfuse3.FUSEError(errno.EPERM)  # the window's size is the device's
        return self._attr(inode)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if self.read_only and flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        self.opened += 1
        # direct_io: no second page cache under the loop device's own, every write reaches us
        return pyfuse3.FileInfo(fh=FILE_INO, direct_io=True, keep_cache=False)

    async def release(self, fh):
        self.opened -= 1

    async def read(self, fh, off, size):
        size = max(0, min(size, self.size - off))
        try:
            return os.pread(self.raw_fd, size, self.offset + off) if size else b""
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from exc

    async def write(self, fh, off, buf):
        if not self.unfrozen.is_set():
            await self.unfrozen.wait()  # held still for a moment (a block that kept changing)
        if self.stopping:
            raise pyfuse3.FUSEError(errno.EIO)  # capture has ended: nothing unjournalled lands
        if off >= self.size and buf:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        data = bytes(buf[:self.size - off])
        try:
            done = os.pwrite(self.raw_fd, data, self.offset + off)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from exc
        if done:
            self.clock += 1
            first, last = off // BLOCK, (off + done - 1) // BLOCK
            for b in range(first, last + 1):
                self.gen[b] = self.clock
            if not self.journal.append("write", {"offset": off}, data[:done]):
                for b in range(first, last + 1):
                    self.dirty[b] = 1  # behind: the resync sends this block
            self.writes += 1
        return done

    async def fsync(self, fh, datasync):
        try:
            os.fdatasync(self.raw_fd)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from exc
        self.journal.sync()

    async def flush(self, fh):
        """close(2) of the file; durability comes with fsync. "Not supported" stops the kernel
        sending FLUSH at all (one round trip less per close)."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (self.size + 4095) // 4096
        s.f_files = 1
        s.f_namemax = 255
        return s


def open_raw(device: str, read_only: bool) -> int:
    """The raw device, exclusively: EBUSY when it is mounted or held (by a file system, a
    device-mapper table, another exclusive opener)."""
    mode = os.O_RDONLY if read_only else os.O_RDWR
    try:
        return os.open(device, mode | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        why = " (mounted, or held open exclusively by another program)" if exc.errno == errno.EBUSY else ""
        raise OSError(exc.errno, f"open {device} exclusively: {exc.strerror}{why}", device) from None
