"""Mounts: mount(2)/umount2(2), the kernel's mount table, and a watcher that wakes on changes.

The kernel's `/proc/self/mountinfo` is the only truth for what is mounted. Paths in it are
bytes (a mount point need not be UTF-8), with space, tab, newline and backslash written as
octal escapes (`\\040`); we turn them back into bytes and then into `str` with `os.fsdecode`
(surrogateescape), so every name round-trips to `os.fsencode` exactly.
"""

from __future__ import annotations

import errno as errno_module
import functools
import os
import re
import select
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from app.services.results import MirrorError

TYPE_CHECKING = False  # typing is not imported at run time: ~5 ms of every command's start
if TYPE_CHECKING:
    from typing import Union
    PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

# mount(2) flags, <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

# umount2(2) flags
MNT_FORCE = 1
MNT_DETACH = 2
MNT_EXPIRE = 4
UMOUNT_NOFOLLOW = 8

MOUNTINFO = "/proc/self/mountinfo"
OPTIONAL_END = "-"  # separates the optional fields from fstype/source/super options
READ_CHUNK = 1 << 20  # the table can be megabytes with thousands of mounts; read to EOF anyway

# The kernel escapes these with seq_escape() as \ooo; "#" only in the source field.
_OCTAL = re.compile(rb"\\([0-3][0-7][0-7])")



@functools.cache
def _libc():
    """The C library's mount calls, loaded at the first use: a command that only reads the
    mount table (attach-all, status) does not pay for ctypes."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: glibc or musl
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_void_p]
    libc.mount.restype = ctypes.c_int
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.umount2.restype = ctypes.c_int
    libc.syscall.restype = ctypes.c_long
    return libc


def _errno() -> int:
    import ctypes
    return ctypes.get_errno()


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo (see proc(5)); paths are str that round-trip through os.fsencode."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    options: str
    optional: tuple[str, ...]
    fstype: str
    source: str
    super_options: str

    def to_json(self) -> dict:
        data = asdict(self)  # exact names; json.dumps writes undecodable bytes as \udcXX
        data["optional"] = list(self.optional)
        return data


@dataclass(frozen=True)
class MountDiff:
    """What changed between two reads of the table; `changed` pairs are (old, new)."""

    added: tuple[MountEntry, ...] = ()
    removed: tuple[MountEntry, ...] = ()
    changed: tuple[tuple[MountEntry, MountEntry], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def decode_field(raw: str) -> str:
    """Undo the kernel's \\ooo escapes at byte level, so escaped and raw bytes join correctly."""
    if "\\" not in raw:  # nothing escaped: the str already is os.fsdecode of the bytes
        return raw
    data = _OCTAL.sub(lambda m: bytes((int(m.group(1), 8),)), os.fsencode(raw))
    return os.fsdecode(data)


def _parse_line(line: str) -> MountEntry:
    # Split on " " only: a raw \r, \v or \f may sit inside a name (the kernel escapes only
    # space, tab, newline, backslash), and an empty source gives an empty field.
    fields = line.split(" ")
    try:
        end = fields.index(OPTIONAL_END, 6)
        major, minor = fields[2].split(":")
        fstype, source, super_options = fields[end + 1:end + 4]
        return MountEntry(int(fields[0]), int(fields[1]), int(major), int(minor),
                          decode_field(fields[3]), decode_field(fields[4]), fields[5],
                          tuple(fields[6:end]), decode_field(fstype), decode_field(source),
                          decode_field(super_options))
    except ValueError as exc:
        raise MirrorError(f"unreadable mountinfo line {_display(line)!r}: {exc}",
                          errno=errno_module.EINVAL, obj=MOUNTINFO) from None


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Lines end with "\\n" only; str.splitlines() would also cut at a raw \\r in a name."""
    return [_parse_line(line) for line in text.split("\n") if line]


def _read_all(fd: int) -> bytes:
    """Read a seq_file from offset 0 to EOF (one read() returns at most a page or so)."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, READ_CHUNK):
        chunks.append(chunk)
    return b"".join(chunks)


def read_mountinfo(path: str = MOUNTINFO) -> list[MountEntry]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MirrorError.from_oserror("read", path, exc) from None
    try:
        return parse_mountinfo(os.fsdecode(_read_all(fd)))
    finally:
        os.close(fd)


