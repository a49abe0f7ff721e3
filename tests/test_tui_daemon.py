"""Daemon screen: start and stop the real daemon on a temp socket (no systemd on the test VM,
so the console starts `mirrorsetup daemon` itself), and say so when it is not running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from test_tui_support import pilot_test, settle, static_text, wait_until

from app.screens.daemon import DaemonScreen
from app.screens.dialogs import ConfirmDialog, ResultsDialog
from app.services.control import ControlClient
from app.services.daemonctl import SYSTEMD_RUNNING
from app.ui import default_services, make_app

pytestmark = pytest.mark.root


@pytest.fixture
def daemon_services(tmp_path, config_path, monkeypatch):
    """Real services whose daemon uses a temp socket, and the state dir MIRRORSETUP_STATE_DIR
    names (the TUI's Start honours it); killed at teardown if left running."""
    socket_path = tmp_path / "run" / "control.sock"
    monkeypatch.setenv("MIRRORSETUP_STATE_DIR", str(tmp_path / "state"))
    services = default_services(config_path, str(socket_path))
    yield services
    client = ControlClient(str(socket_path))
    if client.is_running():
        pid = client.request("ping").get("pid")
        try:
            client.request("shutdown")
        finally:
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass


@pytest.mark.skipif(os.path.isdir(SYSTEMD_RUNNING), reason="systemd would start the real unit")
@pilot_test
async def test_start_then_stop_the_daemon_from_the_screen(daemon_services):
    client = daemon_services.control
    assert not client.is_running()
    app = make_app(services=daemon_services, is_root=True)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("5")
        await settle(pilot)
        screen = app.screen
        assert type(screen) is DaemonScreen
        assert "not running" in static_text(screen.query_one("#daemon-state"))

        await pilot.press("s")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "start results")
        [result] = app.screen.results
        assert result.outcome.value == "ok", result.message
        assert client.is_running()  # the daemon answers on its socket
        await pilot.press("enter")
        await wait_until(pilot, lambda: "running (pid" in static_text(screen.query_one("#daemon-state")),
                         "the screen to show it running")
        state = static_text(screen.query_one("#daemon-state"))
        info = daemon_services.describe_daemon()
        assert info.state_dir == str(daemon_services.daemon.state_dir)  # from the environment
        for words in (f"running (pid {info.pid}, up ", f"config:          {info.config}",
                      f"socket:          {client.socket_path}",
                      f"state directory: {info.state_dir}", f"log:             {info.log}"):
            assert words in state, (words, state)
        assert info.log == os.path.join(os.path.dirname(client.socket_path), "daemon.log")

        await pilot.click("#stop")  # one key ends replication: asked first, No keeps it
        await wait_until(pilot, lambda: type(app.screen) is ConfirmDialog, "the question")
        question = static_text(app.screen.query_one("#question"))
        assert "Stop the replication daemon?" in question and "not replicated" in question
        await pilot.press("n")
        await settle(pilot)
        assert app.screen is screen and client.is_running()
        await pilot.press("p")
        await wait_until(pilot, lambda: type(app.screen) is ConfirmDialog, "the question")
        await pilot.click("#yes")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "stop results")
        assert app.screen.results[0].outcome.value == "ok", app.screen.results[0].message
        assert not client.is_running()
        # the console started it, so it is its child: reaped once it has exited (helper-42's
        # walk: it stayed a zombie, <defunct>, until the console ended)
        await wait_until(pilot, lambda: not os.path.exists(f"/proc/{info.pid}"),
                         "the stopped daemon to be reaped")


async def _daemon_screen_result(app, pilot, key: str, what: str):
    """The one result of pressing `key` on the Daemon screen (5 in the main menu)."""
    await pilot.press("5")
    await settle(pilot)
    await pilot.press(key)
    await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, what)
    [result] = app.screen.results
    return result


@pilot_test
async def test_stop_when_not_running_changes_nothing(daemon_services):
    app = make_app(services=daemon_services, is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        result = await _daemon_screen_result(app, pilot, "p", "stop results")
        assert result.outcome.value == "unchanged" and "not running" in result.message
    assert not daemon_services.control.is_running()


@pilot_test
async def test_the_screen_follows_a_daemon_started_and_stopped_from_a_shell(daemon_services,
                                                                             config_path):
    """No key is pressed and nothing polls: the socket appearing (inotify) and the watch
    connection ending tell the screen."""
    argv = [sys.executable, "-m", "app", "--config", str(config_path), "--socket",
            daemon_services.control.socket_path, "daemon"]
    app = make_app(services=daemon_services, is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("5")
        await settle(pilot)
        state = app.screen.query_one("#daemon-state")
        await wait_until(pilot, lambda: "not running" in static_text(state), "not running")
        await wait_until(pilot, lambda: app.watchers is not None, "the watchers")
        r = subprocess.run(argv + ["start"], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        await wait_until(pilot, lambda: "running (pid" in static_text(state), "running")
        r = subprocess.run(argv + ["stop"], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        await wait_until(pilot, lambda: "not running" in static_text(state), "stopped")


@pilot_test
async def test_the_uptime_counts_on_without_asking_the_daemon_again(daemon_services):
    """The screen said "up 0 s" for as long as it was shown (found by hand): the uptime is
    counted from the start time it has, once a second; the daemon is not asked again."""
    from app.services.daemonctl import DaemonInfo
    now = [1_000_000.0]
    asked = []
    info = DaemonInfo(True, "/run/x.sock", 4242, now[0], "/etc/x.toml", "/var/lib/x", "/run/x.log")
    daemon_services._describe_daemon = lambda: asked.append(1) or info
    daemon_services.clock = lambda: now[0]
    app = make_app(services=daemon_services, is_root=True)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await pilot.press("5")
        await wait_until(pilot, lambda: "up 0 s" in static_text(app.screen.query_one("#daemon-state")),
                         "the screen")
        # (an event at the start may have asked for one more read: it waits MIN_READ_GAP)
        await wait_until(pilot, lambda: not app.screen._loading, "the reads asked for so far")
        calls = len(asked)
        now[0] += 125
        await wait_until(pilot, lambda: "up 2 min 5 s" in static_text(
            app.screen.query_one("#daemon-state")), "the uptime to count on")
        assert len(asked) == calls


@pilot_test
async def test_a_start_refused_for_a_bad_configuration_names_the_daemon(daemon_services,
                                                                        config_path):
    """Start with a configuration file the daemon would refuse raises instead of returning a
    result (nothing is spawned): the results dialog said "✘ failed" with an empty subject
    above the file's line. It names the daemon, as the results of Start and Stop do, and says
    "refused", as the CLI's exit 2 does (it said "✘ failed")."""
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text('schema = 1\n\n[[filesystem]]\npath = "not/absolute"\n')
    app = make_app(services=daemon_services, is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        result = await _daemon_screen_result(app, pilot, "s", "start results")
        assert result.failed and result.target == "daemon", result
        assert "no daemon was started" in result.message and str(config_path) in result.message
        # what to do next, as Start (it said "correct the file, then restart")
        assert result.message.endswith("; no daemon was started: correct the file, then start "
                                       "it"), result
        text = static_text(app.screen.query_one(".result"))
        assert text.startswith("✘ refused   daemon\n"), text
    assert not daemon_services.control.is_running()
