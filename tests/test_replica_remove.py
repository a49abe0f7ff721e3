"""`mirrorsetup replica remove NAME --root DIR` on the target host: a replica no source needs
any more (found in a walk: an interrupted first copy's replica and its agent journal kept the
root full, and the administrator had to guess what to rm). Real files below the test's own
root, a real agent holding the lock, real mounts and loops; everything made here is undone."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli_conventions import REPO, cli
from test_failover import target_replica

pytestmark = pytest.mark.root


def remove(root: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return cli("replica", "remove", name, "--root", str(root), *extra)


def listed(root: Path) -> list[str]:
    r = cli("replica", "list", "--root", str(root), "--json")
    assert r.returncode == 0, r.stderr
    return sorted(rep["name"] for rep in json.loads(r.stdout))


def used_bytes(path: Path) -> int:
    """What `path` and everything under it take on disk (as du counts it, each inode once)."""
    seen = {}
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        st = p.lstat()
        seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(seen.values())


def two_replicas(root: Path):
    """`data` (a directory with files) and `disk.img` (an image with blocks written), as an
    interrupted first copy leaves them: inconsistent secondaries of their sources."""
    (root / "data" / "sub").mkdir(parents=True)
    (root / "data" / "sub" / "f").write_bytes(os.urandom(300_000))
    (root / "data" / "g").write_bytes(b"small")
    with open(root / "disk.img", "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(200_000))
    data, _ = target_replica(root, "data", "fs", consistent=False)
    disk, _ = target_replica(root, "disk.img", "block", consistent=False)
    for rep in (data, disk):  # the lock its session held, as that session left it
        rep.lock({"host": "h", "entry": f"{rep.kind}:/src"})
        os.close(rep.lock_fd)
    return data, disk


def agent_asked(root: Path, name: str, kind: str = "fs", *, under: tuple = (),
                **hello) -> subprocess.Popen:
    """A real agent (serve-target below `root`, run `under` a tracer if given) asked to
    replicate `name` for /srv/NAME on src1; its answer is for the caller to read."""
    from app.services import wire
    agent = subprocess.Popen([*under, sys.executable, "-m", "app", "serve-target", "--root",
                              str(root)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    try:
        wire.skip_to_greeting(agent.stdout.read)
        agent.stdin.write(wire.jframe(wire.HELLO, {
            "version": wire.VERSION, "action": "replicate", "path": name, "kind": kind,
            "source": {"host": "src1", "entry": f"{kind}:/srv/{name}"}, "generation": "g1",
            **hello}))
        agent.stdin.flush()
    except BaseException:
        agent.kill()
        agent.wait()
        raise
    return agent


def end(agent: subprocess.Popen) -> None:
    agent.stdin.close()
    agent.wait(30)
    agent.stdout.close()


def test_remove_takes_that_replica_its_journal_and_state_and_leaves_the_other(tmp_path):
    from app.engine.journal import KIND_FS, Journal, Record
    root = tmp_path / "replicas"
    data, disk = two_replicas(root)
    j = Journal(data.dir, kind=KIND_FS)  # received, never applied: the journal takes room too
    j.ingest_durably([Record(1, KIND_FS, "mkdir", {"path": "arrived", "mode": 0o750, "uid": 0,
                                                   "gid": 0})])
    j.close()
    assert listed(root) == ["data", "disk.img"]
    data_bytes, journal_bytes = used_bytes(root / "data"), used_bytes(data.dir)
    disk_before = (root / "disk.img").read_bytes()
    disk_state = disk.state()

    r = remove(root, "data", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (root / "data").exists() and not data.dir.exists()
    assert listed(root) == ["disk.img"]  # the other one, untouched
    assert (root / "disk.img").read_bytes() == disk_before and disk.state() == disk_state
    from app.services.units import human_size
    said = r.stdout
    assert f"removed replica data (fs, replica of /src): its data {root / 'data'} " \
           f"({human_size(data_bytes)}) and its journal and state {data.dir} " \
           f"({human_size(journal_bytes)}); {human_size(data_bytes + journal_bytes)} freed" in said, said

    disk_bytes, disk_journal_bytes = used_bytes(root / "disk.img"), used_bytes(disk.dir)
    r = remove(root, "disk.img", "--yes", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    [done] = json.loads(r.stdout)
    d = done["details"]
    assert done["outcome"] == "ok" and d["name"] == "disk.img" and d["kind"] == "block"
    assert (d["data_bytes"], d["bookkeeping_bytes"]) == (disk_bytes, disk_journal_bytes)
    assert d["data_bytes"] >= 200_000 and d["freed_bytes"] == disk_bytes + disk_journal_bytes
    assert d["removed"] == [str(root / "disk.img"), str(disk.dir)]
    assert listed(root) == [] and not (root / "disk.img").exists() and not disk.dir.exists()


def test_remove_of_an_unknown_name_says_which_replicas_there_are(tmp_path):
    root = tmp_path / "replicas"
    two_replicas(root)
    r = remove(root, "nosuch", "--yes")
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert "no replica named 'nosuch'" in r.stderr and "data, disk.img" in r.stderr, r.stderr
    assert f"`mirrorsetup replica list --root {root}`" in r.stderr
    refusal = json.loads(remove(root, "nosuch", "--yes", "--json").stdout)
    assert refusal["errno_name"] == "ENOENT" and "nosuch" in refusal["error"]
    assert listed(root) == ["data", "disk.img"]


def test_remove_without_yes_is_refused_when_nobody_can_answer(tmp_path):
    """Without a terminal (a script, ssh without -t) it takes --yes, as failback does."""
    root = tmp_path / "replicas"
    two_replicas(root)
    for extra in ((), ("--json",)):
        r = subprocess.run([sys.executable, "-m", "app", "replica", "remove", "data", "--root",
                            str(root), *extra], cwd=REPO, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "Remove the replica data (fs, replica of /src)" in r.stderr, r.stderr
        assert "give --yes to confirm (nothing was changed)" in r.stderr, r.stderr
        if extra:
            assert json.loads(r.stdout)["errno_name"] == "EINVAL"
    assert listed(root) == ["data", "disk.img"] and (root / "data" / "sub" / "f").is_file()


def test_remove_at_a_terminal_asks_first(tmp_path):
    """At a terminal it asks, as failback does: no keeps it (exit 2), yes removes it."""
    import pty
    root = tmp_path / "replicas"
    two_replicas(root)
    for answer, code in (("n", 2), ("y", 0)):
        master, slave = pty.openpty()
        try:
            os.write(master, f"{answer}\n".encode())
            r = subprocess.run([sys.executable, "-m", "app", "replica", "remove", "data", "--root",
                                str(root)], cwd=REPO, capture_output=True, text=True, stdin=slave,
                               timeout=60)
        finally:
            os.close(master)
            os.close(slave)
        assert r.returncode == code, (answer, r.stdout + r.stderr)
        assert "Remove the replica data (fs, replica of /src)" in r.stdout, r.stdout
        if answer == "n":
            assert "not confirmed: nothing was changed" in r.stderr, r.stderr
            assert listed(root) == ["data", "disk.img"] and (root / "data" / "g").is_file()
    assert "removed replica data" in r.stdout and listed(root) == ["disk.img"]


def test_remove_while_a_sources_session_holds_it_names_the_session_then_goes_once_it_ended(
        tmp_path):
    """A real agent (serve-target) replicating `data` for /srv/data on src1 holds the lock."""
    from app.services import wire
    root = tmp_path / "replicas"
    root.mkdir()
    agent = agent_asked(root, "data")
    try:
        assert wire.read_frame(agent.stdout.read)[0] == wire.WELCOME
        (root / "data" / "f").write_bytes(b"a first copy's file")
        r = remove(root, "data", "--yes")
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"replica data is locked by the replication session of /srv/data on src1 " \
               f"(agent pid {agent.pid}): stop that entry on its source first (on src1: " \
               "`mirrorsetup fs remove /srv/data` ends its replication)" in r.stderr, r.stderr
        assert "nothing was removed" in r.stderr
        refusal = json.loads(remove(root, "data", "--yes", "--json").stdout)
        assert refusal["errno_name"] == "EBUSY"
        assert (root / "data" / "f").is_file() and listed(root) == ["data"]
    finally:
        end(agent)
    r = remove(root, "data", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert listed(root) == [] and not (root / "data").exists()


def test_remove_of_a_promoted_replica_in_use_names_who_uses_it(tmp_path):
    """Promoted (a fail-over), then bind-mounted, attached to a loop, or open in a process:
    refused with each named; once nothing uses it, removed."""
    root = tmp_path / "replicas"
    (root / "data").mkdir(parents=True)
    (root / "data" / "f").write_text("promoted data")
    with open(root / "disk.img", "wb") as f:
        f.truncate(1 << 20)
    promoted = {"role": "primary", "promoted": {"time": 1.0, "by": "fail-over", "seq": 0}}
    target_replica(root, "data", "fs", **promoted)
    target_replica(root, "disk.img", "block", **promoted)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "--bind", str(root / "data"), str(mnt)], check=True)
    loop = opener = None
    try:
        r = remove(root, "data", "--yes")
        assert r.returncode == 2 and f"replica data is promoted and in use on this host: " \
            f"mounted at {mnt}: stop using it first" in r.stderr, r.stdout + r.stderr
        assert json.loads(remove(root, "data", "--yes", "--json").stdout)["errno_name"] == "EBUSY"
        subprocess.run(["umount", str(mnt)], check=True)
        inner = root / "data" / "inner"  # another file system below it: never walked into
        inner.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "helper-tmpfs", str(inner)],
                       check=True)
        (inner / "theirs").write_text("on another file system")
        r = remove(root, "data", "--yes")
        subprocess.run(["umount", str(inner)], check=True)
        assert r.returncode == 2 and f"mounted at {inner}" in r.stderr, r.stdout + r.stderr
        loop = subprocess.run(["losetup", "-f", "--show", str(root / "disk.img")],
                              capture_output=True, text=True, check=True).stdout.strip()
        r = remove(root, "disk.img", "--yes")
        assert r.returncode == 2 and f"attached to {loop}" in r.stderr and "promoted and in use" \
            in r.stderr, r.stdout + r.stderr
        subprocess.run(["losetup", "-d", loop], check=True)
        loop = None
        opener = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); "
                                   "print('open', flush=True); time.sleep(300)",
                                   str(root / "disk.img")], stdout=subprocess.PIPE, text=True)
        assert opener.stdout.readline().strip() == "open"
        r = remove(root, "disk.img", "--yes")
        assert r.returncode == 2 and f"open by pid {opener.pid}" in r.stderr, r.stdout + r.stderr
        assert (root / "disk.img").is_file() and listed(root) == ["data", "disk.img"]
    finally:
        if opener is not None:
            opener.kill()
            opener.wait()
            opener.stdout.close()
        if loop is not None:
            subprocess.run(["losetup", "-d", loop], check=False)
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        subprocess.run(["umount", str(root / "data" / "inner")], check=False, capture_output=True)
    for name in ("data", "disk.img"):
        r = remove(root, name, "--yes")
        assert r.returncode == 0, r.stdout + r.stderr
    assert listed(root) == [] and not (root / "data").exists() and not (root / "disk.img").exists()


def test_remove_never_reaches_outside_the_root(tmp_path):
    """Names a session would refuse (a `..` in the state's path, a symlink on the way or in
    the data's place, bookkeeping that is a symlink) are refused: nothing outside is touched,
    nothing of the replica removed."""
    from app.engine.agent import META, replica_id
    root = tmp_path / "replicas"
    root.mkdir()
    outside = tmp_path / "outside"
    (outside / "data").mkdir(parents=True)
    (outside / "data" / "precious").write_text("not the replica's")
    (outside / "state.json").write_text(json.dumps({"path": "elsewhere", "kind": "fs"}))
    before = sorted(str(p) for p in outside.rglob("*"))

    up, _ = target_replica(root, "up", "fs")
    up.save({**up.state(), "path": "../outside/data"})  # a state file edited by hand
    target_replica(root, "via/data", "fs")
    (root / "via").symlink_to(outside)  # a symlink on the way to the data
    target_replica(root, "link", "fs")
    (root / "link").symlink_to(outside / "data")  # a symlink in the data's place
    (root / "elsewhere").mkdir()
    (root / META / "replicas" / replica_id("elsewhere")).symlink_to(outside)  # bookkeeping
    for name, said, err in [("../outside/data", "path escapes or is not normal", "EINVAL"),
                            ("via/data", "a directory on its way there is a symlink", "ENOTDIR"),
                            ("link", "is not the directory a session makes (a symlink", "ELOOP"),
                            ("elsewhere", "a directory on its way there is a symlink", "ENOTDIR")]:
        r = remove(root, name, "--yes", "--json")
        assert r.returncode == 2 and said in r.stderr and "nothing was removed" in r.stderr, \
            (name, r.stdout + r.stderr)
        assert json.loads(r.stdout)["errno_name"] == err, (name, r.stdout)
    assert sorted(str(p) for p in outside.rglob("*")) == before
    assert (outside / "data" / "precious").read_text() == "not the replica's"
    assert listed(root) == sorted(["../outside/data", "via/data", "link", "elsewhere"])
    assert stat.S_ISLNK((root / "link").lstat().st_mode) and (root / "elsewhere").is_dir()


def test_remove_of_a_replica_whose_data_is_gone_removes_its_journal_and_state(tmp_path):
    """Its data removed by hand already (and, for one, the directory above it): what is left
    of it, its journal and state, is removed, and that its data was not there is said."""
    root = tmp_path / "replicas"
    root.mkdir()
    gone, _ = target_replica(root, "gone", "fs")
    (root / "a" / "b").mkdir(parents=True)
    above, _ = target_replica(root, "a/b/disk.img", "block")
    (root / "a" / "b").rmdir()
    for rep in (gone, above):
        r = remove(root, rep.rel, "--yes")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"its data {root / rep.rel} was not there and its journal and state {rep.dir}" \
            in r.stdout, r.stdout
        assert not rep.dir.exists()
    assert listed(root) == [] and (root / "a").is_dir()  # what is above it is left


def session_before_its_state(root: Path, name: str, kind: str, **hello):
    """A real agent (serve-target) making the new replica `name`, stopped (SIGSTOP, by strace
    as it opens its state.json.tmp) after it made the bookkeeping, took the lock and made the
    data, before it wrote state.json: (strace's process, the agent's pid)."""
    import psutil
    from app.engine.agent import META, replica_id
    tmp = root / META / "replicas" / replica_id(name) / "state.json.tmp"
    tracer = agent_asked(root, name, kind, under=(
        "strace", "-f", "-qq", "-o", "/dev/null", "-P", str(tmp), "-e", "trace=openat",
        "-e", "inject=openat:signal=STOP"), **hello)
    stopped = (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)  # (traced: "t")
    deadline, seen = time.monotonic() + 30, 0
    while time.monotonic() < deadline and seen < 5:  # (a traced syscall stops it a moment)
        agents = psutil.Process(tracer.pid).children()
        seen = seen + 1 if agents and (root / name).exists() and \
            agents[0].status() in stopped else 0
        time.sleep(0.1)
    assert seen == 5, "the agent did not reach its state.json"
    return tracer, agents[0].pid


def test_remove_of_a_replica_whose_session_was_killed_before_it_wrote_its_state(tmp_path):
    """A session killed after it made a new replica's bookkeeping, lock and data but before its
    state.json left what `replica list` does not show, and `replica remove NAME` said 'no
    replica named NAME … it keeps none' (exit 2): the root kept it for good. It is removed
    now (the data empty, as its session left it), with the refusals of any replica: held by a
    session, without --yes, in use."""
    from app.engine.agent import META, replica_id
    root = tmp_path / "replicas"
    root.mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for name, kind, hello in (("data", "fs", {}), ("disk.img", "block", {"size": 4 << 20})):
        bookkeeping = root / META / "replicas" / replica_id(name)
        tracer, agent = session_before_its_state(root, name, kind, **hello)
        try:
            assert (root / name).exists() and (bookkeeping / "lock").is_file()
            assert not (bookkeeping / "state.json").exists() and listed(root) == []
            r = remove(root, name, "--yes")  # its session (stopped) still holds the lock
            assert r.returncode == 2 and f"replica {name} is locked by the replication session " \
                f"of /srv/{name} on src1 (agent pid {agent})" in r.stderr, r.stdout + r.stderr
        finally:
            os.kill(agent, signal.SIGKILL)  # killed before it wrote its state
            end(tracer)
        assert not (bookkeeping / "state.json").exists()
        r = subprocess.run([sys.executable, "-m", "app", "replica", "remove", name, "--root",
                            str(root)], cwd=REPO, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 2 and f"Remove the replica {name} (no state.json: left by a " \
            "session that ended before it wrote one)" in r.stderr, r.stdout + r.stderr
        assert "give --yes to confirm (nothing was changed)" in r.stderr
        if kind == "fs":
            subprocess.run(["mount", "--bind", str(root / name), str(mnt)], check=True)
            try:
                r = remove(root, name, "--yes")
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
            assert r.returncode == 2 and f"replica {name} is in use on this host: mounted at " \
                f"{mnt}: stop using it first; nothing was removed" in r.stderr, r.stderr
        assert (root / name).exists() and (bookkeeping / "lock").is_file()
        r = remove(root, name, "--yes")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"removed replica {name} (no state.json: left by a session that ended before it " \
               f"wrote one): its data {root / name} (" in r.stdout, r.stdout
        assert f"and its bookkeeping {bookkeeping} (" in r.stdout, r.stdout
        assert not (root / name).exists() and not bookkeeping.exists()
    assert sorted(os.listdir(root)) == [META] and os.listdir(root / META / "replicas") == []


def test_remove_of_what_a_refused_session_left_keeps_the_data_it_refused(tmp_path):
    """A session refuses data that was there before (not empty, no replica of ours) and ends
    before it writes a state, leaving the bookkeeping: that goes; the data, which no state says
    a session wrote, is kept and said so."""
    from app.engine.agent import META, replica_id
    from app.services import wire
    root = tmp_path / "replicas"
    (root / "data").mkdir(parents=True)
    (root / "data" / "precious").write_text("was here before")
    agent = agent_asked(root, "data")
    try:
        kind, payload = wire.read_frame(agent.stdout.read)
        assert kind == wire.ERROR and json.loads(payload)["code"] == "not-ours", payload
    finally:
        end(agent)
    bookkeeping = root / META / "replicas" / replica_id("data")
    assert (bookkeeping / "lock").is_file() and not (bookkeeping / "state.json").exists()
    r = remove(root, "data", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"removed its bookkeeping {bookkeeping} (" in r.stdout, r.stdout
    assert f"its data {root / 'data'} was kept: not empty, and no state says a session wrote " \
           "it" in r.stdout, r.stdout
    assert not bookkeeping.exists() and (root / "data" / "precious").read_text() == "was here before"
