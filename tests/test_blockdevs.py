"""The block device picker: "Swap and LVM physical partitions will not be included in the list".

Loop devices made with util-linux stand in for disks. What we report is checked against tools
that did not use our code: blkid -p, lsblk, blockdev, losetup, /proc/swaps and mountinfo.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
from conftest import losetup_json, run

from app.services import blockdevs
from app.services.mounts import read_mountinfo
from app.services.results import MirrorError

LVM_ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
PART_START_SECTOR = 2048


def blkid_type(path) -> str | None:
    """blkid's low-level probe (no cache, no udev): the independent witness for fstype."""
    out = run("blkid", "-p", "-o", "value", "-s", "TYPE", str(path), check=False).stdout.strip()
    return out or None


def listed(include_excluded: bool = True) -> dict[str, blockdevs.BlockDevice]:
    return {d.path: d for d in blockdevs.list_block_devices(include_excluded=include_excluded)}


def lsblk_sizes() -> dict[str, int]:
    """Name -> size of every device lsblk shows, partitions (nested children) included."""
    tree = json.loads(run("lsblk", "-J", "-b", "-o", "NAME,SIZE,TYPE").stdout)["blockdevices"]
    found: dict[str, int] = {}
    while tree:
        node = tree.pop()
        found[node["name"]] = int(node["size"] or 0)
        tree += node.get("children", [])
    return found


@pytest.fixture
def pv(scratch_loop):
    """make() -> a loop carrying a real LVM2 PV label from pvcreate; pvremove'd at teardown.

    This machine has no udevd and no device-mapper driver; pvcreate still writes the label
    (it needs neither), so no hand-made label is needed.
    """
    made: list[str] = []

    def make() -> str:
        dev = scratch_loop(16 << 20)
        made.append(dev)
        run("pvcreate", "-ff", "-y", dev, env=LVM_ENV)
        return dev

    yield make
    for dev in made:  # before scratch_loop detaches it, so LVM forgets it too
        run("pvremove", "-ff", "-y", dev, env=LVM_ENV, check=False)


@pytest.fixture
def active_swap():
    """make(dev) -> swapon dev; swapoff at teardown (before the loop under it is detached)."""
    made: list[str] = []

    def make(dev: str) -> str:
        run("mkswap", "-q", dev)
        run("swapon", dev)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        run("swapoff", dev, check=False)


@pytest.fixture
def mounted(tmp_path):
    """make(dev) -> mount point under tmp_path; unmounted at teardown."""
    made: list[str] = []

    def make(dev: str) -> str:
        where = tmp_path / f"mnt{len(made)}"
        where.mkdir()
        run("mount", dev, str(where))
        made.append(str(where))
        return str(where)

    yield make
    for where in reversed(made):
        run("umount", where, check=False)


@pytest.fixture
def loop_over():
    """make(lower) -> '/dev/loopM' backed by the block device `lower`; detached at teardown."""
    made: list[str] = []

    def make(lower: str) -> str:
        dev = run("losetup", "--find", "--show", lower).stdout.strip()
        made.append(dev)
        return dev

    yield make
    for dev in reversed(made):
        run("losetup", "-d", dev, check=False)


# ---------------------------------------------------------------- signatures (no root needed)

@pytest.mark.parametrize("mkfs, expected", [("mkfs.ext2", "ext2"), ("mkfs.ext3", "ext3"),
                                            ("mkfs.ext4", "ext4")])
def test_ext_generations_are_named_as_blkid_names_them(sparse_file, mkfs, expected):
    img = sparse_file(16 << 20)
    run(mkfs, "-q", "-F", str(img))
    assert blkid_type(img) == expected
    assert blockdevs.probe_signature(str(img)) == expected


@pytest.mark.parametrize("page", [4096, 8192, 16384, 65536])  # libblkid swap.c's offsets
@pytest.mark.parametrize("magic", [b"SWAPSPACE2", b"SWAP-SPACE"])
def test_swap_magic_is_found_for_every_page_size(sparse_file, page, magic):
    """mkswap on a machine with larger pages puts the magic further in; blkid looks there too."""
    img = sparse_file(1 << 20)
    with open(img, "r+b") as f:
        f.seek(page - len(magic))
        f.write(magic)
    assert blockdevs.probe_signature(str(img)) == "swap"


