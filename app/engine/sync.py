"""Whole-tree work between an entry's lower tree and its target: reconcile and verify.

One algorithm serves the initial copy, `fs mirror`, the resync after a capture gap and the
catching-up after a daemon or worker died: walk the source, compare each path with the target
(quick: size and mtime, then 1 MiB block hashes of the files that differ; or hashes of every
file), and emit the ordinary journal records (create, write, mkdir, prune, link, chmod…) that
make the target's copy equal. A `Sink` takes them: offline they are applied to the target at
once; while capture goes on they are appended to the journal, each path's records committed
atomically with a check that the source path did not change since it was read (`Tracker`,
kept by the capture). So the target ends equal to the source however applications write
meanwhile; the records' order is the journal's order.

Why that is enough (the argument the code relies on): a record written at position t states
the source's content of a path at t. Records before t were applied before it; records after it
are changes the source made after t. For a path whose *name* was not changed since the
catch-up began, the target's file there is the old one plus captured changes, so comparing
with the target as it was at any moment since the catch-up began (a remote target's answers
lag the journal, and a walk asks them ahead of itself) and sending differing blocks whole is
exact; a path whose name (or a parent's) was created, renamed or linked is sent whole, and
rename/link destinations made during the walk are walked again (`revisit`), since the walk
may have passed them already.

A walk never descends into a file system mounted below the entry (other st_dev): capture does
not cross it, so replication does not either. Paths are relative to directory fds and may be
longer than PATH_MAX (lowlevel.beneath opens the parents of long ones in pieces).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from app.engine.lowlevel import LONG_PATH, beneath, proc_path
from app.services.layout import MARKER_XATTR, sha256_hex

BLOCK = 1 << 20  # file content is compared and sent in blocks of this size
XATTR_PREFIXES = ("user.", "security.", "trusted.", "system.posix_acl_")  # what is replicated, ACLs too
COMMIT_TRIES = 4  # a path that keeps changing is read again this often, then held still once
BATCH_FILES = 64  # small files whose records go to the sink together (one trip to the capture)
BATCH_BYTES = 4 << 20
# a remote target's queries sent ahead of the walk, per directory: a directory of files compared
# by hashes goes this many files per round trip (32: fs mirror of the standard library over a
# 20 ms round trip 5.4 s, 128: 5.0 s; the agent answers in its order with 8 threads)
AHEAD_PER_DIRECTORY = 128
MOVED_LIMIT = 1 << 16  # names a Tracker remembers one by one before it folds them (Tracker)
Progress = Callable[[dict], None]
Op = tuple[str, dict, bytes]


@dataclass
class Info:
    """What a comparison needs of one path, on either side (also carried over the wire)."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int
    ino: tuple[int, int]
    nlink: int = 1
    rdev: int = 0
    link: bytes | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    sha256: str | None = None
    ctime_ns: int = 0  # the source's own (not sent): a catch-up's hint, see Reconciler

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)

    def to_wire(self) -> dict:
        return {"m": self.mode, "u": self.uid, "g": self.gid, "s": self.size, "mt": self.mtime_ns,
                "at": self.atime_ns, "i": list(self.ino), "n": self.nlink, "r": self.rdev,
                "l": None if self.link is None else os.fsdecode(self.link),
                "x": {k: base64.b64encode(v).decode() for k, v in self.xattrs.items()},
                "h": self.sha256}

    @classmethod
    def from_wire(cls, d: dict) -> Info:
        return cls(d["m"], d["u"], d["g"], d["s"], d["mt"], d["at"], tuple(d["i"]), d["n"], d["r"],
                   None if d["l"] is None else os.fsencode(d["l"]),
                   {k: base64.b64decode(v) for k, v in d["x"].items()}, d["h"])


def _join(base: bytes, name: bytes) -> bytes:
    return name if base in (b"", b".") else base + b"/" + name


def lstat_info(dir_fd: int, rel: bytes, *, with_xattrs: bool = True) -> Info:
    if len(rel) < LONG_PATH:  # (beneath's own short way, without a context manager: a walk
        return _lstat_info_at(dir_fd, rel or b".", with_xattrs)  # makes 2-3 calls a file)
    with beneath(dir_fd, rel) as (d, name):
        return _lstat_info_at(d, name, with_xattrs)


def _lstat_info_at(d: int, name: bytes, with_xattrs: bool) -> Info:
    st = os.stat(name, dir_fd=d, follow_symlinks=False)
    info = Info(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_atime_ns,
                (st.st_dev, st.st_ino), st.st_nlink, st.st_rdev, ctime_ns=st.st_ctime_ns)
    if stat.S_ISLNK(st.st_mode):
        info.link = os.readlink(name, dir_fd=d)
    if with_xattrs:
        info.xattrs = _xattrs(proc_path(d, name) if name != b"." else proc_path(d, b""))
    return info


def xattrs(dir_fd: int, rel: bytes) -> dict[str, bytes]:
    with beneath(dir_fd, rel) as (d, name):
        return _xattrs(proc_path(d, name) if name != b"." else proc_path(d, b""))


def _xattrs(path: bytes | int) -> dict[str, bytes]:
    """The replicated extended attributes of `path` (never followed), or of an open file."""
    out = {}
    follow = {} if isinstance(path, int) else {"follow_symlinks": False}
    try:
        names = os.listxattr(path, **follow)
    except OSError:
        return out
    for name in names:
        if name.startswith(XATTR_PREFIXES) and name != MARKER_XATTR:
            try:
                out[name] = os.getxattr(path, name, **follow)
            except OSError:
                continue  # not readable (e.g. a security module hides it): not compared
    return out


def children(dir_fd: int, rel: bytes, *, dev: int | None = None,
             with_xattrs: bool = True) -> dict[bytes, Info] | None:
    """The entries of directory `rel` (None when it is missing or not a directory). With
    `dev`, a directory on another file system (mounted below the entry) is left out: capture
    does not cross into it, so replication does not either. Without `with_xattrs` their
    extended attributes are not read (each entry's `xattrs` is empty)."""
    try:
        with beneath(dir_fd, rel) as (d, name):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise
    try:
        names = sorted(os.fsencode(n) for n in os.listdir(fd))
    finally:
        os.close(fd)
    out = {}
    for name in names:
        try:
            info = lstat_info(dir_fd, _join(rel, name), with_xattrs=with_xattrs)
        except FileNotFoundError:
            continue  # removed since the listing
        if dev is not None and info.ino[0] != dev and stat.S_ISDIR(info.mode):
            continue
        out[name] = info
    return out


