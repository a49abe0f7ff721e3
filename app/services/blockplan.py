"""What attaching or detaching a block entry would do, and why it is refused: one plan for
both ways of attaching (a plain loop when no daemon runs; a captured loop by the daemon).

Every "busy" refusal names what holds the device: a mount, a kernel holder (dm, md), another
loop (mounted where, or open by whom), a capture, an exclusive opener. The plan is made and
carried out under one host-wide lock (`attach_lock`), so concurrent attach-alls, or a manual
attach beside the daemon, can never stack two writable loops over one device.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass, field

from app.services import blockdevs, mounts
from app.services import loop as loopdev
from app.services.config import BlockEntry
from app.services.layout import capture_key, capture_owner, capture_suffix
from app.services.results import REFUSED, MirrorError, Outcome, Result

ATTACH_LOCK = "/run/mirrorsetup.attach.lock"  # host-wide, root-only (/run is root's)
UNCAPTURED = ("; NOT captured: the replication daemon is not running, so writes through it are "
              "not replicated (start the daemon: it takes the loop over)")


@contextlib.contextmanager
def attach_lock(path: str = ATTACH_LOCK):
    """Serialise loop planning + attaching across every mirrorsetup process on the host."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class View:
    """The kernel's state read once per action: which file backs each loop (sysfs), the mount
    table. A loop's whole status is read when a question first needs it (one file per loop
    to index them all, eight for each loop that matters), or given whole by the caller."""

    def __init__(self, attached: list[loopdev.LoopStatus] | None = None,
                 table: list[mounts.MountEntry] | None = None) -> None:
        self.table = mounts.read_mountinfo() if table is None else table
        self._names = mounts.MountNames(self.table)
        self.exclusions: blockdevs.Exclusions | None = None  # read ahead for many devices
        self._status: dict[int, loopdev.LoopStatus | None] = {}
        self._backing: dict[int, str | None] = {}
        self.by_backing: dict[tuple[int, int], list[int]] = {}
        self.by_capture: dict[str, list[int]] = {}
        if attached is None:
            for index, backing in loopdev.bound_backing().items():
                self._index(index, backing)
        else:
            for s in attached:
                self._status[s.index] = s
                self._index(s.index, s.backing_file)

    def _index(self, index: int, backing: str | None) -> None:
        """By the backing file's identity (a stat) when it is on a local file system, and a
        capture file by its name: a stat of a capture file (a block capture's FUSE mount) or
        of a file on NFS or sshfs waited for its server, and one stopped or gone hung every
        `status`, `block devices`, attach and the dashboard. A loop on such a file is not
        found by loops_on() (no device node is there)."""
        self._backing[index] = backing
        suffix = capture_key(backing)
        if suffix is not None:
            self.by_capture.setdefault(suffix, []).append(index)
        elif backing and self._names.on_local_fs(backing) and \
                (key := device_id(backing)) is not None:
            self.by_backing.setdefault(key, []).append(index)

    def _loops(self, indexes) -> list[loopdev.LoopStatus]:
        """Statuses of indexed loops; one rebound or detached since it was indexed is left out."""
        found = []
        for index in indexes:
            if index not in self._status:
                s = loopdev.status_of(index)
                self._status[index] = s if s and s.backing_file == self._backing[index] else None
            if (s := self._status[index]) is not None:
                found.append(s)
        return found

    def note_attached(self, s: loopdev.LoopStatus) -> None:
        """A loop we attached ourselves joins the picture (no new scan of every loop)."""
        self._status[s.index] = s
        self._index(s.index, s.backing_file)

    def loops_on(self, device: str) -> list[loopdev.LoopStatus]:
        key = device_id(device)
        return [] if key is None else self._loops(self.by_backing.get(key, ()))

    def offsets_on(self, device: str) -> list[tuple[int, int]]:
        """(index, offset) of the loops on `device`, without their whole status (a detach-all
        read eight files per loop for the one it needs)."""
        key = device_id(device)
        found = []
        for index in [] if key is None else self.by_backing.get(key, ()):
            if index in self._status:
                s = self._status[index]
                offset = None if s is None else s.offset
            else:
                offset = loopdev.offset_of(index, self._backing[index])
            if offset is not None:
                found.append((index, offset))
        return found

    def captures_of(self, device: str) -> list[loopdev.LoopStatus]:
        """Loops whose backing file is a capture file of `device` (any installation's)."""
        return self._loops(self.by_capture.get(capture_suffix(device), ()))

    def mounted_on(self, device: str) -> list[str]:
        rdev = os.stat(device).st_rdev
        return [m.mount_point for m in mounts.mounts_of_device(os.major(rdev), os.minor(rdev), self.table)]


