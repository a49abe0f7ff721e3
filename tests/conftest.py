"""Shared fixtures: real sparse files, real loop devices, real mounts, always cleaned up.

Loop devices that tests need as *raw material* are made with util-linux `losetup`, an
independent tool, so our own loop service is checked against something it did not write.
Every fixture undoes what it made in its finalizer, even when the test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from netbed import NETNS_DIR, NetbedError, TwoHosts

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
IS_ROOT = os.geteuid() == 0


def pytest_runtest_setup(item):
    """Tests marked `root` skip off-root, but in CI (which is root) that skip is a failure."""
    if item.get_closest_marker("root") and not IS_ROOT:
        reason = "needs root: real loop devices, FUSE and mount(2)"
        if IN_CI:
            pytest.fail(f"CI=true but not root, so this root test cannot run ({reason})")
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _not_the_callers_installation(monkeypatch):
    """Every test starts without the caller's MIRRORSETUP_* variables (its configuration,
    socket, state directory, bench knobs): a shell that had exported an installation's
    MIRRORSETUP_CONFIG had the CLI tests that name none read that file (two failed: "…
    does not exist"). Tests that want one set it themselves."""
    for name in [n for n in os.environ if n.startswith("MIRRORSETUP_")]:
        monkeypatch.delenv(name)


def run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a tool with an argv list (never a shell string); output captured as text."""
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, **kw)


def losetup_json() -> list[dict]:
    """The loop devices util-linux sees: the independent witness for our loop service."""
    out = run("losetup", "-l", "-J", "-O", "NAME,BACK-FILE,OFFSET,SIZELIMIT,RO,AUTOCLEAR").stdout
    return json.loads(out)["loopdevices"] if out.strip() else []


@pytest.fixture
def sparse_file(tmp_path):
    """make(size, name=None) -> Path of a sparse file of `size` bytes in the test's temp dir."""
    counter = iter(range(10_000))

    def make(size: int, name: str | None = None) -> Path:
        path = tmp_path / (name or f"disk{next(counter)}.img")
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    return make


@pytest.fixture
def scratch_loop(sparse_file):
    """make(size=64 MiB, read_only=False) -> '/dev/loopN' on a new sparse file (via losetup).

    Stands in for a real disk: it is a block device this test made and may format, probe,
    protect and destroy. Detached at teardown (after a lazy unmount of anything left on it).
    """
    made: list[str] = []

    def make(size: int = 64 << 20, *, read_only: bool = False) -> str:
        img = sparse_file(size)
        argv = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else []) + [str(img)]
        dev = run(*argv).stdout.strip()
        made.append(dev)
        return dev

    yield make
    for dev in reversed(made):
        _unmount_everything_from(dev)
        # a switch-over makes the device read-only (BLKROSET); that flag outlives the loop's
        # binding and the next user of this loop number would inherit it
        run("blockdev", "--setrw", dev, check=False)
        run("losetup", "-d", dev, check=False)


def _unmount_everything_from(dev: str) -> None:
    """Lazily unmount whatever a test left mounted from `dev` (deepest mounts first)."""
    from app.services.mounts import mounts_of_device

    rdev = os.stat(dev).st_rdev
    for m in reversed(mounts_of_device(os.major(rdev), os.minor(rdev))):
        run("umount", "-l", m.mount_point, check=False)


def loops_on(device: str) -> list[str]:
    """Loop devices whose backing is `device`, per sysfs (the kernel's own view)."""
    rdev = os.stat(device).st_rdev
    found = []
    for name in os.listdir("/sys/block"):
        try:
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
            if os.stat(backing).st_rdev == rdev:
                found.append(f"/dev/{name}")
        except OSError:
            continue
    return sorted(found)


@pytest.fixture
def disks(scratch_loop):
    """make(size=64 MiB) -> a fresh "disk"; at teardown every loop a test stacked on it (our
    access points) is unmounted and detached, before scratch_loop detaches the disk itself."""
    made: list[str] = []

    def make(size: int = 64 << 20) -> str:
        dev = scratch_loop(size)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        for lp in loops_on(dev):
            run("umount", "-l", lp, check=False)
            run("losetup", "-d", lp, check=False)


