"""Loop devices driven with the kernel's own ioctls (fcntl + struct), read back from sysfs.

Why not shell out to losetup: we need errno on every failure, the race-safe allocation under a
lock shared with our other processes, and to say "detach pending" when the kernel defers a
detach. What is attached is always read from the kernel (sysfs /sys/block/loopN, or for a loop
we hold open its LOOP_GET_STATUS64), never from a cached list; the backing file's path always
from sysfs, never from `lo_file_name`, which the kernel cuts at 64 bytes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import sys
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from app.services._ioctl import (
    BLKROGET, LO_FLAGS_AUTOCLEAR, LO_FLAGS_DIRECT_IO, LO_FLAGS_PARTSCAN, LO_FLAGS_READ_ONLY,
    LOOP_CLR_FD, LOOP_CONFIGURE, LOOP_CTL_ADD, LOOP_CTL_GET_FREE, LOOP_GET_STATUS64, LOOP_INFO64,
    LOOP_SET_BLOCK_SIZE, LOOP_SET_DIRECT_IO, LOOP_SET_FD, LOOP_SET_STATUS64, SECTOR_SIZE,
    block_device_size, info64_without, pack_config, pack_info64)
from app.services.results import ConfigError, MirrorError, Outcome, Result

SYS_ROOT = "/sys"
LOOP_CONTROL = "/dev/loop-control"

# util-linux retries allocation 64 times: GET_FREE only names a free loop, it does not reserve
# it, so a process that does not share our lock (losetup, systemd) can bind it first (EBUSY).
ALLOC_RETRIES = 64
# SET_STATUS64 returns EAGAIN while another opener (udev's blkid, a prober) still has pages
# of the device cached; the kernel wants us to try again shortly. util-linux waits ~2.5 s.
SET_STATUS_RETRIES = 20
SET_STATUS_BACKOFF = 0.02        # seconds, doubled up to SET_STATUS_BACKOFF_MAX
SET_STATUS_BACKOFF_MAX = 0.25
# devtmpfs creates /dev/loopN synchronously in LOOP_CTL_ADD; this short wait only covers
# a /dev populated by something slower (it is bounded: ~1 s).
NODE_WAIT_TRIES = 50
NODE_WAIT_STEP = 0.02

_LOOP_PATH = re.compile(r"/dev/loop(0|[1-9][0-9]{0,6})")
_LOOP_NAME = re.compile(r"loop(0|[1-9][0-9]{0,6})")


@dataclass(frozen=True)
class LoopStatus:
    """One loop device as sysfs shows it; sizes in bytes."""

    device: str
    index: int
    backing_file: str | None
    offset: int
    sizelimit: int
    size: int
    read_only: bool
    autoclear: bool
    partscan: bool
    direct_io: bool

    def to_json(self) -> dict:
        return asdict(self)


def parse_loop_path(path: str) -> int:
    """'/dev/loopN' -> N; anything else is a configuration mistake, said as such."""
    m = _LOOP_PATH.fullmatch(path or "")
    if not m:
        raise ConfigError(f"{path!r} is not a loop device path (expected /dev/loopN)",
                          key="loop", obj=path, errno=errno.EINVAL)
    return int(m.group(1))


def _sys_block(index: int) -> str:
    return os.path.join(SYS_ROOT, "block", f"loop{index}")


def _read_sys(path: str) -> str:
    # open/read/close, nothing else: a buffered open() adds an fstat, an ioctl and a seek, and
    # a picture of every loop reads eight of these per loop
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 8192)
    finally:
        os.close(fd)
    return data.decode("utf-8", "surrogateescape").rstrip("\n")


def status_of(index: int) -> LoopStatus | None:
    """Read sysfs; None when the loop is unbound (no loop/ directory) or vanished meanwhile."""
    base = _sys_block(index)
    try:
        backing = _read_sys(os.path.join(base, "loop", "backing_file"))
        val = {name: int(_read_sys(os.path.join(base, "loop", name)))
               for name in ("offset", "sizelimit", "autoclear", "partscan", "dio")}
        sectors = int(_read_sys(os.path.join(base, "size")))
        ro = _read_sys(os.path.join(base, "ro")) == "1"
    except (OSError, ValueError):
        # Unbound, or detached/removed between our reads (sysfs files vanish or read empty).
        return None
    return LoopStatus(f"/dev/loop{index}", index, backing, val["offset"], val["sizelimit"],
                      sectors * SECTOR_SIZE, ro, bool(val["autoclear"]), bool(val["partscan"]),
                      bool(val["dio"]))


def offset_of(index: int, backing: str) -> int | None:
    """The offset of loop `index` while `backing` is bound to it (None: unbound, or bound to
    another file now): two sysfs reads, where a whole status is eight."""
    base = os.path.join(_sys_block(index), "loop")
    try:
        offset = int(_read_sys(os.path.join(base, "offset")))
        still = _read_sys(os.path.join(base, "backing_file"))  # after: the offset was of it
    except (OSError, ValueError):
        return None
    return offset if still == backing else None


def bound_backing() -> dict[int, str]:
    """Index -> backing file of every bound loop, in index order: one sysfs read per loop (a
    whole status is eight); callers read the status of the few they need with status_of()."""
    try:
        names = os.listdir(os.path.join(SYS_ROOT, "block"))
    except OSError as exc:
        raise MirrorError.from_oserror("list", os.path.join(SYS_ROOT, "block"), exc) from exc
    found = {}
    for name in names:
        if m := _LOOP_NAME.fullmatch(name):
            index = int(m.group(1))
            try:
                found[index] = _read_sys(os.path.join(_sys_block(index), "loop", "backing_file"))
            except OSError:
                continue  # unbound (no loop/ directory), or detached meanwhile
    return dict(sorted(found.items()))


def _bound(index: int) -> bool:
    """Is a file bound to loop `index`? One look at sysfs (its loop/ directory), not eight."""
    return os.path.exists(os.path.join(_sys_block(index), "loop", "backing_file"))


def status(loop: str) -> LoopStatus | None:
    """The loop's attachment as the kernel reports it; None when not attached."""
    return status_of(parse_loop_path(loop))


