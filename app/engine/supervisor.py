"""The daemon's view of its entries: one worker process per mounted entry, started and stopped here.

Mount: check the entry, spawn `python -m app.engine.worker` with one end of a socketpair, wait
for "ready" (sent from inside the worker's FUSE loop, so the mount point answers by then).
Unmount: refuse while other processes hold files below the path (named, via psutil) unless
forced; then umount2(path) from the daemon — a different process from the FUSE server, so the
kernel's round trip to the server cannot deadlock — lazily (MNT_DETACH) when forced.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass

import trio

from app.services import mounts
from app.services.config import FsEntry
from app.services.results import MirrorError, Outcome, Result

log = logging.getLogger("mirrorsetup.daemon")
FSTYPE = "fuse.mirrorfs"
STOP_WAIT_SECONDS = 30  # a clean stop drains the journal onto the target first


def entry_id(path: str) -> str:
    base = os.path.basename(path.rstrip("/")) or "root"
    return f"{base[:40]}-{hashlib.sha256(os.fsencode(path)).hexdigest()[:12]}"


async def spawn(module: str, args: list[str], entry, label: str, progress=None) -> tuple[Worker, dict]:
    """Start `python -m module ARGS --fd N` with one end of a socketpair; read its progress
    events until "ready" or an error. Returns the worker and that last message."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [sys.executable, "-m", module, *args, "--fd", str(theirs.fileno())]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = await trio.lowlevel.open_process(argv, pass_fds=(theirs.fileno(),),
                                            start_new_session=True, env=env)
    theirs.close()
    worker = Worker(entry, proc, trio.SocketStream(trio.socket.from_stdlib_socket(ours)),
                    trio.Lock(), {}, label=label)
    try:
        while True:
            msg = await worker._line()
            if msg.get("event") != "progress":
                break
            if progress:
                await progress(msg)
    except MirrorError:
        msg = {"event": "error", "message": f"capture worker for {label} exited with status "
               f"{await proc.wait()}", "errno": None}
    if msg.get("event") != "ready":
        with trio.move_on_after(5):
            await proc.wait()
    else:
        worker.info = msg
    return worker, msg


def our_mount(path: str, table=None) -> mounts.MountEntry | None:
    for m in reversed(table if table is not None else mounts.read_mountinfo()):
        if m.mount_point == path:
            return m if m.fstype == FSTYPE else None
    return None


def nested_mounts(path: str, table=None) -> list[str]:
    prefix = path.rstrip("/") + "/"
    return [m.mount_point for m in (table if table is not None else mounts.read_mountinfo())
            if m.mount_point.startswith(prefix)]


def _inside(inner: str, outer: str) -> bool:
    return inner != outer and inner.startswith(outer.rstrip("/") + "/")


def check_entry(entry: FsEntry) -> None:
    """Refuse what cannot be captured or replicated, before anything is changed."""
    path = entry.path
    if not os.path.isabs(path) or os.path.normpath(path) == "/":
        raise MirrorError(f"{path}: not an absolute directory other than /", errno=errno.EINVAL, obj=path)
    if not os.path.isdir(path):
        raise MirrorError(f"entry path {path} does not exist or is not a directory",
                          errno=errno.ENOENT, obj=path)
    if entry.target is None:
        return
    real, target = os.path.realpath(path), os.path.realpath(entry.target)
    if target == real:
        raise MirrorError(f"target {entry.target} is the replicated directory itself",
                          errno=errno.EINVAL, obj=entry.target)
    if _inside(target, real):
        raise MirrorError(f"target {entry.target} is inside the replicated directory {path}",
                          errno=errno.EINVAL, obj=entry.target)
    if _inside(real, target):
        raise MirrorError(f"target {entry.target} contains the replicated directory {path}",
                          errno=errno.EINVAL, obj=entry.target)
    probe = target if os.path.isdir(target) else os.path.dirname(target)
    if not os.path.isdir(probe):
        raise MirrorError(f"target {entry.target}: parent {probe} does not exist",
                          errno=errno.ENOENT, obj=entry.target)
    if not os.access(probe, os.W_OK):
        ro = os.statvfs(probe).f_flag & os.ST_RDONLY
        raise MirrorError(f"target {entry.target} is not writable"
                          + (" (read-only file system)" if ro else ""), errno=errno.EROFS if ro
                          else errno.EACCES, obj=entry.target)


