"""Issue 14, by hand: where the block worker's time goes under fio random writes.

    .venv/bin/python bench/block_profile.py [--bs 4k] [--seconds 10] [--size 256M]
                                            [--tool py-spy|strace|cprofile|requests|none]
                                            [--no-target] [--dir /var/tmp]

Runs as root; touches no real disk. A zero-filled file on a loop is the "raw disk"; a daemon
(its own config, socket and state dir, as bench/apps.py runs it) captures it with a target file
next to it, and fio writes the captured loop (random, direct, libaio qd16, --bs) for --seconds
while the tool watches the block worker:

  py-spy    sampled Python stacks of every worker thread (py-spy must be installed in the
            venv: `.venv/bin/pip install py-spy`), summed by where they are;
  strace    `strace -c -f` of the worker: system calls by count and time;
  cprofile  MIRRORSETUP_WORKER_PROFILE (the FUSE thread only), top functions by own time;
  requests  the kernel's FUSE requests by opcode and their mean send-to-reply time (perf,
            tracepoints fuse:fuse_request_send/_end on the mount's connection);
  none      just the figure.

It prints fio's MB/s and IOPS, and the worker's CPU seconds by thread (FUSE thread, applier).
Everything made is stopped, detached and removed at the end, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import apps  # noqa: E402
import block_capture as bc  # noqa: E402
from app.services import loop as loopdev  # noqa: E402
from app.services.units import parse_size  # noqa: E402


def summarize_pyspy(path: Path) -> None:
    total = 0
    by: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        count = int(n)
        total += count
        frames = stack.split(";")
        text = stack
        if "app/engine/applier.py" in text:
            cat = "applier thread"
        elif "BlockFS.write" in text and "journal.py" in text:
            cat = "write handler: journal append"
        elif "BlockFS" in text:
            cat = "handlers (pwrite to raw and the rest)"
        elif "_pyfuse3.py" in text:
            cat = "pyfuse3 (read request, reply, Python objects)"
        elif "trio" in text:
            cat = "trio scheduler"
        else:
            cat = "other"
        by[cat] += count
        leaf[frames[-1].split(" (")[0]] += count
    print(f"py-spy: {total} samples of busy threads")
    for k, v in by.most_common():
        print(f"  {100 * v / total:5.1f}%  {k}")
    print("  by innermost function:")
    for k, v in leaf.most_common(12):
        print(f"  {100 * v / total:5.1f}%  {k}")


def fuse_connection(mount_dir: str) -> str:
    """The FUSE connection number of the mount (its st_dev minor)."""
    return str(os.minor(os.stat(mount_dir).st_dev))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bs", default="4k")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--size", type=parse_size, default=256 << 20)
    p.add_argument("--tool", choices=("py-spy", "strace", "cprofile", "requests", "none"), default="none")
    p.add_argument("--no-target", action="store_true")
    p.add_argument("--dir", default="/var/tmp")
    args = p.parse_args()
    if os.geteuid() != 0:
        p.error("run as root")
    before = bc.loop_indexes()
    used: set[str] = set()
    registry = {"daemons": [], "pll": None, "raw": [], "plain": [], "proto": [], "bench_fs": None}
    work = Path(tempfile.mkdtemp(prefix="mirrorsetup-blkprof-", dir=args.dir))
    try:
        raw_file = work / "raw.img"
        apps.zero_file(raw_file, args.size)
        raw = loopdev.attach(str(raw_file)).device
        used.add(raw)
        registry["raw"].append(raw)
        env = {"MIRRORSETUP_WORKER_PROFILE": str(work / "worker.prof")} if args.tool == "cprofile" else {}
        d = apps.Daemon(work / "daemon", [], [{"device": raw, **({} if args.no_target else
                                                                 {"target": str(work / "target.img")})}], env)
        registry["daemons"].append(d)
        d.wait_ready()
        row = d.block_row(raw)
        loop, pid = row["loop"], row["worker_pid"]
        used.add(loop)
        watcher = None
        if args.tool == "py-spy":
            watcher = subprocess.Popen([str(REPO / ".venv/bin/py-spy"), "record", "-p", str(pid), "-r", "500",
                                        "-f", "raw", "-o", str(work / "spy.txt"), "--nonblocking",
                                        "-d", str(args.seconds)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        elif args.tool == "strace":
            watcher = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(work / "strace.txt")],
                                       stderr=subprocess.DEVNULL)
        elif args.tool == "requests":
            watcher = subprocess.Popen(["perf", "record", "-a", "-q", "-o", str(work / "perf.data"),
                                        "-e", "fuse:fuse_request_send", "-e", "fuse:fuse_request_end"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if watcher is not None:
            apps.CHILDREN.append(watcher)
            time.sleep(1)
        c0 = bc.task_cpu(pid)
        bw = apps.fio(loop, args.bs, args.size, args.seconds)
        c1 = bc.task_cpu(pid)
        if watcher is not None:
            watcher.send_signal(signal.SIGINT)
            watcher.wait(timeout=60)
            apps.CHILDREN.remove(watcher)
        mount_dir = os.path.dirname(row["file"])
        conn = fuse_connection(mount_dir)
        drain = apps.drain_row(lambda: d.block_row(raw))
        fuse = c1.get(pid, 0) - c0.get(pid, 0)
        other = sum(v - c0.get(t, 0) for t, v in c1.items() if t != pid)
        bs = parse_size(args.bs)
        dio = Path(f"/sys/block/{os.path.basename(loop)}/loop/dio").read_text().strip()
        print(f"fio {args.bs} random write direct qd16 on captured {loop} (loop dio={dio}): {bw / 1e6:.1f} MB/s, "
              f"{bw / bs:.0f} IOPS; drain after {drain:.2f} s")
        print(f"worker CPU over {args.seconds} s: FUSE thread {fuse:.2f} s, other threads (applier) {other:.2f} s"
              f" -> {1e6 * fuse / (bw * args.seconds / bs):.0f} us FUSE-thread CPU per write")
        if args.tool == "py-spy":
            summarize_pyspy(work / "spy.txt")
        elif args.tool == "strace":
            print((work / "strace.txt").read_text())
        elif args.tool == "requests":
            script = apps.run(["perf", "script", "-i", work / "perf.data", "-F", "time,event,trace"]).stdout
            sent, counts, waited = {}, collections.Counter(), collections.Counter()
            for line in script.splitlines():
                f = line.split()
                if len(f) < 6 or f[3] != conn or f[4] != "req":
                    continue
                when, key = float(f[0].rstrip(":")), f[5]
                if "request_send" in f[1]:
                    op = line[line.index("(") + 1:line.index(")")]
                    counts[op] += 1
                    sent[key] = (op, when)
                elif key in sent:
                    op, t0 = sent.pop(key)
                    waited[op] += when - t0
            for op, n in counts.most_common():
                print(f"  {op:18s} {n:8d}  mean {1e6 * waited[op] / n:7.0f} us send to reply")
        d.stop()
        registry["daemons"].remove(d)
        if args.tool == "cprofile":
            import pstats
            pstats.Stats(str(work / "worker.prof")).sort_stats("tottime").print_stats(15)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        apps.cleanup(work, registry, used, before)


if __name__ == "__main__":
    sys.exit(main())
