"""The engine's CLI commands: `daemon`, `fs mount-all|unmount-all|mirror|verify`, `service install|mount-units`.

The lead's app/cli.py owns the parser; it calls `register(sub, fs, common)` (or the three
`register_*` functions). Nothing heavy is imported here: trio and pyfuse3 load inside handlers,
so `import app.cli` stays fast. Every handler returns an exit code (0 ok, 1 an entry failed,
2 refused) and prints the same words as the TUI, or JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

UNIT_NAME = "mirrorsetup.service"
UNIT_DIR = "/etc/systemd/system"
UNIT_SOURCE = Path(__file__).resolve().parent.parent.parent / "packaging" / UNIT_NAME


def _print_results(args, results) -> int:
    from app.cli_output import print_results
    from app.services.results import exit_code
    print_results(results, as_json=getattr(args, "json", False))
    return exit_code(results)


def _client():
    from app.services.control import ControlClient
    return ControlClient()


# -- handlers ------------------------------------------------------------------------------

def cmd_daemon(args) -> int:
    from app.engine import daemon
    return daemon.run(args)


def _replication(args):
    """The same service calls as the TUI: they refuse a daemon working from another config."""
    from app.services.config import ConfigStore
    from app.services.replication import Replication
    return Replication(ConfigStore(getattr(args, "config", None)), _client())


def cmd_mount_all(args) -> int:
    _client().request("ping")  # no daemon: a refusal (exit 2) that says how to start it
    return _print_results(args, _replication(args).mount_all(force=args.force))


def cmd_unmount_all(args) -> int:
    _client().request("ping")
    return _print_results(args, _replication(args).unmount_all(force=args.force))


def cmd_mirror(args) -> int:
    from app.services.results import Result
    as_json = getattr(args, "json", False)

    def progress(p: dict) -> None:
        if not as_json and sys.stderr.isatty():
            sys.stderr.write(f"\r  {p.get('files', 0)} files, {p.get('bytes', 0) >> 20} MiB copied")
            sys.stderr.flush()

    reply = _client().request("mirror", path=os.path.realpath(args.path), progress=progress)
    if not as_json and sys.stderr.isatty():
        sys.stderr.write("\n")
    return _print_results(args, [Result.from_json(r) for r in reply["results"]])


def cmd_verify(args) -> int:
    from app.services.results import Result
    reply = _client().request("verify", path=os.path.realpath(args.path))
    diffs = reply["differences"]
    if getattr(args, "json", False):
        print(json.dumps({"differences": diffs, "results": reply["results"]}, indent=2))
    else:
        for d in diffs:
            print(f"  {d['path']!r}: {d['what']} (source {d['source']}, target {d['target']})")
        _print_results(args, [Result.from_json(r) for r in reply["results"]])
    return 0 if not diffs else 1


def unit_text(executable: str | None = None) -> str:
    """The packaged unit with ExecStart pointing at this installation's `mirrorsetup`."""
    exe = executable or shutil.which("mirrorsetup") or os.path.join(os.path.dirname(sys.executable), "mirrorsetup")
    text = UNIT_SOURCE.read_text()
    return text.replace("@MIRRORSETUP@", os.path.abspath(exe))


def cmd_service_install(args) -> int:
    dest_dir = Path(args.root or "/") / UNIT_DIR.lstrip("/")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / UNIT_NAME
    exe = sys.argv[0] if os.path.basename(sys.argv[0]) == "mirrorsetup" else None
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(unit_text(exe))
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    if getattr(args, "json", False):
        print(json.dumps({"installed": str(dest)}))
    else:
        print(f"installed {dest}")
        if not args.root:
            print("next: systemctl daemon-reload && systemctl enable --now mirrorsetup")
    return 0