def device_id(path: str | None) -> tuple[int, int] | None:
    """(0, rdev) for a device node, (st_dev, st_ino) for a file; None when it cannot be seen."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    if st is None:
        return None
    return (0, st.st_rdev) if st.st_rdev else (st.st_dev, st.st_ino)


def same_device(a: str | None, b: str | None) -> bool:
    """True when two paths name one block device (symlinks and /dev/disk/by-* included)."""
    if not a or not b:
        return False
    ida, idb = device_id(a), device_id(b)
    if ida is None or idb is None:
        return os.path.realpath(a) == os.path.realpath(b)
    return ida == idb


def matching_loop(entry: BlockEntry, view: View) -> loopdev.LoopStatus | None:
    """A plain loop that already serves `entry`: same device, offset and size limit."""
    for s in view.loops_on(entry.device):
        if s.offset == entry.offset and s.sizelimit == entry.sizelimit:
            return s
    return None


def busy_reasons(device: str, view: View) -> list[str]:
    """Why a loop over `device` would let writes bypass capture: mounted, held, captured,
    open exclusively. Loops straight on the device are judged by the plans below."""
    reasons = [f"mounted on {mp}" for mp in view.mounted_on(device)]
    reasons += [f"held by {h}" for h in loopdev.holders_of(device)]
    reasons += [f"captured by the mirrorsetup daemon through {s.device}"
                for s in view.captures_of(device)]
    if not reasons:
        try:  # what sysfs does not name: an exclusive opener (mkfs, a daemon, a RAID tool)
            os.close(os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            reasons += _exclusive_holders(device, view)
    return reasons


def _exclusive_holders(device: str, view: View) -> list[str]:
    """Who holds `device` exclusively, as far as the host tells: a mount in another namespace,
    a mounted partition (it claims its disk), else the processes that have it open (the kernel
    does not say which of them opened it exclusively)."""
    from app.services.status import openers_of
    rdev = os.stat(device).st_rdev
    elsewhere = mounts.namespace_holders(os.major(rdev), os.minor(rdev))
    if elsewhere:
        return [f"mounted on {h['mount_point']} in the mount namespace of pid {h['pid']} "
                f"({h['comm']})" for h in elsewhere]
    sys_dir = os.path.realpath(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    found = []
    for part in sorted(os.listdir(sys_dir)) if os.path.isdir(sys_dir) else ():
        try:
            major, minor = map(int, open(f"{sys_dir}/{part}/dev").read().split(":"))
        except (OSError, ValueError):
            continue  # not a partition (no dev file), or gone meanwhile
        found += [f"partition {part} mounted on {m.mount_point}"
                  for m in mounts.mounts_of_device(major, minor, view.table)]
    who = openers_of(device, exclude={os.getpid()})
    if who and not found:
        found.append("held open exclusively by another program (open by "
                     + ", ".join(f"pid {pid} ({comm})" for pid, comm in who) + ")")
    return found or ["held open exclusively by another program"]


def loop_users(loop: str, view: View, *, writing: bool = False,
               exclude: set[int] | frozenset[int] = frozenset()) -> list[str]:
    """Who uses a loop: 'mounted on …' per mount, 'open by pid N (comm)' per process (only
    those holding it open for writing, 'open for writing by …', when `writing`)."""
    from app.services.status import openers_of
    how = "open for writing by" if writing else "open by"
    return [f"mounted on {m}" for m in view.mounted_on(loop)] + [
        f"{how} pid {pid} ({comm})" for pid, comm in openers_of(loop, writing=writing, exclude=exclude)]


def loop_use(loop: str, view: View) -> str | None:
    """How a loop is in use: 'mounted on …' or 'open by pid N (comm)'; None when idle."""
    from app.services.status import openers_of
    where = view.mounted_on(loop)
    if where:
        return f"mounted on {', '.join(where)}"
    who = openers_of(loop)
    if who:
        return "open by " + ", ".join(f"pid {pid} ({comm})" for pid, comm in who)
    return None


@dataclass
class AttachPlan:
    entry: BlockEntry
    result: Result | None = None  # set: nothing to do (unchanged) or refused
    want: str | None = None  # the loop to attach (None: the first free one)
    take_over: loopdev.LoopStatus | None = None  # an idle plain loop of the entry to replace
    forced_over: list[str] = field(default_factory=list)


def attached_to(backing: str | None, devices=None) -> str:
    """What a loop is attached to, in words: a capture file is named by its entry, one of
    `devices` (the configured ones; None: not known here): the path below the run directory
    says nothing to an administrator."""
    if capture_key(backing) is None:
        return f"attached to {backing}"
    owner = next((d for d in devices or () if backing.endswith(capture_suffix(d))), None)
    if owner is not None:
        return f"the capture loop of the entry for {owner} (on its capture file {backing})"
    owner = capture_owner(backing)  # (its name says it: no configuration needed)
    if devices is None:
        return (f"the capture loop of {f'the entry for {owner}' if owner else 'a block entry'} "
                f"(on its capture file {backing})")
    return (f"the capture loop of {owner or 'a block device'}, not configured here (on "
            f"{backing})")


OTHER_LOOP = "choose another loop or leave it empty for the first free one"


def plan_attach(entry: BlockEntry, view: View, *, captured: bool, force: bool = False,
                action: str = "attach", devices=None) -> AttachPlan:
    """`devices`: the configured ones (whose capture loop a busy loop is, named so).
    `captured`: the daemon attaches through capture (an idle plain loop of the entry is
    taken over, keeping its number); otherwise a plain loop straight on the device."""
    dev = entry.device
    plan = AttachPlan(entry)
    if not os.path.exists(dev):
        plan.result = Result(action, dev, Outcome.FAILED, f"{dev} does not exist; nothing was "
                             "changed", errno.ENOENT, REFUSED)
        return plan
    try:
        reason = blockdevs.exclusion_reason(dev, view.exclusions)
        busy = busy_reasons(dev, view)
        plain = matching_loop(entry, view)
        others = [s for s in view.loops_on(dev) if s is not plain]
        if captured and plain is not None and loop_use(plain.device, view) is not None:
            others.insert(0, plain)
            plain = None
        reach = [f"reachable without capture through {s.device} ({loop_use(s.device, view) or 'idle'})"
                 for s in others] if captured else []
    except MirrorError as exc:
        plan.result = Result.from_error(action, dev, exc)
        return plan
    except OSError as exc:
        plan.result = Result.from_error(action, dev, MirrorError.from_oserror("inspect", dev, exc))
        return plan
    if reason:
        plan.result = Result(action, dev, Outcome.FAILED,
                             f"{dev} is {reason}: it cannot be replicated", errno.EINVAL, REFUSED)
        return plan
    if not captured and plain is not None:
        note = ""
        if entry.loop and entry.loop != plain.device:
            note = f" (configured {entry.loop}; detach and attach again to move it)"
        plan.result = Result(action, dev, Outcome.UNCHANGED,
                             f"{dev} is already attached as {plain.device}{note}",
                             details={"loop": plain.device})
        return plan
    busy += reach
    if busy and not (force and not captured):
        plan.result = Result(action, dev, Outcome.FAILED,
                             f"{dev} is {', '.join(busy)}; writes there would bypass capture and "
                             "corrupt the target. Unmount or detach it first"
                             + ("" if captured else " (--force overrides)") + "; nothing was "
                             "changed", errno.EBUSY, REFUSED)
        return plan
    plan.forced_over = busy
    plan.take_over = plain if captured else None
    plan.want = entry.loop or (plain.device if plan.take_over else None)
    if plan.want:
        other = loopdev.status(plan.want)
        if other is not None and (plan.take_over is None or other.device != plan.take_over.device):
            plan.result = Result(action, dev, Outcome.FAILED, f"{plan.want} is busy: "
                                 f"{attached_to(other.backing_file, devices)} "
                                 f"({loop_use(other.device, view) or 'idle'}); {OTHER_LOOP}",
                                 errno.EBUSY, REFUSED)
    return plan


def describe(plan: AttachPlan, *, captured: bool, target: str | None) -> str:
    """What a dry run says."""
    e = plan.entry
    where = plan.want or "the first free loop device"
    how = f" through capture, replicated to {target}" if captured and target else \
        " through capture (no target)" if captured else ""
    return (f"would attach {e.device} to {where} at offset {e.offset}"
            + (f", size limit {e.sizelimit}" if e.sizelimit else "")
            + (", read-only" if e.read_only else "") + how
            + (f" (taking over {plan.take_over.device})" if plan.take_over else ""))


def kept_loops(entries, entry: BlockEntry) -> frozenset[int]:
    """The fixed loops (`loop = …`) of the entries other than `entry`: a first free loop is
    never one of them, or that entry's attach then finds its own loop taken by ours."""
    return frozenset(loopdev.parse_loop_path(e.loop) for e in entries
                     if e.loop and e.device != entry.device)


