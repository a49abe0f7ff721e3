"""`mirrorsetup daemon`: the long-running service behind mount-all, attach-all, status and mirrors.

Foreground, trio. On start: take over every capture worker a previous daemon left running
(their applications never noticed it was gone), end the ones whose entry was removed (or show
them as orphaned), mount every file-system entry and capture every block entry, then serve
the control socket. On SIGTERM/SIGINT or `shutdown`: end the captures nothing uses (drained,
end marked), leave the ones in use running for the next daemon (`shutdown` with
keep_captures leaves them all: a restart applications do not see), and exit.

Every request runs under the lock of the entry it touches; a request that fails is answered
with its error, the daemon never dies of a client. The config file is re-read by every request.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
import traceback

import trio

from app.engine import sync
from app.engine.blocksup import BlockCaptures
from app.engine.failover import REQUESTER, Failover, switched
from app.engine.failover import refusal as _refusal
from app.engine.supervisor import (Captured, Supervisor, close_zygote, gather, holders, lazy_state,
                                   mount_dev, running_entry)
from app.services import layout as layout_mod
from app.services import protocol
from app.services.blockplan import same_device
from app.services.config import BlockEntry, ConfigStore, FsEntry
from app.services.control import SOCKET_MODE, peer_pid
from app.services.socketpath import default_socket
from app.services.layout import Layout, local_time, with_failback
from app.services.protocol import TARGET_SETTINGS_AT_START, CaptureRow
from app.services.results import MirrorError, Outcome, Refusal, Result, refuses

# What a capture takes from its entry when it starts; a hand edit of these while it runs
# applies at its next start (Unmount all / Mount all, Detach all / Attach all).
SETTINGS_AT_START = {"fs": ("target", "replicate_atime", "queue_limit", "on_full"),
                     "block": ("target", "offset", "sizelimit", "read_only", "queue_limit",
                               "on_full")}
DETACHED_WAIT_SECONDS = 10  # at stop, lazily unmounted entries get this long to see files closed
log = logging.getLogger("mirrorsetup.daemon")


class Daemon:
    def __init__(self, config: str | None, socket_path: str, state_dir: str):
        from app.engine.target import host_id
        self.store = ConfigStore(config)
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.layout = Layout(os.path.dirname(socket_path), state_dir)
        self.sup = Supervisor(self.layout, host_id(), self.store)
        self.sup.on_death = self._on_death
        self.blk = BlockCaptures(self.sup, lambda: [e.device for e in self._blocks()])
        self.stopping = trio.Event()
        self.keep_captures = False
        self.commands = {
            "ping": self.cmd_ping, "status": self.cmd_status, "watch": self.cmd_watch,
            "shutdown": self.cmd_shutdown, "reload": self.cmd_reload,
            "mount_all": self.cmd_mount_all, "unmount_all": self.cmd_unmount_all,
            "mount": self.cmd_mount, "unmount": self.cmd_unmount,
            "mirror": self.cmd_mirror, "verify": self.cmd_verify,
            "block_attach_all": self.cmd_block_attach_all, "block_detach_all": self.cmd_block_detach_all,
            "block_attach": self.cmd_block_attach, "block_detach": self.cmd_block_detach,
            "block_mirror": self.cmd_block_mirror, "block_verify": self.cmd_block_verify,
            "capture_end": self.cmd_capture_end, "target_settings": self.cmd_target_settings,
            "switchover": self.cmd_switchover, "failback": self.cmd_failback,
            "resolve": self.cmd_resolve, "end_handover": self.cmd_end_handover,
        }
        self.failover = Failover(self)
        assert set(self.commands) == set(protocol.COMMANDS), "the command table and the protocol differ"

    # -- configuration ----------------------------------------------------------------------
    def _entries(self) -> tuple[FsEntry, ...]:
        return self.store.load().filesystem

    def _named(self, path: str) -> FsEntry | None:
        """The file-system entry `path` names: as given first, resolved only if none is
        (realpath lstat's the path, in the event loop: a capture that does not answer hung
        the whole daemon on its mount point)."""
        entries = self._entries()
        for e in entries:
            if e.path == path:
                return e
        real = os.path.realpath(path) if path else path
        return next((e for e in entries if e.path == real), None)

    def _entry(self, path: str) -> FsEntry:
        e = self._named(path)
        if e is not None:
            return e
        raise MirrorError(f"{path} is not a configured file-system entry", errno=errno.ENOENT, obj=path)

    def _blocks(self) -> tuple[BlockEntry, ...]:
        return self.store.load().block

    def _configured(self, config=None) -> set[tuple[str, str]]:
        """(kind, key) of every configured entry: a capture of none of them is an orphan."""
        config = config or self.store.load()
        return {("fs", e.path) for e in config.filesystem} | {("block", e.device) for e in config.block}

    def _block(self, device: str) -> BlockEntry:
        for e in self._blocks():
            if e.device == device or same_device(e.device, device):
                return e
        raise MirrorError(f"{device} is not a configured block device", errno=errno.ENOENT, obj=device)

    def _any(self, entry: str):
        """(kind, key, entry) of a file-system entry's path or a block entry's device."""
        e = self._named(entry)
        if e is not None:
            return "fs", e.path, e
        for e in self._blocks():
            if e.device == entry or same_device(e.device, entry):
                return "block", e.device, e
        raise MirrorError(f"{entry} is neither a configured file-system entry nor a configured "
                          "block device", errno=errno.ENOENT, obj=entry)

    # -- commands ---------------------------------------------------------------------------
    async def cmd_ping(self, send):
        return {"pid": os.getpid(), "version": protocol.VERSION,
                "config": os.path.realpath(self.store.path), "state_dir": self.state_dir,
                "socket": self.socket_path,
                **({"stopping": self.sup.waits_now()} if self.stopping.is_set() else {})}

    async def cmd_status(self, send):
        config = self.store.load()
        # every worker asked at once (one after another, N that did not answer took N x 10 s)
        configured = self._configured(config)
        lost = [cap for cap in self.sup.captures.values() if (cap.kind, cap.key) not in configured]
        rows = await gather(*[lambda e=e: self._fs_row(e, config) for e in config.filesystem],
                            *[lambda e=e: self._block_row(e, config) for e in config.block],
                            lambda: self.sup.figures_of(lost))
        fs_rows, block_rows = rows[:len(config.filesystem)], rows[len(config.filesystem):-1]
        orphans = []
        for cap, figures in zip(lost, rows[-1]):
            row = CaptureRow(cap.kind, cap.key, captured=True, state="orphaned",
                             worker_pid=cap.link.pid, loop=cap.loop, holders=cap.holders)
            row.update(figures)
            row.state = "orphaned"
            row.last_error = ("its entry is no longer configured; end it with "
                              f"{layout_mod.command('capture', 'end', layout_mod.entry_id(cap.key))}")
            orphans.append(row.to_json())
        return {"pid": os.getpid(), "socket": self.socket_path, "state_dir": self.state_dir,
                "filesystem": [r.to_json() for r in fs_rows], "block": [r.to_json() for r in block_rows],
                "orphans": orphans, "pids": sorted({os.getpid()} | self.sup.pids()),
                "dead_loops": await trio.to_thread.run_sync(self.blk.dead_loops)}

    async def _fs_row(self, e: FsEntry, config) -> CaptureRow:
        cap = self.sup.get("fs", e.path)
        row = CaptureRow("fs", e.path, target=e.target, replicate_atime=e.replicate_atime,
                         mounted=mount_dev(e.path, self.layout.fsname("fs")) is not None,
                         nested_mounts=sync_nested(e.path))
        if cap is not None:
            row.captured = True
            row.update(await self.sup.figures(cap))
            row.worker_pid = cap.link.pid
            _as_running(row, cap, e, config)
        elif (old := self.sup.detached_busy(e.path)) is not None:  # lazily unmounted: still serving
            row.captured = True
            row.update(await self.sup.figures(old))
            row.worker_pid, row.holders = old.link.pid, old.holders
            row.state = lazy_state(old.holders)
        else:
            row.state = "not captured"
            self._not_captured(row)
            self._switched(row)
        return row

    async def _block_row(self, e: BlockEntry, config) -> CaptureRow:
        cap = self.sup.get("block", e.device)
        row = CaptureRow("block", e.device, target=e.target, offset=e.offset)
        if cap is not None:
            row.captured = True
            row.loop, row.pending_detach, row.holders = cap.loop, cap.pending, cap.holders
            row.file = self.blk.file(e.device)
            row.update(await self.sup.figures(cap))
            row.worker_pid = cap.link.pid
            _as_running(row, cap, e, config)
        else:
            row.state = "not captured"
            self._not_captured(row)
            self._switched(row)
        return row

    def _not_captured(self, row: CaptureRow) -> None:
        """Why the entry is not captured (its newest failure) and the errno of a refused start;
        an identity refusal (EMEDIUMTYPE) accepted since (its record forgotten: accept-device,
        accept-filesystem, the TUI's n) says what captures it now instead."""
        key = (row.kind, row.key)
        row.last_error, row.last_errno = self.sup.lost.get(key), self.sup.refused.get(key)
        if row.last_errno == errno.EMEDIUMTYPE and \
                layout_mod.identity_record(self.layout.state(*key)) is None:
            what = layout_mod.IDENTITY_WORDS[row.kind][0]
            row.last_errno = None
            row.last_error = (f"its capture was refused: its {what} was not the one it was "
                              f"made for; that was accepted since, and "
                              f"{protocol.CAPTURE[row.kind]} captures it")

    def _switched(self, row: CaptureRow) -> None:
        state = self.layout.state(row.kind, row.key)
        lock = self.failover.locks.get((row.kind, row.key))  # held: a fail-back runs now
        sw = with_failback(switched(state), state, under_way=lock is not None and lock.locked())
        if sw is not None:  # (also a split brain's fail-back the daemon ended during)
            row.switched = sw
            row.state = ("fail-back interrupted" if sw.get("failback") == "interrupted" else
                         "switched over" if sw.get("state") == "switched" else
                         "switch-over interrupted")
            r = failover_refusal(self.layout, row.kind, row.key)
            row.last_error = r.message if r else None

    async def cmd_watch(self, send):
        """Held until the daemon stops: its end (or EOF, if we are killed) tells a console
        that the daemon is gone, without polling."""
        await self.stopping.wait()
        return {"stopping": True}

    async def cmd_shutdown(self, send, keep_captures=False):
        self.keep_captures = bool(keep_captures)
        self.stopping.set()
        how = "leaving every capture running for the next daemon" if keep_captures else \
            "ending the captures nothing uses"
        return {"results": [Result("shutdown", "daemon", Outcome.OK, f"stopping, {how}").to_json()]}

    async def cmd_mount_all(self, send, force=False):
        return _results([await self.sup.mount(e) for e in self._entries()])

    async def cmd_unmount_all(self, send, force=False):
        configured = [e.path for e in self._entries()]
        extra = [c.key for c in self.sup.captures.values() if c.kind == "fs" and c.key not in configured]

        async def work():
            return [await self.sup.unmount(p, bool(force)) for p in configured + extra]
        return _results(await self.sup.says_waits("fs", _saying(send), work))

    async def cmd_mount(self, send, path=""):
        return _results([await self.sup.mount(self._entry(path))])

    async def cmd_unmount(self, send, path="", force=False):
        return _results([await self.sup.unmount(self._entry(path).path, bool(force))])

    async def cmd_reload(self, send):
        wanted = {e.path for e in self._entries()}
        results = [await self.sup.unmount(c.key) for c in list(self.sup.captures.values())
                   if c.kind == "fs" and c.key not in wanted]
        results += [await self.sup.mount(e) for e in self._entries() if self.sup.get("fs", e.path) is None]
        return _results(results)

    async def cmd_capture_end(self, send, id=""):
        """End an orphaned capture: its entry was removed but something kept it running. The
        capture of an entry still configured is no orphan: ending it (lazily, files open) took
        the entry's capture away behind its back, so it is refused before anything is done."""
        for cap in list(self.sup.captures.values()):
            if layout_mod.entry_id(cap.key) == id or cap.key == id:
                if (cap.kind, cap.key) in self._configured():
                    fs = cap.kind == "fs"
                    raise MirrorError(
                        f"{cap.key} is a configured entry: its capture is not orphaned; "
                        f"{'unmount' if fs else 'detach'} it with "
                        f"{layout_mod.command('fs' if fs else 'block', 'unmount-all' if fs else 'detach-all')}"
                        f" or remove the entry with "
                        f"{layout_mod.command('fs' if fs else 'block', 'remove', cap.key)}",
                        errno=errno.EBUSY, obj=cap.key)
                return _results([await self._end_orphan(cap, force=True)])
        raise MirrorError(f"no capture {id!r} is running (see `mirrorsetup status`)", errno=errno.ENOENT, obj=id)

    async def cmd_target_settings(self, send, name=""):
        """`target set NAME` applied to the running captures that replicate to NAME (DRBD's
        `adjust`): rates at once, what ssh is started with by a new session, which resumes
        from the target's position. A capture busy with a mirror or verify is given
        ANSWER_SECONDS, then said pending: it takes them when it is done (_settings_call)."""
        return _results(await self._apply_target(name, self.store.load()))

    async def _apply_target(self, name: str, config, *, changed_only: bool = False) -> list[Result]:
        """`changed_only`: only the captures whose settings differ from the file's (the start's
        take-over asks no worker that has nothing to take)."""
        from app.services.protocol import CAPTURE_AGAIN
        from app.services.socketpath import ANSWER_SECONDS
        host = config.target_host(name)
        if host is None:
            raise MirrorError(f"no remote target named {name!r} is configured (mirrorsetup target "
                              "list)", errno=errno.ENOENT, obj=name)
        entries = {("fs", e.path): e for e in config.filesystem}
        entries.update({("block", e.device): e for e in config.block})
        results = []
        for cap in list(self.sup.captures.values()):
            spec = (cap.link.info.get("target") or {}).get("remote")
            configured = entries.get((cap.kind, cap.key))
            if not spec or spec.get("name") != name or cap.ending or configured is None:
                continue
            action = "apply target settings"
            if cap.entry is not None and cap.entry.target != configured.target:
                results.append(Result(action, cap.key, Outcome.UNCHANGED, f"its entry names "
                                      f"{configured.target} now: its capture takes that at its "
                                      f"next start ({CAPTURE_AGAIN[cap.kind]})"))
                continue
            if changed_only and not _target_not_applied(cap, configured, config):
                continue
            new = {**spec, **host.to_spec()}  # (asked even when nothing changed: it connects
            # now if it was waiting to try again, e.g. for a new key to be put on the target)
            # The call is the daemon's own task: one that waits for a mirror or verify to end
            # goes on after this answer (calls are served in order: the last settings win)
            answer: dict = {}
            done = trio.Event()
            self.sup.nursery.start_soon(self._settings_call, cap, name, new, answer, done)
            with trio.move_on_after(ANSWER_SECONDS):
                await done.wait()
            if not done.is_set():
                answer["late"] = True  # (the task logs its outcome itself)
                busy = f"busy with a {cap.link.busy}" if cap.link.busy else "not answering"
                results.append(Result(action, cap.key, Outcome.PENDING, f"its capture (pid "
                                      f"{cap.link.pid}) is {busy}: the settings are applied "
                                      "as soon as it is done (status says them not applied "
                                      f"until then; the daemon's log says when), or "
                                      f"{CAPTURE_AGAIN[cap.kind]}", errno=errno.EBUSY))
                continue
            if "error" in answer:  # its worker ended: its death is said in status
                results.append(Result.from_error(action, cap.key, answer["error"]))
                continue
            reply = answer["reply"]
            if not reply.get("ok"):
                results.append(Result(action, cap.key, Outcome.FAILED, reply.get("error", "?"),
                                      errno=reply.get("errno")))
                continue
            changed = ", ".join(reply.get("changed") or ())
            if not changed:
                was = reply.get("connection") or "connected"
                again = "" if was in ("connected", "local") else f"; it was {was}: it tries again now"
                results.append(Result(action, cap.key, Outcome.UNCHANGED,
                                      f"its capture uses the settings of {name} already{again}"))
                continue
            results.append(Result(action, cap.key, Outcome.OK, f"{changed} applied to its running "
                                  "capture" + (f": a new session to {name} takes them, resuming "
                                               "where the last one was" if reply.get("reconnect")
                                               else " (its session goes on)")))
        return results

    @staticmethod
    async def _settings_call(cap: Captured, name: str, new: dict, answer: dict,
                             done: trio.Event) -> None:
        """One `target_settings` call to a capture, as the daemon's task (see _apply_target):
        the reply in `answer`; recorded as the capture's settings when it took them; said in
        the log when nobody waited for it any more (`answer["late"]`)."""
        try:
            answer["reply"] = reply = await cap.link.call("target_settings", remote=new)
        except MirrorError as exc:
            answer["error"] = exc
            if answer.get("late"):
                log.error("%s: the settings of target %s were not applied: %s", cap.key, name, exc)
            return
        finally:
            done.set()
        if reply.get("ok"):
            cap.link.info["target"]["remote"] = new  # (status: nothing left not applied)
        if answer.get("late"):
            changed = ", ".join(reply.get("changed") or ()) or "nothing new"
            if reply.get("ok"):
                log.info("%s: the settings of target %s applied once its capture was free "
                         "(%s)", cap.key, name, changed)
            else:
                log.error("%s: the settings of target %s were not applied: %s", cap.key, name,
                          reply.get("error", "?"))

    async def cmd_switchover(self, send, entry=""):
        kind, key, e = self._any(entry)
        return _results(await self.failover.switchover(kind, key, e, send))

    async def cmd_failback(self, send, entry=""):
        kind, key, e = self._any(entry)
        return _results(await self.failover.failback(kind, key, e, send))

    async def cmd_resolve(self, send, entry="", discard_target=False):
        kind, key, e = self._any(entry)
        return _results(await self.failover.resolve(kind, key, e, bool(discard_target)))

    async def cmd_end_handover(self, send, entry=""):
        kind, key, e = self._any(entry)
        return _results(await self.failover.end_handover(kind, key, e))

    async def cmd_mirror(self, send, path=""):
        entry = self._entry(path)
        reply = await self._run_on_target("mirror", "fs", entry.path, entry, send)
        res = Result("mirror", entry.path, Outcome.OK, f"mirrored {reply['files']} files "
                     f"({reply['copied']} copied, {reply['bytes']} bytes, {reply['removed']} removed)")
        return {**reply, "results": [res.to_json()]}

    async def cmd_verify(self, send, path=""):
        entry = self._entry(path)
        reply = await self._run_on_target("verify", "fs", entry.path, entry, send)
        n = len(reply["differences"])
        res = Result("verify", entry.path, Outcome.OK if n == 0 else Outcome.FAILED,
                     "target matches" if n == 0 else f"{n} difference{'s' if n != 1 else ''}",
                     None if n == 0 else errno.EIO)
        return {**reply, "results": [res.to_json()]}

    async def cmd_block_attach_all(self, send, dry_run=False, force=False):
        results = [] if dry_run else await self.blk.clean_dead()
        for e in self._blocks():
            results.append(await self.blk.attach(e, dry_run=bool(dry_run)))
        return _results(results)

    async def cmd_block_detach_all(self, send, dry_run=False):
        configured = {e.device for e in self._blocks()}

        async def work():
            results = []
            for e in self._blocks():
                results += await self.blk.detach(e, dry_run=bool(dry_run))
            for cap in [c for c in self.sup.captures.values()
                        if c.kind == "block" and c.key not in configured]:
                results.append(await self._end_orphan(cap, force=False, dry_run=bool(dry_run)))
            return results
        return _results(await self.sup.says_waits("block", _saying(send), work))

    async def cmd_block_attach(self, send, device=""):
        return _results([await self.blk.attach(self._block(device))])

    async def cmd_block_detach(self, send, device=""):
        return _results(await self.blk.detach(self._block(device)))

    async def cmd_block_mirror(self, send, device=""):
        entry = self._block(device)
        reply = await self._run_on_target("mirror", "block", entry.device, entry, send)
        res = Result("mirror", entry.device, Outcome.OK, f"mirrored {reply['copied_bytes']} bytes "
                     f"({reply['differing']} of {reply['blocks']} blocks differed) from offset "
                     f"{entry.offset} to {entry.target}")
        return {**reply, "results": [res.to_json()]}

    async def cmd_block_verify(self, send, device=""):
        entry = self._block(device)
        reply = await self._run_on_target("verify", "block", entry.device, entry, send)
        n = reply["differing"]
        res = Result("verify", entry.device, Outcome.OK if n == 0 else Outcome.FAILED,
                     "target matches" if n == 0 else f"{n} of {reply['blocks']} blocks differ",
                     None if n == 0 else errno.EIO)
        return {**reply, "results": [res.to_json()]}

    async def _run_on_target(self, cmd: str, kind: str, key: str, entry, send) -> dict:
        """Mirror or verify: through the capture worker when there is one (it compares while
        capturing), else directly on the source (nothing writes through us then)."""
        if not entry.target:
            raise MirrorError(f"{key} has no target to {cmd}", errno=errno.EINVAL, obj=key)

        async def progress(p):
            await send(protocol.progress(**p))
        cap = self.sup.get(kind, key)
        if cap is not None:
            reply = await cap.link.call(cmd, progress=progress)
            if not reply.pop("ok", False):
                raise MirrorError(reply.get("error", f"{cmd} failed"), errno=reply.get("errno"))
            return reply
        async with self.sup.lock(kind, key):
            sw = switched(self.layout.state(kind, key))
            if sw is not None:  # its replica is primary there: compared (or written) from here
                # the agent took us for the old source coming back, and called it a split brain
                how = "was switched over" if sw.get("state") == "switched" else \
                    "has a switch-over that did not finish"
                raise Refusal(f"{key} {how} to {sw.get('target')} at "
                              f"{local_time(sw.get('time'))}: the replica there is primary "
                              f"now and newer than this side, so there is nothing to {cmd} "
                              f"against it; {layout_mod.command('failback', key, '--yes')} "
                              "brings it back (nothing was changed)", errno=errno.EREMOTE, obj=key)
            spec = self.sup.spec(kind, key, entry, offset=getattr(entry, "offset", 0),
                                 sizelimit=getattr(entry, "sizelimit", 0))
            token = trio.lowlevel.current_trio_token()
            return await trio.to_thread.run_sync(_offline, cmd, spec, token, send)

    # -- captures that outlive us, die, or lose their entry ---------------------------------
    async def _take_over(self) -> None:
        config = self.store.load()
        fs = {e.path: e for e in config.filesystem}
        blocks = {e.device: e for e in config.block}
        for kind, link in await self.sup.adopt_all():
            key = link.info.get("key")
            entry = (fs if kind == "fs" else blocks).get(key)
            if kind == "fs":
                cap = Captured("fs", key, running_entry(entry, link.info), link, adopted=True)
                self.sup.register(cap)
            else:
                cap = self.blk.adopted(link, entry)
                r = await self.blk.attach_adopted_loop(cap)
                if r is not None:
                    log.error("%s: %s", key, r.message)
            log.info("took over the running capture of %s (worker pid %s)%s", key, link.pid,
                     "" if entry else ": its entry is no longer configured")
            if entry is None:
                r = await self._end_orphan(cap, force=False)
                log.info("%s %s: %s", r.outcome.value, r.target, r.message)
        # `target set` while no daemon ran: the captures that went on take the settings now
        names = {((c.link.info.get("target") or {}).get("remote") or {}).get("name")
                 for c in self.sup.captures.values()}
        for name in sorted(n for n in names if n and config.target_host(n) is not None):
            try:
                applied = await self._apply_target(name, config, changed_only=True)
            except MirrorError as exc:  # a worker that ended meanwhile: its death is said
                log.error("apply the settings of target %s: %s", name, exc)
                continue
            for r in applied:
                if r.outcome is not Outcome.UNCHANGED:
                    log.info("%s %s: %s", r.outcome.value, r.target, r.message)

    def _remove_stale_run_dirs(self) -> None:
        """Run directories that captures which ended without their worker's last word left
        behind (a worker killed, an entry removed while no daemon ran): the empty ones of
        entries neither configured nor captured go (layout.remove_run_dir: rmdir only)."""
        wanted = {(c.kind, c.key) for c in self.sup.captures.values()} | self._configured()
        keep = {self.layout.run(kind, key) for kind, key in wanted}
        for kind in ("fs", "block"):
            base = os.path.join(self.layout.run_dir, kind)
            try:
                names = os.listdir(base)
            except OSError:
                continue
            for name in names:
                path = os.path.join(base, name)
                if layout_mod.is_entry_id(name) and path not in keep and not os.path.islink(path) \
                        and os.path.isdir(path) and layout_mod.remove_run_dir(path):
                    log.info("removed the run directory %s: its capture had ended", path)

    async def _end_orphan(self, cap: Captured, *, force: bool, dry_run: bool = False) -> Result:
        """A capture whose entry was removed: end it when nothing uses it (or `force`)."""
        if dry_run:
            return Result("end", cap.key, Outcome.SKIPPED, f"would end the orphaned capture of {cap.key}")
        if cap.kind == "fs":
            r = await self.sup.unmount(cap.key, force=force)
        else:
            async with self.sup.lock("block", cap.key):
                r = await self.blk._detach_captured(cap)
        if r.failed or r.outcome is Outcome.PENDING:
            return Result("end", cap.key, Outcome.FAILED, f"orphaned capture of {cap.key} (its entry "
                          f"was removed) kept running: {r.message}; end it with "
                          f"{layout_mod.command('capture', 'end', layout_mod.entry_id(cap.key))} once "
                          "that is resolved", r.errno or errno.EBUSY)
        return Result("end", cap.key, Outcome.OK, f"ended the orphaned capture of {cap.key}: {r.message}")

    async def _on_death(self, cap: Captured) -> None:
        """A worker died under its mount: capture again at once (a file-system entry's new
        worker mounts beneath the dead mount, so the path never shows the directory below)."""
        if cap.kind == "fs":
            entry = next((e for e in self._entries() if e.path == cap.key), None)
            if entry is not None:
                r = await self.sup.mount(entry)
                log.info("%s %s after its worker died: %s", r.outcome.value, r.target, r.message)
            return
        for r in await self.blk.clean_dead(cap.key):
            log.error("%s: %s", r.target, r.message)
        entry = next((e for e in self._blocks() if e.device == cap.key), None)
        if entry is not None and not any(s.backing_file and s.backing_file.startswith(
                os.path.dirname(self.blk.file(cap.key)) + "/") for s in _loops()):
            r = await self.blk.attach(entry)
            log.info("%s %s after its worker died: %s", r.outcome.value, r.target, r.message)

    # -- socket -----------------------------------------------------------------------------
    async def serve_client(self, stream: trio.SocketStream) -> None:
        lines = protocol.TrioLines(stream)
        REQUESTER.set(peer_pid(stream.socket))  # this client's task only (a contextvar)
        async with stream:
            while True:
                try:
                    msg = await lines.next()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                except protocol.ProtocolError as exc:
                    await self._send(lines, protocol.error(f"bad request: {exc}", errno.EINVAL))
                    return
                if msg is None:
                    return
                await self._send(lines, await self._answer(lines, msg))

    async def _answer(self, lines, msg: dict) -> dict:
        async def send(m: dict) -> None:
            await lines.send(m)
        try:
            cmd, args = protocol.check_request(msg, protocol.COMMANDS)
            return protocol.ok(**await self.commands[cmd](send, **args))
        except protocol.ProtocolError as exc:
            return protocol.error(f"bad request: {exc}", errno.EINVAL)
        except MirrorError as exc:  # a refusal changed nothing: the CLI exits 2 for it
            return protocol.error(str(exc), exc.errno, refused=refuses(exc))
        except OSError as exc:
            return protocol.error(str(MirrorError.from_oserror("daemon", "request", exc)), exc.errno)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return protocol.error("the client went away", errno.EPIPE)
        except Exception as exc:  # a bug: said to the client and logged, the daemon lives on
            log.error("request %s failed:\n%s", msg.get("cmd"), traceback.format_exc())
            return protocol.error(f"internal error in {msg.get('cmd')}: {type(exc).__name__}: {exc}",
                                  errno.EIO)

    @staticmethod
    async def _send(lines, reply: dict) -> None:
        try:
            await lines.send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def bind(self) -> socket.socket:
        """Root-only socket in a root-only directory; a live one is never taken, a stale socket
        is replaced, anything that is not a socket is refused."""
        parent = os.path.dirname(self.socket_path)
        # made root-only if missing; an existing one is only checked (root's, not writable by
        # others), never changed: --socket /run/x.sock must not make /run 0700 (the socket
        # itself is 0600)
        layout_mod.private_dir(parent, "run directory")
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise MirrorError(f"{self.socket_path} exists and is not a socket: refusing to "
                                  "replace it (remove it, or give another --socket)",
                                  errno=errno.EEXIST, obj=self.socket_path)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.socket_path)
                raise MirrorError(f"another mirrorsetup daemon is listening on {self.socket_path}",
                                  errno=errno.EADDRINUSE, obj=self.socket_path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.socket_path)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(self.socket_path)
        finally:
            os.umask(old)
        os.chmod(self.socket_path, SOCKET_MODE)
        sock.listen(64)
        return sock

    async def run(self) -> int:
        layout_mod.private_dir(self.state_dir, "state directory")
        sock = self.bind()
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        try:
            async with trio.open_nursery() as nursery:
                self.sup.nursery = nursery
                nursery.start_soon(self._signals)
                await self._take_over()
                await trio.to_thread.run_sync(self.blk.rebuild_dead)
                for r in await self.blk.clean_dead():
                    log.info("%s %s: %s", r.outcome.value, r.target, r.message)
                self._remove_stale_run_dirs()
                for kind, entries in (("fs", self._entries()), ("block", self._blocks())):
                    for e in entries:  # switched over: read-only here, even after a reboot
                        try:
                            await self.failover.refence(kind, e)
                        except (OSError, MirrorError) as exc:  # said; the daemon starts anyway
                            log.error("%s: could not make it read-only again: %s",
                                      getattr(e, "path", None) or e.device, exc)
                for e in self._entries():
                    r = await self.sup.mount(e)
                    log.info("%s %s: %s", r.outcome.value, r.target, r.message)
                for e in self._blocks():
                    r = await self.blk.attach(e)
                    log.info("%s %s: %s", r.outcome.value, r.target, r.message)
                nursery.start_soon(trio.serve_listeners, self.serve_client, [listener])
                print(f"mirrorsetup daemon ready on {self.socket_path}", flush=True)
                sd_notify(b"READY=1")
                await self.stopping.wait()
                sd_notify(b"STOPPING=1")
                await self._stop_captures()
                nursery.cancel_scope.cancel()
        finally:
            close_zygote()  # the template ends; the workers it forked go on
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        return 0

    async def _stop_captures(self) -> None:
        if self.keep_captures:
            for cap in list(self.sup.captures.values()):
                cap.ending = True
                await cap.link.close()
                log.info("%s: capture left running in pid %s for the next daemon", cap.key, cap.link.pid)
            return
        for r in await self.blk.stop_all():
            log.info("%s %s: %s", r.outcome.value, r.target, r.message)
        # every entry ended at once: each may wait for its capture to ship its queue (up to
        # 45 s); one after another, N of them took N times that (beyond systemd's stop timeout)
        await gather(*[lambda cap=cap: self._end_fs_capture(cap)
                       for cap in [c for c in self.sup.captures.values() if c.kind == "fs"]])
        with trio.move_on_after(DETACHED_WAIT_SECONDS):
            for c in self.sup.detached:
                await c.link.proc.wait()

    async def _end_fs_capture(self, cap: Captured) -> None:
        """At daemon stop: unmount and end it, unless files are open there (then it goes on
        and the next daemon takes it over)."""
        dev = mount_dev(cap.key, self.layout.fsname("fs"))
        busy = await trio.to_thread.run_sync(
            holders, cap.key, dev, {os.getpid()} | self.sup.pids()) if dev else []
        if busy:
            cap.ending = True
            await cap.link.close()
            names = ", ".join(f"pid {h['pid']} ({h['name']})" for h in busy)
            log.info("%s is in use by %s: its capture goes on in pid %s and the next daemon "
                     "takes it over", cap.key, names, cap.link.pid)
            return
        r = await self.sup.unmount(cap.key)
        log.info("%s %s: %s", r.outcome.value, r.target, r.message)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                self.stopping.set()
                return


