"""Mounts: our mountinfo parser, mount(2) wrapper and watcher against the kernel and findmnt.

Witnesses we did not write: util-linux `findmnt` (its own mountinfo parser), `mount`/`umount`
run as other processes, stat()'s st_dev, and the kernel's `mnt_id` in /proc/self/fdinfo of an
O_PATH descriptor (which mount path lookup really landed on).

findmnt's JSON (util-linux 2.38) decodes the kernel's \\ooo escapes, then JSON-escapes tab,
newline, backslash and quote (json.loads undoes those) but writes non-UTF-8 bytes raw, which is
not valid UTF-8 JSON; we decode its output with surrogateescape, as os.fsdecode does, so both
sides compare as the same str.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from app.services import mounts
from app.services.layout import (IDENTITY_FS_DIRECTORY, IDENTITY_FS_UUID, IDENTITY_RECORD,
                                 identity_changes)
from app.services.mounts import (MS_BIND, MS_NODEV, MS_NOSUID, MS_RDONLY, MS_REMOUNT, MS_SHARED,
                                 MS_SLAVE, MNT_DETACH, MountEntry, MountWatcher, decode_field,
                                 mount, mount_containing, mounts_of_device, parse_mountinfo,
                                 read_mountinfo, umount)
from app.services.results import MirrorError

REPO = Path(__file__).resolve().parent.parent
FINDMNT_COLUMNS = "ID,PARENT,MAJ:MIN,FSROOT,TARGET,SOURCE,FSTYPE,VFS-OPTIONS,FS-OPTIONS,PROPAGATION"
AWKWARD_NAMES = ["with space", "with\ttab", "with\nnewline", "back\\slash", "literal\\040",
                 "café", "日本", os.fsdecode(b"bad\xff"), "cr\rname", "hash#mark", " lead"]
KERNEL_ESCAPED = b" \t\n\\"  # seq_escape() set for mount points in show_mountinfo()
EVENT_TIMEOUT = 5.0  # a bound for "never came", not a performance target


def findmnt() -> list[dict]:
    out = subprocess.run(["findmnt", "-J", "-l", "-o", FINDMNT_COLUMNS], check=True,
                         capture_output=True, env={**os.environ, "LC_ALL": "C.UTF-8"}).stdout
    return json.loads(out.decode("utf-8", "surrogateescape"))["filesystems"]


def mnt_id_of(path) -> int:
    """The mount the kernel's path lookup reaches, from fdinfo of an O_PATH descriptor."""
    fd = os.open(path, os.O_PATH)
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("mnt_id:"))
    finally:
        os.close(fd)


def entries_at(mount_point, entries=None) -> list[MountEntry]:
    want = os.fsencode(mount_point)
    return [e for e in (entries or read_mountinfo()) if os.fsencode(e.mount_point) == want]


def collect(watcher: MountWatcher, done) -> list[mounts.MountDiff]:
    """Diffs until `done(diffs)` holds; other sessions may mount things too, so keep reading."""
    diffs: list[mounts.MountDiff] = []
    deadline = time.monotonic() + EVENT_TIMEOUT
    while not done(diffs):
        left = deadline - time.monotonic()
        diff = watcher.wait(timeout=left) if left > 0 else None
        assert diff is not None, f"no mount event within {EVENT_TIMEOUT}s; saw {diffs}"
        diffs.append(diff)
    return diffs


def points(diffs, kind: str) -> list[str]:
    return [e.mount_point for d in diffs for e in getattr(d, kind)]


@pytest.fixture
def cleanup():
    """Register paths we mount; each is lazily unmounted (util-linux umount) at teardown."""
    made: list = []
    yield made.append
    for path in reversed(made):
        for _ in entries_at(path):  # stacked mounts: one umount per layer
            subprocess.run(["umount", "-l", os.fsencode(path)], capture_output=True)


@pytest.fixture
def tmpfs_at(cleanup):
    """make(path) mounts a tmpfs with our wrapper at `path` (created), unmounted at teardown."""
    def make(path, flags: int = 0, data: str = "size=4m") -> Path:
        os.makedirs(path, exist_ok=True)
        cleanup(path)
        mount("mirrorsetup-test", path, "tmpfs", flags, data)
        return Path(os.fsdecode(path))
    return make


