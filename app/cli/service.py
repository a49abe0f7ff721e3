"""`mirrorsetup service …`: the systemd unit and the .mount units for the entries' loops."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from app.cli.common import add, group, require, store
from app.cli.output import dump, say

UNIT_NAME = "mirrorsetup.service"
UNIT_DIR = "/etc/systemd/system"
UNIT_SOURCE = Path(__file__).resolve().parents[2] / "packaging" / UNIT_NAME


def unit_text(executable: str | None = None) -> str:
    """The packaged unit with ExecStart pointing at this installation's `mirrorsetup`."""
    exe = (executable or shutil.which("mirrorsetup")
           or os.path.join(os.path.dirname(sys.executable), "mirrorsetup"))
    return UNIT_SOURCE.read_text().replace("@MIRRORSETUP@", os.path.abspath(exe))


def cmd_install(args) -> int:
    from app.cli import manpage
    from app.engine.mountunits import install_text
    root = Path(args.root or "/")
    unit = root / UNIT_DIR.lstrip("/") / UNIT_NAME
    exe = sys.argv[0] if os.path.basename(sys.argv[0]) == "mirrorsetup" else None
    install_text(str(unit), unit_text(exe))
    page = root / manpage.MAN_DIR.lstrip("/") / manpage.MAN_NAME  # the unit's Documentation=
    install_text(str(page), manpage.page())
    if args.json:
        dump({"installed": str(unit), "manual": str(page)})
    else:
        say(f"installed {unit}")
        say(f"installed {page} (man mirrorsetup)")
        if not args.root:
            say("next: systemctl daemon-reload && systemctl enable --now mirrorsetup")
    return 0


def cmd_man(args) -> int:
    from app.cli import manpage
    sys.stdout.write(manpage.page())
    return 0


def cmd_mount_units(args) -> int:
    """Show (default) or write (--write) .mount units for the entries' fixed loop devices."""
    from app.engine import mountunits
    from app.services.mounts import read_mountinfo
    config = require(store(args).load)
    plan = mountunits.plan(config.block, read_mountinfo(), root=args.root or "/")
    if args.write:
        mountunits.write_all(plan)
    if args.json:
        dump(plan.to_json())
        return 0 if plan.ok else 1
    for unit in plan.units:
        if args.write:
            say(f"wrote {unit.path}" if unit.written else f"not written: {unit.path}")
        else:
            say(f"==> {unit.path}{' (refused: see below)' if unit.refused else ''}")
            print(unit.text)
    for skip in plan.skipped:  # (they make the exit status 1: their lines go to stderr)
        print(f"no unit for {skip['device']}: {skip['reason']}", file=sys.stderr)
    for problem in plan.problems:
        print(f"problem: {problem['device']}: {problem['message']}", file=sys.stderr)
    if not config.block:
        say("no block device entries are configured")
    written = [u.name for u in plan.units if u.written]
    if not args.write and any(not u.refused for u in plan.units):
        say("nothing written; run again with --write to write these units")
    elif written and args.root:
        say(f"next: systemctl --root {shlex.quote(args.root)} enable {shlex.join(written)}")
    elif written:
        say(f"next: systemctl daemon-reload && systemctl enable {shlex.join(written)}")
    return 0 if plan.ok else 1


def register(sub, common) -> None:
    service = group(sub, "service", "systemd service", "service actions")
    p = add(service, "install", cmd_install, f"put {UNIT_NAME} into {UNIT_DIR}, and this "
            "manual page, mirrorsetup(8), into /usr/local/share/man/man8", common)
    p.add_argument("--root", default=None, help="install below this directory instead of / "
                   "(tests, images)")
    add(service, "man", cmd_man, "print the manual page, mirrorsetup(8), as roff (read it with "
        "`mirrorsetup service man | man -l -`)", common)
    p = add(service, "mount-units", cmd_mount_units, "show (or --write) systemd .mount units "
            "that mount the entries' fixed loop devices after mirrorsetup.service", common)
    p.add_argument("--write", action="store_true", help=f"write them into {UNIT_DIR} "
                   "(default: only show the text)")
    p.add_argument("--root", default=None, help="write below this directory instead of / "
                   "(tests, images)")
