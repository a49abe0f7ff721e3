"""Status without a daemon: which entries were handed over to their replica is read from the
switch-over markers the daemon left in its state directory, once per entry."""

from __future__ import annotations

import json
from pathlib import Path

from app.services import status
from app.services.config import ConfigStore
from app.services.layout import SWITCHED_MARKER, entry_state


def test_each_switched_over_entry_s_marker_is_read_once_without_a_daemon(tmp_path, config_path,
                                                                        scratch_loop, monkeypatch):
    """Its warning and its state were read from the marker each on its own (two reads of the
    same file per entry, on every refresh of the dashboard and Targets). Now once: both say
    the same read."""
    src, disk, state_dir = tmp_path / "src", scratch_loop(), tmp_path / "state"
    src.mkdir()
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