def _display(path: str) -> str:
    """A path as an administrator can read it: undecodable bytes and controls escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _arg(value: PathArg | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: PathArg | None, target: PathArg, fstype: str | None, flags: int = 0,
          data: str | bytes | None = None) -> None:
    """mount(2). `source`/`fstype` may be None (remount, propagation changes)."""
    raw_data = os.fsencode(data) if data is not None else None
    if _libc().mount(_arg(source), _arg(target), _arg(fstype), flags, raw_data) != 0:
        err = _errno()
        target_s = _display(os.fsdecode(target))
        what = f"mount {_display(os.fsdecode(source))} on" if source is not None else "mount"
        exc = OSError(err, os.strerror(err))
        error = MirrorError.from_oserror(what, target_s, exc)
        error.obj = os.fsdecode(target)
        raise error


def umount(target: PathArg, flags: int = 0) -> None:
    """umount2(2): EINVAL means not a mount point, EBUSY means still in use."""
    if _libc().umount2(_arg(target), flags) != 0:
        err = _errno()
        error = MirrorError.from_oserror("umount", _display(os.fsdecode(target)),
                                         OSError(err, os.strerror(err)))
        error.obj = os.fsdecode(target)
        raise error


# The new mount API (Linux 5.2; MOVE_MOUNT_BENEATH 6.5): syscall numbers of x86_64 and arm64
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_BENEATH = 0x200


def clone_tree(path: PathArg, *, dir_fd: int = AT_FDCWD, recursive: bool = False) -> int:
    """open_tree(OPEN_TREE_CLONE): a detached copy of the mount at `path` (relative to
    `dir_fd`; b"" with a dir_fd: that directory), kept alive by the returned fd."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    if not os.fsencode(path):
        flags |= AT_EMPTY_PATH
    import ctypes
    fd = _libc().syscall(SYS_OPEN_TREE, ctypes.c_int(dir_fd), _arg(path), ctypes.c_uint(flags))
    if fd < 0:
        err = _errno()
        raise MirrorError.from_oserror("clone the mount at", _display(os.fsdecode(path) or "(fd)"),
                                       OSError(err, os.strerror(err)))
    return fd


def move_mount(tree_fd: int, target: PathArg, *, beneath: bool = False) -> None:
    """move_mount(2) of a detached tree onto `target`: on top of what is mounted there, or
    beneath the top mount (so that lifting the top one reveals ours, with no moment between)."""
    import ctypes
    flags = MOVE_MOUNT_F_EMPTY_PATH | (MOVE_MOUNT_BENEATH if beneath else 0)
    if _libc().syscall(SYS_MOVE_MOUNT, ctypes.c_int(tree_fd), b"", ctypes.c_int(AT_FDCWD),
                     _arg(target), ctypes.c_uint(flags)) != 0:
        err = _errno()
        error = MirrorError.from_oserror("move the mount to", _display(os.fsdecode(target)),
                                         OSError(err, os.strerror(err)))
        error.obj = os.fsdecode(target)
        raise error


SYS_MOUNT_SETATTR = 442  # (Linux 5.12)
MOUNT_ATTR_RDONLY = 0x1


def set_read_only(path: PathArg, read_only: bool) -> None:
    """mount_setattr(2) of the mount on top at `path`: its read-only flag alone, set or
    cleared (MS_REMOUNT|MS_BIND would set every per-mount flag, an entry's atime choice with
    them). Making it read-only fails with EBUSY while a file there is open for writing."""
    import ctypes

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]
    attr = MountAttr(MOUNT_ATTR_RDONLY if read_only else 0, 0 if read_only else MOUNT_ATTR_RDONLY)
    if _libc().syscall(SYS_MOUNT_SETATTR, ctypes.c_int(AT_FDCWD), _arg(path), ctypes.c_uint(0),
                       ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))) != 0:
        err = _errno()
        error = MirrorError.from_oserror(f"make {'read-only' if read_only else 'writable'}",
                                         _display(os.fsdecode(path)), OSError(err, os.strerror(err)))
        error.obj = os.fsdecode(path)
        raise error


def other_mount_tables(*, skip_own: bool = True):
    """(pid, comm, mount table) once for each mount namespace other than ours (`unshare -m`,
    `ip netns exec`, containers), from the first process found in it: /proc/PID/mountinfo."""
    try:
        seen = {os.readlink("/proc/self/ns/mnt")} if skip_own else set()
    except OSError:
        return
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
            if ns in seen:
                continue
            seen.add(ns)
            table = read_mountinfo(f"/proc/{pid}/mountinfo")
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except (OSError, MirrorError):
            continue  # it ended while we looked
        yield int(pid), comm, table


