"""Block capture end to end: a real daemon, real loop devices, real FUSE, real ext4.

The "disk" is a loop device over a sparse file (tests/conftest.py `disks`); the daemon holds it
exclusively and attaches a second loop over its capture file; the target is a plain file.
Witnesses: the target's bytes, the raw device's bytes, /proc/self/mountinfo, sysfs via losetup.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import losetup_json, run
from test_engine_support import REPO, Engine, block_mounts, said_while_stopped, write_config

from app.cli import build_parser, command_of

pytestmark = pytest.mark.root
MiB = 1 << 20


def sha(path: str, offset: int = 0, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size if size is not None else float("inf")
        while left > 0 and (chunk := f.read(int(min(MiB, left)))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def ours(disk: str, tmp_path) -> list[dict]:
    """The loops over this test's disk or its files (other users of the host's loops ignored)."""
    return [d for d in losetup_json() if d["back-file"] == disk or (d["back-file"] or "").startswith(str(tmp_path))]


def backing_of(loop: str) -> str | None:
    for d in losetup_json():
        if d["name"] == loop:
            return d["back-file"]
    return None


@pytest.fixture
def block_engine(tmp_path, disks):
    """make(**entry) -> (engine, disk, target, config): one block entry, daemon started."""
    made: list[Engine] = []

    def make(size: int = 64 * MiB, *, start: bool = True, disk: str | None = None, **entry):
        disk = disk or disks(size)
        target = str(tmp_path / "target.img")
        cfg = write_config(tmp_path / "etc" / "replication.toml", [],
                           [{"device": disk, "target": target, **entry}])
        eng = Engine(tmp_path, cfg)
        made.append(eng)
        if start:
            eng.start()
        return eng, disk, target, cfg

    yield make
    for eng in made:
        eng.cleanup()
    assert not [m for m in block_mounts() if m.startswith(str(tmp_path))]


def cli(cfg, eng: Engine, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MIRRORSETUP_SOCKET": eng.socket}
    return subprocess.run([sys.executable, "-m", "app", "--config", str(cfg), *argv], cwd=REPO,
                          env=env, capture_output=True, text=True)


def test_ext4_on_the_captured_loop_replicates_byte_for_byte(block_engine, tmp_path):
    eng, disk, target, cfg = block_engine()
    st = eng.block(disk)
    loop = st["loop"]
    assert st["captured"] and loop and loop != disk
    assert backing_of(loop) == st["file"]  # the kernel's view: the loop is on our capture file
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mkfs.ext4", "-q", "-F", loop)
    run("mount", "-t", "ext4", loop, str(mnt))
    try:
        for i in range(20):
            (mnt / f"f{i}").write_bytes(os.urandom(64 * 1024 + i))
        for i in range(0, 20, 3):
            (mnt / f"f{i}").unlink()
        run("sync")
    finally:
        run("umount", str(mnt))
    st = eng.block_drain(disk)
    assert st["captured_ops"] > 0 and st["apply_errors"] == 0
    size = os.path.getsize(target)
    assert size == 64 * MiB
    assert sha(target) == sha(disk, 0, size)
    r = cli(cfg, eng, "--json", "block", "verify", disk)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"ranges": []' in r.stdout


def test_offset_and_sizelimit_window_only(block_engine, disks):
    disk = disks(32 * MiB)
    with open(disk, "r+b") as f:  # marks outside the window must never reach the target
        f.write(b"\xaa" * MiB)
        f.seek(9 * MiB)
        f.write(b"\xbb" * MiB)
        f.flush()
        os.fsync(f.fileno())
    eng, disk, target, cfg = block_engine(disk=disk, offset=MiB, sizelimit=8 * MiB)
    loop = eng.block(disk)["loop"]
    assert int(run("blockdev", "--getsize64", loop).stdout) == 8 * MiB
    with pytest.raises(OSError) as resized:  # (it raised AttributeError inside: EIO, logged)
        os.truncate(eng.block(disk)["file"], MiB)
    assert resized.value.errno == errno.EPERM
    with open(loop, "r+b", buffering=0) as f:
        f.write(b"\x11" * MiB)
        f.seek(7 * MiB)
        f.write(b"\x22" * MiB)
        with pytest.raises(OSError) as past:
            f.write(b"\x33" * 4096)  # at 8 MiB: the end of the window
        assert past.value.errno == errno.ENOSPC
        os.fsync(f.fileno())
    eng.block_drain(disk)
    assert os.path.getsize(target) == 8 * MiB
    data = open(target, "rb").read()
    assert data[:MiB] == b"\x11" * MiB and data[7 * MiB:] == b"\x22" * MiB
    assert b"\xaa" not in data and b"\xbb" not in data
    raw = open(disk, "rb").read()
    assert raw[:MiB] == b"\xaa" * MiB and raw[9 * MiB:10 * MiB] == b"\xbb" * MiB  # untouched
    assert raw[MiB:2 * MiB] == b"\x11" * MiB  # the window starts at the offset on the device


def test_a_window_edited_by_hand_while_captured_is_said_with_what_applies_it(block_engine, tmp_path):
    """A block entry's target and window changed in the file while its capture ran: status
    gave the new ones as the capture's own (target and offset), while the loop still served
    the old window into the old target. It now says what runs and that Detach all, then
    Attach all applies the file."""
    eng, disk, target, cfg = block_engine(offset=MiB)
    eng.block_drain(disk)
    elsewhere = str(tmp_path / "elsewhere.img")
    write_config(cfg, [], [{"device": disk, "target": elsewhere, "offset": 2 * MiB}])
    row = eng.block(disk)
    assert (row["target"], row["offset"]) == (target, MiB), row
    assert row["not_applied"] == {"target": [target, elsewhere], "offset": [MiB, 2 * MiB]}, row
    said = cli(cfg, eng, "status").stdout.replace("\n    ", " ")
    assert f"its capture replicates to {target} as the entry was when it started" in said, said
    assert f"offset {2 * MiB} (running: {MiB})" in said and "Detach all, then Attach all" in said
    assert "shrank" not in said and "grew" not in said, said  # measured by the running window


def test_raw_device_cannot_be_mounted_while_protected(block_engine, tmp_path):
    eng, disk, target, cfg = block_engine()
    loop = eng.block(disk)["loop"]
    run("mkfs.ext4", "-q", "-F", loop)
    (tmp_path / "raw").mkdir()
    r = run("mount", disk, str(tmp_path / "raw"), check=False)
    assert r.returncode != 0
    assert not [m for m in open("/proc/self/mountinfo") if str(tmp_path / "raw") in m]


def test_attach_of_a_mounted_raw_device_is_refused(block_engine, disks, tmp_path):
    disk = disks()
    run("mkfs.ext4", "-q", "-F", disk)
    mnt = tmp_path / "rawmnt"
    mnt.mkdir()
    run("mount", "-t", "ext4", disk, str(mnt))
    try:
        eng, disk, target, cfg = block_engine(disk=disk)
        r = cli(cfg, eng, "block", "attach-all")
        assert r.returncode == 2, r.stdout + r.stderr  # refused: nothing was changed
        assert f"mounted on {mnt}" in r.stderr and "bypass capture" in r.stderr
        assert eng.block(disk)["captured"] is False
        assert not os.path.exists(target)
    finally:
        run("umount", str(mnt))


def test_detach_reports_a_mounted_loop_and_a_pending_detach(block_engine, tmp_path):
    eng, disk, target, cfg = block_engine()
    loop = eng.block(disk)["loop"]
    run("mkfs.ext4", "-q", "-F", loop)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", "-t", "ext4", loop, str(mnt))
    try:
        r = cli(cfg, eng, "block", "detach-all")
        assert r.returncode == 2 and f"mounted on {mnt}" in r.stderr and "nothing was unmounted" in r.stderr
        assert any(str(mnt) in m for m in open("/proc/self/mountinfo"))
    finally:
        run("umount", str(mnt))
    holder = open(loop, "rb")  # an open loop: the kernel defers the detach to the last close
    try:
        r = cli(cfg, eng, "block", "detach-all")
        assert r.returncode == 0 and "detach pending" in r.stdout
        assert eng.block(disk)["pending_detach"] is True
        assert "detach pending" in cli(cfg, eng, "status").stdout
    finally:
        holder.close()
    capture_file = eng.block(disk)["file"]
    deadline = time.monotonic() + 10
    while eng.block(disk)["captured"]:
        assert time.monotonic() < deadline, "capture did not stop after the last close"
        time.sleep(0.1)
    assert backing_of(loop) != capture_file  # detached (the number may serve someone else now)
    assert not [m for m in block_mounts() if m.startswith(str(tmp_path))]


def test_status_warns_about_a_raw_writer_but_not_about_the_daemon(block_engine, tmp_path):
    eng, disk, target, cfg = block_engine()
    assert "open for writing" not in cli(cfg, eng, "status").stdout  # our worker holds it
    fd = os.open(disk, os.O_WRONLY)  # not exclusive: the kernel allows it; we can only warn
    try:
        out = cli(cfg, eng, "status").stdout
        assert f"(pid {os.getpid()}) has the raw device open for writing" in out
    finally:
        os.close(fd)


def test_daemon_takes_over_an_uncaptured_loop(block_engine, tmp_path):
    eng, disk, target, cfg = block_engine(start=False)
    r = cli(cfg, eng, "block", "attach-all")  # no daemon: a plain loop, said to be uncaptured
    assert r.returncode == 0 and "NOT captured" in r.stdout
    plain = [d["name"] for d in losetup_json() if d["back-file"] == disk]
    assert len(plain) == 1
    eng.start()
    st = eng.block(disk)
    assert st["captured"] and backing_of(st["loop"]) == st["file"]
    if st["loop"] != plain[0]:  # between detach and attach another user of the host took the
        # number (a busy host): then it must back something not ours, never the disk or ours
        assert backing_of(plain[0]) not in (disk, st["file"]), "the number was kept free for nobody"


def test_a_plain_loop_the_daemon_left_because_it_is_mounted_says_what_to_do(block_engine, tmp_path):
    """Found by helper-27's walk: a plain loop attached without the daemon and mounted, then the
    daemon started: it refused to take the loop over (it is in use), and status said only
    'attached without capture (daemon not running then)', with the daemon running and nothing
    of why it stayed uncaptured nor what to do."""
    eng, disk, target, cfg = block_engine(start=False)
    assert cli(cfg, eng, "block", "attach-all").returncode == 0
    (plain,) = [d["name"] for d in losetup_json() if d["back-file"] == disk]
    run("mkfs.ext4", "-q", "-F", plain)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", "-t", "ext4", plain, str(mnt))
    try:
        eng.start()
        warnings = json.loads(cli(cfg, eng, "status", "--json").stdout)["warnings"]
        said = [w["message"] for w in warnings if w["subject"] == disk]
        assert said == [f"{plain} is attached without capture: its writes are not replicated, and "
                        f"the daemon takes over only an idle loop: it is mounted on {mnt}; unmount "
                        "(or close) it, then Attach all"], warnings
    finally:
        run("umount", str(mnt))
    assert cli(cfg, eng, "block", "attach-all").returncode == 0  # as it says
    assert eng.block(disk)["captured"]


def test_a_capture_without_a_fixed_loop_leaves_the_loop_another_entry_keeps(disks, tmp_path):
    """Found by helper-27's walk on a busy host: the daemon attached the first entry's capture
    to the first free loop, /dev/loop40, the loop the next entry keeps; that entry then failed
    '/dev/loop40 is busy: attached to …/run/block/loop5-…/disk', its neighbour's capture."""
    from app.services import loop as loopdev
    first, second = disks(), disks()
    kept = loopdev.find_free()  # the first free loop now: the one the first capture would get
    cfg = write_config(tmp_path / "etc" / "replication.toml", [],
                       [{"device": first, "target": str(tmp_path / "first.img")},
                        {"device": second, "loop": kept, "target": str(tmp_path / "second.img")}])
    eng = Engine(tmp_path, cfg)
    try:
        eng.start()
        assert eng.block(first)["captured"] and eng.block(first)["loop"] != kept
        if not eng.block(second)["captured"]:  # a busy host: only another's loop may be in its way
            assert str(tmp_path) not in (backing_of(kept) or ""), eng.logtext()
        else:
            assert eng.block(second)["loop"] == kept
    finally:
        eng.cleanup()