@pytest.mark.parametrize("size", [65536 + 72, 1 << 20])
def test_btrfs_magic_is_found_in_the_one_read_of_the_head_and_a_short_device_is_nothing(sparse_file, size):
    """Every signature comes from one read of the device's first 68 KiB (it was five reads);
    btrfs's magic is the last thing in it. A device shorter than that is read short: no
    signature past its end, no error."""
    img = sparse_file(size)
    with open(img, "r+b") as f:
        f.seek(65536 + 64)
        f.write(b"_BHRfS_M")
    assert blockdevs.probe_signature(str(img)) == "btrfs"
    assert blockdevs.probe_signature(str(sparse_file(8192))) is None


def test_mkswap_with_64k_pages_is_swap(sparse_file):
    """The layout mkswap writes on a 64 KiB-page machine (arm64, ppc64), as blkid sees it."""
    img = sparse_file(4 << 20)
    run("mkswap", "-q", "--pagesize", "65536", str(img))
    assert blkid_type(img) == "swap"
    assert blockdevs.probe_signature(str(img)) == "swap"


def test_swap_magic_elsewhere_is_not_swap(sparse_file):
    img = sparse_file(1 << 20)
    with open(img, "r+b") as f:
        f.seek(4096)  # the start of the second page, not the end of the first
        f.write(b"SWAPSPACE2")
    assert blockdevs.probe_signature(str(img)) is None


def test_blank_unreadable_and_missing_have_no_signature(sparse_file, tmp_path):
    assert blockdevs.probe_signature(str(sparse_file(1 << 20))) is None
    assert blockdevs.probe_signature(str(tmp_path / "missing")) is None
    assert blockdevs.probe_signature(str(tmp_path)) is None  # a directory: EISDIR on read


# ---------------------------------------------------------------- LVM

@pytest.mark.root
def test_pvcreate_label_is_excluded_and_hidden_from_the_picker(pv):
    dev = pv()
    assert blkid_type(dev) == "LVM2_member"
    assert blockdevs.probe_signature(dev) == "LVM2_member"
    assert blockdevs.exclusion_reason(dev) == "LVM2 physical volume"
    assert blockdevs.describe(dev).excluded == "LVM2 physical volume"
    everything = listed()
    assert everything[dev].excluded == "LVM2 physical volume"
    assert dev not in listed(include_excluded=False)


@pytest.mark.root
def test_lvm_label_needs_its_crc_and_its_own_sector_number(pv, sparse_file):
    """A copy of pvcreate's label is found in any of sectors 0-3 only when it is intact."""
    with open(pv(), "rb") as f:
        head = f.read(4 * 512)
    index = next(i for i in range(4) if head[i * 512:i * 512 + 8] == b"LABELONE")
    label = bytearray(head[index * 512:(index + 1) * 512])

    def probe_with(sector: int, data: bytes) -> str | None:
        img = sparse_file(1 << 20)
        with open(img, "r+b") as f:
            f.seek(sector * 512)
            f.write(data)
        return blockdevs.probe_signature(str(img))

    assert probe_with(index, label) == "LVM2_member"
    assert probe_with((index + 1) % 4, label) is None  # sector_xl names another sector
    renumbered = bytearray(label)
    struct.pack_into("<Q", renumbered, 8, 3)  # sector_xl lies outside the CRC-covered part
    assert probe_with(3, renumbered) == "LVM2_member"
    broken = bytearray(label)
    broken[100] ^= 0xFF  # inside the CRC-covered part of the label sector
    assert probe_with(index, broken) is None


# ---------------------------------------------------------------- swap

@pytest.mark.root
def test_mkswap_device_is_excluded_by_its_signature(scratch_loop):
    dev = scratch_loop(16 << 20)
    run("mkswap", "-q", dev)
    assert blkid_type(dev) == "swap"
    assert blockdevs.describe(dev).fstype == "swap"
    assert blockdevs.exclusion_reason(dev) == "swap (signature)"
    assert listed()[dev].excluded == "swap (signature)"
    assert dev not in listed(include_excluded=False)


