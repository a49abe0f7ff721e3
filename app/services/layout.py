"""Where mirrorsetup keeps things and what it calls them: the one owner of every name.

An installation is its state directory (journals, claims; default /var/lib/mirrorsetup,
`--state-dir` or MIRRORSETUP_STATE_DIR) and its run directory (the control socket's directory,
default /run/mirrorsetup): two installations on one host (a test run, a second configuration)
never touch each other's mounts, loops or workers, because every FUSE mount carries the
installation's tag in its source name (`mirrorfs:TAG`, `mirrorblk:TAG`; findmnt's SOURCE) and
every capture file lives below the installation's own run directory.

Per entry (id = last path component + a hash of the path or device):
    RUN/fs/ID/lower      the lower directory, bound here before mirrorfs covers it (the door a
                         new capture worker comes in by when the old one died under its mount)
    RUN/fs/ID/stage      where mirrorfs is mounted first, then moved over the entry's path
    RUN/fs/ID.sock       where a worker whose daemon died waits to be taken over
    RUN/block/ID/disk    the block capture's one FUSE file, backing the entry's loop device
    RUN/block/ID.sock    likewise for block workers
    RUN/block/dead-loops.json  loops left on dead block captures, still in use (the daemon's
                         list, so that a next daemon still says them; gone at reboot with RUN)
    STATE/journal/ID     a file-system entry's journal and markers
    STATE/block/ID       a block entry's journal and markers
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass

from app.services.results import MirrorError, Outcome, Result

DEFAULT_STATE_DIR = "/var/lib/mirrorsetup"
STATE_ENV = "MIRRORSETUP_STATE_DIR"
FSTYPE_FS = "fuse.mirrorfs"
FSTYPE_BLOCK = "fuse.mirrorblk"
FSNAME_FS = "mirrorfs"
FSNAME_BLOCK = "mirrorblk"
CAPTURE_FILE = "disk"
DEAD_LOOPS_FILE = "dead-loops.json"
MARKER_XATTR = "trusted.mirrorsetup.replica"  # on a target: whose replica it is (never replicated)
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def default_state_dir() -> str:
    return os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR


# a capture's connection while it tries its target again: "connecting again (last: WHY)"
# (its figures; status reads WHY for the warning and the short form)
CONNECTING_AGAIN = "connecting again (last: "
WRITERS_WAIT = "queue full: writers wait"  # on_full = "block" and the queue limit reached
SWITCHED_MARKER = "switched"  # in an entry's state directory: handed over to its replica
# beside it: a fail-back began ({"generation": …, "target": …}, and "applied": N once N of the
# replica's records were written here); removed when it finished, or was refused before it began
FAILBACK_MARKER = "failback"
# beside them: what told the entry's device (block) or file system (directory) from another
# when it was added (app/engine/capture.py check_identity); removed with the entry
IDENTITY_RECORD = "identity"
# written at the end of a capture (its last seq, up to which the target had them, ...),
# consumed at the start of the next (app/engine/capture.py write_end)
CLEAN_MARKER = "clean"


def write_small_file(directory, name: str, text: str, *, sync_dir: bool = True) -> None:
    """Replace a small state file atomically (temp + fsync + rename), never through a symlink.
    `sync_dir`: the directory is fsync'd too, so that the rename itself survives a crash (a
    switch-over marker, a replica's role: lost, they would let a history fork); without it the
    file system commits it later (ext4: within its commit interval, 5 s), for what may be
    stale after a crash (a released position: records kept a little longer)."""
    tmp = os.path.join(directory, name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(directory, name))
    if sync_dir:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def identity_record(entry_dir: str) -> dict | None:
    """What was recorded about the entry's device or file system when it was added (or by
    the first capture of an entry an older version added; capture.check_identity); None when
    there is none or it cannot be read (the next capture records it again)."""
    import json
    try:
        with open(os.path.join(entry_dir, IDENTITY_RECORD), "rb") as f:
            was = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return was if isinstance(was, dict) else None


def capture_end(entry_dir: str) -> dict | None:
    """The marker the entry's last capture wrote at its end (its "seq", "released", whether
    it "drained", ...), None when there is none or it is not a JSON object. Not followed
    through a symbolic link."""
    import json
    try:
        fd = os.open(os.path.join(entry_dir, CLEAN_MARKER), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        end = json.loads(os.read(fd, 1 << 16))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return end if isinstance(end, dict) else None


def clean_end(entry_dir: str) -> dict | None:
    """What the entry's last capture recorded at its clean end ("seq", "released": up to
    which its target had them), None when it did not end cleanly or was never made."""
    end = capture_end(entry_dir)
    return end if end is not None and isinstance(end.get("seq"), int) \
        and isinstance(end.get("released"), int) else None


# a key of the record that older versions did not write: compared only when the record has
# it (a record without it takes it at the next capture, app/engine/capture.py check_identity)
IDENTITY_FS_UUID = "file system UUID"
IDENTITY_FS_DIRECTORY = "directory of the file system"  # the mount's root joined with the rest
IDENTITY_LATER = (IDENTITY_FS_UUID, IDENTITY_FS_DIRECTORY)

# What an identity refusal says (capture.check_identity), and the TUI's Accept asks with, of
# each kind of entry: what it names, why that can change, what to do when the change is wrong,
# and when it is right.
IDENTITY_WORDS = {
    "block": ("device", "a device name can pass to another disk at a reboot, a loop number to "
              "another file", "give the name back to that device (or name it by "
              "/dev/disk/by-id), then Attach all", "the disk was replaced, the file moved"),
    "fs": ("file system", "a file system that did not come up leaves its mount point empty",
           "mount that file system there, then Mount all", "the data was moved there on purpose"),
}
# ... of a directory on a file system of its type at its place that is another one (its UUID)
IDENTITY_WORDS_IN_ITS_PLACE = (
    "file system", "another file system of its type is mounted in its place, e.g. a new disk "
    "formatted after the old one failed", "mount that file system there, then Mount all",
    "the data was copied or restored onto it on purpose")


# ... of a directory shown by a bind mount that was not made (the one below, same file system)
IDENTITY_WORDS_BIND_NOT_MADE = (
    "file system", "a bind mount that was not made leaves the directory below it in its place",
    "bind-mount that directory there, then Mount all", "the data was moved there on purpose")


def identity_words_of(kind: str, was: dict, now: dict) -> tuple[str, str, str, str]:
    """IDENTITY_WORDS for what changed between the record `was` and `now`."""
    if kind == "fs" and {name for name in was if now.get(name, was[name]) != was[name]} == \
            {IDENTITY_FS_DIRECTORY}:
        return IDENTITY_WORDS_BIND_NOT_MADE
    if kind == "fs" and was.get("file system") == now.get("file system"):
        return IDENTITY_WORDS_IN_ITS_PLACE
    return IDENTITY_WORDS[kind]


def identity_changes(was: dict, now: dict) -> list[str]:
    """How `now` (what the entry's device or file system is) differs from the record `was`,
    one phrase each ("its file system was …, it is now …"); [] when it is the same one. A key
    the record has and `now` cannot say (IDENTITY_LATER: a UUID not read under mirrorfs) is not
    a difference, nor one of those the record lacks."""
    changed = [f"its {name} was {value}, it is now {now.get(name) or 'none'}"
               for name, value in was.items()
               if now.get(name) != value and not (name in IDENTITY_LATER and name not in now)]
    return changed + [f"its {name} is now {value} (none before)" for name, value in now.items()
                      if name not in was and name not in IDENTITY_LATER]


def identity_words(ident: dict) -> str:
    """A device's or file system's identity (blockdevs.device_identity, mounts.tree_identity)
    in one line."""
    return "; ".join(f"{name} {value}" for name, value in ident.items()) or "nothing"


def failback_marker(entry_dir: str) -> dict | None:
    """The fail-back marker the daemon keeps in an entry's state directory while a fail-back
    has begun and not finished: None when there is none ({} when it cannot be read)."""
    try:
        fd = os.open(os.path.join(entry_dir, FAILBACK_MARKER), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    import json
    try:
        said = json.loads(os.read(fd, 1 << 16) or b"{}")
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    return said if isinstance(said, dict) else {}


def with_failback(sw: dict | None, entry_dir: str, *, under_way: bool = False) -> dict | None:
    """A switch-over marker (`sw`) with what became of a fail-back that began: "failback" is
    "under way" (`under_way`: the daemon runs it now) or "interrupted" (its marker is left, and
    "failback_applied" how many of the replica's records were written here, when known).
    Without a switch-over marker (a split brain's fail-back: this side was captured, its replica
    promoted by a fail-over) the daemon ended (killed, crashed) before its own error path could
    mark the entry handed over: when that fail-back wrote, or may have written, some of the
    replica's records here, the entry is as handed over all the same (no time, seq or fence):
    this copy is neither history, so it is not captured here and a fail-back finishes it. One
    that wrote nothing here (applied 0: refused, or cut before anything came, while capture went
    on) leaves this host's own data: ignored."""
    if sw is None and not under_way:
        fb = failback_marker(entry_dir)
        if fb is None or (isinstance(fb.get("applied"), int) and fb["applied"] == 0):
            return None
        applied = fb.get("applied")
        return {"state": "switched", "target": fb.get("target"), "failback": "interrupted",
                "split_brain": True,
                **({"failback_applied": applied} if isinstance(applied, int) else {})}
    if not sw or sw.get("state") != "switched":
        return sw
    fb = failback_marker(entry_dir)
    if fb is None:
        return sw
    return {**sw, "failback": "under way" if under_way else "interrupted",
            **({"failback_applied": fb["applied"]} if isinstance(fb.get("applied"), int) else {})}


def switched_marker(entry_dir: str) -> dict | None:
    """The switch-over marker the daemon keeps in an entry's state directory (entry_state()):
    None when the entry was not handed over to its replica."""
    try:
        fd = os.open(os.path.join(entry_dir, SWITCHED_MARKER), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return {"state": "unreadable"}
    try:
        text = os.read(fd, 1 << 16)
    except OSError:
        return {"state": "unreadable"}
    finally:
        os.close(fd)
    if not text:
        return None
    import json
    try:
        said = json.loads(text)
    except ValueError:
        return {"state": "unreadable"}
    return said if isinstance(said, dict) else {"state": "unreadable"}


def command(*words: str) -> str:
    """A command a message tells the administrator to run, as it runs when pasted: its words
    quoted (an entry's path with a space), in backquotes. Give the --yes it needs."""
    import shlex
    return f"`mirrorsetup {shlex.join(words)}`"


def local_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "?"


def mix_words(applied) -> str:
    """What an interrupted fail-back left this host's copy (`applied`: how many of the
    replica's records it wrote here, None when not known): the words every message uses. 0
    (known: none, e.g. the replica's data was gone there, or the link dropped before any came)
    is this host's own data still."""
    if applied == 0 and applied is not None:
        return "is still its own data (nothing of the replica's was written here)"
    return f"{'is' if applied else 'may be'} a mix of its own data and the replica's"


def switched_refusal(sw: dict | None, key: str, action: str) -> Result | None:
    """Capture of an entry handed over to its replica (`sw`, its marker) is refused, with what
    to do: capturing here would fork the history the replica went on with."""
    if sw is None:
        return None
    keep = command("replica", "resolve", key, "--discard-target", "--yes")
    if sw.get("failback") == "interrupted":  # with_failback(): neither history here
        why = (f"a fail-back of {key} from {sw.get('target') or 'its replica'} was interrupted: "
               "this host's copy "
               f"{mix_words(sw.get('failback_applied'))}; run {command('failback', key, '--yes')} "
               "again to finish it")
    elif sw.get("state") == "switching":
        why = (f"a switch-over of {key} to {sw.get('target')} began at {local_time(sw.get('time'))} "
               f"and did not finish: run {command('switchover', key)} again to finish it, or "
               f"{keep} to keep this side")
    else:
        why = (f"{key} was switched over to {sw.get('target')} at {local_time(sw.get('time'))} (seq "
               f"{sw.get('seq')}): the replica there is primary, capturing here would fork its "
               f"history. Bring it back with {command('failback', key, '--yes')}, or keep this "
               f"side with {keep}")
    return Result(action, key, Outcome.FAILED, why, errno.EREMOTE, {"refused": True})


def entry_state(state_dir: str, kind: str, key: str) -> str:
    """An entry's directory below the daemon's state directory (its journal, its markers)."""
    return os.path.join(state_dir, "journal" if kind == "fs" else "block", entry_id(key))


def entry_id(key: str) -> str:
    """A directory name for an entry, stable per path or device: readable and unique."""
    base = os.path.basename(key.rstrip("/")) or "root"
    return f"{base[:40]}-{sha256_hex(os.fsencode(key))[:12]}"


QUEUE_LIMIT_SHARE = 10  # by default an entry's queue may take a tenth of its file system
QUEUE_LIMIT_MIN, QUEUE_LIMIT_MAX = 64 << 20, 16 << 30


def default_queue_limit(state_dir: str) -> int:
    """What an entry's journal may hold unreplicated when its entry says nothing: a tenth of
    the state directory's file system, between 64 MiB and 16 GiB (the journal never fills it)."""
    st = os.statvfs(state_dir)
    return max(QUEUE_LIMIT_MIN, min(QUEUE_LIMIT_MAX, st.f_blocks * st.f_frsize // QUEUE_LIMIT_SHARE))


def installation_tag(state_dir: str) -> str:
    return sha256_hex(os.fsencode(os.path.realpath(state_dir)))[:10]


@dataclass(frozen=True)
class Layout:
    run_dir: str
    state_dir: str

    @property
    def tag(self) -> str:
        return installation_tag(self.state_dir)

    def fsname(self, kind: str) -> str:
        return f"{FSNAME_FS if kind == 'fs' else FSNAME_BLOCK}:{self.tag}"

    def fstype(self, kind: str) -> str:
        return FSTYPE_FS if kind == "fs" else FSTYPE_BLOCK

    def run(self, kind: str, key: str) -> str:
        return os.path.join(self.run_dir, kind, entry_id(key))

    def adopt_socket(self, kind: str, key: str) -> str:
        return self.run(kind, key) + ".sock"

    @property
    def dead_loops_file(self) -> str:
        return os.path.join(self.run_dir, "block", DEAD_LOOPS_FILE)

    def door(self, key: str) -> str:
        return os.path.join(self.run("fs", key), "lower")

    def stage(self, key: str) -> str:
        return os.path.join(self.run("fs", key), "stage")

    def capture_file(self, device: str) -> str:
        return os.path.join(self.run("block", device), CAPTURE_FILE)

    def state(self, kind: str, key: str) -> str:
        return entry_state(self.state_dir, kind, key)

    def is_ours(self, mount) -> bool:
        """A mount made by this installation's capture workers (a `mounts.MountEntry`)."""
        return mount.source in (self.fsname("fs"), self.fsname("block")) and \
            mount.fstype in (FSTYPE_FS, FSTYPE_BLOCK)


def capture_suffix(device: str) -> str:
    """How every capture file of `device` ends (any installation's)."""
    return f"/block/{entry_id(device)}/{CAPTURE_FILE}"


def capture_key(backing: str | None) -> str | None:
    """The capture_suffix() of the device whose capture file `backing` is; None when it is
    not one (so loops can be indexed by it once instead of compared per device)."""
    if not backing:
        return None
    parts = backing.rsplit("/", 3)
    if len(parts) == 4 and parts[1] == "block" and parts[3] == CAPTURE_FILE:
        return "/" + "/".join(parts[1:])
    return None


def capture_owner(backing: str | None) -> str | None:
    """The device whose capture file `backing` is, when its run directory's name (entry_id:
    the device's name and a hash of its path) says it: /dev/NAME or /dev/mapper/NAME. None
    when it is no capture file, or of a device elsewhere (its path cannot be read back)."""
    if capture_key(backing) is None:
        return None
    dir_name = backing.rsplit("/", 2)[1]
    name = dir_name.rpartition("-")[0]
    return next((d for d in (f"/dev/{name}", f"/dev/mapper/{name}") if entry_id(d) == dir_name),
                None)


def is_capture_of(device: str, backing: str | None, suffix: str | None = None) -> bool:
    """True when a loop's backing file is a capture file of `device` (any installation's,
    live or left dead): such a loop reaches the device through a capture. `suffix`:
    capture_suffix(device), when the caller asks about many loops."""
    return bool(backing) and backing.endswith(suffix or capture_suffix(device))


def is_door(mount_point: str) -> bool:
    """True for a file-system entry's lower directory bound below a run directory (RUN/fs/ID/
    lower, any installation's): a capture's inner bind, not a place the administrator mounted."""
    parts = mount_point.rsplit("/", 3)
    return len(parts) == 4 and parts[1] == "fs" and parts[3] == "lower" and is_entry_id(parts[2])


def is_entry_id(name: str) -> bool:
    """Whether `name` is shaped as entry_id() makes them (NAME-<12 hex digits>)."""
    return len(name) > 13 and name[-13] == "-" and all(c in "0123456789abcdef" for c in name[-12:])


RUN_SUBDIRS = ("lower", "stage")  # what a file-system capture makes in its run directory


def remove_run_dir(path: str) -> bool:
    """An entry's run directory (RUN/fs/ID, RUN/block/ID) once its capture has ended: its empty
    lower and stage directories, then itself. rmdir(2) only: anything left in it, or a mount on
    it (EBUSY), keeps it. True when it is gone."""
    for name in RUN_SUBDIRS:
        try:
            os.rmdir(os.path.join(path, name))
        except OSError:
            pass  # not there, not empty, or a mount point: the directory stays below
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def private_dir(path: str, what: str) -> str:
    """Create `path` (and missing parents) root-only, or check an existing one is: owned by
    root, not a symlink, not writable by group or others. Refuses otherwise, with the fix."""
    missing = []
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    for d in reversed(missing):
        try:
            os.mkdir(d, PRIVATE_DIR)
        except FileExistsError:
            pass
        os.chmod(d, PRIVATE_DIR)  # mkdir's mode passes through the umask
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise MirrorError(f"{what} {path} is not a directory (a symlink or a file is refused)",
                          errno=errno.ENOTDIR, obj=path)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise MirrorError(f"{what} {path} is owned by uid {st.st_uid} with mode "
                          f"{stat.S_IMODE(st.st_mode):04o}: it must be root's and not writable by "
                          f"others (fix: chown root: {path} && chmod 700 {path})",
                          errno=errno.EPERM, obj=path)
    return path


def read_marker(path: str) -> str | None:
    """The replica marker of a target directory or file, or None (none, or not readable)."""
    try:
        return os.getxattr(path, MARKER_XATTR).decode(errors="replace")
    except OSError:
        return None


def marker_fields(marker: str | None) -> dict | None:
    """A replica marker's fields ("entry", "host"), None when it is none or not a JSON object
    (a hand-set or foreign attribute: "claimed by something else")."""
    import json
    try:
        fields = json.loads(marker or "")
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None


def dir_is_empty(path: str) -> bool:
    """Nothing in it but, maybe, an empty lost+found (a fresh file system's root)."""
    names = os.listdir(path)
    if names == ["lost+found"]:
        try:
            return not os.listdir(os.path.join(path, "lost+found"))
        except OSError:
            return False
    return not names


def target_is_empty(path: str) -> bool:
    """A directory with no entries, a file or device whose first MiB is zeros, or nothing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return True
    if stat.S_ISDIR(st.st_mode):
        return dir_is_empty(path)
    with open(path, "rb") as f:
        return not any(f.read(1 << 20))


def sha256_hex(data: bytes) -> str:
    import hashlib  # here, not above: OpenSSL's start costs 3-4 ms, and most calls hash nothing
    return hashlib.sha256(data).hexdigest()
