"""What changed, as the kernel, the daemon and the configuration file say it: one set of
watcher threads for the TUI and for `status --watch`, never a timer.

- the mount table: poll() on mountinfo (MountWatcher), one diff per wake, read at most every
  MOUNT_GAP seconds (a lone mount is seen at once; a host churning them costs a few reads);
- block devices: kernel uevents, delivered in batches: the first at once, then at most one per
  UEVENT_BATCH seconds (a host attaching hundreds of loops must not flood the console);
- the daemon: a held `watch` connection ends when it stops or dies; its socket appearing
  (inotify) or a mount-table change (a starting daemon mounts its captures) arms it again;
- the configuration file: inotify on its directory (the CLI, an editor or another console).

`deliver(event)` is called from the watcher threads; it must be thread-safe (the App's
post_message is, a queue.Queue's put is).
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.services.inotify import PathWatch

UEVENT_BATCH = 0.25  # seconds: uevents after the first are gathered this long, then delivered
MOUNT_GAP = 0.05  # seconds at least between two reads of the mount table (then one diff of all)
DAEMON_ARM_TRIES = 10  # × DAEMON_ARM_STEP: the socket file appears at bind(), before listen()
DAEMON_ARM_STEP = 0.05


@dataclass(frozen=True)
class MountsChanged:
    diff: object  # mounts.MountDiff


@dataclass(frozen=True)
class BlockUevents:
    events: tuple[tuple[str, str], ...]  # (action, kernel name), oldest first


@dataclass(frozen=True)
class DaemonChanged:
    running: bool


@dataclass(frozen=True)
class ConfigChanged:
    path: str


def _related(a: str, b: str) -> bool:
    """One path is the other, or lies beneath it."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


@dataclass(frozen=True)
class Interest:
    """Which mount and block events can change a picture of the configured entries (the
    dashboard, the file-system screen, `status --watch`): taken from the last picture, so a
    host that attaches and mounts hundreds of other things does not have every entry's state
    read again each time. That read lists every loop and walks every process's descriptors;
    on a host churning 100 loops and 20 mounts it kept a dashboard nobody touched about a
    third of a CPU busy. `None` as a screen's interest (no picture yet): every event matters.

    An event matters when it is about an entry's directory (a mount at it, above it or below
    it), a local target's path, an entry's device or any loop on it or on its capture file
    (attached, detached, mounted: the warnings about bypassing loops and raw mounts). The
    daemon's figures, the daemon and the configuration are watched on their own."""

    paths: tuple[str, ...] = ()  # entry directories, local targets
    rdevs: frozenset[int] = frozenset()  # entry devices and every loop on them or their captures
    names: frozenset[str] = frozenset()  # the same as kernel names (a uevent carries only those)
    devices: frozenset[int] = frozenset()  # entry devices alone: a new loop's backing is one?
    captures: frozenset[str] = frozenset()  # layout.capture_suffix of each block entry

    def wants(self, event) -> bool:
        if isinstance(event, MountsChanged):
            d = event.diff
            return any(self.mount(m) for m in (*d.added, *d.removed, *(m for pair in d.changed
                                                                      for m in pair)))
        if isinstance(event, BlockUevents):
            return any(self._uevent(name) for _, name in event.events)
        return True  # the daemon, the configuration

    def mount(self, m) -> bool:
        """One mounts.MountEntry (added, removed or changed) matters."""
        # (a block capture's own FUSE mount is followed by its loop's uevent, which matters)
        return os.makedev(m.major, m.minor) in self.rdevs or \
            any(_related(m.mount_point, p) for p in self.paths)

    def _uevent(self, name: str) -> bool:
        """A loop not known to be ours matters when it is bound now to an entry's device or
        capture file (sysfs and devtmpfs only: nothing here waits on a file system)."""
        if name in self.names or not name.startswith("loop"):
            return True  # ours, or a real disk (logged and shown: their events are few)
        if not name[4:].isdigit():  # a loop's partition: as its loop
            return "loop" + name[4:].partition("p")[0] in self.names
        from app.services import loop as loopdev
        from app.services.layout import capture_key
        try:
            backing = loopdev._read_sys(os.path.join(loopdev.SYS_ROOT, "block", name, "loop",
                                                     "backing_file"))
        except OSError:  # not bound (any more): nothing of ours
            return False
        if capture_key(backing) in self.captures:
            return True
        if backing.startswith("/dev/"):
            try:
                return os.stat(backing).st_rdev in self.devices
            except OSError:
                return False
        return False

    @classmethod
    def of(cls, snap) -> Interest:
        """From a status.StatusSnapshot (stats of device nodes only: call it where reading is
        allowed, a load thread)."""
        from app.services.layout import capture_key, capture_suffix
        from app.services.status import kernel_name
        paths = [s.entry.path for s in snap.filesystem]
        paths += [t for s in (*snap.filesystem, *snap.block)
                  if isinstance(t := getattr(s.entry, "target", None), str) and t.startswith("/")]
        devices, names = set(), set()
        for s in snap.block:
            names.add(kernel_name(s.entry.device))
            if s.entry.loop:  # its fixed loop: another tool taking it is shown
                names.add(os.path.basename(s.entry.loop))
            try:
                devices.add(os.stat(s.entry.device).st_rdev)
            except OSError:
                pass
        captures = frozenset(capture_suffix(s.entry.device) for s in snap.block)
        rdevs = set(devices)
        for lp in snap.loops:
            backing = lp.backing_file or ""
            ours = capture_key(backing) in captures
            if not ours and backing.startswith("/dev/"):
                try:
                    ours = os.stat(backing).st_rdev in devices
                except OSError:
                    pass
            if ours:
                names.add(os.path.basename(lp.device))
                try:
                    rdevs.add(os.stat(lp.device).st_rdev)
                except OSError:
                    pass
        return cls(tuple(paths), frozenset(rdevs), frozenset(names), frozenset(devices), captures)


