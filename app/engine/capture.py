"""One entry's capture process: a directory (mirrorfs) or a block device (blockfs) captured
into a journal, and the journal shipped to the entry's target.

Each captured entry is its own process (one entry's failure stays its own), started by the
daemon with one end of a socketpair (`python -m app.engine.capture --spec JSON --fd N`, forked
from the daemon's worker template). The process is self-sufficient: FUSE, journal, shipper and catching-up all live
here. It does not die with the daemon: on end of file from the daemon it goes on capturing and
waits on its take-over socket (RUN/KIND/ID.sock) for the next daemon, so applications never
see a daemon restart.

Capture is in place before the path or loop can be used again, always:
- A file-system entry's lower directory is reached through its door (RUN/fs/ID/lower, a bind
  of the directory made before mirrorfs first covered it). mirrorfs is mounted on a private
  staging point and moved over the entry's path: on top of the bare directory, or *beneath*
  a dead mirrorfs of ours (a worker that died) which is then lifted, so there is no moment in
  which the directory below answers.
- A fresh worker always catches up (the target may miss what changed while nothing captured):
  it mounts, says ready, and reconciles while capturing (sync.Reconciler / blocksync), status
  "catching up". A journal gap, a queue overflow (pull-ahead) or an unclean stop lead here too.
- The end of each capture is recorded (the `clean` marker: last seq, released seq, time) after
  the journal was drained; a stop that cannot unmount everywhere drains and marks first, then
  ends the FUSE connection and says who kept it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from app.services import layout, mounts, protocol
from app.services.results import MirrorError

log = logging.getLogger("mirrorsetup.capture")
PROFILE_ENV = "MIRRORSETUP_WORKER_PROFILE"
CLEAN_MARKER = layout.CLEAN_MARKER  # written at a capture's end, consumed at the next start
ENTRY_MARKER = "entry"  # which directory or device this journal belongs to
LOCK_FILE = "lock"  # flock: one capture per entry, whatever asks
STOP_DRAIN_SECONDS = 30  # a clean stop ships what is queued for at most this long
WAITING_FOR_TARGET = "waiting for the target"  # a catch-up's stage until the target answers
CATCH_UP_RETRY_SECONDS = 5  # a catch-up that lost its target tries again after this
EARLY_WALK_BYTES = 48 << 20  # a first copy journals at most this much before its target is known
BEHIND_RESUME_FRACTION = 0.5  # pull-ahead: resync once the queue is below this share of its limit
# The request loop answers an application that waits; the shipper's thread (a local target's
# applier, a remote one's compression) works beside it under the same GIL, and at Python's
# 5 ms switch interval the loop, back from a syscall, can wait that long for it. At 0.2 ms
# (bench/apps.py against the 5 ms code, 3 interleaved runs each): fio on a captured loop
# 4 KiB 160 vs 117 MB/s, 64 KiB 362 vs 266 (twice, every run above every run), the
# file-system workloads equal or better within the noise (tar x 0 to 13 %); 0.05 ms gained
# nothing more.
SWITCH_INTERVAL = 0.0002
FUSE_OPTIONS_FS = ("subtype=mirrorfs", "allow_other", "default_permissions")
FUSE_OPTIONS_BLOCK = ("subtype=mirrorblk", "default_permissions")


@dataclass
class Spec:
    kind: str  # "fs" | "block"
    key: str  # the entry's path or device
    state: str
    run: str
    adopt: str
    fsname: str
    target: dict | None  # {"local": PATH} (remote targets: {"remote": {...}})
    claim: dict
    atime: bool = False
    offset: int = 0
    sizelimit: int = 0
    read_only: bool = False
    queue_limit: int | None = None
    on_full: str = "pull-ahead"
    version: int = protocol.VERSION

    def to_arg(self) -> str:
        return json.dumps(asdict(self))


class Channel:
    """Blocking JSON-lines writer to the daemon (used before trio runs)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, msg: dict) -> None:
        self.sock.sendall(protocol.encode(msg))


class Refused(Exception):
    """Why this capture cannot start; said to the daemon as the worker's error event."""

    def __init__(self, message: str, err: int | None = None):
        super().__init__(message)
        self.errno = err


# -- state directory ------------------------------------------------------------------------------

def open_state(spec: Spec) -> tuple[int, bool, dict | None]:
    """(lock fd, first start?, the previous capture's end or None when it did not end cleanly).
    The lock makes a second worker for the same entry fail at once, naming the first."""
    layout.private_dir(spec.state, "entry state directory")
    state = Path(spec.state)
    lock = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(lock, 32, 0).decode(errors="replace").strip() or "?"
        os.close(lock)
        raise Refused(f"{spec.key} is already captured by worker pid {holder}", errno.EBUSY) from None
    os.ftruncate(lock, 0)
    os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
    from app.engine.journal import read_small_file, write_small_file
    first = read_small_file(state, ENTRY_MARKER) is None
    if first:
        write_small_file(state, ENTRY_MARKER, spec.key + "\n")
    end = layout.capture_end(spec.state)  # the one reader (the daemon's too)
    if os.path.lexists(state / CLEAN_MARKER):
        if end is None:  # damaged (not a JSON object, a symbolic link): compared again
            log.warning("%s: its capture-end marker is no JSON object: taken as an unclean stop",
                        spec.key)
        os.unlink(state / CLEAN_MARKER)
    return lock, first, end


def check_identity(state: str, kind: str, key: str, now: dict[str, str], *,
                   failback: bool = False) -> None:
    """Raise OSError(EMEDIUMTYPE) when the entry's device (block) or the file system its
    directory lies on (fs) is not what was recorded for it (`now` against the record in its
    state directory, made when the entry was added). A device name can pass to another disk
    at a reboot, a loop number to another program's file; a directory's own file system may
    not have come up, leaving an empty directory below its mount point. A capture would make the replica a copy of that
    (the catch-up removes what the source lacks), a fail-back would write onto it (`failback`:
    the refusal says what to do then). An entry an older version added without a record gets
    it here, at its next capture."""
    from app.engine.journal import write_small_file
    from app.services.layout import (IDENTITY_RECORD, command, identity_changes, identity_record,
                                      identity_words_of)
    was = identity_record(state)
    if was is None:
        write_small_file(Path(state), IDENTITY_RECORD, json.dumps(now) + "\n")
        return
    changed = identity_changes(was, now)
    if not changed:
        if now.keys() - was.keys():  # a record of an older version: it takes what it lacked
            write_small_file(Path(state), IDENTITY_RECORD, json.dumps({**was, **now}) + "\n")
        return
    what, why, fix, right = identity_words_of(kind, was, now)
    accept = command(kind, "accept-device" if kind == "block" else "accept-filesystem", key)
    said = (f"{key} is not {'' if kind == 'block' else 'on '}the {what} this entry was made "
            f"for: {'; '.join(changed)} ({why}); ")
    if failback:
        raise OSError(errno.EMEDIUMTYPE, said + (
            f"nothing was written to it: {fix.rpartition(', then')[0]}, then fail back again. "
            f"If it is right now (a new {'disk' if kind == 'block' else 'file system'} in the "
            f"failed one's place), {accept} takes it as it is, and a fail-back then writes "
            "the replica's data onto it"), key)
    raise OSError(errno.EMEDIUMTYPE, said + (
        f"nothing was captured or written and its replica was not touched: {fix}. If it is "
        f"right now ({right}), {accept} takes it as it is (its replica is then made equal to "
        "it); else "
        f"{command(kind, 'remove', key)} leaves the replica as it is"), key)


def undo_open_state(spec: Spec, first: bool, end: dict | None) -> None:
    """What open_state changed, undone by a start refused before anything was captured."""
    from app.engine.journal import write_small_file
    with contextlib.suppress(OSError):
        if first:
            os.unlink(Path(spec.state) / ENTRY_MARKER)
        elif end is not None:
            write_small_file(Path(spec.state), CLEAN_MARKER, json.dumps(end) + "\n")


def write_end(state: str, info: dict) -> None:
    from app.engine.journal import write_small_file
    write_small_file(Path(state), CLEAN_MARKER, json.dumps(info) + "\n")


# -- targets ---------------------------------------------------------------------------------------

def make_target(spec: Spec, size: int | None = None, journal=None):
    from app.engine import target as targets
    if spec.target is None:
        return None
    claim = targets.Claim(spec.claim["entry"], spec.claim["host"], bool(spec.claim.get("adopt")))
    if "local" in spec.target:
        path = spec.target["local"]
        if spec.kind == "fs":
            return targets.LocalDirTarget(path, claim, Path(spec.state))
        return targets.LocalBlockTarget(path, size, claim, Path(spec.state))
    from app.engine import remote
    seqs = None if journal is None else (lambda: (journal.last_seq, journal.released_seq))
    return remote.RemoteTarget.from_spec(spec.target["remote"], spec.kind, size, claim,
                                         generation=generation(spec.state), journal_seqs=seqs)


