"""The persisted replication configuration: one TOML file, changed atomically under a lock.

The administrator may edit the file by hand, so every load checks each key and points at its
line. The TUI, the CLI and the daemon may change it at the same time, so every change is
load-modify-validate-write under an exclusive flock, and readers never see half a file (temp
file, fsync, rename, directory fsync). A file we cannot understand is never rewritten.

The schema and its TOML text live in config_toml, the old product's import in config_legacy.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from app.services.config_legacy import LEGACY_BLOCK_FILE, LEGACY_FS_FILE, import_line, legacy_lines
from app.services.config_toml import (TABLES, BlockEntry, Config, FsEntry, TargetHost,
                                      config_from_toml, config_to_toml, field_problem,
                                      rates_problem)
from app.services.results import ConfigError, ConfigErrors, MirrorError, Result
from app.services.units import exact_size

DEFAULT_PATH = "/etc/mirrorsetup/replication.toml"
CONFIG_ENV = "MIRRORSETUP_CONFIG"
FILE_MODE = 0o600  # names the host's devices and paths: root's business only
DIR_MODE = 0o755
NO_ENCRYPTION = (None, "", "none")
ROOT_REFUSAL = "Do not select the root as a replication mount point"
ENCRYPTION_REFUSAL = ("loop encryption was removed from the Linux kernel (cryptoloop, 2021) and from "
                      "losetup; use dm-crypt/LUKS under the replicated device instead")

TYPE_CHECKING = False  # typing is not imported at run time: ~5 ms of every command's start
if TYPE_CHECKING:
    from typing import TypeVar
    T = TypeVar("T")


def default_path() -> str:
    return os.environ.get(CONFIG_ENV) or DEFAULT_PATH


# ---- the file on disk ---------------------------------------------------------------------

class ConfigStore:
    """The configuration file; every change is one locked, validated, atomic rewrite."""

    def __init__(self, path: str | os.PathLike | None = None, *, must_exist: bool = False):
        """`must_exist`: a file that is not there is an error (ENOENT), not an empty
        configuration: for a file the administrator named, when the caller only reads it."""
        self.path = Path(default_path() if path is None else path)
        self.must_exist = must_exist
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._parsed: tuple[str, Config] | None = None  # the last text parsed, and its result

    def load(self) -> Config:
        """No lock needed: writers replace the file whole, so a reader sees old or new. A file
        that someone other than root could have written is refused (it decides what is
        replicated where)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            if self.must_exist:
                raise ConfigError(f"configuration file {self.path} does not exist (adding an "
                                  "entry creates it)", obj=str(self.path),
                                  errno=errno.ENOENT) from None
            return Config()
        except OSError as exc:
            raise MirrorError.from_oserror("read configuration", str(self.path), exc) from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise ConfigError(f"{self.path} line {line}: not valid UTF-8 (byte {exc.start})",
                              line=line, obj=str(self.path)) from None
        check_file_safety(self.path)
        if self._parsed is not None and self._parsed[0] == text:
            return self._parsed[1]  # the same text parses the same (a Config is immutable)
        config = config_from_toml(text, str(self.path))
        self._parsed = (text, config)
        return config

    def add_filesystem(self, path, *, replicate_atime=False, target=None, adopt_target=False,
                       queue_limit=None, on_full=None) -> FsEntry:
        wanted = FsEntry(os.fspath(path), replicate_atime, _fspath(target), bool(adopt_target),
                         queue_limit, on_full)

        def change(config: Config) -> tuple[Config, FsEntry]:
            entry = self._checked_fs(wanted, config, adding=True)
            return replace(config, filesystem=config.filesystem + (entry,)), entry
        return self._change(change)

    def remove_filesystem(self, path) -> FsEntry:
        def change(config: Config) -> tuple[Config, FsEntry]:
            entry = _configured(match_fs(config, os.fspath(path)), path)
            return replace(config, filesystem=_without(config.filesystem, entry)), entry
        return self._change(change)

    def set_filesystem(self, entry: FsEntry) -> FsEntry:
        """Edit the entry for the same path (e.g. toggle replicate_atime, change the target)."""
        def change(config: Config) -> tuple[Config, FsEntry]:
            old = _configured(match_fs(config, os.fspath(entry.path)), entry.path)
            new = self._checked_fs(entry, replace(config, filesystem=_without(config.filesystem, old)))
            return replace(config, filesystem=tuple(new if e is old else e
                                                    for e in config.filesystem)), new
        return self._change(change)

    def entry(self, kind: str, key: str) -> FsEntry | BlockEntry:
        """The configured entry `key` names (a path or device, as the CLI takes it)."""
        config = self.load()
        return _configured((match_fs if kind == "fs" else match_block)(config, key), key)

    def set_entry_target(self, kind: str, key: str, target: str | None, adopt: bool = False
                         ) -> tuple[FsEntry | BlockEntry, FsEntry | BlockEntry]:
        """(the entry before, after) its target is set to `target` (None: no target): checked
        as at an add, a target that holds something else included (`adopt`: replace it)."""
        return self._change(self._target_change(kind, key, target, adopt))

    def check_entry_target(self, kind: str, key: str, target: str | None, adopt: bool = False
                           ) -> tuple[FsEntry | BlockEntry, FsEntry | BlockEntry]:
        """What set_entry_target would make of the entry, or the ConfigError it would raise;
        nothing is written."""
        return self._target_change(kind, key, target, adopt)(self.load())[1]

    def _target_change(self, kind: str, key: str, target: str | None, adopt: bool):
        field, match = ("filesystem", match_fs) if kind == "fs" else ("block", match_block)

        def change(config: Config):
            entries = getattr(config, field)
            old = _configured(match(config, os.fspath(key)), key)
            wanted = replace(old, target=_fspath(target), adopt_target=bool(adopt))
            rest = replace(config, **{field: _without(entries, old)})
            check = self._checked_fs if kind == "fs" else self._checked_block
            new = check(wanted, rest, claim=target is not None)
            return replace(config, **{field: tuple(new if e is old else e for e in entries)}), \
                (old, new)
        return change

    def add_block(self, device, *, loop=None, offset=0, sizelimit=0, read_only=False,
                  encryption=None, target=None, adopt_target=False, queue_limit=None,
                  on_full=None) -> BlockEntry:
        wanted = BlockEntry(os.fspath(device), _fspath(loop), offset, sizelimit, read_only,
                            encryption, _fspath(target), bool(adopt_target), queue_limit, on_full)

        def change(config: Config) -> tuple[Config, BlockEntry]:
            entry = self._checked_block(wanted, config, adding=True)
            return replace(config, block=config.block + (entry,)), entry
        return self._change(change)

    def remove_block(self, device) -> BlockEntry:
        def change(config: Config) -> tuple[Config, BlockEntry]:
            entry = _configured(match_block(config, os.fspath(device)), device)
            return replace(config, block=_without(config.block, entry)), entry
        return self._change(change)

    def check_target(self, host: TargetHost) -> None:
        """A new target's fields (before a key is made or a host is asked)."""
        _check_target(host)

    def add_target(self, host: TargetHost) -> TargetHost:
        def change(config: Config) -> tuple[Config, TargetHost]:
            _check_target(host)
            if config.target_host(host.name) is not None:
                raise ConfigError(f"a target named {host.name!r} is already configured",
                                  key="name", obj=host.name, errno=errno.EEXIST)
            return replace(config, target=config.target + (host,)), host
        return self._change(change)

    def set_target(self, name: str, check: Callable[[TargetHost, TargetHost], TargetHost],
                   **changes) -> tuple[TargetHost, TargetHost]:
        """Change a [[target]]'s settings (not its name, host or root: its replicas are there):
        (as it was, as it is now). `check(old, new)` runs under the lock, before the write,
        and may refuse (or complete the new one); nothing is written when nothing changes."""
        unsettable = sorted(set(changes) & {"name", "host", "root"})
        if unsettable:
            raise ConfigError(f"{', '.join(unsettable)} of a target cannot be changed",
                              key=unsettable[0], obj=name, errno=errno.EINVAL)

        def change(config: Config) -> tuple[Config, tuple[TargetHost, TargetHost]]:
            old = config.target_host(name)
            if old is None:
                raise ConfigError(f"no remote target named {name!r} is configured", obj=name,
                                  errno=errno.ENOENT)
            new = replace(old, **changes)
            _check_target(new)
            if new.port != old.port:  # (before `check` pins anything)
                _refuse_shared_after_move(_with_target(config, old, new), new)
            new = check(old, new)
            return _with_target(config, old, new), (old, new)
        return self._change(change)

    def remove_target(self, name: str) -> TargetHost:
        def change(config: Config) -> tuple[Config, TargetHost]:
            host = config.target_host(name)
            if host is None:
                raise ConfigError(f"no remote target named {name!r} is configured", obj=name,
                                  errno=errno.ENOENT)
            users = [key for _kind, key in target_users(config, name)]
            if users:
                raise ConfigError(f"target {name} is used by {', '.join(users)}: remove those "
                                  "entries (or change their target) first", obj=name, errno=errno.EBUSY)
            return replace(config, target=tuple(t for t in config.target if t is not host)), host
        return self._change(change)

    def validate_filesystem(self, entry: FsEntry, config: Config | None = None, *,
                            adding: bool = False, captured: bool = False) -> None:
        """`adding`: also what the target holds (a configured entry's target is its replica).
        `captured`: the path is a mirrorfs mount point (the mount table says so): it is a
        directory and is not looked at (a capture that does not answer would hang us)."""
        self._checked_fs(entry, self.load() if config is None else config, adding=adding,
                         captured=captured)

    def validate_block(self, entry: BlockEntry, config: Config | None = None, *,
                       adding: bool = False) -> None:
        self._checked_block(entry, self.load() if config is None else config, adding=adding)

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
                fs = kind == "filesystem"
                match, check = ((match_fs, self._checked_fs) if fs
                                else (match_block, self._checked_block))
                for number, text in legacy_lines(file, defaults, results):
                    config = import_line(config, kind, file, number, text, results,
                                         match=match, check=check)
            return config, results
        return self._change(change)

    # ---- validation: each returns the entry as stored, or raises ConfigError saying why not

    def _checked_fs(self, entry: FsEntry, config: Config, *, adding: bool = False,
                    captured: bool = False, claim: bool = False) -> FsEntry:
        """`claim`: the target is chosen now (an entry's target set), so what it holds is
        checked as at an add."""
        entry = replace(entry, path=os.fspath(entry.path), target=_fspath(entry.target))
        _check_fields(entry, TABLES["filesystem"][1])
        path = entry.path
        if os.path.normpath(path) == "/":
            raise ConfigError(ROOT_REFUSAL, key="path", obj=path)
        if not captured and not stat.S_ISDIR(_stat(path, "path", "directory").st_mode):
            raise ConfigError(f"{path} is not a directory", key="path", obj=path,
                              errno=errno.ENOTDIR)
        real = os.path.realpath(path) if not captured else \
            os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        if real == "/":
            raise ConfigError(f"{ROOT_REFUSAL} ({path} leads to /)", key="path", obj=path)
        if adding:
            _refuse_own_dirs(real, path)
            _refuse_pseudo_fs(real, path)
        for other in config.filesystem:
            if other.path == real:
                alias = f" (as {real})" if real != path else ""
                raise ConfigError(f"{path} is already configured{alias}{_adopt_hint(entry)}",
                                  key="path", obj=path, errno=errno.EEXIST)
            for inner, outer, verb in ((real, other.path, "is inside"),
                                       (other.path, real, "contains")):
                if _inside(inner, outer):
                    raise ConfigError(f"{real} {verb} {other.path}, which is already replicated;"
                                      " replicate only the highest directory", key="path", obj=path)
            if other.target and (real == other.target or _inside(real, other.target)
                                 or _inside(other.target, real)):
                raise ConfigError(f"{real} overlaps {other.target}, the target of {other.path}",
                                  key="path", obj=path)
        for other in config.block:  # as a block target in a replicated directory is refused
            if is_local_target(other.target) and _overlap(os.path.realpath(other.target), real):
                raise ConfigError(f"{real} holds {other.target}, the target of {other.device}: "
                                  "its replica's writes would be captured here too",
                                  key="path", obj=path, errno=errno.EINVAL)
        target = None
        if entry.target is not None and not is_local_target(entry.target):
            target = _checked_remote_target("fs", real, entry.target, config)
        elif entry.target is not None:
            target = _checked_fs_target(real, entry.target, config)
            if adding or claim:  # what a target holds is checked when chosen (and at capture)
                _refuse_unclaimed(target, f"fs:{real}", entry.adopt_target)
        return replace(entry, path=real, target=target)

    def _checked_block(self, entry: BlockEntry, config: Config, *, adding: bool = False,
                       claim: bool = False) -> BlockEntry:
        entry = replace(entry, device=os.fspath(entry.device), loop=_fspath(entry.loop),
                        target=_fspath(entry.target))
        _check_fields(entry, TABLES["block"][1])
        if entry.encryption not in NO_ENCRYPTION:
            raise ConfigError(ENCRYPTION_REFUSAL, key="encryption", obj=entry.device)
        device, loop = os.path.normpath(entry.device), entry.loop

        def refuse(message: str, key: str = "device", code: int | None = None) -> ConfigError:
            return ConfigError(message, key=key, obj=device, errno=code)
        if not stat.S_ISBLK(_stat(device, "device", "block device").st_mode):
            raise refuse(f"{device} is not a block device", code=errno.ENOTBLK)
        me = _device_id(device)
        backing = _loop_backing(me)  # (read once for every check below)
        if loop is not None and _device_id(loop) == me:
            raise refuse(f"{device} cannot be its own loop device ({loop})", "loop")
        for other in config.block:
            theirs = _device_id(other.device)
            if theirs == me:
                alias = f" (as {other.device})" if other.device != device else ""
                raise refuse(f"{device} is already configured{alias}{_adopt_hint(entry)}",
                             code=errno.EEXIST)
            if other.loop is not None and _device_id(other.loop) == me:
                raise refuse(f"{device} is the loop device of the entry for {other.device}")
            if loop is not None and other.loop == loop:
                raise refuse(f"loop {loop} is already used by the entry for {other.device}", "loop")
            if loop is not None and _device_id(other.device) == _device_id(loop):
                raise refuse(f"loop {loop} is itself configured for replication", "loop")
            if _ids_share_bytes(me, theirs):  # a partition and its disk
                raise refuse(f"{device} overlaps {other.device}, which is already replicated (a "
                             "partition and its disk): replicate one of them", code=errno.EBUSY)
        from app.services import blockdevs  # imported late: it probes devices, config need not
        try:
            reason = blockdevs.exclusion_reason(device)
            size = blockdevs.device_size(device)
        except MirrorError as exc:  # e.g. EACCES opening the device: still a refusal to show
            raise ConfigError(exc.message, key="device", obj=device, errno=exc.errno) from exc
        if reason:
            raise refuse(f"{device} cannot be replicated: {reason}")
        check_window(device, entry.offset, entry.sizelimit, size)
        if entry.target is not None and not is_local_target(entry.target):
            _checked_remote_target("block", device, entry.target, config)
        elif entry.target is not None:
            window = entry.sizelimit or size - entry.offset
            target_id = _device_id(entry.target)
            if target_id in (me, loop and _device_id(loop)):
                raise refuse(f"target {entry.target} is the replicated device itself", "target")
            if _ids_share_bytes(me, target_id, (entry.offset, window)):
                raise refuse(f"target {entry.target} lies on the bytes {device} replicates (a "
                             "partition and its disk): its mirror would overwrite what it copies",
                             "target")
            over = _loop_to_an_entry(entry.target, replace(entry, device=device), config)
            if over:
                raise refuse(f"target {entry.target} is {over}: the replica's writes would "
                             "overwrite that device", "target")
            if _backing_file_of(entry.target, backing):
                raise refuse(f"target {entry.target} is the file {device} lies on (the backing "
                             "file of its loop device): the replica's writes would overwrite "
                             "the device it copies", "target")
            on = _file_system_on_device(entry.target, device, (entry.offset, window))
            if on:
                raise refuse(f"target {entry.target} lies in a file system on {on}, the device "
                             "it replicates: its replica's writes would be captured again (or "
                             "hidden under that file system's mount point)", "target")
            _refuse_shared_target("block", device, entry.target, config)
            problem = _block_target_problem(entry.target, window)
            if problem:
                raise refuse(f"target {entry.target} {problem}", "target")
            if adding or claim:
                _refuse_unclaimed(entry.target, f"block:{device}", entry.adopt_target)
        for other in config.block:  # this device may not be where another entry replicates to
            theirs = _device_id(other.target) if other.target else None
            if theirs == me:
                raise refuse(f"{device} is the target of the entry for {other.device}")
            if _ids_share_bytes(me, theirs):
                raise refuse(f"{device} lies on {other.target}, the target of the entry for "
                             f"{other.device} (a partition and its disk)")
            if is_local_target(other.target) and _backing_file_of(other.target, backing):
                raise refuse(f"{device} lies on {other.target}, the target of the entry for "
                             f"{other.device} (the backing file of its loop device): that "
                             "entry's mirror would overwrite this device, and this capture "
                             "would write into its replica")
        for fs in config.filesystem:  # nor a file in a directory replica
            if is_local_target(fs.target) and _backing_below(backing, fs.target):
                raise refuse(f"{device} lies on {backing}, inside {fs.target}, the target of "
                             f"{fs.path} (the backing file of its loop device): that entry's "
                             "replication would overwrite or remove it under this device")
        return replace(entry, device=device, encryption=None)

    # ---- locking and writing

    def _change(self, change: Callable[[Config], tuple[Config, T]]) -> T:
        """Load, change, validate and write while holding the lock; nothing is written on error."""
        if self.must_exist:
            self.load()  # a missing file is refused before the lock (and its directory) is made
        with self._locked():
            self._remove_stale_temporaries()
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

    def _remove_stale_temporaries(self) -> None:
        """Every writer holds the lock while its temporary file exists, so one found while we
        hold the lock was left by a writer that was killed: remove it."""
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            _unlink_quietly(str(tmp))

    def _write(self, config: Config) -> None:
        data = config_to_toml(config).encode("utf-8")
        parent = self.path.parent
        tmp = None
        try:
            import tempfile  # here, not above: most calls only read the file
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


