"""System calls Python's os module lacks (renameat2, utimensat with UTIME_NOW, fallocate with
modes, linkat with AT_EMPTY_PATH, unshare) and path helpers for fd-relative access; `compiled`,
the capture's hot paths in C (app/engine/_fuseread.c), or None when the install could not build
them."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat

RENAME_NOREPLACE = 1  # <linux/fs.h>: fail with EEXIST instead of replacing the new name
RENAME_EXCHANGE = 2  # <linux/fs.h>: swap the two names atomically
UTIME_NOW = (1 << 30) - 1  # <linux/stat.h>: set this time to the current time
UTIME_OMIT = (1 << 30) - 2  # <linux/stat.h>: leave this time as it is
AT_SYMLINK_NOFOLLOW = 0x100  # <fcntl.h>
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10  # <linux/falloc.h>
AT_EMPTY_PATH = 0x1000  # <fcntl.h>: the fd itself (linkat needs CAP_DAC_READ_SEARCH for it)
NOW = "now"  # a time given as "the current time" (UTIME_NOW)
LONG_PATH = 2048  # relative paths this long are walked in pieces: PATH_MAX is 4096 bytes, and
                  # /proc/self/fd/N/ prefixes need room too
DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC

try:  # built by the install step when it can be (a C compiler and Python's headers)
    from app.engine import _fuseread as compiled
except ImportError:
    compiled = None

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def release_free_memory() -> None:
    """glibc's malloc_trim(0): the heap's free pages go back to the kernel. A capture's first
    copy (hashes, batches) leaves a few MiB free in malloc's arenas that a worker otherwise
    keeps for as long as it runs, 100 workers at a time."""
    trim = getattr(_libc, "malloc_trim", None)  # (not glibc: nothing to do)
    if trim is not None:
        trim(0)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


def _raise(what) -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), None if what is None else os.fsdecode(what))


def renameat2(src_dir: int, src: bytes, dst_dir: int, dst: bytes, flags: int) -> None:
    """rename(2) with RENAME_EXCHANGE / RENAME_NOREPLACE; plain rename when flags is 0."""
    if not flags:
        os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
        return
    if _libc.renameat2(src_dir, src, dst_dir, dst, flags) != 0:
        _raise(src)


STATX_SIZE = 256  # sizeof(struct statx)


def statx(dir_fd: int, name: bytes | None, mask: int) -> bytearray:
    """statx(2) without following a symlink: the raw struct statx (os has no statx). With name
    None, of the open file dir_fd itself."""
    buf = ctypes.create_string_buffer(STATX_SIZE)
    flags = AT_SYMLINK_NOFOLLOW | (AT_EMPTY_PATH if name is None else 0)
    if _libc.statx(dir_fd, b"" if name is None else name, flags, mask, buf) != 0:
        _raise(name)
    return bytearray(buf.raw)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its modes (os.posix_fallocate has none)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        _raise(None)


def linkat_fd(fd: int, dir_fd: int, name: bytes) -> None:
    """Give the open file fd (an O_TMPFILE file) the name `name` in dir_fd."""
    if _libc.linkat(fd, b"", dir_fd, name, AT_EMPTY_PATH) != 0:
        _raise(name)


CLONE_FS = 0x200  # <sched.h>: cwd, root and umask


def unshare_fs() -> None:
    """Give the calling thread its own umask (and cwd): os.umask() in it then leaves the other
    threads of the process alone."""
    if _libc.unshare(CLONE_FS) != 0:
        _raise(None)


@contextlib.contextmanager
def umask(mask: int):
    """The caller's umask for a creation, so the lower file system applies it, or a directory's
    default ACL instead, exactly as it would for the caller (this thread only: unshare_fs)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _timespec(t) -> tuple[int, int]:
    if t is None:
        return 0, UTIME_OMIT
    if t == NOW:
        return 0, UTIME_NOW
    return divmod(t, 1_000_000_000)


def utimensat(dir_fd: int, name: bytes | None, atime, mtime) -> None:
    """utimensat(2) without following a symlink; each time in ns, NOW or None (left as it
    is). With name None, the times of the open file dir_fd itself (futimens)."""
    times = (_Timespec * 2)(_Timespec(*_timespec(atime)), _Timespec(*_timespec(mtime)))
    if _libc.utimensat(dir_fd, name, times, 0 if name is None else AT_SYMLINK_NOFOLLOW) != 0:
        _raise(name)


def stat_at(dir_fd: int, name: bytes | None) -> os.stat_result:
    """lstat of `name` below dir_fd; with name None, fstat of the open file dir_fd itself (as
    utimensat takes them)."""
    return os.fstat(dir_fd) if name is None else os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def chmod_at(dir_fd: int, name: bytes | None, mode: int) -> None:
    """chmod of `name` below dir_fd, or of the open file dir_fd itself (name None)."""
    if name is None:
        os.fchmod(dir_fd, mode)
    else:
        os.chmod(name, mode, dir_fd=dir_fd)


SYS_FCHMODAT2 = 452  # Linux 6.6, the same number on every architecture (the unified table)
_fchmodat2 = [True]  # False once the kernel said ENOSYS: the O_PATH way from then on


