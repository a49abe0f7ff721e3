"""`mirrorsetup daemon start|restart|status|stop` on a private socket, config and state
directory (given by MIRRORSETUP_STATE_DIR): the daemon runs detached with its log beside the
socket, and every daemon a test starts is stopped at teardown, by its pid if need be."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from test_cli_conventions import REPO, cli

from app.services import daemonctl
from app.services.control import ControlClient
from app.services.mounts import read_mountinfo
from app.services.results import Outcome

pytestmark = pytest.mark.root


@pytest.fixture
def private(tmp_path):
    """(argv prefix, env, paths) for a daemon of the test's own; stopped at teardown."""
    paths = {"config": tmp_path / "etc" / "replication.toml", "socket": tmp_path / "run" /
             "control.sock", "state": tmp_path / "state", "log": tmp_path / "run" / "daemon.log"}
    prefix = ["--config", str(paths["config"]), "--socket", str(paths["socket"])]
    env = {"MIRRORSETUP_STATE_DIR": str(paths["state"])}
    started: list[int] = []
    yield prefix, env, paths, started
    client = ControlClient(str(paths["socket"]))
    if client.is_running():
        started.append(client.request("ping")["pid"])
        client.request("shutdown")
    for pid in started:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def status(prefix, env) -> dict:
    r = cli(*prefix, "daemon", "status", "--json", env=env)
    return json.loads(r.stdout)


