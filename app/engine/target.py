"""Where an entry's changes go: the `Target` seam.

Every path that writes or reads a replica goes through one of these: the shipper (journal
records, in order), the reconciler (mirror, resync, catching up) and verify. A local target is
a directory (file-system entries) or a file or block device (block entries) on this host; a
remote one (app/engine/remote.py) is the same thing served by `mirrorsetup serve-target` on
another host over SSH. Each implementation says how far the target durably is (`Positions`).

A replica is never overwritten, deleted or shared by accident: before the first write a target
is claimed for one entry. The claim is a marker on the target itself (the `trusted.
mirrorsetup.replica` extended attribute of the directory or file), or, where a target cannot
carry one (a block device, a file system without trusted xattrs), a claim file in the entry's
state directory. A target that is not empty and not claimed by this entry is refused unless
the administrator said to adopt it; one claimed by another entry is always refused, by name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from app.engine import sync
from app.engine.applier import BlockApplier, FsApplier
from app.engine.journal import Record, read_small_file, write_small_file
from app.engine.lowlevel import RENAME_EXCHANGE
from app.engine.sync import BLOCK
from app.services.layout import MARKER_XATTR, dir_is_empty, marker_fields
from app.services.results import MirrorError

CLAIM_FILE = "target-claim"  # in the entry's state directory, for targets without a marker


@dataclass(frozen=True)
class Positions:
    """How far the target is: records durable in its own journal (`received`) and applied
    durably to its data (`applied`). A local target applies as it receives."""

    received: int
    applied: int


@dataclass(frozen=True)
class Claim:
    """Who a target belongs to: the entry (kind and source) on this host."""

    entry: str  # "fs:/srv/data" or "block:/dev/vdb"
    host: str
    adopt: bool = False

    def marker(self) -> str:
        return json.dumps({"entry": self.entry, "host": self.host}, sort_keys=True)

    def mine(self, marker: str | None) -> bool:
        other = marker_fields(marker)
        return other is not None and other.get("entry") == self.entry and other.get("host") == self.host

    @staticmethod
    def describe(marker: str) -> str:
        other = marker_fields(marker)
        if other is None:
            return "claimed by something else (unreadable marker)"
        return f"the replica of {str(other.get('entry', '?')).split(':', 1)[-1]} on {other.get('host', '?')}"


def host_id() -> str:
    """This host's name for claims: its machine-id when it has one, else its host name."""
    text = read_small_file(Path("/etc"), "machine-id")
    return (text or "").strip() or os.uname().nodename


class TargetRefused(MirrorError):
    """The target may not be written: not ours, not empty, wrong kind, too small."""


class Target:
    """One entry's replica. Subclasses: LocalDirTarget, LocalBlockTarget, remote.RemoteTarget."""

    kind = "fs"
    label = ""
    # Records up to this seq belong to a catch-up (sync.Reconciler), which sends every node
    # it lists whole when it reaches it: one of them that finds no such name here (the first
    # copy has not made its directory yet) is superseded, not a divergence (_apply_all).
    # -1: none. Set by the capture (a local target) or the agent (its replica).
    catch_up_through = -1
    superseded = 0

    def open(self) -> Positions | None:
        """Claim (or check the claim of) the target and return where it durably is; None when
        the target keeps no position of its own (a local one: the journal's is the truth)."""
        raise NotImplementedError

    def send(self, records: list[Record]) -> None:
        """Apply (local) or send (remote) records, in order."""
        raise NotImplementedError

    def flush(self) -> Positions | None:
        """Make what was sent durable where that is up to us (local); return the positions."""
        raise NotImplementedError

    def apply_ops(self, ops: list[sync.Op]) -> None:
        """Apply reconcile records directly (offline mirror: nobody captures the source)."""
        self.send([Record(0, 0, op, args, data) for op, args, data in ops])

    def close_files(self) -> None:
        """Close what is kept open between records (a full target's: see LocalDirTarget)."""

    def close(self) -> None:
        pass


class Queried:
    """The other end of a walk reached by questions over a session (`self.queries`, a
    wire.Queries): a remote target seen from its source, and the source seen from its agent
    during a fail-back. Listings and hash lists may be asked ahead of the walk (sync.Ahead)."""

    queries = None  # wire.Queries, set by the subclass

    def ask_ahead(self, method: str, rel: bytes) -> bool:
        return self.queries.ask_ahead(method, rel)

    def forget_ahead(self, keys) -> None:
        self.queries.forget_ahead(keys)

    def info(self, rel: bytes) -> sync.Info | None:
        d = self.queries.call("info", rel=os.fsdecode(rel))
        return None if d is None else sync.Info.from_wire(d)

    def children(self, rel: bytes) -> dict[bytes, sync.Info] | None:
        return listing_from_wire(self.queries.asked("children", rel))

    def file_hashes(self, rel: bytes) -> list[str] | None:
        return self.queries.asked("file_hashes", rel)

    def block_hashes_of(self, blocks: list[int]) -> list[str]:
        return self.queries.call("block_hashes_of", blocks=blocks)


