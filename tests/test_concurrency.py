"""Many administrators (or scripts) at once: parallel attach-alls never stack two loops over a
device, and a daemon never dies of its clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import loops_on
from test_engine_support import REPO, Engine, write_config

pytestmark = pytest.mark.root
PARALLEL = 32


def attach_all_at_once(cfg, *, socket: str, n: int = PARALLEL) -> list[tuple[float, float, list]]:
    """n `block attach-all --json` started together; (start, end, results) of each. Each end
    is taken when that process ends (a thread waits for each), not when the loop below gets
    to it: read in turn, every end came after every start, and the overlap was always n."""
    env = {**os.environ, "MIRRORSETUP_SOCKET": socket}
    procs = []
    for _ in range(n):
        procs.append((time.monotonic(), subprocess.Popen(
            [sys.executable, "-m", "app", "--config", str(cfg), "block", "attach-all", "--json"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    ended: dict[int, tuple[float, str, str]] = {}

    def wait(p) -> None:
        stdout, stderr = p.communicate(timeout=600)
        ended[p.pid] = (time.monotonic(), stdout, stderr)
    waiters = [threading.Thread(target=wait, args=(p,)) for _s, p in procs]
    for w in waiters:
        w.start()
    for w in waiters:
        w.join()
    out = []
    for started, p in procs:
        assert p.pid in ended, f"attach-all {p.pid} did not end within 600 s"
        end, stdout, stderr = ended[p.pid]
        assert p.returncode in (0, 1), stderr
        out.append((started, end, json.loads(stdout)))
    return out


def overlapping(runs) -> int:
    """How many runs were under way at the busiest moment (the race had its chance)."""
    events = sorted([(s, 1) for s, _e, _r in runs] + [(e, -1) for _s, e, _r in runs])
    now = peak = 0
    for _t, step in events:
        now += step
        peak = max(peak, now)
    return peak


def test_parallel_attach_alls_without_a_daemon_make_one_loop_per_device(tmp_path, disks):
    """The report: 32 parallel attach-alls made 487 loops over 16 devices, all exit 0."""
    devices = [disks(4 << 20) for _ in range(16)]
    cfg = write_config(tmp_path / "etc" / "replication.toml", [], block=[{"device": d} for d in devices])
    runs = attach_all_at_once(cfg, socket=str(tmp_path / "no-daemon.sock"))
    assert overlapping(runs) >= 8  # they really ran together
    outcomes = [r["outcome"] for _s, _e, results in runs for r in results]
    assert outcomes.count("ok") == 16 and set(outcomes) <= {"ok", "unchanged"}, outcomes
    assert {d: len(loops_on(d)) for d in devices} == {d: 1 for d in devices}


def test_parallel_attach_alls_against_the_daemon_never_crash_it(tmp_path, disks):
    """The report: 32 parallel attach-alls against the daemon all failed and the daemon died
    (duplicate workers for one device, EBUSY on the O_EXCL open, broken pipes)."""
    devices = [disks(4 << 20) for _ in range(4)]
    cfg = write_config(tmp_path / "etc" / "replication.toml", [],
                       block=[{"device": d, "target": str(tmp_path / f"t{i}.img")}
                              for i, d in enumerate(devices)])
    eng = Engine(tmp_path, cfg)
    try:
        eng.start()
        for d in devices:  # detached, so that every client's attach-all has work to race for
            r = eng.client.results("block_detach", device=d)[0]
            # on a busy host something may hold the new loop open for a moment (a probe): the
            # kernel then detaches it at the last close, and the daemon ends the capture then
            assert r.outcome.value in ("ok", "pending"), r.message
            deadline = time.monotonic() + 60
            while r.outcome.value == "pending" and eng.block(d)["captured"]:
                assert time.monotonic() < deadline, f"{r.message}: never closed"
                time.sleep(0.1)
        runs = attach_all_at_once(cfg, socket=eng.socket)
        assert overlapping(runs) >= 8
        outcomes = [r["outcome"] for _s, _e, results in runs for r in results]
        assert outcomes.count("ok") == 4 and set(outcomes) <= {"ok", "unchanged"}, \
            [(r["outcome"], r.get("message")) for _s, _e, results in runs for r in results
             if r["outcome"] != "unchanged"]
        assert eng.proc.poll() is None, eng.logtext()  # the daemon lives
        for d in devices:
            st = eng.block(d)
            assert st["captured"] and len(loops_on(d)) == 0  # captured: the loop is on its file
        assert len(eng.workers()) == 4, "one capture worker per device"
    finally:
        eng.cleanup()
