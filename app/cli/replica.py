"""Fail-over and fail-back.

On the source host (through the daemon): `mirrorsetup switchover ENTRY`, `mirrorsetup failback
ENTRY`, `mirrorsetup replica resolve ENTRY --discard-target`.
On the target host (no daemon there; the replicas serve-target keeps under --root):
`mirrorsetup replica list --root DIR`, `mirrorsetup replica promote NAME --root DIR`,
`mirrorsetup replica remove NAME --root DIR`.
"""

from __future__ import annotations

import errno
import json
import os
import sys

from app.cli.common import Refused, add, group, replication, require, require_daemon, store
from app.cli.output import dump, report, say
from app.services.layout import command
from app.services.results import MirrorError, Outcome, Result


def _confirm(args, question: str) -> None:
    """What changes data on a host is confirmed at a terminal, or given --yes by a script."""
    if args.yes:
        return
    if args.json or not sys.stdin.isatty():
        raise Refused(f"{question.rstrip('?')}: give --yes to confirm (nothing was changed)",
                      errno=errno.EINVAL)
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise Refused("not confirmed: nothing was changed", errno=errno.ECANCELED)


def _progress(args):
    if args.json or not sys.stderr.isatty():
        return None

    def show(p: dict) -> None:
        sys.stderr.write(f"  {p.get('stage', '')}{' at seq ' + str(p['seq']) if 'seq' in p else ''}\n")
    return show


def _require_entry(args) -> None:
    """An entry that is not configured is a refusal (exit 2), as for every other command."""
    from app.services.blockplan import same_device
    config = require(store(args).load)
    real = os.path.realpath(args.entry)
    if any(e.path in (args.entry, real) for e in config.filesystem) or \
            any(e.device == args.entry or same_device(e.device, args.entry) for e in config.block):
        return
    raise Refused(f"{args.entry} is not a configured file-system entry or block device "
                  "(mirrorsetup fs list, block list)", errno=errno.ENOENT, obj=args.entry)


def _healthy_first(args, rep, action: str) -> Result | None:
    """Before asking to confirm what would overwrite data: an entry replicating to its
    connected secondary has nothing to fail back or keep (the daemon would say so after)."""
    from app.services.protocol import CaptureRow
    from app.services.status import healthy_secondary, nothing_to_fail_back
    if args.yes:
        return None  # the daemon says it
    try:
        said = rep.control.request("status")
    except Exception:  # the daemon's own answer comes with the request itself
        return None
    real = os.path.realpath(args.entry)
    for r in (*said.get("filesystem", []), *said.get("block", [])):
        row = CaptureRow.from_json(r)
        if row.key in (args.entry, real) and healthy_secondary(row):
            return Result(action, row.key, Outcome.UNCHANGED,
                          nothing_to_fail_back(row.key, row.target or "?"))
    return None


def cmd_switchover(args) -> int:
    _require_entry(args)
    rep = replication(args)
    require_daemon(rep)
    return report(rep.switchover(args.entry, _progress(args)), as_json=args.json)


def cmd_failback(args) -> int:
    _require_entry(args)
    rep = replication(args)
    require_daemon(rep)
    healthy = _healthy_first(args, rep, "failback")
    if healthy is not None:  # unchanged: nothing to fail back, as the daemon answers it
        return report([healthy], as_json=args.json)
    _confirm(args, f"Fail back {args.entry}: its data on THIS host is replaced by the promoted "
                   "replica's (only what differs is sent); changes made here since the replica was "
                   "promoted are lost. Applications on the target must have stopped. Go on?")
    return report(rep.failback(args.entry, _progress(args)), as_json=args.json)


def cmd_resolve(args) -> int:
    _require_entry(args)
    rep = replication(args)
    require_daemon(rep)
    if not args.discard_target:
        raise Refused(f"say which side wins: --discard-target keeps {args.entry} as it is here "
                      "(what was written on the target since its promotion is lost); "
                      f"{command('failback', args.entry, '--yes')} keeps the target's instead",
                      errno=errno.EINVAL)
    healthy = _healthy_first(args, rep, "resolve")
    if healthy is not None:  # unchanged, as the daemon answers it
        return report([healthy], as_json=args.json)
    _confirm(args, f"Discard the target's promotion of {args.entry}: what was written there since "
                   "it was promoted is overwritten by this host's data. Go on?")
    return report(rep.resolve(args.entry, discard_target=True), as_json=args.json)


def _agent_call(func, *a, **kw):
    from app.engine.agent import AgentError
    try:
        return func(*a, **kw)
    except AgentError as exc:
        raise MirrorError(str(exc), errno=exc.errno) from None
    except OSError as exc:
        raise MirrorError.from_oserror("replica", kw.get("root") or (a[0] if a else "?"), exc) from None


def _root(args) -> str:
    if not os.path.isdir(args.root):
        raise Refused(f"{args.root}: no such directory (the --root serve-target serves)", errno=errno.ENOENT)
    return args.root