def generation(state: str) -> str:
    """This entry's history as replicas know it: made at its first capture, kept for good."""
    import uuid

    from app.engine.journal import read_small_file, write_small_file
    text = read_small_file(Path(state), "generation")
    if text and text.strip():
        return text.strip()
    gen = uuid.uuid4().hex
    write_small_file(Path(state), "generation", gen + "\n")
    return gen


class _NotEmpty(Exception):
    """An early first copy's replica turned out to hold something: compare instead."""


class _NothingThereYet:
    """The replica as a first copy takes it before its session is up: empty. The walk asks it
    nothing more (every directory and file it then finds is new there)."""

    def info(self, rel: bytes):
        return None

    def children(self, rel: bytes):
        return None

    def file_hashes(self, rel: bytes):
        return None


class NoTarget:
    """An entry without a target: records are counted and released, nothing is written."""

    label = "(none)"

    def open(self):
        return None

    def send(self, records):
        return None

    def flush(self):
        return None

    def close(self):
        pass


# -- the worker ------------------------------------------------------------------------------------

def unavailable_reply(state: str) -> dict:
    """The daemon's answer to a mirror or verify the target cannot serve now (`state`, a
    TargetUnavailable's). Said as it is when it says why already ("cannot reach the target
    (...); try again once status says connected", "the target cannot take..."); a session lost
    while the request asked (a link that died under a block verify) gets the same words and
    next step: it said only "cannot reach the target (disconnected: ...)"."""
    said = state if state.startswith(("cannot", "the target")) else \
        f"cannot reach the target ({state}); try again once status says connected"
    return protocol.error(said, errno.ENOSPC if state.startswith("paused")
                          else errno.ETIMEDOUT if "within" in state else errno.ENOTCONN)