WRITER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 65536)
buf.write(os.urandom(65536))
size, off = os.lseek(fd, 0, os.SEEK_END), 0
print("writing", flush=True)
while True:  # rewrite the device round and round until a write fails; print its errno
    try:
        os.pwrite(fd, buf, off)
    except OSError as exc:
        print(exc.errno, exc.strerror, flush=True)
        sys.exit(3)
    off = (off + 65536) % size
"""


def test_kill9_of_the_daemon_under_write_load_keeps_io_alive_and_is_taken_over(block_engine):
    eng, disk, target, cfg = block_engine()
    before = eng.block(disk)
    loop, worker = before["loop"], before["worker_pid"]
    writer = subprocess.Popen([sys.executable, "-c", WRITER, loop], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        time.sleep(0.5)
        eng.kill9()  # the daemon only: its capture worker goes on serving the loop
        out = cli(cfg, eng, "status").stdout
        assert f"{loop}: its capture goes on without a daemon" in out, out
        # its worker has the raw device open for writing: named ours by its command line, not
        # "bypassing" the loop (an error said about our own capture before)
        assert "has the raw device open for writing" not in out, out
        time.sleep(1)
        assert writer.poll() is None  # the application's writes never failed
        eng.start()
        st = eng.block(disk)
        assert st["captured"] and st["loop"] == loop and st["worker_pid"] == worker
        assert "took over the running capture" in eng.logtext()
        assert writer.poll() is None
    finally:
        writer.terminate()
        writer.wait()
    eng.block_drain(disk)
    assert eng.client.request("block_verify", device=disk)["ranges"] == []
    assert sha(target) == sha(disk)
    capture_file = eng.block(disk)["file"]
    assert eng.stop() == 0, eng.logtext()  # a clean stop detaches and ends the adopted worker too
    assert eng.workers() == [] and backing_of(loop) != capture_file


def test_a_detached_entry_leaves_no_run_directory(block_engine):
    """The capture's mount point (RUN/block/ID) stayed, empty, after its capture ended."""
    from pathlib import Path
    eng, disk, _target, _cfg = block_engine()
    run_block = Path(eng.socket).parent / "block"
    (ours,) = [p for p in run_block.iterdir() if p.is_dir()]
    (r,) = eng.client.results("block_detach", device=disk)
    assert r.outcome.value == "ok", r
    assert not ours.exists() and eng.workers() == []


