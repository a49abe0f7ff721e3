"""The watchers every screen and `status --watch` follow (app.services.events), one source at a
time, with the mount and uevent watchers off so other users of the host cannot wake them:
the configuration file (inotify, also before its directory exists) and the daemon (its socket
appearing, its watch connection ending)."""

from __future__ import annotations

import queue

import pytest

from app.services import daemonctl
from app.services.config import ConfigStore
from app.services.control import ControlClient
from app.services.events import ConfigChanged, DaemonChanged, Watchers

WAIT = 30  # seconds: bounds on a queue get, never a timed assertion


def next_of(events: queue.Queue, kind: type):
    """The next event of `kind` (others are skipped); fails when none comes in WAIT seconds."""
    while True:
        event = events.get(timeout=WAIT)
        if isinstance(event, kind):
            return event


@pytest.fixture
def watch(tmp_path):
    """start(config, socket) -> queue of events; the watchers are closed at teardown."""
    made = []

    def start(config, socket) -> queue.Queue:
        events: queue.Queue = queue.Queue()
        w = Watchers(events.put, config_path=config, control=ControlClient(str(socket)),
                     mounts=False, uevents=False)
        w.start()
        made.append(w)
        return events

    yield start
    for w in made:
        w.close()
        for thread in w.threads:
            thread.join(WAIT)
            assert not thread.is_alive()


def test_a_configuration_written_elsewhere_is_seen_even_before_its_directory_exists(
        watch, tmp_path):
    config = tmp_path / "not" / "yet" / "replication.toml"
    events = watch(config, tmp_path / "none.sock")
    (tmp_path / "data").mkdir()
    ConfigStore(config).add_filesystem(tmp_path / "data")  # makes the directories, renames in
    assert next_of(events, ConfigChanged).path == str(config)
    (tmp_path / "other").mkdir()
    ConfigStore(config).add_filesystem(tmp_path / "other")
    assert next_of(events, ConfigChanged).path == str(config)


@pytest.mark.root
def test_a_daemon_started_and_stopped_elsewhere_is_seen(watch, tmp_path):
    config, socket = tmp_path / "etc" / "replication.toml", tmp_path / "run" / "control.sock"
    settings = daemonctl.DaemonSettings.resolve(config, socket, tmp_path / "state")
    events = watch(config, socket)
    try:
        assert daemonctl.start(settings).outcome.value == "ok"
        assert next_of(events, DaemonChanged).running is True
        assert daemonctl.stop(settings).outcome.value == "ok"
        assert next_of(events, DaemonChanged).running is False
    finally:
        client = ControlClient(str(socket))
        if client.is_running():
            client.request("shutdown")


def test_a_change_right_after_start_is_seen_however_late_the_watch_thread_runs(tmp_path, monkeypatch):
    """start() arms the file watch itself: on a busy host the watching thread may run long after
    start() returned, and a configuration written meanwhile was never reported (the thread
    armed its watch after the change; seen once under bench/busy_host.py)."""
    import time
    real = Watchers._files_and_daemon

    def late(self):
        time.sleep(1)  # the thread's first turn comes late
        real(self)
    monkeypatch.setattr(Watchers, "_files_and_daemon", late)
    config = tmp_path / "not" / "yet" / "replication.toml"
    events: queue.Queue = queue.Queue()
    w = Watchers(events.put, config_path=config, control=ControlClient(str(tmp_path / "none.sock")),
                 mounts=False, uevents=False)
    w.start()
    try:
        (tmp_path / "data").mkdir()
        ConfigStore(config).add_filesystem(tmp_path / "data")
        assert next_of(events, ConfigChanged).path == str(config)
    finally:
        w.close()
        for thread in w.threads:
            thread.join(WAIT)
