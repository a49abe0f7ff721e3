"""One block entry's capture process: the raw device held exclusively, exposed as one FUSE file.

The worker opens the raw device with O_EXCL (so nothing can mount it or open it exclusively
behind our back), mounts a private FUSE file system with a single file, `disk`, whose bytes are
the entry's window of the device (offset, size limit), and the daemon attaches the loop device
to that file. Every write that reaches the file is written to the raw device and, if that
worked, appended to the entry's journal before the reply goes back to the kernel; the applier
replays the journal onto the target at the same offsets. fsync through the loop (a file
system's flush) makes the device and the journal durable.

Like the file-system worker, it exits at once when the daemon goes away; the next daemon finds
the journal unclean and resyncs the blocks that differ before it attaches the loop again.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import stat
import sys

import pyfuse3
import trio

from app.engine.applier import Applier
from app.engine.journal import KIND_BLOCK, Journal, Record
from app.engine.worker import Channel, guarded, open_state, run_until_unmounted

FILE_NAME = b"disk"
FILE_INO = pyfuse3.ROOT_INODE + 1
FSNAME = "mirrorblk"
FUSE_OPTIONS = (f"fsname={FSNAME}", f"subtype={FSNAME}", "default_permissions")


class BlockFS(pyfuse3.Operations):
    """A directory with one file: the window [offset, offset + size) of the raw device."""

    enable_writeback_cache = False

    def __init__(self, raw_fd: int, offset: int, size: int, journal: Journal, read_only: bool):
        super().__init__()
        self.raw_fd, self.offset, self.size = raw_fd, offset, size
        self.journal = journal
        self.read_only = read_only
        self.opened = 0
        self.writes = 0
        self.unfrozen = trio.Event()
        self.unfrozen.set()

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
            await self.unfrozen.wait()  # a mirror or verify holds the device still
        if off >= self.size and buf:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        data = bytes(buf[:self.size - off])
        try:
            done = os.pwrite(self.raw_fd, data, self.offset + off)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from exc
        if done:
            self.journal.append("write", {"offset": off}, data[:done])
            self.writes += 1
        return done

    async def fsync(self, fh, datasync):
        try:
            os.fdatasync(self.raw_fd)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from exc
        self.journal.sync()

    async def flush(self, fh):
        pass  # close(2) of the file; durability comes with fsync

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (self.size + 4095) // 4096
        s.f_files = 1
        s.f_namemax = 255
        return s


class BlockApplier(Applier):
    """Replays block writes onto the target file or device at the same window offsets."""

    def __init__(self, journal: Journal, target_fd: int | None):
        super().__init__(journal, None)
        self.tfd = target_fd

    def apply(self, rec: Record) -> None:
        if self.tfd is None:
            return
        if rec.op != "write":
            raise OSError(errno.EINVAL, f"unknown block journal op {rec.op!r}")
        os.pwrite(self.tfd, rec.data, rec.args["offset"])

    def persist(self) -> None:
        if self.tfd is not None:
            os.fdatasync(self.tfd)
        self._persisted()


def open_raw(device: str, read_only: bool) -> int:
    """The raw device, exclusively: EBUSY when it is mounted or held (by a file system, a
    device-mapper table, another exclusive opener)."""
    mode = os.O_RDONLY if read_only else os.O_RDWR
    try:
        return os.open(device, mode | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        why = " (mounted, or held open exclusively by another program)" if exc.errno == errno.EBUSY else ""
        raise SystemExit(json.dumps({
            "event": "error", "errno": exc.errno,
            "message": f"open {device} exclusively: {exc.strerror} "
                       f"({errno.errorcode.get(exc.errno, '?')}){why}"}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mirrorsetup-blockworker")
    p.add_argument("--device", required=True)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--sizelimit", type=int, default=0)
    p.add_argument("--target")
    p.add_argument("--state", required=True)
    p.add_argument("--mount", required=True, help="private directory for the FUSE file")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--adopt", help="socket where the next daemon takes over a capture whose "
                   "daemon died (the capture goes on meanwhile)")
    p.add_argument("--fd", type=int, required=True)
    args = p.parse_args(argv)
    return guarded(args.fd, lambda chan: _run(args, chan))


def _run(args, chan: Channel) -> int:
    from app.engine import blocksync

    raw = open_raw(args.device, args.read_only)
    end = os.lseek(raw, 0, os.SEEK_END)
    if args.offset >= end:
        raise OSError(errno.EINVAL, f"offset {args.offset} is past the end of {args.device} ({end} bytes)")
    size = min(args.sizelimit or end - args.offset, end - args.offset)
    target = blocksync.open_target(args.target, size) if args.target else None
    first, unclean = open_state(args.state, f"{args.device} offset={args.offset} size={size}".encode())
    journal = Journal(args.state, kind=KIND_BLOCK)
    resync = None
    if target is not None and (unclean or journal.torn_bytes):
        stage = "initial copy" if first else "block resync"

        def progress(done, total):
            chan.send(event="progress", stage=stage, bytes=done, total=total)
        resync = blocksync.compare(raw, args.offset, size, target, copy="diff", progress=progress)
        resync.pop("ranges")
        journal.discard_pending()  # the target now equals the window: old records are moot
    ops = BlockFS(raw, args.offset, size, journal, args.read_only)
    os.makedirs(args.mount, mode=0o700, exist_ok=True)
    pyfuse3.init(ops, args.mount, set(FUSE_OPTIONS))
    if target is None:
        journal.discard_pending()
    applier = BlockApplier(journal, target)
    applier.start()

    async def frozen_drained():
        ops.unfrozen = trio.Event()
        await trio.to_thread.run_sync(journal.wait_applied, journal.last_seq)

    async def handle(req: dict, stream) -> dict:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, **journal.stats(), "open_handles": ops.opened, "size": size,
                    "apply_errors": applier.errors, "last_apply_error": applier.last_error}
        if target is None and cmd in ("verify", "mirror"):
            return {"ok": False, "error": f"{args.device} has no target", "errno": errno.EINVAL}
        if cmd not in ("verify", "mirror"):
            return {"ok": False, "error": f"unknown worker command {cmd!r}", "errno": errno.EINVAL}
        await frozen_drained()
        token = trio.lowlevel.current_trio_token()

        def progress(done, total):
            msg = {"progress": {"bytes": done, "total": total}}
            trio.from_thread.run(stream.send_all, json.dumps(msg).encode() + b"\n",
                                 trio_token=token)
        try:
            applier.pause()
            os.fdatasync(raw)
            counts = await trio.to_thread.run_sync(lambda: blocksync.compare(
                raw, args.offset, size, target, copy="none" if cmd == "verify" else "all",
                progress=progress))
            if cmd == "mirror":
                journal.discard_pending()
        finally:
            applier.resume()
            ops.unfrozen.set()
        return {"ok": True, "size": size, **counts}

    adopt = None
    if args.adopt:
        if os.path.lexists(args.adopt):
            os.unlink(args.adopt)  # a dead worker's; a live one would hold our O_EXCL open
        adopt = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        adopt.bind(args.adopt)
        os.chmod(args.adopt, 0o600)
        adopt.listen(1)
    try:
        run_until_unmounted(chan, {"unclean": unclean and not first, "first": first,
                                   "resync": resync, "size": size, "pid": os.getpid(),
                                   "file": os.path.join(args.mount, os.fsdecode(FILE_NAME))},
                            handle, args.device, applier, journal, flush=lambda: os.fsync(raw),
                            adopt=adopt)
    finally:
        if adopt is not None:
            adopt.close()
            os.unlink(args.adopt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
