"""The persisted replication configuration: one TOML file, changed atomically under a lock.

The administrator may edit the file by hand, so every load checks each key and points at its
line. The TUI, the CLI and the daemon may change it at the same time, so every change is
load-modify-validate-write under an exclusive flock, and readers never see half a file (temp
file, fsync, rename, directory fsync). A file we cannot understand is never rewritten.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import tempfile
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import tomli_w

from app.services.results import ConfigError, MirrorError, Outcome, Result

DEFAULT_PATH = "/etc/mirrorsetup/replication.toml"
SCHEMA_VERSION = 1
CONFIG_ENV = "MIRRORSETUP_CONFIG"
FILE_MODE = 0o600  # names the host's devices and paths: root's business only
DIR_MODE = 0o755
SECTOR_SIZE = 512  # the block layer addresses a loop's offset and size in 512-byte sectors
LEGACY_FS_FILE = "/etc/DT/dtfs_mounts"
LEGACY_BLOCK_FILE = "/etc/DT/dtloop_devices"
LOOP_PATH = re.compile(r"/dev/loop(0|[1-9][0-9]*)")
NO_ENCRYPTION = (None, "", "none")
ROOT_REFUSAL = "Do not select the root as a replication mount point"
ENCRYPTION_REFUSAL = ("loop encryption was removed from the Linux kernel (cryptoloop, 2021) and from "
                      "losetup; use dm-crypt/LUKS under the replicated device instead")
HEADER = "# mirrorsetup replication configuration. Hand edits are checked on every load.\n"

T = TypeVar("T")


def default_path() -> str:
    return os.environ.get(CONFIG_ENV) or DEFAULT_PATH


@dataclass(frozen=True)
class FsEntry:
    path: str
    replicate_atime: bool = False
    target: str | None = None


@dataclass(frozen=True)
class BlockEntry:
    device: str
    loop: str | None = None
    offset: int = 0
    sizelimit: int = 0
    read_only: bool = False
    encryption: str | None = None
    target: str | None = None


@dataclass(frozen=True)
class Config:
    filesystem: tuple[FsEntry, ...] = ()
    block: tuple[BlockEntry, ...] = ()


# table name -> (entry class, {key: (type, required)}); the order is the order written.
TABLES: dict[str, tuple[type, dict[str, tuple[type, bool]]]] = {
    "filesystem": (FsEntry, {"path": (str, True), "replicate_atime": (bool, False),
                             "target": (str, False)}),
    "block": (BlockEntry, {"device": (str, True), "loop": (str, False), "offset": (int, False),
                           "sizelimit": (int, False), "read_only": (bool, False),
                           "encryption": (str, False), "target": (str, False)}),
}
TYPE_WORDS = {str: "a string", int: "an integer", bool: "true or false"}


def human_size(n: int) -> str:
    """Binary units as an administrator reads them; exact bytes when the unit would round."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 1 << shift:
            if n % (1 << shift) == 0:
                return f"{n >> shift} {unit}"
            return f"{n / (1 << shift):.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


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
            values = {k: getattr(entry, k) for k in spec if getattr(entry, k) is not None}
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


# ---- the file on disk ---------------------------------------------------------------------

