"""mirrorfs behaves exactly like the file system below, and the target gets what the source got.

Each story runs twice on the same file system: once in a plain directory (the oracle: what the
lower file system itself does) and once through a mirrorfs entry; the observations must be
equal. Then the target is drained and verified. The classes of pjdfstest failures found under
mirrorfs (paths deeper than PATH_MAX, chown(-1, -1) and the ctime) each have a story here.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest

from test_engine_support import engine_maker

pytestmark = pytest.mark.root


@pytest.fixture
def entry(tmp_path):
    """(eng, src, tgt, plain): a running mirrorfs entry and a plain directory beside it."""
    plain = tmp_path / "plain"
    plain.mkdir()
    with engine_maker(tmp_path) as make:
        eng, src, tgt = make()
        yield eng, src, tgt, str(plain)


def both(plain: str, src: str, story):
    """The story's observations in the plain directory and through mirrorfs, which must agree."""
    want, got = story(plain), story(src)
    assert got == want
    return want


# -- paths deeper than PATH_MAX below the entry --------------------------------------------------

DEPTH, NAME_LEN = 24, 200  # 24 levels of 201 bytes: about 4.8 KiB below the entry


def deep_story(d: str) -> list:
    """Walk down with directory fds (each call's own path stays short), work at the bottom."""
    fd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    try:
        for level in range(DEPTH):
            name = b"%03d" % level + b"d" * (NAME_LEN - 3)
            os.mkdir(name, 0o750, dir_fd=fd)
            nxt = os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        out = os.open("file", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
        os.write(out, b"deep down")
        os.close(out)
        os.rename("file", "moved", src_dir_fd=fd, dst_dir_fd=fd)
        os.link("moved", "hard", src_dir_fd=fd, dst_dir_fd=fd)
        os.symlink("moved", "sym", dir_fd=fd)
        os.mkdir("sub", dir_fd=fd)
        os.chmod("moved", 0o600, dir_fd=fd)
        os.utime("moved", ns=(1_000_000_000, 2_000_000_000), dir_fd=fd)
        os.setxattr(f"/proc/self/fd/{fd}/moved", "user.deep", b"yes")
        st = os.stat("moved", dir_fd=fd)
        seen = [listdir_at(fd),
                oct(st.st_mode), st.st_nlink, st.st_mtime_ns,
                os.getxattr(f"/proc/self/fd/{fd}/moved", "user.deep"), os.readlink("sym", dir_fd=fd)]
        os.unlink("hard", dir_fd=fd)
        os.rmdir("sub", dir_fd=fd)
        return seen
    finally:
        os.close(fd)


def listdir_at(dir_fd: int) -> list[str]:
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def deep_file(root: str, name: str, flags: int = os.O_RDONLY):
    """The file `name` at the bottom of deep_story's tree, opened through directory fds."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for level in range(DEPTH):
            nxt = os.open(b"%03d" % level + b"d" * (NAME_LEN - 3), os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return open(os.open(name, flags, dir_fd=fd), "rb" if flags == os.O_RDONLY else "wb")
    finally:
        os.close(fd)


def test_paths_deeper_than_path_max_below_the_entry(entry):
    eng, src, tgt, plain = entry
    seen = both(plain, src, deep_story)
    assert seen[0] == ["hard", "moved", "sub", "sym"]
    eng.drain(src)
    assert eng.status(src)["apply_errors"] == 0
    assert eng.verify(src) == []
    with deep_file(tgt, "moved") as f:
        assert f.read() == b"deep down"
    with deep_file(tgt, "moved", os.O_WRONLY) as f:  # the replica drifts; a mirror repairs it
        f.write(b"drift")
    assert [d["what"] for d in eng.verify(src)] == ["content", "mtime"]
    eng.client.request("mirror", path=src)
    assert eng.verify(src) == []


# -- truncate's mtime ---------------------------------------------------------------------------

CLOCK_REALTIME_COARSE = 5  # <linux/time.h>: the clock file times are taken from


@contextlib.contextmanager
def applier_held(eng, src: str, tgt: str):
    """Hold the applier: its next record writes to a target file swapped for a FIFO that nobody
    reads yet, so what is captured meanwhile is replayed later, when the hold ends."""
    gate = os.path.join(src, "gate")
    open(gate, "w").close()
    eng.drain(src)
    os.unlink(os.path.join(tgt, "gate"))
    os.mkfifo(os.path.join(tgt, "gate"))
    with open(gate, "w") as f:
        f.write("x")
    try:
        yield
    finally:
        reader = os.open(os.path.join(tgt, "gate"), os.O_RDONLY | os.O_NONBLOCK)
        eng.drain(src)
        os.close(reader)
        os.unlink(gate)
        eng.drain(src)


def test_truncate_carries_the_source_mtime_to_the_target(entry):
    eng, src, tgt, _ = entry
    f, t = os.path.join(src, "t"), os.path.join(tgt, "t")
    with open(f, "w") as fh:
        fh.write("0123456789" * 10)
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    with applier_held(eng, src, tgt):
        with open(f, "r+") as fh:
            fh.truncate(5)
        source_mtime = os.stat(f).st_mtime_ns
        while time.clock_gettime_ns(CLOCK_REALTIME_COARSE) <= source_mtime:
            time.sleep(0.001)  # the replay comes on a later clock tick than the truncate
    assert os.stat(t).st_size == 5
    assert os.stat(t).st_mtime_ns == os.stat(f).st_mtime_ns == source_mtime
    assert eng.verify(src) == []


# -- chown and the ctime (pjdfstest chown/00.t) ------------------------------------------------

def test_chown_to_the_same_owner_updates_ctime_as_below(entry):
    _, src, _, plain = entry

    def story(d):
        seen = []
        for name, make in (("file", lambda p: open(p, "w").close()), ("dir", os.mkdir)):
            p = os.path.join(d, name)
            make(p)
            before = os.stat(p).st_ctime_ns
            os.chown(p, -1, -1)
            seen.append(os.stat(p).st_ctime_ns > before)
            before = os.stat(p).st_ctime_ns
            os.chown(p, 0, 0)
            seen.append(os.stat(p).st_ctime_ns > before)
        return seen

    assert both(plain, src, story) == [True, True, True, True]
