"""The loop service against the real kernel: sysfs and util-linux `losetup` are the witnesses.

Every loop a test makes is detached in a finalizer (by record, and by a sweep for any loop whose
backing file lives in the test's temp dir, which catches loops made by child processes too).
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import losetup_json, run

from app.services import _ioctl, loop
from app.services.results import ConfigError, MirrorError, Outcome

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]


# -- fixtures --------------------------------------------------------------------------------

def _sysfs(index: int, name: str) -> str:
    return Path(f"/sys/block/loop{index}/{name}").read_text().strip()


def _witness(device: str) -> dict | None:
    """This device as losetup reports it (None when losetup does not list it)."""
    return next((d for d in losetup_json() if d["name"] == device), None)


def _ours(tmp_path: Path) -> list[str]:
    # (losetup lists a loop another user is attaching or detaching with a null back-file)
    return [d["name"] for d in losetup_json() if (d["back-file"] or "").startswith(str(tmp_path))]


@pytest.fixture
def loops(tmp_path):
    """attach(*args, **kw) = loop.attach, recorded; every loop of this test detached at teardown."""
    made: list[str] = []

    def attach(*args, **kw):
        st = loop.attach(*args, **kw)
        made.append(st.device)
        return st

    attach.made = made
    yield attach
    for dev in set(made) | set(_ours(tmp_path)):
        run("losetup", "-d", dev, check=False)


@pytest.fixture
def high_loop(unused_loop):
    """A /dev/loopN path that does not exist yet (conftest's unused_loop)."""
    return unused_loop


# -- pure layout / parsing -------------------------------------------------------------------

def test_struct_layout_matches_the_kernel_header():
    assert _ioctl.LOOP_INFO64.size == 232
    assert _ioctl.LOOP_CONFIG.size == 304
    info = _ioctl.pack_info64(3 * MiB, 5 * MiB, _ioctl.LO_FLAGS_READ_ONLY | _ioctl.LO_FLAGS_PARTSCAN,
                              "/x" * 50)
    assert int.from_bytes(info[24:32], "little") == 3 * MiB          # lo_offset
    assert int.from_bytes(info[32:40], "little") == 5 * MiB          # lo_sizelimit
    assert int.from_bytes(info[52:56], "little") == 9                # lo_flags
    assert info[56:120] == (b"/x" * 50)[:63] + b"\0"                   # lo_file_name, NUL-terminated
    cfg = _ioctl.pack_config(7, 4096, info)
    assert int.from_bytes(cfg[0:4], "little") == 7                   # fd
    assert int.from_bytes(cfg[4:8], "little") == 4096                # block_size
    assert cfg[8:240] == info and cfg[240:] == b"\0" * 64            # info, __reserved[8]
    cleared = _ioctl.info64_without(info, _ioctl.LO_FLAGS_READ_ONLY)
    assert int.from_bytes(cleared[52:56], "little") == _ioctl.LO_FLAGS_PARTSCAN


@pytest.mark.parametrize("path,index", [("/dev/loop0", 0), ("/dev/loop7", 7), ("/dev/loop1234", 1234)])
def test_parse_loop_path(path, index):
    assert loop.parse_loop_path(path) == index


@pytest.mark.parametrize("path", ["", "/dev/loop", "/dev/loopx", "loop3", "/dev/loop03",
                                  "/dev/sda", "/dev/loop3p1", "/dev/loop-control", "/dev/loop 3"])
def test_parse_loop_path_refuses(path):
    with pytest.raises(ConfigError) as info:
        loop.parse_loop_path(path)
    assert info.value.errno == errno.EINVAL and info.value.key == "loop"


# -- attach ----------------------------------------------------------------------------------

@pytest.mark.root
def test_attach_read_only_with_offset_and_sizelimit(sparse_file, loops):
    img = sparse_file(16 * MiB)
    with open(img, "r+b") as f:                      # a marker where the loop's byte 0 will be
        f.seek(MiB)
        f.write(b"MARKER-AT-OFFSET")
    st = loops(str(img), offset=MiB, sizelimit=4 * MiB, read_only=True)
    assert (st.backing_file, st.offset, st.sizelimit, st.size, st.read_only) == \
           (str(img), MiB, 4 * MiB, 4 * MiB, True)
    assert _sysfs(st.index, "loop/backing_file") == str(img)
    assert _sysfs(st.index, "loop/offset") == str(MiB)
    assert _sysfs(st.index, "loop/sizelimit") == str(4 * MiB)
    assert _sysfs(st.index, "ro") == "1"
    assert int(_sysfs(st.index, "size")) * 512 == 4 * MiB
    w = _witness(st.device)
    assert w is not None
    assert (w["back-file"], w["offset"], w["sizelimit"], w["ro"]) == (str(img), MiB, 4 * MiB, True)
    with open(st.device, "rb") as dev:
        assert dev.read(16) == b"MARKER-AT-OFFSET"
    fd = os.open(st.device, os.O_WRONLY)     # 6.18 lets the open through; the write is refused
    try:
        with pytest.raises(OSError) as refused:
            os.pwrite(fd, b"\xff" * 512, 0)
    finally:
        os.close(fd)
    assert refused.value.errno == errno.EPERM
    with open(img, "rb") as f:
        f.seek(MiB)
        assert f.read(16) == b"MARKER-AT-OFFSET"
    assert loop.status(st.device) == st


@pytest.mark.root
def test_attach_read_write_writes_land_at_the_offset(sparse_file, loops):
    img = sparse_file(8 * MiB)
    st = loops(str(img), offset=2 * MiB, sizelimit=MiB)
    assert st.read_only is False and _sysfs(st.index, "ro") == "0"
    fd = os.open(st.device, os.O_WRONLY)
    try:
        os.pwrite(fd, b"written-through-loop", 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(img, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(20) == b"written-through-loop"
    assert _witness(st.device)["ro"] is False


@pytest.mark.root
def test_attach_flags_direct_io_partscan_block_size(sparse_file, loops):
    img = sparse_file(8 * MiB)
    st = loops(str(img), direct_io=True, partscan=True, block_size=4096)
    assert st.direct_io and st.partscan and not st.autoclear
    assert _sysfs(st.index, "loop/dio") == "1"
    assert _sysfs(st.index, "loop/partscan") == "1"
    assert _sysfs(st.index, "queue/logical_block_size") == "4096"


@pytest.mark.root
def test_a_loop_we_hold_is_read_through_our_fd_as_sysfs_shows_it(sparse_file, loops):
    """The status of a loop just bound is read with ioctls on our own descriptor: it must say
    what sysfs says, read-only included when only the device flag (`blockdev --setro`, which
    outlives a binding) is set and the loop's own LO_FLAGS_READ_ONLY is not."""
    st = loops(str(sparse_file(8 * MiB)), offset=MiB, sizelimit=2 * MiB, partscan=True)
    assert loop.status(st.device) == st and not st.read_only
    fd = os.open(st.device, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, _ioctl.BLKROSET, (1).to_bytes(4, sys.byteorder))
        assert _sysfs(st.index, "ro") == "1"
        assert loop.status(st.device).read_only
        assert loop._status_from_fd(fd, st.device, st.index) == loop.status(st.device)
    finally:
        fcntl.ioctl(fd, _ioctl.BLKROSET, (0).to_bytes(4, sys.byteorder))  # the number stays clean
        os.close(fd)


@pytest.mark.root
def test_attach_fallback_without_loop_configure(sparse_file, loops, monkeypatch):
    """Kernels before 5.8 answer LOOP_CONFIGURE with EINVAL; an unknown loop ioctl gets the same
    answer here, so the SET_FD + SET_STATUS64 path runs against the real kernel."""
    monkeypatch.setattr(loop, "LOOP_CONFIGURE", 0x4C0F)
    img = sparse_file(8 * MiB)
    st = loops(str(img), offset=512 * 8, sizelimit=2 * MiB, read_only=True, direct_io=True,
               block_size=4096)
    assert (st.offset, st.sizelimit, st.read_only, st.direct_io) == (4096, 2 * MiB, True, True)
    assert _sysfs(st.index, "queue/logical_block_size") == "4096"
    w = _witness(st.device)
    assert (w["back-file"], w["offset"], w["sizelimit"], w["ro"]) == (str(img), 4096, 2 * MiB, True)


@pytest.mark.root
def test_autoclear_detaches_at_our_own_close(sparse_file, loops):
    """Nothing else opened the device, so the kernel detaches when attach() closes it."""
    img = sparse_file(4 * MiB)
    st = loops(str(img), autoclear=True)
    assert st.autoclear and st.backing_file == str(img)
    now = loop.status(st.device)  # another process may have taken the freed number at once
    assert now is None or now.backing_file != str(img), now
    assert not any(d["back-file"] == str(img) for d in losetup_json())


@pytest.mark.root
def test_attach_to_a_fixed_loop_that_did_not_exist(sparse_file, loops, high_loop):
    index = loop.parse_loop_path(high_loop)
    assert not os.path.exists(high_loop)
    img = sparse_file(4 * MiB)
    st = loops(str(img), loop=high_loop)
    assert st.device == high_loop and st.index == index
    assert os.path.exists(high_loop)
    assert _sysfs(index, "loop/backing_file") == str(img)
    assert _witness(high_loop)["back-file"] == str(img)
    assert high_loop in [s.device for s in loop.list_attached()]


@pytest.mark.root
def test_ensure_device_creates_an_unbound_loop(high_loop):
    loop.ensure_device(high_loop)
    index = loop.parse_loop_path(high_loop)
    assert os.path.exists(high_loop) and os.path.isdir(f"/sys/block/loop{index}")
    assert loop.status(high_loop) is None
    loop.ensure_device(high_loop)       # already there: no error, still unbound
    assert loop.status(high_loop) is None


@pytest.mark.root
def test_busy_fixed_loop_is_refused_and_left_alone(sparse_file, loops, high_loop):
    first, second = sparse_file(4 * MiB), sparse_file(4 * MiB)
    st = loops(str(first), loop=high_loop, offset=MiB)
    with pytest.raises(MirrorError) as info:
        loops(str(second), loop=high_loop)
    assert info.value.errno == errno.EBUSY
    assert f"{high_loop} is busy (attached to {first})" in str(info.value)
    assert loop.status(high_loop) == st
    assert _sysfs(st.index, "loop/offset") == str(MiB)
    assert [d["back-file"] for d in losetup_json()].count(str(second)) == 0


@pytest.mark.root
def test_allocation_retries_when_another_process_took_the_free_loop(sparse_file, loops, scratch_loop,
                                                                      monkeypatch):
    """GET_FREE only names a loop: a process outside our lock (here losetup) may bind it first.
    The kernel answers EBUSY on that loop and attach() must move on to another one."""
    taken = scratch_loop(4 * MiB)
    taken_before = loop.status(taken)
    real = loop._get_free
    calls = []

    def stale_first(ctl):
        calls.append(1)
        return loop.parse_loop_path(taken) if len(calls) == 1 else real(ctl)

    monkeypatch.setattr(loop, "_get_free", stale_first)
    img = sparse_file(4 * MiB)
    st = loops(str(img))
    assert len(calls) == 2 and st.device != taken
    assert loop.status(taken) == taken_before
    assert _sysfs(st.index, "loop/backing_file") == str(img)


@pytest.mark.root
def test_a_first_free_loop_is_never_one_another_entry_keeps(sparse_file, loops):
    """Found by helper-27's walk on a busy host: attach-all gave an entry without a fixed loop
    the first free one, /dev/loop40, which the next entry keeps as its fixed loop; that entry
    then failed '/dev/loop40 is busy: attached to …/loop5-…/disk', ours. `avoid` names the
    kept ones."""
    kept = loop.parse_loop_path(loop.find_free())
    st = loops(str(sparse_file(4 * MiB)), avoid={kept})
    assert st.index != kept


BAD_GEOMETRY = [
    ({"offset": 9 * MiB}, "past the end"),
    ({"offset": 8 * MiB}, "past the end"),
    ({"offset": 1000}, "multiple of 512"),
    ({"offset": -512}, ">= 0"),
    ({"sizelimit": -512}, ">= 0"),
    ({"sizelimit": 1000}, "multiple of 512"),
    ({"offset": 4 * MiB, "sizelimit": 5 * MiB}, "exceeds"),
    ({"block_size": 1000}, "power of two"),
]


@pytest.mark.root
@pytest.mark.parametrize("kw,why", BAD_GEOMETRY)
def test_bad_geometry_is_refused_before_anything_changes(sparse_file, loops, high_loop, kw, why):
    img = sparse_file(8 * MiB)
    with pytest.raises(MirrorError) as info:
        loops(str(img), loop=high_loop, **kw)
    assert info.value.errno == errno.EINVAL
    assert high_loop in str(info.value) and why in str(info.value)
    assert not os.path.exists(high_loop), "refused, yet the loop device was created"
    assert str(img) not in [d["back-file"] for d in losetup_json()]


@pytest.mark.root
def test_block_device_backing_is_measured_with_blkgetsize64(scratch_loop, loops, high_loop):
    disk = scratch_loop(8 * MiB)                     # a block device made by losetup
    with pytest.raises(MirrorError) as info:
        loops(disk, loop=high_loop, offset=8 * MiB)
    assert info.value.errno == errno.EINVAL and f"{disk} (8388608 bytes)" in str(info.value)
    assert not os.path.exists(high_loop)
    st = loops(disk, loop=high_loop, offset=6 * MiB)
    assert (st.backing_file, st.offset, st.size) == (disk, 6 * MiB, 2 * MiB)
    assert _witness(high_loop)["back-file"] == disk


@pytest.mark.root
def test_find_free_names_an_existing_loop():
    path = loop.find_free()
    index = loop.parse_loop_path(path)
    assert os.path.exists(path) and os.path.isdir(f"/sys/block/loop{index}")


@pytest.mark.root
def test_missing_backing_keeps_enoent(tmp_path, loops):
    with pytest.raises(MirrorError) as info:
        loops(str(tmp_path / "nope.img"))
    assert info.value.errno == errno.ENOENT and "nope.img" in str(info.value)


@pytest.mark.root
def test_read_only_file_system_needs_read_only(tmpfs_mount, loops):
    fs = tmpfs_mount()
    img = fs / "ro.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    run("mount", "-o", "remount,ro", str(fs))
    with pytest.raises(MirrorError) as info:
        loops(str(img))
    assert info.value.errno == errno.EROFS and "read-only" in str(info.value)
    assert str(img) not in [d["back-file"] for d in losetup_json()]
    st = loops(str(img), read_only=True)
    assert st.read_only and _sysfs(st.index, "ro") == "1"
    loop.detach(st.device)


@pytest.mark.root
def test_long_backing_path_is_shown_whole(tmp_path, loops):
    deep = tmp_path / ("a-directory-name-long-enough-to-pass-the-64-byte-cut" * 2)
    deep.mkdir()
    img = deep / "backing-file-with-a-long-name.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    assert len(os.fsencode(img)) > 100
    st = loops(str(img))
    assert st.backing_file == str(img)
    assert _witness(st.device)["back-file"] == str(img)
    # Why sysfs: the kernel's own loop_info64 keeps only the first 63 bytes.
    fd = os.open(st.device, os.O_RDONLY)
    try:
        raw = fcntl.ioctl(fd, _ioctl.LOOP_GET_STATUS64, b"\0" * _ioctl.LOOP_INFO64.size)
    finally:
        os.close(fd)
    name = _ioctl.LOOP_INFO64.unpack(raw)[9].rstrip(b"\0")
    assert name == os.fsencode(img)[:63]


# -- detach ----------------------------------------------------------------------------------

@pytest.mark.root
def test_detach_pending_while_open_then_done_at_close(sparse_file, loops, high_loop):
    img = sparse_file(4 * MiB)
    st = loops(str(img), loop=high_loop)  # a number nobody else takes once it is free again
    holder = os.open(st.device, os.O_RDONLY)
    try:
        r = loop.detach(st.device)
        assert r.outcome is Outcome.PENDING
        assert r.message == f"{st.device}: detach pending (still open; the kernel detaches at last close)"
        assert _sysfs(st.index, "loop/backing_file") == str(img)
        assert _sysfs(st.index, "loop/autoclear") == "1"
        assert _witness(st.device)["autoclear"] is True
    finally:
        os.close(holder)
    assert not os.path.exists(f"/sys/block/loop{st.index}/loop")
    assert loop.status(st.device) is None and _witness(st.device) is None
    again = loop.detach(st.device)
    assert again.outcome is Outcome.UNCHANGED and "not attached" in again.message


@pytest.mark.root
def test_a_detach_waits_a_moment_for_an_opener_of_a_moment(sparse_file, loops, high_loop):
    """Found on a busy host: a detach whose loop a prober had open for a moment (udev, a scan
    of the block devices, the console's own picker) said "pending", and the test that expected
    "detached" failed. A close within DETACH_GRACE makes it done."""
    import threading
    st = loops(str(sparse_file(4 * MiB)), loop=high_loop)
    holder = os.open(st.device, os.O_RDONLY)
    closer = threading.Timer(0.1, os.close, (holder,))
    closer.start()
    try:
        r = loop.detach(st.device)
    finally:
        closer.join()
    assert r.outcome is Outcome.OK and r.message == f"{st.device}: detached", r.message
    assert not os.path.exists(f"/sys/block/loop{st.index}/loop")


@pytest.mark.root
def test_detach_when_nobody_else_holds_it(sparse_file, loops):
    st = loops(str(sparse_file(4 * MiB)))
    r = loop.detach(st.device)
    assert (r.outcome, r.message, r.errno) == (Outcome.OK, f"{st.device}: detached", None)
    # on a busy host another process may take the freed number at once: ours is gone from it
    now = _witness(st.device)
    assert now is None or now["back-file"] != st.backing_file, now
    assert not any(s.backing_file == st.backing_file for s in loop.list_attached())


@pytest.mark.root
def test_a_detach_nobody_else_holds_looks_at_sysfs_twice(sparse_file, loops, monkeypatch):
    """Once before (not attached?) and once after its close (done, or pending?): it looked a
    third time, the loop's answer again (a detach-all of 256 loops: ~4 ms)."""
    st = loops(str(sparse_file(4 * MiB)))
    looks = []
    real = loop._bound
    monkeypatch.setattr(loop, "_bound", lambda i: looks.append(i) or real(i))
    r = loop.detach(st.device)
    assert (r.outcome, r.message) == (Outcome.OK, f"{st.device}: detached")
    assert looks == [st.index, st.index]


@pytest.mark.root
def test_detach_refuses_a_path_that_is_not_a_loop():
    r = loop.detach("/dev/vda")
    assert r.outcome is Outcome.FAILED and r.errno == errno.EINVAL


# -- reading ---------------------------------------------------------------------------------

@pytest.mark.root
def test_list_attached_agrees_with_losetup(sparse_file, loops, tmp_path):
    made = [loops(str(sparse_file(2 * MiB)), offset=512 * i) for i in range(3)]
    mine = [s for s in loop.list_attached() if s.backing_file.startswith(str(tmp_path))]
    assert mine == sorted(made, key=lambda s: s.index)
    witness = {d["name"]: d for d in losetup_json()}
    for s in mine:
        assert (witness[s.device]["back-file"], witness[s.device]["offset"]) == (s.backing_file, s.offset)
    assert loop.status("/dev/loop1048576") is None  # above any loop index: nobody has it


@pytest.mark.root
def test_holders_of_a_free_standing_loop(sparse_file, loops):
    st = loops(str(sparse_file(4 * MiB)))
    assert loop.holders_of(st.device) == []
    assert loop.holders_of(f"loop{st.index}") == []
    with pytest.raises(MirrorError) as info:
        loop.holders_of("/dev/no-such-disk")
    assert info.value.errno == errno.ENOENT and "/dev/no-such-disk" in str(info.value)


def _device_mapper_usable() -> bool:
    return run("dmsetup", "version", check=False).returncode == 0


@pytest.mark.root
def test_holders_of_sees_a_device_mapper_table(sparse_file, loops):
    if not _device_mapper_usable():
        pytest.skip("this kernel has no device-mapper (dmsetup version fails): no holder to make")
    st = loops(str(sparse_file(4 * MiB)))
    name = f"mirrorsetup-test-{os.getpid()}"
    table = f"0 {4 * MiB // 512} linear {st.device} 0"
    run("dmsetup", "create", "--noudevsync", name, "--table", table)
    try:
        minor = run("dmsetup", "info", "-c", "--noheadings", "-o", "minor", name).stdout.strip()
        assert loop.holders_of(st.device) == [f"dm-{minor}"]
        assert loop.holders_of(f"loop{st.index}") == [f"dm-{minor}"]
    finally:
        run("dmsetup", "remove", "--noudevsync", name, check=False)
    assert loop.holders_of(st.device) == []


# -- many processes at once ------------------------------------------------------------------

CHILD = """
import sys, time
from app.services import loop
start = float(sys.argv[1])
while time.time() < start:          # line the processes up so they really collide
    time.sleep(0.001)
for backing in sys.argv[2:]:
    print(loop.attach(backing).device, backing, flush=True)
"""


@pytest.mark.root
def test_parallel_attach_never_hands_out_a_loop_twice(sparse_file, loops):
    procs, per_proc = 6, 5
    files = [[str(sparse_file(MiB)) for _ in range(per_proc)] for _ in range(procs)]
    start = time.time() + 2.0
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(start), *mine], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for mine in files]
    results = [c.communicate(timeout=60) for c in children]
    pairs = [line.split(" ", 1) for out, _ in results for line in out.splitlines()]
    loops.made.extend(dev for dev, _ in pairs)      # so the finalizer detaches them by name too
    for c, (_, err) in zip(children, results):
        assert c.returncode == 0, err
    devices = [dev for dev, _ in pairs]
    assert len(devices) == procs * per_proc
    assert len(set(devices)) == len(devices), "one loop device was handed out twice"
    for dev, backing in pairs:
        assert _sysfs(loop.parse_loop_path(dev), "loop/backing_file") == backing
    assert sorted(b for _, b in pairs) == sorted(f for mine in files for f in mine)
