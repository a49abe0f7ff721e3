"""Block devices an administrator may replicate, and why some of them may not be.

The picker lists disks, partitions and attached loops from sysfs (via pyudev). Swap and LVM
physical volumes are left out, as the old DTSetup did. Without udevd there is no udev database
and so no ID_FS_TYPE: we then read the on-disk signatures ourselves, the way blkid does, with
small read-only reads. /proc/swaps names the swap that is active; /proc/self/mountinfo (and
every other mount namespace's), the holders directories and the loops' backing files say what
is in use.
"""

from __future__ import annotations

import errno
import fcntl
import os
import functools
import mmap
import re
import stat
import struct
import threading
import zlib
from dataclasses import dataclass, field

TYPE_CHECKING = False  # typing is not imported at run time: ~5 ms of every command's start
if TYPE_CHECKING:  # pyudev is imported where used: a command that only attaches loops skips it
    import pyudev

from app.services import mounts
from app.services.layout import is_door
from app.services.results import MirrorError

SYS_BLOCK = "/sys/class/block"
PROC_SWAPS = "/proc/swaps"
UDEV_DATA = "/run/udev/data"  # udev's database: one file per device, b<major>:<minor> for blocks
SECTOR_SIZE = 512  # sysfs "size" counts 512-byte sectors whatever the logical block size is
SYS_CLASS_BLOCK = "/sys/class/block"  # every block device and partition, by kernel name
BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t): device size in bytes
SCSI_CDROM_MAJOR = 11  # sr0, sr1, ...

# Swap: the magic sits in the last 10 bytes of the first page, and the page size is that of
# the machine that ran mkswap, so try every size blkid tries.
SWAP_PAGE_SIZES = (4096, 8192, 16384, 65536)
SWAP_MAGICS = (b"SWAPSPACE2", b"SWAP-SPACE")
SWAP_MAGIC_LEN = 10

# LVM2: a label_header in one of the first four sectors; CRC over the rest of that sector.
LVM2_SCAN_SECTORS = 4
LVM2_LABEL_ID = b"LABELONE"
LVM2_LABEL_TYPE = b"LVM2 001"
LVM2_HEADER = struct.Struct("<8sQII8s")  # id, sector_xl, crc_xl, offset_xl, type
LVM2_CRC_FROM = 20  # the CRC covers offset_xl up to the end of the sector
LVM2_INITIAL_CRC = 0xF597A6CF
CRC32_MASK = 0xFFFFFFFF

# ext2/3/4: superblock at 1024; features decide the name as in libblkid's ext.c.
EXT_SB_OFFSET = 1024
EXT_SB = struct.Struct("<56xH34xIII")  # s_magic @56, feature_compat/incompat/ro_compat @92
EXT_MAGIC = 0xEF53
EXT3_COMPAT_HAS_JOURNAL = 0x0004
EXT_INCOMPAT_FILETYPE = 0x0002
EXT3_INCOMPAT_RECOVER = 0x0004
EXT3_INCOMPAT_JOURNAL_DEV = 0x0008
EXT_INCOMPAT_META_BG = 0x0010
EXT3_INCOMPAT_SUPP = EXT_INCOMPAT_FILETYPE | EXT3_INCOMPAT_RECOVER | EXT_INCOMPAT_META_BG
EXT3_RO_COMPAT_SUPP = 0x0001 | 0x0002 | 0x0004  # sparse_super, large_file, btree_dir

