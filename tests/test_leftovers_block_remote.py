"""Left-over defects of block entries with a remote target, found by earlier walks."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from test_engine_support import REPO
from test_remote import block_remote, dd, remote  # noqa: F401 - fixtures

pytestmark = pytest.mark.root


def test_detach_all_with_the_link_down_says_the_target_is_unreachable(block_remote):  # noqa: F811
    """Found by a walk: `block detach-all` with the target's link down was silent ~30 s (the
    worker's drain at its end waited for a target it could not reach) and then said the
    capture "was ended although it was still busy". It now says, within the keep-alive's
    seconds, that the target is unreachable and what became of the changes not yet there."""
    eng, disk, r = block_remote()
    loop = eng.block(disk)["loop"]
    r.bed.link_down()
    try:
        dd(loop, mib=1, seek_mib=8)  # queued: the target cannot take it now
        t0 = time.monotonic()
        d = subprocess.run([sys.executable, "-m", "app", "--socket", eng.socket, "--config",
                            str(r.cfg), "block", "detach-all"], capture_output=True, text=True,
                           cwd=REPO, timeout=120)
        took = time.monotonic() - t0
        said = d.stdout + d.stderr
        print(f"took {took:.1f} s rc {d.returncode}:\n{said}")
        assert "still busy" not in said, said
        assert "the target was unreachable (disconnected" in said and "kept in its journal for the next start" in said, said
        assert took < 20, f"{took:.0f} s: {said}"
    finally:
        r.bed.link_up()
