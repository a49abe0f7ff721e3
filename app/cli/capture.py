"""`mirrorsetup capture end ID`: end an orphaned capture, the one status names with this
command (its entry was removed while something kept the capture running)."""

from __future__ import annotations

from app.cli.common import add, group, replication, require, require_daemon
from app.cli.output import report


def cmd_end(args) -> int:
    """The daemon looks the capture up before it ends anything: no such capture, or the
    capture of an entry still configured, is a refusal (exit 2), not a failed entry."""
    from app.services.results import Result
    rep = replication(args)
    require_daemon(rep)
    reply = require(rep.control.request, "capture_end", id=args.id)
    return report([Result.from_json(r) for r in reply.get("results", [])], as_json=args.json)


def register(sub, common) -> None:
    capture = group(sub, "capture", "the daemon's captures", "capture actions")
    p = add(capture, "end", cmd_end, "end an orphaned capture: its entry is no longer "
            "configured and status names it with this command (via the daemon)", common)
    p.add_argument("id", help="the capture's id, as status shows it (or its entry's path or "
                   "device)")
