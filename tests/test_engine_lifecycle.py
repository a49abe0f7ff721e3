"""The daemon's life: kill -9 under load and recover, unmount with holders, refusals, socket rules."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from app.services.control import ControlClient, DaemonNotRunning
from app.services.results import MirrorError
from test_engine_support import engine_maker, mirrorfs_mounts, write_config

pytestmark = pytest.mark.root

WRITER = r"""
import errno, os, sys, time
src, log, errlog = sys.argv[1], sys.argv[2], sys.argv[3]
logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
errfd = os.open(errlog, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
i = 0
while not os.path.exists(log + ".stop"):
    name = os.path.join(src, "w%05d" % i)
    try:
        with open(name, "wb") as f:
            f.write(os.urandom(4096 + i * 7))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:  # a dead mount says ENOTCONN: an application would retry
        os.write(errfd, b"%d\n" % exc.errno)
        time.sleep(0.01)
        continue
    os.write(logfd, b"%s\n" % name.encode())
    os.fsync(logfd)
    i += 1
"""

PROBE = r"""
import ctypes, os, sys
# statfs(2) f_type of the entry's path, as fast as it goes: FUSE's magic or ENOTCONN (a dead
# mount of ours) are fine; anything else means the directory below was uncovered.
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(256)
path, out = sys.argv[1].encode(), sys.argv[2]
seen = set()
while not os.path.exists(out + ".stop"):
    if libc.statfs(path, buf) == 0:
        seen.add(hex(ctypes.c_long.from_buffer(buf).value & 0xffffffff))
    else:
        seen.add("errno %d" % ctypes.get_errno())
open(out, "w").write(" ".join(sorted(seen)))
"""
FUSE_MAGIC = "0x65735546"
DEAD = {str(errno.ENOTCONN), str(errno.ECONNABORTED)}  # what a dead FUSE mount answers


@pytest.fixture
def setup(tmp_path):
    with engine_maker(tmp_path) as make:
        yield make


def _sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _wait_lines(path, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (not os.path.exists(path) or open(path).read().count("\n") < n) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert open(path).read().count("\n") >= n, f"{path}: fewer than {n} lines"


def _stop(proc, flag: str) -> None:
    open(flag + ".stop", "w").close()
    proc.wait(timeout=60)


def _status_text(eng) -> str:
    """`mirrorsetup status` as an administrator reads it (the daemon may be gone)."""
    p = subprocess.run([sys.executable, "-m", "app", "--config", str(eng.config), "status"],
                       env={**os.environ, "MIRRORSETUP_SOCKET": eng.socket}, capture_output=True,
                       text=True, timeout=60)
    return p.stdout + p.stderr


def _fsynced_on_target(log: str, src: str, tgt: str) -> list[str]:
    names = open(log).read().split()
    for name in names:
        rel = os.path.relpath(name, src)
        assert _sha(os.path.join(tgt, rel)) == _sha(name), rel
    return names


def test_kill9_of_the_daemon_is_invisible_to_writers(setup, tmp_path):
    """The capture worker outlives the daemon: a writer that fsyncs never sees an error, the
    next daemon takes the worker over (no catching up: no gap), and everything arrives."""
    eng, src, tgt = setup()
    log, errlog = str(tmp_path / "fsynced.log"), str(tmp_path / "errors.log")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, src, log, errlog])
    try:
        _wait_lines(log, 20)
        pid = eng.status(src)["worker_pid"]
        eng.kill9()
        before = open(log).read().count("\n")
        _wait_lines(log, before + 20)  # capture goes on without a daemon
        assert f"{src}: its capture goes on without a daemon" in _status_text(eng), "not said"
        eng.start()
        st = eng.status(src)
        assert st["worker_pid"] == pid and st["captured"]
        _wait_lines(log, open(log).read().count("\n") + 10)
    finally:
        _stop(writer, log)
    assert not os.path.exists(errlog) or open(errlog).read() == "", "the writer saw errors"
    eng.drain(src)
    assert len(_fsynced_on_target(log, src, tgt)) > 50
    assert eng.verify(src) == []
    assert "took over the running capture" in eng.logtext()


def test_kill9_of_daemon_and_worker_never_uncovers_the_path(setup, tmp_path):
    """Both die: the mount is dead (ENOTCONN), never the directory below; the next daemon
    mounts beneath the dead mount and lifts it, then catches up while capturing. Every file
    the writer fsync'd, before and after, is on the target and verify is clean."""
    eng, src, tgt = setup()
    log, errlog, seen = str(tmp_path / "fsynced.log"), str(tmp_path / "errors.log"), str(tmp_path / "seen")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, src, log, errlog])
    probe = subprocess.Popen([sys.executable, "-c", PROBE, src, seen])
    try:
        _wait_lines(log, 20)
        for _round in range(2):
            worker = eng.status(src)["worker_pid"]
            said = os.path.getsize(errlog)  # (the writer made it, empty, when it started)
            eng.kill9()
            os.kill(worker, 9)
            deadline = time.monotonic() + 30
            while os.path.getsize(errlog) == said and time.monotonic() < deadline:
                time.sleep(0.02)
            # this round's errors: the writer met the dead mount (the assertion was inside the
            # wait, so a writer slower than 20 ms to meet it failed the test)
            assert DEAD & set(open(errlog).read()[said:].split())
            if _round == 0:  # a dead mount is not called a capture
                assert f"{src}: mirrorfs is mounted here but its capture is gone" in _status_text(eng)
            eng.start()
            assert eng.status(src)["captured"]
            _wait_lines(log, open(log).read().count("\n") + 20)
    finally:
        _stop(writer, log)
        _stop(probe, seen)
    kinds = open(seen).read().split(" ")
    assert FUSE_MAGIC in kinds and not [k for k in kinds if k not in {FUSE_MAGIC, "errno"} | DEAD], kinds
    eng.drain(src)
    assert len(_fsynced_on_target(log, src, tgt)) > 50
    assert eng.verify(src) == []
    assert "unclean previous stop" in eng.logtext()


