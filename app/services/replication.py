"""The administrator's actions, as plan + apply, one `Result` per entry.

Block entries are attached here through the loop service. File-system entries are mounted by
the daemon (mirrorfs needs a long-running FUSE server), so mount-all / unmount-all go through
the control socket; nothing here fakes them with bind mounts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
from collections.abc import Callable

from app.services import blockdevs, blockplan, mounts
from app.services import loop as loopdev
from app.services.blockplan import View, same_device
from app.services.config import (BlockEntry, ConfigStore, check_window, is_local_target,
                                 kind_and_key, match_block, match_fs)
from app.services.layout import (IDENTITY_RECORD, IDENTITY_WORDS, FSTYPE_BLOCK, FSTYPE_FS,
                                  capture_key, clean_end, command, default_state_dir, entry_state,
                                  failback_marker, identity_changes, identity_record,
                                  identity_words, mix_words, switched_marker, switched_refusal,
                                  with_failback, write_small_file)
from app.services.results import REFUSED, MirrorError, Outcome, Refusal, Result
from app.services.units import exact_size


def _refused_if(results: list[Result]) -> dict:
    """A remove kept because what came before it failed: refused (nothing was changed) when
    each of those was refused (a mounted loop, files open), else failed as they did."""
    return REFUSED if all(r.refused for r in results if r.failed) else {}


class Replication:
    """What the TUI's menus and the CLI's subcommands call; both report the returned Results."""

    def __init__(self, store: ConfigStore, control=None, state_dir: str | None = None):
        self.store = store
        self._control = control
        self.state_dir = state_dir or default_state_dir()  # the daemon's: its switch-over markers

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
        self._record_identity("block", entry.device)
        where = entry.loop or "the first free loop device"
        offset = exact_size(entry.offset) if entry.offset else "0"  # in the size's own words
        window = (f"{exact_size(entry.sizelimit)} from offset {offset}" if entry.sizelimit
                  else f"at offset {offset}")
        warning = self._remote_room(entry)
        return Result("add", entry.device, Outcome.OK, f"added {entry.device} (attaches to {where} "
                      f"{window}{', read-only' if entry.read_only else ''}){_no_target(entry)}",
                      details={"warnings": [warning]} if warning else {})

    def _remote_room(self, entry: BlockEntry) -> str | None:
        """A remote target without room for the entry's window, said as a local device target
        that small is refused (config.short_of); or that its room could not be checked."""
        if not entry.target or is_local_target(entry.target):
            return None
        from app.services.targets import room_warning
        try:
            host = self.store.load().target_host(entry.target.partition(":")[0])
            size = blockdevs.device_size(entry.device)
        except MirrorError:  # (the add just read both)
            return None
        if host is None:
            return None
        return room_warning(host, entry.target, entry.sizelimit or size - entry.offset)

    def remove_block(self, device: str, *, keep_replica_primary: bool = False) -> list[Result]:
        """Remove an entry; its loop is detached first, and a failed detach keeps the entry.
        `keep_replica_primary`: of an entry switched over, for good (see _handed_over)."""
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
        handed, ended = self._handed_over("block", entry.device, daemon, keep_replica_primary)
        if handed is not None:
            return [handed]
        if ended:
            results = ended
        elif daemon is not None:
            results = self._daemon_results("detach", entry.device, "block_detach", checked=True,
                                           device=entry.device)
        else:
            results = self._detach_plain(entry)
        if any(r.failed for r in results):
            # not a plan: the remove did not happen (it printed as "plan" on stdout)
            return results + [Result("remove", entry.device, Outcome.FAILED,
                                     f"kept {entry.device} in the configuration: its loop is "
                                     "still in use", errno.EBUSY, _refused_if(results))]
        try:
            self.store.remove_block(entry.device)
        except MirrorError as exc:
            return results + [Result.from_error("remove", entry.device, exc)]
        # an entry added again under this name is a new one: its device is what it is then
        self._forget_identity("block", entry.device, daemon)
        return results + [Result("remove", entry.device, Outcome.OK,
                                 f"removed {entry.device}{_kept_note(results)}")]

    def _state_dir(self, daemon) -> str:
        """The daemon's state directory when it runs (it may not be $MIRRORSETUP_STATE_DIR),
        else ours."""
        if daemon is not None:
            from app.services.control import ANSWER_SECONDS
            with contextlib.suppress(MirrorError):
                return daemon.request("ping", answer_within=ANSWER_SECONDS).get("state_dir") \
                    or self.state_dir
        return self.state_dir

    def _forget_identity(self, kind: str, key: str, daemon) -> dict | None:
        """Drop what told the entry's device or file system from another (app/engine/
        capture.py check_identity): the next capture takes it as it is then. What was
        recorded, or None."""
        entry_dir = entry_state(self._state_dir(daemon), kind, key)
        was = identity_record(entry_dir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(entry_dir, IDENTITY_RECORD))
        return was

    def _record_identity(self, kind: str, key: str) -> None:
        """What the entry's name leads to now, recorded as it is added (capture.check_identity):
        its very first capture then refuses another device or file system, as each later one
        does (a first capture that only recorded what it found could make a replica kept from
        an earlier entry equal to an empty directory). Nothing is recorded when it cannot be
        read (the first capture records it then), nor over a record that is there already."""
        import json
        with contextlib.suppress(OSError, MirrorError):
            entry_dir, was, now = self._identity(kind, key)
            if was is None:
                os.makedirs(entry_dir, mode=0o700, exist_ok=True)
                write_small_file(entry_dir, IDENTITY_RECORD, json.dumps(now) + "\n")

    def identity_change(self, kind: str, key: str) -> tuple[dict, dict] | None:
        """(recorded, now) when the entry's device (block) or the file system its directory
        lies on (fs) is not what was recorded for it, which its capture refuses
        (capture.check_identity); None when no other was recorded. `key`: the entry's path or
        device. Raises MirrorError when what it is now cannot be read."""
        _, was, now = self._identity(kind, key)
        return None if was is None or not identity_changes(was, now) else (was, now)

    def _identity(self, kind: str, key: str) -> tuple[str, dict | None, dict]:
        """(the entry's state directory, what was recorded for it, what it is now)."""
        try:
            now = _identity_now(kind, key)
        except OSError as exc:
            raise MirrorError.from_oserror("open", key, exc) from None
        entry_dir = entry_state(self._state_dir(self.control), kind, key)
        return entry_dir, identity_record(entry_dir), now

    def accept_identity(self, kind: str, key: str, *, expected: dict | None = None) -> Result:
        """The entry's device (block) or file system (fs) is the right one although it is not
        what was recorded for it (the disk was replaced, its file moved; the data moved to
        another file system on purpose): the next capture records it and makes the replica
        equal to it; a fail-back may write onto it. `key`: the entry's path or device.
        `expected`: what the administrator was shown it is now (the TUI's question); refused
        when it is something else by then."""
        action = "accept-device" if kind == "block" else "accept-filesystem"
        try:
            entry_dir, was, now = self._identity(kind, key)
        except MirrorError as exc:
            return Result.from_error(action, key, exc)
        what = IDENTITY_WORDS[kind][0]
        if was is None or not identity_changes(was, now):
            return Result(action, key, Outcome.UNCHANGED,
                          f"{key}: no other {what} was recorded for it; nothing to accept")
        if expected is not None and now != expected:
            return Result(action, key, Outcome.FAILED, f"{key}: its {what} changed since it was "
                          f"shown: it is now {identity_words(now)}, not "
                          f"{identity_words(expected)}; nothing was accepted: look at it again",
                          errno.EAGAIN, REFUSED)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(entry_dir, IDENTITY_RECORD))
        return Result(action, key, Outcome.OK,
                      f"{key}: the {what} recorded for it ({identity_words(was)}) is forgotten; "
                      "its next capture takes it as it is now and makes its replica equal to it")

    def _handed_over(self, kind: str, key: str, daemon, keep_replica_primary: bool = False
                     ) -> tuple[Result | None, list[Result]]:
        """(refusal, results of ending the hand-over) before a remove. A remove of an entry
        switched over to its replica (or in the middle of it, or of a fail-back) is refused:
        nothing would end the hand-over after it (its replica stays primary there, the
        read-only fence here stays, unexplained), and the marker would make an entry added
        again later refuse capture all the same. `keep_replica_primary` (the service moved for
        good): the daemon ends the hand-over first (lifts the fence, drops the markers; the
        replica stays primary), then the entry is removed. The daemon's state directory holds
        the marker when it runs (it may not be $MIRRORSETUP_STATE_DIR)."""
        state = entry_state(self._state_dir(daemon), kind, key)
        sw = with_failback(switched_marker(state), state)
        refused = switched_refusal(sw, key, "remove")
        if keep_replica_primary:
            if refused is None:
                return Result("remove", key, Outcome.FAILED, f"{key} was not switched over to its "
                              "replica: --keep-replica-primary is only for an entry whose replica "
                              "took over; remove it without that option; nothing was changed",
                              errno.EINVAL, REFUSED), []
            if daemon is None:
                return Result("remove", key, Outcome.FAILED, "the daemon is not running: ending "
                              f"the hand-over of {key} (lifting its read-only fence) is its work; "
                              f"start it ({command('daemon', 'start')}) and run the remove "
                              "again; nothing was changed", errno.ENOTCONN, REFUSED), []
            ended = self._daemon_results("end hand-over", key, "end_handover", checked=True,
                                         entry=key)
            if any(r.failed for r in ended):
                return ended[-1], []
            return None, ended
        if refused is None:
            return None, []
        fenced = (sw.get("fence") or {}) and "unfenced" not in sw["fence"]
        for_good = "" if sw.get("state") != "switched" else (
            "; to leave it primary for good and remove the entry here: "
            f"{command(kind, 'remove', key, '--keep-replica-primary')} (m on the Targets screen)")
        return dataclasses.replace(refused, message=(
            f"{refused.message}. Remove the entry after that: removed now, nothing would end the "
            "hand-over (its replica stays primary there"
            f"{f' and {key} stays read-only here' if fenced else ''}){for_good}; nothing was "
            "changed"), details={**refused.details, **REFUSED}), []

    def daemon(self):
        """The daemon's client when it answers, else None. Block entries are captured by the
        daemon; without it they are attached as plain loops and said to be uncaptured.
        Raises MirrorError when the daemon that answers works from another configuration file."""
        return None if self._checked_ping() is None else self.control

    def _checked_ping(self) -> dict | None:
        """daemon()'s check: the daemon's answer to ping (its state directory, its configuration
        file), None when none answers."""
        try:
            control = self.control
        except ImportError:
            return None
        from app.services.results import DaemonNotAnswering
        from app.services.socketpath import ANSWER_SECONDS  # (not the client's imports: see
        try:  # cli/block.py _NoSocket)
            ping = control.request("ping", answer_within=ANSWER_SECONDS)
        except DaemonNotAnswering as exc:  # one is there: not taken for none (a command
            from app.services.control import not_asked  # would act without it)
            raise not_asked(exc, "nothing was asked of it") from None
        except MirrorError:
            return None
        theirs, ours = ping.get("config"), os.path.realpath(self.store.path)
        if theirs and theirs != ours:
            raise MirrorError(f"the daemon on {control.socket_path} works from {theirs}, not {ours}: "
                              "use its configuration (--config) or start a daemon for this one",
                              errno=errno.EINVAL, obj=ours)
        return ping

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
        with blockplan.attach_lock():  # planned and done under one host-wide lock
            view = View()
            devices = [e.device for e in config.block]
            view.exclusions = blockdevs.Exclusions(devices)
            results = []
            for e in config.block:
                captured = _captured_without_daemon(e.device, view)
                if captured is not None:  # not a plain loop's business, --force or not
                    results.append(captured)
                    continue
                results.append(self._attach_plain(e, view, dry_run=dry_run, force=force,
                                                  action="attach", uncaptured=True,
                                                  avoid=blockplan.kept_loops(config.block, e),
                                                  devices=devices))
            return results

    def detach_all(self, *, dry_run: bool = False, say: Callable[[str], None] | None = None
                   ) -> list[Result]:
        """Detach only the loops our configuration names; a mounted loop is reported, not forced.
        `say`: told what the daemon waits for, once, as it begins (a capture shipping its queue
        to its target, a worker that does not answer: up to 45 s each)."""
        daemon, refusal = self._daemon_or_refusal("detach", "all block entries")
        if refusal:
            return refusal
        if daemon is not None:
            return self._daemon_results("detach", "all block entries", "block_detach_all",
                                        progress=_waits_to(say), checked=True, dry_run=dry_run)
        results: list[Result] = []
        view = View()  # read sysfs and the mount table once, not once per entry
        for entry in self.store.load().block:
            results += self._detach_plain(entry, view, dry_run=dry_run)
        return results

    def _attach_plain(self, entry: BlockEntry, view: View, *, dry_run: bool, force: bool,
                      action: str, uncaptured: bool = False,
                      avoid: frozenset[int] = frozenset(), devices: list[str] | None = None
                      ) -> Result:
        """`devices`: the configured ones, as the caller loaded them (attach-all read the
        whole file again for each entry); None: loaded here."""
        # without the daemon too: an entry handed over to its replica stays read-only here
        state = entry_state(self.state_dir, "block", entry.device)
        refused = switched_refusal(with_failback(switched_marker(state), state), entry.device, action)
        if refused is not None:
            return refused
        if devices is None:
            try:  # a busy loop that is an entry's capture loop is named by its entry
                devices = [e.device for e in self.store.load().block]
            except MirrorError:  # (manual attach needs no configuration)
                devices = None
        plan = blockplan.plan_attach(entry, view, captured=False, force=force, action=action,
                                     devices=devices)
        if plan.result is not None:
            return plan.result
        if dry_run:
            return Result(action, entry.device, Outcome.SKIPPED,
                          blockplan.describe(plan, captured=False, target=None))
        return blockplan.attach_plain(plan, action=action, uncaptured=uncaptured, view=view,
                                      avoid=avoid)  # what we attached is in the next entry's picture

    def _detach_plain(self, entry: BlockEntry, view: View | None = None, *,
                      dry_run: bool = False) -> list[Result]:
        view = view or View()
        found = blockplan.plain_loops_of(entry, view)
        if not found:
            return [Result("detach", entry.device, Outcome.UNCHANGED,
                           f"{entry.device} is not attached")]
        return [blockplan.detach_loop(loop, entry.device, view, dry_run=dry_run) for loop in found]

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

    # -- fail-over (a remote replica takes over, and gives back) -----------------------------

    def switchover(self, entry: str, progress=None) -> list[Result]:
        """Planned: drain, lift capture, promote the remote replica (nothing may use `entry`)."""
        return self._handover_request("switchover", entry, progress=progress)

    def failback(self, entry: str, progress=None) -> list[Result]:
        """The promoted replica's data comes back (only what differs), capture starts again."""
        return self._handover_request("failback", entry, progress=progress)

    def resolve(self, entry: str, *, discard_target: bool) -> list[Result]:
        """A split brain ends with this side's data: the replica's promotion is discarded."""
        return self._handover_request("resolve", entry, discard_target=discard_target)

    def _handover_request(self, action: str, entry: str, **args) -> list[Result]:
        """A switch-over, fail-back or resolve through the daemon. A daemon that ends before
        its answer: what the entry's markers say it left is said (_ended_during)."""
        try:  # its state directory asked first (with the check): an ended daemon cannot say it
            ping = self._checked_ping()
        except MirrorError as exc:
            return [Result.from_error(action, entry, exc)]
        state_dir = (ping or {}).get("state_dir") or self.state_dir
        return self._daemon_results(action, entry, checked=True, entry=entry,
                                    ended=lambda: self._ended_during(action, entry, state_dir),
                                    **args)

    # -- manual (not persisted) ----------------------------------------------------------

    def manual_attach(self, device: str, *, loop: str | None = None, offset: int = 0,
                      sizelimit: int = 0, read_only: bool = False, force: bool = False) -> Result:
        """Attach now, as the old "manual" menu did; nothing is written to the configuration."""
        try:
            blockdevs.describe(device)
            check_window(device, offset, sizelimit, blockdevs.device_size(device))
            if same_device(device, loop):  # (block add refuses it too; here it was "busy")
                raise Refusal(f"{device} cannot be its own loop device ({loop})", obj=device,
                              errno=errno.EINVAL)
            capture = None if force else self._capture_loop(device)
            if capture is not None:  # a second name for it, which status knows nothing of
                raise Refusal(f"{device} is {capture}: applications use it as it is (what is "
                              "written through it is captured); a loop on it would only be "
                              "another name for the same device; nothing was changed (--force "
                              "attaches one all the same)", obj=device, errno=errno.EINVAL)
            entry = BlockEntry(device=device, loop=loop, offset=offset, sizelimit=sizelimit,
                               read_only=read_only)
        except MirrorError as exc:  # its checks: nothing was changed (the CLI's exit 2)
            return Result.from_error("manual attach", device, exc, refused=True)
        with blockplan.attach_lock():
            return self._attach_plain(entry, View(), dry_run=False, force=force,
                                      action="manual attach")

    def _capture_loop(self, device: str) -> str | None:
        """What `device` is in words when it is a block entry's capture loop, else None."""
        real = os.path.realpath(device)
        try:
            loopdev.parse_loop_path(real)
        except MirrorError:
            return None
        st = loopdev.status(real)
        if st is None or capture_key(st.backing_file) is None:
            return None
        try:
            devices = [e.device for e in self.store.load().block]
        except MirrorError:  # (manual attach needs no configuration)
            devices = None
        return blockplan.attached_to(st.backing_file, devices)

    def manual_detach(self, loop_path: str) -> Result:
        try:
            loopdev.parse_loop_path(loop_path)
        except MirrorError as exc:
            return Result.from_error("manual detach", loop_path, exc)
        if not os.path.exists(loop_path):
            return Result("manual detach", loop_path, Outcome.FAILED, f"{loop_path} does not exist",
                          errno.ENOENT, REFUSED)
        st = loopdev.status(loop_path)
        if st is None:
            return Result("manual detach", loop_path, Outcome.UNCHANGED, f"{loop_path} is not attached")
        ours = self._replication_loop(st)
        if ours:  # a refusal: nothing was changed (exit 2)
            return Result("manual detach", loop_path, Outcome.FAILED, f"{loop_path} {ours}; nothing "
                          "was changed", errno.EBUSY, {"refused": True})
        r = blockplan.detach_loop(loop_path, loop_path)
        # the line names the loop already: "/dev/loopN: detached", not "/dev/loopN: /dev/loopN: …"
        message = r.message.removeprefix(f"{loop_path}: ")
        return Result("manual detach", loop_path, r.outcome, message, r.errno, r.details)

    def _replication_loop(self, st) -> str | None:
        """Why a loop is not the Manual screen's to detach: a capture's loop (its backing file
        is the capture's disk on a mirrorblk mount), or the device a block entry replicates
        (its capture holds it open). Found by a walk: both were detached, the first leaving
        the entry uncaptured with attach-all saying "already attached", the second set to
        autoclear under its capture, gone at the capture's end."""
        if st.backing_file:
            try:
                dev = os.stat(st.backing_file).st_dev
            except OSError:
                dev = None
            mount = next((m for m in mounts.read_mountinfo() if m.fstype == FSTYPE_BLOCK
                          and os.makedev(m.major, m.minor) == dev), None) if dev is not None else None
            if mount is not None:
                view = View()
                owner = next((e.device for e in self.store.load().block
                              if any(c.device == st.device for c in view.captures_of(e.device))), None)
                one = (f"{command('block', 'remove', owner)} ends it and removes the entry"
                       if owner else "`mirrorsetup block remove` of its entry ends it")
                return (f"is the capture loop of a replicated block entry (on {st.backing_file}): "
                        f"{one}; `mirrorsetup block detach-all` ends every entry's capture")
        entry = next((e for e in self.store.load().block if same_device(e.device, st.device)), None)
        if entry is not None:
            return (f"is the device the block entry {entry.device} replicates (applications use "
                    "its capture's loop, and its capture holds it): remove the entry first "
                    f"({command('block', 'remove', entry.device)}) to detach it by hand")
        return None

    # -- file-system entries (mounted by the daemon) -------------------------------------

    def add_filesystem(self, path: str, **kw) -> Result:
        try:
            entry = self.store.add_filesystem(path, **kw)
        except MirrorError as exc:
            return Result.from_error("add", path, exc)
        self._record_identity("fs", entry.path)
        atime = "with" if entry.replicate_atime else "without"
        return Result("add", entry.path, Outcome.OK,
                      f"added {entry.path} ({atime} access times){_no_target(entry)}; mount it "
                      "now with Mount all, or it is mounted when the daemon starts")

    def remove_filesystem(self, path: str, *, force: bool = False,
                          keep_replica_primary: bool = False) -> list[Result]:
        """Remove an entry; a capture still mounted there is unmounted first through the daemon.
        `keep_replica_primary`: of an entry switched over, for good (see _handed_over)."""
        norm = os.path.realpath(path) if path != "/" else path
        try:
            daemon = self.daemon()
        except MirrorError:  # another configuration's daemon: its state directory is not ours
            daemon = None
        handed, results = self._handed_over("fs", norm, daemon, keep_replica_primary)
        if handed is not None:
            return [handed]
        if any(m.mount_point == norm and m.fstype == FSTYPE_FS for m in mounts.read_mountinfo()):
            results = results + self._daemon_results("unmount", norm, path=norm, force=force)
            if any(r.failed for r in results):
                return results + [Result("remove", norm, Outcome.FAILED,
                                         f"kept {norm} in the configuration: mirrorfs is still "
                                         "mounted there", errno.EBUSY, _refused_if(results))]
        try:
            entry = self.store.remove_filesystem(path)
        except MirrorError as exc:
            return results + [Result.from_error("remove", path, exc)]
        self._forget_identity("fs", entry.path, daemon)  # (an entry added again is a new one)
        return results + [Result("remove", entry.path, Outcome.OK,
                                 f"removed {entry.path}{_kept_note(results)}")]

    def set_entry_target(self, kind: str, key: str, target: str | None, *,
                         adopt: bool = False) -> list[Result]:
        """`fs set --target` / `block set --target` (None: `--no-target`): the entry replicates
        to another target from its next capture on, whose catch-up makes that target equal to
        it (what differs is copied; the old replica is left as it is). The new target is
        checked as at an add. A directory captured now is unmounted first and mounted again
        (the daemon's; refused, with who holds it, when something uses it); a block entry
        attached now is refused: detaching it is the administrator's step (applications use
        its loop). Refused too while the entry is switched over to its replica."""
        action = "set target"
        try:
            daemon = self.daemon()
        except MirrorError as exc:  # another configuration's daemon: its state is not ours
            return [Result.from_error(action, key, exc)]
        try:
            entry = self.store.entry(kind, key)
        except MirrorError as exc:
            return [Result.from_error(action, key, exc)]
        key = entry.path if kind == "fs" else entry.device
        state = entry_state(self._state_dir(daemon), kind, key)
        refused = switched_refusal(with_failback(switched_marker(state), state), key, action)
        if refused is not None:
            return [dataclasses.replace(refused, message=(
                f"{refused.message}; its target is set after that; nothing was changed"))]
        try:  # checked before a capture is lifted: a refused target changes nothing
            old, new = self.store.check_entry_target(kind, key, target, adopt)
        except MirrorError as exc:
            return [Result.from_error(action, key, exc)]
        # a capture that started before the file was edited by hand replicates elsewhere
        running = self._running_target(daemon, kind, key)
        stale = running is not None and running[0] != new.target
        if old == new and not stale:
            return [self._target_set(action, key, old, new, state, False)]
        results: list[Result] = []
        lifted = False
        if old.target == new.target and not stale:  # only adopt_target: read at capture start
            pass
        elif kind == "fs" and any(m.mount_point == key and m.fstype == FSTYPE_FS
                                  for m in mounts.read_mountinfo()):
            if daemon is None:
                return [Result(action, key, Outcome.FAILED, f"{key} is captured (mirrorfs is "
                               "mounted there) and the daemon is not running: its capture is "
                               f"lifted and made again by the daemon ({command('daemon', 'start')}"
                               "); nothing was changed", errno.ENOTCONN, REFUSED)]
            results = self._daemon_results("unmount", key, path=key)
            held = [h for r in results if r.failed for h in r.details.get("holders", ())]
            if held:  # (the unmount's own words name its --force, which a set does not have)
                who = "; ".join(f"pid {h['pid']} ({h['name']}) holds {h['file']}" for h in held)
                return [Result(action, key, Outcome.FAILED, f"kept the target of {key}: it "
                               f"is in use ({who}), and its capture is lifted and made again to "
                               "change the target; set it again once they let go of it; "
                               "nothing was changed", errno.EBUSY,
                               {"holders": held, **REFUSED})]
            if any(r.failed for r in results):
                return results + [Result(action, key, Outcome.FAILED, f"kept the target of {key}: "
                                         "its capture could not be lifted (above)", errno.EBUSY,
                                         _refused_if(results))]
            lifted = True
        elif kind == "block":
            loops = [c.device for c in View().captures_of(key)]
            if loops and old == new:  # (stale: a hand edit its capture began before)
                return [Result(action, key, Outcome.FAILED, f"{key}'s capture (as "
                               f"{', '.join(loops)}) replicates to {running[0]}: it began "
                               "before the configuration was edited to name "
                               f"{new.target or 'no target'}; Detach all, then Attach all "
                               "applies it; nothing was changed", errno.EBUSY, REFUSED)]
            if loops:
                return [Result(action, key, Outcome.FAILED, f"{key} is attached and captured "
                               f"now (as {', '.join(loops)}): its target is set while it is "
                               f"not; detach it first ({command('block', 'detach-all')}, or "
                               "Detach all on the Block screen), then set it and attach it again; "
                               "nothing was changed", errno.EBUSY, REFUSED)]
        try:
            old, new = self.store.set_entry_target(kind, key, target, adopt)
        except MirrorError as exc:
            results.append(Result.from_error(action, key, exc))
        else:
            results.append(self._target_set(action, key, old, new, state, lifted,
                                            running[0] if stale else None))
        if lifted:
            results += self._daemon_results("mount", key, path=key)
        return results

    def _running_target(self, daemon, kind: str, key: str) -> tuple[str | None] | None:
        """(the target the entry's running capture replicates to,) as the daemon says it; None
        when no capture of it runs (or no daemon answers)."""
        if daemon is None:
            return None
        from app.services.socketpath import STATUS_ANSWER_SECONDS
        try:
            reply = daemon.request("status", answer_within=STATUS_ANSWER_SECONDS)
        except MirrorError:
            return None
        for row in reply.get("filesystem" if kind == "fs" else "block", []):
            if row.get("key") == key and row.get("captured"):
                return (row.get("target") or None,)
        return None

    @staticmethod
    def _target_set(action: str, key: str, old, new, state: str, lifted: bool,
                    ran: str | None = None) -> Result:
        """The result of an entry's target set: what becomes of the old replica, when the new
        one is made. `ran`: the target a capture that began before a hand edit of the file
        replicated to (the file named `new` already)."""
        if old == new and ran is not None:
            return Result(action, key, Outcome.OK, f"its capture, which replicated to {ran} "
                          "(it began before the configuration was edited), was made again: it "
                          f"replicates to {new.target} now and makes it equal to {key} (what "
                          f"differs is copied); the replica at {ran} is left as it is"
                          if new.target else f"its capture, which replicated to {ran} (it "
                          "began before the configuration was edited), was made again: it "
                          "replicates nowhere now")
        if old == new:
            return Result(action, key, Outcome.UNCHANGED, f"{key} replicates to {new.target} "
                          "already" if new.target else f"{key} has no target already")
        if old.target == new.target:
            return Result(action, key, Outcome.OK, f"{key} replicates to {new.target} as "
                          f"before; adopt_target = {str(new.adopt_target).lower()} (taken at "
                          "its next capture)")
        words = [f"{key} replicates to {new.target} now" if new.target else
                 f"{key} has no target now: its changes are captured and replicated nowhere"]
        if old.target:
            end = clean_end(state)
            missing = "" if end is None or end.get("seq", 0) <= end.get("released", 0) else (
                f" ({end['seq'] - end['released']} changes its journal had not sent there "
                "stay out of it)")
            words.append(f"its replica at {old.target} is left as it is and no longer updated"
                         f"{missing}")
        if new.target:
            when = "its capture, made again now," if lifted else "its next capture"
            words.append(f"{when} makes {new.target} equal to {key} (what differs is copied)")
        return Result(action, key, Outcome.OK, "; ".join(words))

    def set_target(self, name: str, changes: dict) -> list[Result]:
        """`target set`: the configuration, then the running captures that replicate to the
        target, which the daemon makes take the new settings now (rates at once; the rest by a
        new session, resuming where the last one was). Without a daemon, its next start does.
        Asked of the daemon even when the file has them already: a capture that was busy the
        first time takes them then."""
        from app.services import targets
        try:
            daemon = self.daemon()
        except MirrorError:  # another configuration's, or one that does not answer: not asked
            daemon = None
        result = targets.set_target(self.store, name, changes, live=daemon is not None)
        if result.failed or daemon is None:
            return [result]
        return [result, *self.apply_target(name, checked=True)]

    def apply_target(self, name: str, *, checked: bool = False) -> list[Result]:
        """`target apply`: the running captures that replicate to the target take its settings
        as the configuration says them now (after a hand edit, or a capture that was busy)."""
        action, subject = "apply target settings", f"target {name}"
        if not checked:
            daemon, refused = self._daemon_or_refusal(action, subject)
            if refused:
                return refused
            if daemon is None:
                return [Result(action, subject, Outcome.SKIPPED, "the daemon is not running: "
                               "captures that went on without it take them when it starts")]
        return self._daemon_results(action, subject, "target_settings", checked=True, name=name)

    def mount_all(self, *, force: bool = False) -> list[Result]:
        return self._daemon_results("mount", "all file-system entries", "mount_all", force=force)

    def unmount_all(self, *, force: bool = False, say: Callable[[str], None] | None = None
                    ) -> list[Result]:
        """`say`: as detach_all's."""
        return self._daemon_results("unmount", "all file-system entries", "unmount_all",
                                    progress=_waits_to(say), force=force)

    def _daemon_results(self, action: str, subject: str, cmd: str | None = None, progress=None,
                        checked: bool = False, ended=None, **args) -> list[Result]:
        """Ask the daemon; unless the caller has `checked` it already, first refuse a daemon
        that works from another configuration file. `ended()`: the result when the daemon
        ended before its reply (killed while it worked)."""
        from app.services.control import DaemonEnded
        try:
            if not checked:
                self.daemon()
            reply = self.control.request(cmd or action, progress=progress, **args)
            return [Result.from_json(r) for r in reply.get("results", [])]
        except DaemonEnded as exc:
            return [ended() if ended is not None else Result.from_error(action, subject, exc)]
        except MirrorError as exc:
            return [Result.from_error(action, subject, exc)]

    def _ended_during(self, action: str, entry: str, state_dir: str) -> Result:
        """The daemon ended (killed, crashed) during a switch-over, fail-back or resolve
        (`action`) of `entry`: what its markers say was done by then, and what to run."""
        try:
            config = self.store.load()
        except MirrorError:  # (read a moment ago; changed since): the entry as it was given
            config = None
        fs = None if not config else match_fs(config, entry)
        block = None if fs or not config else match_block(config, entry)
        key = fs.path if fs else block.device if block else entry
        target = (fs or block).target if (fs or block) else "its target"
        entry_dir = entry_state(state_dir, "fs" if fs else "block", key)
        left = _LEFT[action](key, target, switched_marker(entry_dir), failback_marker(entry_dir))
        from app.services.control import ANSWER_SECONDS, DaemonNotAnswering
        try:  # (its answer carries no "ok": any answer is one; a silent one is there too)
            self.control.request("ping", answer_within=ANSWER_SECONDS)
            running = True
        except DaemonNotAnswering:
            running = True
        except MirrorError:
            running = False
        then = (f"run {command('status')}" if running else "the daemon is not running now: "
                f"start it with {command('daemon', 'start')}, then run {command('status')}")
        return Result(action, key, Outcome.FAILED, f"the daemon ended during the "
                      f"{_WORDS[action]} of {key}: {left}; {then}", errno.ECONNRESET)


