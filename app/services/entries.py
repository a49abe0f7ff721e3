"""Questions about configured entries that the TUI and the CLI both ask, in one place:
is it configured, is a loaded entry valid, can an entry be attached as typed, and the few
entry actions that are not plan + apply (access-time toggle, file-system mirror and verify).

The rules themselves stay where they are written (ConfigStore's validation, Replication's
busy check, the loop service); this module only applies them to the question asked.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from app.services import blockdevs
from app.services import loop as loopdev
from app.services.config import BlockEntry, Config, ConfigStore, FsEntry, match_block, match_fs
from app.services.config_toml import TABLES
from app.services.blockplan import OTHER_LOOP, View, attached_to, busy_reasons, same_device
from app.services.layout import is_capture_of
from app.services.results import ConfigError, ConfigErrors, MirrorError, Outcome, Result
from app.services.units import parse_size, shown


# -- is it configured ---------------------------------------------------------------------

def configured_fs(store: ConfigStore, path: str) -> FsEntry:
    """The entry for `path` (as typed, normalised or resolved); refused with ENOENT if none."""
    entry = match_fs(store.load(), os.fspath(path))
    if entry is None:
        raise ConfigError(f"{path} is not a configured file-system entry", obj=str(path),
                          errno=errno.ENOENT)
    return entry


def configured_block(store: ConfigStore, device: str) -> BlockEntry:
    """The entry for `device` (an alias of the same device matches); refused with ENOENT. An
    entry's own loop device (its fixed loop, or the loop its capture serves) is named as such,
    with the device to give instead (helper-26's walk: `block verify /dev/loop2` said only
    "is not a configured block device")."""
    config = store.load()
    entry = match_block(config, os.fspath(device))
    if entry is None:
        owner = _entry_of_loop(config, os.fspath(device))
        raise ConfigError(f"{device} is the loop device of the entry for {owner.device}: give "
                          f"{owner.device}" if owner is not None else
                          f"{device} is not a configured block device", obj=str(device),
                          errno=errno.ENOENT)
    return entry


def _entry_of_loop(config: Config, device: str) -> BlockEntry | None:
    """The block entry whose loop `device` is: its fixed loop, or a loop bound to its capture."""
    try:
        st = loopdev.status(device)
    except (MirrorError, ValueError, OSError):
        return None  # not a loop device (or gone)
    for e in config.block:
        if e.loop and os.path.realpath(e.loop) == os.path.realpath(device) or \
                st is not None and is_capture_of(e.device, st.backing_file):
            return e
    return None


def with_errno(exc: MirrorError) -> MirrorError:
    """The refusal with its errno: the config's checks name a missing path without one, so a
    script reading --json would see null where the administrator reads "does not exist"."""
    if exc.errno is None and exc.obj and not os.path.lexists(exc.obj):
        exc.errno = errno.ENOENT
    return exc


# -- is a loaded entry valid -----------------------------------------------------------------

def fs_problem(entry: FsEntry, config: Config, store: ConfigStore, table=None) -> str | None:
    """Why a loaded (possibly hand-edited) entry could not be added as it stands, or None.
    A missing directory is a state the status shows, not a flaw of the entry. A path that is
    a mirrorfs mount point (by the mount table `table`, read when not given) is not looked
    at: a capture that does not answer (stopped, hung) hung `status` and `fs list` here."""
    from app.services import mounts
    from app.services.layout import FSTYPE_FS
    table = mounts.read_mountinfo() if table is None else table
    captured = any(m.mount_point == entry.path and m.fstype == FSTYPE_FS for m in table)
    if not captured and not os.path.lexists(entry.path) and os.path.normpath(entry.path) != "/":
        return None
    others = replace(config, filesystem=tuple(e for e in config.filesystem if e is not entry))
    try:
        store.validate_filesystem(entry, others, captured=captured)
    except MirrorError as exc:
        return exc.message
    return None


def block_problem(entry: BlockEntry, config: Config, store: ConfigStore) -> str | None:
    """As fs_problem, for a block entry; a missing device is a state, not a flaw."""
    if not os.path.exists(entry.device):
        return None
    others = replace(config, block=tuple(e for e in config.block if e is not entry))
    try:
        store.validate_block(entry, others)
    except MirrorError as exc:
        return exc.message
    return None


def problems(config: Config, store: ConfigStore) -> dict[int, str]:
    """id(entry) -> why it is invalid, for every flawed entry of `config`."""
    from app.services import mounts
    found, table = {}, mounts.read_mountinfo()
    for entry in config.filesystem:
        if (why := fs_problem(entry, config, store, table)) is not None:
            found[id(entry)] = why
    for entry in config.block:
        if (why := block_problem(entry, config, store)) is not None:
            found[id(entry)] = why
    return found


# -- what the device picker says about entries -----------------------------------------------

def picker_notes(snap) -> dict:
    """What the picker adds about a replicated device and its loop (a status snapshot's block
    entries), by the path the entry names and by (major, minor), so that another name of the
    device matches too: look a device up with `picker_note`. The TUI's picker and `block
    devices` say the same."""
    notes: dict = {}
    for s in snap.block if snap is not None else ():
        how = f"{s.capture} via {s.loop}" if s.loop and s.capture else (s.loop or s.state)
        for path, note in ((s.entry.device, f"replicated: {how}"),
                           *((lp.device, f"the loop of replicated {s.entry.device}")
                             for lp in s.loops)):
            notes[path] = note
            try:
                rdev = os.stat(path).st_rdev
                notes[os.major(rdev), os.minor(rdev)] = note
            except OSError:
                pass  # a device that is gone is not in the list either
    return notes


def picker_note(notes: dict, dev) -> str | None:
    """`picker_notes`' word for a listed device (blockdevs.BlockDevice), if any."""
    return notes.get(dev.path) or notes.get((dev.major, dev.minor))


# -- can it be attached as typed (the add dialog and `block add`) -----------------------------

@dataclass(frozen=True)
class BlockCheck:
    """A typed block entry against the configuration and the attach rules: `refusal` means it
    cannot be added; `warnings` say what Attach all would refuse today (the device is busy)."""

    refusal: str | None = None
    warnings: list[str] = field(default_factory=list)
    errno: int | None = None  # the refusal's
    errors: list[ConfigError] = field(default_factory=list)  # the refusal's problems, each its own

    def with_typed(self, typed: list[ConfigError]) -> BlockCheck:
        """This check with the problems of fields that could not even be typed into the entry
        (window_fields), all said at once in the entry's field order (one ConfigErrors)."""
        if not typed:
            return self
        order = list(TABLES["block"][1])
        mine = self.errors or ([ConfigError(self.refusal, errno=self.errno)] if self.refusal
                               else [])
        errors = sorted([*typed, *mine], key=lambda e: order.index(e.key) if e.key in order
                        else len(order))
        return BlockCheck(ConfigErrors.of(errors).message, self.warnings, errors[0].errno, errors)


def window_fields(offset: str | int | None, sizelimit: str | int | None
                  ) -> tuple[int, int, list[ConfigError]]:
    """An entry's offset and size limit as typed (`block add`'s options, the Add dialog's
    fields; empty is 0), in bytes; one that is no size counts as 0, and its ConfigError is said
    with every other problem of the entry (BlockCheck.with_typed), not alone before them."""
    sizes, errors = [], []
    for key, text in (("offset", offset), ("sizelimit", sizelimit)):
        try:
            sizes.append(parse_size(text or 0))
        except ValueError as exc:
            sizes.append(0)
            errors.append(ConfigError(f"{key}: {exc}", key=key, errno=errno.EINVAL))
    return sizes[0], sizes[1], errors


def _refused(exc: MirrorError) -> BlockCheck:
    exc = with_errno(exc)
    errors = getattr(exc, "errors", [exc] if isinstance(exc, ConfigError) else [])
    return BlockCheck(exc.message, errno=exc.errno, errors=list(errors))


def check_block(store: ConfigStore, entry: BlockEntry) -> BlockCheck:
    """The same rules as add (the config's) and as attach (busy device, usable loop), and the
    picker's: the disk of the root file system is refused (said before anything opens it)."""
    try:
        described = blockdevs.describe(entry.device)
    except MirrorError:
        described = None  # no such block device: the config's rules say so below
    refusal = device_refusal(described) if described is not None else None
    if refusal is not None:
        return BlockCheck(refusal, errno=errno.EINVAL if described.excluded else errno.EBUSY)
    try:
        store.validate_block(entry, adding=True)
    except MirrorError as exc:
        return _refused(exc)
    try:
        config = store.load()
    except MirrorError:
        config = None
    loop_problem = wanted_loop_problem(entry, config)
    if loop_problem:
        return BlockCheck(loop_problem, errno=errno.EBUSY)
    return BlockCheck(None, device_busy(entry.device, described))


def wanted_loop_problem(entry: BlockEntry, config: Config | None = None) -> str | None:
    """A fixed loop that is attached to something else, mounted or swap cannot be ours.
    `config`: whose capture loop it is is named from it (not only its capture file)."""
    if entry.loop is None:
        return None
    try:
        now = loopdev.status(entry.loop)
    except MirrorError as exc:
        return exc.message
    if now is None:
        return None
    ours = same_device(now.backing_file, entry.device) or is_capture_of(entry.device,
                                                                        now.backing_file)
    if not ours:
        devices = [e.device for e in config.block] if config is not None else None
        return (f"loop {entry.loop} is in use: it is {attached_to(now.backing_file, devices)}; "
                f"{OTHER_LOOP}")
    try:
        why = blockdevs.exclusion_reason(entry.loop)
    except MirrorError:
        why = None
    if why:
        return f"loop {entry.loop} is {why}: it cannot be a replicated device's loop"
    return None


def device_busy(device: str, described: blockdevs.BlockDevice | None = None) -> list[str]:
    """What the picker and Attach all see on `device`: root file system, mounts, holders,
    loops on it, our capture. Empty when it is free. `described`: blockdevs.describe(device),
    when the caller has it already."""
    if described is None:
        try:
            described = blockdevs.describe(device)
        except MirrorError:
            return []
    reasons = list(described.in_use)
    try:
        reasons += [r for r in busy_reasons(device, View()) if r not in reasons]
    except (OSError, MirrorError):
        pass
    return reasons


def device_refusal(device) -> str | None:
    """The picker's own refusal for a device it lists (no dialog opens): excluded devices and
    the disk that holds the root file system, in the words the picker shows."""
    if device.excluded:
        return f"{device.path} is {device.excluded}: it cannot be replicated"
    if any(why == ROOT_FS or why.endswith(" " + ROOT_FS) for why in device.in_use):
        return (f"{device.path} holds the root file system: it cannot be replicated through a "
                "loop device (it is in use by the running system)")
    return None


ROOT_FS = "root file system"  # blockdevs' in_use word for the disk (and partition) under /


# -- entry actions that are not plan + apply --------------------------------------------------

def toggle_atime(store: ConfigStore, path: str) -> Result:
    """Flip an entry's replicate_atime (the TUI's t); takes effect at its next mount."""
    try:
        entry = configured_fs(store, path)
    except MirrorError as exc:
        return Result.from_error("edit", path, exc)
    return set_atime(store, entry, not entry.replicate_atime)


def set_atime(store: ConfigStore, entry: FsEntry, replicate: bool) -> Result:
    """Set a configured entry's replicate_atime (`fs set PATH --atime/--no-atime`); takes
    effect at its next mount. Unchanged when it is so already (the file is not written)."""
    word = "replicated" if replicate else "not replicated"
    if entry.replicate_atime == replicate:
        return Result("edit", entry.path, Outcome.UNCHANGED,
                      f"access times are {word} for {entry.path} already")
    try:
        new = store.set_filesystem(replace(entry, replicate_atime=replicate))
    except MirrorError as exc:
        return Result.from_error("edit", entry.path, exc)
    return Result("edit", new.path, Outcome.OK, f"access times are now {word} for {new.path} "
                  "(takes effect at the next mount)")


def fs_mirror(replication, path: str, progress: Callable[[dict], None] | None = None
              ) -> list[Result]:
    """Make an entry's target equal to it (what differs is copied, what the entry does not
    have is deleted), through the daemon."""
    try:
        replication.daemon()  # refuses a daemon that works from another configuration file
        reply = replication.control.request("mirror", path=path, progress=progress)
    except MirrorError as exc:
        return [Result.from_error("mirror", path, exc)]
    return [Result.from_json(r) for r in reply.get("results", [])]


def describe_difference(d: dict) -> str:
    """One difference of `fs_verify` in words, for the screen and the CLI: times as local
    times (to the nanosecond: a copy that lost precision differs there), a checksum by its
    first 16 hex digits, a side that has nothing as "none". --json keeps the raw values."""
    def side(value) -> str:
        if value is None:
            return "none"
        if d["what"] == "mtime" and isinstance(value, int):
            sec, ns = divmod(value, 1_000_000_000)
            return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec)) + f".{ns:09d}"
        if d["what"] == "content" and isinstance(value, str) and len(value) > 16:
            return f"sha256 {value[:16]}…"
        return shown(str(value))
    return f"{shown(d['path'])}: {d['what']} (source {side(d['source'])}, target {side(d['target'])})"


def fs_verify(replication, path: str) -> tuple[list[Result], list[dict]]:
    """Compare an entry with its target through the daemon: results and every difference
    ({path, what, source, target})."""
    try:
        replication.daemon()
        reply = replication.control.request("verify", path=path)
    except MirrorError as exc:
        return [Result.from_error("verify", path, exc)], []
    return [Result.from_json(r) for r in reply.get("results", [])], reply.get("differences", [])