def test_a_capture_gap_is_caught_up_while_capturing(setup, tmp_path):
    """Unmount all, change files below, Mount all: the target is made equal again (status says
    catching up until it is), not left different forever."""
    eng, src, tgt = setup()
    open(os.path.join(src, "kept"), "w").write("same")
    open(os.path.join(src, "changed"), "w").write("v1")
    eng.drain(src)
    assert [r.outcome.value for r in eng.client.results("unmount_all")] == ["ok"]
    open(os.path.join(src, "changed"), "w").write("version two")  # not captured: a gap
    open(os.path.join(src, "new"), "w").write("made while nobody captured")
    os.unlink(os.path.join(src, "kept"))
    (r,) = eng.client.results("mount_all")
    assert r.outcome.value == "ok" and "catching up" in r.message, r.message
    eng.drain(src)
    assert eng.verify(src) == []
    assert open(os.path.join(tgt, "changed")).read() == "version two"
    assert not os.path.exists(os.path.join(tgt, "kept"))
    assert "capture was not in place since" in eng.logtext()


def test_unmount_refused_while_held_then_forced_is_lazy(setup):
    eng, src, _ = setup()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; f = open(sys.argv[1], 'w'); print('ok', flush=True); "
                               "time.sleep(600)", os.path.join(src, "held")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"ok"
        (r,) = eng.client.results("unmount", path=src, force=False)
        assert r.failed and r.errno == errno.EBUSY
        assert f"pid {holder.pid}" in r.message and "held" in r.message
        assert src in mirrorfs_mounts()  # nothing changed
        (r,) = eng.client.results("unmount", path=src, force=True)
        assert not r.failed and "lazy unmount" in r.message
        assert src not in mirrorfs_mounts()
        # the detached capture still serves the holder and owns the journal: no second one yet
        (r,) = eng.client.results("mount", path=src)
        assert r.failed and r.errno == errno.EBUSY and src not in mirrorfs_mounts()
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + 30
        while (r := eng.client.results("mount", path=src)[0]).failed and time.monotonic() < deadline:
            time.sleep(0.1)  # the old worker exits when the kernel ends the detached session
        assert r.outcome.value == "ok" and src in mirrorfs_mounts()
    finally:
        holder.kill()
        holder.wait()