def test_kill9_of_daemon_and_worker_under_write_load_then_restart_resyncs(block_engine, tmp_path):
    eng, disk, target, cfg = block_engine()
    loop = eng.block(disk)["loop"]
    writer = subprocess.Popen([sys.executable, "-c", WRITER, loop], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    time.sleep(0.5)
    eng.kill9()
    eng.kill_orphan_workers()  # the whole capture dies (a crash, or systemd killing the cgroup)
    writer.wait(timeout=60)  # the capture died under it: its writes fail from then on
    assert writer.returncode == 3
    assert writer.stdout.read().split()[0] == str(errno.EIO)
    old_file = backing_of(loop)
    assert old_file is not None
    out = cli(cfg, eng, "status").stdout  # no daemon: the loop on the dead capture is named
    assert f"{loop} serves a capture whose daemon is gone" in out, out
    eng.start()
    st = eng.block(disk)
    assert st["captured"]
    assert backing_of(st["loop"]) == st["file"]
    dead = [m for m in open("/proc/self/mountinfo") if "fuse.mirrorblk" in m and str(tmp_path) in m]
    assert len(dead) == 1  # the stale mount was lifted; only the new one is left
    assert "catching up (unclean previous stop)" in eng.logtext()
    eng.block_drain(disk)
    assert "caught up (unclean previous stop)" in eng.logtext()
    reply = eng.client.request("block_verify", device=disk)
    assert reply["ranges"] == [], reply
    assert sha(target) == sha(disk)


def _ext4_mounted_on_its_loop(block_engine, tmp_path):
    """A block entry captured, an ext4 made and mounted on its loop: (engine, disk, config,
    its status row, the mount point)."""
    eng, disk, _target, cfg = block_engine()
    before = eng.block(disk)
    run("mkfs.ext4", "-q", before["loop"])
    where = tmp_path / "mnt"
    where.mkdir()
    run("mount", before["loop"], str(where))
    return eng, disk, cfg, before, where


def _dead_loop_said(cfg, eng, loop: str) -> list[dict]:
    """status --json's warnings that name `loop` as a dead capture's."""
    warnings = json.loads(cli(cfg, eng, "status", "--json").stdout)["warnings"]
    return [w for w in warnings if loop in w["message"] and "worker died" in w["message"]]


def _wait_detached(loop: str) -> None:
    deadline = time.monotonic() + 10
    while os.path.exists(f"/sys/block/{os.path.basename(loop)}/loop"):
        assert time.monotonic() < deadline, f"{loop} stayed attached after the unmount"
        time.sleep(0.05)


@pytest.mark.parametrize("attributes_expired", [False, True])
def test_a_worker_that_dies_under_a_mounted_loop_is_an_error_until_unmounted_then_detached(
        block_engine, tmp_path, attributes_expired):
    """Found by a walk: a block worker killed while a file system was mounted on its loop left
    status green ("captured", no warning) while every write there failed with EIO, and the
    dead loop stayed attached after the unmount, through daemon restarts, for good. Now status
    says it (an error naming the mount), and the kernel detaches it at the unmount.
    `attributes_expired` (helper-25's walk): the loop was remembered by its backing file's
    identity from LOOP_GET_STATUS64, which asks the dead FUSE file; within a second of its last
    answer the kernel's cached attributes answered, later ENOTCONN, and the loop was forgotten
    (status green on the new loop). It is known by its diskseq now."""
    eng, disk, cfg, before, where = _ext4_mounted_on_its_loop(block_engine, tmp_path)
    loop = before["loop"]
    try:
        if attributes_expired:
            time.sleep(1.5)  # the capture file's attributes (cached 1 s) expire, as on a real host
        os.kill(before["worker_pid"], signal.SIGKILL)

        def said():
            return _dead_loop_said(cfg, eng, loop)
        deadline = time.monotonic() + 30
        while not (found := said()):
            assert time.monotonic() < deadline, cli(cfg, eng, "status").stdout
            time.sleep(0.2)
        [w] = found
        assert w["subject"] == disk and w["level"] == "error", w
        assert f"mounted on {where}: unmount it" in w["message"] and "EIO" in w["message"], w
        with pytest.raises(OSError) as exc:  # it is true: its I/O fails
            with open(where / "x", "w") as f:
                f.write("x")
                f.flush()
                os.fsync(f.fileno())
        assert exc.value.errno == errno.EIO
        deadline = time.monotonic() + 30  # the entry is captured again, through another loop
        while not (st := eng.block(disk))["captured"]:  # (the daemon says the dead loop first,
            assert time.monotonic() < deadline, st      # then attaches the entry anew)
            time.sleep(0.1)
        assert st["loop"] != loop
    finally:
        run("umount", str(where), check=False)
    _wait_detached(loop)
    assert not said()  # and status no longer names it


def test_a_dead_loop_is_still_an_error_after_the_daemon_restarts(block_engine, tmp_path):
    """The daemon's list of loops left on dead captures was its memory only: after a restart
    status was green again while the loop's I/O still failed. The new daemon finds them again
    (the loop still bound to that dead capture file, as the list said)."""
    eng, disk, cfg, before, where = _ext4_mounted_on_its_loop(block_engine, tmp_path)
    loop = before["loop"]

    def said():
        return _dead_loop_said(cfg, eng, loop)
    try:
        os.kill(before["worker_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not said():
            assert time.monotonic() < deadline, cli(cfg, eng, "status").stdout
            time.sleep(0.2)
        assert eng.stop() == 0, eng.logtext()
        eng.start()
        [w] = said()
        assert w["subject"] == disk and w["level"] == "error", w
        assert f"mounted on {where}: unmount it" in w["message"], w
    finally:
        run("umount", str(where), check=False)
    _wait_detached(loop)
    assert not said()


def test_daemon_stop_names_the_captures_it_leaves_running(block_engine, tmp_path):
    """Found by a walk: with a file system mounted on a captured loop, `daemon stop` said only
    "stopped the daemon (pid N)"; its log said the capture went on for the next daemon."""
    eng, disk, cfg, st, where = _ext4_mounted_on_its_loop(block_engine, tmp_path)
    try:
        out = cli(cfg, eng, "daemon", "stop", "--state-dir", eng.state)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "still in use, these captures go on without it and the next daemon takes them " \
               f"over: {disk} (pid {st['worker_pid']})" in out.stdout, out.stdout
        (where / "f").write_text("still written")  # it is true: the capture goes on
        os.sync()
    finally:
        run("umount", str(where), check=False)


def test_detach_all_says_which_worker_it_waits_for(block_engine):
    """`block detach-all` waits where `daemon stop` waits (a capture shipping its queue, up to
    45 s; a worker that does not answer, 45 s, then it is killed) and sat there without a word.
    It says each wait now as it begins, in daemon stop's words: here a stopped worker (SIGSTOP),
    and how to resume it; resumed, the detach ends cleanly."""
    eng, disk, _, _ = block_engine()
    out = said_while_stopped(eng, eng.block(disk)["worker_pid"], ["block", "detach-all"],
                             f"detach-all: {disk}: asked its capture to end")
    assert f"{disk}: detached" in out, out


def test_a_device_that_grew_under_its_capture_is_said(block_engine):
    """Found by helper-25's walk: the replicated device grew (64 -> 96 MiB) while captured; its
    loop and replica stayed at 64 MiB and nothing said so (status, verify "target matches")."""
    eng, disk, target, cfg = block_engine()
    backing = run("losetup", "-nO", "BACK-FILE", disk).stdout.strip()
    os.truncate(backing, 96 * MiB)
    run("losetup", "-c", disk)  # the kernel reads the file's new size
    deadline = time.monotonic() + 10
    while True:
        warnings = json.loads(cli(cfg, eng, "status", "--json").stdout)["warnings"]
        said = [w["message"] for w in warnings if w["subject"] == disk and "grew" in w["message"]]
        if said or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert said == ["the device grew to 96.0 MiB since its capture started; its loop and replica "
                    "still have 64.0 MiB: detach it and attach it again (Detach all, Attach all) "
                    "to use and replicate the rest"], warnings


def test_a_device_that_shrank_under_its_capture_is_said_as_an_error(block_engine):
    """Found by helper-27's walk: the replicated device shrank (96 -> 48 MiB) while captured;
    writes past 48 MiB through its loop failed (ENOSPC) and reads (EIO), and status was green
    (the growth check only looked up)."""
    eng, disk, target, cfg = block_engine(96 * MiB)
    loop = eng.block_drain(disk)["loop"]  # the first copy is over (it would fail too: said)
    backing = run("losetup", "-nO", "BACK-FILE", disk).stdout.strip()
    os.truncate(backing, 48 * MiB)
    run("losetup", "-c", disk)
    fd = os.open(loop, os.O_WRONLY | os.O_DIRECT)  # it is true: the loop's end fails
    try:
        with pytest.raises(OSError):
            os.pwrite(fd, bytes(4096), 60 * MiB)
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while True:
        warnings = json.loads(cli(cfg, eng, "status", "--json").stdout)["warnings"]
        said = [w for w in warnings if w["subject"] == disk and "shrank" in w["message"]]
        if said or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(w["message"], w["level"]) for w in said] == [(
        "the device shrank to 48.0 MiB since its capture started; its loop still has 96.0 MiB: "
        "reads and writes past 48.0 MiB of it fail (EIO, ENOSPC). Give the device its size back, "
        "or unmount the loop and detach it", "error")], warnings
    r = cli(cfg, eng, "block", "verify", disk)  # said in words, not "short read of the source"
    assert r.returncode == 1 and "the device ends at byte 50331648, inside the window (bytes " \
        "0-100663295): it shrank since its capture started (EIO)" in r.stderr, r.stdout + r.stderr
    assert "OSError" not in r.stderr and "[Errno" not in r.stderr, r.stderr  # words, not Python's


def test_a_captures_loop_is_not_another_entrys_target(block_engine, disks, tmp_path):
    """Found by helper-27's walk: `block add B --target /dev/loopN --adopt-target`, loopN the
    loop an entry's capture serves, was taken: B's replica would be written through A's
    capture over A's data."""
    eng, disk, target, cfg = block_engine()
    loop = eng.block(disk)["loop"]
    r = cli(cfg, eng, "block", "add", disks(), "--target", loop, "--adopt-target")
    assert r.returncode == 2 and f"target {loop} is a loop over {disk}: the replica's writes " \
        "would overwrite that device" in r.stderr, r.stdout + r.stderr


def test_verify_of_a_device_shorter_than_its_window_compares_nothing_and_says_so(
        block_engine, unused_loop, tmp_path):
    """Found by helper-27's walk: `block verify` of an entry nobody captured said 'target
    matches' for a device with nothing left (a loop with nothing attached, size 0) and compared
    only what was left of a window the device had shrunk below; mirror copied that part."""
    eng, disk, target, cfg = block_engine(sizelimit=32 * MiB)
    assert cli(cfg, eng, "block", "detach-all").returncode == 0
    backing = run("losetup", "-nO", "BACK-FILE", disk).stdout.strip()
    os.truncate(backing, 16 * MiB)
    run("losetup", "-c", disk)
    for action, word in (("verify", "compared"), ("mirror", "copied")):
        r = cli(cfg, eng, "block", action, disk)
        assert r.returncode == 1 and f"{disk} ends at byte {16 * MiB}, before the end of its " \
            f"window (offset 0 + size limit {32 * MiB}): nothing was {word}" in r.stderr, r.stderr
    # a loop node with nothing attached, size 0 (not the disk's own number: on a busy host
    # another user attaches something to a freed number at once)
    from app.services import loop as loopdev
    loopdev.ensure_device(unused_loop)
    cfg = write_config(cfg, [], [{"device": unused_loop, "target": target}])
    r = cli(cfg, eng, "block", "verify", unused_loop)
    assert r.returncode == 1 and f"{unused_loop} ends at byte 0 (size 0: no medium, or a loop " \
        "with nothing attached)" in r.stderr, r.stdout + r.stderr


def test_an_entrys_own_loop_given_for_the_entry_is_named_as_such(block_engine):
    """helper-26's walk: `block verify /dev/loopN` of the loop an entry's capture serves said
    only "is not a configured block device"; it names the entry to give instead, and changes
    nothing (exit 2, ENOENT)."""
    eng, disk, target, cfg = block_engine()
    loop = eng.block(disk)["loop"]
    for action in ("verify", "mirror", "remove"):
        r = cli(cfg, eng, "block", action, loop)
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"{loop} is the loop device of the entry for {disk}: give {disk}" in r.stderr, r.stderr
    assert eng.block(disk)["captured"]


def test_a_write_to_the_raw_device_outside_the_loop_is_said_and_repaired(block_engine):
    """Found by a walk: `dd` to a captured entry's raw device (not through its loop) changed
    the device and not the replica, and once dd had closed it nothing said so (status names a
    writer only while it holds the device open): the replica differed without a word. Its
    close is seen now (IN_CLOSE_WRITE on the device node): status says it, and the entry is
    compared with its replica, only what differs sent: the target equals the device again."""
    eng, disk, target, cfg = block_engine(16 * MiB)
    eng.block_drain(disk)
    data = os.urandom(4096)
    with open(disk, "r+b", buffering=0) as raw:  # a writer beside the capture, as dd would be
        raw.seek(5 * MiB)
        raw.write(data)
        os.fsync(raw.fileno())
    _wait_raw_writes(eng, disk, "count")
    st = eng.block_drain(disk)
    assert st["raw_writes"]["count"] == 1 and st["target_data"] == "consistent", st
    assert sha(target) == sha(disk, 0, 16 * MiB)  # the write reached the replica
    said = cli(cfg, eng, "status").stdout.replace("\n    ", " ")
    assert f"the raw device was opened for writing outside {st['loop']} and closed (1 time" in said, said
    with open(st["loop"], "r+b", buffering=0) as loop:  # through the loop: nothing said
        loop.write(os.urandom(4096))
        os.fsync(loop.fileno())
    assert eng.block_drain(disk)["raw_writes"]["count"] == 1


def test_manual_attach_of_a_captured_device_is_refused(block_engine, tmp_path):
    eng, disk, target, cfg = block_engine()
    loop = eng.block(disk)["loop"]
    before = ours(disk, tmp_path)
    r = cli(cfg, eng, "manual", "attach", disk)
    assert r.returncode == 2, r.stdout + r.stderr  # refused: nothing was changed (it said FAILED, 1)
    assert f"REFUSED  {disk}: {disk} is captured by the mirrorsetup daemon through {loop}" \
        in r.stderr, r.stderr
    assert ours(disk, tmp_path) == before  # nothing attached behind the capture


def test_verify_names_differing_ranges_and_mirror_repairs_them(block_engine):
    eng, disk, target, cfg = block_engine()
    eng.block_drain(disk)
    with open(target, "r+b") as f:  # damage the target behind the engine's back
        f.seek(3 * MiB + 100)
        f.write(b"damage")
        f.seek(10 * MiB)
        f.write(b"\xff" * (2 * MiB))
    r = cli(cfg, eng, "block", "verify", disk)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"bytes {3 * MiB}-{4 * MiB - 1} of the target" in r.stdout
    assert f"bytes {10 * MiB}-{12 * MiB - 1} of the target" in r.stdout  # adjacent blocks merged
    assert "3 of 64 blocks differ" in r.stderr  # the failed entry's line
    assert f"mirrorsetup block mirror {disk}" in r.stderr  # what to do next
    r = cli(cfg, eng, "block", "mirror", disk)
    assert r.returncode == 0 and f"mirrored {3 * MiB} bytes (3 of 64 blocks differed)" in r.stdout, \
        r.stdout + r.stderr  # only what differs is copied
    assert sha(target) == sha(disk)
    assert cli(cfg, eng, "block", "verify", disk).returncode == 0


def test_block_verify_without_a_daemon_says_so(block_engine):
    eng, disk, target, cfg = block_engine(start=False)
    r = cli(cfg, eng, "block", "verify", disk)
    assert r.returncode == 2 and "daemon is not running" in r.stderr  # refused: nothing tried


def test_a_daemon_with_another_configuration_is_refused(block_engine, tmp_path):
    eng, disk, target, cfg = block_engine()
    other = tmp_path / "other.toml"
    other.write_text(cfg.read_text())
    before = ours(disk, tmp_path)
    for argv in (["block", "detach-all"], ["block", "attach-all"], ["block", "verify", disk],
                 ["fs", "mount-all"]):
        r = cli(other, eng, *argv)
        assert r.returncode == 2, (argv, r.stdout, r.stderr)  # refused before anything is tried
        assert f"works from {cfg}, not {other}" in r.stderr, (argv, r.stderr)
    assert ours(disk, tmp_path) == before and eng.block(disk)["captured"]  # nothing was changed


@pytest.mark.parametrize("path", ["python", "compiled"])
def test_a_block_captures_writes_are_journalled_in_the_order_the_device_saw(tmp_path, monkeypatch, path):
    """Writes through the capture file reach the raw device and the journal in one order, with
    the window, a short last write, block generations and a full journal kept: answered in
    Python, or, when `_fuseread` is built, small ones in C in batches (blockfs.serve_writes)
    and the others handed back to Python, as each arrives."""

    import trio

    from app.engine import blockfs, fusewire
    from app.engine.journal import Journal
    from test_engine_fs import _compiled_read_or_skip

    batches = []
    if path == "python":
        monkeypatch.setattr(fusewire, "_fuseread", None)
    else:
        real = _compiled_read_or_skip().serve_writes

        class Counting:
            read_request = fusewire._fuseread.read_request

            @staticmethod
            def serve_writes(*args):
                out = real(*args)
                batches.append(out[1])
                return out
        monkeypatch.setattr(fusewire, "_fuseread", Counting)
    size, offset = 3 * MiB + 4096, 8192  # the window: 3 MiB + 4 KiB of raw, 8 KiB into it
    raw_path = tmp_path / "raw"
    raw_path.write_bytes(b"\xee" * (offset + size + 4096))
    raw = os.open(raw_path, os.O_RDWR)
    journal = Journal(tmp_path / "journal", kind=2)
    fs = blockfs.BlockFS(raw, offset, size, journal, read_only=False)
    where = tmp_path / "mnt"
    where.mkdir()
    session = fusewire.Session(fs, str(where), ["fsname=blockfs-test", "subtype=blockfs-test"])
    session.mount()
    writes = [(0, b"a" * 4096), (MiB - 512, b"b" * 1024),  # across a 1 MiB block boundary
              (5 * 4096, b"c" * 4096), (0, b"d" * 512), (2 * MiB, os.urandom(256 << 10)),  # large
              (size - 1000, b"e" * 4096)]  # only 1,000 bytes fit the window
    results = []

    def client():
        fd = os.open(where / "disk", os.O_WRONLY)
        try:
            for off, data in writes:
                results.append(os.pwrite(fd, data, off))
            try:
                os.pwrite(fd, b"f" * 4096, size)  # past the window
            except OSError as exc:
                results.append(exc.errno)
            os.fsync(fd)
            # a queue limit reached: the writes are not journalled, their blocks are dirty
            journal.limit_bytes, journal.on_full = journal.queued_bytes + 1, "pull-ahead"
            results.append(os.pwrite(fd, b"g" * 4096, MiB + 4096))
            results.append(os.pwrite(fd, b"h" * 4096, 3 * MiB))
        finally:
            os.close(fd)
            # unmount only: closing /dev/fuse under the loop's epoll wait could lose its wake-up
            fusewire.mounts.umount(str(where), fusewire.mounts.MNT_DETACH)

    try:
        async def main():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, client)
                with trio.fail_after(30):
                    await session.main()
        trio.run(main)
    finally:
        session.close(unmount=os.path.ismount(where))
    assert results == [4096, 1024, 4096, 512, 256 << 10, 1000, errno.ENOSPC, 4096, 4096]
    records = journal.read(100, timeout=0)
    assert [(r.op, r.args, r.data) for r in records] == \
        [("write", {"offset": off}, data[:1000 if off == size - 1000 else None]) for off, data in writes]
    assert [r.seq for r in records] == list(range(1, len(writes) + 1))
    expected = bytearray(b"\xee" * (offset + size + 4096))
    for off, data in writes + [(MiB + 4096, b"g" * 4096), (3 * MiB, b"h" * 4096)]:
        data = data[:size - off]
        expected[offset + off:offset + off + len(data)] = data
    assert raw_path.read_bytes() == expected  # the window only, nothing past it
    assert journal.behind and fs.dirty_blocks() == [1, 3]
    assert fs.writes == len(writes) + 2
    # generations: the clock at the last write of each block (0: never written)
    assert list(fs.gen) == [4, 7, 5, 8] and fs.clock == 8
    # in C: the 5 small ones before the limit, and of the 2 after it those that came while the
    # loop still polled in C as the limit was set (then found not stored, their blocks dirty
    # all the same): the first only, when the loop went back to Python after it (seen under
    # load: 6)
    assert sum(batches) in ((5, 6, 7) if path == "compiled" else (0,))
    journal.close()
    os.close(raw)


@pytest.mark.parametrize("path", ["python", "compiled"])
def test_a_block_target_applies_a_batch_in_order_and_pauses_at_the_write_that_found_it_full(tmp_path, monkeypatch, path):
    """A local block target applies a shipped batch: the leading writes in one compiled call
    (`_fuseread.pwrite_all`, when built), the rest one by one from the first other op or the
    write that failed. A full target pauses shipping there, saying the last record it took."""
    from app.engine import applier
    from app.engine.journal import Record
    from app.engine.shipper import TargetUnavailable
    from app.engine.target import LocalBlockTarget

    if path == "python":
        monkeypatch.setattr(applier, "_pwrite_all", None)
    elif applier._pwrite_all is None:
        from test_engine_fs import _compiled_read_or_skip
        _compiled_read_or_skip()
        pytest.fail("app.engine._fuseread is built but has no pwrite_all")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k,mode=0700", "tmpfs", str(small)], check=True)
    fd = -1
    try:
        fd = os.open(small / "target", os.O_RDWR | os.O_CREAT, 0o600)
        target = LocalBlockTarget.on_fd(fd, "small/target", 1 * MiB)
        records = [Record(1, 2, "write", {"offset": 0}, b"a" * 4096),
                   Record(2, 2, "write", {"offset": 8192}, memoryview(b"b" * 4096)),
                   Record(3, 2, "zero", {"offset": 4096, "length": 100}),
                   Record(4, 2, "write", {"offset": 12288}, b"c" * 4096)]
        target.send(records)
        assert os.pread(fd, 16384, 0) == b"a" * 4096 + b"\0" * 4096 + b"b" * 4096 + b"c" * 4096
        full = [Record(5, 2, "write", {"offset": 16384}, b"d" * 4096),
                Record(6, 2, "write", {"offset": 512 << 10}, b"e" * (64 << 10)),  # past 32 KiB
                Record(7, 2, "write", {"offset": 20480}, b"f" * 4096)]
        with pytest.raises(TargetUnavailable) as paused:
            target.send(full)
        assert paused.value.taken == 5 and paused.value.state.startswith("paused: target full")
        assert os.pread(fd, 4096, 16384) == b"d" * 4096 and os.pread(fd, 4096, 20480) != b"f" * 4096
        assert target.errors == 0
    finally:
        if fd >= 0:
            os.close(fd)
        subprocess.run(["umount", str(small)], check=True)


def test_manual_detach_leaves_a_captured_entrys_loops_alone(block_engine):
    """Found by a walk: `manual detach` of a capture's loop detached it (the entry uncaptured
    from then on, attach-all saying "already attached … (captured)"), and of the replicated
    device itself set it to autoclear under its capture (gone at the capture's end)."""
    eng, disk, target, cfg = block_engine()
    st = eng.block(disk)
    loop = st["loop"]
    for which, words in ((loop, "is the capture loop of a replicated block entry"),
                         (disk, f"is the device the block entry {disk} replicates")):
        p = cli(cfg, eng, "manual", "detach", which)
        assert p.returncode == 2, p.stdout + p.stderr  # refused before anything changed
        assert f"{which} {words}" in p.stderr and "nothing was changed" in p.stderr, p.stderr
        for argv in re.findall(r"`mirrorsetup ([^`]*)`", p.stderr):  # what it says to run exists
            # ("`mirrorsetup block detach DEVICE` ends that capture": there was no such command)
            argv = shlex.split(argv)
            build_parser(command_of(argv)).parse_args(argv)
        assert f"`mirrorsetup block remove {disk}`" in p.stderr, p.stderr  # its own entry
    assert backing_of(loop) == st["file"] and sysfs_autoclear(disk) == "0"
    st = eng.block(disk)
    assert st["captured"] and st["loop"] == loop, st


def sysfs_autoclear(loop: str) -> str:
    return open(f"/sys/block/{os.path.basename(loop)}/loop/autoclear").read().strip()


def test_status_and_the_picker_answer_while_a_block_capture_does_not(block_engine):
    """Every loop was indexed by a stat of its backing file, a captured loop's too: that file
    is the block capture's FUSE file, and with the worker stopped (hung in life) `status`,
    `block devices`, the picker and attach hung on it. Only files on local file systems are
    stat'ed now; the capture is still told by its file's name."""
    from app.services import blockdevs, status
    from app.services.blockplan import View
    from app.services.config import ConfigStore
    eng, disk, _, cfg = block_engine()
    st = eng.block(disk)
    worker = st["worker_pid"]
    os.kill(worker, signal.SIGSTOP)
    try:
        time.sleep(1.5)  # the capture file's cached attributes expire: a stat would ask it
        box: dict = {}

        def ask():
            box["view"] = View().captures_of(disk)
            box["devices"] = blockdevs.list_block_devices()
            box["snap"] = status.snapshot(ConfigStore(cfg), None, scan_writers=True)
        t = threading.Thread(target=ask, daemon=True)
        t.start()
        t.join(20)
        assert "snap" in box, f"hung on the stopped block capture ({sorted(box)} done)"
        assert [s.device for s in box["view"]] == [st["loop"]], box["view"]
        assert [b.capture for b in box["snap"].block] == ["no daemon"], box["snap"].block
    finally:
        os.kill(worker, signal.SIGCONT)


def test_a_capture_started_on_a_device_that_became_empty_says_so_without_a_traceback(block_engine):
    """The loop a block entry's device is had its backing file emptied while the daemon was
    stopped: the next start's capture said "offset 0 is past the end of /dev/loopN (0
    bytes)", as if the offset were wrong. It says the device is empty and why (its file has
    no data), and nothing of the worker's end is a traceback."""
    eng, disk, target, cfg = block_engine(16 * MiB)
    eng.block_drain(disk)
    backing = run("losetup", "-nO", "BACK-FILE", disk).stdout.strip()
    eng.stop()
    os.truncate(backing, 0)
    run("losetup", "-c", disk)  # (the loop stays attached: it is this test's)
    eng.start()
    r = cli(cfg, eng, "block", "attach-all")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{disk} is empty (0 bytes): its backing file {backing} has no data" in r.stderr, r.stderr
    assert "offset" not in r.stderr and "past the end" not in eng.logtext(), r.stderr
    st = eng.block(disk)
    assert not st["captured"]
    # why it is not captured: status said nothing, and --json carried no last_error
    assert f"{disk} is empty (0 bytes)" in (st["last_error"] or ""), st
    out = cli(cfg, eng, "status", "--json").stdout
    [row] = [b for b in json.loads(out)["block"] if b["device"] == disk]
    assert f"{disk} is empty (0 bytes)" in (row["engine"]["last_error"] or ""), row
    assert "Traceback" not in eng.logtext(), eng.logtext()


def test_a_worker_that_died_and_could_not_start_again_says_the_newest_reason(block_engine):
    """A block worker died, and the daemon's start of a new one failed (here: the device had
    become empty meanwhile). status kept saying "its worker (pid N) died" as the reason the
    entry is not captured, though the newest failure was the start's. It says that one now,
    with the death before it."""
    eng, disk, target, cfg = block_engine(16 * MiB)
    st = eng.block_drain(disk)
    backing = run("losetup", "-nO", "BACK-FILE", disk).stdout.strip()
    os.truncate(backing, 0)
    run("losetup", "-c", disk)  # (the loop stays attached: it is this test's)
    worker = st["worker_pid"]
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "empty" not in ((st := eng.block(disk))["last_error"] or ""):
        assert time.monotonic() < deadline and "Traceback" not in eng.logtext(), st
        time.sleep(0.2)
    assert not st["captured"], st
    assert f"{disk} is empty (0 bytes): its backing file {backing} has no data" in \
        st["last_error"] and st["last_error"].startswith(
            f"its worker (pid {worker}) died, and starting it again failed: "), st
    out = cli(cfg, eng, "status").stdout
    assert "is empty (0 bytes)" in " ".join(out.split()), out


def test_a_worker_whose_daemon_is_gone_says_why_it_ends_in_one_line(caplog):
    """A worker refused (here: its device is empty) after the daemon that started it had gone
    (it gave up waiting, or stopped) died of a BrokenPipeError traceback while telling it why.
    It logs the reason in one line and ends (exit status 1)."""
    import logging
    import socket

    from app.engine import capture
    ours, theirs = socket.socketpair()
    theirs.close()

    def refused(chan):
        raise capture.Refused("/dev/loop7 is empty (0 bytes): there is nothing on it to capture",
                              errno.EINVAL)
    mask = os.umask(0o022)  # guarded() sets the worker's umask (0): this process's is put back
    try:
        with caplog.at_level(logging.INFO):
            assert capture.guarded(ours.detach(), refused) == 1
    finally:
        os.umask(mask)
    said = [r.getMessage() for r in caplog.records]
    assert any("capture not started: /dev/loop7 is empty (0 bytes)" in m and "daemon that asked "
               "for it is gone" in m for m in said), said
    assert not any(r.exc_info for r in caplog.records)


def test_a_detached_loop_is_said_as_detached_not_as_empty(unused_loop):
    """An entry's device that is a loop detached before the capture (re)started (a loop's
    device node stays, of 0 bytes): said as a loop with nothing attached, ENXIO."""
    from app.engine.capture import _empty_device
    from app.services import loop as loopdev
    loopdev.ensure_device(unused_loop)  # the node, with nothing attached (its own number)
    with open(f"/sys/class/block/{os.path.basename(unused_loop)}/size") as f:
        assert int(f.read()) == 0
    said, err = _empty_device(unused_loop)
    assert said.startswith(f"{unused_loop} is a loop device with nothing attached (it was "
                           "detached)") and err == errno.ENXIO, said


def test_a_device_name_that_names_another_device_now_is_not_captured_nor_its_replica_touched(
        block_engine, disks, tmp_path):
    """An entry is a device name, and a name can pass to another device: a disk's at a
    reboot, a loop number that another program attached to its own file (helper-44's walk on
    a busy host). Its capture took that device and caught the replica up from it: the replica
    became a copy of another disk. The first capture records what the device is (here a loop's
    file); a later one on another device is refused and nothing is written to the replica.
    `block accept-device` takes the device as it is now. The name here is a symlink moved from
    one of this test's loops to the other (a loop number cannot be kept free on a busy host)."""
    first, second = disks(16 * MiB), disks(16 * MiB)
    for dev, byte in ((first, b"A"), (second, b"B")):
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.pwrite(fd, byte * MiB, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    link = str(tmp_path / "disk-by-name")
    os.symlink(first, link)
    eng, _, target, cfg = block_engine(disk=link)
    eng.block_drain(link)
    replica = sha(target)
    assert replica == sha(first)
    files = {dev: backing_of(dev) for dev in (first, second)}
    assert eng.stop() == 0
    os.unlink(link)
    os.symlink(second, link)
    eng.start()
    r = cli(cfg, eng, "block", "attach-all")
    assert r.returncode == 1, r.stdout + r.stderr
    said = f"{link} is not the device this entry was made for: its loop file was {files[first]}"
    assert said in r.stderr and f"it is now {files[second]}" in r.stderr, r.stderr
    assert "`mirrorsetup block remove" in r.stderr and "accept-device" in r.stderr, r.stderr
    st = eng.block(link)
    assert not st["captured"] and said in (st["last_error"] or ""), st
    assert sha(target) == replica  # not one block of the other device
    r = cli(cfg, eng, "block", "accept-device", link)
    assert r.returncode == 0 and "is forgotten" in r.stdout, r.stdout + r.stderr
    r = cli(cfg, eng, "block", "attach-all")
    assert r.returncode == 0, r.stdout + r.stderr
    eng.block_drain(link)
    assert sha(target) == sha(second)
    r = cli(cfg, eng, "block", "accept-device", link)
    assert r.returncode == 0 and "nothing to accept" in r.stdout, r.stdout + r.stderr


def test_a_block_entrys_target_is_set_while_it_is_detached(block_engine, tmp_path):
    """`block set --target`: refused while the entry is attached (applications use its loop:
    detaching it is the administrator's step); once detached, the next capture makes the new
    target equal to the device; the old replica is left as it was."""
    eng, disk, target, cfg = block_engine(16 * MiB)
    st = eng.block(disk)
    loop = st["loop"]
    with open(loop, "r+b") as f:
        f.write(os.urandom(MiB))
    eng.block_drain(disk)
    new = str(tmp_path / "new.img")
    r = cli(cfg, eng, "block", "set", disk, "--target", new)
    assert r.returncode == 2 and f"is attached and captured now (as {loop})" in r.stderr, r.stderr
    assert "block detach-all" in r.stderr and not os.path.exists(new)
    r = cli(cfg, eng, "block", "detach-all")
    assert r.returncode == 0, r.stdout + r.stderr
    with open(disk, "r+b") as f:  # while nothing captures it: the next capture's catch-up copies it
        f.seek(4 * MiB)
        f.write(os.urandom(MiB))
    old = sha(target)
    r = cli(cfg, eng, "block", "set", disk, "--target", new)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.replace("\n", " ")
    assert f"{disk} replicates to {new} now" in out and f"its replica at {target} is left" in out
    r = cli(cfg, eng, "block", "attach-all")
    assert r.returncode == 0 and f"replicated to {new}" in r.stdout, r.stdout + r.stderr
    st = eng.block_drain(disk)
    assert st["target"] == new, st
    assert sha(new) == sha(disk, 0, 16 * MiB)  # (drained: its catch-up is over)
    assert sha(target) == old
    r = cli(cfg, eng, "--json", "block", "verify", disk)
    assert r.returncode == 0 and '"ranges": []' in r.stdout, r.stdout + r.stderr


def _wait_raw_writes(eng: Engine, disk: str, key: str, at_least: int = 1) -> None:
    """Until the capture's raw_writes figure `key` (count, overflows) reaches `at_least`."""
    deadline = time.monotonic() + 30
    while (eng.block(disk).get("raw_writes") or {}).get(key, 0) < at_least:
        assert time.monotonic() < deadline, eng.block(disk)
        time.sleep(0.1)


def _partition_table(dev: str, *parts: tuple[int, int]) -> None:
    """An MBR partition table of `parts` ((first byte, bytes) each) written to `dev`."""
    import struct
    mbr = bytearray(512)
    for n, (first, size) in enumerate(parts):
        mbr[446 + 16 * n:462 + 16 * n] = struct.pack("<B3sB3sII", 0, bytes(3), 0x83, bytes(3),
                                                     first // 512, size // 512)
    mbr[510:512] = b"\x55\xaa"
    with open(dev, "r+b", buffering=0) as f:
        f.write(mbr)
        os.fsync(f.fileno())


def test_a_write_through_a_partition_of_the_captured_disk_is_said_and_repaired(block_engine):
    """The raw device's own node was watched, not the other nodes that reach its bytes: a
    write through a partition of a captured whole disk (dd to /dev/sdb1 with /dev/sdb
    replicated) bypassed the loop, the replica differed and nothing said so. Its writers are
    named while they hold it, its close is seen and repaired as the raw device's is, of a
    partition made while the capture runs too. (This kernel parses no partition table:
    partx adds the partitions with BLKPG.)"""
    eng, disk, target, cfg = block_engine(32 * MiB, start=False)
    _partition_table(disk, (MiB, 8 * MiB))
    run("partx", "-a", disk)
    part, later = f"{disk}p1", f"{disk}p2"
    try:
        eng.start()
        st = eng.block_drain(disk)
        _partition_table(st["loop"], (MiB, 8 * MiB), (16 * MiB, 8 * MiB))  # (through the loop)
        run("partx", "-a", "--nr", "2", disk)
        for node in (part, later):
            with open(node, "r+b", buffering=0) as raw:  # a writer beside the capture
                raw.seek(2 * MiB)
                raw.write(os.urandom(8192))
                os.fsync(raw.fileno())
                said = cli(cfg, eng, "status").stdout.replace("\n    ", " ")
                assert f"(pid {os.getpid()}) has {node}, which holds bytes of it, open for " \
                       "writing" in said, said
        _wait_raw_writes(eng, disk, "count", 2)
        st = eng.block_drain(disk)
        assert st["raw_writes"]["nodes"] == [part, later], st
        assert st["target_data"] == "consistent", st
        assert sha(target) == sha(disk, 0, 32 * MiB)  # the writes reached the replica
        said = cli(cfg, eng, "status").stdout.replace("\n    ", " ")
        assert f"the raw device (through {part}, {later}, which hold bytes of it) was opened " \
               f"for writing outside {st['loop']} and closed (2 times" in said, said
    finally:
        run("partx", "-d", disk, check=False)


def test_writers_lost_to_a_full_watch_queue_are_said_and_repaired(block_engine):
    """The raw-write watch's inotify queue holds 16,384 events; past that the kernel queues
    one overflow event instead, and the closes after it were dropped without a word. Here the
    capture worker is stopped (SIGSTOP) while a writer changes a partition of the captured disk
    and the disk and the partition are then opened and closed in turn until the queue is full:
    status says closes may have been missed, and the entry is compared with its replica."""
    eng, disk, target, cfg = block_engine(32 * MiB, start=False)
    _partition_table(disk, (MiB, 8 * MiB))
    run("partx", "-a", disk)
    part = f"{disk}p1"
    with open("/proc/sys/fs/inotify/max_queued_events") as f:
        limit = int(f.read())
    try:
        eng.start()
        pid = eng.block_drain(disk)["worker_pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(limit // 2 + 10):
                for node in (disk, part):
                    os.close(os.open(node, os.O_WRONLY))
            with open(part, "r+b", buffering=0) as raw:  # this close is past the overflow
                raw.seek(2 * MiB)
                raw.write(os.urandom(8192))
                os.fsync(raw.fileno())
        finally:
            os.kill(pid, signal.SIGCONT)
        _wait_raw_writes(eng, disk, "overflows")
        st = eng.block_drain(disk)
        assert st["raw_writes"]["overflows"] == 1 and st["target_data"] == "consistent", st
        assert sha(target) == sha(disk, 0, 32 * MiB)  # the write reached the replica
        said = cli(cfg, eng, "status").stdout.replace("\n    ", " ")
        assert "writers outside its loop may have been missed: the watch's event queue " \
               "overflowed (1 time)" in said, said
    finally:
        run("partx", "-d", disk, check=False)
