"""`mirrorsetup block …`: the block-device entries, their loops and captures."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from app.cli.common import (Refused, accept, add, control, group, keep_primary_option,
                            loop_options, replica_options, replication, require, require_daemon,
                            set_target_of, store, target_options)
from app.cli.output import complain, dump, failures, print_devices, print_table, report
from app.services.layout import command
from app.services.results import MirrorError
from app.services.socketpath import default_socket
from app.services.units import human_size


def cmd_devices(args) -> int:
    from app.services import blockdevs
    from app.services.entries import picker_notes
    from app.services.layout import default_state_dir
    from app.services.status import daemon_answering, snapshot
    client = control(args)
    snap = require(snapshot, store(args), client if daemon_answering(client)[0] else None,
                   scan_writers=False, state_dir=args.state_dir or default_state_dir())
    print_devices(blockdevs.list_block_devices(include_excluded=args.all), picker_notes(snap),
                  as_json=args.json)
    return 0


def cmd_list(args) -> int:
    from dataclasses import asdict

    from app.services.entries import block_problem
    s = store(args)
    config = require(s.load)
    rows = []
    for e in config.block:
        problem = block_problem(e, config, s)
        rows.append({**asdict(e), "problem": problem})
        if problem:
            complain(f"warning: invalid entry {e.device}: {problem}")
    print_table(rows, ["device", "loop", "offset", "sizelimit", "read_only", "target", "problem"],
                as_json=args.json)
    return 0


def cmd_add(args) -> int:
    from app.services.config import BlockEntry
    from app.services.entries import check_block, window_fields
    rep = replication(args, missing_ok=True)
    opts = dict(adopt_target=args.adopt_target, queue_limit=args.queue_limit, on_full=args.on_full)
    offset, sizelimit, typed = window_fields(args.offset, args.sizelimit)
    entry = BlockEntry(args.device, args.loop, offset, sizelimit, args.read_only,
                       args.encryption, args.target, **opts)
    check = require(check_block, rep.store, entry).with_typed(typed)
    if check.refusal:  # every problem at once, each on its own line
        refused = Refused(check.refusal, errno=check.errno, obj=args.device)
        if len(check.errors) > 1:
            refused.errors = check.errors
        raise refused
    added = rep.add_block(args.device, loop=args.loop, offset=offset,
                          sizelimit=sizelimit, read_only=args.read_only,
                          encryption=args.encryption, target=args.target, **opts)
    code = report([added], as_json=args.json)
    for warning in added.details.get("warnings", ()):  # a remote target without room
        complain(f"warning: {warning}")
    for warning in check.warnings:
        complain(f"warning: {args.device} is {warning}: attach-all refuses it until that ends "
                 "(--force attaches anyway)")
    return code


def cmd_remove(args) -> int:
    from app.services.entries import configured_block
    rep = replication(args)
    entry = require(configured_block, rep.store, args.device)
    return report(rep.remove_block(entry.device, keep_replica_primary=args.keep_replica_primary),
                  as_json=args.json)


def cmd_set(args) -> int:
    from app.services.entries import configured_block
    if args.target is None and not args.no_target:
        raise Refused("say what to set: --target FILE or --no-target; nothing was changed",
                      errno=errno.EINVAL)
    entry = require(configured_block, store(args), args.device)
    return report(set_target_of(args, "block", entry.device), as_json=args.json)


def cmd_accept_device(args) -> int:
    from app.services.entries import configured_block
    rep = replication(args)
    entry = require(configured_block, rep.store, args.device)
    return accept(rep, args, "block", entry.device)


class _NoSocket:
    """The daemon's client where its socket does not exist: asked whether a daemon answers, it
    fails as the client itself would (no socket), without the client's imports (socket, the
    protocol: ~5 ms of the start of every attach-all and detach-all, which need no daemon)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def request(self, cmd: str, **_) -> dict:
        raise MirrorError(f"the mirrorsetup daemon is not running (no socket at {self.socket_path})",
                          errno=errno.ENOENT, obj=self.socket_path)


def socket_path(args) -> str:
    return args.socket or default_socket()


def replication_if_daemon(args):
    """replication(args), with _NoSocket for its daemon client when there is no socket (a
    daemon that starts meanwhile is one that started just after our look, as before)."""
    path = socket_path(args)
    if os.path.exists(path):
        return replication(args)
    from app.services.replication import Replication
    return Replication(store(args), _NoSocket(path), getattr(args, "state_dir", None))


