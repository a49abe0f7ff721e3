"""`mirrorsetup fs …`: the file-system entries and their mirrorfs mounts."""

from __future__ import annotations

import errno
import sys

from app.cli.common import (Refused, accept, add, group, keep_primary_option, replica_options,
                            replication, require, require_daemon, set_target_of, store,
                            target_options)
from app.cli.output import complain, dump, failures, print_table, report
from app.services.layout import command


def cmd_list(args) -> int:
    from app.services.entries import fs_problem
    from app.services.mounts import read_mountinfo
    s = store(args)
    config = require(s.load)
    rows, table = [], read_mountinfo()
    for e in config.filesystem:
        problem = fs_problem(e, config, s, table)
        rows.append({"path": e.path, "replicate_atime": e.replicate_atime, "target": e.target,
                     "problem": problem})
        if problem:
            complain(f"warning: invalid entry {e.path}: {problem}")
    print_table(rows, ["path", "replicate_atime", "target", "problem"], as_json=args.json)
    return 0


def cmd_add(args) -> int:
    import os

    from app.services.config import FsEntry
    # a relative PATH is the working directory's, as mount(8) and losetup(8) take theirs (and
    # as fs remove/mirror/verify took it already; add alone said "must be an absolute path")
    args.path = os.path.abspath(args.path) if args.path and not os.path.isabs(args.path) else args.path
    rep = replication(args, missing_ok=True)
    opts = dict(adopt_target=args.adopt_target, queue_limit=args.queue_limit, on_full=args.on_full)
    require(rep.store.validate_filesystem, FsEntry(args.path, args.atime, args.target, **opts),
            adding=True)
    return report([rep.add_filesystem(args.path, replicate_atime=args.atime, target=args.target,
                                      **opts)], as_json=args.json)


def cmd_remove(args) -> int:
    from app.services.entries import configured_fs
    rep = replication(args)
    entry = require(configured_fs, rep.store, args.path)
    return report(rep.remove_filesystem(entry.path, force=args.force,
                                        keep_replica_primary=args.keep_replica_primary),
                  as_json=args.json)


def cmd_set(args) -> int:
    from app.services.entries import configured_fs, set_atime
    if args.atime is None and args.target is None and not args.no_target:
        raise Refused("say what to set: --atime, --no-atime, --target DIR or --no-target; "
                      "nothing was changed", errno=errno.EINVAL)
    s = store(args)
    entry = require(configured_fs, s, args.path)
    results = set_target_of(args, "fs", entry.path)
    if args.atime is not None and not any(r.failed for r in results):
        results.append(set_atime(s, s.entry("fs", entry.path), args.atime))
    return report(results, as_json=args.json)


def cmd_accept_filesystem(args) -> int:
    from app.services.entries import configured_fs
    rep = replication(args)
    entry = require(configured_fs, rep.store, args.path)
    return accept(rep, args, "fs", entry.path)


def cmd_mount_all(args) -> int:
    rep = replication(args)
    require_daemon(rep)
    return report(rep.mount_all(), as_json=args.json)


def cmd_unmount_all(args) -> int:
    rep = replication(args)
    require_daemon(rep)
    return report(rep.unmount_all(force=args.force,
                                  say=lambda what: complain(f"unmount-all: {what}")),
                  as_json=args.json)


def cmd_mirror(args) -> int:
    from app.services.entries import configured_fs, fs_mirror
    rep = replication(args)
    entry = require(configured_fs, rep.store, args.path)
    require_daemon(rep)
    bar = not args.json and sys.stderr.isatty()

    def progress(p: dict) -> None:
        if bar:
            sys.stderr.write(f"\r  {p.get('files', 0)} files, {p.get('bytes', 0) >> 20} MiB copied")
            sys.stderr.flush()

    results = fs_mirror(rep, entry.path, progress)
    if bar:
        sys.stderr.write("\n")
    return report(results, as_json=args.json)


def cmd_verify(args) -> int:
    from app.services.entries import configured_fs, describe_difference, fs_verify
    rep = replication(args)
    entry = require(configured_fs, rep.store, args.path)
    require_daemon(rep)
    results, diffs = fs_verify(rep, entry.path)
    if args.json:
        dump({"differences": diffs, "results": [r.to_json() for r in results]})
    for d in [] if args.json else diffs:
        print("  " + describe_difference(d))
    code = failures(results) if args.json else report(results)
    if diffs:
        complain(f"to make the target equal: {command('fs', 'mirror', entry.path)}")
    return max(code, 1 if diffs else 0)


def register(sub, common) -> None:
    fs = group(sub, "fs", "file-system replication entries", "fs actions")
    add(fs, "list", cmd_list, "list the configured directories (an invalid entry is flagged)",
        common)
    p = add(fs, "add", cmd_add, "add the highest directory to capture (never /)", common)
    p.add_argument("path", help="the directory (a relative path is the working directory's)")
    p.add_argument("--atime", action="store_true", help="replicate access times (off by default; "
                   "times at close are always replicated)")
    p.add_argument("--target", help="directory the changes are replicated to, or NAME:PATH on a "
                   "remote target (mirrorsetup target add)")
    replica_options(p)
    p = add(fs, "remove", cmd_remove, "remove an entry (its mirrorfs is unmounted first)", common)
    p.add_argument("path", help="a configured directory")
    p.add_argument("--force", action="store_true", help="lazy-unmount even when files are open")
    keep_primary_option(p)
    p = add(fs, "set", cmd_set, "change an entry's access-time choice (the console's t; it "
            "takes effect at the entry's next mount) or its target (a directory captured now "
            "is unmounted and mounted again)", common)
    p.add_argument("path", help="a configured directory")
    atime = p.add_mutually_exclusive_group()
    atime.add_argument("--atime", dest="atime", action="store_true", default=None,
                       help="replicate access times")
    atime.add_argument("--no-atime", dest="atime", action="store_false",
                       help="do not replicate access times (times at close always are)")
    target_options(p, "directory")
    p = add(fs, "accept-filesystem", cmd_accept_filesystem, "take the file system the entry's "
            "directory lies on as it is now, although it is not the one recorded for it when it "
            "was added (the data was moved there on purpose): its next capture makes the "
            "replica equal to it", common)
    p.add_argument("path", help="a configured directory")
    add(fs, "mount-all", cmd_mount_all, "mount mirrorfs on every entry now (via the daemon)",
        common)
    p = add(fs, "unmount-all", cmd_unmount_all, "unmount mirrorfs from every entry now (via the "
            "daemon)", common)
    p.add_argument("--force", action="store_true", help="lazy-unmount even when files are open: "
                   "the path is detached now, the capture serves open files until they close")
    p = add(fs, "mirror", cmd_mirror, "make an entry's target equal to it: files that differ "
            "are copied, files the entry does not have are deleted from the target (via the "
            "daemon)", common)
    p.add_argument("path", help="a configured directory")
    p = add(fs, "verify", cmd_verify, "compare an entry with its target; list every difference "
            "(exit 1 when there is one)", common)
    p.add_argument("path", help="a configured directory")
