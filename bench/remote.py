"""Replication to a remote SSH target, measured by hand (a benchmark, not a test).

Run as root from the repository's top directory (about 5-10 minutes with the defaults):

    .venv/bin/python bench/remote.py [--runs 3] [--seconds 20] [--skip-mirror] [--skip-stream]
                                     [--skip-lag] [--skip-compress] [--resync-delay-ms MS]
                                     [--block-mib MIB] [--compression zstd|none] [--trace]
                                     [--ssh-kex ALGORITHMS]

The bed is tests/netbed.py's TwoHosts (a target network namespace with its own sshd, joined by
a veth pair); the remote target `backup1` is added exactly as tests/test_remote.py's Remote does
(`target add --agent ... --ssh-config ... --accept-host-key FP`, the generated key installed
with its forced command `mirrorsetup serve-target --root R`), and every daemon runs with a
private config, socket and state directory through tests/test_engine_support.py's engine_maker.
Figures come from the daemon's status rows (the fields of `status --json`), /proc and the veth's
counters.

1. Initial mirror of a real tree (the running interpreter's standard library without
   __pycache__, site-packages, dist-packages, config-* and lib-dynload: ~45 MB, ~2,000 files):
   time from `fs add SRC --target backup1:data` through the daemon's start and mount until the
   row says captured, established, consistent, no catch-up, applied_seq == last_seq; then the
   target tree is compared with the source (type, mode, owner, mtime, sha256 of every file).
   Against `rsync -a` of the same tree over the same link with the bed's ssh_config into a
   fresh directory on the target. Interleaved rsync, ours, rsync, ours, ... (--runs pairs, each
   pair on a fresh copy); medians and the ratio ours / rsync (goal <= 1.0). Ours ends with the
   replica durable (the agent's syncfs), rsync with its files in the target's page cache: rsync
   then `sync -f` of the target's file system is timed too (not part of rsync's figure), for
   the ratio of like to like beside the goal's.
   LEFT MOUNTED: each tool's file system is unmounted and its loop detached as soon as its run
   is measured. Left mounted (as before stop 31), every pair added two more, and from the
   second or third pair on our mirrors took 1.1-1.3 s instead of 0.83-0.95 s (bimodal
   figures, 5 pairs: 0.85, 1.17, 1.17, 1.18, 1.11 s; rsync's unchanged at 0.45-0.54 s): the
   agent's journal writes and fdatasyncs, which rsync does not make, took 0.27-0.32 s of
   the mirror instead of 0.12 s. A `sync` before each run did not change that.
   Each tool writes to a fresh ext4 of its own (--target-fs fresh-ext4, the default: a sparse
   image on a loop device, the bed's target_disk) rather than to the host's root file system
   (--target-fs host): that one is mounted `discard` here, and the deletes of one run slowed
   the creates of the next, so rsync's own time went 0.91 -> 2.41 -> 2.98 s over three pairs.
   WHERE IT GOES (stop 42, 3 pairs each, warm): the session is up at 0.42-0.44 s (fs add
   0.07, mount-all 0.09, ssh and the agent 0.27), the copy proper then takes 0.48-0.54 s;
   rsync's whole run is 0.58-0.66 s, its own ssh included. Two changes to the copy proper were
   measured and not kept: the agent's journal without its fdatasync (0.49 s vs 0.54: within
   the noise) and `--compression none` (0.48 s, ratio 1.69 vs 1.76: the same). Whatever the copy
   gains, the set-up before it (0.43 s) alone is 0.7 of rsync's whole run.
   READ AHEAD (helper-37): the agent read the session only between batches, and the
   pipes and sshd hold a few hundred KiB, so a batch bigger than that (one not worth
   compressing: 4 MiB) crossed ssh while the agent handled the one before, each end waiting
   in turn. Now a thread reads up to 8 MiB ahead. Interleaved --trace pairs, connected ->
   settled: this tree (one such batch) medians 0.98 vs 1.06 s over 12 pairs (within the
   loaded host's noise); a tree of 80 random files (43 MiB, --tree) cold 0.52-0.81 vs
   0.98-1.04 s, whole mirror 1.33-1.66 vs 2.13-2.33 s; with the daemon running 1.26-1.49 vs
   1.24-1.69 s (3 pairs each).
   SSH KEY EXCHANGE (helper-37, OpenSSH 9.2 here): ssh's default kex, the post-quantum
   hybrid sntrup761x25519-sha512, is most of every session's set-up on this host: `ssh true`
   over the bed took 296 ms and 147 ms of the ssh client's CPU (medians of 12), with
   `KexAlgorithms curve25519-sha256` 152 ms and 18 ms; the greeting of an agent 352-385 ms
   after spawning ssh, of which its interpreter and imports are ~100. rsync's ssh pays the
   same. --ssh-kex sets it for both tools (ssh CPU of our mirror 3.0 -> 1.0-1.3 ms/MiB; the
   ratio moved within the noise of the loaded host, 1.70-1.94 either way). Which kex the
   target uses is the administrator's choice (their ssh_config; `target add --ssh-config`):
   mirrorsetup does not give up the post-quantum one by itself.
2. Sustained replication through tbf (--link-mbit, default 100 Mbit/s, on the source end of the
   veth, as bench/netbed.py sets it): first the plain-ssh reference (`ssh cat >/dev/null`
   through the same tbf); then a writer of incompressible files (os.urandom, 4 MiB, fsync) as
   fast as it can for --seconds, held back only while more than --max-queue MiB are queued (the
   shipper always has work; the journal does not grow to gigabytes). Payload wire rate (status
   wire_bytes) and veth tx bytes over the steady part, against the link rate (goal >= 90 %).
   Then a steady writer at --lag-fraction of the link (1 MiB files, fsync) for --seconds; for
   each file the lag is the time from its fsync until a status row shows applied_seq >= the
   last_seq read right after that fsync (an upper bound: status is polled every 10 ms and
   the reply's arrival time counts), and status's own lag_seconds is sampled too. p50 / p99
   (goal p99 < 1 s).
3. CPU per replicated MiB: utime+stime (+ reaped children's) from /proc of the source daemon,
   its capture workers and their ssh client, against the processes of the target namespace
   (sshd and the agent `mirrorsetup serve-target`; the agent alone shown too), over the
   initial mirrors (with rsync's for comparison) and over the saturating stream (from its
   first write until drained), divided by the MiB replicated (tree size; logical bytes).
   The source side includes capture (the FUSE file system the writer writes through).
4. Compressible data (--compress-mib of the tree's .py files, 4 MiB files, fsync): the
   compression ratio the status shows (logical_bytes / wire_bytes) for those writes.
5. Whole-tree passes over a long link (--resync-delay-ms, one way, through the bed's relay;
   0 skips it): a complete replica, nothing changed; then, interleaved --runs times, `fs mirror`
   (every file compared by hashes), the catch-up after capture was off (unmount, mount-all: sizes
   and times), and `rsync -a` of the same tree into its complete copy over the same relay; then,
   --runs times, a switch-over, one new file on the promoted replica, and the timed fail-back
   (`failback --yes`: every directory compared over the relay, and what differs sent back).
6. Whole-device passes (--block-mib, 0 skips it): a block entry of that many MiB of random data,
   replicated; then, --runs times, `block verify` and `block mirror` with nothing differing.

Everything made here (namespace, sshd, daemons, mounts, files) lives under one tempfile
directory and is torn down by PID in finally blocks. The host may be shared (another session's
tests): the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from app.services.control import ControlClient  # noqa: E402
from app.services.mounts import read_mountinfo  # noqa: E402
from netbed import TwoHosts  # noqa: E402
from test_engine_support import engine_maker  # noqa: E402
import test_remote  # noqa: E402
from test_remote import Remote, cli, tree  # noqa: E402

MiB = 1 << 20
DISK = 512 * MiB  # each tool's fresh target file system (sparse): the tree, and our journal
CLK = os.sysconf("SC_CLK_TCK")
T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {text}", flush=True)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- the tree --------------------------------------------------------------------------------

SKIP = ("__pycache__", "site-packages", "dist-packages", "lib-dynload")


def _ignore(_dir: str, names: list[str]) -> list[str]:
    return [n for n in names if n in SKIP or n.startswith("config-")]


def copy_tree(origin: Path, dest: Path) -> tuple[int, int]:
    """Copy with modes, times and symlinks; (files, bytes)."""
    shutil.copytree(origin, dest, symlinks=True, ignore=_ignore)
    files = size = 0
    for dirpath, _dirs, names in os.walk(dest):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            files += 1
            size += st.st_size
    return files, size


# -- CPU from /proc --------------------------------------------------------------------------

def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime+cutime+cstime in ticks): own time plus that of reaped children."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()
    return int(rest[1]), sum(int(x) for x in rest[11:15])


def _argv(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes()
                .split(b"\0") if a]
    except OSError:
        return []


def _table() -> dict[int, tuple[int, int]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (s := _stat(int(entry))) is not None:
            out[int(entry)] = s
    return out


def _descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    found = set(r for r in roots if r in table)
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in table.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def source_cpu(daemon_pid: int) -> dict[str, float]:
    """Seconds of CPU of the daemon, its workers and their ssh clients (ssh alone too)."""
    table = _table()
    pids = _descendants({daemon_pid}, table)
    ssh = [p for p in pids if os.path.basename((_argv(p) or [""])[0]) == "ssh"]
    workers = [p for p in pids if "app.engine.capture" in _argv(p)]
    return {"total": sum(table[p][1] for p in pids) / CLK,
            "ssh": sum(table[p][1] for p in ssh) / CLK,
            "worker": sum(table[p][1] for p in workers) / CLK}


def target_cpu(bed: TwoHosts) -> dict[str, float]:
    """Seconds of CPU of every process in the target namespace (sshd, sessions, agents, a
    remote rsync); the agents' trees alone too."""
    table = _table()
    procs = bed.target_processes()
    pids = {p for p, _ in procs if p in table}
    agents = _descendants({p for p, argv in procs if "serve-target" in argv}, table) & pids
    return {"total": sum(table[p][1] for p in pids) / CLK,
            "agent": sum(table[p][1] for p in agents) / CLK}


