"""mirrorfs: a pyfuse3 file system over-mounted on an entry, passing through to the lower tree.

The lower tree is reached only through `root_fd`, an O_PATH directory fd opened before the
mount: *at() calls with dir_fd, or /proc/self/fd/N/ paths for xattrs. Every change is applied
to the lower tree first and, if that worked, appended to the journal before the reply goes
back to the kernel, so the journal's order is the order the applications saw.

Handlers use blocking os calls on the trio thread: one request at a time, in order. Nodes on a
file system mounted below the entry (another st_dev) are passed through but not captured.
"""

from __future__ import annotations

import errno
import functools
import os
import stat

import pyfuse3
import trio

from app.engine.inodes import InodeTable, Node
from app.engine.journal import Journal, encode_path
from app.engine.lowlevel import at, proc_path, renameat2

TIMEOUT = 1.0  # seconds the kernel may cache names and attributes: we are the only way in
OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND  # the kernel sends offsets


def fuse_errors(fn):
    """Report OSError to the kernel as its errno, never as a crash of the handler."""
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
    return wrapper


class Handle:
    __slots__ = ("fd", "ino", "wrote", "read")

    def __init__(self, fd: int, ino: int, wrote: bool = False):
        self.fd, self.ino, self.wrote, self.read = fd, ino, wrote, False


class MirrorFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, root_fd: int, journal: Journal, *, replicate_atime: bool = False):
        super().__init__()
        self.root_fd = root_fd
        self.journal = journal
        self.replicate_atime = replicate_atime
        self.inodes = InodeTable(os.stat(b".", dir_fd=root_fd, follow_symlinks=False))
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, tuple[int, list[bytes] | None]] = {}
        self._next_fh = 1
        self.unfrozen = trio.Event()
        self.unfrozen.set()

    # -- helpers ----------------------------------------------------------------------------
    async def _gate(self) -> None:
        """Mutations wait while a mirror or verify holds the tree still."""
        if not self.unfrozen.is_set():
            await self.unfrozen.wait()

    def _path(self, ino: int) -> bytes:
        path = self.inodes.path(ino)
        if path is None:
            raise OSError(errno.ENOENT, "no name left", str(ino))
        return path

    def _child(self, parent: int, name: bytes) -> bytes:
        path = self.inodes.child_path(parent, name)
        if path is None:
            raise OSError(errno.ENOENT, "parent has no name", str(parent))
        return path

    def _lstat(self, rel: bytes) -> os.stat_result:
        return os.stat(at(rel), dir_fd=self.root_fd, follow_symlinks=False)

    def _attr(self, st: os.stat_result, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = e.attr_timeout = TIMEOUT
        for f in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize",
                  "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(e, f, getattr(st, f))
        return e

    def _record(self, node: Node, op: str, data: bytes = b"", **args) -> None:
        if node.captured:
            self.journal.append(op, args, data)

    def _times(self, node: Node, rel: bytes, st: os.stat_result | None = None) -> None:
        """Record a node's times as they are now at the lower tree (atime only when asked)."""
        if not node.captured:
            return
        st = st or self._lstat(rel)
        atime = st.st_atime_ns if self.replicate_atime else None
        self.journal.append("times", {"path": encode_path(rel), "atime": atime, "mtime": st.st_mtime_ns})

    def _dir_times(self, parent: int) -> None:
        self._times(self.inodes.node(parent), self._path(parent))

    def _new_entry(self, parent: int, name: bytes, rel: bytes) -> tuple[Node, pyfuse3.EntryAttributes]:
        st = self._lstat(rel)
        node = self.inodes.lookup(parent, name, st)
        return node, self._attr(st, node.ino)

    def _owner(self, parent: int, ctx) -> tuple[int, int]:
        """The caller owns what it creates; a set-group-ID directory hands down its group."""
        pst = self._lstat(self._path(parent))
        return ctx.uid, (pst.st_gid if pst.st_mode & stat.S_ISGID else ctx.gid)

    # -- names ------------------------------------------------------------------------------
    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        rel = self._child(parent_inode, name)
        return self._new_entry(parent_inode, name, rel)[1]

    async def forget(self, inode_list):
        for ino, count in inode_list:
            self.inodes.forget(ino, count)

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        fds = [h.fd for h in self._handles.values() if h.ino == inode]
        st = os.fstat(fds[0]) if fds else self._lstat(self._path(inode))
        return self._attr(st, inode)

    @fuse_errors
    async def readlink(self, inode, ctx):
        return os.readlink(at(self._path(inode)), dir_fd=self.root_fd)

    @fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        await self._gate()
        rel = self._child(parent_inode, name)
        uid, gid = self._owner(parent_inode, ctx)
        mode = mode & ~ctx.umask
        os.mknod(rel, mode, rdev, dir_fd=self.root_fd)
        os.chown(rel, uid, gid, dir_fd=self.root_fd, follow_symlinks=False)
        node, attr = self._new_entry(parent_inode, name, rel)
        self._record(node, "mknod", path=encode_path(rel), mode=mode, rdev=rdev, uid=uid, gid=gid)
        self._times(node, rel)
        self._dir_times(parent_inode)
        return attr

    @fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        await self._gate()
        rel = self._child(parent_inode, name)
        uid, gid = self._owner(parent_inode, ctx)
        pmode = self._lstat(self._path(parent_inode)).st_mode
        mode = (mode & ~ctx.umask & 0o7777) | (stat.S_ISGID if pmode & stat.S_ISGID else 0)
        os.mkdir(rel, mode, dir_fd=self.root_fd)
        os.chmod(rel, mode, dir_fd=self.root_fd)  # mkdir(2) drops S_ISGID and applies our umask
        os.chown(rel, uid, gid, dir_fd=self.root_fd, follow_symlinks=False)
        node, attr = self._new_entry(parent_inode, name, rel)
        self._record(node, "mkdir", path=encode_path(rel), mode=mode, uid=uid, gid=gid)
        self._times(node, rel)
        self._dir_times(parent_inode)
        return attr

    @fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        await self._gate()
        rel = self._child(parent_inode, name)
        uid, gid = self._owner(parent_inode, ctx)
        os.symlink(target, rel, dir_fd=self.root_fd)
        os.chown(rel, uid, gid, dir_fd=self.root_fd, follow_symlinks=False)
        node, attr = self._new_entry(parent_inode, name, rel)
        self._record(node, "symlink", path=encode_path(rel), target=encode_path(target), uid=uid, gid=gid)
        self._times(node, rel)
        self._dir_times(parent_inode)
        return attr

    @fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        await self._gate()
        src = self._path(inode)
        rel = self._child(new_parent_inode, new_name)
        os.link(at(src), rel, src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd, follow_symlinks=False)
        node, attr = self._new_entry(new_parent_inode, new_name, rel)
        self._record(node, "link", src=encode_path(src), path=encode_path(rel))
        self._dir_times(new_parent_inode)
        return attr

    @fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        await self._gate()
        rel = self._child(parent_inode, name)
        os.unlink(rel, dir_fd=self.root_fd)
        self.inodes.unlinked(parent_inode, name)
        self._record(self.inodes.node(parent_inode), "unlink", path=encode_path(rel))
        self._dir_times(parent_inode)

    @fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self._gate()
        rel = self._child(parent_inode, name)
        os.rmdir(rel, dir_fd=self.root_fd)
        self.inodes.unlinked(parent_inode, name)
        self._record(self.inodes.node(parent_inode), "rmdir", path=encode_path(rel))
        self._dir_times(parent_inode)

    @fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self._gate()
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        renameat2(self.root_fd, old, self.root_fd, new, flags)
        self.inodes.renamed(parent_inode_old, name_old, parent_inode_new, name_new,
                            bool(flags & pyfuse3.RENAME_EXCHANGE))
        self._record(self.inodes.node(parent_inode_old), "rename", old=encode_path(old),
                     new=encode_path(new), flags=int(flags))
        self._dir_times(parent_inode_old)
        if parent_inode_new != parent_inode_old:
            self._dir_times(parent_inode_new)

    # -- attributes -------------------------------------------------------------------------
    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        await self._gate()
        rel = self._path(inode)
        node = self.inodes.node(inode)
        fd = self._handles[fh].fd if fh in self._handles else None
        p = encode_path(rel)
        if fields.update_size:
            if fd is not None:
                os.ftruncate(fd, attr.st_size)
            else:
                tfd = os.open(at(rel), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.root_fd)
                try:
                    os.ftruncate(tfd, attr.st_size)
                finally:
                    os.close(tfd)
            self._record(node, "truncate", path=p, size=attr.st_size)
        if fields.update_mode:
            mode = stat.S_IMODE(attr.st_mode)
            os.chmod(at(rel), mode, dir_fd=self.root_fd)
            self._record(node, "chmod", path=p, mode=mode)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(at(rel), uid, gid, dir_fd=self.root_fd, follow_symlinks=False)
            self._record(node, "chown", path=p, uid=uid, gid=gid)
        if fields.update_atime or fields.update_mtime:
            st = self._lstat(rel)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(at(rel), ns=(atime, mtime), dir_fd=self.root_fd, follow_symlinks=False)
            self._record(node, "times", path=p, atime=atime, mtime=mtime)
        return self._attr(os.fstat(fd) if fd is not None else self._lstat(rel), inode)

    # -- extended attributes (through /proc/self/fd/N/: there is no *at() form) -------------
    @fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        await self._gate()
        rel = self._path(inode)
        os.setxattr(proc_path(self.root_fd, rel), name, value, follow_symlinks=False)
        self._record(self.inodes.node(inode), "setxattr", value, path=encode_path(rel),
                     name=encode_path(name))

    @fuse_errors
    async def getxattr(self, inode, name, ctx):
        try:
            return os.getxattr(proc_path(self.root_fd, self._path(inode)), name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @fuse_errors
    async def listxattr(self, inode, ctx):
        names = os.listxattr(proc_path(self.root_fd, self._path(inode)), follow_symlinks=False)
        return [os.fsencode(n) for n in names]

    @fuse_errors
    async def removexattr(self, inode, name, ctx):
        await self._gate()
        rel = self._path(inode)
        try:
            os.removexattr(proc_path(self.root_fd, rel), name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise
        self._record(self.inodes.node(inode), "removexattr", path=encode_path(rel), name=encode_path(name))

    @fuse_errors
    async def statfs(self, ctx):
        sv = os.statvfs(proc_path(self.root_fd, b""))
        out = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                  "f_favail", "f_namemax"):
            setattr(out, f, getattr(sv, f))
        return out

    # -- files ------------------------------------------------------------------------------
    def _handle(self, fd: int, ino: int, wrote: bool = False) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(fd, ino, wrote)
        return fh

    @fuse_errors
    async def open(self, inode, flags, ctx):
        rel = self._path(inode)
        if flags & os.O_TRUNC:
            await self._gate()
        fd = os.open(at(rel), (flags & ~OPEN_STRIP) | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self.root_fd)
        truncated = bool(flags & os.O_TRUNC)
        if truncated:
            self._record(self.inodes.node(inode), "truncate", path=encode_path(rel), size=0)
        return pyfuse3.FileInfo(fh=self._handle(fd, inode, wrote=truncated))

    @fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        await self._gate()
        rel = self._child(parent_inode, name)
        mode = (mode & ~ctx.umask & 0o7777)
        base = (flags & ~OPEN_STRIP) | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(rel, base | os.O_CREAT | os.O_EXCL, mode, dir_fd=self.root_fd)
            made = True
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            fd, made = os.open(rel, base, dir_fd=self.root_fd), False
        try:
            if made:
                uid, gid = self._owner(parent_inode, ctx)
                os.fchown(fd, uid, gid)
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        node = self.inodes.lookup(parent_inode, name, st)
        if made:
            self._record(node, "create", path=encode_path(rel), mode=mode, uid=uid, gid=gid)
            self._dir_times(parent_inode)
        elif flags & os.O_TRUNC:
            self._record(node, "truncate", path=encode_path(rel), size=0)
        return pyfuse3.FileInfo(fh=self._handle(fd, node.ino, wrote=True)), self._attr(st, node.ino)

    @fuse_errors
    async def read(self, fh, off, size):
        h = self._handles[fh]
        h.read = True
        return os.pread(h.fd, size, off)

    @fuse_errors
    async def write(self, fh, off, buf):
        await self._gate()
        h = self._handles[fh]
        n = os.pwrite(h.fd, buf, off)
        h.wrote = True
        rel = self.inodes.path(h.ino)
        if rel is not None:  # a file with no name left is gone at the target too
            self._record(self.inodes.node(h.ino), "write", bytes(buf[:n]) if n < len(buf) else bytes(buf),
                         path=encode_path(rel), offset=off)
        return n

    async def flush(self, fh):
        pass

    @fuse_errors
    async def release(self, fh):
        h = self._handles.pop(fh)
        try:
            if h.wrote or (h.read and self.replicate_atime):
                rel, node = self.inodes.path(h.ino), self.inodes.get(h.ino)
                if rel is not None and node is not None:
                    self._times(node, rel, os.fstat(h.fd))
        finally:
            os.close(h.fd)

    @fuse_errors
    async def fsync(self, fh, datasync):
        h = self._handles[fh]
        (os.fdatasync if datasync else os.fsync)(h.fd)
        self.journal.sync()  # the application's fsync returns once its records are durable

    # -- directories ------------------------------------------------------------------------
    @fuse_errors
    async def opendir(self, inode, ctx):
        fd = os.open(at(self._path(inode)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                     dir_fd=self.root_fd)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = (inode, None)
        os.close(fd)
        return fh

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        inode, names = self._dirs[fh]
        if names is None or start_id == 0:
            dfd = os.open(at(self._path(inode)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                          dir_fd=self.root_fd)
            try:
                names = sorted(os.fsencode(n) for n in os.listdir(dfd))
            finally:
                os.close(dfd)
            self._dirs[fh] = (inode, names)
        base = self._path(inode)
        for i in range(start_id, len(names)):
            name = names[i]
            rel = name if not base else base + b"/" + name
            try:
                st = self._lstat(rel)
            except FileNotFoundError:
                continue  # removed since the listing: skip, never report twice
            node = self.inodes.entry(inode, name, st)
            if not pyfuse3.readdir_reply(token, name, self._attr(st, node.ino), i + 1):
                self.inodes.drop_if_unused(node)
                return
            node.lookups += 1

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        self.journal.sync()

    def open_handles(self) -> int:
        return len(self._handles)

