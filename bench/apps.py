"""Issue 14, by hand: real applications and micro workloads natively, through libfuse's C
`passthrough_ll` (the FUSE limit on this kernel) and through mirrorfs; fio on a captured loop
against a plain loop; replication lag at half the capture's own maximum rate; resident memory.

    .venv/bin/python bench/apps.py [--runs 3] [--dir /var/tmp] [--only apps,micro,block,lag,memory]
                                   [--files 5000] [--seq-size 256M] [--block-size 512M]
                                   [--fio-seconds 10] [--block-sizes 4k,64k] [--lag-seconds 15]
                                   [--entries 100]
                                   [--fs ext4|tmpfs|host] [--no-target] [--block-proto SRC]
                                   [--proto-args ARGS ...]
                                   [--requests] [--worker-env K=V] [--baseline DIR]
                                   [--fs-proto bench/cblock/cfs.c]

Runs as root; touches no real disk. Everything lives in one temp dir under --dir. The fs sides
share one file system made for the run (--fs ext4, the default: a fresh 16 GiB sparse ext4 on a
direct-I/O loop in that dir; the host's own root ext4 is slowed by other users' file churn, its
inode allocator's recently_deleted() took most of a native `tar x`), so a target competes for
the same disk; --fs tmpfs shows FUSE's own cost, --fs host the shared disk as it is:

  native          the workload in a plain directory;
  passthrough_ll  built here with gcc from /usr/share/doc/libfuse3-dev/examples/passthrough_ll.c
                  (`-o source=DIR,xattr,default_permissions,allow_other`, its defaults otherwise);
  mirrorfs        `python -m app.engine.daemon` with its own config, socket and state dir, one
                  entry with a local target (--no-target: none, the applier's cost left out).

Sections (--only): `apps` git (300 files, 3 commits, gc --aggressive), SQLite 2,000
transactions synchronous=FULL (journal_mode DELETE), `tar x` of the venv's standard library
(site-packages, __pycache__ and the static libpython left out), `rm -rf` of that tree;
`micro` --files 4 KiB create+write+close, --seq-size in 1 MiB writes + fsync; `block` fio
random write, direct, qd16, 4 KiB and 64 KiB on a plain loop and on the captured loop (each over
its own loop "disk" on a zero-filled file; targets are zero-filled files too, allocated as after
an initial copy: random writes into a sparse target cost ext4 allocations the raw side never
pays), sha256 of target == raw afterwards. Within a run 64 KiB follows 4 KiB on the same disks,
so it writes into the 4 KiB page-cache folios those left, 16 to a write (--block-sizes 64k:
alone, on the folios its own writes make); `lag` lag p50/p99
(sampled from status every 50 ms) while writing at half the capture's measured maximum (mirrorfs
sequential MB/s, captured-loop 64 KiB MB/s); `memory` VmRSS / peak / PSS of each worker and, with
--entries N, of a second daemon capturing N entries (half fs, half block on 8 MiB loop disks):
the daemon, its workers and the worker template they are forked from (MIRRORSETUP_ZYGOTE=0 in
the environment: every worker starts Python anew, as before the template).
`--requests` counts the FUSE requests per small file, tar x entry and rm -rf entry by opcode
(perf, tracepoint fuse:fuse_request_send) through passthrough_ll and mirrorfs. `--block-proto bench/cblock/cblock.c`
builds the compiled block capture prototype (gcc, fuse3, zlib) and adds, for each --proto-args
(default: one, empty; e.g. --proto-args "" --proto-args "--threads 4"), a captured loop served by
it as one more block side, "proto" + its arguments. `--fs-proto bench/cblock/cfs.c` builds the
compiled mirrorfs prototype and runs every fs workload through it too (side "cfs": mounted over
its own entry with a local target, like mirrorfs).

With --baseline DIR a second daemon runs the code of that checkout (`git archive REV app | tar x
-C DIR`) on its own entry and loop disk: sides "mirrorfs@DIR" and "captured@DIR", so a change
and its baseline are measured interleaved in one run on a shared, noisy machine (repeatable: the
sides are then named after each DIR's last component). Copy the compiled module in too (`cp
app/engine/_fuseread*.so DIR/app/engine/`) and compile DIR's bytecode (`python -m compileall -q
DIR/app`; PYTHONDONTWRITEBYTECODE may be set): the bench warns when either is missing.

Medians of --runs runs; within each run the sides take turns (the order rotates every run).
Between timed steps: sync, and the journal drained (its drain time is printed, not charged).
Ratios are time ratios (mirrorfs / passthrough_ll: lower is better) beside the issue's goals.
Everything made (daemons, passthrough_ll, mounts, loops, new /dev/loopN nodes, fio) is stopped,
unmounted, detached and removed at the end, even on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import block_capture as bc  # noqa: E402
from app.services import loop as loopdev  # noqa: E402
from app.services import mounts  # noqa: E402
from app.services._ioctl import LOOP_CTL_REMOVE  # noqa: E402
from app.services.control import ControlClient  # noqa: E402
from app.services.results import MirrorError  # noqa: E402
from app.services.units import parse_size  # noqa: E402

MiB = 1 << 20
EXAMPLES = Path("/usr/share/doc/libfuse3-dev/examples")
SAMPLE_SECONDS = 0.05
CHILDREN: list[subprocess.Popen] = []  # fio / perf still running: cleanup reaps them first
GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "b@example.invalid"}


def run(argv: list, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    if p.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return p


# -- workloads: each gets an empty directory and returns seconds ------------------------------
def w_git(d: Path, home: Path) -> float:
    env = {**os.environ, **GIT_ENV, "HOME": str(home)}
    rng = random.Random(14)
    words = [f"w{i}" for i in range(2000)]
    t0 = time.perf_counter()
    run(["git", "init", "-q", d], env=env)
    files = [d / f"src/d{i % 10}/f{i:03d}.txt" for i in range(300)]
    for i, f in enumerate(files):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(" ".join(rng.choice(words) for _ in range(rng.randrange(200, 1500))) + "\n")
    run(["git", "add", "-A"], cwd=d, env=env)
    run(["git", "commit", "-q", "-m", "one"], cwd=d, env=env)
    for n, part in enumerate((files[:100], files[100:200])):
        for f in part:
            with open(f, "a") as fh:
                fh.write(f"change {n} {rng.random()}\n")
        run(["git", "commit", "-q", "-a", "-m", f"change {n}"], cwd=d, env=env)
    run(["git", "gc", "--aggressive", "-q"], cwd=d, env=env)
    return time.perf_counter() - t0


def w_sqlite(d: Path, transactions: int = 2000) -> float:
    t0 = time.perf_counter()
    con = sqlite3.connect(d / "bench.db", isolation_level=None)
    try:
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        for i in range(transactions):
            con.execute("BEGIN")
            con.execute("INSERT INTO t (v) VALUES (?)", (f"row {i} " * 8,))
            con.execute("COMMIT")
    finally:
        con.close()
    return time.perf_counter() - t0


def w_tar(d: Path, tarball: Path) -> float:
    (d / "x").mkdir()
    t0 = time.perf_counter()
    run(["tar", "xf", tarball, "-C", d / "x"])
    return time.perf_counter() - t0


def w_rm(d: Path) -> float:
    t0 = time.perf_counter()
    run(["rm", "-rf", d / "x"])
    return time.perf_counter() - t0


def w_small(d: Path, count: int) -> float:
    buf = os.urandom(4096)
    t0 = time.perf_counter()
    for i in range(count):
        fd = os.open(d / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, buf)
        os.close(fd)
    return time.perf_counter() - t0


def w_seq(d: Path, size: int, rate: float | None = None) -> float:
    """size bytes in 1 MiB writes + fsync; with `rate` (bytes/s) the writes are paced."""
    buf = os.urandom(MiB)
    t0 = time.perf_counter()
    fd = os.open(d / "big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(size // MiB):
            if rate:
                ahead = t0 + i * MiB / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def make_tarball(out: Path) -> tuple[int, int]:
    """The venv's standard library as an uncompressed tar: (entries, bytes)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    run(["tar", "cf", out, "--exclude=./site-packages", "--exclude=__pycache__",
         "--exclude=./config-*", "-C", stdlib, "."])
    entries = len(run(["tar", "tf", out]).stdout.splitlines())
    return entries, out.stat().st_size


