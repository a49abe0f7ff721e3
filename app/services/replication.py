"""The administrator's actions, as plan + apply, one `Result` per entry.

Block entries are attached here through the loop service. File-system entries are mounted by
the daemon (mirrorfs needs a long-running FUSE server), so mount-all / unmount-all go through
the control socket; nothing here fakes them with bind mounts.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterable

from app.services import blockdevs, mounts
from app.services import loop as loopdev
from app.services.config import BlockEntry, ConfigStore
from app.services.results import MirrorError, Outcome, Result


def same_device(a: str | None, b: str | None) -> bool:
    """True when two paths name one block device (symlinks and /dev/disk/by-* included)."""
    if not a or not b:
        return False
    ida, idb = device_id(a), device_id(b)
    if ida is None or idb is None:
        return os.path.realpath(a) == os.path.realpath(b)
    return ida == idb


CAPTURE_FILE = "disk"  # the one file of a block entry's private FUSE mount, backing its loop


def capture_id(device: str) -> str:
    """The directory name of a block entry's capture (FUSE mount, journal): stable per device."""
    base = os.path.basename(device.rstrip("/")) or "dev"
    return f"{base[:40]}-{hashlib.sha256(os.fsencode(device)).hexdigest()[:12]}"


def is_capture_of(device: str, backing: str | None) -> bool:
    """True when a loop's backing file is the capture file of `device` (live or left dead)."""
    return bool(backing) and backing.endswith(f"/block/{capture_id(device)}/{CAPTURE_FILE}")


LoopIndex = dict[tuple[int, int], list[loopdev.LoopStatus]]