def machine_busy() -> tuple[float, float]:
    """(busy, iowait) seconds of all CPUs so far, from /proc/stat (kernel threads included:
    the loop devices' workers, ext4's journal, softirqs of the veth)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK, iowait / CLK


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# -- status ----------------------------------------------------------------------------------

def row(client: ControlClient, key: str) -> dict | None:
    for e in client.request("status")["filesystem"]:
        if e["key"] == key:
            return e
    return None


def settled(st: dict | None) -> bool:
    return bool(st and st["captured"] and st["applied_seq"] == st["last_seq"]
                and st["catch_up"] is None and not st["behind"]
                and st["replication"] == "established" and st["target_data"] == "consistent")


PROFILE: Path | None = None  # --profile: py-spy on the daemon (and its children) per warm mirror
TRACE = False  # --trace: wait_settled prints each polled row of an initial mirror


def wait_settled(client: ControlClient, key: str, timeout: float,
                 firsts: dict | None = None) -> dict:
    """Poll until `settled`; `firsts` gets the time each stage was first seen (captured,
    connected)."""
    deadline = time.monotonic() + timeout
    st = None
    t0, trace = time.monotonic(), TRACE and firsts is not None
    if trace:
        print("    trace: seconds, last_seq, sent_seq, received_seq, applied_seq, catch-up stage, "
              "connection", flush=True)
    while True:
        with contextlib.suppress(OSError):
            st = row(client, key)
        if trace and st:
            print(f"    {time.monotonic() - t0:6.3f} {st['last_seq']:7d} {st['sent_seq']:7d} "
                  f"{st['received_seq']:7d} {st['applied_seq']:7d} "
                  f"{(st['catch_up'] or {}).get('stage', '-')!s:>22} {st['connection']}", flush=True)
        if firsts is not None and st:
            walked = "connected" in firsts and st["catch_up"] is None
            for name, seen in (("captured", st["captured"]),
                               ("connected", st["connection"] == "connected"),
                               ("walked", walked),
                               ("sent", walked and st["sent_seq"] >= st["last_seq"]),
                               ("received", walked and st["received_seq"] >= st["last_seq"])):
                if seen:
                    firsts.setdefault(name, time.monotonic())
        if settled(st):
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"{key} not settled after {timeout:.0f} s: {st}")
        time.sleep(0.01 if trace else 0.05)


class Poller(threading.Thread):
    """Status of one entry every `period` seconds: (asked at, answered at, row)."""

    def __init__(self, socket: str, key: str, period: float = 0.01):
        super().__init__(name="poller", daemon=True)
        self.client = ControlClient(socket, timeout=30)
        self.key = key
        self.period = period
        self.samples: list[tuple[float, float, dict]] = []
        self.latest: dict = {}
        self.errors = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            t0 = time.monotonic()
            try:
                st = row(self.client, self.key)
            except Exception:
                self.errors += 1
                st = None
            t1 = time.monotonic()
            if st is not None:
                self.samples.append((t0, t1, st))
                self.latest = st
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


# -- setting up a remote entry ---------------------------------------------------------------

COMPRESSION = None  # --compression: the target's, when given


def add_remote(run_dir: Path, bed: TwoHosts, root: Path | None = None) -> Remote:
    """backup1 in run_dir's own config; its key authorized beside the bed's own (rsync's)."""
    r = Remote(run_dir, bed, root, **({"compression": COMPRESSION} if COMPRESSION else {}))
    bed.set_authorized_keys([bed.authorized_key_line(), r.authorized_line])
    return r


def fsync_write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- 1. initial mirror -----------------------------------------------------------------------

def rsync_once(bed: TwoHosts, src: Path, dest: Path) -> dict:
    ssh = " ".join(bed.ssh_argv()[:-1])  # the bed's ssh_config and options, without the host
    argv = ["rsync", "-a", "-e", ssh, f"{src}/", f"{bed.target_addr}:{dest}/"]
    c0, t0c, m0 = children_cpu(), target_cpu(bed), machine_busy()
    t0 = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, text=True)
    took = time.monotonic() - t0
    m1 = machine_busy()
    # rsync ends with its files in the target's page cache; ours ends when the agent has made
    # them durable (syncfs): the same made durable by hand, timed apart, for the like ratio
    subprocess.run(["sync", "-f", str(dest)], check=True)
    durable = time.monotonic() - t0
    time.sleep(0.3)  # the remote rsync and its session reaped: their time is in sshd's
    t1c = target_cpu(bed)
    equal = tree(src) == tree(dest)
    return {"seconds": took, "durable": durable, "src_cpu": children_cpu() - c0,
            "busy": (m1[0] - m0[0]) / took, "iowait": (m1[1] - m0[1]) / took,
            "tgt_cpu": t1c["total"] - t0c["total"], "agent_cpu": 0.0, "equal": equal}