def fdinfo(path: str) -> dict[bytes, bytes]:
    """The fields of a /proc/PID/fdinfo/N file (pos, flags, mnt_id, ino, ...): what a
    descriptor is on, read without touching its file system. OSError when it is gone."""
    with open(path, "rb") as f:
        return dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)


def namespace_mount_ids(pid: int | str, cache: dict, keep) -> frozenset[int]:
    """Ids of the mounts of process `pid`'s mount namespace for which keep(entry) holds, its
    table read once per namespace (`cache`: namespace -> ids, the caller's for one scan)."""
    ns = os.readlink(f"/proc/{pid}/ns/mnt")
    ids = cache.get(ns)
    if ids is None:
        with open(f"/proc/{pid}/mountinfo", "rb") as f:
            table = parse_mountinfo(os.fsdecode(f.read()))
        ids = cache[ns] = frozenset(m.mount_id for m in table if keep(m))
    return ids


def namespace_holders(major: int, minor: int, *, skip_own: bool = True) -> list[dict]:
    """Other mount namespaces that hold a copy of a mount of device major:minor: one {pid,
    comm, mount_point} per namespace. Such a copy keeps a FUSE mount (and its server) alive
    after we unmount ours, and a block device's file system mounted."""
    found = []
    for pid, comm, table in other_mount_tables(skip_own=skip_own):
        hits = [m.mount_point for m in table if (m.major, m.minor) == (major, minor)]
        if hits:
            found.append({"pid": pid, "comm": comm, "mount_point": hits[0]})
    return found


def describe_holders(holders: list[dict]) -> str:
    return "; ".join(f"still mounted in the mount namespace of pid {h['pid']} ({h['comm']})"
                     + (f" at {h['mount_point']}" if h.get("mount_point") else "") for h in holders)


# File systems where a stat is answered by the kernel from memory or a local disk, never by a
# server that may not answer (a FUSE daemon, stopped or hung; NFS, SMB, sshfs): device nodes
# and the files of local loops live on these.
LOCAL_FSTYPES = frozenset({"devtmpfs", "tmpfs", "ramfs", "ext2", "ext3", "ext4", "xfs", "btrfs",
                           "overlay", "squashfs", "vfat"})


# The kernel's views of its own state (and the device nodes' file systems): never data to
# replicate. mirrorfs laid over one would put every reader of it (the daemon's own reads of
# /proc among them) behind FUSE, and a FUSE mount's nodev turns device nodes into plain files.
PSEUDO_FSTYPES = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs",
                            "tracefs", "securityfs", "pstore", "bpf", "configfs", "fusectl",
                            "mqueue", "efivarfs", "binfmt_misc", "autofs", "selinuxfs",
                            "rpc_pipefs", "nsfs", "hugetlbfs"})


def pseudo_fs_refusal(path: str, name: str | None = None) -> str | None:
    """Why the directory `path` (named `name`, as the administrator typed it) cannot be
    replicated because of the file system it is on (one of PSEUDO_FSTYPES), else None."""
    home = mount_containing(path)
    if home.fstype not in PSEUDO_FSTYPES:
        return None
    return (f"{_display(name or path)} is on {home.fstype} (mounted on "
            f"{_display(home.mount_point)}), a "
            "view of the kernel's own state, not data: it cannot be replicated")


def mount_by_name(path: str, table: list[MountEntry]) -> MountEntry | None:
    """The mount `path` is on by the mount table's names alone: the longest mount point that
    is a prefix of it (the last mounted of equal ones). Nothing is looked up, unlike
    mount_containing(), whose realpath lstat's every part: on a FUSE or NFS mount that does
    not answer, that waits for good. Many paths over one table: MountNames."""
    return MountNames(table).mount_of(path)


def on_local_fs(path: str, table: list[MountEntry]) -> bool:
    """Is `path` on a file system of LOCAL_FSTYPES (by mount_by_name)?"""
    return MountNames(table).on_local_fs(path)


def _contains(mount_point: str, path: str) -> bool:
    return mount_point == "/" or path == mount_point or path.startswith(mount_point + "/")