def list_attached() -> list[LoopStatus]:
    """Every bound loop device, sorted by index."""
    try:
        names = os.listdir(os.path.join(SYS_ROOT, "block"))
    except OSError as exc:
        raise MirrorError.from_oserror("list", os.path.join(SYS_ROOT, "block"), exc) from exc
    found = []
    for name in names:
        m = _LOOP_NAME.fullmatch(name)
        if m and (st := status_of(int(m.group(1)))) is not None:
            found.append(st)
    return sorted(found, key=lambda s: s.index)


def holders_of(loop_or_dev: str) -> list[str]:
    """Kernel names of what holds a block device open exclusively (dm-0, md127, ...).

    Accepts '/dev/…' (symlinks such as /dev/mapper/x or /dev/disk/by-id/… included) or a bare
    kernel name like 'loop3'.
    """
    if "/" in loop_or_dev:
        try:
            rdev = os.stat(loop_or_dev).st_rdev
        except OSError as exc:
            raise MirrorError.from_oserror("inspect", loop_or_dev, exc) from exc
        base = os.path.join(SYS_ROOT, "dev", "block", f"{os.major(rdev)}:{os.minor(rdev)}")
    else:
        base = os.path.join(SYS_ROOT, "class", "block", loop_or_dev)
    try:
        return sorted(os.listdir(os.path.join(base, "holders")))
    except OSError as exc:
        raise MirrorError.from_oserror("list holders of", loop_or_dev, exc) from exc


# -- /dev/loop-control -----------------------------------------------------------------------

@contextmanager
def _control_locked() -> Iterator[int]:
    """/dev/loop-control opened and flock'ed, so our processes allocate one at a time."""
    try:
        fd = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise MirrorError.from_oserror("open", LOOP_CONTROL, exc) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)            # closing drops the flock


def _get_free(ctl: int) -> int:
    try:
        return fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
    except OSError as exc:
        raise MirrorError.from_oserror("find a free loop device via", LOOP_CONTROL, exc) from exc


def find_free() -> str:
    """A loop that is free now. Only a hint: use attach(loop=None) to allocate race-free."""
    with _control_locked() as ctl:
        return f"/dev/loop{_get_free(ctl)}"