def check_window(device: str, offset: int, sizelimit: int, size: int) -> None:
    """The window of `device` (`size` bytes) a loop is to show, checked as `block add` checks
    it; `manual attach` checks it the same way, so a bad offset is refused there too (exit 2)
    rather than tried and failed."""
    for key, value in (("offset", offset), ("sizelimit", sizelimit)):
        problem = field_problem(key, int, value)
        if problem:
            raise ConfigError(f"{key}: {problem}", key=key, obj=device, errno=errno.EINVAL)
    if size == 0:  # (not "offset 0 is past the end": the offset is not what is wrong)
        raise ConfigError(f"{device} is empty (0 bytes): there is nothing on it to replicate",
                          key="device", obj=device, errno=errno.EINVAL)
    if offset >= size:
        raise ConfigError(f"offset {exact_size(offset)} is past the end of {device}"
                          f" ({exact_size(size)})", key="offset", obj=device, errno=errno.EINVAL)
    if sizelimit and offset + sizelimit > size:
        raise ConfigError(f"offset {exact_size(offset)} + sizelimit {exact_size(sizelimit)} runs "
                          f"past the end of {device} ({exact_size(size)})", key="sizelimit",
                          obj=device, errno=errno.EINVAL)


def _field_errors(entry, spec: dict[str, tuple[type, bool]]) -> list[ConfigError]:
    errors = []
    for key, (kind, required) in spec.items():
        value = getattr(entry, key)
        if value is None and not required:
            continue
        problem = field_problem(key, kind, value)
        if problem:
            errors.append(ConfigError(f"{key}: {problem}", key=key, errno=errno.EINVAL))
    return errors