def cmd_service_mount_units(args) -> int:
    """Show (default) or write (--write) .mount units for the entries' fixed loop devices."""
    import shlex
    from app.engine import mountunits
    from app.services.config import ConfigStore
    from app.services.mounts import read_mountinfo
    config = ConfigStore(getattr(args, "config", None)).load()
    plan = mountunits.plan(config.block, read_mountinfo(), root=args.root or "/")
    if args.write:
        mountunits.write_all(plan)
    if getattr(args, "json", False):
        print(json.dumps(plan.to_json(), indent=2))
        return 0 if plan.ok else 1
    for unit in plan.units:
        if args.write:
            print(f"wrote {unit.path}" if unit.written else f"not written: {unit.path}")
        else:
            print(f"==> {unit.path}{' (refused: see below)' if unit.refused else ''}")
            print(unit.text)
    for skip in plan.skipped:
        print(f"no unit for {skip['device']}: {skip['reason']}")
    for problem in plan.problems:
        print(f"problem: {problem['device']}: {problem['message']}")
    if not config.block:
        print("no block device entries are configured")
    written = [u.name for u in plan.units if u.written]
    if not args.write and any(not u.refused for u in plan.units):
        print("nothing written; run again with --write to write these units")
    elif written and args.root:
        print(f"next: systemctl --root {shlex.quote(args.root)} enable {shlex.join(written)}")
    elif written:
        print(f"next: systemctl daemon-reload && systemctl enable {shlex.join(written)}")
    return 0 if plan.ok else 1


# -- registration --------------------------------------------------------------------------

def _add(parent, name: str, func, help: str, common=None) -> argparse.ArgumentParser:
    p = parent.add_parser(name, parents=[common] if common else [], help=help, description=help)
    p.set_defaults(func=func)
    return p


def register_daemon(subparsers, common=None) -> None:
    p = _add(subparsers, "daemon", cmd_daemon, "run the replication daemon in the foreground", common)
    p.add_argument("--socket", default=None, help="control socket (default: $MIRRORSETUP_SOCKET "
                   "or /run/mirrorsetup/control.sock)")
    p.add_argument("--state-dir", default="/var/lib/mirrorsetup", help="journals and replication state")
    if common is None:
        p.add_argument("--config", default=None, help="configuration file")


def register_fs_actions(fs_subparsers, common=None) -> None:
    p = _add(fs_subparsers, "mount-all", cmd_mount_all, "mount mirrorfs on every entry now (via the daemon)", common)
    p.add_argument("--force", action="store_true", help=argparse.SUPPRESS)
    p = _add(fs_subparsers, "unmount-all", cmd_unmount_all, "unmount mirrorfs from every entry now", common)
    p.add_argument("--force", action="store_true", help="lazy-unmount even when files are open")
    p = _add(fs_subparsers, "mirror", cmd_mirror, "copy the whole tree of an entry to its target", common)
    p.add_argument("path")
    p = _add(fs_subparsers, "verify", cmd_verify, "compare an entry with its target; list every difference", common)
    p.add_argument("path")


def register_service(subparsers, common=None) -> None:
    service = subparsers.add_parser("service", help="systemd service").add_subparsers(
        title="service actions", metavar="ACTION", required=True)
    p = _add(service, "install", cmd_service_install, f"put {UNIT_NAME} into {UNIT_DIR}", common)
    p.add_argument("--root", default=None, help="install below this directory instead of / (tests, images)")
    p = _add(service, "mount-units", cmd_service_mount_units, "show (or --write) systemd .mount "
             "units that mount the entries' fixed loop devices after mirrorsetup.service", common)
    p.add_argument("--write", action="store_true", help=f"write them into {UNIT_DIR} "
                   "(default: only show the text)")
    p.add_argument("--root", default=None, help="write below this directory instead of / (tests, images)")


def register(sub, fs, common=None) -> None:
    """What app/cli.py calls: everything above in one go."""
    register_daemon(sub, common)
    register_fs_actions(fs, common)
    register_service(sub, common)


add_engine_commands = register
