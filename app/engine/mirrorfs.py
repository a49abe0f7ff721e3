"""mirrorfs: a FUSE file system over-mounted on an entry, passing through to the lower tree.

The lower tree is reached only through `root_fd`, an O_PATH directory fd opened before the
mount, and the O_PATH fds of its directories (see inodes.py): *at() calls relative to the
parent directory, or /proc/self/fd/N/name for xattrs. No call ever carries a path from the
entry's root, so depth below the entry is not limited by PATH_MAX. Every change is applied to
the lower tree first and, if that worked, appended to the journal before the reply goes back to
the kernel, so the journal's order is the order the applications saw. Records name files by
their entry-relative path.

`fusewire.Session` calls these handlers with plain values; they make blocking os calls on the
trio thread, one request at a time, in order. Access is decided by the kernel
(`default_permissions`) before a request reaches us. Nodes on a file system mounted below the
entry (another st_dev) are passed through but not captured.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import threading

from app.engine import fusewire
from app.engine.fusewire import Changes, Ctx
from app.engine.inodes import ROOT, InodeTable, Node
from app.engine.journal import Journal, encode_path
from app.engine.lowlevel import (RENAME_EXCHANGE, chmod_at, chown_at, fallocate, linkat_fd, proc_path,
                                 renameat2, stat_at, statx, umask, unshare_fs, utimensat)
from app.services import mounts

# the kernel sends offsets (O_APPEND) and bypasses its own cache for O_DIRECT; our buffers are
# not aligned for O_DIRECT at the lower file, and need not be
CAPABILITY = b"security.capability"
OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID  # chown(2) clears them, even our own as root
LOWER_MOUNT_FLAGS = ((os.ST_NOSUID, mounts.MS_NOSUID), (os.ST_NODEV, mounts.MS_NODEV),
                     (os.ST_NOEXEC, mounts.MS_NOEXEC))


class Handle:
    __slots__ = ("fd", "ino", "wrote", "read")

    def __init__(self, fd: int, ino: int, wrote: bool = False):
        self.fd, self.ino, self.wrote, self.read = fd, ino, wrote, False


class MirrorFS(fusewire.Gate):
    kills_privileges = True  # FUSE_HANDLE_KILLPRIV_V2: set-ID bits are ours to take away (_kill_suidgid)

    def __init__(self, root_fd: int, journal: Journal, *, replicate_atime: bool = False):
        self.root_fd = root_fd
        self.journal = journal
        self.replicate_atime = replicate_atime
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # an fd of ours for every file an application holds open through us
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        root_st = os.stat(b".", dir_fd=root_fd, follow_symlinks=False)
        self.dev = root_st.st_dev  # the entry's own file system
        self.inodes = InodeTable(root_st, root_fd)
        self._handles: dict[int, Handle] = {}
        self._open: dict[int, list[Handle]] = {}  # open handles per inode
        self._dirs: dict[int, tuple[int, list[bytes] | None]] = {}
        self._next_fh = 1
        self._no_caps: set[int] = set()  # inodes known to have no security.capability
        self._syncer: _Beside | None = None  # the journal's sync beside an fsync
        super().__init__()  # the gate a mirror or verify closes
        self.tracker = None  # a sync.Tracker while a resync or verify runs beside capture

    # -- the session's questions --------------------------------------------------------------
    def init(self) -> None:
        """The kernel said hello (FUSE_INIT). Creations run under the caller's umask (FUSE_DONT_MASK
        gives it to us, and the lower file system applies it or a default ACL): this thread gets
        a umask of its own, so the applier's thread never sees it."""
        unshare_fs()

    def answered(self) -> None:
        """A request is answered: directory fds beyond the bound may be closed now."""
        self.inodes.trim()

    def open_handles(self) -> int:
        return len(self._handles)

    # -- helpers ------------------------------------------------------------------------------
    def _lstat(self, ino: int) -> os.stat_result:
        fd, name = self.inodes.at(ino)
        return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def _open_fd(self, ino: int) -> int | None:
        """An fd of an open handle on `ino` (the way to a file that has lost every name)."""
        handles = self._open.get(ino)
        return handles[0].fd if handles else None

    def _record(self, node: Node, op: str, data: bytes = b"", **args) -> None:
        if node.captured:
            self.journal.append(op, args, data)
            if self.tracker is not None:  # a resync or verify runs beside capture
                self.tracker.observe(node.key, op, args)

    def _ref(self, node: Node) -> dict | None:
        """How a record names an existing node: its path; an O_TMPFILE file not linked yet, by
        the seq of its "tmpfile" record; a file with no name left, not at all (the target
        has removed it already)."""
        rel = self.inodes.path(node.ino)
        if rel is not None:
            return {"path": encode_path(rel)}
        return {"tmp": node.tmp} if node.tmp else None

    def _record_on(self, node: Node, op: str, data: bytes = b"", **args) -> None:
        """A record about an existing node (its data, size, mode, owner, times, xattrs)."""
        if node.captured:
            ref = self._ref(node)
            if ref is not None:
                self.journal.append(op, {**ref, **args}, data)
                if self.tracker is not None:
                    self.tracker.observe(node.key, op, args)

    def _times(self, node: Node, st: os.stat_result | None = None, atime=None) -> None:
        """Record a node's times as they are now at the lower tree; its atime when asked for
        (`atime` True) or when the entry replicates access times."""
        if node.captured:
            st = st or self.getattr(node.ino, None)
            keep_atime = atime or self.replicate_atime
            self._record_on(node, "times", atime=st.st_atime_ns if keep_atime else None,
                            mtime=st.st_mtime_ns)

    def _dir_times(self, parent: int) -> None:
        self._times(self.inodes.node(parent))

    def _new_entry(self, parent: int, name: bytes) -> tuple[Node, os.stat_result]:
        st = os.stat(name, dir_fd=self.inodes.dirfd(parent), follow_symlinks=False)
        return self.inodes.lookup(parent, name, st), st

    def _owner(self, parent: int, ctx: Ctx) -> tuple[int, int]:
        """The caller owns what it creates; a set-group-ID directory hands down its group."""
        return self._owner_of(os.stat(b".", dir_fd=self.inodes.dirfd(parent)), ctx)

    @staticmethod
    def _owner_of(pst: os.stat_result, ctx: Ctx) -> tuple[int, int]:
        return ctx.uid, (pst.st_gid if pst.st_mode & stat.S_ISGID else ctx.gid)

    def _give(self, dir_fd: int, name: bytes, uid: int, gid: int, special: int) -> None:
        """Hand a new node to its owner; our chown(2) cleared the set-ID bits it was made with."""
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        if special:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            os.chmod(name, stat.S_IMODE(st.st_mode) | special, dir_fd=dir_fd)

    def _path_of(self, parent: int, name: bytes) -> bytes:
        rel = self.inodes.child_path(parent, name)
        if rel is None:
            raise OSError(errno.ENOENT, "parent has no name", str(parent))
        return rel

    # -- names --------------------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> tuple[int, os.stat_result]:
        node, st = self._new_entry(parent, name)
        return node.ino, st

    def forget(self, ino: int, count: int) -> None:
        self.inodes.forget(ino, count)
        if self.inodes.get(ino) is None:
            self._no_caps.discard(ino)  # the number may come back for another file

    def getattr(self, ino: int, fh: int | None) -> os.stat_result:
        h = self._handles.get(fh) if fh is not None else None
        fd = h.fd if h is not None else self._open_fd(ino)
        return os.fstat(fd) if fd is not None else self._lstat(ino)

    def statx(self, ino: int, fh: int | None, mask: int) -> bytearray:
        """What statx(2) asks beyond stat (the birth time): the lower file's own answer."""
        h = self._handles.get(fh) if fh is not None else None
        fd = h.fd if h is not None else self._open_fd(ino)
        if fd is not None:
            return statx(fd, None, mask)
        dfd, name = self.inodes.at(ino)
        return statx(dfd, name, mask)

    def readlink(self, ino: int) -> bytes:
        fd, name = self.inodes.at(ino)
        return os.readlink(name, dir_fd=fd)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Ctx):
        rel = self._path_of(parent, name)
        pfd = self.inodes.dirfd(parent)
        uid, gid = self._owner(parent, ctx)
        with umask(ctx.umask):
            os.mknod(name, mode, rdev, dir_fd=pfd)
        self._give(pfd, name, uid, gid, mode & SPECIAL_BITS)
        node, st = self._new_entry(parent, name)
        self._record(node, "mknod", path=encode_path(rel), mode=st.st_mode, rdev=rdev, uid=uid, gid=gid)
        self._times(node, st)
        self._dir_times(parent)
        return node.ino, st

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx):
        rel = self._path_of(parent, name)
        pfd = self.inodes.dirfd(parent)
        uid, gid = self._owner(parent, ctx)
        with umask(ctx.umask):
            os.mkdir(name, mode & 0o1777, dir_fd=pfd)  # a set-GID parent hands its bit down
        os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        node, st = self._new_entry(parent, name)
        self._record(node, "mkdir", path=encode_path(rel), mode=stat.S_IMODE(st.st_mode), uid=uid, gid=gid)
        self._times(node, st)
        self._dir_times(parent)
        return node.ino, st

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx):
        rel = self._path_of(parent, name)
        pfd = self.inodes.dirfd(parent)
        uid, gid = self._owner(parent, ctx)
        os.symlink(target, name, dir_fd=pfd)
        os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        node, st = self._new_entry(parent, name)
        self._record(node, "symlink", path=encode_path(rel), target=encode_path(target), uid=uid, gid=gid)
        self._times(node, st)
        self._dir_times(parent)
        return node.ino, st

    def link(self, ino: int, new_parent: int, new_name: bytes):
        """A new name for a node; an O_TMPFILE file gets its first one from its open fd."""
        old = self.inodes.node(ino)
        src = self._ref(old)
        rel = self._path_of(new_parent, new_name)
        dfd = self.inodes.dirfd(new_parent)
        if self.inodes.path(ino) is None:
            fd = self._open_fd(ino)
            if fd is None:
                raise OSError(errno.ENOENT, "no name left", str(ino))
            linkat_fd(fd, dfd, new_name)
        else:
            sfd, sname = self.inodes.at(ino)
            os.link(sname, new_name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        node, st = self._new_entry(new_parent, new_name)
        if src is not None:
            self._record(node, "link", path=encode_path(rel),
                         **({"tmp": src["tmp"]} if "tmp" in src else {"src": src["path"]}))
        old.tmp = 0  # named now: records use its path; the target's anonymous fd is done with
        self._dir_times(new_parent)
        return node.ino, st

    def unlink(self, parent: int, name: bytes) -> None:
        rel = self._path_of(parent, name)
        os.unlink(name, dir_fd=self.inodes.dirfd(parent))
        self.inodes.unlinked(parent, name)
        self._record(self.inodes.node(parent), "unlink", path=encode_path(rel))
        self._dir_times(parent)

    def rmdir(self, parent: int, name: bytes) -> None:
        rel = self._path_of(parent, name)
        os.rmdir(name, dir_fd=self.inodes.dirfd(parent))
        self.inodes.unlinked(parent, name)
        self._record(self.inodes.node(parent), "rmdir", path=encode_path(rel))
        self._dir_times(parent)

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int) -> None:
        old = self._path_of(old_parent, old_name)
        new = self._path_of(new_parent, new_name)
        renameat2(self.inodes.dirfd(old_parent), old_name, self.inodes.dirfd(new_parent), new_name, flags)
        self.inodes.renamed(old_parent, old_name, new_parent, new_name, bool(flags & RENAME_EXCHANGE))
        self._record(self.inodes.node(old_parent), "rename", old=encode_path(old),
                     new=encode_path(new), flags=int(flags))
        self._dir_times(old_parent)
        if new_parent != old_parent:
            self._dir_times(new_parent)

    # -- attributes ---------------------------------------------------------------------------
    def setattr(self, ino: int, ch: Changes, ctx: Ctx) -> os.stat_result:
        node = self.inodes.node(ino)
        h = self._handles.get(ch.fh) if ch.fh is not None else None
        if self.inodes.path(ino) is None:  # no name (left): only through an open file
            fd, name = (h.fd if h is not None else self._open_fd(ino)), None
            if fd is None:
                raise OSError(errno.ENOENT, "no name left", str(ino))
        else:
            fd, name = self.inodes.at(ino)
        if ch.size is not None:
            if ch.kill_suidgid:  # a truncate by a caller without CAP_FSETID
                self._kill_suidgid(node, h.fd if h is not None else fd, None if h is not None else name)
            if h is not None:
                os.ftruncate(h.fd, ch.size)
            elif name is None:
                os.ftruncate(fd, ch.size)
            else:
                tfd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                try:
                    os.ftruncate(tfd, ch.size)
                finally:
                    os.close(tfd)
            self._record_on(node, "truncate", size=ch.size)
        if ch.mode is not None:
            mode = stat.S_IMODE(ch.mode)
            chmod_at(fd, name, mode)
            self._record_on(node, "chmod", mode=mode)
        before = None  # the mode before a chown: the lower file system may take set-ID bits
        if ch.uid is not None or ch.gid is not None:
            uid = -1 if ch.uid is None else ch.uid
            gid = -1 if ch.gid is None else ch.gid
            before = stat_at(fd, name).st_mode
            chown_at(fd, name, uid, gid)
            self._record_on(node, "chown", uid=uid, gid=gid)
        if ch.atime_ns is not None or ch.mtime_ns is not None:
            utimensat(fd, name, ch.atime_ns, ch.mtime_ns)
        if ch.only_ctime():
            # chown(f, -1, -1): the lower file system updates the ctime and takes a file's
            # set-ID bits as the caller's call did (recorded below). The kernel sends the same
            # nothing when a write or fallocate takes privileges away (file_remove_privs; a
            # FALLOCATE has no kill flag of its own, so this is where its bits go), so root's
            # write to a file with both capabilities and set-ID bits loses the bits too: the
            # safe side.
            before = stat_at(fd, name).st_mode
            chown_at(fd, name, -1, -1)
        st = stat_at(fd, name)
        if before is not None and stat.S_IMODE(st.st_mode) != stat.S_IMODE(before):
            self._record_on(node, "chmod", mode=stat.S_IMODE(st.st_mode))  # what the chown took
        if ch.size is not None or ch.atime_ns is not None or ch.mtime_ns is not None:
            self._times(node, st, atime=ch.atime_ns is not None)  # a truncate moves the mtime too
        return st

    # -- extended attributes (through /proc/self/fd/N/name: there is no *at() form) -----------
    def _xattr_path(self, ino: int) -> str | int:
        """What os.*xattr take for `ino`: a /proc path, or an open fd when it has no name."""
        if self.inodes.path(ino) is None:
            fd = self._open_fd(ino)
            if fd is None:
                raise OSError(errno.ENOENT, "no name left", str(ino))
            return fd
        fd, name = self.inodes.at(ino)
        return proc_path(fd, b"" if name == b"." else name)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int, kill_sgid: bool, ctx: Ctx) -> None:
        """`kill_sgid`: the caller set an ACL but is neither in the file's group nor privileged,
        so the set-GID bit goes, as the lower file system would drop it for such a caller (for
        us, root, it keeps it)."""
        self._no_caps.discard(ino)
        where = self._xattr_path(ino)
        os.setxattr(where, name, value, flags, **_nofollow(where))
        node = self.inodes.node(ino)
        self._record_on(node, "setxattr", value, name=encode_path(name))
        if kill_sgid:
            st = self.getattr(ino, None)
            if st.st_mode & stat.S_ISGID:
                mode = stat.S_IMODE(st.st_mode) & ~stat.S_ISGID
                if isinstance(where, int):
                    os.fchmod(where, mode)
                else:
                    os.chmod(where, mode)
                self._record_on(node, "chmod", mode=mode)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """The kernel asks for security.capability before a write(2) (under HANDLE_KILLPRIV_V2
        only until it has found a file has none): a file known to have none (we made it, or the
        lower file system said so) is answered from memory."""
        if name == CAPABILITY and ino in self._no_caps:
            raise OSError(errno.ENODATA, "no capabilities")
        try:
            where = self._xattr_path(ino)
            return os.getxattr(where, name, **_nofollow(where))
        except OSError as exc:
            if name == CAPABILITY and exc.errno == errno.ENODATA:
                self._no_caps.add(ino)
            raise

    def listxattr(self, ino: int) -> list[bytes]:
        where = self._xattr_path(ino)
        return [os.fsencode(n) for n in os.listxattr(where, **_nofollow(where))]

    def removexattr(self, ino: int, name: bytes) -> None:
        where = self._xattr_path(ino)
        os.removexattr(where, name, **_nofollow(where))
        self._record_on(self.inodes.node(ino), "removexattr", name=encode_path(name))

    def statfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.root_fd)

    # -- files --------------------------------------------------------------------------------
    def _handle(self, fd: int, ino: int, wrote: bool = False) -> int:
        fh = self._next_fh
        self._next_fh += 1
        h = self._handles[fh] = Handle(fd, ino, wrote)
        self._open.setdefault(ino, []).append(h)
        return fh

    def open(self, ino: int, flags: int, kill_suidgid: bool = False) -> int:
        dfd, name = self.inodes.at(ino)
        fd = os.open(name, (flags & ~OPEN_STRIP) | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dfd)
        truncated = bool(flags & os.O_TRUNC)
        if truncated:
            if kill_suidgid:
                try:
                    self._kill_suidgid(self.inodes.node(ino), fd)
                except OSError:
                    os.close(fd)
                    raise
            self._record_on(self.inodes.node(ino), "truncate", size=0)
        return self._handle(fd, ino, wrote=truncated)

    def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Ctx,
               kill_suidgid: bool = False):
        rel = self._path_of(parent, name)
        pfd = self.inodes.dirfd(parent)
        mode &= 0o7777
        base = (flags & ~OPEN_STRIP) | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            with umask(ctx.umask):
                fd = os.open(name, base | os.O_CREAT | os.O_EXCL, mode, dir_fd=pfd)
            made = True
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            fd, made = os.open(name, base, dir_fd=pfd), False
        try:
            st = os.fstat(fd)
            if made:  # the parent as the creation left it: its owner rule, then its times
                pst = os.stat(b".", dir_fd=pfd)
                uid, gid = self._owner_of(pst, ctx)
                # made by us with the caller's owner already (root's own file; a set-GID
                # parent's group): no chown, which would only move the ctime by microseconds
                if st.st_uid != uid or st.st_gid != gid or mode & SPECIAL_BITS:
                    os.fchown(fd, uid, gid)
                    if mode & SPECIAL_BITS:
                        os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | (mode & SPECIAL_BITS))
                    st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        node = self.inodes.lookup(parent, name, st)
        if made:
            self._no_caps.add(node.ino)  # a file just made has no security.capability
            self._record(node, "create", path=encode_path(rel), mode=stat.S_IMODE(st.st_mode),
                         uid=uid, gid=gid)
            self._times(self.inodes.node(parent), pst)  # (the chown of the new file left it)
        elif flags & os.O_TRUNC:
            if kill_suidgid:
                try:
                    self._kill_suidgid(node, fd)
                    st = os.fstat(fd)
                except OSError:
                    os.close(fd)
                    raise
            self._record(node, "truncate", path=encode_path(rel), size=0)
        return node.ino, st, self._handle(fd, node.ino, wrote=True)

    def tmpfile(self, parent: int, mode: int, flags: int, ctx: Ctx):
        """open(O_TMPFILE): an anonymous file in `parent`, made at the target too (its records
        name it by the seq of its "tmpfile" record until linkat(2) gives it a name)."""
        rel = self.inodes.path(parent)
        if rel is None:
            raise OSError(errno.ENOENT, "directory has no name left", str(parent))
        pfd = self.inodes.dirfd(parent)
        mode &= 0o7777
        with umask(ctx.umask):
            fd = os.open(b".", (flags & ~OPEN_STRIP) | os.O_TMPFILE | os.O_CLOEXEC, mode, dir_fd=pfd)
        try:
            uid, gid = self._owner(parent, ctx)
            os.fchown(fd, uid, gid)
            if mode & SPECIAL_BITS:
                os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | (mode & SPECIAL_BITS))
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        node = self.inodes.anonymous(parent, st)
        if node.captured:
            node.tmp = self.journal.append("tmpfile", {"path": encode_path(rel), "mode": stat.S_IMODE(st.st_mode),
                                                       "uid": uid, "gid": gid})
        return node.ino, st, self._handle(fd, node.ino, wrote=True)

    def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handles[fh]
        h.read = True
        return os.pread(h.fd, size, off)

    def kill_suidgid(self, fh: int) -> None:
        """A write by a caller without CAP_FSETID is coming on `fh` (FUSE_WRITE_KILL_SUIDGID)."""
        h = self._handles[fh]
        self._kill_suidgid(self.inodes.node(h.ino), h.fd)

    def _kill_suidgid(self, node: Node, fd: int, name: bytes | None = None) -> None:
        """Take the set-user-ID bit away, and the set-group-ID bit if group execute is set (the
        VFS's own rule for a write, truncate or O_TRUNC open by a caller without CAP_FSETID),
        recorded as a chmod before the change that caused it. Under FUSE_HANDLE_KILLPRIV_V2
        the kernel leaves this to us, and the lower file system would not do it: we are root.
        `name` under directory `fd`, or the open file `fd`."""
        st = stat_at(fd, name)
        mode = stat.S_IMODE(st.st_mode)
        keep = mode & ~(stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0))
        if keep == mode or not stat.S_ISREG(st.st_mode):
            return
        chmod_at(fd, name, keep)  # (a regular file: nothing to follow)
        self._record_on(node, "chmod", mode=keep)

    def write(self, fh: int, off: int, buf: memoryview) -> int:
        h = self._handles[fh]
        n = os.pwrite(h.fd, buf, off)
        h.wrote = True
        self._record_on(self.inodes.node(h.ino), "write", bytes(buf[:n]), offset=off)
        return n

    def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        h = self._handles[fh]
        fallocate(h.fd, mode, offset, length)
        h.wrote = True  # its times are recorded at close, as after writes
        self._record_on(self.inodes.node(h.ino), "fallocate", offset=offset, length=length, mode=mode)

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA and SEEK_HOLE, answered by the lower file system's own extents."""
        return os.lseek(self._handles[fh].fd, offset, whence)

    def release(self, fh: int) -> None:
        h = self._handles.pop(fh)
        handles = self._open.get(h.ino)
        if handles is not None:
            handles.remove(h)
            if not handles:
                del self._open[h.ino]
        try:
            node = self.inodes.get(h.ino)
            if node is not None and (h.wrote or (h.read and self.replicate_atime)):
                self._times(node, os.fstat(h.fd))
            if node is not None and node.tmp and h.ino not in self._open:
                self._record(node, "tmpclose", tmp=node.tmp)  # never linked: gone for good
                node.tmp = 0
        finally:
            os.close(h.fd)

    def fsync(self, fh: int, datasync: bool) -> None:
        """The file and the journal are made durable side by side (one disk wait, not two);
        the application's fsync returns once both are."""
        self._sync_beside_journal(self._handles[fh].fd, datasync)

    def _sync_beside_journal(self, fd: int, datasync: bool) -> None:
        if self._syncer is None:
            self._syncer = _Beside(self.journal.sync, "journal-sync")
        self._syncer.go()
        try:
            (os.fdatasync if datasync else os.fsync)(fd)
        finally:
            error = self._syncer.wait()
        if error is not None:
            raise error

    # -- directories --------------------------------------------------------------------------
    def opendir(self, ino: int) -> int:
        self.inodes.dirfd(ino)  # still there?
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = (ino, None)
        return fh

    def readdir(self, fh: int, offset: int):
        """Yield (name, ino, stat, next offset, counted) from `offset` on: "." and ".." first
        (not counted as lookups), then the names in order, listed once per open at offset 0."""
        ino, names = self._dirs[fh]
        dfd = self.inodes.dirfd(ino)
        if names is None or offset == 0:
            lfd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
            try:
                names = sorted(os.fsencode(n) for n in os.listdir(lfd))
            finally:
                os.close(lfd)
            self._dirs[fh] = (ino, names)
        if offset == 0:
            yield b".", ino, os.stat(b".", dir_fd=dfd), 1, False
        if offset <= 1:
            node = self.inodes.node(ino)
            link = self.inodes.link(node) if ino != ROOT else None
            up = link[0] if link is not None else ino
            # the parent through its own fd: ".." from a lower directory whose parent is the
            # entry root would cross into our own mount over it and wait for ourselves
            st_up = os.stat(b".", dir_fd=self.inodes.dirfd(up)) if up != ino else \
                os.stat(b"..", dir_fd=dfd, follow_symlinks=False)
            yield b"..", up, st_up, 2, False
        for i in range(max(offset - 2, 0), len(names)):
            name = names[i]
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the listing: skip, never report twice
            node = self.inodes.entry(ino, name, st)
            node.lookups += 1
            yield name, node.ino, st, i + 3, True

    def unsent_entry(self, ino: int) -> None:
        node = self.inodes.get(ino)
        if node is not None:
            node.lookups -= 1
            self.inodes.drop_if_unused(node)

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        """The directory below and the journal, made durable side by side: an application that
        renames a file into place and fsyncs the directory (git, SQLite, every careful writer)
        has the new name on the source's disk when this returns, as it would without mirrorfs.
        Only the journal was synced: the name was durable in the journal (and so at the target)
        but not on the source's own file system until its next commit, and a crash in between
        left the source without it."""
        ino, _ = self._dirs[fh]
        try:
            dfd = self.inodes.dirfd(ino)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            self.journal.sync()  # removed while open: nothing of it is left to make durable
            return
        fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
        try:
            self._sync_beside_journal(fd, datasync)
        finally:
            os.close(fd)