def _py_spy(pid: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid",
                             str(pid), "--subprocesses", "--rate", "250", "--format", "raw",
                             "--nonblocking", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_profile(pid: int, name: str, bed: TwoHosts) -> list:
    """py-spy sampling the daemon and its children (capture workers) into PROFILE/NAME-PID.txt
    (collapsed stacks: one line per stack, its count last), and the agent the mirror starts on
    the target (found as it appears) into PROFILE/NAME-agent-PID.txt."""
    spies = [_py_spy(pid, PROFILE / f"{name}-{pid}.txt")]
    before = {p for p, argv in bed.target_processes() if "serve-target" in argv}
    done = threading.Event()

    def agent() -> None:
        while not done.wait(0.01):
            new = [p for p, argv in bed.target_processes() if "serve-target" in argv
                   and p not in before]
            if new:
                spies.append(_py_spy(new[0], PROFILE / f"{name}-agent-{new[0]}.txt"))
                return
    threading.Thread(target=agent, daemon=True).start()
    spies.insert(0, done)
    time.sleep(1.0)  # attached before the first request
    return spies


def stop_profile(spies: list) -> None:
    spies[0].set()
    time.sleep(0.05)
    for spy in spies[1:]:
        spy.send_signal(2)
        try:
            spy.wait(timeout=20)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def ours_once(bed: TwoHosts, run_dir: Path, src: Path, timeout: float,
              root: Path | None = None, warm: bool = False) -> dict:
    """`fs add` then the daemon's start (cold), or with the daemon already running (warm):
    `fs add` then `fs mount-all`, as an administrator of a running service does."""
    r = add_remote(run_dir, bed, root)
    with engine_maker(run_dir) as make:
        if warm:
            eng, _, _ = make(config=r.cfg)
        s0 = source_cpu(eng.proc.pid)["total"] if warm else 0.0  # its start is not counted
        t0c = target_cpu(bed)
        spy = start_profile(eng.proc.pid, run_dir.name, bed) if warm and PROFILE else None
        m0 = machine_busy()
        t0 = time.monotonic()
        a = cli(r.cfg, "fs", "add", str(src), "--target", "backup1:data")
        if a.returncode != 0:
            raise RuntimeError(f"fs add: {a.stdout}{a.stderr}")
        t_add = time.monotonic()
        if warm:
            m = cli(r.cfg, "fs", "mount-all", socket=eng.socket)
            if m.returncode != 0:
                raise RuntimeError(f"fs mount-all: {m.stdout}{m.stderr}")
        else:
            eng, _, _ = make(config=r.cfg)
        t_up = time.monotonic()
        firsts: dict = {}
        st = wait_settled(eng.client, str(src), timeout, firsts)
        took = time.monotonic() - t0
        m1 = machine_busy()
        if spy is not None:
            stop_profile(spy)
        s_cpu, t1c = source_cpu(eng.proc.pid), target_cpu(bed)
        equal = tree(src) == tree(r.root / "data")
        out = {"seconds": took, "fs_add": t_add - t0, "daemon_up": t_up - t_add,
               "busy": (m1[0] - m0[0]) / took, "iowait": (m1[1] - m0[1]) / took,
               "captured": firsts.get("captured", t_up) - t0,
               "connected": firsts.get("connected", t_up) - t0,
               **{k: firsts.get(k, t_up) - t0 for k in ("walked", "sent", "received")},
               "src_cpu": s_cpu["total"] - s0, "ssh_cpu": s_cpu["ssh"],
               "worker_cpu": s_cpu["worker"],  # (its own time: its ssh is a child of its own)
               "tgt_cpu": t1c["total"] - t0c["total"], "agent_cpu": t1c["agent"] - t0c["agent"],
               "equal": equal, "resync_bytes": st["resync_bytes"], "wire_bytes": st["wire_bytes"],
               "logical_bytes": st["logical_bytes"], "reconnects": st["reconnects"]}
        if not equal:
            diff = tree(src), tree(r.root / "data")
            keys = sorted(k for k in set(diff[0]) | set(diff[1]) if diff[0].get(k) != diff[1].get(k))
            out["differences"] = keys[:10]
            out["n_differences"] = len(keys)
    return out


def bench_resync(bed: TwoHosts, tmp: Path, origin: Path, args) -> dict:
    """Section 5: seconds per pass (medians) and the round-trip time the relay gives."""
    delay = args.resync_delay_ms / 1000
    relay = bed.relay(delay, delay)
    run = tmp / "resync"
    run.mkdir()
    src = run / "src"
    files, size = copy_tree(origin, src)
    dest = run / "rsync-dest"
    ssh = " ".join(bed.ssh_argv(via=relay)[:-1])
    rsync = ["rsync", "-a", "-e", ssh, f"{src}/", f"{relay.host}:{dest}/"]
    subprocess.run(rsync, check=True, capture_output=True)  # the complete copy
    r = Remote(run, bed, via=relay)
    bed.set_authorized_keys([bed.authorized_key_line(), r.authorized_line])
    times: dict[str, list[float]] = {"fs mirror": [], "catch-up": [], "rsync -a": []}
    with engine_maker(run) as make:
        eng, _, _ = make(config=r.cfg)
        a = cli(r.cfg, "fs", "add", str(src), "--target", "backup1:data", socket=eng.socket)
        if a.returncode != 0:
            raise RuntimeError(f"fs add: {a.stdout}{a.stderr}")
        eng.client.results("mount_all")
        st = wait_settled(eng.client, str(src), args.timeout)
        say(f"resync: {files} files, {size / MiB:.1f} MiB replicated through a relay of "
            f"{args.resync_delay_ms} ms each way (status rtt {(st.get('rtt') or 0) * 1000:.1f} ms)")
        for i in range(args.runs):
            t0 = time.monotonic()
            eng.client.results("mirror", path=str(src))
            wait_settled(eng.client, str(src), args.timeout)
            times["fs mirror"].append(time.monotonic() - t0)
            eng.client.results("unmount", path=str(src), force=False)
            t0 = time.monotonic()
            eng.client.results("mount_all")
            firsts: dict = {}
            wait_settled(eng.client, str(src), args.timeout, firsts)
            times["catch-up"].append(time.monotonic() - t0)
            say("resync: catch-up " + ", ".join(f"{k} at {v - t0:.2f}" for k, v in firsts.items()))
            t0 = time.monotonic()
            subprocess.run(rsync, check=True, capture_output=True)
            times["rsync -a"].append(time.monotonic() - t0)
            say(f"resync {i + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1]:.2f} s"
                                                           for k, v in times.items()))
        equal = tree(src) == tree(r.root / "data")
        # a switch-over, one file changed on the promoted replica, the fail-back: timed (the
        # fail-back compares every directory and the files that differ by size or time)
        times["fail-back"] = []
        for i in range(args.runs):
            p = cli(r.cfg, "switchover", str(src), socket=eng.socket)
            if p.returncode != 0:
                raise RuntimeError(f"switchover: {p.stdout}{p.stderr}")
            fsync_write(r.root / "data" / "changed-on-the-replica", b"%d" % i)
            t0 = time.monotonic()
            p = cli(r.cfg, "failback", str(src), "--yes", socket=eng.socket)
            times["fail-back"].append(time.monotonic() - t0)
            if p.returncode != 0:
                raise RuntimeError(f"failback: {p.stdout}{p.stderr}")
            wait_settled(eng.client, str(src), args.timeout)
            say(f"resync: fail-back {i + 1}/{args.runs}: {times['fail-back'][-1]:.2f} s")
        equal = equal and tree(src) == tree(r.root / "data")
    return {"delay_ms": args.resync_delay_ms, "files": files, "equal": equal,
            **{k: statistics.median(v) for k, v in times.items()}}


