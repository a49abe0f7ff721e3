"""Switch-over, fail-back and the end of a split brain: the source host's side (the daemon's).

A remote replica has a role on its host (app/engine/agent.py): secondary (the source writes
it) or primary (promoted: in use there, in a generation of its own, so the old source can
never write to it again by accident). On this side an entry handed over to its replica has a
`switched` marker in its state directory; while it is there the entry is not captured (mount
and attach are refused: capturing here again would fork the history).

- switchover: nothing may use the entry; the worker drains (the target has applied every
  record), capture is lifted (the end marker says drained at seq N), the agent applies what
  it holds and promotes. Any failure before the promotion captures again: nothing is lost.
- failback: the promoted replica comes back, only what differs (the agent compares it with
  this host's data through questions we answer, and sends the differing blocks or files);
  then the replica is this entry's secondary again in a new generation, and capture starts.
  Applications on the target must have stopped using the replica (the agent refuses and
  names them otherwise). Records captured here that never reached the replica are dropped:
  the promoted replica wins, as the administrator chose.
- resolve --discard-target: the source wins; the replica's promotion is discarded and the
  capture catches up with it (only differences are sent).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import json
import logging
import os
import time
import uuid
from pathlib import Path

import trio

from app.engine.journal import KIND_BLOCK, KIND_FS, Journal, read_small_file, write_small_file
from app.engine.shipper import TargetUnavailable
from app.engine.supervisor import KEPT, holders, mount_dev
from app.services.layout import (FAILBACK_MARKER, SWITCHED_MARKER, capture_end, command, local_time,
                                  mix_words, switched_marker, switched_refusal, with_failback)
from app.services.protocol import CAPTURE_AGAIN, replicating
from app.services.results import MirrorError, Outcome, Refusal, Result

log = logging.getLogger("mirrorsetup.failover")
SWITCHED = SWITCHED_MARKER  # in an entry's state directory: handed over to its remote replica
FAILBACK = FAILBACK_MARKER  # a fail-back under way: the generation the replica is handed back in
# The pid of the process whose request the daemon serves (its control connection's peer),
# set per client task: a switch-over names the asking command itself among the holders.
REQUESTER: contextvars.ContextVar[int | None] = contextvars.ContextVar("requester", default=None)
DRAIN_SECONDS = 300  # a switch-over waits this long for the target to apply everything


# -- the marker ----------------------------------------------------------------------------------

def switched(state_dir: str) -> dict | None:
    return switched_marker(state_dir)


def _read_json(state_dir: str, name: str) -> dict | None:
    try:
        text = read_small_file(Path(state_dir), name)
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return {"state": "unreadable"}


def _mark(state_dir: str, info: dict) -> None:
    write_small_file(Path(state_dir), SWITCHED, json.dumps(info) + "\n")


def _mark_failback(state_dir: str, generation: str, target: str, applied: int | None = None) -> None:
    """The fail-back marker: the new history chosen, the target it comes from and, once one was
    interrupted, how many of the replica's records were written here (status: "a mix")."""
    info = {"generation": generation, "target": target}
    if applied is not None:
        info["applied"] = applied
    write_small_file(Path(state_dir), FAILBACK, json.dumps(info) + "\n")


def _forget_failback(state_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(state_dir) / FAILBACK)


def _unmark(state_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(state_dir) / SWITCHED)


_when = local_time


def refusal(layout, kind: str, key: str, action: str) -> Result | None:
    """Capture of an entry handed over to its replica is refused, with what to do."""
    state = layout.state(kind, key)
    return switched_refusal(with_failback(switched(state), state), key, action)


# -- the fence: this side is read-only while its replica is primary ------------------------------
# After a switch-over, anything written here would be overwritten by the fail-back: a directory
# gets a read-only bind mount of itself over it, a whole block device the kernel's read-only
# flag (BLKROSET, as `blockdev --setro`; writers, even those already open, get EPERM/EROFS).
# The marker records what was done, so only that is undone (a device read-only before stays so).


def _top_mount_id(path: str) -> int | None:
    from app.services import mounts
    ids = [m.mount_id for m in mounts.read_mountinfo() if m.mount_point == path]
    return ids[-1] if ids else None  # the last one listed at a path is the one on top


def _read_only_self_bind(path: str) -> int | None:
    """The mount id of the mount on top at `path` when it is a read-only bind of `path` onto
    itself (what fence() makes), else None. Told by what it is, not by the id kept in the
    marker alone: ids are reused (after a reboot, or by any other mount meanwhile), so an id
    could name another mount, and a fence whose id was not kept would be stacked on."""
    from app.services import mounts
    table = mounts.read_mountinfo()
    at = [m for m in table if m.mount_point == path]
    if not at:
        return None
    top = at[-1]  # the last one listed at a path is the one on top
    below = next((m for m in table if m.mount_id == top.parent_id), None)
    if below is None or "ro" not in top.options.split(","):
        return None
    inside = os.path.normpath(os.path.join(below.root, os.path.relpath(path, below.mount_point)))
    same = (top.major, top.minor) == (below.major, below.minor) and top.root == inside
    return top.mount_id if same else None


def _set_ro(device: str, ro: bool) -> bool:
    """Set the device's read-only flag; returns what it was."""
    import ctypes
    import fcntl

    from app.services._ioctl import BLKROGET, BLKROSET
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        was = ctypes.c_int(0)
        fcntl.ioctl(fd, BLKROGET, was)
        fcntl.ioctl(fd, BLKROSET, ctypes.c_int(1 if ro else 0))
        return bool(was.value)
    finally:
        os.close(fd)


