"""The journal on its own: order, checksums, torn tails, spill to disk, release, rewind, gaps, replay."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import subprocess
import threading
import time

import pytest

from app.engine import sync
from app.engine.applier import FsApplier
from app.engine.journal import KIND_FS, Journal, JournalGap, Record, scan_segment
from app.engine.target import LocalDirTarget
from test_engine_support import resident


def lowlevel_compiled():
    from app.engine.lowlevel import compiled
    return compiled


def _segments(d):
    return sorted(d.glob("*.seg"))


def test_memory_records_come_back_in_order(tmp_path):
    j = Journal(tmp_path)
    seqs = [j.append("write", {"path": "f", "offset": i}, b"x" * i) for i in range(100)]
    assert seqs == list(range(1, 101))
    got = j.read(1000)
    assert [r.seq for r in got] == seqs and got[5].data == b"x" * 5
    assert _segments(tmp_path) == []  # never spilled: nothing written


def test_spill_to_disk_preserves_order(tmp_path):
    j = Journal(tmp_path, memory_bytes=4096, segment_bytes=5_000)
    for i in range(300):  # ~60 bytes each: far beyond the memory bound
        j.append("write", {"path": "f", "offset": i}, b"%d" % i)
    assert len(_segments(tmp_path)) >= 2  # rolled over several small segments
    got, added = [], False
    while batch := j.read(37):
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
    assert [r.seq for r in j2.read(100)] == list(range(1, 11))
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
    j.read(2)
    j.release(2)  # the target holds 1..2 durably
    assert j.sync() == 5
    # as if the process died here: nothing else flushed
    j2 = Journal(tmp_path)
    assert (j2.released_seq, j2.last_seq) == (2, 5)
    assert [r.seq for r in j2.read(100)] == [3, 4, 5]
    assert j2.append("unlink", {"path": "f"}) == 6


def test_a_clean_close_keeps_the_records_that_were_only_in_memory(tmp_path):
    """Records no application fsync'd live in memory; a capture that ends cleanly while its
    target is away closes the journal "with N records kept for the next start". close()
    dropped them: the next start began at seq 1 again, found the target holding seqs it
    never had ("its history is not ours"), and what they said was not replicated. Found by
    the fs-remove test in test_remote.py."""
    j = Journal(tmp_path)
    for i in range(7):
        j.append("write", {"path": "f", "offset": i}, b"late %d" % i)
    j.read(3)
    j.release(2)  # the target holds 1..2
    assert _segments(tmp_path) == []  # (in memory only so far)
    j.close()
    assert j.unstored == 0
    j2 = Journal(tmp_path)
    assert (j2.released_seq, j2.last_seq, j2.gap) == (2, 7, None)
    assert [(r.seq, r.data) for r in j2.read(100)] == [(s, b"late %d" % (s - 1)) for s in range(3, 8)]
    assert j2.append("unlink", {"path": "f"}) == 8


def test_seqs_handed_out_are_reserved_durably_so_a_crash_never_gives_one_again(tmp_path):
    """Records only in memory die with the process, but a remote target may have received
    them: after a crash the journal must not hand their seqs to other changes (the target
    would take those as already held). Seqs are reserved durably ahead; a clean close gives
    back what was not used; a journal that only ingests (the agent's) reserves nothing."""
    j = Journal(tmp_path / "a")
    for i in range(5):
        j.append("write", {"path": "f", "offset": i}, b"a")  # in memory only
    crashed = Journal(tmp_path / "a")  # as if the process died: nothing flushed or closed
    assert crashed.last_seq == 0 and crashed.reserved_seq >= 5
    crashed.skip_to(crashed.reserved_seq)  # what a capture does after an unclean stop
    assert crashed.append("write", {"path": "f", "offset": 9}, b"b") > 5
    clean = Journal(tmp_path / "b")
    for i in range(3):
        clean.append("write", {"path": "f", "offset": i}, b"a")
    clean.read(10)
    clean.release(3)
    clean.close()
    assert Journal(tmp_path / "b").reserved_seq == 3  # nothing lost: no jump after a clean stop
    agent = Journal(tmp_path / "c")
    agent.ingest_durably([Record(1, 1, "write", {"path": "f", "offset": 0}, b"x")])
    assert not (tmp_path / "c" / "reserved").exists()


@pytest.mark.root
def test_a_reservation_that_cannot_be_written_never_fails_a_capture(tmp_path, tmpfs_mount, caplog):
    """The journal's file system is full: the reservation cannot be written, and capture goes on
    (what it costs is said: after a crash a remote target may refuse until adopted)."""
    small = tmpfs_mount(tmp_path / "small")
    subprocess.run(["mount", "-o", "remount,size=64k", str(small)], check=True)
    j = Journal(small)
    fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError):  # the file system is full now
        while True:
            os.write(fd, b"x" * 4096)
    os.close(fd)
    with caplog.at_level("WARNING"):
        assert [j.append("write", {"path": "f", "offset": i}, b"a") for i in range(3)] == [1, 2, 3]
    assert "could not reserve record numbers" in caplog.text
    j.close()



@pytest.mark.root
def test_a_journal_whose_file_system_fills_up_goes_behind_and_never_fails_a_change(tmp_path, tmpfs_mount,
                                                                                   caplog):
    """Found by helper-28's walk (the state directory on a small file system, the target
    away): once the journal's file system was full, every change that made the journal spill
    failed with ENOSPC, the application's data written below all the same (a write said
    failed that was done) and its seq used up with no record: a hole in the journal; so did
    every fsync. A full journal now goes behind as a full queue does (a resync later), and
    an fsync keeps what it cannot store in memory, in order."""
    small = tmpfs_mount(tmp_path / "small")
    subprocess.run(["mount", "-o", "remount,size=256k", str(small)], check=True)
    j = Journal(small, memory_bytes=16 << 10)
    got = []
    caplog.set_level("WARNING")
    for i in range(64):  # twice the room; an application's fsync now and then
        got.append(j.append("write", {"path": "f", "offset": i}, b"x" * 8192))
        if i % 8 == 7:
            assert j.sync() == j.last_seq  # what cannot be stored stays in memory, in order
    assert j.behind and got[-1] == 0, got
    stored = [s for s in got if s]
    assert stored == list(range(1, len(stored) + 1)) and j.last_seq == len(stored), got
    records = []
    while batch := j.read(1000):
        records += batch
    assert [r.seq for r in records] == stored
    assert "journal's file system is full" in j.full_error and "ENOSPC" in j.full_error, j.full_error
    assert caplog.text.count("journal's file system is full") == 1, caplog.text  # said once
    j.close()


MiB = 1 << 20


def _cached_file(path, size: int) -> int:
    """A file of `size` random bytes, written back and then read, so that its pages are in the
    page cache and clean (what a dropped range is checked against)."""
    path.write_bytes(os.urandom(size))
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    os.fdatasync(fd)
    os.pread(fd, size, 0)
    assert sum(resident(path)) > 0.9 * size // 4096, "the file's pages were not cached to start with"
    return fd