@pytest.mark.root
def test_active_swap_is_named_from_proc_swaps(scratch_loop, active_swap):
    dev = active_swap(scratch_loop(16 << 20))
    with open("/proc/swaps") as f:
        assert dev in {line.split()[0] for line in f.read().splitlines()[1:]}
    assert blockdevs.exclusion_reason(dev) == "swap (active)"
    assert blockdevs.describe(dev).excluded == "swap (active)"
    assert dev not in listed(include_excluded=False)


@pytest.mark.root
def test_udevs_record_of_a_device_is_believed_before_its_signature(scratch_loop, tmp_path,
                                                                    monkeypatch):
    """What udev probed (its database) excludes a device whose first bytes say nothing, as the
    picker's pyudev properties do. This machine runs no udevd: the database is a directory we
    write in udev's own format (`E:KEY=value` lines in b<major>:<minor>)."""
    dev = scratch_loop(16 << 20)
    rdev = os.stat(dev).st_rdev
    monkeypatch.setattr(blockdevs, "UDEV_DATA", str(tmp_path))
    assert blockdevs.exclusion_reason(dev) is None  # no record, a blank device
    (tmp_path / f"b{os.major(rdev)}:{os.minor(rdev)}").write_text(
        "S:disk/by-id/x\nE:ID_FS_USAGE=other\nE:ID_FS_TYPE=LVM2_member\nG:systemd\n")
    assert blockdevs.exclusion_reason(dev) == "LVM2 physical volume"
    (tmp_path / f"b{os.major(rdev)}:{os.minor(rdev)}").write_text("E:ID_FS_TYPE=\n")
    assert blockdevs.exclusion_reason(dev) is None  # probed, nothing found: the signature says


# ---------------------------------------------------------------- usable devices

@pytest.mark.root
@pytest.mark.parametrize("argv, size, expected", [
    (("mkfs.ext4", "-q"), 32 << 20, "ext4"),
    (("mkfs.xfs", "-q"), 320 << 20, "xfs"),  # xfsprogs refuses file systems under 300 MiB
])
def test_formatted_device_is_listed_with_its_fstype(scratch_loop, argv, size, expected):
    dev = scratch_loop(size)
    run(*argv, dev)
    assert blkid_type(dev) == expected
    row = listed(include_excluded=False)[dev]
    assert (row.fstype, row.excluded, row.in_use, row.type) == (expected, None, (), "loop")


@pytest.mark.root
def test_blank_device_is_listed_without_fstype(scratch_loop):
    dev = scratch_loop(8 << 20)
    assert blkid_type(dev) is None
    row = listed(include_excluded=False)[dev]
    assert row.fstype is None and row.excluded is None and row.in_use == ()
    data = row.to_json()
    assert data["path"] == dev and data["size"] == 8 << 20 and data["mountpoints"] == []
    assert {"name", "type", "fstype", "model", "holders", "backing_file", "excluded", "in_use",
            "read_only", "major", "minor"} <= set(data)


@pytest.mark.root
def test_size_type_numbers_and_read_only_match_the_kernel(scratch_loop):
    dev = scratch_loop((48 << 20) + 3 * 512, read_only=True)
    row = blockdevs.describe(dev)
    assert row.size == blockdevs.device_size(dev) == int(run("blockdev", "--getsize64", dev).stdout)
    st = os.stat(dev)
    assert (row.major, row.minor) == (os.major(st.st_rdev), os.minor(st.st_rdev))
    assert row.read_only is True
    assert {d["name"]: d["ro"] for d in losetup_json()}[dev] is True
    backing = {d["name"]: d["back-file"] for d in losetup_json()}[dev]
    assert row.backing_file == backing


# ---------------------------------------------------------------- in use