# --- parser ---------------------------------------------------------------------------------

@pytest.mark.root
def test_parser_matches_findmnt_at_awkward_mount_points(tmpfs_mount, tmp_path):
    paths = [tmpfs_mount(tmp_path / name) for name in AWKWARD_NAMES]
    ours = read_mountinfo()
    theirs = {m["id"]: m for m in findmnt()}
    for path in paths:
        [entry] = entries_at(path, ours)
        assert os.fsencode(entry.mount_point) == os.fsencode(path)
        assert os.stat(path).st_dev == os.makedev(entry.major, entry.minor)
        assert entry.mount_id == mnt_id_of(path)
        fm = theirs[entry.mount_id]
        assert fm["target"] == entry.mount_point
        assert (fm["parent"], fm["maj:min"], fm["fsroot"]) == (
            entry.parent_id, f"{entry.major}:{entry.minor}", entry.root)
        assert (fm["source"], fm["fstype"]) == (entry.source, entry.fstype) == (
            "mirrorsetup-test", "tmpfs")
        assert (fm["vfs-options"], fm["fs-options"]) == (entry.options, entry.super_options)


@pytest.mark.root
def test_whole_table_matches_findmnt():
    """Entries that did not change while findmnt ran (other sessions mount things too)."""
    before = read_mountinfo()
    theirs = {m["id"]: m for m in findmnt()}
    stable = [e for e in read_mountinfo() if e in before]
    assert stable and "/" in {e.mount_point for e in stable}
    for entry in stable:
        fm = theirs[entry.mount_id]
        assert (fm["target"], fm["fstype"], fm["parent"], fm["fsroot"]) == (
            entry.mount_point, entry.fstype, entry.parent_id, entry.root)
        assert fm["vfs-options"] == entry.options


def test_parse_line_with_optional_fields_and_empty_source():
    text = ("36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 shared:7 - ext3 "
            "/dev/root rw,errors=continue\n"
            "40 36 0:50 / /x\rcr rw - tmpfs  rw\n")
    first, second = parse_mountinfo(text)
    assert first == MountEntry(36, 35, 98, 0, "/mnt1", "/mnt/parent dir", "rw,noatime",
                               ("master:1", "shared:7"), "ext3", "/dev/root",
                               "rw,errors=continue")
    assert (second.mount_point, second.source, second.optional) == ("/x\rcr", "", ())
    with pytest.raises(MirrorError) as exc:
        parse_mountinfo("1 2 3:4 / /x rw no-separator\n")
    assert exc.value.errno == errno.EINVAL


def kernel_escape(raw: bytes, also: frozenset[int] = frozenset()) -> str:
    out = b"".join(b"\\%03o" % b if b in KERNEL_ESCAPED or b in also else bytes((b,))
                   for b in raw)
    return os.fsdecode(out)


@settings(max_examples=300)
@given(st.binary(max_size=64).map(lambda b: b.replace(b"\0", b"")),
       st.frozensets(st.integers(1, 255)))
def test_decode_field_inverts_kernel_escaping(raw, also):
    """Any byte string, escaped the kernel's way (plus any other bytes as \\ooo, as "#" is in
    the source field), decodes to the original name."""
    assert decode_field(kernel_escape(raw, also)) == os.fsdecode(raw)
    path = b"/" + raw
    line = f"21 1 0:5 / {kernel_escape(path, also)} rw shared:1 - tmpfs {kernel_escape(raw)} rw"
    [entry] = parse_mountinfo(line + "\n")
    assert os.fsencode(entry.mount_point) == path
    assert os.fsencode(entry.source) == raw


# --- mount(2) / umount2(2) ------------------------------------------------------------------

@pytest.mark.root
def test_mount_and_umount_change_the_kernel_table(tmp_path, tmpfs_at):
    target = tmpfs_at(tmp_path / "m", MS_NOSUID | MS_NODEV, "size=4m,mode=0700")
    [entry] = entries_at(target)
    assert (entry.fstype, entry.source) == ("tmpfs", "mirrorsetup-test")
    assert {"nosuid", "nodev"} <= set(entry.options.split(","))
    assert os.stat(target).st_dev == os.makedev(entry.major, entry.minor) != \
        os.stat(tmp_path).st_dev
    assert os.stat(target).st_mode & 0o777 == 0o700
    assert [m["target"] for m in findmnt() if m["id"] == entry.mount_id] == [str(target)]
    umount(target)
    assert entries_at(target) == []
    assert os.stat(target).st_dev == os.stat(tmp_path).st_dev
    assert str(target) not in {m["target"] for m in findmnt()}


