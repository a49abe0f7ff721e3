"""Importing the old product's files: /etc/DT/dtfs_mounts and /etc/DT/dtloop_devices.

Each non-blank, non-comment line is one entry: a directory in dtfs_mounts, and
'device [loop] [offset] [encryption]' in dtloop_devices. Parsing lives here;
ConfigStore.import_legacy checks every entry as an add would and writes all the valid ones in
one locked change.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

from app.services.config_toml import BlockEntry, Config, FsEntry
from app.services.results import ConfigError, MirrorError, Outcome, Result

LEGACY_FS_FILE = "/etc/DT/dtfs_mounts"
LEGACY_BLOCK_FILE = "/etc/DT/dtloop_devices"


def legacy_lines(file: str, missing_ok: bool, results: list[Result]) -> list[tuple[int, str]]:
    """(line number, text) of the entries: '#' comments and blank lines skipped."""
    try:
        with open(file, encoding="utf-8", errors="surrogateescape") as f:
            raw = f.read().splitlines()
    except FileNotFoundError as exc:
        outcome = Outcome.SKIPPED if missing_ok else Outcome.FAILED
        results.append(Result("import", file, outcome, f"{file} does not exist",
                              None if missing_ok else exc.errno))
        return []
    except OSError as exc:
        results.append(Result.from_error("import", file, MirrorError.from_oserror("read", file, exc)))
        return []
    return [(n, line.strip()) for n, line in enumerate(raw, 1)
            if line.strip() and not line.lstrip().startswith("#")]


_LEGACY_NUMBER = re.compile(r"[+-]?(0[xX][0-9a-fA-F]+|[0-9]+)")


def legacy_block(text: str) -> BlockEntry:
    """'device [loop] [offset] [encryption]': the old fields, told apart by their shape."""
    device, *rest = text.split()
    loop = offset = encryption = None
    for token in rest:
        if loop is None and token.startswith("/dev/"):
            loop = token
        elif offset is None and _LEGACY_NUMBER.fullmatch(token):
            offset = int(token, 16 if "x" in token.lower() else 10)
        elif encryption is None:
            encryption = token
        else:
            raise ConfigError(f"unexpected {token!r} (expected: device [loop] [offset] [encryption])")
    return BlockEntry(device, loop, offset or 0, encryption=encryption)


def import_line(config: Config, kind: str, file: str, number: int, text: str,
                results: list[Result], *, match: Callable[[Config, str], object | None],
                check: Callable[[object, Config], object]) -> Config:
    """Add one line's entry to `config` and say so in `results`: OK, UNCHANGED or FAILED.

    `match` finds an entry already configured under the same name; `check` validates the new
    entry against `config` and returns it as stored, or raises ConfigError.
    """
    details = {"file": file, "line": number}
    fs = kind == "filesystem"
    try:
        entry = FsEntry(text) if fs else legacy_block(text)
        name = entry.path if fs else entry.device
        if match(config, name) is not None:
            results.append(Result("import", name, Outcome.UNCHANGED,
                                  f"already configured ({file} line {number})", details=details))
            return config
        config = replace(config, **{kind: getattr(config, kind) + (check(entry, config),)})
    except ConfigError as exc:
        results.append(Result("import", text.split()[0], Outcome.FAILED,
                              f"{file} line {number}: {exc}", exc.errno, details))
        return config
    results.append(Result("import", name, Outcome.OK, f"imported from {file} line {number}",
                          details=details))
    return config
