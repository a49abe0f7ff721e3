"""Capture overhead, by hand: native writes against writes through mirrorfs with a target.

    .venv/bin/python bench/capture.py [--size 256M] [--files 10000] [--dir /var/tmp] [--profile]

Runs as root. Both runs use directories on the same file system (so the target competes for
the same disk, as the issue asks). Prints MB/s, files/s, the mirrorfs/native ratios and the
replication lag p50/p99 sampled from `status` while the sequential writes run. `--size 1G`
is the issue's full figure. `--profile` runs the capture worker under cProfile and prints
its top functions (the worker is where the time goes: FUSE requests, journal, applier).
"""

from __future__ import annotations

import argparse
import os
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

from app.services.control import ControlClient  # noqa: E402
from app.services.units import parse_size  # noqa: E402

MiB = 1 << 20


def sequential(path: str, size: int) -> float:
    buf = os.urandom(MiB)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // MiB):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def small_files(directory: str, count: int) -> float:
    buf = os.urandom(4096)
    os.makedirs(directory, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(count):
        fd = os.open(os.path.join(directory, f"f{i:05d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, buf)
        os.close(fd)
    return time.perf_counter() - t0


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Daemon:
    def __init__(self, work: Path, src: Path, tgt: Path, profile: bool):
        self.work = work
        cfg = work / "replication.toml"
        cfg.write_text(f'schema = 1\n[[filesystem]]\npath = "{src}"\ntarget = "{tgt}"\n')
        self.socket = str(work / "control.sock")
        env = dict(os.environ)
        if profile:
            env["MIRRORSETUP_WORKER_PROFILE"] = str(work / "worker.prof")
        self.proc = subprocess.Popen([sys.executable, "-m", "app", "daemon", "--config", str(cfg),
                                      "--socket", self.socket, "--state-dir", str(work / "state")],
                                     cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = ControlClient(self.socket, timeout=600)
        deadline = time.monotonic() + 60
        while not self.client.is_running():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("daemon did not start")
            time.sleep(0.1)
        self.src = str(src)

    def entry(self) -> dict:
        return next(e for e in self.client.request("status")["entries"] if e["path"] == self.src)

    def drain(self) -> float:
        t0 = time.perf_counter()
        while True:
            e = self.entry()
            if e["applied_seq"] == e["last_seq"]:
                return time.perf_counter() - t0
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=300)


def lag_sampler(daemon: Daemon, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        try:
            out.append(daemon.entry()["lag_seconds"] or 0.0)
        except Exception:
            pass
        time.sleep(0.1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=256 * MiB)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--target-dir", help="put the target here instead (e.g. /dev/shm: is the disk the limit?)")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mirrorsetup-bench-", dir=args.dir))
    try:
        native = work / "native"
        native.mkdir()
        drop_caches()
        seq_native = sequential(str(native / "big"), args.size)
        files_native = small_files(str(native / "small"), args.files)
        src = work / "src"
        tgt = Path(tempfile.mkdtemp(prefix="mirrorsetup-bench-tgt-", dir=args.target_dir)) \
            if args.target_dir else work / "tgt"
        src.mkdir()
        drop_caches()
        d = Daemon(work, src, tgt, args.profile)
        try:
            lags: list[float] = []
            stop = threading.Event()
            sampler = threading.Thread(target=lag_sampler, args=(d, stop, lags))
            sampler.start()
            seq_fuse = sequential(str(src / "big"), args.size)
            stop.set()
            sampler.join()
            drain_seq = d.drain()
            files_fuse = small_files(str(src / "small"), args.files)
            drain_files = d.drain()
        finally:
            d.stop()
        mb = args.size / 1e6
        print(f"sequential {args.size // MiB} MiB in 1 MiB writes + fsync:")
        print(f"  native   {mb / seq_native:8.1f} MB/s")
        print(f"  mirrorfs {mb / seq_fuse:8.1f} MB/s   ratio {seq_native / seq_fuse:.2f}x native "
              f"(drain after: {drain_seq:.2f} s)")
        print(f"{args.files} files of 4 KiB, create+write+close:")
        print(f"  native   {args.files / files_native:8.0f} files/s")
        print(f"  mirrorfs {args.files / files_fuse:8.0f} files/s   ratio {files_native / files_fuse:.2f}x "
              f"native (drain after: {drain_files:.2f} s)")
        if lags:
            q = statistics.quantiles(lags, n=100) if len(lags) > 1 else [lags[0]] * 99
            print(f"replication lag during sequential writes: p50 {q[49]:.3f} s, p99 {q[98]:.3f} s "
                  f"({len(lags)} samples)")
        prof = work / "worker.prof"
        if args.profile and prof.exists():
            import pstats
            pstats.Stats(str(prof)).sort_stats("tottime").print_stats(15)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.target_dir:
            shutil.rmtree(tgt, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
