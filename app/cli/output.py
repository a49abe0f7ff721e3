"""How the CLI prints, as util-linux does: results on stdout, failures and refusals on stderr,
`--json` results on stdout (the human message of a failure still goes to stderr). Every text
cell goes through `shown()`, so a legal newline in a path cannot break a line-based reader.
json and textwrap are imported where used, typing only by type checkers: every command loads
this module, and with shlex (services.layout) they were 7-16 ms of each `block attach-all`."""

from __future__ import annotations

import errno as errno_module
import os
import shutil
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from app.services.results import MirrorError, Outcome, Result, exit_code
from app.services.units import human_size, shown

# each result's word (Result.word: the TUI's too) as a line starts with it
MARK = {Outcome.OK.value: "ok", Outcome.UNCHANGED.value: "unchanged",
        Outcome.PENDING.value: "PENDING", Outcome.SKIPPED.value: "plan",
        Outcome.FAILED.value: "FAILED", "refused": "REFUSED"}
PROG = "mirrorsetup"


def dump(data: Any) -> None:
    import json
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


def print_table(rows: list[dict[str, Any]], columns: list[str], *, as_json: bool = False,
                below: tuple[str, ...] = (), below_words: dict[str, str] | None = None) -> None:
    """Aligned columns. A table wider than the terminal prints `below`'s columns (long free
    text first), one by one until the rest fits, on indented lines under each row, wrapped:
    the other cells stay readable and nothing is cut. Such a line reads "COLUMN: value", or
    as `below_words` says it ("lag {} s": the unit after the number, as a sentence says it,
    not "lag s: 3.5"). Piped without $COLUMNS, rows stay whole lines (as util-linux's tables)."""
    if as_json:
        dump(rows)
        return
    if not rows:
        print("(no entries)")
        return
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    width = _terminal_width() if below else None
    moved: set[str] = set()
    for name in below if width is not None else ():  # moved one by one until the rest fits
        kept = [w for c, w in zip(columns, widths) if c not in moved]
        if sum(kept) + 2 * (len(kept) - 1) <= width:
            break
        moved.add(name)
    keep = [i for i, c in enumerate(columns) if c not in moved]
    print("  ".join(columns[i].upper().ljust(widths[i]) for i in keep).rstrip())
    for row in cells:
        print("  ".join(row[i].ljust(widths[i]) for i in keep).rstrip())
        for i in [i for i, c in enumerate(columns) if c in moved]:
            if row[i] != "-":
                words = (below_words or {}).get(columns[i], columns[i] + ": {}").format(row[i])
                import textwrap
                print("\n".join(textwrap.wrap(words, max(width, 40),
                                               initial_indent="    ", subsequent_indent="      ",
                                               break_on_hyphens=False)))


def _terminal_width() -> int | None:
    """The width a person reads the table at: the terminal's, or $COLUMNS."""
    if os.environ.get("COLUMNS", "").isdigit() or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def result_line(r: Result) -> str:
    return f"{MARK[r.word]:>9}  {shown(r.target)}: {shown(r.message)}"


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
    errors = getattr(exc, "errors", [exc])  # ConfigErrors: every problem, each on its line
    for e in errors:
        complain(str(e))
    if as_json:
        err = exc.errno if isinstance(exc.errno, int) else None
        dump({"error": str(exc), "errno": err,
              "errno_name": errno_module.errorcode.get(err) if err else None,
              **({"line": exc.line, "key": exc.key} if hasattr(exc, "line") else {}),
              **({"errors": [{"error": str(e), "key": e.key, "errno": e.errno,
                              "errno_name": errno_module.errorcode.get(e.errno)}
                             for e in errors]} if len(errors) > 1 else {})})
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


# status's figures on a line of their own under a row, as the dashboard says them
BELOW_WORDS = {"lag s": "lag {} s", "queued": "queued {}"}


def print_status(snap, *, as_json: bool = False) -> None:
    """The dashboard's content as text: entries, their live state and the daemon's figures."""
    if as_json:
        dump(snap.to_json())
        return
    from app.services.status import replica_text
    print("File-system replication")
    rows = []
    for s in snap.filesystem:
        f = s.figures
        rows.append({"path": s.entry.path, "state": "INVALID" if s.problem else s.state,
                     "atime": s.entry.replicate_atime, "target": s.entry.target,
                     "replica": replica_text(s), "replication": _replication(f),
                     "queued": human_size(f.bytes_queued) if f else None,
                     "lag s": _lag(f)})
    print_table(rows, ["path", "state", "atime", "target", "replica", "queued", "lag s",
                       "replication"], below=("replication", "lag s", "queued"),
                below_words=BELOW_WORDS)
    print("\nBlock-device replication")
    rows = []
    for s in snap.block:
        f = s.figures
        rows.append({"device": s.entry.device, "state": "INVALID" if s.problem else s.state,
                     "capture": s.capture or None, "loop wanted": s.entry.loop, "loop": s.loop,
                     "offset": s.entry.offset, "target": s.entry.target, "replica": replica_text(s),
                     "replication": _replication(f) if f and f.captured else None,
                     "queued": human_size(f.bytes_queued) if f and f.captured else None,
                     "lag s": _lag(f), "mounted via loop": list(s.loop_mounts)})
    print_table(rows, ["device", "state", "capture", "loop wanted", "loop", "offset", "target",
                       "replica", "queued", "lag s", "replication", "mounted via loop"],
                below=("replication", "mounted via loop", "lag s", "queued", "loop wanted",
                       "offset"), below_words=BELOW_WORDS)
    summary = snap.summary
    if snap.engine_error:
        print(f"\nDaemon: {shown(snap.engine_error)}")
    elif summary is None:
        print("\nDaemon: not running")
    else:
        print(f"\nDaemon: running (pid {summary.pid})")
    if snap.warnings:
        print("\nWarnings")
        width = _terminal_width()
        import textwrap
        for w in snap.warnings:
            line = f"  {w.level.upper()}: {shown(w.subject)}: {shown(w.message)}"
            print(line if width is None else "\n".join(textwrap.wrap(
                line, max(width, 40), subsequent_indent="    ", break_on_hyphens=False)))


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