def chmod_nofollow(dir_fd: int, name: bytes, mode: int) -> None:
    """chmod of `name` below dir_fd itself, never of what a symlink there points to (Linux gives
    symlinks no mode of their own, and chmod(2) would follow one out of the replica): nothing
    is done to a symlink. One fchmodat2(AT_SYMLINK_NOFOLLOW) call; before Linux 6.6 an O_PATH
    open, an fstat and a chmod through /proc (what glibc's fchmodat does): 9.8 -> 3.4 us here,
    and one GIL release instead of four in an applier that shares the GIL with a capture."""
    if _fchmodat2[0]:
        if _libc.syscall(SYS_FCHMODAT2, dir_fd, name, mode, AT_SYMLINK_NOFOLLOW) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            _fchmodat2[0] = False
        elif err in (errno.EOPNOTSUPP, errno.ENOTSUP) and \
                stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            return
        elif err != errno.EPERM:  # (a seccomp filter may say EPERM to a call it does not know)
            raise OSError(err, os.strerror(err), os.fsdecode(name))
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            return
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def chmod_nofollow_compiled() -> bool:
    """Whether chmod_nofollow is one fchmodat2 call here (the kernel has it), as a compiled
    caller makes it."""
    return _fchmodat2[0]


def chown_at(dir_fd: int, name: bytes | None, uid: int, gid: int) -> None:
    """lchown of `name` below dir_fd, or fchown of the open file dir_fd itself (name None)."""
    if name is None:
        os.fchown(dir_fd, uid, gid)
    else:
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def open_dir(dir_fd: int, rel: bytes) -> int:
    """An O_PATH fd of the directory `rel` below dir_fd, however deep: opened in pieces, each
    shorter than LONG_PATH, each relative to the last."""
    fd, piece = dir_fd, []
    try:
        for name in rel.split(b"/"):
            if piece and sum(len(p) + 1 for p in piece) + len(name) >= LONG_PATH:
                fd = _step(fd, dir_fd, b"/".join(piece))
                piece = []
            piece.append(name)
        return _step(fd, dir_fd, b"/".join(piece)) if piece else os.dup(fd)
    except BaseException:
        if fd != dir_fd:
            os.close(fd)
        raise


def _step(fd: int, base: int, piece: bytes) -> int:
    nxt = os.open(piece, DIR_PATH, dir_fd=fd)
    if fd != base:
        os.close(fd)
    return nxt


@contextlib.contextmanager
def beneath(dir_fd: int, rel: bytes):
    """(fd, name) for an *at() call on `rel` below dir_fd (b"" is dir_fd itself, as "."),
    however long `rel` is: a short path goes as it is, a long one's parent is opened in pieces."""
    if len(rel) < LONG_PATH:
        yield dir_fd, rel or b"."
        return
    head, _, name = rel.rpartition(b"/")
    fd = open_dir(dir_fd, head)
    try:
        yield fd, name
    finally:
        os.close(fd)


def at(rel: bytes) -> bytes:
    """The name to hand an *at() call for an entry-relative path (b"." for the entry itself)."""
    return rel or b"."


def proc_path(dir_fd: int, rel: bytes) -> bytes:
    """A path through /proc/self/fd for calls without dir_fd (xattrs). The trailing slash on the
    bare fd makes the kernel follow the magic link to the directory, not act on the link."""
    base = b"/proc/self/fd/%d/" % dir_fd
    return base + rel if rel else base


def enoent_ok(exc: OSError) -> bool:
    return exc.errno == errno.ENOENT


def safe_relpath(text: str) -> bytes:
    """A path a remote source may name beneath a replica root: relative, no `..`, no `.`
    components, no NUL. Raises ValueError otherwise."""
    raw = os.fsencode(text)
    if not raw or raw.startswith(b"/") or b"\0" in raw:
        raise ValueError(f"not a relative path: {text!r}")
    parts = raw.split(b"/")
    if any(p in (b"", b".", b"..") for p in parts):
        raise ValueError(f"path escapes or is not normal: {text!r}")
    return raw


def open_beneath(dir_fd: int, rel: bytes, flags: int = os.O_PATH | os.O_DIRECTORY, *,
                 make_dirs: bool = False, mode: int = 0o700) -> int:
    """Open `rel` below `dir_fd` one component at a time, never following a symlink (an
    intermediate symlink is ENOTDIR, the last one ELOOP unless flags ask for O_PATH): what a
    remote source writes cannot leave the replica root. `make_dirs` creates missing
    directories (the last one too when `flags` ask for a directory)."""
    parts = safe_relpath(os.fsdecode(rel)).split(b"/") if rel else []
    cur = os.dup(dir_fd)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if last:
                try:
                    nxt = os.open(part, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=cur)
                except FileNotFoundError:
                    if not (make_dirs and flags & os.O_DIRECTORY):
                        raise
                    os.mkdir(part, mode, dir_fd=cur)
                    nxt = os.open(part, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            else:
                try:
                    nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
                except FileNotFoundError:
                    if not make_dirs:
                        raise
                    os.mkdir(part, mode, dir_fd=cur)
                    nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            os.close(cur)
            cur = nxt
        return cur
    except BaseException:
        os.close(cur)
        raise
