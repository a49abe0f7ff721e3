"""`mirrorsetup capture end ID`: end an orphaned capture, the one status names with this
command (its entry was removed while something kept the capture running)."""

from __future__ import annotations

from app.cli.common import add, group, replication, require_daemon
from app.cli.output import report


def cmd_end(args) -> int:
    rep = replication(args)
    require_daemon(rep)
    return report(rep.end_capture(args.id), as_json=args.json)


def register(sub, common) -> None:
    capture = group(sub, "capture", "the daemon's captures", "capture actions")
    p = add(capture, "end", cmd_end, "end an orphaned capture: its entry is no longer "
            "configured and status names it with this command (via the daemon)", common)
    p.add_argument("id", help="the capture's id, as status shows it (or its entry's path or "
                   "device)")