def _hold(path: str) -> subprocess.Popen:
    """A process that keeps `path` open for writing until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; f = open(sys.argv[1], 'w'); print('ok', flush=True); "
                               "time.sleep(600)", path], stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"ok"
    return holder


def test_an_orphaned_capture_is_ended_by_the_command_status_prints(setup):
    """An entry removed while its worker outlived the daemon, and the capture held: status
    said to end it with `mirrorsetup capture end ID`, a command the CLI did not have."""
    import re
    import shlex
    eng, src, _ = setup()
    holder = _hold(os.path.join(src, "held"))
    try:
        eng.kill9()  # the worker goes on without its daemon
        write_config(eng.config, [])  # meanwhile the entry was removed
        eng.start()  # it takes the worker over; ending it is refused: a file is open there
        (orphan,) = eng.client.request("status")["orphans"]
        assert orphan["key"] == src and orphan["state"] == "orphaned"
        (advised,) = re.findall(r"`(mirrorsetup [^`]*)`", orphan["last_error"])
    finally:
        holder.kill()
        holder.wait()
    r = subprocess.run([sys.executable, "-m", "app", *shlex.split(advised)[1:], "--config",
                        str(eng.config), "--socket", eng.socket], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, (advised, r.stdout, r.stderr)
    assert "ended the orphaned capture of " + src in r.stdout
    assert eng.client.request("status")["orphans"] == [] and src not in mirrorfs_mounts()


def test_capture_end_refuses_the_capture_of_a_configured_entry(setup):
    """`capture end` is for orphans, but given a configured entry's path it lazily unmounted
    that entry (files open) and called it 'the orphaned capture': the entry lost its capture
    with nothing said (helper-26's walk). Now refused (exit 2, EBUSY), the mount and the open
    file are untouched; an id no capture has is refused too (exit 2, ENOENT), not 'FAILED'."""
    eng, src, _ = setup()
    holder = _hold(os.path.join(src, "held"))
    try:
        def end(id_: str):
            return subprocess.run([sys.executable, "-m", "app", "--json", "capture", "end", id_,
                                   "--config", str(eng.config), "--socket", eng.socket],
                                  capture_output=True, text=True, timeout=120)
        r = end(src)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert json.loads(r.stdout)["errno_name"] == "EBUSY"
        assert "is a configured entry" in r.stderr and "fs unmount-all" in r.stderr
        assert src in mirrorfs_mounts()
        assert os.path.exists(f"/proc/{holder.pid}") and holder.poll() is None
        r = end("no-such-capture")
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert json.loads(r.stdout)["errno_name"] == "ENOENT"
    finally:
        holder.kill()
        holder.wait()


def test_a_removed_entry_leaves_no_run_directory_and_nothing_else_there_is_touched(setup):
    """The run directory of a removed entry (RUN/fs/ID with its empty lower and stage) stayed
    for good. It goes when its capture ends; one left behind earlier goes at the next start;
    a directory not shaped as ours, or with something in it, stays."""
    from pathlib import Path
    eng, src, _ = setup()
    run_fs = Path(eng.socket).parent / "fs"
    (ours,) = [p for p in run_fs.iterdir() if p.is_dir()]
    assert (ours / "lower").is_dir()
    foreign = run_fs / "notes"
    foreign.mkdir()
    kept = run_fs / "kept-0123456789ab" / "lower"
    kept.mkdir(parents=True)
    (kept / "file").write_text("x")
    write_config(eng.config, [])
    (r,) = eng.client.results("reload")
    assert (r.action, r.outcome.value) == ("unmount", "ok"), r
    assert not ours.exists() and src not in mirrorfs_mounts()
    stale = run_fs / "old-0123456789ab"
    for name in ("lower", "stage"):
        (stale / name).mkdir(parents=True)
    assert eng.stop() == 0
    eng.start()
    assert not stale.exists()
    assert foreign.is_dir() and (kept / "file").read_text() == "x"


def test_a_lazily_unmounted_entry_is_shown_with_its_capture_until_the_holder_closes(setup):
    """Found by a walk: after `fs unmount-all --force` left a detached capture serving a file
    held open, status said "not captured", no worker, no holders (the writes were replicated,
    and only mount-all knew). Status says it is lazily unmounted, by whom, and which worker
    serves it; once the holder closes, the entry is simply not mounted."""
    eng, src, tgt = setup()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys; f = open(sys.argv[1], 'w'); print('ok', flush=True); "
                               "sys.stdin.readline(); f.write('written after the unmount'); f.close(); "
                               "print('closed', flush=True); sys.stdin.readline()",
                               os.path.join(src, "held")], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"ok"
        pid = eng.status(src)["worker_pid"]
        (r,) = eng.client.results("unmount", path=src, force=True)
        assert not r.failed and "lazy unmount" in r.message and src not in mirrorfs_mounts()
        who = f"pid {holder.pid} (python"
        row = eng.status(src)
        assert row["captured"] and row["worker_pid"] == pid and not row["mounted"]
        assert row["state"].startswith(f"lazily unmounted: capture goes on until {who}")
        assert row["state"].endswith("closes its files")
        assert [h for h in row["holders"] if h.startswith(who)]
        snap = json.loads(subprocess.run(
            [sys.executable, "-m", "app", "--config", str(eng.config), "--json", "status"],
            env={**os.environ, "MIRRORSETUP_SOCKET": eng.socket}, capture_output=True, text=True,
            timeout=60, check=True).stdout)
        (fs,) = snap["filesystem"]
        assert fs["state"] == "lazily unmounted" and fs["engine"]["worker_pid"] == pid
        assert [w for w in snap["warnings"] if w["message"].startswith("lazily unmounted: capture "
                                                                       f"goes on until {who}")]
        text = _status_text(eng)
        assert "lazily unmounted" in text and f"worker pid {pid}" in text
        holder.stdin.write(b"\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == b"closed"
        deadline = time.monotonic() + 30
        while (row := eng.status(src))["captured"] and time.monotonic() < deadline:
            time.sleep(0.1)  # the old worker exits when the kernel ends the detached session
        assert not row["captured"] and row["state"] == "not captured" and row["worker_pid"] is None
        assert open(os.path.join(tgt, "held")).read() == "written after the unmount"
        text = _status_text(eng)
        assert "lazily unmounted" not in text and "not mounted" in text
    finally:
        holder.kill()
        holder.wait()


def test_unmount_all_and_mount_all_through_the_socket(setup):
    eng, src, _ = setup()
    results = eng.client.results("unmount_all")
    assert [r.outcome.value for r in results] == ["ok"] and src not in mirrorfs_mounts()
    results = eng.client.results("mount_all")
    assert [r.outcome.value for r in results] == ["ok"] and src in mirrorfs_mounts()
    assert eng.client.results("mount", path=src)[0].outcome.value == "unchanged"


def test_a_same_size_rewrite_with_its_mtime_put_back_while_not_captured_is_caught_up(setup):
    """Found by a walk: rewritten while capture was off (same size, `touch -d` back to its
    old mtime), a file was taken as equal by the catch-up (size and mtime) and stayed
    different at the target for good, status saying all was well. Its ctime says it changed
    in the gap: such files are compared by content."""
    eng, src, tgt = setup()
    a, b = os.path.join(src, "a.txt"), os.path.join(src, "b.txt")
    for path in (a, b):
        with open(path, "w") as f:
            f.write("before-" + os.path.basename(path))
    eng.drain(src)
    assert [r.outcome.value for r in eng.client.results("unmount_all")] == ["ok"]
    st = os.stat(a)
    time.sleep(1.1)  # past the capture's end by more than the comparison's margin
    with open(a, "w") as f:
        f.write("after--a.txt")  # the same size
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert [r.outcome.value for r in eng.client.results("mount_all")] == ["ok"]
    eng.drain(src)
    caught = [ln for ln in eng.logtext().splitlines() if "caught up (capture was not in place" in ln]
    assert len(caught) == 1 and "'copied': 1," in caught[0], caught  # b.txt is left alone
    assert open(os.path.join(tgt, "a.txt")).read() == "after--a.txt"
    assert not eng.verify(src)


def test_clean_stop_unmounts_drains_and_marks_the_end(setup):
    eng, src, tgt = setup()
    open(os.path.join(src, "f"), "w").write("x")
    eng.stop()
    assert src not in mirrorfs_mounts()
    assert open(os.path.join(tgt, "f")).read() == "x"  # drained before the clean stop
    eng.start()
    assert eng.status(src)["mounted"]
    log = eng.logtext()
    assert "first start: initial copy" in log and "unclean previous stop" not in log
    assert "capture was not in place since" in log  # the stop was a gap: compared again


@pytest.mark.parametrize("case", ["missing", "inside", "same", "readonly"])
def test_bad_entries_are_refused_and_nothing_changes(setup, tmp_path, tmpfs_mount, case):
    src = tmp_path / "src"
    src.mkdir()
    target = {"missing": tmp_path / "tgt", "inside": src / "replica", "same": src,
              "readonly": tmp_path / "ro" / "replica"}[case]
    path = str(tmp_path / "nowhere") if case == "missing" else str(src)
    if case == "readonly":
        tmpfs_mount(tmp_path / "ro")
        subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "ro")], check=True)
    eng, _, _ = setup([{"path": path, "target": str(target)}])
    (r,) = eng.client.results("mount", path=path)
    assert r.failed
    want = {"missing": "does not exist", "inside": "is inside the replicated directory",
            "same": "is the replicated directory itself", "readonly": "not writable"}[case]
    assert want in r.message, r.message
    assert not [m for m in mirrorfs_mounts() if m.startswith(str(tmp_path))]
    assert not os.path.exists(target) or case == "same"


def test_a_start_refused_before_capture_leaves_the_entry_as_it_was(setup, tmp_path):
    """Found by a walk: after a start its target refused, the next start called it an
    "unclean previous stop" (a first start too). A refused start now leaves the entry as it
    was: a first start stays the first, a clean end stays clean."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("one")
    target = tmp_path / "replica"
    target.mkdir()
    (target / "someone-elses").write_text("x")  # not empty, no marker: refused at the start
    eng, _, _ = setup([{"path": str(src), "target": str(target)}])
    (r,) = eng.client.results("mount", path=str(src))
    assert r.failed and "carries no mirrorsetup marker" in r.message, r.message
    (target / "someone-elses").unlink()
    assert [r.outcome.value for r in eng.client.results("mount", path=str(src))] == ["ok"]
    eng.drain(str(src))
    log = eng.logtext()
    assert "catching up (first start: initial copy)" in log and "unclean" not in log, log[-2000:]
    assert [r.outcome.value for r in eng.client.results("unmount_all")] == ["ok"]
    (src / "f").write_text("two")  # changed while not captured
    target.rename(tmp_path / "put-aside")
    target.mkdir()
    (target / "someone-elses").write_text("x")
    (r,) = eng.client.results("mount", path=str(src))
    assert r.failed and "carries no mirrorsetup marker" in r.message, r.message
    shutil.rmtree(target)
    (tmp_path / "put-aside").rename(target)
    assert [r.outcome.value for r in eng.client.results("mount", path=str(src))] == ["ok"]
    eng.drain(str(src))
    log = eng.logtext()
    assert "unclean" not in log and "caught up (capture was not in place since" in log, log[-2000:]
    assert (target / "f").read_text() == "two"
    assert not eng.verify(str(src))


def test_an_entry_without_a_target_does_not_say_it_replicates(setup, tmp_path):
    """Found by a walk: an entry added without --target showed replication "established"."""
    src = tmp_path / "notgt"
    src.mkdir()
    eng, _, _ = setup([{"path": str(src)}])
    (src / "f").write_text("x")
    st = eng.status(str(src))
    assert st["mounted"] and st["connection"] == "none" and st["replication"] == "no target", st


def test_daemon_not_running_says_how_to_start_it(tmp_path):
    client = ControlClient(str(tmp_path / "none.sock"))
    assert client.is_running() is False
    with pytest.raises(DaemonNotRunning) as exc:
        client.request("status")
    assert "mirrorsetup daemon" in str(exc.value) and "systemctl start mirrorsetup" in str(exc.value)


def test_an_existing_socket_directory_keeps_its_mode(setup, tmp_path):
    """A --socket in a directory that exists (e.g. /run/x.sock) is never chmodded: it was made
    0700, which would have locked everyone else out of /run."""
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o755)
    eng, _, _ = setup([])
    assert eng.client.request("ping")["ok"]
    assert oct(os.stat(run).st_mode & 0o777) == "0o755"
    assert oct(os.stat(eng.socket).st_mode & 0o777) == "0o600"