def subdirectories(dir_fd: int, rel: bytes) -> list[bytes]:
    """The names of directory `rel`'s subdirectories, in the walk's order, from the directory's
    entry types alone (no stat each); [] when it is missing or not a directory."""
    try:
        with beneath(dir_fd, rel) as (d, name):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
    except OSError:
        return []
    try:
        with os.scandir(fd) as it:
            return sorted(os.fsencode(e.name) for e in it if e.is_dir(follow_symlinks=False))
    except OSError:
        return []
    finally:
        os.close(fd)


def block_hashes(fd: int, size: int, offset: int = 0, block: int = BLOCK) -> list[str]:
    """sha256 of each `block` bytes of [offset, offset + size) of an open file."""
    return [sha256_hex(os.pread(fd, min(block, size - start), offset + start))
            for start in range(0, size, block)]


FOLIO_MAX = 2 << 20  # the largest page-cache folio (x86-64's PMD size), and how each is aligned


def drop_cached(fd: int, start: int = 0, end: int | None = None) -> None:
    """Drop the clean page-cache pages of [start, end) of a raw device or a block replica
    (None: to its end; dirty pages only start their write-back). `start` is rounded down to a
    FOLIO_MAX boundary: the kernel drops only folios wholly inside the range (find_lock_entries),
    and a large folio that began before it would stay.

    Why: a 4 KiB write into a large folio costs a walk of all the folio's buffer heads (in
    `__block_write_begin_int` and `ext4_block_write_begin`). The large folios come from reads
    (the readahead of a whole-device compare) and large writes (a mirror's 1 MiB blocks), and
    a replica file's stay cached after it is closed. Left in place, fio 4 KiB on a captured
    loop took 35 instead of 15-17 us of capture CPU a write. These pages are ours alone:
    applications use the loop device, never the raw device, and nothing else reads a replica."""
    start -= start % FOLIO_MAX
    if end is not None and end <= start:
        return
    length = 0 if end is None else end - start  # 0: to the end
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)


def pread_uncached(fd: int, n: int, offset: int) -> bytes:
    """pread, then what it brought into the page cache dropped (drop_cached): a whole-device
    compare leaves no large folios behind, and does not push the host's files out of memory.
    Nothing past the read is dropped: the readahead the next read needs stays."""
    data = os.pread(fd, n, offset)
    drop_cached(fd, offset, offset + len(data))
    return data


def file_hashes(dir_fd: int, rel: bytes, block: int = BLOCK) -> list[str] | None:
    try:
        fd = open_file(dir_fd, rel)
    except FileNotFoundError:
        return None
    try:
        return block_hashes(fd, os.fstat(fd).st_size, 0, block)
    finally:
        os.close(fd)


def open_file(dir_fd: int, rel: bytes) -> int:
    """A regular file below `dir_fd` for reading, however long its path, never through a link."""
    if len(rel) < LONG_PATH:  # (as lstat_info)
        return os.open(rel or b".", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with beneath(dir_fd, rel) as (d, name):
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)


def whole_hash(hashes: list[str]) -> str:
    """One digest for a file from its block hashes (what verify compares)."""
    return sha256_hex("".join(hashes).encode())


def scan(root_fd: int, *, hashes: bool = True) -> dict[bytes, Info]:
    """Every path below the root (b"" is the root), parents first; files hashed when asked."""
    root = lstat_info(root_fd, b"")
    out: dict[bytes, Info] = {b"": root}
    stack = [b""]
    while stack:
        rel = stack.pop()
        kids = children(root_fd, rel, dev=root.ino[0]) or {}
        for name, info in kids.items():
            child = _join(rel, name)
            if stat.S_ISREG(info.mode) and hashes:
                h = file_hashes(root_fd, child)
                info.sha256 = None if h is None else whole_hash(h)
            out[child] = info
            if stat.S_ISDIR(info.mode):
                stack.append(child)
    return out


# -- verify ------------------------------------------------------------------------------------

LOST_FOUND = b"lost+found"  # at the root: a file system's own, not part of a replica


def without_lost_found(tree: dict[bytes, Info]) -> dict[bytes, Info]:
    """A scan without the root's lost+found and what is below it: a target that is a file
    system's root keeps its own, and an entry that is the mount point of its own ext4 has one."""
    return {rel: info for rel, info in tree.items()
            if rel != LOST_FOUND and not rel.startswith(LOST_FOUND + b"/")}


def compare_trees(src: dict[bytes, Info], dst: dict[bytes, Info],
                  paths: Iterable[bytes] | None = None) -> list[dict]:
    """Every difference between two scans: path, what differs, both values. The root's
    lost+found is no difference (without_lost_found: a target leaves its own out)."""
    diffs: list[dict] = []
    src, dst = without_lost_found(src), without_lost_found(dst)

    def diff(rel: bytes, what: str, a, b) -> None:
        diffs.append({"path": os.fsdecode(rel) or ".", "what": what, "source": a, "target": b})

    for rel in sorted(src.keys() | dst.keys()) if paths is None else sorted(paths):
        a, b = src.get(rel), dst.get(rel)
        if a is None and b is None:
            continue
        if b is None:
            diff(rel, "missing at target", stat.filemode(a.mode), None)
            continue
        if a is None:
            diff(rel, "extra at target", None, stat.filemode(b.mode))
            continue
        if a.kind != b.kind:
            diff(rel, "type", stat.filemode(a.mode), stat.filemode(b.mode))
            continue
        if stat.S_IMODE(a.mode) != stat.S_IMODE(b.mode) and not stat.S_ISLNK(a.mode):
            diff(rel, "mode", oct(stat.S_IMODE(a.mode)), oct(stat.S_IMODE(b.mode)))
        if (a.uid, a.gid) != (b.uid, b.gid):
            diff(rel, "owner", f"{a.uid}:{a.gid}", f"{b.uid}:{b.gid}")
        if a.sha256 != b.sha256:
            diff(rel, "content", a.sha256, b.sha256)
        if a.link != b.link:
            diff(rel, "symlink target", os.fsdecode(a.link or b""), os.fsdecode(b.link or b""))
        if a.kind in (stat.S_IFCHR, stat.S_IFBLK) and a.rdev != b.rdev:
            diff(rel, "device number", a.rdev, b.rdev)
        if a.mtime_ns != b.mtime_ns:
            diff(rel, "mtime", a.mtime_ns, b.mtime_ns)
        if a.xattrs != b.xattrs:
            diff(rel, "xattrs", sorted(a.xattrs), sorted(b.xattrs))
    ga, gb = _link_groups(src), _link_groups(dst)
    for rel in sorted(ga.keys() | gb.keys()):
        if rel in src and rel in dst and ga.get(rel) != gb.get(rel):
            diff(rel, "hard links", sorted(map(os.fsdecode, ga.get(rel, {rel}))),
                 sorted(map(os.fsdecode, gb.get(rel, {rel}))))
    return diffs