def bench_block(bed: TwoHosts, tmp: Path, args) -> dict:
    """Section 6: `block verify` and `block mirror` of a device of --block-mib MiB of random
    data whose replica is complete (nothing differs: every block hashed on both sides)."""
    run = tmp / "block"
    run.mkdir()
    img = run / "disk.img"
    with open(img, "wb") as f:
        for _ in range(args.block_mib):
            f.write(os.urandom(MiB))
    disk = subprocess.run(["losetup", "--find", "--show", str(img)], check=True,
                          capture_output=True, text=True).stdout.strip()
    times: dict[str, list[float]] = {"block verify": [], "block mirror": []}
    try:
        r = Remote(run, bed)
        bed.set_authorized_keys([bed.authorized_key_line(), r.authorized_line])
        with engine_maker(run) as make:
            a = cli(r.cfg, "block", "add", disk, "--target", "backup1:disk.img")
            if a.returncode != 0:
                raise RuntimeError(f"block add: {a.stdout}{a.stderr}")
            eng, _, _ = make(config=r.cfg)
            eng.block_drain(disk)
            for i in range(args.runs):
                t0 = time.monotonic()
                v = eng.client.request("block_verify", device=disk)
                times["block verify"].append(time.monotonic() - t0)
                t0 = time.monotonic()
                m = eng.client.request("block_mirror", device=disk)
                times["block mirror"].append(time.monotonic() - t0)
                if v["ranges"] or m["differing"]:
                    raise RuntimeError(f"the replica differs: {v}, {m}")
                say(f"block {i + 1}/{args.runs}: " + ", ".join(f"{k} {t[-1]:.2f} s"
                                                             for k, t in times.items()))
    finally:  # the captured loop on the disk (the daemon is gone by now), then the disk
        for line in subprocess.run(["losetup", "-j", disk], capture_output=True,
                                   text=True).stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)
        subprocess.run(["losetup", "-d", disk], check=False)
    return {"mib": args.block_mib, **{k: statistics.median(v) for k, v in times.items()}}