def failover_refusal(layout, kind: str, key: str):
    return _refusal(layout, kind, key, "capture")


def _as_running(row: CaptureRow, cap: Captured, configured, config) -> None:
    """The row says what the running capture does: its entry as it was when it started
    (a target edited by hand meanwhile is not where its changes go), and what of the file
    it does not do yet (`not_applied`: {setting: [running, configured]}), its remote
    target's settings (`target set`) too."""
    running = cap.entry
    if running is None:
        return
    if running != configured:
        row.target = running.target
        if row.kind == "block":
            row.offset = running.offset
        row.not_applied = {name: [getattr(running, name), getattr(configured, name)]
                           for name in SETTINGS_AT_START[row.kind]
                           if getattr(running, name) != getattr(configured, name)}
    row.not_applied.update(_target_not_applied(cap, configured, config))


def _target_not_applied(cap: Captured, configured, config) -> dict[str, list]:
    """The remote target's settings the capture started with (its hello's spec) that its
    [[target]] no longer says: {setting: [running, configured]}, rates in bytes a second
    (None: no cap). Nothing for a capture that replicates elsewhere now (its target is
    said), nor for a worker of before (its hello named no target)."""
    spec = (cap.link.info.get("target") or {}).get("remote")
    if spec is None or cap.entry.target != configured.target:
        return {}
    host = config.target_host(spec.get("name"))
    if host is None:
        return {}
    now = host.to_spec()

    def value(d: dict, name: str):
        return (d.get(name) or None) if name.endswith("bandwidth") else d.get(name)
    return {name: [value(spec, name), value(now, name)] for name in TARGET_SETTINGS_AT_START
            if value(spec, name) != value(now, name)}