def attach_plain(plan: AttachPlan, *, action: str, uncaptured: bool, view: View | None = None,
                 avoid: frozenset[int] = frozenset()) -> Result:
    """Carry out a plain plan (the caller holds attach_lock); the new loop joins `view`.
    `avoid`: kept_loops()."""
    e = plan.entry
    try:
        st = loopdev.attach(e.device, loop=e.loop, offset=e.offset, sizelimit=e.sizelimit,
                            read_only=e.read_only, avoid=avoid)
    except MirrorError as exc:
        return Result.from_error(action, e.device, exc)
    if view is not None:
        view.note_attached(st)
    return Result(action, e.device, Outcome.OK, f"attached {e.device} as {st.device}"
                  + (" (forced over: " + ", ".join(plan.forced_over) + ")" if plan.forced_over else "")
                  + (UNCAPTURED if uncaptured else ""), details={"loop": st.device})


def detach_loop(loop: str, subject: str, view: View | None = None, *, dry_run: bool = False) -> Result:
    """Detach one loop; a mounted one is refused (nothing is unmounted), an open one is
    deferred by the kernel ("detach pending") and says who keeps it open."""
    view = view or View()
    try:
        where = view.mounted_on(loop)
    except OSError as exc:
        return Result.from_error("detach", subject, MirrorError.from_oserror("inspect", loop, exc))
    if where:
        return Result("detach", subject, Outcome.FAILED,
                      f"{loop} is mounted on {', '.join(where)}: unmount it first "
                      f"(nothing was unmounted)", errno.EBUSY, {"loop": loop, **REFUSED})
    if dry_run:
        return Result("detach", subject, Outcome.SKIPPED, f"would detach {loop}", details={"loop": loop})
    r = loopdev.detach(loop)
    if r.outcome is Outcome.PENDING:
        from app.services.status import openers_of
        who = ", ".join(f"pid {pid} ({comm})" for pid, comm in openers_of(loop)) or \
            "another mount namespace or the kernel"
        return Result("detach", subject, Outcome.PENDING, f"{loop}: detach pending: still open "
                      f"by {who}; the kernel detaches it at the last close",
                      details={"loop": loop})
    return Result("detach", subject, r.outcome, r.message, r.errno, {"loop": loop})


def plain_loops_of(entry: BlockEntry, view: View) -> list[str]:
    """The loops straight on the entry's device at its offset: what detaching it undoes."""
    return [f"/dev/loop{index}" for index, offset in view.offsets_on(entry.device)
            if offset == entry.offset]
