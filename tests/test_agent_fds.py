"""The target host's agent alone (no source, no network): what a session leaves open, and
what `replica promote` says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_engine_support import REPO

pytestmark = pytest.mark.root


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_each_session_of_a_directory_replica_leaves_no_fd_open(tmp_path):
    """Found by reading: _open_data replaced the LocalDirTarget's applier with the confined
    one without closing it, so every session left the plain applier's fd open in the agent.
    Opened and closed a few times, the replica leaves as many fds as before."""
    from app.engine.agent import Agent, ConfinedFsApplier
    root = tmp_path / "replicas"
    root.mkdir()
    agent = Agent(str(root), None, None)
    agent.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    agent._made = None
    try:
        agent._open_data("data", "fs", {})  # the first makes the directory (and keeps its parent)
        if agent._made:
            os.close(agent._made[0])
        agent.target.close()
        before = _open_fds()
        for _ in range(5):
            agent._open_data("data", "fs", {})
            assert isinstance(agent.target.applier, ConfinedFsApplier)
            agent.target.close()
        assert _open_fds() - before == set(), "fds left open by the sessions"
        assert (root / "data").is_dir()
    finally:
        os.close(agent.root_fd)


def _replica(root: Path, name: str):
    from app.engine.agent import Replica
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        rep = Replica(fd, str(root), name, "fs")
    finally:
        os.close(fd)
    rep.save({"source": {"host": "h", "entry": "fs:/src"}, "kind": "fs", "path": name,
              "role": "secondary", "generation": "g1", "consistent": True, "consistent_seq": 0})
    return rep


def test_promote_says_one_record_in_the_singular(tmp_path):
    """`replica promote` of a replica with one record received and not applied said "applied
    the 1 records"; now "applied the 1 record received but not yet applied"."""
    from app.engine.journal import KIND_FS, Journal, Record
    root = tmp_path / "replicas"
    (root / "data").mkdir(parents=True)
    rep = _replica(root, "data")
    j = Journal(rep.dir, kind=KIND_FS)
    j.ingest_durably([Record(1, KIND_FS, "mkdir", {"path": "arrived", "mode": 0o750, "uid": 0,
                                                   "gid": 0})])
    j.close()
    p = subprocess.run([sys.executable, "-m", "app", "replica", "promote", "data", "--root",
                        str(root)], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "applied the 1 record received but not yet applied" in p.stdout, p.stdout
    assert (root / "data" / "arrived").is_dir() and rep.state()["role"] == "primary"


def test_the_agents_test_answer_says_what_its_journals_take_of_the_free_space(tmp_path):
    """`target test` reported the file system's free space as the replicas' room: the agent's
    own journals take from it the room the agent keeps (it pauses below it) and the records
    they hold not yet applied. Its answer says both; the source subtracts them."""
    import io

    from app.engine.agent import ROOM_BYTES, Agent, list_replicas
    from app.engine.journal import KIND_FS, Journal, Record
    from app.services import wire
    from app.services.targets import room_for_replicas
    root = tmp_path / "replicas"
    (root / "data").mkdir(parents=True)
    j = Journal(_replica(root, "data").dir, kind=KIND_FS)
    j.ingest_durably([Record(1, KIND_FS, "mkdir", {"path": "arrived", "mode": 0o750, "uid": 0,
                                                   "gid": 0})])
    j.close()
    (pending,) = [r["pending_bytes"] for r in list_replicas(str(root))]
    assert pending > 0
    out = io.BytesIO()
    Agent(str(root), None, out)._hello({"version": wire.VERSION, "action": "test"})
    kind, payload = wire.read_frame(io.BytesIO(out.getvalue()).read)
    said = json.loads(payload)
    assert kind == wire.WELCOME and said["free_bytes"] > ROOM_BYTES + pending
    assert (said["journal_room_bytes"], said["journal_pending_bytes"]) == (ROOM_BYTES, pending)
    assert room_for_replicas(said)["available_bytes"] == said["free_bytes"] - ROOM_BYTES - pending
    older = {k: v for k, v in said.items() if not k.startswith("journal_")}
    assert room_for_replicas(older)["available_bytes"] is None  # not a guess


def test_the_agent_reads_the_next_frames_while_it_handles_one_within_its_bound(tmp_path,
                                                                                monkeypatch):
    """A session's next batch crossed ssh only once the agent had decoded and journalled
    the one before (it read between batches; the pipes hold 64 KiB), so both ends waited
    in turn. The agent reads ahead while it handles a batch, up to READ_AHEAD_BYTES, in
    order, and a broken frame is still said after the good ones before it."""
    import threading

    from app.engine import agent as agent_mod
    from app.services import wire
    monkeypatch.setattr(agent_mod, "READ_AHEAD_BYTES", 1 << 20, raising=False)
    r, w = os.pipe()
    agent = agent_mod.Agent(str(tmp_path), os.fdopen(r, "rb", buffering=0), None)
    handled, release = [], threading.Event()

    def data(payload):  # the first batch is "decoded and journalled" until released
        handled.append(bytes(payload[:1]))
        if len(handled) == 1:
            release.wait(30)
    agent._data = data
    big = [wire.frame(wire.DATA, bytes([n]) * (768 << 10)) for n in (2, 3, 4)]
    writes = {}

    def write(name, blob):
        _write_all(w, blob)
        writes[name] = True
    served = {}

    def serve():
        try:
            agent.serve()
        except Exception as exc:
            served["error"] = exc
    threading.Thread(target=serve, daemon=True).start()
    write("first", wire.frame(wire.DATA, b"\x01"))
    t = threading.Thread(target=lambda: [write(f"big{i}", b) for i, b in enumerate(big)], daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while "big1" not in writes and time.monotonic() < deadline:
        time.sleep(0.01)
    # two batches of 768 KiB were taken while the first is handled (over 64 KiB of pipe);
    # the third waits for room (1 MiB ahead at most)
    assert handled == [b"\x01"] and "big1" in writes, (handled, writes)
    time.sleep(0.3)
    assert "big2" not in writes, "read past READ_AHEAD_BYTES"
    release.set()
    t.join(10)
    assert "big2" in writes
    os.write(w, b"\x00" * 9)  # not a frame: said after every good one
    deadline = time.monotonic() + 10
    while "error" not in served and time.monotonic() < deadline:
        time.sleep(0.01)
    os.close(w)
    assert handled == [b"\x01", b"\x02", b"\x03", b"\x04"], handled
    assert isinstance(served.get("error"), wire.WireError), served


def _write_all(fd: int, blob: bytes) -> None:
    view = memoryview(blob)
    while view:
        view = view[os.write(fd, view):]
