"""System calls Python's os module lacks (renameat2) and path helpers for fd-relative access."""

from __future__ import annotations

import ctypes
import errno
import os

RENAME_NOREPLACE = 1  # <linux/fs.h>: fail with EEXIST instead of replacing the new name
RENAME_EXCHANGE = 2  # <linux/fs.h>: swap the two names atomically
UTIME_OMIT = (1 << 30) - 2  # <linux/stat.h>: leave this time as it is

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def renameat2(src_dir: int, src: bytes, dst_dir: int, dst: bytes, flags: int) -> None:
    """rename(2) with RENAME_EXCHANGE / RENAME_NOREPLACE; plain rename when flags is 0."""
    if not flags:
        os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
        return
    if _libc.renameat2(src_dir, src, dst_dir, dst, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(src))


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
