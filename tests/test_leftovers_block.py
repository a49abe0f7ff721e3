"""Left-over defects of `block add` found by earlier walks."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

REPO = Path(__file__).parent.parent


def cli(config: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", "--config", str(config), *argv],
                          capture_output=True, text=True, cwd=REPO)


def test_an_empty_device_is_refused_as_empty_not_as_an_offset_past_its_end(config_path, scratch_loop):
    """A block device of 0 bytes (here a loop on an empty file): `block add` said "offset 0 is
    past the end of /dev/loopN (0 bytes)", as if the offset were wrong. It says the device is
    empty now, naming it, and nothing is configured."""
    empty = scratch_loop(0)
    assert int(Path(f"/sys/class/block/{os.path.basename(empty)}/size").read_text()) == 0
    r = cli(config_path, "block", "add", empty)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert f"{empty} is empty (0 bytes)" in r.stderr and "offset" not in r.stderr, r.stderr
    assert not config_path.exists() or empty not in config_path.read_text()
    r = cli(config_path, "--json", "block", "add", empty)
    assert r.returncode == 2 and f'"errno": {errno.EINVAL}' in r.stdout + r.stderr, r.stdout + r.stderr
