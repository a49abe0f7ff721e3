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
        def request(self, what, **_):
            return {"filesystem": [rows["fs"].to_json()], "block": [rows["block"].to_json()]}
    snap = status.snapshot(ConfigStore(config_path), Control(), scan_writers=False)
    _says_the_fail_back_was_interrupted(snap, src, disk)
    assert status.replication_text(rows["fs"]).startswith(
        "fail-back from backup1:data interrupted: this host's copy is a mix"), rows["fs"]


class _EndedDaemon:
    """The daemon as a switch-over, fail-back or resolve finds it: it ends (killed) before its
    answer to `ends` (None: it is asked only what is left); afterwards it answers a ping
    (restarted by systemd meanwhile) when `running`, else it is not running."""

    def __init__(self, state_dir, ends=None):
        self.state_dir, self.ends, self.running, self.asked = str(state_dir), ends, True, []

    def request(self, cmd, **args):
        import errno as errno_mod

        from app.services.control import DaemonEnded
        from app.services.results import MirrorError
        self.asked.append(cmd)
        if cmd == self.ends:
            self.running = False
            raise DaemonEnded("the daemon closed the connection without a reply",
                              errno=errno_mod.ECONNRESET, obj="/run/x.sock")
        if not self.running:
            raise MirrorError("the daemon is not running", errno=errno_mod.ECONNREFUSED)
        return {"pid": 1, "state_dir": self.state_dir}


def _one_directory(tmp_path, config_path) -> Path:
    """A configuration of one directory entry (made) replicating to backup1:data: its path."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(f'schema = 1\n\n[[target]]\nname = "backup1"\nhost = "b1"\n'
                           f'root = "/srv"\n\n[[filesystem]]\npath = "{src}"\n'
                           f'target = "backup1:data"\n')
    return src


def _ended_during(tmp_path, config_path, action, markers):
    """The daemon ended during `action` of a directory entry, for each (switch-over marker,
    fail-back marker) in `markers`, with the daemon down and answering again afterwards: its
    results' messages by (markers, running)."""
    import errno as errno_mod

    from app.services.replication import Replication
    src, state_dir = _one_directory(tmp_path, config_path), tmp_path / "state"
    control = _EndedDaemon(state_dir)
    rep = Replication(ConfigStore(config_path), control, state_dir=str(state_dir))
    entry_dir = Path(entry_state(str(state_dir), "fs", str(src)))
    entry_dir.mkdir(parents=True, exist_ok=True)
    said = {}
    for sw, fb in markers:
        for name, marker in ((SWITCHED_MARKER, sw), (FAILBACK_MARKER, fb)):
            (entry_dir / name).unlink(missing_ok=True)
            if marker is not None:
                (entry_dir / name).write_text(json.dumps(marker))
        for running in (False, True):
            control.running = running
            r = rep._ended_during(action, str(src), str(state_dir))
            assert r.errno == errno_mod.ECONNRESET and r.target == str(src) and r.failed, r
            assert r.action == action, r
            said[(json.dumps(sw), json.dumps(fb), running)] = r.message
    for (*_, running), message in said.items():
        then = "run `mirrorsetup status`" if running else \
            "the daemon is not running now: start it with `mirrorsetup daemon start`, then run " \
            "`mirrorsetup status`"
        assert message.endswith(then) and ("not running" in message) is not running, message
    return src, {k: m.removeprefix(f"the daemon ended during the {_WORDS[action]} of {src}: ")
                 for k, m in said.items()}, said


_WORDS = {"switchover": "switch-over", "failback": "fail-back", "resolve": "resolve"}
_SWITCHED = {"state": "switched", "target": "backup1:data", "seq": 9, "time": 1}


def test_a_daemon_that_ended_during_a_switch_over_is_said_with_what_its_marker_left(tmp_path,
                                                                                     config_path):
    """The switch-over's answer never came (the daemon was killed): what the entry's marker
    says it had done, and what to run, for each state the marker can be in, and whether the
    daemon answers again (restarted by systemd meanwhile) or not."""
    src, left, said = _ended_during(tmp_path, config_path, "switchover", [
        (None, None), ({"state": "switching"}, None),
        ({"state": "switching", "promote_sent": True}, None), ({"state": "switched"}, None)])
    assert all(m != left[k] for k, m in said.items()), said  # each says what it ended during
    assert "nothing was handed over" in left[("null", "null", False)]
    assert "was not asked to take over: run `mirrorsetup switchover" in \
        left[(json.dumps({"state": "switching"}), "null", True)]
    assert "may be primary now" in left[(json.dumps({"state": "switching", "promote_sent": True}),
                                          "null", False)]
    assert "the switch-over had finished" in left[(json.dumps({"state": "switched"}), "null", True)]


