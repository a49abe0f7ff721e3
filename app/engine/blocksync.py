"""Whole-device work between a block entry's window and its target: mirror, resync, verify.

The window is `size` bytes of the source starting at `offset`; the target holds the same bytes
from its own byte 0. Both sides are compared block by block (BLOCK bytes) by sha256, the way a
remote target would be compared; a resync copies only the blocks whose hashes differ, a full
mirror copies every block. Nothing outside the window is read or written.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable

BLOCK = 1 << 20
Progress = Callable[[int, int], None]  # (bytes done, bytes of the window)


def _read(fd: int, length: int, at: int, what: str) -> bytes:
    data = os.pread(fd, length, at)
    if len(data) != length:
        raise OSError(errno.EIO, f"short read of {what} at byte {at} ({len(data)} of {length})")
    return data


def _blocks(size: int):
    for start in range(0, size, BLOCK):
        yield start, min(BLOCK, size - start)


def _ranges(starts: list[tuple[int, int]]) -> list[list[int]]:
    """Merge adjacent (start, length) blocks into [start, end) byte ranges."""
    out: list[list[int]] = []
    for start, length in starts:
        if out and out[-1][1] == start:
            out[-1][1] = start + length
        else:
            out.append([start, start + length])
    return out


def compare(src_fd: int, offset: int, size: int, dst_fd: int, *, copy: str = "none",
            progress: Progress | None = None) -> dict:
    """Walk the window; copy="none" only compares, "diff" copies differing blocks, "all" copies
    every block. Returns {"blocks", "differing", "copied_bytes", "ranges"} (target offsets)."""
    differing: list[tuple[int, int]] = []
    copied = 0
    for start, length in _blocks(size):
        src = _read(src_fd, length, offset + start, "the source")
        if copy == "all":
            os.pwrite(dst_fd, src, start)
            copied += length
        else:
            dst = _read(dst_fd, length, start, "the target")
            if hashlib.sha256(src).digest() != hashlib.sha256(dst).digest():
                differing.append((start, length))
                if copy == "diff":
                    os.pwrite(dst_fd, src, start)
                    copied += length
        if progress is not None and (start // BLOCK) % 64 == 0:
            progress(start + length, size)
    if copied:
        os.fdatasync(dst_fd)
    if progress is not None:
        progress(size, size)
    return {"blocks": (size + BLOCK - 1) // BLOCK, "differing": len(differing),
            "copied_bytes": copied, "ranges": _ranges(differing)}


def open_target(path: str, size: int, *, create: bool = True) -> int:
    """Open (creating a sparse file of `size` when missing) a target of at least `size` bytes."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        st = os.fstat(fd)
        have = os.lseek(fd, 0, os.SEEK_END)
        if have < size:
            if st.st_rdev:
                raise OSError(errno.ENOSPC, f"target {path} holds {have} bytes; the window is {size}")
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd
