"""The daemon's block entries: a capture worker per attached entry, and its loop device.

The loop is attached with direct I/O onto the capture's FUSE file (itself direct_io): the loop
then keeps several asynchronous writes in flight instead of one synchronous write at a time
(bench/apps.py: 64 KiB random writes 290 -> 353 MB/s).

Attach (planned by services.blockplan, the same plan a plain attach uses): refuse a device that
is mounted, held, captured or reachable through another loop, naming who; take over an idle
plain loop of the entry (attached while the daemon was down) keeping its number; start the
worker (raw device held O_EXCL, private FUSE file), then attach the configured or first free
loop to the worker's file. Detach never unmounts anything: a mounted loop is reported, an open
one is a deferred detach ("detach pending", naming who keeps it open) finished in the
background at the last close; only then is the FUSE mount lifted and the worker stopped (its
journal drained and the end marked). A worker whose FUSE mount lives on in another mount
namespace is ended there too, and who kept it is said.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os

import trio

from app.engine.supervisor import Captured, Supervisor, forced_end, gather, running_entry, spawn
from app.services import blockplan, mounts
from app.services import loop as loopdev
from app.services.blockplan import View
from app.services.config import BlockEntry
from app.services.layout import CAPTURE_FILE, remove_run_dir
from app.services.results import MirrorError, Outcome, Result

log = logging.getLogger("mirrorsetup.block")
PENDING_POLL_SECONDS = 1.0  # only while a deferred detach waits for the last close
UMOUNT_TRIES = 50  # the loop lets go of its file a moment after LOOP_CLR_FD returns


class BlockCaptures:
    def __init__(self, sup: Supervisor, devices=lambda: ()):
        self.sup = sup
        self.devices = devices  # () -> the configured entries' devices (whose a dead mount was)
        # Loops left on a dead capture because something still used them (a mounted file
        # system): loop -> {key, identity: which binding (loopdev.binding)}. Their detach is deferred to the
        # kernel (autoclear: at the last close); until then status says so, as an error.
        self.dead: dict[str, dict] = {}

    def file(self, device: str) -> str:
        return self.sup.layout.capture_file(device)

    def get(self, device: str) -> Captured | None:
        return self.sup.get("block", device)

    def _loop_of(self, device: str) -> str | None:
        f = self.file(device)
        return next((s.device for s in loopdev.list_attached() if s.backing_file == f), None)

    # -- attach -----------------------------------------------------------------------------
    async def attach(self, entry: BlockEntry, *, dry_run: bool = False, action: str = "attach") -> Result:
        dev = entry.device
        async with self.sup.lock("block", dev):
            cap = self.get(dev)
            if cap is not None:
                return Result(action, dev, Outcome.UNCHANGED, f"{dev} is already attached as "
                              f"{cap.loop} (captured)", details={"loop": cap.loop, "captured": True})
            from app.engine.failover import refusal
            refused = refusal(self.sup.layout, "block", dev, action)
            if refused is not None:
                return refused
            if not dry_run:
                await self.clean_dead(dev)
            try:  # a loop another entry captures through is named by that entry
                devices = list(self.devices())
            except MirrorError:
                devices = None  # (not known: not said to be configured or not)
            async with host_attach_lock():
                plan = await trio.to_thread.run_sync(lambda: blockplan.plan_attach(
                    entry, View(), captured=True, action=action, devices=devices))
                if plan.result is not None:
                    return plan.result
                if dry_run:
                    return Result(action, dev, Outcome.SKIPPED,
                                  blockplan.describe(plan, captured=True, target=entry.target))
                try:  # its target resolved before anything is done (a [[target]] not configured)
                    spec = self.sup.spec("block", dev, entry, offset=entry.offset,
                                         sizelimit=entry.sizelimit, read_only=entry.read_only)
                except MirrorError as exc:
                    return Result.from_error(action, dev, exc)
                if plan.take_over is not None:  # idle and uncaptured: its number goes to capture
                    r = loopdev.detach(plan.take_over.device)
                    if r.outcome is not Outcome.OK:
                        return Result(action, dev, Outcome.FAILED, f"could not take over "
                                      f"{plan.take_over.device}, attached without capture: "
                                      f"{r.message}", r.errno or errno.EBUSY)
                return await self._start(entry, plan, spec, action)

    async def _start(self, entry: BlockEntry, plan, spec, action: str) -> Result:
        dev = entry.device
        link, msg = await spawn(spec)
        if link is None:
            return self.sup.start_failed("block", dev, Result(
                action, dev, Outcome.FAILED, msg.get("message", "capture worker failed"),
                msg.get("errno")))
        cap = Captured("block", dev, entry, link)
        try:
            avoid = blockplan.kept_loops(self.sup.store.load().block, entry)
        except MirrorError:  # the file broke since the entry was read: no loop is kept then
            avoid = frozenset()
        try:
            try:
                st = await trio.to_thread.run_sync(lambda: loopdev.attach(
                    msg["file"], loop=plan.want, read_only=entry.read_only, direct_io=True,
                    avoid=avoid))
            except MirrorError as exc:
                if entry.loop or not plan.want or exc.errno != errno.EBUSY:
                    raise
                # the number came from a plain loop we took over; someone took it meanwhile
                st = await trio.to_thread.run_sync(lambda: loopdev.attach(
                    msg["file"], read_only=entry.read_only, direct_io=True, avoid=avoid))
        except MirrorError as exc:
            await self._stop_worker(cap)
            return self.sup.start_failed("block", dev, Result.from_error(action, dev, exc))
        cap.loop = st.device
        self.sup.register(cap)
        target = f" and replicated to {entry.target}" if entry.target else " (no target: captured only)"
        note = f"; catching up in the background ({msg.get('reason')})" if msg.get("reason") else ""
        return Result(action, dev, Outcome.OK, f"attached {dev} as {st.device}, captured{target}{note}",
                      details={"loop": st.device, "captured": True, "pid": link.pid})

    def adopted(self, link, entry: BlockEntry | None) -> Captured:
        """A worker left running by a previous daemon: record it (its loop is found by file)."""
        dev = link.info["key"]
        cap = Captured("block", dev, running_entry(entry, link.info), link, adopted=True)
        cap.loop = self._loop_of(dev)
        self.sup.register(cap)
        return cap

    async def attach_adopted_loop(self, cap: Captured) -> Result | None:
        """Its daemon died between the worker's start and the loop attach: attach it now."""
        if cap.loop is not None or cap.entry is None:
            return None
        try:
            st = await trio.to_thread.run_sync(lambda: loopdev.attach(
                cap.link.info["file"], loop=cap.entry.loop, read_only=cap.entry.read_only,
                direct_io=True))
        except MirrorError as exc:
            return Result.from_error("attach", cap.key, exc)
        cap.loop = st.device
        return None

    # -- detach -----------------------------------------------------------------------------
    async def detach(self, entry: BlockEntry, *, dry_run: bool = False) -> list[Result]:
        dev = entry.device
        async with self.sup.lock("block", dev):
            cap = self.get(dev)
            if cap is None:  # maybe a plain loop attached while the daemon was down
                view = View()
                found = blockplan.plain_loops_of(entry, view)
                if not found:
                    return [Result("detach", dev, Outcome.UNCHANGED, f"{dev} is not attached")]
                return [blockplan.detach_loop(loop, dev, view, dry_run=dry_run) for loop in found]
            return [await self._detach_captured(cap, dry_run=dry_run)]

    async def _detach_captured(self, cap: Captured, *, dry_run: bool = False) -> Result:
        dev, loop = cap.key, cap.loop
        if cap.pending:
            return Result("detach", dev, Outcome.PENDING, f"{loop}: detach pending (still open"
                          f"{': ' + '; '.join(cap.holders) if cap.holders else ''})",
                          details={"loop": loop})
        if loop is None:
            if dry_run:
                return Result("detach", dev, Outcome.SKIPPED, f"would stop capturing {dev}")
            note = await self._stop_worker(cap)
            return Result("detach", dev, Outcome.OK, f"capture of {dev} stopped (it had no loop)"
                          + (f"; {note}" if note else ""))
        r = await trio.to_thread.run_sync(lambda: blockplan.detach_loop(loop, dev, dry_run=dry_run))
        if r.outcome is Outcome.PENDING:
            cap.pending = True
            cap.holders = [r.message.split("still open by ", 1)[-1].split(";")[0]]
            if self.sup.nursery is not None:
                self.sup.nursery.start_soon(self._finish_pending, cap)
            return Result("detach", dev, Outcome.PENDING, f"{r.message}; capture goes on until "
                          "then", details={"loop": loop})
        if r.failed or r.outcome is Outcome.SKIPPED:
            return Result("detach", dev, r.outcome, r.message, r.errno, {**r.details, "loop": loop})
        note = await self._stop_worker(cap)
        return Result("detach", dev, Outcome.OK, f"detached {loop}; " + (
            forced_end(note, cap) if note else f"capture of {dev} ended, {cap.ended()}"),
            details={"loop": loop})

    async def _finish_pending(self, cap: Captured) -> None:
        f = self.file(cap.key)
        while cap.link.alive():
            s = loopdev.status(cap.loop)
            if s is None or s.backing_file != f:
                break
            await trio.sleep(PENDING_POLL_SECONDS)
        log.info("%s: deferred detach done; ending the capture of %s", cap.loop, cap.key)
        async with self.sup.lock("block", cap.key):
            await self._stop_worker(cap)

    async def _stop_worker(self, cap: Captured) -> str:
        """Lift the FUSE mount (the worker then drains, marks the end and exits); a copy of
        it in another mount namespace is ended too. Returns who kept it, or ""."""
        cap.ending = True
        mount_dir = os.path.dirname(self.file(cap.key))
        lifted = True
        for _ in range(UMOUNT_TRIES):
            try:
                mounts.umount(mount_dir, 0)
                break
            except MirrorError as exc:
                if exc.errno == errno.EINVAL:
                    break  # not mounted here (already lifted)
                if exc.errno != errno.EBUSY:
                    log.error("%s: %s", mount_dir, exc)
                    break
                await trio.sleep(0.1)
        else:
            log.error("%s still busy; lazy unmount", mount_dir)
            mounts.umount(mount_dir, mounts.MNT_DETACH)
            lifted = False
        note = await self.sup.stop(cap, lifted=lifted)
        remove_run_dir(mount_dir)  # the capture has ended: its mount point goes, when empty
        return note

    async def stop_all(self) -> list[Result]:
        """At daemon stop: detach what can be. A loop still mounted or open keeps its capture
        worker running (the next daemon takes it over), so its I/O does not fail."""
        async def end(cap: Captured) -> Result:
            async with self.sup.lock("block", cap.key):
                r = await self._detach_captured(cap)
            if r.failed or r.outcome is Outcome.PENDING:
                r = Result("detach", cap.key, Outcome.PENDING, f"{cap.loop} is still in use at daemon "
                           f"stop ({r.message}): its capture goes on in pid {cap.link.pid} and the "
                           "next daemon takes it over")
                cap.ending = True
                self.sup.captures.pop(("block", cap.key), None)
                await cap.link.close()
            return r
        # all at once: each may wait for its capture to ship its queue (up to 45 s)
        caps = [c for c in self.sup.captures.values() if c.kind == "block"]
        return await gather(*[lambda cap=cap: end(cap) for cap in caps])

    # -- failures ---------------------------------------------------------------------------
    async def clean_dead(self, device: str | None = None) -> list[Result]:
        """Detach loops on dead capture files of ours and lift the dead FUSE mounts. A loop
        still in use (a file system mounted on it) cannot go now: its detach is left to the
        kernel at its last close (autoclear), and until then it is remembered (`self.dead`):
        status names it as an error, for its I/O fails. Lifted lazily, its capture file's path
        no longer names it (sysfs then says `/disk`), so nothing else would."""
        out = []
        fsname = self.sup.layout.fsname("block")
        live = {os.path.dirname(self.file(c.key)) for c in self.sup.captures.values() if c.kind == "block"}
        for m in mounts.read_mountinfo():
            if m.source != fsname or m.mount_point in live or \
                    (device and m.mount_point != os.path.dirname(self.file(device))):
                continue
            if not await _is_dead(m.mount_point):
                continue
            key = device or next((d for d in self.devices()
                                  if os.path.dirname(self.file(d)) == m.mount_point), None)
            for s in loopdev.list_attached():
                if s.backing_file == os.path.join(m.mount_point, CAPTURE_FILE):
                    out.append(await trio.to_thread.run_sync(self._detach_dead, s.device, key))
            try:
                mounts.umount(m.mount_point, mounts.MNT_DETACH)
                out.append(Result("unmount", m.mount_point, Outcome.OK, "lazy unmount of a dead "
                                  "block capture of this installation"))
            except MirrorError as exc:
                out.append(Result.from_error("unmount", m.mount_point, exc))
        return out

    def _detach_dead(self, loop: str, key: str | None) -> Result:
        ident = loopdev.binding(loop)
        r = loopdev.detach(loop)  # not blockplan's, which refuses a mounted loop: this one is dead
        if r.outcome in (Outcome.OK, Outcome.UNCHANGED):
            return Result("detach", loop, Outcome.OK, f"{loop} served a capture whose worker is "
                          "gone: detached")
        if r.outcome is not Outcome.PENDING:
            return Result("detach", loop, Outcome.FAILED, f"{loop} served a capture whose worker "
                          f"is gone: {r.message}; its I/O fails until it is closed", errno.EIO)
        self.dead[loop] = {"key": key, "identity": ident}
        self._save_dead()
        return Result("detach", loop, Outcome.FAILED, f"{loop} served a capture whose worker is "
                      f"gone: {_dead_use(loop)}; its I/O fails (EIO) until then, and the kernel "
                      "detaches it at its last close", errno.EIO)

    def dead_loops(self) -> list[dict]:
        """The loops left on dead captures that are still there, and who uses them."""
        out = []
        for loop, d in list(self.dead.items()):
            if d["identity"] is None or loopdev.binding(loop) != d["identity"]:
                del self.dead[loop]  # detached at its last close (or the number bound anew)
                self._save_dead()
                continue
            out.append({"loop": loop, "key": d["key"], "use": _dead_use(loop)})
        return out

    def rebuild_dead(self) -> None:
        """At start: the loops a previous daemon left on dead captures, from its list (the dead
        mount was lifted, so nothing else names them), each kept only while the host still
        shows it so: the same binding (loopdev.binding), its detach deferred to its last close
        (autoclear), and on no live capture file of ours."""
        try:
            with open(self.sup.layout.dead_loops_file) as f:
                said = json.load(f)
        except (OSError, ValueError):
            said = {}
        live = self.sup.layout.run_dir.rstrip("/") + "/"
        for loop, d in (said.items() if isinstance(said, dict) else ()):
            try:
                ident = str(d["identity"])
                st = loopdev.status(loop)
            except (KeyError, TypeError, ValueError, MirrorError):
                continue
            if st is not None and st.autoclear and loopdev.binding(loop) == ident \
                    and not (st.backing_file or "").startswith(live):
                self.dead[loop] = {"key": d.get("key"), "identity": ident}
                log.error("%s: left on the dead capture of %s, still in use (%s)", loop,
                          d.get("key"), _dead_use(loop))
        self._save_dead()

    def _save_dead(self) -> None:
        """The list where a next daemon finds it (rebuild_dead); none when it is empty."""
        path = self.sup.layout.dead_loops_file
        try:
            if not self.dead:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                return
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({loop: {"key": d["key"], "identity": d["identity"]}
                           for loop, d in self.dead.items()}, f)
            os.replace(tmp, path)
        except OSError as exc:  # said; status still says them while this daemon runs
            log.error("%s: %s", path, exc)


def _dead_use(loop: str) -> str:
    """How a loop on a dead capture is in use, and what ends it."""
    try:
        use = blockplan.loop_use(loop, View(attached=[]))  # (the mount table is all it reads)
    except OSError:  # detached meanwhile
        return "gone"
    if use is None:
        return "still open: close it"
    return f"{use}: {'unmount' if use.startswith('mounted') else 'close'} it"


@contextlib.asynccontextmanager
async def host_attach_lock():
    """blockplan.attach_lock for the daemon: waited for in a thread, not on the event loop."""
    fd = os.open(blockplan.ATTACH_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        await trio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


async def _is_dead(path: str) -> bool:
    """statfs() in a thread with a deadline: a mount whose server is gone answers ENOTCONN (or
    hangs). Not stat(): the kernel may answer that from its attribute cache."""
    def probe() -> bool:
        try:
            os.statvfs(path)
            return False
        except OSError as exc:
            return exc.errno == errno.ENOTCONN
    with trio.move_on_after(2):
        return await trio.to_thread.run_sync(probe, abandon_on_cancel=True)
    return False