@pytest.mark.root
def test_mount_at_non_utf8_path_round_trips(tmp_path, tmpfs_at):
    raw = os.fsencode(tmp_path) + b"/caf\xe9 \xff\\n"
    tmpfs_at(raw)
    [entry] = entries_at(raw)
    assert os.fsencode(entry.mount_point) == raw
    assert entry.mount_id == mnt_id_of(raw)
    assert entry.to_json()["mount_point"] == os.fsdecode(raw)
    json.dumps(entry.to_json())  # surrogates serialise (as \udcXX), nothing raises


@pytest.mark.root
def test_read_only_then_remount_read_write(tmp_path, tmpfs_at):
    target = tmpfs_at(tmp_path / "ro", MS_RDONLY)
    assert entries_at(target)[0].options.split(",")[0] == "ro"
    with pytest.raises(OSError) as exc:
        (target / "f").write_text("x")
    assert exc.value.errno == errno.EROFS
    mount(None, target, None, MS_REMOUNT, "size=4m")
    assert entries_at(target)[0].options.split(",")[0] == "rw"
    (target / "f").write_text("x")


@pytest.mark.root
def test_errors_keep_errno_and_name_the_target(tmp_path, tmpfs_at):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(MirrorError) as exc:
        umount(plain)
    assert exc.value.errno == errno.EINVAL and exc.value.obj == str(plain)
    assert str(exc.value) == f"umount {plain}: Invalid argument (EINVAL)"

    missing = tmp_path / "missing" / "dir"
    with pytest.raises(MirrorError) as exc:
        mount("mirrorsetup-test", missing, "tmpfs")
    assert exc.value.errno == errno.ENOENT
    assert str(exc.value) == (f"mount mirrorsetup-test on {missing}: "
                              "No such file or directory (ENOENT)")
    assert entries_at(missing) == []


@pytest.mark.root
def test_busy_mount_then_lazy_detach(tmp_path, tmpfs_at):
    target = tmpfs_at(tmp_path / "busy")
    with open(target / "held", "w") as held:
        with pytest.raises(MirrorError) as exc:
            umount(target)
        assert exc.value.errno == errno.EBUSY and "EBUSY" in str(exc.value)
        assert len(entries_at(target)) == 1
        umount(target, MNT_DETACH)
        assert entries_at(target) == []
        held.write("still writable after a lazy detach")


@pytest.mark.root
def test_propagation_shows_in_optional_fields(tmp_path, tmpfs_at, cleanup):
    a = tmpfs_at(tmp_path / "a")
    b = tmp_path / "b"
    b.mkdir()
    mount(None, a, None, MS_SHARED)
    cleanup(b)
    mount(a, b, None, MS_BIND)
    [ea], [eb] = entries_at(a), entries_at(b)
    assert ea.optional == eb.optional and ea.optional[0].startswith("shared:")
    group = ea.optional[0].split(":")[1]
    mount(None, b, None, MS_SLAVE)
    [eb] = entries_at(b)
    assert eb.optional == (f"master:{group}",)
    theirs = {m["id"]: m["propagation"] for m in findmnt()}
    assert theirs[ea.mount_id] == "shared" and "slave" in theirs[eb.mount_id]


# --- where a path lives ---------------------------------------------------------------------

@pytest.mark.root
def test_mount_containing_agrees_with_path_lookup(tmp_path, tmpfs_at):
    a = tmpfs_at(tmp_path / "a")
    (a / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "link").symlink_to(a / "sub")
    (tmp_path / "ab").mkdir()  # "/a" must not match "/ab"
    for path in ["/", str(tmp_path), str(a), f"{a}/", f"{a}//sub/../sub/deeper",
                 str(tmp_path / "link"), str(tmp_path / "ab")]:
        assert mount_containing(path).mount_id == mnt_id_of(path), path
    assert mount_containing(a / "sub" / "not-yet").mount_id == mnt_id_of(a)