XFS_MAGIC = b"XFSB"  # at offset 0
BTRFS_MAGIC = b"_BHRfS_M"
BTRFS_MAGIC_OFFSET = 65536 + 64
# One read covers every signature we look for: LVM sectors 0-3, the ext superblock, XFS, the
# swap magic for every page size and btrfs's superblock (five reads cost more than one of 68 KiB)
PROBE_HEAD = BTRFS_MAGIC_OFFSET + len(BTRFS_MAGIC)
PROBE_DIRECT = -(-PROBE_HEAD // 4096) * 4096  # the same in whole 4 KiB blocks, for O_DIRECT

SWAP = "swap"
LVM2_MEMBER = "LVM2_member"
REASON_SWAP_ACTIVE = "swap (active)"
REASON_SWAP_SIGNATURE = "swap (signature)"
REASON_LVM_PV = "LVM2 physical volume"


@dataclass(frozen=True)
class BlockDevice:
    """One row of the picker: what the device is, and why it may not or should not be chosen."""

    path: str
    name: str
    size: int
    type: str
    major: int
    minor: int
    read_only: bool
    fstype: str | None
    model: str | None
    mountpoints: tuple[str, ...] = ()
    holders: tuple[str, ...] = ()
    backing_file: str | None = None
    excluded: str | None = None
    in_use: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        return {"path": self.path, "name": self.name, "size": self.size, "type": self.type,
                "fstype": self.fstype, "model": self.model, "mountpoints": list(self.mountpoints),
                "holders": list(self.holders), "backing_file": self.backing_file,
                "excluded": self.excluded, "in_use": list(self.in_use),
                "read_only": self.read_only, "major": self.major, "minor": self.minor}


# ---------------------------------------------------------------- signatures


@functools.cache
def _udev_context() -> pyudev.Context:
    """One Context per process: creating one loads libudev, and ctypes' library lookup forks
    a helper process each time (measured: 4 ms per device in attach-all)."""
    import pyudev
    return pyudev.Context()

def _lvm_crc(data: bytes) -> int:
    """LVM's calc_crc: reflected CRC-32 without the pre/post inversion zlib applies."""
    return zlib.crc32(data, LVM2_INITIAL_CRC ^ CRC32_MASK) ^ CRC32_MASK


def _is_lvm2_label(sector: bytes, index: int) -> bool:
    if len(sector) < SECTOR_SIZE:
        return False
    ident, sector_xl, crc, _offset, kind = LVM2_HEADER.unpack_from(sector)
    return (ident == LVM2_LABEL_ID and kind == LVM2_LABEL_TYPE and sector_xl == index
            and crc == _lvm_crc(sector[LVM2_CRC_FROM:SECTOR_SIZE]))


def _ext_name(head: bytes) -> str | None:
    if len(head) < EXT_SB_OFFSET + EXT_SB.size:
        return None
    magic, compat, incompat, ro_compat = EXT_SB.unpack_from(head, EXT_SB_OFFSET)
    if magic != EXT_MAGIC:
        return None
    if incompat & EXT3_INCOMPAT_JOURNAL_DEV:
        return "jbd"  # an external ext3/4 journal, not a file system
    if incompat & ~EXT3_INCOMPAT_SUPP or ro_compat & ~EXT3_RO_COMPAT_SUPP:
        return "ext4"  # a feature ext3 does not understand (extents, 64bit, metadata_csum...)
    return "ext3" if compat & EXT3_COMPAT_HAS_JOURNAL else "ext2"


_direct = threading.local()  # each probing thread's O_DIRECT buffer, kept for its next device


def _direct_buffer() -> mmap.mmap:
    """A page-aligned buffer (as O_DIRECT wants) of PROBE_DIRECT bytes, one per thread and
    reused: a new mapping per device cost more than the read itself (its pages faulted in and
    zeroed, then unmapped: 33 ms of 256 probes here, against 14 ms with one buffer)."""
    buf = getattr(_direct, "buf", None)
    if buf is None:
        buf = _direct.buf = mmap.mmap(-1, PROBE_DIRECT)
    return buf


def _read_head(fd: int) -> bytes:
    """The first PROBE_HEAD bytes. `fd` was opened with O_DIRECT when the device allowed it:
    a buffered read also read ahead into the device's page cache, which the last close threw
    away again, twice the time of the probe per device (an attach-all probes every one)."""
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
        buf = _direct_buffer()
        try:
            got = os.preadv(fd, [buf], 0)
            return buf[:min(got, PROBE_HEAD)]  # only what this read filled
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this device does not do it after all
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
    return os.pread(fd, PROBE_HEAD, 0)


def _probe_fd(fd: int) -> str | None:
    head = _read_head(fd)
    for index in range(LVM2_SCAN_SECTORS):
        if _is_lvm2_label(head[index * SECTOR_SIZE:(index + 1) * SECTOR_SIZE], index):
            return LVM2_MEMBER
    for page in SWAP_PAGE_SIZES:  # (a device shorter than the head has none past its end)
        where = page - SWAP_MAGIC_LEN
        if head[where:where + SWAP_MAGIC_LEN] in SWAP_MAGICS:
            return SWAP
    if head[:len(XFS_MAGIC)] == XFS_MAGIC:
        return "xfs"
    name = _ext_name(head)
    if name:
        return name
    if head[BTRFS_MAGIC_OFFSET:BTRFS_MAGIC_OFFSET + len(BTRFS_MAGIC)] == BTRFS_MAGIC:
        return "btrfs"
    return None


def probe_signature(path: str) -> str | None:
    """The content type blkid would name, or None when unknown, blank or unreadable.

    Read-only and non-blocking (a CD drive without a disc must not hang the picker).
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        try:
            fd = os.open(path, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # a device (or file system) without O_DIRECT
                raise
            fd = os.open(path, flags)
    except OSError:
        return None
    try:
        if _file_may_not_answer(os.fstat(fd).st_rdev):
            return None  # unknown: not read
        return _probe_fd(fd)
    except OSError:
        return None  # e.g. EIO from a failing disk: unknown, not a reason to crash the list
    finally:
        os.close(fd)


def _file_may_not_answer(rdev: int) -> bool:
    """Is this a loop (or a partition of one) whose file is not on a local file system: a
    block capture's FUSE file, a file on NFS or sshfs? Reading it waits for that server, in
    the kernel and unkillable (state D): with a block capture stopped or hung, `block
    devices`, the picker and `block add` never returned."""
    base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    backing = _read_sys(f"{base}/loop/backing_file")
    if backing is None and os.path.exists(f"{base}/partition"):
        backing = _read_sys(f"{base}/../loop/backing_file")
    return bool(backing) and not _recent_mount_names().on_local_fs(backing)


_table_lock = threading.Lock()
_table: tuple[float, mounts.MountNames | None] = (0.0, None)


def _recent_mount_names() -> mounts.MountNames:
    """The mount table, read again when a second old: an attach-all of hundreds of loops
    probes each one (a parse of the whole table per probe would be most of its time)."""
    global _table
    import time
    with _table_lock:
        if _table[1] is None or time.monotonic() - _table[0] > 1.0:
            _table = (time.monotonic(), mounts.MountNames(mounts.read_mountinfo()))
        return _table[1]


def device_size(path: str) -> int:
    """Size in bytes as the block layer reports it (BLKGETSIZE64)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise MirrorError.from_oserror("open", path, exc) from None
    try:
        buf = fcntl.ioctl(fd, BLKGETSIZE64, bytes(8))
    except OSError as exc:
        raise MirrorError.from_oserror("read the size of", path, exc) from None
    finally:
        os.close(fd)
    return struct.unpack("=Q", buf)[0]


# ---------------------------------------------------------------- the system's view

def _read_sys(path: str) -> str | None:
    """A sysfs attribute (the kernel hands it whole to one read of a page or more), None when
    it cannot be read. open/read/close only: a buffered open() adds an fstat, an ioctl, a seek
    and a second read, and an attach-all probes this for every device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.fsdecode(os.read(fd, 8192)).rstrip("\n")
    except OSError:
        return None
    finally:
        os.close(fd)


def device_identity(fd: int) -> dict[str, str]:
    """What tells the block device open at `fd` from another that later takes its name: a loop
    device's file (its path and inode) and offset, a partition's number and first sector, the
    disk's WWID or serial number as the kernel shows them. Read from the kernel, not udev (at
    boot the daemon may start before udev has said its piece). {} when nothing tells it."""
    from app.services import _ioctl
    rdev = os.fstat(fd).st_rdev
    sys_dir = os.path.realpath(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    ident: dict[str, str] = {}
    part = _read_sys(os.path.join(sys_dir, "partition"))
    disk = os.path.dirname(sys_dir) if part else sys_dir
    if part:
        start = _read_sys(os.path.join(sys_dir, "start"))
        ident["partition"] = f"number {part.strip()}, from sector {(start or '?').strip()}"
    if os.path.isdir(os.path.join(disk, "loop")):
        try:
            info = _ioctl.LOOP_INFO64.unpack(fcntl.ioctl(fd, _ioctl.LOOP_GET_STATUS64,
                                                         bytes(_ioctl.LOOP_INFO64.size)))
        except OSError:
            info = None
        if info is not None:
            ident["loop file"] = (f"{_read_sys(os.path.join(disk, 'loop', 'backing_file'))} "
                                  f"(inode {info[1]})")
            ident["loop offset"] = str(info[3])
    for key, rel in (("WWID", "wwid"), ("WWID", "device/wwid"), ("serial number", "serial"),
                     ("serial number", "device/serial")):
        value = None if key in ident else (_read_sys(os.path.join(disk, rel)) or "").strip()
        if value:
            ident[key] = value
    return ident


def _active_swaps() -> set[int]:
    """Device numbers of the block devices in use as swap now (swap files are not devices)."""
    devices: set[int] = set()
    try:
        with open(PROC_SWAPS) as f:
            lines = f.read().split("\n")[1:]  # first line is the column header
    except OSError:
        return devices
    for line in lines:
        if not line.strip():
            continue
        # The kernel escapes space, tab, newline and backslash in the name as \ooo.
        name = mounts.decode_field(line.split()[0])
        try:
            st = os.stat(name)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode):
            devices.add(st.st_rdev)
    return devices


def _backing_rdev(backing_file: str, table: list[mounts.MountEntry]) -> int | None:
    """Device number of a loop's backing file when that file is itself a block device.
    Stat'ed only on a local file system (by `table`): device nodes live there, and a stat of
    a capture file (a block capture's FUSE mount) or of a file on NFS waited for its server;
    one stopped or gone hung the picker and `block devices`."""
    if not mounts.on_local_fs(backing_file, table):
        return None
    try:
        st = os.stat(backing_file)
    except OSError:
        return None  # e.g. "/img (deleted)": a file that no longer has this name
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


class _SystemView:
    """One consistent read of mounts, active swap and loop backings for a whole listing."""

    def __init__(self) -> None:
        self.mounts: dict[int, list[str]] = {}  # where each file system is mounted (its root)
        self.binds: dict[int, list[str]] = {}  # "X (its /sub)": binds of a directory in it
        self.root: int | None = None
        every: dict[int, set[str]] = {}
        self.table = mounts.read_mountinfo()
        for entry in self.table:
            rdev = os.makedev(entry.major, entry.minor)
            every.setdefault(rdev, set()).add(entry.mount_point)
            if _real_mount(entry):
                self.mounts.setdefault(rdev, []).append(entry.mount_point)
            elif not is_door(entry.mount_point):
                self.binds.setdefault(rdev, []).append(f"{entry.mount_point} (its {entry.root})")
            if entry.mount_point == "/":
                self.root = rdev  # the last "/" is the one this process sees
        # Mounted only in another mount namespace (`unshare -m`, a container, `ip netns exec`):
        # not in our table, yet the device is as busy (attach refused it, the picker said free).
        # A copy of one of our own mounts, made when that namespace was, is said once, above.
        self.elsewhere: dict[int, list[str]] = {}
        for pid, comm, table in mounts.other_mount_tables():
            for entry in table:
                rdev = os.makedev(entry.major, entry.minor)
                if entry.major == 0 or entry.mount_point in every.get(rdev, ()) \
                        or not _real_mount(entry):
                    continue
                said = self.elsewhere.setdefault(rdev, [])
                if not any(f"of pid {pid} " in x for x in said):
                    said.append(f"mounted on {entry.mount_point} in the mount namespace of "
                                f"pid {pid} ({comm})")
        self.swap_devices = _active_swaps()
        self.loops_on: dict[int, list[str]] = {}  # lower device number -> ["/dev/loopN"]
        try:
            names = os.listdir(SYS_BLOCK)
        except OSError:
            names = []
        for name in names:
            backing = _read_sys(f"{SYS_BLOCK}/{name}/loop/backing_file")
            rdev = _backing_rdev(backing, self.table) if backing else None
            if rdev is not None:
                self.loops_on.setdefault(rdev, []).append(f"/dev/{name}")


def _real_mount(entry: mounts.MountEntry) -> bool:
    """A mount of the file system itself, not a bind of a directory inside it (`ip netns`'s
    /run/netns) nor a capture's door (layout.is_door, its root may be the file system's): a
    btrfs subvolume mounted by name counts (mountinfo's root is then the subvolume)."""
    if is_door(entry.mount_point):
        return False
    return entry.root == "/" or f"subvol={entry.root}" in entry.super_options.split(",")


def _exclusion(rdev: int, fstype: str | None, view_swaps: set[int]) -> str | None:
    if rdev in view_swaps:
        return REASON_SWAP_ACTIVE
    if fstype == SWAP:
        return REASON_SWAP_SIGNATURE
    if fstype == LVM2_MEMBER:
        return REASON_LVM_PV
    return None


def _device_type(name: str, devtype: str | None, major: int) -> str:
    if devtype == "partition":
        return "part"
    if name.startswith("loop"):
        return "loop"
    if major == SCSI_CDROM_MAJOR or name.startswith("sr"):
        return "rom"
    if name.startswith("dm-"):
        return "dm"
    if name.startswith("md"):
        return "md"
    return "disk"


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _partitions_of(sys_path: str) -> list[str]:
    """A disk's partitions: the kernel names each after its disk (sda1, loop0p1, nvme0n1p2),
    so only those of its sysfs directory's entries are looked at (a stat of every entry's
    `partition` was a fifth of a picker's read on a host with hundreds of loops)."""
    try:
        entries = os.listdir(sys_path)
    except OSError:
        return []
    disk = os.path.basename(sys_path)
    return sorted((e for e in entries if e.startswith(disk) and e != disk
                   and os.path.exists(f"{sys_path}/{e}/partition")), key=_natural_key)


def _build(device: pyudev.Device, view: _SystemView, *, with_partitions: bool = True
           ) -> BlockDevice:
    import pyudev
    name = device.sys_name
    sys_path = device.sys_path
    rdev = device.device_number
    path = device.device_node or f"/dev/{name}"
    kind = _device_type(name, device.device_type, os.major(rdev))
    size = int(_read_sys(f"{sys_path}/size") or 0) * SECTOR_SIZE
    backing = _read_sys(f"{sys_path}/loop/backing_file") if kind == "loop" else None
    try:
        holders = tuple(sorted(os.listdir(f"{sys_path}/holders"), key=_natural_key))
    except OSError:
        holders = ()
    # udev's answer when it has one; otherwise the signature on the device itself.
    fstype = device.properties.get("ID_FS_TYPE") or (probe_signature(path) if size else None)
    mountpoints = tuple(view.mounts.get(rdev, ()))

    in_use: list[str] = []
    for mp in mountpoints:
        in_use.append("root file system" if rdev == view.root and mp == "/" else f"mounted on {mp}")
    if not mountpoints:  # only a directory of it is bound somewhere: in use all the same
        in_use += [f"mounted on {bind}" for bind in view.binds.get(rdev, ())]
    in_use += view.elsewhere.get(rdev, [])
    in_use += [f"held by {h}" for h in holders]
    lower = _backing_rdev(backing, view.table) if backing else None
    if lower is not None:
        in_use.append(f"loop access point for /dev/{_name_of(lower) or backing}")
    in_use += [f"backs {loop}" for loop in sorted(view.loops_on.get(rdev, ()), key=_natural_key)]
    if kind != "part" and with_partitions:
        for part in _partitions_of(sys_path):
            try:
                child = _build(pyudev.Devices.from_sys_path(device.context, f"{sys_path}/{part}"),
                               view, with_partitions=False)
            except (pyudev.DeviceNotFoundError, ValueError):
                continue  # the partition went away while we looked
            in_use += [f"partition {part} {why}" for why in child.in_use]
            if child.excluded:
                in_use.append(f"partition {part} is {child.excluded}")

    return BlockDevice(
        path=path, name=name, size=size, type=kind, major=os.major(rdev), minor=os.minor(rdev),
        read_only=_read_sys(f"{sys_path}/ro") == "1",
        fstype=fstype, model=(_read_sys(f"{sys_path}/device/model") or "").strip() or None,
        mountpoints=mountpoints, holders=holders, backing_file=backing,
        excluded=_exclusion(rdev, fstype, view.swap_devices), in_use=tuple(in_use))


def _name_of(rdev: int) -> str | None:
    """Kernel name of a block device number (e.g. "loop3"), from /sys/dev/block."""
    target = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    try:
        return os.path.basename(os.readlink(target))
    except OSError:
        return None


# ---------------------------------------------------------------- public API

def disk_name(device: str) -> str:
    """The kernel name of the disk `device` is (or is a partition of): its partitions' names
    begin with it. "" when sysfs cannot say."""
    try:
        rdev = os.stat(device).st_rdev
        here = os.path.realpath(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    except OSError:
        return ""
    return os.path.basename(os.path.dirname(here) if os.path.exists(f"{here}/partition")
                            else here)


def sharing_nodes(device: str, offset: int = 0, size: int = 0) -> dict[int, str]:
    """The other block devices that hold bytes of `device`'s window (from `offset`, `size`
    bytes; 0: to its end), as {device number: its /dev node}: its disk when it is a
    partition, the partitions of its disk that overlap the window. A write through one of
    those reaches the entry's bytes without going through its loop. Nodes named after the
    kernel's device name (devtmpfs makes them); one that is not there, or is another device
    now, is left out. {} when sysfs cannot say (not a block device)."""
    try:
        rdev = os.stat(device).st_rdev
        here = os.path.realpath(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
        own = int(_read_sys(f"{here}/size") or "") * 512
    except (OSError, ValueError):
        return {}
    start = 0
    disk = here
    if os.path.exists(f"{here}/partition"):
        disk = os.path.dirname(here)
        try:
            start = int(_read_sys(f"{here}/start") or "") * 512
        except ValueError:
            return {}
    first = start + offset
    last = start + (offset + size if size else own)
    found: dict[int, str] = {}
    for sys_dir in [disk] * (disk != here) + [f"{disk}/{p}" for p in _partitions_of(disk)]:
        if sys_dir == here:
            continue
        try:
            begin = 0 if sys_dir == disk else int(_read_sys(f"{sys_dir}/start") or "") * 512
            length = int(_read_sys(f"{sys_dir}/size") or "") * 512
            major, minor = (_read_sys(f"{sys_dir}/dev") or "").split(":")
            theirs = os.makedev(int(major), int(minor))
        except ValueError:
            continue
        if not (begin < last and first < begin + length):
            continue
        node = f"/dev/{os.path.basename(sys_dir)}"
        try:
            st = os.stat(node)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == theirs:
            found[theirs] = node
    return found


def list_block_devices(*, include_excluded: bool = True) -> list[BlockDevice]:
    """Every block device with a size, in name order; excluded ones only when asked."""
    import pyudev
    context = _udev_context()
    view = _SystemView()
    found: list[BlockDevice] = []
    try:
        names = os.listdir(SYS_CLASS_BLOCK)
    except OSError:
        names = []
    for name in names:
        # Size 0: a loop with nothing attached, an unconfigured zram, an empty drive. Read
        # before udev is asked about it: udev's enumeration of every block device (a host
        # with hundreds of unattached loop nodes) was a quarter of a picker's read.
        if not int(_read_sys(f"{SYS_CLASS_BLOCK}/{name}/size") or 0):
            continue
        try:
            device = pyudev.Devices.from_sys_path(
                context, os.path.realpath(f"{SYS_CLASS_BLOCK}/{name}"))
            dev = _build(device, view)
        except (pyudev.DeviceNotFoundError, ValueError):
            continue  # removed while we looked (another process detached a loop)
        if include_excluded or dev.excluded is None:
            found.append(dev)
    return sorted(found, key=lambda d: _natural_key(d.name))


def _block_rdev(path: str) -> int:
    return _resolve_block(path)[1]


def _resolve_block(path: str) -> tuple[str, int]:
    """(the path with symlinks resolved, the device number) of a block device."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:  # the words the configuration's checks use
        raise MirrorError(f"block device {path} does not exist", errno=errno.ENOENT, obj=path) from None
    except OSError as exc:
        raise MirrorError.from_oserror("describe", path, exc) from None
    if not stat.S_ISBLK(st.st_mode):
        raise MirrorError(f"{path} is not a block device", errno=errno.ENOTBLK, obj=path)
    return real, st.st_rdev


def describe(path: str) -> BlockDevice:
    """One device, symlinks (/dev/disk/by-id/...) resolved; size-0 devices are described too."""
    import pyudev
    rdev = _block_rdev(path)
    try:
        device = pyudev.Devices.from_device_number(_udev_context(), "block", rdev)
    except (pyudev.DeviceNotFoundError, ValueError):
        raise MirrorError(f"{path} is not known to the kernel's block layer",
                          errno=errno.ENODEV, obj=path) from None
    return _build(device, _SystemView())


def exclusion_reason(path: str, known: Exclusions | None = None) -> str | None:
    """Why `path` may never be replicated (swap, LVM PV), or None. MirrorError if no block device.

    Cheaper than describe(): no mount table, no loops, only /proc/swaps and the signature.
    `known`: what an action read once for all its devices (Exclusions). A path it read is
    resolved again only when it names another device now (one stat, not a realpath's walk).
    """
    rdev = known.rdevs.get(path) if known is not None else None
    if rdev is None or mounts.block_rdev(path) != rdev:
        rdev = _block_rdev(path)
    swaps = _active_swaps() if known is None else known.swaps
    if rdev in swaps:
        return REASON_SWAP_ACTIVE
    fstype = known.fstypes.get(rdev, False) if known is not None else False
    if fstype is False:  # not read ahead
        fstype = _fstype(rdev, path)
    return _exclusion(rdev, fstype, swaps)


def _fstype(rdev: int, path: str) -> str | None:
    return _fstype_resolved(rdev, os.path.realpath(path))


def _fstype_resolved(rdev: int, real: str, udev: bool = True) -> str | None:
    return (udev and _udev_property(rdev, "ID_FS_TYPE")) or probe_signature(real)


# devices probed at once: each read waits for its device (a disk's seek, a loop's worker). Here
# (2 CPUs, 256 loops on sparse files): 1 thread 54-60 ms, 2: 38-46, 4: 42-51, 8: 60-81; with one
# buffer per thread, each path resolved once and no udev database: 1: 19, 2: 13, 3: 11, 4: 13,
# 8: 18 (medians). What a thread does in Python holds the others up (the GIL): keep it short.
PROBE_THREADS = 4


class Exclusions:
    """What exclusion_reason() reads, read once for the devices of one action: the active
    swaps (an attach-all read /proc/swaps for each entry) and each device's content type,
    probed by PROBE_THREADS threads together (an attach-all waited for each device's read in
    turn: ~60 ms of its ~200 ms of work for 256 loops here). A device given here that is not a block device is left out; its
    exclusion_reason() then says why. Each path is resolved once, here (the threads probe the
    resolved one, and exclusion_reason() takes the device number found here while the path
    still names that device), and udev's database is looked in only where it exists."""

    def __init__(self, paths) -> None:
        self.swaps = _active_swaps()
        self.fstypes: dict[int, str | None] = {}
        self.rdevs: dict[str, int] = {}  # each path's device number, as it was probed
        todo = []
        for path in paths:
            try:
                real, rdev = _resolve_block(path)
            except MirrorError:
                continue
            self.rdevs[path] = rdev
            todo.append((rdev, real))
        work = iter(todo)
        lock = threading.Lock()
        udev = os.path.isdir(UDEV_DATA)  # without udevd no device has a record there

        def probe() -> None:
            while True:
                with lock:
                    item = next(work, None)
                if item is None:
                    return
                self.fstypes[item[0]] = _fstype_resolved(*item, udev)
        threads = [threading.Thread(target=probe, daemon=True)
                   for _ in range(min(PROBE_THREADS, len(todo)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _udev_property(rdev: int, key: str) -> str | None:
    """One property from udev's database of a block device (the `E:KEY=value` lines libudev
    reads for pyudev), None when udev has no record (no udevd, or not probed yet)."""
    path = f"{UDEV_DATA}/b{os.major(rdev)}:{os.minor(rdev)}"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    prefix = f"E:{key}=".encode()
    for line in data.splitlines():
        if line.startswith(prefix):
            return os.fsdecode(line[len(prefix):]) or None
    return None