def _ensure(ctl: int, path: str, index: int) -> None:
    if os.path.exists(path):
        return
    try:
        fcntl.ioctl(ctl, LOOP_CTL_ADD, index)
    except OSError as exc:
        if exc.errno != errno.EEXIST:       # EEXIST: the kernel has it, only the node is missing
            raise MirrorError.from_oserror("create", path, exc) from exc
    for _ in range(NODE_WAIT_TRIES):
        if os.path.exists(path):
            return
        time.sleep(NODE_WAIT_STEP)
    # No devtmpfs node appeared: make it from the kernel's own major:minor.
    try:
        major, minor = map(int, _read_sys(os.path.join(_sys_block(index), "dev")).split(":"))
        os.mknod(path, stat.S_IFBLK | 0o660, os.makedev(major, minor))
    except OSError as exc:
        raise MirrorError.from_oserror("create device node", path, exc) from exc


def ensure_device(path: str) -> None:
    """Create /dev/loopN (LOOP_CTL_ADD) when it does not exist yet; a no-op otherwise."""
    index = parse_loop_path(path)
    if os.path.exists(path):
        return
    with _control_locked() as ctl:
        _ensure(ctl, path, index)


# -- attach ----------------------------------------------------------------------------------

def _backing_size(backing: str, st: os.stat_result) -> int:
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISBLK(st.st_mode):
        raise MirrorError(f"attach {backing}: not a regular file or block device",
                          errno=errno.EINVAL, obj=backing)
    try:
        fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return block_device_size(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise MirrorError.from_oserror("read the size of", backing, exc) from exc


def _validate(backing: str, where: str, offset: int, sizelimit: int, block_size: int) -> None:
    """Refuse bad geometry before anything is opened or bound; errors name the loop too."""
    def bad(why: str) -> MirrorError:
        return MirrorError(f"attach {backing} to {where}: {why}", errno=errno.EINVAL, obj=where)

    if offset < 0 or offset % SECTOR_SIZE:
        raise bad(f"offset {offset} must be >= 0 and a multiple of {SECTOR_SIZE}")
    if sizelimit < 0 or sizelimit % SECTOR_SIZE:
        raise bad(f"size limit {sizelimit} must be >= 0 and a multiple of {SECTOR_SIZE}")
    if block_size and (block_size < SECTOR_SIZE or block_size & (block_size - 1)
                       or block_size > os.sysconf("SC_PAGE_SIZE")):
        raise bad(f"block size {block_size} must be 0 or a power of two from "
                  f"{SECTOR_SIZE} to the page size")
    try:
        st = os.stat(backing)
    except OSError as exc:
        raise MirrorError.from_oserror(f"attach to {where}:", backing, exc) from exc
    size = _backing_size(backing, st)
    if offset and offset >= size:
        raise bad(f"offset {offset} is at or past the end of {backing} ({size} bytes)")
    if offset + sizelimit > size:
        raise bad(f"offset {offset} + size limit {sizelimit} exceeds {backing} ({size} bytes)")


def _set_status(dev_fd: int, info: bytes) -> None:
    delay = SET_STATUS_BACKOFF
    for attempt in range(SET_STATUS_RETRIES):
        try:
            fcntl.ioctl(dev_fd, LOOP_SET_STATUS64, info)
            return
        except OSError as exc:
            # EAGAIN: another opener still caches pages of the device; the kernel asks us to
            # come back (util-linux does the same). Bounded by SET_STATUS_RETRIES.
            if exc.errno != errno.EAGAIN or attempt == SET_STATUS_RETRIES - 1:
                raise
        time.sleep(delay)
        delay = min(delay * 2, SET_STATUS_BACKOFF_MAX)


def _bind(dev_fd: int, file_fd: int, info: bytes, direct_io: bool, block_size: int) -> None:
    """LOOP_CONFIGURE, or the pre-5.8 sequence when the kernel does not know it."""
    try:
        fcntl.ioctl(dev_fd, LOOP_CONFIGURE, pack_config(file_fd, block_size, info))
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    fcntl.ioctl(dev_fd, LOOP_SET_FD, file_fd)           # EBUSY here: someone bound it first
    try:
        # SET_FD takes read-only from the file's open mode; SET_STATUS64 sets the rest.
        _set_status(dev_fd, info64_without(info, LO_FLAGS_READ_ONLY | LO_FLAGS_DIRECT_IO))
        if direct_io:
            fcntl.ioctl(dev_fd, LOOP_SET_DIRECT_IO, 1)
        if block_size:
            fcntl.ioctl(dev_fd, LOOP_SET_BLOCK_SIZE, block_size)
    except OSError:
        try:
            fcntl.ioctl(dev_fd, LOOP_CLR_FD)    # undo the half-done attach (detach at our close)
        except OSError:
            pass
        raise


def _open_backing(backing: str, where: str, read_only: bool) -> int:
    try:
        return os.open(backing, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as exc:
        err = MirrorError.from_oserror(f"attach to {where}: open", backing, exc)
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and not read_only:
            err = MirrorError(f"{err.message}; it cannot be opened for writing — "
                              f"attach it read-only if that is what you want",
                              errno=exc.errno, obj=where)
        raise err from exc


def _open_loop(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise MirrorError.from_oserror("open", path, exc) from exc


def _busy(path: str, index: int) -> MirrorError:
    st = status_of(index)
    what = st.backing_file if st else "another process's file"
    return MirrorError(f"attach to {path}: {path} is busy (attached to {what})",
                       errno=errno.EBUSY, obj=path)


def _free_index(ctl: int, avoid: Collection[int]) -> int:
    """The first free loop that is not in `avoid`: GET_FREE names the lowest free one, so past
    a kept one we look upwards ourselves (one not made yet is free: _ensure makes it)."""
    index = _get_free(ctl)
    if index not in avoid:
        return index
    index += 1
    while index in avoid or status_of(index) is not None:
        index += 1
    return index


def attach(backing: str, *, loop: str | None = None, offset: int = 0, sizelimit: int = 0,
           read_only: bool = False, autoclear: bool = False, partscan: bool = False,
           direct_io: bool = False, block_size: int = 0, avoid: Collection[int] = ()) -> LoopStatus:
    """Bind `backing` to `loop` (or the first free loop not in `avoid`: the numbers other
    entries keep as their fixed loops) and return what sysfs then shows.

    With autoclear the kernel detaches at the last close; if nothing else opened the device,
    that is our own close right after binding, so the returned status is its last sight.
    """
    index = parse_loop_path(loop) if loop else None
    where = loop or "a free loop device"
    _validate(backing, where, offset, sizelimit, block_size)
    flags = ((LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_AUTOCLEAR if autoclear else 0)
             | (LO_FLAGS_PARTSCAN if partscan else 0) | (LO_FLAGS_DIRECT_IO if direct_io else 0))
    info = pack_info64(offset, sizelimit, flags, backing)
    file_fd = _open_backing(backing, where, read_only)
    try:
        with _control_locked() as ctl:
            if index is not None:
                _ensure(ctl, loop, index)
                if status_of(index) is not None:
                    raise _busy(loop, index)
                return _attach_at(loop, index, file_fd, info, direct_io, block_size,
                                  fixed=True)
            for _ in range(ALLOC_RETRIES):
                index = _free_index(ctl, avoid)
                path = f"/dev/loop{index}"
                _ensure(ctl, path, index)
                got = _attach_at(path, index, file_fd, info, direct_io, block_size,
                                 fixed=False)
                if got is not None:
                    return got
            raise MirrorError(f"attach {backing}: every free loop device was taken by another "
                              f"process ({ALLOC_RETRIES} tries)", errno=errno.EBUSY, obj=backing)
    finally:
        os.close(file_fd)


def _attach_at(path: str, index: int, file_fd: int, info: bytes, direct_io: bool,
               block_size: int, *, fixed: bool) -> LoopStatus | None:
    """Bind on one device. None = lost the race for a device we did not choose (try another)."""
    dev_fd = _open_loop(path)
    try:
        try:
            _bind(dev_fd, file_fd, info, direct_io, block_size)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                if fixed:
                    raise _busy(path, index) from exc
                return None
            raise MirrorError.from_oserror("attach to", path, exc) from exc
        # Read while our descriptor still holds the device (see attach() about autoclear).
        st = _status_from_fd(dev_fd, path, index)
        if st is None:
            raise MirrorError(f"attach to {path}: the kernel accepted it but sysfs shows "
                              f"nothing attached", errno=errno.EIO, obj=path)
        return st
    finally:
        os.close(dev_fd)


def _status_from_fd(dev_fd: int, path: str, index: int) -> LoopStatus | None:
    """The status of a loop we hold open: geometry and flags from the kernel's own
    LOOP_GET_STATUS64 and BLKGETSIZE64 (the values sysfs prints), the backing file's whole path
    from sysfs (lo_file_name is cut at 64 bytes). None when the kernel shows it unbound.
    Read-only is the device's flag as sysfs `ro` shows it, which a `blockdev --setro` of this
    loop number, even before this binding, sets beside the loop's own LO_FLAGS_READ_ONLY."""
    try:
        info = LOOP_INFO64.unpack(fcntl.ioctl(dev_fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size)))
        size = block_device_size(dev_fd)
        ro = int.from_bytes(fcntl.ioctl(dev_fd, BLKROGET, bytes(4)), sys.byteorder)
        backing = _read_sys(os.path.join(_sys_block(index), "loop", "backing_file"))
    except OSError:
        return None
    offset, sizelimit, flags = info[3], info[4], info[8]
    return LoopStatus(path, index, backing, offset, sizelimit, size,
                      bool(ro or flags & LO_FLAGS_READ_ONLY), bool(flags & LO_FLAGS_AUTOCLEAR),
                      bool(flags & LO_FLAGS_PARTSCAN), bool(flags & LO_FLAGS_DIRECT_IO))


def backing_identity(loop: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file a loop is bound to, from LOOP_GET_STATUS64: tells a loop
    apart from a later binding of the same number, and a dead capture file from the live one
    at the same path. None when it is not bound (or is gone)."""
    try:
        fd = os.open(loop, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = LOOP_INFO64.unpack(fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size)))
    except OSError:
        return None
    finally:
        os.close(fd)
    return info[0], info[1]


def binding(loop: str) -> str | None:
    """Which binding of `loop` this is, to tell it from a later one of the same number: the
    kernel's disk sequence number, raised at every attach (sysfs `diskseq`, Linux 5.15), else
    the backing file's identity. Not the identity first: on a dead FUSE file (a block capture
    whose worker died) LOOP_GET_STATUS64 fails once the kernel's cached attributes expire, and
    the loop looked unbound while it still failed every I/O. None when nothing is bound."""
    name = os.path.basename(loop)
    if not os.path.exists(os.path.join(SYS_ROOT, "block", name, "loop", "backing_file")):
        return None
    try:
        with open(os.path.join(SYS_ROOT, "block", name, "diskseq")) as f:
            return "diskseq:" + f.read().strip()
    except OSError:
        ident = backing_identity(loop)
        return None if ident is None else f"file:{ident[0]}:{ident[1]}"


# -- detach ----------------------------------------------------------------------------------

DETACH_GRACE = 0.5  # seconds a detach waits for a brief opener's close before saying "pending"


def detach(loop: str) -> Result:
    """LOOP_CLR_FD. The kernel only marks a device that is still open (autoclear) and detaches
    it at the last close: that is reported as PENDING, not as done and not as failed."""
    try:
        index = parse_loop_path(loop)
    except MirrorError as exc:
        return Result.from_error("detach", loop, exc)
    if not _bound(index):
        return Result("detach", loop, Outcome.UNCHANGED, f"{loop}: not attached")
    try:
        fd = os.open(loop, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return Result.from_error("detach", loop, MirrorError.from_oserror("open", loop, exc))
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.ENXIO:        # unbound between our look and the ioctl
            return Result("detach", loop, Outcome.UNCHANGED, f"{loop}: not attached")
        return Result.from_error("detach", loop, MirrorError.from_oserror("detach", loop, exc))
    os.close(fd)        # our close may be the last one: the kernel detaches here
    # ... or a moment later: an opener of a moment (udev's probe of a change event, a scan
    # of the block devices, the console's own picker on a busy host) closes it soon, and then
    # the detach is done, not pending (a test saw "pending" under a few hundred loops changing)
    deadline = time.monotonic() + DETACH_GRACE
    bound = _bound(index)  # (its last answer is the one that counts: a detach-all looked
    while bound and time.monotonic() < deadline:  # a third time at each loop, ~4 ms of 256)
        time.sleep(0.01)
        bound = _bound(index)
    after = status_of(index) if bound else None
    if after is None:
        return Result("detach", loop, Outcome.OK, f"{loop}: detached")
    return Result("detach", loop, Outcome.PENDING,
                  f"{loop}: detach pending (still open; the kernel detaches at last close)",
                  details={"backing_file": after.backing_file, "autoclear": after.autoclear})