class _Beside:
    """A thread that runs `fn` beside the caller, once per go() (the journal's sync beside a
    file's fsync), kept for the next one: starting a thread per fsync cost more than the
    handoff. One go() at a time (the FUSE request loop answers one request at a time);
    wait() returns what `fn` raised."""

    def __init__(self, fn, name: str):
        self.fn = fn
        self._go, self._done = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def go(self) -> None:
        self._done.clear()
        self._go.set()

    def wait(self) -> BaseException | None:
        self._done.wait()
        error, self._error = self._error, None
        return error

    def _run(self) -> None:
        while True:
            self._go.wait()
            self._go.clear()
            try:
                self.fn()
            except BaseException as exc:  # raised on the caller's thread
                self._error = exc
            self._done.set()


def mount(fs: MirrorFS, path: str, options) -> fusewire.Session:
    """Mount `fs` on `path` with the lower mount's nosuid/nodev/noexec: set-ID programs, device
    nodes and executables work through mirrorfs exactly as they did on the directory below."""
    lower = os.fstatvfs(fs.root_fd).f_flag
    session = fusewire.Session(fs, path, options)
    session.mount(sum(ms for st, ms in LOWER_MOUNT_FLAGS if lower & st))
    return session


def _nofollow(where: str | int) -> dict:
    """os.*xattr on a path must not follow a symlink; on an fd (a file with no name left, e.g.
    O_TMPFILE before its link) the flag is refused (ValueError: it was EIO and a traceback)."""
    return {} if isinstance(where, int) else {"follow_symlinks": False}
