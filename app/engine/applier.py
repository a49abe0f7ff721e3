"""The applier: replays journal records, in order, onto the entry's target directory.

Replay must converge when a record is applied twice (after a crash the applied seq on disk may
lag what was done): a write at an offset is idempotent; creates tolerate an existing name;
removals tolerate a missing one; a rename whose source is gone but whose destination exists is
taken as already done. Records carry entry-relative paths of any length: a long one's
directories are opened piece by piece (lowlevel.beneath), below PATH_MAX each. The applied seq is written durably (after syncfs of the target) at most
every PERSIST_SECONDS and whenever the applier catches up.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
import time

from app.engine.journal import Journal, Record, decode_path
from app.engine.lowlevel import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE,
                                 RENAME_EXCHANGE, _libc, beneath, fallocate, linkat_fd, proc_path,
                                 renameat2)

log = logging.getLogger("mirrorsetup.applier")
PERSIST_SECONDS = 1.0  # how far the durable applied seq may trail; replay is idempotent
BATCH = 512
FD_CACHE = 64  # open target files kept between writes (sequential writes come in 128 KiB+ pieces)
ZERO_CHUNK = 1 << 20
FILE_OPS = {"write", "truncate", "fallocate"}  # records about a regular file's data
NODE_OPS = {"times", "chmod", "chown", "setxattr", "removexattr"}  # about any node



def _syncfs(fd: int) -> None:
    """Make the target's writes durable before the applied seq says they are done."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "target")


