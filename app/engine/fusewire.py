"""The FUSE kernel protocol, spoken directly on /dev/fuse: mount, read requests, write replies.

Why not pyfuse3: it has no handler for FUSE_FALLOCATE nor FUSE_TMPFILE (the libfuse it builds
against here, 3.14, cannot even dispatch FUSE_TMPFILE), and its INIT cannot ask for
FUSE_DONT_MASK, without which a directory's default POSIX ACL cannot work as it does below.
The protocol is small and stable (<linux/fuse.h>); we answer INIT with 7.39 (FUSE_STATX) and
the kernel adapts to that.

`Session` parses each request into plain Python values, calls the file system's method of the
same name and encodes what it returns; an OSError becomes the reply's errno. One trio task
reads and answers requests in turn (the handlers make blocking system calls, in order), and
polls a few tens of microseconds for the next before it waits in trio (SPIN_NS), through
app/engine/_fuseread.c (compiled by the install step: it polls without holding the GIL) or,
when that was not built, from Python. While
the file system is frozen (a mirror or verify holds the tree still), requests that would change
the tree wait in a queue, in arrival order, and the others are answered meanwhile.

What the kernel does for us, because we do not ask for it: file locks (local to this host),
setuid/setgid clearing on write and chown (a SETATTR of the mode), ioctl, poll and
copy_file_range (which the kernel turns into reads and writes, so they are captured).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import threading
import time
from collections import deque

import trio

from app.engine.lowlevel import NOW
from app.engine.lowlevel import compiled as _fuseread  # the compiled hot paths, or None
from app.services import mounts

log = logging.getLogger("mirrorsetup.fusewire")

ROOT_ID = 1  # FUSE_ROOT_ID
KERNEL_MAJOR, OUR_MINOR = 7, 39  # 7.39: FUSE_STATX
MAX_WRITE = 1 << 20  # what libfuse asks for: 256 pages per request
MAX_PAGES = MAX_WRITE // 4096
BUFFER = MAX_WRITE + 4096  # a write request's headers and 1 MiB of data


def _spin_ns() -> int:
    """After answering, how long to poll /dev/fuse before parking in trio's epoll: an
    application doing one request after another (tar, rm -rf, git) sends its next one within
    microseconds, and parking then waking costs more than that. Only with a second CPU for the
    application to run on; MIRRORSETUP_FUSE_SPIN_US sets it (0: never), for bench comparisons."""
    default = 50 if len(os.sched_getaffinity(0)) > 1 else 0
    raw = os.environ.get("MIRRORSETUP_FUSE_SPIN_US")
    if raw is None:
        return default * 1000
    if not raw.strip().isdigit():
        log.warning("MIRRORSETUP_FUSE_SPIN_US=%r is not a number of microseconds: %d is used",
                    raw, default)
        return default * 1000
    return int(raw) * 1000


SPIN_NS = _spin_ns()
CHECKPOINT_EVERY = 64  # requests answered back to back before other trio tasks get a turn

# INIT flags (<linux/fuse.h>)
ASYNC_READ, ATOMIC_O_TRUNC, BIG_WRITES, DONT_MASK = 1 << 0, 1 << 3, 1 << 5, 1 << 6
AUTO_INVAL_DATA, DO_READDIRPLUS, ASYNC_DIO = 1 << 12, 1 << 13, 1 << 15
PARALLEL_DIROPS, POSIX_ACL, MAX_PAGES_FLAG, SETXATTR_EXT = 1 << 18, 1 << 20, 1 << 22, 1 << 29
HANDLE_KILLPRIV_V2 = 1 << 28  # asked only by a file system that kills_privileges (see _init)
WANTED = (ASYNC_READ | ATOMIC_O_TRUNC | BIG_WRITES | DONT_MASK | AUTO_INVAL_DATA | DO_READDIRPLUS
          | ASYNC_DIO | PARALLEL_DIROPS | POSIX_ACL | MAX_PAGES_FLAG | SETXATTR_EXT)

# setattr valid bits
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FATTR_ATIME, FATTR_MTIME, FATTR_FH = 1 << 4, 1 << 5, 1 << 6
FATTR_ATIME_NOW, FATTR_MTIME_NOW = 1 << 7, 1 << 8
FATTR_KILL_SUIDGID = 1 << 11
WRITE_KILL_SUIDGID = 1 << 2  # fuse_write_in.write_flags
OPEN_KILL_SUIDGID = 1 << 0  # fuse_open_in / fuse_create_in .open_flags
FOPEN_KEEP_CACHE = 1 << 1
GETATTR_FH = 1 << 0
FSYNC_FDATASYNC = 1 << 0
SETXATTR_ACL_KILL_SGID = 1 << 0

# opcodes
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK, MKNOD, MKDIR = 1, 2, 3, 4, 5, 6, 8, 9
UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS = 10, 11, 12, 13, 14, 15, 16, 17
RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR = 18, 20, 21, 22, 23, 24
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 25, 26, 27, 28, 29, 30
CREATE, INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE, READDIRPLUS = 35, 36, 38, 42, 43, 44
RENAME2, LSEEK, TMPFILE, STATX = 45, 46, 51, 52
CHANGES = {SETATTR, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, WRITE, SETXATTR,
           REMOVEXATTR, CREATE, FALLOCATE, RENAME2, TMPFILE}  # wait while frozen (OPEN: O_TRUNC)
NO_REPLY = {FORGET, BATCH_FORGET, INTERRUPT}

IN_HEADER = struct.Struct("=IIQQIIIHH")
OUT_HEADER = struct.Struct("=IiQ")
ATTR = "QQQqqqIIIIIIIIII"  # fuse_attr: ino size blocks atime mtime ctime, nsecs, mode .. flags
ENTRY_OUT = struct.Struct("=QQQQII" + ATTR)
ATTR_OUT = struct.Struct("=QII" + ATTR)
OPEN_OUT = struct.Struct("=QII")
INIT_IN = struct.Struct("=IIII")
INIT_OUT = struct.Struct("=IIIIHHIIHHI7I")
SETATTR_IN = struct.Struct("=IIQQQqqqIIIIIIII")
U64, U32 = struct.Struct("=Q"), struct.Struct("=I")
TWO_U32 = struct.Struct("=II")
FOUR_U32 = struct.Struct("=IIII")
RW_IN = struct.Struct("=QQIIQII")  # fuse_read_in and fuse_write_in
RELEASE_IN = struct.Struct("=QIIQ")
FSYNC_IN = struct.Struct("=QII")
FALLOCATE_IN = struct.Struct("=QQQII")
LSEEK_IN = struct.Struct("=QQII")
RENAME2_IN = struct.Struct("=QII")
FORGET_ONE = struct.Struct("=QQ")
STATFS_OUT = struct.Struct("=QQQQQIIII24x")
DIRENT = struct.Struct("=QQII")
STATX_IN = struct.Struct("=IIQII")
STATX_OUT = struct.Struct("=QII16x")  # followed by a struct statx, which fuse_statx is bit for bit
STATX_INO, STATX_DEV = struct.Struct("=Q"), struct.Struct("=II")  # at 32 and 136 in struct statx
TIMEOUT_S, TIMEOUT_NS = 1, 0  # names and attributes may be cached 1 s: we are the only way in
OTHER_DEV_INO = 1 << 62  # tags the inode numbers shown for nodes on another file system


def _split(ns: int) -> tuple[int, int]:
    return divmod(ns, 1_000_000_000)


def _read_request(fd: int, buf: mmap.mmap, spin_ns: int) -> int:
    """The next request into `buf`: its length (0 at end of file), or minus the errno of the
    read, -EAGAIN once `spin_ns` passed with nothing to read (the fd is non-blocking). What
    app/engine/_fuseread.c does without the GIL, when it is built."""
    start = None
    while True:
        try:
            return os.readv(fd, [buf])
        except BlockingIOError:
            now = time.perf_counter_ns()
            if start is None:
                start = now
            if now - start >= spin_ns:
                return -errno.EAGAIN
        except InterruptedError:
            continue
        except OSError as exc:
            return -(exc.errno or errno.EIO)


class Ctx:
    """Who asks: the caller's ids and, for creations, its umask (FUSE_DONT_MASK)."""
    __slots__ = ("uid", "gid", "pid", "umask")

    def __init__(self, uid: int, gid: int, pid: int, umask: int = 0):
        self.uid, self.gid, self.pid, self.umask = uid, gid, pid, umask