def device_id(path: str | None) -> tuple[int, int] | None:
    """(0, rdev) for a device node, (st_dev, st_ino) for a file; None when it cannot be seen."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    if st is None:
        return None
    return (0, st.st_rdev) if st.st_rdev else (st.st_dev, st.st_ino)


def index_by_backing(attached: Iterable[loopdev.LoopStatus] | None = None) -> LoopIndex:
    """Attached loops grouped by what backs them: one stat per loop, however many entries ask."""
    index: LoopIndex = {}
    for s in loopdev.list_attached() if attached is None else attached:
        if (key := device_id(s.backing_file)) is not None:
            index.setdefault(key, []).append(s)
    return index


def loops_backed_by(device: str, index: LoopIndex | None = None) -> list[loopdev.LoopStatus]:
    """Loop devices whose backing is `device` (the kernel's sysfs view, never a cache)."""
    key = device_id(device)
    return [] if key is None else list((index_by_backing() if index is None else index).get(key, ()))


def matching_loop(entry: BlockEntry, index: LoopIndex | None = None) -> loopdev.LoopStatus | None:
    """The loop that already serves `entry`: same backing device, offset and size limit."""
    for s in loops_backed_by(entry.device, index):
        if s.offset == entry.offset and s.sizelimit == entry.sizelimit:
            return s
    return None


def busy_reasons(device: str, table: list[mounts.MountEntry] | None = None,
                 attached: list[loopdev.LoopStatus] | None = None) -> list[str]:
    """Why attaching a loop over `device` would let writes bypass capture (mounted, held,
    captured). `table` and `attached` are read once by callers that ask for many devices."""
    st = os.stat(device)
    reasons = [f"mounted on {m.mount_point}"
               for m in mounts.mounts_of_device(os.major(st.st_rdev), os.minor(st.st_rdev), table)]
    reasons += [f"held by {h}" for h in loopdev.holders_of(device)]
    reasons += [f"captured by the mirrorsetup daemon through {s.device}"
                for s in (loopdev.list_attached() if attached is None else attached)
                if is_capture_of(device, s.backing_file)]
    if not reasons:
        try:  # what sysfs does not name: an exclusive opener (mkfs, a daemon, a RAID tool)
            os.close(os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            reasons.append("held open exclusively by another program")
    return reasons


def mounted_on(device: str) -> list[str]:
    st = os.stat(device)
    return [m.mount_point for m in mounts.mounts_of_device(os.major(st.st_rdev), os.minor(st.st_rdev))]


UNCAPTURED = ("; NOT captured: the replication daemon is not running, so writes through it are "
              "not replicated (start the daemon: it takes the loop over)")


class Replication:
    """What the TUI's menus and the CLI's subcommands call; both report the returned Results."""

    def __init__(self, store: ConfigStore, control=None):
        self.store = store
        self._control = control

    @property
    def control(self):
        """The daemon client, created on first use so block-only paths never import it."""
        if self._control is None:
            from app.services.control import ControlClient
            self._control = ControlClient()
        return self._control

    # -- block entries -------------------------------------------------------------------

    def add_block(self, device: str, **kw) -> Result:
        try:
            entry = self.store.add_block(device, **kw)
        except MirrorError as exc:
            return Result.from_error("add", device, exc)
        where = entry.loop or "the first free loop device"
        return Result("add", entry.device, Outcome.OK,
                      f"added {entry.device} (attaches to {where} at offset {entry.offset})")

    def remove_block(self, device: str) -> list[Result]:
        """Remove an entry; its loop is detached first, and a failed detach keeps the entry."""
        try:
            entry = next(e for e in self.store.load().block if same_device(e.device, device)
                         or e.device == device)
        except StopIteration:
            return [Result("remove", device, Outcome.FAILED,
                           f"{device} is not a configured block device", errno.ENOENT)]
        except MirrorError as exc:
            return [Result.from_error("remove", device, exc)]
        daemon, refusal = self._daemon_or_refusal("remove", entry.device)
        if refusal:
            return refusal
        if daemon is not None:
            results = self._daemon_results("detach", entry.device, "block_detach", checked=True,
                                           device=entry.device)
        else:
            results = self._detach_entry(entry)
        if any(r.failed for r in results):
            return results + [Result("remove", entry.device, Outcome.SKIPPED,
                                     f"kept {entry.device} in the configuration: its loop is still in use")]
        try:
            self.store.remove_block(entry.device)
        except MirrorError as exc:
            return results + [Result.from_error("remove", entry.device, exc)]
        return results + [Result("remove", entry.device, Outcome.OK, f"removed {entry.device}")]

    def daemon(self):
        """The daemon's client when it answers, else None. Block entries are captured by the
        daemon; without it they are attached as plain loops and said to be uncaptured.
        Raises MirrorError when the daemon that answers works from another configuration file."""
        try:
            control = self.control
        except ImportError:
            return None
        try:
            ping = control.request("ping")
        except MirrorError:
            return None
        theirs, ours = ping.get("config"), os.path.realpath(self.store.path)
        if theirs and theirs != ours:
            raise MirrorError(f"the daemon on {control.socket_path} works from {theirs}, not {ours}: "
                              "use its configuration (--config) or start a daemon for this one",
                              errno=errno.EINVAL, obj=ours)
        return control

    def _daemon_or_refusal(self, action: str, subject: str):
        """(daemon client or None, None) — or (None, [FAILED result]) for a daemon that works
        from another configuration file."""
        try:
            return self.daemon(), None
        except MirrorError as exc:
            return None, [Result.from_error(action, subject, exc)]

    def attach_all(self, *, dry_run: bool = False, force: bool = False) -> list[Result]:
        """Attach every configured block entry; idempotent (an attached entry is unchanged)."""
        daemon, refusal = self._daemon_or_refusal("attach", "all block entries")
        if refusal:
            return refusal
        if daemon is not None:
            return self._daemon_results("attach", "all block entries", "block_attach_all",
                                        checked=True, dry_run=dry_run, force=force)
        config = self.store.load()
        attached, table = loopdev.list_attached(), mounts.read_mountinfo()  # once, not per entry
        index = index_by_backing(attached)
        return [self._attach_entry(e, index, table, attached, dry_run=dry_run, force=force,
                                   action="attach", uncaptured=True) for e in config.block]

    def detach_all(self, *, dry_run: bool = False) -> list[Result]:
        """Detach only the loops our configuration names; a mounted loop is reported, not forced."""
        daemon, refusal = self._daemon_or_refusal("detach", "all block entries")
        if refusal:
            return refusal
        if daemon is not None:
            return self._daemon_results("detach", "all block entries", "block_detach_all",
                                        checked=True, dry_run=dry_run)
        results: list[Result] = []
        index = index_by_backing()  # read sysfs once, not once per entry
        for entry in self.store.load().block:
            results += self._detach_entry(entry, index, dry_run=dry_run)
        return results

    def _attach_entry(self, entry: BlockEntry, index: LoopIndex,
                      table: list[mounts.MountEntry] | None = None,
                      attached: list[loopdev.LoopStatus] | None = None, *, dry_run: bool,
                      force: bool, action: str, uncaptured: bool = False) -> Result:
        dev = entry.device
        if not os.path.exists(dev):
            return Result(action, dev, Outcome.FAILED, f"{dev} does not exist", errno.ENOENT)
        current = matching_loop(entry, index)
        if current is not None:
            note = ""
            if entry.loop and entry.loop != current.device:
                note = f" (configured {entry.loop}; detach and attach again to move it)"
            return Result(action, dev, Outcome.UNCHANGED,
                          f"{dev} is already attached as {current.device}{note}",
                          details={"loop": current.device})
        try:
            reason = blockdevs.exclusion_reason(dev)
            busy = busy_reasons(dev, table, attached)
        except MirrorError as exc:
            return Result.from_error(action, dev, exc)
        except OSError as exc:
            return Result.from_error(action, dev, MirrorError.from_oserror("inspect", dev, exc))
        if reason:
            return Result(action, dev, Outcome.FAILED,
                          f"refused: {dev} is {reason}; it cannot be replicated", errno.EINVAL)
        if busy and not force:
            return Result(action, dev, Outcome.FAILED,
                          f"refused: {dev} is {', '.join(busy)}; writes there would bypass the loop "
                          f"device and corrupt the target (--force overrides)", errno.EBUSY)
        where = entry.loop or "the first free loop device"
        if dry_run:
            return Result(action, dev, Outcome.SKIPPED,
                          f"would attach {dev} to {where} at offset {entry.offset}"
                          + (f", size limit {entry.sizelimit}" if entry.sizelimit else "")
                          + (", read-only" if entry.read_only else ""))
        try:
            st = loopdev.attach(dev, loop=entry.loop, offset=entry.offset,
                             sizelimit=entry.sizelimit, read_only=entry.read_only)
        except MirrorError as exc:
            return Result.from_error(action, dev, exc)
        return Result(action, dev, Outcome.OK, f"attached {dev} as {st.device}"
                      + (" (forced over: " + ", ".join(busy) + ")" if busy else "")
                      + (UNCAPTURED if uncaptured else ""), details={"loop": st.device})

    def _detach_entry(self, entry: BlockEntry, index: LoopIndex | None = None, *,
                      dry_run: bool = False) -> list[Result]:
        found = [s for s in loops_backed_by(entry.device, index) if s.offset == entry.offset]
        if not found:
            return [Result("detach", entry.device, Outcome.UNCHANGED,
                           f"{entry.device} is not attached")]
        return [self._detach_loop(s.device, entry.device, dry_run=dry_run) for s in found]

    def _detach_loop(self, dev: str, subject: str, *, dry_run: bool = False) -> Result:
        try:
            where = mounted_on(dev)
        except OSError as exc:
            return Result.from_error("detach", subject, MirrorError.from_oserror("inspect", dev, exc))
        if where:
            return Result("detach", subject, Outcome.FAILED,
                          f"{dev} is mounted on {', '.join(where)}: unmount it first "
                          f"(nothing was unmounted)", errno.EBUSY, {"loop": dev})
        if dry_run:
            return Result("detach", subject, Outcome.SKIPPED, f"would detach {dev}", details={"loop": dev})
        r = loopdev.detach(dev)
        return Result("detach", subject, r.outcome, r.message, r.errno, {"loop": dev})

    def block_mirror(self, device: str, progress=None) -> list[Result]:
        """Copy the entry's whole window to its target (through the daemon, writes held still);
        `progress({"bytes": done, "total": size})` is called as it goes."""
        return self._daemon_results("mirror", device, "block_mirror", device=device, progress=progress)

    def block_verify(self, device: str, progress=None) -> tuple[list[Result], list[list[int]]]:
        """Compare the window with its target by block hashes: results and the differing
        [start, end) byte ranges (target offsets); progress as for block_mirror."""
        try:
            self.daemon()  # refuses a daemon that works from another configuration file
            reply = self.control.request("block_verify", device=device, progress=progress)
        except MirrorError as exc:
            return [Result.from_error("verify", device, exc)], []
        return [Result.from_json(r) for r in reply.get("results", [])], reply.get("ranges", [])

    # -- manual (not persisted) ----------------------------------------------------------

    def manual_attach(self, device: str, *, loop: str | None = None, offset: int = 0,
                      sizelimit: int = 0, read_only: bool = False, force: bool = False) -> Result:
        """Attach now, as the old "manual" menu did; nothing is written to the configuration."""
        try:
            blockdevs.describe(device)
            entry = BlockEntry(device=device, loop=loop, offset=offset, sizelimit=sizelimit,
                               read_only=read_only)
        except MirrorError as exc:
            return Result.from_error("manual attach", device, exc)
        return self._attach_entry(entry, index_by_backing(), dry_run=False, force=force,
                                  action="manual attach")

    def manual_detach(self, loop_path: str) -> Result:
        try:
            loopdev.parse_loop_path(loop_path)
        except MirrorError as exc:
            return Result.from_error("manual detach", loop_path, exc)
        if loopdev.status(loop_path) is None:
            return Result("manual detach", loop_path, Outcome.UNCHANGED, f"{loop_path} is not attached")
        r = self._detach_loop(loop_path, loop_path)
        return Result("manual detach", loop_path, r.outcome, r.message, r.errno, r.details)

    # -- file-system entries (mounted by the daemon) -------------------------------------

    def add_filesystem(self, path: str, **kw) -> Result:
        try:
            entry = self.store.add_filesystem(path, **kw)
        except MirrorError as exc:
            return Result.from_error("add", path, exc)
        atime = "with" if entry.replicate_atime else "without"
        return Result("add", entry.path, Outcome.OK,
                      f"added {entry.path} ({atime} access times); mount it now with Mount all, "
                      f"or it is mounted when the daemon starts")

    def remove_filesystem(self, path: str, *, force: bool = False) -> list[Result]:
        """Remove an entry; a capture still mounted there is unmounted first through the daemon."""
        results: list[Result] = []
        norm = os.path.realpath(path) if path != "/" else path
        if any(m.mount_point == norm and m.fstype == "fuse.mirrorfs" for m in mounts.read_mountinfo()):
            results = self._daemon_results("unmount", norm, path=norm, force=force)
            if any(r.failed for r in results):
                return results + [Result("remove", norm, Outcome.SKIPPED,
                                         f"kept {norm}: mirrorfs is still mounted there")]
        try:
            entry = self.store.remove_filesystem(path)
        except MirrorError as exc:
            return results + [Result.from_error("remove", path, exc)]
        return results + [Result("remove", entry.path, Outcome.OK, f"removed {entry.path}")]

    def mount_all(self, *, force: bool = False) -> list[Result]:
        return self._daemon_results("mount", "all file-system entries", "mount_all", force=force)

    def unmount_all(self, *, force: bool = False) -> list[Result]:
        return self._daemon_results("unmount", "all file-system entries", "unmount_all", force=force)

    def _daemon_results(self, action: str, subject: str, cmd: str | None = None, progress=None,
                        checked: bool = False, **args) -> list[Result]:
        """Ask the daemon; unless the caller has `checked` it already, first refuse a daemon
        that works from another configuration file."""
        try:
            if not checked:
                self.daemon()
            reply = self.control.request(cmd or action, progress=progress, **args)
            return [Result.from_json(r) for r in reply.get("results", [])]
        except MirrorError as exc:
            return [Result.from_error(action, subject, exc)]
