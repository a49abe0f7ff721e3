"""The crash loop of issue 9, by hand: kill -9 of the daemon at random moments under writers
that fsync, N times, with a file-system entry and a block entry; afterwards every fsync'd write
must be on the target and verify clean. Prints how long each recovery took.

    .venv/bin/python bench/crashloop.py [--rounds 20] [--also-workers]

Runs as root, in a private temp directory (config, socket, state, a 64 MiB loop "disk"), and
removes everything it made. `--also-workers` kills the capture workers too (the harder case:
mounts and loops die with them; the next daemon mounts beneath the dead mount and resyncs).
A recovery is the time from the kill until the restarted daemon answers with both entries
captured, and (second figure) until the targets hold everything again.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from test_engine_support import Engine, write_config  # noqa: E402

MiB = 1 << 20
FS_WRITER = r"""
import os, sys, time
src, log = sys.argv[1], sys.argv[2]
logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
i = 0
while not os.path.exists(log + ".stop"):
    name = os.path.join(src, "w%06d" % i)
    try:
        with open(name, "wb") as f:
            f.write(os.urandom(4096 + i % 9000))
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        time.sleep(0.01)  # a dead mount (workers killed too): an application would retry
        continue
    os.write(logfd, b"%s\n" % name.encode())
    i += 1
"""
BLOCK_WRITER = r"""
import mmap, os, sys, time
dev, log = sys.argv[1], sys.argv[2]
logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
buf = mmap.mmap(-1, 65536)  # page-aligned, as O_DIRECT wants
i = 0
while not os.path.exists(log + ".stop"):
    buf.seek(0)
    buf.write(os.urandom(65536))
    off = (i * 65536) % (48 << 20)
    try:
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        try:
            os.pwritev(fd, [buf], off)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        time.sleep(0.05)  # its capture died with it (workers killed too): wait for the next
        continue
    os.write(logfd, b"%d\n" % off)
    i += 1
"""


def run(argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def caught_up(eng, key: str, table: str, timeout: float = 300) -> None:
    """Until the target has applied everything captured up to now and no catching-up or
    pull-ahead is left (under writers that never pause, the journal is never empty)."""
    mark = eng._row(table, key)["last_seq"]
    deadline = time.monotonic() + timeout
    while True:
        st = eng._row(table, key)
        if st["applied_seq"] >= mark and st["catch_up"] is None and not st["behind"]:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{key}: the target did not catch up in {timeout:.0f} s: {st}")
        time.sleep(0.05)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--also-workers", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mirrorsetup-crashloop-"))
    image = tmp / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    disk = run(["losetup", "--find", "--show", str(image)]).stdout.strip()
    (tmp / "src").mkdir()
    cfg = write_config(tmp / "etc" / "replication.toml", [{"path": str(tmp / "src"), "target": str(tmp / "tgt")}],
                       block=[{"device": disk, "target": str(tmp / "tgt.img")}])
    eng = Engine(tmp, cfg)
    writers = []
    up, caught = [], []
    try:
        eng.start()
        src = str(tmp / "src")
        caught_up(eng, src, "filesystem")
        caught_up(eng, disk, "block")
        loop = eng.block(disk)["loop"]
        fs_log, blk_log = str(tmp / "fs.log"), str(tmp / "blk.log")
        writers = [subprocess.Popen([sys.executable, "-c", FS_WRITER, src, fs_log]),
                   subprocess.Popen([sys.executable, "-c", BLOCK_WRITER, loop, blk_log])]
        for n in range(args.rounds):
            time.sleep(random.uniform(0.5, 3.0))
            workers = eng.workers() if args.also_workers else []
            t0 = time.monotonic()
            eng.kill9()
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            eng.start()
            while not (eng.status(src)["captured"] and eng.block(disk)["captured"]):
                time.sleep(0.05)
            up.append(time.monotonic() - t0)
            caught_up(eng, src, "filesystem")  # the writers never pause: the target holds
            caught_up(eng, disk, "block")      # all that was captured when capture resumed
            caught.append(time.monotonic() - t0)
            loop = eng.block(disk)["loop"]
            print(f"round {n + 1}: captured again after {up[-1]:.2f} s, targets caught up after "
                  f"{caught[-1]:.2f} s", flush=True)
            if args.also_workers:  # the loop changed: the block writer follows it
                writers[1].terminate()
                writers[1].wait()
                writers[1] = subprocess.Popen([sys.executable, "-c", BLOCK_WRITER, loop, blk_log])
        for log in (fs_log, blk_log):
            open(log + ".stop", "w").close()
        for w in writers:
            w.wait(timeout=60)
        eng.drain(src)
        eng.block_drain(disk)
        names = open(fs_log).read().split()
        missing = [n for n in names if not (tmp / "tgt" / os.path.basename(n)).exists() or
                   hashlib.sha256(Path(n).read_bytes()).digest() !=
                   hashlib.sha256((tmp / "tgt" / os.path.basename(n)).read_bytes()).digest()]
        diffs = eng.verify(src)
        ranges = eng.client.request("block_verify", device=disk)["ranges"]
        print(f"\n{len(names)} files fsync'd through mirrorfs, {len(missing)} missing or different "
              f"at the target; verify: {len(diffs)} differences")
        print(f"{open(blk_log).read().count(chr(10))} block writes fsync'd through {loop}; block "
              f"verify: {len(ranges)} differing ranges")
        print(f"recovery (captured again): median {statistics.median(up):.2f} s, max {max(up):.2f} s")
        print(f"recovery (targets caught up): median {statistics.median(caught):.2f} s, "
              f"max {max(caught):.2f} s")
        return 0 if not missing and not diffs and not ranges else 1
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
        eng.cleanup()
        subprocess.run(["losetup", "-d", disk], capture_output=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(tmp)], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