@pytest.fixture
def unused_loop():
    """A /dev/loopN path far above the first-free ones that tests and other users of the host
    take (so nobody races us for it), not existing yet; torn down (detached, LOOP_CTL_REMOVE)
    at the end. For tests that ask for a fixed loop: `losetup --find` names one another
    process can take before we attach."""
    import fcntl
    import errno as errno_mod
    import random
    import time
    from app.services import _ioctl
    taken = set(os.listdir("/sys/block"))
    index = random.choice([n for n in range(2000, 9000) if f"loop{n}" not in taken
                           and not os.path.exists(f"/dev/loop{n}")])
    path = f"/dev/loop{index}"
    yield path
    if os.path.exists(path):
        _unmount_everything_from(path)
        run("losetup", "-d", path, check=False)
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(40):  # a device a test just closed can answer EBUSY for a moment
            try:
                fcntl.ioctl(ctl, _ioctl.LOOP_CTL_REMOVE, index)
                break
            except OSError as exc:
                if exc.errno == errno_mod.ENODEV:
                    break
                time.sleep(0.05)
    finally:
        os.close(ctl)


def _mount_ids_at(path: Path) -> list[int]:
    """The ids of the mounts at `path`, bottom first (/proc/self/mountinfo's order)."""
    from app.services.mounts import read_mountinfo
    return [m.mount_id for m in read_mountinfo() if m.mount_point == str(path)]


@pytest.fixture
def tmpfs_mount(tmp_path):
    """make(path) mounts a small tmpfs at `path` (created if needed); lazily unmounted at
    teardown, with whatever the test left stacked on it (a switch-over's fence, a capture
    still mounted when this runs before the engine's own cleanup): by its mount id."""
    made: list[tuple[Path, int]] = []

    def make(path: Path | None = None) -> Path:
        path = Path(path or tmp_path / f"tmpfs{len(made)}")
        path.mkdir(parents=True, exist_ok=True)
        run("mount", "-t", "tmpfs", "-o", "size=16m", "mirrorsetup-test", str(path))
        ids = _mount_ids_at(path)
        made.append((path, ids[-1] if ids else None))
        return path

    yield make
    for path, mount_id in reversed(made):
        for _ in range(8 if mount_id is not None else 1):  # the top one each time, down to ours
            if mount_id is not None and mount_id not in _mount_ids_at(path):
                break
            # (bytes: umount names a path that is not UTF-8 as it is, e.g. test_mounts' bad\xff)
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@pytest.fixture
def config_path(tmp_path) -> Path:
    """A config file path in the test's temp dir (never /etc/mirrorsetup)."""
    return tmp_path / "etc" / "replication.toml"


@pytest.fixture
def make_two_hosts(tmp_path):
    """make(**TwoHosts options) -> a started two-host bed (tests/netbed.py) in the test's temp
    dir. At teardown each bed is closed and its namespace, link and processes must be gone."""
    beds: list[TwoHosts] = []

    def make(**kw) -> TwoHosts:
        bed = TwoHosts(tmp_path / f"bed{len(beds)}", **kw)
        bed.start()
        beds.append(bed)
        return bed

    yield make
    errors = []
    for bed in reversed(beds):
        try:
            bed.close()
        except NetbedError as e:
            errors.append(str(e))
    assert not errors
    for bed in beds:
        assert not (NETNS_DIR / bed.netns).exists(), f"namespace {bed.netns} left behind"
        assert not Path(f"/sys/class/net/{bed.source_if}").exists(), f"{bed.source_if} left"
        assert bed.leftovers() == []


@pytest.fixture
def two_hosts(make_two_hosts) -> TwoHosts:
    """A target network namespace with sshd (network only; the mounts are the host's)."""
    return make_two_hosts()