def release(disk) -> None:
    """Unmount a tool's target file system and detach its loop once its run is measured (the
    agent of a stopped daemon may hold it a moment longer): see LEFT MOUNTED above."""
    if disk is None:
        return
    deadline = time.monotonic() + 15
    while True:
        try:
            disk.close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def bench_mirror(bed: TwoHosts, tmp: Path, origin: Path, args) -> dict:
    rs, ours, warms = [], [], []
    files = size = 0
    for i in range(args.runs):
        pair = tmp / f"pair{i}"
        pair.mkdir()
        src = pair / "src"
        files, size = copy_tree(origin, src)
        if i == 0:
            say(f"tree {origin}: {files} files, {size / MiB:.1f} MiB")
        fresh = args.target_fs == "fresh-ext4"
        disk = bed.target_disk(DISK) if fresh else None
        dest = (disk.path if fresh else pair) / "rsync-dest"
        r = rsync_once(bed, src, dest)
        rs.append(r)
        release(disk)
        say(f"mirror {i + 1}/{args.runs} rsync -a: {r['seconds']:.2f} s (durable after sync -f: "
            f"{r['durable']:.2f} s), equal={r['equal']}, "
            f"cpu source {r['src_cpu']:.2f} s target {r['tgt_cpu']:.2f} s, "
            f"machine busy {r['busy']:.2f} of {os.cpu_count()} CPUs (iowait {r['iowait']:.2f})")
        if not fresh:
            shutil.rmtree(dest)
        disk = bed.target_disk(DISK) if fresh else None
        o = ours_once(bed, pair, src, args.timeout, disk.path if fresh else None)
        ours.append(o)
        release(disk)
        say(f"mirror {i + 1}/{args.runs} mirrorsetup: {o['seconds']:.2f} s (fs add "
            f"{o['fs_add']:.2f}, daemon up {o['daemon_up']:.2f}, captured at {o['captured']:.2f},"
            f" connected at {o['connected']:.2f}, walked {o['walked']:.2f}, sent {o['sent']:.2f},"
            f" received {o['received']:.2f}), equal={o['equal']}, "
            f"cpu source {o['src_cpu']:.2f} s (ssh {o['ssh_cpu']:.2f}) target "
            f"{o['tgt_cpu']:.2f} s (agent {o['agent_cpu']:.2f}), resync_bytes "
            f"{o['resync_bytes']}, wire_bytes {o['wire_bytes']}, logical_bytes "
            f"{o['logical_bytes']}, machine busy {o['busy']:.2f} of {os.cpu_count()} CPUs "
            f"(iowait {o['iowait']:.2f})" + (f", DIFFERENCES {o['n_differences']}: "
                                       f"{o['differences']}" if not o["equal"] else ""))
        if args.warm:
            src2 = pair / "src-warm"
            (pair / "warm").mkdir()
            copy_tree(origin, src2)
            disk = bed.target_disk(DISK) if fresh else None
            w = ours_once(bed, pair / "warm", src2, args.timeout, disk.path if fresh else None,
                          warm=True)
            warms.append(w)
            release(disk)
            say(f"mirror {i + 1}/{args.runs} mirrorsetup, daemon running: {w['seconds']:.2f} s "
                f"(fs add {w['fs_add']:.2f}, mount-all {w['daemon_up']:.2f}, captured at "
                f"{w['captured']:.2f}, connected at {w['connected']:.2f}), equal={w['equal']}, "
                f"cpu source {w['src_cpu']:.2f} s target {w['tgt_cpu']:.2f} s (capture worker "
                f"{w['worker_cpu']:.2f}, ssh {w['ssh_cpu']:.2f}, agent {w['agent_cpu']:.2f}), machine busy "
                f"{w['busy']:.2f} of {os.cpu_count()} CPUs (iowait {w['iowait']:.2f})")
        shutil.rmtree(pair)  # the entry is gone with its daemon; nothing is mounted there now
    med_r = statistics.median(x["seconds"] for x in rs)
    med_o = statistics.median(x["seconds"] for x in ours)
    mib = size / MiB
    return {
        "files": files, "mib": mib, "rsync": med_r, "ours": med_o, "ratio": med_o / med_r,
        "rsync_durable": statistics.median(x["durable"] for x in rs),
        "pair_ratios": [o["seconds"] / r["seconds"] for r, o in zip(rs, ours)],
        "all_equal": all(x["equal"] for x in rs + ours),
        "rsync_src_ms": statistics.median(x["src_cpu"] for x in rs) * 1000 / mib,
        "rsync_tgt_ms": statistics.median(x["tgt_cpu"] for x in rs) * 1000 / mib,
        "ours_src_ms": statistics.median(x["src_cpu"] for x in ours) * 1000 / mib,
        "ours_ssh_ms": statistics.median(x["ssh_cpu"] for x in ours) * 1000 / mib,
        "ours_tgt_ms": statistics.median(x["tgt_cpu"] for x in ours) * 1000 / mib,
        "ours_agent_ms": statistics.median(x["agent_cpu"] for x in ours) * 1000 / mib,
        "runs_rsync": [x["seconds"] for x in rs], "runs_ours": [x["seconds"] for x in ours],
        "compression": statistics.median(x["logical_bytes"] / max(1, x["wire_bytes"])
                                         for x in ours),
        # the mirror proper: from the session's start (connected) until settled
        "ours_from_connected": statistics.median(x["seconds"] - x["connected"] for x in ours),
        "warm": statistics.median(x["seconds"] for x in warms) if warms else None,
        "runs_warm": [x["seconds"] for x in warms],
        # CPU of the mirrors with the daemon running: the daemon's own start not in it
        **({f"warm_{k}_ms": statistics.median(x[k] for x in warms) * 1000 / mib
            for k in ("src_cpu", "worker_cpu", "ssh_cpu", "tgt_cpu", "agent_cpu")}
           if warms else {}),
        "all_equal_warm": all(x["equal"] for x in warms),
    }


# -- 2-4. streams through the link -----------------------------------------------------------

def ssh_reference(bed: TwoHosts, mib: int = 48) -> float:
    """Payload bit rate of plain `ssh TARGET cat >/dev/null` (Mbit/s)."""
    payload = os.urandom(mib * MiB)
    t0 = time.monotonic()
    subprocess.run(bed.ssh_argv("cat", ">/dev/null"), input=payload, check=True,
                   capture_output=True)
    return mib * MiB * 8 / (time.monotonic() - t0) / 1e6


def tx_bytes(bed: TwoHosts) -> int:
    return int(Path(f"/sys/class/net/{bed.source_if}/statistics/tx_bytes").read_text())