def _check_fields(entry, spec: dict[str, tuple[type, bool]]) -> None:
    """Every field's problem at once (ConfigErrors), not only the first."""
    error = ConfigErrors.of(_field_errors(entry, spec))
    if error is not None:
        raise error


def target_errors(host: TargetHost) -> list[ConfigError]:
    """Every problem of a new target's fields: on their own, then together (a file read keeps
    what it says: only a new target is refused a resync cap above its bandwidth cap)."""
    errors = _field_errors(host, TABLES["target"][1])
    problem = rates_problem(host.bandwidth, host.resync_bandwidth)
    if problem:
        errors.append(ConfigError(f"resync_bandwidth: {problem}", key="resync_bandwidth",
                                  errno=errno.EINVAL))
    return errors


def _check_target(host: TargetHost) -> None:
    error = ConfigErrors.of(target_errors(host))
    if error is not None:
        raise error


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


_WHOLE: dict[int, tuple[float, int]] = {}  # whole disks seen: rdev -> (when, bytes)
_WHOLE_SECONDS = 1.0  # a check of every entry against every other reads each disk once


def _extent(rdev: int) -> tuple[int, int, int, bool]:
    """Where a block device lies on its disk: (the whole disk's number, first byte, bytes, is
    a partition), from sysfs (which counts 512-byte sectors). A whole disk is kept a second
    (the entries' checks ask it of each device once per other entry); a partition is read
    every time: its number is handed to the next partition made as soon as it is gone."""
    now = time.monotonic()
    kept = _WHOLE.get(rdev)
    if kept is not None and now - kept[0] < _WHOLE_SECONDS:
        return rdev, 0, kept[1], False
    here = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    size = int(_sysfs_text(f"{here}/size")) * 512
    if os.path.exists(f"{here}/partition"):
        # the kernel resolves ".." after the link: the partition's disk
        major, minor = _sysfs_text(f"{here}/../dev").split(":")
        return (os.makedev(int(major), int(minor)), int(_sysfs_text(f"{here}/start")) * 512,
                size, True)
    if len(_WHOLE) > 4096:
        _WHOLE.clear()
    _WHOLE[rdev] = (now, size)
    return rdev, 0, size, False