def test_socket_not_root_only_is_refused(setup, tmp_path):
    eng, _, _ = setup([])
    os.chmod(eng.socket, 0o666)
    try:
        with pytest.raises(MirrorError) as exc:
            eng.client.request("ping")
        assert "not root-only" in str(exc.value)
    finally:
        os.chmod(eng.socket, 0o600)
    os.chown(eng.socket, 1000, 0)
    with pytest.raises(MirrorError) as exc:
        eng.client.request("ping")
    assert "not root-only" in str(exc.value)
    os.chown(eng.socket, 0, 0)
    st = os.stat(eng.socket)
    assert oct(st.st_mode & 0o777) == "0o600" and oct(os.stat(os.path.dirname(eng.socket)).st_mode & 0o777) == "0o700"
    assert eng.client.request("ping")["ok"]


def test_reload_mounts_new_entries_and_unmounts_removed_ones(setup, tmp_path):
    eng, src, tgt = setup()
    other = tmp_path / "other"
    other.mkdir()
    write_config(eng.config, [{"path": src, "target": tgt}, {"path": str(other)}])
    results = eng.client.results("reload")
    assert [(r.action, r.target, r.outcome.value) for r in results] == [("mount", str(other), "ok")]
    assert str(other) in mirrorfs_mounts()
    write_config(eng.config, [{"path": str(other)}])
    results = eng.client.results("reload")
    assert [(r.action, r.target, r.outcome.value) for r in results] == [("unmount", src, "ok")]
    assert src not in mirrorfs_mounts() and str(other) in mirrorfs_mounts()
    assert eng.status(str(other))["target"] is None