def test_a_daemon_that_ended_during_a_fail_back_is_said_with_what_its_markers_left(tmp_path,
                                                                                   config_path):
    """The fail-back's answer never came (the daemon was killed): the command said only "the
    daemon closed the connection without a reply". It says, as after a switch-over, that the
    daemon ended during the fail-back, what the entry's markers say (the fail-back had begun:
    this copy may be a mix; nothing had come back: still switched over; neither: finished or
    not begun), and what to run, with the daemon down and answering again."""
    fb_left = (_SWITCHED, {"generation": "g1"})
    src, left, said = _ended_during(tmp_path, config_path, "failback", [
        (None, None), (_SWITCHED, None), ({"state": "switching"}, None), fb_left,
        (_SWITCHED, {"generation": "g1", "applied": 7}), (None, {"generation": "g1"}),
        (None, {"generation": "g1", "applied": 0})])
    again = f"run `mirrorsetup failback {src} --yes` again"
    for (sw, fb, running), message in left.items():
        assert (again in message) is (sw != "null" or fb != "null"), message
    assert "the fail-back had finished" in left[("null", "null", True)]
    assert f"daemon captures {src} when it starts" in left[("null", "null", False)]
    assert "still switched over to backup1:data" in left[(json.dumps(_SWITCHED), "null", True)]
    assert "that did not finish is still marked so" in \
        left[(json.dumps({"state": "switching"}), "null", False)]
    begun = left[(json.dumps(fb_left[0]), json.dumps(fb_left[1]), False)]
    assert begun.startswith("the fail-back had begun (its marker says so) and did not finish: "
                            "this host's copy may be a mix of its own data and the replica's; "
                            f"{src} is not captured; {again} to finish it"), begun
    assert "copy is a mix" in left[(json.dumps(_SWITCHED), json.dumps(
        {"generation": "g1", "applied": 7}), True)]
    # a split brain's fail-back (no switch-over marker) that had begun: the same
    assert left[("null", json.dumps({"generation": "g1"}), False)] == begun
    # one before it that wrote nothing here left its marker (applied 0): this one ended before
    # it wrote its own (without a count): nothing came back, and the daemon captures it at its
    # start (it said "is not captured")
    nothing = left[("null", json.dumps({"generation": "g1", "applied": 0}), True)]
    assert nothing.startswith("nothing of the replica's had come back") and "is still its own " \
        "data" in nothing and f"the daemon captures {src} when it starts" in nothing, nothing
    assert "not captured" not in nothing, nothing


def test_a_daemon_that_ended_during_a_resolve_is_said_with_what_its_marker_left(tmp_path,
                                                                                config_path):
    """`replica resolve --discard-target` whose daemon was killed: that it ended during the
    resolve, whether this side was taken back (its switch-over marker), and to run it again."""
    src, left, _ = _ended_during(tmp_path, config_path, "resolve", [(None, None), (_SWITCHED, None)])
    again = f"run `mirrorsetup replica resolve {src} --discard-target --yes` again"
    assert all(again in m and "had discarded its promotion is not known" in m
               for m in left.values()), left
    assert left[("null", "null", True)].startswith("no switch-over marker is left (this side is "
                                                   "kept)"), left
    assert left[(json.dumps(_SWITCHED), "null", False)].startswith(
        "this side was not taken back yet (its switch-over marker is still there)"), left


