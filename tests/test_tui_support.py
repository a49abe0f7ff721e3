"""Fixtures and helpers for the TUI tests (imported by the other test_tui_* files).

The app under test is the real one (`make_app`) over a temp config; only the snapshot tests
replace what differs between machines (the host's block devices, loops, clock and daemon).
"""

from __future__ import annotations

import asyncio
import functools

import pytest
from conftest import loops_on, losetup_json, run
from textual.worker import WorkerCancelled

from app.services.config import ConfigStore
from app.ui import Services, make_app

# Workers that never finish by design: the App's kernel and daemon watchers, DirectoryTree's queue.
WATCHER_GROUPS = ("mount-watcher", "uevent-monitor", "daemon-watcher", "_loader")
SETTLE_ROUNDS = 5
WAIT_STEPS = 200  # bounded waits: 200 × 50 ms pauses, never a timed assertion
WAIT_STEP = 0.05


def pilot_test(fn):
    """Run an async Pilot test with asyncio.run (no pytest-asyncio/anyio plugin is installed)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


async def settle(pilot) -> None:
    """Wait until every worker except the kernel watchers is done, then let the UI catch up."""
    app = pilot.app
    for _ in range(SETTLE_ROUNDS):  # a finished worker may post a message that starts the next
        busy = [w for w in app.workers if w.group not in WATCHER_GROUPS and not w.is_finished]
        if busy:  # wait_for_complete([]) would wait for *all* workers, watchers included
            try:
                await app.workers.wait_for_complete(busy)
            except WorkerCancelled:  # an exclusive worker replaced by a newer one: wait again
                pass
        await pilot.pause()


async def wait_until(pilot, predicate, what: str) -> None:
    """Poll the UI (not the clock) until `predicate()` is true; fail after WAIT_STEPS pauses."""
    for _ in range(WAIT_STEPS):
        await settle(pilot)
        if predicate():
            return
        await pilot.pause(WAIT_STEP)
    raise AssertionError(f"gave up waiting for {what}")


def table_keys(table) -> list[str]:
    return [key.value for key in table.rows]


def cell(table, row_key: str, column_key: str) -> str:
    return str(table.get_cell(row_key, column_key))


def static_text(widget) -> str:
    return str(widget.render())


@pytest.fixture
def tui(config_path):
    """make(**kw) -> the real App over the test's temp config (kw: is_root, services)."""
    def make(**kw):
        return make_app(config_path=config_path, **kw)
    return make


@pytest.fixture
def config_bytes(config_path):
    """() -> the config file's bytes (None when absent): a refused edit must leave them as they were."""
    def read() -> bytes | None:
        return config_path.read_bytes() if config_path.exists() else None
    return read


loops_backed_by = loops_on


@pytest.fixture
def protected_device(disks):
    """A scratch loop standing in for a disk (conftest's `disks`: stacked loops detached after)."""
    return disks


@pytest.fixture
def store(config_path) -> ConfigStore:
    return ConfigStore(config_path)


__all__ = ["pilot_test", "settle", "wait_until", "table_keys", "cell", "static_text", "tui", "config_bytes",
           "loops_backed_by", "protected_device", "store", "losetup_json", "run"]