def _sysfs_text(path: str) -> str:
    from app.services.loop import _read_sys  # (loop's: open, read, close; no buffering)
    return _read_sys(path)


def _shares_bytes(a: str, b: str, a_window: tuple[int, int] | None = None) -> bool:
    """Whether two different block devices lie on the same bytes of one disk: a partition and
    its disk (a by `a_window`, (offset, bytes) into a, when given). Their numbers differ, so
    _device_id does not tell. Anything not a block device shares none."""
    try:
        ra, rb = os.stat(a), os.stat(b)
        if not (stat.S_ISBLK(ra.st_mode) and stat.S_ISBLK(rb.st_mode)) or ra.st_rdev == rb.st_rdev:
            return False
    except OSError:
        return False
    return _rdevs_share_bytes(ra.st_rdev, rb.st_rdev, a_window)


def _ids_share_bytes(a, b, a_window: tuple[int, int] | None = None) -> bool:
    """_shares_bytes of two _device_id()s (read once by the caller): numbers of block devices,
    or paths of anything else (which share no bytes)."""
    return isinstance(a, int) and isinstance(b, int) and a != b \
        and _rdevs_share_bytes(a, b, a_window)


def _rdevs_share_bytes(ra: int, rb: int, a_window: tuple[int, int] | None = None) -> bool:
    try:
        (da, start, size, pa), (db, b_start, b_size, pb) = _extent(ra), _extent(rb)
    except (OSError, ValueError):
        return False
    if not (pa or pb) or da != db:
        return False  # two whole disks, or partitions of two disks
    if a_window is not None:
        start, size = start + a_window[0], a_window[1]
    return start < b_start + b_size and b_start < start + size


