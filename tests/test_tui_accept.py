"""Accept an entry's new file system (or device) in the TUI, as `fs accept-filesystem` does:
a capture refused because the entry is not on what its first capture recorded offers n on its
row; n shows what was recorded and what it is now, Cancel (the default) changes nothing, and
Accept forgets the record and says that Mount all captures it next."""

from __future__ import annotations

import errno
import json
from pathlib import Path

from app.services import mounts
from app.services.control import ControlClient
from app.services.layout import IDENTITY_RECORD, entry_state, private_dir
from app.services.replication import Replication
from test_tui_support import store  # noqa: F401 (fixture)


def record_another_file_system(state_dir: str, src: str) -> Path:
    """What a first capture would have recorded had `src` been a tmpfs of its own (that did
    not come up since): the entry's identity record, as capture.check_identity writes it."""
    entry_dir = entry_state(state_dir, "fs", src)
    private_dir(entry_dir, "entry state directory")
    record = Path(entry_dir) / IDENTITY_RECORD
    record.write_text(json.dumps({"file system": f"tmpfs mounted on {src}"}) + "\n")
    return record


def test_an_accept_is_refused_when_the_file_system_changed_since_it_was_shown(tmp_path, store):
    """The TUI shows what the entry is now, then accepts that: if it is something else by the
    time Accept is pressed, nothing is accepted (the record stays) and it says why."""
    src = tmp_path / "src"
    src.mkdir()
    store.add_filesystem(str(src))
    record = record_another_file_system(str(tmp_path / "state"), str(src))
    before = record.read_bytes()
    rep = Replication(store, ControlClient(str(tmp_path / "no.sock")), str(tmp_path / "state"))
    was, now = rep.identity_change("fs", str(src))
    assert was == {"file system": f"tmpfs mounted on {src}"} and now == mounts.tree_identity(str(src))
    shown = {"file system": "xfs mounted on /elsewhere"}
    r = rep.accept_identity("fs", str(src), expected=shown)
    assert r.failed and r.refused and r.errno == errno.EAGAIN, r
    assert "changed since it was shown" in r.message and "xfs mounted on /elsewhere" in r.message
    assert record.read_bytes() == before
    r = rep.accept_identity("fs", str(src), expected=now)
    assert r.outcome.value == "ok" and not record.exists(), r
    assert rep.identity_change("fs", str(src)) is None