class Changes:
    """What a SETATTR asks to change; None leaves a field as it is, NOW means the current time."""
    __slots__ = ("mode", "uid", "gid", "size", "atime_ns", "mtime_ns", "fh", "kill_suidgid")

    def __init__(self, valid: int, fh: int, size: int, atime: int, mtime: int, atimensec: int,
                 mtimensec: int, mode: int, uid: int, gid: int):
        self.fh = fh if valid & FATTR_FH else None
        self.mode = mode if valid & FATTR_MODE else None
        self.uid = uid if valid & FATTR_UID else None
        self.gid = gid if valid & FATTR_GID else None
        self.size = size if valid & FATTR_SIZE else None
        self.kill_suidgid = bool(valid & FATTR_KILL_SUIDGID)  # a truncate by a caller without CAP_FSETID
        self.atime_ns = (NOW if valid & FATTR_ATIME_NOW else atime * 1_000_000_000 + atimensec) \
            if valid & FATTR_ATIME else None
        self.mtime_ns = (NOW if valid & FATTR_MTIME_NOW else mtime * 1_000_000_000 + mtimensec) \
            if valid & FATTR_MTIME else None

    def only_ctime(self) -> bool:
        """Nothing but the change time: what chown(f, -1, -1) sends (ATTR_CTIME alone)."""
        return (self.mode is None and self.uid is None and self.gid is None and self.size is None
                and self.atime_ns is None and self.mtime_ns is None)


