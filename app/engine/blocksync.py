"""Whole-device work between a block entry's window and its target: reconcile and verify.

The window is `size` bytes of the source starting at `offset`; the target holds the same bytes
from its own byte 0. Both are compared in BLOCK pieces by sha256 (over the wire for a remote
target: only hashes cross it); a block that differs is sent whole as an ordinary `write`
record. While capture goes on, each block's record is committed atomically with a check that
no write reached that block since it was read (the capture's per-block write generation), so
the target ends equal to the device however applications write meanwhile: a block record at
position t states the block as it is at t, records after it are later writes. (A target block
equal to the source at t needs nothing even if older records for it are still on their way:
replaying them leaves each byte at its last written value, which is the source's.)
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from app.engine.sync import BLOCK, pread_uncached

CHUNK = 64  # blocks whose target hashes are asked for at once
COMMIT_TRIES = 4
Progress = Callable[[dict], None]


def nblocks(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK


def ranges(blocks: Iterable[int], size: int) -> list[list[int]]:
    """Merge block numbers into [start, end) byte ranges of the window."""
    out: list[list[int]] = []
    for b in sorted(blocks):
        start, end = b * BLOCK, min((b + 1) * BLOCK, size)
        if out and out[-1][1] == start:
            out[-1][1] = end
        else:
            out.append([start, end])
    return out


def _progress(stage: str, done: int, total: int, size: int, sent: int) -> dict:
    """Progress in bytes of the window (what a progress bar shows) and blocks (status)."""
    part = size if total == 0 or done >= total else min(size, done * BLOCK)
    return {"stage": stage, "done": done, "total_blocks": total, "bytes": part, "total": size,
            "copied": sent}


def read_block(fd: int, offset: int, size: int, b: int) -> bytes:
    length = min(BLOCK, size - b * BLOCK)
    data = pread_uncached(fd, length, offset + b * BLOCK)
    if len(data) != length:  # the device ends inside the window: it shrank under its capture
        raise OSError(errno.EIO, f"the device ends at byte {offset + b * BLOCK + len(data)}, "
                                 f"inside the window (bytes {offset}-{offset + size - 1}): it "
                                 "shrank since its capture started")
    return data


def reconcile(src_fd: int, offset: int, size: int, target, commit, *, scope: Iterable[int] | None = None,
              compare: bool = True, progress: Progress | None = None, gen=None,
              frozen=None) -> dict:
    """Make the target's blocks equal to the source's. `commit(block, data, gen)` appends (or
    applies) a write of the whole block and returns False when the block changed since `gen`
    (then it is read again). `compare=False` sends every block (a full mirror onto a target
    that cannot be read). `scope` limits the work to those blocks (a dirty map)."""
    todo = list(range(nblocks(size))) if scope is None else sorted(set(scope))
    total = len(todo)
    sent = differing = done = 0
    parts = [todo[i:i + CHUNK] for i in range(0, total, CHUNK)]
    hashes = _target_hashes(target, parts) if compare else iter([None] * len(p) for p in parts)
    try:
        for part, theirs in zip(parts, hashes):
            for b, their in zip(part, theirs):
                for _ in range(COMMIT_TRIES):
                    g = gen(b) if gen else 0
                    data = read_block(src_fd, offset, size, b)
                    if their is not None and hashlib.sha256(data).hexdigest() == their:
                        break
                    if commit(b, data, g):
                        sent += len(data)
                        differing += 1
                        break
                else:
                    with frozen():
                        commit(b, read_block(src_fd, offset, size, b), None)
                        sent += min(BLOCK, size - b * BLOCK)
                        differing += 1
                done += 1
                if progress and (done % 64 == 0 or done == total):
                    progress(_progress("copying", done, total, size, sent))
    finally:
        if compare:
            hashes.close()  # waits for a chunk still being hashed there
    if progress and not total:
        progress(_progress("copying", 0, 0, size, 0))
    return {"blocks": total, "differing": differing, "copied_bytes": sent}


def _target_hashes(target, parts: list[list[int]]):
    """Each part's target hashes, in order. The next part's are asked for (a local target:
    hashed) while the caller compares this one: the two sides' hashing, and a remote target's
    round trip, were one after the other. Hashes from any moment after the reconcile began are
    as good as later ones: a block equal to the source then needs nothing (see above)."""
    with ThreadPoolExecutor(1, thread_name_prefix="target-hashes") as pool:
        nxt = pool.submit(target.block_hashes_of, parts[0]) if parts else None
        for k in range(len(parts)):
            got = nxt.result()
            if k + 1 < len(parts):
                nxt = pool.submit(target.block_hashes_of, parts[k + 1])
            yield got


def verify(src_fd: int, offset: int, size: int, target, *, progress: Progress | None = None,
           gen=None, wait_target=None) -> dict:
    """Compare every block; blocks written meanwhile are checked again (up to three rounds)
    once the target has caught up with them. Returns counts and the differing byte ranges."""
    todo = list(range(nblocks(size)))
    total = len(todo)
    differing: list[int] = []
    for attempt in range(3):
        changed: list[int] = []
        done = 0

        def compare(part, gens, ours, theirs) -> None:
            nonlocal done
            for b, g, mine, their in zip(part, gens, ours, theirs):
                if mine == their:
                    continue
                if gen and gen(b) != g:
                    changed.append(b)  # written meanwhile: compare again
                else:
                    differing.append(b)
            done += len(part)
            if progress:
                progress(_progress("verifying", done if attempt == 0 else total, total, size, 0))
        # the target hashes a chunk (a remote one: is asked) while we hash the next one; each
        # chunk's own order stays: ours read, the target caught up with them, theirs asked
        with ThreadPoolExecutor(1, thread_name_prefix="target-hashes") as pool:
            waiting = None
            for i in range(0, len(todo), CHUNK):
                part = todo[i:i + CHUNK]
                gens = [gen(b) if gen else 0 for b in part]
                ours = [hashlib.sha256(read_block(src_fd, offset, size, b)).hexdigest() for b in part]
                if wait_target is not None:
                    wait_target()  # the target has applied every write captured so far
                asked = pool.submit(target.block_hashes_of, part)
                if waiting is not None:
                    compare(*waiting[:3], waiting[3].result())
                waiting = (part, gens, ours, asked)
            if waiting is not None:
                compare(*waiting[:3], waiting[3].result())
        if not changed:
            break
        todo = changed
    else:
        differing += changed  # kept changing: said as differing, never as equal
    return {"blocks": total, "differing": len(differing), "copied_bytes": 0,
            "ranges": ranges(differing, size)}