def test_a_worker_that_dies_is_replaced_under_its_dead_mount(setup):
    """The daemon notices a dead worker and captures again at once, beneath the dead mount:
    the path answers again and what is written there is replicated."""
    eng, src, tgt = setup()
    pid = eng.status(src)["worker_pid"]
    os.kill(pid, 9)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = eng.status(src)
        if st["captured"] and st["worker_pid"] not in (None, pid):
            break
        time.sleep(0.05)
    assert st["captured"] and st["worker_pid"] != pid, st
    assert [m for m in mirrorfs_mounts() if m == src] == [src]  # one mount there, not a stack
    open(os.path.join(src, "after"), "w").write("captured again")
    eng.drain(src)
    assert open(os.path.join(tgt, "after")).read() == "captured again"
    assert "stopped unexpectedly" in eng.logtext()
    assert eng.verify(src) == []


def _template_of(worker: int):
    import psutil
    parent = psutil.Process(worker).parent()
    assert parent is not None and "app.engine.zygote" in parent.cmdline(), \
        f"worker {worker}'s parent is {parent and parent.cmdline()}"
    return parent


def _replaced(eng, src: str, pid: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = eng.status(src)
        if st["captured"] and st["worker_pid"] not in (None, pid):
            return st["worker_pid"]
        time.sleep(0.05)
    raise AssertionError(f"worker {pid} was not replaced: {st}")


def test_workers_are_forked_from_a_template_whose_death_they_survive(setup):
    """A worker is forked from the daemon's worker template (shared memory) yet reads as
    `python -m app.engine.capture --spec ...` in ps; it survives its template, and the next
    worker comes from a new template; the template ends with the daemon."""
    import psutil
    eng, src, tgt = setup()
    pid = eng.status(src)["worker_pid"]
    cmd = psutil.Process(pid).cmdline()
    assert cmd[1:3] == ["-m", "app.engine.capture"] and "--spec" in cmd and src in " ".join(cmd), cmd
    template = _template_of(pid)
    assert template.ppid() == eng.proc.pid
    template.kill()
    template.wait(10)
    open(os.path.join(src, "after-template"), "w").write("still captured")
    eng.drain(src)
    assert open(os.path.join(tgt, "after-template")).read() == "still captured"
    assert eng.status(src)["worker_pid"] == pid
    os.kill(pid, 9)  # the daemon starts a new worker: through a new template
    second = _template_of(_replaced(eng, src, pid))
    assert second.pid != template.pid and second.ppid() == eng.proc.pid
    open(os.path.join(src, "after-new-template"), "w").write("captured again")
    eng.drain(src)
    assert open(os.path.join(tgt, "after-new-template")).read() == "captured again"
    eng.stop()
    second.wait(10)  # ends with the daemon (its socket closes)


def test_the_worker_template_starts_with_the_daemons_process(setup, tmp_path):
    """The template is started as the daemon's process begins, so that its imports run beside
    the daemon's own (it was started at the first worker, after them): a daemon with no
    entries has it already; the first worker is forked from that very process; it ends with
    the daemon."""
    import psutil
    eng, _, _ = setup([])

    def templates():
        return [p for p in psutil.Process(eng.proc.pid).children()
                if "app.engine.zygote" in " ".join(p.cmdline())]
    (template,) = templates()
    src, tgt = str(tmp_path / "src"), str(tmp_path / "tgt")
    write_config(eng.config, [{"path": src, "target": tgt}])
    (r,) = eng.client.results("mount_all")
    assert r.outcome.value == "ok", r.message
    assert _template_of(eng.status(src)["worker_pid"]).pid == template.pid
    assert templates() == [template]
    open(os.path.join(src, "f"), "w").write("captured")
    eng.drain(src)
    assert open(os.path.join(tgt, "f")).read() == "captured"
    eng.stop()
    template.wait(10)


def test_holders_are_found_without_asking_a_mount_that_does_not_answer(setup, tmp_path):
    """Another entry's worker is stopped (SIGSTOP: its FUSE mount answers nothing) while a
    process has its working directory and a file there. Looking for the holders of the first
    entry asks nothing of that mount (stat'ing those files hung the daemon): the first entry's
    own holder is named, its unmount is refused with who holds it, then done once it is free."""
    other = tmp_path / "other"
    other.mkdir()
    eng, src, _ = setup([{"path": str(tmp_path / "src"), "target": str(tmp_path / "tgt")},
                         {"path": str(other), "target": str(tmp_path / "other.tgt")}])
    script = "import sys, time; f = open(sys.argv[1], 'w'); print('ok', flush=True); time.sleep(600)"
    stuck = subprocess.Popen([sys.executable, "-c", script, "held-there"], cwd=other, stdout=subprocess.PIPE)
    mine = subprocess.Popen([sys.executable, "-c", script, os.path.join(src, "held-here")],
                            stdout=subprocess.PIPE)
    worker = eng.status(str(other))["worker_pid"]
    try:
        assert stuck.stdout.readline().strip() == b"ok" and mine.stdout.readline().strip() == b"ok"
        os.kill(worker, signal.SIGSTOP)
        box: dict = {}

        def ask():
            try:
                box["r"] = eng.client.results("unmount", path=src, force=False)
            except Exception as exc:  # noqa: BLE001 - reported below
                box["r"] = exc
        t = threading.Thread(target=ask, daemon=True)
        t.start()
        t.join(20)
        assert "r" in box, "the unmount hung on the stopped worker's mount"
        (r,) = box["r"]
        assert r.failed and r.errno == errno.EBUSY, r.message
        assert f"pid {mine.pid}" in r.message and f"pid {stuck.pid}" not in r.message, r.message
        mine.kill()
        mine.wait()
        (r,) = eng.client.results("unmount", path=src, force=False)
        assert r.outcome.value == "ok", r.message
    finally:
        os.kill(worker, signal.SIGCONT)
        for p in (stuck, mine):
            p.kill()
            p.wait()


def test_who_uses_a_replica_or_a_device_is_found_without_asking_a_mount_that_does_not_answer(
        setup, tmp_path, scratch_loop):
    """The agent's users of a replica (promote, switch-over, fail-back) and switch-over's
    users of an entry: psutil's open_files() stat'ed every descriptor of every process; one on
    a FUSE mount that does not answer (here a stopped worker's, its attributes cached 1 s)
    hung the agent's fail-back hello until its session was ended (8 minutes on a busy host).
    Processes are found by the kernel's names of their descriptors and working directory,
    and an image by its mount and inode: the holders are named, the stuck one is not asked
    (nor the backing file of a loop on it, stat'ed to tell a hard link of the image). The same for the writers of a device (status's "a writer bypassing the loop", detach,
    switch-over): every descriptor was stat'ed for its rdev; now only those on local file
    systems are."""
    from app.engine.agent import path_users
    from app.services.status import openers_of, writers_of
    device = scratch_loop(1 << 20)
    eng, src, _ = setup()
    replica = tmp_path / "replica"
    (replica / "sub").mkdir(parents=True)
    image = tmp_path / "image"
    image.write_bytes(b"\0" * 4096)
    os.link(image, tmp_path / "image.other-name")
    script = ("import os, sys, time; fs = [open(p) for p in sys.argv[1:]]; print('ok', flush=True); "
              "time.sleep(600)")
    stuck = subprocess.Popen([sys.executable, "-c", script, os.path.join(src, "held")],
                             cwd=src, stdout=subprocess.PIPE)
    open(os.path.join(src, "held"), "w").close()
    in_dir = subprocess.Popen([sys.executable, "-c", script], cwd=replica / "sub", stdout=subprocess.PIPE)
    on_image = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "image.other-name")],
                                stdout=subprocess.PIPE)
    writer = subprocess.Popen([sys.executable, "-c", script.replace("open(p)", "open(p, 'r+b')"),
                               device], stdout=subprocess.PIPE)
    with open(os.path.join(src, "loop-file"), "wb") as f:  # another loop, on the stuck mount
        f.truncate(1 << 20)
    other_loop = subprocess.run(["losetup", "--find", "--show", os.path.join(src, "loop-file")],
                                capture_output=True, text=True, check=True).stdout.strip()
    worker = eng.status(src)["worker_pid"]
    try:
        for p in (stuck, in_dir, on_image, writer):
            assert p.stdout.readline().strip() == b"ok"
        os.kill(worker, signal.SIGSTOP)
        time.sleep(1.5)  # the stuck mount's cached attributes expire: a stat would ask it
        box: dict = {}

        def ask():
            box["dir"] = path_users(str(replica), namespaces=True, agents=False)
            box["image"] = path_users(str(image), block=True)
            box["writers"] = writers_of(device)
            box["openers"] = openers_of(device)
        t = threading.Thread(target=ask, daemon=True)
        t.start()
        t.join(20)
        assert "image" in box, "looking for a replica's users hung on the stopped worker's mount"
        assert "openers" in box, "looking for a device's writers hung on the stopped worker's mount"
        assert [w[0] for w in box["writers"]] == [writer.pid], box
        assert writer.pid in [pid for pid, _ in box["openers"]] and \
            stuck.pid not in [pid for pid, _ in box["openers"]], box
        assert [u for u in box["dir"] if u.startswith(f"open by pid {in_dir.pid} (")], box
        assert not [u for u in box["dir"] + box["image"] if f"pid {stuck.pid} " in u], box
        assert [u for u in box["image"] if u.startswith(f"open by pid {on_image.pid} ")], box
        assert not [u for u in box["image"] if f"pid {in_dir.pid} " in u], box
    finally:
        os.kill(worker, signal.SIGCONT)
        for p in (stuck, in_dir, on_image, writer):
            p.kill()
            p.wait()
        subprocess.run(["losetup", "-d", other_loop], check=True)