def test_a_fail_back_or_resolve_whose_daemon_ends_says_so_not_only_that_the_connection_closed(
        tmp_path, config_path):
    """Through Replication.failback / resolve (what the CLI and the Targets screen call): the
    daemon's state directory is asked before the request, and a daemon that ends before its
    answer is said as the action it ended during, not as "the daemon closed the connection
    without a reply"."""
    from app.services.replication import Replication
    src, state_dir = _one_directory(tmp_path, config_path), tmp_path / "daemon-state"
    entry_dir = Path(entry_state(str(state_dir), "fs", str(src)))  # the daemon's, not ours
    entry_dir.mkdir(parents=True)
    (entry_dir / SWITCHED_MARKER).write_text(json.dumps(_SWITCHED))
    (entry_dir / FAILBACK_MARKER).write_text(json.dumps({"generation": "g1"}))
    said = {}
    for action, call in (("failback", lambda rep: rep.failback(str(src))),
                         ("resolve", lambda rep: rep.resolve(str(src), discard_target=True))):
        control = _EndedDaemon(state_dir, ends=action)
        rep = Replication(ConfigStore(config_path), control, state_dir=str(tmp_path / "other"))
        [r] = call(rep)
        assert r.failed and r.action == action and r.target == str(src), r
        assert "closed the connection" not in r.message, r
        assert r.message.startswith(f"the daemon ended during the {_WORDS[action]} of {src}: "), r
        assert r.message.endswith("the daemon is not running now: start it with "
                                  "`mirrorsetup daemon start`, then run `mirrorsetup status`"), r
        assert control.asked == ["ping", action, "ping"], control.asked
        said[action] = r.message
    assert "the fail-back had begun (its marker says so)" in said["failback"], said  # the daemon's
    assert "this side was not taken back yet" in said["resolve"], said


def test_a_split_brain_fail_back_the_daemon_ended_during_is_not_captured_unless_it_wrote_nothing(
        tmp_path, config_path, scratch_loop):
    """A split brain's fail-back (the capture lifted for it, no switch-over marker) whose
    daemon was killed leaves only its fail-back marker: it was ignored, and the daemon's next
    start captured the (maybe mixed) copy as this host's own, status saying nothing. Now an
    entry whose marker says some of the replica's records were (or may have been) written here
    is refused capture ("fail-back interrupted", by the daemon and without one); one whose
    marker says none were (applied 0: refused, or cut before anything came, while capture went
    on) is this host's own data: captured as before, the marker no reason to refuse."""
    import types

    from app.engine.daemon import Daemon
    from app.engine.failover import refusal
    from app.services.layout import Layout
    from app.services.protocol import CaptureRow
    src, disk, state_dir = tmp_path / "my src", scratch_loop(), tmp_path / "state"
    src.mkdir()
    _config(config_path, src, disk)
    layout = Layout(str(tmp_path / "run"), str(state_dir))
    daemon = types.SimpleNamespace(layout=layout, failover=types.SimpleNamespace(locks={}))
    targets = {"fs": "backup1:data", "block": "backup1:disk"}
    keys = {"fs": str(src), "block": disk}
    for kind, key in keys.items():
        Path(layout.state(kind, key)).mkdir(parents=True)

    def marked(fs_marker, block_marker):
        for (kind, key), marker in zip(keys.items(), (fs_marker, block_marker)):
            (Path(layout.state(kind, key)) / FAILBACK_MARKER).write_text(json.dumps(marker))
        rows = {kind: CaptureRow(kind, key, target=targets[kind], state="not captured")
                for kind, key in keys.items()}
        for row in rows.values():
            Daemon._switched(daemon, row)
        snap = status.snapshot(ConfigStore(config_path), None, scan_writers=False,
                               state_dir=str(state_dir))
        said = {w.subject: (w.message, w.level) for w in snap.warnings}
        return rows, snap, said

    # written here (3 records), and not known (the daemon killed before it could count)
    rows, snap, said = marked({"generation": "g2", "target": "backup1:data", "applied": 3},
                              {"generation": "g3"})  # (written by a version without "target")
    for kind, key in keys.items():
        r = refusal(layout, kind, key, "mount" if kind == "fs" else "attach")
        assert r is not None and r.failed and r.details.get("refused"), (kind, r)
        assert r.message.startswith(f"a fail-back of {key} from "
                                    f"{'backup1:data' if kind == 'fs' else 'its replica'} was "
                                    "interrupted: this host's copy "), r.message
        assert f"run `mirrorsetup failback {shlex.quote(key)} --yes` again" in r.message, r
        assert rows[kind].state == "fail-back interrupted", rows[kind]
    assert "is a mix of its own data" in refusal(layout, "fs", str(src), "mount").message
    assert "may be a mix of its own data" in refusal(layout, "block", disk, "attach").message
    _says_the_fail_back_was_interrupted(snap, src, disk)  # without a daemon, as after a switch-over
    from app.screens.targets import role_and_state  # the Targets screen, with and without one
    for role, state in (role_and_state(rows["fs"]),
                        role_and_state(None, marked=snap.filesystem[0].switched)):
        assert role.plain == "fail-back interrupted" and "copy is a mix" in state.plain, state
    assert "Mount all" not in said[str(src)][0] and "Attach all" not in said[disk][0], said

    # none written here: captured as before, not said as interrupted
    rows, snap, said = marked({"generation": "g2", "target": "backup1:data", "applied": 0},
                              {"generation": "g3", "applied": 0})
    for kind, key in keys.items():
        assert refusal(layout, kind, key, "mount" if kind == "fs" else "attach") is None, kind
        assert rows[kind].state == "not captured" and rows[kind].switched is None, rows[kind]
    assert [s.state for s in snap.filesystem] == ["not mounted"], snap.filesystem
    assert [b.state for b in snap.block] == ["detached"], snap.block
    assert "interrupted" not in " ".join(m for m, _ in said.values()), said