class Capture:
    def __init__(self, spec: Spec, chan: Channel):
        self.spec = spec
        self.chan = chan
        self.ops = None
        self.journal = None
        self.target = None
        self.shipper = None
        self.token = None
        self.catching: dict | None = None  # progress of a catch-up while it runs
        self.consistent = False
        self.resync_bytes = 0
        self.stop_requested = False
        self.abort_connection = False
        self.fuse_dev: tuple[int, int] | None = None
        # after a fail-over (_on_refused): True read-only, else why it could not be made so
        self.read_only_here: bool | str | None = None
        self.mount_point = ""
        self._catch_up_wake = None
        self._connected_wake = None  # a trio.Event while a catch-up waits for its target
        self._session_up = threading.Event()  # the same word, for the walk's thread
        self._early = False  # a first copy may walk before its session is up (start())
        self._dropped_through = 0  # the last seq dropped unsent for a catch-up (request_catch_up)
        self._early_verdict: bool | None = None  # and then: was the replica empty?
        self._early_walking = False
        self._trackers = 0
        self._held = False
        self._full_pending = True  # a fresh worker compares everything once
        self._dirty_scope: set[int] = set()  # block: what pull-ahead dropped, not yet resynced
        self._resync_tokens, self._resync_at = 0.0, time.monotonic()
        self.last_catch_up: dict | None = None
        self.raw_watch = None  # block: closes of the raw device by writers outside the loop
        self.raw_writes: dict | None = None  # {"count": n, "last": time} once there were any

    # -- start
    def start(self) -> dict:
        spec = self.spec
        if spec.kind == "fs":  # before anything is made: its journal through itself waits forever
            for what, own in (("journal", spec.state), ("run directory", spec.run)):
                if os.path.realpath(own).startswith(os.path.realpath(spec.key).rstrip("/") + "/"):
                    raise Refused(f"{spec.key} holds this capture's own {what} {own}: written "
                                  "through its own capture it would wait for itself; replicate "
                                  "the directories beside the state directory", errno.EINVAL)
        self.lock, first, end = open_state(spec)
        try:
            return self._start(first, end)
        except BaseException:
            if self.shipper is None:  # refused before capture began: the entry is left as it
                # was (a first start stays first, a clean end stays clean; it was then called
                # an "unclean previous stop" by the start after a refused one)
                undo_open_state(spec, first, end)
            raise

    def _start(self, first: bool, end: dict | None) -> dict:
        from app.engine.journal import KIND_BLOCK, KIND_FS, Journal
        spec = self.spec
        layout.private_dir(spec.run, "capture run directory")
        self.journal = Journal(spec.state, kind=KIND_FS if spec.kind == "fs" else KIND_BLOCK,
                               limit_bytes=spec.queue_limit, on_full=spec.on_full)
        if spec.kind == "block":
            self._setup_block()  # the window's size first: a block target is checked against it
        self.target = make_target(spec, getattr(self, "size", None), self.journal) or NoTarget()
        if hasattr(self.target, "settled"):  # a remote target's hello says it (a fail-over or
            # a split brain, when its replica was promoted meanwhile)
            self.target.settled = lambda: self.catching is None and self.consistent and \
                not self.journal.behind
        if "local" in (spec.target or {}) or spec.target is None:
            try:
                self.target.open()  # a local target is claimed before anything is mounted
            except (OSError, MirrorError) as exc:
                raise Refused(str(exc), getattr(exc, "errno", None)) from exc
        elif hasattr(self.target, "prepare"):
            self.target.prepare()  # a remote target: ssh and the agent start while we mount
        self._catch_up_scope(None)  # a fresh worker catches up once (catch_up_loop)
        if spec.kind == "fs":
            self._setup_fs()
        unclean = end is None and not first
        broken = unclean or self.journal.torn_bytes or self.journal.gap
        self.reason = ("first start: initial copy" if first else
                       "unclean previous stop" if unclean else
                       "journal damaged" if broken else
                       "checking it against the replica the fail-back came from" if end.get("failback")
                       else "capture was not in place since " + time.strftime(
                           "%Y-%m-%d %H:%M:%S", time.localtime(end.get("time", 0))) if end.get("time")
                       else "capture restarted")
        # Not captured since then: what changed meanwhile is compared by content, whatever its
        # size and mtime say (ctime cannot be set back); the first catch-up's, cleared after it
        self.gap_since = end.get("compare_since", end.get("time")) \
            if not (first or broken) and not end.get("failback") else None
        if broken:  # lost records: the catch-up below repairs what they would have done
            # Above every seq the dead capture may have handed out (a remote target may hold
            # records that were only in its memory: the next change must not reuse their seqs),
            # and before the mount: records captured from then on are kept and shipped.
            self.journal.skip_to(self.journal.reserved_seq)
        self._mount()
        from app.engine.shipper import Shipper
        from app.engine.remote import RemoteTarget
        self.remote = isinstance(self.target, RemoteTarget)
        self.shipper = Shipper(self.journal, self.target, on_gap=self._on_gap,
                               on_connect=self._on_connect, on_refused=self._on_refused,
                               local=not self.remote,
                               # a local applier yields to the request loop (YIELD_SECONDS)
                               loop=None if self.remote else self.session)
        # A first copy to a remote replica walks while ssh and the agent start (a third of a
        # second and more): its records, and what capture journals meanwhile, wait behind the
        # shipper's gate until the replica turns out empty (else they are dropped, compared).
        self._early = bool(first and self.remote and spec.kind == "fs"
                           and not (self.target.claim and self.target.claim.adopt))
        if self._early:
            self.shipper.close_gate()
        self.shipper.start()
        return {"first": first, "unclean": unclean, "reason": self.reason,
                "pid": os.getpid(), "fuse_dev": list(self.fuse_dev), "version": protocol.VERSION,
                "features": [protocol.FIGURES_WHILE_BUSY], "key": spec.key,
                "kind": spec.kind, "target": spec.target,
                **({"file": os.path.join(spec.run, "disk"), "size": self.size}
                   if spec.kind == "block" else {})}

    def _setup_fs(self) -> None:
        from app.engine.mirrorfs import MirrorFS
        spec = self.spec
        self.door = os.path.join(spec.run, "lower")
        self.stage = os.path.join(spec.run, "stage")
        table = mounts.read_mountinfo()
        door_mounted = any(m.mount_point == self.door for m in table)
        try:  # before anything is mounted or compared: not a file system that did not come up,
            # nor a new one in its place (a dead capture's door reaches the directory below)
            check_identity(spec.state, "fs", spec.key, mounts.tree_identity(
                spec.key, table, lower=self.door if door_mounted else None))
        except OSError as exc:
            raise Refused(str(exc.strerror), exc.errno) from None
        if door_mounted:
            self.root_fd = os.open(self.door, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            top = _top_mount(table, spec.key)
            if top is not None and top.fstype == layout.FSTYPE_FS:
                who = "ours (a dead capture)" if top.source == spec.fsname else f"{top.source}'s"
                raise Refused(f"{spec.key} is covered by a mirrorfs mount ({who}) and the "
                              f"lower directory's door {self.door} is gone: nothing can reach "
                              f"the directory below without uncovering it; lift it by hand "
                              f"(umount -l {spec.key}) and mount again", errno.EBUSY)
            try:
                self.root_fd = os.open(spec.key, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise Refused(f"open directory {spec.key}: {exc.strerror} "
                              f"({errno.errorcode.get(exc.errno, '?')})", exc.errno) from None
            os.makedirs(self.door, mode=0o700, exist_ok=True)
            tree = mounts.clone_tree(b"", dir_fd=self.root_fd, recursive=True)
            try:
                mounts.move_mount(tree, self.door)
            finally:
                os.close(tree)
        self.ops = MirrorFS(self.root_fd, self.journal, replicate_atime=spec.atime)
        self._hold_tracker()  # on before the first request: the catch-up needs every change
        self.mount_point = spec.key

    def _setup_block(self) -> None:
        from app.engine.blockfs import BlockFS, open_raw
        from app.services.blockdevs import device_identity
        spec = self.spec
        try:
            self.raw = open_raw(spec.key, spec.read_only)
            # before anything is read or written
            check_identity(spec.state, "block", spec.key, device_identity(self.raw))
        except OSError as exc:
            raise Refused(str(exc.strerror), exc.errno) from None
        end = os.lseek(self.raw, 0, os.SEEK_END)
        if end == 0:  # (not "offset 0 is past the end": the offset is not what is wrong)
            raise Refused(*_empty_device(spec.key))
        if spec.offset >= end:
            raise Refused(f"offset {spec.offset} is past the end of {spec.key} ({end} bytes)",
                          errno.EINVAL)
        self.size = min(spec.sizelimit or end - spec.offset, end - spec.offset)
        from app.services.blockdevs import disk_name, sharing_nodes
        from app.services.inotify import WriteCloses
        try:  # from here on a write to the raw device outside the loop is seen (run()), and
            # one through a device that holds its bytes too (its disk, a partition of it)
            def sharing() -> list[str]:
                return list(sharing_nodes(spec.key, spec.offset, self.size).values())
            self.raw_watch = WriteCloses(spec.key, sharing(), rescan=sharing,
                                         prefix=disk_name(spec.key))
        except OSError as exc:  # e.g. max_user_watches reached: status names open writers only
            log.warning("%s: cannot watch the raw device for writers outside the loop: %s",
                        spec.key, exc)
        else:
            for node, exc in self.raw_watch.missed:
                log.warning("%s: cannot watch %s, which holds bytes of it, for writers: %s",
                            spec.key, node, exc)
        self.ops = BlockFS(self.raw, spec.offset, self.size, self.journal, spec.read_only)
        self.mount_point = spec.run

    def _mount(self) -> None:
        """Mount FUSE on the staging point (block: its final place). Nothing may touch the
        mount before the FUSE loop serves it (with default_permissions a lookup asks us)."""
        spec = self.spec
        where = self.stage if spec.kind == "fs" else spec.run
        os.makedirs(where, mode=0o700, exist_ok=True)
        _lift_ours(where, spec.fsname)  # a dead predecessor's, in our own run directory
        options = (FUSE_OPTIONS_FS if spec.kind == "fs" else FUSE_OPTIONS_BLOCK) + (f"fsname={spec.fsname}",)
        if spec.kind == "fs":  # both speak the FUSE protocol themselves (app/engine/fusewire.py)
            from app.engine.mirrorfs import mount as mount_mirrorfs
            self.session = mount_mirrorfs(self.ops, where, options)
        else:
            from app.engine import fusewire
            self.session = fusewire.Session(self.ops, where, options)
            self.session.mount()
        top = _top_mount(mounts.read_mountinfo(), where)
        self.fuse_dev = (top.major, top.minor)

    def place(self) -> None:
        """In a thread, once FUSE serves: move mirrorfs from its staging point over the entry's
        path — beneath a dead mirrorfs of ours (then lifted), so the directory below never shows."""
        spec = self.spec
        if spec.kind == "block":
            return
        top = _top_mount(mounts.read_mountinfo(), spec.key)
        dead_ours = top is not None and top.source == spec.fsname and top.fstype == layout.FSTYPE_FS
        tree = mounts.clone_tree(self.stage)
        try:
            mounts.move_mount(tree, spec.key, beneath=dead_ours)
        finally:
            os.close(tree)
        mounts.umount(self.stage, mounts.MNT_DETACH)
        if dead_ours:
            mounts.umount(spec.key, mounts.MNT_DETACH)  # the dead one on top: ours is revealed

    # -- catching up
    def _on_gap(self, gap) -> None:
        """From the shipper's thread: a hole in the journal. Resync, never skip it."""
        import trio
        try:
            trio.from_thread.run_sync(self.request_catch_up, f"journal gap ({gap})", True,
                                      trio_token=self.token)
        except trio.RunFinishedError:  # the capture ended meanwhile (its shipper is held)
            log.info("journal gap (%s) as the capture ended: the next capture catches up", gap)

    def _on_connect(self) -> None:
        """From the shipper's thread: a session is up; a catch-up waiting for it starts now."""
        import trio
        self._session_up.set()
        if self.read_only_here is True:  # its replica is our secondary again (resolve)
            (self._read_only if self.spec.kind == "fs" else self._fence_block)(False)
        wake = self._connected_wake
        if wake is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(wake.set)

    # -- the old source after a fail-over
    def _on_refused(self, code: str, said: dict | None) -> None:
        """From the shipper's thread: the agent refused the session. Its replica was promoted
        while nothing changed here since (a fail-over: this host died or was cut off, and came
        back): the replica is the newer copy, and a write here would fork the history (a split
        brain, whose fail-back drops it). A directory's mirrorfs mount is made read-only, as a
        secondary is, until the replica is this entry's secondary again (`replica resolve
        --discard-target`: the session is taken, _on_connect) or a fail-back ends this
        capture. Refused while a file is open for writing: tried again at each refusal. A
        block entry's writes through its loop are refused instead (_fence_block)."""
        if self.read_only_here is True:
            return
        if code != "split-brain" or (said or {}).get("changes_here") is not False:
            self.read_only_here = None  # (a write got in while it could not be: a split brain)
            return
        (self._read_only if self.spec.kind == "fs" else self._fence_block)(True)

    def _fence_block(self, fence: bool) -> None:
        """A block entry after a fail-over: its capture file refuses writes (the loop on it
        fails them: EIO), as long as nothing has that loop mounted or open for writing, which
        is said instead (a file system mounted there would take the errors as a broken disk);
        tried again at each refusal. Nothing is set in the kernel: a BLKROSET of the loop
        would outlive this capture (a detach keeps it, and the next user of that loop number
        would find it read-only)."""
        key = self.spec.key
        if not fence:
            self.ops.fenced = False
            self.read_only_here = None
            log.warning("%s: writable again: its replica is its secondary again", key)
            return
        from app.services.blockplan import View, loop_users
        disk = os.path.join(self.spec.run, "disk")
        users = []
        try:
            view = View()
            for st in view.captures_of(key):
                if st.backing_file == disk:  # (ours, not another installation's)
                    users += [f"{st.device} {u}" for u in
                              loop_users(st.device, view, writing=True, exclude={os.getpid()})]
            why = "in use: " + "; ".join(users)
        except (OSError, MirrorError) as exc:  # (a loop detached as it was looked at): not
            users, why = [exc], f"its loop could not be looked at: {exc}"  # fenced blind
        if users:
            if self.read_only_here != why:  # (said once, not at each retry)
                log.error("%s: its replica was promoted and nothing changed here since, but its "
                          "writes could not be refused: %s", key, why)
            self.read_only_here = why
            return
        self.ops.fenced = True
        self.read_only_here = True
        log.warning("%s: writes through its loop refused: its replica was promoted and nothing "
                    "changed here since (a fail-over); writes here would fork its history", key)

    def _read_only(self, read_only: bool) -> None:
        key = self.spec.key
        try:
            top = _top_mount(mounts.read_mountinfo(), key)
            if top is None or (top.major, top.minor) != self.fuse_dev:
                raise MirrorError(f"{key}: mirrorfs is not the mount on top there", errno.ENOENT)
            mounts.set_read_only(key, read_only)
        except (OSError, MirrorError) as exc:
            why = str(exc)
            if exc.errno == errno.EBUSY:
                from app.engine.supervisor import holders
                held = holders(key, self.fuse_dev, {os.getpid()}, writing=True)
                why += "; open for writing: " + ("; ".join(
                    f"pid {h['pid']} ({h['name']}) holds {h['file']}" for h in held) or "?")
            if read_only and self.read_only_here != why:  # (said once, not at each retry)
                log.error("%s: its replica was promoted and nothing changed here since, but it "
                          "could not be made read-only: %s", key, why)
            elif not read_only:  # still read-only (said so): tried again at the next session
                log.error("%s: could not be made writable again: %s", key, why)
            self.read_only_here = why if read_only else True
            return
        self.read_only_here = True if read_only else None
        log.warning("%s: %s", key, "read-only: its replica was promoted and nothing changed here "
                    "since (a fail-over); writes here would fork its history" if read_only else
                    "writable again: its replica is its secondary again")

    def _hold_tracker(self) -> None:
        """On the trio thread: track capture from this very record on, until a catch-up that
        starts later takes the hold over (what it compares must see every change since)."""
        from app.engine.sync import Tracker
        if self.spec.kind == "fs" and self.ops.tracker is None:
            self.ops.tracker = Tracker()
        if not self._held:
            self._held = True
            self._trackers += 1

    def request_catch_up(self, reason: str, discard: bool = False) -> None:
        """On the trio thread (atomic with capture): start tracking, drop what is moot."""
        self._hold_tracker()
        self._catch_up_scope(None)
        self._full_pending = True
        if discard:
            self._dropped_through = self.journal.last_seq
            self.journal.discard_through(self._dropped_through)
            self.shipper.release_hold()
        if (self.catching or {}).get("stage") != WAITING_FOR_TARGET:
            self.reason = reason  # (one that waits already covers it, and keeps its own reason)
        self.consistent = False
        if self._catch_up_wake is not None:
            self._catch_up_wake.set()

    async def catch_up_loop(self) -> None:
        """A fresh worker catches up once; again after a journal gap, and when a pull-ahead
        queue has drained (then only what was dropped). A catch-up that loses its target is
        tried again."""
        import trio

        from app.engine.lowlevel import release_free_memory
        self._catch_up_wake = trio.Event()
        pending = True
        while True:
            if pending:
                with self.tracking():
                    if self._held:  # the hold since the gap (or the mount) ends inside ours
                        self._held = False
                        self._trackers -= 1
                    try:
                        pending = not await self._catch_up_once()
                        if not pending:  # what the copy took is free: given back
                            release_free_memory()
                    except Exception as exc:  # a bug here must not end capture: said, retried
                        log.exception("%s: catching up", self.spec.key)
                        self.catching = {"reason": self.reason, "stage": f"failed: {exc!r}"}
                        pending = True
            with trio.move_on_after(CATCH_UP_RETRY_SECONDS if pending else 1.0):
                await self._catch_up_wake.wait()
            if self._catch_up_wake.is_set():
                self._catch_up_wake = trio.Event()
                pending = True
            elif self.journal.behind and self.journal.queued_bytes <= \
                    (self.spec.queue_limit or 0) * BEHIND_RESUME_FRACTION:
                pending = True  # pull-ahead: the queue drained; resync what was dropped

    async def _catch_up_once(self) -> bool:
        import trio

        from app.engine.shipper import TargetUnavailable
        if isinstance(self.target, NoTarget):
            self.journal.catch_up_from_behind()
            self.consistent = True
            return True
        if self._early:
            self._early = False
            if await self._early_first_copy():
                return True
        while not self.shipper.connected:
            self.catching = {"reason": self.reason, "stage": WAITING_FOR_TARGET}
            self._connected_wake = trio.Event()
            if not self.shipper.connected:  # (connected meanwhile: its wake went to the last one)
                with trio.move_on_after(1.0):  # the wake is the way; this only bounds a miss
                    await self._connected_wake.wait()
        # What was asked until now (a gap found while connecting, after an unclean stop) is
        # covered by the walk that starts here: not a second walk after it.
        if self._catch_up_wake is not None:
            self._catch_up_wake = trio.Event()
        if self.journal.behind:
            # What was not journalled is compared by content (an application may have put its
            # mtime back, as when not captured at all), from when the first change was dropped
            since = self.journal.behind_since
            if since is not None and (self.gap_since is None or since < self.gap_since):
                self.gap_since = since
            self.journal.catch_up_from_behind()
            if not self._full_pending:
                self.reason = "the queue limit was reached: resync of what was not journalled"
            if self.spec.kind == "block":  # only what was dropped (kept until a resync succeeds)
                self._dirty_scope.update(self.ops.dirty_blocks())
                self.ops.dirty[:] = bytes(len(self.ops.dirty))
        dirty = None if self._full_pending or self.spec.kind == "fs" else sorted(self._dirty_scope)
        self._start_catching()
        def walk() -> dict:
            # The session's frames go from the walk's thread, not this one (which serves the
            # file system's requests): a write may wait behind a batch on a slow link.
            if self.remote:
                # the replica is inconsistent until the MARK below; what the walk covers
                # and was dropped unsent is said to be gone before it
                self.target.begin_catch_up(self._dropped_through)
            return self._reconcile(False, dirty)
        try:
            counts = await trio.to_thread.run_sync(walk, abandon_on_cancel=True)
        except TargetUnavailable as exc:
            log.warning("%s: catching up paused: %s", self.spec.key, exc.state)
            self.catching = {"reason": self.reason, "stage": f"paused: {exc.state}"}
            return False
        except OSError as exc:
            log.error("%s: catching up failed: %s", self.spec.key, exc)
            self.catching = {"reason": self.reason, "stage": f"failed: {exc}"}
            return False
        return await self._caught_up(counts)

    def _start_catching(self, how: str = "") -> None:
        self.catching = {"reason": self.reason, "stage": "comparing", "done": 0, "total": None,
                         "bytes": 0, "started": time.time()}
        log.info("%s: catching up (%s)%s", self.spec.key, self.reason, how)

    async def _caught_up(self, counts: dict) -> bool:
        """The walk ended. Consistent (a local replica; a remote one once its agent applied
        the MARK) unless the queue limit was reached meanwhile: then records of the walk's, or
        of what applications wrote, were not journalled, the replica is no prefix of the
        source's history, and a resync of what was dropped follows (False: tried again)."""
        import trio
        self.resync_bytes += counts.get("bytes", counts.get("copied_bytes", 0))
        if self.journal.behind:
            log.warning("%s: the queue limit was reached while catching up (%s): not consistent; "
                        "what was not journalled is resynced next", self.spec.key, self.reason)
            self.catching = {"reason": self.reason,
                             "stage": "queue limit reached: resync of what was not journalled next"}
            return False
        asked = self._catch_up_wake is not None and self._catch_up_wake.is_set()
        if not asked:  # none asked since
            self._catch_up_scope(self.journal.last_seq)
        self.catching = None
        self.consistent = True
        if not asked:  # (asked: request_catch_up wants the next one whole, not only what is dirty)
            self._full_pending = False
        self._dirty_scope.clear()
        self.gap_since = None  # compared: later catch-ups are for their own reasons
        # The replica is consistent once the agent has applied all of it, unless another
        # catch-up was asked for while this one walked (what it is for, a change dropped or
        # written beside capture, may be behind the walk): then that one's end says it.
        if self.remote and not asked:
            try:
                await trio.to_thread.run_sync(self.target.mark_consistent, self.journal.last_seq)
            except OSError as exc:
                log.warning("%s: could not mark the replica consistent now (said again to the next "
                            "session): %s", self.spec.key, exc)
        log.info("%s: caught up (%s): %s", self.spec.key, self.reason, counts)
        self.last_catch_up = {"reason": self.reason, **counts, "finished": time.time()}
        return True

    async def _early_first_copy(self) -> bool:
        """A first copy to a remote replica, walked while its session comes up (start()).
        True: done (the replica was empty and new: the walk's records went). False: it holds
        something, or the walk did not end: what was journalled meanwhile is dropped unsent
        (the shipper's gate was closed) and the caller compares, as for any catch-up."""
        import trio

        from app.engine.shipper import TargetUnavailable
        if self._catch_up_wake is not None:  # what was asked until now this walk covers
            self._catch_up_wake = trio.Event()
        self._start_catching(", while the target's session starts")

        def walk() -> dict:
            self._early_walking = True
            try:
                counts = self._reconcile(False, None, target=_NothingThereYet())
            finally:
                self._early_walking = False
            if not self._confirm_early():
                raise _NotEmpty()
            return counts
        try:
            counts = await trio.to_thread.run_sync(walk, abandon_on_cancel=True)
        except _NotEmpty:
            why = "the replica was not empty: compared instead of copied whole"
        except (TargetUnavailable, OSError) as exc:
            why = f"first copy interrupted: {getattr(exc, 'state', exc)}"
        else:
            return await self._caught_up(counts)
        log.info("%s: %s; what it journalled is dropped unsent", self.spec.key, why)
        self.request_catch_up(why, discard=True)
        self.shipper.open_gate()
        return False

    def _confirm_early(self) -> bool:
        """In the early walk's thread: once the session is up, is the replica empty and new?
        Then the shipper's gate opens (the walk's records and capture's go, in order). Asked
        once: as soon as the session is up (what the walk journals from then on ships while
        it walks), when it has journalled EARLY_WALK_BYTES before that, or at its end."""
        if self._early_verdict is None:
            self._progress({"stage": WAITING_FOR_TARGET})
            self._session_up.wait()
            self._progress({"stage": "walking"})
            wake = self._catch_up_wake
            ok = (self.shipper.fig.received_seq == 0 and not (wake is not None and wake.is_set())
                  and not self.target.children(b""))
            if ok:
                self.target.begin_catch_up(self._dropped_through)
                self.shipper.open_gate()
            self._early_verdict = ok
        return self._early_verdict

    def _catch_up_scope(self, through: int | None) -> None:
        """A local directory target: records up to `through` (None: all, a catch-up is to run)
        are the catch-up's, superseded there by what it sends (target._apply_all). A remote
        target's agent knows it from the replica's state (begin_catch_up, mark_consistent)."""
        from app.engine.target import CATCHING_UP, LocalDirTarget
        if isinstance(self.target, LocalDirTarget):
            self.target.catch_up_through = CATCHING_UP if through is None else through

    def resync_room(self, nbytes: int) -> None:
        """In the reconciler's thread, before it commits `nbytes`: a resync never fills the
        queue (it would go behind and start over) and keeps under the resync bandwidth, so
        live changes still get through."""
        limit = self.spec.queue_limit
        if self._early_walking and self._early_verdict is None and (
                self._session_up.is_set() or self.journal.queued_bytes + nbytes >
                min(EARLY_WALK_BYTES, limit * 3 // 4 if limit else EARLY_WALK_BYTES)) and \
                not self._confirm_early():
            raise _NotEmpty()
        while limit and self.journal.queued_bytes + nbytes > limit * 3 // 4 and \
                self.journal.queued_bytes > 0:
            time.sleep(0.02)
        rate = ((self.spec.target or {}).get("remote") or {}).get("resync_bandwidth")
        if rate:
            now = time.monotonic()
            self._resync_tokens = min(rate * 0.25, self._resync_tokens + (now - self._resync_at) * rate)
            self._resync_at = now
            self._resync_tokens -= nbytes
            if self._resync_tokens < 0:
                time.sleep(-self._resync_tokens / rate)

    def _progress(self, p: dict) -> None:
        if self.catching is not None:
            self.catching.update(p)

    def _reconcile(self, hashes: bool, scope, progress=None, target=None) -> dict:
        """In a thread: the whole reconcile, commits on the trio thread."""
        progress = progress or self._progress
        if self.spec.kind == "fs":
            from app.engine.sync import Reconciler
            since = getattr(self, "gap_since", None)
            return Reconciler(self.root_fd, target or self.target, FsCaptureSink(self),
                              hashes=hashes, progress=progress,
                              # a second of margin: the kernel's file times are coarse
                              changed_since_ns=None if since is None else int((since - 1) * 1e9)
                              ).run()
        from app.engine import blocksync
        sink = BlockCaptureSink(self)
        return blocksync.reconcile(self.raw, self.spec.offset, self.size, self.target, sink.commit,
                                   scope=scope, progress=progress, gen=self.ops.generation,
                                   frozen=sink.frozen)

    # -- daemon requests
    async def _answer(self, msg: dict, out: _Sender) -> None:
        from app.engine.shipper import TargetUnavailable
        try:
            cmd, args = protocol.check_request(msg, protocol.WORKER_COMMANDS)
            reply = await self.handle(cmd, args, out)
        except protocol.ProtocolError as exc:
            reply = protocol.error(str(exc), errno.EINVAL)
        except TargetUnavailable as exc:  # a mirror or verify the target cannot serve now
            reply = unavailable_reply(exc.state)
        except OSError as exc:  # an I/O error of a mirror or verify: in words, with its errno
            # (it read "OSError: [Errno 5] short read of the source at byte N")
            code = errno.errorcode.get(exc.errno or 0)
            text = (exc.strerror or str(exc)) + (f": {exc.filename}" if exc.filename else "") + \
                (f" ({code})" if code else "")
            log.error("request %s: %s", msg.get("cmd"), text)
            reply = protocol.error(text, exc.errno)
        except Exception as exc:  # never die of a request: say it
            log.exception("request %s", msg)
            reply = protocol.error(f"{type(exc).__name__}: {exc}", getattr(exc, "errno", None))
        import trio
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await out.send(reply)

    async def handle(self, cmd: str, args: dict, lines) -> dict:
        import trio
        if cmd == "status":
            return protocol.ok(**self.figures())
        if cmd == "stop":
            self.abort_connection = bool(args.get("abort", True))
            self._stop_event.set()
            return protocol.ok(stopping=True)
        if isinstance(self.target, NoTarget):
            return protocol.error(f"{self.spec.key} has no target", errno.EINVAL)
        if cmd == "target_settings":  # `target set` of our remote target, applied now
            if not self.remote:
                return protocol.error(f"{self.spec.key} replicates to a local target", errno.EINVAL)
            spec = args.get("remote")
            if not isinstance(spec, dict):
                return protocol.error("target_settings: remote must be an object", errno.EINVAL)
            try:
                changed, reconnect = await trio.to_thread.run_sync(self.target.adjust, spec)
            except (TypeError, ValueError) as exc:
                return protocol.error(f"target_settings: {exc}", errno.EINVAL)
            connection = self.shipper.fig.connection
            if changed:
                # what the next daemon's hello says and what the resync rate is read from
                self.spec.target["remote"] = {**self.spec.target["remote"], **spec}
                log.info("%s: target settings %s applied%s", self.spec.key, ", ".join(changed),
                         ": a new session takes them" if reconnect else "")
            # backing off after a failure (e.g. a new key not yet in authorized_keys there):
            # tried again now, not at the end of the back-off
            self.shipper.kick()
            return protocol.ok(changed=changed, reconnect=reconnect, connection=connection)
        if cmd == "resync":  # the target was handed back to us (a discarded promotion)
            self.shipper.kick()
            self.request_catch_up(args.get("reason") or "resync asked for")
            return protocol.ok()
        if cmd == "drain":
            return await self._drain(float(args.get("timeout") or 300))
        token = trio.lowlevel.current_trio_token()

        def progress(p: dict) -> None:
            trio.from_thread.run(lines.send, protocol.progress(**p), trio_token=token)
        await trio.to_thread.run_sync(self._wait_connected)  # a target down is said at once
        with self.tracking():
            if cmd == "mirror":
                counts = await trio.to_thread.run_sync(self._reconcile, True, None, progress)
                self.resync_bytes += counts.get("bytes", counts.get("copied_bytes", 0))
                await trio.to_thread.run_sync(self._wait_target)  # "mirrored" means at the target
                return protocol.ok(**counts)
            if cmd == "verify":
                return protocol.ok(**await trio.to_thread.run_sync(self._verify, progress))
        return protocol.error(f"unknown worker command {cmd!r}", errno.EINVAL)

    async def _drain(self, timeout: float) -> dict:
        """A switch-over's first step: until nothing is being caught up and the target has
        applied every record captured so far (or `timeout`). Says where that is."""
        import trio
        deadline = time.monotonic() + timeout

        def unreachable() -> dict | None:
            # a target that is not there cannot take over: said at once, not after `timeout`
            # (and the capture is not lifted for a promotion that cannot happen)
            conn = self.shipper.fig.connection
            if conn in ("connected", "local"):
                return None
            if self.shipper.fig.refusal == "split-brain":  # reachable, and will not be connected
                how = "fail-over" if (self.shipper.fig.refusal_said or {}).get(
                    "changes_here") is False else "split brain"
                return protocol.error(f"the target's replica was promoted meanwhile ({how}): "
                                      "there is nothing to switch over to; end it first "
                                      f"({layout.command('failback', self.spec.key, '--yes')} or "
                                      + layout.command("replica", "resolve", self.spec.key,
                                                       "--discard-target", "--yes") + ")",
                                      errno.EEXIST)
            if conn.startswith("paused"):  # reachable, but the last changes cannot get there
                return protocol.error(f"the target cannot take the last changes ({conn}); free "
                                      "room there, then try again once status says connected",
                                      errno.ENOSPC if "full" in conn else errno.EAGAIN)
            return protocol.error(f"cannot reach the target ({conn}); try again once status says "
                                  "connected", errno.ENOTCONN)
        while self.catching is not None or self.journal.behind or not self.consistent:
            if (refused := unreachable()) is not None:
                return refused
            if time.monotonic() > deadline:
                return protocol.error(f"{self.spec.key} is still catching up with its target "
                                      f"({self.reason}): try again once status says consistent",
                                      errno.EAGAIN)
            await trio.sleep(0.2)
        seq = self.journal.last_seq
        while not await trio.to_thread.run_sync(self.shipper.wait_applied, seq,
                                                min(1.0, max(0.0, deadline - time.monotonic()))):
            if (refused := unreachable()) is not None:
                return refused
            if self.shipper.stopping:
                return protocol.error(f"{self.spec.key}: its capture is ending", errno.ESHUTDOWN)
            if time.monotonic() >= deadline:
                return protocol.error(f"the target has applied {self.shipper.fig.applied_seq} of "
                                      f"{seq} records after {timeout:.0f} s "
                                      f"({self.shipper.fig.connection})", errno.ETIMEDOUT)
        if (refused := unreachable()) is not None:  # applied, but the promotion must get there
            return refused
        return protocol.ok(seq=seq, applied=self.shipper.fig.applied_seq)

    @contextlib.contextmanager
    def tracking(self):
        """On the trio thread: a Tracker for as long as anything (a catch-up, a mirror, a
        verify) reconciles or compares beside capture; dropped when the last one ends."""
        from app.engine.sync import Tracker
        if self.spec.kind == "fs" and self.ops.tracker is None:
            self.ops.tracker = Tracker()
        self._trackers += 1
        try:
            yield
        finally:
            self._trackers -= 1
            if self._trackers == 0 and self.spec.kind == "fs":
                self.ops.tracker = None

    def _wait_target(self, deadline: float = 120.0) -> None:
        """Until the target holds everything captured so far. A remote one is asked through
        its session: while the first one is still being made it is waited for (a query sent
        before it greeted the agent was refused, "expected HELLO"); one that is down,
        refused or paused is said at once, not after `deadline`."""
        from app.engine.shipper import TargetUnavailable
        end = time.monotonic() + deadline
        seq = self.journal.last_seq
        while True:
            # a session lost meanwhile (the keep-alive's seconds) is said as such, not after
            # the whole deadline (a verify with the link just dead waited 120 s)
            self._wait_connected(max(0.0, end - time.monotonic()))
            if self.shipper.wait_applied(seq, min(1.0, max(0.0, end - time.monotonic()))):
                return
            if time.monotonic() >= end:
                raise TargetUnavailable(f"the target did not apply the queue within "
                                        f"{deadline:.0f} s ({self.shipper.fig.connection})")

    def _wait_connected(self, deadline: float = 120.0) -> None:
        from app.engine.shipper import TargetUnavailable
        if self.remote:
            end = time.monotonic() + deadline
            while (conn := self.shipper.fig.connection) != "connected":
                if conn.startswith("paused"):
                    raise TargetUnavailable(f"the target cannot take the last changes ({conn}); "
                                            "free room there, then try again")
                if conn != "connecting" or time.monotonic() > end:
                    raise TargetUnavailable(f"cannot reach the target ({conn}); try again once "
                                            "status says connected")
                time.sleep(0.05)

    def _verify(self, progress) -> dict:
        if self.spec.kind == "block":
            from app.engine import blocksync
            return blocksync.verify(self.raw, self.spec.offset, self.size, self.target,
                                    progress=progress, gen=self.ops.generation,
                                    wait_target=self._wait_target)
        return verify_tree(self, progress)

    def figures(self) -> dict:
        j, sh = self.journal, self.shipper
        fig = sh.fig
        logical, wire = sh.rates()
        catching = self.catching
        mark = getattr(self.target, "pending_mark", None)
        if catching is None and self.consistent and mark is not None:
            # The walk is over and its end sent; the replica is not consistent until the agent
            # has applied up to there and said so (a session lost meanwhile: said again). Its
            # records may still wait here (a window in flight, a slow link): said so, not that
            # the target has them.
            queued = mark - fig.sent_seq
            catching = {"reason": self.reason, "stage": "the target applies the rest"
                        if queued <= 0 else f"sending the rest ({queued} records queued here)"}
        if catching is not None and catching.get("total"):
            pct = 100 * catching.get("bytes", 0) // max(1, catching["total"])
            replication = f"catching up {pct} %"
        elif catching is not None:
            done = catching.get("files", catching.get("done"))
            replication = f"catching up ({catching.get('stage', '')}{'' if done is None else f', {done} done'})"
        elif j.behind:
            replication = "behind" if j.full_error is None else f"behind: {j.full_error}"
        elif self.ops.waits_for_room:  # on_full = "block": changes wait at the gate for room
            replication = layout.WRITERS_WAIT
        elif isinstance(self.target, NoTarget):  # captured, journalled, replicated nowhere
            replication = "no target"
        else:
            replication = "established" if sh.connected else "waiting for the target"
        if isinstance(self.target, NoTarget):
            connection, target_data = "none", ""
        else:
            connection = fig.connection
            if fig.retry_at and not sh.connected:
                left = math.ceil(fig.retry_at - time.time())  # 0.4 s is "in 1 s", not "in 0 s"
                # the retry is due: the shipper is connecting (ssh may take seconds to answer)
                connection = (f"{connection}, retry in {left} s" if left > 0 else
                              f"{layout.CONNECTING_AGAIN}{connection})")
            ok = self.consistent and not j.behind and (not self.remote or self.target.consistent)
            target_data = "consistent" if ok else "inconsistent"
            if fig.refusal == "not-ours":  # another source's or history's, or foreign data:
                target_data = "not ours"     # nothing of ours is there (not "inconsistent")
            if fig.refusal == "split-brain":  # the replica was promoted: nothing goes there
                target_data, replication = "split-brain", "split brain"
                if (fig.refusal_said or {}).get("changes_here") is False:  # only it moved on
                    target_data, replication = "promoted", "failed over (no change here since)"
        return {
            "state": "catching up" if catching is not None else "capturing",
            "captured_ops": j.captured_ops, "last_seq": j.last_seq, "sent_seq": fig.sent_seq,
            "received_seq": fig.received_seq, "applied_seq": fig.applied_seq,
            "bytes_queued": j.queued_bytes, "lag_seconds": round(j.lag_seconds(), 3),
            "behind": j.behind, "connection": connection, "replication": replication,
            "target_data": target_data, "catch_up": catching,
            "apply_errors": getattr(self.target, "errors", 0),
            "superseded": getattr(self.target, "superseded", 0),
            # a refusal is now; an error applying a record may be from long before it
            "last_error": (fig.refusal and fig.last_error) or getattr(self.target, "last_error", None)
            or fig.last_error,
            "reconnects": fig.reconnects, "resent_bytes": fig.resent_bytes,
            "resync_bytes": self.resync_bytes, "wire_bytes": fig.wire_bytes,
            "logical_bytes": fig.logical_bytes, "wire_rate": round(wire, 1),
            "logical_rate": round(logical, 1), "worker_pid": os.getpid(),
            "read_only_here": self.read_only_here,
            **({"rtt": self.target.rtt, "attempts": fig.attempts,
                "compression": self.target.codec.state} if self.remote else {}),
            "open_handles": self.ops.open_handles() if self.spec.kind == "fs" else self.ops.opened,
            **({"size": self.size, "file": os.path.join(self.spec.run, "disk"),
                "raw_writes": self.raw_writes} if self.spec.kind == "block" else {}),
        }

    # -- the event loop
    def run(self) -> int:
        import trio
        ready = self.start()
        adopt = _listen(self.spec.adopt)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop

        async def main() -> None:
            self.token = trio.lowlevel.current_trio_token()
            self._stop_event = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._place_then_serve, ready, adopt)
                nursery.start_soon(self.catch_up_loop)
                nursery.start_soon(self._stop_on_request, nursery)
                if self.raw_watch is not None:
                    nursery.start_soon(self._raw_writes_loop)
                await self.session.main()  # returns when the last mount of ours is gone
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        finally:
            self.finish(adopt)
            self.session.close(unmount=False)
        return 0

    async def _raw_writes_loop(self) -> None:
        """A block entry's raw device opened for writing outside the loop and closed again (dd,
        a partitioning tool, a stray script): what it wrote was not captured, and its replica
        would differ from it without a word. Said in the log and in status (raw_writes), and
        the entry is compared with its replica (only what differs is sent), as after a journal
        gap. A writer that keeps the device open is named by status while it does
        (status.writers_of); this sees it at its close."""
        import trio
        watch = self.raw_watch
        while True:
            await trio.lowlevel.wait_readable(watch.fileno())
            closes = watch.read()
            if not closes:
                continue
            now, before = time.time(), self.raw_writes or {}
            lost = watch.OVERFLOW in closes  # closes after a full queue were not seen
            closes = [node for node in closes if node != watch.OVERFLOW]
            nodes = sorted(set(closes))
            self.raw_writes = {"count": before.get("count", 0) + len(closes), "last": now,
                               "nodes": sorted(set(before.get("nodes", [])) | set(nodes)),
                               "overflows": before.get("overflows", 0) + lost}
            when = time.strftime("%H:%M:%S", time.localtime(now))
            if nodes:
                log.warning("%s: %s was opened for writing outside its loop and closed (%s): its "
                            "writes were not captured; comparing it with its replica",
                            self.spec.key, " and ".join(
                                n if n == self.spec.key else f"{n} (which holds bytes of it)"
                                for n in nodes), when)
            if lost:
                log.warning("%s: the watch for writers outside its loop lost events (its inotify "
                            "queue overflowed at %s): comparing it with its replica",
                            self.spec.key, when)
            self.request_catch_up(f"the raw device was written outside its loop at {when}"
                                  if nodes else "the watch for writers outside the loop lost "
                                  f"events at {when}")

    async def _place_then_serve(self, ready: dict, adopt) -> None:
        import trio
        try:
            await trio.to_thread.run_sync(self.place)
        except Exception as exc:  # said to the daemon; nothing is left mounted by us
            log.exception("placing the mount")
            with contextlib.suppress(mounts.MirrorError):
                mounts.umount(self.stage, mounts.MNT_DETACH)
            self.chan.send({"event": "error", "message": f"mount mirrorfs on {self.spec.key}: {exc}",
                            "errno": getattr(exc, "errno", None)})
            self._stop_event.set()
            return
        await self.serve_daemons(ready, adopt)

    async def _stop_on_request(self, nursery) -> None:
        """A `stop` from the daemon: drain and mark clean while mutations wait, then end the
        FUSE connection (copies of the mount elsewhere answer ENOTCONN from then on)."""
        import trio
        await self._stop_event.wait()
        self.ops.unfrozen = trio.Event()  # mutations wait from here on
        await trio.to_thread.run_sync(self._drain_and_mark)
        if self.fuse_dev is not None:  # still held: waiting changes fail, nothing unjournalled lands
            _abort_fuse(self.fuse_dev)
        nursery.cancel_scope.cancel()

    def _drain_and_mark(self) -> None:
        if getattr(self, "_marked", False):
            return
        drained = self.shipper.stop(drain_seconds=STOP_DRAIN_SECONDS)
        self.journal.close()
        self.target.close()
        self._marked = True
        if self.journal.unstored:  # no clean end: the next start goes on above the reserved
            # seqs and resyncs (what the records said is only in the data now)
            log.error("%s: capture ended at seq %d; %d records not yet at the target could not be "
                      "kept (the journal's disk failed): the next start resyncs", self.spec.key,
                      self.journal.last_seq, self.journal.unstored)
            return
        # since when changes are not all journalled or compared: the next start compares from
        # then (changes dropped while behind, a gap whose catch-up did not end)
        now = time.time()
        since = [t for t in (now, getattr(self, "gap_since", None),
                             self.journal.behind_since if self.journal.behind else None) if t is not None]
        write_end(self.spec.state, {"seq": self.journal.last_seq, "released": self.journal.released_seq,
                                    "drained": drained, "time": now, "compare_since": min(since),
                                    "pid": os.getpid(), "connection": self.shipper.fig.connection,
                                    "consistent": bool(self.consistent)})
        log.info("%s: capture ended at seq %d (%s)", self.spec.key, self.journal.last_seq,
                 "drained to the target" if drained else
                 f"{self.journal.last_seq - self.journal.released_seq} records kept for the next start")

    def finish(self, adopt: socket.socket | None) -> None:
        self._drain_and_mark()
        if self.raw_watch is not None:
            self.raw_watch.close()
        if adopt is not None:
            adopt.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spec.adopt)
        if self.spec.kind == "fs":
            mounts_here = mounts.read_mountinfo()
            if not any(m.mount_point == self.spec.key and m.source == self.spec.fsname
                       for m in mounts_here):
                # capture ended on purpose: the door goes too (the lower file system is free),
                # and the entry's run directory with it (a next capture makes it again)
                if any(m.mount_point == self.door for m in mounts_here):
                    with contextlib.suppress(mounts.MirrorError):
                        mounts.umount(self.door, mounts.MNT_DETACH)
                layout.remove_run_dir(self.spec.run)

    async def serve_daemons(self, ready: dict, adopt: socket.socket) -> None:
        """Say ready, answer the daemon; when it goes, keep capturing and wait for the next."""
        import trio
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(self.chan.sock))
        listener = trio.socket.from_stdlib_socket(adopt)
        hello = {"event": "ready", **ready}
        while True:
            out = _Sender(protocol.TrioLines(stream))
            await out.send(hello)
            # A long command (mirror, verify, drain) runs in a task of its own: the daemon's
            # status asks meanwhile ({"figures": true}) are answered at once, as figures
            # messages its long call's reader takes aside. The daemon sends nothing else then.
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        msg = await out.lines.next()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, protocol.ProtocolError):
                        msg = None
                    if msg is None:
                        break  # the long command, if any, ends first (its answer has nowhere to go)
                    if msg.get("cmd") == "status" and (msg.get("args") or {}).get("figures"):
                        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                            await out.send({"figures": self.figures()})
                    elif msg.get("cmd") in LONG_COMMANDS:
                        nursery.start_soon(self._answer, msg, out)
                    else:
                        await self._answer(msg, out)
            with contextlib.suppress(trio.ClosedResourceError):
                await stream.aclose()
            log.warning("%s: the daemon is gone; capture goes on, waiting to be taken over on %s",
                        self.spec.key, self.spec.adopt)
            conn, _ = await listener.accept()
            stream = trio.SocketStream(conn)
            hello = {"event": "ready", **ready, "adopted": True, "first": False, "unclean": False}