def listing_from_wire(d: dict | None) -> dict[bytes, sync.Info] | None:
    return None if d is None else {os.fsencode(k): sync.Info.from_wire(v) for k, v in d.items()}


class LocalDirTarget(Target):
    """A directory on this host: records applied by FsApplier, compared through its fd.

    The applier runs in the capture process, in the shipper's thread; runs of its records that
    are one system call or two each go to C with one GIL release (FsApplier.apply_run: the
    request loop beside it waited for the GIL at each of the applier's calls before). Tried
    and not kept: the applier in a child forked from the worker (records over a socketpair of
    8 MiB buffers, each batch answered before `send` returns). bench/dispatch.py liked it (a
    small file 309 instead of 341 us, 1 MiB writes 1394 instead of 1469 us), but bench/apps.py,
    3 interleaved runs against the thread, twice (the second with the child at nice 10), did
    not: small files 7-8 % faster, tar x -3 and +12 %, git equal, SQLite 9-14 % slower, rm -rf
    4-8 % slower, 256 MiB of 1 MiB writes + fsync 40-65 % slower (the data copied three times
    more on its way).
    """

    kind = "fs"

    def __init__(self, path: str, claim: Claim, state_dir: Path):
        self.path = path
        self.label = path
        self.claim = claim
        self.state_dir = state_dir
        self.fd: int | None = None
        self.applier: FsApplier | None = None
        self.errors = 0
        self.last_error: str | None = None

    @classmethod
    def on_fd(cls, fd: int, label: str) -> LocalDirTarget:
        """A directory already opened (and claimed) by the caller: the remote agent's replica."""
        t = cls(label, None, None)
        t.fd = fd
        t.applier = FsApplier(fd)
        return t

    def open(self) -> None:
        if self.fd is None:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _claim(self.path, fd, self.claim, self.state_dir,
                       empty=lambda: dir_is_empty(f"/proc/self/fd/{fd}"))
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            self.applier = FsApplier(fd)
        return None

    def send(self, records: list[Record]) -> None:
        skip, instead = replaced_times(records)
        _apply_all(self, records, lambda rec: f"{rec.op} {rec.args.get('path')}", skip, instead)

    def flush(self) -> None:
        self.applier.sync()
        return None

    def info(self, rel: bytes) -> sync.Info | None:
        try:
            return sync.lstat_info(self.fd, rel)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def children(self, rel: bytes) -> dict[bytes, sync.Info] | None:
        # (a file system mounted below is left out, as sync.scan does: a fail-back's this side)
        kids = sync.children(self.fd, rel, dev=os.fstat(self.fd).st_dev)
        if kids is not None and not rel:
            kids.pop(sync.LOST_FOUND, None)  # a target that is a file system's root keeps its own
        return kids

    def file_hashes(self, rel: bytes) -> list[str] | None:
        try:
            return sync.file_hashes(self.fd, rel)
        except (IsADirectoryError, NotADirectoryError):
            return None

    def scan(self, *, hashes: bool = True) -> dict[bytes, sync.Info]:
        return sync.without_lost_found(sync.scan(self.fd, hashes=hashes))

    def close_files(self) -> None:
        """The applier's open files, closed while the target is full: a file removed there
        (the replica's copy of one the source removed too, while its writes still queue)
        otherwise kept its room until the applier next closed it, and nothing resumed."""
        if self.applier is not None:
            self.applier.close_files()

    def close(self) -> None:
        if self.applier is not None:
            self.applier.close()
            self.applier = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class LocalBlockTarget(Target):
    """A file (created sparse, extended to the window) or a block device of at least the
    window's size, written at the window's offsets."""

    kind = "block"

    def __init__(self, path: str, size: int, claim: Claim, state_dir: Path):
        self.path = path
        self.label = path
        self.size = size
        self.claim = claim
        self.state_dir = state_dir
        self.fd: int | None = None
        self.offset = 0
        self.applier: BlockApplier | None = None
        self.errors = 0
        self.last_error: str | None = None

    @classmethod
    def on_fd(cls, fd: int, label: str, size: int, offset: int = 0) -> LocalBlockTarget:
        """An open file or device (the agent's replica; a source's window during a fail-back,
        `offset` bytes into its device)."""
        t = cls(label, size, None, None)
        t.fd, t.offset = fd, offset
        t.applier = BlockApplier(fd, offset)
        return t

    def open(self) -> None:
        if self.fd is None:
            fd = open_block_target(self.path, self.size)
            try:
                _claim(self.path, fd, self.claim, self.state_dir, empty=lambda: _zeros(fd))
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            self.applier = BlockApplier(fd)
        return None

    def send(self, records: list[Record]) -> None:
        done = self.applier.apply_many(records)  # the one that failed (if any) is tried again
        _apply_all(self, records[done:], lambda rec: f"write at {rec.args.get('offset')}")

    def flush(self) -> None:
        self.applier.sync()
        return None

    def block_hashes_of(self, blocks: list[int]) -> list[str]:
        return [sync.sha256_hex(sync.pread_uncached(self.fd, min(BLOCK, self.size - b * BLOCK),
                                                     self.offset + b * BLOCK)) for b in blocks]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


