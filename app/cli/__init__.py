"""`mirrorsetup …`: the scriptable face, over the same service calls as the TUI. One module per
subcommand group; the engine prints nothing here (it is only asked to run, for `daemon`).

Conventions (util-linux's): results on stdout, failures and refusals on stderr, `--json`
results on stdout; one exit-code rule for every command (common.EXIT_CODES). Textual is
imported only by the `tui` path, so scripted calls start fast; `serve-target`, which sshd
starts for every replication session, builds only its own parser.
"""

from __future__ import annotations

import argparse
import sys


def cmd_tui(args) -> int:
    from app.ui import run_tui
    return run_tui(config_path=args.config, control_socket=args.socket)


# Which module registers each command: a call that names its command builds only that one's
# parser (17 ms of the 171 of `block detach-all` with an empty configuration here).
COMMANDS = {"fs": "fs", "block": "block", "manual": "manual", "status": "status",
            "daemon": "daemon", "service": "service", "config": "config", "target": "target",
            "serve-target": "target", "switchover": "replica", "failback": "replica",
            "replica": "replica", "capture": "capture"}
_GROUPS = tuple(dict.fromkeys(COMMANDS.values()))  # every module once, in the help's order


def command_of(argv: list[str]) -> str | None:
    """The command argv names, when nothing before it could mean anything else: only the
    common options, spelled out (`--config PATH`, `--config=PATH`, `--socket …`, `--json`).
    None (build every parser) for help, the version, an abbreviated option or no command."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "--socket"):
            i += 2
        elif arg == "--json" or arg.startswith(("--config=", "--socket=")):
            i += 1
        elif arg in COMMANDS or arg == "tui":
            return arg
        else:
            return None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (with `command`, one of COMMANDS or "tui") only the parts that
    parse that command's calls: the same results and errors for them."""
    import importlib
    from app.cli.common import EXIT_CODES, Parser, add
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help="configuration file (default: $MIRRORSETUP_CONFIG or "
                             "/etc/mirrorsetup/replication.toml)")
    common.add_argument("--socket", default=argparse.SUPPRESS, metavar="PATH",
                        help="the daemon's control socket (default: $MIRRORSETUP_SOCKET or "
                             "/run/mirrorsetup/control.sock)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output on stdout")

    parser = Parser(
        prog="mirrorsetup", parents=[common], epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Choose what is replicated, and see live whether it is. Without a "
                    "command: the full-screen console.")
    from app import __version__
    parser.add_argument("-V", "--version", action="version", version=f"mirrorsetup {__version__}",
                        help="print the version and exit")
    parser.set_defaults(func=cmd_tui)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    if command in (None, "tui"):
        add(sub, "tui", cmd_tui, "start the full-screen console (the default)", common)
    if command is None:
        groups = _GROUPS
    else:
        groups = (COMMANDS[command],) if command in COMMANDS else ()
    for name in groups:
        importlib.import_module(f"app.cli.{name}").register(sub, common)
    return parser


def serve_target(argv: list[str]) -> int:
    """`mirrorsetup serve-target --root DIR`, as the replication key's forced command runs it:
    without the parser of every other command and their modules (about 35 ms of each
    session's start, in series with the ssh handshake)."""
    return run_agent(serve_target_parser().parse_args(argv).root)


def serve_target_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirrorsetup serve-target",
                                description="The target side: serve replicas below --root "
                                            "(run by sshd as the forced command of the "
                                            "replication key).")
    p.add_argument("--root", required=True, metavar="DIR",
                   help="the directory whose replicas this host keeps; nothing is written "
                        "outside it")
    return p


def run_agent(root: str) -> int:
    import os
    from app.engine import agent
    code = agent.main(root)  # its journal and replica state are closed and synced by now
    # End here: a thread still blocked reading the session's input (the fail-back's replies)
    # made the interpreter's shutdown abort ("Fatal Python error: _enter_buffered_busy").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve-target"]:
        return serve_target(argv[1:])
    from app.cli.output import refusal
    from app.services.results import MirrorError
    from app.cli.common import Parser
    words = argv[:argv.index("--")] if "--" in argv else argv
    Parser.json_wanted = "--json" in words
    args = build_parser(command_of(argv)).parse_args(argv)
    # --config/--socket/--json may stand before or after the subcommand (SUPPRESS keeps either).
    for name, default in (("config", None), ("socket", None), ("json", False),
                          ("state_dir", None)):
        setattr(args, name, getattr(args, name, default))
    try:
        return args.func(args)
    except MirrorError as exc:
        return refusal(exc, as_json=args.json)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