def cmd_list(args) -> int:
    from app.engine import agent
    replicas = _agent_call(agent.list_replicas, _root(args))
    if args.json:
        dump(replicas)
        return 0
    if not replicas:
        say(f"no replicas below {args.root}")
    for r in replicas:
        say(agent.replica_line(r))
    return 0


def cmd_promote(args) -> int:
    from app.engine import agent
    root = _root(args)
    if args.force:
        _confirm(args, f"Promote {args.name} even if it is inconsistent (its files or blocks may mix "
                       "old and new states)?")
    try:
        state, done = agent.promote(root, args.name, mount_at=args.mount, loop=args.loop,
                                    force=args.force)
    except agent.AgentError as exc:  # refused before anything changed, or failed on the way
        if exc.code == "usable":  # promoted, then a step to make it usable failed: exit 1
            failed = f"{args.name} is promoted, but not usable yet: {exc.extra['failed']}"
            if args.json:
                print(json.dumps({"state": exc.extra["state"], "done": exc.extra["done"],
                                  "error": failed, "errno": exc.errno}, indent=2, default=str))
                return 1
            return report([Result("promote", args.name, Outcome.OK, line) for line in exc.extra["done"]]
                          + [Result("promote", args.name, Outcome.FAILED, failed, exc.errno)])
        if exc.code == "unapplied":  # nothing promoted: its file system cannot take it (exit 1)
            return report([Result("promote", args.name, Outcome.FAILED, str(exc), exc.errno)],
                          as_json=args.json)
        kind = Refused if exc.code in ("path", "promoted", "inconsistent", "locked") else MirrorError
        raise kind(str(exc), errno=exc.errno) from None
    except OSError as exc:
        raise MirrorError.from_oserror("promote", args.name, exc) from None
    if args.json:
        print(json.dumps({"state": state, "done": done}, indent=2, default=str))
        return 0
    return report([Result("promote", args.name, Outcome.OK, line) for line in done])


def cmd_remove(args) -> int:
    from app.engine import agent

    def confirm(found: dict) -> None:
        what = (f"its bookkeeping, and its data {found['path']} if it is as its session left it "
                "(empty), are" if found.get("stateless") else
                f"its data {found['path']} and its journal and state are")
        _confirm(args, f"Remove the replica {agent.replica_line(found)}: {what} deleted for "
                       "good. Go on?")
    try:
        done = agent.remove(_root(args), args.name, confirm=confirm)
    except agent.AgentError as exc:
        if exc.code == "removing":  # failed on the way: what was removed is said (exit 1)
            return report([Result("remove", args.name, Outcome.FAILED, str(exc), exc.errno,
                                  exc.extra["done"])], as_json=args.json)
        raise Refused(str(exc), errno=exc.errno, obj=args.name) from None
    message = done.pop("message")
    return report([Result("remove", args.name, Outcome.OK, message, details=done)],
                  as_json=args.json)


def register(sub, common) -> None:
    p = add(sub, "switchover", cmd_switchover, "planned switch-over of an entry to its remote "
            "replica: checks nothing uses it, drains, lifts capture, promotes the replica", common)
    p.add_argument("entry", help="a file-system entry's path or a block entry's device")
    p = add(sub, "failback", cmd_failback, "bring a promoted remote replica's data back (only what "
            "differs), make it secondary again and capture here again", common)
    p.add_argument("entry", help="a file-system entry's path or a block entry's device")
    p.add_argument("--yes", action="store_true", help="confirm (scripts)")
    rep = group(sub, "replica", "remote replicas: fail-over on the target host, split brain",
                "replica actions")
    p = add(rep, "resolve", cmd_resolve, "end a split brain, this host's data wins (the target's "
            "promotion is discarded and it is re-mirrored, only differences)", common)
    p.add_argument("entry", help="a file-system entry's path or a block entry's device")
    p.add_argument("--discard-target", action="store_true", help="the source wins")
    p.add_argument("--yes", action="store_true", help="confirm (scripts)")
    p = add(rep, "list", cmd_list, "on the target host: every replica kept below --root, its role "
            "and state", common)
    p.add_argument("--root", required=True)
    p = add(rep, "promote", cmd_promote, "on the target host: fail over, make a replica usable "
            "(a directory, or a loop device for a block replica)", common)
    p.add_argument("name", help="the replica's path below --root (as `replica list` shows it)")
    p.add_argument("--root", required=True)
    p.add_argument("--mount", metavar="DIR", help="bind-mount the directory (fs) or mount the loop's "
                   "file system (block) here")
    p.add_argument("--loop", metavar="/dev/loopN", help="attach a block replica to this loop")
    p.add_argument("--force", action="store_true", help="promote an inconsistent replica")
    p.add_argument("--yes", action="store_true", help="confirm --force (scripts)")
    p = add(rep, "remove", cmd_remove, "on the target host: delete a replica no source "
            "replicates to any more (e.g. an interrupted first copy's), its data, journal and "
            "state; refused while a session holds it or anything uses it", common)
    p.add_argument("name", help="the replica's path below --root (as `replica list` shows it)")
    p.add_argument("--root", required=True)
    p.add_argument("--yes", action="store_true", help="confirm (scripts)")
