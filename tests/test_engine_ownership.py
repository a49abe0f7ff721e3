"""Only what this installation made, and private: another installation's mounts are never
touched, a file at the socket path is never removed, state is root's only, a capture whose
mount lives on in another mount namespace is ended (drained first) and who kept it is named."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_engine_support import Engine, engine_maker, mirrorfs_mounts, write_config

pytestmark = pytest.mark.root


@pytest.fixture
def setup(tmp_path):
    with engine_maker(tmp_path) as make:
        yield make


def test_another_installations_dead_mount_is_left_alone(setup, tmp_path):
    """Installation A dies with its worker (a dead mirrorfs stays on A's entry); installation
    B, on the same host, starts and stops without touching it; A's next start replaces it."""
    eng_a, src_a, _ = setup()
    worker = eng_a.status(src_a)["worker_pid"]
    eng_a.kill9()
    os.kill(worker, 9)
    time.sleep(0.5)
    assert src_a in mirrorfs_mounts()  # dead, but there
    other = tmp_path / "b"
    (other / "srcb").mkdir(parents=True)
    cfg_b = write_config(other / "etc" / "replication.toml", [{"path": str(other / "srcb"),
                                                               "target": str(other / "tgtb")}])
    eng_b = Engine(other, cfg_b)
    try:
        eng_b.start()
        assert eng_b.status(str(other / "srcb"))["captured"]
        assert eng_b.stop() == 0
    finally:
        eng_b.cleanup()
    assert src_a in mirrorfs_mounts(), "installation B touched A's mount"
    eng_a.start()
    assert eng_a.status(src_a)["captured"]
    assert [m for m in mirrorfs_mounts() if m == src_a] == [src_a]


def test_a_file_at_the_socket_path_is_never_removed(tmp_path):
    cfg = write_config(tmp_path / "etc" / "replication.toml", [])
    sock = tmp_path / "run" / "control.sock"
    sock.parent.mkdir(mode=0o700)
    sock.write_text("precious, not a socket")
    r = subprocess.run([sys.executable, "-m", "app.engine.daemon", "--config", str(cfg),
                        "--socket", str(sock), "--state-dir", str(tmp_path / "state")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "exists and is not a socket: refusing to replace it" in r.stderr
    assert sock.read_text() == "precious, not a socket"


def test_state_and_run_directories_are_root_only(setup, tmp_path):
    eng, src, _ = setup()
    open(os.path.join(src, "f"), "w").write("x")
    eng.drain(src)
    from app.services.mounts import read_mountinfo
    mounted = {m.mount_point for m in read_mountinfo()}  # the entry's door: its directory, bound
    bad = []
    for top in (tmp_path / "state", tmp_path / "run"):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if str(Path(dirpath) / d) not in mounted]
            for name in dirnames:
                p = Path(dirpath) / name
                if stat.S_IMODE(p.lstat().st_mode) != 0o700:
                    bad.append((str(p), oct(p.lstat().st_mode)))
            for name in filenames:
                p = Path(dirpath) / name
                mode = stat.S_IMODE(p.lstat().st_mode)
                if mode & 0o077:
                    bad.append((str(p), oct(mode)))
    assert not bad, bad


def test_a_state_directory_others_could_write_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chmod(state, 0o777)
    cfg = write_config(tmp_path / "etc" / "replication.toml", [])
    r = subprocess.run([sys.executable, "-m", "app.engine.daemon", "--config", str(cfg),
                        "--socket", str(tmp_path / "run" / "control.sock"), "--state-dir", str(state)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "state directory" in r.stderr and "mode 0777" in r.stderr and "chmod 700" in r.stderr


def _copy_holder(tmp_path) -> subprocess.Popen:
    """A process in a mount namespace of its own: a copy of every mount there is now."""
    ready = tmp_path / "copied"
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "unchanged", "sh", "-c",
                             f'touch "{ready}"; exec sleep 600'])
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    return proc


def test_unmount_with_a_copy_in_another_namespace_drains_marks_and_names_it(setup, tmp_path):
    eng, src, tgt = setup()
    holder = _copy_holder(tmp_path)
    try:
        open(os.path.join(src, "last"), "w").write("written before the unmount")
        worker = eng.status(src)["worker_pid"]
        (r,) = eng.client.results("unmount", path=src)
        assert r.outcome.value == "ok", r.message
        # one sentence that says what happened (it read "its capture was …: ended there too
        # after its journal was drained … (those copies now answer ENOTCONN)")
        assert f"; its capture was ended although it was still mounted in the mount namespace of " \
               f"pid {holder.pid} (sleep)" in r.message, r.message
        assert " (those copies now answer ENOTCONN); its journal was drained to the target" in r.message
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{worker}"), "the worker was left running"
        assert open(os.path.join(tgt, "last")).read() == "written before the unmount"
    finally:
        holder.kill()
        holder.wait()


def test_detach_with_a_copy_in_another_namespace_never_leaves_the_device_held(tmp_path, disks):
    """The report: after Detach all the block worker stayed alive holding the raw device O_EXCL,
    because a copy of its FUSE mount lived on in another process's mount namespace."""
    disk = disks(16 << 20)
    cfg = write_config(tmp_path / "etc" / "replication.toml", [],
                       block=[{"device": disk, "target": str(tmp_path / "t.img")}])
    eng = Engine(tmp_path, cfg)
    try:
        eng.start()
        eng.block_drain(disk)
        worker = eng.block(disk)["worker_pid"]
        holder = _copy_holder(tmp_path)
        try:
            (r,) = eng.client.results("block_detach_all")
            assert r.outcome.value == "ok", r.message
            assert f"; its capture was ended although it was still mounted in the mount namespace " \
                   f"of pid {holder.pid} (sleep)" in r.message, r.message
            assert " (those copies now answer ENOTCONN); its journal was drained" in r.message, r.message
            deadline = time.monotonic() + 30
            while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not os.path.exists(f"/proc/{worker}"), "the worker still holds the device"
            os.close(os.open(disk, os.O_RDWR | os.O_EXCL))  # nobody holds it any more
        finally:
            holder.kill()
            holder.wait()
    finally:
        eng.cleanup()


def test_a_directory_that_holds_the_daemons_own_state_is_refused_not_hung(setup, tmp_path,
                                                                          tmp_path_factory):
    """Found by a walk: `fs add` of the state directory, then mount-all hung for good (the
    capture's journal, written through its own capture, waited for itself; status and `ls`
    hung with it). `fs add` refuses it; a configuration that has it anyway (another state
    directory than the one `fs add` was told) gets the entry refused, not a hang."""
    from app.services.config import ConfigStore
    from app.services.results import ConfigError
    other = tmp_path_factory.mktemp("replica-of-own-state")
    store = ConfigStore(tmp_path / "etc2" / "replication.toml")
    env = {"MIRRORSETUP_STATE_DIR": str(tmp_path / "state"),
           "MIRRORSETUP_SOCKET": str(tmp_path / "run" / "control.sock")}
    for path, words in ((tmp_path, "holds mirrorsetup's own state directory"),
                        (tmp_path / "state", "holds mirrorsetup's own state directory"),
                        (tmp_path / "run", "holds mirrorsetup's own run directory")):
        path.mkdir(exist_ok=True)
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with pytest.raises(ConfigError, match=words):
                store.add_filesystem(path, target=other / "x")
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    eng, _, _ = setup([{"path": str(tmp_path), "target": str(other / "x")}])
    p = subprocess.run([sys.executable, "-m", "app", "--config", str(eng.config), "--socket",
                        eng.socket, "fs", "mount-all"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"{tmp_path} holds this capture's own journal {tmp_path}/state/" in p.stderr, p.stderr
    assert str(tmp_path) not in mirrorfs_mounts()
    assert not eng.status(str(tmp_path))["captured"]  # and the daemon still answers
