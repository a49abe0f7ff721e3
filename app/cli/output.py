"""How the CLI prints, as util-linux does: results on stdout, failures and refusals on stderr,
`--json` results on stdout (the human message of a failure still goes to stderr). Every text
cell goes through `shown()`, so a legal newline in a path cannot break a line-based reader."""

from __future__ import annotations

import errno as errno_module
import json
import sys
from typing import Any

from app.services.results import MirrorError, Outcome, Result, exit_code
from app.services.units import human_size, shown

MARK = {Outcome.OK: "ok", Outcome.UNCHANGED: "unchanged", Outcome.PENDING: "PENDING",
        Outcome.SKIPPED: "plan", Outcome.FAILED: "FAILED"}
PROG = "mirrorsetup"


def dump(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def say(message: str) -> None:
    """One human line on stdout."""
    print(shown(message))


def complain(message: str) -> None:
    """One human line on stderr, prefixed with the program's name."""
    print(f"{PROG}: {shown(message)}", file=sys.stderr)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(shown(str(v)) for v in value) or "-"
    return shown(str(value))


def print_table(rows: list[dict[str, Any]], columns: list[str], *, as_json: bool = False) -> None:
    if as_json:
        dump(rows)
        return
    if not rows:
        print("(no entries)")
        return
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def result_line(r: Result) -> str:
    return f"{MARK[r.outcome]:>9}  {shown(r.target)}: {shown(r.message)}"


def report(results: list[Result], *, as_json: bool = False) -> int:
    """One line per entry, in the TUI's words; failed lines go to stderr. The exit code: 0, 1
    when an entry failed, 2 when what failed was refused and nothing was done."""
    if as_json:
        dump([r.to_json() for r in results])
    elif not results:
        print("(nothing to do: no entries configured)")
    else:
        for r in results:
            if not r.failed:
                print(result_line(r))
    return failures(results)


def failures(results: list[Result]) -> int:
    """The failed entries' lines on stderr; the exit code (results.exit_code)."""
    for r in results:
        if r.failed:
            print(result_line(r), file=sys.stderr)
    return exit_code(results)


def refusal(exc: MirrorError, *, as_json: bool = False) -> int:
    """A request refused before anything was changed: stderr, and JSON on stdout. Exit 2."""
    complain(str(exc))
    if as_json:
        err = exc.errno if isinstance(exc.errno, int) else None
        dump({"error": str(exc), "errno": err,
              "errno_name": errno_module.errorcode.get(err) if err else None,
              **({"line": exc.line, "key": exc.key} if hasattr(exc, "line") else {})})
    return 2


def print_devices(devices, notes: dict, *, as_json: bool = False) -> None:
    """The picker's list; `notes` (entries.picker_notes): which are replicated, which are an
    entry's loop, said first in "in use" as the TUI's picker says it."""
    from app.services.entries import picker_note

    def note(d) -> str | None:
        return picker_note(notes, d)
    if as_json:
        dump([{**d.to_json(), "replicated": note(d)} for d in devices])
        return
    rows = [{"path": d.path, "size": human_size(d.size), "type": d.type, "fstype": d.fstype,
             "mountpoints": list(d.mountpoints),
             "in use": [n for n in [note(d)] if n] + list(d.in_use),
             "excluded": d.excluded} for d in devices]
    print_table(rows, ["path", "size", "type", "fstype", "mountpoints", "in use", "excluded"])


def print_status(snap, *, as_json: bool = False) -> None:
    """The dashboard's content as text: entries, their live state and the daemon's figures."""
    if as_json:
        dump(snap.to_json())
        return
    print("File-system replication")
    rows = []
    for s in snap.filesystem:
        f = s.figures
        rows.append({"path": s.entry.path, "state": "INVALID" if s.problem else s.state,
                     "atime": s.entry.replicate_atime, "target": s.entry.target,
                     "replication": _replication(f),
                     "queued": human_size(f.bytes_queued) if f else None,
                     "lag s": _lag(f)})
    print_table(rows, ["path", "state", "atime", "target", "replication", "queued", "lag s"])
    print("\nBlock-device replication")
    rows = []
    for s in snap.block:
        f = s.figures
        rows.append({"device": s.entry.device, "state": "INVALID" if s.problem else s.state,
                     "capture": s.capture or None, "loop wanted": s.entry.loop, "loop": s.loop,
                     "offset": s.entry.offset, "target": s.entry.target,
                     "replication": _replication(f) if f and f.captured else None,
                     "queued": human_size(f.bytes_queued) if f and f.captured else None,
                     "lag s": _lag(f), "mounted via loop": list(s.loop_mounts)})
    print_table(rows, ["device", "state", "capture", "loop wanted", "loop", "offset", "target",
                       "replication", "queued", "lag s", "mounted via loop"])
    summary = snap.summary
    if snap.engine_error:
        print(f"\nDaemon: {shown(snap.engine_error)}")
    elif summary is None:
        print("\nDaemon: not running")
    else:
        print(f"\nDaemon: running (pid {summary.pid})")
    if snap.warnings:
        print("\nWarnings")
        for w in snap.warnings:
            print(f"  {w.level.upper()}: {shown(w.subject)}: {shown(w.message)}")


def _replication(f) -> str | None:
    """The replication state in one cell: established / catching up x % / behind, and the
    connection when it is not simply up."""
    if f is None or not f.captured:
        return None
    from app.services.status import short_connection
    if f.error:  # e.g. the worker has not answered for N s (the whole of it: in the warnings)
        return "not answering" if "not answered" in f.error else "error"
    text = f.replication or f.state
    if f.connection and f.connection not in ("local", "none", "connected"):
        text += f" ({short_connection(f.connection)})"  # the whole of it: in the warnings
    return text


def _lag(f) -> str | None:
    return None if f is None or f.lag_seconds is None else f"{f.lag_seconds:.1f}"
