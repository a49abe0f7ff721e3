"""Status without a daemon: which entries were handed over to their replica is read from the
switch-over markers the daemon left in its state directory, once per entry."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from app.services import status
from app.services.config import ConfigStore
from app.services.layout import FAILBACK_MARKER, SWITCHED_MARKER, entry_state


def test_each_switched_over_entry_s_marker_is_read_once_without_a_daemon(tmp_path, config_path,
                                                                        scratch_loop, monkeypatch):
    """Its warning and its state were read from the marker each on its own (two reads of the
    same file per entry, on every refresh of the dashboard and Targets). Now once: both say
    the same read."""
    src, disk, state_dir = tmp_path / "src", scratch_loop(), tmp_path / "state"
    src.mkdir()
    _config(config_path, src, disk)
    entry_dirs = {}
    for kind, key, target in (("fs", str(src), "backup1:data"), ("block", disk, "backup1:disk")):
        entry_dirs[key] = Path(entry_state(str(state_dir), kind, key))
        entry_dirs[key].mkdir(parents=True)
        (entry_dirs[key] / SWITCHED_MARKER).write_text(json.dumps(
            {"state": "switched", "target": target, "seq": 9, "time": 1}))
    read = []

    def counted(entry_dir):
        read.append(entry_dir)
        return real(entry_dir)
    real = status.switched_marker
    monkeypatch.setattr(status, "switched_marker", counted)

    snap = status.snapshot(ConfigStore(config_path), None, scan_writers=False,
                           state_dir=str(state_dir))

    assert sorted(read) == sorted(str(d) for d in entry_dirs.values()), read  # once each
    assert [s.state for s in snap.filesystem] == ["switched over"]
    assert [b.state for b in snap.block] == ["switched over"]
    said = {w.subject: w.message for w in snap.warnings}
    assert said[str(src)].startswith("switched over to backup1:data: primary there"), said
    assert said[disk].startswith("switched over to backup1:disk: primary there"), said
    assert "Mount all" not in said[str(src)] and "Attach all" not in said[disk], said


def _config(config_path, src, disk) -> None:
    config_path.parent.mkdir(parents=True)
    config_path.write_text(f"""schema = 1

[[target]]
name = "backup1"
host = "backup1.example.net"
root = "/srv/replicas"

[[filesystem]]
path = "{src}"
target = "backup1:data"

[[block]]
device = "{disk}"
target = "backup1:disk"
""")


def _interrupted_fail_backs(state_dir: Path, src: Path, disk: str) -> dict[str, Path]:
    """Both entries switched over, and a fail-back of each that began and did not finish, as
    the daemon leaves its markers (app/engine/failover.py): the directory's after 3 of the
    replica's records were written here, the device's before it is known."""
    entry_dirs = {}
    for kind, key, target, failback in (
            ("fs", str(src), "backup1:data", {"generation": "g2", "applied": 3}),
            ("block", disk, "backup1:disk", {"generation": "g3"})):
        entry_dirs[key] = Path(entry_state(str(state_dir), kind, key))
        entry_dirs[key].mkdir(parents=True)
        (entry_dirs[key] / SWITCHED_MARKER).write_text(json.dumps(
            {"state": "switched", "target": target, "seq": 9, "time": 1, "fence": {}}))
        (entry_dirs[key] / FAILBACK_MARKER).write_text(json.dumps(failback) + "\n")
    return entry_dirs


def _says_the_fail_back_was_interrupted(snap, src: Path, disk: str) -> None:
    assert [s.state for s in snap.filesystem] == ["fail-back interrupted"]
    assert [b.state for b in snap.block] == ["fail-back interrupted"]
    said = {w.subject: (w.message, w.level) for w in snap.warnings}
    assert said[str(src)] == (
        "fail-back from backup1:data interrupted: this host's copy is a mix of its own data and "
        "the replica's until a fail-back finishes: run `mirrorsetup failback "
        f"{shlex.quote(str(src))} --yes` again", "error"), said
    assert said[disk][0].startswith("fail-back from backup1:disk interrupted: this host's copy "
                                    "may be a mix of its own data") and said[disk][1] == "error"
    assert f"`mirrorsetup failback {shlex.quote(disk)} --yes` again" in said[disk][0], said


def test_an_interrupted_fail_back_is_said_without_a_daemon(tmp_path, config_path, scratch_loop):
    """Found by a walk: after a fail-back whose link dropped mid-transfer, status said
    "switched over" with no hint, though this host's copy was a mix of its own data and the
    replica's. The fail-back's marker is kept until one finishes: status says "fail-back
    interrupted" and what to run."""
    src, disk, state_dir = tmp_path / "my src", scratch_loop(), tmp_path / "state"
    src.mkdir()
    _config(config_path, src, disk)
    _interrupted_fail_backs(state_dir, src, disk)
    snap = status.snapshot(ConfigStore(config_path), None, scan_writers=False,
                           state_dir=str(state_dir))
    _says_the_fail_back_was_interrupted(snap, src, disk)


