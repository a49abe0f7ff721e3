"""Replays journal records, in order, onto a local target: a directory (FsApplier) or a file
or block device (BlockApplier). Used by local targets and by the remote agent alike.

Replay must converge when a record is applied twice (after a crash the durable position may
lag what was done): a write at an offset is idempotent; creates tolerate an existing name;
removals tolerate a missing one; a rename whose source is gone but whose destination exists is
taken as already done. Records carry entry-relative paths of any length: a long one's
directories are opened piece by piece (lowlevel.beneath), below PATH_MAX each. Whoever applies
calls `sync()` before saying the records are durable.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat

from app.engine.journal import Record, decode_path
from app.engine.lowlevel import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE,
                                 LONG_PATH, RENAME_EXCHANGE, _libc, beneath, chmod_nofollow,
                                 chmod_nofollow_compiled, compiled, fallocate, linkat_fd, open_dir,
                                 proc_path, renameat2)
from app.engine.sync import FOLIO_MAX, drop_cached

log = logging.getLogger("mirrorsetup.applier")
FD_CACHE = 64  # open target files kept between writes (sequential writes come in 128 KiB+ pieces)
ZERO_CHUNK = 1 << 20
LARGE_WRITE = 256 << 10  # a block write this large can leave a large folio in the target's cache
_pwrite_all = getattr(compiled, "pwrite_all", None)  # a block applier's batches, compiled
_fs_apply_run = getattr(compiled, "fs_apply_run", None)  # a directory applier's runs, compiled
OP_WRITE, OP_TIMES, OP_CHMOD, OP_CHOWN, OP_CREATE, OP_UNLINK, OP_PUT = range(7)  # fs_apply_run's
RUN_OPS = {"write", "times", "chmod", "chown", "create", "unlink", "put"}  # a run's (no O_TMPFILE)


def pwrite_whole(fd: int, data, offset: int) -> None:
    """pwrite(2) all of `data`: a write cut short (a file system that had room for only part
    of it) goes on until done or an error says why. os.pwrite alone returned the short count,
    the record counted as applied, and a full target lost the rest of it for good: shipping
    paused at the next record."""
    done = os.pwrite(fd, data, offset)
    if done < len(data):
        view = memoryview(data)
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)


FILE_OPS = {"write", "truncate", "fallocate"}  # records about a regular file's data
NODE_OPS = {"times", "chmod", "chown", "setxattr", "removexattr"}  # about any node


def _syncfs(fd: int) -> None:
    """Make the target's writes durable before the applied seq says they are done."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "target")