def _loop_to_an_entry(target: str, entry: BlockEntry, config: Config) -> str | None:
    """What a loop device target leads to, when that is a replicated device: the fixed loop
    another entry keeps, or a loop over a replicated device or its capture file (a capture's
    loop, a plain one). Writing a replica there writes that device. None otherwise."""
    mine = _device_id(target)
    if not isinstance(mine, int) and not mine.startswith("/dev/"):
        return None  # a file target (the common case: no stat of every other entry's loop)
    others = [e for e in config.block if e.device != entry.device]
    for other in others:  # by its path too: a fixed loop need not exist before it is attached
        if other.loop and _device_id(other.loop) == mine:
            return f"the loop the entry for {other.device} keeps"
    try:
        st = os.stat(target)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    try:
        backing = _sysfs_text(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
                              "/loop/backing_file")
    except OSError:
        return None  # not a loop, or not attached
    from app.services.layout import is_capture_of
    for other in [entry, *others]:
        if is_capture_of(other.device, backing) or _device_id(backing) == _device_id(other.device) \
                or _shares_bytes(backing, other.device):
            return f"a loop over {other.device}" + (", the device it replicates"
                                                     if other is entry else "")
    return None


def _loop_backing(rdev: int | str | None) -> str | None:
    """The file a loop device (or a partition of one) lies on, as the kernel names it; None
    when `rdev` (a _device_id) is no attached loop."""
    if not isinstance(rdev, int):
        return None
    try:
        disk = _extent(rdev)[0]
        return _sysfs_text(f"/sys/dev/block/{os.major(disk)}:{os.minor(disk)}/loop/backing_file")
    except (OSError, ValueError):
        return None


