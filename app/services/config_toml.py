"""The configuration's schema and its TOML text: pure conversion, no file system.

config_to_toml writes the file's text; config_from_toml parses and checks it, pointing every
problem at its line and key (the administrator may edit the file by hand). field_problem is the
per-value check shared by loading and by ConfigStore's add/set validation.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from typing import Any

import tomli_w

from app.services.results import ConfigError

SCHEMA_VERSION = 1
SECTOR_SIZE = 512  # the block layer addresses a loop's offset and size in 512-byte sectors
LOOP_PATH = re.compile(r"/dev/loop(0|[1-9][0-9]*)")
HEADER = "# mirrorsetup replication configuration. Hand edits are checked on every load.\n"


@dataclass(frozen=True)
class FsEntry:
    path: str
    replicate_atime: bool = False
    target: str | None = None
    adopt_target: bool = False  # replace a non-empty target that carries no marker of ours


@dataclass(frozen=True)
class BlockEntry:
    device: str
    loop: str | None = None
    offset: int = 0
    sizelimit: int = 0
    read_only: bool = False
    encryption: str | None = None
    target: str | None = None
    adopt_target: bool = False


@dataclass(frozen=True)
class Config:
    filesystem: tuple[FsEntry, ...] = ()
    block: tuple[BlockEntry, ...] = ()


# table name -> (entry class, {key: (type, required)}); the order is the order written.
TABLES: dict[str, tuple[type, dict[str, tuple[type, bool]]]] = {
    "filesystem": (FsEntry, {"path": (str, True), "replicate_atime": (bool, False),
                             "target": (str, False), "adopt_target": (bool, False)}),
    "block": (BlockEntry, {"device": (str, True), "loop": (str, False), "offset": (int, False),
                           "sizelimit": (int, False), "read_only": (bool, False),
                           "encryption": (str, False), "target": (str, False),
                           "adopt_target": (bool, False)}),
}
WRITTEN_WHEN_TRUE = {"adopt_target"}  # written only when set, so old files stay as they were
TYPE_WORDS = {str: "a string", int: "an integer", bool: "true or false"}


def _show(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else repr(value)


def field_problem(key: str, kind: type, value: Any) -> str | None:
    """What is wrong with one value on its own (type and shape), or None: shared by load and add."""
    if type(value) is not kind:  # bool is an int subclass, so compare exact types
        return f"expected {TYPE_WORDS[kind]}, got {_show(value)}"
    if key in ("path", "device", "target") and not value.startswith("/"):
        return f"must be an absolute path, got {value!r}"
    if kind is str and "\0" in value:
        return f"must not contain a NUL byte, got {value!r}"
    if kind is str and any("\ud800" <= ch <= "\udfff" for ch in value):  # surrogateescape'd bytes
        return f"must be valid UTF-8 (a TOML file cannot hold other bytes), got {value!r}"
    if key == "loop" and not LOOP_PATH.fullmatch(value):
        return f"must be a loop device path /dev/loopN (e.g. /dev/loop3), got {value!r}"
    if key in ("offset", "sizelimit"):
        if value < 0:
            return f"must not be negative, got {value}"
        if value % SECTOR_SIZE:
            return f"must be a multiple of {SECTOR_SIZE} bytes (the sector size), got {value}"
    return None


# ---- pure serialisation -------------------------------------------------------------------

def config_to_toml(config: Config) -> str:
    """The file's text: `schema`, then one [[filesystem]] / [[block]] table per entry.

    Each table is dumped on its own so tomli_w never folds them into inline arrays, which are
    harder to edit by hand; keys whose value is None are left out.
    """
    parts = [HEADER, tomli_w.dumps({"schema": SCHEMA_VERSION})]
    for table, (_cls, spec) in TABLES.items():
        for entry in getattr(config, table):
            values = {k: getattr(entry, k) for k in spec if getattr(entry, k) is not None
                      and not (k in WRITTEN_WHEN_TRUE and not getattr(entry, k))}
            parts.append(f"\n[[{table}]]\n" + tomli_w.dumps(values))
    return "".join(parts)


def config_from_toml(text: str, name: str) -> Config:
    """Parse and check the file's text; `name` (the file) starts every error message."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(text, name, exc) from None
    if not doc:
        return Config()

    def fail(problem: str, key: str, table: str | None = None, index: int = 0) -> ConfigError:
        line = _locate(text, table, index, key)
        where = f"[[{table}]] #{index} key {key!r}" if table else f"key {key!r}"
        return ConfigError(f"{name}{f' line {line}' if line else ''}: {where}: {problem}",
                           line=line, key=key, obj=name)

    if "schema" not in doc:
        raise fail(f"missing; the file must start with schema = {SCHEMA_VERSION}", "schema")
    schema = doc["schema"]
    if type(schema) is not int:
        raise fail(f"expected an integer, got {_show(schema)}", "schema")
    if schema > SCHEMA_VERSION:
        raise fail(f"schema {schema} is newer than this mirrorsetup understands ({SCHEMA_VERSION});"
                   " refusing to read or change the file", "schema")
    if schema != SCHEMA_VERSION:
        raise fail(f"unknown schema {schema}; this mirrorsetup reads schema {SCHEMA_VERSION}",
                   "schema")
    parsed: dict[str, tuple] = {}
    for key, tables in doc.items():
        if key == "schema":
            continue
        if key not in TABLES:
            raise fail(f"unknown key (expected schema, {', '.join(TABLES)})", key)
        cls, spec = TABLES[key]
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise fail(f"expected [[{key}]] tables, got {_show(tables)}", key)
        entries = []
        for index, table in enumerate(tables, 1):
            for k, value in table.items():
                if k not in spec:
                    raise fail(f"unknown key (expected one of {', '.join(spec)})", k, key, index)
                problem = field_problem(k, spec[k][0], value)
                if problem:
                    raise fail(problem, k, key, index)
            for k, (_kind, required) in spec.items():
                if required and k not in table:
                    raise fail("missing (required)", k, key, index)
            entries.append(cls(**table))
        parsed[key] = tuple(entries)
    return Config(**parsed)