class MountNames:
    """mount_by_name() and on_local_fs() of many paths over one table: the table's mount points
    in a dict, and a path's own name, then its parents' looked up, deepest first (a picture of
    512 loops scanned the whole table once for each backing file)."""

    def __init__(self, table: list[MountEntry]) -> None:
        self._at = {m.mount_point: m for m in table}  # the last mounted of equal ones

    def mount_of(self, path: str) -> MountEntry | None:
        if (found := self._at.get(path)) is not None:
            return found
        end = len(path)
        while (end := path.rfind("/", 0, end)) > 0:
            if (found := self._at.get(path[:end])) is not None:
                return found
        return self._at.get("/")

    def on_local_fs(self, path: str) -> bool:
        home = self.mount_of(path)
        return home is not None and home.fstype in LOCAL_FSTYPES


def mount_containing(path: PathArg, entries: list[MountEntry] | None = None) -> MountEntry:
    """The mount that serves `path`, following the mount tree the way path lookup does.

    Plain longest-prefix is wrong when a mount is hidden (a later mount over /a hides the
    older /a/b), so we walk down from the root mount: at each mount, the first child met along
    the path (shortest mount point, an over-mount of the mount itself included) wins.
    """
    entries = read_mountinfo() if entries is None else entries
    resolved = os.path.realpath(os.fsdecode(path))
    ids = {e.mount_id for e in entries}
    children: dict[int, list[MountEntry]] = {}
    for entry in entries:
        children.setdefault(entry.parent_id, []).append(entry)
    roots = [e for e in entries if e.mount_point == "/" and
             (e.parent_id not in ids or e.parent_id == e.mount_id)]
    if not roots:  # a partial table: the best we can do is the longest prefix
        best = [e for e in entries if _contains(e.mount_point, resolved)]
        if not best:
            raise MirrorError(f"no mount contains {_display(resolved)}", obj=resolved,
                              errno=errno_module.ENOENT)
        return max(best, key=lambda e: len(e.mount_point))
    current = roots[-1]
    for _ in range(len(entries)):  # bounded: each step goes one mount deeper
        below = [c for c in children.get(current.mount_id, ())
                 if c.mount_id != current.mount_id and _contains(c.mount_point, resolved)
                 and len(c.mount_point) >= len(current.mount_point)]
        if not below:
            break
        shortest = min(len(c.mount_point) for c in below)
        current = [c for c in below if len(c.mount_point) == shortest][-1]
    return current


def mounts_of_device(major: int, minor: int, entries: list[MountEntry] | None = None
                     ) -> list[MountEntry]:
    entries = read_mountinfo() if entries is None else entries
    return [e for e in entries if (e.major, e.minor) == (major, minor)]


def _identity(entry: MountEntry) -> tuple:
    """What makes two reads the same mount. The kernel hands a freed mount id (and a tmpfs's
    anonymous 0:N device) to the next mount at once, so an unmount plus a mount in one coalesced
    event can differ only in the mount point: that must read as removed + added, not changed.
    The price: a MS_MOVE also reads as removed + added. Options and propagation can change."""
    return (entry.mount_id, entry.parent_id, entry.major, entry.minor, entry.root,
            entry.mount_point, entry.fstype, entry.source)


def diff_mounts(old: list[MountEntry], new: list[MountEntry]) -> MountDiff:
    before = {e.mount_id: e for e in old}
    after = {e.mount_id: e for e in new}
    added, removed, changed = [], [], []
    for mount_id, entry in after.items():
        prev = before.get(mount_id)
        if prev is None:
            added.append(entry)
        elif _identity(prev) != _identity(entry):
            removed.append(prev)
            added.append(entry)
        elif prev != entry:
            changed.append((prev, entry))
    removed.extend(e for mount_id, e in before.items() if mount_id not in after)
    return MountDiff(tuple(added), tuple(removed), tuple(changed))