LONG_COMMANDS = ("mirror", "verify", "drain")  # answered from a task: status goes on meanwhile


class _Sender:
    """The worker's end of the daemon's link: one message at a time whoever sends (the
    request loop, a long command's task, its progress from a thread)."""

    def __init__(self, lines: protocol.TrioLines):
        import trio
        self.lines = lines
        self._lock = trio.Lock()

    async def send(self, msg: dict) -> None:
        async with self._lock:
            await self.lines.send(msg)


# -- sinks: reconcile records committed atomically with capture ----------------------------------

class _CaptureSink:
    """Where a catch-up's records go: into the journal on the capture's own thread, so they
    are ordered with what applications write meanwhile."""

    def __init__(self, cap: Capture):
        self.cap = cap

    @contextlib.contextmanager
    def frozen(self):
        """Applications' writes wait at the gate while the body runs (a final comparison)."""
        import trio
        cap = self.cap

        def close_gate() -> None:
            cap.ops.unfrozen = trio.Event()
        trio.from_thread.run_sync(close_gate, trio_token=cap.token)
        try:
            yield
        finally:
            trio.from_thread.run_sync(lambda: cap.ops.unfrozen.set(), trio_token=cap.token)


class FsCaptureSink(_CaptureSink):
    def __init__(self, cap: Capture):
        super().__init__(cap)
        self.tracker = cap.ops.tracker

    def commit(self, check, ops) -> bool:
        return self.commit_many([(check, ops)])[0]

    def commit_many(self, items) -> list[bool | None]:
        """One trip to the capture thread for several files' records, each file checked there
        (unchanged since it was read) right before its records are appended; after one that
        fails, none is tried (None: sync.Sink.commit_many)."""
        import trio
        cap = self.cap
        cap.resync_room(sum(len(d) + 64 for _c, ops in items for _o, _a, d in ops))

        def on_capture_thread() -> list[bool]:
            done: list[bool | None] = []
            for check, ops in items:
                if not all(done):
                    done.append(None)
                    continue
                if check is not None and not self.tracker.still(
                        check, lambda rel: _lstat_key(cap.root_fd, rel)):
                    done.append(False)
                    continue
                for op, args, data in ops:  # not stored (behind): _caught_up sees it
                    cap.journal.append(op, args, data)
                done.append(True)
            return done
        return trio.from_thread.run_sync(on_capture_thread, trio_token=cap.token)



