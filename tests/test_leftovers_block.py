"""Left-over defects of `block add` found by earlier walks."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import loops_on

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


@contextlib.contextmanager
def first_captured(tmp_path, disks):
    """(engine, config, first, second, loop): two disks, the first configured and captured
    through `loop` by a daemon; the second not configured."""
    from test_engine_support import engine_maker, write_config
    first, second = disks(8 << 20), disks(8 << 20)
    with engine_maker(tmp_path) as make:
        cfg = write_config(tmp_path / "etc" / "replication.toml", [],
                           [{"device": first, "target": str(tmp_path / "first.img")}])
        eng, _, _ = make(config=cfg)
        loop = eng.block(first)["loop"]
        assert loop, eng.block(first)
        yield eng, cfg, first, second, loop


def test_a_loop_that_is_another_entrys_capture_loop_is_refused_naming_that_entry(tmp_path, disks):
    """`block add DISK --loop /dev/loopN` where loopN is the loop another entry is captured
    through: the refusal named the capture's FUSE file (…/capture), which says nothing to an
    administrator; it names the entry whose loop it is (its device) now; so does the daemon's
    attach of an entry configured (by hand) with that loop."""
    from test_engine_support import write_config
    with first_captured(tmp_path, disks) as (eng, cfg, first, second, loop):
        before = cfg.read_text()
        r = subprocess.run([sys.executable, "-m", "app", "--socket", eng.socket, "--config",
                            str(cfg), "block", "add", second, "--loop", loop],
                           capture_output=True, text=True, cwd=REPO)
        print(r.returncode, r.stdout, r.stderr)
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        assert loop in r.stderr and f"the entry for {first}" in r.stderr, r.stderr
        assert cfg.read_text() == before
        # the same loop written into the configuration by hand: the daemon's attach says whose
        write_config(cfg, [], [{"device": first, "target": str(tmp_path / "first.img")},
                               {"device": second, "loop": loop}])
        (r,) = eng.client.results("block_attach", device=second)
        assert r.failed and r.errno == errno.EBUSY, r.message
        assert f"{loop} is busy: the capture loop of the entry for {first}" in r.message, r.message


def test_a_capture_loop_is_named_by_its_entry_and_never_said_unconfigured_unknowingly():
    """blockplan.attached_to: a capture file is named by the configured entry it belongs to;
    without the configuration (a caller that does not have it) it is not said to be "not
    configured here"."""
    from app.services.blockplan import attached_to
    from app.services.layout import capture_suffix
    capture = "/run/mirrorsetup" + capture_suffix("/dev/sdz")
    assert attached_to(capture, ["/dev/sdy", "/dev/sdz"]) == \
        f"the capture loop of the entry for /dev/sdz (on its capture file {capture})"
    assert attached_to(capture, ["/dev/sdy"]) == \
        f"the capture loop of /dev/sdz, not configured here (on {capture})"  # (its name says it)
    assert attached_to(capture) == \
        f"the capture loop of the entry for /dev/sdz (on its capture file {capture})"
    elsewhere = "/run/mirrorsetup" + capture_suffix("/srv/disks/sdz")  # not below /dev
    assert attached_to(elsewhere) == \
        f"the capture loop of a block entry (on its capture file {elsewhere})"
    assert attached_to(elsewhere, ["/dev/sdy"]) == \
        f"the capture loop of a block device, not configured here (on {elsewhere})"
    assert attached_to("/srv/disk.img", ["/dev/sdz"]) == "attached to /srv/disk.img"


