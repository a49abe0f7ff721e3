"""mirrorfs behaves exactly like the file system below, and the target gets what the source got.

Each story runs twice on the same file system: once in a plain directory (the oracle: what the
lower file system itself does) and once through a mirrorfs entry; the observations must be
equal. Then the target is drained and verified. The classes of pjdfstest failures found under
mirrorfs (paths deeper than PATH_MAX, chown(-1, -1) and the ctime) each have a story here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import stat
import subprocess
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


# -- POSIX ACLs --------------------------------------------------------------------------------

NOBODY = 65534


def as_user(uid: int, argv: list[str], cwd: str, umask: int = 0o022) -> tuple[int, str]:
    """Run argv as uid (its own group, no supplementary groups) in cwd: (exit status, stderr's
    last word). cwd is entered as root first: pytest's temp root is 0700."""
    proc = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
                           "sh", "-c", f"umask {umask:03o}; exec \"$@\"", "sh", *argv],
                          cwd=cwd, capture_output=True, text=True)
    return proc.returncode, proc.stderr.strip().rsplit(":", 1)[-1].strip()


def getfacl(cwd: str, name: str) -> str:
    return subprocess.run(["getfacl", "-c", "-n", "-p", name], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout


def acl_story(d: str) -> list:
    seen = []
    for name in ("denied", "granted"):
        with open(os.path.join(d, name), "w") as f:
            f.write(name)
    os.chmod(os.path.join(d, "denied"), 0o644)
    os.chmod(os.path.join(d, "granted"), 0o600)
    seen.append(("deny", as_user(NOBODY, ["cat", "denied"], d)[0] == 0,
                 subprocess.run(["setfacl", "-m", f"u:{NOBODY}:---", "denied"], cwd=d).returncode,
                 as_user(NOBODY, ["cat", "denied"], d)))
    seen.append(("grant", as_user(NOBODY, ["cat", "granted"], d),
                 subprocess.run(["setfacl", "-m", f"u:{NOBODY}:r", "granted"], cwd=d).returncode,
                 as_user(NOBODY, ["cat", "granted"], d)))
    sgid = os.path.join(d, "sgid")  # an ACL set by one outside the group drops the set-GID bit
    open(sgid, "w").close()
    os.chown(sgid, NOBODY, 0)
    os.chmod(sgid, 0o2775)
    seen.append(("sgid", as_user(NOBODY, ["setfacl", "-m", "u:0:r", "sgid"], d), oct(os.stat(sgid).st_mode)))
    os.mkdir(os.path.join(d, "inherit"), 0o755)
    subprocess.run(["setfacl", "-m", f"d:u:{NOBODY}:rwx,d:g::rwx,d:o::-", "inherit"], cwd=d, check=True)
    sub = os.path.join(d, "inherit")
    os.chmod(sub, 0o777)
    seen.append(("create", as_user(NOBODY, ["sh", "-c", "echo x > file && mkdir dir && mkfifo fifo"],
                                   sub, umask=0o077)))
    for name in ("denied", "granted", "sgid", "inherit", "inherit/file", "inherit/dir", "inherit/fifo"):
        seen.append((name, oct(os.lstat(os.path.join(d, name)).st_mode), getfacl(d, name)))
    return seen


def test_posix_acls_decide_access_and_inheritance_as_below(entry):
    eng, src, tgt, plain = entry
    seen = both(plain, src, acl_story)
    assert seen[0] == ("deny", True, 0, (1, "Permission denied"))  # the oracle really denies
    assert seen[1][1:] == ((1, "Permission denied"), 0, (0, ""))  # ... and really grants
    assert seen[2] == ("sgid", (0, ""), "0o100775")
    assert f"user:{NOBODY}:rwx" in dict((s[0], s[2]) for s in seen[4:])["inherit/file"]
    eng.drain(src)
    assert eng.verify(src) == []
    for name in ("denied", "granted", "sgid", "inherit", "inherit/file", "inherit/dir", "inherit/fifo"):
        assert getfacl(tgt, name) == getfacl(src, name), name
    assert as_user(NOBODY, ["cat", "denied"], tgt)[0] == 1


def test_verify_sees_acls_and_mirror_repairs_them(entry):
    eng, src, tgt, plain = entry

    def story(d):
        f = os.path.join(d, "f")
        open(f, "w").close()
        os.mkdir(os.path.join(d, "d"))
        subprocess.run(["setfacl", "-m", f"u:{NOBODY}:rw", "f"], cwd=d, check=True)
        subprocess.run(["setfacl", "-m", f"d:u:{NOBODY}:rx", "d"], cwd=d, check=True)
        os.chmod(f, 0o640)  # with an ACL, chmod sets the mask
        return [getfacl(d, "f"), getfacl(d, "d")]

    seen = both(plain, src, story)
    assert "mask::r--" in seen[0]
    eng.drain(src)
    assert eng.verify(src) == []
    assert [getfacl(tgt, "f"), getfacl(tgt, "d")] == seen
    subprocess.run(["setfacl", "-b", "f"], cwd=tgt, check=True)  # the replica drifts by hand
    subprocess.run(["setfacl", "-k", "d"], cwd=tgt, check=True)
    assert sorted(d["path"] for d in eng.verify(src) if d["what"] == "xattrs") == ["d", "f"]
    eng.client.request("mirror", path=src)
    assert eng.verify(src) == []
    assert [getfacl(tgt, "f"), getfacl(tgt, "d")] == seen


# -- fallocate(2) and O_TMPFILE ------------------------------------------------------------------

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10  # <linux/falloc.h>
AT_FDCWD, AT_SYMLINK_FOLLOW, AT_EMPTY_PATH = -100, 0x400, 0x1000  # <fcntl.h>
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def linkat(fd: int, old: bytes, new: bytes, flags: int) -> None:
    """linkat(2) as an application names an O_TMPFILE file (os.link cannot pass these flags)."""
    if _libc.linkat(fd, old, AT_FDCWD, new, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def file_sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def fallocate_story(d: str) -> list:
    path = os.path.join(d, "image")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"a" * (3 * MiB))
        os.fsync(fd)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, MiB)
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        data = os.lseek(fd, MiB, os.SEEK_DATA)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 3 * MiB, MiB)  # beyond the end: the size stays
        size_kept = os.fstat(fd).st_size
        os.posix_fallocate(fd, 3 * MiB, MiB)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 0, 4096)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return [size_kept, st.st_size, hole, data, file_sha(path)]