class BlockCaptureSink(_CaptureSink):
    def commit(self, block: int, data: bytes, gen: int | None) -> bool:
        import trio
        cap = self.cap
        cap.resync_room(len(data) + 64)

        def on_capture_thread() -> bool:
            if gen is not None and cap.ops.generation(block) != gen:
                return False
            from app.engine.sync import BLOCK
            if not cap.journal.append("write", {"offset": block * BLOCK}, data):
                cap.ops.dirty[block] = 1
            return True
        return trio.from_thread.run_sync(on_capture_thread, trio_token=cap.token)



def verify_tree(cap: Capture, progress) -> dict:
    """Compare source and target while capture goes on: scan the source, wait until the
    target has applied everything captured so far, scan it; paths that changed meanwhile are
    compared again (three rounds), and are reported, never called equal, if they keep changing."""
    import trio

    from app.engine import sync

    def stamp():
        return cap.ops.tracker, cap.ops.tracker.clock, cap.ops.tracker.names_epoch
    tracker, clock, epoch = trio.from_thread.run_sync(stamp, trio_token=cap.token)
    src = sync.scan(cap.root_fd, hashes=True)
    progress({"stage": "verify", "files": len(src)})
    cap._wait_target()
    dst = cap.target.scan(hashes=True)
    diffs = sync.compare_trees(src, dst)
    for _ in range(2):
        moving = {os.fsencode(d["path"]) if d["path"] != "." else b"" for d in diffs
                  if _changed_since(tracker, src, os.fsencode(d["path"]) if d["path"] != "." else b"",
                                    clock, epoch)}
        if not moving:
            break
        clock, epoch = tracker.clock, tracker.names_epoch
        for rel in moving:
            src.pop(rel, None)
            try:
                info = sync.lstat_info(cap.root_fd, rel)
                if info.kind == 0o100000:
                    info.sha256 = sync.whole_hash(sync.file_hashes(cap.root_fd, rel) or [])
                src[rel] = info
            except FileNotFoundError:
                pass
        cap._wait_target()
        for rel in moving:
            dst.pop(rel, None)
            info = cap.target.info(rel)
            if info is not None:
                if info.kind == 0o100000:
                    info.sha256 = sync.whole_hash(cap.target.file_hashes(rel) or [])
                dst[rel] = info
        diffs = sync.compare_trees(src, dst)
    return {"differences": diffs, "files": len(src)}