def holders(path: str, exclude: set[int]) -> list[dict]:
    """Processes with a file or cwd on our mount at `path` (the unmount would be EBUSY).

    Matched by device number, not by name: a file opened in the lower tree before the mount
    has the same path but does not hold the mount. (stat of /proc/PID/fd/N asks our worker,
    which is alive and serving, so the daemon cannot block itself.)"""
    import psutil
    mine = our_mount(path)
    if mine is None:
        return []
    dev = os.makedev(mine.major, mine.minor)
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        if proc.pid in exclude:
            continue
        try:
            files = [(f.path, f"/proc/{proc.pid}/fd/{f.fd}") for f in proc.open_files()]
        except (psutil.Error, OSError):
            continue
        files.append((f"{path} (working directory)", f"/proc/{proc.pid}/cwd"))
        for name, link in files:
            try:
                if os.stat(link).st_dev == dev:
                    found.append({"pid": proc.pid, "name": proc.info["name"], "file": name})
                    break
            except OSError:
                continue
    return found


@dataclass
class Worker:
    entry: FsEntry
    proc: trio.Process
    stream: trio.SocketStream
    lock: trio.Lock
    info: dict
    label: str = ""
    buf: bytes = b""

    async def _line(self) -> dict:
        while b"\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise MirrorError(f"capture worker for {self.label} exited", errno=errno.EPIPE)
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    async def call(self, cmd: str, progress=None, **args) -> dict:
        async with self.lock:
            await self.stream.send_all(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            while True:
                msg = await self._line()
                if "progress" in msg and "ok" not in msg:
                    if progress:
                        await progress(msg["progress"])
                    continue
                return msg


class Supervisor:
    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.workers: dict[str, Worker] = {}
        self.detached: list[Worker] = []  # lazily unmounted, serving files still open
        self.nursery: trio.Nursery | None = None  # set by the daemon: watchers of the workers

    async def _watch(self, worker: Worker) -> None:
        """A worker that dies on its own leaves a dead mount (ENOTCONN): say so and clear it."""
        status = await worker.proc.wait()
        path = worker.entry.path
        if self.workers.get(path) is worker:
            del self.workers[path]
            log.error("capture of %s stopped unexpectedly (worker exit status %s); "
                      "clearing its dead mount", path, status)
            for r in await self.clean_stale(path):
                log.error("%s: %s", r.target, r.message)

    async def wait_detached(self, seconds: float) -> None:
        """At shutdown: give lazily unmounted workers time to finish; they exit with us."""
        with trio.move_on_after(seconds):
            for w in self.detached:
                await w.proc.wait()

    async def mount(self, entry: FsEntry, progress=None) -> Result:
        path = entry.path
        if path in self.workers and self.workers[path].proc.returncode is None:
            return Result("mount", path, Outcome.UNCHANGED, f"mirrorfs already mounted on {path}")
        try:
            check_entry(entry)
        except MirrorError as exc:
            return Result.from_error("mount", path, exc)
        self.detached = [w for w in self.detached if w.proc.poll() is None]
        if any(w.entry.path == path for w in self.detached):  # it still owns the journal and target
            return Result("mount", path, Outcome.FAILED, f"{path} was lazily unmounted and its capture "
                          "still serves files open there; mount again once they are closed", errno.EBUSY)
        if our_mount(path) is not None:
            await self.clean_stale(path)
            if our_mount(path) is not None:  # never stack on a live capture: its lower tree is not ours
                return Result("mount", path, Outcome.FAILED, f"{path} already has a live mirrorfs "
                              "mount served by another process", errno.EBUSY)
        state = os.path.join(self.state_dir, "journal", entry_id(path))
        os.makedirs(state, mode=0o700, exist_ok=True)
        args = ["--path", path, "--state", state]
        if entry.target:
            args += ["--target", entry.target]
        if entry.replicate_atime:
            args.append("--atime")
        worker, msg = await spawn("app.engine.worker", args, entry, path, progress)
        if msg.get("event") != "ready":
            return Result("mount", path, Outcome.FAILED, msg.get("message", "worker failed"),
                          msg.get("errno"))
        proc = worker.proc
        self.workers[path] = worker
        if self.nursery is not None:
            self.nursery.start_soon(self._watch, worker)
        note = ""
        if msg.get("mirrored"):
            m = msg["mirrored"]
            why = "unclean previous stop: difference mirror" if msg.get("unclean") else "first start: mirror"
            note = f"; {why} copied {m['copied']} of {m['files']} files, removed {m['removed']}"
        nested = nested_mounts(path)
        if nested:
            note += f"; not captured (mounted below): {', '.join(nested)}"
        return Result("mount", path, Outcome.OK, f"mounted mirrorfs on {path}{note}",
                      details={"pid": proc.pid, "unclean": msg.get("unclean")})

    async def unmount(self, path: str, force: bool = False) -> Result:
        worker = self.workers.get(path)
        if worker is None and our_mount(path) is None:
            return Result("unmount", path, Outcome.UNCHANGED, f"mirrorfs is not mounted on {path}")
        exclude = {os.getpid()} | {w.proc.pid for w in self.workers.values()}
        held = holders(path, exclude)
        if held and not force:
            names = "; ".join(f"pid {h['pid']} ({h['name']}) holds {h['file']}" for h in held)
            return Result("unmount", path, Outcome.FAILED, f"files are open under {path}: {names}; "
                          "close them or unmount with --force (lazy unmount)", errno.EBUSY,
                          details={"holders": held})
        lazy = False
        try:
            mounts.umount(path, 0)
        except MirrorError as exc:
            if exc.errno != errno.EBUSY or not force:
                return Result.from_error("unmount", path, exc)
            mounts.umount(path, mounts.MNT_DETACH)
            lazy = True
        if worker is not None:
            self.workers.pop(path, None)
            with trio.move_on_after(0 if lazy else STOP_WAIT_SECONDS):
                await worker.proc.wait()
            if worker.proc.returncode is None:
                # detached but still serving open files; the path itself is free to mount again
                self.detached.append(worker)
        if lazy:
            who = ", ".join(f"pid {h['pid']} ({h['name']})" for h in held) or "open files"
            return Result("unmount", path, Outcome.OK, f"lazy unmount of {path}: detached now, capture "
                          f"ends when {who} close their files", details={"lazy": True, "holders": held})
        return Result("unmount", path, Outcome.OK, f"unmounted mirrorfs from {path}")

    async def clean_stale(self, only: str | None = None) -> list[Result]:
        """Lazily unmount fuse.mirrorfs mounts left by a killed daemon (they answer ENOTCONN)."""
        out = []
        mine = {w.entry.path for w in self.workers.values()}
        for m in mounts.read_mountinfo():
            if m.fstype != FSTYPE or m.mount_point in mine or (only and m.mount_point != only):
                continue
            if not await _is_stale(m.mount_point):
                continue
            try:
                mounts.umount(m.mount_point, mounts.MNT_DETACH)
                out.append(Result("unmount", m.mount_point, Outcome.OK,
                                  "lazy unmount of a stale mirrorfs left by a stopped daemon"))
            except MirrorError as exc:
                out.append(Result.from_error("unmount", m.mount_point, exc))
        return out

    async def reap(self) -> None:
        """Forget workers whose process has ended (their mount went with them)."""
        for path, w in list(self.workers.items()):
            if w.proc.returncode is not None or w.proc.poll() is not None:
                self.workers.pop(path, None)


async def _is_stale(path: str) -> bool:
    """statfs() in a thread with a deadline: a mount whose server is stopped may hang, not fail.
    Not stat(): the kernel may answer that from its attribute cache without asking the server."""
    def probe() -> bool:
        try:
            os.statvfs(path)
            return False
        except OSError as exc:
            return exc.errno == errno.ENOTCONN
    with trio.move_on_after(2):
        return await trio.to_thread.run_sync(probe, abandon_on_cancel=True)
    return False