def fence(kind: str, key: str, entry) -> dict:
    """Make this side read-only (after a promotion); what to put in the marker. Errors are
    reported, not raised: the switch-over itself is done."""
    from app.services import mounts
    try:
        if kind == "fs":  # recursive: file systems mounted below the entry stay in view (and rw)
            there = _read_only_self_bind(key)
            if there is not None:  # fenced already (its marker lost or stale): not a second one
                return {"read_only_mount": there}
            mounts.mount(key, key, None, mounts.MS_BIND | mounts.MS_REC)
            try:
                mounts.mount(None, key, None, mounts.MS_BIND | mounts.MS_REMOUNT | mounts.MS_RDONLY)
            except MirrorError:
                mounts.umount(key, mounts.MNT_DETACH)
                raise
            return {"read_only_mount": _top_mount_id(key)}
        if entry.offset or entry.sizelimit:
            return {"unfenced": "the entry is a window of the device: the rest is not ours to "
                                "make read-only"}
        return {"read_only_device": True, "was_read_only": _set_ro(entry.device, True)}
    except (OSError, MirrorError) as exc:
        log.error("%s: could not make it read-only after the switch-over: %s", key, exc)
        return {"unfenced": str(exc)}


def fenced(kind: str, key: str, entry, info: dict) -> bool:
    """Is what fence() did still in place (a reboot ends both kinds)?"""
    if kind == "fs":
        return info.get("read_only_mount") is not None and _read_only_self_bind(key) is not None
    try:
        rdev = os.stat(entry.device).st_rdev
        with open(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/ro") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def unfence(kind: str, key: str, entry, info: dict) -> None:
    """Undo what fence() did (before data comes back or capture starts again)."""
    from app.services import mounts
    if kind == "fs" and info.get("read_only_mount") is not None:
        for _ in range(8):  # with what is mounted below it (users were refused); one fence
            if _read_only_self_bind(key) is None:  # stacked by an older version lifted too
                break
            mounts.umount(key, mounts.MNT_DETACH)
    if kind == "block" and info.get("read_only_device") and not info.get("was_read_only"):
        try:
            _set_ro(entry.device, False)
        except OSError as exc:
            raise MirrorError.from_oserror("make writable again", entry.device, exc) from None


# -- helpers ---------------------------------------------------------------------------------------

def window_size(entry) -> int:
    """A block entry's window: from its offset, at most its size limit."""
    fd = os.open(entry.device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    left = max(0, end - entry.offset)
    return min(entry.sizelimit, left) if entry.sizelimit else left


def _use_there(kind: str, spec, host: str) -> str:
    """A switch-over's next step on the target host: where the promoted replica is, and the
    command that makes it usable there (helper-25's walk: a block replica needs a loop, and
    the switch-over said nothing of how)."""
    remote = (spec.target or {}).get("remote") or {}
    root, rel = remote.get("root"), remote.get("path")
    if not root or not rel:
        return ""
    if kind == "fs":
        return f"; on {host} its data is at {os.path.join(root, rel)}"
    return (f"; on {host} {command('replica', 'promote', rel, '--root', root)} attaches it to a "
            "loop device (with --mount DIR also mounts it)")


def _exc_error(exc: TargetUnavailable) -> int:
    return {"in-use": errno.EBUSY, "split-brain": errno.EEXIST, "not-ours": errno.EEXIST,
            "locked": errno.EBUSY, "incomplete": errno.EIO, "promoted": errno.EEXIST,
            "not-promoted": errno.EINVAL, "no-data": errno.ENOENT,
            }.get(getattr(exc, "code", None), errno.EHOSTUNREACH)


class Failover:
    """The daemon's switchover / failback / resolve commands (app/engine/daemon.py)."""

    def __init__(self, daemon):
        self.d = daemon
        self.sup = daemon.sup
        self.locks: dict[tuple[str, str], trio.Lock] = {}

    def _lock(self, kind: str, key: str) -> trio.Lock:
        return self.locks.setdefault((kind, key), trio.Lock())

    def _spec(self, kind: str, key: str, entry):
        spec = self.sup.spec(kind, key, entry, offset=getattr(entry, "offset", 0),
                             sizelimit=getattr(entry, "sizelimit", 0))
        if not spec.target or "remote" not in spec.target:
            where = entry.target or "no target"
            raise Refusal(f"{key} replicates to {where}, not to another host: there is no "
                          "replica that could take over", errno=errno.EINVAL, obj=key)
        return spec

    async def _size(self, kind: str, entry) -> int | None:
        return None if kind == "fs" else await trio.to_thread.run_sync(window_size, entry)

    async def _capture(self, kind: str, entry) -> Result:
        if kind == "fs":
            return await self.sup.mount(entry)
        return await self.d.blk.attach(entry)

    async def _lift(self, kind: str, key: str, entry, cap) -> Result:
        """End the capture (it drains and marks its end); refused when something uses it."""
        ours = {os.getpid()} | self.sup.pids()
        if kind == "fs":
            dev = mount_dev(key, self.sup.layout.fsname("fs"))
            held = await trio.to_thread.run_sync(holders, key, dev, ours) if dev else []
            if held:  # the asking command's own cwd or file blocks the unmount as any other's
                asker = REQUESTER.get()
                names = "; ".join(_own_hold(h, key) if h["pid"] == asker else
                                  f"pid {h['pid']} ({h['name']}) holds {h['file']}" for h in held)
                raise Refusal(f"{key} is in use: {names}: stop them first (nothing was changed)",
                              errno=errno.EBUSY, obj=key)
        elif cap.loop:
            from app.services.blockplan import View, loop_users
            users = await trio.to_thread.run_sync(lambda: loop_users(cap.loop, View(), exclude=ours))
            if users:
                raise Refusal(f"{key} is in use through {cap.loop}: {'; '.join(users)}: stop "
                              "them first (nothing was changed)", errno=errno.EBUSY, obj=key)
        if kind == "fs":
            r = await self.sup.unmount(key)
        else:
            r = (await self.d.blk.detach(entry))[0]
        if r.failed or r.outcome is Outcome.PENDING:
            raise MirrorError(f"{r.message} (capture goes on)", errno=r.errno or errno.EBUSY, obj=key)
        return r

    async def refence(self, kind: str, entry) -> None:
        """At the daemon's start: an entry switched over whose read-only fence is gone (a
        reboot, an unmount by hand) is fenced again."""
        key = entry.path if kind == "fs" else entry.device
        state = self.sup.layout.state(kind, key)  # any entry: most were never switched over
        sw = switched(state)
        if sw is None and (with_failback(None, state) or {}).get("failback") == "interrupted":
            # a split brain's fail-back this daemon's predecessor ended during (killed) left a
            # mix here: handed over and fenced, as its own error path would have done
            put = await _hand_over_the_mix(kind, key, entry, state)
            log.error("%s: a fail-back from %s was interrupted (the daemon ended during it): "
                      "this host's copy may be a mix of its own data and the replica's; it is "
                      "not captured and %s until %s finishes it", key, entry.target,
                      "is read-only here" if "unfenced" not in put else
                      f"could NOT be made read-only ({put['unfenced']})",
                      command("failback", key, "--yes"))
            return
        if not sw or "unfenced" in (sw.get("fence") or {}):
            return
        # (a switch-over whose promotion's answer was lost was fenced too: its replica may be
        # primary until the switch-over is run again)
        if sw.get("state") != "switched" and not (sw.get("state") == "switching" and sw.get("fence")):
            return
        info = sw.get("fence") or {}
        if info and await trio.to_thread.run_sync(fenced, kind, key, entry, info):
            return
        if kind == "block" and info.get("was_read_only") is not None:
            keep = info["was_read_only"]  # what it was before the first fence, not now
        else:
            keep = None
        new = await trio.to_thread.run_sync(fence, kind, key, entry)
        if keep is not None and "was_read_only" in new:
            new["was_read_only"] = keep
        _mark(state, {**sw, "fence": new})
        log.info("%s: switched over to %s: made read-only here again (%s)", key, sw.get("target"),
                 new.get("unfenced", "done"))

    # -- switch-over ----------------------------------------------------------------------------
    async def switchover(self, kind: str, key: str, entry, send) -> list[Result]:
        from app.engine.capture import make_target
        spec = self._spec(kind, key, entry)
        state = spec.state
        async with self._lock(kind, key):
            sw = switched(state)
            if sw is not None and sw.get("state") == "switched":
                raise Refusal(f"{key} was already switched over to {sw.get('target')} at "
                              f"{_when(sw.get('time'))}", errno=errno.EALREADY, obj=key)
            cap = self.sup.get(kind, key)
            if sw is None:
                if cap is None:
                    raise Refusal(f"{key} is not captured: mount or attach it first (its capture "
                                  "catches up with what changed meanwhile), then switch over",
                                  errno=errno.EINVAL, obj=key)
                if cap.entry is not None and cap.entry.target != entry.target:  # a hand edit
                    raise Refusal(f"{key}: its capture replicates to {cap.entry.target} (as the "
                                  f"entry was when it started), the configuration now says "
                                  f"{entry.target}: {CAPTURE_AGAIN[kind]} applies it, then "
                                  "switch over (nothing was changed)", errno=errno.EINVAL, obj=key)
                await send({"progress": {"stage": "draining"}})
                reply = await cap.link.call("drain", timeout=DRAIN_SECONDS)
                if not reply.get("ok"):
                    raise MirrorError(f"switch-over of {key} refused: {reply.get('error')} "
                                      "(nothing was changed)",
                                      errno=reply.get("errno") or errno.EAGAIN, obj=key)
                # an idle session says "connected" until its keep-alive misses: the target is
                # asked (read only) before the capture is lifted for a promotion it must take
                try:
                    await self._ask(spec, "probe", await self._size(kind, entry))
                except TargetUnavailable as exc:
                    if getattr(exc, "code", None) != "action":  # an agent too old to be asked
                        raise MirrorError(f"switch-over of {key} refused: cannot reach the target "
                                          f"({exc.state}) (nothing was changed)",
                                          errno=_exc_error(exc), obj=key) from None
                _mark(state, {"state": "switching", "time": time.time(), "target": entry.target})
                try:
                    await self._lift(kind, key, entry, cap)
                except BaseException:
                    _unmark(state)
                    raise
            elif cap is not None:
                raise MirrorError(f"{key} is captured although a switch-over was under way: run "
                                  "it again", errno=errno.EAGAIN, obj=key)
            end = capture_end(state) or {}
            if not end.get("drained"):
                _unmark(state)
                again = await self._capture(kind, entry)
                left = end.get("seq", 0) - end.get("released", 0)
                raise MirrorError(f"switch-over of {key} abandoned: the target did not receive every "
                                  f"record ({left} of seq {end.get('seq', '?')} not received); nothing "
                                  f"was promoted; {again.message}", errno=errno.EIO, obj=key)
            seq = int(end["seq"])
            await send({"progress": {"stage": "promoting", "seq": seq}})
            size = await self._size(kind, entry)
            marker = switched(state) or {}
            # a promotion asked for before (a lost answer, a crash meanwhile) may have happened
            asked_before = bool(marker.get("promote_sent"))
            if not asked_before:  # said before it is sent: a crash after it leaves it unknown
                marker = {**marker, "promote_sent": True}
                _mark(state, marker)

            def promote() -> dict:
                t = None
                try:
                    t = make_target(spec, size)
                    t.open("promote", last_seq=seq)
                    return t.welcome
                except TargetUnavailable as exc:
                    exc.sent = getattr(t, "request_sent", lambda: True)()
                    raise
                except (OSError, MirrorError) as exc:  # e.g. ssh could not be started: said
                    # as a session that failed (it left the marker with neither capture nor
                    # fence: what was written here meanwhile was lost at the fail-back)
                    failed = TargetUnavailable(f"the promotion failed: {exc}")
                    failed.sent = t is not None and getattr(t, "request_sent", lambda: True)()
                    raise failed from exc
                finally:
                    if t is not None:
                        t.close()
            try:
                welcome = await trio.to_thread.run_sync(promote)
            except TargetUnavailable as exc:
                code = getattr(exc, "code", None)
                if code != "promoted":
                    # not promoted: the agent refused it (it answered), or it was never asked
                    # (the session failed before the request was written); either only when no
                    # request before this one may have promoted it
                    if not asked_before and (code is not None or not getattr(exc, "sent", True)):
                        _unmark(state)
                        again = await self._capture(kind, entry)
                        raise MirrorError(f"switch-over of {key}: {exc.state}; nothing was "
                                          f"promoted; {again.message}", errno=_exc_error(exc),
                                          obj=key) from None
                    # unknown: the replica there may be primary now. Capturing (or writing)
                    # here could fork its history: the entry stays uncaptured and is fenced
                    if not marker.get("fence"):
                        marker = {**marker, "fence": await trio.to_thread.run_sync(
                            fence, kind, key, entry)}
                        _mark(state, marker)
                    ro = ("read-only here" if "unfenced" not in marker["fence"] else
                          f"NOT read-only here ({marker['fence']['unfenced']})")
                    why = (f"a promotion asked of {entry.target} before got no answer, and this "
                           f"one did not finish ({exc.state})" if asked_before else
                           f"the promotion was asked of {entry.target} but no answer came "
                           f"({exc.state})")
                    raise MirrorError(
                        f"switch-over of {key}: {why}: the replica there may be primary now. {key} "
                        f"is not captured and is {ro} until the switch-over finishes: run "
                        f"{command('switchover', key)} again to finish it (once {entry.target} "
                        f"is reachable), or keep this side with "
                        f"{command('replica', 'resolve', key, '--discard-target', '--yes')}",
                        errno=_exc_error(exc), obj=key) from None
                welcome = getattr(exc, "said", None) or {}  # an interrupted one had promoted it
            info = {"state": "switched", "time": time.time(), "seq": seq, "target": entry.target,
                    "generation": welcome.get("generation"), "host": welcome.get("host")}
            _mark(state, {**info, **({"fence": marker["fence"]} if marker.get("fence") else {})})
            fenced = await trio.to_thread.run_sync(fence, kind, key, entry)
            if "was_read_only" in (marker.get("fence") or {}) and "was_read_only" in fenced:
                fenced["was_read_only"] = marker["fence"]["was_read_only"]  # before our fence
            _mark(state, {**info, "fence": fenced})
            log.info("%s switched over to %s at seq %d", key, entry.target, seq)
            here = (f"{key} is read-only here until the fail-back (what is written here would be "
                    "overwritten by it)" if "unfenced" not in fenced else
                    f"{key} could NOT be made read-only here ({fenced['unfenced']}): what is "
                    "written here is overwritten by the fail-back")
            host = welcome.get("host", "the target")
            return [Result("switchover", key, Outcome.OK,
                           f"switched over to {entry.target} at seq {seq}: every record captured "
                           f"here was applied there, none lost; the replica on {host} is primary "
                           f"now (generation {welcome.get('generation', '?')}){_use_there(kind, spec, host)}; "
                           f"{key} is no longer captured here; "
                           f"{here}. {command('failback', key, '--yes')} brings the service back",
                           details={"seq": seq, "lost": 0, "generation": welcome.get("generation"),
                                    "host": welcome.get("host"), "fence": fenced})]

    # -- fail-back ------------------------------------------------------------------------------
    async def failback(self, kind: str, key: str, entry, send) -> list[Result]:
        spec = self._spec(kind, key, entry)
        state = spec.state
        results: list[Result] = []
        async with self._lock(kind, key):
            sw = switched(state) or {}
            cap = self.sup.get(kind, key)
            pending = _read_json(state, FAILBACK)
            if cap is not None and sw.get("state") != "switched":
                # capturing here: a capture its agent took is going on to a secondary (an agent
                # refuses to replicate to a promoted replica); that is never lifted for nothing.
                # Not connected, nobody knows yet: the agent is asked (read only) first.
                fig = await self.sup.figures(cap)
                if replicating(fig.get("connection"), fig.get("target_data")):
                    # a fail-back it records as under way never finished there: the replica
                    # replicates in this side's history (a finished one would refuse it)
                    _forget_failback(state)
                    return [_nothing_to_fail_back(
                        key, f"{key} was not switched over and its replica on {entry.target} is "
                        f"not promoted: its capture is connected to it (replication: "
                        f"{fig.get('replication', '?')}): there is nothing to fail back; nothing "
                        "was changed")]
                # not known yet, or a split brain (its replica may be in use there): ask first
                nothing = await self._promoted_there(kind, key, entry, spec, fig, pending)
                if nothing is not None:
                    return [nothing]
            elif cap is None and sw.get("state") == "switched":  # in use there: before unfencing
                await self._promoted_there(kind, key, entry, spec, {}, pending, switched_over=True)
            lifted = False
            if cap is not None:  # the split-brain case: capturing here, refused there
                results.append(await self._lift(kind, key, entry, cap))
                lifted = True
            size = await self._size(kind, entry)
            try:
                users = await trio.to_thread.run_sync(_local_users, kind, key, entry)
                if users:  # (a capture lifted for it is made again below, and says so)
                    put = sw.get("fence") or {}
                    kept = "" if lifted else ("; nothing was changed (it stays read-only here)"
                                              if put and "unfenced" not in put else
                                              "; nothing was changed")
                    # refused (exit 2) when nothing was changed; a capture lifted for it is
                    # made again below, which is a change: then it failed
                    raise (MirrorError if lifted else Refusal)(
                        f"{key} is in use here: {'; '.join(users)}: its data is about to be "
                        f"replaced by the promoted replica's; stop them first{kept}",
                        errno=errno.EBUSY, obj=key)
                if sw.get("fence"):  # the data comes back through the directory or device itself
                    await trio.to_thread.run_sync(unfence, kind, key, entry, sw["fence"])
                    _mark(state, {**sw, "fence": {}})
                back = await self._failback(kind, key, entry, send, spec, size)
                if back[0].outcome is Outcome.UNCHANGED:
                    if sw.get("state") == "switching" and not lifted:
                        # its promotion never happened: as a switch-over that failed before
                        # it, the entry is captured again (it was left writable, uncaptured
                        # and marked, the fence lifted, "nothing was changed")
                        _unmark(state)
                        return back + [await self._capture(kind, entry)]
                    if not lifted:
                        return back
                    # the replica was demoted meanwhile: nothing came back, the capture goes on
                    raise MirrorError(back[0].message, errno=errno.EINVAL, obj=key)
                results += back
                if lifted and KEPT in results[0].message and "records captured here that never " \
                        "reached the replica were dropped" in results[-1].message:  # not kept
                    results[0] = dataclasses.replace(results[0], message=results[0].message.replace(
                        KEPT, "were dropped by the fail-back (the promoted replica won)"))
            except BaseException as exc:
                if sw.get("fence") and switched(state) is not None:  # still primary there
                    fenced = await trio.to_thread.run_sync(fence, kind, key, entry)
                    _mark(state, {**sw, "fence": fenced})
                elif lifted and _mixed(state, exc):  # a mix here: neither history
                    fenced = await _hand_over_the_mix(kind, key, entry, state)
                    if isinstance(exc, MirrorError):
                        raise MirrorError(f"{exc.message}; {key} is not captured and "
                                          f"{'is read-only ' if 'unfenced' not in fenced else ''}"
                                          "here until then", errno=exc.errno, obj=key) from None
                elif lifted and isinstance(exc, MirrorError):  # nothing came back: capture goes on
                    again = await self._capture(kind, entry)
                    raise MirrorError(f"{exc.message}; {again.message}", errno=exc.errno,
                                      obj=key) from None
                raise
        results.append(await self._capture(kind, entry))
        return results

    @staticmethod
    async def _ask(spec, action: str, size: int | None) -> dict:
        """One session with the agent that only shakes hands for `action`: its WELCOME."""
        from app.engine.capture import make_target

        def once() -> dict:
            t = make_target(spec, size)
            try:
                t.open(action)
                return t.welcome
            finally:
                t.close()
        return await trio.to_thread.run_sync(once)

    async def _promoted_there(self, kind: str, key: str, entry, spec, fig: dict,
                              pending: dict | None, *, switched_over: bool = False
                              ) -> Result | None:
        """Before a capture that is not connected (yet) or in a split brain is lifted for a
        fail-back: the agent is asked, read only, whether the replica is promoted and who uses
        it. Refuses when it is in use there, or when the target cannot be reached (a fail-back
        could not either); when it is not promoted there is nothing to do (the UNCHANGED result
        returned). An agent too old to be asked leaves it to the fail-back itself (which
        re-mounts the capture on a refusal)."""
        from app.services.status import short_connection
        here = ("it stays read-only here" if switched_over else
                f"its capture goes on: {short_connection(fig.get('connection') or '?')}")
        try:
            said = await self._ask(spec, "probe", await self._size(kind, entry))
        except TargetUnavailable as exc:
            if getattr(exc, "code", None) == "action":
                return
            raise MirrorError(f"fail-back of {key}: {exc.state}; nothing was changed ({here})",
                              errno=_exc_error(exc), obj=key) from None
        if said.get("role") == "primary" and said.get("users"):  # the fail-back would be refused
            raise Refusal(f"fail-back of {key}: the promoted replica on {entry.target} is in use "
                          f"there: {'; '.join(said['users'])}: stop using it there first; "
                          f"nothing was changed ({here})", errno=errno.EBUSY, obj=key)
        if switched_over:  # the fail-back itself tells an interrupted one from a finished one
            return
        if said.get("role") != "primary":
            if pending is not None and said.get("generation") == pending.get("generation"):
                return  # an interrupted fail-back that finished there: the fail-back records it
            _forget_failback(spec.state)  # one that never got there
            return _nothing_to_fail_back(
                key, f"{key} was not switched over and its replica on {entry.target} is not "
                f"promoted (its capture is {fig.get('connection', '?')}): there is nothing to "
                "fail back; nothing was changed")
        return None

    async def _failback(self, kind: str, key: str, entry, send, spec, size) -> list[Result]:
        from app.engine.capture import check_identity, make_target, write_end
        from app.services.blockdevs import device_identity
        from app.engine.remote import receive_failback
        from app.engine.target import LocalBlockTarget, LocalDirTarget
        from app.services import mounts
        state = spec.state
        results: list[Result] = []
        if kind == "fs":
            try:  # nor into the directory below a file system that did not come up, nor onto
                # another one in its place (accept-filesystem says it is right)
                check_identity(state, "fs", key, mounts.tree_identity(key), failback=True)
            except OSError as exc:
                raise MirrorError(exc.strerror, errno=exc.errno, obj=key) from None
            fd = os.open(key, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            local = LocalDirTarget.on_fd(fd, key)
            if below := _other_file_systems_below(key):
                local.applier = _BesideOtherFileSystems(local.applier, key, below)
        else:
            try:
                fd = os.open(entry.device, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
            except OSError as exc:
                raise MirrorError.from_oserror("open (exclusive)", entry.device, exc) from None
            try:  # the replica's data never goes onto another disk that took the device's name
                check_identity(state, "block", entry.device, device_identity(fd), failback=True)
            except OSError as exc:
                os.close(fd)
                raise MirrorError(exc.strerror, errno=exc.errno, obj=entry.device) from None
            local = LocalBlockTarget.on_fd(fd, entry.device, size, entry.offset)
        journal = Journal(state, kind=KIND_FS if kind == "fs" else KIND_BLOCK)
        last = journal.last_seq
        unsent = last - journal.released_seq
        # the new history is chosen before and kept until it is ours: a fail-back that was
        # interrupted after the replica took it is finished by the next one
        pending = _read_json(state, FAILBACK)
        new_gen = (pending or {}).get("generation") or uuid.uuid4().hex
        # (its target too: a split brain's has no switch-over marker that names it)
        _mark_failback(state, new_gen, entry.target)
        await send({"progress": {"stage": "comparing"}})
        target = make_target(spec, size)  # says the old history, the one it was promoted from
        try:
            counts, at = await trio.to_thread.run_sync(lambda: receive_failback(
                target, local, new_generation=new_gen, last_seq=last))
            already = False
        except TargetUnavailable as exc:
            code = getattr(exc, "code", None)
            theirs = (getattr(exc, "said", None) or {}).get("generation", new_gen)
            if code != "not-promoted" or pending is None or theirs != new_gen:
                journal.close()
                if code is not None and (pending is None or code == "not-promoted"):
                    # refused before it began: the replica never took this generation
                    os.unlink(Path(state) / FAILBACK)
                if code == "not-promoted" and (switched(state) or {}).get("state") == "switching":
                    return [_nothing_to_fail_back(  # failback() captures it again
                        key, f"the switch-over of {key} that was interrupted had not promoted "
                        f"its replica on {entry.target} (it is still this entry's secondary): "
                        "there is nothing to fail back; the switch-over is abandoned")]
                if code == "not-promoted" and (switched(state) or {}).get("state") != "switched":
                    return [_nothing_to_fail_back(
                        key, f"{key} was not switched over and its replica on {entry.target} is "
                        "not promoted: there is nothing to fail back; nothing was changed "
                        f"({command('switchover', key)} hands the service over, "
                        f"{command('status')} shows the capture)")]
                msg = f"fail-back of {key}: {exc.state}"
                if (Path(state) / FAILBACK).exists():
                    # status says it: "fail-back interrupted", this host's copy a mix; 0 (this
                    # one and those before it wrote nothing here, e.g. its open failed: it is
                    # still this host's own, a resolve may keep it) is recorded too, unless one
                    # before it ended without saying (a crash)
                    before = 0 if pending is None else pending.get("applied")
                    now = getattr(exc, "applied", 0)
                    if now or before is not None:
                        _mark_failback(state, new_gen, entry.target, (before or 0) + now)
                if getattr(exc, "applied", 0):  # some of the replica's data was written here
                    msg += (f"; interrupted: this host's copy of {key} is a mix of its own data "
                            "and the replica's until a fail-back finishes; run "
                            f"{command('failback', key, '--yes')} again")
                raise MirrorError(msg, errno=_exc_error(exc), obj=key) from None
            counts, at, already = {}, last, True  # the interrupted fail-back had finished there
        finally:
            local.close()
        write_small_file(Path(state), "generation", new_gen + "\n")
        if at > last:  # a rebuilt source: its seqs go on above the replica's
            last = at
            journal.skip_to(last)
        journal.discard_through(last)
        journal.close()
        write_end(state, {"seq": last, "released": last, "drained": True, "time": time.time(),
                          "failback": True})
        # the switch-over marker goes first, the fail-back's last: a kill before the second
        # leaves the fail-back's ("fail-back interrupted", not captured), and the next one finds
        # the replica handed back in its generation and finishes. The other way round left
        # "switched over" alone, and the next fail-back failed (its replica not promoted)
        _unmark(state)
        os.unlink(Path(state) / FAILBACK)
        came = (f"{counts.get('data_bytes', 0)} bytes of data came back "
                f"({counts.get('sent_bytes', 0)} bytes on the wire)")
        what = (f"{counts.get('differing', 0)} of {counts.get('blocks', 0)} blocks differed"
                if kind == "block" else
                f"{counts.get('copied', 0)} of {counts.get('files', 0)} files differed, "
                f"{counts.get('removed', 0)} removed")
        msg = ("the replica had been handed back already" if already else
               f"failed back from {entry.target}: {what}, {came}")
        if unsent and not already:
            msg += (f"; {unsent} records captured here that never reached the replica were "
                    "dropped (the promoted replica won)")
        results.append(Result("failback", key, Outcome.OK, msg + f"; the replica is secondary "
                              f"again (generation {new_gen})",
                              details={**counts, "seq": last, "generation": new_gen,
                                       "dropped_records": unsent}))
        return results

    # -- split brain: the source wins -------------------------------------------------------------
    async def resolve(self, kind: str, key: str, entry, discard_target: bool) -> list[Result]:
        if not discard_target:
            raise Refusal(f"say which side wins: --discard-target keeps {key} as it is here and "
                          "re-mirrors the replica (only differences); "
                          f"{command('failback', key, '--yes')} keeps the promoted replica "
                          "instead", errno=errno.EINVAL, obj=key)
        spec = self._spec(kind, key, entry)
        async with self._lock(kind, key):
            sw = switched(spec.state) or {}
            mixed = _read_json(spec.state, FAILBACK)
            if mixed is not None and mixed.get("applied") != 0:
                # an interrupted fail-back wrote (or may have written) some of the replica's data
                # here: keeping this side would copy that mix over the only whole copy
                raise Refusal(
                    f"resolve {key}: refused: a fail-back from {entry.target} was interrupted and "
                    f"this host's copy {mix_words(mixed.get('applied'))}: keeping this host "
                    "would overwrite the replica "
                    f"with that mix. Run {command('failback', key, '--yes')} again to finish it "
                    "(the replica's data wins); nothing was changed", errno=errno.EBUSY, obj=key)
            cap = self.sup.get(kind, key)
            nothing = Result("resolve", key, Outcome.UNCHANGED, f"nothing to resolve: the replica "
                             f"on {entry.target} is not promoted, it is {key}'s secondary (no split "
                             "brain); nothing was changed")
            if cap is not None and not sw:  # a capture sees the promotion without asking
                fig = await self.sup.figures(cap)
                if replicating(fig.get("connection"), fig.get("target_data")):
                    return [nothing]
            try:
                await self._ask(spec, "discard", await self._size(kind, entry))
                was = (f"discarded the promotion of the replica on {entry.target}: it is this "
                       "entry's secondary again and is made equal to this side (only differences "
                       "are sent)")
            except TargetUnavailable as exc:
                if getattr(exc, "code", None) != "not-promoted":
                    # (this side is unfenced and unmarked only after the agent said yes)
                    put = sw.get("fence") or {}
                    here = ("it stays read-only here" if put and "unfenced" not in put else
                            "it stays switched over" if sw else
                            "its capture goes on" if cap is not None else "")
                    # the replica in use there is a refusal (exit 2); unreachable, a failure
                    raise (Refusal if getattr(exc, "code", None) == "in-use" else MirrorError)(
                        f"resolve {key}: {exc.state}; nothing was changed here"
                        f"{f' ({here})' if here else ''}", errno=_exc_error(exc),
                        obj=key) from None
                if not sw:
                    return [nothing]
                # a resolve or fail-back that was interrupted after the replica was demoted
                was = f"the replica on {entry.target} was its secondary already"
            if sw.get("fence"):  # this side wins: it is written again
                await trio.to_thread.run_sync(unfence, kind, key, entry, sw["fence"])
            _unmark(spec.state)
            with contextlib.suppress(FileNotFoundError):  # no fail-back is under way any more
                os.unlink(Path(spec.state) / FAILBACK)
            results = [Result("resolve", key, Outcome.OK, was)]
            if cap is not None:
                reply = await cap.link.call("resync", reason="the replica's promotion was discarded")
                if not reply.get("ok"):
                    results.append(Result("resync", key, Outcome.FAILED, reply.get("error", "?"),
                                          reply.get("errno")))
                return results
        return results + [await self._capture(kind, entry)]

    # -- the hand-over made for good: the replica stays primary, the entry is forgotten here ------
    async def end_handover(self, kind: str, key: str, entry) -> list[Result]:
        """Before `remove --keep-replica-primary`: the service moved to the replica's host for
        good (a planned migration, this host to be retired). This side's read-only fence is
        lifted and its markers dropped; the replica is not asked or touched (it stays primary
        there, in its own generation: the same entry added again with that target is a split
        brain there, which its fail-back ends: the way the service comes back).
        Refused unless the entry was switched over: a switch-over that did not finish may not
        have promoted the replica, and then this host's copy is the only current one."""
        state = self.sup.layout.state(kind, key)
        async with self._lock(kind, key):
            sw = with_failback(switched(state), state)
            if sw is None:
                raise Refusal(f"{key} was not switched over to its replica: there is no "
                              "hand-over to end (--keep-replica-primary is for an entry whose "
                              f"replica took over); remove it without that option; nothing "
                              "was changed", errno=errno.EINVAL, obj=key)
            if sw.get("state") != "switched":
                why = (f"a switch-over of {key} to {sw.get('target')} did not finish: whether the "
                       f"replica there is primary is not known. Run {command('switchover', key)} "
                       "again to finish it, then remove the entry"
                       if sw.get("state") == "switching" else
                       f"the switch-over marker of {key} cannot be read ({state})")
                raise Refusal(f"{why}; nothing was changed", errno=errno.EBUSY, obj=key)
            if self.sup.get(kind, key) is not None:  # never, unless a marker was put back by hand
                raise Refusal(f"{key} is captured here although it is marked switched over: "
                              "nothing was changed", errno=errno.EBUSY, obj=key)
            fence_info = sw.get("fence") or {}
            if fence_info and "unfenced" not in fence_info:
                await trio.to_thread.run_sync(unfence, kind, key, entry, fence_info)
            _forget_failback(state)
            _unmark(state)
            log.info("%s: hand-over to %s ended for good: the replica stays primary there", key,
                     sw.get("target"))
            copy = (f"this host's copy {mix_words(sw.get('failback_applied'))}: do not use it"
                    if sw.get("failback") == "interrupted" and sw.get("failback_applied") != 0
                    else
                    f"this host's copy is as it was at the switch-over ({_when(sw.get('time'))}, "
                    f"seq {sw.get('seq')}), older than the replica")
            host = f" ({sw['host']})" if sw.get("host") else ""
            return [Result("end hand-over", key, Outcome.OK,
                           f"ended the hand-over of {key}: its replica {sw.get('target')}{host} "
                           f"stays primary there; {key} is no longer read-only here, and {copy}")]


async def _hand_over_the_mix(kind: str, key: str, entry, state: str) -> dict:
    """A split brain's fail-back that wrote (or may have written) some of the replica's data
    here and did not finish: this copy is neither history, so it is not captured (nor written)
    as this host's; it is handed over as after a switch-over (marked, fenced), and the next
    fail-back finishes it (status: "fail-back interrupted"). What fence() did."""
    info = {"state": "switched", "time": time.time(),
            "seq": (capture_end(state) or {}).get("seq"), "target": entry.target}
    _mark(state, info)
    fenced = await trio.to_thread.run_sync(fence, kind, key, entry)
    _mark(state, {**info, "fence": fenced})
    return fenced


def _mixed(state: str, exc: BaseException) -> bool:
    """Did a fail-back that ended with `exc` leave this host's copy a mix (some of the
    replica's data written here), or may it have (it ended by something else than a refusal or
    a lost link that counted what it wrote)?"""
    fb = _read_json(state, FAILBACK)
    if fb is None:  # it never began, or it was refused before it began
        return False
    return fb.get("applied") != 0 if "applied" in fb else not isinstance(exc, MirrorError)


def _nothing_to_fail_back(key: str, message: str) -> Result:
    """Not switched over and not promoted there: like `replica resolve`'s no-op, UNCHANGED
    (exit 0), not a failure."""
    return Result("failback", key, Outcome.UNCHANGED, message)


def _other_file_systems_below(key: str, table=None) -> list[str]:
    """The mount points below the directory `key` of file systems other than its own (in the
    mount table `table`, read when not given)."""
    from app.services import mounts
    dev = os.stat(key).st_dev
    return sorted({m.mount_point for m in (mounts.read_mountinfo() if table is None else table)
                   if m.mount_point.startswith(key.rstrip("/") + "/")
                   and os.makedev(m.major, m.minor) != dev})


class _BesideOtherFileSystems:
    """A fail-back's applier on this side while other file systems are mounted below the
    entry (`below`): the replica's data never goes onto one of them (a directory of the same
    name there, written while the replica was primary, would be written into it, and pruned
    to its listing). A record about one, or below it, stops the fail-back before it is
    applied; what the replica holds there stays there."""

    def __init__(self, inner, key: str, below: list[str]):
        from app.engine.agent import PATH_ARGS
        self.inner, self.key, self.paths = inner, key, PATH_ARGS
        self.below = {os.fsencode(os.path.relpath(m, key)): m for m in below}

    def _onto(self, rec) -> str | None:
        from app.engine.journal import decode_path
        for name in self.paths:
            if rec.args.get(name):
                rel = decode_path(rec.args[name])
                for top, mount in self.below.items():
                    if rel == top or rel.startswith(top + b"/"):
                        return mount
        return None

    def apply(self, rec) -> None:
        from app.engine.shipper import TargetUnavailable
        if (mount := self._onto(rec)) is not None:
            raise TargetUnavailable(
                f"stopped: the replica has {mount} (or something below it), where another file "
                "system is mounted here: its data is not written onto that one; move it aside "
                "on the replica's host (another name in the replica), and fail back again",
                retry=False)
        self.inner.apply(rec)

    def apply_run(self, records, start: int, skip=None, instead=None) -> int:
        return self.inner.apply_run(records, start, skip, instead,
                                    check=lambda rec: self._onto(rec) is None)

    def __getattr__(self, name: str):  # sync, close_files, …: the inner applier's
        return getattr(self.inner, name)


def _local_users(kind: str, key: str, entry) -> list[str]:
    """Who uses this side's data (nothing may during a fail-back). A directory's fence and the
    entry's own file system under it (the entry is its mount point) are not users, nor other
    file systems mounted below the entry (and their copies in the recursive fence): the
    fail-back does not cross into them, as capture does not (sync.children)."""
    if kind == "fs":
        from app.engine.agent import path_users
        from app.services import mounts
        table = mounts.read_mountinfo()
        below = _other_file_systems_below(key, table)
        own = {m.mount_id for m in table if m.mount_point in below}
        fence = _read_only_self_bind(key)
        if fence is not None:  # (else the entry's own file system on top is path_users' home)
            under = next((m.parent_id for m in table if m.mount_id == fence), None)
            own |= {fence} | {m.mount_id for m in table if m.mount_id == under and m.mount_point == key}
        return path_users(key, own=frozenset(own))
    from app.services.blockplan import View, busy_reasons
    return busy_reasons(entry.device, View())


_STREAMS = {0: "standard input", 1: "standard output", 2: "standard error"}


def _own_hold(h: dict, key: str) -> str:
    """A holder that is the command asking for the switch-over (its shell gave it a working
    directory or a file below the entry): it blocks the unmount as any other process, so it is
    named, in words that say what to change."""
    who = f"this command itself (pid {h['pid']}, {h['name']})"
    if h["file"].endswith(" (working directory)"):
        where = h["file"][:-len(" (working directory)")]
        return f"{who} runs in {where}: run it from outside {key}"
    fd = None
    with contextlib.suppress(OSError):
        for n in sorted(os.listdir(f"/proc/{h['pid']}/fd"), key=int):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{h['pid']}/fd/{n}") == h["file"]:  # the kernel's name
                    fd = int(n)
                    break
    if fd in _STREAMS:
        return f"{who} has {h['file']} as its {_STREAMS[fd]}: redirect it outside {key}"
    return f"{who} has {h['file']} open{f' (fd {fd})' if fd is not None else ''}: close it or " \
           f"run the command without it"