def test_the_capture_end_marker_has_one_reader_for_the_daemon_and_the_set_command(tmp_path):
    """layout.capture_end is what the daemon's supervisor and the fail-over read (it had a
    reader of its own there); clean_end, what `fs set` reads, is it with "seq" and "released"
    checked. Neither follows a symbolic link nor takes what is not a JSON object."""
    from app.services.layout import CLEAN_MARKER, capture_end, clean_end
    marker = tmp_path / CLEAN_MARKER
    assert capture_end(str(tmp_path)) is None and clean_end(str(tmp_path)) is None
    marker.write_text(json.dumps({"seq": 9, "released": 7, "drained": True}) + "\n")
    assert capture_end(str(tmp_path)) == {"seq": 9, "released": 7, "drained": True}
    assert clean_end(str(tmp_path)) == {"seq": 9, "released": 7, "drained": True}
    marker.write_text(json.dumps({"drained": False}))
    assert capture_end(str(tmp_path)) == {"drained": False} and clean_end(str(tmp_path)) is None
    for text in ("[1, 2]", "7", "not json"):
        marker.write_text(text)
        assert capture_end(str(tmp_path)) is None and clean_end(str(tmp_path)) is None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text(json.dumps({"seq": 1, "released": 1}))
    marker.unlink()
    marker.symlink_to(elsewhere)
    assert capture_end(str(tmp_path)) is None and clean_end(str(tmp_path)) is None


def test_a_capture_end_marker_that_is_no_json_object_is_an_unclean_stop_not_a_crash(tmp_path):
    """A capture's start reads the marker its last capture wrote at its end (capture.open_state,
    the worker's own reader beside layout.capture_end): a JSON list or number there raised
    AttributeError at the start (end.get), and a symbolic link OSError (ELOOP): the worker
    died and the entry stayed uncaptured. Now both are an unclean stop (the catch-up
    compares everything) and the marker is gone; a good one still says the clean end."""
    import os

    from app.engine.capture import CLEAN_MARKER, Spec, open_state
    state = tmp_path / "state"
    spec = Spec(kind="fs", key="/srv/x", state=str(state), run=str(tmp_path / "run"),
                adopt="", fsname="mirrorsetup", target=None, claim={})
    for marker, want in (("[1]", None), ("7", None), ("", None), ("link", None),
                         ('{"seq": 5, "released": 5}', {"seq": 5, "released": 5})):
        state.mkdir(mode=0o700, exist_ok=True)
        (state / "entry").write_text("/srv/x\n")  # (not a first start)
        if marker == "link":
            (tmp_path / "elsewhere").write_text('{"seq": 9}')
            (state / CLEAN_MARKER).symlink_to(tmp_path / "elsewhere")
        else:
            (state / CLEAN_MARKER).write_text(marker)
        lock, first, end = open_state(spec)
        os.close(lock)
        assert (first, end) == (False, want), marker
        assert not os.path.lexists(state / CLEAN_MARKER), marker
