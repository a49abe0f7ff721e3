"""Benchmark of MountWatcher (run by hand as root: `.venv/bin/python bench/mount_watch.py`).

Everything runs in a private mount namespace (`unshare --mount --propagation private`), so the
thousands of tmpfs mounts never appear in the host's table and vanish with the namespace.

1. Latency from another process's mount(2) to the watcher's MountDiff (N=200): measured from
   a CLOCK_MONOTONIC stamp the child takes just before its syscall, and from our spawn.
2. CPU of the watcher idling 10 s on a table of 5,000 mounts (it must sleep in poll()).
3. Parse time of that table vs `findmnt -J` run from the same process.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.services import mounts  # noqa: E402

N_LATENCY = 200
N_MANY = 5000
IDLE_SECONDS = 10.0
PARSE_RUNS = 7
EVENT_TIMEOUT = 5.0

# Child: stamp, mount(2), stamp. time.monotonic() is CLOCK_MONOTONIC, shared by all processes.
CHILD_MOUNT = (
    "import ctypes, os, sys, time\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "target = os.fsencode(sys.argv[1])\n"
    "t0 = time.monotonic()\n"
    "rc = libc.mount(b'bench-child', target, b'tmpfs', 0, b'size=64k')\n"
    "t1 = time.monotonic()\n"
    "print(t0, t1, rc, ctypes.get_errno(), flush=True)\n"
)


def wait_for(watcher: mounts.MountWatcher, path: str, kind: str) -> float:
    """Monotonic time at which a diff naming `path` under `kind` was delivered."""
    deadline = time.monotonic() + EVENT_TIMEOUT
    while True:
        diff = watcher.wait(timeout=max(0.0, deadline - time.monotonic()))
        now = time.monotonic()
        if diff is None:
            raise SystemExit(f"no {kind} event for {path} within {EVENT_TIMEOUT}s")
        if any(e.mount_point == path for e in getattr(diff, kind)):
            return now


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def report(name: str, seconds: list[float]) -> None:
    ms = [s * 1000 for s in seconds]
    print(f"  {name:<44} p50 {pct(ms, 50):8.3f} ms  p99 {pct(ms, 99):8.3f} ms  "
          f"max {max(ms):8.3f} ms")


def bench_latency(base: str) -> None:
    print(f"1. mount by another process -> MountDiff, N={N_LATENCY} each "
          f"(table: {len(mounts.read_mountinfo())} mounts)")
    from_syscall, from_return, from_spawn, tool_spawn = [], [], [], []
    with mounts.MountWatcher() as watcher:
        for i in range(N_LATENCY):
            path = f"{base}/py{i}"
            os.mkdir(path)
            t_spawn = time.monotonic()
            child = subprocess.Popen([sys.executable, "-S", "-c", CHILD_MOUNT, path],
                                     stdout=subprocess.PIPE, text=True)
            t_event = wait_for(watcher, path, "added")
            t0, t1, rc, err = child.communicate()[0].split()
            if int(rc) != 0:
                raise SystemExit(f"child mount failed: {os.strerror(int(err))}")
            from_syscall.append(t_event - float(t0))
            from_return.append(t_event - float(t1))
            from_spawn.append(t_event - t_spawn)
            mounts.umount(path)
            wait_for(watcher, path, "removed")
        for i in range(N_LATENCY):
            path = f"{base}/tool{i}"
            os.mkdir(path)
            t_spawn = time.monotonic()
            child = subprocess.Popen(["mount", "-t", "tmpfs", "-o", "size=64k", "bench-tool",
                                      path])
            tool_spawn.append(wait_for(watcher, path, "added") - t_spawn)
            if child.wait() != 0:
                raise SystemExit("util-linux mount failed")
            mounts.umount(path)
            wait_for(watcher, path, "removed")
    report("child stamp before mount(2) -> diff", from_syscall)
    report("child stamp after mount(2) returned -> diff", from_return)
    report("spawn of `python -c` (incl. startup) -> diff", from_spawn)
    report("spawn of util-linux `mount -t tmpfs` -> diff", tool_spawn)


def make_many(base: str) -> None:
    many = f"{base}/many"
    os.mkdir(many)
    t = time.monotonic()
    for i in range(N_MANY):
        os.mkdir(f"{many}/m{i}")
        mounts.mount("bench-many", f"{many}/m{i}", "tmpfs", 0, "size=64k")
    size = len(Path(mounts.MOUNTINFO).read_bytes())
    print(f"\n   made {N_MANY} tmpfs mounts in {time.monotonic() - t:.2f} s; "
          f"table {len(mounts.read_mountinfo())} lines, {size / 1024:.0f} KiB")


def bench_idle() -> None:
    print(f"2. watcher idle {IDLE_SECONDS:.0f} s on the big table")
    watcher = mounts.MountWatcher()
    got: dict = {}

    def waiter() -> None:
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        got["diff"] = watcher.wait()
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
        got["cpu"] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        got["switches"] = (r1.ru_nvcsw - r0.ru_nvcsw) + (r1.ru_nivcsw - r0.ru_nivcsw)

    thread = threading.Thread(target=waiter)
    p0 = time.process_time()
    thread.start()
    time.sleep(IDLE_SECONDS)
    p1 = time.process_time()
    watcher.close()
    thread.join()
    print(f"  waiting thread: {got['cpu'] * 1000:.3f} ms CPU, {got['switches']} context "
          f"switches, result {got['diff']!r} (closed)")
    print(f"  whole process over the idle {IDLE_SECONDS:.0f} s: {(p1 - p0) * 1000:.3f} ms CPU")


def bench_parse(base: str) -> None:
    print("3. parse the big table vs `findmnt -J` (median of "
          f"{PARSE_RUNS})")
    text = os.fsdecode(Path(mounts.MOUNTINFO).read_bytes())
    parse, read, tool, tool_cpu = [], [], [], []
    for _ in range(PARSE_RUNS):
        t = time.perf_counter()
        mounts.parse_mountinfo(text)
        parse.append(time.perf_counter() - t)
        t = time.perf_counter()
        mounts.read_mountinfo()
        read.append(time.perf_counter() - t)
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(["findmnt", "-J"], check=True, stdout=subprocess.DEVNULL)
        tool.append(time.perf_counter() - t)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        tool_cpu.append(c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime)
    m_parse, m_read, m_tool = (statistics.median(x) * 1000 for x in (parse, read, tool))
    print(f"  parse_mountinfo(text)        {m_parse:8.2f} ms")
    print(f"  read_mountinfo() (read+parse){m_read:8.2f} ms")
    print(f"  findmnt -J (spawn, wall)     {m_tool:8.2f} ms  "
          f"(its CPU {statistics.median(tool_cpu) * 1000:.2f} ms)")
    print(f"  ratio findmnt / read_mountinfo = {m_tool / m_read:.2f}")

    latencies = []
    with mounts.MountWatcher() as watcher:
        for i in range(20):
            path = f"{base}/many/late{i}"
            os.mkdir(path)
            t = time.monotonic()
            mounts.mount("bench-late", path, "tmpfs", 0, "size=64k")
            latencies.append(wait_for(watcher, path, "added") - t)
    report("own mount(2) -> diff on the big table (N=20)", latencies)


def child(base: str) -> None:
    mounts.mount("bench-base", base, "tmpfs", 0, "size=64m")  # mount points live in here
    try:
        bench_latency(base)
        make_many(base)
        bench_idle()
        bench_parse(base)
    finally:
        mounts.umount(base, mounts.MNT_DETACH)  # the namespace would drop it anyway


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("needs root (mount(2), unshare)")
    print(f"kernel {os.uname().release}, python {sys.version.split()[0]}, "
          f"private mount namespace via unshare")
    with tempfile.TemporaryDirectory(prefix="mount-watch-bench.") as base:
        subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                        __file__, "--child", base], check=True)
    leaked = [e.mount_point for e in mounts.read_mountinfo() if "mount-watch-bench" in
              e.mount_point]
    print(f"\nmounts left in the host namespace: {leaked or 'none'}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2])
    else:
        main()
