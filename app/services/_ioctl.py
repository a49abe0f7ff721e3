"""Kernel numbers and struct layouts for the loop service, written once (include/uapi/linux/loop.h).

Kept apart from loop.py so the numbers can be read (and checked against the header) in one
place; nothing here opens a device.
"""

from __future__ import annotations

import fcntl
import os
import struct

# ioctls on a loop device
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LOOP_SET_DIRECT_IO = 0x4C08
LOOP_SET_BLOCK_SIZE = 0x4C09
LOOP_CONFIGURE = 0x4C0A          # Linux >= 5.8: SET_FD + SET_STATUS64 + block size in one step
# ioctls on /dev/loop-control
LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81
LOOP_CTL_GET_FREE = 0x4C82       # returns the index of an unbound loop (adding one if needed)
# ioctls on any block device: its size in bytes, _IOR(0x12, 114, size_t); its read-only flag
# (set as `blockdev --setro` does; it outlives a loop's binding), get and set, an int
BLKGETSIZE64 = 0x80081272
BLKROSET, BLKROGET = 0x125D, 0x125E

# lo_flags
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16

LO_NAME_SIZE = 64                # lo_file_name is cut here: read sysfs backing_file instead
SECTOR_SIZE = 512                # unit of sysfs `size`; the alignment we demand of offsets

# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64),
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32),
# lo_file_name[64], lo_crypt_name[64], lo_encrypt_key[32], lo_init[2] (u64)
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")
_LO_FLAGS_FIELD = 8
# struct loop_config: u32 fd, u32 block_size, struct loop_info64 info, u64 __reserved[8]
LOOP_CONFIG = struct.Struct("=II" + LOOP_INFO64.format.lstrip("=") + "8Q")
assert LOOP_INFO64.size == 232, LOOP_INFO64.size
assert LOOP_CONFIG.size == 304, LOOP_CONFIG.size


def pack_info64(offset: int, sizelimit: int, flags: int, backing: str) -> bytes:
    """The name is informative only (the kernel keeps 63 bytes + NUL); sysfs has the truth."""
    name = os.fsencode(backing)[:LO_NAME_SIZE - 1]
    return LOOP_INFO64.pack(0, 0, 0, offset, sizelimit, 0, 0, 0, flags, name, b"", b"", 0, 0)


def info64_without(info: bytes, mask: int) -> bytes:
    """The same loop_info64 with some lo_flags cleared."""
    fields = list(LOOP_INFO64.unpack(info))
    fields[_LO_FLAGS_FIELD] &= ~mask
    return LOOP_INFO64.pack(*fields)


def pack_config(file_fd: int, block_size: int, info: bytes) -> bytes:
    return LOOP_CONFIG.pack(file_fd, block_size, *LOOP_INFO64.unpack(info), *[0] * 8)


def block_device_size(fd: int) -> int:
    """Bytes, from BLKGETSIZE64 on an open block device (raises OSError)."""
    return struct.unpack("=Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
