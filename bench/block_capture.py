"""Block capture overhead, by hand: `dd` onto a plain loop against `dd` onto the captured loop.

    .venv/bin/python bench/block_capture.py [--size 1G] [--runs 1] [--dir /var/tmp]
                                            [--target-dir DIR] [--syscalls] [--profile]

Runs as root; touches no real disk. In a temp dir under --dir it makes a sparse file, attaches
a loop to it (the "raw" disk, /dev/loopR) and a random source file of --size + 1 MiB (read
from the page cache by dd). One untimed dd onto the plain loop allocates the sparse file, so
every timed run overwrites in place. Then, for each of two modes, (a) `dd bs=1M oflag=direct`
and (b) buffered `dd bs=1M conv=fsync` (the modes write the source at different 1 MiB shifts,
so every run changes every block), `--runs` times each:

  plain:    a loop attached directly over /dev/loopR (no daemon), as losetup would;
  captured: `python -m app daemon` (its own --config, --state-dir and MIRRORSETUP_SOCKET)
            captures /dev/loopR with a target file next to the raw one (its first attach
            copies the raw disk to the target, untimed), and dd writes its captured loop.

It prints MB/s for each (median of --runs, and each run's figure when there are several), the
captured/plain ratio and whether the issue's goal (>= 0.5x) is met, the replication lag p50/p99
sampled from `status` every ~50 ms while the captured dd runs, how long the journal took to
drain after dd ended, the mean size of the writes the FUSE file received (bytes / captured
ops), the journal's peak queue and spilled segments, and the CPU seconds of the worker's FUSE
thread, its other threads (the applier), the daemon and dd during the captured dd. After every
captured run it checks sha256(target) == sha256(raw device) == sha256(what dd wrote).

`--size 1G` is the issue's figure. `--target-dir /dev/shm` puts the target elsewhere (is the
shared disk the limit?). `--syscalls` samples, every ~5 ms, which system call each worker
thread is in (fdatasync, epoll_wait = idle, "running" = on CPU): where the time goes, with no
profiler. `--profile` runs the block worker under cProfile (MIRRORSETUP_WORKER_PROFILE; its
FUSE thread only, not the applier) and prints its top functions; the captured figures are then
distorted. Everything made (daemon, loops, FUSE mount, files, new /dev/loopN nodes) is
stopped, detached and removed at the end, even on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import hashlib
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.services import loop as loopdev  # noqa: E402
from app.services import mounts  # noqa: E402
from app.services._ioctl import LOOP_CTL_REMOVE  # noqa: E402
from app.services.control import ControlClient  # noqa: E402
from app.services.socketpath import SOCKET_ENV  # noqa: E402
from app.services.results import MirrorError, Outcome  # noqa: E402
from app.services.units import parse_size  # noqa: E402

MiB = 1 << 20
GOAL = 0.5
SAMPLE_SECONDS = 0.05
TICK = os.sysconf("SC_CLK_TCK")
CHILDREN: list[subprocess.Popen] = []  # a dd still running (cleanup reaps it first)
MODES = {  # name -> (dd flags, source shift in MiB)
    "direct": (["oflag=direct"], 0),
    "buffered": (["conv=fsync"], 1),
}


def loop_indexes() -> set[int]:
    return {int(n[4:]) for n in os.listdir("/sys/block") if n.startswith("loop") and n[4:].isdigit()}


def detach_wait(dev: str, timeout: float = 30.0) -> None:
    """Detach `dev`; a detach the kernel defers (udev or a dying dd still has it open for a
    moment) is waited for, so the next step never sees it attached."""
    r = loopdev.detach(dev)
    if r.failed:
        raise RuntimeError(f"detach {dev}: {r.message}")
    deadline = time.monotonic() + timeout
    while r.outcome is Outcome.PENDING and loopdev.status(dev) is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{dev} is still attached {timeout:.0f} s after its detach "
                               "(held open by someone else)")
        time.sleep(0.1)


def make_source(path: Path, size: int) -> dict[int, str]:
    """size + 1 MiB of random bytes; sha256 of the size bytes at each mode's shift."""
    hashes = {shift: hashlib.sha256() for _, shift in MODES.values()}
    with open(path, "wb") as f:
        for i in range(size // MiB + 1):
            chunk = os.urandom(MiB)
            f.write(chunk)
            for shift, h in hashes.items():
                if shift <= i < shift + size // MiB:
                    h.update(chunk)
    return {shift: h.hexdigest() for shift, h in hashes.items()}


def sha256_of(path: str, size: int) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        done = 0
        while done < size:
            buf = os.read(fd, min(8 * MiB, size - done))
            if not buf:
                break
            h.update(buf)
            done += len(buf)
    finally:
        os.close(fd)
    return h.hexdigest()


def warm(path: Path) -> None:
    """Read the source once so dd reads it from the page cache, not from the disk it writes."""
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


def task_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def system_cpu() -> tuple[float, float, float]:
    """(busy, iowait, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle, iowait = v[3], v[4]
    return sum(v) - idle - iowait, iowait, sum(v)


class CpuMeter:
    """Where the CPU went while one captured dd ran: the worker's FUSE (main) thread, its other
    threads (the applier), the daemon, dd itself, and the whole machine (2 cores = 200 %)."""

    def __init__(self, worker: int | None, daemon: int):
        self.worker, self.daemon = worker, daemon

    def __enter__(self) -> CpuMeter:
        self.w0 = task_cpu(self.worker) if self.worker else {}
        self.d0 = sum(task_cpu(self.daemon).values())
        self.c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.s0 = system_cpu()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        w1 = task_cpu(self.worker) if self.worker else {}
        delta = {t: w1[t] - self.w0.get(t, 0.0) for t in w1}
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        s1 = system_cpu()
        ncpu = os.cpu_count() or 1
        total = (s1[2] - self.s0[2]) or 1
        self.result = {
            "wall": wall,
            "fuse": delta.get(self.worker, 0.0),
            "other": sum(v for t, v in delta.items() if t != self.worker),
            "daemon": sum(task_cpu(self.daemon).values()) - self.d0,
            "dd": (c1.ru_utime + c1.ru_stime) - (self.c0.ru_utime + self.c0.ru_stime),
            "busy": 100 * ncpu * (s1[0] - self.s0[0]) / total,
            "iowait": 100 * ncpu * (s1[1] - self.s0[1]) / total,
        }


SYSCALLS_X86_64 = {0: "read", 1: "write", 3: "close", 7: "poll", 8: "lseek", 16: "ioctl",
                   17: "pread64", 18: "pwrite64", 19: "readv", 20: "writev", 23: "select",
                   35: "nanosleep", 74: "fsync", 75: "fdatasync", 202: "futex", 230: "clock_nanosleep",
                   232: "epoll_wait", 257: "openat", 270: "pselect6", 271: "ppoll", 281: "epoll_pwait",
                   441: "epoll_pwait2", 45: "recvfrom", 44: "sendto", 46: "sendmsg", 47: "recvmsg",
                   5: "fstat", 9: "mmap", 11: "munmap", 28: "madvise", 82: "rename", 87: "unlink",
                   262: "newfstatat", 277: "sync_file_range", 285: "fallocate"}


class SyscallSampler:
    """--syscalls: every ~5 ms, what each worker thread is doing (/proc/PID/task/TID/syscall:
    "running" or the system call it is in), to see where the time goes without a profiler."""

    def __init__(self, pid: int | None, counts: dict[str, collections.Counter]):
        self.pid, self.counts = pid, counts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.names = SYSCALLS_X86_64 if platform.machine() == "x86_64" else {}

    def __enter__(self) -> SyscallSampler:
        if self.pid:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                tids = os.listdir(f"/proc/{self.pid}/task")
            except OSError:
                return
            for tid in tids:
                try:
                    with open(f"/proc/{self.pid}/task/{tid}/syscall") as f:
                        word = f.read().split()[0]
                except (OSError, IndexError):
                    continue
                what = word if not word.lstrip("-").isdigit() else \
                    self.names.get(int(word), f"syscall {word}")
                who = "FUSE (main)" if int(tid) == self.pid else f"thread {tid}"
                self.counts.setdefault(who, collections.Counter())[what] += 1
            self._stop.wait(0.005)


def dd(source: Path, device: str, mode: str, size: int, during=()) -> float:
    """Seconds for dd to write `size` bytes; the context managers in `during` cover dd only."""
    flags, shift = MODES[mode]
    argv = ["dd", f"if={source}", f"of={device}", "bs=1M", f"count={size // MiB}", f"skip={shift}",
            "status=none", *flags]
    warm(source)
    os.sync()  # the previous run's writeback is not charged to this one
    with contextlib.ExitStack() as stack:
        for cm in during:
            stack.enter_context(cm)
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        CHILDREN.append(proc)
        try:
            _, err = proc.communicate()
        finally:
            reap(proc)
        took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {err.strip()}")
    return took


def reap(proc: subprocess.Popen) -> None:
    """Kill (if still running) and wait: a dd killed in fsync holds its loop open until it is
    really gone, and a loop still open only gets a deferred detach."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc in CHILDREN:
        CHILDREN.remove(proc)


class Daemon:
    def __init__(self, work: Path, raw: str, target: Path, profile: Path | None):
        cfg = work / "replication.toml"
        cfg.write_text(f'schema = 1\n[[block]]\ndevice = "{raw}"\ntarget = "{target}"\n')
        self.socket = str(work / "run" / "control.sock")
        self.state = work / "state"
        self.raw = raw
        env = {**os.environ, SOCKET_ENV: self.socket}
        if profile is not None:
            env["MIRRORSETUP_WORKER_PROFILE"] = str(profile)
        self.log = open(work / "daemon.log", "wb")
        # own session: a Ctrl-C reaches us only, and we stop the daemon in order
        self.proc = subprocess.Popen([sys.executable, "-m", "app", "daemon", "--config", str(cfg),
                                      "--state-dir", str(self.state)],
                                     cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.client = ControlClient(self.socket, timeout=600)
        self.worker_pid: int | None = None

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while not self.client.is_running():  # the initial copy runs before the socket answers
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"daemon did not start:\n{self.log_tail()}")
            time.sleep(0.1)
        row = self.row()
        if not row.get("captured") or not row.get("loop"):
            raise RuntimeError(f"daemon did not capture {self.raw}: {row}\n{self.log_tail()}")
        self.worker_pid = row.get("worker_pid")
        return row

    def log_tail(self) -> str:
        self.log.flush()
        return (Path(self.log.name).read_bytes()[-3000:]).decode(errors="replace")

    def row(self) -> dict:
        return next(b for b in self.client.request("status")["block"] if b["device"] == self.raw)

    def drain(self) -> float:
        t0 = time.perf_counter()
        while True:
            r = self.row()
            if r["applied_seq"] == r["last_seq"]:
                return time.perf_counter() - t0
            time.sleep(SAMPLE_SECONDS)

    def segments(self) -> int:
        return sum(1 for _ in self.state.glob("block/*/*.seg"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                print("daemon did not stop in 300 s: killing it", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        if self.worker_pid:  # it exits by itself once the daemon is gone; wait for it
            deadline = time.monotonic() + 60
            while os.path.exists(f"/proc/{self.worker_pid}") and time.monotonic() < deadline:
                try:
                    with open(f"/proc/{self.worker_pid}/stat") as f:
                        if f.read().split(") ", 1)[1].startswith("Z"):
                            break  # a zombie of the daemon's, reaped with it
                except OSError:
                    break
                time.sleep(0.1)
        self.log.close()


class Sampler:
    """Polls `status` every ~50 ms while a captured dd runs: lag, queued bytes, spilled segments."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.lags: list[float] = []
        self.queued = 0
        self.segments = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.daemon.row()
                self.lags.append(r["lag_seconds"] or 0.0)
                self.queued = max(self.queued, r["bytes_queued"] or 0)
                self.segments = max(self.segments, self.daemon.segments())
            except (MirrorError, OSError, StopIteration):
                self.errors += 1
            self._stop.wait(SAMPLE_SECONDS)


def quantile(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=1 << 30, help="bytes dd writes (default 1G)")
    p.add_argument("--runs", type=int, default=1, help="median of this many runs per mode")
    p.add_argument("--dir", default="/var/tmp", help="where the temp dir goes (raw, target, source)")
    p.add_argument("--target-dir", help="put the target in a temp dir here instead (e.g. /dev/shm: "
                   "is the shared disk the limit?)")
    p.add_argument("--profile", action="store_true", help="cProfile the block worker's FUSE thread")
    p.add_argument("--syscalls", action="store_true", help="sample which system call each worker "
                   "thread is in during the captured dd (where the time goes, no profiler)")
    args = p.parse_args()
    if os.geteuid() != 0:
        p.error("run as root (loop devices, FUSE)")
    if args.size < MiB or args.size % MiB:
        p.error("--size must be a positive multiple of 1 MiB")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    size = args.size

    before = loop_indexes()
    used: set[str] = set()
    raw = plain = None
    daemon: Daemon | None = None
    tdir: Path | None = None
    work = Path(tempfile.mkdtemp(prefix="mirrorsetup-blkbench-", dir=args.dir))
    try:
        if args.target_dir:
            tdir = Path(tempfile.mkdtemp(prefix="mirrorsetup-blkbench-tgt-", dir=args.target_dir))
        print(f"work dir {work}; making {size // MiB} MiB sparse raw file and random source ...",
              flush=True)
        raw_file = work / "raw.img"
        with open(raw_file, "wb") as f:
            f.truncate(size)
        target = (tdir or work) / "target.img"
        source = work / "source.bin"
        expected = make_source(source, size)
        raw = loopdev.attach(str(raw_file)).device
        used.add(raw)

        times: dict[tuple[str, str], list[float]] = {}
        plain = loopdev.attach(raw).device
        used.add(plain)
        print(f"target {target}", flush=True)
        print(f"raw disk {raw}; plain loop {plain} over it; untimed warm-up pass ...", flush=True)
        dd(source, plain, "buffered", size)  # allocates the sparse raw file: runs overwrite in place
        for _ in range(args.runs):
            for mode in MODES:
                times.setdefault(("plain", mode), []).append(dd(source, plain, mode, size))
        detach_wait(plain)
        plain = None

        prof = work / "worker.prof" if args.profile else None
        daemon = Daemon(work, raw, target, prof)
        t0 = time.perf_counter()
        row = daemon.wait_ready(600)
        captured = row["loop"]
        used.add(captured)
        print(f"daemon up in {time.perf_counter() - t0:.1f} s (initial copy to the target "
              f"included); captured loop {captured}", flush=True)

        lags: dict[str, list[float]] = {m: [] for m in MODES}
        drains: dict[str, list[float]] = {m: [] for m in MODES}
        op_sizes: dict[str, list[float]] = {m: [] for m in MODES}
        peaks: dict[str, tuple[int, int]] = {m: (0, 0) for m in MODES}
        cpu: dict[str, list[dict]] = {m: [] for m in MODES}
        where: dict[str, dict[str, collections.Counter]] = {m: {} for m in MODES}
        checks: list[str] = []
        all_ok = True
        for run in range(args.runs):
            for mode in MODES:
                ops0 = daemon.row()["captured_ops"]
                s, meter = Sampler(daemon), CpuMeter(daemon.worker_pid, daemon.proc.pid)
                times.setdefault(("captured", mode), []).append(
                    dd(source, captured, mode, size, during=(s, meter) + (
                        (SyscallSampler(daemon.worker_pid, where[mode]),) if args.syscalls else ())))
                cpu[mode].append(meter.result)
                drains[mode].append(daemon.drain())
                ops = daemon.row()["captured_ops"] - ops0
                op_sizes[mode].append(size / ops if ops else float("nan"))
                lags[mode] += s.lags
                peaks[mode] = (max(peaks[mode][0], s.queued), max(peaks[mode][1], s.segments))
                want = expected[MODES[mode][1]]
                h_target = sha256_of(str(target), size)
                h_raw = sha256_of(raw, size)
                ok = h_target == h_raw == want
                all_ok &= ok
                checks.append(f"  run {run + 1} {mode:8s}: target {h_target[:16]}  raw {h_raw[:16]}  "
                              f"dd wrote {want[:16]}  -> {'match' if ok else 'MISMATCH'}")
        daemon.stop()

        mb = size / 1e6
        print(f"\ndd {size // MiB} MiB, bs=1M, median of {args.runs} run(s)"
              + ("  [--profile: captured figures distorted]" if args.profile else ""))
        for mode, (flags, _) in MODES.items():
            tp = statistics.median(times[("plain", mode)])
            tc = statistics.median(times[("captured", mode)])
            ratio = tp / tc
            print(f"{mode} ({' '.join(flags)}):")

            def each(kind: str) -> str:
                return "" if args.runs == 1 else \
                    "   (runs: " + ", ".join(f"{mb / t:.0f}" for t in times[(kind, mode)]) + ")"
            print(f"  plain    {mb / tp:8.1f} MB/s{each('plain')}")
            print(f"  captured {mb / tc:8.1f} MB/s   ratio {ratio:.2f}x plain "
                  f"(goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'}){each('captured')}")
            q = lags[mode]
            print(f"  replication lag during dd: p50 {quantile(q, 50):.3f} s, p99 {quantile(q, 99):.3f} s "
                  f"({len(q)} samples); drain after dd: {statistics.median(drains[mode]):.2f} s")
            print(f"  FUSE writes: {statistics.median(op_sizes[mode]) / 1024:.0f} KiB mean; journal peak "
                  f"{peaks[mode][0] / MiB:.0f} MiB queued, {peaks[mode][1]} spilled segment(s)")
            c = {k: statistics.median(r[k] for r in cpu[mode]) for k in cpu[mode][0]}
            print(f"  CPU during captured dd ({c['wall']:.2f} s wall): worker FUSE "
                  f"thread {c['fuse']:.2f} s, worker other threads (applier) {c['other']:.2f} s, "
                  f"daemon {c['daemon']:.2f} s, dd {c['dd']:.2f} s; machine {c['busy']:.0f}% busy "
                  f"+ {c['iowait']:.0f}% iowait of {100 * (os.cpu_count() or 1)}%")
            for who, counter in sorted(where[mode].items(), key=lambda kv: kv[0] != "FUSE (main)"):
                n = sum(counter.values())
                if who != "FUSE (main)" and counter["futex"] == n:
                    continue  # an idle pool thread
                print(f"  {who}: " + ", ".join(f"{w} {100 * k / n:.0f}%" for w, k in counter.most_common(5))
                      + f"  ({n} samples)")
        print("correctness after drain (sha256):")
        print("\n".join(checks))
        print(f"  {'all match' if all_ok else 'MISMATCH'}")
        if prof is not None and prof.exists():
            import pstats
            print("\nblock worker (FUSE thread) by own time:")
            pstats.Stats(str(prof)).sort_stats("tottime").print_stats(20)
            pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(20)
        return 0 if all_ok else 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup is not to be interrupted
        cleanup(work, daemon, plain, raw, used, before)
        if tdir is not None:
            shutil.rmtree(tdir, ignore_errors=True)


def cleanup(work: Path, daemon: Daemon | None, plain: str | None, raw: str | None,
            used: set[str], before: set[int]) -> None:
    def warn(what: str, exc: BaseException) -> None:
        print(f"cleanup: {what}: {exc}", file=sys.stderr)

    for proc in list(CHILDREN):
        reap(proc)
    if daemon is not None:
        try:
            daemon.stop()
        except Exception as exc:
            warn("stop daemon", exc)
    prefix = str(work) + "/"
    try:  # a captured loop a killed daemon left on its FUSE file, then that mount
        for s in loopdev.list_attached():
            if s.backing_file and s.backing_file.startswith(prefix) and s.device != raw:
                try:
                    detach_wait(s.device)
                except Exception as exc:
                    warn(f"detach {s.device}", exc)
        for m in reversed(mounts.read_mountinfo()):
            if m.mount_point.startswith(prefix):
                mounts.umount(m.mount_point, mounts.MNT_DETACH)
    except Exception as exc:
        warn("leftover captured loop/mount", exc)
    for dev in (plain, raw):
        if dev:
            try:
                detach_wait(dev)
            except Exception as exc:
                warn(f"detach {dev}", exc)
    new = {loopdev.parse_loop_path(d) for d in used} - before
    if new:  # the /dev/loopN nodes this run made (if still free), as bench/loop_attach.py does
        try:
            fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                for index in sorted(new):
                    try:
                        fcntl.ioctl(fd, LOOP_CTL_REMOVE, index)
                    except OSError:
                        pass  # bound again, by someone else: theirs now
            finally:
                os.close(fd)
        except OSError as exc:
            warn("remove loop nodes", exc)
    shutil.rmtree(work, ignore_errors=True)
    if work.exists():
        warn("remove", RuntimeError(f"{work} is still there"))


if __name__ == "__main__":
    sys.exit(main())