@pytest.mark.root
def test_mount_containing_skips_hidden_mounts(tmp_path, tmpfs_at):
    """A later mount over /a hides the older /a/b: longest prefix alone would name /a/b."""
    a = tmpfs_at(tmp_path / "a")
    b = tmpfs_at(a / "b")
    [hidden] = entries_at(b)
    over = tmpfs_at(a)
    (over / "b").mkdir()
    answer = mount_containing(over / "b")
    assert answer.mount_id == mnt_id_of(over / "b") != hidden.mount_id
    assert hidden in read_mountinfo()  # still in the table, just not reachable


@pytest.mark.root
def test_mounts_of_device_lists_bind_mounts(tmp_path, tmpfs_at, cleanup):
    a = tmpfs_at(tmp_path / "a")
    dev = os.stat(a).st_dev
    assert [e.mount_point for e in mounts_of_device(os.major(dev), os.minor(dev))] == [str(a)]
    b = tmp_path / "b"
    b.mkdir()
    cleanup(b)
    mount(a, b, None, MS_BIND)
    found = mounts_of_device(os.major(dev), os.minor(dev))
    assert sorted(e.mount_point for e in found) == [str(a), str(b)]
    assert {e.mount_id for e in found} == {mnt_id_of(a), mnt_id_of(b)}


# --- watcher --------------------------------------------------------------------------------

@pytest.mark.root
def test_watcher_sees_mount_and_unmount_by_another_process(tmp_path, cleanup):
    target = tmp_path / "other"
    target.mkdir()
    with MountWatcher() as watcher:
        cleanup(target)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "other-process", str(target)],
                       check=True)
        diffs = collect(watcher, lambda ds: str(target) in points(ds, "added"))
        [entry] = [e for d in diffs for e in d.added if e.mount_point == str(target)]
        assert (entry.source, entry.mount_id) == ("other-process", mnt_id_of(target))
        subprocess.run(["umount", str(target)], check=True)
        diffs = collect(watcher, lambda ds: str(target) in points(ds, "removed"))
        assert entry in [e for d in diffs for e in d.removed]
        assert entry not in watcher.snapshot()


@pytest.mark.root
def test_change_right_after_construction_is_not_missed(tmp_path, tmpfs_at):
    watcher = MountWatcher()
    try:
        target = tmpfs_at(tmp_path / "quick")
        collect(watcher, lambda ds: str(target) in points(ds, "added"))
    finally:
        watcher.close()


@pytest.mark.root
def test_unmount_and_mount_in_one_wake_read_as_removed_and_added(tmp_path, tmpfs_at):
    """Mount ids are reused at once; a coalesced umount + mount must not look like a change."""
    first = tmpfs_at(tmp_path / "first")
    with MountWatcher() as watcher:
        umount(first)
        second = tmpfs_at(tmp_path / "second")
        diffs = collect(watcher, lambda ds: str(first) in points(ds, "removed")
                        and str(second) in points(ds, "added"))
        assert not [p for d in diffs for p in d.changed
                    if {p[0].mount_point, p[1].mount_point} & {str(first), str(second)}]


@pytest.mark.root
def test_remount_read_only_is_a_change(tmp_path, tmpfs_at):
    target = tmpfs_at(tmp_path / "r")
    with MountWatcher() as watcher:
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        diffs = collect(watcher, lambda ds: any(new.mount_point == str(target)
                                                for d in ds for _, new in d.changed))
        [(old, new)] = [p for d in diffs for p in d.changed if p[1].mount_point == str(target)]
        assert (old.mount_id, old.options[:3], new.options[:3]) == (new.mount_id, "rw,", "ro,")


@pytest.mark.root
def test_iteration_yields_until_closed(tmp_path, tmpfs_at):
    target = tmp_path / "it"
    seen = threading.Event()
    diffs: list = []
    watcher = MountWatcher()

    def consume():
        for diff in watcher:
            diffs.append(diff)
            if str(target) in points([diff], "added"):
                seen.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    tmpfs_at(target)
    assert seen.wait(EVENT_TIMEOUT)
    watcher.close()
    thread.join(EVENT_TIMEOUT)
    assert not thread.is_alive()
    assert watcher.wait(timeout=0) is None and list(watcher) == []


