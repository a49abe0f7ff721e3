"""How the CLI prints: plain aligned columns for people, JSON (`--json`) for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

from app.services.results import Outcome, Result
from app.services.units import human_size

_MARK = {Outcome.OK: "ok", Outcome.UNCHANGED: "unchanged", Outcome.PENDING: "PENDING",
         Outcome.SKIPPED: "plan", Outcome.FAILED: "FAILED"}


def _dump(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "-"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: list[str], *, as_json: bool = False) -> None:
    if as_json:
        _dump(rows)
        return
    if not rows:
        print("(no entries)")
        return
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def print_results(results: list[Result], *, as_json: bool = False) -> None:
    """One line per entry, the same words the TUI shows; failures also go to stderr's eye."""
    if as_json:
        _dump([r.to_json() for r in results])
        return
    if not results:
        print("(nothing to do: no entries configured)")
    for r in results:
        print(f"{_MARK[r.outcome]:>9}  {r.target}: {r.message}")


def print_devices(devices, *, as_json: bool = False) -> None:
    if as_json:
        _dump([d.to_json() for d in devices])
        return
    rows = [{"path": d.path, "size": human_size(d.size), "type": d.type, "fstype": d.fstype,
             "mountpoints": list(d.mountpoints), "in use": list(d.in_use),
             "excluded": d.excluded} for d in devices]
    print_table(rows, ["path", "size", "type", "fstype", "mountpoints", "in use", "excluded"])


def _replication(row) -> dict:
    """An entry's replication columns from the daemon's typed row (dashes without one)."""
    from app.services.status import replication_text
    if row is None:
        return {"replication": None, "queued": None, "lag s": None}
    return {"replication": replication_text(row).split(" · ")[0], "queued": human_size(row.bytes_queued),
            "lag s": row.lag_seconds}


def print_status(snap, *, as_json: bool = False) -> None:
    if as_json:
        _dump(snap.to_json())
        return
    print("File-system replication")
    print_table([{"path": s.entry.path, "state": s.state, "atime": s.entry.replicate_atime,
                  "target": s.entry.target, **_replication(s.engine)} for s in snap.filesystem],
                ["path", "state", "atime", "target", "replication", "queued", "lag s"])
    print("\nBlock-device replication")
    print_table([{"device": s.entry.device, "state": s.state, "capture": s.capture or None,
                  "loop wanted": s.entry.loop, "loop": s.loop, "offset": s.entry.offset,
                  "target": s.entry.target, **_replication(s.engine),
                  "mounted via loop": list(s.loop_mounts)} for s in snap.block],
                ["device", "state", "capture", "loop wanted", "loop", "offset", "target",
                 "replication", "queued", "lag s", "mounted via loop"])
    if snap.engine_error:
        print(f"\nDaemon: {snap.engine_error}")
    elif snap.engine is None:
        print("\nDaemon: not running")
    if snap.warnings:
        print("\nWarnings")
        for w in snap.warnings:
            print(f"  {w.level.upper()}: {w.subject}: {w.message}")
