"""Races between a first copy and the applications, by hand: a tree with hard links, a fresh
daemon with a local target, and, from the moment the mount is there, random changes of every
kind (writes, truncates, renames of files and directories, links, removals, mkdir/rmdir,
symlinks, chmod, times, xattrs) while the first copy walks. Then drain and verify: any
difference is a write lost or a node made again, and the round's directory is kept.

    .venv/bin/python bench/catchup_race.py [--rounds 20] [--ops 400] [--seed N] [--remote]

`--restart`: the changes race a comparing catch-up instead: the first copy drains, the daemon
and its workers are killed (-9, an unclean stop) and started again, and the changes go on
while the new worker compares the tree with the replica. `--remote`: the target is a directory on the other host of tests/netbed.py's two-host bed
(a network namespace with its own sshd), reached over ssh as `backup1`; the first copy then
walks while the session starts, and the agent applies. Runs as root, in a private temp
directory per round, removed unless the round failed. Not a
benchmark (nothing is timed) and not a test (it is random): a tool to look for what the
fixed-order tests cannot think of. Seen with it: a hard link made from a name the application
had renamed meanwhile (the second name never reached the target).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from test_engine_support import engine_maker, mirrorfs_mounts  # noqa: E402
from test_remote import Remote, cli  # noqa: E402

from app.services.results import MirrorError  # noqa: E402


def seed_tree(root: Path, rng: random.Random) -> None:
    dirs = [root]
    for i in range(10):
        d = rng.choice(dirs) / f"d{i}"
        d.mkdir()
        dirs.append(d)
    files = []
    for i in range(200):
        f = rng.choice(dirs) / f"f{i}"
        f.write_bytes(rng.randbytes(rng.choice((0, 100, 5000, 70_000, 200_000))))
        files.append(f)
    for i in range(20):
        os.link(rng.choice(files), rng.choice(dirs) / f"h{i}")
    for i in range(5):
        os.symlink(f"f{i}", rng.choice(dirs) / f"s{i}")


def nodes(root: Path) -> tuple[list[Path], list[Path]]:
    dirs, files = [root], []
    for base, ds, fs in os.walk(root):
        dirs += [Path(base) / d for d in ds]
        files += [Path(base) / f for f in fs if not os.path.islink(Path(base) / f)]
    return dirs, files


def one_change(root: Path, rng: random.Random, n: int) -> None:
    dirs, files = nodes(root)
    d = rng.choice(dirs)
    f = rng.choice(files) if files else None
    what = rng.choice(["write", "write", "overwrite", "truncate", "rename", "rename", "renamedir",
                       "link", "link", "unlink", "mkdir", "rmdir", "symlink", "chmod", "utime",
                       "xattr"])
    if what == "write":
        (d / f"n{n}").write_bytes(rng.randbytes(rng.choice((0, 10, 4000, 90_000))))
    elif f is None:
        return
    elif what == "overwrite":
        with open(f, "r+b") as fh:
            fh.seek(rng.randrange(0, 100_000))
            fh.write(rng.randbytes(rng.randrange(1, 9000)))
    elif what == "truncate":
        os.truncate(f, rng.randrange(0, 150_000))
    elif what == "rename":
        os.rename(f, d / (f"r{n}" if rng.random() < 0.7 else rng.choice(files).name))
    elif what == "renamedir":
        victim = rng.choice(dirs[1:]) if len(dirs) > 1 else None
        if victim is None or d == victim or victim in d.parents:
            return
        os.rename(victim, d / f"m{n}")
    elif what == "link":
        os.link(f, d / f"l{n}")
    elif what == "unlink":
        os.unlink(f)
    elif what == "mkdir":
        (d / f"k{n}").mkdir()
    elif what == "rmdir":
        if d != root:
            os.rmdir(d)
    elif what == "symlink":
        os.symlink(f.name, d / f"y{n}")
    elif what == "chmod":
        os.chmod(f, rng.choice((0o600, 0o644, 0o640, 0o755)))
    elif what == "utime":
        os.utime(f, ns=(rng.randrange(1 << 60), rng.randrange(1 << 60)))
    elif what == "xattr":
        os.setxattr(f, "user.race", rng.randbytes(8))


def one_round(seed: int, ops: int, bed=None, restart: bool = False) -> list[dict]:
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="catchup-race-"))
    failed = True
    try:
        with engine_maker(tmp) as make:
            config = None
            if bed is not None:
                (tmp / "src").mkdir()
                seed_tree(tmp / "src", rng)
                r = Remote(tmp, bed)
                a = cli(r.cfg, "fs", "add", str(tmp / "src"), "--target", "backup1:data")
                assert a.returncode == 0, a.stdout + a.stderr
                config = r.cfg
            eng, src, _tgt = make(seed=None if bed else lambda p: seed_tree(p, rng),
                                  config=config, start=False)
            eng.start(wait=False)
            deadline = time.monotonic() + 60
            while src not in mirrorfs_mounts():
                assert time.monotonic() < deadline, eng.logtext()
                time.sleep(0.002)
            if restart:
                eng.drain(src)
                eng.kill9()
                eng.kill_orphan_workers()
                eng.start(wait=False)
                while not captured(eng, src):
                    assert time.monotonic() < deadline + 60, eng.logtext()
                    time.sleep(0.002)
            for n in range(ops):
                try:
                    one_change(Path(src), rng, n)
                except OSError:
                    pass  # (a change that made no sense here: a busy name, an rmdir of a full one)
            eng.drain(src)
            diffs = eng.verify(src)
            failed = bool(diffs)
            print("  catch-ups:", "; ".join(line.split(": catching up ", 1)[1]
                                           for line in eng.logtext().splitlines()
                                           if ": catching up (" in line))
            if failed:
                print(f"seed {seed}: kept {tmp}\n{eng.logtext()[-3000:]}")
            return diffs
    finally:
        if not failed:
            shutil.rmtree(tmp, ignore_errors=True)


def captured(eng, src: str) -> bool:
    try:
        return eng.status(src)["captured"]
    except (MirrorError, AssertionError):  # not answering yet, or not listed yet
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--ops", type=int, default=400)
    ap.add_argument("--seed", type=int, default=None, help="the first round's (then +1 each)")
    ap.add_argument("--remote", action="store_true", help="to a directory on the bed's other host")
    ap.add_argument("--restart", action="store_true", help="race a comparing catch-up after kill -9")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("catchup_race: needs root (FUSE mounts)")
    first = args.seed if args.seed is not None else random.randrange(1 << 30)
    with contextlib.ExitStack() as stack:
        bed = None
        if args.remote:
            from netbed import TwoHosts
            bed = stack.enter_context(TwoHosts(Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="catchup-race-bed-")))))
        return rounds(first, args, bed)


def rounds(first: int, args, bed) -> int:
    bad = 0
    for i in range(args.rounds):
        diffs = one_round(first + i, args.ops, bed, args.restart)
        print(f"round {i + 1}/{args.rounds} seed {first + i}: "
              + ("equal" if not diffs else f"{len(diffs)} differences: {diffs[:6]}"), flush=True)
        bad += bool(diffs)
    print(f"{bad} of {args.rounds} rounds differed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
