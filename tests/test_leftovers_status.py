"""Left-over defects of `status` found by earlier walks."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from test_engine_support import REPO, engine_maker, said_while_stopped

pytestmark = pytest.mark.root


@pytest.fixture
def setup(tmp_path):
    with engine_maker(tmp_path) as make:
        yield make


def test_status_asks_workers_that_do_not_answer_at_once_not_one_after_another(setup, tmp_path):
    """Three entries whose workers do not answer (stopped here; hung in life): the daemon
    asked them one after another, 10 s each, so the first `status` took 30 s (N x 10 s). They
    are asked together now: one patience, whatever N, and every row says "not answering"."""
    entries = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        entries.append({"path": str(tmp_path / name), "target": str(tmp_path / f"{name}.tgt")})
    eng, _, _ = setup(entries)
    workers = [eng.status(e["path"])["worker_pid"] for e in entries]
    assert len(set(workers)) == 3, workers
    try:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        env = {**os.environ, "MIRRORSETUP_SOCKET": eng.socket}
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "app", "--config", str(eng.config), "status"],
                           cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=60)
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        assert took < 20, f"status took {took:.1f} s with 3 stopped workers"
        for e, pid in zip(entries, workers):
            assert [ln for ln in r.stdout.splitlines()
                    if e["path"] in ln and "not answering" in ln], r.stdout
            assert f"the worker (pid {pid}) has not answered for 10 s" in r.stdout, r.stdout
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def test_gather_runs_at_once_keeps_order_and_raises_an_error_as_itself():
    """status's rows are asked with supervisor.gather: at once, in order, and an error is the
    MirrorError the callers catch (not a nursery's ExceptionGroup around it)."""
    import trio

    from app.engine.supervisor import gather
    from app.services.results import MirrorError

    async def main():
        async def value(v, delay):
            await trio.sleep(delay)
            return v

        async def failing():
            await trio.sleep(0.01)
            raise MirrorError("boom", errno=5)
        t0 = trio.current_time()
        assert await gather(lambda: value(1, 0.3), lambda: value(2, 0.1), lambda: value(3, 0.3)) == [1, 2, 3]
        assert trio.current_time() - t0 < 0.5
        with pytest.raises(MirrorError, match="boom"):
            await gather(lambda: value(1, 0.05), failing)
        assert await gather() == []
    trio.run(main)


def test_unmount_all_says_which_worker_it_waits_for(setup, tmp_path):
    """`fs unmount-all` waits where `daemon stop` waits (a capture shipping its queue, up to
    45 s; a worker that does not answer, 45 s, then it is killed) and sat there without a word.
    It says each wait now as it begins, in daemon stop's words: here a stopped worker (SIGSTOP),
    and how to resume it; resumed, the unmount ends cleanly."""
    (tmp_path / "a").mkdir()
    src = str(tmp_path / "a")
    eng, _, _ = setup([{"path": src, "target": str(tmp_path / "a.tgt")}])
    out = said_while_stopped(eng, eng.status(src)["worker_pid"], ["fs", "unmount-all"],
                             f"unmount-all: {src}: asked its capture to end")
    assert f"{src}: unmounted" in out, out


def test_daemon_stop_says_which_worker_it_waits_for_and_waits_as_long_as_the_daemon_does(
        setup, tmp_path):
    """A stop waits for each capture to end (up to 45 s for one that ships its queue, 45 s for
    one that does not answer, then it is killed). `daemon stop` said nothing meanwhile and gave
    up after 10 s ('still running', exit 1) while the daemon went on waiting. Now it says what
    the daemon waits for as it begins, naming the entry and its worker and the limit, and waits
    as long as the daemon does: here the worker is stopped (SIGSTOP), the line says how to
    resume it, and once it is resumed the stop ends cleanly."""
    (tmp_path / "a").mkdir()
    src = str(tmp_path / "a")
    eng, _, _ = setup([{"path": src, "target": str(tmp_path / "a.tgt")}])
    out = said_while_stopped(eng, eng.status(src)["worker_pid"],
                             ["daemon", "stop", "--state-dir", eng.state],
                             f"stopping the daemon: {src}: asked its capture to end")
    assert "stopped the daemon" in out, out
    assert eng.proc.wait(timeout=30) == 0


@pytest.mark.parametrize("when", ["before_its_shutdown", "while_it_stops"])
def test_daemon_stop_of_a_daemon_that_stops_answering_says_so_and_kills_nothing(
        setup, tmp_path, monkeypatch, when):
    """A daemon that answered `daemon stop`'s first question and then hangs (stopped here:
    SIGSTOP), before it reads the shutdown or while it stops (waiting for a stopped worker),
    made the stop wait forever for an answer. It gives up after ANSWER_SECONDS now, saying
    which process does not answer and what resumes it, and signals nothing: resumed, the
    daemon reads what was asked and stops by itself."""
    from app.services import daemonctl
    from app.services.control import ControlClient
    from app.services.results import Outcome
    (tmp_path / "a").mkdir()
    src = str(tmp_path / "a")
    eng, _, _ = setup([{"path": src, "target": str(tmp_path / "a.tgt")}])
    daemon, worker = eng.proc.pid, eng.status(src)["worker_pid"]
    asked = ControlClient.request

    def request(client, cmd, **args):
        if cmd == "shutdown" and when == "before_its_shutdown":
            os.kill(daemon, signal.SIGSTOP)
        answer = asked(client, cmd, **args)
        if cmd == "shutdown" and when == "while_it_stops":  # it waits for its worker
            os.kill(daemon, signal.SIGSTOP)
        return answer
    monkeypatch.setattr(ControlClient, "request", request)
    settings = daemonctl.DaemonSettings.resolve(eng.config, eng.socket, eng.state)
    done: list = []
    stopping = threading.Thread(target=lambda: done.append(daemonctl.stop(settings)))
    os.kill(worker, signal.SIGSTOP)
    try:
        stopping.start()
        stopping.join(timeout=3 * daemonctl.ANSWER_SECONDS)
        assert not stopping.is_alive(), "daemon stop still waits for the daemon's answer"
        [result] = done
        assert result.outcome is Outcome.FAILED and result.errno == errno.ETIMEDOUT, result
        assert result.message == (
            f"asked the daemon (pid {daemon}) to stop, but it does not answer on {eng.socket} "
            f"(nothing in {daemonctl.ANSWER_SECONDS} s) (stopped by a signal: kill -CONT "
            f"{daemon} resumes it): resumed, it goes on and stops"), result.message
        assert eng.proc.poll() is None  # nothing was killed
    finally:
        os.kill(daemon, signal.SIGCONT)
        os.kill(worker, signal.SIGCONT)
        stopping.join(timeout=120)
    assert eng.proc.wait(timeout=60) == 0  # it read the shutdown and stopped


FAKE_SYSTEMCTL_STOP = """#!{python}
# systemctl as far as `daemon stop` uses it (this machine runs no systemd as PID 1): `stop`
# sends SIGTERM to the daemon, as systemd does, and returns once it has exited (its socket
# gone), saying nothing meanwhile
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from app.services.control import ControlClient
assert sys.argv[1:] == ["stop", "mirrorsetup"], sys.argv
client = ControlClient({socket!r})
os.kill(client.request("ping")["pid"], signal.SIGTERM)
while client.is_running():
    time.sleep(0.05)
"""


def test_daemon_stop_under_systemd_says_what_it_waits_for_while_systemctl_runs(
        setup, tmp_path, monkeypatch):
    """Under systemd `daemon stop` runs `systemctl stop`, which says nothing while the daemon
    waits for its captures (up to 45 s each): it printed nothing for a minute, while without
    systemd it says each wait as it begins. It asks the daemon meanwhile and says the same.
    This machine runs no systemd as PID 1, so a stand-in `systemctl` on PATH (SIGTERM, then
    waits for the daemon to exit, as systemd does) and stop() in-process with the systemd
    path chosen."""
    from app.services import daemonctl
    from app.services.results import Outcome
    (tmp_path / "a").mkdir()
    src = str(tmp_path / "a")
    eng, _, _ = setup([{"path": src, "target": str(tmp_path / "a.tgt")}])
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    fake.write_text(FAKE_SYSTEMCTL_STOP.format(python=sys.executable, repo=str(REPO),
                                               socket=eng.socket))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(daemonctl, "_use_systemd", lambda settings: True)
    worker = eng.status(src)["worker_pid"]
    said: list[str] = []
    done: list = []
    settings = daemonctl.DaemonSettings.resolve(eng.config, eng.socket, eng.state)
    os.kill(worker, signal.SIGSTOP)
    stopping = threading.Thread(target=lambda: done.append(daemonctl.stop(settings, said.append)))
    try:
        stopping.start()
        deadline = time.monotonic() + 30  # (the daemon gives up on the worker after 45 s)
        while not any(f"kill -CONT {worker}" in w for w in said) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [w for w in said if w.startswith(f"{src}: asked its capture to end")], said
        assert f"worker pid {worker} (stopped by a signal: kill -CONT {worker} resumes it); " \
               "given up after 45 s, then it is killed" in said[0], said
    finally:
        os.kill(worker, signal.SIGCONT)  # it answers, drains and ends
        stopping.join(timeout=120)
    [result] = done
    assert result.outcome is Outcome.OK and "systemctl stop mirrorsetup: done" in result.message
    assert len(said) == len(set(said)), said  # each wait said once (then: its drain)
    assert eng.proc.wait(timeout=30) == 0
    assert "did not end; killing it" not in eng.logtext()


def test_daemon_stop_ends_the_captures_at_once_not_one_after_another(setup, tmp_path):
    """Each capture's end may wait (up to 45 s for one that ships its queue; 45 s, then it is
    killed, for one that does not answer). The daemon ended them one after another: two
    workers that did not answer made a stop take over 90 s (systemd's stop timeout is 90 s,
    then it kills the daemon). They are ended at once now: one wait, whatever N, each said."""
    entries = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        entries.append({"path": str(tmp_path / name), "target": str(tmp_path / f"{name}.tgt")})
    eng, _, _ = setup(entries)
    workers = [eng.status(e["path"])["worker_pid"] for e in entries]
    env = {**os.environ, "MIRRORSETUP_SOCKET": eng.socket}
    try:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "app", "--config", str(eng.config), "daemon",
                            "stop", "--state-dir", eng.state], cwd=REPO, env=env, text=True,
                           capture_output=True, timeout=200)
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stdout + r.stderr
        for e, pid in zip(entries, workers):
            assert f"stopping the daemon: {e['path']}: asked its capture to end" in r.stderr \
                and f"worker pid {pid} (stopped by a signal" in r.stderr, r.stderr
        assert took < 80, f"daemon stop took {took:.1f} s with 2 workers that did not answer"
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