class ConfigStore:
    """The configuration file; every change is one locked, validated, atomic rewrite."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(default_path() if path is None else path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def load(self) -> Config:
        """No lock needed: writers replace the file whole, so a reader sees old or new."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return Config()
        except OSError as exc:
            raise MirrorError.from_oserror("read configuration", str(self.path), exc) from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise ConfigError(f"{self.path} line {line}: not valid UTF-8 (byte {exc.start})",
                              line=line, obj=str(self.path)) from None
        return config_from_toml(text, str(self.path))

    def add_filesystem(self, path, *, replicate_atime=False, target=None) -> FsEntry:
        wanted = FsEntry(os.fspath(path), replicate_atime, _fspath(target))

        def change(config: Config) -> tuple[Config, FsEntry]:
            entry = self._checked_fs(wanted, config)
            return replace(config, filesystem=config.filesystem + (entry,)), entry
        return self._change(change)

    def remove_filesystem(self, path) -> FsEntry:
        def change(config: Config) -> tuple[Config, FsEntry]:
            entry = _configured(_match_fs(config, os.fspath(path)), path)
            return replace(config, filesystem=_without(config.filesystem, entry)), entry
        return self._change(change)

    def set_filesystem(self, entry: FsEntry) -> FsEntry:
        """Edit the entry for the same path (e.g. toggle replicate_atime, change the target)."""
        def change(config: Config) -> tuple[Config, FsEntry]:
            old = _configured(_match_fs(config, os.fspath(entry.path)), entry.path)
            new = self._checked_fs(entry, replace(config, filesystem=_without(config.filesystem, old)))
            return replace(config, filesystem=tuple(new if e is old else e
                                                    for e in config.filesystem)), new
        return self._change(change)

    def add_block(self, device, *, loop=None, offset=0, sizelimit=0, read_only=False,
                  encryption=None, target=None) -> BlockEntry:
        wanted = BlockEntry(os.fspath(device), _fspath(loop), offset, sizelimit, read_only,
                            encryption, _fspath(target))

        def change(config: Config) -> tuple[Config, BlockEntry]:
            entry = self._checked_block(wanted, config)
            return replace(config, block=config.block + (entry,)), entry
        return self._change(change)

    def remove_block(self, device) -> BlockEntry:
        def change(config: Config) -> tuple[Config, BlockEntry]:
            entry = _configured(_match_block(config, os.fspath(device)), device)
            return replace(config, block=_without(config.block, entry)), entry
        return self._change(change)

    def validate_filesystem(self, entry: FsEntry, config: Config | None = None) -> None:
        self._checked_fs(entry, self.load() if config is None else config)

    def validate_block(self, entry: BlockEntry, config: Config | None = None) -> None:
        self._checked_block(entry, self.load() if config is None else config)

    def import_legacy(self, fs_file=None, block_file=None) -> list[Result]:
        """One Result per line of the old product's files; every valid line lands in one write.

        With no arguments, reads /etc/DT/dtfs_mounts and /etc/DT/dtloop_devices (absent ones
        are skipped); with arguments, only the files given (an absent one is a failure).
        """
        defaults = fs_file is None and block_file is None
        if defaults:
            fs_file, block_file = LEGACY_FS_FILE, LEGACY_BLOCK_FILE
        sources = [(os.fspath(f), kind) for f, kind in ((fs_file, "filesystem"),
                                                         (block_file, "block")) if f is not None]

        def change(config: Config) -> tuple[Config, list[Result]]:
            results: list[Result] = []
            for file, kind in sources:
                for number, text in _legacy_lines(file, defaults, results):
                    config = self._import_line(config, kind, file, number, text, results)
            return config, results
        return self._change(change)

    # ---- validation: each returns the entry as stored, or raises ConfigError saying why not

    def _checked_fs(self, entry: FsEntry, config: Config) -> FsEntry:
        entry = replace(entry, path=os.fspath(entry.path), target=_fspath(entry.target))
        _check_fields(entry, TABLES["filesystem"][1])
        path = entry.path
        if os.path.normpath(path) == "/":
            raise ConfigError(ROOT_REFUSAL, key="path", obj=path)
        if not stat.S_ISDIR(_stat(path, "path", "directory").st_mode):
            raise ConfigError(f"{path} is not a directory", key="path", obj=path)
        real = os.path.realpath(path)
        if real == "/":
            raise ConfigError(f"{ROOT_REFUSAL} ({path} leads to /)", key="path", obj=path)
        for other in config.filesystem:
            if other.path == real:
                alias = f" (as {real})" if real != path else ""
                raise ConfigError(f"{path} is already configured{alias}", key="path", obj=path)
            for inner, outer, verb in ((real, other.path, "is inside"),
                                       (other.path, real, "contains")):
                if _inside(inner, outer):
                    raise ConfigError(f"{real} {verb} {other.path}, which is already replicated;"
                                      " replicate only the highest directory", key="path", obj=path)
            if other.target and (real == other.target or _inside(real, other.target)
                                 or _inside(other.target, real)):
                raise ConfigError(f"{real} overlaps {other.target}, the target of {other.path}",
                                  key="path", obj=path)
        target = None if entry.target is None else _checked_fs_target(real, entry.target, config)
        return FsEntry(real, entry.replicate_atime, target)

    def _checked_block(self, entry: BlockEntry, config: Config) -> BlockEntry:
        entry = replace(entry, device=os.fspath(entry.device), loop=_fspath(entry.loop),
                        target=_fspath(entry.target))
        _check_fields(entry, TABLES["block"][1])
        if entry.encryption not in NO_ENCRYPTION:
            raise ConfigError(ENCRYPTION_REFUSAL, key="encryption", obj=entry.device)
        device, loop = os.path.normpath(entry.device), entry.loop

        def refuse(message: str, key: str = "device") -> ConfigError:
            return ConfigError(message, key=key, obj=device)
        if not stat.S_ISBLK(_stat(device, "device", "block device").st_mode):
            raise refuse(f"{device} is not a block device")
        me = _device_id(device)
        if loop is not None and _device_id(loop) == me:
            raise refuse(f"{device} cannot be its own loop device ({loop})", "loop")
        for other in config.block:
            if _device_id(other.device) == me:
                alias = f" (as {other.device})" if other.device != device else ""
                raise refuse(f"{device} is already configured{alias}")
            if other.loop is not None and _device_id(other.loop) == me:
                raise refuse(f"{device} is the loop device of the entry for {other.device}")
            if loop is not None and other.loop == loop:
                raise refuse(f"loop {loop} is already used by the entry for {other.device}", "loop")
            if loop is not None and _device_id(other.device) == _device_id(loop):
                raise refuse(f"loop {loop} is itself configured for replication", "loop")
        from app.services import blockdevs  # imported late: it probes devices, config need not
        try:
            reason = blockdevs.exclusion_reason(device)
            size = blockdevs.device_size(device)
        except MirrorError as exc:  # e.g. EACCES opening the device: still a refusal to show
            raise ConfigError(exc.message, key="device", obj=device, errno=exc.errno) from exc
        if reason:
            raise refuse(f"{device} cannot be replicated: {reason}")
        if entry.offset >= size:
            raise refuse(f"offset {human_size(entry.offset)} is past the end of {device}"
                         f" ({human_size(size)})", "offset")
        if entry.sizelimit and entry.offset + entry.sizelimit > size:
            raise refuse(f"offset {human_size(entry.offset)} + sizelimit "
                         f"{human_size(entry.sizelimit)} runs past the end of {device}"
                         f" ({human_size(size)})", "sizelimit")
        if entry.target is not None and _device_id(entry.target) in (
                me, loop and _device_id(loop)):
            raise refuse(f"target {entry.target} is the replicated device itself", "target")
        return replace(entry, device=device, encryption=None)

    def _import_line(self, config: Config, kind: str, file: str, number: int, text: str,
                     results: list[Result]) -> Config:
        details = {"file": file, "line": number}
        fs = kind == "filesystem"
        try:
            entry = FsEntry(text) if fs else _legacy_block(text)
            name = entry.path if fs else entry.device
            if (_match_fs(config, name) if fs else _match_block(config, name)) is not None:
                results.append(Result("import", name, Outcome.UNCHANGED,
                                      f"already configured ({file} line {number})", details=details))
                return config
            if fs:
                checked = self._checked_fs(entry, config)
                config = replace(config, filesystem=config.filesystem + (checked,))
            else:
                config = replace(config, block=config.block + (self._checked_block(entry, config),))
        except ConfigError as exc:
            results.append(Result("import", text.split()[0], Outcome.FAILED,
                                  f"{file} line {number}: {exc}", exc.errno, details))
            return config
        results.append(Result("import", name, Outcome.OK, f"imported from {file} line {number}",
                              details=details))
        return config

    # ---- locking and writing

    def _change(self, change: Callable[[Config], tuple[Config, T]]) -> T:
        """Load, change, validate and write while holding the lock; nothing is written on error."""
        with self._locked():
            config = self.load()  # a corrupt file raises here, before anything is written
            new, result = change(config)
            if new != config:
                self._write(new)
            return result

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive flock on a sibling file: the config is replaced by rename, so it cannot hold it."""
        parent = self.path.parent
        try:
            if not parent.is_dir():
                os.makedirs(parent, mode=DIR_MODE, exist_ok=True)
                os.chmod(parent, DIR_MODE)  # makedirs' mode is filtered by the umask
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise MirrorError.from_oserror("lock configuration", str(self.lock_path), exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, config: Config) -> None:
        data = config_to_toml(config).encode("utf-8")
        parent = self.path.parent
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=parent)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), FILE_MODE)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            tmp = None
            dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)  # make the rename itself durable
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise MirrorError.from_oserror("write configuration", str(self.path), exc) from exc
        finally:
            if tmp is not None:
                _unlink_quietly(tmp)


# ---- helpers ------------------------------------------------------------------------------

def _fspath(value):
    return None if value is None else os.fspath(value)


def _check_fields(entry, spec: dict[str, tuple[type, bool]]) -> None:
    for key, (kind, required) in spec.items():
        value = getattr(entry, key)
        if value is None and not required:
            continue
        problem = field_problem(key, kind, value)
        if problem:
            raise ConfigError(f"{key}: {problem}", key=key)


def _stat(path: str, key: str, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"{what} {path} does not exist", key=key, obj=path) from None
    except OSError as exc:
        err = MirrorError.from_oserror(f"check {what}", path, exc)
        raise ConfigError(err.message, key=key, obj=path, errno=exc.errno) from exc


def _inside(inner: str, outer: str) -> bool:
    return inner != outer and inner.startswith(outer.rstrip("/") + "/")


def _device_id(path: str) -> int | str:
    """A block device's number when it has one (aliases match), else its resolved path."""
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode):
            return st.st_rdev
    except OSError:
        pass
    return os.path.realpath(path)


