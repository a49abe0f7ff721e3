"""The full-screen console: the App, its services, and the kernel watchers that feed it.

`make_app` builds the App from explicit inputs so the CLI, the tests and the screenshot
script all run the same code; only what a machine cannot provide deterministically (the
host's device list, for snapshots) is ever swapped for a fake.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.signal import Signal

from app.screens.main_menu import MainMenuScreen
from app.services.config import ConfigStore

ROOT_UID = 0
SYSTEMD_RUNNING = "/run/systemd/system"  # exists only when systemd is PID 1 (sd_booted)
SYSTEMD_UNIT = "mirrorsetup"
DAEMON_WAIT_STEPS = 100  # × DAEMON_WAIT_STEP: up to 10 s for the daemon to start or stop
DAEMON_WAIT_STEP = 0.1
DAEMON_LOG = "daemon.log"  # beside the control socket, when the console starts the daemon
RUN_DIR_MODE = 0o700  # as the daemon makes /run/mirrorsetup: root's only


@dataclass
class Services:
    """Everything the screens call. Fields default to the real services."""

    store: ConfigStore
    replication: Any
    control: Any | None = None  # ControlClient, or None when the engine is not installed
    list_devices: Callable[..., list] | None = None  # blockdevs.list_block_devices
    status: Callable[[], Any] | None = None  # () -> StatusSnapshot
    list_loops: Callable[[], list] | None = None  # loop.list_attached
    disk_counters: Callable[[], dict] | None = None  # psutil per-disk counters; None: no rates
    watch_kernel: bool = True  # MountWatcher + kernel uevents; off only for snapshots
    clock: Callable[[], float] = time.time
    browse_root: str = "/"  # where the directory picker starts
    daemon_args: tuple[str, ...] = ()  # extra `mirrorsetup daemon` arguments (e.g. --state-dir)

    def daemon_running(self) -> bool:
        if self.control is None:
            return False
        try:
            return bool(self.control.is_running())
        except Exception:  # a broken socket is "not running" to the administrator
            return False


def default_services(config_path=None, control_socket=None) -> Services:
    """The real services over `config_path` (default: MIRRORSETUP_CONFIG or /etc/...)."""
    import psutil

    from app.services import blockdevs, status
    from app.services import loop as loopdev
    from app.services.replication import Replication

    store = ConfigStore(config_path)
    control = _control_client(control_socket)
    replication = Replication(store, control)

    def snap():
        live = control if control is not None and _safe_running(control) else None
        return status.snapshot(store, live)

    return Services(store=store, replication=replication, control=control,
                    list_devices=blockdevs.list_block_devices, status=snap,
                    list_loops=loopdev.list_attached,
                    disk_counters=lambda: psutil.disk_io_counters(perdisk=True, nowrap=True))


def _control_client(socket_path):
    try:
        from app.services.control import ControlClient
    except ImportError:  # the engine is not installed: file-system mounts say so per action
        return None
    return ControlClient(socket_path)  # None: MIRRORSETUP_SOCKET or the default


def _safe_running(control) -> bool:
    try:
        return bool(control.is_running())
    except Exception:
        return False


class MirrorSetupApp(App):
    """Screens push and pop over the main menu; `q`/Escape goes back, from the top it quits."""

    CSS_PATH = "screens/app.tcss"
    TITLE = "mirrorsetup"
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True, show=False)]
    MODES = {"setup": MainMenuScreen}  # a mode (not get_default_screen) so its CSS_PATH loads
    DEFAULT_MODE = "setup"

    class MountsChanged(Message):
        def __init__(self, diff) -> None:
            super().__init__()
            self.diff = diff

    class DaemonGone(Message):
        """The daemon's watch connection ended: it stopped or died."""

    class BlockEvent(Message):
        def __init__(self, action: str, name: str) -> None:
            super().__init__()
            self.action = action
            self.name = name

    def __init__(self, services: Services, *, is_root: bool | None = None) -> None:
        super().__init__()
        self.services = services
        self.is_root = os.geteuid() == ROOT_UID if is_root is None else is_root
        self.sub_title = str(services.store.path)
        # Screens subscribe; the watcher threads publish through the App's messages.
        self.mounts_signal: Signal = Signal(self, "mounts-changed")
        self.block_signal: Signal = Signal(self, "block-uevent")
        self.daemon_signal: Signal = Signal(self, "daemon-gone")
        self._mount_watcher = None
        self._daemon_wake: int | None = None
        self._watching_daemon = False
        self._uevent_wake: int | None = None
        self.refusals: list[str] = []  # what was refused for want of root, newest last

    def on_mount(self) -> None:
        self.theme = "textual-dark"
        if self.services.watch_kernel:
            self.watch_mounts()
            self.watch_uevents()
            self.arm_daemon_watch()

    def on_unmount(self) -> None:
        self.stop_watchers()

    def stop_watchers(self) -> None:
        """Wake the blocked watcher threads so they end with the App."""
        if self._mount_watcher is not None:
            self._mount_watcher.close()
        if self._uevent_wake is not None:
            os.eventfd_write(self._uevent_wake, 1)
        if self._daemon_wake is not None:
            os.eventfd_write(self._daemon_wake, 1)

    # -- kernel events -------------------------------------------------------------------

    @work(thread=True, exclusive=True, exit_on_error=False, group="mount-watcher",
          description="wait for mount-table changes")
    def watch_mounts(self) -> None:
        from app.services.mounts import MountWatcher
        self._mount_watcher = watcher = MountWatcher()
        for diff in watcher:  # ends when stop_watchers() closes it
            self.post_message(self.MountsChanged(diff))

    @work(thread=True, exclusive=True, exit_on_error=False, group="uevent-monitor",
          description="wait for block-device uevents")
    def watch_uevents(self) -> None:
        import pyudev
        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        monitor.filter_by("block")
        monitor.start()
        self._uevent_wake = wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            while True:
                ready, _, _ = select.select([monitor, wake], [], [])
                if wake in ready:
                    return
                device = monitor.poll(timeout=0)
                if device is not None:
                    self.post_message(self.BlockEvent(device.action or "?", device.sys_name))
        finally:
            os.close(wake)

    def arm_daemon_watch(self) -> None:
        """Start watching the daemon unless a watch is already held (main thread only).
        Re-armed by mount-table changes (a starting daemon mounts its captures), never by polling."""
        if self.services.control is not None and not self._watching_daemon:
            self._watching_daemon = True
            self.watch_daemon()

    @work(thread=True, exit_on_error=False, group="daemon-watcher",
          description="notice when the daemon stops or dies")
    def watch_daemon(self) -> None:
        """Hold the daemon's watch connection; when it ends, say so."""
        try:
            sock = self.services.control.open_watch()
        except Exception:  # not running (or not reachable): nothing to watch yet
            self._watching_daemon = False
            return
        if self._daemon_wake is None:
            self._daemon_wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            ready, _, _ = select.select([sock, self._daemon_wake], [], [])
            if sock in ready:
                self.post_message(self.DaemonGone())
        finally:
            sock.close()
            self._watching_daemon = False

    def on_mirror_setup_app_mounts_changed(self, event: MountsChanged) -> None:
        self.mounts_signal.publish(event.diff)
        self.arm_daemon_watch()

    def on_mirror_setup_app_daemon_gone(self, event: DaemonGone) -> None:
        self.daemon_signal.publish(True)

    def on_mirror_setup_app_block_event(self, event: BlockEvent) -> None:
        self.block_signal.publish((event.action, event.name))

    # -- navigation ----------------------------------------------------------------------

    def action_back(self) -> None:
        """One level up; from the main menu, quit (the seed's "press Q as many times as needed")."""
        if len(self.screen_stack) > 1:
            self.pop_screen()
        else:
            self.exit(0)

    def open_screen(self, name: str) -> Screen:
        """Show `name` over the main menu (replacing any other task screen) and return it."""
        from app.screens import screen_class
        cls = screen_class(name)
        while len(self.screen_stack) > 1 and not isinstance(self.screen, cls):
            self.pop_screen()
        if not isinstance(self.screen, cls):
            self.push_screen(cls())
        return self.screen_stack[-1]

    def run_on(self, name: str, action: str) -> None:
        """Open a screen, then run one of its actions (the command palette's entries)."""
        screen = self.open_screen(name)
        self.call_after_refresh(getattr(screen, f"action_{action}"))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for title, help_text, name, action in PALETTE:
            if action:
                yield SystemCommand(title, help_text, lambda n=name, a=action: self.run_on(n, a))
            else:
                yield SystemCommand(title, help_text, lambda n=name: self.open_screen(n))

    # -- root ------------------------------------------------------------------------------

    def needs_root(self, what: str) -> bool:
        """True (and a notice saying why) when `what` cannot be done without root."""
        if self.is_root:
            return False
        message = (f"{what} needs root: the configuration, loop devices and mounts belong to "
                   f"root. Run `sudo mirrorsetup`.")
        self.refusals.append(message)
        self.notify(message, title="Read-only", severity="warning")
        return True

    # -- daemon ----------------------------------------------------------------------------

    def daemon_command(self, action: str):
        """start / stop / restart the daemon; one Result saying what happened. Blocking."""
        return daemon_command(self.services, action)


