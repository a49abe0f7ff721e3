"""`mirrorsetup daemon`: run the daemon in the foreground (what the systemd unit's ExecStart
runs), or start / stop / restart / status it as a service (app.services.daemonctl)."""

from __future__ import annotations

import argparse
import errno
import time

from app.cli.common import EXIT_CODES, Refused
from app.cli.output import complain, dump, report, say


def settings(args):
    from app.services.daemonctl import DaemonSettings
    return DaemonSettings.resolve(args.config, args.socket, args.state_dir)


def cmd_run(args) -> int:
    from app.engine import zygote
    zygote.start_early()  # the worker template's imports run beside the daemon's own
    from app.engine import daemon
    s = settings(args)
    args.socket, args.state_dir = s.socket, s.state_dir
    return daemon.run(args)


def _refuse_foreign(s) -> None:
    from app.services import daemonctl
    info = daemonctl.describe(s)
    if info.running and info.problem:
        raise Refused(info.problem, obj=s.socket,
                      errno=None if info.answers else errno.ETIMEDOUT)


def cmd_start(args) -> int:
    from app.services import daemonctl
    s = settings(args)
    _refuse_foreign(s)
    return report([daemonctl.start(s)], as_json=args.json)


def cmd_stop(args) -> int:
    from app.services import daemonctl
    s = settings(args)
    _refuse_foreign(s)
    return report([daemonctl.stop(s, say=lambda what: complain(f"stopping the daemon: {what}"))],
                  as_json=args.json)


def cmd_restart(args) -> int:
    from app.services import daemonctl
    s = settings(args)
    _refuse_foreign(s)
    return report([daemonctl.restart(s)], as_json=args.json)


def cmd_status(args) -> int:
    """0 when a daemon for this configuration runs, 1 when none does (or another one does)."""
    from app.services import daemonctl
    info = daemonctl.describe(settings(args))
    if args.json:
        dump(info.to_json())
    else:
        for label, value in daemonctl.info_lines(info, time.time()):
            say(f"{label + ':':<17}{value}")
    if info.problem:
        complain(info.problem)
    return 0 if info.running and not info.problem else 1


def register(sub, common) -> None:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--state-dir", default=argparse.SUPPRESS, metavar="DIR",
                         help="journals and replication state (default: $MIRRORSETUP_STATE_DIR "
                              "or /var/lib/mirrorsetup)")
    p = sub.add_parser("daemon", parents=[common, options], help="the replication daemon: run "
                       "it in the foreground, or start/stop/restart/status it",
                       description="Without an action: run the replication daemon in the "
                       "foreground (the systemd unit's ExecStart). Its log is its stderr; "
                       "started with `daemon start` outside systemd, the log is daemon.log "
                       "beside the control socket.", epilog=EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_run)
    actions = p.add_subparsers(title="daemon actions", metavar="ACTION", required=False)
    both = [common, options]
    for name, func, help in (
            ("start", cmd_start, "start the daemon (systemctl with systemd, else a detached "
                                 "process logging to daemon.log beside the socket)"),
            ("stop", cmd_stop, "stop the daemon (entries are drained and unmounted)"),
            ("restart", cmd_restart, "start a new daemon that takes over every capture (nothing is "
                                     "unmounted; under systemd too)"),
            ("status", cmd_status, "is it running: pid, uptime, config, socket, state "
                                   "directory, log (exit 1 when not running)")):
        q = actions.add_parser(name, parents=both, help=help, description=help, epilog=EXIT_CODES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        q.set_defaults(func=func)
