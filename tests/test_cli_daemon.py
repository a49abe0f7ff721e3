"""`mirrorsetup daemon start|restart|status|stop` on a private socket, config and state
directory (given by MIRRORSETUP_STATE_DIR): the daemon runs detached with its log beside the
socket, and every daemon a test starts is stopped at teardown, by its pid if need be."""

from __future__ import annotations

import json
import os
import signal

import pytest
from test_cli_conventions import cli

from app.services.control import ControlClient

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
