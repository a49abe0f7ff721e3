"""The daemon's life: kill -9 under load and recover, unmount with holders, refusals, socket rules."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time

import pytest

from app.services.control import ControlClient, DaemonNotRunning
from app.services.results import MirrorError
from test_engine_support import engine_maker, mirrorfs_mounts, write_config

pytestmark = pytest.mark.root

WRITER = r"""
import os, sys
src, log = sys.argv[1], sys.argv[2]
logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
i = 0
while True:
    name = os.path.join(src, "w%05d" % i)
    try:
        with open(name, "wb") as f:
            f.write(os.urandom(4096 + i * 7))
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        break  # the mount went away with the daemon
    os.write(logfd, b"%s\n" % name.encode())
    os.fsync(logfd)
    i += 1
"""


@pytest.fixture
def setup(tmp_path):
    with engine_maker(tmp_path) as make:
        yield make


def _sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_kill9_under_write_load_then_restart_converges(setup, tmp_path):
    eng, src, tgt = setup()
    log = str(tmp_path / "fsynced.log")
    for _round in range(2):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, src, log])
        deadline = time.monotonic() + 30
        while (not os.path.exists(log) or os.path.getsize(log) < 2000) and time.monotonic() < deadline:
            time.sleep(0.05)
        eng.kill9()
        writer.wait(timeout=30)
        # the killed daemon's mount is stale: ENOTCONN until the next daemon cleans it
        with pytest.raises(OSError) as exc:
            os.listdir(src)  # not stat(): the root's attributes may still be cached
        assert exc.value.errno == errno.ENOTCONN
        eng.start()
        assert eng.status(src)["mounted"]
        eng.drain(src)
        fsynced = open(log).read().split()
        assert len(fsynced) > 10
        for name in fsynced:
            rel = os.path.relpath(name, src)
            assert _sha(os.path.join(tgt, rel)) == _sha(name), rel
        assert eng.verify(src) == []
    assert "unclean previous stop" in eng.logtext()


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


def test_unmount_all_and_mount_all_through_the_socket(setup):
    eng, src, _ = setup()
    results = eng.client.results("unmount_all")
    assert [r.outcome.value for r in results] == ["ok"] and src not in mirrorfs_mounts()
    results = eng.client.results("mount_all")
    assert [r.outcome.value for r in results] == ["ok"] and src in mirrorfs_mounts()
    assert eng.client.results("mount", path=src)[0].outcome.value == "unchanged"


def test_clean_stop_unmounts_and_restart_needs_no_mirror(setup):
    eng, src, tgt = setup()
    open(os.path.join(src, "f"), "w").write("x")
    eng.stop()
    assert src not in mirrorfs_mounts()
    assert open(os.path.join(tgt, "f")).read() == "x"  # drained before the clean stop
    eng.start()
    assert eng.status(src)["mounted"]
    assert "first start: mirror" in eng.logtext() and "unclean previous stop" not in eng.logtext()


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


def test_daemon_not_running_says_how_to_start_it(tmp_path):
    client = ControlClient(str(tmp_path / "none.sock"))
    assert client.is_running() is False
    with pytest.raises(DaemonNotRunning) as exc:
        client.request("status")
    assert "mirrorsetup daemon" in str(exc.value) and "systemctl start mirrorsetup" in str(exc.value)


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


def test_a_worker_that_dies_is_reported_and_its_dead_mount_cleared(setup):
    eng, src, _ = setup()
    pid = eng.status(src)["worker_pid"]
    os.kill(pid, 9)
    deadline = time.monotonic() + 30
    while src in mirrorfs_mounts() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert src not in mirrorfs_mounts()
    st = eng.status(src)
    assert st["capturing"] is False and st["mounted"] is False
    assert "stopped unexpectedly" in eng.logtext()
    assert eng.client.results("mount", path=src)[0].outcome.value == "ok"