def test_start_status_restart_stop(private):
    prefix, env, paths, started = private
    r = cli(*prefix, "daemon", "start", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "started the daemon" in r.stdout and str(paths["log"]) in r.stdout
    info = status(prefix, env)
    started.append(info["pid"])
    assert info["running"] and info["config"] == os.path.realpath(paths["config"])
    assert info["state_dir"] == str(paths["state"])  # from the environment, passed on
    assert info["log"] == str(paths["log"]) and paths["log"].is_file()
    assert info["socket"] == str(paths["socket"]) and info["started_at"]
    text = cli(*prefix, "daemon", "status", env=env)
    assert text.returncode == 0 and f"running (pid {info['pid']}, up " in text.stdout

    again = cli(*prefix, "daemon", "start", env=env)
    assert again.returncode == 0 and "already running" in again.stdout

    r = cli(*prefix, "daemon", "restart", env=env)
    assert r.returncode == 0 and "restarted the daemon" in r.stdout, r.stdout + r.stderr
    after = status(prefix, env)
    started.append(after["pid"])
    assert after["running"] and after["pid"] != info["pid"]

    r = cli(*prefix, "daemon", "stop", env=env)
    assert r.returncode == 0 and f"stopped the daemon (pid {after['pid']})" in r.stdout
    assert status(prefix, env)["running"] is False
    assert cli(*prefix, "daemon", "status", env=env).returncode == 1


def test_a_daemon_for_another_configuration_is_not_stopped(private, tmp_path):
    prefix, env, paths, started = private
    assert cli(*prefix, "daemon", "start", env=env).returncode == 0
    started.append(status(prefix, env)["pid"])
    other = ["--config", str(tmp_path / "other.toml"), "--socket", str(paths["socket"])]
    for action in ("stop", "restart", "start"):
        r = cli(*other, "daemon", action, env=env)
        assert r.returncode == 2 and "works from" in r.stderr, (action, r.stdout, r.stderr)
    assert status(prefix, env)["running"]


def test_a_stop_of_a_daemon_that_does_not_answer_names_it_and_gives_up(private):
    """A daemon that holds its socket but does not answer (here SIGSTOPped) made `daemon stop`
    wait forever for its ping. Now it waits ANSWER_SECONDS, then refuses on stderr naming the
    process, that it does not answer and how to resume it, exit 2, and signals nothing: once
    resumed, that same daemon answers and stops."""
    prefix, env, paths, started = private
    assert cli(*prefix, "daemon", "start", env=env).returncode == 0
    pid = status(prefix, env)["pid"]
    started.append(pid)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = cli(*prefix, "daemon", "stop", env=env, timeout=60)
        took = time.monotonic() - t0
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stdout == ""
        assert (f"the daemon (pid {pid}) on {paths['socket']} does not answer (no reply to ping "
                f"in {daemonctl.ANSWER_SECONDS} s) (stopped by a signal: kill -CONT {pid} "
                "resumes it): nothing was asked of it") in r.stderr, r.stderr
        assert daemonctl.ANSWER_SECONDS <= took < daemonctl.ANSWER_SECONDS + 10, took
        assert psutil.Process(pid).status() == psutil.STATUS_STOPPED  # nothing was sent to it
        r = cli(*prefix, "daemon", "stop", "--json", env=env, timeout=60)
        assert r.returncode == 2 and json.loads(r.stdout)["errno_name"] == "ETIMEDOUT", r.stdout
        info = status(prefix, env)
        assert (info["running"], info["answers"], info["pid"]) == (True, False, pid), info
        text = cli(*prefix, "daemon", "status", env=env, timeout=60)
        assert text.returncode == 1 and f"not answering (pid {pid}, up " in text.stdout, text
    finally:
        os.kill(pid, signal.SIGCONT)
    r = cli(*prefix, "daemon", "stop", env=env, timeout=60)
    assert r.returncode == 0 and f"stopped the daemon (pid {pid})" in r.stdout, r.stdout + r.stderr


@contextlib.contextmanager
def silent_on(sock):
    """A process that listens on the daemon's socket and never answers (stuck, or a daemon
    still starting); killed, and its socket removed, at the end."""
    sock.parent.mkdir(mode=0o700)
    stuck = subprocess.Popen([sys.executable, "-c", (
        "import os, socket, sys, time; s = socket.socket(socket.AF_UNIX); "
        "os.umask(0o177); s.bind(sys.argv[1]); s.listen(); print('listening', flush=True); "
        "time.sleep(300)"), str(sock)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    try:
        assert stuck.stdout.readline().strip() == "listening"
        yield stuck
    finally:
        stuck.kill()
        stuck.wait()
        stuck.stdout.close()
        sock.unlink()


def test_a_stop_of_a_stuck_process_on_the_socket_says_what_can_be_done(private):
    """A process that holds the socket and is not stopped but never answers (stuck, or a
    daemon still starting): refused after ANSWER_SECONDS, naming it, its log, and what ends it,
    and nothing is sent to it."""
    prefix, env, paths, started = private
    sock = paths["socket"]
    with silent_on(sock) as stuck:
        r = cli(*prefix, "daemon", "stop", env=env, timeout=60)
        assert r.returncode == 2, r.stdout + r.stderr
        assert (f"the daemon (pid {stuck.pid}) on {sock} does not answer (no reply to ping in "
                f"{daemonctl.ANSWER_SECONDS} s): nothing was asked of it. A daemon that is still "
                "starting answers once its log (") in r.stderr, r.stderr
        assert f"`kill {stuck.pid}` asks it to stop as `daemon stop` does, `kill -KILL " \
               f"{stuck.pid}` ends it at once (its captures go on and the next daemon takes " \
               "them over)" in r.stderr, r.stderr
        assert stuck.poll() is None


def test_status_of_a_daemon_that_does_not_answer_says_so_and_does_not_wait_for_it(private):
    """`mirrorsetup status` (and the dashboard's snapshot) asked the daemon without a bound: a
    daemon stopped by a signal, or stuck, made status hang. It says who does not answer now,
    with how to resume it, after ANSWER_SECONDS, and shows the rest of what it reads. A
    command that may take long (mount-all) is not sent after an unanswered ping either."""
    prefix, env, paths, started = private
    paths["config"].parent.mkdir()
    paths["config"].write_text("schema = 1\n")
    sock = paths["socket"]
    with silent_on(sock) as stuck:
        os.kill(stuck.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        r = cli(*prefix, "status", env=env, timeout=60)
        took = time.monotonic() - t0
        said = r.stdout + r.stderr
        assert (f"the daemon (pid {stuck.pid}) on {sock} does not answer (no reply to ping in "
                f"{daemonctl.ANSWER_SECONDS} s) (stopped by a signal: kill -CONT {stuck.pid} "
                "resumes it)") in said, said
        assert daemonctl.ANSWER_SECONDS <= took < daemonctl.ANSWER_SECONDS + 15, took
        # a command that may take long is not sent to it either (it waited forever)
        t0 = time.monotonic()
        r = cli(*prefix, "fs", "mount-all", env=env, timeout=60)
        took = time.monotonic() - t0
        assert r.returncode != 0, r.stdout + r.stderr
        assert (f"the daemon (pid {stuck.pid}) on {sock} does not answer (no reply to ping in "
                f"{daemonctl.ANSWER_SECONDS} s) (stopped by a signal: kill -CONT {stuck.pid} "
                "resumes it): nothing was asked of it") in r.stderr, r.stderr
        assert took < daemonctl.ANSWER_SECONDS + 15, took
        assert psutil.Process(stuck.pid).status() == psutil.STATUS_STOPPED


BAD_TARGET = """schema = 1

[[target]]
name = "backup1"
host = "backup1.example"
root = "/srv/replica"

[[filesystem]]
path = "/srv"
target = "backup1:../../etc"
"""


def write_bad_config(paths) -> None:
    paths["config"].parent.mkdir(exist_ok=True)
    paths["config"].write_text(BAD_TARGET)
    paths["config"].chmod(0o600)


def assert_names_the_bad_line(paths, r) -> None:
    assert f"{paths['config'].resolve()} line 10: " in r.stderr and "must be relative" in r.stderr


def test_a_restart_with_a_bad_configuration_leaves_the_running_daemon(private):
    """As `nginx -t` before a reload: the file is read and checked before the running daemon
    is asked to stop. One the new daemon would refuse is refused (exit 2, the file and line on
    stderr, the errno in --json) and the same daemon goes on running."""
    prefix, env, paths, started = private
    assert cli(*prefix, "daemon", "start", env=env).returncode == 0
    first = status(prefix, env)
    started.append(first["pid"])
    write_bad_config(paths)

    r = cli(*prefix, "daemon", "restart", env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert_names_the_bad_line(paths, r)
    assert f"the running daemon (pid {first['pid']}) was left as it is" in r.stderr
    assert r.stdout == ""
    r = cli(*prefix, "daemon", "restart", "--json", env=env)
    assert r.returncode == 2 and json.loads(r.stdout)["errno_name"] == "EINVAL", r.stdout
    after = status(prefix, env)
    assert after["running"] and after["pid"] == first["pid"]

    paths["config"].write_text("schema = 1\n")  # corrected: the restart goes ahead
    r = cli(*prefix, "daemon", "restart", env=env)
    assert r.returncode == 0 and "restarted the daemon" in r.stdout, r.stdout + r.stderr
    again = status(prefix, env)
    started.append(again["pid"])
    assert again["running"] and again["pid"] != first["pid"]


def test_a_start_with_a_bad_configuration_is_refused_before_a_daemon_is_spawned(private):
    """Left by the restart fix: `daemon start` spawned a daemon that read the file, exited with
    status 2, and the start said "FAILED … exited with status 2" (exit 1). The file is read
    first, as for a restart: exit 2, the file and line, and no daemon."""
    prefix, env, paths, started = private
    write_bad_config(paths)
    r = cli(*prefix, "daemon", "start", env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert_names_the_bad_line(paths, r)
    assert "no daemon was started" in r.stderr and r.stdout == "", r.stdout + r.stderr
    assert not status(prefix, env)["running"]


def _capture_mount(path) -> int | None:
    """The mount id of the mirrorfs over `path`, None when nothing is mounted there."""
    ids = [m.mount_id for m in read_mountinfo() if m.mount_point == str(path)]
    return ids[-1] if ids else None


FAKE_SYSTEMCTL = """#!{python}
# systemctl as far as `daemon restart|start` uses it (this machine runs no systemd): records
# its arguments; `restart` sends SIGTERM to a daemon still running, as systemd does, then both
# start `mirrorsetup daemon` detached, as the unit's ExecStart does.
import os, signal, subprocess, sys, time
sys.path.insert(0, {repo!r})
from app.services.control import ControlClient
with open({calls!r}, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
client = ControlClient({socket!r})
if sys.argv[1] == "restart" and client.is_running():
    os.kill(client.request("ping")["pid"], signal.SIGTERM)
    while client.is_running():
        time.sleep(0.05)
if sys.argv[1] in ("start", "restart"):
    with open({log!r}, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app", "daemon", "--config", {config!r},
                          "--socket", {socket!r}, "--state-dir", {state!r}], cwd={repo!r},
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    with open({calls!r} + ".pids", "a") as f:
        f.write(f"{{proc.pid}}\\n")
"""


@pytest.mark.parametrize("under_systemd", [False, True], ids=["detached", "systemd"])
def test_a_restart_keeps_every_capture(private, tmp_path, monkeypatch, under_systemd):
    """`daemon restart` leaves every capture to the next daemon: the mirrorfs mount over an
    entry nothing uses stays the very same mount, and a write made after the restart reaches
    the target. Under systemd too: a bare `systemctl restart` (SIGTERM) would end it, as a stop
    does. This machine runs no systemd, so a stand-in `systemctl` (which does what systemd
    does to the unit: SIGTERM, then ExecStart) is on PATH and restart() is called in-process
    with the systemd path chosen."""
    prefix, env, paths, started = private
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    src.mkdir()
    r = cli(*prefix, "fs", "add", str(src), "--target", str(tgt), env=env)
    assert r.returncode == 0, r.stderr
    assert cli(*prefix, "daemon", "start", env=env).returncode == 0
    try:
        first = status(prefix, env)
        started.append(first["pid"])
        deadline = time.monotonic() + 20
        while _capture_mount(src) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        mount_id = _capture_mount(src)
        assert mount_id is not None, "the daemon did not mount the entry"
        if under_systemd:
            calls = tmp_path / "systemctl.calls"
            fake = tmp_path / "bin" / "systemctl"
            fake.parent.mkdir()
            fake.write_text(FAKE_SYSTEMCTL.format(
                python=sys.executable, repo=str(REPO), calls=str(calls), log=str(paths["log"]),
                config=str(paths["config"]), socket=str(paths["socket"]),
                state=str(paths["state"])))
            fake.chmod(0o755)
            monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
            monkeypatch.setattr(daemonctl, "_use_systemd", lambda settings: True)
            monkeypatch.setenv("MIRRORSETUP_STATE_DIR", str(paths["state"]))
            res = daemonctl.restart(daemonctl.DaemonSettings.resolve(
                paths["config"], paths["socket"], paths["state"]))
            assert res.outcome is Outcome.OK and "every capture kept" in res.message, res.message
            assert calls.read_text() == "restart mirrorsetup\n"
            deadline = time.monotonic() + 20
            while not ControlClient(str(paths["socket"])).is_running() \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            r = cli(*prefix, "daemon", "restart", env=env)
            assert r.returncode == 0 and "restarted the daemon" in r.stdout, r.stdout + r.stderr
        after = status(prefix, env)
        started.append(after["pid"])
        assert after["running"] and after["pid"] != first["pid"]
        assert _capture_mount(src) == mount_id  # never unmounted: the same capture goes on
        (src / "after-restart").write_bytes(b"caught")
        deadline = time.monotonic() + 20
        landed = tgt / "after-restart"
        while not (landed.exists() and landed.read_bytes() == b"caught") \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert landed.read_bytes() == b"caught"
    finally:
        # every daemon started (the stand-in's too, which may still be binding its socket)
        # ends the capture it holds: nothing uses it, so it is unmounted
        pids = {p for p in started}
        spawned = tmp_path / "systemctl.calls.pids"
        if spawned.exists():
            pids |= {int(p) for p in spawned.read_text().split()}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _capture_mount(src) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if _capture_mount(src) is not None:  # left with no daemon (a failed test): ours only
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if str(src) in " ".join(proc.info["cmdline"] or ()):
                    with contextlib.suppress(psutil.Error):
                        proc.terminate()
            time.sleep(0.5)
            ours = [m.mount_point for m in read_mountinfo()
                    if m.mount_point.startswith(f"{tmp_path}/")]  # src and the worker's own
            for point in sorted(ours, key=len, reverse=True):
                subprocess.run(["umount", "-l", point], check=False)
        assert _capture_mount(src) is None
