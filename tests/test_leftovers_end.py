"""Left-over defects of what a capture's end says, found by earlier walks."""

from __future__ import annotations

import subprocess

import pytest

from test_engine_block import block_engine  # noqa: F401 - fixture

pytestmark = pytest.mark.root
MiB = 1 << 20


def test_a_detach_before_the_first_copy_ended_does_not_say_drained(block_engine):  # noqa: F811
    """Found by a walk: an entry detached while its first copy still ran (nothing queued yet:
    the copy compares first) said "its journal was drained to the target (seq 0)", as if the
    target were a copy. It says the target is not known to be a copy yet, and that the next start catches
    up, now."""
    eng, disk, target, cfg = block_engine(512 * MiB, start=False)
    subprocess.run(["dd", "if=/dev/urandom", f"of={disk}", "bs=1M", "count=256", "oflag=direct",
                    "status=none"], check=True)
    eng.start()
    st = eng.block(disk)
    assert st["target_data"] == "inconsistent" and st["catch_up"], st  # the first copy runs
    (r,) = eng.client.results("block_detach", device=disk)
    assert r.outcome.value == "ok", r.message
    assert "drained to the target" not in r.message, r.message
    assert "but the target is not known to be a copy yet (its catch-up had not ended): the " \
        "next start catches up" in r.message, r.message
    (r,) = eng.client.results("block_attach", device=disk)  # and so it does
    assert r.outcome.value == "ok", r.message
    st = eng.block_drain(disk)
    assert st["target_data"] == "consistent", st
    with open(disk, "rb") as a, open(target, "rb") as b:
        for _ in range(512):
            assert a.read(MiB) == b.read(MiB)


def test_what_an_end_marker_says():
    """Captured.ended() for each kind of end marker: one written before the connection and
    the consistency were kept says what it said; a split brain's (nothing queued, refused) is
    not "drained"; changes left because the target was unreachable say so."""
    from app.engine.supervisor import KEPT, Captured

    def said(end):
        cap = Captured("fs", "/srv/e", None, link=None)
        cap.end = end
        return cap.ended()
    assert said({"seq": 7, "released": 7, "drained": True}) == \
        "its journal was drained to the target (seq 7)"
    assert said({"seq": 7, "released": 7, "drained": True, "connection": "connected",
                 "consistent": True}) == "its journal was drained to the target (seq 7)"
    split = said({"seq": 7, "released": 7, "drained": True, "consistent": False,
                  "connection": "refused: split brain: the target was promoted"})
    assert split == ("nothing was left in its journal (seq 7), but the target is not known to "
                     "be a copy of it (refused: split brain: the target was promoted)"), split
    down = said({"seq": 9, "released": 7, "drained": False, "connection": "disconnected: gone"})
    assert down == f"the target was unreachable (disconnected: gone): 2 changes not yet at the target {KEPT}"
    assert said({"seq": 9, "released": 7, "drained": False}) == f"2 changes not yet at the target {KEPT}"
    # an entry without a target (found by a walk: Unmount all said it was drained to one)
    from app.services.config import FsEntry
    cap = Captured("fs", "/srv/e", FsEntry("/srv/e", False, None), link=None)
    cap.end = {"seq": 3, "released": 3, "drained": True, "connection": "local", "consistent": True}
    assert cap.ended() == "it has no target: nothing was replicated (seq 3)", cap.ended()