def _changed_since(tracker, src: dict, rel: bytes, clock: int, epoch: int) -> bool:
    info = src.get(rel)
    if info is not None and tracker.changes.get(info.ino, 0) > clock:
        return True
    return tracker.name_touched(rel, epoch) or (info is None and tracker.clock > clock)


# -- helpers ---------------------------------------------------------------------------------------

def _lstat_key(root_fd: int, rel: bytes) -> tuple[int, int] | None:
    from app.engine.lowlevel import beneath
    try:
        with beneath(root_fd, rel) as (d, name):
            st = os.stat(name, dir_fd=d, follow_symlinks=False)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _top_mount(table, path: str):
    """The mount a lookup of `path` ends on, when a mount sits exactly there."""
    found = [m for m in table if m.mount_point == path]
    if not found:
        return None
    ids = {m.mount_id for m in found}
    tops = [m for m in found if not any(o.parent_id == m.mount_id and o.mount_point == path
                                        for o in found if o.mount_id in ids)]
    return tops[-1] if tops else found[-1]


def _lift_ours(path: str, fsname: str) -> None:
    """Lazily unmount dead mounts of ours at `path` (in our own run directory only)."""
    for _ in range(8):
        top = _top_mount(mounts.read_mountinfo(), path)
        if top is None or top.source != fsname:
            return
        mounts.umount(path, mounts.MNT_DETACH)


