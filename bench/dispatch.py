"""Issue 14, by hand: what one FUSE request costs, server by server, with no disk in the way.

    .venv/bin/python bench/dispatch.py [--requests 20000] [--runs 3] [--servers a,b,...]

Runs as root. The client asks `getxattr("user.none")` of one file --requests times (the kernel
never caches the "no such attribute" answer, so every call is one round trip), then opens and
closes it --requests / 3 times (OPEN, FLUSH, RELEASE), then creates, writes (4 KiB) and closes
--requests / 7 files (7 requests each; not on pyfuse3-bare), then writes 128 MiB in 1 MiB
writes + fsync (WRITE + GETXATTR per MiB). For each server it prints microseconds per request seen by the client
(or per file) and the server's CPU microseconds per request (user + system of all its threads,
from /proc: robust when other work shares the two cores). Servers (each on a private tmpfs lower directory):

  passthrough_ll   libfuse's C example (built here, as bench/apps.py does), -s: one thread;
  passthrough_mt   the same, multi-threaded (its default);
  pyfuse3-bare     a pyfuse3 file system whose handlers do nothing (pyfuse3's dispatch alone;
                   needs `pip install '.[bench]'`: mirrorfs speaks FUSE itself, through
                   app/engine/fusewire.py);
  mirrorfs         app.engine.mirrorfs.MirrorFS with a journal and no target (no applier);
  mirrorfs+applier the same with an applier thread replaying onto a target directory;
  mirrorfs-alone   no applier thread at all (records pile up in memory): what moving the
                   applier out of the capture process could buy at best.

A server may be given as KIND@DIR: its Python code is then imported from the checkout DIR
(e.g. `git archive HEAD app | tar x -C DIR`), so a change and its baseline run side by side,
interleaved, in one invocation. Medians (and minima: other work only adds) of --runs; servers
take turns within a run. Everything is unmounted and removed at the
end, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TICK = os.sysconf("SC_CLK_TCK")
SERVERS = ("passthrough_ll", "passthrough_mt", "pyfuse3-bare", "mirrorfs", "mirrorfs+applier", "mirrorfs-alone")


def cpu_seconds(pid: int, main_only: bool = False) -> float:
    """CPU seconds (user + system) of every thread of `pid`, or of its main thread only."""
    total = 0.0
    for tid in [str(pid)] if main_only else os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


# -- servers (run in a child: `dispatch.py --serve KIND LOWER MNT [TARGET STATE]`) ----------
def serve(kind: str, lower: str, mnt: str, extra: list[str]) -> None:
    if "@" in kind:
        kind, repo = kind.split("@", 1)
        sys.path.insert(0, repo)
    import trio

    if kind == "pyfuse3-bare":
        import pyfuse3  # pip install '.[bench]': the product speaks FUSE itself (fusewire)
        pyfuse3.init(Bare(), mnt, {"fsname=bare", "default_permissions", "allow_other"})
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            trio.run(pyfuse3.main)
        finally:
            pyfuse3.close(unmount=False)
        return
    from app.engine.journal import Journal
    from app.engine.mirrorfs import MirrorFS, mount
    from app.engine.shipper import Shipper
    from app.engine.capture import NoTarget
    from app.engine.target import Claim, LocalDirTarget
    target, state = extra
    root = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    journal = Journal(state)
    ops = MirrorFS(root, journal)
    if kind != "mirrorfs-alone":  # the capture's own applier thread: records onto the target
        to = (LocalDirTarget(target, Claim(f"fs:{lower}", "bench"), Path(state))
              if kind == "mirrorfs+applier" else NoTarget())
        to.open()  # claims the target directory, as the capture does before it ships
        Shipper(journal, to).start()
    session = mount(ops, mnt, ("fsname=mirrorfs", "subtype=mirrorfs", "allow_other",
                               "default_permissions"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        trio.run(session.main)
    finally:
        session.close(unmount=False)


class Bare:
    """Just enough for the client: a root with one empty file `f`; handlers do no system call."""

    def __new__(cls):
        import pyfuse3

        class _Bare(pyfuse3.Operations):
            enable_writeback_cache = False

            def _attr(self, ino):
                e = pyfuse3.EntryAttributes()
                e.st_ino = ino
                e.entry_timeout = e.attr_timeout = 1.0
                e.st_mode = (stat.S_IFDIR | 0o755) if ino == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o644)
                e.st_nlink = 2 if ino == pyfuse3.ROOT_INODE else 1
                return e

            async def getattr(self, inode, ctx=None):
                return self._attr(inode)

            async def lookup(self, parent, name, ctx=None):
                if name != b"f":
                    raise pyfuse3.FUSEError(errno.ENOENT)
                return self._attr(pyfuse3.ROOT_INODE + 1)

            async def getxattr(self, inode, name, ctx):
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

            async def open(self, inode, flags, ctx):
                return pyfuse3.FileInfo(fh=inode)

            async def flush(self, fh):
                pass

            async def release(self, fh):
                pass
        return _Bare()


# -- client ----------------------------------------------------------------------------------
def client(path: str, n: int) -> dict[str, float]:
    out = {}
    t0 = time.perf_counter()
    for _ in range(n):
        try:
            os.getxattr(path, "user.none")
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    out["getxattr"] = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n // 3):
        os.close(os.open(path, os.O_RDONLY))
    out["open+close"] = (time.perf_counter() - t0) / (n // 3)
    return out


def sequential(path: str, size: int = 128 << 20) -> float:
    """Seconds per MiB: `size` bytes in 1 MiB writes + fsync (2 requests per MiB)."""
    buf = os.urandom(1 << 20)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size >> 20):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    return (time.perf_counter() - t0) / (size >> 20)


def small_files(directory: str, n: int) -> float:
    """Seconds per 4 KiB file created, written and closed (7 requests each)."""
    buf = b"x" * 4096
    os.mkdir(directory)
    t0 = time.perf_counter()
    for i in range(n):
        fd = os.open(f"{directory}/f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, buf)
        os.close(fd)
    return (time.perf_counter() - t0) / n


class Mounted:
    def __init__(self, kind: str, work: Path, build: Path, n: int):
        self.mnt = work / f"mnt-{n}"
        self.lower = work / f"lower-{n}"
        for d in (self.mnt, self.lower, work / f"tgt-{n}"):
            d.mkdir()
        (self.lower / "f").write_bytes(b"")
        if kind.startswith("passthrough"):
            argv = [str(build / "passthrough_ll"), "-f", "-o",
                    f"source={self.lower},xattr,default_permissions,allow_other", str(self.mnt)]
            if kind == "passthrough_ll":
                argv.insert(2, "-s")
        else:
            argv = [sys.executable, __file__, "--serve", kind, str(self.lower), str(self.mnt),
                    str(work / f"tgt-{n}"), str(work / f"state-{n}")]
        self.proc = subprocess.Popen(argv, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not mount")
            time.sleep(0.05)

    def stop(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", str(self.mnt)], capture_output=True)
            if os.path.ismount(self.mnt):
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--servers", default=",".join(SERVERS))
    args = p.parse_args()
    servers = [s for s in args.servers.split(",") if s]
    if {s.split("@")[0] for s in servers} - set(SERVERS):
        p.error(f"unknown server(s); choose from {', '.join(SERVERS)}")
    if os.geteuid() != 0:
        p.error("run as root")
    work = Path(tempfile.mkdtemp(prefix="mirrorsetup-dispatch-"))
    mounted: list[Mounted] = []
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "dispatch", str(work)], check=True)
        build = work / "build"
        build.mkdir()
        ex = Path("/usr/share/doc/libfuse3-dev/examples")
        for f in ("passthrough_ll.c", "passthrough_helpers.h"):
            shutil.copy(ex / f, build)
        cflags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True,
                                check=True).stdout.split()
        subprocess.run(["gcc", "-O2", "-o", str(build / "passthrough_ll"), str(build / "passthrough_ll.c"),
                        *cflags], check=True)
        for n, kind in enumerate(servers):
            mounted.append(Mounted(kind, work, build, n))
        res: dict[tuple[str, str], list[float]] = {}
        for r in range(args.runs):
            for m, kind in list(zip(mounted, servers))[r % len(servers):] + list(zip(mounted, servers))[:r % len(servers)]:
                c0 = cpu_seconds(m.proc.pid)
                got = client(str(m.mnt / "f"), args.requests)
                cpu = cpu_seconds(m.proc.pid) - c0
                nreq = args.requests + 3 * (args.requests // 3)
                for k, v in got.items():
                    res.setdefault((kind, k), []).append(v)
                res.setdefault((kind, "cpu"), []).append(cpu / nreq)
                if kind != "pyfuse3-bare":
                    c0, f0 = cpu_seconds(m.proc.pid), cpu_seconds(m.proc.pid, main_only=True)
                    nfiles = args.requests // 7
                    res.setdefault((kind, "file"), []).append(small_files(str(m.mnt / f"d{r}"), nfiles))
                    res.setdefault((kind, "filecpu"), []).append((cpu_seconds(m.proc.pid) - c0) / nfiles)
                    res.setdefault((kind, "fusecpu"), []).append(
                        (cpu_seconds(m.proc.pid, main_only=True) - f0) / nfiles)
                    shutil.rmtree(m.mnt / f"d{r}")  # passthrough_ll holds an fd per known inode
                    c0, f0 = cpu_seconds(m.proc.pid), cpu_seconds(m.proc.pid, main_only=True)
                    res.setdefault((kind, "seq"), []).append(sequential(str(m.mnt / "big")))
                    res.setdefault((kind, "seqcpu"), []).append((cpu_seconds(m.proc.pid) - c0) / 128)
                    res.setdefault((kind, "seqmain"), []).append(
                        (cpu_seconds(m.proc.pid, main_only=True) - f0) / 128)
                    os.unlink(m.mnt / "big")
        print("microseconds, median (min) of the runs")
        cols = {"getxattr": "getxattr", "open+close": "open+close", "cpu": "server CPU/req",
                "file": "small file", "filecpu": "server CPU/file", "fusecpu": "of it main thread",
                "seq": "1 MiB write", "seqcpu": "server CPU/MiB", "seqmain": "of it main thread"}
        print(f"{'server':24s}" + "".join(f" {v:>17s}" for v in cols.values()))
        for kind in servers:
            cells = []
            for k in cols:
                v = res.get((kind, k))
                cells.append(f"{statistics.median(v) * 1e6:8.1f} ({min(v) * 1e6:6.1f})" if v else " " * 17)
            print(f"{kind[-24:]:24s}" + "".join(f" {c:>17s}" for c in cells))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for m in mounted:
            m.stop()
        subprocess.run(["umount", str(work)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