@pytest.mark.root
def test_mounted_device_says_where(scratch_loop, mounted):
    dev = scratch_loop(32 << 20)
    run("mkfs.ext4", "-q", dev)
    where = mounted(dev)
    st = os.stat(dev)
    with open("/proc/self/mountinfo") as f:
        fields = [line.split() for line in f]
    assert [fl[4] for fl in fields if fl[2] == f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"] \
        == [where]  # tmp_path has no spaces, so no octal escapes to undo here
    row = listed()[dev]
    assert row.mountpoints == (where,)
    assert f"mounted on {where}" in row.in_use
    assert row.excluded is None  # in use is shown, not hidden: the administrator decides


@pytest.mark.root
def test_a_device_lists_where_it_is_mounted_not_where_a_directory_of_it_is_bound(scratch_loop,
                                                                                  tmp_path):
    """The picker's MOUNTPOINTS are where the file system is mounted: not a bind of a directory
    in it (the root disk's line listed `ip netns`'s /run/netns) nor a capture's lower directory
    below a run directory. A device with only a bound directory left is still in use, said so."""
    dev = scratch_loop(32 << 20)
    run("mkfs.ext4", "-q", dev)
    where, bound, door = tmp_path / "mnt", tmp_path / "bound", tmp_path / "run/fs/data-0123456789ab/lower"
    for d in (where, bound, door):
        d.mkdir(parents=True)
    made: list[Path] = []
    try:
        run("mount", dev, str(where))
        made.append(where)
        (where / "sub").mkdir()
        for source, point in ((where / "sub", bound), (where, door)):
            run("mount", "--bind", str(source), str(point))
            made.append(point)
        row = listed()[dev]
        assert row.mountpoints == (str(where),)
        assert row.in_use == (f"mounted on {where}",)
        run("umount", str(where))
        made.remove(where)
        row = listed()[dev]
        assert row.mountpoints == ()
        assert row.in_use == (f"mounted on {bound} (its /sub)",)  # the door is ours: not said
    finally:
        for point in reversed(made):
            run("umount", str(point), check=False)


@pytest.mark.root
def test_a_device_mounted_only_in_another_mount_namespace_is_in_use_and_named(scratch_loop, tmp_path):
    """Found by a walk: the picker listed a loop mounted in another mount namespace (a
    container's, `unshare -m`) as free, and attach refused it as "held open exclusively by
    another program" without saying by whom. A real namespace and a real mount, both ended here."""
    import subprocess
    import sys
    import time

    from app.services import blockplan
    dev = scratch_loop(32 << 20)
    run("mkfs.ext4", "-q", dev)
    where = tmp_path / "container-mnt"
    where.mkdir()
    ready = tmp_path / "ready"
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               'mount "$0" "$1" && : > "$2" && exec sleep 300',
                               dev, str(where), str(ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the namespace's mount"
            time.sleep(0.05)
        said = f"mounted on {where} in the mount namespace of pid {holder.pid} (sleep)"
        row = listed()[dev]
        assert said in row.in_use, row.in_use
        assert row.mountpoints == ()  # not in our own table
        assert blockdevs.describe(dev).in_use == row.in_use
        assert blockplan.busy_reasons(dev, blockplan.View()) == [said]
    finally:
        holder.kill()
        holder.wait()
    # the namespace ended with its last process: the device is free again, and said so
    assert listed()[dev].in_use == ()


@pytest.mark.root
def test_an_exclusive_holder_is_named_by_the_attach_refusal(scratch_loop, sparse_file, tmp_path):
    """Found by helper-27's walk: attach-all of a device a process held open with O_EXCL, or of
    a disk whose partition is mounted, was refused 'held open exclusively by another program',
    naming nobody. The kernel does not say which opener is exclusive: its openers are named;
    a mounted partition (it claims its disk) is named as such."""
    import subprocess
    import sys

    from app.services import blockplan
    dev = scratch_loop(8 << 20)
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time\n"
                               f"os.open({dev!r}, os.O_RDONLY | os.O_EXCL)\n"
                               "print('held', flush=True)\ntime.sleep(300)\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        # (on a busy host another program may have it open too for a moment: a losetup of
        # someone else's scanning every loop was named beside the holder in a CI run)
        [reason] = blockplan.busy_reasons(dev, blockplan.View())
        assert reason.startswith("held open exclusively by another program (open by pid "), reason
        assert f"pid {holder.pid} ({Path(sys.executable).name[:15]})" in reason, reason
    finally:
        holder.kill()
        holder.wait()
    disk = run("losetup", "--find", "--show", "--partscan", str(sparse_file(32 << 20))).stdout.strip()
    where = tmp_path / "partmnt"
    where.mkdir()
    try:
        run("addpart", disk, "1", str(PART_START_SECTOR), str((16 << 20) // 512))
        run("mkfs.ext4", "-q", f"{disk}p1")
        run("mount", f"{disk}p1", str(where))
        assert blockplan.busy_reasons(disk, blockplan.View()) == [
            f"partition {os.path.basename(disk)}p1 mounted on {where}"]
    finally:
        run("umount", str(where), check=False)
        run("delpart", disk, "1", check=False)
        run("losetup", "-d", disk, check=False)


@pytest.mark.root
def test_loop_over_loop_marks_both_ends(scratch_loop, loop_over):
    lower = scratch_loop(8 << 20)
    upper = loop_over(lower)
    assert {d["name"]: d["back-file"] for d in losetup_json()}[upper] == lower
    rows = listed()
    assert f"backs {upper}" in rows[lower].in_use
    assert rows[upper].backing_file == lower
    assert f"loop access point for {lower}" in rows[upper].in_use
    assert blockdevs.describe(lower).in_use == rows[lower].in_use


@pytest.mark.root
def test_root_file_system_device_is_marked():
    """Reads the listing only: whatever backs "/" here (vda on the VM) is never offered as free."""
    majmin = run("findmnt", "-n", "-o", "MAJ:MIN", "/").stdout.strip()
    rows = [d for d in blockdevs.list_block_devices() if f"{d.major}:{d.minor}" == majmin]
    if not rows:
        pytest.skip(f"/ is on {majmin}, not a block device (overlay, btrfs subvolume)")
    assert "root file system" in rows[0].in_use
    # where its file system itself is mounted only (binds of its directories, e.g. /run/netns
    # here, and our captures' lower directories are not mount points of the disk)
    whole = {m.mount_point for m in read_mountinfo()
             if f"{m.major}:{m.minor}" == majmin and m.root == "/"}
    assert "/" in rows[0].mountpoints and set(rows[0].mountpoints) <= whole


@pytest.mark.root
def test_partitions_are_listed_and_a_swap_partition_marks_its_disk(sparse_file):
    """This kernel parses no partition tables (CONFIG_MSDOS_PARTITION and EFI are off), so the
    partition is made with util-linux addpart (the BLKPG ioctl) on a --partscan loop."""
    img = sparse_file(32 << 20)
    disk = run("losetup", "--find", "--show", "--partscan", str(img)).stdout.strip()
    part = f"{disk}p1"
    try:
        run("addpart", disk, "1", str(PART_START_SECTOR), str((16 << 20) // 512))
        assert os.path.exists(f"/sys/class/block/{os.path.basename(part)}/partition")
        run("mkswap", "-q", part)
        rows = listed()
        assert rows[part].type == "part" and rows[part].size == 16 << 20
        assert rows[part].excluded == "swap (signature)"
        assert f"partition {os.path.basename(part)} is swap (signature)" in rows[disk].in_use
        assert rows[disk].excluded is None
        assert lsblk_sizes()[os.path.basename(part)] == 16 << 20
        assert part not in listed(include_excluded=False)
    finally:
        run("delpart", disk, "1", check=False)
        run("losetup", "-d", disk, check=False)


@pytest.mark.root
def test_names_match_lsblk(scratch_loop):
    """lsblk also lists size-0 devices (an unconfigured zram); we leave those out.

    Other tests may attach or detach loops meanwhile, so lsblk is asked before and after:
    what both saw must be ours, and ours must have been seen by one of them.
    """
    mine = scratch_loop(8 << 20)
    for _ in range(20):  # a loop detached and attached again between two looks: look again
        before = {n for n, size in lsblk_sizes().items() if size}
        ours = {d.name: d.size for d in blockdevs.list_block_devices()}
        after_sizes = lsblk_sizes()
        after = {n for n, size in after_sizes.items() if size}
        if before & after <= set(ours) <= before | after:
            break
    assert before & after <= set(ours) <= before | after
    assert os.path.basename(mine) in ours and all(ours.values())
    assert ours[os.path.basename(mine)] == after_sizes[os.path.basename(mine)] == 8 << 20


# ---------------------------------------------------------------- describe() refusals

def test_describe_a_regular_file_is_enotblk(sparse_file):
    img = sparse_file(1 << 20)
    with pytest.raises(MirrorError) as caught:
        blockdevs.describe(str(img))
    assert caught.value.errno == errno.ENOTBLK and f"{img} is not a block device" in str(caught.value)
    with pytest.raises(MirrorError):
        blockdevs.exclusion_reason(str(img))


def test_describe_a_missing_path_is_enoent(tmp_path):
    missing = tmp_path / "no-such-disk"
    with pytest.raises(MirrorError) as caught:
        blockdevs.describe(str(missing))
    assert caught.value.errno == errno.ENOENT
    assert str(caught.value) == f"block device {missing} does not exist"  # as the config says it


@pytest.mark.root
def test_describe_resolves_symlinks(scratch_loop, tmp_path):
    dev = scratch_loop(8 << 20)
    link = tmp_path / "by-id-like"
    link.symlink_to(dev)
    row = blockdevs.describe(str(link))
    assert row.path == dev and row.name == os.path.basename(dev)


# ---------------------------------------------------------------- read ahead for many devices

@pytest.mark.root
def test_exclusions_read_once_for_many_devices_say_what_each_device_alone_says(
        scratch_loop, pv, active_swap, tmp_path, monkeypatch):
    """An attach-all reads /proc/swaps and every device's signature once, up front and
    several devices at a time (Exclusions): each device's reason is the one it has alone,
    and nothing is probed again."""
    swap_sig, blank, ext4 = scratch_loop(16 << 20), scratch_loop(16 << 20), scratch_loop(16 << 20)
    run("mkswap", "-q", swap_sig)
    run("mkfs.ext4", "-q", "-F", ext4)
    swapping = active_swap(scratch_loop(16 << 20))
    lvm = pv()
    not_a_device, missing = tmp_path / "file", str(tmp_path / "missing")
    not_a_device.write_bytes(b"x")
    devices = [swap_sig, blank, ext4, swapping, lvm]
    alone = {dev: blockdevs.exclusion_reason(dev) for dev in devices}
    assert alone == {swap_sig: "swap (signature)", blank: None, ext4: None,
                     swapping: "swap (active)", lvm: "LVM2 physical volume"}
    known = blockdevs.Exclusions(devices + [str(not_a_device), missing])

    def probed_again(path):
        raise AssertionError(f"{path} probed again")
    monkeypatch.setattr(blockdevs, "probe_signature", probed_again)
    assert {dev: blockdevs.exclusion_reason(dev, known) for dev in devices} == alone
    for path in (str(not_a_device), missing):  # refused as before, by name
        with pytest.raises(MirrorError) as exc:
            blockdevs.exclusion_reason(path, known)
        assert path in exc.value.message


@pytest.mark.root
def test_a_path_read_ahead_is_not_resolved_again(scratch_loop, monkeypatch):
    """exclusion_reason() takes the device number Exclusions found for a path it was given (an
    attach-all resolved each entry's path twice: a realpath and a stat more per entry); a path
    it was not given is resolved as before, and each reason is the same."""
    blank, swap_sig, other = (scratch_loop(16 << 20) for _ in range(3))
    run("mkswap", "-q", swap_sig)
    known = blockdevs.Exclusions([blank, swap_sig])
    resolved = []
    real = blockdevs._resolve_block
    monkeypatch.setattr(blockdevs, "_resolve_block",
                        lambda path: resolved.append(path) or real(path))
    assert [blockdevs.exclusion_reason(d, known) for d in (blank, swap_sig)] == \
        [None, "swap (signature)"]
    assert resolved == []
    assert blockdevs.exclusion_reason(other, known) is None and resolved == [other]


@pytest.mark.root
def test_a_name_that_names_another_device_since_it_was_read_ahead_is_judged_anew(
        scratch_loop, tmp_path):
    """A path read ahead by Exclusions that names another device by the time its entry is
    planned (a /dev/disk/by-id link made again, a node replaced) is resolved and judged again:
    the reason is the device's it names now, not the one read at the start of the action."""
    blank, swap_sig = scratch_loop(16 << 20), scratch_loop(16 << 20)
    run("mkswap", "-q", swap_sig)
    link = tmp_path / "by-id-disk"
    link.symlink_to(blank)
    known = blockdevs.Exclusions([str(link)])
    assert blockdevs.exclusion_reason(str(link), known) is None
    link.unlink()
    link.symlink_to(swap_sig)
    assert blockdevs.exclusion_reason(str(link), known) == "swap (signature)"
    link.unlink()
    link.write_bytes(b"x")  # now no device at all: refused by name, as without read-ahead
    with pytest.raises(MirrorError) as exc:
        blockdevs.exclusion_reason(str(link), known)
    assert str(link) in exc.value.message


def test_sysfs_attributes_are_read_without_a_buffered_open(monkeypatch):
    """The probe of every device of an attach-all reads its loop's backing file in sysfs:
    open/read/close, not a buffered open() (an fstat, an ioctl, a seek and a second read more)."""
    import builtins
    name = sorted(os.listdir("/sys/class/block"))[0]
    size = Path(f"/sys/class/block/{name}/size").read_text().rstrip("\n")

    def buffered(*args, **kwargs):
        raise AssertionError(f"buffered open of {args[0]}")
    monkeypatch.setattr(builtins, "open", buffered)
    assert blockdevs._read_sys(f"/sys/class/block/{name}/size") == size
    assert blockdevs._read_sys(f"/sys/class/block/{name}/no-such-attribute") is None


@pytest.mark.root
def test_a_signature_written_but_not_yet_flushed_is_seen(scratch_loop):
    """The probe reads past the page cache (O_DIRECT): what another program wrote through it
    and has not flushed must still be seen (the kernel writes the range back first)."""
    dev = scratch_loop(16 << 20)
    assert blockdevs.probe_signature(dev) is None
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, b"SWAPSPACE2", 4096 - 10)  # no fsync: dirty in the device's page cache
        assert blockdevs.probe_signature(dev) == "swap"
    finally:
        os.close(fd)


def test_block_add_refuses_the_root_disk_as_the_picker_does_before_opening_it(
        tmp_path, monkeypatch, capsys):
    """`mirrorsetup block add` of the disk that holds the root file system is refused with the
    picker's reason and EBUSY, the configuration untouched, and the device never opened (on
    this machine the open itself fails with EPERM, which said nothing useful). The disk is a
    stand-in described as the root disk: a test never touches the real one."""
    from app.cli import main
    from app.services.blockdevs import BlockDevice
    disk = tmp_path / "rootdisk"
    disk.touch()
    root = BlockDevice(str(disk), "rootdisk", 64 << 30, "disk", 252, 0, False, None, None,
                       in_use=("partition rootdisk1 root file system",))
    monkeypatch.setattr(blockdevs, "describe", lambda path: root)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    config = tmp_path / "replication.toml"
    rc = main(["--config", str(config), "--json", "block", "add", str(disk)])
    out = json.loads(capsys.readouterr().out or "{}")
    assert rc == 2 and out["errno_name"] == "EBUSY", out
    assert out["error"].startswith(f"{disk} holds the root file system: it cannot be replicated")
    assert not config.exists() and str(disk) not in opened


@pytest.mark.root
def test_exclusions_read_ahead_believe_udevs_record_and_without_one_the_signature(
        scratch_loop, tmp_path, monkeypatch):
    """Read ahead (Exclusions), a device is judged as exclusion_reason() alone judges it: by
    udev's record where its database has one, by its own signature where the database does
    not exist at all (no udevd: nothing to look up for each device)."""
    blank, swap_sig = scratch_loop(16 << 20), scratch_loop(16 << 20)
    run("mkswap", "-q", swap_sig)
    rdev = os.stat(blank).st_rdev
    monkeypatch.setattr(blockdevs, "UDEV_DATA", str(tmp_path / "none"))
    known = blockdevs.Exclusions([blank, swap_sig])
    assert [blockdevs.exclusion_reason(d, known) for d in (blank, swap_sig)] == \
        [None, "swap (signature)"]
    monkeypatch.setattr(blockdevs, "UDEV_DATA", str(tmp_path))
    (tmp_path / f"b{os.major(rdev)}:{os.minor(rdev)}").write_text("E:ID_FS_TYPE=LVM2_member\n")
    known = blockdevs.Exclusions([blank, swap_sig])
    assert [blockdevs.exclusion_reason(d, known) for d in (blank, swap_sig)] == \
        ["LVM2 physical volume", "swap (signature)"]


def test_the_pickers_note_finds_a_replicated_device_by_any_of_its_names(tmp_path):
    """The TUI's picker and `block devices` say which device is replicated with one function
    (entries.picker_notes): by the path the entry names and by its device number, so a device
    listed under another name than the entry's (a /dev/disk/by-id link) is marked too. The
    TUI's copy matched by path alone."""
    from types import SimpleNamespace

    from app.services.entries import picker_note, picker_notes
    alias = tmp_path / "by-id-null"
    alias.symlink_to("/dev/null")  # a device node this test may look at, under another name
    entry = SimpleNamespace(entry=SimpleNamespace(device=str(alias)), loop="/dev/loop7",
                            capture="captured", state="attached",
                            loops=[SimpleNamespace(device="/dev/loop7")])
    notes = picker_notes(SimpleNamespace(block=[entry]))
    rdev = os.stat("/dev/null").st_rdev
    listed = SimpleNamespace(path="/dev/null", major=os.major(rdev), minor=os.minor(rdev))
    assert picker_note(notes, listed) == "replicated: captured via /dev/loop7"
    assert picker_note(notes, SimpleNamespace(path=str(alias), major=-1, minor=-1)) == \
        "replicated: captured via /dev/loop7"  # by the entry's own name (a fake host's too)
    assert picker_note(notes, SimpleNamespace(path="/dev/zero", major=-1, minor=-1)) is None
    assert picker_notes(None) == {}


@pytest.mark.root
def test_a_devices_identity_names_its_loop_file_and_a_partitions_place(sparse_file):
    """device_identity (what a block entry's first capture records, app/engine/capture.py
    check_identity): a loop device by its file and offset; a partition of it by its number and
    first sector as well; another loop's file is another identity, and check_identity refuses
    it (EMEDIUMTYPE) once the first was recorded. The partition is made with addpart, as
    above (this kernel parses no partition tables)."""
    from app.engine.capture import check_identity
    img, other = sparse_file(32 << 20), sparse_file(8 << 20)
    disk = run("losetup", "--find", "--show", "--partscan", str(img)).stdout.strip()
    second = run("losetup", "--find", "--show", "-o", "4096", str(other)).stdout.strip()
    part = f"{disk}p1"
    state = tempfile.mkdtemp(dir=os.path.dirname(str(img)))
    try:
        run("addpart", disk, "1", str(PART_START_SECTOR), str((16 << 20) // 512))
        ids = {}
        for dev in (disk, part, second):
            fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ids[dev] = blockdevs.device_identity(fd)
            finally:
                os.close(fd)
        ino = os.stat(img).st_ino
        assert ids[disk] == {"loop file": f"{img} (inode {ino})", "loop offset": "0"}, ids
        assert ids[part] == {**ids[disk], "partition": f"number 1, from sector {PART_START_SECTOR}"}
        assert ids[second] == {"loop file": f"{other} (inode {os.stat(other).st_ino})",
                               "loop offset": "4096"}, ids
        fd, fd2 = os.open(disk, os.O_RDONLY), os.open(second, os.O_RDONLY)
        try:
            check_identity(state, "block", disk, blockdevs.device_identity(fd))  # recorded
            check_identity(state, "block", disk, blockdevs.device_identity(fd))  # the same: taken
            with pytest.raises(OSError) as exc:
                check_identity(state, "block", disk, blockdevs.device_identity(fd2))
            assert exc.value.errno == errno.EMEDIUMTYPE
            assert f"its loop file was {img} (inode {ino}), it is now {other}" in str(exc.value)
        finally:
            os.close(fd)
            os.close(fd2)
    finally:
        run("delpart", disk, "1", check=False)
        run("losetup", "-d", disk, check=False)
        run("losetup", "-d", second, check=False)
