"""The journal on its own: order, checksums, torn tails, spill to disk, applied seq, replay."""

from __future__ import annotations

import os

import pytest

from app.engine.applier import Applier
from app.engine.journal import Journal, scan_segment


def _segments(d):
    return sorted(d.glob("*.seg"))


def test_memory_records_come_back_in_order(tmp_path):
    j = Journal(tmp_path)
    seqs = [j.append("write", {"path": "f", "offset": i}, b"x" * i) for i in range(100)]
    assert seqs == list(range(1, 101))
    got = j.take(1000)
    assert [r.seq for r in got] == seqs and got[5].data == b"x" * 5
    assert _segments(tmp_path) == []  # never spilled: nothing written


def test_spill_to_disk_preserves_order(tmp_path):
    j = Journal(tmp_path, memory_bytes=4096, segment_bytes=5_000)
    for i in range(300):  # ~60 bytes each: far beyond the memory bound
        j.append("write", {"path": "f", "offset": i}, b"%d" % i)
    assert len(_segments(tmp_path)) >= 2  # rolled over several small segments
    got, added = [], False
    while batch := j.take(37):
        got += batch
        if len(got) >= 150 and not added:
            added = True  # new records while a disk backlog remains must queue behind it
            for i in range(300, 310):
                j.append("write", {"path": "f", "offset": i}, b"%d" % i)
    assert [r.seq for r in got] == list(range(1, 311))
    assert [r.args["offset"] for r in got] == list(range(310))


def test_crc_detects_corruption_and_torn_tail_is_truncated(tmp_path):
    j = Journal(tmp_path)
    for i in range(10):
        j.append("write", {"path": "f", "offset": i}, b"payload-%d" % i)
    j.sync()
    j.close()
    (seg,) = _segments(tmp_path)
    size = seg.stat().st_size
    with open(seg, "r+b") as f:  # a torn append: half a record at the end
        f.seek(size)
        f.write(b"\x40\x00\x00\x00\x12\x34")
    j2 = Journal(tmp_path)
    assert j2.torn_bytes == 6 and seg.stat().st_size == size
    assert [r.seq for r in j2.take(100)] == list(range(1, 11))
    j2.close()
    data = bytearray(seg.read_bytes())
    data[size // 2] ^= 0xFF  # flip a bit in the middle: the CRC of that record fails
    seg.write_bytes(bytes(data))
    seqs, valid = scan_segment(seg)
    assert valid < size and seqs == list(range(1, len(seqs) + 1)) and len(seqs) < 10


def test_sync_makes_records_durable_and_reopen_replays_unapplied(tmp_path):
    j = Journal(tmp_path)
    for i in range(5):
        j.append("write", {"path": "f", "offset": i}, b"a")
    j.applied(2, 0, persist=True)  # pretend 1..2 were applied
    j.take(2)
    assert j.sync() == 5
    # as if the process died here: nothing else flushed
    j2 = Journal(tmp_path)
    assert (j2.applied_seq, j2.last_seq) == (2, 5)
    assert [r.seq for r in j2.take(100)] == [3, 4, 5]
    assert j2.append("unlink", {"path": "f"}) == 6


def test_applier_replay_twice_converges(tmp_path):
    src = tmp_path / "target"
    src.mkdir()
    j = Journal(tmp_path / "j")
    recs = [("create", {"path": "a", "mode": 0o644, "uid": 0, "gid": 0}, b""),
            ("write", {"path": "a", "offset": 0}, b"hello world"),
            ("mkdir", {"path": "d", "mode": 0o755, "uid": 0, "gid": 0}, b""),
            ("rename", {"old": "a", "new": "d/b", "flags": 0}, b""),
            ("link", {"src": "d/b", "path": "c"}, b""),
            ("symlink", {"path": "s", "target": "d/b", "uid": 0, "gid": 0}, b""),
            ("truncate", {"path": "c", "size": 5}, b""),
            ("unlink", {"path": "gone"}, b"")]
    for op, args, data in recs:
        j.append(op, args, data)
    batch = j.take(100)
    fd = os.open(src, os.O_PATH | os.O_DIRECTORY)
    try:
        ap = Applier(j, fd)
        ap.apply_batch(batch)
        first = sorted(os.listdir(src)), open(src / "c", "rb").read()
        ap.apply_batch(batch)  # the crash-replay case: everything again
        assert (sorted(os.listdir(src)), open(src / "c", "rb").read()) == first == (["c", "d", "s"], b"hello")
        assert os.stat(src / "c").st_ino == os.stat(src / "d" / "b").st_ino
    finally:
        os.close(fd)


def test_no_textual_or_fuse_import_for_the_client():
    import subprocess
    import sys
    code = "import sys, app.services.control; assert 'textual' not in sys.modules and 'pyfuse3' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("n", [1, 3])
def test_discard_pending_after_a_difference_mirror(tmp_path, n):
    j = Journal(tmp_path, memory_bytes=10)
    for i in range(n):
        j.append("write", {"path": "f", "offset": i}, b"zz")
    j.discard_pending()
    assert j.take(10) == [] and j.applied_seq == j.last_seq == n
    assert Journal(tmp_path).applied_seq == n


def test_rolled_segments_are_made_durable_by_sync_not_by_the_roll(tmp_path):
    from app.engine import journal as jmod
    j = Journal(tmp_path, memory_bytes=0, segment_bytes=4096)  # every record spills; tiny segments
    fds_before = len(os.listdir("/proc/self/fd"))
    for i in range(10):
        j.append("write", {"offset": i}, b"x" * 3000)  # one segment each
    assert len(j._unsynced_fds) == 9  # rolled without an fdatasync on the capture path
    j.sync()
    assert j._unsynced_fds == [] and len(os.listdir("/proc/self/fd")) == fds_before + 1
    for i in range(jmod.MAX_UNSYNCED_SEGMENTS + 5):
        j.append("write", {"offset": i}, b"y" * 3000)
    assert len(j._unsynced_fds) == jmod.MAX_UNSYNCED_SEGMENTS  # bounded: the oldest get synced
    j.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before
    again = Journal(tmp_path)
    assert again.last_seq == 10 + jmod.MAX_UNSYNCED_SEGMENTS + 5