PAUSE_ERRNOS = {errno.ENOSPC: "paused: target full", errno.EDQUOT: "paused: target over quota",
                errno.EROFS: "paused: target read-only", errno.EIO: "paused: target I/O error"}
NOT_THERE_YET = (errno.ENOENT, errno.ENOTDIR)  # a name a catch-up has not made yet
CATCHING_UP = 1 << 62  # catch_up_through while a catch-up runs: every record so far and to come


# Records after which a later `times` record of the same name no longer sets the same node's
# times: the name is made, moved or removed (or, for a rename, any name: its subtree moves).
NAME_OPS = {"create", "mkdir", "mknod", "symlink", "link", "tmpfile", "unlink", "rmdir", "remove",
            "prune", "put"}


def replaced_times(records: list[Record]) -> tuple[dict[int, int], dict[int, Record]]:
    """(skip, instead): the indices of `times` records that a later `times` record of the same
    batch replaces, each mapped to the index of that one (same path; no rename in between, nor
    anything that makes or removes that name or a directory above it), and the later records to
    apply in another form: one that leaves the access time as it is takes the access time of
    an earlier one it replaces (the applier sets nothing else that moves it). The node's times
    end as they would have: the later record sets them whatever came between (a write, a chmod,
    a name made or removed in it). Capture records a file's times at every close and each directory's after every change
    in it: `tar x` sent three or four for each file and directory, `rm -rf` one per name
    removed, each an lstat and a utimensat at the target (and the GIL taken from the capture's
    request loop for them)."""
    later: dict[str, tuple[int, bool]] = {}  # path -> (its later times record, it sets the atime)
    skip: dict[int, int] = {}
    instead: dict[int, Record] = {}
    for i in range(len(records) - 1, -1, -1):
        rec = records[i]
        op, a = rec.op, rec.args
        if op == "times":
            path = a.get("path")
            if path is None:  # an unnamed (O_TMPFILE) file's
                continue
            atime = a.get("atime")
            if path not in later:
                later[path] = (i, atime is not None)
                continue
            j, sets_atime = later[path]
            skip[i] = j
            if atime is not None and not sets_atime:
                kept = instead.get(j, records[j])
                instead[j] = Record(kept.seq, kept.kind, kept.op, {**kept.args, "atime": atime})
                later[path] = (j, True)
        elif op == "rename":
            later.clear()
        elif later and op in NAME_OPS:
            gone = a.get("path")
            if gone is None:
                continue
            if not gone:  # the entry's root itself
                later.clear()
                continue
            later.pop(gone, None)
            below = gone + "/"
            for path in [p for p in later if p.startswith(below)]:
                del later[path]
    return skip, instead


