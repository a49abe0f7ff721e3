"""The daemon's block entries: one capture worker per attached entry, and its loop device.

Attach: refuse a device that is mounted, held or already reachable through another loop (its
writes would bypass capture), convert an idle uncaptured loop of the entry (attached while the
daemon was down), spawn `python -m app.engine.blockworker` (exclusive open of the raw device,
resync, private FUSE mount under RUN/block/<id>/), then attach the configured or first free
loop to the worker's file. Detach: never unmount anything; a mounted loop is reported, an open
one is a deferred detach ("detach pending") finished in the background when it is closed, and
only then is the FUSE mount lifted and the worker stopped (its journal drained).

Take-over: a worker outlives a daemon that dies (or stops while its loop is still in use) and
waits on RUN/block/<id>.sock; the next daemon's attach connects there first and adopts it, so
the applications' I/O through the loop never stops.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from dataclasses import dataclass

import trio

from app.engine.supervisor import Worker, _is_stale, spawn
from app.services import blockdevs, mounts
from app.services import loop as loopdev
from app.services.config import BlockEntry
from app.services.replication import (CAPTURE_FILE, Replication, busy_reasons, capture_id,
                                      index_by_backing, is_capture_of, mounted_on)
from app.services.results import MirrorError, Outcome, Result
from app.services.status import openers_of

log = logging.getLogger("mirrorsetup.block")
FSTYPE = "fuse.mirrorblk"
PENDING_POLL_SECONDS = 1.0  # only while a deferred detach waits for the last close
UMOUNT_TRIES = 50  # the loop lets go of its file a moment after LOOP_CLR_FD returns


class AdoptedProcess:
    """A capture worker left by a previous daemon: not our child, watched through a pidfd.
    trio lets one task wait on an fd at a time: the others check back every 50 ms."""

    def __init__(self, pid: int):
        self.pid = pid
        self._fd = os.pidfd_open(pid)
        self._waiting = False
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._fd], [], [], 0)[0]:
            self.returncode = -1  # not our child: its exit status is not ours to read
        return self.returncode

    async def wait(self) -> int:
        while self.poll() is None:
            if self._waiting:
                await trio.sleep(0.05)
                continue
            self._waiting = True
            try:
                await trio.lowlevel.wait_readable(self._fd)
            finally:
                self._waiting = False
        return self.returncode


@dataclass
class Capture:
    entry: BlockEntry
    worker: Worker
    mount_dir: str
    loop: str | None = None
    pending: bool = False

    @property
    def file(self) -> str:
        return os.path.join(self.mount_dir, CAPTURE_FILE)


class BlockSupervisor:
    def __init__(self, state_dir: str, run_dir: str, replication: Replication):
        self.state_dir = state_dir
        self.block_dir = os.path.join(run_dir, "block")
        self.replication = replication  # plain (uncaptured) loops are detached its way
        self.captures: dict[str, Capture] = {}  # by configured device path
        self.nursery: trio.Nursery | None = None

    def mount_dir(self, device: str) -> str:
        return os.path.join(self.block_dir, capture_id(device))

    def adopt_path(self, device: str) -> str:
        return os.path.join(self.block_dir, capture_id(device) + ".sock")

    async def _adopt(self, entry: BlockEntry) -> Capture | None:
        """Take over a capture worker whose daemon died: it kept serving the loop meanwhile."""
        path = self.adopt_path(entry.device)
        if not os.path.exists(path):
            return None
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except OSError:
            sock.close()
            return None  # a dead worker's socket: the stale-capture cleanup takes it from here
        worker = Worker(entry, None, trio.SocketStream(sock), trio.Lock(), {}, label=entry.device)
        with trio.move_on_after(10):
            msg = await worker._line()
            if msg.get("event") == "ready" and msg.get("pid"):
                worker.proc = AdoptedProcess(msg["pid"])
                worker.info = msg
                cap = Capture(entry, worker, self.mount_dir(entry.device))
                cap.loop = next((s.device for s in loopdev.list_attached()
                                 if s.backing_file == cap.file), None)
                return cap
        await worker.stream.aclose()
        return None

    def pids(self) -> set[int]:
        return {c.worker.proc.pid for c in self.captures.values()}

    # -- attach -----------------------------------------------------------------------------
    async def attach(self, entry: BlockEntry, *, dry_run: bool = False, progress=None,
                     action: str = "attach") -> Result:
        dev = entry.device
        cap = self.captures.get(dev)
        if cap is not None and cap.worker.proc.returncode is None:
            return Result(action, dev, Outcome.UNCHANGED, f"{dev} is already attached as {cap.loop}"
                          " (captured)", details={"loop": cap.loop, "captured": True})
        if not os.path.exists(dev):
            return Result(action, dev, Outcome.FAILED, f"{dev} does not exist", errno.ENOENT)
        if not dry_run and (cap := await self._adopt(entry)) is not None:
            return await self._adopted(cap, action)
        await self.clean_stale(dev)
        try:
            refusal, plain = self._refusal(entry)
        except OSError as exc:
            return Result.from_error(action, dev, MirrorError.from_oserror("inspect", dev, exc))
        if refusal:
            return Result(action, dev, Outcome.FAILED, refusal, errno.EBUSY)
        want = entry.loop or (plain.device if plain else None)
        if want:
            other = loopdev.status(want)
            if other is not None and (plain is None or other.device != plain.device):
                return Result(action, dev, Outcome.FAILED, f"{want} is busy: attached to "
                              f"{other.backing_file}", errno.EBUSY)
        target = f" replicated to {entry.target}" if entry.target else " (no target: captured only)"
        if dry_run:
            return Result(action, dev, Outcome.SKIPPED, f"would attach {dev} to "
                          f"{want or 'the first free loop device'} through capture{target}")
        if plain is not None:  # idle and uncaptured: hand its number over to the captured loop
            r = loopdev.detach(plain.device)
            if r.outcome is not Outcome.OK:
                return Result(action, dev, Outcome.FAILED, f"could not take over {plain.device}, "
                              f"attached without capture: {r.message}", r.errno or errno.EBUSY)
        return await self._start(entry, want, progress, action, target)

    async def _adopted(self, cap: Capture, action: str) -> Result:
        dev = cap.entry.device
        if cap.loop is None:  # its daemon died between the worker's start and the loop attach
            try:
                cap.loop = (await trio.to_thread.run_sync(lambda: loopdev.attach(
                    cap.file, loop=cap.entry.loop, read_only=cap.entry.read_only))).device
            except MirrorError as exc:
                await self._stop_worker(cap)
                return Result.from_error(action, dev, exc)
        self.captures[dev] = cap
        if self.nursery is not None:
            self.nursery.start_soon(self._watch, cap)
        return Result(action, dev, Outcome.OK, f"took over the running capture of {dev} as {cap.loop} "
                      f"(worker pid {cap.worker.proc.pid}): its I/O went on while no daemon ran",
                      details={"loop": cap.loop, "captured": True, "adopted": True})

    def _refusal(self, entry: BlockEntry) -> tuple[str | None, loopdev.LoopStatus | None]:
        """Why `entry` cannot be captured now, and an idle uncaptured loop of it to take over."""
        dev = entry.device
        reason = blockdevs.exclusion_reason(dev)
        if reason:
            return f"refused: {dev} is {reason}; it cannot be replicated", None
        attached = loopdev.list_attached()  # read sysfs once for both questions
        busy = busy_reasons(dev, None, attached)
        plain = None
        for s in index_by_backing(attached).get((0, os.stat(dev).st_rdev), []):
            used = mounted_on(s.device)
            if s.offset == entry.offset and s.sizelimit == entry.sizelimit and not used \
                    and not openers_of(s.device):
                plain = s
            else:
                busy.append(f"reachable without capture through {s.device}"
                            + (f" (mounted on {', '.join(used)})" if used else " (in use)"))
        if busy:
            return (f"refused: {dev} is {', '.join(busy)}; writes there would bypass capture and "
                    "corrupt the target. Unmount or detach it first", None)
        return None, plain

    async def _start(self, entry: BlockEntry, want: str | None, progress, action: str,
                     target_note: str) -> Result:
        dev = entry.device
        mount_dir = self.mount_dir(dev)
        state = os.path.join(self.state_dir, "block", capture_id(dev))
        args = ["--device", dev, "--offset", str(entry.offset), "--sizelimit", str(entry.sizelimit),
                "--state", state, "--mount", mount_dir, "--adopt", self.adopt_path(dev)]
        if entry.target:
            args += ["--target", entry.target]
        if entry.read_only:
            args.append("--read-only")
        worker, msg = await spawn("app.engine.blockworker", args, entry, dev, progress)
        if msg.get("event") != "ready":
            return Result(action, dev, Outcome.FAILED, msg.get("message", "capture worker failed"),
                          msg.get("errno"))
        cap = Capture(entry, worker, mount_dir)
        try:
            try:
                st = await trio.to_thread.run_sync(lambda: loopdev.attach(
                    cap.file, loop=want, read_only=entry.read_only))
            except MirrorError as exc:
                if entry.loop or not want or exc.errno != errno.EBUSY:
                    raise
                # the number came from a plain loop we took over; someone took it meanwhile
                st = await trio.to_thread.run_sync(lambda: loopdev.attach(
                    cap.file, read_only=entry.read_only))
        except MirrorError as exc:
            await self._stop_worker(cap)
            return Result.from_error(action, dev, exc)
        cap.loop = st.device
        self.captures[dev] = cap
        if self.nursery is not None:
            self.nursery.start_soon(self._watch, cap)
        note = ""
        if msg.get("resync"):
            rs = msg["resync"]
            why = "first attach: copied" if msg.get("first") else "unclean previous stop: resync copied"
            note = f"; {why} {rs['copied_bytes']} bytes ({rs['differing']} of {rs['blocks']} blocks differed)"
        return Result(action, dev, Outcome.OK, f"attached {dev} as {st.device}, captured{target_note}"
                      f"{note}", details={"loop": st.device, "captured": True, "pid": worker.proc.pid})

    # -- detach -----------------------------------------------------------------------------
    async def detach(self, entry: BlockEntry, *, dry_run: bool = False) -> list[Result]:
        cap = self.captures.get(entry.device)
        if cap is None:  # maybe a plain loop attached while the daemon was down
            return self.replication._detach_entry(entry, dry_run=dry_run)
        dev, loop = entry.device, cap.loop
        if cap.pending:
            return [Result("detach", dev, Outcome.PENDING, f"{loop}: detach pending (still open)",
                           details={"loop": loop})]
        where = mounted_on(loop)
        if where:
            return [Result("detach", dev, Outcome.FAILED, f"{loop} is mounted on {', '.join(where)}: "
                           "unmount it first (nothing was unmounted)", errno.EBUSY, {"loop": loop})]
        if dry_run:
            return [Result("detach", dev, Outcome.SKIPPED, f"would detach {loop} and stop capturing {dev}",
                           details={"loop": loop})]
        r = await trio.to_thread.run_sync(loopdev.detach, loop)
        if r.outcome is Outcome.PENDING:
            cap.pending = True
            if self.nursery is not None:
                self.nursery.start_soon(self._finish_pending, cap)
            return [Result("detach", dev, Outcome.PENDING, f"{loop}: detach pending: still open, "
                           "capture goes on until it is closed", details={"loop": loop})]
        if r.failed:
            return [Result("detach", dev, r.outcome, r.message, r.errno, {"loop": loop})]
        await self._stop_worker(cap)
        return [Result("detach", dev, Outcome.OK, f"detached {loop}; capture of {dev} stopped, "
                       "journal drained to the target", details={"loop": loop})]

    async def _finish_pending(self, cap: Capture) -> None:
        while True:
            s = loopdev.status(cap.loop)
            if s is None or not is_capture_of(cap.entry.device, s.backing_file):
                break
            await trio.sleep(PENDING_POLL_SECONDS)
        log.info("%s: deferred detach done; stopping capture of %s", cap.loop, cap.entry.device)
        await self._stop_worker(cap)

    async def _stop_worker(self, cap: Capture) -> None:
        """Lift the FUSE mount (the worker then drains its journal and exits cleanly)."""
        if self.captures.get(cap.entry.device) is cap:
            del self.captures[cap.entry.device]
        for _ in range(UMOUNT_TRIES):
            try:
                mounts.umount(cap.mount_dir, 0)
                break
            except MirrorError as exc:
                if exc.errno != errno.EBUSY:
                    log.error("%s: %s", cap.mount_dir, exc)
                    break
                await trio.sleep(0.1)
        else:
            log.error("%s still busy; lazy unmount", cap.mount_dir)
            mounts.umount(cap.mount_dir, mounts.MNT_DETACH)
        with trio.move_on_after(60):
            await cap.worker.proc.wait()

    async def stop_all(self) -> list[Result]:
        """At daemon stop: detach what can be. A loop still mounted or open keeps its capture
        worker running (the next daemon takes it over), so its I/O does not fail."""
        results = []
        for cap in list(self.captures.values()):
            rs = await self.detach(cap.entry)
            if any(r.failed for r in rs) or any(r.outcome is Outcome.PENDING for r in rs):
                results.append(Result("detach", cap.entry.device, Outcome.PENDING,
                                      f"{cap.loop} is still in use at daemon stop: its capture goes "
                                      f"on in pid {cap.worker.proc.pid} and the next daemon takes it "
                                      "over"))
                self.captures.pop(cap.entry.device, None)
            results += rs
        return results

    # -- failures ---------------------------------------------------------------------------
    async def _watch(self, cap: Capture) -> None:
        status = await cap.worker.proc.wait()
        if self.captures.get(cap.entry.device) is cap:
            del self.captures[cap.entry.device]
            log.error("capture of %s stopped unexpectedly (worker exit status %s); %s now fails "
                      "I/O", cap.entry.device, status, cap.loop)
            for r in await self.clean_stale(cap.entry.device):
                log.error("%s: %s", r.target, r.message)

    async def clean_stale(self, device: str | None = None) -> list[Result]:
        """Detach loops on dead capture files (a killed daemon's) and lift the dead mounts."""
        out = []
        live = {c.mount_dir for c in self.captures.values()}
        for m in mounts.read_mountinfo():
            if m.fstype != FSTYPE or m.mount_point in live or not m.mount_point.startswith(
                    self.block_dir + "/") or (device and m.mount_point != self.mount_dir(device)):
                continue
            if not await _is_stale(m.mount_point):
                continue
            for s in loopdev.list_attached():
                if s.backing_file and s.backing_file.startswith(m.mount_point + "/"):
                    where = mounted_on(s.device)
                    r = loopdev.detach(s.device)
                    msg = (f"{s.device} served a capture that died with its daemon: "
                           + ("detached" if r.outcome is Outcome.OK else
                              f"detach pending ({'mounted on ' + ', '.join(where) if where else 'open'}): "
                              "its I/O fails until it is unmounted/closed"))
                    out.append(Result("detach", s.device, r.outcome if not where else Outcome.FAILED,
                                      msg, None if r.outcome is Outcome.OK else errno.EIO))
            try:
                mounts.umount(m.mount_point, mounts.MNT_DETACH)
                out.append(Result("unmount", m.mount_point, Outcome.OK, "lazy unmount of a dead "
                                  "block capture left by a stopped daemon"))
            except MirrorError as exc:
                out.append(Result.from_error("unmount", m.mount_point, exc))
        return out

    # -- status -----------------------------------------------------------------------------
    async def status_row(self, entry: BlockEntry) -> dict:
        cap = self.captures.get(entry.device)
        row = {"device": entry.device, "offset": entry.offset, "target": entry.target,
               "captured": cap is not None, "loop": cap.loop if cap else None,
               "file": cap.file if cap else None, "pending_detach": bool(cap and cap.pending),
               "worker_pid": cap.worker.proc.pid if cap else None, "captured_ops": 0,
               "bytes_queued": 0, "lag_seconds": None}
        if cap is not None:
            try:
                st = await cap.worker.call("status")
                row.update({k: v for k, v in st.items() if k != "ok"})
            except (MirrorError, trio.BrokenResourceError) as exc:
                row["error"] = str(exc)
        return row
