"""mirrorfs behaves exactly like the file system below, and the target gets what the source got.

Each story runs twice on the same file system: once in a plain directory (the oracle: what the
lower file system itself does) and once through a mirrorfs entry; the observations must be
equal. Then the target is drained and verified. The classes of pjdfstest failures found under
mirrorfs (paths deeper than PATH_MAX, chown(-1, -1) and the ctime) each have a story here.
"""

from __future__ import annotations

import os

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
