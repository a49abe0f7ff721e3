"""Whole-tree work between an entry's lower tree and its target: mirror, difference mirror, verify.

Both sides are directory fds, so the daemon can reach a lower tree hidden under its own mount;
paths are relative to them and may be longer than PATH_MAX (lowlevel.beneath walks those).
A walk never descends into a file system mounted below the entry (other st_dev): capture does
not cross it, so replication does not either. The difference mirror copies only what differs
(by size, then sha256), deletes what the source no longer has, and sets owners, modes, xattrs
and times; a full mirror is the same walk over an empty target.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from app.engine.lowlevel import beneath, proc_path

CHUNK = 1 << 20
# what an administrator expects copied, POSIX ACLs included
XATTR_PREFIXES = ("user.", "security.", "trusted.", "system.posix_acl_")
Progress = Callable[[int, int], None]  # (files done, bytes copied)


@dataclass
class Info:
    st: os.stat_result
    sha256: str | None = None
    link: bytes | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _join(base: bytes, name: bytes) -> bytes:
    return name if base in (b"", b".") else base + b"/" + name


def walk(root_fd: int):
    """Yield (rel, stat) for every entry below the root (parents first), same device only."""
    dev = os.stat(b".", dir_fd=root_fd).st_dev
    for dirpath, dirnames, filenames, dfd in os.fwalk(b".", dir_fd=root_fd, follow_symlinks=False):
        base = b"" if dirpath == b"." else dirpath[2:]
        keep = []
        for name in sorted(dirnames) + sorted(filenames):
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev != dev:
                    continue  # a file system mounted below the entry: not captured, not copied
                keep.append(name)
            yield _join(base, name), st
        dirnames[:] = sorted(keep)


def _lstat(dir_fd: int, rel: bytes) -> os.stat_result:
    with beneath(dir_fd, rel) as (d, name):
        return os.stat(name, dir_fd=d, follow_symlinks=False)


def _lexists(dir_fd: int, rel: bytes) -> bool:
    try:
        _lstat(dir_fd, rel)
    except FileNotFoundError:
        return False
    return True


def _readlink(dir_fd: int, rel: bytes) -> bytes:
    with beneath(dir_fd, rel) as (d, name):
        return os.readlink(name, dir_fd=d)


def _unlink(dir_fd: int, rel: bytes) -> None:
    with beneath(dir_fd, rel) as (d, name):
        os.unlink(name, dir_fd=d)


def file_hash(dir_fd: int, rel: bytes) -> str:
    h = hashlib.sha256()
    with beneath(dir_fd, rel) as (d, name):
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
    try:
        while chunk := os.read(fd, CHUNK):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def xattrs(dir_fd: int, rel: bytes) -> dict[str, bytes]:
    with beneath(dir_fd, rel) as (d, name):
        return _xattrs(proc_path(d, name))


def _xattrs(path: bytes) -> dict[str, bytes]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in names:
        if name.startswith(XATTR_PREFIXES):
            try:
                out[name] = os.getxattr(path, name, follow_symlinks=False)
            except OSError:
                continue  # not readable (e.g. a security module hides it): not compared
    return out


def scan(root_fd: int, *, with_root: bool = True) -> dict[bytes, Info]:
    """Everything verify compares, per entry-relative path (b"" is the entry itself)."""
    out: dict[bytes, Info] = {}
    if with_root:
        out[b""] = Info(os.stat(b".", dir_fd=root_fd, follow_symlinks=False), xattrs=xattrs(root_fd, b""))
    for rel, st in walk(root_fd):
        info = Info(st, xattrs=xattrs(root_fd, rel))
        if stat.S_ISREG(st.st_mode):
            info.sha256 = file_hash(root_fd, rel)
        elif stat.S_ISLNK(st.st_mode):
            info.link = _readlink(root_fd, rel)
        out[rel] = info
    return out


def _link_groups(tree: dict[bytes, Info]) -> dict[bytes, frozenset[bytes]]:
    groups: dict[tuple[int, int], set[bytes]] = {}
    for rel, info in tree.items():
        if not stat.S_ISDIR(info.st.st_mode) and info.st.st_nlink > 1:
            groups.setdefault((info.st.st_dev, info.st.st_ino), set()).add(rel)
    return {rel: frozenset(g) for g in groups.values() for rel in g}


def verify(src_fd: int, dst_fd: int) -> list[dict]:
    """Every difference between source and target: path, what differs, both values."""
    src, dst = scan(src_fd), scan(dst_fd)
    diffs: list[dict] = []

    def diff(rel: bytes, what: str, a, b) -> None:
        diffs.append({"path": os.fsdecode(rel) or ".", "what": what, "source": a, "target": b})

    for rel in sorted(src.keys() | dst.keys()):
        a, b = src.get(rel), dst.get(rel)
        if b is None:
            diff(rel, "missing at target", stat.filemode(a.st.st_mode), None)
            continue
        if a is None:
            diff(rel, "extra at target", None, stat.filemode(b.st.st_mode))
            continue
        if stat.S_IFMT(a.st.st_mode) != stat.S_IFMT(b.st.st_mode):
            diff(rel, "type", stat.filemode(a.st.st_mode), stat.filemode(b.st.st_mode))
            continue
        if stat.S_IMODE(a.st.st_mode) != stat.S_IMODE(b.st.st_mode) and not stat.S_ISLNK(a.st.st_mode):
            diff(rel, "mode", oct(stat.S_IMODE(a.st.st_mode)), oct(stat.S_IMODE(b.st.st_mode)))
        if (a.st.st_uid, a.st.st_gid) != (b.st.st_uid, b.st.st_gid):
            diff(rel, "owner", f"{a.st.st_uid}:{a.st.st_gid}", f"{b.st.st_uid}:{b.st.st_gid}")
        if a.sha256 != b.sha256:
            diff(rel, "content", a.sha256, b.sha256)
        if a.link != b.link:
            diff(rel, "symlink target", os.fsdecode(a.link), os.fsdecode(b.link))
        if stat.S_ISCHR(a.st.st_mode) or stat.S_ISBLK(a.st.st_mode):
            if a.st.st_rdev != b.st.st_rdev:
                diff(rel, "device number", a.st.st_rdev, b.st.st_rdev)
        if a.st.st_mtime_ns != b.st.st_mtime_ns:
            diff(rel, "mtime", a.st.st_mtime_ns, b.st.st_mtime_ns)
        if a.xattrs != b.xattrs:
            diff(rel, "xattrs", sorted(a.xattrs), sorted(b.xattrs))
    ga, gb = _link_groups(src), _link_groups(dst)
    for rel in sorted(ga.keys() | gb.keys()):
        if rel in src and rel in dst and ga.get(rel) != gb.get(rel):
            diff(rel, "hard links", sorted(map(os.fsdecode, ga.get(rel, {rel}))),
                 sorted(map(os.fsdecode, gb.get(rel, {rel}))))
    return diffs


# -- mirror ------------------------------------------------------------------------------------

def _remove(dir_fd: int, rel: bytes) -> None:
    with beneath(dir_fd, rel) as (d, name):
        if stat.S_ISDIR(os.stat(name, dir_fd=d, follow_symlinks=False).st_mode):
            shutil.rmtree(proc_path(d, name))
        else:
            os.unlink(name, dir_fd=d)


def _copy_file(src_fd: int, dst_fd: int, rel: bytes, st: os.stat_result) -> int:
    """Copy into a temporary name beside the file, then rename over: a hard-linked old file at
    the target is never written through."""
    with beneath(src_fd, rel) as (sd, sname), beneath(dst_fd, rel) as (dd, dname):
        return _copy_at(sd, sname, dd, dname, st)


def _copy_at(sd: int, sname: bytes, dd: int, dname: bytes, st: os.stat_result) -> int:
    tmp = _join(dname.rpartition(b"/")[0], b".mirrorsetup-tmp")
    fin = os.open(sname, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sd)
    try:
        fout = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=dd)
        try:
            done = 0
            while done < st.st_size:
                n = os.copy_file_range(fin, fout, CHUNK * 8)
                if n == 0:
                    break
                done += n
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    os.rename(tmp, dname, src_dir_fd=dd, dst_dir_fd=dd)
    return done


def _same_content(src_fd: int, dst_fd: int, rel: bytes, a: os.stat_result, b: os.stat_result) -> bool:
    return a.st_size == b.st_size and file_hash(src_fd, rel) == file_hash(dst_fd, rel)


def mirror(src_fd: int, dst_fd: int, progress: Progress | None = None) -> dict:
    """Make the target equal to the source; copy only what differs. Returns counts."""
    files = copied_bytes = copied = removed = 0
    linked: dict[tuple[int, int], bytes] = {}
    dirs: list[tuple[bytes, os.stat_result]] = [(b"", os.stat(b".", dir_fd=src_fd))]
    seen: set[bytes] = set()
    for rel, st in walk(src_fd):
        seen.add(rel)
        try:
            tst = _lstat(dst_fd, rel)
        except FileNotFoundError:
            tst = None
        if tst is not None and stat.S_IFMT(tst.st_mode) != stat.S_IFMT(st.st_mode):
            _remove(dst_fd, rel)
            tst = None
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            if tst is None:
                with beneath(dst_fd, rel) as (d, name):
                    os.mkdir(name, 0o700, dir_fd=d)
            dirs.append((rel, st))
            continue
        key = (st.st_dev, st.st_ino)
        if stat.S_ISREG(mode) and st.st_nlink > 1 and key in linked:
            first = linked[key]
            fst = _lstat(dst_fd, first)
            if tst is None or (tst.st_dev, tst.st_ino) != (fst.st_dev, fst.st_ino):
                if tst is not None:
                    _unlink(dst_fd, rel)
                with beneath(dst_fd, first) as (fd_, fname), beneath(dst_fd, rel) as (d, name):
                    os.link(fname, name, src_dir_fd=fd_, dst_dir_fd=d, follow_symlinks=False)
            files += 1
            continue
        if stat.S_ISREG(mode):
            if st.st_nlink > 1:
                linked[key] = rel
                if tst is not None and tst.st_nlink > 1:
                    tst = None  # linked to a wrong group: copy fresh rather than write through
            if tst is None or not _same_content(src_fd, dst_fd, rel, st, tst):
                copied_bytes += _copy_file(src_fd, dst_fd, rel, st)
                copied += 1
        elif stat.S_ISLNK(mode):
            target = _readlink(src_fd, rel)
            if tst is None or _readlink(dst_fd, rel) != target:
                if tst is not None:
                    _unlink(dst_fd, rel)
                with beneath(dst_fd, rel) as (d, name):
                    os.symlink(target, name, dir_fd=d)
                copied += 1
        else:
            if tst is None or tst.st_rdev != st.st_rdev:
                if tst is not None:
                    _unlink(dst_fd, rel)
                with beneath(dst_fd, rel) as (d, name):
                    os.mknod(name, mode, st.st_rdev, dir_fd=d)
                copied += 1
        _metadata(src_fd, dst_fd, rel, st)
        files += 1
        if progress and files % 100 == 0:
            progress(files, copied_bytes)
    for rel, tst in list(walk(dst_fd)):
        if rel not in seen and _lexists(dst_fd, rel):
            _remove(dst_fd, rel)
            removed += 1
    for rel, st in reversed(dirs):  # children first: their changes move the parent's mtime
        _metadata(src_fd, dst_fd, rel, st)
    if progress:
        progress(files, copied_bytes)
    return {"files": files, "copied": copied, "bytes": copied_bytes, "removed": removed}


def _metadata(src_fd: int, dst_fd: int, rel: bytes, st: os.stat_result) -> None:
    with beneath(dst_fd, rel) as (d, name):
        _metadata_at(xattrs(src_fd, rel), d, name, st)


def _metadata_at(want: dict[str, bytes], d: int, name: bytes, st: os.stat_result) -> None:
    os.chown(name, st.st_uid, st.st_gid, dir_fd=d, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=d)
    path = proc_path(d, name)
    have = _xattrs(path)
    for key in have.keys() - want.keys():
        os.removexattr(path, key, follow_symlinks=False)
    for key, value in want.items():
        if have.get(key) != value:
            try:
                os.setxattr(path, key, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP):
                    raise
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=d, follow_symlinks=False)