# -- the sides -------------------------------------------------------------------------------
class Daemon:
    """`python -m app.engine.daemon` with a private config, socket and state dir under `work`."""

    def __init__(self, work: Path, fs: list[dict], block: list[dict], env: dict | None = None,
                 repo: Path = REPO):
        work.mkdir(parents=True, exist_ok=True)
        lines = ["schema = 1"]
        for table, rows in (("filesystem", fs), ("block", block)):
            for row in rows:
                lines.append(f"[[{table}]]")
                lines += [f'{k} = "{v}"' for k, v in row.items()]
        cfg = work / "replication.toml"
        cfg.write_text("\n".join(lines) + "\n")
        self.socket = str(work / "run" / "control.sock")
        self.log = open(work / "daemon.log", "wb")
        # own session: a Ctrl-C reaches us only, and we stop the daemon in order
        self.proc = subprocess.Popen([sys.executable, "-m", "app", "daemon", "--config", str(cfg),
                                      "--socket", self.socket, "--state-dir", str(work / "state")],
                                     cwd=repo, env={**os.environ, **(env or {}), "PYTHONPATH": str(repo)},
                                     stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.client = ControlClient(self.socket, timeout=600)
        self.want_fs = [r["path"] for r in fs]
        self.want_block = [r["device"] for r in block]

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not capture every entry:\n{self.log_tail()}")
            if self.client.is_running():
                st = self.client.request("status")
                fs_ok = sum(1 for e in st["filesystem"] if e["key"] in self.want_fs and e["mounted"]
                            and e["worker_pid"])
                blk_ok = sum(1 for b in st["block"] if b["key"] in self.want_block and b["captured"]
                             and b["loop"])
                if fs_ok == len(self.want_fs) and blk_ok == len(self.want_block):
                    return
            time.sleep(0.2)

    def log_tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_bytes()[-3000:].decode(errors="replace")

    def status(self) -> dict:
        return self.client.request("status")

    def fs_row(self, path: str) -> dict:
        return next(e for e in self.status()["filesystem"] if e["key"] == path)

    def block_row(self, device: str) -> dict:
        return next(b for b in self.status()["block"] if b["key"] == device)

    def drain(self, row) -> float:
        t0 = time.perf_counter()
        while True:
            r = row()
            if r["applied_seq"] == r["last_seq"]:
                return time.perf_counter() - t0
            time.sleep(SAMPLE_SECONDS)

    def pids(self) -> list[int]:
        return self.status()["pids"]

    def stop(self) -> None:
        workers = []
        with contextlib.suppress(Exception):
            workers = [p for p in self.pids() if p != self.proc.pid]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                print("daemon did not stop in 300 s: killing it", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 60  # block workers end by themselves once it is gone
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.log.close()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return not f.read().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return False


class PassthroughLL:
    """libfuse's example, built from the Debian examples and run in the foreground."""

    def __init__(self, build: Path, source: Path, mnt: Path):
        src = EXAMPLES / "passthrough_ll.c"
        if not src.exists():
            raise SystemExit(f"{src} is missing: install libfuse3-dev (packaging/setup.sh does), "
                             "which ships libfuse's examples")
        build.mkdir(parents=True, exist_ok=True)
        for f in EXAMPLES.glob("passthrough*.h"):
            shutil.copy(f, build)
        shutil.copy(src, build)
        cflags = run(["pkg-config", "--cflags", "--libs", "fuse3"]).stdout.split()
        self.binary = build / "passthrough_ll"
        run(["gcc", "-O2", "-o", self.binary, build / "passthrough_ll.c", *cflags])
        self.mnt = mnt
        mnt.mkdir(parents=True, exist_ok=True)
        self.log = open(build / "passthrough_ll.log", "wb")
        self.proc = subprocess.Popen([self.binary, "-f", "-o", f"source={source},xattr,default_permissions,"
                                      "allow_other", mnt], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while not any(m.mount_point == str(mnt) for m in mounts.read_mountinfo()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"passthrough_ll did not mount {mnt}")
            time.sleep(0.05)

    def stop(self) -> None:
        if any(m.mount_point == str(self.mnt) for m in mounts.read_mountinfo()):
            try:
                mounts.umount(str(self.mnt))
            except MirrorError:
                mounts.umount(str(self.mnt), mounts.MNT_DETACH)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class FsSides:
    """The places a workload runs (native, passthrough_ll, then each mirrorfs: this checkout's
    and --baseline's); settle() makes the next timed step start clean."""

    def __init__(self, work: Path, pll_mnt: Path, captures: dict[str, tuple[Daemon, Path]],
                 protos: dict[str, FsProto], pll_pid: int):
        self.pll_pid = pll_pid
        self.roots = {"native": work / "native", "passthrough_ll": pll_mnt,
                      **{name: src for name, (_, src) in captures.items()},
                      **{name: p.mnt for name, p in protos.items()}}
        self.protos = protos
        self.roots["native"].mkdir(exist_ok=True)
        self.captures = captures
        self.names = list(self.roots)
        self.drains: dict[tuple[str, str], list[float]] = {}
        self.cpu: dict[tuple[str, str], list[float]] = {}  # CPU seconds of pids(side)

    def row(self, side: str):
        if side in self.protos:
            return self.protos[side].row
        daemon, src = self.captures[side]
        return lambda: daemon.fs_row(str(src))

    def pids(self, side: str) -> list[int]:
        """The processes that serve `side` (none natively): their CPU is the side's cost."""
        if side == "passthrough_ll":
            return [self.pll_pid]
        if side in self.protos:
            return [self.protos[side].proc.pid]
        if side in self.captures:
            return self.captures[side][0].pids()  # the daemon and its workers
        return []

    def settle(self, side: str, label: str) -> None:
        os.sync()
        if side in self.captures or side in self.protos:
            self.drains.setdefault((label, side), []).append(drain_row(self.row(side)))

    def fresh(self, side: str, name: str) -> Path:
        d = self.roots[side] / name
        d.mkdir()
        return d


def rotated(seq, k: int) -> list:
    k %= len(seq)
    return list(seq[k:]) + list(seq[:k])


def fs_section(sides: FsSides, args, work: Path, tarball: Path, which: list[str]) -> dict:
    times: dict[tuple[str, str], list[float]] = {}

    def record(label, side, fn, *fn_args):
        pids = sides.pids(side)
        c0 = cpu_seconds(pids)
        seconds = fn(*fn_args)
        sides.cpu.setdefault((label, side), []).append(cpu_seconds(pids) - c0)
        times.setdefault((label, side), []).append(seconds)
        sides.settle(side, label)

    home = work / "home"
    home.mkdir(exist_ok=True)
    for r in range(args.runs):
        for side in rotated(sides.names, r):
            if "git" in which:
                record("git", side, w_git, sides.fresh(side, f"git{r}"), home)
            if "sqlite" in which:
                record("sqlite", side, w_sqlite, sides.fresh(side, f"sql{r}"))
            if "tar" in which:
                d = sides.fresh(side, f"tar{r}")
                record("tar x", side, w_tar, d, tarball)
                record("rm -rf", side, w_rm, d)
            if "small" in which:
                d = sides.fresh(side, f"small{r}")
                record("small files", side, w_small, d, args.files)
                shutil.rmtree(d)
                sides.settle(side, "cleanup")
            if "seq" in which:
                d = sides.fresh(side, f"seq{r}")
                record("sequential", side, w_seq, d, args.seq_size)
                shutil.rmtree(d)
                sides.settle(side, "cleanup")
        print(f"  fs run {r + 1}/{args.runs} done", flush=True)
    return times


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far (a process gone meanwhile counts 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


# -- block -----------------------------------------------------------------------------------
def fio(dev: str, bs: str, size: int, seconds: int, rate: int | None = None) -> float:
    """fio random write, direct, libaio qd16 for `seconds`: bytes/s."""
    argv = ["fio", "--name=w", f"--filename={dev}", "--ioengine=libaio", "--direct=1", "--rw=randwrite",
            f"--bs={bs}", "--iodepth=16", f"--size={size}", f"--runtime={seconds}", "--time_based",
            "--randrepeat=0", "--output-format=json"]
    if rate:
        argv.append(f"--rate={rate}")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    CHILDREN.append(proc)
    try:
        out, err = proc.communicate()
    finally:
        reap(proc)
    if proc.returncode:
        raise RuntimeError(f"fio on {dev} failed ({proc.returncode}): {err.strip()[-500:]}")
    return json.loads(out)["jobs"][0]["write"]["bw_bytes"]


def reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc in CHILDREN:
        CHILDREN.remove(proc)


def zero_file(path: Path, size: int) -> None:
    """Allocated zeros: timed writes overwrite in place on every side."""
    run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={size // MiB}", "conv=fsync", "status=none"])


class Proto:
    """bench/cblock's compiled block capture over `raw`: one FUSE file `disk`, a `status` file
    with "last_seq applied_seq lag_ms", its journal in `state`, applied onto `target`."""

    def __init__(self, binary: str, extra: list[str], raw: str, target: Path, state: Path, mnt: Path,
                 used: set[str]):
        mnt.mkdir(parents=True, exist_ok=True)
        state.mkdir(parents=True, exist_ok=True)
        self.mnt, self.name = mnt, proto_name(extra)
        self.log = open(state / "proto.log", "wb")
        self.proc = subprocess.Popen([binary, "--device", raw, "--target", str(target), "--state", str(state),
                                      *extra, str(mnt)], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while not (mnt / "disk").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{binary} did not serve {mnt}/disk: see {state}/proto.log")
            time.sleep(0.05)
        self.loop = loopdev.attach(str(mnt / "disk"), direct_io=True).device  # as the daemon's (E5)
        used.add(self.loop)
        self.target = target

    def row(self) -> dict:
        last, applied, lag_ms = (mnt_read(self.mnt / "status")).split()
        return {"last_seq": int(last), "applied_seq": int(applied), "lag_seconds": int(lag_ms) / 1000}

    def stop(self) -> None:
        if self.loop:
            bc.detach_wait(self.loop)
            self.loop = None
        if any(m.mount_point == str(self.mnt) for m in mounts.read_mountinfo()):
            mounts.umount(str(self.mnt))
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class FsProto:
    """bench/cblock/cfs.c, the compiled mirrorfs prototype, mounted over `src` (as the daemon
    mounts mirrorfs) with a local target; its STATE/status reads "last_seq applied_seq lag_ms"."""

    def __init__(self, binary: str, src: Path, target: Path, state: Path):
        src.mkdir()
        state.mkdir()
        self.mnt, self.state, self.name = src, state, "cfs"
        self.log = open(state / "cfs.log", "wb")
        self.proc = subprocess.Popen([binary, "--source", str(src), "--target", str(target), "--state", str(state),
                                      str(src)], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while not any(m.mount_point == str(src) and m.fstype == "fuse.cfs" for m in mounts.read_mountinfo()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cfs did not mount {src}: see {state}/cfs.log")
            time.sleep(0.05)

    def row(self) -> dict:
        last, applied, lag_ms = (self.state / "status").read_text().split("\n", 1)[0].split()
        return {"last_seq": int(last), "applied_seq": int(applied), "lag_seconds": int(lag_ms) / 1000}

    def stop(self) -> None:
        if any(m.mount_point == str(self.mnt) for m in mounts.read_mountinfo()):
            mounts.umount(str(self.mnt))
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def proto_name(extra: str | list[str]) -> str:
    return "proto" + ("[" + " ".join(extra) + "]" if extra else "")


def build_proto(source: str, build: Path) -> str:
    build.mkdir(parents=True, exist_ok=True)
    binary = build / Path(source).stem
    flags = run(["pkg-config", "--cflags", "--libs", "fuse3"]).stdout.split()
    run(["gcc", "-O2", "-Wall", "-o", binary, source, *flags, "-lz", "-lpthread"])
    return str(binary)


def mnt_read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def drain_row(row) -> float:
    t0 = time.perf_counter()
    while True:
        r = row()
        if r["applied_seq"] == r["last_seq"]:
            return time.perf_counter() - t0
        time.sleep(SAMPLE_SECONDS)


def block_section(args, devs: dict[str, str], rows: dict) -> dict:
    """devs: side -> loop device to write; rows: side -> status row callable (captured sides)."""
    bw: dict[tuple[str, str], list[float]] = {}
    drains: dict[str, list[float]] = {}
    for r in range(args.runs):
        for bs in args.block_sizes:
            for side in rotated(list(devs), r):
                os.sync()
                bw.setdefault((f"fio {bs}", side), []).append(fio(devs[side], bs, args.block_size,
                                                                  args.fio_seconds))
                if side in rows:
                    drains.setdefault(side, []).append(drain_row(rows[side]))
        print(f"  block run {r + 1}/{args.runs} done", flush=True)
    return {"bw": bw, "drains": drains}


class LagSampler:
    def __init__(self, row):
        self.row, self.lags, self.errors = row, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.lags.append(self.row()["lag_seconds"] or 0.0)
            except (MirrorError, OSError, StopIteration, ValueError):
                self.errors += 1
            self._stop.wait(SAMPLE_SECONDS)


# -- memory ----------------------------------------------------------------------------------
def memory_of(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and Pss of `pid`, in bytes."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1]) * 1024
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                out["Uss"] = out.get("Uss", 0) + int(line.split()[1]) * 1024
    return out


def template_pids(pids) -> list[int]:
    """The worker template the daemon forks workers from (app/engine/zygote.py): its memory counts."""
    import psutil
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found += [c.pid for c in psutil.Process(pid).children()
                      if "app.engine.zygote" in c.cmdline()]
    return found


def memory100(args, work: Path, used: set[str], registry: dict) -> dict:
    n_block = args.entries // 2
    n_fs = args.entries - n_block
    fs, block = [], []
    for i in range(n_fs):
        (work / f"fs{i}").mkdir(parents=True)
        fs.append({"path": str(work / f"fs{i}"), "target": str(work / f"fs{i}.tgt")})
    for i in range(n_block):
        f = work / f"disk{i}.img"
        with open(f, "wb") as fh:
            fh.truncate(8 * MiB)
        dev = loopdev.attach(str(f)).device
        used.add(dev)
        registry["raw"].append(dev)
        block.append({"device": dev, "target": str(work / f"disk{i}.tgt")})
    t0 = time.perf_counter()
    d = Daemon(work / "daemon", fs, block)
    registry["daemons"].append(d)
    d.wait_ready(1800)
    took = time.perf_counter() - t0
    st = d.status()
    for b in st["block"]:
        used.add(b["loop"])
    pids = list(st["pids"]) + template_pids(st["pids"])
    mem = [memory_of(p) for p in pids]
    out = {"entries": args.entries, "processes": len(pids), "start_seconds": took,
           "rss": sum(m.get("VmRSS", 0) for m in mem), "pss": sum(m.get("Pss", 0) for m in mem),
           "uss": sum(m.get("Uss", 0) for m in mem), "templates": len(pids) - len(st["pids"])}
    d.stop()
    registry["daemons"].remove(d)
    return out


# -- FUSE requests per small file, per tar x and rm -rf entry ------------------------------------
REQUEST_SCRIPT = ("import os,sys\nprint(os.getpid(),flush=True)\nd=sys.argv[1]\nb=b'x'*4096\nfor i in range(int(sys.argv[2])):\n"
                  "    fd=os.open(f'{d}/f{i:05d}',os.O_WRONLY|os.O_CREAT|os.O_EXCL,0o644)\n"
                  "    os.write(fd,b)\n    os.close(fd)\n")
# a command that says its pid, then becomes the workload (the pid the kernel's sends carry)
EXEC_SCRIPT = "import os,sys\nprint(os.getpid(),flush=True)\nos.execvp(sys.argv[1],sys.argv[1:])\n"


def fuse_requests(argv: list, count: int, scratch: Path) -> dict[str, tuple[float, float]]:
    """Per item (`count` of them), by opcode: (requests, mean microseconds from send to end), as
    the kernel's tracepoints fuse:fuse_request_send / _end see them for the workload `argv`, a
    command that prints its pid first (perf -a: a reply is sent from the server's context; sends
    are counted from the workload's pid only, other mounts are ignored)."""
    fd, name = tempfile.mkstemp(prefix=".perf-", suffix=".data", dir=scratch)
    os.close(fd)
    data = Path(name)
    proc = subprocess.Popen(["perf", "record", "-a", "-q", "-o", str(data), "-e", "fuse:fuse_request_send",
                             "-e", "fuse:fuse_request_end", "--", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    CHILDREN.append(proc)
    try:
        out, err = proc.communicate()
    finally:
        reap(proc)
    if proc.returncode:
        raise RuntimeError(f"perf record failed: {err.strip()[-500:]}")
    writer = out.split()[0]
    script = run(["perf", "script", "-i", data, "-F", "pid,time,event,trace"]).stdout
    data.unlink()
    sent: dict[tuple[str, str], tuple[str, float]] = {}
    counts: dict[str, int] = {}
    waited: dict[str, float] = {}
    for line in script.splitlines():
        f = line.split()  # pid time: event: connection C req N ...
        if len(f) < 7 or f[5] != "req":
            continue
        when, key = float(f[1].rstrip(":")), (f[4], f[6])
        if "request_send" in line and "(" in line and f[0] == writer:
            op = line[line.index("(") + 1:line.index(")")].removeprefix("FUSE_")
            counts[op] = counts.get(op, 0) + 1
            sent[key] = (op, when)
        elif "request_end" in line and key in sent:
            op, t0 = sent.pop(key)
            waited[op] = waited.get(op, 0.0) + when - t0
    return {op: (n / count, 1e6 * waited.get(op, 0.0) / n)
            for op, n in sorted(counts.items(), key=lambda kv: -kv[1])}


# -- report ----------------------------------------------------------------------------------
def med(v: list[float]) -> float:
    return statistics.median(v) if v else float("nan")


def each(v: list[float], fmt: str) -> str:
    return "/".join(fmt.format(x) for x in v)


def report_fs(times: dict, drains: dict, names: list[str], files: int, seq: int,
              cpu: dict | None = None) -> None:
    goals = {"git": 1.5, "sqlite": 1.5, "tar x": 1.5, "rm -rf": 1.5, "small files": 1 / 0.7,
             "sequential": 1 / 0.8}
    caps = names[2:]
    labels = [k for k in goals if (k, "native") in times]
    print(f"\n{'workload':12s} {'native s':>9s} {'pll s':>8s} {'pll/nat':>7s}" + "".join(
        f" | {c[:16]:>16s} s {'/pll':>6s} {'/nat':>6s} {'goal':>7s}" for c in caps) + "   drain s")
    for k in labels:
        n, p = med(times[(k, "native")]), med(times[(k, "passthrough_ll")])
        g = goals[k]
        line = f"{k:12s} {n:9.3f} {p:8.3f} {p / n:6.2f}x"
        for c in caps:
            m = med(times[(k, c)])
            line += f" | {m:18.3f} {m / p:5.2f}x {m / n:5.2f}x {'met' if m / p <= g else 'NOT':>3s}<{g:.2f}"
        line += "   " + " ".join(f"{med(drains.get((k, c), [])):.2f}" for c in caps)
        print(line)
    for k in labels:
        print(f"  runs {k:11s} " + "; ".join(f"{s} " + each(times[(k, s)], "{:.2f}") for s in names))
    for k in labels if cpu else ():
        print(f"  cpu s {k:10s} " + "; ".join(f"{s} {med(cpu[(k, s)]):.2f}" for s in names[1:]
                                              if (k, s) in cpu))
    if ("small files", "native") in times:
        print(f"  small files: {files} x 4 KiB -> files/s " + ", ".join(
            f"{s} {files / med(times[('small files', s)]):.0f}" for s in names))
    if ("sequential", "native") in times:
        mb = seq / 1e6
        print(f"  sequential: {seq // MiB} MiB in 1 MiB writes + fsync -> MB/s " + ", ".join(
            f"{s} {mb / med(times[('sequential', s)]):.0f}" for s in names))
        for c in caps:
            r = med(times[("sequential", "native")]) / med(times[("sequential", c)])
            print(f"  sequential {c}: {r:.2f}x native's speed (goal >= 0.6: {'met' if r >= 0.6 else 'NOT met'})")


def report_block(res: dict) -> None:
    bw = res["bw"]
    goals = {k: g for k, g in (("fio 4k", 0.25), ("fio 64k", 0.6)) if any(w == k for w, _ in bw)}
    sides = sorted({s for _, s in bw}, key=lambda s: (s != "plain", s != "captured", s))
    print(f"\n{'workload':9s} " + " ".join(f"{s + ' MB/s':>14s}" for s in sides) + "   ratio to plain (goal)")
    for k, g in goals.items():
        m = {s: med(bw[(k, s)]) / 1e6 for s in sides}
        ratios = ", ".join(f"{s} {m[s] / m['plain']:.2f}x ({'met' if m[s] / m['plain'] >= g else 'NOT met'})"
                           for s in sides if s != "plain")
        print(f"{k:9s} " + " ".join(f"{m[s]:14.1f}" for s in sides) + f"   {ratios}  goal >= {g}x")
        print("          runs: " + "; ".join(f"{s} " + each([x / 1e6 for x in bw[(k, s)]], "{:.0f}")
                                           for s in sides))
    for s, v in res["drains"].items():
        print(f"  {s}: journal drain after fio median {med(v):.2f} s")


def report_lag(name: str, rate: float, lags: list[float], seconds: float) -> None:
    p50, p99 = bc.quantile(lags, 50), bc.quantile(lags, 99)
    print(f"  {name}: {rate / 1e6:.0f} MB/s for {seconds:.0f} s -> lag p50 {p50:.3f} s, p99 {p99:.3f} s "
          f"({len(lags)} samples; goal p99 < 1 s: {'met' if p99 < 1 else 'NOT met'})")


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / MiB:.0f} MiB"


# -- main ------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--only", default="apps,micro,block,lag,memory",
                   help="comma-separated sections: apps (= git,sqlite,tar), micro (= small,seq), block, lag, "
                   "memory; or single workloads: git, sqlite, tar (x and rm -rf), small, seq")
    p.add_argument("--files", type=int, default=5000, help="small files per run")
    p.add_argument("--seq-size", type=parse_size, default=256 * MiB)
    p.add_argument("--block-size", type=parse_size, default=512 * MiB, help="each loop disk")
    p.add_argument("--fio-seconds", type=int, default=10)
    p.add_argument("--block-sizes", default="4k,64k", type=lambda v: [b for b in v.split(",") if b],
                   help="block: fio block sizes, in this order within each run (the page cache of a "
                   "loop disk keeps the folio sizes the writes before left: 64k alone starts fresh)")
    p.add_argument("--lag-seconds", type=int, default=15)
    p.add_argument("--entries", type=int, default=0, help="memory: also capture this many entries at once")
    p.add_argument("--no-target", action="store_true", help="mirrorfs and the captured loop without a "
                   "target (the applier's cost left out)")
    p.add_argument("--block-proto", help="bench/cblock/cblock.c: build it and add its captured loop(s)")
    p.add_argument("--proto-args", action="append", help="arguments of one prototype side (repeatable)")
    p.add_argument("--fs-proto", help="bench/cblock/cfs.c: build the compiled mirrorfs prototype and add it "
                   "as an fs side, \"cfs\"")
    p.add_argument("--fs", choices=("ext4", "tmpfs", "host"), default="ext4",
                   help="file system under the fs sides: a fresh ext4 on a loop (default), a private "
                   "tmpfs, or --dir's own")
    p.add_argument("--requests", action="store_true",
                   help="count FUSE requests per small file, tar x and rm -rf entry (perf)")
    p.add_argument("--baseline", metavar="DIR", action="append", default=[],
                   help="also run mirrorfs and the captured loop from this checkout (`git archive REV app | "
                   "tar x -C DIR`), interleaved: before and after in one run (repeatable; sides are named "
                   "@ + DIR's last component)")
    p.add_argument("--worker-env", action="append", default=[], metavar="K=V",
                   help="environment for the daemon and its workers (experiments)")
    args = p.parse_args()
    which = [w.strip() for w in args.only.split(",") if w.strip()]
    which += (["git", "sqlite", "tar"] if "apps" in which else []) + (["small", "seq"] if "micro" in which else [])
    unknown = set(which) - {"apps", "micro", "block", "lag", "memory", "git", "sqlite", "tar", "small", "seq"}
    if unknown:
        p.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        p.error("run as root (FUSE mounts, loop devices)")
    if args.runs < 1 or args.seq_size < MiB or args.block_size < 16 * MiB:
        p.error("--runs >= 1, --seq-size >= 1M and --block-size >= 16M")
    if not args.block_sizes or set(args.block_sizes) - {"4k", "64k"}:
        p.error("--block-sizes: 4k and/or 64k, comma-separated")
    if args.block_proto and not os.path.isfile(args.block_proto):
        p.error(f"--block-proto {args.block_proto}: no such source file")
    args.proto_args = [a.split() for a in (args.proto_args or [""])] if args.block_proto else []

    before = bc.loop_indexes()
    used: set[str] = set()
    registry = {"daemons": [], "pll": None, "raw": [], "plain": [], "proto": [], "bench_fs": None}
    work = Path(tempfile.mkdtemp(prefix="mirrorsetup-apps-", dir=args.dir))
    try:
        return body(args, which, work, used, registry)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup is not to be interrupted
        cleanup(work, registry, used, before)


def bench_fs(kind: str, work: Path, used: set[str], registry: dict) -> Path:
    """Where the fs sides live: a fresh ext4 on a loop (the shared root file system's inode
    allocator is slowed by other users' churn: ext4 recently_deleted() took most of a native
    `tar x`), a private tmpfs (FUSE's cost alone), or the host's --dir itself."""
    if kind == "host":
        return work
    mnt = work / "fs"
    mnt.mkdir()
    if kind == "tmpfs":
        run(["mount", "-t", "tmpfs", "-o", "size=50%,mode=0755", "benchfs", mnt])
    else:
        img = work / "fs.img"
        with open(img, "wb") as f:
            f.truncate(16 << 30)
        run(["mkfs.ext4", "-q", "-F", img])
        dev = loopdev.attach(str(img), direct_io=True).device
        used.add(dev)
        registry["raw"].append(dev)
        run(["mount", "-t", "ext4", dev, mnt])
    registry["bench_fs"] = mnt
    return mnt


def body(args, which: list[str], work: Path, used: set[str], registry: dict) -> int:
    fs_wanted = bool({"git", "sqlite", "tar", "small", "seq", "lag", "memory"} & set(which)) or args.requests
    block_wanted = bool({"block", "lag", "memory"} & set(which))
    print(f"work dir {work} ({os.uname().release}, {os.cpu_count()} CPUs)", flush=True)
    root = bench_fs(args.fs, work, used, registry) if fs_wanted else work
    print(f"fs sides on {args.fs} ({root})", flush=True)
    # one daemon per checkout: "" is this one, "@base" the --baseline one
    checkouts = {"": REPO, **{f"@{Path(b).name}": Path(b).resolve() for b in args.baseline}}
    for c, repo in checkouts.items():
        # `git archive` leaves out the compiled module (built by the install step, untracked):
        # without it a side polls and answers block writes in Python, and loses for that alone;
        # a side without bytecode compiles every module at each worker's start
        if not list((repo / "app" / "engine").glob("_fuseread*.so")):
            print(f"warning: {repo} has no compiled app/engine/_fuseread*.so: copy it in (or build "
                  "it) for a fair comparison", flush=True)
        if not (repo / "app" / "engine" / "__pycache__").is_dir():
            print(f"warning: {repo} has no bytecode: run `python -m compileall -q {repo / 'app'}` "
                  "(PYTHONDONTWRITEBYTECODE may be set)", flush=True)
    devs: dict[str, str] = {}
    protos = {proto_name(a): a for a in args.proto_args}
    if block_wanted:
        print(f"making the loop disks ({args.block_size // MiB} MiB of zeros each) ...", flush=True)
        for name in ["plain", *(f"captured{c}" for c in checkouts), *protos]:
            f = work / f"raw-{name}.img"
            zero_file(f, args.block_size)
            if name != "plain" and not args.no_target:  # allocated, as after an initial copy
                zero_file(work / f"target-{name}.img", args.block_size)
            dev = loopdev.attach(str(f)).device
            used.add(dev)
            registry["raw"].append(dev)
            devs[name] = dev
        plain = loopdev.attach(devs["plain"]).device
        used.add(plain)
        registry["plain"].append(plain)
    env = dict(kv.split("=", 1) for kv in args.worker_env)
    captures: dict[str, tuple[Daemon, Path]] = {}
    daemons: dict[str, Daemon] = {}
    for c, repo in checkouts.items():
        src = root / f"src{c}"
        fs_rows, block_rows = [], []
        if fs_wanted:
            src.mkdir()
            fs_rows.append({"path": str(src), **({} if args.no_target else {"target": str(root / f"tgt{c}")})})
        if block_wanted:
            block_rows.append({"device": devs[f"captured{c}"], **({} if args.no_target else
                                                                {"target": str(work / f"target-captured{c}.img")})})
        daemon = daemons[c] = Daemon(work / f"daemon{c}", fs_rows, block_rows, env, repo)
        registry["daemons"].append(daemon)
        daemon.wait_ready()
        if fs_wanted:
            captures[f"mirrorfs{c}"] = (daemon, src)
        print(f"daemon{c} pid {daemon.proc.pid} ({repo})", flush=True)
    pll = None
    if fs_wanted:
        (root / "pll-lower").mkdir()
        pll = registry["pll"] = PassthroughLL(work / "build", root / "pll-lower", root / "pll")
        print(f"passthrough_ll pid {pll.proc.pid}", flush=True)

    rows = {}
    bdevs = {}
    if block_wanted:
        bdevs["plain"] = plain
        for c, daemon in daemons.items():
            dev = devs[f"captured{c}"]
            brow = daemon.block_row(dev)
            used.add(brow["loop"])
            bdevs[f"captured{c}"] = brow["loop"]
            rows[f"captured{c}"] = (lambda d, v: lambda: d.block_row(v))(daemon, dev)
        if protos:
            binary = build_proto(args.block_proto, work / "build")
        for n, (name, extra) in enumerate(protos.items()):
            proto = Proto(binary, extra, devs[name], work / f"target-{name}.img", work / f"proto-state{n}",
                          work / f"proto-mnt{n}", used)
            registry["proto"].append(proto)
            bdevs[name] = proto.loop
            rows[name] = proto.row

    fs_protos = {}
    if args.fs_proto and fs_wanted:
        binary = build_proto(args.fs_proto, work / "build")
        fs_protos["cfs"] = FsProto(binary, root / "src-cfs", root / "tgt-cfs", work / "cfs-state")
        registry["proto"].append(fs_protos["cfs"])
        print(f"cfs pid {fs_protos['cfs'].proc.pid}", flush=True)
    sides = FsSides(root, root / "pll", captures, fs_protos, pll.proc.pid if pll else 0)
    results = {}
    if args.requests:
        tarball = work / "stdlib.tar"
        entries, _ = make_tarball(tarball)
        print("\nFUSE requests by opcode (perf, fuse:fuse_request_send/_end), mean microseconds from "
              f"send to reply: per small file (500 4 KiB files), per tar x and rm -rf entry ({entries}):")
        for side in sides.names[1:]:
            d = sides.fresh(side, "requests")
            (d / "x").mkdir()
            for label, argv, count in (
                    ("small file", [sys.executable, "-c", REQUEST_SCRIPT, d, 500], 500),
                    ("tar x", [sys.executable, "-c", EXEC_SCRIPT, "tar", "xf", tarball, "-C", d / "x"], entries),
                    ("rm -rf", [sys.executable, "-c", EXEC_SCRIPT, "rm", "-rf", d / "x"], entries)):
                sides.settle(side, label)
                per = fuse_requests(argv, count, work)
                total = sum(n for n, _ in per.values())
                print(f"  {side:15s} {label:10s} {total:.2f} requests: "
                      + ", ".join(f"{k} {n:.2f} ({us:.0f} us)" for k, (n, us) in per.items()), flush=True)
            sides.settle(side, "cleanup")
    if {"git", "sqlite", "tar", "small", "seq"} & set(which):
        tar_info = ""
        tarball = work / "stdlib.tar"
        if "tar" in which:
            n, size = make_tarball(tarball)
            tar_info = f"; tar x: {n} entries, {size / 1e6:.0f} MB"
        print(f"\nfs workloads, {args.runs} interleaved runs{tar_info} ...", flush=True)
        results["fs"] = fs_section(sides, args, root, tarball, which)
        report_fs(results["fs"], sides.drains, sides.names, args.files, args.seq_size, sides.cpu)
    if "block" in which:
        print(f"\nfio random write direct qd16, {args.fio_seconds} s each, {args.runs} interleaved runs ...",
              flush=True)
        results["block"] = block_section(args, bdevs, rows)
        report_block(results["block"])
    if "lag" in which:
        print("\nreplication lag at half the capture's maximum write rate:")
        for side in [*captures, *fs_protos]:
            seq = results.get("fs", {}).get(("sequential", side))
            if seq:
                fs_max = args.seq_size / med(seq)
            else:  # the median of --runs: one write alone is noisy (0.64-1.19 s for 256 MiB, 5 runs)
                took = []
                for i in range(args.runs):
                    d = sides.fresh(side, f"lagmax{i}")
                    took.append(w_seq(d, args.seq_size))
                    shutil.rmtree(d)
                    sides.settle(side, "cleanup")
                fs_max = args.seq_size / med(took)
            rate = fs_max / 2
            d = sides.fresh(side, "lag")
            with LagSampler(sides.row(side)) as s:
                w_seq(d, int(rate * args.lag_seconds) // MiB * MiB, rate)
            report_lag(f"{side} sequential 1 MiB writes (max {fs_max / 1e6:.0f} MB/s)", rate, s.lags,
                       args.lag_seconds)
            shutil.rmtree(d)
            sides.settle(side, "cleanup")
        for side in [s for s in bdevs if s != "plain"]:
            bw = results.get("block", {}).get("bw", {}).get(("fio 64k", side))
            top = med(bw) if bw else fio(bdevs[side], "64k", args.block_size, args.fio_seconds)
            drain_row(rows[side])
            with LagSampler(rows[side]) as s:
                fio(bdevs[side], "64k", args.block_size, args.lag_seconds, rate=int(top / 2))
            report_lag(f"{side} loop, fio 64 KiB random write qd16 (max {top / 1e6:.0f} MB/s)", top / 2,
                       s.lags, args.lag_seconds)
            drain_row(rows[side])
    if "block" in which and not args.no_target:
        for side in [s for s in bdevs if s != "plain"]:
            drain_row(rows[side])
            a = sha256_of(devs[side], args.block_size)
            b = sha256_of(str(work / f"target-{side}.img"), args.block_size)
            print(f"  {side}: sha256 raw {a[:16]} target {b[:16]} -> {'match' if a == b else 'MISMATCH'}")
    if "memory" in which:
        print("\nresident memory (VmRSS now / peak VmHWM / PSS):")
        procs = []
        for c, daemon in daemons.items():
            st = daemon.status()
            procs.append((f"daemon{c}", daemon.proc.pid))
            procs += [(f"fs worker{c}", e["worker_pid"]) for e in st["filesystem"] if e["worker_pid"]]
            procs += [(f"block worker{c}", b["worker_pid"]) for b in st["block"] if b["worker_pid"]]
        procs += [(f"prototype {p.name}", p.proc.pid) for p in registry["proto"]]
        for name, pid in procs:
            m = memory_of(pid)
            print(f"  {name[:24]:24s} pid {pid:7d}: {gib(m.get('VmRSS', 0)):>9s} / {gib(m.get('VmHWM', 0)):>9s}"
                  f" / {gib(m.get('Pss', 0)):>9s}")
        if args.entries:
            print(f"  capturing {args.entries} entries at once (half fs, half block) ...", flush=True)
            r = memory100(args, work / "many", used, registry)
            print(f"  {r['entries']} entries: {r['processes']} processes (daemon, workers and "
                  f"{r['templates']} worker template), RSS {gib(r['rss'])}, private {gib(r['uss'])}, "
                  f"PSS {gib(r['pss'])} (goal < 1 GiB: {'met' if r['pss'] < 1 << 30 else 'NOT met'}); "
                  f"start {r['start_seconds']:.1f} s")
    return 0


def sha256_of(path: str, size: int) -> str:
    return bc.sha256_of(path, size)


def cleanup(work: Path, registry: dict, used: set[str], before: set[int]) -> None:
    def warn(what: str, exc: BaseException) -> None:
        print(f"cleanup: {what}: {exc}", file=sys.stderr)

    for proc in list(CHILDREN):
        reap(proc)
    for server in registry["proto"] + [registry["pll"]]:
        if server is not None:
            try:
                server.stop()
            except Exception as exc:
                warn(f"stop {server}", exc)
    for d in registry["daemons"]:
        try:
            d.stop()
        except Exception as exc:
            warn("stop daemon", exc)
    if registry["bench_fs"] is not None:
        try:
            mounts.umount(str(registry["bench_fs"]))
        except Exception as exc:
            warn(f"unmount {registry['bench_fs']}", exc)
    prefix = str(work) + "/"
    try:  # a captured loop a dead daemon left on its FUSE file, then every mount of ours
        for s in loopdev.list_attached():
            if s.backing_file and s.backing_file.startswith(prefix) and s.device not in registry["raw"]:
                with contextlib.suppress(Exception):
                    bc.detach_wait(s.device)
        for m in reversed(mounts.read_mountinfo()):
            if m.mount_point.startswith(prefix):
                mounts.umount(m.mount_point, mounts.MNT_DETACH)
    except Exception as exc:
        warn("leftover loop/mount", exc)
    for dev in registry["plain"] + registry["raw"]:
        try:
            bc.detach_wait(dev)
        except Exception as exc:
            warn(f"detach {dev}", exc)
    new = {loopdev.parse_loop_path(d) for d in used} - before
    if new:
        with contextlib.suppress(OSError):
            fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                for index in sorted(new):
                    with contextlib.suppress(OSError):
                        fcntl.ioctl(fd, LOOP_CTL_REMOVE, index)
            finally:
                os.close(fd)
    shutil.rmtree(work, ignore_errors=True)
    if work.exists():
        warn("remove", RuntimeError(f"{work} is still there"))


if __name__ == "__main__":
    sys.exit(main())