def test_an_interrupted_fail_back_is_said_by_the_daemon_and_one_under_way_is_not(
        tmp_path, config_path, scratch_loop):
    """The daemon's rows (Daemon._switched, what it answers for an entry not captured): the
    same words; while its fail-back runs (the entry's lock held) it is not "interrupted"."""
    import types

    import trio

    from app.engine.daemon import Daemon
    from app.services.layout import Layout
    from app.services.protocol import CaptureRow
    src, disk, state_dir = tmp_path / "my src", scratch_loop(), tmp_path / "state"
    src.mkdir()
    _config(config_path, src, disk)
    _interrupted_fail_backs(state_dir, src, disk)
    daemon = types.SimpleNamespace(layout=Layout(str(tmp_path / "run"), str(state_dir)),
                                   failover=types.SimpleNamespace(locks={}))
    rows = {"fs": CaptureRow("fs", str(src), target="backup1:data", state="not captured"),
            "block": CaptureRow("block", disk, target="backup1:disk", state="not captured")}

    async def running():
        lock = daemon.failover.locks[("fs", str(src))] = trio.Lock()
        async with lock:
            row = CaptureRow("fs", str(src), target="backup1:data", state="not captured")
            Daemon._switched(daemon, row)
            return row
    under_way = trio.run(running)
    assert under_way.state == "switched over" and under_way.switched["failback"] == "under way"
    daemon.failover.locks.clear()
    for row in rows.values():
        Daemon._switched(daemon, row)
        assert row.state == "fail-back interrupted", row

    class Control:
        def request(self, what):
            return {"filesystem": [rows["fs"].to_json()], "block": [rows["block"].to_json()]}
    snap = status.snapshot(ConfigStore(config_path), Control(), scan_writers=False)
    _says_the_fail_back_was_interrupted(snap, src, disk)
    assert status.replication_text(rows["fs"]).startswith(
        "fail-back from backup1:data interrupted: this host's copy is a mix"), rows["fs"]


def test_a_daemon_that_ended_during_a_switch_over_is_said_with_what_its_marker_left(tmp_path,
                                                                                     config_path):
    """The switch-over's answer never came (the daemon was killed): what the entry's marker
    says it had done, and what to run, for each state the marker can be in, and whether the
    daemon answers again (restarted by systemd meanwhile) or not."""
    import errno as errno_mod

    from app.services.replication import Replication
    from app.services.results import MirrorError
    src, state_dir = tmp_path / "src", tmp_path / "state"
    src.mkdir()
    config_path.parent.mkdir(parents=True)
    config_path.write_text(f'schema = 1\n\n[[target]]\nname = "backup1"\nhost = "b1"\n'
                           f'root = "/srv"\n\n[[filesystem]]\npath = "{src}"\n'
                           f'target = "backup1:data"\n')

    class Control:  # the daemon as the command finds it afterwards
        running = False

        def request(self, cmd, **args):
            if not self.running:
                raise MirrorError("the daemon is not running", errno=errno_mod.ECONNREFUSED)
            return {"pid": 1, "state_dir": str(state_dir)}
    control = Control()
    rep = Replication(ConfigStore(config_path), control, state_dir=str(state_dir))
    entry_dir = Path(entry_state(str(state_dir), "fs", str(src)))
    said = {}
    for marker in (None, {"state": "switching"}, {"state": "switching", "promote_sent": True},
                   {"state": "switched"}):
        if marker is not None:
            entry_dir.mkdir(parents=True, exist_ok=True)
            (entry_dir / SWITCHED_MARKER).write_text(json.dumps(marker))
        for running in (False, True):
            control.running = running
            r = rep._ended_during_switchover(str(src), str(state_dir))
            assert r.errno == errno_mod.ECONNRESET and r.target == str(src) and r.failed, r
            assert r.message.startswith(f"the daemon ended during the switch-over of {src}: "), r
            said[(json.dumps(marker), running)] = r.message
    for (marker, running), message in said.items():
        then = "run `mirrorsetup status`" if running else \
            "the daemon is not running now: start it with `mirrorsetup daemon start`, then run " \
            "`mirrorsetup status`"
        assert message.endswith(then) and ("not running" in message) is not running, message
    assert "nothing was handed over" in said[("null", False)]
    assert "was not asked to take over: run `mirrorsetup switchover" in \
        said[(json.dumps({"state": "switching"}), True)]
    assert "may be primary now" in said[(json.dumps({"state": "switching", "promote_sent": True}),
                                         False)]
    assert "the switch-over had finished" in said[(json.dumps({"state": "switched"}), True)]