class FsApplier:
    """Applies file-system records to a target directory reached through `target_fd` (O_PATH)."""

    def __init__(self, target_fd: int):
        self.tfd = target_fd
        # syncfs(2) needs a real open file, not the O_PATH fd the *at() calls use
        self._sync_fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=target_fd)
        self._fds: dict[bytes, int] = {}
        self._tmp: dict[int, int] = {}  # O_TMPFILE files at the target, by their record's seq

    def close(self) -> None:
        self._close_fds()
        for fd in self._tmp.values():
            os.close(fd)
        self._tmp.clear()
        os.close(self._sync_fd)

    def sync(self) -> None:
        """Make everything applied so far durable on the target's file system."""
        _syncfs(self._sync_fd)

    # -- records ----------------------------------------------------------------------------
    def close_files(self) -> None:
        """Close the files kept open between records (opened again by name when next
        written): a file removed meanwhile then gives its room back."""
        self._close_fds()

    def _close_fds(self, path: bytes | None = None) -> None:
        for p in list(self._fds) if path is None else [path]:
            fd = self._fds.pop(p, None)
            if fd is not None:
                os.close(fd)

    def _keep_fd(self, path: bytes, fd: int) -> None:
        self._close_fds(path)
        if len(self._fds) >= FD_CACHE:
            self._close_fds()
        self._fds[path] = fd

    def _fd(self, path: bytes) -> int:
        fd = self._fds.get(path)
        if fd is None:
            if len(self._fds) >= FD_CACHE:
                self._close_fds()
            with beneath(self.tfd, path) as (d, name):
                fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
            self._fds[path] = fd
        return fd

    def _tmp_fd(self, seq: int) -> int:
        fd = self._tmp.get(seq)
        if fd is None:
            raise OSError(errno.EBADF, f"O_TMPFILE file of record {seq} is not open at the target")
        return fd

    def apply_run(self, records: list[Record], start: int, skip=None, instead=None,
                  check=None) -> int:
        """Apply records[start:] while each is a system call or two about one short name or a
        file held open (a write, times, chmod, chown, a file made or a name removed, a walk's
        whole small file), with one GIL release for them all (when `_fuseread` is built);
        `skip` and `instead` as `target._apply_all` takes them; `check(record)` (the agent's
        path checks) False ends the run before that record. Returns the index of the first
        record not applied: `apply` goes on from there, and says why when one failed. One by
        one, the applier gave the GIL up and took it back at every system call, and the
        capture's request loop (or the agent's reader and journal) beside it waited for it."""
        if _fs_apply_run is None:
            return start
        ops, at = [], []  # the ops, and the index of the record each one is
        made: dict[bytes, int] = {}  # a file made by this run (and not removed since): its op
        gone: set[bytes] = set()  # names this run removes (their kept files closed after it)
        i, n = start, len(records)
        while i < n:
            if skip and i in skip:
                i += 1
                continue
            rec = instead.get(i, records[i]) if instead else records[i]
            op, a = rec.op, rec.args
            if op not in RUN_OPS or "tmp" in a:
                break
            path = decode_path(a["path"]) if "path" in a else b""
            if len(path) >= LONG_PATH or (check is not None and not check(rec)):
                break  # (opened in pieces by `apply`; refused or checked again by it)
            name = path or b"."
            if op == "write":
                k = made.get(path)
                if k is not None:
                    fd = -k - 1
                elif path in gone:
                    break  # (no file of that name to keep open now: `apply` says so)
                else:
                    fd = self._fds.get(path)
                    if fd is None:
                        if len(self._fds) >= FD_CACHE:
                            break  # (opening one more closes those the ops so far use)
                        try:
                            fd = self._fd(path)
                        except OSError:
                            break  # `apply` tries again and says why
                ops.append((OP_WRITE, fd, a["offset"], rec.data))
            elif op == "times":
                ops.append((OP_TIMES, name, a["atime"], a["mtime"]))
            elif op == "chmod":
                if not chmod_nofollow_compiled():
                    break
                ops.append((OP_CHMOD, name, a["mode"]))
            elif op == "chown":
                ops.append((OP_CHOWN, name, a["uid"], a["gid"]))
            elif op in ("create", "put"):
                if not path or len(made) + len(self._fds) >= FD_CACHE:
                    break  # (`apply` keeps it, closing the others first)
                made[path] = len(ops)
                if op == "create":
                    ops.append((OP_CREATE, name, a["mode"], a["uid"], a["gid"]))
                else:  # (one already there is EEXIST: `apply` removes it, a tree too)
                    times = (a["atime"], a["mtime"]) if "mtime" in a else (None, None)
                    ops.append((OP_PUT, name, a["mode"], a["uid"], a["gid"], rec.data,
                                a["size"], *times))
            else:  # unlink
                if not path:
                    break
                made.pop(path, None)
                gone.add(path)
                ops.append((OP_UNLINK, name))
            at.append(i)
            i += 1
        if not ops:
            return i
        done, _, files = _fs_apply_run(self.tfd, ops)
        for path in gone:  # (first: a file of that name made after its removal is kept below)
            self._close_fds(path)
        for k, fd in files:  # kept for the records that write them next, as `apply` keeps them
            if made.get(ops[k][1]) == k:
                self._keep_fd(ops[k][1], fd)
            else:  # removed again within the run, or made again: that one is kept
                os.close(fd)
        return i if done == len(ops) else at[done]

    def apply(self, rec: Record) -> None:
        a = rec.args
        op = rec.op
        path = decode_path(a["path"]) if "path" in a else b""
        if op in FILE_OPS:  # about a regular file's data: through a cached open fd
            _apply_fd(op, a, rec.data, self._tmp_fd(a["tmp"]) if "tmp" in a else self._fd(path))
        elif "tmp" in a and op in NODE_OPS:
            _apply_fd(op, a, rec.data, self._tmp_fd(a["tmp"]))
        elif op == "tmpfile":
            with beneath(self.tfd, path) as (d, name):
                fd = os.open(name, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, a["mode"], dir_fd=d)
            self._tmp[rec.seq] = fd
            os.fchown(fd, a["uid"], a["gid"])
            os.fchmod(fd, a["mode"])  # after the chown, which clears set-ID bits
        elif op == "tmpclose":
            fd = self._tmp.pop(a["tmp"], None)
            if fd is not None:
                os.close(fd)
        elif op == "link":
            self._close_fds()
            self._link(a, path)
        elif op == "rename":
            self._rename(decode_path(a["old"]), decode_path(a["new"]), a["flags"])
        elif op in ("remove", "prune"):  # a resync's: what the source no longer has goes
            self._close_fds()
            self._remove(op, a, path)
        elif op == "put":
            self._put(a, rec.data, path)
        else:
            with beneath(self.tfd, path) as (d, name):
                self._apply_at(op, a, rec.data, d, name, path)

    def _apply_at(self, op: str, a: dict, data: bytes, d: int, name: bytes, path: bytes) -> None:
        """A record about one name: `name` in the target directory `d`."""
        if op == "times":
            atime = a["atime"]
            if atime is None:
                atime = os.stat(name, dir_fd=d, follow_symlinks=False).st_atime_ns
            os.utime(name, ns=(atime, a["mtime"]), dir_fd=d, follow_symlinks=False)
        elif op == "create":
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, a["mode"], dir_fd=d)
            except FileExistsError:  # replayed: start the file again, later records refill it
                fd = os.open(name, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
            self._keep_fd(path, _made_file(fd, a))  # its data records come next
        elif op == "mkdir":
            try:
                os.mkdir(name, a["mode"], dir_fd=d)
            except FileExistsError:
                pass
            chmod_nofollow(d, name, a["mode"])
            os.chown(name, a["uid"], a["gid"], dir_fd=d, follow_symlinks=False)
        elif op == "mknod":
            _replace_missing(d, name, lambda: os.mknod(name, a["mode"], a["rdev"], dir_fd=d))
            os.chown(name, a["uid"], a["gid"], dir_fd=d, follow_symlinks=False)
            if a["mode"] & (stat.S_ISUID | stat.S_ISGID):
                chmod_nofollow(d, name, stat.S_IMODE(a["mode"]))
        elif op == "symlink":
            target = decode_path(a["target"])
            _replace_missing(d, name, lambda: os.symlink(target, name, dir_fd=d))
            os.chown(name, a["uid"], a["gid"], dir_fd=d, follow_symlinks=False)
        elif op == "unlink":
            self._close_fds(path)
            _missing_ok(lambda: os.unlink(name, dir_fd=d))
        elif op == "rmdir":
            self._close_fds()
            _missing_ok(lambda: os.rmdir(name, dir_fd=d))
        elif op == "chmod":
            chmod_nofollow(d, name, a["mode"])
        elif op == "chown":
            os.chown(name, a["uid"], a["gid"], dir_fd=d, follow_symlinks=False)
        elif op == "setxattr":
            os.setxattr(proc_path(d, name), decode_path(a["name"]), data, follow_symlinks=False)
        elif op == "removexattr":
            try:
                os.removexattr(proc_path(d, name), decode_path(a["name"]), follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
        else:
            raise OSError(errno.EINVAL, f"unknown journal op {op!r}")

    def _put(self, a: dict, data: bytes, path: bytes) -> None:
        """A whole small file as a walk read it (remove, create, write, truncate and times
        in one record): whatever had the name goes first, a directory with its tree."""
        with beneath(self.tfd, path) as (d, name):
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            try:
                fd = os.open(name, flags, a["mode"], dir_fd=d)
            except FileExistsError:  # the old file, or a replay: made anew
                if stat.S_ISDIR(os.stat(name, dir_fd=d, follow_symlinks=False).st_mode):
                    self._close_fds()  # cached fds below it would write into removed files
                else:
                    self._close_fds(path)
                _remove_tree(d, name)
                fd = os.open(name, flags, a["mode"], dir_fd=d)
            self._keep_fd(path, _made_file(fd, a, data))  # captured writes to it may come next

    def _link(self, a: dict, path: bytes) -> None:
        """A new name: for a name, or for an O_TMPFILE file (its first, from its open fd)."""
        with beneath(self.tfd, path) as (d, name):
            if "tmp" in a:
                fd = self._tmp_fd(a["tmp"])
                try:
                    linkat_fd(fd, d, name)
                except FileExistsError:
                    if os.fstat(fd).st_ino != os.stat(name, dir_fd=d, follow_symlinks=False).st_ino:
                        os.unlink(name, dir_fd=d)
                        linkat_fd(fd, d, name)
                os.close(self._tmp.pop(a["tmp"]))  # named now: later records use its path
                return
            with beneath(self.tfd, decode_path(a["src"])) as (sd, sname):
                try:
                    os.link(sname, name, src_dir_fd=sd, dst_dir_fd=d, follow_symlinks=False)
                except FileExistsError:
                    if not _same_file(sd, sname, d, name):
                        os.unlink(name, dir_fd=d)
                        os.link(sname, name, src_dir_fd=sd, dst_dir_fd=d, follow_symlinks=False)

    def _remove(self, op: str, a: dict, path: bytes) -> None:
        """"remove": the name, a whole tree too. "prune": every name of the directory that is
        not in `keep` (a resync's listing of the source)."""
        if op == "remove":
            with beneath(self.tfd, path) as (d, name):
                _missing_ok(lambda: _remove_tree(d, name))
            return
        keep = {decode_path(n) for n in a["keep"]} | (set() if path else {b"lost+found"})
        try:
            d = open_dir(self.tfd, path) if path else os.dup(self.tfd)
        except (FileNotFoundError, NotADirectoryError):
            return  # replayed after the directory went: nothing to prune
        busy: OSError | None = None
        try:
            dev = os.fstat(d).st_dev
            for name in [os.fsencode(n) for n in os.listdir(f"/proc/self/fd/{d}")]:
                # another file system mounted there is not the replica's (a fail-back writes
                # into the entry itself, where one may be mounted below; capture leaves it out)
                if name not in keep and _lstat_dev(d, name) in (dev, None):
                    try:
                        _missing_ok(lambda: _remove_tree(d, name))
                    except OSError as exc:  # one left above a mount: the others go all the same
                        if exc.errno != errno.EBUSY:
                            raise
                        busy = busy or exc
        finally:
            os.close(d)
        if busy is not None:
            raise busy

    def _rename(self, old: bytes, new: bytes, flags: int) -> None:
        self._close_fds()
        with beneath(self.tfd, old) as (od, oname), beneath(self.tfd, new) as (nd, nname):
            try:
                # NOREPLACE was checked at the source; at the target the name may exist from replay
                renameat2(od, oname, nd, nname, flags & RENAME_EXCHANGE)
            except FileNotFoundError:
                if not os.path.lexists(proc_path(nd, nname)):
                    raise  # neither name: a real divergence, counted and fixed by a difference mirror


def _made_file(fd: int, a: dict, data: bytes | None = None) -> int:
    """A file a create or put record made (or started again): its owner, then its mode (after
    the chown, which clears set-ID bits); for a put (`data`) its content, size and times.
    The fd is closed when any of that fails."""
    try:
        os.fchown(fd, a["uid"], a["gid"])
        os.fchmod(fd, a["mode"])
        if data is not None:
            if data:
                pwrite_whole(fd, data, 0)
            if a["size"] != len(data):
                os.ftruncate(fd, a["size"])
            if "mtime" in a:
                os.utime(fd, ns=(a["atime"], a["mtime"]))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _apply_fd(op: str, a: dict, data: bytes, fd: int) -> None:
    """A record about an open file at the target (by path through the fd cache, or an
    O_TMPFILE file that has no name yet)."""
    if op == "write":
        pwrite_whole(fd, data, a["offset"])
    elif op == "truncate":
        os.ftruncate(fd, a["size"])
    elif op == "fallocate":
        _fallocate(fd, a["mode"], a["offset"], a["length"])
    elif op == "times":
        atime = os.fstat(fd).st_atime_ns if a["atime"] is None else a["atime"]
        os.utime(fd, ns=(atime, a["mtime"]))
    elif op == "chmod":
        os.fchmod(fd, a["mode"])
    elif op == "chown":
        os.fchown(fd, a["uid"], a["gid"])
    elif op == "setxattr":
        os.setxattr(fd, decode_path(a["name"]), data)
    elif op == "removexattr":
        try:
            os.removexattr(fd, decode_path(a["name"]))
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) as the source did; a target file system that cannot gets the same bytes:
    zeros written over a punched or zeroed range, the size extended by an allocation."""
    try:
        fallocate(fd, mode, offset, length)
        return
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
    size, end = os.fstat(fd).st_size, offset + length
    if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
        stop = min(end, size) if mode & FALLOC_FL_KEEP_SIZE else end
        zeros = bytes(min(ZERO_CHUNK, max(stop - offset, 0)))
        for at_ in range(offset, stop, ZERO_CHUNK):
            pwrite_whole(fd, zeros[:stop - at_], at_)
    elif not mode & FALLOC_FL_KEEP_SIZE and end > size:
        os.ftruncate(fd, end)


def _replace_missing(d: int, name: bytes, make) -> None:
    try:
        make()
    except FileExistsError:
        os.unlink(name, dir_fd=d)
        make()


def _lstat_dev(d: int, name: bytes) -> int | None:
    """The device of `name` in directory `d` (a mount point: the file system mounted there);
    None when it is gone."""
    try:
        return os.lstat(name, dir_fd=d).st_dev
    except FileNotFoundError:
        return None


def _missing_ok(fn) -> None:
    try:
        fn()
    except FileNotFoundError:
        pass


def _same_file(da: int, a: bytes, db: int, b: bytes) -> bool:
    sa = os.stat(a, dir_fd=da, follow_symlinks=False)
    sb = os.stat(b, dir_fd=db, follow_symlinks=False)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class BlockApplier:
    """Applies block writes to a target file or device at the same window offsets."""

    def __init__(self, fd: int, offset: int = 0):
        self.fd = fd
        self.offset = offset  # where the window starts in `fd` (0 for a target)
        # FOLIO_MAX windows of `fd` that large writes went to since the last sync: dropped from
        # the page cache once synced (sync.drop_cached); the cache it had before, at once
        self._large: set[int] = set()
        drop_cached(fd)

    def _wrote(self, offset: int, length: int) -> None:
        if length >= LARGE_WRITE:
            at = self.offset + offset
            self._large.update(range(at // FOLIO_MAX, (at + length - 1) // FOLIO_MAX + 1))

    def apply_many(self, records: list[Record]) -> int:
        """Apply the leading "write" records with one GIL release (when `_fuseread` is built):
        how many were applied. Where it stops (another op, a failed write) `apply` goes on.
        One by one, the applier gave the GIL up and took it back at every record, and the
        request loop beside it waited for it (bench/apps.py, fio qd16 on a captured loop, 3
        interleaved runs against one by one: 64 KiB 304 vs 267 MB/s, 4 KiB 115 vs 117)."""
        if _pwrite_all is None:
            return 0
        run = 0
        for rec in records:
            if rec.op != "write":
                break
            run += 1
        if not run:
            return 0
        done, _ = _pwrite_all(self.fd, self.offset, [r.args["offset"] for r in records[:run]],
                              [r.data for r in records[:run]])
        for rec in records[:done]:  # a call per large write only: 4 KiB ones are the hot path
            if len(rec.data) >= LARGE_WRITE:
                self._wrote(rec.args["offset"], len(rec.data))
        return done

    def apply(self, rec: Record) -> None:
        if rec.op == "write":
            pwrite_whole(self.fd, rec.data, self.offset + rec.args["offset"])
            self._wrote(rec.args["offset"], len(rec.data))
        elif rec.op == "zero":  # a run of zeros sent as its length (the wire's zero range)
            offset, length = self.offset + rec.args["offset"], rec.args["length"]
            zeros = bytes(min(length, ZERO_CHUNK))
            done = 0
            while done < length:
                done += os.pwrite(self.fd, zeros[:length - done], offset + done)
            self._wrote(rec.args["offset"], length)
        else:
            raise OSError(errno.EINVAL, f"unknown block journal op {rec.op!r}")

    def sync(self) -> None:
        os.fdatasync(self.fd)
        for w in self._large:
            drop_cached(self.fd, w * FOLIO_MAX, (w + 1) * FOLIO_MAX)
        self._large.clear()

    def close(self) -> None:
        pass


def _remove_tree(dir_fd: int, name: bytes) -> None:
    """Remove `name` in `dir_fd`, a directory with its whole tree, but never anything on
    another file system mounted below it (shutil.rmtree went into one and emptied it: a
    fail-back's remove or prune of a directory above a second disk mounted in the entry):
    the mount point and the directories above it are left, and that is said (EBUSY)."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    kept = _remove_on(dir_fd, name, st.st_dev)
    if kept:
        raise OSError(errno.EBUSY, f"left {kept[0].decode(errors='replace')}: another file "
                      "system is mounted there", name.decode(errors="replace"))


def _remove_on(dir_fd: int, name: bytes, dev: int) -> list[bytes]:
    """Remove the directory `name` in `dir_fd` and its tree on the device `dev`: the paths
    (below `name`) of mount points of other file systems it left, with their parents."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    kept: list[bytes] = []
    try:
        if os.fstat(fd).st_dev != dev:
            return [name]
        with os.scandir(fd) as it:
            entries = [(os.fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in it]
        for child, is_dir in entries:
            if is_dir:
                kept += [name + b"/" + k for k in _remove_on(fd, child, dev)]
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    if not kept:
        os.rmdir(name, dir_fd=dir_fd)
    return kept
