"""mirrorfs's extended attributes and statfs: reached through /proc/self/fd/N/ (no *at() form).

A mixin of MirrorFS: it uses the same root fd, inode table, freeze gate and journal.
"""

from __future__ import annotations

import errno
import functools
import os

import pyfuse3

from app.engine.journal import encode_path
from app.engine.lowlevel import proc_path


def fuse_errors(fn):
    """Report OSError to the kernel as its errno, never as a crash of the handler."""
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
    return wrapper


class XattrOps:
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