PRIVATE_NS_SCRIPT = r"""
import json, os, subprocess, sys, threading, time
sys.path.insert(0, sys.argv[1])
from app.services import mounts
base, count = sys.argv[2], int(sys.argv[3])
mounts.READ_CHUNK = 4096  # force many read() calls for one table
watcher = mounts.MountWatcher()
# Nobody else mounts here, but a mount copied from the parent namespace vanishes here too when
# another process removes its mount point there (the kernel detaches it in every namespace): a
# diff that only removes is not ours, and is waited past (a flake on a busy host, session 45).
foreign = []
for _ in range(5):
    quiet = watcher.wait(timeout=0.3)
    if quiet is None or quiet.added:
        break
    foreign.append(len(quiet.removed))
woke_with = []
def wait_until_closed():
    while (d := watcher.wait()) is not None and not d.added:
        pass
    woke_with.append(d)
blocked = threading.Thread(target=wait_until_closed, daemon=True)  # only close() can end it
blocked.start()
for _ in range(500):  # until the thread sleeps in poll(2) (7) or ppoll(2) (271) on x86_64
    if open(f"/proc/self/task/{blocked.native_id}/syscall").read().split()[0] in ("7", "271"):
        break
    time.sleep(0.01)
in_poll = _ < 499
closer = threading.Thread(target=watcher.close, daemon=True)
closer.start()
closer.join(5)
blocked.join(5)
woken = not closer.is_alive() and not blocked.is_alive() and woke_with == [None]
watcher = mounts.MountWatcher()
mounts.mount("ns-base", base, "tmpfs", 0, "size=8m")  # the mount points live in our tmpfs
for i in range(count):
    os.mkdir(f"{base}/m{i}")
    mounts.mount("ns-many", f"{base}/m{i}", "tmpfs", 0, "size=64k")
diff = watcher.wait(timeout=5)
out = subprocess.run(["findmnt", "-J", "-l", "-o", "ID"], capture_output=True, check=True).stdout
print(json.dumps({"quiet": quiet is None, "foreign": foreign, "woken": in_poll and woken,
                  "added": len(diff.added) if diff else None,
                  "table": len(mounts.read_mountinfo()), "watcher": len(watcher.snapshot()),
                  "findmnt": len(json.loads(out)["filesystems"]),
                  "bytes": len(open("/proc/self/mountinfo", "rb").read())}))
"""


@pytest.mark.root
def test_in_private_namespace_quiet_close_and_large_table(tmp_path):
    """In a private mount namespace nobody else's mounts arrive, so 'nothing changed' and
    'only close() woke it' are checkable; the namespace and its 1,001 mounts vanish when the
    child exits."""
    base = tmp_path / "ns"
    base.mkdir()
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                          "-c", PRIVATE_NS_SCRIPT, str(REPO), str(base), "1000"],
                         check=True, capture_output=True, text=True).stdout
    got = json.loads(out)
    assert got["quiet"] is True, got  # wait(timeout=0.3) on an unchanged table gives None
    assert got["woken"] is True  # close() from another thread woke a wait() asleep in poll()
    assert got["added"] == 1001
    assert got["table"] == got["watcher"] == got["findmnt"]
    assert got["bytes"] > 16 * 4096  # many 4 KiB reads for one table
    assert entries_at(base) == []  # nothing leaked into our namespace


# Mount points made of a few names, so that tables nest, repeat a mount point (mounted over)
# and name a file; paths from the same names, with the odd empty part, trailing slash and
# relative name.
_parts = st.sampled_from(["a", "b", "a b", "ab", "x.img"])
_points = st.one_of(st.just("/"), st.lists(_parts, min_size=1, max_size=4).map(
    lambda p: "/" + "/".join(p)))
_paths = st.one_of(_points, _points.map(lambda p: p + "/"), _points.map(lambda p: p + "/ab"),
                   _points.map(lambda p: p.replace("/", "//", 1)), st.just(""), st.just("a/b"),
                   _points.map(lambda p: p + " (deleted)"))


@given(st.lists(st.tuples(_points, st.sampled_from(["ext4", "fuse", "tmpfs", "nfs4"])),
                max_size=8), st.lists(_paths, min_size=1, max_size=6))
