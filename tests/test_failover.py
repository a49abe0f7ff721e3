"""Fail-over and fail-back between two hosts (tests/netbed.py: the target is a network namespace
with its own sshd, and with private_mounts its own mount namespace): planned switch-over,
fail-over after the source died, split brain refused on both sides, fail-back of only what
differs, the source winning a split brain."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.services import mounts
from app.services.protocol import CaptureRow
from app.services.status import replication_text
from test_engine_support import REPO
from test_remote import MiB, _advised, cli, dd, lines, sha, tree, wait_for
from test_remote import block_remote, fs_remote, remote, writer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.root
BLOCK = 1 << 20  # what the comparison works in (app/engine/sync.BLOCK)


def full_tree(root: Path) -> dict[str, str]:
    """tree() plus extended attributes and hard-link groups."""
    out = tree(root)
    inodes: dict[int, list[str]] = {}
    for rel in list(out):
        p = root / rel
        if not p.is_symlink():
            names = sorted(os.listxattr(p, follow_symlinks=False))
            out[rel] += " xattrs " + ",".join(f"{n}={os.getxattr(p, n, follow_symlinks=False).hex()}"
                                              for n in names)
            st = p.lstat()
            if p.is_file() and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, []).append(rel)
    out["(links)"] = repr(sorted(sorted(g) for g in inodes.values()))
    return out


def on_target(bed, *argv: str, check: bool = False) -> subprocess.CompletedProcess:
    """The CLI on the target host (its network and, with private_mounts, mount namespace)."""
    return bed.run_on_target([sys.executable, "-m", "app", *argv], check=check,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, cwd="/")


def replicas(r) -> list[dict]:
    p = on_target(r.bed, "replica", "list", "--root", str(r.root), "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)


def cli_cut_mid_way(r, eng, argv: list[str], what: str, ready, cut, *, every: float,
                    timeout: float) -> tuple[subprocess.Popen, str, str]:
    """The CLI's `argv` run against the daemon; once `ready()` (waited for as `what`) `cut()`
    cuts the link, and the command is let end: (the ended process, its stdout, its stderr).
    The link comes back at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "app", "--config", str(r.cfg), *argv],
                            cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "MIRRORSETUP_SOCKET": eng.socket})
    try:
        wait_for(what, lambda: proc.poll() is not None or ready(), 60, every)
        assert proc.poll() is None, proc.communicate()
        cut()
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        r.bed.link_up()
    return proc, out, err


def fail_back_cut_mid_way(r, eng, disk: str, expected, differing: int):
    """`failback DISK --yes` through a 16 Mbit/s link, cut once part of the replica came back:
    (the ended process, its stdout, its stderr)."""
    def cut():
        # the source's resets never reach the target: its agent lingers until its heartbeats
        # time out (15 s), as when the link came back after the target's retransmissions
        r.bed._nft_rule(f"tcp dport {r.bed.port} tcp flags & rst == rst drop")
        r.bed.link_down()
    r.bed.rate_limit(rate="16mbit", burst="32kb", direction="down")  # 12 s for what differs
    try:
        return cli_cut_mid_way(
            r, eng, ["failback", disk, "--yes"], "part of the replica came back",
            lambda: blocks_differing(disk, expected, 64 * MiB) < differing - 2, cut,
            every=0.3, timeout=60)
    finally:
        r.bed.unlimit()


def fail_back_killed_mid_way(r, eng, key: str, what: str, ready, *, every: float):
    """`failback KEY --yes` through a 16 Mbit/s link, the daemon killed (-9) once `ready()`
    (waited for as `what`): (the ended process, its stdout, its stderr)."""
    r.bed.rate_limit(rate="16mbit", burst="32kb", direction="down")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "app", "--config", str(r.cfg), "failback",
                                 key, "--yes"], cwd=REPO, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                env={**os.environ, "MIRRORSETUP_SOCKET": eng.socket})
        try:
            wait_for(what, lambda: proc.poll() is not None or ready(), 60, every)
            assert proc.poll() is None, proc.communicate()
            eng.kill9()
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        r.bed.unlimit()
    return proc, out, err


def switched_over(fs_remote):
    """An entry replicating to backup1:data with one file, switched over: (engine, its path,
    the remote)."""
    eng, src, r = fs_remote()
    (Path(src) / "f").write_text("one")
    eng.drain(src)
    p = cli(r.cfg, "switchover", src, socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    return eng, src, r


def blocks_differing(a: str, b: str, size: int) -> int:
    n = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off in range(0, size, BLOCK):
            if hashlib.sha256(fa.read(BLOCK)).digest() != hashlib.sha256(fb.read(BLOCK)).digest():
                n += 1
    return n


def test_a_catch_up_leaves_the_replica_inconsistent_until_it_ends(fs_remote):
    """Changes made below while capture was not in place are caught up file by file: until
    that ends, the replica mixes older and newer files. Its agent went on calling it
    consistent (only a first copy or a gap said otherwise), so a fail-over on the target host
    would have promoted it without a word. The catch-up now says so when it begins, and a
    record of the capture's that finds no such name there meanwhile (its directory is made
    later by the catch-up) is not taken for an apply error."""
    eng, src, r = fs_remote(resync_bandwidth="2MiB/s")
    (Path(src) / "kept").write_bytes(b"there from the start")
    eng.drain(src)
    [rep] = replicas(r)
    assert rep["consistent"], rep
    (res,) = eng.client.results("unmount", path=src, force=False)
    assert res.outcome.value == "ok", res.message
    (Path(src) / "big").write_bytes(os.urandom(6 << 20))  # 3 s at the resync rate
    (Path(src) / "sub").mkdir()
    (Path(src) / "sub" / "below").write_bytes(b"made while nobody captured")
    (res,) = eng.client.results("mount_all")
    assert res.outcome.value == "ok", res.message
    wait_for("the replica said inconsistent", lambda: not replicas(r)[0]["consistent"], 30, 0.2)
    assert eng.status(src)["catch_up"] is not None  # said while the catch-up runs, not after
    (Path(src) / "sub" / "live").write_bytes(b"made while the catch-up runs")
    eng.drain(src)
    st = eng.status(src)
    assert st["target_data"] == "consistent" and st["apply_errors"] == 0, st
    [rep] = replicas(r)
    assert rep["consistent"] and rep["inconsistent_since"] is None, rep  # not both at once
    line = on_target(r.bed, "replica", "list", "--root", str(r.root)).stdout
    assert f"consistent, applied up to position {rep['applied_seq']} (consistent since " in line, line
    assert tree(Path(src)) == tree(r.root / "data")


def test_planned_switchover_of_a_directory_and_fail_back(fs_remote, writer):
    eng, src, r = fs_remote()
    s = Path(src)
    (s / "d").mkdir()
    (s / "d" / "f").write_bytes(os.urandom(200_000))
    os.setxattr(s / "d" / "f", "user.origin", b"source")
    os.link(s / "d" / "f", s / "hard")
    os.symlink("d/f", s / "link")
    os.chown(s / "d", 1234, 5678)
    log = writer(src)
    time.sleep(2)
    writer.stop()
    written = lines(log)

    p = cli(r.cfg, "switchover", src, "--json", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout)
    assert [x["outcome"] for x in res] == ["ok"], res
    assert res[0]["details"]["lost"] == 0 and "none lost" in res[0]["message"]
    # where the data is on the target (helper-25's walk: it said nothing of the other side)
    assert f"on {res[0]['details']['host']} its data is at {r.root / 'data'};" in res[0]["message"], res
    # the fail-back it names runs as printed (it said `mirrorsetup failback KEY`, without --yes)
    assert [c[1:] for c in _advised(res[0]["message"])] == [["failback", src, "--yes"]], res
    replica = r.root / "data"
    assert full_tree(s) == full_tree(replica)  # byte for byte: contents, modes, owners, times, links, xattrs
    assert len([n for n in os.listdir(replica) if n.startswith("w")]) == written
    assert not any("fuse.mirrorfs" in m for m in open("/proc/self/mountinfo") if f" {src} " in m), \
        "still captured"
    # what an application writes here now would be overwritten by the fail-back: refused
    assert "read-only here until the fail-back" in res[0]["message"], res
    with pytest.raises(OSError) as refused:
        (s / "written-after-the-switch-over").write_text("would be lost")
    assert refused.value.errno == errno.EROFS
    subprocess.run(["umount", src], check=True)  # as a reboot would: the read-only mount is gone
    eng.stop()
    down = subprocess.run([sys.executable, "-m", "app", "--config", str(r.cfg), "status", "--json"],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "MIRRORSETUP_SOCKET": eng.socket,
                               "MIRRORSETUP_STATE_DIR": eng.state})
    said = [w["message"] for w in json.loads(down.stdout)["warnings"] if w["subject"] == src]
    assert said and "switched over to backup1:data" in said[0] and "Mount all" not in said[0], said
    [row] = json.loads(down.stdout)["filesystem"]  # its STATE too (it said "not mounted")
    assert row["state"] == "switched over", row
    _replica_is_said_primary(r, eng, src, daemon=False)
    eng.start()  # ... and the daemon puts it back
    with pytest.raises(OSError) as refused:
        (s / "written-after-a-restart").write_text("would be lost")
    assert refused.value.errno == errno.EROFS

    st = eng.status(src)
    assert st["state"] == "switched over" and st["switched"]["seq"] == res[0]["details"]["seq"], st
    p = cli(r.cfg, "status", "--json", socket=eng.socket)
    assert json.loads(p.stdout)["filesystem"][0]["state"] == "switched over", p.stdout
    _replica_is_said_primary(r, eng, src, daemon=True)
    assert st["switched"]["fence"].get("read_only_mount"), st  # put back by the restart
    m = cli(r.cfg, "fs", "mount-all", socket=eng.socket)  # capturing here would fork the history
    assert m.returncode == 2 and "switched over to backup1:data" in m.stderr, m.stdout + m.stderr
    again = cli(r.cfg, "switchover", src, socket=eng.socket)
    assert again.returncode == 2 and "already switched over" in again.stderr
    [rep] = replicas(r)
    assert rep["role"] == "primary" and rep["promoted"]["by"] == "switch-over", rep
    assert rep["promoted"]["seq"] == res[0]["details"]["seq"]

    # made usable on the target (it is primary already: promote only binds it where asked)
    p = on_target(r.bed, "replica", "promote", "data", "--root", str(r.root))
    assert p.returncode == 2 and f"use it at {replica}" in p.stderr, p.stdout + p.stderr
    where = r.root.parent / "served"
    p = on_target(r.bed, "replica", "promote", "data", "--root", str(r.root), "--mount", str(where))
    try:
        assert p.returncode == 0 and f"bind-mounted {replica} on {where}" in p.stdout, p.stdout + p.stderr
        p = on_target(r.bed, "replica", "promote", "data", "--root", str(r.root), "--mount", str(where))
        assert p.returncode == 0 and f"bind-mounted on {where} already" in p.stdout, p.stdout + p.stderr
        table = r.bed.run_on_target(["cat", "/proc/self/mountinfo"]).stdout
        assert sum(line.split()[4] == str(where) for line in table.splitlines()) == 1, table  # not stacked
        # in use there: the fail-back is refused before this side is made writable
        p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
        assert p.returncode == 2 and f"is in use there: mounted at {where}" in p.stderr, p.stderr
        assert "nothing was changed (it stays read-only here)" in p.stderr, p.stderr
        assert eng.status(src)["state"] == "switched over"
    finally:
        r.bed.run_on_target(["umount", str(where)], check=False)

    # the promoted replica in use on the target: an application changes it
    (replica / "new-on-target").write_text("written after the switch-over")
    (replica / "d" / "f").write_bytes(b"changed on the target")
    os.unlink(replica / "w00001")
    os.setxattr(replica / "link", "trusted.t", b"1", follow_symlinks=False)

    p = cli(r.cfg, "failback", src, "--json", socket=eng.socket)  # no --yes, no terminal
    assert p.returncode == 2 and "--yes" in p.stderr and (s / "w00001").exists()
    p = cli(r.cfg, "failback", src, "--yes", "--json", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout)
    assert [x["action"] for x in res] == ["failback", "mount"], res
    assert "capture was not in place" not in res[1]["message"], res  # nothing was missed
    assert res[0]["details"]["copied"] >= 2 and res[0]["details"]["removed"] >= 1, res
    assert res[0]["details"]["sent_bytes"] < 1 * MiB, res  # what differed, not the tree
    # said as what came back (51 bytes of contents and an xattr value, with their metadata),
    # not as the records that carried it (3,054 "bytes came back" for this before)
    came = res[0]["details"]["data_bytes"]
    assert 51 <= came < 200 and res[0]["details"]["sent_bytes"] < 4096, res
    assert f"{came} bytes of data came back (" in res[0]["message"], res
    assert full_tree(s) == full_tree(replica)
    assert (s / "new-on-target").read_text() == "written after the switch-over"
    st = eng.drain(src)
    assert st["target_data"] == "consistent" and st["switched"] is None, st
    (s / "after").write_text("replicated again")
    eng.drain(src)
    assert (replica / "after").read_text() == "replicated again"
    assert replicas(r)[0]["role"] == "secondary"
    assert eng.verify(src) == []


def _replica_is_said_primary(r, eng, src: str, *, daemon: bool) -> None:
    """status's REPLICA of an entry switched over says its replica is primary there (it said
    "-", as for an entry with no replica at all), with the daemon's row or, without a daemon,
    from the entry's switch-over marker."""
    p = subprocess.run([sys.executable, "-m", "app", "--config", str(r.cfg), "status"],
                       capture_output=True, text=True, cwd=REPO,
                       env={**{k: v for k, v in os.environ.items() if k != "COLUMNS"},
                            "MIRRORSETUP_SOCKET": eng.socket, "MIRRORSETUP_STATE_DIR": eng.state})
    assert ("Daemon: not running" in p.stdout) is not daemon, p.stdout
    lines = p.stdout.splitlines()
    head = lines[1]  # File-system replication, then its header: the REPLICA cell where it says
    [line] = [ln for ln in lines if ln.startswith(f"{src} ")]
    start = head.index("REPLICA")
    assert line[start:].startswith("primary (switched over) "), p.stdout


