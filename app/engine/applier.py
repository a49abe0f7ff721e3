"""Replays journal records, in order, onto a local target: a directory (FsApplier) or a file
or block device (BlockApplier). Used by local targets and by the remote agent alike.

Replay must converge when a record is applied twice (after a crash the durable position may
lag what was done): a write at an offset is idempotent; creates tolerate an existing name;
removals tolerate a missing one; a rename whose source is gone but whose destination exists is
taken as already done. Whoever applies calls `sync()` before saying the records are durable.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import stat

from app.engine.journal import Record, decode_path
from app.engine.lowlevel import RENAME_EXCHANGE, _libc, at, proc_path, renameat2

log = logging.getLogger("mirrorsetup.applier")
FD_CACHE = 64  # open target files kept between writes (sequential writes come in 128 KiB+ pieces)


def _syncfs(fd: int) -> None:
    """Make the target's writes durable before the applied seq says they are done."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "target")


class FsApplier:
    """Applies file-system records to a target directory reached through `target_fd` (O_PATH)."""

    def __init__(self, target_fd: int):
        self.tfd = target_fd
        # syncfs(2) needs a real open file, not the O_PATH fd the *at() calls use
        self._sync_fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=target_fd)
        self._fds: dict[bytes, int] = {}

    def close(self) -> None:
        self._close_fds()
        os.close(self._sync_fd)

    def sync(self) -> None:
        """Make everything applied so far durable on the target's file system."""
        _syncfs(self._sync_fd)

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
            fd = os.open(at(path), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.tfd)
            self._fds[path] = fd
        return fd

    def apply(self, rec: Record) -> None:
        a = rec.args
        op = rec.op
        path = decode_path(a["path"]) if "path" in a else b""
        t = self.tfd
        if op == "write":
            os.pwrite(self._fd(path), rec.data, a["offset"])
        elif op == "truncate":
            os.ftruncate(self._fd(path), a["size"])
        elif op == "times":
            atime = a["atime"]
            if atime is None:
                atime = os.stat(at(path), dir_fd=t, follow_symlinks=False).st_atime_ns
            os.utime(at(path), ns=(atime, a["mtime"]), dir_fd=t, follow_symlinks=False)
        elif op == "create":
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, a["mode"], dir_fd=t)
            except FileExistsError:  # replayed: start the file again, later records refill it
                fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=t)
            try:
                os.fchmod(fd, a["mode"])
                os.fchown(fd, a["uid"], a["gid"])
            finally:
                os.close(fd)
        elif op == "mkdir":
            try:
                os.mkdir(path, a["mode"], dir_fd=t)
            except FileExistsError:
                pass
            os.chmod(path, a["mode"], dir_fd=t)
            os.chown(path, a["uid"], a["gid"], dir_fd=t, follow_symlinks=False)
        elif op == "mknod":
            self._replace_missing(path, lambda: os.mknod(path, a["mode"], a["rdev"], dir_fd=t))
            os.chown(path, a["uid"], a["gid"], dir_fd=t, follow_symlinks=False)
        elif op == "symlink":
            target = decode_path(a["target"])
            self._replace_missing(path, lambda: os.symlink(target, path, dir_fd=t))
            os.chown(path, a["uid"], a["gid"], dir_fd=t, follow_symlinks=False)
        elif op == "link":
            self._close_fds()
            src = decode_path(a["src"])
            try:
                os.link(src, path, src_dir_fd=t, dst_dir_fd=t, follow_symlinks=False)
            except FileExistsError:
                if not _same_file(t, src, path):
                    os.unlink(path, dir_fd=t)
                    os.link(src, path, src_dir_fd=t, dst_dir_fd=t, follow_symlinks=False)
        elif op == "unlink":
            self._close_fds(path)
            _missing_ok(lambda: os.unlink(path, dir_fd=t))
        elif op == "rmdir":
            self._close_fds()
            _missing_ok(lambda: os.rmdir(path, dir_fd=t))
        elif op == "rename":
            self._rename(decode_path(a["old"]), decode_path(a["new"]), a["flags"])
        elif op == "chmod":
            os.chmod(at(path), a["mode"], dir_fd=t)
        elif op == "chown":
            os.chown(at(path), a["uid"], a["gid"], dir_fd=t, follow_symlinks=False)
        elif op == "setxattr":
            os.setxattr(proc_path(t, path), decode_path(a["name"]), rec.data, follow_symlinks=False)
        elif op == "remove":  # a resync's removal of what the source no longer has, whole trees too
            self._close_fds()
            _missing_ok(lambda: _remove_tree(t, path))
        elif op == "prune":  # a resync's directory listing: what is not in `keep` goes
            self._close_fds()
            self._prune(path, {decode_path(n) for n in a["keep"]})
        elif op == "removexattr":
            try:
                os.removexattr(proc_path(t, path), decode_path(a["name"]), follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
        else:
            raise OSError(errno.EINVAL, f"unknown journal op {op!r}")

    def _rename(self, old: bytes, new: bytes, flags: int) -> None:
        self._close_fds()
        t = self.tfd
        try:
            # NOREPLACE was checked at the source; at the target the name may exist from replay
            renameat2(t, old, t, new, flags & RENAME_EXCHANGE)
        except FileNotFoundError:
            if not os.path.lexists(proc_path(t, new)):
                raise  # neither name: a real divergence, counted and fixed by a difference mirror

    def _prune(self, path: bytes, keep: set[bytes]) -> None:
        try:
            fd = os.open(at(path), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self.tfd)
        except (FileNotFoundError, NotADirectoryError):
            return  # replayed after the directory went: nothing to prune
        try:
            names = [os.fsencode(n) for n in os.listdir(fd)]
        finally:
            os.close(fd)
        for name in names:
            if name not in keep:
                _missing_ok(lambda: _remove_tree(self.tfd, name if not path else path + b"/" + name))

    def _replace_missing(self, path: bytes, make) -> None:
        try:
            make()
        except FileExistsError:
            os.unlink(path, dir_fd=self.tfd)
            make()


def _missing_ok(fn) -> None:
    try:
        fn()
    except FileNotFoundError:
        pass


def _same_file(dir_fd: int, a: bytes, b: bytes) -> bool:
    sa = os.stat(a, dir_fd=dir_fd, follow_symlinks=False)
    sb = os.stat(b, dir_fd=dir_fd, follow_symlinks=False)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class BlockApplier:
    """Applies block writes to a target file or device at the same window offsets."""

    def __init__(self, fd: int):
        self.fd = fd

    def apply(self, rec: Record) -> None:
        if rec.op == "write":
            os.pwrite(self.fd, rec.data, rec.args["offset"])
        elif rec.op == "zero":  # a run of zeros sent as its length (the wire's zero range)
            offset, length = rec.args["offset"], rec.args["length"]
            zeros = bytes(min(length, 1 << 20))
            done = 0
            while done < length:
                done += os.pwrite(self.fd, zeros[:length - done], offset + done)
        else:
            raise OSError(errno.EINVAL, f"unknown block journal op {rec.op!r}")

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        pass


def _remove_tree(dir_fd: int, rel: bytes) -> None:
    st = os.stat(rel, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(proc_path(dir_fd, rel))
    else:
        os.unlink(rel, dir_fd=dir_fd)