def _checked_fs_target(source: str, target: str, config: Config) -> str:
    def refuse(message: str) -> ConfigError:
        return ConfigError(f"target {target} {message}", key="target", obj=target)
    real = os.path.realpath(target)
    if real == source:
        raise refuse("is the replicated directory itself")
    if _inside(real, source):
        raise refuse(f"is inside the replicated directory {source}")
    if _inside(source, real):
        raise refuse(f"contains the replicated directory {source}")
    for other in config.filesystem:
        if real == other.path or _inside(real, other.path) or _inside(other.path, real):
            raise refuse(f"overlaps {other.path}, which is replicated")
    parent = os.path.dirname(real)
    if not os.path.isdir(parent):
        raise refuse(f"cannot be created: its parent {parent} does not exist")
    if os.path.lexists(real):
        if not os.path.isdir(real):
            raise refuse("is not a directory")
        if not os.access(real, os.W_OK):
            ro = os.statvfs(real).f_flag & os.ST_RDONLY
            raise refuse("is not writable" + (" (read-only file system)" if ro else ""))
    return real


def _match_fs(config: Config, path: str) -> FsEntry | None:
    wanted = {os.path.normpath(os.path.abspath(path)), os.path.realpath(path)}
    return next((e for e in config.filesystem if e.path in wanted), None)


def _match_block(config: Config, device: str) -> BlockEntry | None:
    me = _device_id(device)
    return next((e for e in config.block
                 if e.device == os.path.normpath(device) or _device_id(e.device) == me), None)


def _configured(entry: T | None, name) -> T:
    if entry is None:
        raise ConfigError(f"{os.fspath(name)} is not configured for replication", obj=str(name))
    return entry


def _without(entries: tuple, entry) -> tuple:
    return tuple(e for e in entries if e is not entry)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _legacy_lines(file: str, missing_ok: bool, results: list[Result]) -> list[tuple[int, str]]:
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


def _legacy_block(text: str) -> BlockEntry:
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
