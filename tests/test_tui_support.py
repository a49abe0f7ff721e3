"""Fixtures and helpers for the TUI tests (imported by the other test_tui_* files).

The app under test is the real one (`make_app`) over a temp config and a temp daemon socket
(a daemon that happens to run on the host is never asked); only the snapshot tests replace
what differs between machines (the host's block devices, loops, clock and daemon). The block
tests list only the devices they made (real descriptions of real devices), so they do not
slow down with the number of loops other users have on the host.
"""

from __future__ import annotations

import asyncio
import functools
import io

import pytest
from conftest import loops_on, losetup_json, run
from textual.worker import WorkerCancelled

from app.services import blockdevs
from app.services.config import ConfigStore
from app.services.results import MirrorError
from app.ui import default_services, make_app

# Workers that never finish by design: DirectoryTree's queue (the App's watchers are threads).
WATCHER_GROUPS = ("_loader",)
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


async def wait_while_a_worker_waits(pilot, predicate, what: str) -> None:
    """Poll the UI until `predicate()` is true without settle(), which waits for every worker:
    for a test whose worker blocks until the test releases it. Fails after 10 s."""
    for _ in range(200):
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"gave up waiting for {what}")


async def wait_until(pilot, predicate, what: str) -> None:
    """Poll the UI (not the clock) until `predicate()` is true; fail after WAIT_STEPS pauses."""
    for _ in range(WAIT_STEPS):
        await settle(pilot)
        if predicate():
            return
        await pilot.pause(WAIT_STEP)
    raise AssertionError(f"gave up waiting for {what}")


def table_keys(table) -> list[str]:
    """Row keys as displayed, top to bottom."""
    return [row.key.value for row in table.ordered_rows]


def cell(table, row_key: str, column_key: str) -> str:
    return str(table.get_cell(row_key, column_key))


def static_text(widget) -> str:
    """What a Static shows, as plain text (a Text, a string or a table; wide, never wrapped)."""
    from rich.console import Console
    renderable = getattr(widget, "content", None) or widget.render()
    if isinstance(renderable, str):
        return renderable
    console = Console(width=400, color_system=None, file=io.StringIO())
    with console.capture() as capture:
        console.print(renderable, end="", soft_wrap=True)
    return "\n".join(line.rstrip() for line in capture.get().splitlines())


@pytest.fixture
def tui(config_path, tmp_path):
    """make(devices=None, control_socket=None, **kw) -> the real App over the test's temp
    config; the daemon socket is a temp path unless given; `devices` (paths, or a callable
    returning them) limits the picker to those real devices. kw: is_root, state_dir."""
    def make(devices=None, control_socket=None, state_dir=None, **kw):
        services = default_services(config_path, control_socket or str(tmp_path / "run" /
                                                                       "control.sock"),
                                    state_dir or str(tmp_path / "state"))
        if devices is not None:
            services.device_lister = own_devices(devices)
        return make_app(services=services, **kw)
    return make


def own_devices(devices):
    """A list_devices over only these real devices, described as the picker lists them (a
    detached loop, size 0, is left out as list_block_devices leaves it out)."""
    def list_devices(include_excluded: bool = True) -> list:
        paths = devices() if callable(devices) else devices
        found = []
        for p in paths:
            try:
                found.append(blockdevs.describe(p))
            except MirrorError:  # removed meanwhile
                continue
        return [d for d in found if d.size and (include_excluded or d.excluded is None)]
    return list_devices


def notices(app) -> list[str]:
    """The notifications the App has shown (toasts), oldest first."""
    return [str(n.message) for n in app._notifications]


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


__all__ = ["pilot_test", "settle", "wait_until", "wait_while_a_worker_waits", "table_keys", "cell",
           "static_text", "tui",
           "config_bytes", "loops_backed_by", "protected_device", "store", "losetup_json", "run",
           "own_devices", "notices"]