def saturate(bed, eng, poller: Poller, src: Path, args) -> dict:
    """Incompressible 4 MiB files as fast as the writer can (held while the queue is over
    --max-queue MiB) for --seconds; rates over the part after --warmup; CPU until drained."""
    d = src / "sat"
    d.mkdir()
    link = args.link_mbit * 1e6 / 8
    s0, c0 = source_cpu(eng.proc.pid), target_cpu(bed)
    l_start = poller.latest["logical_bytes"]
    t_start = time.monotonic()
    mark = None
    held = written = i = 0
    write_secs = 0.0
    while (now := time.monotonic()) - t_start < args.seconds:
        if mark is None and now - t_start >= args.warmup:
            st = poller.latest
            mark = (now, st["wire_bytes"], st["logical_bytes"], tx_bytes(bed))
        if poller.latest.get("bytes_queued", 0) > args.max_queue * MiB:
            held += 1
            time.sleep(0.02)
            continue
        data = os.urandom(4 * MiB)
        w0 = time.monotonic()
        fsync_write(d / f"f{i:05d}", data)
        write_secs += time.monotonic() - w0
        written += len(data)
        i += 1
    t_end = time.monotonic()
    st = poller.latest
    tx_end = tx_bytes(bed)
    span = t_end - mark[0]
    wire_rate = (st["wire_bytes"] - mark[1]) / span
    logical_rate = (st["logical_bytes"] - mark[2]) / span
    tx_rate = (tx_end - mark[3]) / span
    status_rates = [s["wire_rate"] for a, _, s in poller.samples if mark[0] + 5 <= a <= t_end]
    queued = st["bytes_queued"]
    say(f"saturate: wrote {written / MiB:.0f} MiB in {i} files (write+fsync {write_secs:.1f} s of "
        f"{t_end - t_start:.1f} s; {written / MiB / max(write_secs, 1e-9):.0f} MiB/s while "
        f"writing), queue at end {queued / MiB:.0f} MiB; draining")
    drained = wait_settled(eng.client, str(src), args.timeout)
    t_drained = time.monotonic()
    s1, c1 = source_cpu(eng.proc.pid), target_cpu(bed)
    mib = (drained["logical_bytes"] - l_start) / MiB
    out = {
        "written_mib": written / MiB, "wire_mbit": wire_rate * 8 / 1e6,
        "wire_pct": wire_rate / link * 100, "logical_pct": logical_rate / link * 100,
        "tx_mbit": tx_rate * 8 / 1e6, "tx_pct": tx_rate / link * 100,
        "status_wire_rate_median_mbit": (statistics.median(status_rates) * 8 / 1e6
                                         if status_rates else float("nan")),
        "drain_s": t_drained - t_end, "replicated_mib": mib,
        "src_ms": (s1["total"] - s0["total"]) * 1000 / mib,
        "ssh_ms": (s1["ssh"] - s0["ssh"]) * 1000 / mib,
        "tgt_ms": (c1["total"] - c0["total"]) * 1000 / mib,
        "agent_ms": (c1["agent"] - c0["agent"]) * 1000 / mib,
        "held_polls": held, "seconds_measured": span,
        "connection": drained["connection"], "reconnects": drained["reconnects"],
        "resent_bytes": drained["resent_bytes"],
    }
    say(f"saturate: payload wire {out['wire_mbit']:.1f} Mbit/s ({out['wire_pct']:.1f} % of "
        f"{args.link_mbit} Mbit/s; status wire_rate median {out['status_wire_rate_median_mbit']:.1f}),"
        f" veth tx {out['tx_mbit']:.1f} Mbit/s ({out['tx_pct']:.1f} %), drained in "
        f"{out['drain_s']:.1f} s; cpu ms/MiB source {out['src_ms']:.1f} (ssh {out['ssh_ms']:.1f})"
        f" target {out['tgt_ms']:.1f} (agent {out['agent_ms']:.1f}) over {mib:.0f} MiB")
    return out