def test_without_the_daemon_a_loop_that_is_an_entrys_capture_loop_is_refused_naming_it(
        tmp_path, disks):
    """Found by a walk: without the daemon (its block captures outlive it), `manual attach
    DEV --loop L` and `block attach-all` of an entry configured with L, L another entry's
    capture loop, said only 'the capture loop of a block entry (on its capture file …)': the
    entry was not named (attach-all did not look at the configuration it had; manual attach
    has none) nor what to do. The entry is named now (by the configuration, else by its
    capture file's name) and the refusal says to choose another loop."""
    from test_engine_support import write_config
    with first_captured(tmp_path, disks) as (eng, cfg, first, second, loop):
        eng.kill9()  # its capture goes on without it
        whose = f"{loop} is busy: the capture loop of the entry for {first} (on its capture file "
        what = "choose another loop or leave it empty for the first free one"
        nodaemon = ("--socket", str(tmp_path / "none.sock"))  # (not another session's daemon)
        r = cli(cfg, *nodaemon, "manual", "attach", second, "--loop", loop)
        assert r.returncode == 2 and whose in r.stderr and what in r.stderr, r.stdout + r.stderr
        # with no configuration (manual attach needs none): named by its capture file's name
        r = cli(tmp_path / "none.toml", *nodaemon, "manual", "attach", second, "--loop", loop)
        assert r.returncode == 2 and f"{loop} is busy: the capture loop of {first}, not " \
            "configured here (on " in r.stderr and what in r.stderr, r.stdout + r.stderr
        write_config(cfg, [], [{"device": first, "target": str(tmp_path / "first.img")},
                               {"device": second, "loop": loop}])
        r = cli(cfg, *nodaemon, "--json", "block", "attach-all")
        said = {x["target"]: x for x in json.loads(r.stdout)}
        assert whose in said[second]["message"] and what in said[second]["message"], said
        assert said[second]["errno_name"] == "EBUSY", said
        assert loops_on(second) == [], "attached"


def test_manual_attach_of_an_entrys_capture_loop_is_refused_as_another_name_for_it(tmp_path,
                                                                                   disks):
    """Found by helper-46's walk: `manual attach /dev/loopN` of an entry's capture loop stacked
    a plain loop on it, a second name for the captured device that status knew nothing of.
    Refused now (exit 2, nothing attached), saying whose capture loop it is and that it is used
    as it is; --force attaches one all the same."""
    with first_captured(tmp_path, disks) as (eng, cfg, first, second, loop):
        try:
            r = cli(cfg, "--socket", eng.socket, "manual", "attach", loop)
            assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
            assert f"{loop} is the capture loop of the entry for {first} (on its capture file " \
                in r.stderr and "applications use it as it is" in r.stderr, r.stderr
            assert loops_on(loop) == [], "a loop was stacked on the capture loop"
            r = cli(cfg, "--socket", eng.socket, "manual", "attach", loop, "--force")
            assert r.returncode == 0 and len(loops_on(loop)) == 1, (r.stdout, r.stderr)
        finally:  # (the ones this test stacked on its own capture loop)
            for stacked in loops_on(loop):
                subprocess.run(["losetup", "-d", stacked], check=False)


def test_attach_all_without_the_daemon_leaves_a_capture_that_goes_on_as_it_is(tmp_path, disks):
    """Found by helper-46's walk: with the daemon killed (a block capture outlives it),
    `block attach-all` refused the entry as "captured by the mirrorsetup daemon …: unmount or
    detach it first (--force overrides)", and --force would have put a plain loop beside the
    capture, writes through it not captured. Now: unchanged, its capture goes on and the
    daemon takes it over at its start; when the capture's worker is gone too, the loop's I/O
    fails and that is said (exit 2, nothing attached)."""
    from app.services.status import capture_workers
    with first_captured(tmp_path, disks) as (eng, cfg, first, second, loop):
        eng.kill9()
        nodaemon = ("--socket", str(tmp_path / "none.sock"))
        for force in ((), ("--force",)):
            r = cli(cfg, *nodaemon, "block", "attach-all", *force)
            assert r.returncode == 0, (r.stdout, r.stderr)
            assert f"{first} is already attached as {loop}, captured: its capture goes on " \
                "without the daemon, which takes it over at its start" in r.stdout, r.stdout
            assert loops_on(first) == [], "a plain loop beside the capture"
        for pid in capture_workers("block", first):
            os.kill(pid, 9)
        r = cli(cfg, *nodaemon, "block", "attach-all", "--force")
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        assert f"{loop} serves a capture of {first} that is gone" in r.stderr, r.stderr
        assert loops_on(first) == [], "a plain loop beside the dead capture"