def _waits_to(say: Callable[[str], None] | None):
    """A daemon request's progress lines that say what it waits for, to `say` (Supervisor.
    says_waits)."""
    if say is None:
        return None
    return lambda p: say(p["waiting"]) if "waiting" in p else None


def _left_by_switchover(key: str, target: str, sw: dict | None, fb: dict | None) -> str:
    if sw is None:
        return ("its switch-over marker is not written, so nothing was handed over (its "
                "replica was not asked to take over)")
    if sw.get("state") == "switched":
        return (f"the switch-over had finished: {key} is switched over to {target} (its "
                "replica there is primary)")
    if sw.get("promote_sent"):
        return (f"its replica on {target} was asked to take over and may be primary now: "
                f"{key} is not captured; run {command('switchover', key)} again to finish it")
    return (f"the switch-over had begun (its marker says so) but its replica on {target} was "
            f"not asked to take over: run {command('switchover', key)} again to finish it, or "
            f"{command('replica', 'resolve', key, '--discard-target', '--yes')} to keep this side")


def _left_by_failback(key: str, target: str, sw: dict | None, fb: dict | None) -> str:
    again = command("failback", key, "--yes")
    if fb is not None and sw is None and fb.get("applied") == 0:
        # an earlier split brain's fail-back that wrote nothing here: this one ended before it
        # wrote its own marker (which has no count), so nothing came back; not handed over
        return (f"nothing of the replica's had come back (its fail-back marker, left by one "
                f"before it, says none was written here): this host's copy {mix_words(0)}; the "
                f"daemon captures {key} when it starts; run {again} again to fail back")
    if fb is not None:  # its count is of fail-backs interrupted before: this one wrote too
        return (f"the fail-back had begun (its marker says so) and did not finish: this host's "
                f"copy {mix_words(fb.get('applied') or None)}; {key} is not captured; run "
                f"{again} again to finish it")
    if sw is None:
        return ("neither a switch-over nor a fail-back marker is left: the fail-back had "
                f"finished (the replica on {target} is {key}'s secondary again) or had not "
                "begun to bring anything back (this host's copy is its own); either way the "
                f"daemon captures {key} when it starts")
    if sw.get("state") == "switched":
        return (f"nothing of the replica's had come back (its fail-back marker is not "
                f"written): {key} is still switched over to {target} (its replica there is "
                f"primary); run {again} again")
    return (f"nothing of the replica's had come back (its fail-back marker is not written): "
            f"the switch-over of {key} to {target} that did not finish is still marked so; run "
            f"{again} again")