def cmd_attach_all(args) -> int:
    rep = replication_if_daemon(args)
    require(rep.store.load)
    require(rep.daemon)  # a daemon that works from another configuration file: refused
    return report(rep.attach_all(dry_run=args.dry_run, force=args.force), as_json=args.json)


def cmd_detach_all(args) -> int:
    rep = replication_if_daemon(args)
    require(rep.store.load)
    require(rep.daemon)
    return report(rep.detach_all(dry_run=args.dry_run,
                                 say=lambda what: complain(f"detach-all: {what}")),
                  as_json=args.json)


def cmd_mirror(args) -> int:
    from app.services.entries import configured_block
    rep = replication(args)
    entry = require(configured_block, rep.store, args.device)
    require_daemon(rep)
    bar = not args.json and sys.stderr.isatty()

    def progress(p: dict) -> None:
        if bar and p.get("total"):
            done, total = p["bytes"], p["total"]
            filled = int(30 * done / total)
            sys.stderr.write(f"\r  [{'#' * filled}{'.' * (30 - filled)}] {done * 100 // total:3d}% "
                             f"{done >> 20} of {total >> 20} MiB")
            sys.stderr.flush()

    results = rep.block_mirror(entry.device, progress=progress)
    if bar:
        sys.stderr.write("\n")
    return report(results, as_json=args.json)


def cmd_verify(args) -> int:
    from app.services.entries import configured_block
    rep = replication(args)
    entry = require(configured_block, rep.store, args.device)
    require_daemon(rep)
    results, ranges = rep.block_verify(entry.device)
    if args.json:
        dump({"ranges": ranges, "results": [r.to_json() for r in results]})
        code = failures(results)
    else:
        for start, end in ranges:
            print(f"  differs: bytes {start}-{end - 1} of the target ({human_size(end - start)})")
        code = report(results)
    if ranges:
        complain(f"to make the target equal: {command('block', 'mirror', entry.device)}")
    return code


def register(sub, common) -> None:
    block = group(sub, "block", "block-device replication entries", "block actions")
    p = add(block, "devices", cmd_devices, "list block devices that can be replicated", common)
    p.add_argument("--all", action="store_true", help="also show swap and LVM physical volumes, "
                   "with the reason they are excluded")
    add(block, "list", cmd_list, "list the configured block devices (an invalid entry is "
        "flagged)", common)
    p = add(block, "add", cmd_add, "add a block device entry", common)
    p.add_argument("device", help="the block device (never its /dev/loopN: applications use that)")
    loop_options(p, sizes=str)
    p.add_argument("--encryption", help=argparse.SUPPRESS)  # legacy field: refused with a reason
    p.add_argument("--target", help="file or device the writes are replicated to, or NAME:PATH "
                   "on a remote target (mirrorsetup target add)")
    replica_options(p)
    p = add(block, "remove", cmd_remove, "detach and remove a block device entry", common)
    p.add_argument("device", help="a configured block device (not its loop)")
    keep_primary_option(p)
    p = add(block, "set", cmd_set, "change an entry's target (while it is not attached)",
            common)
    p.add_argument("device", help="a configured block device (not its loop)")
    target_options(p, "file or device")
    p = add(block, "accept-device", cmd_accept_device, "take the entry's device as it is now, "
            "although it is not the device recorded for it when it was added (the disk was "
            "replaced, the loop's file moved): its next capture makes the replica equal to it",
            common)
    p.add_argument("device", help="a configured block device (not its loop)")
    p = add(block, "attach-all", cmd_attach_all, "attach every entry to its loop device now "
            "(captured when the daemon runs)", common)
    p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    p.add_argument("--force", action="store_true", help="attach even over a mounted or held "
                   "device (its writes there bypass the loop and corrupt the target)")
    p = add(block, "detach-all", cmd_detach_all, "detach the loop devices of every entry now",
            common)
    p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    p = add(block, "mirror", cmd_mirror, "make the target equal to the device (from its "
            "offset): 1 MiB blocks whose hashes differ are copied, with a progress bar (via the "
            "daemon)", common)
    p.add_argument("device", help="a configured block device (not its loop)")
    p = add(block, "verify", cmd_verify, "compare a device with its target by block hashes; "
            "print the differing ranges (via the daemon; exit 1 when one differs; with --json "
            "each range is [start, end): byte offsets from the entry's offset, the end not in it)",
            common)
    p.add_argument("device", help="a configured block device (not its loop)")
