"""The full-screen console: the App, the services it hands its screens, and the events that
make screens follow what happens elsewhere.

`make_app` builds the App from explicit inputs so the CLI, the tests and the screenshot script
all run the same code; only what a machine cannot provide deterministically (the host's
device list, for snapshots) is ever swapped for a fake. Nothing heavy is built before the
first frame: services import their modules on first use, and the watcher threads start
after the first paint.
"""

from __future__ import annotations

import gc

import time
from collections.abc import Callable, Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.signal import Signal

from app.screens import actions
from app.screens.main_menu import MainMenuScreen


class Services:
    """Everything the screens call. Each defaults to the real service, built or imported on
    first use (none before the first frame); tests and the snapshot suite pass fakes only for
    what a host cannot provide alike."""

    def __init__(self, store=None, replication=None, control=None, *, config_path=None,
                 control_socket=None, state_dir=None, daemon=None,
                 list_devices: Callable[..., list] | None = None,
                 status: Callable[[], object] | None = None,
                 list_loops: Callable[[], list] | None = None,
                 disk_counters: Callable[[], dict] | None | bool = True,
                 check_block: Callable | None = None,
                 describe_daemon: Callable | None = None,
                 watch_kernel: bool = True, clock: Callable[[], float] = time.time,
                 browse_root: str = "/") -> None:
        self._store, self._control, self._daemon = store, control, daemon
        self._config_path, self._control_socket, self._state_dir = (config_path, control_socket,
                                                                    state_dir)
        self._replication = replication
        # What the picker lists; None: the host's block devices. Tests hand in their own
        # devices' descriptions, the screenshot script the demo's.
        self.device_lister = list_devices
        self._status = status
        self._list_loops = list_loops
        self._disk_counters = disk_counters
        self._check_block = check_block
        self._describe_daemon = describe_daemon
        self.watch_kernel = watch_kernel  # kernel, daemon and config watchers; off for snapshots
        self.clock = clock
        self.browse_root = browse_root  # where the directory picker starts

    @property
    def store(self):
        """The configuration file (ConfigStore)."""
        if self._store is None:
            from app.services.config import ConfigStore
            self._store = ConfigStore(self._config_path)
        return self._store

    @property
    def control(self):
        """The daemon's control socket (ControlClient)."""
        if self._control is None:
            from app.services.control import ControlClient
            self._control = ControlClient(self._control_socket)
        return self._control

    @property
    def daemon(self):
        """Where a daemon for this configuration works (DaemonSettings)."""
        if self._daemon is None:
            from app.services.daemonctl import DaemonSettings
            self._daemon = DaemonSettings.resolve(self.store.path, self.control.socket_path,
                                                  self._state_dir)
        return self._daemon

    @property
    def replication(self):
        if self._replication is None:
            from app.services.replication import Replication
            self._replication = Replication(self.store, self.control, self.daemon.state_dir)
        return self._replication

    def list_devices(self, include_excluded: bool = True) -> list:
        if self.device_lister is not None:
            return self.device_lister(include_excluded=include_excluded)
        from app.services.blockdevs import list_block_devices
        return list_block_devices(include_excluded=include_excluded)

    def status(self, *, scan_writers: bool = True):
        """`scan_writers`: also look through /proc for raw-device writers (the dashboard)."""
        if self._status is not None:
            return self._status()
        from app.services.status import daemon_answering, snapshot
        answers, silent = daemon_answering(self.control)  # (a silent one is said, not waited on)
        snap = snapshot(self.store, self.control if answers else None,
                        scan_writers=scan_writers, state_dir=self.daemon.state_dir)
        if silent:
            snap.daemon_silent(silent)
        return snap

    def list_loops(self) -> list:
        if self._list_loops is not None:
            return self._list_loops()
        from app.services.loop import list_attached
        return list_attached()

    @property
    def samples_rates(self) -> bool:
        return self._disk_counters is not None

    def disk_counters(self) -> dict:
        if callable(self._disk_counters):
            return self._disk_counters()
        from app.services.status import disk_counters
        return disk_counters()

    def check_block(self, entry):
        if self._check_block is not None:
            return self._check_block(entry)
        from app.services.entries import check_block
        return check_block(self.store, entry)

    def describe_daemon(self):
        if self._describe_daemon is not None:
            return self._describe_daemon()
        from app.services import daemonctl
        return daemonctl.describe(self.daemon, self.control)

    def daemon_running(self) -> bool:
        from app.services.control import ANSWER_SECONDS
        return self.control.is_running(ANSWER_SECONDS)

    def daemon_action(self, action: str, **kw):
        """start / stop / restart: one Result. Blocking (a thread worker calls it). `kw`: a
        stop's `say` (daemonctl.stop)."""
        from app.services import daemonctl
        return getattr(daemonctl, action)(self.daemon, **kw)


def default_services(config_path=None, control_socket=None, state_dir=None) -> Services:
    """The real services over `config_path` (default: MIRRORSETUP_CONFIG or /etc/...), the
    daemon on `control_socket` (MIRRORSETUP_SOCKET) with `state_dir` (MIRRORSETUP_STATE_DIR)."""
    return Services(config_path=config_path, control_socket=control_socket, state_dir=state_dir)


GC_DEFAULT = gc.get_threshold()