def _backing_file_of(target: str, backing: str | None) -> bool:
    """Whether a target file is `backing` (_loop_backing: the file a replicated loop device, or
    the loop it is a partition of, reads and writes), by inode: any name of it."""
    try:
        st = os.stat(target)
        if backing is None or not stat.S_ISREG(st.st_mode):
            return False
        there = os.stat(backing)
    except OSError:  # a new file; a backing file gone since
        return False
    return (st.st_dev, st.st_ino) == (there.st_dev, there.st_ino)


def _backing_below(backing: str | None, target: str) -> str | None:
    """`backing` (_loop_backing) when it is `target` or lies below it (a directory replica: its
    mirror removes and rewrites what is there, its capture's target writes into it)."""
    if backing is None or not os.path.exists(backing):
        return None
    real, where = os.path.realpath(backing), os.path.realpath(target)
    return backing if real == where or _inside(real, where) else None


def _file_system_on_device(target: str, device: str, window: tuple[int, int]) -> str | None:
    """Where a target file would lie in a file system on the replicated device itself: mounted
    from the device (or a partition or disk over its window) or from a loop over it (its
    capture's or a plain one). Its replica's writes would then be captured again, or land
    under the loop's mount point once it is mounted. None when it lies elsewhere."""
    here = target
    while True:
        try:
            st = os.stat(here)
            if stat.S_ISBLK(st.st_mode):
                return None  # a device target: judged by its bytes, not a file system
            st_dev = st.st_dev
            break
        except FileNotFoundError:
            if os.path.dirname(here) == here:
                return None
            here = os.path.dirname(here)
        except OSError:
            return None
    me = os.stat(device).st_rdev
    if st_dev == me:
        return device
    if _rdevs_share_bytes(me, st_dev, window):  # a partition of it, or the disk it is one of
        return "/dev/" + os.path.basename(os.path.realpath(
            f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}"))
    try:
        backing = _sysfs_text(f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}/loop/backing_file")
    except OSError:
        return None  # not a loop
    from app.services.layout import is_capture_of
    if is_capture_of(device, backing) or _device_id(backing) == me:
        return f"a loop over {device}"
    return None


def short_of(has: str, window: int) -> str:
    """A block target with less room than the window it copies: a local device's refusal and
    a remote target's warning at add say it in these words."""
    return f"{has}, less than the {exact_size(window)} it must mirror"


def _block_target_problem(target: str, window: int) -> str | None:
    """What is wrong with a block entry's target: it must be a block device of at least the
    window's size, a regular file (extended to the window) or a new file in an existing directory."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        parent = os.path.dirname(target)
        if os.path.realpath(target).startswith("/dev/"):  # a mistyped device name
            return ("does not exist: a device target must be there already (a file made in "
                    "/dev would be kept in memory, on devtmpfs)")
        # (a parent that is a file is ENOTDIR: "cannot be inspected" below)
        return None if os.path.isdir(parent) else f"cannot be created: its parent {parent} does not exist"
    except OSError as exc:
        return f"cannot be inspected: {exc.strerror}"
    if stat.S_ISBLK(st.st_mode):
        from app.services import blockdevs
        have = blockdevs.device_size(target)
        return None if have >= window else short_of(f"holds {exact_size(have)}", window)
    if not stat.S_ISREG(st.st_mode):
        return "is neither a regular file nor a block device"
    return None


def check_file_safety(path: Path) -> None:
    """Refuse a configuration file that a local user other than root could have written (or
    replaced): it decides what is replicated and where to."""
    me = os.geteuid()
    try:
        st, pst = os.stat(path), os.stat(path.parent)
    except FileNotFoundError:
        return
    if st.st_uid not in (0, me) or st.st_mode & 0o022:
        raise ConfigError(f"{path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}: "
                          "a local user could have changed what is replicated; refusing to use it "
                          f"(fix: chown root: {path} && chmod 600 {path})", obj=str(path),
                          errno=errno.EPERM)
    if pst.st_uid not in (0, me) or (pst.st_mode & 0o002 and not pst.st_mode & stat.S_ISVTX):
        raise ConfigError(f"{path.parent} (the configuration's directory) is owned by uid "
                          f"{pst.st_uid} with mode {stat.S_IMODE(pst.st_mode):04o}: a local user "
                          "could replace the configuration; refusing to use it "
                          f"(fix: chown root: {path.parent} && chmod 755 {path.parent})",
                          obj=str(path), errno=errno.EPERM)


def _refuse_own_dirs(real: str, path: str) -> None:
    """Not a directory that holds (or lies in) mirrorsetup's own state or run directory: a
    capture's journal is written there, and written through its own capture it waits for
    itself (found by a walk: `fs add` of the state directory, then mount-all hung for good)."""
    from app.services.socketpath import default_socket
    from app.services.layout import default_state_dir
    for what, own in (("state directory", default_state_dir()),
                      ("run directory", os.path.dirname(default_socket()))):
        own = os.path.realpath(own)
        if _overlap(real, own):
            raise ConfigError(f"{path} {'is inside' if _inside(real, own) else 'holds'} "
                              f"mirrorsetup's own {what} {own}: its journals cannot be captured "
                              "by themselves; replicate the directories beside it",
                              key="path", obj=path, errno=errno.EINVAL)


def _refuse_pseudo_fs(real: str, path: str) -> None:
    """Not a directory on /proc, /sys, /dev and their kind (mounts.PSEUDO_FSTYPES)."""
    from app.services import mounts
    try:
        why = mounts.pseudo_fs_refusal(real, path)
    except MirrorError as exc:
        raise ConfigError(exc.message, key="path", obj=path, errno=exc.errno) from exc
    if why:
        raise ConfigError(why, key="path", obj=path, errno=errno.EINVAL)


def is_local_target(target: str | None) -> bool:
    """A local target (an absolute path), not NAME:PATH on a remote target nor none."""
    return bool(target) and target.startswith("/")


def target_users(config: Config, name: str) -> list[tuple[str, str]]:
    """The entries that replicate to the remote target `name`: (kind, path or device)."""
    return [("fs", e.path) if isinstance(e, FsEntry) else ("block", e.device)
            for e in config.filesystem + config.block
            if e.target and e.target.partition(":")[0] == name and not is_local_target(e.target)]


def _overlap(a: str, b: str) -> bool:
    return a == b or _inside(a, b) or _inside(b, a)


def _refuse_shared_target(kind: str, source: str, target: str, config: Config) -> None:
    """No two entries share a replica, and no replica lies where another entry's mirror would
    prune it or its capture would write behind it."""
    if not is_local_target(target):
        return
    real = os.path.realpath(target)
    mine = _device_id(target)

    def refuse(message: str) -> ConfigError:
        return ConfigError(f"target {target} {message}", key="target", obj=target)
    for other in config.filesystem:
        if other.path == source:
            continue
        if _overlap(real, other.path):
            raise refuse(f"overlaps {other.path}, which is replicated")
        if is_local_target(other.target) and _overlap(real, os.path.realpath(other.target)):
            raise refuse(f"overlaps {other.target}, the target of {other.path}: its mirror would "
                         "remove what is not its own")
    for other in config.block:
        if other.device == source:
            continue
        theirs = _device_id(other.device)
        if theirs == mine:
            raise refuse(f"is {other.device}, a replicated device (writes there would bypass "
                         "its capture)")
        if backing := _backing_below(_loop_backing(theirs), target):
            where = "is" if os.path.realpath(backing) == real else f"holds {backing},"
            raise refuse(f"{where} the file {other.device} lies on (its loop device's backing "
                         "file): this replica's writes (and its mirror's removals) would "
                         "overwrite a replicated device")
        if _ids_share_bytes(mine, theirs):
            raise refuse(f"lies on {other.device}, a replicated device (a partition and its "
                         "disk: writes there would bypass its capture)")
        if is_local_target(other.target):
            their_id = _device_id(other.target)
            if their_id == mine or _overlap(real, os.path.realpath(other.target)) \
                    or _ids_share_bytes(mine, their_id):
                raise refuse(f"is (or holds) {other.target}, the target of {other.device}")


def _checked_remote_target(kind: str, source: str, target: str, config: Config) -> str:
    """NAME:PATH: NAME must be a configured [[target]]; no two entries share (or, for
    directories, nest) a replica there. What the remote side holds is checked when the
    capture connects (the agent refuses another source's replica by name)."""
    name, _, rel = target.partition(":")
    if config.target_host(name) is None:
        known = ", ".join(t.name for t in config.target) or (
            "none yet: add one with mirrorsetup target add, or on the console's Remote targets "
            "screen")
        raise ConfigError(f"target {target}: no remote target named {name!r} is configured "
                          f"(configured: {known})", key="target", obj=target, errno=errno.ENOENT)
    host, where = _remote_place(config, name, rel)
    for other in config.filesystem + config.block:
        key = getattr(other, "path", None) or getattr(other, "device", None)
        if key == source or not other.target or is_local_target(other.target):
            continue
        oname, _, orel = other.target.partition(":")
        if config.target_host(oname) is None:
            continue
        ohost, theirs = _remote_place(config, oname, orel)
        if ohost == host and _overlap(where, theirs):
            # two target names may serve nested roots on one host: the place is compared,
            # not the name (one replica inside another was pruned by the outer one's mirror)
            there = "" if oname == name else f" ({where} and {theirs} on {host[0]} port {host[1]})"
            raise ConfigError(f"target {target} overlaps {other.target}, the target of {key}"
                              f"{there}: no two entries share or nest a replica",
                              key="target", obj=target, errno=errno.EEXIST)
    return target


def _with_target(config: Config, old: TargetHost, new: TargetHost) -> Config:
    return replace(config, target=tuple(new if t is old else t for t in config.target))


def _refuse_shared_after_move(moved: Config, new: TargetHost) -> None:
    """A target set to another port may then serve the same places as another target of the
    same host: its entries' replicas are checked as `fs add` / `block add` check them (two
    entries then wrote one replica, and both were refused at their next start)."""
    for entry in moved.filesystem + moved.block:
        if not entry.target or is_local_target(entry.target) or \
                entry.target.partition(":")[0] != new.name:
            continue
        kind, key = kind_and_key(entry)
        try:
            _checked_remote_target(kind, key, entry.target, moved)
        except ConfigError as exc:
            raise ConfigError(f"port {new.port}: {exc.message}; nothing was changed", key="port",
                              obj=new.name, errno=exc.errno) from None


def _remote_place(config: Config, name: str, rel: str) -> tuple[tuple[str, int], str]:
    """Where NAME:REL's replica lies: ((host, port), its path there below the target's root)."""
    t = config.target_host(name)
    return (t.host.lower(), t.port), os.path.normpath(os.path.join("/", t.root, rel))


def _adopt_hint(entry) -> str:
    """An add with --adopt-target of an entry that is there already: how its target is adopted
    (the refusals that name adopt_target say "CLI: --adopt-target"; add cannot change it, a
    set can)."""
    if not getattr(entry, "adopt_target", False):
        return ""
    from app.services.layout import command
    kind, key = kind_and_key(entry)
    how = command(kind, "set", key, "--target", entry.target or "TARGET", "--adopt-target")
    return f"; to let it adopt its target: {how} (a capture takes it when it starts)"


def _refuse_unclaimed(target: str, entry: str, adopt: bool) -> None:
    """A target that already holds something is written only when it is this entry's replica
    (its marker says so) or the administrator said to adopt it."""
    from app.services.layout import marker_fields, read_marker, target_is_empty
    if not is_local_target(target) or adopt:
        return
    marker = read_marker(target)
    if marker is not None:
        fields = marker_fields(marker)
        if fields is not None and fields.get("entry") == entry:
            return
        owner = "something else" if fields is None else str(fields.get("entry", "?")).split(":", 1)[-1]
        raise ConfigError(f"target {target} is the replica of {owner}: refusing to share it",
                          key="target", obj=target, errno=errno.EEXIST)
    try:
        empty = target_is_empty(target)
    except OSError as exc:
        raise ConfigError(f"target {target} cannot be read: {exc.strerror}", key="target",
                          obj=target, errno=exc.errno) from exc
    if not empty:
        raise ConfigError(f"target {target} is not empty and carries no mirrorsetup marker: "
                          "refusing to overwrite it; to replace its contents with this entry's "
                          "replica, add the entry (or set its target) with --adopt-target",
                          key="target", obj=target, errno=errno.ENOTEMPTY)


def _checked_fs_target(source: str, target: str, config: Config) -> str:
    def refuse(message: str, code: int | None = None) -> ConfigError:
        return ConfigError(f"target {target} {message}", key="target", obj=target, errno=code)
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
    _refuse_shared_target("fs", source, target, config)
    parent = os.path.dirname(real)
    if not os.path.isdir(parent):
        raise refuse(f"cannot be created: its parent {parent} does not exist", errno.ENOENT)
    if os.path.lexists(real) and not os.path.isdir(real):
        raise refuse("is not a directory", errno.ENOTDIR)
    probe = real if os.path.lexists(real) else parent
    if not os.access(probe, os.W_OK) or os.statvfs(probe).f_flag & os.ST_RDONLY:
        ro = os.statvfs(probe).f_flag & os.ST_RDONLY
        raise refuse("is not writable" + (" (read-only file system)" if ro else ""),
                     errno.EROFS if ro else errno.EACCES)
    return real


def match_fs(config: Config, path: str) -> FsEntry | None:
    """The entry for `path` as typed, normalised or resolved; None if none."""
    wanted = {os.path.normpath(os.path.abspath(path)), os.path.realpath(path)}
    return next((e for e in config.filesystem if e.path in wanted), None)


def match_block(config: Config, device: str) -> BlockEntry | None:
    """The entry for `device` or another name of the same device; None if none."""
    me = _device_id(device)
    return next((e for e in config.block
                 if e.device == os.path.normpath(device) or _device_id(e.device) == me), None)


def kind_and_key(entry: FsEntry | BlockEntry) -> tuple[str, str]:
    """("fs", its path) or ("block", its device): how commands and state directories name
    an entry."""
    return ("fs", entry.path) if isinstance(entry, FsEntry) else ("block", entry.device)


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