def _listen(path: str) -> socket.socket:
    """The take-over socket (root only); a leftover of a dead worker of this entry goes (we
    hold the entry's lock, so no live worker owns it), anything that is not a socket stays."""
    import stat as st_mod
    try:
        st = os.lstat(path)
        if st_mod.S_ISSOCK(st.st_mode):
            os.unlink(path)
        else:
            raise Refused(f"{path} exists and is not a socket: refusing to remove it", errno.EEXIST)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(1)
    return sock


FUSECTL = "/sys/fs/fuse/connections"  # where systemd mounts fusectl (a container may not)


def _abort_fuse(dev: tuple[int, int]) -> None:
    """End our FUSE connection for every copy of the mount (other mount namespaces too)."""
    if not os.path.ismount(FUSECTL):  # our exit closes /dev/fuse: that ends it all the same
        log.info("fusectl is not mounted on %s: the FUSE connection ends as this worker exits",
                 FUSECTL)
        return
    major, minor = dev
    path = f"{FUSECTL}/{(major << 20) | minor}/abort"  # the kernel's s_dev
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError as exc:
        log.error("abort FUSE connection %s: %s", path, exc)


def guarded(fd: int, run) -> int:
    """Run the worker body; report any failure to the daemon as an "error" event, exit 1."""
    logging.basicConfig(level=logging.INFO, format=f"worker[{os.getpid()}] %(levelname)s %(message)s")
    os.umask(0)  # mirrorfs creates with the caller's modes (already masked by the caller's umask)
    chan = Channel(socket.socket(fileno=fd))
    profile_to = os.environ.get(PROFILE_ENV)  # bench: the FUSE thread's time
    try:
        if profile_to:
            import cProfile
            prof = cProfile.Profile()
            try:
                return prof.runcall(run, chan)
            finally:
                prof.dump_stats(profile_to)
        return run(chan)
    except Refused as exc:
        _tell(chan, {"event": "error", "message": str(exc), "errno": exc.errno})
        return 1
    except Exception as exc:  # reported to the daemon, which turns it into a FAILED result
        log.exception("worker failed")
        _tell(chan, {"event": "error", "message": f"{type(exc).__name__}: {exc}",
                     "errno": getattr(exc, "errno", None)})
        return 1