class MirrorSetupApp(App):
    """Screens push and pop over the main menu; q/Escape goes back, q on the menu quits."""

    CSS_PATH = "screens/app.tcss"
    TITLE = "mirrorsetup"
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True, show=False)]

    class Changed(Message):
        """Something changed elsewhere (an app.services.events event), from a watcher thread."""

        def __init__(self, event) -> None:
            super().__init__()
            self.event = event

    def __init__(self, services: Services, *, is_root: bool | None = None) -> None:
        super().__init__()
        self.services = services
        if is_root is None:
            from app.services.host import is_root as host_is_root
            is_root = host_is_root()
        self.is_root = is_root
        # Screens subscribe; the watcher threads publish through the App's messages.
        self.mounts_signal: Signal = Signal(self, "mounts-changed")
        self.block_signal: Signal = Signal(self, "block-uevents")
        self.daemon_signal: Signal = Signal(self, "daemon-changed")
        self.config_signal: Signal = Signal(self, "config-changed")
        self.watchers = None
        self.refusals: list[str] = []  # what was refused for want of root, newest last

    def get_default_screen(self) -> Screen:
        """The main menu (its CSS is the App's: a mode would re-parse the stylesheet once more)."""
        return MainMenuScreen()

    def on_mount(self) -> None:
        self.call_after_refresh(self._after_first_frame)

    def _after_first_frame(self) -> None:
        """What the first frame does not need: the config path in the header (its module), and
        the watcher threads."""
        self._schedule_collections()
        if not self.sub_title:
            self.sub_title = str(self.services.store.path)
        if self.services.watch_kernel:
            self.start_watchers()

    # -- the garbage collector, off the keys' path ------------------------------------------
    # A full collection walks every object the tables hold; under a storm of device events
    # one took 50-100 ms, the longest stall between a key and its frame (bench/picker_stress).
    # What exists after the first frame lives as long as the app (frozen: never walked);
    # full collections run when nobody has typed or clicked for a moment (at most every
    # GC_QUIET_EVERY seconds, at least every GC_LATEST, so garbage cycles stay bounded).
    GC_QUIET_SECONDS = 2.0
    GC_QUIET_EVERY = 20.0
    GC_LATEST = 120.0
    _last_input = 0.0
    _last_collect = 0.0

    def _schedule_collections(self) -> None:
        gc.freeze()
        young, middle, _full = gc.get_threshold()
        gc.set_threshold(young, middle, 1 << 30)  # no full collection but ours
        self._last_collect = time.monotonic()
        self.set_interval(1.0, self._collect_when_quiet)

    def _collect_when_quiet(self) -> None:
        now = time.monotonic()
        since = now - self._last_collect
        if since >= self.GC_LATEST or (since >= self.GC_QUIET_EVERY and
                                       now - self._last_input >= self.GC_QUIET_SECONDS):
            gc.collect()
            self._last_collect = time.monotonic()

    async def on_event(self, event) -> None:
        from textual import events
        if isinstance(event, (events.Key, events.MouseDown, events.MouseScrollDown,
                              events.MouseScrollUp)):
            self._last_input = time.monotonic()
        await super().on_event(event)

    def on_unmount(self) -> None:
        if self.watchers is not None:
            self.watchers.close()
        if self._last_collect:  # the collector as it was (tests run many apps in one process)
            gc.unfreeze()
            gc.set_threshold(*GC_DEFAULT)

    def start_watchers(self) -> None:
        from app.services.events import Watchers
        self.watchers = Watchers(lambda event: self.post_message(self.Changed(event)),
                                 config_path=self.services.store.path,
                                 control=self.services.control)
        self.watchers.start()

    def on_mirror_setup_app_changed(self, message: Changed) -> None:
        from app.services import events
        event = message.event
        if isinstance(event, events.MountsChanged):
            self.mounts_signal.publish(event.diff)
        elif isinstance(event, events.BlockUevents):
            self.block_signal.publish(event.events)
        elif isinstance(event, events.DaemonChanged):
            self.daemon_signal.publish(event.running)
        elif isinstance(event, events.ConfigChanged):
            self.config_signal.publish(event.path)

    def daemon_changed_here(self) -> None:
        """We started or stopped the daemon: arm the watch now rather than at its next event."""
        if self.watchers is not None:
            self.watchers.poke_daemon()

    # -- navigation ----------------------------------------------------------------------

    def action_back(self) -> None:
        """One level up. On the main menu only q quits (Esc there does nothing by accident)."""
        if len(self.screen_stack) > 1:
            self.pop_screen()

    def open_screen(self, name: str) -> Screen:
        """Show `name` over the main menu (replacing any other task screen) and return it."""
        cls = actions.screen_class(name)
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
        for title, help_text, name, action in actions.palette():
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
        self.notify(message, title="Read-only", severity="warning", markup=False)
        return True


def make_app(*, config_path=None, control_socket=None, state_dir=None,
             services: Services | None = None, is_root: bool | None = None) -> MirrorSetupApp:
    """The App over real services (or `services` as given); `is_root` overrides the euid check."""
    if services is None:
        services = default_services(config_path, control_socket, state_dir)
    return MirrorSetupApp(services, is_root=is_root)


def run_tui(config_path=None, control_socket=None, state_dir=None) -> int:
    app = make_app(config_path=config_path, control_socket=control_socket, state_dir=state_dir)
    result = app.run()
    return result if isinstance(result, int) else 0


__all__ = ["MirrorSetupApp", "Services", "default_services", "make_app", "run_tui"]