def test_a_block_compare_drops_what_it_read_from_the_page_cache_and_nothing_ahead(tmp_path):
    """Reads of a raw device or a block replica for hashes leave no (large) folios behind: a
    later 4 KiB write into one walks all its buffer heads (sync.drop_cached)."""
    f = tmp_path / "replica.img"
    fd = _cached_file(f, 8 * MiB)
    try:
        whole = sync.block_hashes(fd, 8 * MiB)  # (as before: the cache stays)
        assert sum(resident(f)) > 0.9 * 2048
        # as a block target hashes (LocalBlockTarget.block_hashes_of)
        assert [sync.sha256_hex(sync.pread_uncached(fd, MiB, b * MiB)) for b in range(5)] == whole[:5]
        pages = resident(f)
        assert not any(pages[:4 * MiB // 4096]), "the first two 2 MiB windows it read stay cached"
        assert all(pages[6 * MiB // 4096:]), "pages past what it read were dropped (readahead lost)"
    finally:
        os.close(fd)
    from app.engine import blocksync  # a compare's and a verify's reads of the raw device
    raw = tmp_path / "raw.img"
    fd = _cached_file(raw, 4 * MiB)
    try:
        for b in range(4):
            blocksync.read_block(fd, 0, 4 * MiB, b)
        assert not any(resident(raw))
    finally:
        os.close(fd)


def test_a_block_applier_drops_the_cache_it_found_and_its_large_writes_once_synced(tmp_path):
    from app.engine.applier import BlockApplier
    from app.engine.journal import KIND_BLOCK
    f = tmp_path / "replica.img"
    fd = _cached_file(f, 8 * MiB)
    try:
        a = BlockApplier(fd)
        assert not any(resident(f)), "the replica's cached pages from before stayed"
        big, small = os.urandom(MiB), os.urandom(4096)
        records = [Record(1, KIND_BLOCK, "write", {"offset": 2 * MiB}, big),
                   Record(2, KIND_BLOCK, "write", {"offset": 6 * MiB}, small)]
        done = a.apply_many(records)
        for rec in records[done:]:
            a.apply(rec)
        assert all(resident(f)[2 * MiB // 4096:3 * MiB // 4096])  # dirty until synced
        a.sync()
        pages = resident(f)
        assert not any(pages[2 * MiB // 4096:4 * MiB // 4096]), "a large write's window stayed cached"
        assert pages[6 * MiB // 4096], "a small write's page was dropped too (only large folios cost)"
        assert f.read_bytes()[2 * MiB:3 * MiB] == big and f.read_bytes()[6 * MiB:6 * MiB + 4096] == small
    finally:
        os.close(fd)


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
    batch = j.read(100)
    fd = os.open(src, os.O_PATH | os.O_DIRECTORY)
    try:
        ap = FsApplier(fd)
        for rec in batch:
            try:
                ap.apply(rec)
            except FileNotFoundError:
                assert rec.op == "unlink"
        first = sorted(os.listdir(src)), open(src / "c", "rb").read()
        for rec in batch:  # the crash-replay case: everything again
            try:
                ap.apply(rec)
            except FileNotFoundError:
                pass
        assert (sorted(os.listdir(src)), open(src / "c", "rb").read()) == first == (["c", "d", "s"], b"hello")
        assert os.stat(src / "c").st_ino == os.stat(src / "d" / "b").st_ino
        ap.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize("fchmodat2", [True, False], ids=["fchmodat2", "before-linux-6.6"])
def test_an_applied_chmod_changes_the_name_itself_and_never_what_a_symlink_points_to(
        tmp_path, monkeypatch, fchmodat2):
    """The applier's chmod (one fchmodat2 call, or the O_PATH way where the kernel has none):
    set-ID and sticky bits as recorded, a symlink named by a record left alone and what it
    points to unchanged, a missing name an error naming it."""
    from app.engine import lowlevel
    monkeypatch.setattr(lowlevel, "_fchmodat2", [fchmodat2])
    tgt = tmp_path / "target"
    tgt.mkdir()
    (tgt / "f").write_bytes(b"x")
    os.chmod(tgt / "f", 0o644)
    (tgt / "l").symlink_to("f")
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    ap = FsApplier(fd)
    try:
        def chmod(path, mode, seq):
            ap.apply(Record(seq, KIND_FS, "chmod", {"path": path, "mode": mode}))
        chmod("f", 0o4750, 1)
        chmod("l", 0o777, 2)
        ap.apply(Record(3, KIND_FS, "mkdir", {"path": "d", "mode": 0o1777, "uid": 0, "gid": 0}))
        assert stat.S_IMODE(os.stat(tgt / "f").st_mode) == 0o4750  # not the symlink's 0o777
        assert stat.S_ISLNK(os.lstat(tgt / "l").st_mode)
        assert stat.S_IMODE(os.stat(tgt / "d").st_mode) == 0o1777
        with pytest.raises(FileNotFoundError, match="gone"):
            chmod("gone", 0o600, 4)
        if fchmodat2:  # a seccomp filter's EPERM for a call it does not know: the O_PATH way
            monkeypatch.setattr(lowlevel, "_libc", type("Libc", (), {
                "syscall": staticmethod(lambda *a: (ctypes.set_errno(errno.EPERM), -1)[1])})())
            chmod("f", 0o640, 5)
            assert stat.S_IMODE(os.stat(tgt / "f").st_mode) == 0o640
    finally:
        ap.close()
        os.close(fd)


@pytest.mark.root
def test_a_remove_or_prune_never_goes_into_a_file_system_mounted_below(tmp_path, tmpfs_mount):
    """Found in the review of helper-50's fail-back fixes: the applier removed a directory's
    tree with shutil.rmtree, which went into a file system mounted below it and emptied it (a
    fail-back's remove, or prune, of a directory above a second disk mounted in the entry).
    Everything on the directory's own file system goes; the other one is left whole, with the
    directories above it, and that is said (EBUSY)."""
    tgt = tmp_path / "target"
    (tgt / "data" / "sub").mkdir(parents=True)
    (tgt / "data" / "sub" / "ours").write_text("removed")
    (tgt / "data" / "mine").write_text("removed")
    disk = tmpfs_mount(tgt / "data" / "sub" / "disk")
    (disk / "theirs").write_text("never removed")
    (tgt / "gone").mkdir()
    (tgt / "gone" / "f").write_text("removed")
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    ap = FsApplier(fd)
    try:
        with pytest.raises(OSError) as kept:
            ap.apply(Record(1, KIND_FS, "remove", {"path": "data"}))
        assert kept.value.errno == errno.EBUSY and "another file system is mounted there" in \
            str(kept.value) and "data/sub/disk" in str(kept.value), kept.value
        assert (disk / "theirs").read_text() == "never removed"
        assert sorted(os.listdir(tgt / "data")) == ["sub"] and os.listdir(tgt / "data" / "sub") == ["disk"]
        with pytest.raises(OSError):  # the prune of the root: its other names go all the same
            ap.apply(Record(2, KIND_FS, "prune", {"path": "", "keep": []}))
        assert sorted(os.listdir(tgt)) == ["data"] and (disk / "theirs").read_text() == "never removed"
    finally:
        ap.close()
        os.close(fd)


def test_a_put_makes_the_whole_file_whatever_had_its_name_and_replays(tmp_path):
    """"put" (a walk's whole small file) replaces a file, a directory with its tree (an fd the
    applier kept for a file below it is dropped, never written through) and a symlink (not
    followed); owner, then mode with set-ID bits, data, size (a tail of zeros) and times."""
    tgt = tmp_path / "target"
    (tgt / "d" / "sub").mkdir(parents=True)
    (tgt / "f").write_bytes(b"old content, longer than the new")
    outside = tmp_path / "outside"
    outside.write_bytes(b"not ours")
    os.symlink(outside, tgt / "s")
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    ap = FsApplier(fd)
    try:
        ap.apply(Record(1, KIND_FS, "create", {"path": "d/sub/x", "mode": 0o644, "uid": 0, "gid": 0}))
        times = {"atime": 1_500_000_000_000_000_000, "mtime": 1_600_000_000_000_000_000}
        puts = [Record(2, KIND_FS, "put", {"path": "f", "mode": 0o4750, "uid": 1234, "gid": 99,
                                  "size": 3, **times}, b"new"),
                Record(3, KIND_FS, "put", {"path": "d", "mode": 0o600, "uid": 0, "gid": 0, "size": 8},
                       b"abc"),
                Record(4, KIND_FS, "put", {"path": "s", "mode": 0o644, "uid": 0, "gid": 0, "size": 0}),
                Record(5, KIND_FS, "write", {"path": "d/sub/x", "offset": 0}, b"lost?")]
        for rec in puts[:3]:
            ap.apply(rec)
        with pytest.raises(NotADirectoryError):
            ap.apply(puts[3])  # the cached fd went with its directory: "d" is a file now
        for rec in puts[:3]:  # replayed after a crash: the same result
            ap.apply(rec)
        st = os.lstat(tgt / "f")
        assert ((tgt / "f").read_bytes(), st.st_uid, st.st_gid, st.st_mode & 0o7777,
                st.st_atime_ns, st.st_mtime_ns) == (b"new", 1234, 99, 0o4750, *times.values())
        assert (tgt / "d").read_bytes() == b"abc" + bytes(5) and not (tgt / "d").is_symlink()
        assert (tgt / "s").read_bytes() == b"" and not (tgt / "s").is_symlink()
        assert outside.read_bytes() == b"not ours"
    finally:
        ap.close()
        os.close(fd)


def test_an_agent_takes_the_older_wire_version_and_names_one_it_does_not_know(tmp_path):
    """Wire version 2 added "put": an agent still serves a version-1 source (which never sends
    one); a source newer than the agent is refused with both versions named."""
    import io
    import json
    from app.engine.agent import Agent, AgentError
    from app.services import wire
    for version in wire.ACCEPTED:
        out = io.BytesIO()
        Agent(str(tmp_path), None, out).hello({"version": version, "action": "test"})
        kind, payload = wire.read_frame(io.BytesIO(out.getvalue()).read)
        assert kind == wire.WELCOME and json.loads(payload)["version"] == wire.VERSION == 2
    with pytest.raises(AgentError, match="source speaks wire version 3, this agent 2") as exc:
        Agent(str(tmp_path), None, io.BytesIO()).hello({"version": 3, "action": "test"})
    assert exc.value.code == "version"


def _far_target(side: str):
    """What a walk asks across a session, without the session: a RemoteTarget (the source
    asks its agent) or an agent's Reverse (a fail-back asks the old source). A test sets
    `far.queries._send` (the REQ going out)."""
    from types import SimpleNamespace
    from app.engine import remote
    from app.engine.agent import Reverse
    from app.services.targets import Settings
    if side == "agent":
        return Reverse(SimpleNamespace(replica=SimpleNamespace(kind="fs")))
    far = remote.RemoteTarget(Settings("far", "far.example", "/srv"), "fs", None, None)
    if side == "hashed":  # an agent whose listings can bring their files' hashes
        far.welcome = {"features": ["hashed-listings"]}
    return far


def test_a_catch_up_is_announced_only_to_an_agent_that_says_it_knows_how():
    """MARK {"begin": true} makes the replica inconsistent while a catch-up runs. An agent of
    before it reads a MARK's seq, and would end the session: it is told only after a WELCOME
    whose features name "catch-up-marks"."""
    import io
    import json
    from app.services import wire
    far = _far_target("source")
    sent = []
    far._send = sent.append
    far.begin_catch_up()
    assert sent == []
    far.welcome = {"features": ["hashed-listings", "catch-up-marks"]}
    far.begin_catch_up()
    [(kind, payload)] = [wire.read_frame(io.BytesIO(f).read) for f in sent]
    assert kind == wire.MARK and json.loads(payload) == {"begin": True}
    assert "catch-up-marks" in wire.FEATURES


def test_a_catch_ups_end_is_said_again_to_the_next_session_until_the_agent_says_consistent():
    """mark_consistent() went once: a session that ended before the agent read it left the
    replica inconsistent until the next catch-up. It is said again after each WELCOME of an
    agent that knows "mark-again", until an answer says consistent at or past it; a new
    catch-up forgets it. (Over ssh, with the session killed under it: tests/test_remote.py.)"""
    import io
    import json
    from app.services import wire
    far = _far_target("source")
    far.welcome = {"features": ["catch-up-marks", "mark-again"]}
    sent = []
    far._send = lambda f: sent.append(json.loads(wire.read_frame(io.BytesIO(f).read)[1]))
    far.begin_catch_up()
    far.mark_consistent(7)
    far._positions({"received": 7, "applied": 5, "consistent": False})
    far._say_mark_again()
    far._positions({"received": 7, "applied": 6, "consistent": True})  # from before the MARK
    far._say_mark_again()
    far._positions({"received": 7, "applied": 7, "consistent": True})
    far._say_mark_again()
    far.mark_consistent(9)
    far.begin_catch_up()
    far._say_mark_again()
    again = {"seq": 7, "again": True}
    assert sent == [{"begin": True}, {"seq": 7}, again, again, {"seq": 9}, {"begin": True}]
    assert "mark-again" in wire.FEATURES
    far.mark_consistent(11)
    far.welcome = {"features": ["catch-up-marks"]}  # an agent of before: not told again (and
    far._say_mark_again()  # status stops saying that the target applies it)
    assert sent[-1] == {"seq": 11} and far.pending_mark is None


def test_records_dropped_for_a_catch_up_are_said_gone_before_its_marks_never_after():
    """Records dropped unsent for a catch-up (request_catch_up) were said gone (SKIP) only
    with the next records the shipper sent, while the catch-up's MARKs went at once from
    its walk: a SKIP that came after the end MARK made the agent forget it, and the replica
    stayed inconsistent for good (status "catching up (the target applies the rest)"; seen
    once in CI, test_failover). The catch-up's begin says them gone first now; a batch read
    before the drop may still go (the agent drops it as held) and asks no SKIP again."""
    import io
    import json

    from app.engine.journal import KIND_FS
    from app.services import wire
    far = _far_target("source")
    far.welcome = {"features": ["catch-up-marks", "mark-again"]}
    far._failure = far._gap = far.paused = far._rewind = None
    far._expect = 4  # the agent holds records up to 3
    sent = []

    def out(parts):
        kind, payload = wire.read_frame(io.BytesIO(b"".join(bytes(p) for p in parts)).read)
        sent.append((wire.NAMES[kind], json.loads(payload) if kind != wire.DATA else None))
        with far._cv:  # acknowledged at once (the window never fills)
            far._inflight.clear()
            far._inflight_bytes = 0
    far._send_parts = out

    def rec(seq):
        return Record(seq, KIND_FS, "mkdir", {"path": f"d{seq}", "mode": 0o755})
    far.begin_catch_up(7)  # records 4..7 were dropped for it
    far.send([rec(5), rec(6)])  # read by the shipper before the drop
    far.send([rec(8), rec(9)])  # the walk's
    far.mark_consistent(9)
    far.send([rec(10)])
    assert sent == [("SKIP", {"through": 7}), ("MARK", {"begin": True}), ("DATA", None),
                    ("DATA", None), ("MARK", {"seq": 9}), ("DATA", None)], sent
    sent.clear()
    far.begin_catch_up(7)  # nothing dropped since: said once
    far.send([rec(12)])  # dropped after the begin (a catch-up asked meanwhile): said with it
    assert sent == [("MARK", {"begin": True}), ("SKIP", {"through": 11}), ("DATA", None)], sent


@pytest.mark.parametrize("damage", ["garbage{", "[1]", "symlink"])
def test_a_damaged_replica_state_is_named_not_a_traceback_and_the_others_still_listed(
        tmp_path, damage):
    """One replica's state.json that is not a JSON object (a damaged disk, a hand edit, a
    symbolic link): `replica list` ended in a traceback (JSONDecodeError, or AttributeError on
    a list, or ELOOP without a name) and listed nothing, and so did `target test` (its answer
    sums every replica's journal) and `replica remove`; a session for that replica raised out
    of its hello. Now the list names it by its ID and file, the others are listed, and a
    session is refused naming the file (EUCLEAN; ELOOP kept), the file left as it was."""
    import json
    import threading

    from app.engine import agent as agent_mod
    from app.engine.agent import Agent, journal_space, list_replicas, replica_id, replica_line
    from app.services import wire
    root = tmp_path / "root"
    books = root / ".mirrorsetup" / "replicas"
    for name in ("data", "good"):
        (books / replica_id(name)).mkdir(parents=True)
    (books / replica_id("good") / "state.json").write_text(json.dumps({"path": "good", "kind": "fs"}))
    bad = books / replica_id("data") / "state.json"
    if damage == "symlink":
        bad.symlink_to(tmp_path / "elsewhere.json")
        (tmp_path / "elsewhere.json").write_text("{}")
    else:
        bad.write_text(damage)
    listed = {r["id"]: r for r in list_replicas(str(root))}
    assert listed[replica_id("good")]["name"] == "good"
    damaged = listed[replica_id("data")]
    said = replica_line(damaged)
    assert said.startswith(f"replica {replica_id('data')}: its state file {bad} ") and \
        ("could not be read: Too many levels of symbolic links (ELOOP)" if damage == "symlink"
         else "is damaged (not") in said, said
    assert damaged["errno"] == (errno.ELOOP if damage == "symlink" else errno.EUCLEAN)
    assert journal_space(str(root))["journal_pending_bytes"] == 0
    for action in ("replicate", "probe"):  # (probe: a fail-back's question, read only)
        to_agent, from_agent = os.pipe(), os.pipe()
        out = os.fdopen(from_agent[0], "rb", buffering=0)
        agent = Agent(str(root), os.fdopen(to_agent[0], "rb", buffering=0),
                      os.fdopen(from_agent[1], "wb", buffering=0))
        ran = threading.Thread(target=agent.run)
        heartbeat, agent_mod.HEARTBEAT_TIMEOUT = agent_mod.HEARTBEAT_TIMEOUT, 24 * 3600.0
        ran.start()
        try:
            wire.skip_to_greeting(out.read)
            os.write(to_agent[1], wire.jframe(wire.HELLO, {
                "version": wire.VERSION, "action": action, "path": "data", "kind": "fs",
                "source": {"host": "h", "entry": "/e"}, "generation": "g1", "compression": "zstd"}))
            kind, payload = wire.read_frame(out.read)
            msg = json.loads(payload)
            assert kind == wire.ERROR and msg["code"] == "state", (action, msg)
            assert f"replica data: its state file {bad} " in msg["message"] and msg["message"] \
                .endswith(": nothing was changed") and msg["errno"] == damaged["errno"], (action, msg)
        finally:
            os.close(to_agent[1])
            ran.join(30)
            agent_mod.HEARTBEAT_TIMEOUT = heartbeat
            out.close()
        assert not ran.is_alive()
    assert bad.is_symlink() if damage == "symlink" else bad.read_text() == damage


def _agent_session(tmp_path, frames, until_applied: int, waited: list | None = None
                   ) -> tuple[dict, dict]:
    """An agent replicating "data" under tmp_path/root, fed `frames` after its WELCOME: the
    first ACK that says records up to `until_applied` are applied (said after the agent's
    check for consistency), and the replica's saved state after the session's end. An int
    among the frames: wait there for the ACK that says that seq is applied; how long each
    such wait took is appended to `waited`."""
    import json
    import threading
    from app.engine import agent as agent_mod
    from app.engine.agent import Agent, Replica
    from app.services import wire
    (tmp_path / "root").mkdir(exist_ok=True)
    to_agent, from_agent = os.pipe(), os.pipe()
    rfile, wfile = os.fdopen(to_agent[0], "rb", buffering=0), os.fdopen(from_agent[1], "wb", buffering=0)
    out = os.fdopen(from_agent[0], "rb", buffering=0)
    agent = Agent(str(tmp_path / "root"), rfile, wfile)
    ran = threading.Thread(target=agent.run)
    ran.start()
    # The agent's watchdog ends a silent session with os._exit(3): in here that would end the
    # whole test run, with no report. A session that stalls fails by pytest-timeout instead.
    heartbeat, agent_mod.HEARTBEAT_TIMEOUT = agent_mod.HEARTBEAT_TIMEOUT, 24 * 3600.0
    try:
        wire.skip_to_greeting(out.read)
        hello = {"version": wire.VERSION, "action": "replicate", "path": "data", "kind": "fs",
                 "source": {"host": "h", "entry": "/e"}, "generation": "g1", "compression": "zstd"}
        os.write(to_agent[1], wire.jframe(wire.HELLO, hello))
        assert wire.read_frame(out.read)[0] == wire.WELCOME
        def applied(seq: int) -> dict:
            while True:
                kind, payload = wire.read_frame(out.read)
                msg = json.loads(payload)
                if kind == wire.ACK and msg["applied"] >= seq:
                    return msg
        msg = None
        for frame in frames:
            if isinstance(frame, int):
                t0 = time.monotonic()
                msg = applied(frame)
                if waited is not None:
                    waited.append(time.monotonic() - t0)
            else:
                os.write(to_agent[1], frame)
                msg = None
        if msg is None or msg["applied"] < until_applied:
            msg = applied(until_applied)
        os.close(to_agent[1])
        ran.join(30)
        fd = os.open(tmp_path / "root", os.O_PATH | os.O_DIRECTORY)
        try:
            return msg, Replica(fd, str(tmp_path / "root"), "data", "fs").state()
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            os.close(to_agent[1])
        ran.join(30)
        for t in threading.enumerate():  # its applier ends at its next turn (stop is set)
            if "_apply_loop" in t.name:
                t.join(10)
        for f in (rfile, wfile, out):
            f.close()
        agent_mod.HEARTBEAT_TIMEOUT = heartbeat


def _data_frame(*recs) -> bytes:
    from app.services import wire
    parts = [p for r in recs for p in r.encode_parts()]
    return b"".join(wire.frame_parts(wire.DATA, wire.Codec("zstd").pack_parts(parts, sum(map(len, parts)))))


def _mkdir(seq: int, name: str) -> Record:
    return Record(seq, KIND_FS, "mkdir", {"path": name, "mode": 0o755, "uid": 0, "gid": 0})


def test_an_agent_told_records_never_come_forgets_the_catch_ups_end_it_was_told(tmp_path):
    """MARK {seq} then SKIP (the source lost records, a resync follows): the agent kept the
    mark, and once it had applied past it (the skipped seqs count as released) it called the
    replica consistent before the resync had run; a fail-over would have promoted it. The
    same MARK said again to a new session after the SKIP is not taken either."""
    from app.services import wire
    ack, state = _agent_session(tmp_path, [
        wire.jframe(wire.MARK, {"begin": True}), _data_frame(_mkdir(1, "a"), _mkdir(2, "b")),
        wire.jframe(wire.MARK, {"seq": 5}), wire.jframe(wire.SKIP, {"through": 10}),
        wire.jframe(wire.MARK, {"seq": 5, "again": True}),
        _data_frame(_mkdir(11, "c"), _mkdir(12, "d"))], until_applied=12)
    assert ack["consistent"] is False, ack
    assert state["consistent"] is False and "mark_seq" not in state, state
    assert {"c", "d"} <= set(os.listdir(tmp_path / "root" / "data"))


def test_a_catch_ups_end_said_again_makes_the_replica_consistent_once_applied(tmp_path):
    """The first MARK {seq} was lost with its session: the one said again is taken while
    that catch-up is still the replica's last word."""
    from app.services import wire
    ack, state = _agent_session(tmp_path, [
        wire.jframe(wire.MARK, {"begin": True}), _data_frame(_mkdir(1, "a"), _mkdir(2, "b")),
        wire.jframe(wire.MARK, {"seq": 2, "again": True})], until_applied=2)
    assert ack["consistent"] is True and state["consistent"] is True, (ack, state)
    assert "catching_up" not in state and "mark_seq" not in state, state


def test_an_agent_acknowledges_a_burst_as_applied_without_an_idle_wait(tmp_path, monkeypatch):
    """A burst applied within APPLY_SYNC_MIN_SECONDS of the last flush was flushed and said
    applied only after the applier's idle wait for more records (0.2 s): the initial mirrors
    of bench/remote.py ended up to 0.2 s late in some runs. Here the idle wait is made
    long (4 s) and the minimum between flushes 0.3 s: each burst, sent right after the
    previous one was acknowledged, must be acknowledged once that minimum has passed."""
    from app.engine import agent
    monkeypatch.setattr(agent, "APPLY_IDLE_WAIT", 4.0)
    monkeypatch.setattr(agent, "APPLY_SYNC_MIN_SECONDS", 0.3)
    waited: list[float] = []
    _agent_session(tmp_path, [
        _data_frame(_mkdir(1, "a")), 1, _data_frame(_mkdir(2, "b")), 2,
        _data_frame(_mkdir(3, "c")), 3], until_applied=3, waited=waited)
    assert max(waited[1:]) < 3.0, waited  # 4 s and more when the applier waits idle first
    assert {"a", "b", "c"} <= set(os.listdir(tmp_path / "root" / "data"))


def test_an_acknowledgement_shows_in_the_shippers_figures_as_it_arrives(tmp_path):
    """Status reads received/applied from the shipper's figures, which its own thread set once
    a turn: idle, a turn is a read that waits 0.1 s for records, so an acknowledgement of the
    agent's showed up to that late (every mirror's end; the steady writer's lag). Here that
    read is made to wait 5 s, and an ACK frame comes through the real RemoteTarget reader:
    the figures must say it well before the shipper's next turn."""
    import threading
    from types import SimpleNamespace
    from app.engine.remote import RemoteTarget
    from app.engine.shipper import Shipper
    from app.services import wire
    from app.services.targets import Settings
    j = Journal(tmp_path / "j", kind=KIND_FS)
    idle = [5.0]
    read = j.read
    j.read = lambda *a, **kw: read(*a, **{**kw, "timeout": idle[0]})
    rt = RemoteTarget(Settings(name="t", host="h", root="/r", path="p"), "fs", None, None)
    sent: list[int] = []
    r, w = os.pipe()
    rt.proc = SimpleNamespace(stdout=os.fdopen(r, "rb", buffering=0), poll=lambda: None,
                              stdin=SimpleNamespace(close=lambda: None), wait=lambda timeout=None: 0)
    rt.open = lambda: rt.pos
    rt.send = lambda recs: sent.extend(x.seq for x in recs) or 0
    rt.close = lambda: None
    sh = Shipper(j, rt, local=False)
    reader = threading.Thread(target=rt._read_loop, args=(rt.proc,), daemon=True)
    sh.start()
    try:
        j.append("mkdir", {"path": "a", "mode": 0o755, "uid": 0, "gid": 0})
        deadline = time.monotonic() + 10
        while not sent:
            assert time.monotonic() < deadline, "the shipper never sent the record"
            time.sleep(0.01)
        time.sleep(0.2)  # the shipper's turn is over: it waits in its (5 s) read now
        reader.start()
        os.write(w, wire.jframe(wire.ACK, {"received": 1, "applied": 1, "consistent": True}))
        t0 = time.monotonic()
        while sh.fig.applied_seq < 1 and time.monotonic() - t0 < 3:
            time.sleep(0.01)
        assert (sh.fig.received_seq, sh.fig.applied_seq) == (1, 1), sh.fig
    finally:
        idle[0] = 0.1
        j.append("mkdir", {"path": "b", "mode": 0o755, "uid": 0, "gid": 0})  # ends that read
        sh.stop()
        os.close(w)
        reader.join(5)
        rt.proc.stdout.close()
        j.close()


@pytest.mark.parametrize("side", ["source", "hashed", "agent"])
def test_a_walk_asks_the_other_end_a_window_ahead_and_leaves_nothing_asked(tmp_path, monkeypatch,
                                                                            side):
    """Over a long link a walk waited one round trip per directory, and one per file compared
    by hashes: a directory's children's queries now go a window ahead of the walk (in its
    order, topped up as it goes; a subdirectory's own go out while its parent's wait), and
    what was asked and not used is dropped. The same for the source's walk against its agent
    and for a fail-back's walk (on the agent) against the old source, which asked one query at
    a time. With an agent whose listings bring the hashes of their files ("hashed"), a walk
    comparing every file by hashes asks no file's hashes at all. Only the transport is
    replaced, to see which query was asked when; the answers are the agent's own (and the old
    source's in a fail-back). The walks over ssh run in tests/test_remote.py and
    tests/test_failover.py."""
    import shutil
    from types import SimpleNamespace
    from app.engine import remote
    from app.engine.agent import Agent
    from app.services import wire
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    for d in range(6):
        (src / f"d{d}" / "sub").mkdir(parents=True)
        for f in range(5):
            (src / f"d{d}" / f"f{f}").write_bytes(b"%d-%d" % (d, f) * 100)
    shutil.copytree(src, tgt)
    (tgt / "d3" / "f2").write_bytes(b"X" * len((src / "d3" / "f2").read_bytes()))  # differs
    (tgt / "d4" / "f0").unlink()
    monkeypatch.setattr(sync, "AHEAD_PER_DIRECTORY", 2)
    monkeypatch.setattr(wire, "AHEAD_WINDOW", 8)
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    src_fd = os.open(src, os.O_PATH | os.O_DIRECTORY)
    local = LocalDirTarget.on_fd(fd, str(tgt))
    far = _far_target(side)
    asked_when_needed, most_ahead = [], [0]

    def send(req):  # the other end's answer, at once (as of the moment it was asked)
        most_ahead[0] = max(most_ahead[0], len(far.queries._ahead) + 1)
        events.append(("asked", req["method"], req["args"]["rel"]))
        hashed_asks.append(bool(req["args"].get("hashes")))
        if side == "agent":  # the old source answers a fail-back's walk
            far.queries.answer(remote._answer(local, req))
        else:
            far.queries.answer({"id": req["id"], "result": Agent.answer(
                SimpleNamespace(target=local, root=str(tgt)), req["method"], req["args"])})
    hashed_asks: list[bool] = []
    left_unused: list[int] = []
    if side == "hashed":
        real_by_hashes = far.compare_by_hashes

        def by_hashes(on):
            if not on:
                left_unused.append(len(far._hash_lists))
            real_by_hashes(on)
        far.compare_by_hashes = by_hashes
    far.queries._send = send
    events: list[tuple[str, str, str]] = []
    real_children = far.children
    far.children = lambda rel: (events.append(("used", "children", os.fsdecode(rel))),
                                real_children(rel))[1]
    real_call = far.queries.call
    far.queries.call = lambda method, **args: (asked_when_needed.append((method, args["rel"])),
                                               real_call(method, **args))[1]
    try:
        counts = sync.Reconciler(src_fd, far, sync.DirectSink(local), hashes=True).run()
    finally:
        os.close(src_fd)
        os.close(fd)
    # the root's own, and nothing else: every other listing and hash list went ahead
    assert asked_when_needed == [("info", ""), ("children", "")]
    # two a directory beyond where the walk is there, three levels deep at most: six
    assert (1 if side == "hashed" else 2) < most_ahead[0] <= 6
    assert far.queries._ahead == {} and far.queries._answers == {}  # nothing asked and left
    hash_queries = [e for e in events if e[1] == "file_hashes"]
    if side == "hashed":  # every listing asked for its files' hashes, and no file was asked
        assert hash_queries == [] and all(hashed_asks[1:]), events
        assert left_unused == [0]  # every hash list that came with a listing was used
    else:  # every file there is compared: 29 (one of the 30 is missing there)
        assert len(hash_queries) == 29 and not any(hashed_asks), events
    # a subdirectory's listing went out before its parent's was used: entering the parent,
    # the walk did not wait a round trip for it (it was asked only then)
    for d in range(6):
        assert (events.index(("asked", "children", f"d{d}/sub"))
                < events.index(("used", "children", f"d{d}"))), events
    assert counts["copied"] == 2
    assert (tgt / "d3" / "f2").read_bytes() == (src / "d3" / "f2").read_bytes()
    assert (tgt / "d4" / "f0").read_bytes() == (src / "d4" / "f0").read_bytes()


@pytest.mark.parametrize("side", ["source", "agent"])
def test_a_query_whose_answer_cannot_come_is_not_waited_for(side):
    """A walk's query asked ahead, then its session ends: the source's shipper opens the next
    session (the answer will never come: the walk waited 300 s for it), or on the agent the
    old source went away during a fail-back. The walk is told so at once."""
    import threading
    import time
    from app.engine.agent import AgentError
    from app.engine.shipper import TargetUnavailable
    far = _far_target(side)
    far.queries._send = lambda req: None  # sent; its answer never comes
    assert far.ask_ahead("children", b"d")
    got: list = []

    def walk():
        try:
            far.children(b"d")
        except (TargetUnavailable, AgentError) as exc:
            got.append(exc)
    t = threading.Thread(target=walk, daemon=True)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()  # waiting for its answer
    if side == "source":
        far.queries.new_session()  # as open() does for the next session
    else:
        far.reply(None)  # as the agent's reader does when the source's stream ends
    t.join(5)
    assert not t.is_alive()
    assert ("a session that ended" if side == "source" else "went away") in str(got[0])
    assert type(got[0]) is (TargetUnavailable if side == "source" else AgentError)
    if side == "source":
        assert far.queries._ahead == {}


def test_a_fail_back_to_a_source_of_wire_version_1_sends_no_put(tmp_path, monkeypatch):
    """An agent serves a version-1 source, and in a fail-back the agent's walk writes to that
    source: it sends a small file as the five records version 1 knows, not as "put"."""
    import io
    from types import SimpleNamespace
    from app.engine import agent as agent_mod
    made: list[dict] = []
    real = sync.Reconciler

    class Seen(real):
        def __init__(self, *args, **kw):
            made.append(kw)
            super().__init__(*args, **kw)
    monkeypatch.setattr(sync, "Reconciler", Seen)
    src, there = tmp_path / "replica", tmp_path / "source"
    src.mkdir()
    there.mkdir()
    (src / "f").write_bytes(b"data")
    fd, there_fd = os.open(src, os.O_PATH | os.O_DIRECTORY), os.open(there, os.O_PATH | os.O_DIRECTORY)
    source = LocalDirTarget.on_fd(there_fd, str(there))
    ops: list[str] = []
    try:
        for version, expected in ((1, ["remove", "create", "write", "truncate", "times"]), (2, ["put"])):
            agent = agent_mod.Agent(str(tmp_path), None, io.BytesIO())
            agent.hello({"version": version, "action": "test"})
            agent.replica, agent.target = SimpleNamespace(kind="fs"), SimpleNamespace(fd=fd)
            back = agent_mod.Reverse(agent)
            # the source answers: its root is there, nothing below it (the file is new there)
            back.queries.call = lambda method, **args: (source.info(b"").to_wire()
                                                        if method == "info" else None)
            back.apply_ops = lambda batch: ops.extend(op for op, a, _d in batch if a.get("path") == "f")
            del ops[:]
            back.run()
            assert ops == expected, version
            assert made[-1]["put"] is (version >= 2)
    finally:
        os.close(fd)
        os.close(there_fd)


def test_an_agent_answers_a_few_queries_at_a_time_and_every_one(tmp_path, monkeypatch):
    """A walk sends up to a thousand queries ahead of itself: the agent answers them with
    QUERY_THREADS threads (it started a thread for each, all reading at once), and each gets
    its answer."""
    import io
    import json
    import threading
    import time
    from app.engine import agent as agent_mod
    from app.services import wire
    out = io.BytesIO()
    agent = agent_mod.Agent(str(tmp_path), None, out)
    busy, most, lock = [0], [0], threading.Lock()

    def answer(method, args):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        time.sleep(0.01)
        with lock:
            busy[0] -= 1
        return args["n"]
    monkeypatch.setattr(agent, "answer", answer)
    for n in range(100):
        agent.ask({"id": n, "method": "info", "args": {"n": n}})
    deadline = time.monotonic() + 20
    while (agent._queries or agent._query_threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    read, got = io.BytesIO(out.getvalue()).read, {}
    while (frame := wire.read_frame(read)) is not None:
        rep = json.loads(frame[1])
        got[rep["id"]] = rep["result"]
    assert got == {n: n for n in range(100)}
    assert 1 < most[0] <= agent_mod.QUERY_THREADS and agent._query_threads == 0


HOLDER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from app.engine.agent import Replica
root = sys.argv[2]
fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
Replica(fd, root, "data", "fs").lock({"host": "h", "entry": "/e"}, sys.argv[3])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_replication_session_waits_for_its_sources_fail_over_session(tmp_path, monkeypatch):
    """The capture's reconnect ended a `replica resolve` of the same source in the middle (its
    agent took the other for a stale session of its own and signalled it: ssh exited with
    status 255; seen once in a busy-host run). A replication session now waits for a fail-over
    session of its source and is then refused as busy (its capture tries again); a fail-over
    session still ends a replication session, and another source is still refused by name."""
    import subprocess
    import sys
    from pathlib import Path
    from app.engine import agent as agent_mod
    repo = str(Path(__file__).resolve().parent.parent)
    monkeypatch.setattr(agent_mod, "TAKE_OVER_SECONDS", 1.0)
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    source = {"host": "h", "entry": "/e"}
    holders = []

    def holder(action):  # an agent process ("serve-target" in its command line) holding the lock
        p = subprocess.Popen([sys.executable, "-c", HOLDER, repo, str(tmp_path), action, "serve-target"],
                             stdout=subprocess.PIPE, text=True)
        holders.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p
    try:
        resolving = holder("discard")
        with pytest.raises(agent_mod.AgentError, match="busy with a discard of this source") as exc:
            agent_mod.Replica(fd, str(tmp_path), "data", "fs").lock(source, "replicate")
        assert exc.value.code == "busy" and resolving.poll() is None  # not ended
        with pytest.raises(agent_mod.AgentError, match="another source"):
            agent_mod.Replica(fd, str(tmp_path), "data", "fs").lock({"host": "other", "entry": "/e"})
        resolving.kill()
        resolving.wait()
        replicating = holder("replicate")
        mine = agent_mod.Replica(fd, str(tmp_path), "data", "fs")
        mine.lock(source, "discard")  # takes over
        assert replicating.wait(10) == -15  # the stale replication session was ended (SIGTERM)
        os.close(mine.lock_fd)
    finally:
        for p in holders:  # closed here, not when collected (a later test counts our fds)
            p.kill()
            p.wait()
            p.stdout.close()
        os.close(fd)


def test_no_textual_or_fuse_import_for_the_client():
    import subprocess
    import sys
    code = "import sys, app.services.control; assert 'textual' not in sys.modules and 'pyfuse3' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("n", [1, 3])
def test_discard_through_after_a_resync(tmp_path, n):
    j = Journal(tmp_path, memory_bytes=10)
    for i in range(n):
        j.append("write", {"path": "f", "offset": i}, b"zz")
    j.discard_through(j.last_seq)
    assert j.read(10) == [] and j.released_seq == j.last_seq == n and j.queued_bytes == 0
    assert Journal(tmp_path).released_seq == n
    assert not list(tmp_path.glob("*.seg"))


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


def test_concurrent_append_spill_read_release_loses_nothing_and_never_stalls(tmp_path):
    """The take-over livelock: releasing (and deleting segments) raced the capture's spills.
    The same stress against the old journal (take/applied/persist_applied outside the lock)
    failed three ways in three runs: EBADF, a reader stuck with no segment files left while
    records were said to be on disk, and skipped seqs. Every record must arrive once, in order."""
    import threading
    import time
    n = 60_000
    j = Journal(tmp_path, memory_bytes=0, segment_bytes=4096)  # every record spills, tiny segments
    errors: list[BaseException] = []

    def writer():
        try:
            for i in range(n):
                j.append("write", {"offset": i}, b"x" * 100)
                if i % 3 == 0:
                    j.sync()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
    t = threading.Thread(target=writer)
    t.start()
    last, idle_since, rounds = 0, time.monotonic(), 0
    while last < n:
        batch = j.read(256, timeout=0.1)
        if batch:
            assert [r.seq for r in batch] == list(range(last + 1, last + 1 + len(batch)))
            last = batch[-1].seq
            idle_since = time.monotonic()
            j.release(last, persist=rounds % 7 == 0)
            rounds += 1
        else:
            assert not errors, errors
            assert time.monotonic() - idle_since < 30, f"no progress at seq {last} of {n}"
    t.join()
    assert not errors, errors
    assert j.released_seq == n and j.queued_bytes == 0
    assert len(list(tmp_path.glob("*.seg"))) <= 1  # released segments are gone


def test_a_journal_gap_found_as_the_capture_ends_is_logged_not_a_traceback(caplog):
    """The shipper found a hole in the journal just as the capture's trio run ended (helper-40
    saw it at a test's teardown: `trio.RunFinishedError: run() has exited` from the shipper's
    thread). The resync cannot be asked for any more; the next capture catches up, and says so."""
    import logging

    import trio

    from app.engine.capture import Capture
    from app.engine.journal import JournalGap

    async def token():
        return trio.lowlevel.current_trio_token()
    ended = type("Ended", (), {"token": trio.run(token), "request_catch_up": None})()
    with caplog.at_level(logging.INFO, logger="mirrorsetup.capture"):
        Capture._on_gap(ended, JournalGap(5, 9))
    assert "the next capture catches up" in caplog.text, caplog.text


def test_rewind_resends_from_the_targets_position(tmp_path):
    j = Journal(tmp_path, memory_bytes=300, segment_bytes=1000)  # half in memory, half on disk
    for i in range(40):
        j.append("write", {"offset": i}, b"y" * 20)
    first = j.read(25)
    assert [r.seq for r in first] == list(range(1, 26))
    j.release(10)
    j.rewind(10)  # a reconnect: the target holds 1..10 durably, 11.. are sent again
    again = j.read(100)
    assert [r.seq for r in again] == list(range(11, 41))
    with pytest.raises(JournalGap):
        j.rewind(5)  # 6..10 are gone: only a resync can bring them back


def test_a_hole_on_disk_is_a_gap_never_skipped(tmp_path):
    j = Journal(tmp_path, memory_bytes=0, segment_bytes=500)
    for i in range(30):
        j.append("write", {"offset": i}, b"z" * 40)
    j.close()
    segs = _segments(tmp_path)
    assert len(segs) >= 3
    segs[1].unlink()  # records lost in the middle
    j2 = Journal(tmp_path)
    assert j2.gap is not None
    got = []
    with pytest.raises(JournalGap) as exc:
        while batch := j2.read(10):
            got += batch
    assert [r.seq for r in got] == list(range(1, len(got) + 1))
    assert exc.value.expected == len(got) + 1


def test_queue_limit_pull_ahead_stops_storing_and_says_so(tmp_path):
    j = Journal(tmp_path, limit_bytes=10_000, on_full="pull-ahead")
    stored = [j.append("write", {"offset": i}, b"w" * 1000) for i in range(30)]
    assert 0 in stored and j.behind and j.dropped == stored.count(0)
    assert stored[:5] == [1, 2, 3, 4, 5]
    assert j.queued_bytes <= 10_000
    assert j.append("write", {"offset": 99}, b"q") == 0  # still behind until a resync begins
    j.read(100)
    j.release(j.last_seq)
    last = j.catch_up_from_behind()
    assert not j.behind and j.append("write", {"offset": 1}, b"r") == last + 1


def test_queue_limit_block_makes_writers_wait(tmp_path):
    import threading
    j = Journal(tmp_path, limit_bytes=5_000, on_full="block")
    for i in range(4):
        j.append("write", {"offset": i}, b"b" * 1000)
    done = threading.Event()
    t = threading.Thread(target=lambda: (j.append("write", {"offset": 9}, b"b" * 1000), done.set()))
    t.start()
    assert not done.wait(0.5)  # the writer waits for room
    j.read(10)
    j.release(4)
    assert done.wait(10) and j.last_seq == 5 and not j.behind
    t.join()


@pytest.mark.root
def test_a_full_disk_never_leaves_a_torn_or_half_ingested_journal(tmp_path, tmpfs_mount):
    """The agent's ingest is all or nothing: ENOSPC in the middle leaves the journal as it was
    (no torn record that would stop the reader later), and it goes on once there is room."""
    from app.engine.journal import Record
    small = tmpfs_mount(tmp_path / "small")
    subprocess.run(["mount", "-o", "remount,size=1m", str(small)], check=True)
    j = Journal(small, segment_bytes=200_000)
    seq = 0

    def batch(n: int, size: int) -> list[Record]:
        nonlocal seq
        out = []
        for _ in range(n):
            seq += 1
            out.append(Record(seq, 1, "write", {"offset": seq}, b"d" * size))
        return out
    assert j.ingest_durably(batch(4, 100_000)) == 4
    with pytest.raises(OSError) as exc:
        j.ingest_durably(batch(20, 100_000))  # runs out of room part way
    assert exc.value.errno == errno.ENOSPC
    assert j.last_seq == 4
    seq = 4
    got = j.read(100)
    assert [r.seq for r in got] == [1, 2, 3, 4]
    j.release(4)  # applied: the space comes back
    assert j.ingest_durably(batch(3, 100_000)) == 7
    assert [r.seq for r in j.read(100)] == [5, 6, 7]
    j.close()
    assert Journal(small).torn_bytes == 0


def test_a_spill_of_more_pieces_than_one_writev_takes_writes_every_record_whole(tmp_path):
    """A spill writes each record's pieces (header, head, data) without joining them first,
    IOV_MAX pieces per writev: 2,000 records (6,000 pieces) land exactly as their encodings,
    in order, and a reopened journal reads them all back."""
    from app.engine.journal import IOV_MAX
    j = Journal(tmp_path, segment_bytes=1 << 20)
    for i in range(2000):
        j.append("write", {"path": "f", "offset": i}, b"%d" % i * (i % 7))
    assert 3 * 2000 > 2 * IOV_MAX
    expected = b"".join(r.encode() for r in j.read(5000))
    j.rewind(0)
    j.sync()
    assert b"".join(s.read_bytes() for s in _segments(tmp_path)) == expected
    j.close()
    again = Journal(tmp_path, segment_bytes=1 << 20)
    got = again.read(5000)
    assert [(r.seq, r.args["offset"], r.data) for r in got] == \
        [(i + 1, i, b"%d" % i * (i % 7)) for i in range(2000)]
    again.close()


def test_an_fsyncs_spill_is_one_write_and_the_reader_gets_what_it_had_not_read_from_memory(
        tmp_path, monkeypatch):
    """An application's fsync writes the records in memory to disk: one write(v) for the lot
    (not one per record), exactly their encoded bytes. What the reader (applier, shipper)
    had not read yet stays in memory too, so it is not read back from disk and decoded;
    after a rewind past that, it comes from disk, the same records."""
    j = Journal(tmp_path, segment_bytes=1 << 20)
    for i in range(50):
        j.append("write", {"path": "f", "offset": i}, b"%d" % i)
    first = j.read(10)  # 1..10 read from memory before the spill
    seg_writes, disk_reads = [], []
    real_write, real_writev, real_read_disk = os.write, os.writev, Journal._read_disk

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".seg"):
            seg_writes.append(len(data))
        return real_write(fd, data)

    def writev(fd, pieces):  # the records' pieces as they are, not joined into a copy first
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".seg"):
            seg_writes.append(sum(map(len, pieces)))
        return real_writev(fd, pieces)
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "writev", writev)
    monkeypatch.setattr(Journal, "_read_disk", lambda self, *a: (disk_reads.append(1), real_read_disk(self, *a)))
    j.sync()
    assert len(seg_writes) == 1
    rest = j.read(1000)
    assert [r.seq for r in first + rest] == list(range(1, 51)) and disk_reads == []
    assert b"".join(s.read_bytes() for s in _segments(tmp_path)) == b"".join(r.encode() for r in first + rest)
    j.rewind(5)
    assert j.read(1000) == first[5:] + rest and disk_reads
    j.close()


def test_a_spill_that_finds_the_disk_full_keeps_what_it_did_not_store(tmp_path, tmpfs_mount):
    """ENOSPC part way through an fsync's spill: the records that reached a segment are on
    disk, the rest stay queued in memory, none torn or lost, in order, and the fsync is not
    failed for it (the application's own data is on its disk); with room again the next sync
    stores them."""
    small = tmpfs_mount(tmp_path / "small")
    subprocess.run(["mount", "-o", "remount,size=1m", str(small)], check=True)
    j = Journal(small, segment_bytes=200_000)
    for i in range(20):  # 2 MB in memory, 1 MB of room
        j.append("write", {"path": "f", "offset": i}, b"d" * 100_000)
    assert j.sync() == 20
    assert "(No space left on device, ENOSPC" in j.full_error, j.full_error
    got = j.read(100, max_bytes=1 << 30)
    assert [r.seq for r in got] == list(range(1, 21))
    assert [r.args["offset"] for r in got] == list(range(20))
    j.release(20)  # applied: the space comes back
    j.append("write", {"path": "f", "offset": 20}, b"e")
    j.sync()
    assert [r.seq for r in j.read(100)] == [21] and j.full_error is None
    j.close()
    again = Journal(small)  # 21 was never released: a reopen gives it again, whole
    assert again.torn_bytes == 0 and [(r.seq, r.data) for r in again.read(100)] == [(21, b"e")]


def test_ingested_records_are_read_back_from_memory_and_equal_what_is_on_disk(tmp_path, monkeypatch):
    """The agent applies what it has just made durable: those records come from memory (the
    disk is not read back and decoded again) as long as they fit `memory_bytes`; past that,
    and after a reopen, from the segments, which hold exactly the bytes that arrived."""
    from app.engine.journal import Record, decode_at
    records = [Record(s, 1, "write", {"path": "f", "offset": s * 7}, bytes([s % 251]) * (s * 997 % 30_000))
               for s in range(1, 121)]
    wire = [r.encode() for r in records]
    disk_reads = []

    def ingest(j: Journal) -> list[Record]:
        out: list[Record] = []
        real = Journal._read_disk
        monkeypatch.setattr(Journal, "_read_disk", lambda self, *a: (disk_reads.append(1), real(self, *a)))
        for at in range(0, 120, 25):  # batches as they come off the wire, decoded and checked
            got = [decode_at(w, 0)[0] for w in wire[at:at + 25]]
            j.ingest_durably(got, [memoryview(w) for w in wire[at:at + 25]])
            while batch := j.read(10, max_bytes=100_000):
                out += batch
        monkeypatch.undo()
        return out

    roomy = Journal(tmp_path / "roomy", segment_bytes=200_000)
    assert ingest(roomy) == records and disk_reads == []
    roomy.close()
    tight = Journal(tmp_path / "tight", segment_bytes=200_000, memory_bytes=100_000)
    assert ingest(tight) == records and disk_reads  # the oldest left memory: read from disk
    tight.close()
    for name in ("roomy", "tight"):
        segs = sorted((tmp_path / name).glob("*.seg"))
        assert len(segs) > 1 and all(s.stat().st_size <= 200_000 for s in segs)
        assert b"".join(s.read_bytes() for s in segs) == b"".join(wire)
        again = Journal(tmp_path / name)
        assert again.read(1000, max_bytes=1 << 30) == records


def test_lag_of_a_remote_target_counts_until_applied_not_received(tmp_path):
    """A remote target acknowledges records received before it has applied them: the lag an
    administrator sees must not say 0 while the replica is still behind."""
    j = Journal(tmp_path)
    j.track_applied = True
    for i in range(5):
        j.append("write", {"path": "f", "offset": i}, b"x")
    j.read(10)
    j.release(5)  # received (durable in the agent's journal), not applied yet
    assert j.lag_seconds() > 0
    j.applied(3)
    assert j.lag_seconds() > 0
    j.applied(5)
    assert j.lag_seconds() == 0
    local = Journal(tmp_path / "local")  # a local target applies what it releases
    local.append("write", {"path": "f", "offset": 0}, b"x")
    local.read(10)
    assert local.lag_seconds() > 0
    local.release(1)
    assert local.lag_seconds() == 0


def test_a_mirror_takes_files_that_vanish_under_it_as_gone_not_as_an_error(tmp_path, monkeypatch):
    """A file renamed away between the walk's look and its open (the source), or renamed away at
    the target by the applier meanwhile: the mirror goes on (seen under a busy host: `mirror`
    failed with ENOENT while a writer renamed files)."""
    from app.engine import sync
    from app.engine.target import LocalDirTarget
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    src.mkdir()
    tgt.mkdir()
    for name in ("gone", "lost-there", "kept"):
        (src / name).write_text(name * 100)
        (tgt / name).write_text("old")
    real_open = sync.open_file

    def open_after_a_rename(dir_fd, rel):
        if rel == b"gone" and (src / "gone").exists():
            os.rename(src / "gone", src / "renamed")  # as a writer would, just before our open
        return real_open(dir_fd, rel)
    monkeypatch.setattr(sync, "open_file", open_after_a_rename)
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    target = LocalDirTarget.on_fd(fd, str(tgt))
    real_hashes = target.file_hashes

    def hashes_after_the_applier_renamed(rel):
        if rel == b"lost-there" and (tgt / "lost-there").exists():
            os.rename(tgt / "lost-there", tgt / "moved-there")
        return real_hashes(rel)
    target.file_hashes = hashes_after_the_applier_renamed
    src_fd = os.open(src, os.O_PATH | os.O_DIRECTORY)
    try:
        counts = sync.Reconciler(src_fd, target, sync.DirectSink(target), hashes=True).run()
    finally:
        os.close(src_fd)
        os.close(fd)
    assert (tgt / "lost-there").read_text() == "lost-there" * 100  # sent whole
    assert (tgt / "kept").read_text() == "kept" * 100 and counts["copied"] >= 2


def test_a_remote_targets_release_is_written_down_only_before_a_segment_goes(tmp_path):
    """Each acknowledgement of a remote target used to rewrite the released file (an fsync'd
    rename under the journal lock). It is written when a segment file is deleted (a reopen
    must find no hole) and at close; in between a reopen keeps records the target already
    has, which a reconnect skips by the target's own position."""
    j = Journal(tmp_path, memory_bytes=0, segment_bytes=1000)
    for i in range(40):
        j.append("write", {"offset": i}, b"q" * 40)
    assert [r.seq for r in j.read(40)] == list(range(1, 41))
    released = tmp_path / "released"
    j.release(3, persist=False)  # inside the first segment: nothing deleted, nothing written
    assert not released.exists() and len(_segments(tmp_path)) > 2
    first_last = scan_segment(_segments(tmp_path)[0])[0][-1]
    j.release(first_last + 1, persist=False)  # the first segment goes: written before
    assert int(released.read_text()) == first_last + 1
    j.release(first_last + 2, persist=False)
    assert int(released.read_text()) == first_last + 1
    again = Journal(tmp_path)  # a crash now: records the target holds come back, no hole
    assert again.gap is None and again.released_seq == first_last + 1
    assert [r.seq for r in again.read(100)][:1] == [first_last + 2]
    again.close()
    j.close()  # a clean close writes the last position down
    assert int(released.read_text()) == first_last + 2
    assert Journal(tmp_path).released_seq == first_last + 2


def test_confined_records_and_queries_never_leave_the_replica(tmp_path):
    """A remote source chooses the paths of its records and queries: a symlink it made (or
    one it put where a checked directory was) is never followed out of the replica, by a
    write, a chmod, a mkdir or a look."""
    from app.engine.agent import Agent, ConfinedFsApplier
    from app.engine.journal import Record
    from app.engine.target import LocalDirTarget
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(b"s")
    secret.chmod(0o600)
    outside.chmod(0o700)
    rep = tmp_path / "rep"
    rep.mkdir()
    fd = os.open(rep, os.O_RDONLY | os.O_DIRECTORY)
    app = ConfinedFsApplier(fd)
    seq = iter(range(1, 1000))

    def apply(op, data=b"", **args):
        app.apply(Record(next(seq), 1, op, args, data))

    apply("mkdir", path="d", mode=0o755, uid=0, gid=0)
    apply("create", path="d/f", mode=0o644, uid=0, gid=0)  # d is checked (cached) now
    apply("symlink", path="out", target=str(outside), uid=0, gid=0)
    apply("symlink", path="sec", target=str(secret), uid=0, gid=0)
    apply("chmod", path="sec", mode=0o666)  # chmod(2) would follow the link
    apply("mkdir", path="out", mode=0o777, uid=0, gid=0)  # exists (a symlink): its chmod too
    for op, args in [("create", dict(path="out/new", mode=0o644, uid=0, gid=0)),
                     ("write", dict(path="out/secret", offset=0))]:
        with pytest.raises(OSError):
            apply(op, b"x", **args)
    # a checked directory replaced by a symlink: renamed away first, so checked again
    apply("rename", old="d", new="e", flags=0)
    apply("symlink", path="d", target=str(outside), uid=0, gid=0)
    with pytest.raises(OSError):
        apply("create", path="d/new", mode=0o644, uid=0, gid=0)
    # a directory above a checked one (a/b) renamed away and replaced by a symlink
    apply("mkdir", path="a", mode=0o755, uid=0, gid=0)
    apply("mkdir", path="a/b", mode=0o755, uid=0, gid=0)
    apply("create", path="a/b/f", mode=0o644, uid=0, gid=0)
    apply("rename", old="a", new="z", flags=0)
    (outside / "b").mkdir()
    apply("symlink", path="a", target=str(outside), uid=0, gid=0)
    with pytest.raises(OSError):
        apply("create", path="a/b/new", mode=0o644, uid=0, gid=0)  # a/b was checked before
    (outside / "b").rmdir()
    apply("mkdir", path="g", mode=0o755, uid=0, gid=0)
    apply("create", path="g/f", mode=0o644, uid=0, gid=0)
    apply("remove", path="g")
    apply("symlink", path="g", target=str(outside), uid=0, gid=0)
    with pytest.raises(OSError):
        apply("create", path="g/f", mode=0o644, uid=0, gid=0)
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert secret.read_bytes() == b"s" and (secret.stat().st_mode & 0o777) == 0o600
    assert (outside.stat().st_mode & 0o777) == 0o700
    assert (rep / "e" / "f").is_file()
    app.close()

    agent = Agent(str(tmp_path), None, None)
    agent.target = LocalDirTarget.on_fd(os.open(rep, os.O_RDONLY | os.O_DIRECTORY), "rep")
    for method, rel in [("info", "../outside/secret"), ("file_hashes", "/etc/hostname"),
                        ("children", "out"), ("file_hashes", "out/secret"), ("info", "d/secret"),
                        ("file_hashes", "sec")]:
        try:
            got = agent.answer(method, {"rel": rel})
        except (OSError, ValueError):
            continue
        assert got is None, (method, rel, got)  # nothing about what is outside
    assert agent.answer("info", {"rel": "e/f"})["s"] == 0  # inside: answered


def test_metadata_of_a_directory_that_keeps_changing_is_sent_held_still(tmp_path):
    """The walk sends a directory's mode, owner and times after its children; while writers keep
    changing it every checked commit is refused. It used to give up after COMMIT_TRIES and the
    replica kept the wrong mode for good (the capture records later changes, not that state:
    seen as a verify difference 'mode 0o755 / 0o700' of the root in a CI run). Now it is held
    still once and sent, like a file's data."""
    import contextlib
    import stat as st
    from app.engine import sync
    from app.engine.target import LocalDirTarget
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    src.mkdir()
    (src / "sub").mkdir()
    (src / "sub" / "f").write_text("f")
    src.chmod(0o755)
    (src / "sub").chmod(0o751)
    tgt.mkdir(mode=0o700)

    class Busy(sync.Sink):
        """Every checked commit about a directory is refused (it changed since it was read);
        frozen() is the gate closed for writers."""
        def __init__(self, target):
            self.target = target
            self.tracker = sync.Tracker()
            self.held = 0
            self.still = False

        def commit(self, check, ops):
            if check is not None and not self.still and any(
                    op in ("chmod", "times") and st.S_ISDIR(os.lstat(src / a["path"]).st_mode)
                    for op, a, _ in ops):
                return False
            self.target.apply_ops(ops)
            return True

        @contextlib.contextmanager
        def frozen(self):
            self.held += 1
            self.still = True
            try:
                yield
            finally:
                self.still = False
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    src_fd = os.open(src, os.O_PATH | os.O_DIRECTORY)
    target = LocalDirTarget.on_fd(fd, str(tgt))
    sink = Busy(target)
    try:
        sync.Reconciler(src_fd, target, sink).run()
    finally:
        os.close(src_fd)
        os.close(fd)
    assert oct(tgt.stat().st_mode & 0o777) == "0o755"
    assert oct((tgt / "sub").stat().st_mode & 0o777) == "0o751"
    assert (tgt / "sub").stat().st_mtime_ns == (src / "sub").stat().st_mtime_ns
    assert sink.held == 2  # the two directories, each held still once


def test_a_fresh_file_goes_in_one_commit_with_its_metadata_read_after_the_check(tmp_path, monkeypatch):
    """A mirror sends a new small file as one record, "put", in one commit (one trip to the capture thread: it was
    two, data then metadata, plus an owner and mode the create record had already set), and
    the metadata in it is read after the check's stamp: a chmod or utime just before the data
    is read is what the target gets."""
    from app.engine import sync
    from app.engine.target import LocalDirTarget
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    src.mkdir()
    tgt.mkdir()
    (src / "a").write_bytes(b"a" * 5000)
    (src / "b").write_bytes(b"b" * 10)
    (src / "c").write_bytes(b"")
    os.setxattr(src / "c", "user.k", b"v")
    real_open = sync.open_file

    def changed_just_before_the_read(dir_fd, rel):
        if rel == b"b":
            os.chmod(src / "b", 0o600)
            os.utime(src / "b", ns=(1_500_000_000_000_000_000, 1_600_000_000_000_000_000))
        return real_open(dir_fd, rel)
    monkeypatch.setattr(sync, "open_file", changed_just_before_the_read)
    commits: list[list[str]] = []

    class Recording(sync.DirectSink):
        tracker = sync.Tracker()

        def commit(self, check, ops):
            commits.append([op for op, _a, _d in ops])
            return super().commit(check, ops)
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    src_fd = os.open(src, os.O_PATH | os.O_DIRECTORY)
    target = LocalDirTarget.on_fd(fd, str(tgt))
    try:
        sync.Reconciler(src_fd, target, Recording(target)).run()
    finally:
        os.close(src_fd)
        os.close(fd)
    files = [c for c in commits if "put" in c]
    # one record each (it was five: remove, create, write, truncate, times); times go last
    # after extended attributes
    assert files == [["put"], ["put"], ["put", "setxattr", "times"]]
    assert os.getxattr(tgt / "c", "user.k") == b"v"
    for name in ("a", "b", "c"):
        s, t = os.lstat(src / name), os.lstat(tgt / name)
        assert (t.st_mode, t.st_mtime_ns, t.st_size) == (s.st_mode, s.st_mtime_ns, s.st_size)
    assert os.lstat(tgt / "b").st_mode & 0o777 == 0o600


def test_small_files_go_to_the_capture_together_and_one_that_changed_is_sent_again(tmp_path):
    """A mirror of many small files takes one trip to the capture thread per batch of files
    (it was one per file: two thirds of the walk's time went in those trips), each file checked
    on its own there: one that changed after it was read is read and sent again, alone; a
    directory's times come after every record of its files (creating them moved the target's)."""
    import contextlib
    from app.engine import sync
    from app.engine.target import LocalDirTarget
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    (src / "d").mkdir(parents=True)
    tgt.mkdir()
    for i in range(150):
        (src / "d" / f"f{i:03d}").write_bytes(b"%d" % i * 100)
    os.utime(src / "d", ns=(1_500_000_000_000_000_000, 1_600_000_000_000_000_000))
    calls: list[list[list[str]]] = []
    order: list[tuple[str, str]] = []

    class Batching(sync.Sink):
        def __init__(self, target):
            self.target, self.tracker, self.refused = target, sync.Tracker(), False

        def commit(self, check, ops):
            return self.commit_many([(check, ops)])[0]

        def commit_many(self, items):
            calls.append([[op for op, _a, _d in ops] for _c, ops in items])
            done = []
            for _check, ops in items:
                if not all(done):  # after one that failed: not tried (sync.Sink.commit_many)
                    done.append(None)
                    continue
                if not self.refused and any(a.get("path") == "d/f077" for _o, a, _d in ops):
                    self.refused = True  # changed since it was read: the capture refuses it
                    (src / "d" / "f077").write_bytes(b"changed meanwhile")
                    done.append(False)
                    continue
                order.extend((op, a.get("path", "")) for op, a, _d in ops)
                self.target.apply_ops(ops)
                done.append(True)
            return done

        def frozen(self):
            return contextlib.nullcontext()
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    src_fd = os.open(src, os.O_PATH | os.O_DIRECTORY)
    target = LocalDirTarget.on_fd(fd, str(tgt))
    try:
        counts = sync.Reconciler(src_fd, target, Batching(target)).run()
    finally:
        os.close(src_fd)
        os.close(fd)
    assert len(calls) < 20 and max(len(c) for c in calls) > 32  # batches, not one call a file
    assert counts["copied"] == 150  # every file, f077 once
    assert (tgt / "d" / "f077").read_bytes() == b"changed meanwhile"
    for i in (0, 76, 78, 149):
        assert (tgt / "d" / f"f{i:03d}").read_bytes() == b"%d" % i * 100
    last_file = max(i for i, (op, p) in enumerate(order) if p.startswith("d/"))
    assert order.index(("times", "d")) > last_file
    assert (tgt / "d").stat().st_mtime_ns == 1_600_000_000_000_000_000


def test_status_is_answered_while_a_long_worker_command_runs(tmp_path):
    """A mirror, verify or switch-over drain held the worker's link: `status` waited up to 10 s
    per entry and then said "the worker did not answer". Now the worker runs a long command in
    a task and answers a status ask meanwhile with its figures; the daemon's long call hands
    them over. The real worker loop (Capture.serve_daemons) and the daemon's WorkerLink, over
    a real socket; only the command itself is a stand-in that waits until released."""
    import socket
    from types import SimpleNamespace

    import trio

    from app.engine.capture import Capture
    from app.engine.supervisor import adopt
    from app.services import protocol

    class Worker(Capture):
        def __init__(self, sock, door):
            self.chan = SimpleNamespace(sock=sock)
            self.spec = SimpleNamespace(key="/srv/x", adopt=door)
            self.release = trio.Event()

        def figures(self):
            return {"last_seq": 7, "state": "capturing"}

        async def handle(self, cmd, args, lines):
            if cmd == "verify":
                await lines.send(protocol.progress(stage="comparing"))
                await self.release.wait()
                return protocol.ok(differences=[])
            return protocol.ok(**self.figures())

    door = str(tmp_path / "w.sock")

    async def main():
        first, gone = socket.socketpair()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(door)
        listener.listen()
        worker = Worker(first, door)
        ready = {"pid": os.getpid(), "version": protocol.VERSION,
                 "features": [protocol.FIGURES_WHILE_BUSY]}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.serve_daemons, ready, listener)
            await trio.sleep(0.1)
            gone.close()  # the daemon that started it went: the worker waits to be taken over
            link = await adopt(door)
            assert link is not None
            seen, done = [], {}

            async def verify():
                async def progress(p):
                    seen.append(p)
                done["reply"] = await link.call("verify", progress=progress)
            nursery.start_soon(verify)
            with trio.fail_after(10):
                while link.busy != "verify" or not seen:
                    await trio.sleep(0.01)
            with trio.fail_after(5):
                st = await link.call("status")
            assert st["ok"] and st["last_seq"] == 7 and "reply" not in done
            worker.release.set()
            with trio.fail_after(10):
                while "reply" not in done:
                    await trio.sleep(0.01)
            assert done["reply"]["ok"] and done["reply"]["differences"] == []
            assert seen == [{"stage": "comparing"}]
            with trio.fail_after(5):
                st = await link.call("status")  # the ordinary way again
            assert st["ok"] and st["last_seq"] == 7 and link.busy is None
            nursery.cancel_scope.cancel()
    trio.run(main)


class CaptureBesideTheWalk(sync.Sink):
    """A catch-up of `src` onto the directory `tgt` through a sink that checks each commit as
    the capture thread does (`tracker.still`); what a test's stand-in for the capture records
    goes to `target` at once, before the walk's commits that follow."""

    def __init__(self, src, tgt) -> None:
        self.src, self.tgt, self.tracker = src, tgt, sync.Tracker()
        self.fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
        self.target = LocalDirTarget.on_fd(self.fd, str(tgt))

    def commit(self, check, ops):
        if check is not None and not self.tracker.still(check, self._key):
            return False
        self.target.apply_ops(ops)
        return True

    def _key(self, rel: bytes) -> tuple[int, int] | None:
        try:
            st = os.lstat(self.src / os.fsdecode(rel))
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def frozen(self):
        return contextlib.nullcontext()

    def walk(self) -> None:
        src_fd = os.open(self.src, os.O_PATH | os.O_DIRECTORY)
        try:
            sync.Reconciler(src_fd, self.target, self).run()
        finally:
            os.close(src_fd)
            os.close(self.fd)


def test_a_directorys_times_changed_between_the_walks_read_and_its_stamp_are_not_sent_stale(
        tmp_path, monkeypatch):
    """The walk reads a directory's metadata, then takes the check's stamp. A change captured
    in between was inside the stamp, so the commit went through with the times read before it,
    after the capture's newer record: the target kept an older mtime than the source while the
    entry said consistent (seen once in the suite: 1.57 ms older, on the deep-path test). The
    metadata is read again after the stamp, as a file's data is."""
    import sys

    from app.engine import sync
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    (src / "d").mkdir(parents=True)
    tgt.mkdir()
    os.utime(src / "d", ns=(1_500_000_000_000_000_000, 1_600_000_000_000_000_000))
    newer = 1_700_000_000_000_000_000
    real = sync.lstat_info
    fired = []
    sink = CaptureBesideTheWalk(src, tgt)

    def read_then_changed(dir_fd, rel, **kw):
        info = real(dir_fd, rel, **kw)
        if rel == b"d" and not fired and sys._getframe(1).f_code.co_name == "_metadata":
            fired.append(1)  # an application changes it now, and the capture records it
            os.utime(src / "d", ns=(newer, newer))
            sink.tracker.changed(info.ino)
            sink.target.apply_ops([("times", {"path": "d", "atime": None, "mtime": newer}, b"")])
        return info
    monkeypatch.setattr(sync, "lstat_info", read_then_changed)
    sink.walk()
    assert fired
    assert (tgt / "d").stat().st_mtime_ns == (src / "d").stat().st_mtime_ns == newer


def test_a_symlink_made_anew_between_the_listing_and_the_stamp_is_not_sent_stale(
        tmp_path, monkeypatch):
    """The walk lists a directory, then sends a symlink from that listing under a check taken
    later. A symlink removed and made anew in between (captured: its records are in the
    journal) is another node (here, as ext4 does, even with the same inode number), and the
    check, which follows the inode, did not see it: the walk's records of the old link went out
    after the capture's, and the target kept the old target. The name is looked at again after
    the stamp."""
    from app.engine import sync
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    src.mkdir()
    tgt.mkdir()
    os.symlink("old-target", src / "link")
    real = sync.Reconciler._check
    fired = []
    sink = CaptureBesideTheWalk(src, tgt)

    def made_anew_just_before(self, rel, info):
        if rel == b"link" and not fired:
            fired.append(1)  # an application replaces it now, and the capture records that
            os.unlink(src / "link")
            os.symlink("new-target", src / "link")
            new = os.lstat(src / "link")
            self.tracker.made((new.st_dev, new.st_ino))
            sink.target.apply_ops([("remove", {"path": "link"}, b""),
                                   ("symlink", {"path": "link", "target": "new-target",
                                                "uid": 0, "gid": 0}, b"")])
        return real(self, rel, info)
    monkeypatch.setattr(sync.Reconciler, "_check", made_anew_just_before)
    sink.walk()
    assert fired
    assert os.readlink(tgt / "link") == os.readlink(src / "link") == "new-target"


def test_a_first_copy_costs_about_one_trip_to_the_capture_per_directory(tmp_path):
    """Each trip to the capture thread is a thread switch and a wake-up of its event loop. A
    first copy made about five per directory: the batch of files sent before the
    directory's own record, that record, an empty directory's prune, and its times before and
    with their own batch (770 trips for the standard library's 172 directories and 2,358
    files, a quarter of the walk's thread in the profile). A directory made by the walk now
    goes in one trip with the batch before it, needs no prune, and its times wait for the
    next batch."""
    from app.engine import sync
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    for d in range(20):
        for sub in ("", "/x", "/x/y"):
            (src / f"d{d}{sub}").mkdir(parents=True)
            for f in range(3):
                (src / f"d{d}{sub}" / f"f{f}").write_bytes(b"%d" % f * 50)
    tgt.mkdir()
    trips = []

    class Counting(sync.DirectSink):
        def commit_many(self, items):
            trips.append(len(items))
            return super().commit_many(items)
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    src_fd = os.open(src, os.O_PATH | os.O_DIRECTORY)
    try:
        target = LocalDirTarget.on_fd(fd, str(tgt))
        sync.Reconciler(src_fd, target, Counting(target)).run()
    finally:
        os.close(src_fd)
        os.close(fd)
    # each directory's mkdir and times, each file; the top's prune and times
    assert sum(trips) == 60 * 2 + 180 + 2
    assert len(trips) <= 60 + 2, trips  # one a directory (and the top's prune and times)
    assert sorted(os.listdir(tgt / "d7" / "x" / "y")) == ["f0", "f1", "f2"]


def a_file_with_two_names(tmp_path) -> CaptureBesideTheWalk:
    """src/d/f and src/d/g, one file, to be walked onto an empty tgt."""
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"two names")
    os.link(src / "d" / "f", src / "d" / "g")
    tgt.mkdir()
    return CaptureBesideTheWalk(src, tgt)


def walk_a_file_with_two_names(tmp_path, monkeypatch, before_the_second) -> CaptureBesideTheWalk:
    """a_file_with_two_names walked; `before_the_second(walk, sink, leader, rel, info)` runs
    once, when the walk meets the second name (the first one sent, its records maybe still
    in the walk's batch)."""
    from app.engine import sync
    sink = a_file_with_two_names(tmp_path)
    real = sync.Reconciler._hard_link
    fired = []

    def hooked(self, rel, info, tinfo, listed):
        leader = self._leaders.get(info.ino)
        if leader is not None and not fired:
            fired.append(rel)
            before_the_second(self, sink, leader, rel, info)
        return real(self, rel, info, tinfo, listed)
    monkeypatch.setattr(sync.Reconciler, "_hard_link", hooked)
    sink.walk()
    assert fired
    return sink


@pytest.mark.parametrize("first_name_committed", [True, False])
def test_a_hard_link_whose_first_name_was_renamed_meanwhile_is_made_from_a_name_that_holds_it(
        tmp_path, monkeypatch, first_name_committed):
    """A file with two names: the walk sends the first whole, and links the second to it at
    the target. An application renamed the first name in between (captured: the target's copy
    moved with it). The link from the old name found nothing there, and a catch-up took that
    as superseded: the second name never reached the target, and the rename's destination was
    linked from the old name too (seen on a busy host: d2/f missing, `hard` with one name).
    The second name now leads and goes whole; the destination, visited again, links to it.
    Either with the first name's records committed before the rename, or still waiting in
    the walk's batch (the rename reaches the target first, and is superseded there)."""
    moved = []

    def renamed(walk, sink, leader, rel, info):
        if first_name_committed:
            walk._flush()
        old = leader.rel
        new = old + b"2"
        moved.append((old, new))
        os.rename(sink.src / os.fsdecode(old), sink.src / os.fsdecode(new))
        st = os.lstat(sink.src / "d")
        rec = {"old": os.fsdecode(old), "new": os.fsdecode(new), "flags": 0}
        sink.tracker.observe((st.st_dev, st.st_ino), "rename", rec)
        sink.target.apply_ops([("rename", rec, b"")])
    sink = walk_a_file_with_two_names(tmp_path, monkeypatch, renamed)
    tgt = sink.tgt
    (old, new), = moved
    names = sorted({b"d/f", b"d/g", new} - {old})
    assert [os.fsencode(p.relative_to(tgt)) for p in sorted((tgt / "d").iterdir())] == names
    ino = {(tgt / os.fsdecode(n)).stat().st_ino for n in names}
    assert len(ino) == 1 and (tgt / os.fsdecode(names[0])).read_bytes() == b"two names"
    if first_name_committed:
        assert sink.target.errors == 0, sink.target.last_error
    else:  # the stand-in's rename (no seq: not counted as the catch-up's) found nothing
        assert sink.target.errors == 1 and "rename" in sink.target.last_error


def test_a_file_changed_through_a_name_not_at_the_target_yet_is_not_linked_stale(
        tmp_path, monkeypatch):
    """A file with two names: the walk sent the first. An application then set an extended
    attribute through the second name; its record found no such name at the target and was
    superseded (the walk sends names whole), but the walk linked that name to the first,
    as sent before the change: the attribute never reached the target (bench/catchup_race.py).
    A file changed since its first name was sent is sent again whole from this name, and
    the first linked to it."""
    def changed(walk, sink, leader, rel, info):
        walk._flush()
        os.setxattr(sink.src / os.fsdecode(rel), "user.later", b"set")
        rec = {"path": os.fsdecode(rel), "name": "user.later"}
        sink.tracker.observe(info.ino, "setxattr", rec)
        sink.target.apply_ops([("setxattr", rec, b"set")])  # no such name there yet
    sink = walk_a_file_with_two_names(tmp_path, monkeypatch, changed)
    f, g = sink.tgt / "d" / "f", sink.tgt / "d" / "g"
    assert f.stat().st_ino == g.stat().st_ino and f.read_bytes() == b"two names"
    assert os.getxattr(f, "user.later") == b"set"
    assert sink.target.errors == 1 and "setxattr" in sink.target.last_error  # the stand-in's


def test_two_walks_beside_each_other_both_visit_a_rename_destination_again(tmp_path, monkeypatch):
    """A catch-up and a mirror (or two mirrors) walk at once over one tracker. A rename's
    destination the walks had passed was a list each walk popped from: the one that took it
    visited it again, the other never did, and its target lacked the file for good (in a
    catch-up the rename's record was superseded there: the old name was not sent yet). Each
    walk now reads the whole list from its own place in it."""
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "z").mkdir()
    (tmp_path / "src" / "z" / "f").write_bytes(b"renamed while both walk")
    (tmp_path / "t1").mkdir()
    (tmp_path / "t2").mkdir()
    first, second = CaptureBesideTheWalk(tmp_path / "src", tmp_path / "t1"), \
        CaptureBesideTheWalk(tmp_path / "src", tmp_path / "t2")
    second.tracker = first.tracker
    real = sync.Reconciler._child
    fired = []

    def hooked(self, parent, name, info, tinfo, listed):
        if self.sink is first and name == b"z" and not fired:  # "a" walked, "z" not listed yet
            fired.append(1)
            os.rename(tmp_path / "src" / "z" / "f", tmp_path / "src" / "a" / "f")
            first.tracker.observe(info.ino, "rename", {"old": "z/f", "new": "a/f"})
            second.walk()  # the other walk, from start to end, meanwhile
        return real(self, parent, name, info, tinfo, listed)
    monkeypatch.setattr(sync.Reconciler, "_child", hooked)
    first.walk()
    assert fired
    for t in ("t1", "t2"):
        assert (tmp_path / t / "a" / "f").read_bytes() == b"renamed while both walk", t
        assert not (tmp_path / t / "z" / "f").exists(), t


def test_a_rename_destination_sent_again_whole_leaves_no_link_to_a_name_it_removed(
        tmp_path, monkeypatch):
    """A directory renamed as the walk began is listed at its new name, and visited again
    at its end as the rename's destination: sent anew, removed there first. The file with
    two names in it had led from that directory: the visit linked its names to the name it
    had just removed there (a link from h to h), and both went missing at the target
    (bench/catchup_race.py). A leader the visit sends anew leads no more."""
    sink = a_file_with_two_names(tmp_path)
    st = os.lstat(sink.src)
    begin, visits = sync.Tracker.begin_walk, []

    def begun(self):  # the rename recorded once the walk has begun, before its first listing
        got = begin(self)
        self.observe((st.st_dev, st.st_ino), "rename", {"old": "was", "new": "d", "flags": 0})
        return got
    monkeypatch.setattr(sync.Tracker, "begin_walk", begun)
    visit = sync.Reconciler._visit
    monkeypatch.setattr(sync.Reconciler, "_visit", lambda self, rel: (visits.append(rel),
                                                                     visit(self, rel))[1])
    sink.walk()
    assert visits == [b"d"]  # visited again as the rename's destination
    h, x = sink.tgt / "d" / "f", sink.tgt / "d" / "g"
    assert h.stat().st_ino == x.stat().st_ino and h.read_bytes() == b"two names"
    assert sink.target.errors == 0, sink.target.last_error


def test_a_link_the_capture_made_while_the_walk_ran_stays_one_file_at_the_target(
        tmp_path, monkeypatch):
    """The walk sent a/f (one name then). An application linked it as zz/l, and the
    capture's link record made zz/l there too. The walk then met zz/l (in a listing, or
    visited again as a link's destination): a file with two names it had not seen before,
    sent whole, a copy of its own at the target (bench/catchup_race.py). The capture's links
    are made again at the walk's end, from the name that still holds the file."""
    from app.engine import sync
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    (src / "a").mkdir(parents=True)
    (src / "zz").mkdir()
    (src / "a" / "f").write_bytes(b"one file")
    (src / "zz" / "other").write_bytes(b"x")
    tgt.mkdir()
    sink = CaptureBesideTheWalk(src, tgt)
    real = sync.Reconciler._file
    fired = []

    def linked_once_sent(self, rel, info, tinfo, defer=True):
        real(self, rel, info, tinfo, defer)
        if rel == b"a/f" and not fired:
            fired.append(1)
            self._flush()  # its records are at the target before the capture's link
            os.link(src / "a" / "f", src / "zz" / "l")
            rec = {"path": "zz/l", "src": "a/f"}
            sink.tracker.observe(info.ino, "link", rec)
            sink.target.apply_ops([("link", rec, b"")])
    monkeypatch.setattr(sync.Reconciler, "_file", linked_once_sent)
    sink.walk()
    assert fired
    assert (tgt / "zz" / "l").stat().st_ino == (tgt / "a" / "f").stat().st_ino
    assert (tgt / "zz" / "l").read_bytes() == b"one file"
    # (when the walk had not made zz there yet, the stand-in's link, which has no seq to be
    # counted as the catch-up's, found nothing: in a real catch-up it is superseded)
    assert sink.target.errors == 0 or (sink.target.errors == 1 and " link " in sink.target.last_error)


def test_a_catch_ups_rename_with_nowhere_to_go_yet_takes_the_old_name_away(tmp_path):
    """A rename the capture recorded during a catch-up whose new name's directory the walk
    has not made at the target yet: superseded (the walk sends the node whole there). The
    old name is gone at the source all the same; it stayed at the target for good when the
    walk had passed it (bench/catchup_race.py: a directory renamed early in a first copy
    was there twice). An exchange keeps both names (the walk visits both again); after the
    catch-up the same failure is an apply error and touches nothing."""
    from app.engine.journal import KIND_FS, Record
    tgt = tmp_path / "tgt"
    for name in ("old", "swap", "late"):
        (tgt / name).mkdir(parents=True)
        (tgt / name / "f").write_bytes(b"x")
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    try:
        t = LocalDirTarget.on_fd(fd, str(tgt))
        t.catch_up_through = 5
        t.send([Record(3, KIND_FS, "rename", {"old": "old", "new": "nowhere/yet", "flags": 0}),
                Record(4, KIND_FS, "rename", {"old": "swap", "new": "nowhere/else", "flags": 2}),
                Record(6, KIND_FS, "rename", {"old": "late", "new": "nowhere/at-all", "flags": 0})])
        assert (t.superseded, t.errors) == (2, 1) and "seq 6 rename" in t.last_error
        assert sorted(os.listdir(tgt)) == ["late", "swap"]
    finally:
        os.close(fd)


def test_a_file_removed_between_the_walks_check_and_its_commit_is_not_sent(tmp_path):
    """The walk read a file; an application removed it before the walk's records were
    committed, and the capture recorded the unlink first. The check compared the file's own
    stamp, which an unlink (recorded against the directory) leaves alone: the walk's records
    made the file again at the target, which the source no longer had. A removal now moves
    the name, as a rename does, and the walk's check fails."""
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    src.mkdir()
    tgt.mkdir()
    (src / "x").write_bytes(b"new content, longer")
    (tgt / "x").write_bytes(b"old")

    class RemovedJustBefore(CaptureBesideTheWalk):
        fired = False

        def commit(self, check, ops):
            if not self.fired and any(a.get("path") == "x" for _o, a, _d in ops):
                self.fired = True
                os.unlink(src / "x")
                st = os.lstat(src)
                self.tracker.observe((st.st_dev, st.st_ino), "unlink", {"path": "x"})
                self.target.apply_ops([("unlink", {"path": "x"}, b"")])
            return super().commit(check, ops)
    sink = RemovedJustBefore(src, tgt)
    sink.walk()
    assert sink.fired
    assert not (tgt / "x").exists()
    assert sink.target.errors == 0, sink.target.last_error


def test_a_file_made_where_the_walk_has_not_made_the_directory_yet_reaches_the_target(
        tmp_path, monkeypatch):
    """The first copy: the target has nothing yet. An application makes a file in a directory
    the walk has not reached. Its captured create fails at the target (the directory is not
    there), and the walk skipped every node made since it began ("its whole life is in the
    journal"): the file never reached the target, and the entry said consistent. A node the
    walk finds in a listing is now sent like any other."""
    from app.engine import sync
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    (src / "a").mkdir(parents=True)
    (src / "a" / "old").write_bytes(b"there before")
    tgt.mkdir()
    sink = CaptureBesideTheWalk(src, tgt)
    real = sync.children
    fired = []

    def listed_then_made(dir_fd, rel, **kw):
        kids = real(dir_fd, rel, **kw)
        if rel == b"" and not fired:  # the top listed: `a` is not at the target yet
            fired.append(1)
            (src / "a" / "new").write_bytes(b"made meanwhile")
            st = os.lstat(src / "a" / "new")
            sink.tracker.made((st.st_dev, st.st_ino))
            sink.target.apply_ops([("create", {"path": "a/new", "mode": 0o644, "uid": 0,
                                               "gid": 0}, b""),
                                   ("write", {"path": "a/new", "offset": 0}, b"made meanwhile")])
        return kids
    monkeypatch.setattr(sync, "children", listed_then_made)
    sink.walk()
    assert fired and sink.target.errors == 2  # the capture's create and write failed there
    assert (tgt / "a" / "new").read_bytes() == b"made meanwhile"
    assert (tgt / "a" / "old").read_bytes() == b"there before"


def test_a_catch_ups_record_about_a_name_not_there_yet_is_superseded_not_an_apply_error(tmp_path):
    """Until a catch-up has made a directory at the target, the capture's records about names
    in it find nothing there; the catch-up sends those names whole when it reaches them. Such
    a record of the catch-up's (up to `catch_up_through`) is counted as superseded: status
    said "records failed to apply; run mirror" after every first copy an application wrote
    during. The same failure after the catch-up's last record is an apply error."""
    from app.engine.journal import KIND_FS, Record
    tgt = tmp_path / "tgt"
    tgt.mkdir()
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    try:
        t = LocalDirTarget.on_fd(fd, str(tgt))
        t.catch_up_through = 5
        made = {"mode": 0o644, "uid": 0, "gid": 0}
        t.send([Record(4, KIND_FS, "create", {"path": "a/x", **made}),
                Record(5, KIND_FS, "write", {"path": "a/x", "offset": 0}, b"x"),
                Record(6, KIND_FS, "create", {"path": "a/y", **made}),
                Record(7, KIND_FS, "create", {"path": "y", **made})])
        assert (t.superseded, t.errors) == (2, 1) and "seq 6 create a/y" in t.last_error
        assert (tgt / "y").exists()
    finally:
        os.close(fd)


def test_a_block_reconcile_asks_the_next_chunks_target_hashes_while_it_compares_this_one(tmp_path):
    """The target hashed (a remote one: was asked for) a chunk only once the source had
    compared the one before: both sides' hashing, and the round trip, one after the other.
    Now the next chunk's target hashes are asked for first; the result is the same, and an
    error of the target's still ends the reconcile, with nothing left running."""
    import hashlib
    import threading
    from app.engine import blocksync
    from app.engine.sync import BLOCK
    size = 5 * blocksync.CHUNK * BLOCK // 2  # two and a half chunks
    src = tmp_path / "src"
    src.write_bytes(os.urandom(size))
    theirs = bytearray(src.read_bytes())
    for b in (3, blocksync.CHUNK + 1, 2 * blocksync.CHUNK + 5):  # one differing block per chunk
        theirs[b * BLOCK] ^= 0xFF
    events: list[tuple[str, int]] = []

    class Target:
        def __init__(self, fail_at=None):
            self.fail_at = fail_at

        def block_hashes_of(self, blocks):
            events.append(("asked", blocks[0] // blocksync.CHUNK))
            asked[blocks[0] // blocksync.CHUNK].set()
            if blocks[0] == self.fail_at:
                raise OSError(errno.EIO, "the target's disk")
            return [hashlib.sha256(theirs[b * BLOCK:(b + 1) * BLOCK]).hexdigest()
                    for b in blocks]

    asked = [threading.Event() for _ in range(3)]

    def commit(b, data, g):
        k = b // blocksync.CHUNK
        if k < 2:  # the next chunk's ask may still be on its way to the target: wait for it
            asked[k + 1].wait(10)
        events.append(("sent", k))
        theirs[b * BLOCK:b * BLOCK + len(data)] = data
        return True
    fd = os.open(src, os.O_RDONLY)
    try:
        counts = blocksync.reconcile(fd, 0, size, Target(), commit)
        assert counts["differing"] == 3 and bytes(theirs) == src.read_bytes()
        # chunk k+1's hashes were asked for before chunk k's differing block was sent
        for k in (0, 1):
            assert events.index(("asked", k + 1)) < events.index(("sent", k)), events
        for e in asked:
            e.clear()
        before = threading.active_count()
        with pytest.raises(OSError, match="the target's disk"):
            blocksync.reconcile(fd, 0, size, Target(fail_at=blocksync.CHUNK), commit)
        assert threading.active_count() == before  # its helper thread ended with it
    finally:
        os.close(fd)


def test_a_block_verify_hashes_the_next_chunk_here_while_the_target_hashes_this_one(tmp_path):
    """verify read and hashed a chunk here, then waited for the target's hashes of it, one
    after the other. Now the target's hashes of a chunk are asked for before the next chunk is
    read here; each chunk keeps its own order (read here, the target caught up, asked there),
    and the differing ranges are the same."""
    import hashlib
    import threading
    from app.engine import blocksync
    from app.engine.sync import BLOCK
    size = 5 * blocksync.CHUNK * BLOCK // 2
    src = tmp_path / "src"
    src.write_bytes(os.urandom(size))
    theirs = bytearray(src.read_bytes())
    theirs[(blocksync.CHUNK + 2) * BLOCK] ^= 0xFF
    events: list[tuple[str, int]] = []
    reading = [threading.Event() for _ in range(3)]
    overlapped = []

    def gen(b):  # called for a chunk's blocks just before they are read here
        reading[b // blocksync.CHUNK].set()
        return 0

    class Target:
        def block_hashes_of(self, blocks):
            k = blocks[0] // blocksync.CHUNK
            events.append(("asked", k))
            if k < 2:  # is the next chunk read here meanwhile?
                overlapped.append(reading[k + 1].wait(10))
            return [hashlib.sha256(theirs[b * BLOCK:(b + 1) * BLOCK]).hexdigest() for b in blocks]

    def caught_up():
        events.append(("caught up", sum(e[0] == "caught up" for e in events)))
    fd = os.open(src, os.O_RDONLY)
    try:
        got = blocksync.verify(fd, 0, size, Target(), gen=gen, wait_target=caught_up)
    finally:
        os.close(fd)
    assert got["ranges"] == [[(blocksync.CHUNK + 2) * BLOCK, (blocksync.CHUNK + 3) * BLOCK]]
    assert overlapped == [True, True]
    for k in range(3):
        assert events.index(("caught up", k)) < events.index(("asked", k)), events


@pytest.mark.parametrize("behind", [False, True])
def test_a_catch_up_during_which_the_queue_limit_was_reached_does_not_call_the_replica_consistent(
        tmp_path, behind):
    """Pull-ahead: once the queue limit is reached the journal stores nothing (applications
    never wait), neither what they write nor the walk's own records. A catch-up that ended so
    called itself done: a remote replica was marked consistent at the last seq although
    records before it were never journalled (a fail-over would have promoted it), and the
    flag the walk set for it was read nowhere. Now it is not consistent, keeps its scope, and
    a resync of what was dropped follows."""
    from types import SimpleNamespace

    import trio

    from app.engine.capture import Capture
    from app.engine.journal import KIND_BLOCK, Journal
    marks = []
    cap = Capture(SimpleNamespace(key="/dev/test", kind="block"), None)
    cap.journal = Journal(str(tmp_path), kind=KIND_BLOCK, limit_bytes=4096, on_full="pull-ahead")
    cap.journal.append("write", {"offset": 0}, b"x" * 1024)
    if behind:
        assert cap.journal.append("write", {"offset": 4096}, b"y" * 8192) == 0
    cap.target = SimpleNamespace(mark_consistent=marks.append)
    cap.remote, cap.reason = True, "test"
    cap._dirty_scope = {1}
    try:
        assert trio.run(cap._caught_up, {"copied_bytes": 1024}) is not behind
    finally:
        cap.journal.close()
    assert cap.resync_bytes == 1024
    if behind:
        assert not cap.consistent and marks == [] and cap._full_pending and cap._dirty_scope == {1}
        assert "queue limit" in cap.catching["stage"]
    else:
        assert cap.consistent and marks == [1] and cap.catching is None and not cap._dirty_scope


def test_a_catch_up_asked_for_while_one_walked_is_not_called_done_by_the_walk_that_ends(tmp_path):
    """A catch-up asked for while one walked (a journal gap, the raw device written beside
    its loop): the walk that ended sent the agent its end MARK (the replica called consistent
    at its last seq, though what was asked for may be behind the walk) and cleared the ask's
    "compare it all", so a block entry's next catch-up compared only its dirty blocks (often
    none): the write beside the loop never reached the replica. Now the walk that ends says
    nothing to the agent and the next one compares everything."""
    from types import SimpleNamespace

    import trio

    from app.engine.capture import Capture
    from app.engine.journal import KIND_BLOCK
    marks = []
    cap = Capture(SimpleNamespace(key="/dev/test", kind="block"), None)
    cap.journal = Journal(str(tmp_path), kind=KIND_BLOCK)
    cap.target = SimpleNamespace(mark_consistent=marks.append)
    cap.remote, cap.reason = True, "test"
    cap._dirty_scope = {1}

    async def walk_ends_after_an_ask():
        cap._catch_up_wake = trio.Event()
        cap._full_pending = True  # as request_catch_up leaves it
        cap._catch_up_wake.set()
        return await cap._caught_up({"copied_bytes": 0})
    try:
        assert trio.run(walk_ends_after_an_ask)
    finally:
        cap.journal.close()
    assert marks == [] and cap._full_pending and not cap._dirty_scope


def test_a_tracker_keeps_walk_lists_only_while_a_walk_runs_and_folds_moved_names_at_its_limit():
    """A tracker held for days (a catch-up waiting for a target that is away) under
    applications that make and remove temporary names: `revisit` and `links` are kept only
    while a walk reads them; `moved` stays under its limit by standing a directory for the
    names below it, and no moved name is forgotten (each still counts as moved, after the
    epoch it was moved in and not before)."""
    t = sync.Tracker(moved_limit=8)
    t.observe((1, 1), "rename", {"old": "a", "new": "b", "flags": 0})
    t.observe((1, 1), "link", {"src": "b", "path": "c"})
    assert t.revisit == [] and t.links == []  # no walk: nothing anybody would read
    first = t.begin_walk()
    t.observe((1, 1), "rename", {"old": "b", "new": "d", "flags": 0})
    t.observe((1, 1), "link", {"src": "d", "path": "e"})
    second = t.begin_walk()  # a second walk beside the first reads from its own start
    t.observe((1, 1), "rename", {"old": "d", "new": "f", "flags": 0})
    assert first == (0, 0) and second == (2, 1) and t.revisit == [b"d", b"e", b"f"]
    assert t.links == [(b"d", b"e")]
    t.end_walk()
    assert t.revisit  # the first walk still reads them
    t.end_walk()
    assert t.revisit == [] and t.links == [] and t.walks == 0

    t, epochs = sync.Tracker(moved_limit=8), {}
    for i in range(40):  # temporary names churned in one directory, two names kept apart
        t.observe((1, 2), "unlink", {"path": f"spool/deep/tmp{i}"})
        epochs[f"spool/deep/tmp{i}".encode()] = t.names_epoch
        if i == 20:
            t.observe((1, 3), "rename", {"old": "keep/x", "new": "keep/y", "flags": 0})
            epochs[b"keep/x"], epochs[b"keep/y"] = t.names_epoch - 1, t.names_epoch
        assert len(t.moved) <= 8
    assert t.collapsed >= 1
    for name, epoch in epochs.items():
        assert t.name_touched(name) and t.name_touched(name, epoch - 1), name
    assert b"keep/x" in t.moved or b"keep" in t.moved  # the busy directory went first
    assert not t.name_touched(b"other/z") and not t.name_touched(b"spool/deep/tmp1", t.names_epoch)
    for i in range(200):  # names everywhere: at last the top stands for every name
        t.observe((1, 4), "unlink", {"path": f"d{i}/f"})
    assert len(t.moved) <= 8 and t.name_touched(b"anything/at/all")
    assert not t.name_touched(b"anything", t.names_epoch)


def test_a_catch_up_after_moved_names_were_folded_still_sends_every_name_whose_file_changed(
        tmp_path):
    """Two files of one size and one mtime swapped names by renames while capture was
    held for a catch-up (size and times compare equal: only the moved names say the target's
    files there are not the source's), then a churn of temporary names filled the tracker
    past its limit and folded its names: the walk still sends both swapped names whole."""
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    for top in (src, tgt):
        (top / "keep").mkdir(parents=True)
        (top / "spool").mkdir()
        (top / "keep" / "x").write_bytes(b"AAAA")
        (top / "keep" / "y").write_bytes(b"BBBB")
        for name in ("x", "y"):
            os.utime(top / "keep" / name, ns=(1_000_000_000, 1_000_000_000))
    sink = CaptureBesideTheWalk(src, tgt)
    sink.tracker = sync.Tracker(moved_limit=8)
    keep = os.lstat(src / "keep")
    for old, new in (("x", "t"), ("y", "x"), ("t", "y")):  # (capture: the target does not see
        os.rename(src / "keep" / old, src / "keep" / new)  # them, the queue was dropped)
        sink.tracker.observe((keep.st_dev, keep.st_ino), "rename",
                             {"old": f"keep/{old}", "new": f"keep/{new}", "flags": 0})
    spool = os.lstat(src / "spool")
    for i in range(60):
        (src / "spool" / f"tmp{i}").write_bytes(b"t")
        os.unlink(src / "spool" / f"tmp{i}")
        sink.tracker.observe((spool.st_dev, spool.st_ino), "unlink", {"path": f"spool/tmp{i}"})
    assert sink.tracker.collapsed >= 1 and len(sink.tracker.moved) <= 8
    sink.walk()
    assert (tgt / "keep" / "x").read_bytes() == b"BBBB"
    assert (tgt / "keep" / "y").read_bytes() == b"AAAA"
    assert sorted(os.listdir(tgt / "spool")) == [] and sink.target.errors == 0


def test_a_local_shipper_takes_a_trickle_of_records_in_batches_not_one_at_a_time(tmp_path, monkeypatch):
    """An application that writes small records keeps the shipper of a local target just
    ahead of it: woken for every record, it applied them one by one, and the applier and the
    FUSE request loop took the GIL from each other at every record. After a small batch it
    lets the next records gather (LINGER_SECONDS) before it reads again: every record still
    arrives, in order, in a fraction of the batches."""
    from app.engine import shipper as shipper_mod
    from app.engine.shipper import Shipper
    # The writer's sleep(0.0005) oversleeps on a busy host (1-2 ms at load 12): with the real
    # LINGER_SECONDS (2 ms) records then came about as fast as the linger and 101 batches
    # failed the bound below (CI=true under bench/busy_host.py and two CPU hogs). A linger ten
    # times the writer's pace keeps the test about gathering, not about the host's timers.
    monkeypatch.setattr(shipper_mod, "LINGER_SECONDS", 0.02)
    j = Journal(tmp_path / "j", kind=KIND_FS)
    batches: list[list[int]] = []

    class Target:
        def open(self):
            return None

        def send(self, records):
            batches.append([r.seq for r in records])

        def flush(self):
            return None
    sh = Shipper(j, Target(), local=True)
    sh.start()
    try:
        for i in range(200):  # a record every half millisecond or so
            j.append("write", {"path": "f", "offset": i}, b"x")
            time.sleep(0.0005)
        deadline = time.monotonic() + 10
        while sum(map(len, batches)) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sh.stop()
    assert [s for b in batches for s in b] == list(range(1, 201))
    assert len(batches) <= 100, [len(b) for b in batches]  # one at a time made about 200


def test_a_busy_local_shipper_makes_the_target_durable_several_times_a_second(tmp_path):
    """While records keep coming, a local target is synced (and the journal released up to
    it) every PERSIST_SECONDS, not only when the queue runs dry. Once a second, the oldest
    record not yet durable on the target was up to a second and a half old in a steady stream
    (bench/apps.py lag: p50 0.57 s, p99 1.10 s at half the capture's maximum rate)."""
    from app.engine.shipper import PERSIST_SECONDS, Shipper
    assert PERSIST_SECONDS <= 0.25
    j = Journal(tmp_path / "j", kind=KIND_FS)
    flushes: list[tuple[float, int]] = []

    class Target:
        def open(self):
            return None

        def send(self, records):
            return None

        def flush(self):
            flushes.append((time.monotonic(), j.sent_seq))

    sh = Shipper(j, Target(), local=True)
    sh.start()
    try:
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < 1.5:  # a steady stream: the queue never runs dry for long
            n += 1
            j.append("write", {"path": "f", "offset": n}, b"x" * 512)
            time.sleep(0.001)
        busy_until = time.monotonic()
        deadline = busy_until + 10
        while j.released_seq < n and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sh.stop()
    assert j.released_seq == n  # everything reached the target and was released after a flush
    during = [t for t, _ in flushes if t < busy_until]
    assert len(during) >= 4, [round(t - start, 3) for t, _ in flushes]  # once a second made 1


@pytest.mark.parametrize("memory, limit", [(2 << 20, None), (64 << 20, 2 << 20)],
                         ids=["memory", "queue-limit"])
def test_a_busy_local_shipper_flushes_before_applied_records_fill_the_queue(tmp_path, monkeypatch,
                                                                            memory, limit):
    """Records a local target has applied stay queued until its next flush releases them.
    Flushed only every PERSIST_SECONDS, a fast writer filled the journal's memory with them
    and every append from then on spilled the whole queue to a segment file (encoded,
    checksummed, written) in the capture's request loop: a 64 KiB fio on a captured loop
    spent a third of its samples there. With a queue limit smaller than that, the journal went
    "behind" (its dirty map, then a resync) although the target kept up. The shipper also
    flushes once FLUSH_SHARE of the smaller of the two was applied since the last flush: the
    queue does not fill, nothing spills, nothing is dropped."""
    from app.engine import shipper as shipper_mod
    from app.engine.shipper import FLUSH_SHARE, Shipper
    monkeypatch.setattr(shipper_mod, "PERSIST_SECONDS", 60.0)  # only the share can flush while busy
    room = min(memory, limit or memory)
    j = Journal(tmp_path / "j", kind=KIND_FS, memory_bytes=memory, limit_bytes=limit)
    spilled: list[int] = []
    write_run = j._write_run

    def counted(records, encoded):
        spilled.extend(r.seq for r in records)
        return write_run(records, encoded)
    monkeypatch.setattr(j, "_write_run", counted)
    flushes: list[int] = []

    class Target:
        def open(self):
            return None

        def send(self, records):
            time.sleep(0.005)  # a batch takes a while: the queue does not run dry meanwhile

        def flush(self):
            flushes.append(j.sent_seq)

    sh = Shipper(j, Target(), local=True)
    sh.start()
    n, data = 0, b"x" * 4096
    try:
        while n < 4000:  # 16 MiB, eight times the memory, about 8 records a millisecond
            n += 1
            j.append("write", {"path": "f", "offset": n * 4096}, data)
            if n % 8 == 0:
                time.sleep(0.001)
        deadline = time.monotonic() + 10
        while j.released_seq < j.last_seq and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sh.stop()
    assert j.dropped == 0 and not j.behind, f"{j.dropped} records dropped; flushes after seqs {flushes}"
    assert j.released_seq == n
    assert spilled == [], f"{len(spilled)} records spilled to disk; flushes after seqs {flushes}"
    assert len(flushes) >= 16 * room // (FLUSH_SHARE * room) // 8, flushes  # ~32 (old rule: 1)


class _SeqsTarget:
    """A local target that keeps the seqs it was sent, in order (`got`)."""

    def __init__(self):
        self.got: list[int] = []

    def open(self):
        return None

    def send(self, records):
        self.got.extend(r.seq for r in records)

    def flush(self):
        return None

    def until(self, n: int, seconds: float = 10) -> bool:
        """Wait up to `seconds` for `n` records to have arrived."""
        deadline = time.monotonic() + seconds
        while len(self.got) < n and time.monotonic() < deadline:
            time.sleep(0.002)
        return len(self.got) >= n


def test_after_large_records_a_local_shipper_goes_at_the_loops_first_park(tmp_path, monkeypatch):
    """An applier of large writes spends its time in pwrite, without the GIL: once its last
    batch's records were large (QUIET_UNDER_BYTES a record), it goes as soon as the request loop
    parks, however soon the loop wakes again; after small ones it waits for the loop to stay
    parked (QUIET_SECONDS)."""
    from app.engine import shipper as shipper_mod
    from app.engine.shipper import Shipper
    monkeypatch.setattr(shipper_mod, "YIELD_SECONDS", 30.0)  # only the conditions can end a wait
    monkeypatch.setattr(shipper_mod, "QUIET_SECONDS", 0.2)
    j = Journal(tmp_path / "j", kind=KIND_FS)
    target = _SeqsTarget()
    got, until = target.got, target.until

    class Loop:
        idle = threading.Event()
        wakeups = 0

    def flicker(seconds: float, until_got: int = 0) -> None:  # parks for moments between requests
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (until_got and len(got) >= until_got):
            Loop.idle.set()
            time.sleep(0.01)
            Loop.idle.clear()
            Loop.wakeups += 1
            time.sleep(0.005)

    sh = Shipper(j, target, local=True, loop=Loop)
    sh.start()
    try:
        big = b"x" * shipper_mod.QUIET_UNDER_BYTES
        j.append("write", {"path": "f", "offset": 0}, big)
        Loop.idle.set()
        assert until(1, 5)  # the first park, which lasted
        Loop.idle.clear()
        time.sleep(0.1)
        j.append("write", {"path": "f", "offset": 0}, big)
        flicker(5, until_got=2)
        assert got == [1, 2]  # large records: a park of 10 ms was enough
        j.append("write", {"path": "f", "offset": 0}, b"x")
        flicker(5, until_got=3)  # (the last batch was large: this one goes at a park too)
        assert got == [1, 2, 3]
        j.append("write", {"path": "f", "offset": 0}, b"x")
        flicker(0.6)
        assert got == [1, 2, 3]  # small records: the 10 ms parks were not quiet enough
        Loop.idle.set()
        assert until(4, 5)
    finally:
        sh.stop()


def test_a_local_shipper_yields_to_a_busy_request_loop_unless_much_waits_or_someone_waits(tmp_path, monkeypatch):
    """The applier of a local target and the capture's request loop take the GIL in turn.
    While the loop answers requests (its session's `idle` clear), or parks only for moments
    between them (woken again within QUIET_SECONDS), the shipper waits before it applies a few
    records; it does not wait when many records wait (YIELD_UNDER), when a drain or
    wait_applied waits for it, or once the loop stays parked."""
    from app.engine import shipper as shipper_mod
    from app.engine.shipper import Shipper
    monkeypatch.setattr(shipper_mod, "YIELD_SECONDS", 30.0)  # only the conditions can end a wait
    monkeypatch.setattr(shipper_mod, "YIELD_UNDER", 100)
    monkeypatch.setattr(shipper_mod, "QUIET_SECONDS", 0.2)  # a busy host cannot flicker the loop faster than 1 ms
    j = Journal(tmp_path / "j", kind=KIND_FS)
    target = _SeqsTarget()
    got, until = target.got, target.until

    class Loop:  # the parts of fusewire.Session the shipper looks at
        idle = threading.Event()  # clear: the loop is answering requests
        wakeups = 0
    busy = Loop.idle
    sh = Shipper(j, target, local=True, loop=Loop)
    sh.start()
    try:
        for i in range(10):
            j.append("write", {"path": "f", "offset": i}, b"x")
        assert not until(10, 0.3) and got == []  # a few records wait while the loop is busy
        flicker_until = time.monotonic() + 0.5
        while time.monotonic() < flicker_until:  # it parks for moments between requests
            busy.set()
            time.sleep(0.01)  # (QUIET_SECONDS is 0.2 here)
            busy.clear()
            Loop.wakeups += 1
            time.sleep(0.005)
        assert got == []
        busy.set()  # the loop parks and stays parked
        assert until(10)
        busy.clear()
        time.sleep(0.1)  # the shipper is back in a wait for the loop
        for i in range(150):  # more than YIELD_UNDER: it applies them without waiting for the loop
            j.append("write", {"path": "f", "offset": i}, b"x")
        assert until(160, 5)
        for i in range(5):
            j.append("write", {"path": "f", "offset": i}, b"x")
        time.sleep(0.1)
        assert len(got) == 160
        assert sh.wait_applied(j.last_seq, 10)  # a wait_applied ends the shipper's wait
        for i in range(5):
            j.append("write", {"path": "f", "offset": i}, b"x")
        assert sh.stop(drain_seconds=10)  # a drain does not wait for the loop either
    finally:
        sh.stop()
    assert got == list(range(1, j.last_seq + 1))


@pytest.mark.parametrize("target_holds", [5, 3])
def test_a_skip_over_reserved_seqs_is_not_said_to_be_records_the_target_lost(
        tmp_path, caplog, target_holds):
    """Found by a walk: after `kill -9` of a capture worker the log said `ERROR the target lost
    records 69071..1117586; a resync replaces them`, though the target lacked nothing: the new
    capture had skipped to the seqs the dead one reserved ahead (journal.skip_to), none of which
    was ever a record here. That is said as what it is (INFO); the ERROR stays for a target that
    lacks records this journal held (here: holds 3 of 5)."""
    import logging

    from app.engine.shipper import Shipper
    from app.engine.target import Positions

    class Remote:
        on_positions = None

        def __init__(self):
            self.pos = Positions(target_holds, target_holds)
            self.skipped_to = None

        def open(self):
            return self.pos

        def skip_to(self, seq):
            self.skipped_to = seq

    j = Journal(tmp_path, kind=KIND_FS)
    for i in range(5):
        j.append("write", {"path": "f", "offset": i}, b"x")
    j.release(target_holds)
    j.skip_to(1005)  # a capture after an unclean stop: above the dead one's reservation
    target, gaps = Remote(), []
    ship = Shipper(j, target, on_gap=gaps.append, local=False)
    with caplog.at_level(logging.INFO, logger="mirrorsetup"):
        ship._connect()
    j.close()
    [gap] = gaps
    assert (gap.expected, gap.found) == (target_holds + 1, 1005) and target.skipped_to == 1005
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "1005" in r.getMessage()]
    if target_holds == 5:
        assert said == [("INFO", "seqs 6..1005 were reserved ahead by the previous capture, which "
                         "did not stop cleanly, and no record of them is here or on the target: "
                         "skipped; the catch-up compares the data with the replica")], said
    else:
        assert said == [("ERROR", "the target lost records 4..1005; a resync replaces them")], said


def test_a_times_record_a_later_one_of_the_same_batch_replaces_is_not_applied(tmp_path):
    """A directory's times are recorded after every change in it and a file's at each close:
    of several `times` records of one name in a batch only the last is applied, unless the
    name was made, removed or moved in between (then each is its own node's), or the earlier
    one sets the access time and the later one does not. The target ends with the same times."""
    tgt = tmp_path / "tgt"
    (tgt / "d").mkdir(parents=True)
    for name in ("a", "b", "p"):
        (tgt / "d" / name).write_text(name)
    T = 1_600_000_000_000_000_000
    recs = [("times", {"path": "d", "atime": None, "mtime": T + 1}),          # 1 replaced by 3
            ("unlink", {"path": "d/a"}),                                      # 2 (a name in d)
            ("times", {"path": "d", "atime": None, "mtime": T + 3}),          # 3 a rename follows
            ("rename", {"old": "d/b", "new": "d/e", "flags": 0}),             # 4
            ("times", {"path": "d/e", "atime": None, "mtime": T + 5}),        # 5 replaced by 6
            ("times", {"path": "d/e", "atime": T, "mtime": T + 6}),           # 6 replaced by 7,
            ("times", {"path": "d/e", "atime": None, "mtime": T + 7}),        # 7 ... which takes its atime
            ("times", {"path": "d/p", "atime": None, "mtime": T + 8}),        # 8 p removed, made again
            ("unlink", {"path": "d/p"}),                                      # 9
            ("create", {"path": "d/p", "mode": 0o644, "uid": 0, "gid": 0}),    # 10
            ("times", {"path": "d/p", "atime": None, "mtime": T + 11}),       # 11
            ("times", {"path": "d", "atime": None, "mtime": T + 12}),         # 12 replaced by 13
            ("times", {"path": "d", "atime": None, "mtime": T + 13})]         # 13
    batch = [Record(seq, KIND_FS, op, args) for seq, (op, args) in enumerate(recs, 1)]
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    target = LocalDirTarget.on_fd(fd, str(tgt))
    applied = []
    real_apply, real_run = target.applier.apply, target.applier.apply_run
    target.applier.apply = lambda rec: (applied.append(rec.seq), real_apply(rec))

    def run(records, start, skip=None, instead=None):  # the compiled runs' records too
        end = real_run(records, start, skip, instead)
        applied.extend(records[k].seq for k in range(start, end) if not (skip and k in skip))
        return end
    target.applier.apply_run = run
    try:
        target.send(batch)
        target.flush()
    finally:
        target.close()
    assert applied == [2, 3, 4, 7, 8, 9, 10, 11, 13]
    assert target.errors == 0, target.last_error
    assert os.stat(tgt / "d").st_mtime_ns == T + 13
    e = os.stat(tgt / "d" / "e")
    assert (e.st_atime_ns, e.st_mtime_ns) == (T, T + 7)  # 6's atime, 7's mtime
    assert os.stat(tgt / "d" / "p").st_mtime_ns == T + 11 and not (tgt / "d" / "a").exists()
    assert batch[6].args["atime"] is None  # the record itself is left as it was


def test_a_full_target_between_a_skipped_times_record_and_its_replacement_takes_it_again(tmp_path):
    """The target fills up after a times record that a later one replaces was skipped: shipping
    resumes from that skipped record, not after it (else the access time it gave the later one
    was lost: the later one comes again alone)."""
    from app.engine.shipper import TargetUnavailable
    tgt = tmp_path / "tgt"
    (tgt / "d").mkdir(parents=True)
    (tgt / "d" / "f").write_text("f")
    T = 1_600_000_000_000_000_000
    batch = [Record(10, KIND_FS, "chmod", {"path": "d/f", "mode": 0o600}),
             Record(11, KIND_FS, "times", {"path": "d/f", "atime": T, "mtime": T}),
             Record(12, KIND_FS, "write", {"path": "d/f", "offset": 0}, b"x"),
             Record(13, KIND_FS, "times", {"path": "d/f", "atime": None, "mtime": T + 1})]
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    target = LocalDirTarget.on_fd(fd, str(tgt))
    real_apply = target.applier.apply

    def full_at_the_write(rec):
        if rec.op == "write":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_apply(rec)
    real_run = target.applier.apply_run

    def run_stops_at_the_write(records, start, skip=None, instead=None):  # as a failed one does
        w = next((k for k in range(start, len(records)) if records[k].op == "write"), len(records))
        return real_run(records[:w], start, skip, instead)
    target.applier.apply = full_at_the_write
    target.applier.apply_run = run_stops_at_the_write
    try:
        with pytest.raises(TargetUnavailable) as exc:
            target.send(batch)
        assert exc.value.taken == 10  # 11 goes again
        target.applier.apply, target.applier.apply_run = real_apply, real_run
        target.send(batch[1:])
    finally:
        target.close()
    f = os.stat(tgt / "d" / "f")
    assert (f.st_atime_ns, f.st_mtime_ns) == (T, T + 1)


@pytest.mark.skipif(not getattr(lowlevel_compiled(), "fs_apply_run", None),
                    reason="app.engine._fuseread is not built (needs a C compiler and Python's headers)")
def test_a_directory_appliers_compiled_run_applies_single_call_records_and_stops_where_one_fails(
        tmp_path, tmpfs_mount):
    """Files made, written, removed, their times, chmod and chown go in runs with one GIL
    release (applier.apply_run): the target ends as record by record, a file made and removed
    within a run is not kept open, a symlink's chmod is left to `apply` (which leaves the
    symlink alone), and a target that fills up mid-run pauses at the write it could not take,
    resuming from there once there is room."""
    from app.engine.shipper import TargetUnavailable
    tgt = tmpfs_mount(tmp_path / "tgt")  # 16 MiB
    T = 1_600_000_000_000_000_000
    # (numbered in order below)
    batch = [Record(0, KIND_FS, "mkdir", {"path": "d", "mode": 0o755, "uid": 0, "gid": 0}),
             Record(0, KIND_FS, "create", {"path": "d/f", "mode": 0o644, "uid": 0, "gid": 0}),
             Record(0, KIND_FS, "write", {"path": "d/f", "offset": 0}, b"a" * 4096),
             Record(0, KIND_FS, "chown", {"path": "d/f", "uid": 1234, "gid": 5678}),
             Record(0, KIND_FS, "chmod", {"path": "d/f", "mode": 0o4750}),
             Record(0, KIND_FS, "times", {"path": "d/f", "atime": T - 7, "mtime": T}),
             Record(0, KIND_FS, "symlink", {"path": "d/l", "target": "f", "uid": 0, "gid": 0}),
             Record(0, KIND_FS, "chmod", {"path": "d/l", "mode": 0o777}),
             Record(0, KIND_FS, "times", {"path": "d", "atime": None, "mtime": T + 1}),
             Record(0, KIND_FS, "create", {"path": "big", "mode": 0o600, "uid": 0, "gid": 0})]
    batch[8:8] = [Record(0, KIND_FS, "create", {"path": "d/g", "mode": 0o600, "uid": 0, "gid": 0}),
                  Record(0, KIND_FS, "write", {"path": "d/g", "offset": 0}, b"g"),
                  Record(0, KIND_FS, "unlink", {"path": "d/g"}),  # made and removed in one run
                  Record(0, KIND_FS, "unlink", {"path": "d/never"}),  # (gone already: no error)
                  Record(0, KIND_FS, "create", {"path": "d/h", "mode": 0o600, "uid": 0, "gid": 0}),
                  Record(0, KIND_FS, "write", {"path": "d/h", "offset": 0}, b"old"),
                  Record(0, KIND_FS, "unlink", {"path": "d/h"}),
                  Record(0, KIND_FS, "create", {"path": "d/h", "mode": 0o640, "uid": 0, "gid": 0}),
                  Record(0, KIND_FS, "write", {"path": "d/h", "offset": 0}, b"new")]  # made again
    chunk = b"z" * (4 << 20)
    batch += [Record(0, KIND_FS, "write", {"path": "big", "offset": k * len(chunk)}, chunk)
              for k in range(5)]  # 20 MiB: the fourth or fifth does not fit
    for seq, rec in enumerate(batch, 1):
        rec.seq = seq
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    target = LocalDirTarget.on_fd(fd, str(tgt))
    by_python = []
    real_apply = target.applier.apply
    target.applier.apply = lambda rec: (by_python.append(rec.seq), real_apply(rec))
    try:
        with pytest.raises(TargetUnavailable) as exc:
            target.send(batch)
        assert exc.value.state.startswith("paused: target full")
        taken = exc.value.taken
        assert 21 <= taken < 24, taken  # a write of big did not fit: from there on again
        # the rest went in compiled runs: the symlink's chmod is `apply`'s (it leaves it alone)
        assert by_python == [1, 7, 8, taken + 1], by_python
        assert sorted(target.applier._fds) == [b"big", b"d/f", b"d/h"]
        assert not (tgt / "d" / "g").exists() and (tgt / "d" / "h").read_bytes() == b"new"
        assert stat.S_IMODE(os.stat(tgt / "d" / "h").st_mode) == 0o640
        f = os.lstat(tgt / "d" / "f")
        assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_gid) == (0o4750, 1234, 5678)
        assert (f.st_atime_ns, f.st_mtime_ns, f.st_size) == (T - 7, T, 4096)
        assert os.path.islink(tgt / "d" / "l") and os.readlink(tgt / "d" / "l") == "f"
        assert os.stat(tgt / "d").st_mtime_ns == T + 1
        target.close_files()
        os.truncate(tgt / "big", 0)  # room again: the rest comes
        target.send([r for r in batch if r.seq > taken])
        target.flush()
    finally:
        target.close()
    assert os.path.getsize(tgt / "big") == 20 << 20 and target.errors == 0, target.last_error


@pytest.mark.skipif(not getattr(lowlevel_compiled(), "fs_apply_run", None),
                    reason="app.engine._fuseread is not built (needs a C compiler and Python's headers)")
def test_the_agents_applier_puts_a_walks_files_in_compiled_runs_after_its_path_checks(tmp_path):
    """A first copy over the link is mostly puts (a walk's whole small files): the agent's
    applier (ConfinedFsApplier) applies them in compiled runs, each record's path checked
    first. What `apply` alone did stays its: a name already there (a file, a directory's
    tree) is removed and made anew, a path through a symlink is refused and nothing is
    written outside the replica, a put over a checked directory ends the run (its checks
    are forgotten). The target is what record by record made."""
    from app.engine.agent import ConfinedFsApplier
    tgt, outside = tmp_path / "tgt", tmp_path / "outside"
    (tgt / "d" / "tree" / "sub").mkdir(parents=True)
    (tgt / "d" / "tree" / "sub" / "x").write_text("x")
    (tgt / "d" / "old").write_text("an old file, longer than the new one")
    outside.mkdir()
    os.symlink(outside, tgt / "esc")
    T = 1_600_000_000_000_000_000

    def put(path, data, size=None, times=True, mode=0o640):
        args = {"path": path, "mode": mode, "uid": 1234, "gid": 5678,
                "size": len(data) if size is None else size}
        if times:
            args.update(atime=T - 5, mtime=T)
        return Record(0, KIND_FS, "put", args, data)
    batch = [put("d/a", b"a" * 5000),                                                  # 1
             put("d/sparse", b"s", size=1 << 20, times=False),                         # 2
             Record(0, KIND_FS, "write", {"path": "d/a", "offset": 5000}, b"tail"),    # 3
             put("d/old", b"new"),                                                     # 4 there
             put("d/b", b"", mode=0o4750),                                             # 5
             put("d/tree", b"was a tree"),                                             # 6 a tree
             put("d/c", b"c"),                                                         # 7
             put("esc/evil", b"escaped"),                                              # 8 refused
             put("d", b"over a checked directory"),                                    # 9
             Record(0, KIND_FS, "times", {"path": "", "atime": None, "mtime": T})]     # 10
    for seq, rec in enumerate(batch, 1):
        rec.seq = seq
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    target = LocalDirTarget.on_fd(fd, str(tgt))
    target.applier = ConfinedFsApplier(fd)
    by_python = []
    real_apply = target.applier.apply
    target.applier.apply = lambda rec: (by_python.append(rec.seq), real_apply(rec))
    try:
        target.send(batch)
        target.flush()
    finally:
        target.close()
    assert by_python == [4, 6, 8, 9], by_python
    assert target.errors == 1 and "seq 8" in target.last_error, target.last_error
    assert os.listdir(outside) == []
    assert (tgt / "d").read_bytes() == b"over a checked directory"  # (record 9: the tree went)
    # what 1-7 made, seen before 9 took the directory: a second run of the batch up to 7
    (tgt / "d").unlink()
    (tgt / "d").mkdir()
    fd = os.open(tgt, os.O_PATH | os.O_DIRECTORY)
    target = LocalDirTarget.on_fd(fd, str(tgt))
    target.applier = ConfinedFsApplier(fd)
    try:
        target.send(batch[:7])
        target.flush()
    finally:
        target.close()
    a = os.stat(tgt / "d" / "a")
    assert (tgt / "d" / "a").read_bytes() == b"a" * 5000 + b"tail"
    assert (stat.S_IMODE(a.st_mode), a.st_uid, a.st_gid) == (0o640, 1234, 5678)
    assert (a.st_atime_ns, a.st_mtime_ns) != (T - 5, T)  # the write after the put moved them
    s = os.stat(tgt / "d" / "sparse")
    assert s.st_size == 1 << 20 and s.st_blocks * 512 < 1 << 20 and s.st_mtime_ns != T
    assert (tgt / "d" / "old").read_bytes() == b"new" and (tgt / "d" / "tree").read_bytes() == b"was a tree"
    b = os.stat(tgt / "d" / "b")
    assert (stat.S_IMODE(b.st_mode), b.st_size, b.st_uid) == (0o4750, 0, 1234)  # set-ID after the chown
    c = os.stat(tgt / "d" / "c")
    assert (c.st_atime_ns, c.st_mtime_ns) == (T - 5, T)


@pytest.mark.skipif(not getattr(lowlevel_compiled(), "fs_apply_run", None),
                    reason="app.engine._fuseread is not built (needs a C compiler and Python's headers)")
def test_a_compiled_run_refuses_ops_it_cannot_do_and_then_does_none(tmp_path):
    """An op list the applier never makes (a write to a file no earlier create of the run
    makes, an unknown op, a name with a NUL) is a ValueError before anything is done."""
    run = lowlevel_compiled().fs_apply_run
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        for bad in ([(4, b"a", 0o600, 0, 0), (0, -2, 0, b"x")],  # op 1 is no create
                    [(0, -1, 0, b"x"), (4, b"a", 0o600, 0, 0)],  # a create after the write
                    [(4, b"a", 0o600, 0, 0), (9, b"b")],
                    [(4, b"a", 0o600, 0, 0), (5, b"b\0c")]):
            with pytest.raises(ValueError):
                run(fd, bad)
            assert os.listdir(tmp_path) == []
        done, err, made = run(fd, [(4, b"a", 0o600, 0, 0), (0, -1, 0, b"x")])
        for _, kept in made:
            os.close(kept)
        assert (done, err, len(made)) == (2, 0, 1)
    finally:
        os.close(fd)
    assert (tmp_path / "a").read_bytes() == b"x"


def test_a_walk_reads_each_files_extended_attributes_once_after_its_check(tmp_path, monkeypatch):
    """A first copy read every entry's extended attributes twice: in the directory's listing
    (never used: what a record states of a path's metadata is read again after its check's
    stamp) and again for the record. A listxattr through /proc per entry less; the replica
    still gets them."""
    from collections import Counter
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    (src / "d").mkdir(parents=True)
    tgt.mkdir()
    for i in range(5):
        (src / "d" / f"f{i}").write_bytes(b"x" * i)
    os.setxattr(src / "d" / "f3", "user.k", b"v3")
    os.setxattr(src / "d", "user.dk", b"dv")
    read = Counter()
    real = sync.lstat_info

    def counted(dir_fd, rel, *, with_xattrs=True):
        if with_xattrs:
            read[rel] += 1
        return real(dir_fd, rel, with_xattrs=with_xattrs)
    monkeypatch.setattr(sync, "lstat_info", counted)
    sink = CaptureBesideTheWalk(src, tgt)
    sink.walk()
    # (none by name: read through the file the walk opened, see the test below)
    assert {rel: n for rel, n in read.items() if rel.startswith(b"d/")} == {}
    assert os.getxattr(tgt / "d" / "f3", "user.k") == b"v3"
    assert os.getxattr(tgt / "d", "user.dk") == b"dv"
    assert [(tgt / "d" / f"f{i}").read_bytes() for i in range(5)] == [b"x" * i for i in range(5)]


def test_a_walk_reads_a_files_extended_attributes_through_the_file_it_opened(tmp_path, monkeypatch):
    """A file's extended attributes went by name through /proc (listxattr 7.9 us, on the fd
    0.8: a tenth of a first copy's walk); now through the file the walk opened to read its
    data, after the name was looked at again, so both come from one file."""
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    (src / "d").mkdir(parents=True)
    tgt.mkdir()
    (src / "d" / "f").write_bytes(b"data")
    (src / "d" / "big").write_bytes(b"b" * (sync.BLOCK + 5))
    for name in ("f", "big"):
        os.setxattr(src / "d" / name, "user.k", name.encode())
    os.setxattr(src / "d" / "f", "trusted.t", b"t")
    os.setxattr(src / "d", "user.dk", b"dv")
    how = []
    real = sync._xattrs

    def seen(path):
        how.append(type(path).__name__)
        return real(path)
    monkeypatch.setattr(sync, "_xattrs", seen)
    sink = CaptureBesideTheWalk(src, tgt)
    sink.walk()
    assert how.count("int") == 2  # the two files; the directories by name
    for name in ("f", "big"):
        assert os.getxattr(tgt / "d" / name, "user.k") == name.encode()
        assert (tgt / "d" / name).read_bytes() == (src / "d" / name).read_bytes()
    assert os.getxattr(tgt / "d" / "f", "trusted.t") == b"t"
    assert os.getxattr(tgt / "d", "user.dk") == b"dv"


def test_a_replicas_state_saved_by_two_threads_at_once_is_written_whole_each_time(tmp_path):
    """An agent's session reader (a MARK) and its applier (consistent once applied) both save
    the replica's state, through the same temporary file: the second rename found it gone and
    the agent ended with FileNotFoundError (seen as a traceback in test_remote's source-crash
    test on a loaded host)."""
    import json as json_
    from app.engine.agent import Replica
    root = tmp_path / "root"
    root.mkdir()
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        rep = Replica(fd, str(root), "data", "fs")
        errors = []

        def saver(n: int) -> None:
            state = {"writer": n}
            try:
                for i in range(150):
                    state["i"] = i
                    rep.save(state)
            except Exception as exc:
                errors.append(exc)
        threads = [threading.Thread(target=saver, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.close(fd)
    assert errors == []
    assert json_.loads((rep.dir / "state.json").read_text())["i"] == 149


@pytest.mark.root
def test_a_state_file_replaced_is_on_the_disk_when_the_write_returns(tmp_path, scratch_loop):
    """write_small_file (a switch-over marker, a replica's role and generation, a capture's
    end): temp file, fsync, rename. The rename stayed in the page cache until the file
    system's next commit (ext4: 5 s by default, here 60 s), so a crash in between lost the new
    state: a switch-over marker lost lets the source capture again while its replica is
    primary. The directory is fsync'd now. A power cut is stood in for by a copy of the loop's
    backing file, replayed by e2fsck (test_engine_fs._names_on_disk)."""
    from app.engine.journal import write_small_file
    from test_engine_fs import _names_on_disk, ext4_committing_late
    with ext4_committing_late(scratch_loop, tmp_path / "state") as image:
        write_small_file(tmp_path / "state", "switched", '{"state": "switched"}\n')
        on_disk = _names_on_disk(image, tmp_path, "switched")
        assert "switched" in on_disk and "switched.tmp" not in on_disk, on_disk
