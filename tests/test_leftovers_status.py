"""Left-over defects of `status` found by earlier walks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from test_engine_support import REPO, engine_maker

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