def sync_nested(path: str) -> list[str]:
    from app.engine.supervisor import nested_mounts
    return nested_mounts(path)


def _loops():
    from app.services import loop as loopdev
    return loopdev.list_attached()


def _results(results: list[Result]) -> dict:
    return {"results": [r.to_json() for r in results]}


def _saying(send):
    """A request's `send` for what its stops wait for (Supervisor.says_waits), as progress
    lines {"waiting": words}; a client that went away is not told, the work goes on."""
    async def say(words: str) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await send(protocol.progress(waiting=words))
    return say


def _offline(cmd: str, spec, token, send) -> dict:
    """Mirror or verify an entry nobody captures now (in a thread): straight to the target."""
    from app.engine import blocksync
    from app.engine.capture import make_target

    def progress(p: dict) -> None:
        trio.from_thread.run(send, protocol.progress(**p), trio_token=token)
    if spec.kind == "fs":
        target = make_target(spec)
        target.open()
        src = os.open(spec.key, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if cmd == "verify":
                return {"differences": sync.compare_trees(sync.scan(src), target.scan(hashes=True))}
            return sync.Reconciler(src, target, sync.DirectSink(target), hashes=True,
                                   progress=progress).run() | _flushed(target)
        finally:
            os.close(src)
            target.close()
    src = os.open(spec.key, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end = os.lseek(src, 0, os.SEEK_END)
        size = spec.sizelimit or end - spec.offset
        if size <= 0 or spec.offset + size > end:  # never a part of it said "matches"
            empty = " (size 0: no medium, or a loop with nothing attached)" if end == 0 else ""
            limit = f" + size limit {spec.sizelimit}" if spec.sizelimit else ""
            raise MirrorError(f"{spec.key} ends at byte {end}{empty}, before the end of its "
                              f"window (offset {spec.offset}{limit}): nothing was "
                              f"{'compared' if cmd == 'verify' else 'copied'}",
                              errno=errno.EINVAL, obj=spec.key)
        target = make_target(spec, size)
        target.open()
        try:
            if cmd == "verify":
                return {"size": size, **blocksync.verify(src, spec.offset, size, target, progress=progress)}

            def commit(block, data, gen):
                target.apply_ops([("write", {"offset": block * sync.BLOCK}, data)])
                return True
            counts = blocksync.reconcile(src, spec.offset, size, target, commit, progress=progress)
            target.flush()
            return {"size": size, **counts, "ranges": []}
        finally:
            target.close()
    finally:
        os.close(src)


def _flushed(target) -> dict:
    target.flush()
    return {}


def sd_notify(state: bytes) -> None:
    """Tell systemd (Type=notify) we are ready: every entry is mounted and attached."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(addr)
            s.sendall(state)
        except OSError as exc:
            log.warning("sd_notify %s: %s", addr, exc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mirrorsetup daemon")
    p.add_argument("--socket", default=None, help="control socket (default $MIRRORSETUP_SOCKET or "
                   "/run/mirrorsetup/control.sock)")
    p.add_argument("--state-dir", default=None, help="journals and replication state (default "
                   "$MIRRORSETUP_STATE_DIR or /var/lib/mirrorsetup)")
    p.add_argument("--config", default=None)
    return run(p.parse_args(argv))


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="mirrorsetup %(levelname)s %(message)s")
    if os.geteuid() != 0:
        print("mirrorsetup daemon: must run as root (mount(2), allow_other)", file=sys.stderr)
        return 2
    daemon = Daemon(getattr(args, "config", None), args.socket or default_socket(),
                    args.state_dir or layout_mod.default_state_dir())
    try:
        daemon.store.load()  # a corrupt or unsafe configuration is refused before anything starts
        if not daemon.store.path.exists():  # a fresh installation, or a mistyped --config
            log.warning("configuration file %s does not exist: nothing is replicated until an "
                        "entry is added to it", daemon.store.path)
        return trio.run(daemon.run)
    except MirrorError as exc:
        print(f"mirrorsetup daemon: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