def test_mount_names_answer_as_mount_by_name(points, paths):
    """MountNames (one table, many paths: a picture of every loop's backing file; mount_by_name
    and on_local_fs are it too) finds the very entry a scan of the table finds (the longest
    mount point that is a prefix of the path, the last mounted of equal ones), and so says
    local exactly as that entry does."""
    table = [MountEntry(i + 1, 1, 0, i, "/", mp, "rw", (), fstype, "src", "rw")
             for i, (mp, fstype) in enumerate(points)]

    def scanned(path):  # (mount_by_name's own scan before it used MountNames)
        under = [m for m in table if mounts._contains(m.mount_point, path)]
        return max(reversed(under), key=lambda m: len(m.mount_point), default=None)
    names = mounts.MountNames(table)
    for path in paths:
        assert names.mount_of(path) is scanned(path) is mounts.mount_by_name(path, table), path
        home = scanned(path)
        assert names.on_local_fs(path) == (home is not None and home.fstype in mounts.LOCAL_FSTYPES) \
            == mounts.on_local_fs(path, table), path


@pytest.mark.root
def test_tree_identity_is_the_file_system_below_a_directory_not_a_bind_of_itself(tmp_path,
                                                                                tmpfs_mount):
    """What a directory entry's first capture records (app/engine/capture.py check_identity):
    the type and mount point of the file system it lies on. A read-only bind of the
    directory onto itself (a switch-over's fence) is not another file system; a file system
    mounted on it is, and so is its absence once it is unmounted."""
    d = tmp_path / "entry"
    d.mkdir()
    plain = mounts.tree_identity(str(d))
    assert plain and f"mounted on {d}" not in plain["file system"], plain
    subprocess.run(["mount", "--bind", str(d), str(d)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], check=True)
        assert mounts.tree_identity(str(d)) == plain
    finally:
        subprocess.run(["umount", str(d)], check=True)
    tmpfs_mount(d)
    first = mounts.tree_identity(str(d))
    assert first["file system"] == f"tmpfs mounted on {d}", first
    (d / "below").mkdir()
    below = mounts.tree_identity(str(d / "below"))  # the same file system, another directory
    assert (first[IDENTITY_FS_DIRECTORY], below[IDENTITY_FS_DIRECTORY]) == ("/", "/below")
    assert {**below, IDENTITY_FS_DIRECTORY: "/"} == first
    # the file system's own UUID (a tmpfs has a new one at each mount): a new, empty file
    # system of the same type mounted in the old one's place is another one
    assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", first[IDENTITY_FS_UUID]), first
    tmpfs_mount(d)
    second = mounts.tree_identity(str(d))
    assert second["file system"] == first["file system"]
    assert second[IDENTITY_FS_UUID] != first[IDENTITY_FS_UUID]
    assert identity_changes(first, second) == [
        f"its file system UUID was {first[IDENTITY_FS_UUID]}, it is now {second[IDENTITY_FS_UUID]}"]


def test_an_identity_record_without_a_uuid_is_the_same_file_system_and_takes_one(tmp_path):
    """A record of an older version has no UUID: that is no difference (no refusal after an
    upgrade), and the next capture's check adds it. A UUID not said now (under mirrorfs) is
    none either; a UUID that differs is."""
    from app.engine.capture import check_identity
    old = {"file system": "ext4 mounted on /srv"}
    now = {**old, IDENTITY_FS_UUID: "5abe9cc0-a7f1-4098-9076-eaaf3095c5a2"}
    assert identity_changes(old, now) == [] and identity_changes(now, old) == []
    state = tmp_path / "state"
    state.mkdir()
    (state / IDENTITY_RECORD).write_text(json.dumps(old))
    check_identity(str(state), "fs", "/srv/data", now)
    assert json.loads((state / IDENTITY_RECORD).read_text()) == now
    check_identity(str(state), "fs", "/srv/data", old)  # said nothing of its UUID
    other = {**old, IDENTITY_FS_UUID: "98b07b1a-e300-4c3f-88c4-67898b7c968c"}
    with pytest.raises(OSError) as refused:
        check_identity(str(state), "fs", "/srv/data", other)
    assert refused.value.errno == errno.EMEDIUMTYPE
    assert "its file system UUID was 5abe9cc0-" in refused.value.strerror
    assert "another file system of its type is mounted in its place" in refused.value.strerror
    assert json.loads((state / IDENTITY_RECORD).read_text()) == now