def test_fail_back_or_resolve_of_an_entry_never_switched_over_changes_nothing(fs_remote):
    """Found by a walk: `failback` of an entry that was never switched over lifted its capture
    before the agent answered "not promoted", and left nothing mounted; it had also recorded the
    history it meant to hand over, so a second `failback` took the refusal for a fail-back
    finished already and moved this side to a history the replica never had: every connection
    was refused from then on. `replica resolve --discard-target` said it had discarded a
    promotion and re-sent the whole entry. Now all three change nothing and say why. And
    `failback`'s "nothing to fail back" was FAILED (exit 1) while resolve's same no-op was
    unchanged (exit 0): by the README's exit rule it is unchanged (found by a walk)."""
    eng, src, r = fs_remote()
    s = Path(src)
    (s / "f").write_text("one")
    eng.drain(src)
    [rep] = replicas(r)
    gen = rep["generation"]

    def captured() -> bool:
        return any("fuse.mirrorfs" in m for m in open("/proc/self/mountinfo") if f" {src} " in m)
    for _ in range(2):  # captured: the capture knows, the target is not asked
        p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
        # nothing to do is UNCHANGED, exit 0, on stdout (as resolve says it), not a failure
        assert p.returncode == 0 and "nothing to fail back" in p.stdout, p.stdout + p.stderr
        assert p.stdout.startswith("unchanged") and not p.stderr, p.stdout + p.stderr
        assert "nothing was changed" in p.stdout and captured(), p.stdout
    p = cli(r.cfg, "failback", src, socket=eng.socket)  # no --yes: nothing to confirm, said first
    assert p.returncode == 0 and "nothing to fail back" in p.stdout and "--yes" not in p.stdout, \
        p.stdout + p.stderr
    p = cli(r.cfg, "replica", "resolve", src, "--discard-target", socket=eng.socket)
    assert p.returncode == 0 and "nothing to fail back or keep" in p.stdout, p.stdout + p.stderr

    def capture_mount() -> list[str]:
        return [m.split()[0] for m in open("/proc/self/mountinfo") if f" {src} " in m and "fuse.mirrorfs" in m]
    before = capture_mount()
    r.bed.reject()  # not connected: the agent is asked first and the capture is never lifted
    r.bed.kill_on_target(r.bed.wait_target_process("serve-target"))
    wait_for("disconnected", lambda: eng.status(src)["connection"] != "connected", 60, 0.2)
    p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
    assert p.returncode == 1 and "fail-back of" in p.stderr, p.stdout + p.stderr
    assert "nothing was changed (its capture goes on" in p.stderr, p.stderr
    assert capture_mount() == before, "the capture was lifted"  # the same mount, never re-made
    wait_for("a retry backed off to 3 s or more",  # refused a few times
             lambda: re.search(r"retry in ([3-9]|\d\d+) s", eng.status(src)["connection"]), 90, 0.2)
    r.bed.unblock()  # reachable while the capture waits to retry: the agent answers "not promoted"
    p = cli(r.cfg, "failback", src, "--yes", "--json", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    [res] = json.loads(p.stdout)
    assert res["outcome"] == "unchanged" and "nothing to fail back" in res["message"], res
    assert capture_mount() == before, "the capture was lifted"
    wait_for("connected", lambda: eng.status(src)["connection"] == "connected", 60, 0.2)
    p = cli(r.cfg, "replica", "resolve", src, "--discard-target", "--yes", "--json", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    [res] = json.loads(p.stdout)
    assert res["outcome"] == "unchanged" and "nothing to resolve" in res["message"], res
    assert captured()

    (res,) = eng.client.results("unmount", path=src, force=False)
    assert res.outcome.value == "ok", res.message
    for _ in range(2):  # not captured: the agent answers
        p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
        assert p.returncode == 0 and "is not promoted" in p.stdout, p.stdout + p.stderr
        assert "nothing to fail back" in p.stdout and p.stdout.startswith("unchanged"), p.stdout
        assert not captured() and not list(Path(eng.state).rglob("failback")), "a fail-back left behind"
    p = cli(r.cfg, "replica", "resolve", src, "--discard-target", "--yes", "--json", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)[0]["outcome"] == "unchanged", p.stdout
    [rep] = replicas(r)
    assert rep["generation"] == gen and rep["role"] == "secondary" and rep["consistent"], rep

    if not captured():
        (res,) = eng.client.results("mount_all")
        assert res.outcome.value == "ok", res.message
    (s / "after").write_text("replicated as before")
    st = eng.drain(src)
    assert st["target_data"] == "consistent" and st["last_error"] is None, st
    assert (r.root / "data" / "after").read_text() == "replicated as before"
    assert replicas(r)[0]["generation"] == gen
    # a fail-back that could not reach the target keeps its record (it may have got there);
    # once the capture is connected again that record is stale: it lifts nothing (found by a walk)
    (res,) = eng.client.results("unmount", path=src, force=False)
    r.bed.reject()
    p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
    assert p.returncode == 1 and list(Path(eng.state).rglob("failback")), p.stdout + p.stderr
    r.bed.unblock()
    (res,) = eng.client.results("mount_all")
    assert res.outcome.value == "ok", res.message
    wait_for("connected", lambda: eng.status(src)["connection"] == "connected", 60, 0.2)
    before = capture_mount()
    p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
    assert p.returncode == 0 and "nothing to fail back" in p.stdout, p.stdout + p.stderr
    assert capture_mount() == before and "mounted mirrorfs" not in p.stdout, p.stdout
    assert not list(Path(eng.state).rglob("failback")), "a stale fail-back record is kept"
    nosuch = src + "-nosuch"  # not an entry: refused (exit 2) like everywhere else
    for argv in (["switchover", nosuch], ["failback", nosuch, "--yes"],
                 ["replica", "resolve", nosuch, "--discard-target", "--yes"]):
        p = cli(r.cfg, *argv, socket=eng.socket)
        assert p.returncode == 2 and "is not a configured" in p.stderr, (argv, p.stderr)


def test_a_switchover_to_a_target_it_cannot_reach_changes_nothing(fs_remote):
    """Found by a walk: with the target refusing (a changed host key) `switchover` lifted the
    capture, failed to promote and made the capture again; with the target silently gone (DROP)
    while records waited it waited the whole drain (300 s) without a word. Now both are
    refused as soon as the capture knows, naming the connection, and the capture stays."""
    eng, src, r = fs_remote()
    s = Path(src)
    (s / "f").write_text("one")
    eng.drain(src)

    def capture_mount() -> list[str]:
        return [m.split()[0] for m in open("/proc/self/mountinfo") if f" {src} " in m and "fuse.mirrorfs" in m]
    before = capture_mount()
    assert before
    r.bed.reject()  # status still says connected (an idle session): the target is asked first
    p = cli(r.cfg, "switchover", src, socket=eng.socket)
    assert p.returncode == 1 and "cannot reach the target" in p.stderr, p.stdout + p.stderr
    assert "nothing was changed" in p.stderr and capture_mount() == before, p.stderr
    assert "catching up" not in p.stderr, p.stderr  # the capture was never lifted and made again
    r.bed.kill_on_target(r.bed.wait_target_process("serve-target"))
    wait_for("disconnected", lambda: eng.status(src)["connection"] != "connected", 60, 0.2)
    p = cli(r.cfg, "switchover", src, socket=eng.socket)
    assert p.returncode == 1 and "cannot reach the target" in p.stderr, p.stdout + p.stderr
    assert "nothing was changed" in p.stderr and capture_mount() == before, p.stderr
    assert not list(Path(eng.state).rglob("switched")), "a switch-over marker left behind"
    r.bed.unblock()
    wait_for("connected", lambda: eng.status(src)["connection"] == "connected", 90, 0.2)
    r.bed.blackhole()  # silent: only the keep-alive tells
    (s / "g").write_bytes(os.urandom(100_000))  # something to drain
    p = cli(r.cfg, "switchover", src, socket=eng.socket)
    r.bed.unblock()
    assert p.returncode == 1 and "cannot reach the target" in p.stderr, p.stdout + p.stderr
    assert capture_mount() == before and not list(Path(eng.state).rglob("switched")), p.stderr
    st = eng.drain(src)  # replication goes on as before
    assert st["target_data"] == "consistent", st
    assert (r.root / "data" / "g").read_bytes() == (s / "g").read_bytes()
    assert replicas(r)[0]["role"] == "secondary"


def test_a_daemon_killed_during_a_switch_overs_drain_is_said_with_what_it_left(fs_remote):
    """The daemon killed (-9) while a switch-over waited for its drain (the link cut): the
    command said only "the daemon closed the connection without a reply". It says that the
    daemon ended during the switch-over and what the entry's markers tell: none written, so
    nothing was handed over; and what to run. Exit 1. The daemon started again takes the
    capture over and replication goes on."""
    import pty
    eng, src, r = fs_remote()
    s = Path(src)
    r.bed.link_down()  # the drain waits for the target
    try:
        (s / "g").write_bytes(os.urandom(200_000))
        master, slave = pty.openpty()  # a terminal: the command says its stages ("draining")
        proc = subprocess.Popen([sys.executable, "-m", "app", "--config", str(r.cfg), "switchover",
                                 src], cwd=REPO, stdout=subprocess.PIPE, stderr=slave, text=True,
                                env={**os.environ, "MIRRORSETUP_SOCKET": eng.socket})
        os.close(slave)
        said = []

        def read_all():
            with contextlib.suppress(OSError):  # EIO: the command has ended
                while chunk := os.read(master, 4096):
                    said.append(chunk.decode(errors="replace"))
        reader = threading.Thread(target=read_all)
        reader.start()
        try:
            wait_for("the drain", lambda: proc.poll() is not None or "draining" in "".join(said),
                     30, 0.1)
            assert proc.poll() is None, "".join(said)
            eng.kill9()
            out = proc.communicate(timeout=30)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(10)
            os.close(master)
    finally:
        r.bed.link_up()
    err = " ".join("".join(said).split())
    assert proc.returncode == 1, out + err
    assert "closed the connection without a reply" not in err, err
    assert f"the daemon ended during the switch-over of {src}: its switch-over marker is not " \
        "written, so nothing was handed over" in err, err
    assert "the daemon is not running now: start it with `mirrorsetup daemon start`, then run " \
        "`mirrorsetup status`" in err, err
    assert not list(Path(eng.state).rglob("switched")), "a switch-over marker"
    eng.start()  # as it says: its capture is taken over, nothing was handed over
    st = eng.drain(src)
    assert st["captured"] and st["target_data"] == "consistent" and not st.get("switched"), st
    assert (r.root / "data" / "g").read_bytes() == (s / "g").read_bytes()
    assert replicas(r)[0]["role"] == "secondary"


def test_a_daemon_killed_during_a_fail_back_is_said_with_what_its_markers_left(fs_remote):
    """The daemon killed (-9) while a fail-back brought the replica's data back (through a
    16 Mbit/s link): the command said only "the daemon closed the connection without a
    reply". It says that the daemon ended during the fail-back, that its marker says it had
    begun (this host's copy may be a mix) and what to run; exit 1. Run as it says, the
    daemon started again and the fail-back run again finish it."""
    eng, src, r = switched_over(fs_remote)
    (r.root / "data" / "big").write_bytes(os.urandom(24 * MiB))  # written there: comes back
    proc, out, err = fail_back_killed_mid_way(r, eng, src, "the fail-back's marker", lambda: any(
        Path(eng.state).rglob("failback")), every=0.1)
    err = " ".join(err.split())
    assert proc.returncode == 1, out + err
    assert "closed the connection without a reply" not in err, err
    assert f"the daemon ended during the fail-back of {src}: the fail-back had begun (its marker " \
        "says so) and did not finish: this host's copy may be a mix of its own data and the " \
        f"replica's; {src} is not captured; run `mirrorsetup failback {src} --yes` again to " \
        "finish it; the daemon is not running now: start it with `mirrorsetup daemon start`, " \
        "then run `mirrorsetup status`" in err, err
    eng.start()  # as it says
    assert eng.status(src)["state"] == "fail-back interrupted"
    p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert full_tree(Path(src)) == full_tree(r.root / "data")
    assert eng.drain(src)["switched"] is None and replicas(r)[0]["role"] == "secondary"


# Put on the daemon's PYTHONPATH: its os.unlink SIGKILLs the daemon at the second of an entry's
# two handover markers removed ("switched", "failback": the first one is gone already), once,
# while the file named by $MIRRORSETUP_TEST_ARMED exists (it is removed then)
KILL_BETWEEN_THE_MARKERS = """
import os, signal
_unlink, _pair = os.unlink, {"switched": "failback", "failback": "switched"}
def unlink(path, *args, **kwargs):
    p = os.fspath(path)
    other = _pair.get(os.path.basename(p))
    armed = os.environ.get("MIRRORSETUP_TEST_ARMED")
    if (other and armed and os.path.exists(armed) and os.path.exists(p)
            and not os.path.exists(os.path.join(os.path.dirname(p), other))):
        _unlink(armed)
        os.kill(os.getpid(), signal.SIGKILL)
    return _unlink(path, *args, **kwargs)
os.unlink = unlink
"""


def test_a_daemon_killed_between_the_fail_backs_two_marker_removals_leaves_it_to_finish(
        fs_remote, tmp_path, monkeypatch):
    """A fail-back ends by removing the entry's fail-back marker and its switch-over marker. The
    fail-back's went first: the daemon killed between the two left "switched over", and the
    next fail-back failed (its replica, handed back already, is not promoted). The fault is
    injected there (a sitecustomize on the daemon's PYTHONPATH kills it at the second
    removal). Now the switch-over marker goes first: what is left says "fail-back
    interrupted", the entry is not captured, and the next fail-back finishes it."""
    eng, src, r = switched_over(fs_remote)
    (r.root / "data" / "there").write_text("written on the promoted replica")
    shim, armed = tmp_path / "shim", tmp_path / "armed"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(KILL_BETWEEN_THE_MARKERS)
    armed.touch()
    eng.stop()
    with monkeypatch.context() as m:
        m.setenv("PYTHONPATH", str(shim))
        m.setenv("MIRRORSETUP_TEST_ARMED", str(armed))
        eng.start()
        p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
        eng.proc.wait(timeout=30)
    assert not armed.exists(), "the fault was not injected"
    assert p.returncode == 1 and f"the daemon ended during the fail-back of {src}" in p.stderr, \
        p.stdout + p.stderr
    assert [m.name for m in Path(eng.state).rglob("*") if m.name in ("switched", "failback")] \
        == ["failback"], "not the fail-back's marker alone"
    eng.start()
    st = eng.status(src)
    assert not st["captured"] and st["state"] == "fail-back interrupted", st
    p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
    assert p.returncode == 0 and "had been handed back already" in p.stdout, p.stdout + p.stderr
    assert (Path(src) / "there").read_text() == "written on the promoted replica"
    assert full_tree(Path(src)) == full_tree(r.root / "data")
    st = eng.drain(src)
    assert st["captured"] and st["switched"] is None, st
    assert replicas(r)[0]["role"] == "secondary"


def test_a_switchover_refused_as_in_use_names_the_command_itself_and_exits_2(fs_remote):
    """Run from a shell inside the entry (its working directory, or its output redirected into
    a file there), `switchover` holds the mount itself and the unmount would fail: the refusal
    named "pid N (python3) holds …", which an administrator could not tell was this very
    command, and exited 1 though nothing was changed. Now it says it is this command and what
    to change, and exits 2 (refused before anything changed)."""
    eng, src, r = fs_remote()
    s = Path(src)
    (s / "f").write_text("one")
    eng.drain(src)
    env = {**os.environ, "MIRRORSETUP_SOCKET": eng.socket, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "app", "--config", str(r.cfg), "switchover", src]

    def captured() -> bool:
        return any(f" {src} " in m and "fuse.mirrorfs" in m for m in open("/proc/self/mountinfo"))
    p = subprocess.run(argv, cwd=src, env=env, capture_output=True, text=True)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "this command itself (pid " in p.stderr and f"runs in {src}: run it from outside " \
        f"{src}" in p.stderr and "nothing was changed" in p.stderr, p.stderr
    assert captured() and not list(Path(eng.state).rglob("switched")), p.stderr
    with open(s / "out", "w") as out:
        p = subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.PIPE, text=True)
    assert p.returncode == 2, p.stderr
    assert re.search(r"this command itself \(pid \d+, python", p.stderr), p.stderr
    assert f"has {s / 'out'} as its standard output: redirect it outside {src}" in p.stderr, p.stderr
    assert captured()
    assert eng.status(src)["target_data"] == "consistent"


def test_a_switchover_of_an_entry_whose_target_was_edited_while_captured_changes_nothing(
        fs_remote):
    """Found by a walk: the target edited in the file while the capture ran (its changes still
    go to the old replica); `switchover` drained into the old replica, asked the new one to be
    promoted (the agent refused: 'another history'), and mounted the entry again capturing
    into the new one (exit 1). It is now refused before anything changes (exit 2), naming
    both targets and what applies the edit."""
    eng, src, r = fs_remote()
    (Path(src) / "f").write_text("one")
    eng.drain(src)
    r.cfg.write_text(r.cfg.read_text().replace('target = "backup1:data"\n',
                                               'target = "backup1:data-new"\n'))
    p = cli(r.cfg, "switchover", src, socket=eng.socket)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "replicates to backup1:data" in p.stderr and "backup1:data-new" in p.stderr, p.stderr
    assert "Unmount all, then Mount all" in p.stderr and "nothing was changed" in p.stderr
    st = eng.status(src)
    assert st["captured"] and st["target"] == "backup1:data", st
    assert not list(Path(eng.state).rglob("switched")) and not (r.root / "data-new").exists()


def test_keep_this_host_that_cannot_reach_the_target_says_nothing_was_changed(fs_remote):
    """Found by helper-39's walk: `replica resolve --discard-target` of an entry switched over,
    with the target unreachable or its replica in use there, said only "resolve KEY: WHY"
    (fail-back says "nothing was changed (it stays read-only here)"): whether this side was
    made writable, or its marker dropped, was not said. Nothing was, and now it says so."""
    eng, src, r = switched_over(fs_remote)
    s = Path(src)
    r.bed.reject()
    p = cli(r.cfg, "replica", "resolve", src, "--discard-target", "--yes", socket=eng.socket)
    r.bed.unblock()
    assert p.returncode == 1 and f"resolve {src}: " in p.stderr, p.stdout + p.stderr
    assert "; nothing was changed here (it stays read-only here)" in p.stderr, p.stderr
    with pytest.raises(OSError) as refused:
        (s / "g").write_text("fenced still")
    assert refused.value.errno == errno.EROFS
    assert eng.status(src)["state"] == "switched over"
    where = r.root.parent / "served"
    p = on_target(r.bed, "replica", "promote", "data", "--root", str(r.root), "--mount", str(where))
    assert p.returncode == 0, p.stdout + p.stderr
    try:  # in use there: the agent refuses the discard
        p = cli(r.cfg, "replica", "resolve", src, "--discard-target", "--yes", socket=eng.socket)
        # in use there is a refusal: exit 2, as the exit-status rule says (it was 1)
        assert p.returncode == 2 and f"is in use on the target: mounted at {where}" in p.stderr, \
            p.stdout + p.stderr
        assert "; nothing was changed here (it stays read-only here)" in p.stderr, p.stderr
        assert eng.status(src)["state"] == "switched over" and replicas(r)[0]["role"] == "primary"
    finally:
        r.bed.run_on_target(["umount", str(where)], check=False)


def test_a_fail_back_refused_because_this_side_is_in_use_says_nothing_was_changed(fs_remote):
    """Found by helper-39's walk: a fail-back refused because something uses the entry here (a
    shell's working directory) said only "… is in use here: …: stop them first", where its
    refusal for a replica in use there says "nothing was changed (it stays read-only here)". It
    stays read-only and switched over, and now says so."""
    eng, src, r = switched_over(fs_remote)
    s = Path(src)
    user = subprocess.Popen(["sleep", "60"], cwd=src)
    try:
        p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
    finally:
        user.kill()
        user.wait()
    # in use here, nothing changed: a refusal, exit 2 (it was 1, against the exit-status rule)
    assert p.returncode == 2 and f"{src} is in use here: " in p.stderr and f"pid {user.pid}" \
        in p.stderr, p.stdout + p.stderr
    assert "stop them first; nothing was changed (it stays read-only here)" in p.stderr, p.stderr
    with pytest.raises(OSError) as refused:
        (s / "g").write_text("fenced still")
    assert refused.value.errno == errno.EROFS
    assert eng.status(src)["state"] == "switched over" and replicas(r)[0]["role"] == "primary"
    p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)  # once it is free
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_fail_back_refused_before_anything_came_back_leaves_this_copy_its_own(fs_remote):
    """Found by helper-39's walk: the promoted replica's directory moved away on the target, a
    fail-back is refused by the agent before anything came back (applied 0 recorded); status
    then said as an ERROR that this host's copy "may be a mix", and moving it for good said
    "may be a mix …: do not use it". Nothing of the replica's was written here: said so, and
    moved for good it is the copy as at the switch-over. The agent's refusal ("holds no data")
    was shown as "disconnected: … it was removed on this host", the agent's own words: it is
    a refusal by the target now, said from this side, and leaves no fail-back interrupted."""
    eng, src, r = switched_over(fs_remote)
    s = Path(src)
    (r.root / "data").rename(r.root / "data.moved")
    p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
    assert p.returncode == 1 and "nothing was sent back" in p.stderr, p.stdout + p.stderr
    # a refusal by the target, in the words of this side (it said "disconnected: … it was
    # removed on this host", the agent's own words)
    assert f"fail-back of {src}: refused: replica data holds no data: it was removed on the " \
        f"target ({r.root.resolve() / 'data'}; " in p.stderr, p.stderr
    assert "disconnected" not in p.stderr and "this host" not in p.stderr, p.stderr
    assert (s / "f").read_text() == "one"
    down = json.loads(cli(r.cfg, "status", "--json", socket=eng.socket).stdout)
    [w] = [w for w in down["warnings"] if w["subject"] == src]
    assert w["level"] == "warning" and "mix" not in w["message"], w
    # refused before it began: no fail-back is left interrupted, the entry is switched over
    assert "interrupted" not in w["message"] and "switched over to backup1:data" in w["message"], w
    p = cli(r.cfg, "fs", "remove", src, "--keep-replica-primary", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "mix" not in p.stdout and "do not use it" not in p.stdout, p.stdout
    assert "this host's copy is as it was at the switch-over" in p.stdout, p.stdout
    (s / "g").write_text("writable again")
    assert (r.root / "data.moved" / "f").read_text() == "one"  # nothing there was touched


def test_a_switchover_whose_replica_data_was_moved_away_there_is_refused_and_captured_again(
        fs_remote):
    """The replica's directory moved away on the target while its capture ran: the agent
    refuses the promotion ("holds no data"). That refusal was taken for a lost session
    ("disconnected: … removed on this host"): the entry was left fenced, uncaptured, "the
    replica there may be primary now", though nothing was promoted. Now it is a refusal named
    from this side: nothing promoted, the capture made again."""
    eng, src, r = fs_remote()
    s = Path(src)
    (s / "f").write_text("one")
    eng.drain(src)
    (r.root / "data").rename(r.root / "data.moved")
    p = cli(r.cfg, "switchover", src, socket=eng.socket)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"switch-over of {src}: refused: replica data holds no data: it was removed on the " \
        "target (" in p.stderr and "; nothing was promoted; " in p.stderr, p.stderr
    assert "disconnected" not in p.stderr and "may be primary" not in p.stderr, p.stderr
    assert not list(Path(eng.state).rglob("switched")), "a switch-over marker left behind"
    assert replicas(r)[0]["role"] == "secondary"
    (s / "g").write_text("captured again")  # writable: not fenced
    st = eng.drain(src)  # replication goes on: the replica is made anew and copied whole
    assert st["target_data"] == "consistent" and st["state"] != "switched over", st
    assert (r.root / "data" / "g").read_text() == "captured again"


def _switchover_losing_its_answer(eng, key: str, r) -> tuple[int, str, str]:
    """`switchover KEY` whose link drops once the agent has promoted the replica, before its
    answer is sent (the agent holds it: MIRRORSETUP_TEST_PROMOTE_REPLY_DELAY in the forced
    command); the link comes back once the switch-over has ended."""
    r.bed.set_authorized_keys([r.authorized_line.replace(
        'command="', 'command="MIRRORSETUP_TEST_PROMOTE_REPLY_DELAY=8 ', 1)])
    sw, out, err = cli_cut_mid_way(  # the answer is still held by the agent: it never arrives
        r, eng, ["switchover", key], "the replica promoted",
        lambda: replicas(r)[0]["role"] == "primary", r.bed.link_down, every=0.1, timeout=120)
    # the interrupted agent ends once its held answer finds the session gone
    wait_for("the agent gone", lambda: not any("serve-target" in argv for _, argv in
                                              r.bed.target_processes()), 60, 0.3)
    return sw.returncode, out, err


def test_a_switchover_whose_answer_is_lost_after_the_promotion_stays_fenced_not_captured(fs_remote):
    """Found by reading the code (helper-36 reproduced it): the link dropped after the agent had
    promoted the replica but before its answer came back; the source said "nothing was
    promoted", removed its switch-over marker and captured (and wrote) again while the replica
    there was primary: a split brain, seen only when the capture reconnected. The promotion's
    outcome is unknown then: the entry stays uncaptured and read-only, its switch-over under
    way, and the failure says so and what to run; that switch-over finishes it.
    The agent holds its answer a few seconds (MIRRORSETUP_TEST_PROMOTE_REPLY_DELAY, set in the
    forced command; tests only): this machine has no netem, and nothing else could cut the link
    between the promotion and its answer."""
    eng, src, r = fs_remote()
    s = Path(src)
    (s / "f").write_text("one")
    eng.drain(src)
    rc, out, err = _switchover_losing_its_answer(eng, src, r)
    assert rc == 1, out + err
    assert "nothing was promoted" not in err, err
    assert f"switch-over of {src}: " in err and "may be primary" in err, err
    assert f"run `mirrorsetup switchover {src}` again" in err, err
    assert not any("fuse.mirrorfs" in m for m in open("/proc/self/mountinfo") if f" {src} " in m), \
        "captured again although the replica there may be primary"
    [marker] = Path(eng.state).rglob("switched")
    assert json.loads(marker.read_text())["state"] == "switching"
    with pytest.raises(OSError) as e:  # fenced: nothing written here meanwhile
        (s / "g").write_text("written while the replica is primary")
    assert e.value.errno == errno.EROFS
    assert eng.status(src)["state"] == "switch-over interrupted"
    p = cli(r.cfg, "fs", "remove", src, "--keep-replica-primary", socket=eng.socket)
    assert p.returncode == 2 and "did not finish" in p.stderr, p.stdout + p.stderr  # not known
    assert "nothing was changed" in p.stderr and marker.exists(), p.stderr
    p = cli(r.cfg, "switchover", src, socket=eng.socket)  # finishes it
    assert p.returncode == 0 and "switched over to backup1" in p.stdout, p.stdout + p.stderr
    assert "(generation ?)" not in p.stdout, p.stdout  # the agent says which, asked again
    assert replicas(r)[0]["role"] == "primary"
    p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    (s / "h").write_text("written again")
    st = eng.drain(src)
    assert st["target_data"] == "consistent", st
    assert tree(s) == tree(r.root / "data")


def test_a_fail_back_of_a_switchover_interrupted_before_the_promotion_captures_again(fs_remote):
    """Reported by helper-36: a switch-over interrupted after its promotion was asked, whose
    replica was in fact not promoted (the request never reached the agent), then `failback`:
    it lifted the read-only fence, said "was not switched over … nothing to fail back; nothing
    was changed" and left the entry uncaptured, writable and marked, so what was written here
    next was never replicated. Now it says the switch-over is abandoned and captures again,
    as a switch-over that failed before its promotion does. The state directory is put as such
    an interruption leaves it (marker "switching", promotion asked, fenced at the daemon's
    start): cutting the link between the request's write and its arrival cannot be timed here."""
    from app.services.layout import entry_state
    eng, src, r = fs_remote()
    s = Path(src)
    (s / "f").write_text("one")
    eng.drain(src)
    eng.stop()
    marker = Path(entry_state(eng.state, "fs", src)) / "switched"
    marker.write_text(json.dumps({"state": "switching", "time": time.time(), "target": "backup1:data",
                                  "promote_sent": True, "fence": {"read_only_mount": None}}) + "\n")
    eng.start()
    assert eng.status(src)["state"] == "switch-over interrupted"
    with pytest.raises(OSError) as e:  # fenced again at the daemon's start
        (s / "g").write_text("x")
    assert e.value.errno == errno.EROFS
    assert replicas(r)[0]["role"] == "secondary"
    p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "had not promoted its replica" in p.stdout and "switch-over is abandoned" in p.stdout, \
        p.stdout
    assert not marker.exists()
    (s / "g").write_text("captured again")
    st = eng.drain(src)
    assert st["captured"] and st["target_data"] == "consistent", st
    assert (r.root / "data" / "g").read_text() == "captured again"
    assert tree(s) == tree(r.root / "data")


def test_a_block_switchover_whose_answer_is_lost_keeps_the_device_read_only_then_finishes(
        block_remote):
    """The block side of the test above: the device is fenced (read-only flag) while the
    promotion's outcome is unknown; the switch-over run again finishes it, and the fail-back
    makes the device writable again (the second fence must not take the first one's
    read-only flag for the device's own)."""
    eng, disk, r = block_remote()
    dev = eng.block(disk)["loop"]
    dd(dev, mib=1, seek_mib=2)  # through its capture
    eng.block_drain(disk)
    held = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)  # in use: refused, the holder named
    try:
        p = cli(r.cfg, "switchover", disk, socket=eng.socket)
    finally:
        os.close(held)
    assert p.returncode != 0 and f"{disk} is in use through {dev}: open by pid {os.getpid()} (" \
        in p.stderr and "nothing was changed" in p.stderr, p.stdout + p.stderr
    assert replicas(r)[0]["role"] == "secondary" and eng.block(disk)["captured"]
    rc, out, err = _switchover_losing_its_answer(eng, disk, r)
    assert rc == 1 and "nothing was promoted" not in err and "may be primary" in err, out + err
    assert eng.block(disk)["state"] == "switch-over interrupted"
    ro = lambda: subprocess.run(["blockdev", "--getro", disk], capture_output=True,  # noqa: E731
                                text=True, check=True).stdout.strip()
    assert ro() == "1"
    p = cli(r.cfg, "switchover", disk, socket=eng.socket)
    assert p.returncode == 0 and "switched over to backup1" in p.stdout, p.stdout + p.stderr
    assert ro() == "1"
    p = cli(r.cfg, "failback", disk, "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert ro() == "0"
    st = eng.block_drain(disk)
    assert st["target_data"] == "consistent" and st["state"] != "switched over", st
    # then moved for good: the device is made writable again, the entry removed, the replica
    # left primary there
    p = cli(r.cfg, "switchover", disk, socket=eng.socket)
    assert p.returncode == 0 and ro() == "1", p.stdout + p.stderr
    p = cli(r.cfg, "block", "remove", disk, "--keep-replica-primary", socket=eng.socket)
    assert p.returncode == 0 and f"removed {disk}" in p.stdout, p.stdout + p.stderr
    assert ro() == "0" and replicas(r)[0]["role"] == "primary"
    assert json.loads(cli(r.cfg, "block", "list", "--json").stdout) == []


def test_verify_or_mirror_after_a_switchover_is_refused_and_leaves_no_split_brain_there(fs_remote):
    """Found by a walk: `fs verify` (read only) or `fs mirror` of an entry switched over went to
    the promoted replica as the old source coming back: it failed with an internal error
    (TargetUnavailable), and the target's `replica list` said SPLIT BRAIN from then on. It is a
    refusal (exit 2: an entry in a state the action is not for), as mounting it is."""
    eng, src, r = fs_remote()
    (Path(src) / "f").write_text("one")
    eng.drain(src)
    p = cli(r.cfg, "switchover", src, socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    for argv in (["fs", "verify", src], ["fs", "mirror", src], ["fs", "set", src, "--no-target"],
                 ["--json", "fs", "verify", src]):
        p = cli(r.cfg, *argv, socket=eng.socket)
        assert p.returncode == 2, (argv, p.stdout + p.stderr)  # refused: nothing was changed
        assert f"{src} was switched over to backup1:data at " in p.stderr, p.stderr
        assert "the replica there is primary" in p.stderr and "internal error" not in p.stderr
    assert json.loads(p.stdout)["results"][0]["errno_name"] == "EREMOTE", p.stdout
    (rep,) = replicas(r)
    assert rep["role"] == "primary" and rep["split_brain"] is None, rep
    p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not eng.verify(src)  # after the fail-back it compares again


def test_verify_and_mirror_with_the_target_unreachable_say_so_at_once(fs_remote):
    """Found by a walk: with the link refused or dropped, `fs verify` sat silent for 120 s, then
    said "TargetUnavailable: the target did not apply the queue within 120 s (…)" with no
    errno. Now the connection state is said at once, with ENOTCONN."""
    eng, src, r = fs_remote()
    (Path(src) / "f").write_text("one")
    eng.drain(src)
    r.bed.reject()
    r.bed.kill_on_target(r.bed.wait_target_process("serve-target"))
    wait_for("disconnected", lambda: eng.status(src)["connection"] != "connected", 60, 0.2)
    for argv in (["--json", "fs", "verify", src], ["--json", "fs", "mirror", src]):
        began = time.monotonic()
        p = cli(r.cfg, *argv, socket=eng.socket)
        assert time.monotonic() - began < 20, argv  # not the 120 s wait
        assert p.returncode == 1, (argv, p.stdout + p.stderr)
        assert "cannot reach the target (disconnected" in p.stderr, p.stderr
        assert "TargetUnavailable" not in p.stderr and "internal error" not in p.stderr, p.stderr
        got = json.loads(p.stdout)  # verify: {"differences", "results"}; mirror: the results
        assert (got["results"] if "results" in got else got)[0]["errno_name"] == "ENOTCONN", p.stdout
    r.bed.unblock()
    wait_for("connected", lambda: eng.status(src)["connection"] == "connected", 90, 0.2)
    assert not eng.verify(src)


def test_a_switchover_to_a_full_target_says_so_and_changes_nothing(fs_remote):
    """Found at a final read: a target too full to take the last changes was refused as
    "cannot reach the target (paused: target full)", though it answers; it is said for what it
    is (ENOSPC), the capture stays, and once there is room the changes arrive."""
    eng, src, r = fs_remote(disk=48 * MiB)
    s = Path(src)
    disk = r.bed._disks[-1]
    disk.fill()
    for i in range(20):
        (s / f"big{i}").write_bytes(os.urandom(256 << 10))
    wait_for("paused", lambda: eng.status(src)["connection"].startswith("paused"), 60)
    def ours() -> list[str]:  # this test's mirrorfs mounts (others come and go on a busy host)
        return [m.split()[4] for m in open("/proc/self/mountinfo")
                if " fuse.mirrorfs " in m and m.split()[4].startswith(os.path.dirname(src) + "/")]
    before = ours()
    assert before == [src], before
    p = cli(r.cfg, "--json", "switchover", src, socket=eng.socket)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "the target cannot take the last changes (paused: target full" in p.stderr, p.stderr
    assert "cannot reach" not in p.stderr and "nothing was changed" in p.stderr, p.stderr
    assert json.loads(p.stdout)[0]["errno_name"] == "ENOSPC", p.stdout
    assert ours() == before
    assert not list(Path(eng.state).rglob("switched")), "a switch-over marker left behind"
    disk.unfill()
    st = eng.drain(src)
    assert st["connection"] == "connected" and st["target_data"] == "consistent", st
    assert tree(s) == tree(r.root / "data")


def test_an_entry_switched_over_is_not_removed_until_it_is_failed_back(fs_remote):
    """Found by helper-35's walk: `fs remove` of an entry switched over said "removed" and left
    its replica primary there, its read-only fence here (no longer in any status) and the
    switch-over marker (the same entry added again later refused capture). The remove is
    refused now, with the daemon and without it, saying how to end the hand-over first."""
    eng, src, r = fs_remote()
    (Path(src) / "f").write_text("before")
    eng.drain(src)
    p = cli(r.cfg, "switchover", src, socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    p = cli(r.cfg, "fs", "remove", src, socket=eng.socket)
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"{src} was switched over to backup1:data at " in p.stderr, p.stderr
    assert "Remove the entry after that" in p.stderr and "nothing was changed" in p.stderr
    assert f"`mirrorsetup failback {src} --yes`" in p.stderr, p.stderr
    assert f"`mirrorsetup fs remove {src} --keep-replica-primary`" in p.stderr, p.stderr
    listed = json.loads(cli(r.cfg, "fs", "list", "--json").stdout)
    assert [e["path"] for e in listed] == [src], listed
    eng.stop()  # the marker is read from the state directory then
    env = {**os.environ, "MIRRORSETUP_SOCKET": eng.socket, "MIRRORSETUP_STATE_DIR": eng.state}
    p = subprocess.run([sys.executable, "-m", "app", "--config", str(r.cfg), "fs", "remove", src],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert p.returncode == 2 and "was switched over to backup1:data" in p.stderr, p.stdout + p.stderr
    eng.start()
    p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    p = cli(r.cfg, "fs", "remove", src, socket=eng.socket)
    assert p.returncode == 0 and f"removed {src}" in p.stdout, p.stdout + p.stderr


def switched_over_mount_point(tmpfs_mount, remote, tmp_path, text: str, prepare=lambda: None):
    """An entry that is the mount point of its own file system (a tmpfs; `prepare()` runs once
    it is mounted), replicating to backup1:data with one file holding `text`, switched over:
    (engine, its path, the remote)."""
    make, r = remote()
    src = tmp_path / "src"
    tmpfs_mount(src)
    prepare()
    assert cli(r.cfg, "fs", "add", str(src), "--target", "backup1:data").returncode == 0
    eng, _, _ = make(config=r.cfg)
    (src / "f").write_text(text)
    eng.drain(str(src))
    p = cli(r.cfg, "switchover", str(src), socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    return eng, src, r


def fail_back_refused_while_used_from(eng, r, src, cwd) -> str:
    """A fail-back of `src` while a process works in `cwd`: refused, naming that process; what
    it said."""
    user = subprocess.Popen(["sleep", "600"], cwd=cwd)
    try:
        p = cli(r.cfg, "failback", str(src), "--yes", socket=eng.socket)
        assert p.returncode != 0 and f"pid {user.pid}" in p.stderr, p.stdout + p.stderr
        return p.stderr
    finally:
        user.kill()
        user.wait()


def test_an_entry_that_is_its_own_file_systems_mount_point_fails_back(tmpfs_mount, remote,
                                                                      tmp_path):
    """The usual case of a data disk: the entry is the mount point of its own file system.
    The fail-back's check of who uses this side took that file system, under the read-only
    fence, for a user ("in use here: mounted at …") and refused every time. The fence and the
    file system under it are the entry's own; a process there is still named."""
    eng, src, r = switched_over_mount_point(tmpfs_mount, remote, tmp_path, "before")
    (r.root / "data" / "f").write_text("written on the promoted replica")
    said = fail_back_refused_while_used_from(eng, r, src, src)
    assert f"{src} is in use here: " in said and f"mounted at {src}" not in said, said
    p = cli(r.cfg, "failback", str(src), "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (src / "f").read_text() == "written on the promoted replica"


def test_an_entry_with_a_file_system_mounted_below_it_fails_back_and_that_one_is_untouched(
        tmpfs_mount, remote, tmp_path):
    """Found by a walk: another file system mounted below the entry (a second disk at
    ENTRY/archive). Capture passes it through unrecorded and the switch-over lets it be, but
    every fail-back was refused as "in use here: mounted at ENTRY/archive; mounted at
    ENTRY/archive" (it, and its copy in the recursive fence), and the copy under the fence
    could not even be unmounted by its name. The fail-back does not cross into it either:
    not a user; it stays mounted and as it was. A process there is still named."""
    archive = tmp_path / "src" / "archive"

    def second_disk() -> None:
        tmpfs_mount(archive)
        (archive / "old").write_text("on the second disk")
    eng, src, r = switched_over_mount_point(tmpfs_mount, remote, tmp_path, "before", second_disk)
    (r.root / "data" / "f").write_text("written on the promoted replica")
    said = fail_back_refused_while_used_from(eng, r, src, archive)
    assert f"mounted at {archive}" not in said, said
    p = cli(r.cfg, "failback", str(src), "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 removed" in p.stdout, p.stdout
    assert (src / "f").read_text() == "written on the promoted replica"
    assert os.listdir(archive) == ["old"] and (archive / "old").read_text() == "on the second disk"
    assert eng.status(str(src))["nested_mounts"] == [str(archive)]


def test_a_fail_back_never_writes_the_replicas_data_onto_a_file_system_mounted_below(
        tmpfs_mount, remote, tmp_path):
    """While the replica was primary, the service there wrote into ENTRY/archive, a plain
    directory there, a second disk here. The fail-back wrote those files onto the second
    disk and pruned it to the replica's listing (its own files removed). It stops before
    that now, saying how to go on; moved aside there, they come back under that name, and
    the second disk never got any of them."""
    src = tmp_path / "src"
    archive, peek = src / "archive", tmp_path / "peek"

    def second_disk() -> None:
        tmpfs_mount(archive)
        (archive / "old").write_text("on the second disk")
        peek.mkdir()
        subprocess.run(["mount", "--bind", str(archive), str(peek)], check=True)
    try:
        eng, _, r = switched_over_mount_point(tmpfs_mount, remote, tmp_path, "before", second_disk)
        (r.root / "data" / "f").write_text("written on the promoted replica")
        (r.root / "data" / "archive").mkdir()
        (r.root / "data" / "archive" / "new").write_text("written there")
        p = cli(r.cfg, "failback", str(src), "--yes", socket=eng.socket)
        assert p.returncode == 1, p.stdout + p.stderr
        assert f"the replica has {archive} (or something below it), where another file system " \
            "is mounted here" in p.stderr, p.stderr
        assert "move it aside on the replica's host" in p.stderr, p.stderr
        assert "fail back again" in p.stderr, p.stderr
        assert os.listdir(peek) == ["old"] and (peek / "old").read_text() == "on the second disk"
        (r.root / "data" / "archive").rename(r.root / "data" / "archive-there")
        p = cli(r.cfg, "failback", str(src), "--yes", socket=eng.socket)
        assert p.returncode == 0, p.stdout + p.stderr
        assert (src / "archive-there" / "new").read_text() == "written there"
        assert (src / "f").read_text() == "written on the promoted replica"
        assert os.listdir(peek) == ["old"]
    finally:
        subprocess.run(["umount", "-l", str(peek)], check=False)


def test_a_fail_back_onto_another_file_system_in_the_entrys_place_is_refused(tmpfs_mount, remote,
                                                                             tmp_path):
    """The entry is the mount point of its own file system; after the switch-over that disk
    died and a new one, formatted and empty, is mounted in its place (or none came up and the
    directory below shows). A fail-back wrote the replica's data onto whatever was there; it
    now checks the file system as a capture does (type, mount point, UUID) and refuses, naming
    the way on: `fs accept-filesystem`, then the fail-back writes the replica's data there."""
    eng, src, r = switched_over_mount_point(tmpfs_mount, remote, tmp_path, "kept on the replica")
    assert eng.stop() == 0
    while os.path.ismount(src):  # the fence, then the file system under it: the disk is gone
        subprocess.run(["umount", "-l", str(src)], check=True)
    tmpfs_mount(src)  # the new disk, formatted: same type, same place, empty
    eng.start()
    p = cli(r.cfg, "failback", str(src), "--yes", socket=eng.socket)
    assert p.returncode != 0, p.stdout + p.stderr
    assert f"{src} is not on the file system this entry was made for: its file system UUID " \
        "was " in p.stderr, p.stderr
    assert "nothing was written to it" in p.stderr and "then fail back again" in p.stderr, p.stderr
    assert f"mirrorsetup fs accept-filesystem {src}" in p.stderr, p.stderr
    assert os.listdir(src) == []
    p = cli(r.cfg, "fs", "accept-filesystem", str(src), socket=eng.socket)
    assert p.returncode == 0 and "is forgotten" in p.stdout, p.stdout + p.stderr
    p = cli(r.cfg, "failback", str(src), "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (src / "f").read_text() == "kept on the replica"


def test_an_entry_moved_for_good_is_removed_here_and_its_replica_stays_primary(fs_remote):
    """The gap the refusal above left (note 50): a service moved to the replica's host for
    good (a planned migration, this host to be retired) had no way out but deleting the marker
    by hand: fail-back brings the data back, resolve overwrites the replica. `fs remove
    --keep-replica-primary` ends the hand-over: the replica stays primary and untouched, the
    read-only fence and the markers here go, the entry is removed. Refused, changing nothing,
    for an entry never switched over and (below) while a switch-over is unfinished."""
    eng, src, r = fs_remote()
    s = Path(src)
    (s / "f").write_text("before")
    eng.drain(src)
    p = cli(r.cfg, "fs", "remove", src, "--keep-replica-primary", socket=eng.socket)
    assert p.returncode == 2 and f"{src} was not switched over to its replica" in p.stderr, \
        p.stdout + p.stderr
    assert "nothing was changed" in p.stderr and eng.status(src)["captured"], p.stderr
    p = cli(r.cfg, "switchover", src, socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    (r.root / "data" / "there").write_text("written there, where the service runs now")
    with pytest.raises(OSError) as e:
        (s / "g").write_text("fenced")
    assert e.value.errno == errno.EROFS
    eng.stop()  # ending it is the daemon's work (the fence): refused without it
    env = {**os.environ, "MIRRORSETUP_SOCKET": eng.socket, "MIRRORSETUP_STATE_DIR": eng.state}
    p = subprocess.run([sys.executable, "-m", "app", "--config", str(r.cfg), "fs", "remove", src,
                        "--keep-replica-primary"], capture_output=True, text=True, cwd=REPO, env=env)
    assert p.returncode == 2 and "the daemon is not running" in p.stderr, p.stdout + p.stderr
    assert list(Path(eng.state).rglob("switched")), "the marker went without the daemon"
    eng.start()
    p = cli(r.cfg, "fs", "remove", src, "--keep-replica-primary", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"ended the hand-over of {src}: its replica backup1:data" in p.stdout, p.stdout
    assert "stays primary there" in p.stdout and f"removed {src}" in p.stdout, p.stdout
    assert "as it was at the switch-over" in p.stdout, p.stdout
    assert json.loads(cli(r.cfg, "fs", "list", "--json").stdout) == []
    assert not list(Path(eng.state).rglob("switched")), "the switch-over marker was left"
    (s / "g").write_text("writable again")  # the fence is gone, nothing captures it
    assert not any(f" {src} " in m for m in open("/proc/self/mountinfo")), "a mount left at src"
    [rep] = replicas(r)
    assert rep["role"] == "primary", rep
    assert (r.root / "data" / "there").exists() and not (r.root / "data" / "g").exists()
    assert (r.root / "data" / "f").read_text() == "before"
    # the service comes back (what Moved for good's question says): the same entry added again
    # with that target is a split brain there (its history went on here), and its fail-back
    # brings the replica's data
    assert cli(r.cfg, "fs", "add", src, "--target", "backup1:data").returncode == 0
    (res,) = eng.client.results("mount_all")
    assert res.outcome.value == "ok", res.message
    wait_for("the split brain", lambda: eng.status(src)["target_data"] == "split-brain", 60, 0.2)
    assert (r.root / "data" / "there").exists() and not (r.root / "data" / "g").exists()
    p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (s / "there").read_text() == "written there, where the service runs now"
    assert not (s / "g").exists() and replicas(r)[0]["role"] == "secondary"


def test_a_fail_back_interrupted_after_the_replica_was_handed_back_is_finished_by_the_next(fs_remote):
    """The source chooses the new history before it asks, and keeps it until it is recorded:
    when the source went down after the replica had taken it (the state directory below is put
    back as it was then), the next fail-back finds the replica secondary in that very history
    and only records it. A pending choice the replica never took (another history there) is
    not taken for one: it is refused, and forgotten."""
    eng, src, r = fs_remote()
    (Path(src) / "f").write_text("before")
    eng.drain(src)
    p = cli(r.cfg, "switchover", src, socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    (r.root / "data" / "on-target").write_text("written there")
    eng.stop()
    then = Path(eng.state).parent / "state-then"
    shutil.copytree(eng.state, then, symlinks=True)
    eng.start()
    p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    [rep] = replicas(r)
    taken = rep["generation"]
    assert rep["role"] == "secondary" and f"generation {taken}" in p.stdout, p.stdout

    def as_then(pending: str) -> Path:
        eng.stop()
        shutil.rmtree(eng.state)
        shutil.copytree(then, eng.state, symlinks=True)
        [marker] = [m for m in Path(eng.state).rglob("switched")]  # the entry's state directory
        (marker.parent / "failback").write_text(json.dumps({"generation": pending}) + "\n")
        eng.start()
        return marker.parent
    state = as_then("0" * 32)  # a choice the replica never took
    p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
    assert p.returncode == 1 and "is not promoted" in p.stderr, p.stdout + p.stderr
    assert not (state / "failback").exists() and (state / "switched").exists()
    assert (state / "generation").read_text().strip() != taken
    state = as_then(taken)  # the one it took before the source went down
    st = eng.status(src)  # (its copy here is not known to be whole: "may be a mix")
    assert st["state"] == "fail-back interrupted" and "may be a mix" in replication_text(
        CaptureRow.from_json(st)), st
    p = cli(r.cfg, "failback", src, "--yes", "--json", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout)
    assert "handed back already" in res[0]["message"] and res[0]["details"]["generation"] == taken, res
    assert (state / "generation").read_text().strip() == taken
    (Path(src) / "after").write_text("replicated again")
    st = eng.drain(src)
    assert st["target_data"] == "consistent" and st["last_error"] is None, st
    assert (r.root / "data" / "after").read_text() == "replicated again"


def test_block_switchover_then_fail_back_sends_only_what_changed(block_remote):
    eng, disk, r = block_remote()
    loop = eng.block(disk)["loop"]
    dd(loop, mib=16, seek_mib=4)
    eng.block_drain(disk)
    p = cli(r.cfg, "switchover", disk, "--json", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    said = json.loads(p.stdout)[0]["message"]  # and how it is used there, a command that runs
    assert ["replica", "promote", "disk.img", "--root", str(r.root)] in [c[1:] for c in _advised(said)] \
        and "attaches it to a loop device (with --mount DIR also mounts it)" in said, said
    image = r.bed.target_view(r.root / "disk.img")
    assert sha(image) == sha(disk)
    assert eng.block(disk)["state"] == "switched over"
    fd = os.open(disk, os.O_WRONLY)  # read-only here until the fail-back
    try:
        with pytest.raises(OSError) as refused:
            os.pwrite(fd, b"would be lost", 0)
            os.fsync(fd)
        assert refused.value.errno in (errno.EPERM, errno.EROFS)
    finally:
        os.close(fd)
    a = cli(r.cfg, "block", "attach-all", socket=eng.socket)
    assert a.returncode == 2 and "switched over" in a.stderr, a.stdout + a.stderr
    said = cli(r.cfg, "status", socket=eng.socket).stdout  # not told to attach it
    assert f"{disk}: switched over to backup1" in said and "not attached to a loop" not in said, said
    p = cli(r.cfg, "status", "--json", socket=eng.socket)  # its STATE: not "detached"
    assert json.loads(p.stdout)["block"][0]["state"] == "switched over", p.stdout

    # an application on the target changes 10 % of the replica (three 2 MiB runs)
    for seek in (2, 30, 50):
        r.bed.run_on_target(["dd", "if=/dev/urandom", f"of={r.root / 'disk.img'}", "bs=1M",
                             "count=2", f"seek={seek}", "conv=notrunc,fsync", "status=none"])
    changed = 6 * MiB
    assert blocks_differing(disk, image, 64 * MiB) == 6
    source_before = sha(disk)

    # the promoted replica used on the target: the README's `replica promote` gives it a loop
    # (it refused "already promoted" after a switch-over, leaving losetup by hand)
    p = on_target(r.bed, "replica", "promote", "disk.img", "--root", str(r.root), "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    done = json.loads(p.stdout)["done"]
    assert "already promoted (switch-over at" in done[0], done
    target_loop = re.search(r"as (/dev/loop\d+)", done[1]).group(1)
    try:
        again = on_target(r.bed, "replica", "promote", "disk.img", "--root", str(r.root))
        assert again.returncode == 2 and f"attached as {target_loop}" in again.stderr, again.stderr
        p = cli(r.cfg, "failback", disk, "--yes", socket=eng.socket)
        assert p.returncode == 2 and f"attached to {target_loop}" in p.stderr, p.stdout + p.stderr
        assert sha(disk) == source_before, "a refused fail-back wrote to the source"
    finally:
        r.bed.run_on_target(["losetup", "-d", target_loop], check=False)

    p = cli(r.cfg, "failback", disk, "--yes", "--json", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout)
    d = res[0]["details"]
    assert d["differing"] == 6 and d["sent_bytes"] <= 1.2 * changed, d
    assert sha(disk) == sha(image)
    st = eng.block_drain(disk)
    assert st["target_data"] == "consistent" and st["loop"], st
    dd(st["loop"], mib=1, seek_mib=60)
    eng.block_drain(disk)
    assert sha(disk) == sha(image)
    reply = eng.client.request("block_verify", device=disk)
    assert reply["differing"] == 0


def test_a_fail_back_whose_link_drops_says_what_it_left_and_can_be_run_again_at_once(
        block_remote, tmp_path):
    """Found by a walk: a fail-back whose link dropped mid-transfer failed with only
    "disconnected: the session … ended during the fail-back", though the device here was
    already partly the replica's; and `failback` again at once was refused, "the promoted
    replica … is in use there: open by pid N (mirrorsetup)": that was the interrupted
    fail-back's own agent, not yet aware that its link was gone. Now the failure says this
    host's copy is a mix until a fail-back finishes, and the next fail-back ends that stale
    session (the replica's lock) instead of taking it for an application."""
    eng, disk, r = block_remote()
    p = cli(r.cfg, "switchover", disk, socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    image = r.bed.target_view(r.root / "disk.img")
    r.bed.run_on_target(["dd", "if=/dev/urandom", f"of={r.root / 'disk.img'}", "bs=1M",
                         "count=24", "seek=8", "conv=notrunc,fsync", "status=none"])
    expected = tmp_path / "expected.img"  # read from here: nothing here may hold the replica open
    shutil.copyfile(image, expected)
    differing = blocks_differing(disk, expected, 64 * MiB)
    assert differing == 24
    first, out, err = fail_back_cut_mid_way(r, eng, disk, expected, differing)
    assert first.returncode == 1 and "ended during the fail-back" in err, out + err
    assert f"interrupted: this host's copy of {disk} is a mix" in err, err
    assert f"run `mirrorsetup failback {disk} --yes` again" in err, err
    assert 0 < blocks_differing(disk, expected, 64 * MiB) < differing
    st = eng.block(disk)  # status says it too (it said "switched over", no hint)
    assert st["state"] == "fail-back interrupted" and st["switched"]["failback_applied"] > 0, st
    stale = [pid for pid, argv in r.bed.target_processes() if "serve-target" in argv]
    assert stale, "the interrupted fail-back's agent ended already: nothing was tried here"
    p = cli(r.cfg, "failback", disk, "--yes", "--json", socket=eng.socket)  # at once
    assert p.returncode == 0, p.stdout + p.stderr
    assert "in use there" not in p.stderr, p.stderr
    r.bed.unblock()
    assert sha(disk) == sha(expected) == sha(image)
    st = eng.block_drain(disk)
    assert st["target_data"] == "consistent" and st["state"] != "switched over", st


def block_split_brain(block_remote, tmp_path):
    """A block entry captured here and written while its link was down, its replica promoted
    there (`replica promote`) and written too: a split brain once the link is back. (engine,
    device, remote, the replica's image seen from here, a copy of it, how many MiB blocks
    differ)"""
    eng, disk, r = block_remote()
    loop = eng.block(disk)["loop"]
    r.bed.link_down()
    dd(loop, mib=2)  # captured here, never sent
    p = on_target(r.bed, "replica", "promote", "disk.img", "--root", str(r.root))
    assert p.returncode == 0, p.stdout + p.stderr
    used = re.search(r"attached \S+ as (/dev/loop\d+)", p.stdout).group(1)
    subprocess.run(["losetup", "-d", used], check=True)
    image = r.bed.target_view(r.root / "disk.img")
    r.bed.run_on_target(["dd", "if=/dev/urandom", f"of={r.root / 'disk.img'}", "bs=1M",
                         "count=24", "seek=8", "conv=notrunc,fsync", "status=none"])
    expected = tmp_path / "expected.img"
    shutil.copyfile(image, expected)
    r.bed.link_up()
    wait_for("split brain", lambda: eng.block(disk)["target_data"] == "split-brain", 120, 0.2)
    differing = blocks_differing(disk, expected, 64 * MiB)
    assert differing >= 24
    return eng, disk, r, image, expected, differing


def test_a_split_brain_fail_back_cut_mid_way_leaves_the_mix_uncaptured_and_never_kept(
        block_remote, tmp_path):
    """Found by helper-35's walk: a split brain (both sides written), `failback --yes`, the link
    cut mid-way. The failure said "this host's copy is a mix", and then the capture was
    attached again over that mix: its loop usable, status saying only "split brain" with the
    advice `replica resolve --discard-target --yes` (the source wins), which copied the mix over
    the replica, the only whole copy of what was written there. Now the mix is not captured
    (it is handed over and read-only here, as after a switch-over: status says "fail-back
    interrupted"), attach and resolve are refused saying why, and the next fail-back ends it."""
    eng, disk, r, image, expected, differing = block_split_brain(block_remote, tmp_path)
    first, out, err = fail_back_cut_mid_way(r, eng, disk, expected, differing)
    assert first.returncode == 1 and f"this host's copy of {disk} is a mix" in err, out + err
    assert f"{disk} is not captured and is read-only here until then" in err, err
    st = eng.block(disk)
    assert not st["captured"] and st["state"] == "fail-back interrupted", st
    assert st["switched"]["failback_applied"] > 0, st
    assert subprocess.run(["blockdev", "--getro", disk], capture_output=True,  # nothing
                          text=True).stdout.strip() == "1"  # writes into the mix
    p = cli(r.cfg, "block", "attach-all", socket=eng.socket)
    assert p.returncode == 2 and f"a fail-back of {disk} from backup1:disk.img was interrupted: " \
        "this host's copy is a mix" in p.stderr, p.stdout + p.stderr
    replica = sha(image)
    p = cli(r.cfg, "replica", "resolve", disk, "--discard-target", "--yes", socket=eng.socket)
    assert p.returncode == 2 and "keeping this host would overwrite the replica with that mix" \
        in p.stderr, p.stdout + p.stderr
    assert f"Run `mirrorsetup failback {disk} --yes` again" in p.stderr, p.stderr
    r.bed.unblock()
    assert sha(image) == replica and [x["role"] for x in replicas(r)] == ["primary"]
    p = cli(r.cfg, "failback", disk, "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sha(disk) == sha(expected) == sha(image)
    st = eng.block_drain(disk)
    assert st["target_data"] == "consistent" and st["state"] != "fail-back interrupted", st


def test_a_daemon_killed_during_a_split_brain_fail_back_does_not_capture_the_mix_at_its_start(
        block_remote, tmp_path):
    """A split brain's fail-back (the capture lifted for it: no switch-over marker) whose daemon
    was killed (-9) once part of the replica had come back left only its fail-back marker, which
    was ignored: the daemon started again attached the mix as this host's own data, status
    saying nothing. Now it is not captured (and is read-only here, as the fail-back's own error
    path leaves it): status says "fail-back interrupted", this host's copy may be a mix, and
    what to run; attach-all refuses it (exit 2); the fail-back run again finishes it."""
    eng, disk, r, image, expected, differing = block_split_brain(block_remote, tmp_path)
    proc, out, err = fail_back_killed_mid_way(
        r, eng, disk, "part of the replica came back",
        lambda: blocks_differing(disk, expected, 64 * MiB) < differing - 2, every=0.3)
    assert proc.returncode == 1 and f"the daemon ended during the fail-back of {disk}" in err, \
        out + err
    assert 0 < blocks_differing(disk, expected, 64 * MiB) < differing  # a mix
    assert [m.name for m in Path(eng.state).rglob("*") if m.name in ("switched", "failback")] \
        == ["failback"], "not only the fail-back's marker left"
    eng.start()
    st = eng.block(disk)
    assert not st["captured"] and st["state"] == "fail-back interrupted", st
    assert f"a fail-back of {disk} from backup1:disk.img was interrupted: this host's copy may " \
        "be a mix of its own data and the replica's" in st["last_error"], st
    assert getro(disk) == "1", "the mix is writable"  # as its own error path leaves it
    p = cli(r.cfg, "status", socket=eng.socket)
    said = " ".join((p.stdout + p.stderr).split())
    assert "fail-back interrupted" in said and "fail-back from backup1:disk.img interrupted: " \
        "this host's copy may be a mix of its own data and the replica's until a fail-back " \
        f"finishes: run `mirrorsetup failback {disk} --yes` again" in said, said
    p = cli(r.cfg, "block", "attach-all", socket=eng.socket)
    assert p.returncode == 2 and f"a fail-back of {disk} from backup1:disk.img was interrupted: " \
        "this host's copy may be a mix" in p.stderr, p.stdout + p.stderr
    assert not eng.block(disk)["captured"]
    p = cli(r.cfg, "failback", disk, "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sha(disk) == sha(expected) == sha(image)
    st = eng.block_drain(disk)
    assert st["target_data"] == "consistent" and st["state"] != "fail-back interrupted", st
    assert [x["role"] for x in replicas(r)] == ["secondary"] and getro(disk) == "0"


def getro(device: str) -> str:
    return subprocess.run(["blockdev", "--getro", device], capture_output=True,
                          text=True).stdout.strip()


SQL_WRITER = r"""
import os, sqlite3, sys
db, log = sys.argv[1], sys.argv[2]
con = sqlite3.connect(db, isolation_level=None)
con.execute("PRAGMA synchronous=FULL")
con.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, pad BLOB)")
logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
i = 0
while True:
    con.execute("BEGIN")
    con.execute("INSERT INTO t VALUES (?, ?)", (i, os.urandom(500 + i % 3000)))
    con.execute("COMMIT")
    os.write(logfd, b"%d\n" % i)
    i += 1
"""


def test_fail_over_of_a_sqlite_directory_after_the_source_died(fs_remote, tmp_path):
    eng, src, r = fs_remote()
    log = str(tmp_path / "committed.log")
    w = subprocess.Popen([sys.executable, "-c", SQL_WRITER, os.path.join(src, "db.sqlite"), log])
    try:
        wait_for("commits", lambda: lines(log) >= 200, 60)
        # the source's resets never reach the target: its agent lingers until its heartbeats
        # time out (15 s), as when the link came back after the target's retransmissions
        r.bed._nft_rule(f"tcp dport {r.bed.port} tcp flags & rst == rst drop")
        r.bed.link_down()  # the source host dies: link cut, then everything of ours killed
        time.sleep(1)
        eng.kill9()
        eng.kill_orphan_workers()
        w.kill()
        w.wait()
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    committed = lines(log)

    [rep] = replicas(r)
    assert rep["role"] == "secondary" and rep["consistent"], rep
    p = on_target(r.bed, "replica", "promote", "data", "--root", str(r.root))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "promoted data: generation" in p.stdout and f"use it at {r.root / 'data'}" in p.stdout
    con = sqlite3.connect(r.root / "data" / "db.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ids = [row[0] for row in con.execute("SELECT id FROM t ORDER BY id")]
    con.close()
    assert ids == list(range(len(ids))), "not a gap-free prefix of the committed transactions"
    assert 0 < len(ids) <= committed + 1
    [rep] = replicas(r)
    assert rep["role"] == "primary" and rep["promoted"]["by"] == "fail-over", rep
    again = on_target(r.bed, "replica", "promote", "data", "--root", str(r.root))
    assert again.returncode == 2 and "already promoted" in again.stderr


def _promoted_while_the_link_was_down(eng, s: Path, r, meanwhile, before=lambda: None) -> dict:
    """a is replicated (then `before()` runs); the link goes down, `meanwhile()` runs here, the
    replica is promoted and t written there; the link comes back: the source's status once it
    is refused."""
    (s / "a").write_text("replicated")
    eng.drain(str(s))
    before()
    r.bed.link_down()
    meanwhile()
    p = on_target(r.bed, "replica", "promote", "data", "--root", str(r.root))
    assert p.returncode == 0, p.stdout + p.stderr
    (r.root / "data" / "t").write_text("written on the promoted replica")
    r.bed.link_up()
    return wait_for("refused", lambda: (x := eng.status(str(s)))["target_data"] in (
        "split-brain", "promoted") and x, 120, 0.2)


def test_a_split_brain_fail_back_says_once_what_became_of_the_changes_never_sent(fs_remote):
    """The source came back after a fail-over, with changes its target never received: the
    fail-back's lift said they were "kept in its journal for the next start" and the fail-back
    that they were dropped (found by a walk). Now both say dropped, and the data is the
    promoted replica's."""
    eng, src, r = fs_remote()
    s = Path(src)
    st = _promoted_while_the_link_was_down(eng, s, r, lambda: (s / "b").write_text(
        "captured here, never sent"))
    assert st["replication"] == "split brain" and "split brain: the target was promoted" in \
        st["last_error"], st  # b was captured here after the replica's last position
    p = cli(r.cfg, "failback", src, "--yes", "--json", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout)
    assert [x["action"] for x in res] == ["unmount", "failback", "mount"], res
    assert "were dropped by the fail-back" in res[0]["message"], res
    assert "kept" not in res[0]["message"] and "were dropped" in res[1]["message"], res
    assert res[1]["details"]["dropped_records"] >= 1, res
    assert not (s / "b").exists() and (s / "t").read_text() == "written on the promoted replica"
    assert replicas(r)[0]["role"] == "secondary"


def test_a_source_that_changed_nothing_since_the_promotion_is_failed_over_not_split(fs_remote):
    """Found by a walk: the target was promoted while the link was down and written there; the
    source, idle all along (its last position the one the replica had), was told "split
    brain" (both sides moved on) when the link came back. It is a fail-over: said as such,
    nothing marked on the target, and the same fail-back ends it. A second walk: its
    target_data still said "split-brain", and last_error an old error applying a record (a file
    the administrator had removed on the replica) instead of the fail-over, so the Targets
    screen's FAILED OVER line named that old error."""
    eng, src, r = fs_remote()
    s = Path(src)

    def an_old_apply_error() -> None:
        (r.root / "data" / "a").unlink()  # removed on the replica, then changed at the source
        os.utime(s / "a", ns=(1, 1))
        wait_for("the apply error", lambda: eng.status(src)["apply_errors"] > 0, 30)
        eng.drain(src)
    st = _promoted_while_the_link_was_down(eng, s, r, lambda: None, before=an_old_apply_error)
    assert st["replication"] == "failed over (no change here since)", st
    assert st["target_data"] == "promoted", st
    assert "failed over: the target was promoted at" in st["last_error"], st
    assert f"`mirrorsetup failback {src} --yes` brings it here" in st["last_error"], st
    [rep] = replicas(r)
    assert rep["role"] == "primary" and not rep.get("split_brain"), rep  # nothing marked there
    _read_only_after_the_fail_over(eng, r, s)
    p = cli(r.cfg, "switchover", src, socket=eng.socket)
    assert p.returncode == 1 and "promoted meanwhile (fail-over)" in p.stderr, p.stderr
    p = cli(r.cfg, "failback", src, "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (s / "t").read_text() == "written on the promoted replica"
    assert not (s / "a").exists()  # removed on the replica: the fail-back made this host the same
    assert replicas(r)[0]["role"] == "secondary"
    (s / "after").write_text("written after the fail-back")  # writable again, and replicated
    eng.drain(src)
    assert (r.root / "data" / "after").read_text() == "written after the fail-back"


def _read_only_after_the_fail_over(eng, r, s: Path) -> None:
    """The source after a fail-over is read-only (its replica is the newer copy: a write here
    would fork the history, and the fail-back would drop it), and status says so."""
    wait_for("read-only here", lambda: eng.status(str(s))["read_only_here"] is True, 30)
    with pytest.raises(OSError) as refused:
        (s / "late").write_text("written here after the promotion")
    assert refused.value.errno == errno.EROFS
    said = cli(r.cfg, "status", socket=eng.socket).stdout.replace("\n    ", " ")
    assert "read-only here: its replica was promoted and nothing changed here since" in said, said
    assert eng.status(str(s))["replication"] == "failed over (no change here since)"


def test_the_source_after_a_fail_over_is_read_only_until_it_wins_again(fs_remote):
    """An old source that came back after its replica was promoted accepted writes: each one
    turned the fail-over into a split brain (and a fail-back would drop it). Its mirrorfs mount
    is read-only now (its atime choice kept), refused while a file is open for writing there
    (status names who; tried again at the next refusal), and writable again once this host
    wins (`replica resolve --discard-target`)."""
    eng, src, r = fs_remote()
    s = Path(src)
    held = None

    def hold() -> None:  # open for writing (changing nothing) as the link comes back
        nonlocal held
        held = open(s / "a", "r+")

    def status() -> str:
        return cli(r.cfg, "status", socket=eng.socket).stdout.replace("\n    ", " ")

    def options() -> set[str]:
        return set([m.options for m in mounts.read_mountinfo() if m.mount_point == src][-1]
                   .split(","))
    before = options()
    try:
        _promoted_while_the_link_was_down(eng, s, r, hold)
        said = wait_for("the writer named", lambda: "could NOT be made read-only" in
                        (x := status()) and x, 30)
        assert f"pid {os.getpid()} (" in said and f"holds {s}/a" in said, said
        assert eng.status(src)["replication"] == "failed over (no change here since)"  # not written
    finally:
        if held is not None:
            held.close()
    _read_only_after_the_fail_over(eng, r, s)
    assert "rw" in before and options() == before - {"rw"} | {"ro"}, (before, options())
    p = cli(r.cfg, "replica", "resolve", src, "--discard-target", "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    wait_for("writable", lambda: eng.status(src)["read_only_here"] is None, 60)
    (s / "kept").write_text("this host won")
    eng.drain(src)
    assert (r.root / "data" / "kept").read_text() == "this host won"
    assert not (r.root / "data" / "t").exists()  # the promoted replica's write was discarded


def test_a_block_source_after_a_fail_over_refuses_writes_until_it_wins_again(block_remote):
    """The block side of the test above: an old source whose replica was promoted while the
    link was down (nothing changed here since) went on taking writes through its loop, each
    one a split brain. Its capture now refuses them (the loop fails them: EIO), unless the
    loop is open for writing or mounted as the link comes back: status then names who, and
    it is tried again at the next refusal. `replica resolve --discard-target` makes it
    writable, and a write then reaches the replica."""
    eng, disk, r = block_remote()
    dev = eng.block(disk)["loop"]
    dd(dev, mib=1, seek_mib=2)
    eng.block_drain(disk)
    r.bed.link_down()
    p = on_target(r.bed, "replica", "promote", "disk.img", "--root", str(r.root))
    assert p.returncode == 0, p.stdout + p.stderr
    used = re.search(r"attached \S+ as (/dev/loop\d+)", p.stdout).group(1)
    subprocess.run(["losetup", "-d", used], check=True)  # promoted, not used there
    held = os.open(dev, os.O_WRONLY | os.O_CLOEXEC)  # open for writing (writing nothing)
    try:
        r.bed.link_up()
        said = wait_for("the writer named", lambda: "could NOT be made read-only" in (x := cli(
            r.cfg, "status", socket=eng.socket).stdout.replace("\n    ", " ")) and x, 60, 0.2)
        assert f"{dev} open for writing by pid {os.getpid()} (" in said, said
        assert eng.block(disk)["replication"] == "failed over (no change here since)"
    finally:
        os.close(held)
    wait_for("writes refused", lambda: eng.block(disk)["read_only_here"] is True, 90, 0.2)
    image = r.bed.target_view(r.root / "disk.img")
    replica_before = sha(image)
    with pytest.raises(subprocess.CalledProcessError):
        dd(dev, mib=1, seek_mib=4)
    said = cli(r.cfg, "status", socket=eng.socket).stdout.replace("\n    ", " ")
    assert "read-only here: its replica was promoted" in said and "(its loop fails them: EIO)" \
        in said, said
    assert eng.block(disk)["replication"] == "failed over (no change here since)"
    p = cli(r.cfg, "replica", "resolve", disk, "--discard-target", "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    wait_for("writable", lambda: eng.block(disk)["read_only_here"] is None, 60, 0.2)
    dd(dev, mib=1, seek_mib=6)
    st = eng.block_drain(disk)
    assert st["target_data"] == "consistent", st
    assert sha(image) == sha(disk) != replica_before


def test_fail_over_of_a_block_device_split_brain_then_the_source_wins(remote, disks, tmp_path,
                                                                       unused_loop):
    make, r = remote(bed_opts={"private_mounts": True})
    disk = disks(64 * MiB)
    assert cli(r.cfg, "block", "add", disk, "--target", "backup1:disk.img").returncode == 0
    eng, _, _ = make(config=r.cfg)
    eng.block_drain(disk)
    loop = eng.block(disk)["loop"]
    subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ext4", loop, str(mnt)], check=True)
    try:
        for i in range(40):
            with open(mnt / f"f{i}", "wb") as f:
                f.write(os.urandom(64 << 10))
                f.flush()
                os.fsync(f.fileno())
        eng.block_drain(disk)
        # the source's resets never reach the target: its agent lingers until its heartbeats
        # time out (15 s), as when the link came back after the target's retransmissions
        r.bed._nft_rule(f"tcp dport {r.bed.port} tcp flags & rst == rst drop")
        r.bed.link_down()
        for i in range(40, 60):  # written, never shipped: the source dies with them
            (mnt / f"f{i}").write_bytes(os.urandom(64 << 10))
        os.sync()
        eng.kill9()
        eng.kill_orphan_workers()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)

    image = r.bed.target_view(r.root / "disk.img")
    where = tmp_path / "promoted"
    where.mkdir()
    p = on_target(r.bed, "replica", "promote", "disk.img", "--root", str(r.root), "--loop",
                  unused_loop, "--mount", str(where))
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"attached {r.root / 'disk.img'} as {unused_loop}" in p.stdout
    assert not (where / "f0").exists(), "the target's mount leaked into the source's view"
    p = on_target(r.bed, "replica", "promote", "disk.img", "--root", str(r.root), "--mount", str(where))
    assert p.returncode == 0 and f"mounted on {where} already" in p.stdout, p.stdout + p.stderr
    listing = r.bed.run_on_target(["ls", str(where)]).stdout.split()
    assert {f"f{i}" for i in range(40)} <= set(listing)
    r.bed.run_on_target(["umount", str(where)])
    fsck = subprocess.run(["e2fsck", "-fn", unused_loop], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    subprocess.run(["losetup", "-d", unused_loop], check=True)

    # the old source comes back: both sides have moved on
    replica_before, source_before = sha(image), sha(disk)
    r.bed.link_up()
    eng.start()
    st = wait_for("split brain", lambda: (s := eng.block(disk))["target_data"] == "split-brain" and s, 120)
    assert "split brain: the target was promoted at" in st["last_error"], st
    assert f"`mirrorsetup failback {disk} --yes`" in st["last_error"], st  # not a literal ENTRY
    assert st["replication"] == "split brain" and "refused" in st["connection"]
    [rep] = replicas(r)
    assert rep["role"] == "primary" and rep["split_brain"], rep
    line = on_target(r.bed, "replica", "list", "--root", str(r.root)).stdout
    assert "SPLIT BRAIN" in line, line
    time.sleep(3)
    assert sha(image) == replica_before and sha(disk) == source_before, "split brain wrote data"

    p = cli(r.cfg, "switchover", disk, socket=eng.socket)  # not "try again once connected"
    assert p.returncode == 1 and "split brain): there is nothing to switch over to" in p.stderr, p.stderr

    # the promoted replica in use there: a fail-back is refused before the capture is lifted
    # (it was lifted, refused by the agent, and attached again; found by a walk)
    p = on_target(r.bed, "replica", "promote", "disk.img", "--root", str(r.root))
    assert p.returncode == 0, p.stdout + p.stderr
    used = re.search(r"attached \S+ as (/dev/loop\d+)", p.stdout).group(1)
    try:
        p = cli(r.cfg, "failback", disk, "--yes", socket=eng.socket)
        assert p.returncode == 2 and f"is in use there: attached to {used}" in p.stderr, p.stdout + p.stderr
        assert f"(to free it: losetup -d {used})" in p.stderr, p.stderr  # how, not only what
        assert "nothing was changed (its capture goes on" in p.stderr, p.stderr
        assert eng.block(disk)["captured"] and sha(image) == replica_before
    finally:
        subprocess.run(["losetup", "-d", used], check=False)

    p = cli(r.cfg, "replica", "resolve", disk, socket=eng.socket)
    assert p.returncode == 2 and "say which side wins" in p.stderr
    p = cli(r.cfg, "replica", "resolve", disk, "--discard-target", "--yes", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    st = eng.block_drain(disk)
    assert st["target_data"] == "consistent", st
    assert sha(image) == sha(disk)
    assert replicas(r)[0]["role"] == "secondary"


def test_promote_while_the_source_is_connected_is_refused_within_seconds_and_changes_nothing(
        fs_remote):
    """`replica promote` on the target while the source's session is alive waited out a lost
    session's timeout (20 s) before it refused. The agent now stamps the replica's lock with
    the time of the source's last frame (its heartbeats come every second): promote refuses
    as soon as a frame comes while it waits. A source that died lately (no frame since) is
    still waited for: test_fail_over_of_a_sqlite_directory_after_the_source_died."""
    eng, src, r = fs_remote()
    (Path(src) / "f").write_bytes(b"replicated")
    eng.drain(src)
    t0 = time.monotonic()
    p = on_target(r.bed, "replica", "promote", "data", "--root", str(r.root))
    took = time.monotonic() - t0
    assert p.returncode != 0 and "its source is connected" in p.stderr, p.stdout + p.stderr
    assert "sent a frame while promote waited" in p.stderr and "switchover" in p.stderr, p.stderr
    assert took < 12, took  # (it was 20 s: the heartbeat timeout and 5 s)
    [rep] = replicas(r)
    assert rep["role"] == "secondary" and rep["consistent"], rep
    (Path(src) / "g").write_bytes(b"still replicated")
    eng.drain(src)
    assert (r.root / "data" / "g").read_bytes() == b"still replicated"


def target_replica(root: Path, name: str, kind: str, **state):
    """A replica as the agent keeps it below `root` (no source, no network): its bookkeeping
    with `state`, and `promote(*options)` running `replica promote NAME --root ROOT` there."""
    from app.engine.agent import Replica
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        rep = Replica(fd, str(root), name, kind)
    finally:
        os.close(fd)
    rep.save({"source": {"host": "h", "entry": f"{kind}:/src"}, "kind": kind, "path": name,
              "role": "secondary", "generation": "g1", "consistent": True, "consistent_seq": 0,
              **state})

    def promote(*extra):
        return subprocess.run([sys.executable, "-m", "app", "replica", "promote", name, "--root",
                               str(root), *extra], capture_output=True, text=True, cwd=REPO)
    return rep, promote


def test_promoting_an_inconsistent_replica_needs_force_and_applies_what_arrived(tmp_path):
    """The target host's side alone (no source, no network): a replica whose resync was
    running is refused unless --force; what it received but had not applied is applied first."""
    from app.engine.agent import META
    from app.engine.journal import KIND_FS, Journal, Record
    root = tmp_path / "replicas"
    (root / "data").mkdir(parents=True)
    rep, promote = target_replica(root, "data", "fs", consistent=False, inconsistent_since=time.time())
    j = Journal(rep.dir, kind=KIND_FS)
    j.ingest_durably([Record(1, KIND_FS, "mkdir", {"path": "arrived", "mode": 0o750, "uid": 0, "gid": 0}),
                      Record(2, KIND_FS, "create", {"path": "arrived/f", "mode": 0o640, "uid": 0, "gid": 0})])
    j.close()
    listed = subprocess.run([sys.executable, "-m", "app", "replica", "list", "--root", str(root)],
                            capture_output=True, text=True, cwd=REPO).stdout
    assert "data (fs, replica of /src): inconsistent: a resync was interrupted (inconsistent since" \
        in listed, listed
    p = promote()
    assert p.returncode == 2 and "inconsistent" in p.stderr and "--force --yes" in p.stderr, p.stderr
    assert not (root / "data" / "arrived").exists() and rep.state()["role"] == "secondary"
    p = promote("--force")  # no terminal: --force is confirmed with --yes
    assert p.returncode == 2 and "--yes" in p.stderr and rep.state()["role"] == "secondary"
    p = promote("--force", "--yes")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "applied the 2 records received but not yet applied" in p.stdout
    assert stat_mode(root / "data" / "arrived") == 0o750 and (root / "data" / "arrived" / "f").is_file()
    state = rep.state()
    assert state["role"] == "primary" and state["generation"] != "g1"
    assert state["promoted"]["by"] == "fail-over (forced, inconsistent)"
    assert (root / META).is_dir()


def test_promote_of_a_replica_whose_data_was_removed_promotes_nothing(tmp_path):
    """Found by helper-25's walk: the image of a block replica was removed on the target, then
    `replica promote` (fail-over) promoted it, a new generation the old source is refused by,
    and only then failed: "promoted, but not usable yet: … No such file or directory". Now it
    is refused first, by name (exit 2: refused before anything changed), and nothing changes."""
    root = tmp_path / "replicas"
    root.mkdir()
    rep, promote = target_replica(root, "disk.img", "block")
    p = promote()
    assert p.returncode == 2 and "holds no data" in p.stderr and "nothing was promoted" in \
        p.stderr, p.stdout + p.stderr
    assert "promoted disk.img" not in p.stdout, p.stdout
    assert rep.state()["role"] == "secondary" and rep.state()["generation"] == "g1"


def test_promote_checks_the_mount_point_before_it_promotes(tmp_path):
    """`replica promote --mount` of a file, a relative path, a path whose parent is missing or
    one inside the replicas' root was refused only by mount(2), after the promotion: "File
    exists", exit 2, as if nothing had changed; `/`, a parent of the root, /proc or a full
    directory were mounted over (found by walks). Now refused first and nothing changes."""
    root = tmp_path / "replicas"
    (root / "data").mkdir(parents=True)
    (root / "data" / "f").write_text("x")
    rep, promote = target_replica(root, "data", "fs")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    full = tmp_path / "full"
    full.mkdir()
    (full / "important").write_text("would be hidden")
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "walk-tmpfs", str(mounted)], check=True)
    try:
        for where, said in [(str(a_file), "not a directory"), ("relative/dir", "not an absolute path"),
                            (str(tmp_path / "no" / "such" / "dir"), "does not exist"),
                            (str(a_file / "x"), f"its parent {a_file} is not a directory"),
                            (str(root / "elsewhere"), "inside the replicas' root"),
                            ("/", "the root directory"), (str(tmp_path), "above the replicas' root"),
                            (str(full), "not empty"), (str(mounted), "something is mounted there")]:
            p = promote("--mount", where)
            assert p.returncode == 2 and said in p.stderr and where in p.stderr, (where, p.stderr)
            assert rep.state()["role"] == "secondary", where
    finally:
        subprocess.run(["umount", str(mounted)], check=False)
    assert not (tmp_path / "no").exists() and not (root / "elsewhere").exists()

    where = tmp_path / "usable"  # missing, its parent there: made, and said
    p = promote("--mount", str(where))
    try:
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"made the directory {where}" in p.stdout and (where / "f").read_text() == "x"
        assert rep.state()["role"] == "primary"
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_promote_says_the_replica_was_promoted_when_making_it_usable_fails(tmp_path):
    """`--loop` naming a loop that is busy (or not a loop) was met only after the promotion:
    the error said only that step, exit 2 ("nothing changed") though the replica was primary
    by then. Now refused before; a step that fails after the promotion says it happened."""
    root = tmp_path / "replicas"
    root.mkdir()
    with open(root / "disk.img", "wb") as f:
        f.truncate(1 << 20)
    rep, promote = target_replica(root, "disk.img", "block")
    scratch = tmp_path / "scratch"
    with open(scratch, "wb") as f:
        f.truncate(1 << 20)
    busy = subprocess.run(["losetup", "-f", "--show", str(scratch)], capture_output=True, text=True,
                          check=True).stdout.strip()  # ours: attached to our own file
    try:
        for loop, said in [(busy, f"--loop {busy} is busy (attached to {scratch})"),
                           ("/dev/sda", "not a loop device path")]:
            p = promote("--loop", loop)
            assert p.returncode == 2 and said in p.stderr, p.stdout + p.stderr
            assert rep.state()["role"] == "secondary"
        p = promote("--mount", str(scratch.parent / "mnt"))  # mount(8) of a loop with no file system
        assert p.returncode == 1, p.stdout + p.stderr
        assert "promoted disk.img: generation" in p.stdout, p.stdout  # what was done, then what failed
        assert "disk.img is promoted, but not usable yet: mount" in p.stderr, p.stderr
        assert rep.state()["role"] == "primary"
        p = promote("--mount", str(scratch.parent / "mnt"))  # asked again: the same, said the same way
        assert p.returncode == 1 and "is already promoted" in p.stdout and "attached as /dev/loop" \
            in p.stdout, p.stdout + p.stderr
        assert "disk.img is promoted, but not usable yet: mount" in p.stderr, p.stderr
    finally:
        for line in subprocess.run(["losetup", "-j", str(root / "disk.img")], capture_output=True,
                                   text=True).stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)
        subprocess.run(["losetup", "-d", busy], check=False)


def stat_mode(p: Path) -> int:
    return p.stat().st_mode & 0o7777


def test_fail_back_to_a_rebuilt_source_needs_adopt_target(fs_remote):
    """The source host died for good and was rebuilt: its directory is empty and its state
    directory gone, so it holds no history the promoted replica came from. A fail-back to it
    is refused, by name, as any other history is; an entry that says adopt_target takes the
    promoted replica back whole, and the replica is its secondary from then on."""
    eng, src, r = fs_remote()
    s = Path(src)
    (s / "d").mkdir()
    (s / "d" / "f").write_bytes(os.urandom(300_000))
    eng.drain(src)
    r.bed.link_down()  # the source host dies
    time.sleep(0.5)
    eng.kill9()
    eng.kill_orphan_workers()
    subprocess.run(["umount", "-l", src], check=False)
    for line in open("/proc/self/mountinfo"):  # the dead capture's own mounts under its run dir
        point = line.split()[4]
        if point.startswith(str(Path(eng.state).parent)) and "/run/" in point:
            subprocess.run(["umount", "-l", point], check=False)
    p = on_target(r.bed, "replica", "promote", "data", "--root", str(r.root))
    assert p.returncode == 0, p.stdout + p.stderr
    replica = r.root / "data"
    (replica / "d" / "after-fail-over").write_text("written on the target")

    # the rebuilt host: the same configuration, an empty directory, no state
    r.bed.link_up()
    shutil.rmtree(eng.state)
    for child in s.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    eng.start()
    p = cli(r.cfg, "failback", src, "--yes", "--json", socket=eng.socket)
    assert p.returncode == 1 and "adopt" in p.stderr, p.stdout + p.stderr
    assert not (s / "d").exists() and replicas(r)[0]["role"] == "primary"

    eng.stop()
    assert cli(r.cfg, "fs", "remove", src).returncode == 0
    assert cli(r.cfg, "fs", "add", src, "--target", "backup1:data", "--adopt-target").returncode == 0
    eng.start()
    p = cli(r.cfg, "failback", src, "--yes", "--json", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert full_tree(s) == full_tree(replica)
    assert (s / "d" / "after-fail-over").read_text() == "written on the target"
    [rep] = replicas(r)
    assert rep["role"] == "secondary", rep
    (s / "back").write_text("replicated again")
    st = eng.drain(src)
    assert st["target_data"] == "consistent", st
    assert (replica / "back").read_text() == "replicated again"
    assert eng.verify(src) == []


def test_fail_back_of_a_block_device_to_a_rebuilt_source(block_remote):
    """The same for a block entry: the rebuilt host's device is blank and its state gone; with
    adopt_target the promoted image comes back whole and replication goes on from there."""
    eng, disk, r = block_remote()
    dd(eng.block(disk)["loop"], mib=8, seek_mib=4)
    eng.block_drain(disk)
    r.bed.link_down()  # the source host dies
    time.sleep(0.5)
    eng.kill9()
    eng.kill_orphan_workers()
    p = on_target(r.bed, "replica", "promote", "disk.img", "--root", str(r.root))
    assert p.returncode == 0, p.stdout + p.stderr
    used = re.search(r"as (/dev/loop\d+)", p.stdout).group(1)  # where it is used there
    try:
        dd(used, mib=2, seek_mib=40)
    finally:  # stopped using it, as fail-back asks (and never left bound by a failure)
        subprocess.run(["losetup", "-d", used], check=True)
    image = r.bed.target_view(r.root / "disk.img")

    r.bed.link_up()  # the rebuilt host: a blank device, no state
    shutil.rmtree(eng.state)
    dd(disk, src="/dev/zero", mib=64)
    eng.start()
    p = cli(r.cfg, "failback", disk, "--yes", socket=eng.socket)
    assert p.returncode == 1 and "adopt_target" in p.stderr, p.stdout + p.stderr
    eng.stop()
    assert cli(r.cfg, "block", "remove", disk).returncode == 0
    a = cli(r.cfg, "block", "add", disk, "--target", "backup1:disk.img", "--adopt-target")
    assert a.returncode == 0, a.stdout + a.stderr
    eng.start()
    p = cli(r.cfg, "failback", disk, "--yes", "--json", socket=eng.socket)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sha(disk) == sha(image)
    assert replicas(r)[0]["role"] == "secondary"
    loop = wait_for("the loop", lambda: eng.block(disk)["loop"], 60)
    dd(loop, mib=1, seek_mib=60)
    st = eng.block_drain(disk)
    assert st["target_data"] == "consistent", st
    assert sha(disk) == sha(image)


def test_a_rebuilt_source_adopts_its_secondary_replica_with_adopt_target(block_remote):
    """Found by helper-25's walk: a source rebuilt (state gone) whose replica was never promoted
    is refused as another history, "adopt_target replaces it"; with adopt_target on its entry
    the agent took the replica (its generation) but kept its journal's positions, so the
    source refused it in turn, for good: "the target holds records up to N but this source
    only up to 0: its history is not ours (adopt_target replaces it)". Adopted, the replica's
    old records are no history of this source: it is compared and made equal instead."""
    eng, disk, r = block_remote()
    dd(eng.block(disk)["loop"], mib=8, seek_mib=4)
    eng.block_drain(disk)
    assert eng.stop() == 0
    shutil.rmtree(eng.state)  # the rebuilt host: its state is gone, its device holds other data
    dd(disk, mib=4, seek_mib=30)
    assert cli(r.cfg, "block", "remove", disk).returncode == 0
    a = cli(r.cfg, "block", "add", disk, "--target", "backup1:disk.img", "--adopt-target")
    assert a.returncode == 0, a.stdout + a.stderr
    eng.start()
    deadline = time.monotonic() + 60
    while True:
        st = eng.block(disk)
        if st["captured"] and st["catch_up"] is None and st["target_data"] == "consistent" \
                and st["applied_seq"] == st["last_seq"]:
            break
        assert time.monotonic() < deadline, repr(st)
        time.sleep(0.1)
    assert st["connection"] == "connected" and st["last_error"] is None, st
    assert sha(r.root / "disk.img") == sha(disk)
    loop = eng.block(disk)["loop"]
    dd(loop, mib=1, seek_mib=50)  # and replication goes on from there
    eng.block_drain(disk)
    assert sha(r.root / "disk.img") == sha(disk)


def test_the_fence_of_a_directory_is_told_by_what_it_is_not_by_a_mount_id(tmp_path):
    """Found on a busy host: the read-only bind that fences a switched-over directory was
    recognised by the mount id kept in its marker. Ids are reused (here by any mount made
    meanwhile; after a reboot by any mount at all), so a fence whose id was not the kept one
    was not seen: the daemon's start fenced again on top of it, and the fail-back lifted only
    the top one and then found the entry "in use: mounted at" itself. Now the fence is a
    read-only bind of the directory onto itself, whatever its id: made once, seen, lifted."""
    from app.engine.failover import fence, fenced, unfence
    from app.services import mounts
    key = str(tmp_path / "entry")
    os.mkdir(key)
    (Path(key) / "f").write_text("here")

    def stacked() -> int:
        return sum(m.mount_point == key for m in mounts.read_mountinfo())
    try:
        info = fence("fs", key, None)
        assert stacked() == 1 and "read_only_mount" in info, info
        with pytest.raises(OSError) as refused:
            (Path(key) / "g").write_text("refused")
        assert refused.value.errno == errno.EROFS
        stale = {"read_only_mount": info["read_only_mount"] + 100000}  # a marker naming another id
        assert fenced("fs", key, None, stale)
        again = fence("fs", key, None)  # the daemon's start after the marker lost track of it
        assert stacked() == 1 and again == info, again
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "stranger", key], check=True)
        assert not fenced("fs", key, None, info)  # a read-only mount that is no bind of it
        subprocess.run(["umount", key], check=True)
        unfence("fs", key, None, stale)
        assert stacked() == 0
        (Path(key) / "g").write_text("written again")
    finally:
        for _ in range(8):
            if not stacked():
                break
            subprocess.run(["umount", "-l", key], check=False)


def test_who_uses_a_promoted_replica_is_found_by_any_name_and_in_any_mount_namespace(tmp_path):
    """A fail-back refused for a replica in use on the target missed (found by a walk): a bind
    of it in another mount namespace (a container's), a loop attached through a hard link of
    the image, and a process holding the image open by another name. Real mounts, a real
    namespace (unshare), a real loop; everything made here is undone here."""
    from app.engine.agent import replica_users
    root = tmp_path / "replicas"
    (root / "data").mkdir(parents=True)
    with open(root / "disk.img", "wb") as f:
        f.truncate(1 << 20)
    assert replica_users(str(root), "data", "fs") == []
    assert replica_users(str(root), "disk.img", "block") == []
    elsewhere = tmp_path / "container-view"
    elsewhere.mkdir()
    ready = tmp_path / "ready"
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               'mount --bind "$0" "$1" && : > "$2" && exec sleep 300',
                               str(root / "data"), str(elsewhere), str(ready)])
    link = tmp_path / "another-name.img"
    os.link(root / "disk.img", link)
    loop = None
    opener = None
    try:
        wait_for("the namespace's bind", ready.exists, 30, 0.05)
        users = replica_users(str(root), "data", "fs")
        assert users == [f"mounted at {elsewhere} in the mount namespace of pid {holder.pid} (sleep)"], users
        loop = subprocess.run(["losetup", "-f", "--show", str(link)], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert replica_users(str(root), "disk.img", "block") == [
            f"attached to {loop} (to free it: losetup -d {loop})"]
        subprocess.run(["losetup", "-d", loop], check=True)
        loop = None
        opener = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); "
                                   "print('open', flush=True); time.sleep(300)", str(link)],
                                  stdout=subprocess.PIPE, text=True)
        assert opener.stdout.readline().strip() == "open"
        users = replica_users(str(root), "disk.img", "block")
        assert len(users) == 1 and users[0].startswith(f"open by pid {opener.pid} ("), users
    finally:
        for p in (holder, opener):
            if p is not None:
                p.kill()
                p.wait()
        if loop is not None:
            subprocess.run(["losetup", "-d", loop], check=False)
