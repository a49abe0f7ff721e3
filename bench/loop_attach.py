#!/usr/bin/env python3
"""Benchmark (by hand, as root): attach-all + detach-all of N block entries vs N `losetup` runs.

    .venv/bin/python bench/loop_attach.py [--entries 256] [--rounds 3] [--baseline DIR]

The "disks" are loop devices on sparse files made with losetup (not timed). Timed:
  ours:    `mirrorsetup block attach-all` + `mirrorsetup block detach-all` (two whole processes)
  losetup: N x `losetup --find --show DISK` + N x `losetup -d LOOP` (2N whole processes)
Rounds alternate (ours, losetup, ours, ...) so both share the machine's state; medians. Our goal
is a ratio of at most 0.5. Everything made is detached and removed at the end, even on error.

--baseline DIR also times the code of another checkout (`git archive REV app | tar x -C DIR`;
its bytecode is compiled here) in the same rounds, beside ours and against the same losetup
runs: losetup's own time moves by a third between runs on a shared host (0.72-1.03 s for 256
here), which hid a change of a few per cent when before and after were separate runs.
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
    ap.add_argument("--baseline", metavar="DIR", help="also time this checkout's app/ in the same "
                    "rounds (before and after against the same losetup runs)")
    args = ap.parse_args()
    # Byte code as an installed package has it: with PYTHONDONTWRITEBYTECODE set (as in some
    # shells) every edited module would be compiled again in each timed process.
    sides = {"ours": ROOT}
    if args.baseline:
        base = Path(args.baseline).resolve()
        if not (base / "app" / "__main__.py").is_file():
            print(f"--baseline {base}: no app/__main__.py there", file=sys.stderr)
            return 2
        sides[f"@{base.name}"] = base
    for root in sides.values():
        compileall.compile_dir(str(root / "app"), quiet=1)
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

            phases = {(side, action): [] for side in sides for action in ("attach-all", "detach-all")}

            def ours(side: str) -> None:
                for action in ("attach-all", "detach-all"):
                    t0 = time.perf_counter()
                    cmd = [sys.executable, "-m", "app"]  # from its root: that checkout's app/
                    if args.profile:
                        out = Path(args.profile) / f"{side}-{action}-{time.monotonic_ns()}.prof"
                        cmd = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "app"]
                    subprocess.run([*cmd, "--config", str(config), "block", action],
                                   check=True, stdout=subprocess.DEVNULL, cwd=sides[side])
                    phases[side, action].append(time.perf_counter() - t0)

            def theirs():
                loops = [run("losetup", "--find", "--show", d) for d in disks]
                for lp in loops:
                    run("losetup", "-d", lp)

            totals: dict[str, list[float]] = {side: [] for side in [*sides, "losetup"]}
            order = list(sides)
            for _ in range(args.rounds):  # interleaved: every side sees the same moment of the host
                for side in order:
                    totals[side].append(timed(lambda: ours(side)))
                totals["losetup"].append(timed(theirs))
                order = order[1:] + order[:1]  # (which of ours goes first turns every round)
        finally:
            for d in disks:
                for line in run("losetup", "-j", d).splitlines():
                    subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)
                subprocess.run(["losetup", "-d", d], check=False)
            remove_loop_devices(loop_indexes() - existed)
    t = statistics.median(totals["losetup"])
    print(f"entries: {args.entries}, rounds: {args.rounds} (medians)")
    for side, root in sides.items():
        o = statistics.median(totals[side])
        name = "mirrorsetup" if side == "ours" else f"mirrorsetup {side} ({root})"
        print(f"{name} attach-all + detach-all: {o:8.3f} s  (attach-all "
              f"{statistics.median(phases[side, 'attach-all']):.3f} s, detach-all "
              f"{statistics.median(phases[side, 'detach-all']):.3f} s)")
    print(f"{args.entries} x losetup attach + detach: {t:8.3f} s")
    for side in sides:
        label = "ours" if side == "ours" else side
        print(f"ratio {label}/losetup: {statistics.median(totals[side]) / t:.3f}  (goal <= 0.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