def _apply_all(target, records: list[Record], what, skip=None, instead=None) -> None:
    """Apply in order (but the records at the indices `skip` maps to the later record that
    replaces them, and at those of `instead` the record there). A full, read-only or failing
    target pauses shipping at the record it could not take (nothing skipped: from a skipped one
    on whose replacement is not applied yet); a record of a catch-up about a name that is not
    there yet is superseded (the catch-up sends that name whole); any other error is a
    divergence, counted and shown."""
    from app.engine.shipper import TargetUnavailable
    through = target.catch_up_through
    run = getattr(target.applier, "apply_run", None)  # single-call records, compiled
    i, n = 0, len(records)
    while i < n:
        if run is not None:
            i = run(records, i, skip, instead)
            if i >= n:
                break
        k, rec = i, records[i]
        i += 1
        if skip and k in skip:
            continue
        try:
            target.applier.apply(instead.get(k, rec) if instead else rec)
        except OSError as exc:
            if exc.errno in PAUSE_ERRNOS:
                first = min([k] + [j for j, r in (skip or {}).items() if j < k <= r])
                taken = records[first - 1].seq if first else records[0].seq - 1
                raise TargetUnavailable(f"{PAUSE_ERRNOS[exc.errno]} ({target.label}: "
                                        f"{exc.strerror})", taken=taken if rec.seq else None) from exc
            if exc.errno in NOT_THERE_YET and 0 < rec.seq <= through:
                target.superseded += 1
                if rec.op == "rename" and not rec.args.get("flags", 0) & RENAME_EXCHANGE:
                    _vacate(target, rec)
                continue
            target.errors += 1
            target.last_error = f"seq {rec.seq} {what(rec)}: {exc}"


def _vacate(target, rec: Record) -> None:
    """A catch-up's rename that found no place for its new name here (the walk has not made
    that directory yet, and sends the node whole when it does): the old name is gone at the
    source all the same, so it goes here too. Left, it stayed for good once the walk had
    passed it (bench/catchup_race.py: a directory renamed early in a first copy was there
    twice)."""
    try:
        target.applier.apply(Record(rec.seq, rec.kind, "remove", {"path": rec.args["old"]}))
    except OSError as exc:
        if exc.errno not in NOT_THERE_YET:
            target.errors += 1
            target.last_error = f"seq {rec.seq} remove {rec.args['old']} (renamed away): {exc}"


def open_block_target(path: str, size: int) -> int:
    """Open (creating a sparse file of `size` when missing) a target of at least `size` bytes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        have = os.lseek(fd, 0, os.SEEK_END)
        if have < size:
            if stat.S_ISBLK(st.st_mode):
                raise TargetRefused(f"target {path} holds {have} bytes; the window is {size}",
                                    errno=errno.ENOSPC, obj=path)
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _zeros(fd: int) -> bool:
    """A block target counts as empty when its first MiB is zeros (a new sparse file is)."""
    return not any(os.pread(fd, BLOCK, 0))


def _claim(path: str, fd: int, claim: Claim, state_dir: Path, *, empty) -> None:
    """Check the target's marker; claim an empty (or adopted) one; refuse anything else."""
    where = f"/proc/self/fd/{fd}"
    marker, can_mark = None, True
    try:
        marker = os.getxattr(where, MARKER_XATTR).decode(errors="replace")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EOPNOTSUPP):
            can_mark = False
        elif exc.errno != errno.ENODATA:
            raise
    if not can_mark or stat.S_ISBLK(os.fstat(fd).st_mode):
        can_mark = False
        marker = _state_claim(state_dir, fd)
    if marker is not None:
        if claim.mine(marker):
            return
        raise TargetRefused(f"target {path} is {Claim.describe(marker)}: refusing to write to "
                            "another entry's replica", errno=errno.EEXIST, obj=path)
    if not empty() and not claim.adopt:
        raise TargetRefused(f"target {path} is not empty and carries no mirrorsetup marker: "
                            "refusing to overwrite it; to replace its contents with this entry's "
                            "replica, set the entry's adopt_target (CLI: --adopt-target)",
                            errno=errno.ENOTEMPTY, obj=path)
    if can_mark:
        os.setxattr(where, MARKER_XATTR, claim.marker().encode())
    else:
        st = os.fstat(fd)
        write_small_file(state_dir, CLAIM_FILE, json.dumps(
            {**json.loads(claim.marker()), "dev": st.st_dev, "ino": st.st_ino, "rdev": st.st_rdev}))


def _state_claim(state_dir: Path, fd: int) -> str | None:
    """The state-directory claim of this very target (by device/inode), if any."""
    text = read_small_file(state_dir, CLAIM_FILE)
    if not text:
        return None
    d = marker_fields(text)  # (a marker's fields and the target's identity)
    if d is None:  # damaged: no claim of ours (the target is judged as unmarked)
        return None
    st = os.fstat(fd)
    same = d.get("rdev") == st.st_rdev if st.st_rdev else (d.get("dev"), d.get("ino")) == (st.st_dev, st.st_ino)
    return json.dumps({"entry": d.get("entry"), "host": d.get("host")}, sort_keys=True) if same else None


@contextlib.contextmanager
def opened(target: Target):
    target.open()
    try:
        yield target
    finally:
        target.close()