def _left_by_resolve(key: str, target: str, sw: dict | None, fb: dict | None) -> str:
    again = command("replica", "resolve", key, "--discard-target", "--yes")
    if sw is None:
        return (f"no switch-over marker is left (this side is kept): whether its replica on "
                f"{target} had discarded its promotion is not known: run {again} again (it "
                "says so when there is nothing left to resolve)")
    return (f"this side was not taken back yet (its switch-over marker is still there) and "
            f"whether its replica on {target} had discarded its promotion is not known: run "
            f"{again} again to finish it")


_LEFT = {"switchover": _left_by_switchover, "failback": _left_by_failback,
         "resolve": _left_by_resolve}
_WORDS = {"switchover": "switch-over", "failback": "fail-back", "resolve": "resolve"}


def _identity_now(kind: str, key: str) -> dict[str, str]:
    """What a block entry's device or a directory entry's file system is now (the record
    capture.check_identity compares)."""
    if kind == "fs":
        return mounts.tree_identity(key)
    fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return blockdevs.device_identity(fd)
    finally:
        os.close(fd)


def _captured_without_daemon(device: str, view: View) -> Result | None:
    """An entry whose capture loop is there while no daemon runs (block captures outlive the
    daemon): its capture goes on (unchanged: the daemon takes it over at its start), or it is
    gone and the loop's I/O fails. Either way a plain loop beside it is no answer: it would
    let writes bypass the capture (this said "unmount or detach it first (--force
    overrides)")."""
    caps = view.captures_of(device)
    if not caps:
        return None
    from app.services.status import capture_workers  # (only then: attach-all loads little)
    start = command("daemon", "start")
    if capture_workers("block", device):
        return Result("attach", device, Outcome.UNCHANGED,
                      f"{device} is already attached as {caps[0].device}, captured: its capture "
                      f"goes on without the daemon, which takes it over at its start ({start})")
    return Result("attach", device, Outcome.FAILED,
                  f"{caps[0].device} serves a capture of {device} that is gone (the daemon and "
                  f"its worker died): its I/O fails; unmount or close it, then {start} captures "
                  "the device again; nothing was changed", errno.ENOTCONN, REFUSED)


def _kept_note(ended: list[Result]) -> str:
    """A capture ended by a remove that kept changes not yet at the target (its "next start"
    is no more): say what becomes of them."""
    if not any("kept in its journal for the next start" in r.message for r in ended):
        return ""
    return ("; the changes its journal kept (not yet at the target) are sent only if the entry "
            "is added again with the same target; otherwise that target stays without them")


def _no_target(entry) -> str:
    """An entry added without a target, said so at its add (helper-26's walk: `fs add DIR`
    took it in silence, and `fs list` showed TARGET "-" without saying what that means)."""
    if entry.target:
        return ""
    kind, key = kind_and_key(entry)
    return ("; no target: its changes are captured and replicated nowhere until it has one "
            f"({command(kind, 'set', key, '--target', 'DIR' if kind == 'fs' else 'FILE')})")