def test_a_status_given_up_on_a_worker_leaves_its_late_answer_to_no_other_call(setup):
    """The daemon asks a worker for its figures and gives up after 10 s (a stopped or hung
    worker): its answer came later all the same, and the next call read it as its own, so
    from then on every status showed the figures of the call before (and a drain, a mirror
    could have taken a status's answer for theirs). A late answer is now set aside, and a
    worker that left a call unanswered is given a second by the next status, not ten."""
    eng, src, tgt = setup()
    worker = eng.status(src)["worker_pid"]
    os.kill(worker, signal.SIGSTOP)
    try:
        st = eng.status(src)
        stopped = f" (stopped by a signal: kill -CONT {worker} resumes it)"
        assert st.get("error") == f"the worker (pid {worker}) has not answered for 10 s{stopped}", st
        t0 = time.monotonic()  # asked again: a second of patience, not ten
        st = eng.status(src)
        assert time.monotonic() - t0 < 5 and re.fullmatch(
            rf"the worker \(pid {worker}\) has not answered for 1\d s" + re.escape(stopped),
            st.get("error") or ""), st
        from app.services.config import ConfigStore
        from app.services.status import snapshot
        from app.services.control import ControlClient
        snap = snapshot(ConfigStore(eng.config), ControlClient(eng.socket), scan_writers=False)
        assert [w.message for w in snap.warnings if w.level == "error"] == [
            f"capture: {snap.filesystem[0].figures.error}; writes through it wait until it does"], \
            snap.warnings
    finally:
        os.kill(worker, signal.SIGCONT)
    before = eng.status(src)
    assert before.get("error") is None and before["captured_ops"] is not None, before
    with open(os.path.join(src, "after"), "w") as f:
        f.write("x")
    after = eng.status(src)  # written through the mount: counted by the time it is closed
    assert after["captured_ops"] > before["captured_ops"], (before, after)
    eng.drain(src)
    assert open(os.path.join(tgt, "after")).read() == "x"