def _link_groups(tree: dict[bytes, Info]) -> dict[bytes, frozenset[bytes]]:
    groups: dict[tuple[int, int], set[bytes]] = {}
    for rel, info in tree.items():
        if not stat.S_ISDIR(info.mode) and info.nlink > 1:
            groups.setdefault(info.ino, set()).add(rel)
    return {rel: frozenset(g) for g in groups.values() for rel in g}


# -- reconcile ---------------------------------------------------------------------------------

class Tracker:
    """What capture changed while a reconcile or verify runs (fed on the capture thread): per
    lower inode a stamp of its last change, the inodes created since and when (`clock`), the
    names that rename, link, unlink or rmdir moved (their identity at the target is unknown)
    and, while a walk runs, the rename/link destinations it may already have passed
    (`revisit`, `links`: each walk reads them from where they stood at its start).

    Bounded however long it is held (a catch-up waiting for a target that is away for days,
    under applications that make and remove temporary names all day): `revisit` and `links`
    are kept only while a walk runs, and when `moved` holds MOVED_LIMIT names, the names of
    the directories with the most moved names below them take their place (a name counts as
    moved when a directory above it does: those trees are sent whole by the next catch-up
    rather than compared, and nothing moved is forgotten)."""

    def __init__(self, moved_limit: int | None = None) -> None:
        self.changes: dict[tuple[int, int], int] = {}
        self.created: dict[tuple[int, int], int] = {}  # inode -> clock when it was made
        self.clock = 0
        self.names_epoch = 0
        self.moved: dict[bytes, int] = {}  # path -> names_epoch when it was moved or linked
        self.moved_limit = moved_limit or MOVED_LIMIT
        self.collapsed = 0  # how often `moved` was folded into directories
        self.revisit: list[bytes] = []  # read by each walk from its own place (several at once)
        self.links: list[tuple[bytes, bytes]] = []  # (from, to) of every link recorded
        self.walks = 0  # walks reading `revisit` and `links` now
        self._walks_lock = threading.Lock()

    def begin_walk(self) -> tuple[int, int]:
        """A walk starts (before it lists anything): where it reads `revisit` and `links`
        from. What was recorded before is in the tree it is about to list."""
        with self._walks_lock:
            self.walks += 1
            return len(self.revisit), len(self.links)

    def end_walk(self) -> None:
        with self._walks_lock:
            self.walks -= 1
            if self.walks == 0:  # nobody reads them; the next walk starts from their end
                self.revisit.clear()
                self.links.clear()

    def changed(self, key: tuple[int, int]) -> None:
        self.clock += 1
        self.changes[key] = self.clock

    def made(self, key: tuple[int, int]) -> None:
        self.changed(key)
        self.created[key] = self.clock

    def made_since(self, key: tuple[int, int], clock: int) -> bool:
        """Was the node `key` made after the tracker's clock read `clock`?"""
        return self.created.get(key, -1) > clock

    def moved_name(self, path: bytes, *, destination: bool) -> None:
        self.names_epoch += 1
        self.moved[path] = self.names_epoch
        if len(self.moved) > self.moved_limit:
            self._collapse()
        if destination and self.walks:  # (read after the change was made: a walk that
            self.revisit.append(path)  # starts after this read lists the tree after it)

    def _collapse(self) -> None:
        """Fold `moved` to at most half its limit: the deepest names go into their parent
        directory (with the latest epoch among them), busiest directories first, level by
        level; as a last resort the top directory, b"", stands for every name. Made aside
        and swapped in: a walk thread reading the old one meanwhile sees every name in it."""
        want = max(1, self.moved_limit // 2)
        moved = dict(self.moved)
        while len(moved) > want:
            depth = {p: p.count(b"/") + 1 if p else 0 for p in moved}
            deepest = max(depth.values())
            groups: dict[bytes, list[bytes]] = {}
            for path, d in depth.items():
                if d == deepest:
                    groups.setdefault(path.rpartition(b"/")[0], []).append(path)
            for parent, paths in sorted(groups.items(), key=lambda g: -len(g[1])):
                epoch = max(moved.pop(p) for p in paths)
                moved[parent] = max(epoch, moved.get(parent, 0))
                if len(moved) <= want:
                    break
        self.moved = moved
        self.collapsed += 1

    def observe(self, key: tuple[int, int], op: str, args: dict) -> None:
        """One journal record of the capture: `key` is the inode it was recorded for (the
        new node of a create, the parent directory of a removal or rename)."""
        if op in ("create", "mkdir", "mknod", "symlink"):
            self.made(key)
        elif op == "rename":
            self.changed(key)
            self.moved_name(os.fsencode(args["old"]), destination=bool(args.get("flags", 0) & 2))
            self.moved_name(os.fsencode(args["new"]), destination=True)
        elif op == "link":
            self.changed(key)
            self.moved_name(os.fsencode(args["path"]), destination=True)
            if "src" in args and self.walks:
                self.links.append((os.fsencode(args["src"]), os.fsencode(args["path"])))
        elif op in ("unlink", "rmdir"):  # `key` is the parent: the node itself keeps its
            self.changed(key)  # stamp, so a walk's check of that name would have passed
            self.moved_name(os.fsencode(args["path"]), destination=False)
        else:
            self.changed(key)

    def stamp(self, key: tuple[int, int]) -> tuple[int, int]:
        return self.changes.get(key, 0), self.names_epoch

    def name_touched(self, rel: bytes, since: int = 0) -> bool:
        """Was `rel`, or a directory above it, renamed or linked (after epoch `since`)?"""
        moved = self.moved  # (one of them: _collapse swaps a new one in)
        if not moved:
            return False
        probe = rel
        while True:
            if moved.get(probe, 0) > since:
                return True
            if not probe:
                return False
            probe = probe.rpartition(b"/")[0]

    def leads(self, leader: tuple[bytes, int], key: tuple[int, int], lstat_key) -> bool:
        """Does the name `leader` = (path, names epoch it was sent under) still hold file
        `key`, not moved or removed since?"""
        rel, epoch = leader
        return not self.name_touched(rel, epoch) and lstat_key(rel) == key

    def still(self, check: Check, lstat_key) -> bool:
        """Is the source at `check.rel` as it was read (and, for a hard link the walk makes,
        does the name it links from still name the same file)? `lstat_key(rel)` gives the
        inode a path names now."""
        changes, epoch = check.stamp
        if self.changes.get(check.key, 0) != changes:
            return False
        if check.leader is not None and not self.leads(check.leader, check.key, lstat_key):
            return False
        if self.names_epoch == epoch:
            return True
        return not self.name_touched(check.rel, epoch) and lstat_key(check.rel) == check.key


@dataclass
class Check:
    """What a commit verifies: the source path still names the same inode, unchanged."""

    rel: bytes
    key: tuple[int, int]
    stamp: tuple[int, int]
    # a link's: the name it links from (sent before) and the names epoch it was sent under
    leader: tuple[bytes, int] | None = None


@dataclass(slots=True)
class _Leader:
    """The name of a file with several that the walk sent (Reconciler._hard_link)."""

    rel: bytes
    tino: tuple[int, int] | None  # its inode at the target, when the target listed it
    epoch: int  # the names epoch before it was sent
    stamp: int  # the file's change stamp then
    anew: int  # how many names visits had sent anew then (Reconciler._anew)
    linked: list[bytes] = field(default_factory=list)  # names linked to it since


class Sink:
    """Where reconcile records go. `commit` returns False when the check failed (the path
    changed since it was read): the reconciler reads it again."""

    tracker: Tracker | None = None

    def commit(self, check: Check | None, ops: list[Op]) -> bool:
        raise NotImplementedError

    def commit_many(self, items: list[tuple[Check | None, list[Op]]]) -> list[bool | None]:
        """Several commits in order (one trip where that costs), each checked on its own. After
        the first that fails its check none is tried (None): the reconciler does that one
        again, then sends them, so records keep the walk's order (a directory's times after
        its files')."""
        done: list[bool | None] = []
        for check, ops in items:
            done.append(self.commit(check, ops) if all(done) else None)
        return done

    def frozen(self):
        """A context in which the source does not change (capture holds mutations)."""
        raise NotImplementedError


class Reconciler:
    """Make the target equal to the source tree. `hashes` compares every file's content by
    block hashes (mirror); otherwise files with equal size and mtime are taken as equal."""

    def __init__(self, src_fd: int, target, sink: Sink, *, hashes: bool = False,
                 progress: Progress | None = None, block: int = BLOCK, put: bool = True,
                 changed_since_ns: int | None = None):
        """`put`: a small file the target lacks may go as one "put" record (False when
        whoever applies the records may not know it: a source of wire version 1).
        `changed_since_ns`: when capture was not in place (a catch-up after a clean stop): a
        file whose ctime is that late is compared by hashes even with equal size and mtime
        (a walk found a same-size rewrite with its mtime put back missed for good)."""
        self.changed_since_ns = changed_since_ns
        self.src = src_fd
        self.target = target
        self.sink = sink
        self.hashes = hashes
        self.progress = progress
        self.block = block
        self.put = put
        self.dev = os.stat(b".", dir_fd=src_fd).st_dev
        self.counts = {"files": 0, "copied": 0, "bytes": 0, "removed": 0}
        self._leaders: dict[tuple[int, int], _Leader] = {}  # per inode with several names
        self._anew: list[bytes] = []  # names visits sent anew (removed there first), in order
        # Small files' records wait here and go to the sink together; anything else the sink
        # gets sends them first, so records keep the walk's order (a directory's times after
        # its files, a hard link after the file it names).
        self._pending: list[tuple[Check | None, list[Op], Callable[[bool], None]]] = []
        self._pending_bytes = 0

    @property
    def tracker(self) -> Tracker | None:
        return self.sink.tracker

    def _unknown(self, rel: bytes) -> bool:
        return self.tracker is not None and self.tracker.name_touched(rel)

    def run(self) -> dict:
        # every file compared by hashes: a remote target's listings may bring them along
        by_hashes = getattr(self.target, "compare_by_hashes", None) if self.hashes else None
        if by_hashes is not None:
            by_hashes(True)
        tracker = self.tracker
        revisited, links = tracker.begin_walk() if tracker is not None else (0, 0)
        try:
            root = self.target.info(b"")
            self._dir(b"", known=root is not None and stat.S_ISDIR(root.mode))
            # (revisited, links: places of this walk's own.) A destination is visited once
            # for the renames recorded before its visit began; one recorded after that (its
            # source maybe sent by the visit of another, still in the batch) is visited again
            began: dict[bytes, int] = {}  # destination -> len(revisit) when its visit began
            while tracker is not None:
                if revisited < len(tracker.revisit):
                    rel = tracker.revisit[revisited]
                    revisited += 1
                    if began.get(rel, -1) < revisited:
                        began[rel] = len(tracker.revisit)
                        self._visit(rel)
                elif links < len(tracker.links):
                    made, links = tracker.links[links:], len(tracker.links)
                    self._relink(made)
                elif self._pending:
                    # The batch goes before the walk is called done: a rename or link the
                    # capture took while it waited (its commit's check then fails, the name
                    # read again is gone) has its destination above, to be visited
                    self._flush()
                else:
                    break
            self._flush()
        finally:
            if tracker is not None:
                tracker.end_walk()
            if by_hashes is not None:
                by_hashes(False)
        self._report(final=True)
        return self.counts

    # -- commits
    def _commit(self, check: Check | None, ops: list[Op]) -> bool:
        """Commit now, after what waits in the batch, in one trip to the sink. False: the
        check failed (the path changed since it was read)."""
        while True:  # None: one before it failed, was done again, the rest wait again
            ok = self._trip((check, ops))
            if ok is not None:
                return ok

    def _frozen(self):
        self._flush()
        return self.sink.frozen()

    def _defer(self, check: Check | None, ops: list[Op], done: Callable[[bool], None]) -> None:
        """Commit with the next batch; `done(committed)` is called then."""
        self._queue((check, ops, done))
        if len(self._pending) >= BATCH_FILES or self._pending_bytes >= BATCH_BYTES:
            self._flush()

    def _queue(self, item: tuple[Check | None, list[Op], Callable[[bool], None]]) -> None:
        self._pending.append(item)
        self._pending_bytes += sum(len(o[2]) for o in item[1])

    def _flush(self) -> None:
        while self._pending:
            self._trip()

    def _trip(self, now: tuple[Check | None, list[Op]] | None = None) -> bool | None:
        """One trip to the sink: the batch, then `now` if given (its outcome is returned).
        Each deferred commit's outcome goes to its `done` callback, in order; those the sink
        did not try (after one that failed, which is done again first) wait for the next."""
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        done = self.sink.commit_many([(c, o) for c, o, _ in batch] + ([now] if now else []))
        for ok, item in zip(done, batch):
            if ok is None:
                self._queue(item)
            else:
                item[2](ok)
        return done[-1] if now else None

    def _report(self, final: bool = False) -> None:
        if self.progress and (final or self.counts["files"] % 100 == 0):
            self.progress(dict(self.counts, stage="done" if final else "walking"))

    def _visit(self, rel: bytes) -> None:
        """A rename/link destination made during the walk: reconcile it (whole) again. What
        it sends goes there anew (removed first): a file with several names that leads from
        below it no longer holds the other names' file there (_hard_link)."""
        self._anew.append(rel)
        listed = self._clock()
        try:
            info = lstat_info(self.src, rel)
        except FileNotFoundError:
            return  # moved on again: its new name is in the queue too
        parent, _, name = rel.rpartition(b"/")
        self._child(parent, name, info, None, listed)
        self._metadata(parent, None)  # sending it again changed the parent's times there

    # -- directories
    def _dir(self, rel: bytes, *, known: bool, made: Info | None = None) -> None:
        for _ in range(COMMIT_TRIES):
            src_info = lstat_info(self.src, rel, with_xattrs=False)  # (its inode, for the check)
            check = self._check(rel, src_info)
            listed = self._clock()
            kids = self._listing(rel)
            if kids is None:
                return  # gone since: the capture recorded its removal
            if not known:  # the walk made it at the target just now: since then only the
                tgt = None  # capture put anything there, nodes made after it (nothing to prune)
                break
            tgt = self.target.children(rel) if not self._unknown(rel) else None
            keep = [os.fsdecode(n) for n in kids]
            if self._commit(check, [("prune", {"path": os.fsdecode(rel), "keep": keep}, b"")]):
                break
        else:
            with self._frozen():
                listed = self._clock()
                kids = self._listing(rel) or {}
                tgt = self.target.children(rel) if known and not self._unknown(rel) else None
                self._commit(None, [("prune", {"path": os.fsdecode(rel), "keep":
                                                   [os.fsdecode(n) for n in kids]}, b"")])
        if tgt is not None:
            self.counts["removed"] += len(tgt.keys() - kids.keys())
        ahead = self._ahead(rel, kids, tgt)
        try:
            for i, (name, info) in enumerate(kids.items()):
                if ahead is not None:
                    ahead.top_up(i)
                self._child(rel, name, info, None if tgt is None else tgt.get(name), listed)
        finally:
            if ahead is not None:
                ahead.forget()
        self._metadata(rel, made, defer=True)

    def _listing(self, rel: bytes) -> dict[bytes, Info] | None:
        """Directory `rel`'s entries without their extended attributes: whatever a record
        states of a path's metadata is read again after its check's stamp (_file_once's
        `now`, _metadata), never taken from the listing, which read each entry's twice (a
        listxattr through /proc per entry, 7 % of a first copy's walk in py-spy)."""
        return children(self.src, rel, dev=self.dev, with_xattrs=False)

    def _ahead(self, rel: bytes, kids: dict[bytes, Info], tgt: dict[bytes, Info] | None
               ) -> Ahead | None:
        """The queries this directory's children will make of a remote target (listings of
        directories, hashes of files that differ), to be sent before they are needed."""
        if not tgt or getattr(self.target, "ask_ahead", None) is None:
            return None
        wanted = []
        for i, (name, info) in enumerate(kids.items()):
            t = tgt.get(name)
            if t is None or t.kind != info.kind:
                continue  # sent whole: nothing asked
            if info.kind == stat.S_IFREG and (self.hashes or t.size != info.size
                                              or t.mtime_ns != info.mtime_ns
                                              or self._changed_since(info)):
                wanted.append((i, "file_hashes", _join(rel, name)))
            elif info.kind == stat.S_IFDIR:
                child = _join(rel, name)
                wanted.append((i, "children", child))
                # and its own subdirectories' listings (their names here; there they may be
                # missing, and the answer says so): entering `child` the walk needs the first
                # of them at once, and asked only then, each directory cost a round trip
                wanted += [(i, "children", _join(child, sub))
                           for sub in subdirectories(self.src, child)]
        return Ahead(self.target, wanted) if wanted else None

    def _child(self, parent: bytes, name: bytes, info: Info, tinfo: Info | None,
               listed: int) -> None:
        """`info` as a listing read it, after the tracker's clock read `listed`. A node the
        capture made before that listing is sent like any other: its records may have reached
        the target before the directory it is in did (the walk makes that one later: a create
        there fails), or the walk's own records about a directory above it (a rename's
        destination made again) may have removed it there since."""
        rel = _join(parent, name)
        if self._unknown(rel):
            tinfo = None
        self.counts["files"] += 1
        self._report()
        kind = info.kind
        if kind == stat.S_IFDIR:
            fresh = tinfo is None or tinfo.kind != stat.S_IFDIR
            ops: list[Op] = []
            if fresh:
                ops = [("remove", {"path": os.fsdecode(rel)}, b""),
                       ("mkdir", {"path": os.fsdecode(rel), "mode": stat.S_IMODE(info.mode),
                                  "uid": info.uid, "gid": info.gid}, b"")]
            if ops and not self._commit_fresh(rel, info, listed, ops):
                return
            self._dir(rel, known=not fresh, made=_made(info) if fresh else None)
            return
        if kind == stat.S_IFREG and info.nlink > 1 and self._hard_link(rel, info, tinfo, listed):
            return
        if kind == stat.S_IFREG:
            self._file(rel, info, tinfo)
            return
        gone = ("remove", {"path": os.fsdecode(rel)}, b"")
        if kind == stat.S_IFLNK:
            if tinfo is None or tinfo.kind != kind or tinfo.link != info.link:
                if not self._commit_fresh(rel, info, listed, [
                        gone, ("symlink", {"path": os.fsdecode(rel), "target": os.fsdecode(info.link),
                                     "uid": info.uid, "gid": info.gid}, b"")]):
                    return
                self.counts["copied"] += 1
                tinfo = None
        elif tinfo is None or tinfo.kind != kind or tinfo.rdev != info.rdev:
            if not self._commit_fresh(rel, info, listed, [
                    gone, ("mknod", {"path": os.fsdecode(rel), "mode": info.mode, "rdev": info.rdev,
                               "uid": info.uid, "gid": info.gid}, b"")]):
                return
            self.counts["copied"] += 1
            tinfo = None
        self._metadata(rel, tinfo)

    def _commit_fresh(self, rel: bytes, info: Info, listed: int, ops: list[Op],
                      leader: tuple[bytes, int] | None = None) -> bool | None:
        """Commit records made from `info`; False when the path is gone or was replaced since
        `info` was read (capture has it: what was made meanwhile is in the journal whole).
        A link's `leader` (the name it links from, the names epoch it was sent under) is
        checked with it: None when that name no longer holds the file (_hard_link)."""
        for _ in range(COMMIT_TRIES):
            if leader is not None and self._led_astray(leader, info):
                return None
            check = self._check(rel, info)
            if check is not None:
                check.leader = leader
                # looked at again after the stamp: a name removed and made anew between the
                # listing and the stamp is another node (or the same inode number, reused,
                # made since the listing), which the check alone cannot see
                try:
                    now = lstat_info(self.src, rel, with_xattrs=False)
                except FileNotFoundError:
                    return False
                if (now.ino, now.kind, now.link, now.rdev) != (info.ino, info.kind, info.link,
                                                               info.rdev) \
                        or self.tracker.made_since(now.ino, listed):
                    return False
            if self._commit(check, ops):
                return True
            try:
                fresh = lstat_info(self.src, rel)
            except FileNotFoundError:
                return False
            if fresh.kind != info.kind:
                return False  # replaced by another kind: the capture recorded that
        with self._frozen():
            try:
                lstat_info(self.src, rel)
            except FileNotFoundError:
                return False
            if leader is not None and self._led_astray(leader, info):
                return None
            return self._commit(None, ops)

    def _hard_link(self, rel: bytes, info: Info, tinfo: Info | None, listed: int) -> bool:
        """A name of a file with several: False for the first (the caller sends it), which
        leads; any other is linked to the leader at the target (True). The leader leads while
        its name holds the file there as sent: not once that name was renamed or removed (the
        capture's records moved it at the target, a link from it there found nothing), sent
        anew by a visit, or the file was changed since (through a name not at the target yet
        the capture's record was superseded there, and a link would not carry it). Then this
        name leads: sent whole, the names linked before linked to it again (_lead_again)."""
        leader = self._leaders.get(info.ino)
        if leader is None:
            self._leaders[info.ino] = self._leader(rel, info, None if tinfo is None else tinfo.ino)
            return False
        if tinfo is not None and leader.tino is not None and tinfo.ino == leader.tino:
            leader.linked.append(rel)
            return True
        if self._still_leads(leader, info):
            done = self._link(leader.rel, leader.epoch, rel, info, listed)
            if done is not None:
                if done:
                    leader.linked.append(rel)
                return True
        self._lead_again(info.ino, [rel, leader.rel, *leader.linked])
        return True

    def _leader(self, rel: bytes, info: Info, tino: tuple[int, int] | None) -> _Leader:
        """`rel` leads for `info`'s file (stamps read before it is sent)."""
        epoch, stamp = (0, 0) if self.tracker is None else \
            (self.tracker.names_epoch, self.tracker.changes.get(info.ino, 0))
        return _Leader(rel, tino, epoch, stamp, len(self._anew))

    def _still_leads(self, leader: _Leader, info: Info) -> bool:
        """Not sent anew by a visit nor changed since it was sent (moves: _led_astray)."""
        rel = leader.rel
        if any(rel == p or rel.startswith(p + b"/") for p in self._anew[leader.anew:]):
            return False
        return self.tracker is None or self.tracker.changes.get(info.ino, 0) == leader.stamp

    def _lead_again(self, ino: tuple[int, int], names: list[bytes]) -> None:
        """The first of `names` that still names file `ino` is sent whole and leads; the
        others that do are linked to it (or they stay a copy of their own at the target).
        Each name so sent was removed there first: its directory's times there moved, and go
        again (as a visit's do), else the target kept them (a directory the walk had finished,
        or the top of a first copy that relinked at its end: verify found its mtime newer)."""
        sent: list[bytes] = []
        for i, rel in enumerate(names):
            info = self._lstat(rel, with_xattrs=True)
            if info is None or info.ino != ino or info.kind != stat.S_IFREG:
                continue
            leader = self._leaders[ino] = self._leader(rel, info, None)
            listed = self._clock()
            self._file(rel, info, None)
            sent.append(rel)
            if self._led_astray((rel, leader.epoch), info):
                continue  # moved or removed while it went: the next name leads
            for other in dict.fromkeys(names[i + 1:]):
                now = self._lstat(other)
                if other != rel and now is not None and now.ino == ino and \
                        self._link(rel, leader.epoch, other, now, listed):
                    leader.linked.append(other)
                    sent.append(other)
            break
        for parent in dict.fromkeys(name.rpartition(b"/")[0] for name in sent):
            self._metadata(parent, None)

    def _relink(self, links: list[tuple[bytes, bytes]]) -> None:
        """Links the capture made while the walk ran. Such a record found its source name at
        the target only when the walk had sent it before; the walk, meeting the new name (a
        file it had not seen with two names), then sent it whole: a copy of its own there
        (bench/catchup_race.py). A file so linked whose names are not all the walk's leader
        and the names it linked to it is sent again from one of them and linked from the
        others, the names the walk knew for it included."""
        files: dict[tuple[int, int], list[bytes]] = {}
        for pair in links:
            for rel in pair:
                info = self._lstat(rel)
                if info is not None and info.kind == stat.S_IFREG:
                    files.setdefault(info.ino, []).append(rel)
        for ino, names in files.items():
            leader = self._leaders.get(ino)
            if leader is not None and set(names) <= {leader.rel, *leader.linked}:
                continue  # one file there already
            self._lead_again(ino, names + ([leader.rel, *leader.linked] if leader else []))

    def _link(self, lrel: bytes, lepoch: int, rel: bytes, info: Info, listed: int) -> bool | None:
        return self._commit_fresh(rel, info, listed, [("link", {"src": os.fsdecode(lrel),
                                                                "path": os.fsdecode(rel)}, b"")],
                                  leader=(lrel, lepoch))

    def _led_astray(self, leader: tuple[bytes, int], info: Info) -> bool:
        """Does the name a link would be made from no longer hold `info`'s file as sent?"""
        if self.tracker is not None:
            return not self.tracker.leads(leader, info.ino, self._ino)
        return self._ino(leader[0]) != info.ino

    def _ino(self, rel: bytes) -> tuple[int, int] | None:
        info = self._lstat(rel)
        return None if info is None else info.ino

    def _lstat(self, rel: bytes, with_xattrs: bool = False) -> Info | None:
        """`rel` as it is now, None when there is no such name any more."""
        try:
            return lstat_info(self.src, rel, with_xattrs=with_xattrs)
        except (FileNotFoundError, NotADirectoryError):
            return None

    # -- files
    def _file(self, rel: bytes, info: Info, tinfo: Info | None, defer: bool = True) -> None:
        for _ in range(COMMIT_TRIES):
            if self._file_once(rel, info, tinfo, defer=defer):
                return
            defer = False
            try:
                info = lstat_info(self.src, rel)
            except FileNotFoundError:
                return
            if info.kind != stat.S_IFREG:
                return
        with self._frozen():
            try:
                info = lstat_info(self.src, rel)
            except FileNotFoundError:
                return
            self._file_once(rel, info, tinfo, frozen=True)

    def _changed_since(self, info: Info) -> bool:
        return self.changed_since_ns is not None and info.ctime_ns >= self.changed_since_ns

    def _file_once(self, rel: bytes, info: Info, tinfo: Info | None, frozen: bool = False,
                   defer: bool = False) -> bool:
        """Send what differs; False when the file changed meanwhile (read it again). With
        `defer`, a file whose records fit one commit goes with the next batch: True then,
        and should that commit's check fail, the file is done again (not deferred)."""
        p = os.fsdecode(rel)
        fresh = tinfo is None or tinfo.kind != stat.S_IFREG
        same = not fresh and not self.hashes and tinfo.size == info.size \
            and tinfo.mtime_ns == info.mtime_ns \
            and not self._changed_since(info)
        check = None if frozen else self._check(rel, info)
        if same:
            return self._metadata(rel, tinfo, check, frozen)
        theirs = None
        if not fresh:
            try:
                theirs = self.target.file_hashes(rel)
            except FileNotFoundError:
                theirs = None
            fresh = theirs is None  # renamed or removed there meanwhile (the applier): whole
        try:
            fd = open_file(self.src, rel)
        except FileNotFoundError:
            return False  # renamed or removed since the walk saw it: looked at again
        try:
            # Read again after the check's stamp: what changes from here on fails the commit
            # (read again), what changed before is seen here; so the metadata can go in the
            # same commit as the data (one trip to the capture thread per small file).
            try:
                now = lstat_info(self.src, rel, with_xattrs=False)
            except FileNotFoundError:
                return False
            if now.ino != info.ino or now.kind != stat.S_IFREG:
                return False
            # its extended attributes through the file it opened, whose data it sends (through
            # /proc by name a listxattr took 7.9 us, on the fd 0.8: a tenth of the walk's time);
            # should the name hold another file since it was opened, its names moved, and the
            # commit's check fails
            now.xattrs = _xattrs(fd)
            info = now
            if fresh and self.put and info.size <= self.block:
                return self._put(rel, info, fd, check, frozen, defer, tinfo)
            ops: list[Op] = []
            if fresh:
                ops += [("remove", {"path": p}, b""),
                        ("create", {"path": p, "mode": stat.S_IMODE(info.mode), "uid": info.uid,
                                    "gid": info.gid}, b"")]
            sent, parts = 0, False
            for i, start in enumerate(range(0, info.size, self.block)):
                data = os.pread(fd, min(self.block, info.size - start), start)
                if theirs is not None and i < len(theirs) and \
                        sha256_hex(data) == theirs[i]:
                    continue
                ops.append(("write", {"path": p, "offset": start}, data))
                sent += len(data)
                if sum(len(o[2]) for o in ops) >= 8 * self.block:  # commit large files in parts
                    if not self._commit(check, ops):
                        return False
                    ops, parts = [], True
            if fresh or tinfo.size != info.size:
                ops.append(("truncate", {"path": p, "size": info.size}, b""))
            changed = fresh or sent or tinfo.size != info.size
            # writing the target moved its mtime: the times go again whenever anything was
            # written (a file made here has the owner and mode its create record gave it)
            ops += self._metadata_ops(rel, info, _made(info) if fresh else None if changed
                                      else tinfo)
            if ops and defer and not frozen and not parts:
                def then(ok: bool, info: Info = info) -> None:
                    if not ok:
                        self._file(rel, info, tinfo, defer=False)
                    elif changed:
                        self._count(sent)
                self._defer(check, ops, then)
                return True
            if ops and not self._commit(check, ops):
                return False
        finally:
            os.close(fd)
        if changed:
            self._count(sent)
        return True

    def _put(self, rel: bytes, info: Info, fd: int, check: Check | None, frozen: bool,
             defer: bool, tinfo: Info | None) -> bool:
        """A small file the target does not have as one record: remove, create, write,
        truncate and, unless extended attributes come after it, times."""
        data = os.pread(fd, info.size, 0) if info.size else b""
        args = {"path": os.fsdecode(rel), "mode": stat.S_IMODE(info.mode), "uid": info.uid,
                "gid": info.gid, "size": info.size}
        meta = self._metadata_ops(rel, info, _made(info))
        if [op for op, _, _ in meta] == ["times"]:
            args.update(atime=info.atime_ns, mtime=info.mtime_ns)
            meta = []
        ops: list[Op] = [("put", args, data), *meta]
        if defer and not frozen:
            def then(ok: bool) -> None:
                if not ok:
                    self._file(rel, info, tinfo, defer=False)
                else:
                    self._count(len(data))
            self._defer(check, ops, then)
            return True
        if not self._commit(check, ops):
            return False
        self._count(len(data))
        return True

    def _count(self, sent: int) -> None:
        self.counts["copied"] += 1
        self.counts["bytes"] += sent

    # -- metadata
    def _metadata(self, rel: bytes, tinfo: Info | None, check: Check | None = None,
                  frozen: bool = False, defer: bool = False) -> bool:
        """Owner, mode, xattrs and times as the source has them now (checked like the data;
        a path that keeps changing is held still once, like a file's data: the capture
        records later changes, never the state a refused commit would have sent). `defer`:
        with the next batch; done again, not deferred, should its check fail then."""
        for _ in range(0 if frozen else COMMIT_TRIES):
            try:
                info = lstat_info(self.src, rel)
                if check is None or check.key != info.ino:
                    check = self._check(rel, info)
                    if check is not None:
                        # read again after the stamp: a change between the first read and the
                        # stamp was in the stamp, and its times would have gone out stale
                        info = lstat_info(self.src, rel)
            except FileNotFoundError:
                return True
            if check is not None and check.key != info.ino:
                check = None  # replaced meanwhile: read and stamp it anew
                continue
            ops = self._metadata_ops(rel, info, tinfo)
            if ops and defer:
                def then(ok: bool) -> None:
                    if not ok:
                        self._metadata(rel, tinfo)
                self._defer(check, ops, then)
                return True
            if not ops or self._commit(check, ops):
                return True
            check = None
        with contextlib.nullcontext() if frozen else self._frozen():
            try:
                info = lstat_info(self.src, rel)
            except FileNotFoundError:
                return True
            ops = self._metadata_ops(rel, info, tinfo)
            return not ops or self._commit(None, ops)

    @staticmethod
    def _metadata_ops(rel: bytes, info: Info, tinfo: Info | None) -> list[Op]:
        p = os.fsdecode(rel)
        ops: list[Op] = []
        if tinfo is None or (tinfo.uid, tinfo.gid) != (info.uid, info.gid):
            ops.append(("chown", {"path": p, "uid": info.uid, "gid": info.gid}, b""))
        if not stat.S_ISLNK(info.mode) and (tinfo is None or stat.S_IMODE(tinfo.mode)
                                             != stat.S_IMODE(info.mode)):
            ops.append(("chmod", {"path": p, "mode": stat.S_IMODE(info.mode)}, b""))
        have = {} if tinfo is None else tinfo.xattrs
        for name in have.keys() - info.xattrs.keys():
            ops.append(("removexattr", {"path": p, "name": name}, b""))
        for name, value in info.xattrs.items():
            if have.get(name) != value:
                ops.append(("setxattr", {"path": p, "name": name}, value))
        if tinfo is None or tinfo.mtime_ns != info.mtime_ns:
            ops.append(("times", {"path": p, "atime": info.atime_ns, "mtime": info.mtime_ns}, b""))
        return ops

    def _clock(self) -> int:
        """The tracker's clock now: read before a listing, what is made later is newer."""
        return 0 if self.tracker is None else self.tracker.clock

    def _check(self, rel: bytes, info: Info) -> Check | None:
        if self.tracker is None:
            return None
        return Check(rel, info.ino, self.tracker.stamp(info.ino))


class Ahead:
    """Queries a walk will make of a remote target, sent ahead of the walk (over a long link
    a walk waited a round trip per directory, and per file compared by hashes): of one
    directory's children, at most AHEAD_PER_DIRECTORY beyond the child the walk is at, so a
    subdirectory the walk goes into gets its own queries out too."""

    def __init__(self, target, wanted: list[tuple[int, str, bytes]]):
        self.target, self.wanted = target, wanted  # (index among the children, method, path)
        self.next = self.passed = 0

    def top_up(self, at: int) -> None:
        """The walk is at child `at`: ask, in its order, what the window now allows."""
        while self.passed < len(self.wanted) and self.wanted[self.passed][0] < at:
            self.passed += 1
        while (self.next < len(self.wanted) and self.next - self.passed < AHEAD_PER_DIRECTORY
               and self.target.ask_ahead(*self.wanted[self.next][1:])):
            self.next += 1

    def forget(self) -> None:
        """The directory is done: answers asked for and not used are dropped."""
        self.target.forget_ahead([w[1:] for w in self.wanted[:self.next]])


def _made(info: Info) -> Info:
    """What the target has right after a create or mkdir record made from `info`: its owner
    and mode (the record sets them), no extended attributes, times not yet set."""
    return Info(info.mode, info.uid, info.gid, 0, -1, -1, (0, 0))


class DirectSink(Sink):
    """Offline: records go straight to the target (nobody captures this source now)."""

    def __init__(self, target):
        self.target = target

    def commit(self, check: Check | None, ops: list[Op]) -> bool:
        self.target.apply_ops(ops)
        return True

    def frozen(self):
        import contextlib
        return contextlib.nullcontext()