def test_fallocate_modes_work_and_replicate(entry):
    eng, src, tgt, plain = entry
    seen = both(plain, src, fallocate_story)
    assert seen[:4] == [3 * MiB, 4 * MiB, MiB, 2 * MiB]
    eng.drain(src)
    assert eng.verify(src) == []
    t = os.path.join(tgt, "image")
    with open(t, "rb") as f:
        body = f.read()
        assert body[MiB:2 * MiB] == bytes(MiB) and body[:4096] == bytes(4096)
        assert os.lseek(f.fileno(), MiB, os.SEEK_DATA) == 2 * MiB  # the hole is a hole there too
    assert os.stat(t).st_mtime_ns == os.stat(os.path.join(src, "image")).st_mtime_ns


@pytest.fixture
def ext2_target(tmp_path, scratch_loop):
    """(eng, src, tgt): an entry whose target is an ext2 file system (no extents), which can
    punch holes but neither allocate nor zero a range. Unmounted after the engine stops."""
    dev = scratch_loop(64 * MiB)
    subprocess.run(["mkfs.ext2", "-q", "-I", "256", dev], check=True)  # 256: nanosecond times
    (tmp_path / "tgt").mkdir()
    subprocess.run(["mount", "-t", "ext2", dev, str(tmp_path / "tgt")], check=True)
    # the premise, checked before the engine starts (its first copy removes what the source
    # does not have: a probe made beside it vanished under a busy host's slower start)
    fd = os.open(tmp_path / "tgt" / "probe", os.O_WRONLY | os.O_CREAT)
    try:
        for mode in (0, FALLOC_FL_ZERO_RANGE):
            with pytest.raises(OSError) as exc:
                fallocate(fd, mode, 0, 4096)
            assert exc.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
        os.unlink(tmp_path / "tgt" / "probe")
    with engine_maker(tmp_path) as make:
        yield make()


def test_fallocate_replicates_onto_a_target_that_cannot_fallocate(ext2_target):
    eng, src, tgt = ext2_target
    fallocate_story(src)
    eng.drain(src)
    assert eng.status(src)["apply_errors"] == 0  # the applier wrote the zeros, set the size
    assert eng.verify(src) == []