class MountWatcher:
    """Wakes when the mount table changes: poll() reports POLLPRI|POLLERR on mountinfo.

    The table is read at construction, so a change made right after constructing is seen by
    the next wait(). Events coalesce: one wake may stand for many changes, so we re-read the
    whole table and diff. One thread waits; close() may be called from any thread.
    """

    def __init__(self, path: str = MOUNTINFO):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise MirrorError.from_oserror("watch", path, exc) from None
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._closed = False
        self._close_once = threading.Lock()
        self._busy = threading.Lock()  # held while waiting/reading; close() frees fds after
        self._entries = self._read()

    def _read(self) -> list[MountEntry]:
        return parse_mountinfo(os.fsdecode(_read_all(self._fd)))

    def snapshot(self) -> list[MountEntry]:
        """The table as of the last read: the baseline for the next diff."""
        return list(self._entries)

    def wait(self, timeout: float | None = None) -> MountDiff | None:
        """The next non-empty change, or None on timeout or once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._busy:
            if self._closed:
                return None
            poller = select.poll()
            poller.register(self._fd, select.POLLPRI | select.POLLERR)
            poller.register(self._wake, select.POLLIN)
            while not self._closed:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = dict(poller.poll(None if left is None else left * 1000))
                if self._closed or self._wake in ready:
                    return None
                if not ready:
                    return None  # timed out
                # A wake with nothing to show (e.g. a mount and its unmount between two
                # reads, or a change we already read) is not reported; keep waiting.
                new = self._read()
                diff = diff_mounts(self._entries, new)
                self._entries = new
                if diff:
                    return diff
            return None

    def __iter__(self) -> Iterator[MountDiff]:
        while (diff := self.wait()) is not None:
            yield diff

    def close(self) -> None:
        """Wake a blocked wait() through the eventfd, then release the fds once it is out."""
        with self._close_once:
            if self._closed:
                return
            self._closed = True
        os.eventfd_write(self._wake, 1)
        with self._busy:
            os.close(self._fd)
            os.close(self._wake)

    def __enter__(self) -> MountWatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def block_rdev(path: str) -> int | None:
    """The number of the block device `path` names now (one stat); None when it names none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def tree_identity(path: str, table: list[MountEntry] | None = None, *,
                  lower: str | None = None) -> dict[str, str]:
    """What tells the file system a directory entry lies on from another (recorded when the
    entry is added, app/engine/capture.py check_identity): the type of the mount it is on by
    name (mount_by_name), where that is mounted, the file system's own UUID
    (FS_IOC_GETFSUUID: ext4's and XFS's are the one on the disk, a tmpfs has a new one at each
    mount), so a fresh empty file system of the same type mounted in the old one's place is
    told from it, and which directory of it the entry shows (a bind mount of another
    directory onto the entry's, not made at boot, leaves the empty directory below on the
    same file system). Not its device number, which can change at a reboot. Left out:
    mirrorfs, and a bind of the file system below onto the directory itself (a switch-over's
    read-only fence). `lower`: where the directory is reached without the mirrorfs laid over
    it (a capture's door); a directory under mirrorfs otherwise has no UUID said, nor one on
    a file system that is not local (LOCAL_FSTYPES: an NFS or FUSE server that does not
    answer would hang the open)."""
    from app.services.layout import FSTYPE_FS, IDENTITY_FS_DIRECTORY, IDENTITY_FS_UUID
    table = read_mountinfo() if table is None else table
    names = MountNames([m for m in table if m.fstype != FSTYPE_FS])
    home = names.mount_of(path)
    # (a fence shows the very directory it covers: told apart from a bind of another one)
    shown = None if home is None else \
        os.path.normpath(os.path.join(home.root, os.path.relpath(path, home.mount_point)))
    if home is not None and home.mount_point == path and path != "/":
        below = names.mount_of(os.path.dirname(path))
        if below is not None and (below.major, below.minor) == (home.major, home.minor):
            home = below
    if home is None:
        return {}
    said = {"file system": f"{home.fstype} mounted on {home.mount_point}",
            IDENTITY_FS_DIRECTORY: shown}
    covered = any(m.fstype == FSTYPE_FS and m.mount_point == path for m in table)
    uuid = None if home.fstype not in LOCAL_FSTYPES else fs_uuid(lower) if lower is not None \
        else None if covered else fs_uuid(path)
    if uuid is not None:
        said[IDENTITY_FS_UUID] = uuid
    return said


FS_IOC_GETFSUUID = 0x80111500  # _IOR(0x15, 0, struct fsuuid2 {u8 len; u8 uuid[16]})


def fs_uuid(path: str) -> str | None:
    """The UUID of the file system `path` is on, as blkid shows it; None when the file system
    has none (or all zeros), the kernel cannot say (before 6.5), or `path` cannot be opened."""
    import fcntl
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        got = fcntl.ioctl(fd, FS_IOC_GETFSUUID, bytes(17))
    except OSError:
        return None
    finally:
        os.close(fd)
    raw = got[1:1 + min(got[0], 16)].hex()
    if len(raw) != 32 or not raw.strip("0"):
        return None
    return "-".join((raw[:8], raw[8:12], raw[12:16], raw[16:20], raw[20:]))