def steady(bed, eng, poller: Poller, src: Path, args) -> dict:
    """Files of --lag-file-kib at --lag-fraction of the link for --seconds; per file, fsync to
    applied."""
    d = src / "steady"
    d.mkdir()
    size = args.lag_file_kib * 1024
    interval = size / (args.lag_fraction * args.link_mbit * 1e6 / 8)
    writes: list[tuple[float, int]] = []
    t_start = time.monotonic()
    i = 0
    while time.monotonic() - t_start < args.seconds:
        due = t_start + i * interval
        if (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
        data = os.urandom(size)
        fd = os.open(d / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
            t_f = time.monotonic()
            seq = row(eng.client, str(src))["last_seq"]
        finally:
            os.close(fd)
        writes.append((t_f, seq))
        i += 1
    t_end = time.monotonic()
    wait_settled(eng.client, str(src), args.timeout)
    time.sleep(0.1)
    samples = list(poller.samples)
    lags, received = [], []
    for t_f, seq in writes:
        seen = next((t1 for t0, t1, st in samples if t0 >= t_f and st["applied_seq"] >= seq), None)
        lags.append(float("inf") if seen is None else seen - t_f)
        seen = next((t1 for t0, t1, st in samples if t0 >= t_f and st["received_seq"] >= seq), None)
        received.append(float("inf") if seen is None else seen - t_f)
    status_lags = [st["lag_seconds"] for t0, _, st in samples if t_start <= t0 <= t_end]
    rtts = [t1 - t0 for t0, t1, _ in samples if t_start <= t0 <= t_end]
    out = {"files": len(writes), "rate_mbit": len(writes) * size * 8 / (t_end - t_start) / 1e6,
           "p50": pct(lags, 50), "p99": pct(lags, 99), "max": max(lags),
           "recv_p50": pct(received, 50), "recv_p99": pct(received, 99),
           "status_p50": pct(status_lags, 50), "status_p99": pct(status_lags, 99),
           "status_max": max(status_lags), "poll_rtt_ms": statistics.median(rtts) * 1000,
           "polls": len(rtts)}
    say(f"steady {out['rate_mbit']:.1f} Mbit/s, {out['files']} files of {args.lag_file_kib} KiB: "
        f"fsync->applied p50 {out['p50'] * 1000:.0f} ms p99 {out['p99'] * 1000:.0f} ms max "
        f"{out['max'] * 1000:.0f} ms; fsync->received p50 {out['recv_p50'] * 1000:.0f} ms p99 "
        f"{out['recv_p99'] * 1000:.0f} ms; status lag_seconds p50 {out['status_p50']:.3f} p99 "
        f"{out['status_p99']:.3f} max {out['status_max']:.3f} ({out['polls']} polls, median "
        f"status round trip {out['poll_rtt_ms']:.1f} ms)")
    return out


def compressible(eng, src: Path, origin: Path, args) -> dict:
    text = bytearray()
    while len(text) < args.compress_mib * MiB:
        for p in sorted(origin.rglob("*.py")):
            if "__pycache__" in p.parts or "site-packages" in p.parts:
                continue
            text += p.read_bytes()
            if len(text) >= args.compress_mib * MiB:
                break
    before = wait_settled(eng.client, str(src), args.timeout)
    d = src / "text"
    d.mkdir()
    for i in range(args.compress_mib // 4):
        fsync_write(d / f"t{i:03d}", bytes(text[i * 4 * MiB:(i + 1) * 4 * MiB]))
    st = wait_settled(eng.client, str(src), args.timeout)
    logical = st["logical_bytes"] - before["logical_bytes"]
    wire = st["wire_bytes"] - before["wire_bytes"]
    out = {"mib": logical / MiB, "ratio": logical / max(wire, 1),
           "session_ratio": st["logical_bytes"] / max(st["wire_bytes"], 1)}
    say(f"compressible: {logical / MiB:.1f} MiB logical -> {wire / MiB:.2f} MiB wire, ratio "
        f"{out['ratio']:.2f} (whole session as status shows it: {out['session_ratio']:.2f})")
    return out


def bench_streams(bed: TwoHosts, tmp: Path, origin: Path, args) -> dict:
    results: dict = {}
    run_dir = tmp / "stream"
    run_dir.mkdir()
    r = add_remote(run_dir, bed)
    with engine_maker(run_dir) as make:
        src = run_dir / "src"
        src.mkdir()
        a = cli(r.cfg, "fs", "add", str(src), "--target", "backup1:data")
        if a.returncode != 0:
            raise RuntimeError(f"fs add: {a.stdout}{a.stderr}")
        eng, _, _ = make(config=r.cfg)
        wait_settled(eng.client, str(src), args.timeout)
        poller = Poller(eng.socket, str(src))
        poller.start()
        try:
            while not poller.latest:
                time.sleep(0.01)
            if not (args.skip_stream and args.skip_lag):
                bed.rate_limit(rate=f"{args.link_mbit}mbit", burst=args.burst, latency="50ms")
                ref = ssh_reference(bed)
                results["ssh_ref_mbit"] = ref
                say(f"plain ssh through tbf {args.link_mbit} Mbit/s: {ref:.1f} Mbit/s payload")
                if not args.skip_stream:
                    results["stream"] = saturate(bed, eng, poller, src, args)
                if not args.skip_lag:
                    results["lag"] = steady(bed, eng, poller, src, args)
                bed.unlimit()
            if not args.skip_compress:
                results["compress"] = compressible(eng, src, origin, args)
            j = cli(r.cfg, "status", "--json", socket=eng.socket)
            results["status_cli_rc"] = j.returncode
            results["status_cli"] = j.stdout
        finally:
            poller.stop()
        if poller.errors:
            say(f"status poller: {poller.errors} failed requests")
        tgt_equal = tree(src) == tree(r.root / "data")
        results["stream_equal"] = tgt_equal
        say(f"stream entry: target tree equal to the source: {tgt_equal}")
    return results


# -- main ------------------------------------------------------------------------------------

def table(m: dict | None, s: dict, args) -> str:
    lines = ["", "| figure | value | goal |", "|---|---|---|"]
    if m:
        lines += [
            f"| initial mirror, {m['files']} files / {m['mib']:.1f} MiB, target on {args.target_fs}: rsync -a median | "
            f"{m['rsync']:.2f} s (runs {', '.join(f'{x:.2f}' for x in m['runs_rsync'])}) | |",
            f"| initial mirror: mirrorsetup median (fs add -> settled) | {m['ours']:.2f} s (runs "
            f"{', '.join(f'{x:.2f}' for x in m['runs_ours'])}) | |",
            f"| ratio mirrorsetup / rsync (medians; per pair "
            f"{', '.join(f'{x:.2f}' for x in m['pair_ratios'])}) | {m['ratio']:.2f} | <= 1.0 |",
            f"| trees equal after every run | {m['all_equal']} | True |",
            f"| rsync -a then `sync -f` of the target (durable, as ours ends), median | "
            f"{m['rsync_durable']:.2f} s; ratio mirrorsetup / that {m['ours'] / m['rsync_durable']:.2f}"
            + (f", daemon running {m['warm'] / m['rsync_durable']:.2f}" if m.get("warm") else "")
            + " | |",
            f"| of which the mirror proper (session up -> settled), median | "
            f"{m['ours_from_connected']:.2f} s | |",
            f"| CPU ms/MiB initial mirror, source (daemon+workers+ssh; ssh alone) | "
            f"{m['ours_src_ms']:.1f} ({m['ours_ssh_ms']:.1f}) | |",
            f"| CPU ms/MiB initial mirror, target (sshd+agent; agent alone) | "
            f"{m['ours_tgt_ms']:.1f} ({m['ours_agent_ms']:.1f}) | |",
            f"| CPU ms/MiB rsync, source / target | {m['rsync_src_ms']:.1f} / "
            f"{m['rsync_tgt_ms']:.1f} | |",
            f"| compression ratio of the initial mirror (status logical_bytes / wire_bytes) | "
            f"{m['compression']:.2f} | |",
        ]
    if m and m.get("warm") is not None:
        lines += [
            f"| initial mirror with the daemon already running (fs add, fs mount-all -> settled), "
            f"median | {m['warm']:.2f} s (runs {', '.join(f'{x:.2f}' for x in m['runs_warm'])}); "
            f"ratio to rsync {m['warm'] / m['rsync']:.2f}; equal {m['all_equal_warm']} | |",
            f"| CPU ms/MiB with the daemon running, source (capture worker; ssh) / target (agent) | "
            f"{m['warm_src_cpu_ms']:.1f} ({m['warm_worker_cpu_ms']:.1f}; {m['warm_ssh_cpu_ms']:.1f}) / "
            f"{m['warm_tgt_cpu_ms']:.1f} ({m['warm_agent_cpu_ms']:.1f}) | |"]
    if "ssh_ref_mbit" in s:
        lines.append(f"| plain ssh through tbf {args.link_mbit} Mbit/s | "
                     f"{s['ssh_ref_mbit']:.1f} Mbit/s ({s['ssh_ref_mbit'] / args.link_mbit:.1%}) | |")
    if "stream" in s:
        x = s["stream"]
        lines += [
            f"| saturating writer: payload wire rate (status wire_bytes) | {x['wire_mbit']:.1f} "
            f"Mbit/s = {x['wire_pct']:.1f} % of link | >= 90 % |",
            f"| saturating writer: veth tx (ssh+TCP+IP) | {x['tx_mbit']:.1f} Mbit/s = "
            f"{x['tx_pct']:.1f} % | |",
            f"| CPU ms/MiB stream, source (daemon+workers+ssh; ssh alone) | {x['src_ms']:.1f} "
            f"({x['ssh_ms']:.1f}) | |",
            f"| CPU ms/MiB stream, target (sshd+agent; agent alone) | {x['tgt_ms']:.1f} "
            f"({x['agent_ms']:.1f}) | |",
        ]
    if "lag" in s:
        x = s["lag"]
        lines += [
            f"| steady writer {x['rate_mbit']:.1f} Mbit/s: fsync -> applied p50 / p99 (max) | "
            f"{x['p50'] * 1000:.0f} / {x['p99'] * 1000:.0f} ({x['max'] * 1000:.0f}) ms | p99 < 1 s |",
            f"| steady writer: fsync -> received (durable in the agent's journal) p50 / p99 | "
            f"{x['recv_p50'] * 1000:.0f} / {x['recv_p99'] * 1000:.0f} ms | |",
            f"| steady writer: status lag_seconds p50 / p99 (max) | {x['status_p50'] * 1000:.0f} / "
            f"{x['status_p99'] * 1000:.0f} ({x['status_max'] * 1000:.0f}) ms | |",
        ]
    if "compress" in s:
        x = s["compress"]
        lines.append(f"| compression ratio, {x['mib']:.0f} MiB of .py text (logical/wire) | "
                     f"{x['ratio']:.2f} | |")
    return "\n".join(lines)


def own_agent(tmp: Path) -> None:
    """The target's agent runs this tree's code, as the source side does: the venv's
    `mirrorsetup` (the tests' agent) imports the checkout the venv was installed from, so a
    bench of an older tree (git archive) measured that older source against the newest agent."""
    agent = tmp / "mirrorsetup-agent"
    agent.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m app \"$@\"\n")
    agent.chmod(0o755)
    test_remote.AGENT = str(agent)


def leftovers(tmp: Path) -> list[str]:
    return [m.mount_point for m in read_mountinfo() if m.mount_point.startswith(str(tmp) + "/")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="interleaved rsync/mirrorsetup pairs")
    ap.add_argument("--seconds", type=float, default=20, help="each writer phase")
    ap.add_argument("--warmup", type=float, default=4, help="start of the saturating phase "
                    "not counted in its rates")
    ap.add_argument("--tree", default=sysconfig.get_paths()["stdlib"], help="tree to mirror")
    ap.add_argument("--target-fs", choices=("fresh-ext4", "host"), default="fresh-ext4",
                    help="where each initial mirror writes on the target (see above)")
    ap.add_argument("--link-mbit", type=int, default=100)
    ap.add_argument("--burst", default="64kb", help="tbf burst (bench/netbed.py's)")
    ap.add_argument("--max-queue", type=int, default=256, help="MiB queued before the "
                    "saturating writer waits")
    ap.add_argument("--lag-fraction", type=float, default=0.5)
    ap.add_argument("--lag-file-kib", type=int, default=1024)
    ap.add_argument("--compress-mib", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=300, help="for any wait until settled")
    ap.add_argument("--warm", action="store_true", help="also time each initial mirror with the "
                    "daemon already running (fs add, then fs mount-all), interleaved")
    ap.add_argument("--resync-delay-ms", type=float, default=10, help="section 5's one-way "
                    "delay; 0 skips the section")
    ap.add_argument("--block-mib", type=int, default=256, help="section 6's device; 0 skips it")
    ap.add_argument("--trace", action="store_true", help="print the entry's positions every "
                    "10 ms of each initial mirror (where the time goes)")
    ap.add_argument("--profile", type=Path, help="directory for py-spy's collapsed stacks of "
                    "the source daemon during each warm initial mirror (implies --warm)")
    ap.add_argument("--compression", choices=("zstd", "none"), help="the target's (default: "
                    "`target add`'s own)")
    ap.add_argument("--ssh-kex", metavar="ALGORITHMS", help="KexAlgorithms for every ssh of the "
                    "run, rsync's and ours alike (in the bed's ssh_config; default: ssh's own)")
    for name in ("mirror", "stream", "lag", "compress"):
        ap.add_argument(f"--skip-{name}", action="store_true")
    args = ap.parse_args()
    global COMPRESSION, TRACE, PROFILE
    COMPRESSION, TRACE, PROFILE = args.compression, args.trace, args.profile
    if PROFILE:
        args.warm = True
        PROFILE.mkdir(parents=True, exist_ok=True)
    args.warmup = min(args.warmup, args.seconds / 2)
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces, FUSE mounts)")
    origin = Path(args.tree)
    say(f"load average {loadavg()} (the host may be shared with another session's tests); "
        f"{os.cpu_count()} CPUs")
    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    m, s, rs, bk = None, {}, None, None
    try:
        own_agent(tmp)
        with TwoHosts(tmp) as bed:
            say(f"bed {bed.netns}: {bed.source_addr} -> {bed.target_addr}:{bed.port}")
            if args.ssh_kex:  # (under the file's one `Host *`: rsync's ssh and ours read it)
                with open(bed.ssh_config, "a") as f:
                    f.write(f"  KexAlgorithms {args.ssh_kex}\n")
                say(f"ssh key exchange: {args.ssh_kex}")
            if not args.skip_mirror:
                m = bench_mirror(bed, tmp, origin, args)
            if not (args.skip_stream and args.skip_lag and args.skip_compress):
                s = bench_streams(bed, tmp, origin, args)
            if args.resync_delay_ms > 0:
                rs = bench_resync(bed, tmp, origin, args)
            if args.block_mib > 0:
                bk = bench_block(bed, tmp, args)
    finally:
        left = leftovers(tmp)
        if left:
            print(f"NOT removing {tmp}: still mounted {left}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"load average {loadavg()}")
    print(table(m, s, args), flush=True)
    if rs:
        print(f"\n| whole-tree pass, nothing changed, {rs['files']} files, relay {rs['delay_ms']:g} ms "
              f"each way | median | ratio to rsync -a |\n|---|---|---|")
        for k in ("fs mirror", "catch-up", "fail-back", "rsync -a"):
            print(f"| {k} | {rs[k]:.2f} s | {rs[k] / rs['rsync -a']:.2f} |")
        print(f"| trees equal | {rs['equal']} | |", flush=True)
    if bk:
        print(f"\n| {bk['mib']} MiB block device, replica complete | median |\n|---|---|")
        for k in ("block verify", "block mirror"):
            print(f"| {k} | {bk[k]:.2f} s |")
    if s.get("status_cli"):
        keys = ("last_seq", "sent_seq", "received_seq", "applied_seq", "lag_seconds",
                "bytes_queued", "wire_rate", "logical_rate", "wire_bytes", "logical_bytes",
                "connection", "replication", "target_data", "reconnects", "resent_bytes")
        for r in json.loads(s["status_cli"])["engine"]["filesystem"]:
            print(f"\nstatus --json (exit {s['status_cli_rc']}), the stream entry at the end:",
                  json.dumps({k: r.get(k) for k in keys}))


if __name__ == "__main__":
    main()