def test_status_and_fs_list_answer_while_a_capture_does_not(setup):
    """A capture that does not answer (stopped here; hung in life): `status` and `fs list`
    checked each entry as if it were to be added (lstat, stat and realpath of its path, the
    mirrorfs mount point), and hung with it; the administrator's first tools to see what is
    wrong. The mount table says the path is a mirrorfs mount: it is not looked at, and the
    snapshot says the entry is mounted."""
    from app.services import status
    from app.services.config import ConfigStore
    from app.services.entries import problems
    eng, src, _ = setup()
    worker = eng.status(src)["worker_pid"]
    store = ConfigStore(eng.config)
    os.kill(worker, signal.SIGSTOP)
    try:
        time.sleep(1.5)  # the mount's cached attributes expire: a stat would ask the worker
        box: dict = {}

        def ask():
            box["problems"] = problems(store.load(), store)
            box["snap"] = status.snapshot(store, None, scan_writers=True)
        t = threading.Thread(target=ask, daemon=True)
        t.start()
        t.join(20)
        assert "snap" in box, f"status hung on the stopped capture ({sorted(box)} done)"
        assert box["problems"] == {}, box
        assert [e.state for e in box["snap"].filesystem] == ["mounted"], box["snap"].filesystem
    finally:
        os.kill(worker, signal.SIGCONT)


