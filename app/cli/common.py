"""What every subcommand shares: its services from the global options, the request checks
that make a mistake a refusal (exit 2) before anything is tried, and the parser helpers."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable

from app.services.results import MirrorError, Refusal
from app.services.units import parse_size

EXIT_CODES = """\
exit status (every command):
  0  done: every entry is ok, unchanged, pending (e.g. a deferred detach) or planned
  1  some entry failed; its line is on stderr (the others on stdout)
  2  refused before anything changed: bad arguments, an entry that is not configured or
     not valid, a configuration file that cannot be read, a daemon that is needed but not
     running (or works from another configuration file), what is still in use (a target
     an entry replicates to, an entry a process holds at a switch-over or a fail-back, a
     promoted replica in use on its host at a fail-back or `replica resolve`), or an entry
     in a state the action is not for (mounting, mirroring or verifying one switched
     over, removing one, or switching it over again)"""


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose refusal of bad arguments (exit 2) also gives `--json`'s refusal
    object on stdout, as every other refusal does: a script read nothing there for
    `--offset 10X` but an object for `--queue-limit 10X`. Its subcommands' parsers are of this
    class too (argparse makes them of their parent's)."""

    json_wanted = False  # set by main() from the command line, before parsing

    def error(self, message: str):
        if Parser.json_wanted:
            from app.cli.output import dump
            dump({"error": f"{self.prog}: {message}", "errno": errno.EINVAL,
                  "errno_name": "EINVAL"})
            sys.stdout.flush()
        super().error(message)


class Refused(Refusal):
    """The request itself is wrong or cannot be served: exit 2, nothing changed."""


def store(args, *, missing_ok: bool = False):
    """The configuration. A file named by --config or $MIRRORSETUP_CONFIG that does not exist
    is refused (ENOENT), as util-linux refuses a mistyped file to read, unless `missing_ok`:
    a command that adds an entry creates it, and the manual commands need none. The default
    file's absence is a fresh installation: nothing configured yet."""
    import os

    from app.services.config import CONFIG_ENV, ConfigStore
    named = args.config is not None or bool(os.environ.get(CONFIG_ENV))
    return ConfigStore(args.config, must_exist=named and not missing_ok)


def control(args):
    from app.services.control import ControlClient
    return ControlClient(args.socket)


def replication(args, *, missing_ok: bool = False):
    from app.services.replication import Replication
    return Replication(store(args, missing_ok=missing_ok), control(args),
                       getattr(args, "state_dir", None))


def require(call: Callable, *a, **kw):
    """Run a check; its MirrorError (with the errno a missing object deserves) is a refusal.
    The entries module is loaded for a refusal only: attach-all and detach-all need none of it."""
    try:
        return call(*a, **kw)
    except MirrorError as exc:
        from app.services.entries import with_errno
        from app.services.results import ConfigError, ConfigErrors
        with_errno(exc)  # a missing object: ENOENT
        if exc.errno is None and isinstance(exc, ConfigError):  # an entry or file that is wrong
            exc.errno = errno.EINVAL  # (--json said "errno": null for `fs add /`, "is inside …")
        refused = Refused(exc.message, errno=exc.errno, obj=exc.obj)
        if isinstance(exc, ConfigErrors):  # every problem at once: each said on its own line
            refused.errors = exc.errors
        raise refused from exc


def require_daemon(rep) -> None:
    """Refused unless the configuration can be read, and the daemon answers and works from
    this configuration file."""
    require(rep.store.load)
    if require(rep.daemon) is None:  # (its ping is bounded; a silent daemon is refused there)
        require(rep.control.request, "ping")  # none answers: the client says why


def accept(rep, args, kind: str, key: str) -> int:
    """`fs accept-filesystem` / `block accept-device` of the entry `key`: the result says the
    next step (the daemon does not try a refused capture again by itself)."""
    from dataclasses import replace

    from app.cli.output import report
    from app.services.layout import command
    from app.services.results import Outcome
    r = rep.accept_identity(kind, key)
    if r.outcome is Outcome.OK:
        from app.services.control import ANSWER_SECONDS
        if rep.control is not None and rep.control.is_running(ANSWER_SECONDS):
            then = command(*(("fs", "mount-all") if kind == "fs" else ("block", "attach-all")))
            then += " captures it now"
        else:
            then = f"the daemon captures it when it starts ({command('daemon', 'start')})"
        r = replace(r, message=f"{r.message}; {then}")
    return report([r], as_json=args.json)


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add(parent, name: str, func: Callable, help: str, common) -> argparse.ArgumentParser:
    p = parent.add_parser(name, parents=[common], help=help, description=help,
                          epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def group(sub, name: str, help: str, title: str):
    return sub.add_parser(name, help=help, description=help, epilog=EXIT_CODES,
                          formatter_class=argparse.RawDescriptionHelpFormatter).add_subparsers(
        title=title, metavar="ACTION", required=True)


def replica_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adopt-target", action="store_true", help="replace the contents of a target "
                   "that is not empty and is no replica of ours (otherwise refused)")
    p.add_argument("--queue-limit", metavar="SIZE", help="unreplicated changes kept at most "
                   "(default: a tenth of the state directory's file system, 64 MiB-16 GiB)")
    p.add_argument("--on-full", choices=("pull-ahead", "block"), help="when the queue is full: "
                   "track what changed and resync it later (pull-ahead, the default) or make "
                   "writers wait (block)")


def target_options(p: argparse.ArgumentParser, what: str) -> None:
    """`fs set` / `block set`: another target for an entry, or none."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--target", help=f"{what} the changes are replicated to from now on, or "
                       "NAME:PATH on a remote target; its next capture makes it equal to the "
                       "entry (the old replica is left as it is)")
    which.add_argument("--no-target", action="store_true", help="replicate the entry nowhere "
                       "(its changes are still captured)")
    p.add_argument("--adopt-target", action="store_true", help="with --target: replace the "
                   "contents of a target that is not empty and is no replica of ours "
                   "(otherwise refused)")


def set_target_of(args, kind: str, key: str) -> list:
    """The results of `fs set`/`block set`'s --target/--no-target, [] when neither was given."""
    if args.adopt_target and args.target is None:
        raise Refused("--adopt-target goes with --target (the target to adopt); nothing was "
                      "changed", errno=errno.EINVAL)
    if args.target is None and not args.no_target:
        return []
    return replication(args).set_entry_target(kind, key, args.target, adopt=args.adopt_target)


def keep_primary_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-replica-primary", action="store_true", help="of an entry switched over "
                   "to its remote replica, for good (a planned migration): the replica stays "
                   "primary there, this host's copy is made writable again and the entry is "
                   "removed (otherwise refused until a fail-back or resolve)")


def loop_options(p: argparse.ArgumentParser, *, sizes: Callable = size) -> None:
    """`sizes`: str keeps --offset and --sizelimit as typed, to be checked with the entry's
    other fields (entries.window_fields), not refused alone before them by argparse."""
    p.add_argument("--loop", metavar="/dev/loopN", help="always use this loop device "
                   "(default: the first free one)")
    p.add_argument("--offset", type=sizes, default=0, help="start this far into the device "
                   "(bytes, or 512, 4K, 1M …; a multiple of 512)")
    p.add_argument("--sizelimit", type=sizes, default=0, help="use at most this many bytes")
    p.add_argument("--read-only", action="store_true", help="attach read-only")