def test_o_tmpfile_linked_in_appears_at_the_target_with_its_data(entry):
    eng, src, tgt, plain = entry

    def story(d):
        fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o640)
        try:
            os.write(fd, b"anonymous until linked")
            os.fchmod(fd, 0o604)
            os.setxattr(fd, "user.note", b"set while nameless")  # on a node with no name:
            xattrs = [os.getxattr(fd, "user.note"), os.listxattr(fd)]  # EIO and a traceback before
            linkat(AT_FDCWD, b"/proc/self/fd/%d" % fd, os.fsencode(os.path.join(d, "by-proc")),
                   AT_SYMLINK_FOLLOW)
            os.write(fd, b", then named")
            linkat(fd, b"", os.fsencode(os.path.join(d, "by-fd")), AT_EMPTY_PATH)
        finally:
            os.close(fd)
        never = os.open(d, os.O_TMPFILE | os.O_WRONLY, 0o600)  # closed unnamed: gone
        os.write(never, b"x")
        os.close(never)
        st = os.stat(os.path.join(d, "by-fd"))
        return [sorted(os.listdir(d)), open(os.path.join(d, "by-proc")).read(),
                oct(st.st_mode), st.st_nlink, xattrs]

    seen = both(plain, src, story)
    assert seen == [["by-fd", "by-proc"], "anonymous until linked, then named", "0o100604", 2,
                    [b"set while nameless", ["user.note"]]]
    eng.drain(src)
    assert eng.verify(src) == []
    assert os.getxattr(os.path.join(tgt, "by-fd"), "user.note") == b"set while nameless"
    assert "Traceback" not in eng.logtext(), eng.logtext()[-3000:]
    assert open(os.path.join(tgt, "by-fd")).read() == seen[1]
    assert os.stat(os.path.join(tgt, "by-fd")).st_ino == os.stat(os.path.join(tgt, "by-proc")).st_ino


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


# -- what a creation hands down, what I/O bypasses, what stat shows ---------------------------

def setid_story(d: str) -> list:
    """Set-ID bits asked for at creation stay (mirrorfs's own chown as root clears them)."""
    seen = []
    fd = os.open(os.path.join(d, "setid"), os.O_WRONLY | os.O_CREAT, 0o6755)
    os.close(fd)
    os.mknod(os.path.join(d, "setid-node"), stat.S_IFREG | 0o4750)
    os.mkdir(os.path.join(d, "shared"), 0o777)
    os.chmod(os.path.join(d, "shared"), 0o2777)
    seen.append(as_user(NOBODY, ["sh", "-c", "mkdir sub && touch file && chmod 4755 file"],
                        os.path.join(d, "shared")))
    for name in ("setid", "setid-node", "shared", "shared/sub", "shared/file"):
        st = os.stat(os.path.join(d, name))
        seen.append((name, oct(st.st_mode), st.st_uid, st.st_gid))
    return seen


def test_set_id_bits_at_creation_as_below(entry):
    eng, src, tgt, plain = entry
    seen = both(plain, src, setid_story)
    assert ("setid", "0o106755", 0, 0) in seen
    eng.drain(src)
    assert eng.verify(src) == []


def test_direct_io_works_as_below(entry):
    """O_DIRECT through mirrorfs (databases, VM images): aligned writes and reads."""
    eng, src, tgt, plain = entry

    def story(d):
        buf = mmap.mmap(-1, 64 * 1024)  # page-aligned, as O_DIRECT wants
        buf.write(os.urandom(64 * 1024))
        fd = os.open(os.path.join(d, "direct"), os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
        try:
            written = [os.pwrite(fd, buf, i * len(buf)) for i in range(4)]
            back = mmap.mmap(-1, 64 * 1024)
            got = os.preadv(fd, [back], 64 * 1024)
            return [written, got, back[:] == buf[:], os.fstat(fd).st_size]
        finally:
            os.close(fd)

    assert both(plain, src, story) == [[65536] * 4, 65536, True, 262144]
    eng.drain(src)
    assert eng.verify(src) == []


def test_stat_shows_the_lower_inode_numbers_and_birth_times(entry):
    """stat, ls -i, git and tar see the inode numbers the files had before the mount, and
    statx(2) their birth times (FUSE_STATX)."""
    eng, src, tgt, _ = entry
    os.mkdir(os.path.join(src, "d"))
    open(os.path.join(src, "d", "f"), "w").close()
    names = (".", "d", "d/f")

    def stat_x():  # coreutils stat asks statx for the birth time: %W
        return subprocess.run(["stat", "-c", "%n %i %W", *names], cwd=src, check=True,
                              capture_output=True, text=True).stdout

    seen = stat_x()
    listed = {e.name: e.inode() for e in os.scandir(os.path.join(src, "d"))}
    assert listed["f"] == os.lstat(os.path.join(src, "d", "f")).st_ino
    assert " 0\n" not in seen  # a birth time for each
    eng.stop()  # the lower tree shows again
    assert stat_x() == seen


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
