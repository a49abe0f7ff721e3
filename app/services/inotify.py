"""inotify(7) for a few files that may not exist yet (the configuration file, the control socket).

A file is watched through its directory, so a file replaced by rename (our atomic config
writes, an editor's save) or created later (a daemon binding its socket) is seen. A directory
that does not exist yet is replaced by its nearest existing ancestor until it appears.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable, Iterable

from app.services.mounts import _libc

libc = _libc()  # one libc handle for the services

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000  # events were lost: the queue was full (wd -1)
IN_IGNORED = 0x00008000  # the watch is gone (its directory was removed)
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# A file's whole life as seen from its directory: written and closed, created, renamed over or
# away, deleted; and the directory itself going away.
DIR_EVENTS = (IN_CLOSE_WRITE | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
              | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
EVENT_HEAD = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
READ_SIZE = 64 * 1024

libc.inotify_init1.argtypes = [ctypes.c_int]
libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


class PathWatch:
    """Which of `paths` may have changed since the last read(); fileno() is for select/poll."""

    def __init__(self, paths) -> None:
        self.paths = tuple(os.path.abspath(os.fspath(p)) for p in paths)
        self.fd = _init()
        self._dirs: dict[int, str] = {}  # watch descriptor -> directory
        self._arm()

    def fileno(self) -> int:
        return self.fd

    def _arm(self) -> None:
        """Watch each path's directory, or its nearest existing ancestor until it exists."""
        wanted = {_nearest_dir(os.path.dirname(p)) for p in self.paths}
        for wd, directory in list(self._dirs.items()):
            if directory not in wanted:
                libc.inotify_rm_watch(self.fd, wd)  # IN_IGNORED follows; the entry goes then
                del self._dirs[wd]
        for directory in wanted - set(self._dirs.values()):
            wd = libc.inotify_add_watch(self.fd, os.fsencode(directory), DIR_EVENTS)
            if wd >= 0:
                self._dirs[wd] = directory
            # A directory removed between our look and the call: the next read re-arms.

    def read(self) -> set[str]:
        """The watched paths touched by the queued events (empty when none were ours)."""
        touched: set[str] = set()
        for wd, mask, raw in _queued(self.fd):
            if mask & IN_Q_OVERFLOW:  # what was lost is unknown: any of them may have changed
                touched.update(self.paths)
                continue
            directory = self._dirs.get(wd)
            if mask & IN_IGNORED:
                self._dirs.pop(wd, None)
            if directory is None:
                continue
            name = os.fsdecode(raw.rstrip(b"\0"))
            where = os.path.join(directory, name) if name else directory
            touched.update(p for p in self.paths if p == where or p.startswith(where + "/"))
        self._arm()  # directories may have appeared or gone
        return touched

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _init() -> int:
    """A new non-blocking inotify descriptor."""
    fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "inotify_init1")
    return fd


def _queued(fd: int):
    """Every event queued on the inotify descriptor `fd` (non-blocking): (wd, mask, name)."""
    while True:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        offset = 0
        while offset < len(data):
            wd, mask, _cookie, size = EVENT_HEAD.unpack_from(data, offset)
            yield wd, mask, data[offset + EVENT_HEAD.size:offset + EVENT_HEAD.size + size]
            offset += EVENT_HEAD.size + size


def _nearest_dir(path: str) -> str:
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


class WriteCloses:
    """Closes of one file itself (a block device's node) by openers that had it open for
    writing: IN_CLOSE_WRITE on its inode, as udev's "watch" of block devices sees them. The
    caller's own descriptor, kept open, raises none; its writes raise IN_MODIFY, not asked for.
    A path that is a symbolic link is followed (/dev/disk/by-id/… names the node). `also`:
    more nodes watched the same way (a partition or the disk of a block entry); one that
    cannot be watched is left out (`missed` names it), the first raises OSError. `rescan`:
    asked again for those nodes when /dev gets a node whose name begins with `prefix` (a
    partition made while this watches: loop0p1 of loop0); new ones are watched from then on.
    A full event queue (IN_Q_OVERFLOW) may have lost closes: read() then says OVERFLOW among
    them, and looks for new nodes again (a creation may have been lost too)."""

    OVERFLOW = "(closes lost: the inotify queue overflowed)"

    def __init__(self, path: str, also: Iterable[str] = (), *,
                 rescan: Callable[[], Iterable[str]] | None = None, prefix: str = "") -> None:
        self.fd = _init()
        self.names: dict[int, str] = {}
        self.missed: list[tuple[str, OSError]] = []
        self.rescan, self.prefix, self.dev_wd = rescan, os.fsencode(prefix), -1
        for n, node in enumerate((path, *also)):
            err = self._watch(node)
            if err is not None and n == 0:
                os.close(self.fd)
                raise err
            if err is not None:
                self.missed.append((node, err))
        if rescan is not None and prefix:
            self.dev_wd = libc.inotify_add_watch(self.fd, b"/dev", IN_CREATE)
            self._add_new(rescan())  # (one made before /dev was watched, after `also`)

    def _add_new(self, nodes: Iterable[str]) -> None:
        watched = set(self.names.values())
        for node in nodes:
            if node not in watched and self._watch(node) is None:
                watched.add(node)

    def _watch(self, node: str) -> OSError | None:
        wd = libc.inotify_add_watch(self.fd, os.fsencode(node), IN_CLOSE_WRITE)
        if wd < 0:
            err = ctypes.get_errno()
            return OSError(err, os.strerror(err), node)
        self.names[wd] = node
        return None

    def fileno(self) -> int:
        return self.fd

    def read(self) -> list[str]:
        """The node of each such close queued since the last read (in order)."""
        closes, created = [], False
        for wd, mask, name in _queued(self.fd):
            if mask & IN_Q_OVERFLOW:
                closes.append(self.OVERFLOW)
                created = True
            elif wd == self.dev_wd:
                created = created or name.rstrip(b"\0").startswith(self.prefix)
            elif mask & IN_IGNORED:  # the node is gone (a partition deleted)
                self.names.pop(wd, None)
            elif mask & IN_CLOSE_WRITE:
                closes.append(self.names.get(wd, "?"))
        if created and self.rescan is not None:
            self._add_new(self.rescan())
        return closes

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