def daemon_command(services: Services, action: str):
    """systemctl when systemd runs; otherwise `mirrorsetup daemon` started in its own session
    (it outlives the console) and stopped with the control socket's `shutdown`."""
    from app.services.results import Outcome, Result

    def result(outcome: Outcome, message: str) -> Result:
        return Result(action, "daemon", outcome, message)

    control = services.control
    if control is None:
        return result(Outcome.FAILED, f"the replication engine (daemon) is not installed here; "
                                      f"cannot {action} it")
    running = services.daemon_running()
    if action == "start" and running:
        return result(Outcome.UNCHANGED, "the daemon is already running")
    if action == "stop" and not running:
        return result(Outcome.UNCHANGED, "the daemon is not running")
    if os.path.isdir(SYSTEMD_RUNNING) and shutil.which("systemctl"):
        proc = subprocess.run(["systemctl", action, SYSTEMD_UNIT], capture_output=True, text=True)
        if proc.returncode == 0:
            return result(Outcome.OK, f"systemctl {action} {SYSTEMD_UNIT}: done")
        return result(Outcome.FAILED, f"systemctl {action} {SYSTEMD_UNIT} failed: "
                                      f"{proc.stderr.strip() or proc.returncode}")
    if running:  # stop or restart
        try:
            control.request("shutdown")
        except Exception as exc:
            return result(Outcome.FAILED, f"could not stop the daemon: {exc}")
        if not _wait_for(lambda: not services.daemon_running()):
            return result(Outcome.FAILED, "asked the daemon to stop, but it still answers")
        if action == "stop":
            return result(Outcome.OK, "stopped the daemon")
    argv = [sys.executable, "-m", "app", "daemon", "--config", str(services.store.path),
            "--socket", control.socket_path, *services.daemon_args]
    log_path = os.path.join(os.path.dirname(control.socket_path), DAEMON_LOG)
    try:
        os.makedirs(os.path.dirname(log_path), mode=RUN_DIR_MODE, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
    except OSError as exc:
        return result(Outcome.FAILED, f"could not start the daemon: {exc}")
    if _wait_for(lambda: services.daemon_running() or proc.poll() is not None) and proc.poll() is None:
        return result(Outcome.OK, f"{'re' if action == 'restart' else ''}started the daemon "
                                  f"(pid {proc.pid}, log {log_path}); systemd is not running "
                                  f"here, so nothing restarts it if it dies")
    if proc.poll() is None:
        return result(Outcome.PENDING, f"started the daemon (pid {proc.pid}), but it does not "
                                       f"answer on {control.socket_path} yet (log {log_path})")
    return result(Outcome.FAILED, f"the daemon exited with status {proc.returncode}: "
                                  f"{_last_line(log_path) or 'no output'} (log {log_path})")


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _wait_for(condition: Callable[[], bool]) -> bool:
    """The daemon binds its socket (or lets go of it) a moment after start/shutdown: poll,
    bounded at DAEMON_WAIT_STEPS × DAEMON_WAIT_STEP seconds."""
    for _ in range(DAEMON_WAIT_STEPS):
        if condition():
            return True
        time.sleep(DAEMON_WAIT_STEP)
    return condition()


# (palette title, help, screen, screen action or None to just open it)
PALETTE = [
    ("Main menu", "Back to the setup tasks", "main_menu", None),
    ("File system replication", "Configured directories and their mirrorfs mounts", "filesystem", None),
    ("Add file system entry", "Replicate a directory", "filesystem", "add"),
    ("Remove file system entry", "Stop replicating the selected directory", "filesystem", "remove"),
    ("Mount all file system entries", "Mount mirrorfs on every entry now", "filesystem", "mount_all"),
    ("Unmount all file system entries", "Unmount mirrorfs from every entry", "filesystem", "unmount_all"),
    ("Block device replication", "Device picker and configured block entries", "block", None),
    ("Add block entry", "Replicate the device selected in the picker", "block", "add"),
    ("Remove / detach block entry", "Detach and remove the selected entry", "block", "remove"),
    ("Attach all block entries", "Attach every entry to its loop device now", "block", "attach_all"),
    ("Detach all block entries", "Detach the loop devices of every entry", "block", "detach_all"),
    ("Mirror block entry", "Copy the selected entry's whole device to its target", "block", "mirror"),
    ("Verify block entry", "Compare the selected entry with its target, list what differs", "block",
     "verify"),
    ("Show excluded block devices", "Toggle swap and LVM physical volumes in the picker", "block", "toggle_excluded"),
    ("Manual replication (not persisted)", "Attach or detach a loop now, deprecated", "manual", None),
    ("Status dashboard", "Live view of mounts, loops, warnings and rates", "dashboard", None),
    ("Daemon", "Start, stop or restart the replication engine", "daemon", None),
    ("Start daemon", "Start the replication engine", "daemon", "start"),
    ("Stop daemon", "Stop the replication engine", "daemon", "stop"),
    ("Restart daemon", "Restart the replication engine", "daemon", "restart"),
    ("Help", "Keys and the notes on replication", "help", None),
]


def make_app(*, config_path=None, control_socket=None, services: Services | None = None,
             is_root: bool | None = None) -> MirrorSetupApp:
    """The App over real services (or `services` as given); `is_root` overrides the euid check."""
    if services is None:
        services = default_services(config_path, control_socket)
    return MirrorSetupApp(services, is_root=is_root)


def run_tui(config_path=None) -> int:
    app = make_app(config_path=config_path)
    result = app.run()
    return result if isinstance(result, int) else 0


__all__ = ["MirrorSetupApp", "Services", "default_services", "make_app", "run_tui"]