class Applier:
    def __init__(self, journal: Journal, target_fd: int | None):
        """With no target the records are only counted and released, in order."""
        self.journal = journal
        self.tfd = target_fd
        # syncfs(2) needs a real open file, not the O_PATH fd the *at() calls use
        self._sync_fd = None if target_fd is None else os.open(
            b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=target_fd)
        self._fds: dict[bytes, int] = {}
        self._tmp: dict[int, int] = {}  # O_TMPFILE files at the target, by their record's seq
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0
        self.last_error: str | None = None
        self._last_persist = time.monotonic()
        self._persisted_seq: int | None = None

    # -- thread -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="applier", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._close_fds()
        for fd in self._tmp.values():
            os.close(fd)
        self._tmp.clear()

    def pause(self) -> None:
        """Hold the applier between batches (a mirror writes the target meanwhile)."""
        self._idle.clear()
        self._paused.set()
        while self._thread is not None and self._thread.is_alive() and not self._idle.wait(0.05):
            pass
        self._close_fds()

    def resume(self) -> None:
        self._paused.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._paused.is_set():
                self._idle.set()
                time.sleep(0.02)
                continue
            batch = self.journal.take(BATCH, timeout=0.1)
            if not batch:
                if self.journal.applied_seq == self.journal.last_seq != self._persisted_seq and \
                        time.monotonic() - self._last_persist > PERSIST_SECONDS / 4:
                    self.persist()  # caught up: make it durable once, not again while idle
                continue
            self.apply_batch(batch)

    def apply_batch(self, batch: list[Record]) -> None:
        for rec in batch:
            try:
                self.apply(rec)
            except OSError as exc:
                self.errors += 1
                self.last_error = f"seq {rec.seq} {rec.op} {rec.args.get('path')}: {exc}"
                log.warning("apply %s", self.last_error)
        persist = time.monotonic() - self._last_persist > PERSIST_SECONDS
        self.journal.applied(batch[-1].seq, sum(r.size for r in batch))
        if persist:
            self.persist()

    def persist(self) -> None:
        if self._sync_fd is not None:
            _syncfs(self._sync_fd)
        self._persisted()

    def _persisted(self) -> None:
        """Record the applied seq durably (after the target's data is) and note when."""
        self.journal.persist_applied()
        self._persisted_seq = self.journal.applied_seq
        self._last_persist = time.monotonic()

    def drain(self) -> None:
        """Apply everything queued now, on the caller's thread (used at stop)."""
        while True:
            batch = self.journal.take(BATCH)
            if not batch:
                break
            self.apply_batch(batch)

    # -- records ----------------------------------------------------------------------------
    def _close_fds(self, path: bytes | None = None) -> None:
        for p in list(self._fds) if path is None else [path]:
            fd = self._fds.pop(p, None)
            if fd is not None:
                os.close(fd)

    def _fd(self, path: bytes) -> int:
        fd = self._fds.get(path)
        if fd is None:
            if len(self._fds) >= FD_CACHE:
                self._close_fds()
            with beneath(self.tfd, path) as (d, name):
                fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
            self._fds[path] = fd
        return fd

    def _tmp_fd(self, seq: int) -> int:
        fd = self._tmp.get(seq)
        if fd is None:
            raise OSError(errno.EBADF, f"O_TMPFILE file of record {seq} is not open at the target")
        return fd

    def apply(self, rec: Record) -> None:
        if self.tfd is None:
            return
        a = rec.args
        op = rec.op
        path = decode_path(a["path"]) if "path" in a else b""
        if op in FILE_OPS:  # about a regular file's data: through a cached open fd
            _apply_fd(op, a, rec.data, self._tmp_fd(a["tmp"]) if "tmp" in a else self._fd(path))
        elif "tmp" in a and op in NODE_OPS:
            _apply_fd(op, a, rec.data, self._tmp_fd(a["tmp"]))
        elif op == "tmpfile":
            with beneath(self.tfd, path) as (d, name):
                fd = os.open(name, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, a["mode"], dir_fd=d)
            self._tmp[rec.seq] = fd
            os.fchown(fd, a["uid"], a["gid"])
            os.fchmod(fd, a["mode"])  # after the chown, which clears set-ID bits
        elif op == "tmpclose":
            fd = self._tmp.pop(a["tmp"], None)
            if fd is not None:
                os.close(fd)
        elif op == "link":
            self._close_fds()
            self._link(a, path)
        elif op == "rename":
            self._rename(decode_path(a["old"]), decode_path(a["new"]), a["flags"])
        else:
            with beneath(self.tfd, path) as (d, name):
                self._apply_at(op, a, rec.data, d, name, path)

    def _apply_at(self, op: str, a: dict, data: bytes, d: int, name: bytes, path: bytes) -> None:
        """A record about one name: `name` in the target directory `d`."""
        if op == "times":
            atime = a["atime"]
            if atime is None:
                atime = os.stat(name, dir_fd=d, follow_symlinks=False).st_atime_ns
            os.utime(name, ns=(atime, a["mtime"]), dir_fd=d, follow_symlinks=False)
        elif op == "create":
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, a["mode"], dir_fd=d)
            except FileExistsError:  # replayed: start the file again, later records refill it
                fd = os.open(name, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
            try:
                os.fchown(fd, a["uid"], a["gid"])
                os.fchmod(fd, a["mode"])  # after the chown, which clears set-ID bits
            finally:
                os.close(fd)
        elif op == "mkdir":
            try:
                os.mkdir(name, a["mode"], dir_fd=d)
            except FileExistsError:
                pass
            os.chmod(name, a["mode"], dir_fd=d)
            os.chown(name, a["uid"], a["gid"], dir_fd=d, follow_symlinks=False)
        elif op == "mknod":
            _replace_missing(d, name, lambda: os.mknod(name, a["mode"], a["rdev"], dir_fd=d))
            os.chown(name, a["uid"], a["gid"], dir_fd=d, follow_symlinks=False)
            if a["mode"] & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(name, stat.S_IMODE(a["mode"]), dir_fd=d)
        elif op == "symlink":
            target = decode_path(a["target"])
            _replace_missing(d, name, lambda: os.symlink(target, name, dir_fd=d))
            os.chown(name, a["uid"], a["gid"], dir_fd=d, follow_symlinks=False)
        elif op == "unlink":
            self._close_fds(path)
            _missing_ok(lambda: os.unlink(name, dir_fd=d))
        elif op == "rmdir":
            self._close_fds()
            _missing_ok(lambda: os.rmdir(name, dir_fd=d))
        elif op == "chmod":
            os.chmod(name, a["mode"], dir_fd=d)
        elif op == "chown":
            os.chown(name, a["uid"], a["gid"], dir_fd=d, follow_symlinks=False)
        elif op == "setxattr":
            os.setxattr(proc_path(d, name), decode_path(a["name"]), data, follow_symlinks=False)
        elif op == "removexattr":
            try:
                os.removexattr(proc_path(d, name), decode_path(a["name"]), follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
        else:
            raise OSError(errno.EINVAL, f"unknown journal op {op!r}")

    def _link(self, a: dict, path: bytes) -> None:
        """A new name: for a name, or for an O_TMPFILE file (its first, from its open fd)."""
        with beneath(self.tfd, path) as (d, name):
            if "tmp" in a:
                fd = self._tmp_fd(a["tmp"])
                try:
                    linkat_fd(fd, d, name)
                except FileExistsError:
                    if os.fstat(fd).st_ino != os.stat(name, dir_fd=d, follow_symlinks=False).st_ino:
                        os.unlink(name, dir_fd=d)
                        linkat_fd(fd, d, name)
                os.close(self._tmp.pop(a["tmp"]))  # named now: later records use its path
                return
            with beneath(self.tfd, decode_path(a["src"])) as (sd, sname):
                try:
                    os.link(sname, name, src_dir_fd=sd, dst_dir_fd=d, follow_symlinks=False)
                except FileExistsError:
                    if not _same_file(sd, sname, d, name):
                        os.unlink(name, dir_fd=d)
                        os.link(sname, name, src_dir_fd=sd, dst_dir_fd=d, follow_symlinks=False)

    def _rename(self, old: bytes, new: bytes, flags: int) -> None:
        self._close_fds()
        with beneath(self.tfd, old) as (od, oname), beneath(self.tfd, new) as (nd, nname):
            try:
                # NOREPLACE was checked at the source; at the target the name may exist from replay
                renameat2(od, oname, nd, nname, flags & RENAME_EXCHANGE)
            except FileNotFoundError:
                if not os.path.lexists(proc_path(nd, nname)):
                    raise  # neither name: a real divergence, counted and fixed by a difference mirror


def _apply_fd(op: str, a: dict, data: bytes, fd: int) -> None:
    """A record about an open file at the target (by path through the fd cache, or an
    O_TMPFILE file that has no name yet)."""
    if op == "write":
        os.pwrite(fd, data, a["offset"])
    elif op == "truncate":
        os.ftruncate(fd, a["size"])
    elif op == "fallocate":
        _fallocate(fd, a["mode"], a["offset"], a["length"])
    elif op == "times":
        atime = os.fstat(fd).st_atime_ns if a["atime"] is None else a["atime"]
        os.utime(fd, ns=(atime, a["mtime"]))
    elif op == "chmod":
        os.fchmod(fd, a["mode"])
    elif op == "chown":
        os.fchown(fd, a["uid"], a["gid"])
    elif op == "setxattr":
        os.setxattr(fd, decode_path(a["name"]), data)
    elif op == "removexattr":
        try:
            os.removexattr(fd, decode_path(a["name"]))
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) as the source did; a target file system that cannot gets the same bytes:
    zeros written over a punched or zeroed range, the size extended by an allocation."""
    try:
        fallocate(fd, mode, offset, length)
        return
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
    size, end = os.fstat(fd).st_size, offset + length
    if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
        stop = min(end, size) if mode & FALLOC_FL_KEEP_SIZE else end
        zeros = bytes(min(ZERO_CHUNK, max(stop - offset, 0)))
        for at_ in range(offset, stop, ZERO_CHUNK):
            os.pwrite(fd, zeros[:stop - at_], at_)
    elif not mode & FALLOC_FL_KEEP_SIZE and end > size:
        os.ftruncate(fd, end)


def _replace_missing(d: int, name: bytes, make) -> None:
    try:
        make()
    except FileExistsError:
        os.unlink(name, dir_fd=d)
        make()


def _missing_ok(fn) -> None:
    try:
        fn()
    except FileNotFoundError:
        pass


def _same_file(da: int, a: bytes, db: int, b: bytes) -> bool:
    sa = os.stat(a, dir_fd=da, follow_symlinks=False)
    sb = os.stat(b, dir_fd=db, follow_symlinks=False)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