def _tell(chan: Channel, event: dict) -> None:
    """Why this worker ends, to the daemon that started it; if that daemon is gone (it gave
    up waiting, or stopped) the reason is logged, in one line, not as a BrokenPipe traceback."""
    try:
        chan.send(event)
    except OSError as exc:
        log.error("capture not started: %s (the daemon that asked for it is gone: %s)",
                  event["message"], exc.strerror or exc)


def _empty_device(device: str) -> tuple[str, int]:
    """Why a device of 0 bytes cannot be captured, in the words of what happened to it: a
    loop that was detached, a loop whose file was emptied, or a device that is empty."""
    try:
        rdev = os.stat(device).st_rdev
        base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
        is_loop = os.major(rdev) == 7  # LOOP_MAJOR
    except OSError:
        base, is_loop = "", False
    if is_loop:
        try:
            with open(f"{base}/loop/backing_file") as f:
                backing = f.read().strip()
        except FileNotFoundError:
            return (f"{device} is a loop device with nothing attached (it was detached): there is "
                    f"nothing to capture; attach its file to it again (losetup {device} FILE) or "
                    "correct the entry", errno.ENXIO)
        except OSError:
            backing = ""
        if backing:
            return (f"{device} is empty (0 bytes): its backing file {backing} has no data (it "
                    "was truncated or replaced); there is nothing to capture", errno.EINVAL)
    return f"{device} is empty (0 bytes): there is nothing on it to capture", errno.EINVAL


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mirrorsetup-capture")
    p.add_argument("--spec", required=True)
    p.add_argument("--fd", type=int, required=True)
    args = p.parse_args(argv)
    spec = Spec(**json.loads(args.spec))
    sys.setswitchinterval(SWITCH_INTERVAL)
    return guarded(args.fd, lambda chan: Capture(spec, chan).run())


if __name__ == "__main__":
    sys.exit(main())
