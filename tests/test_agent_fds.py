"""The target host's agent alone (no source, no network): what a session leaves open."""

from __future__ import annotations

import os

import pytest

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
