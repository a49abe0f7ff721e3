#!/usr/bin/env python3
"""Benchmark (by hand, as root): attach-all + detach-all of N block entries vs N `losetup` runs.

    .venv/bin/python bench/loop_attach.py [--entries 256] [--rounds 3]

The "disks" are loop devices on sparse files made with losetup (not timed). Timed:
  ours:    `mirrorsetup block attach-all` + `mirrorsetup block detach-all` (two whole processes)
  losetup: N x `losetup --find --show DISK` + N x `losetup -d LOOP` (2N whole processes)
Rounds alternate (ours, losetup, ours, ...) so both share the machine's state; medians. Our goal
is a ratio of at most 0.5. Everything made is detached and removed at the end, even on error.
"""

from __future__ import annotations

import argparse
import compileall
import fcntl
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.services._ioctl import LOOP_CTL_REMOVE  # noqa: E402
from app.services.config import ConfigStore  # noqa: E402


def loop_indexes() -> set[int]:
    return {int(n[4:]) for n in os.listdir("/sys/block") if n.startswith("loop")}


def remove_loop_devices(indexes: set[int]) -> None:
    """LOOP_CTL_REMOVE the (now free) /dev/loopN nodes this run created, leaving the host as it was."""
    fd = os.open("/dev/loop-control", os.O_RDWR)
    try:
        for index in sorted(indexes):
            try:
                fcntl.ioctl(fd, LOOP_CTL_REMOVE, index)
            except OSError:
                pass  # still in use by someone else: leave it
    finally:
        os.close(fd)


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", metavar="DIR", help="run ours under cProfile, one .prof per action "
                    "and round in DIR (timings then include the profiler)")
    args = ap.parse_args()
    # Byte code as an installed package has it: with PYTHONDONTWRITEBYTECODE set (as in some
    # shells) every edited module would be compiled again in each timed process.
    compileall.compile_dir(str(ROOT / "app"), quiet=1)
    mirrorsetup = [sys.executable, "-m", "app"]
    disks: list[str] = []
    existed = loop_indexes()
    with tempfile.TemporaryDirectory(prefix="mirrorsetup-bench-") as tmp:
        config = Path(tmp) / "replication.toml"
        try:
            for i in range(args.entries):
                img = Path(tmp) / f"disk{i}.img"
                with open(img, "wb") as f:
                    f.truncate(1 << 20)
                disks.append(run("losetup", "--find", "--show", str(img)))
            store = ConfigStore(config)
            for d in disks:
                store.add_block(d)

            phases: dict[str, list[float]] = {"attach-all": [], "detach-all": []}

            def ours():
                for action in ("attach-all", "detach-all"):
                    t0 = time.perf_counter()
                    cmd = mirrorsetup
                    if args.profile:
                        out = Path(args.profile) / f"{action}-{time.monotonic_ns()}.prof"
                        cmd = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "app"]
                    subprocess.run([*cmd, "--config", str(config), "block", action],
                                   check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
                    phases[action].append(time.perf_counter() - t0)

            def theirs():
                loops = [run("losetup", "--find", "--show", d) for d in disks]
                for lp in loops:
                    run("losetup", "-d", lp)

            t_ours, t_theirs = [], []
            for _ in range(args.rounds):  # interleaved: both see the same moment of the host
                t_ours.append(timed(ours))
                t_theirs.append(timed(theirs))
        finally:
            for d in disks:
                for line in run("losetup", "-j", d).splitlines():
                    subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)
                subprocess.run(["losetup", "-d", d], check=False)
            remove_loop_devices(loop_indexes() - existed)
    o, t = statistics.median(t_ours), statistics.median(t_theirs)
    print(f"entries: {args.entries}, rounds: {args.rounds} (medians)")
    print(f"mirrorsetup attach-all + detach-all: {o:8.3f} s  (attach-all "
          f"{statistics.median(phases['attach-all']):.3f} s, detach-all "
          f"{statistics.median(phases['detach-all']):.3f} s)")
    print(f"{args.entries} x losetup attach + detach: {t:8.3f} s")
    print(f"ratio ours/losetup: {o / t:.3f}  (goal <= 0.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