def test_an_unmount_ends_a_capture_that_does_not_answer(setup):
    """Unmount of an entry whose worker does not answer (stopped here; hung in life): the
    mount went, then the daemon asked the worker to stop and waited for its answer without
    end, and `fs unmount-all` never returned. It is now given a few seconds (it left a status
    unanswered already), then ended; the result says so and that the next start resyncs."""
    import psutil
    eng, src, _ = setup()
    worker = eng.status(src)["worker_pid"]
    os.kill(worker, signal.SIGSTOP)
    try:
        assert "has not answered" in (eng.status(src).get("error") or "")
        box: dict = {}
        t0 = time.monotonic()
        t = threading.Thread(target=lambda: box.update(r=eng.client.results(
            "unmount", path=src, force=False)), daemon=True)
        t.start()
        t.join(60)
        assert "r" in box, "the unmount waited for the stopped worker without end"
        (r,) = box["r"]
        assert time.monotonic() - t0 < 30, time.monotonic() - t0
        assert f"not answering (stopped by a signal: kill -CONT {worker} resumes it)" in r.message \
            and "the next start resyncs" in r.message, r.message
        # killed (SIGKILL): a process still exiting shows as running for a moment (the CI run
        # of 360f173 looked at once and failed so); it is gone or a zombie within seconds

        def ended() -> bool:
            try:
                return psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True
        deadline = time.monotonic() + 10
        while not ended() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ended(), psutil.Process(worker).status()
        assert src not in mirrorfs_mounts()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)


def test_without_the_template_workers_start_anew(setup, monkeypatch):
    """MIRRORSETUP_ZYGOTE=0 (and the fall-back when the template cannot answer): the worker is
    `python -m app.engine.capture` started by the daemon itself, and captures as well."""
    import psutil
    monkeypatch.setenv("MIRRORSETUP_ZYGOTE", "0")
    eng, src, tgt = setup()
    pid = eng.status(src)["worker_pid"]
    assert psutil.Process(pid).ppid() == eng.proc.pid
    assert not [c for c in psutil.Process(eng.proc.pid).children() if "app.engine.zygote" in c.cmdline()]
    open(os.path.join(src, "anew"), "w").write("captured")
    eng.drain(src)
    assert open(os.path.join(tgt, "anew")).read() == "captured"


def test_status_watch_prints_again_when_the_daemons_figures_move(setup):
    """Writes into a captured directory raise no event a watcher hears; `status --watch`
    still prints again when the daemon's positions move (it asks every FIGURES_INTERVAL)."""
    eng, src, _ = setup()
    eng.drain(src)
    watch = subprocess.Popen([sys.executable, "-m", "app", "--config", str(eng.config), "--socket",
                              eng.socket, "status", "--watch"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "Daemon: " not in seen:  # the first print, whole
            line = watch.stdout.readline()
            assert line, watch.stderr.read()
            seen += line
        for i in range(10):
            with open(os.path.join(src, f"moved{i}"), "w") as f:
                f.write("x")
        again = ""
        while "Daemon: " not in again:  # printed again, without any event
            line = watch.stdout.readline()
            assert line, watch.stderr.read()
            again += line
    finally:
        watch.kill()
        watch.wait()


@pytest.mark.parametrize("kind", ["adopted", "spawned"])
def test_a_watched_worker_that_a_status_poll_finds_dead_first_still_wakes_its_watcher(kind):
    """The daemon's watcher waits on a worker's pidfd while status asks `alive()` (poll) every
    time it is called. When a poll finds the worker dead before the event loop has woken the
    watcher, the watcher must still wake: otherwise the dead worker is never replaced (the CI
    failure of the two tests above, whose status polls every 50 ms raced the watcher)."""
    import trio
    from app.engine.supervisor import AdoptedProcess, SpawnedChild
    child = subprocess.Popen(["sleep", "60"])
    try:
        proc = AdoptedProcess(child.pid) if kind == "adopted" else SpawnedChild(child)
        woke = []

        async def main():
            async with trio.open_nursery() as nursery:
                async def watcher():
                    await proc.wait()
                    woke.append(proc.returncode)
                nursery.start_soon(watcher)
                await trio.sleep(0.1)  # the watcher is parked on the pidfd now
                child.kill()
                os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, not yielding to trio
                assert proc.poll() is not None  # a status poll sees it first
                with trio.move_on_after(5):
                    while not woke:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()

        trio.run(main)
        assert woke, "the watcher never woke after a poll had found its worker dead"
        assert woke[0] == (-1 if kind == "adopted" else -signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
