#!/usr/bin/env python3
"""A busy host, by hand (as root): run a command while another process keeps attaching and
detaching loop devices and mounting and unmounting file systems, as other users of a shared
host do. The suite must pass under it (issue 11):

    .venv/bin/python bench/busy_host.py [--loops 100] [--mounts 20] [--pause 0.005] -- \\
        env CI=true .venv/bin/python -m pytest -q -p no:cacheprovider

The churn process works in a private temp directory: --loops sparse files attached to loops
(the kernel picks the numbers, so it takes whatever loop names are free, as a stranger would),
then detached and re-attached at random; --mounts tmpfs mounts on directories there, mounted
and unmounted at random (mount-table events for every watcher). Every --pause seconds one
change. At the end (or on Ctrl-C) it prints how many changes it made while the command ran,
then detaches every loop backed by its files, removes the loop nodes it added, unmounts its
mounts and removes the directory. Exit status: the command's.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from picker_stress import cleanup, images, loop_indices  # noqa: E402


def churn(directory: str, loops: int, mounts: int, pause: float) -> None:
    """The other user of the host: attach, detach, mount, unmount, forever."""
    from app.services import loop as loopdev
    from app.services import mounts as mountsvc
    files = images(directory, loops)
    points = []
    for i in range(mounts):
        point = os.path.join(directory, f"m{i}")
        os.mkdir(point)
        points.append(point)
    attached: dict[str, str] = {}
    mounted: set[str] = set()
    rng = random.Random(os.getpid())
    changes = 0
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("ready", flush=True)
    while not stop:
        try:
            if points and rng.random() < 0.2:
                point = rng.choice(points)
                if point in mounted:
                    mountsvc.umount(point)
                    mounted.discard(point)
                else:
                    mountsvc.mount("busy-host", point, "tmpfs", 0, "size=1m")
                    mounted.add(point)
            elif files:
                path = rng.choice(files)
                if path in attached:
                    loopdev.detach(attached.pop(path))
                else:
                    attached[path] = loopdev.attach(path).device
            changes += 1
        except OSError as exc:  # a race with another user is what a busy host is
            print(f"churn: {exc}", file=sys.stderr, flush=True)
        time.sleep(pause)
    print(changes, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", type=int, default=100)
    ap.add_argument("--mounts", type=int, default=20)
    ap.add_argument("--pause", type=float, default=0.005, help="seconds between two changes")
    ap.add_argument("--churn", metavar="DIR", help=argparse.SUPPRESS)  # the child process
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.churn:
        churn(args.churn, args.loops, args.mounts, args.pause)
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    if os.geteuid() != 0:
        print("needs root: it attaches loop devices and mounts", file=sys.stderr)
        return 2
    def terminated(*_):  # `kill` of this tool cleans up as Ctrl-C does (the churn lived on)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGHUP, terminated)
    before = loop_indices()
    directory = tempfile.mkdtemp(prefix="mirrorsetup-busy-host-")
    child = subprocess.Popen([sys.executable, __file__, "--churn", directory, "--loops",
                              str(args.loops), "--mounts", str(args.mounts), "--pause",
                              str(args.pause)], stdout=subprocess.PIPE, text=True)
    status = 1
    started = time.monotonic()
    try:  # (the churn child's loops and mounts are undone below whatever ends the command)
        if child.stdout.readline().strip() != "ready":
            print("the churn process did not start", file=sys.stderr)
            return 1
        print(f"busy host: {args.loops} loops and {args.mounts} mounts churning", flush=True)
        status = subprocess.run(command).returncode
    except KeyboardInterrupt:
        status = 130
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not stop the cleanup
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            out, _ = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            out, _ = child.communicate()
        changes = out.strip().splitlines()[-1] if out.strip() else "?"
        for point in sorted(Path(directory).glob("m*")):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
        detached, removed = cleanup(directory, before)
        subprocess.run(["rm", "-rf", "--one-file-system", directory])
        print(f"busy host: {changes} loop/mount changes in {time.monotonic() - started:.0f} s; "
              f"cleanup: {detached} loops detached, {removed} loop nodes removed", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