class Gate:
    """A file system's side of holding changes still (a mirror, verify or catch-up): while
    `unfrozen` is clear the session queues the requests that change something, in arrival
    order, and answers them once it is set. Replacing `unfrozen` by a new Event closes the
    gate; setting it opens it."""

    def __init__(self) -> None:
        self.unfrozen = trio.Event()
        self.unfrozen.set()

    journal = None  # the file system's: a full queue in "block" mode holds changes here too
    waits_for_room = False  # changes are held now until the queue has room for them

    def frozen(self, nbytes: int = 0) -> bool:
        """Whether a change (of about `nbytes`) waits at the gate now."""
        return not self.unfrozen.is_set() or (
            self.journal is not None and self.journal.writers_wait(nbytes))

    async def wait_unfrozen(self, nbytes: int = 0) -> None:
        while True:
            if not self.unfrozen.is_set():
                await self.unfrozen.wait()
            elif self.journal is not None and self.journal.writers_wait(nbytes):
                self.waits_for_room = True
                try:
                    await trio.to_thread.run_sync(self.journal.wait_room, nbytes, 1.0,
                                                  abandon_on_cancel=True)
                finally:
                    self.waits_for_room = False
            else:
                return


class Session:
    """One mounted FUSE file system; `fs` implements the operations (see mirrorfs.MirrorFS)."""

    def __init__(self, fs, mountpoint: str, options=()):
        self.fs = fs
        self.mountpoint = mountpoint
        self.options = list(options)
        self.fd = -1
        self._setxattr_ext = False  # FUSE_SETXATTR_EXT agreed: fuse_setxattr_in has 16 bytes
        self._deferred: deque[tuple[int, int, int, Ctx, bytes]] = deque()
        self._draining = False
        self._nursery: trio.Nursery | None = None
        # Set while the request loop is parked (nothing to answer) or not running; clear while
        # it answers requests back to back. A local target's applier yields to it (shipper.py).
        self.idle = threading.Event()
        self.idle.set()
        # Bumped each time the parked loop wakes: the applier's yield tells a loop that parked
        # for a moment between two requests from one that stayed parked.
        self.wakeups = 0
        self._handlers = {
            LOOKUP: self._lookup, FORGET: self._forget, BATCH_FORGET: self._batch_forget,
            GETATTR: self._getattr, SETATTR: self._setattr, READLINK: self._readlink,
            SYMLINK: self._symlink, MKNOD: self._mknod, MKDIR: self._mkdir, UNLINK: self._unlink,
            RMDIR: self._rmdir, RENAME: self._rename, RENAME2: self._rename2, LINK: self._link,
            OPEN: self._open, READ: self._read, WRITE: self._write, STATFS: self._statfs,
            RELEASE: self._release, FSYNC: self._fsync, FLUSH: self._flush,
            SETXATTR: self._setxattr, GETXATTR: self._getxattr, LISTXATTR: self._listxattr,
            REMOVEXATTR: self._removexattr, INIT: self._init, OPENDIR: self._opendir,
            READDIRPLUS: self._readdirplus, RELEASEDIR: self._releasedir, FSYNCDIR: self._fsyncdir,
            CREATE: self._create, TMPFILE: self._tmpfile, INTERRUPT: self._interrupt,
            DESTROY: self._destroy, FALLOCATE: self._fallocate, LSEEK: self._lseek,
            STATX: self._statx,
        }
        # An operation the file system does not have is answered ENOSYS (the kernel then stops
        # asking, e.g. the loop device's discards to a block capture), not EIO with a traceback.
        for opcode, name in {READLINK: "readlink", SYMLINK: "symlink", MKNOD: "mknod",
                             MKDIR: "mkdir", UNLINK: "unlink", RMDIR: "rmdir", RENAME: "rename",
                             RENAME2: "rename", LINK: "link", SETXATTR: "setxattr",
                             REMOVEXATTR: "removexattr", CREATE: "create", TMPFILE: "tmpfile",
                             FALLOCATE: "fallocate", LSEEK: "lseek"}.items():
            if not hasattr(self.fs, name):
                del self._handlers[opcode]

    # -- attributes as the kernel wants them ------------------------------------------------------
    def _attr(self, nodeid: int, st: os.stat_result) -> tuple:
        """fuse_attr's fields. The inode number shown is the lower file's own (stat, ls -i, git
        and tar see the numbers they saw before the mount); a node on a file system mounted
        below the entry, whose numbers could repeat the entry's, shows ours, tagged."""
        a, an = _split(st.st_atime_ns)
        m, mn = _split(st.st_mtime_ns)
        c, cn = _split(st.st_ctime_ns)
        ino = st.st_ino if st.st_dev == self.fs.dev else OTHER_DEV_INO | nodeid
        return (ino, st.st_size, st.st_blocks, a, m, c, an, mn, cn, st.st_mode, st.st_nlink,
                st.st_uid, st.st_gid, st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0)

    def _entry(self, nodeid: int, st: os.stat_result) -> bytes:
        return ENTRY_OUT.pack(nodeid, 0, TIMEOUT_S, TIMEOUT_S, TIMEOUT_NS, TIMEOUT_NS,
                              *self._attr(nodeid, st))

    # -- mount --------------------------------------------------------------------------------
    def mount(self, flags: int = mounts.MS_NOSUID | mounts.MS_NODEV) -> None:
        """Open /dev/fuse and mount it on the mount point (we are root: no fusermount)."""
        fsname, subtype, extra = "fuse", None, []
        for opt in self.options:
            key, _, value = opt.partition("=")
            if key == "fsname":
                fsname = value
            elif key == "subtype":
                subtype = value
            else:
                extra.append(opt)
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        data = ",".join([f"fd={self.fd}", "rootmode=40000", "user_id=0", "group_id=0", *extra])
        try:
            mounts.mount(fsname, self.mountpoint, "fuse." + subtype if subtype else "fuse", flags, data)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def close(self, unmount: bool = False) -> None:
        if unmount:
            mounts.umount(self.mountpoint, mounts.MNT_DETACH)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- the request loop -----------------------------------------------------------------------
    async def main(self) -> None:
        """Answer requests until the file system is unmounted or its connection aborted."""
        # Anonymous memory: resident only as far as requests have filled it. A bytearray was
        # zeroed whole, 1 MiB resident in every capture worker, idle or not.
        buf = mmap.mmap(-1, BUFFER, flags=mmap.MAP_PRIVATE)
        view = memoryview(buf)
        fd = self.fd
        read = _fuseread.read_request if _fuseread is not None else _read_request
        if _fuseread is None:  # said in the daemon's log, so a slow capture has its reason there
            log.warning("%s: app/engine/_fuseread.c is not built (the install found no C compiler "
                        "or Python headers): requests are read and block writes answered in "
                        "Python, more slowly", self.mountpoint)
        fast = getattr(self.fs, "serve_writes", None)  # a block capture's writes, compiled
        clock = time.perf_counter_ns
        served = 0
        idle_since = None  # when the first read found nothing since the last request
        spin = bool(SPIN_NS)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                while True:
                    polled = SPIN_NS if spin else 0
                    n = None
                    if fast is not None and not self._deferred and not self.fs.frozen():
                        n = fast(fd, buf, polled)
                    if n is None:
                        n = read(fd, buf, polled)
                    if n < 0:
                        err = -n
                        if err == errno.ENOBUFS:  # a full batch of writes answered in C
                            served = 0
                            await trio.lowlevel.checkpoint()
                            continue
                        if err == errno.EAGAIN:  # nothing came while it polled: park
                            if idle_since is None:
                                idle_since = clock() - polled
                            self.idle.set()
                            await trio.lowlevel.wait_readable(fd)
                            self.idle.clear()
                            self.wakeups += 1
                            served = 0
                            continue
                        if err == errno.ENOENT:  # interrupted before we read it
                            continue
                        # ENODEV: unmounted; ECONNABORTED: the connection was aborted (a stop of
                        # ours writes /sys/fs/fuse/connections/N/abort, so may an administrator)
                        if err in (errno.ENODEV, errno.ECONNABORTED):
                            break
                        raise OSError(err, os.strerror(err))
                    if n == 0:
                        break
                    if idle_since is not None:  # spin again only while requests follow closely
                        spin = SPIN_NS and clock() - idle_since < 2 * SPIN_NS
                        idle_since = None
                    self._request(view[:n])
                    served += 1
                    if served >= CHECKPOINT_EVERY:
                        served = 0
                        await trio.lowlevel.checkpoint()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self.idle.set()

    def _request(self, msg: memoryview) -> None:
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = IN_HEADER.unpack_from(msg)
        body = msg[IN_HEADER.size:length - extlen * 8]
        ctx = Ctx(uid, gid, pid)
        if (opcode in CHANGES or (opcode == OPEN and U32.unpack_from(body)[0] & os.O_TRUNC)) and \
                (self._deferred or self.fs.frozen(len(body))):
            self._deferred.append((opcode, unique, nodeid, ctx, bytes(body)))
            self.idle.set()  # the freeze's holder waits for the applier: it must not yield
            if not self._draining:
                self._draining = True
                self._nursery.start_soon(self._drain_deferred)
            return
        self._answer(opcode, unique, nodeid, ctx, body)

    async def _drain_deferred(self) -> None:
        """Answer the queued changes, in order, once the file system is no longer frozen."""
        try:
            while self._deferred:
                await self.fs.wait_unfrozen(len(self._deferred[0][4]))
                opcode, unique, nodeid, ctx, body = self._deferred.popleft()
                self._answer(opcode, unique, nodeid, ctx, memoryview(body))
        finally:
            self._draining = False

    def _answer(self, opcode: int, unique: int, nodeid: int, ctx: Ctx, body: memoryview) -> None:
        handler = self._handlers.get(opcode)
        try:
            if handler is None:
                raise OSError(errno.ENOSYS, "not implemented")
            out = handler(nodeid, body, ctx)
        except OSError as exc:
            if opcode not in NO_REPLY:
                self._reply_error(unique, exc.errno or errno.EIO)
            return
        except Exception:
            log.exception("FUSE request %d on node %d failed", opcode, nodeid)
            if opcode not in NO_REPLY:
                self._reply_error(unique, errno.EIO)
            return
        finally:
            self.fs.answered()
        if opcode in NO_REPLY:
            return
        if out is None:
            out = ()
        elif not isinstance(out, (list, tuple)):
            out = (out,)
        size = OUT_HEADER.size + sum(len(b) for b in out)
        self._send([OUT_HEADER.pack(size, 0, unique), *out])

    def _reply_error(self, unique: int, err: int) -> None:
        self._send([OUT_HEADER.pack(OUT_HEADER.size, -err, unique)])

    def _send(self, bufs: list) -> None:
        try:
            os.writev(self.fd, bufs)
        except OSError as exc:
            # ENOENT: the request was interrupted, nobody waits for it; ENODEV, ECONNABORTED:
            # unmounted or aborted, the request loop ends at its next read
            if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.ECONNABORTED):
                raise

    # -- requests -------------------------------------------------------------------------------
    def _init(self, nodeid, body, ctx):
        major, minor, max_readahead, flags = INIT_IN.unpack_from(body)
        if major != KERNEL_MAJOR:
            raise OSError(errno.EPROTO, f"FUSE protocol {major}.{minor} not supported")
        self._setxattr_ext = bool(flags & SETXATTR_EXT)
        self.fs.init()
        # FUSE_HANDLE_KILLPRIV_V2: the kernel no longer asks for security.capability before
        # every write of a file that has none (one round trip in four of an SQLite commit);
        # the file system takes set-ID bits away itself, as the flags below tell it to
        wanted = WANTED | (HANDLE_KILLPRIV_V2 if getattr(self.fs, "kills_privileges", False) else 0)
        # max_background, congestion_threshold 0: the kernel's 12 and 9. 64 and 48 (more of a
        # captured loop's qd16 async direct I/O in flight at once) made no difference
        # (bench/apps.py, 3 interleaved runs against 0, 0: 4 KiB 166 vs 171 MB/s, 64 KiB 698 vs
        # 742): the one request loop, not the queue, is the limit
        return INIT_OUT.pack(KERNEL_MAJOR, min(minor, OUR_MINOR), max_readahead, flags & wanted,
                             0, 0, MAX_WRITE, 1, MAX_PAGES, 0, 0, 0, 0, 0, 0, 0, 0, 0)

    def _destroy(self, nodeid, body, ctx):
        return None

    def _interrupt(self, nodeid, body, ctx):
        return None  # every request is answered soon anyway; the kernel waits for that

    def _lookup(self, nodeid, body, ctx):
        name = bytes(body[:-1])
        return self._entry(*self.fs.lookup(nodeid, name))

    def _forget(self, nodeid, body, ctx):
        self.fs.forget(nodeid, U64.unpack_from(body)[0])

    def _batch_forget(self, nodeid, body, ctx):
        count = U32.unpack_from(body)[0]
        for i in range(count):
            ino, n = FORGET_ONE.unpack_from(body, 8 + i * FORGET_ONE.size)
            self.fs.forget(ino, n)

    def _getattr(self, nodeid, body, ctx):
        flags, _, fh = struct.unpack_from("=IIQ", body)
        st = self.fs.getattr(nodeid, fh if flags & GETATTR_FH else None)
        return ATTR_OUT.pack(TIMEOUT_S, TIMEOUT_NS, 0, *self._attr(nodeid, st))

    def _statx(self, nodeid, body, ctx):
        flags, _, fh, _, mask = STATX_IN.unpack_from(body)
        sx = self.fs.statx(nodeid, fh if flags & GETATTR_FH else None, mask)
        if os.makedev(*STATX_DEV.unpack_from(sx, 136)) != self.fs.dev:
            STATX_INO.pack_into(sx, 32, OTHER_DEV_INO | nodeid)  # the number GETATTR shows
        return STATX_OUT.pack(TIMEOUT_S, TIMEOUT_NS, 0), sx

    def _setattr(self, nodeid, body, ctx):
        (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid, gid,
         _) = SETATTR_IN.unpack_from(body)
        changes = Changes(valid, fh, size, atime, mtime, atimensec, mtimensec, mode, uid, gid)
        st = self.fs.setattr(nodeid, changes, ctx)
        return ATTR_OUT.pack(TIMEOUT_S, TIMEOUT_NS, 0, *self._attr(nodeid, st))

    def _readlink(self, nodeid, body, ctx):
        return self.fs.readlink(nodeid)

    def _symlink(self, nodeid, body, ctx):
        raw = bytes(body)
        name, _, rest = raw.partition(b"\0")
        target = rest[:rest.index(b"\0")]
        return self._entry(*self.fs.symlink(nodeid, name, target, ctx))

    def _mknod(self, nodeid, body, ctx):
        mode, rdev, ctx.umask, _ = FOUR_U32.unpack_from(body)
        name = bytes(body[16:-1])
        return self._entry(*self.fs.mknod(nodeid, name, mode, os.makedev(*_decode_dev(rdev)), ctx))

    def _mkdir(self, nodeid, body, ctx):
        mode, ctx.umask = TWO_U32.unpack_from(body)
        name = bytes(body[8:-1])
        return self._entry(*self.fs.mkdir(nodeid, name, mode, ctx))

    def _unlink(self, nodeid, body, ctx):
        self.fs.unlink(nodeid, bytes(body[:-1]))

    def _rmdir(self, nodeid, body, ctx):
        self.fs.rmdir(nodeid, bytes(body[:-1]))

    def _rename(self, nodeid, body, ctx):
        newdir = U64.unpack_from(body)[0]
        old, new = bytes(body[8:-1]).split(b"\0", 1)
        self.fs.rename(nodeid, old, newdir, new, 0)

    def _rename2(self, nodeid, body, ctx):
        newdir, flags, _ = RENAME2_IN.unpack_from(body)
        old, new = bytes(body[RENAME2_IN.size:-1]).split(b"\0", 1)
        self.fs.rename(nodeid, old, newdir, new, flags)

    def _link(self, nodeid, body, ctx):
        old = U64.unpack_from(body)[0]
        return self._entry(*self.fs.link(old, nodeid, bytes(body[8:-1])))

    def _open(self, nodeid, body, ctx):
        flags, open_flags = TWO_U32.unpack_from(body)
        if open_flags & OPEN_KILL_SUIDGID:
            fh = self.fs.open(nodeid, flags, kill_suidgid=True)
        else:
            fh = self.fs.open(nodeid, flags)
        return OPEN_OUT.pack(fh, getattr(self.fs, "open_flags", FOPEN_KEEP_CACHE), 0)

    def _create(self, nodeid, body, ctx):
        flags, mode, ctx.umask, open_flags = FOUR_U32.unpack_from(body)
        name = bytes(body[16:-1])
        ino, st, fh = self.fs.create(nodeid, name, mode, flags, ctx,
                                     kill_suidgid=bool(open_flags & OPEN_KILL_SUIDGID))
        return self._entry(ino, st), OPEN_OUT.pack(fh, FOPEN_KEEP_CACHE, 0)

    def _tmpfile(self, nodeid, body, ctx):
        flags, mode, ctx.umask, _ = FOUR_U32.unpack_from(body)
        ino, st, fh = self.fs.tmpfile(nodeid, mode, flags, ctx)
        return self._entry(ino, st), OPEN_OUT.pack(fh, FOPEN_KEEP_CACHE, 0)

    def _read(self, nodeid, body, ctx):
        fh, offset, size = RW_IN.unpack_from(body)[:3]
        return self.fs.read(fh, offset, size)

    def _write(self, nodeid, body, ctx):
        fh, offset, size, write_flags = RW_IN.unpack_from(body)[:4]
        if write_flags & WRITE_KILL_SUIDGID:  # (only under HANDLE_KILLPRIV_V2)
            self.fs.kill_suidgid(fh)
        n = self.fs.write(fh, offset, body[RW_IN.size:RW_IN.size + size])
        return TWO_U32.pack(n, 0)

    def _statfs(self, nodeid, body, ctx):
        sv = self.fs.statfs()
        return STATFS_OUT.pack(sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree,
                               sv.f_bsize, sv.f_namemax, sv.f_frsize, 0)

    def _release(self, nodeid, body, ctx):
        self.fs.release(RELEASE_IN.unpack_from(body)[0])

    def _flush(self, nodeid, body, ctx):
        """Every write already reached the lower file system: "not supported" makes the kernel
        stop sending FLUSH for the rest of the mount, one round trip less per close(2)."""
        raise OSError(errno.ENOSYS, "flush is not needed")

    def _fsync(self, nodeid, body, ctx):
        fh, flags, _ = FSYNC_IN.unpack_from(body)
        self.fs.fsync(fh, bool(flags & FSYNC_FDATASYNC))

    def _fallocate(self, nodeid, body, ctx):
        fh, offset, length, mode, _ = FALLOCATE_IN.unpack_from(body)
        self.fs.fallocate(fh, offset, length, mode)

    def _lseek(self, nodeid, body, ctx):
        fh, offset, whence, _ = LSEEK_IN.unpack_from(body)
        return U64.pack(self.fs.lseek(fh, offset, whence))

    def _setxattr(self, nodeid, body, ctx):
        if self._setxattr_ext:
            size, flags, setxattr_flags, _ = FOUR_U32.unpack_from(body)
            raw = bytes(body[16:])
        else:
            (size, flags), setxattr_flags = TWO_U32.unpack_from(body), 0
            raw = bytes(body[8:])
        end = raw.index(b"\0")
        self.fs.setxattr(nodeid, raw[:end], raw[end + 1:end + 1 + size], flags,
                         bool(setxattr_flags & SETXATTR_ACL_KILL_SGID), ctx)

    def _getxattr(self, nodeid, body, ctx):
        size = U32.unpack_from(body)[0]
        value = self.fs.getxattr(nodeid, bytes(body[8:-1]))
        return _sized(value, size)

    def _listxattr(self, nodeid, body, ctx):
        size = U32.unpack_from(body)[0]
        names = self.fs.listxattr(nodeid)
        return _sized(b"".join(n + b"\0" for n in names), size)

    def _removexattr(self, nodeid, body, ctx):
        self.fs.removexattr(nodeid, bytes(body[:-1]))

    def _opendir(self, nodeid, body, ctx):
        return OPEN_OUT.pack(self.fs.opendir(nodeid), 0, 0)

    def _releasedir(self, nodeid, body, ctx):
        self.fs.releasedir(RELEASE_IN.unpack_from(body)[0])

    def _fsyncdir(self, nodeid, body, ctx):
        fh, flags, _ = FSYNC_IN.unpack_from(body)
        self.fs.fsyncdir(fh, bool(flags & FSYNC_FDATASYNC))

    def _readdirplus(self, nodeid, body, ctx):
        """Entries from `offset` on, as many as fit in `size`. An entry the file system counted
        as a lookup (`counted`) that did not fit is given back with `unsent_entry`: the kernel
        sends FORGET only for what it received."""
        fh, offset, size = RW_IN.unpack_from(body)[:3]
        out, used = [], 0
        for name, ino, st, next_off, counted in self.fs.readdir(fh, offset):
            rec = (ENTRY_OUT.size + DIRENT.size + len(name) + 7) & ~7
            if used + rec > size:
                if counted:
                    self.fs.unsent_entry(ino)
                break
            attr = self._attr(ino, st)
            dirent = DIRENT.pack(attr[0], next_off, len(name), (st.st_mode >> 12) & 0xF)
            pad = rec - ENTRY_OUT.size - DIRENT.size - len(name)
            out.append(ENTRY_OUT.pack(ino if counted else 0, 0, TIMEOUT_S, TIMEOUT_S, TIMEOUT_NS,
                                      TIMEOUT_NS, *attr) + dirent + name + bytes(pad))
            used += rec
        return b"".join(out)


def _sized(value: bytes, size: int):
    """getxattr/listxattr: size 0 asks for the length only; a smaller buffer is ERANGE."""
    if size == 0:
        return TWO_U32.pack(len(value), 0)
    if len(value) > size:
        raise OSError(errno.ERANGE, "buffer too small")
    return value


def _decode_dev(rdev: int) -> tuple[int, int]:
    """The kernel's new_encode_dev() form of a device number: (major, minor)."""
    return (rdev & 0xFFF00) >> 8, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