def _syntax_error(text: str, name: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    """tomllib (3.11) only says '... (at line 7, column 10)': point at that line and its key."""
    msg = str(exc)
    m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
    if not m:
        return ConfigError(f"{name}: not valid TOML: {msg}", obj=name)
    line = int(m[1])
    lines = text.splitlines()
    source = lines[line - 1] if line <= len(lines) else ""
    km = re.match(r"\s*([A-Za-z0-9_-]+)\s*=", source)
    key = km[1] if km else None
    where = ""
    if key:
        table, index = _tables_by_line(lines[:line])[-1]
        where = f"[[{table}]] #{index} key {key!r}: " if table else f"key {key!r}: "
    reason = msg[:m.start()].strip()
    return ConfigError(f"{name} line {line}: {where}not valid TOML: {reason} at column {m[2]}",
                       line=line, key=key, obj=name)


_ARRAY_HEADER = re.compile(r"\s*\[\[\s*([A-Za-z0-9_-]+)\s*\]\]")


def _tables_by_line(lines: list[str]) -> list[tuple[str | None, int]]:
    """For each line, the [[table]] it belongs to and that table's 1-based number."""
    counts: dict[str, int] = {}
    current: tuple[str | None, int] = (None, 0)
    out = []
    for line in lines:
        m = _ARRAY_HEADER.match(line)
        if m:
            counts[m[1]] = counts.get(m[1], 0) + 1
            current = (m[1], counts[m[1]])
        elif line.lstrip().startswith("["):
            current = ("?", 0)  # a table we do not know: its keys are nobody's
        out.append(current)
    return out


def _locate(text: str, table: str | None, index: int, key: str) -> int | None:
    """Line of `key` in the index-th [[table]] (top level if table is None), else the table's.

    Best effort over the raw text, for the administrator's eyes: [[table]] headers, top-level
    keys and [table] headers, and inline arrays of inline tables (`table = [ {...}, ]`).
    """
    lines = text.splitlines()
    name = rf"""(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')"""
    key_re = re.compile(rf"\s*{name}\s*=" if table else rf"\s*(?:{name}\s*=|\[\[?\s*{name}\s*\])")
    want = (table, index) if table else (None, 0)
    header = None
    for n, (line, here) in enumerate(zip(lines, _tables_by_line(lines)), 1):
        if key_re.match(line) and (here == want or not table and line.lstrip().startswith("[")):
            return n
        if here == want and table and header is None:
            header = n
    if header or not table:
        return header
    start = _locate(text, None, 0, table)
    return start and _inline_table_line(lines, start, index)


_TOML_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'')


def _inline_table_line(lines: list[str], start: int, index: int) -> int:
    """Line of the index-th `{` after `table = [` (strings skipped), else the array's line."""
    seen = 0
    for n in range(start, len(lines) + 1):
        if n > start and lines[n - 1].lstrip().startswith("["):
            break
        seen += _TOML_STRING.sub("", lines[n - 1]).count("{")
        if seen >= index:
            return n
    return start