class Watchers:
    """Start with start(); close() wakes every thread and they end. Threads are daemonic so a
    crashed caller never hangs on them."""

    def __init__(self, deliver: Callable[[object], None], *, config_path=None, control=None,
                 mounts: bool = True, uevents: bool = True) -> None:
        self.deliver = deliver
        self.config_path = os.fspath(config_path) if config_path is not None else None
        self.control = control
        self.socket_path = getattr(control, "socket_path", None)  # the daemon's, watched too
        self._want_mounts, self._want_uevents = mounts, uevents
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # wakes the file thread
        self._uevent_wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._mount_watcher = None
        self._files = None  # the configuration file and the daemon's socket (inotify)
        self._closed = False
        self._stopping = threading.Event()  # set by close(): a pause between two reads ends
        self._lock = threading.Lock()  # eventfds are written and closed under it, never after
        self._watch_sock = None
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []  # a watcher that died, and why (shown, never raised)

    @property
    def watching_daemon(self) -> bool:
        """True while a watch connection to a running daemon is held."""
        return self._watch_sock is not None

    def start(self) -> None:
        try:  # armed now, not in the thread: a change made right after start() is seen
            self._files = PathWatch([p for p in (self.config_path, self.socket_path) if p])
        except OSError as exc:
            self._files = None
            self.errors.append(f"files_and_daemon: {exc}")
        targets = [self._files_and_daemon] if self._files is not None else []
        if self._want_mounts:
            from app.services.mounts import MountWatcher
            self._mount_watcher = MountWatcher()  # read now: a change made after start is seen
            targets.append(self._mounts)
        if self._want_uevents:
            targets.append(self._uevents)
        for target in targets:
            thread = threading.Thread(target=self._guarded, args=(target,),
                                      name=f"mirrorsetup-watch{target.__name__}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def _guarded(self, target) -> None:
        try:
            target()
        except Exception as exc:  # a watcher that cannot run must not print over the screen
            self.errors.append(f"{target.__name__.strip('_')}: {exc}")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping.set()
            for fd in (self._wake, self._uevent_wake):
                if fd >= 0:
                    os.eventfd_write(fd, 1)
        if self._mount_watcher is not None:
            self._mount_watcher.close()

    def poke_daemon(self) -> None:
        """Try to arm the daemon watch now (e.g. after starting the daemon ourselves)."""
        with self._lock:
            if not self._closed and self._wake >= 0:
                os.eventfd_write(self._wake, 2)

    def _close_fd(self, name: str) -> None:
        with self._lock:
            fd = getattr(self, name)
            setattr(self, name, -1)
            if fd >= 0:
                os.close(fd)

    # -- threads ---------------------------------------------------------------------------

    def _mounts(self) -> None:
        watcher, last = self._mount_watcher, 0.0
        while True:
            # One read of the table per MOUNT_GAP at most: what changes meanwhile comes as one
            # diff (a host churning mounts had every change read and parsed on its own)
            if self._stopping.wait(max(0.0, last + MOUNT_GAP - time.monotonic())):
                return
            diff = watcher.wait()
            if diff is None:  # closed
                return
            last = time.monotonic()
            self.deliver(MountsChanged(diff))
            if not self.watching_daemon:
                self.poke_daemon()

    def _uevents(self) -> None:
        import pyudev
        try:
            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
            monitor.filter_by("block")
            monitor.start()
            self._gather(monitor)
        finally:
            self._close_fd("_uevent_wake")

    def _gather(self, monitor) -> None:
        batch: list[tuple[str, str]] = []
        hold_until = 0.0  # while now < hold_until, events are gathered, not delivered
        while not self._closed:
            timeout = max(0.0, hold_until - time.monotonic()) if batch else None
            ready, _, _ = select.select([monitor, self._uevent_wake], [], [], timeout)
            if self._uevent_wake in ready:
                break
            while (device := monitor.poll(timeout=0)) is not None:
                batch.append((device.action or "?", device.sys_name))
            now = time.monotonic()
            if batch and now >= hold_until:
                self.deliver(BlockUevents(tuple(batch)))
                batch = []
                hold_until = now + UEVENT_BATCH

    def _files_and_daemon(self) -> None:
        config = os.path.abspath(self.config_path) if self.config_path else None
        sock_path = os.path.abspath(self.socket_path) if self.socket_path else None
        files = self._files
        try:
            self._arm_daemon(tries=1)
            while not self._closed:
                watched = [files, self._wake] + ([self._watch_sock] if self._watch_sock else [])
                ready, _, _ = select.select(watched, [], [])
                if self._wake in ready:
                    os.eventfd_read(self._wake)
                    if self._closed:
                        break
                    if not self.watching_daemon and self._arm_daemon(tries=1):
                        self.deliver(DaemonChanged(True))
                if self._watch_sock is not None and self._watch_sock in ready:
                    self._drop_watch()
                    self.deliver(DaemonChanged(False))
                if files in ready:
                    touched = files.read()
                    if config in touched:
                        self.deliver(ConfigChanged(config))
                    if sock_path in touched and not self.watching_daemon \
                            and self._arm_daemon(tries=DAEMON_ARM_TRIES):
                        self.deliver(DaemonChanged(True))
        finally:
            self._drop_watch()
            if files is not None:
                files.close()
            self._close_fd("_wake")

    def _arm_daemon(self, tries: int) -> bool:
        """Hold a watch connection to the daemon if one answers; bounded retries cover the
        moment between its bind() and listen()."""
        if self.control is None:
            return False
        for attempt in range(tries):
            try:
                self._watch_sock = self.control.open_watch()
                return True
            except Exception:  # not running, not reachable, or a foreign socket: not watched
                if attempt + 1 < tries:
                    time.sleep(DAEMON_ARM_STEP)
        return False

    def _drop_watch(self) -> None:
        sock, self._watch_sock = self._watch_sock, None
        if sock is not None:
            sock.close()
