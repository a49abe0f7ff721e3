"""The engine through `mirrorsetup …` (fs mount-all/unmount-all/mirror/verify, service install)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_engine_support import REPO, Engine, mirrorfs_mounts, write_config

pytestmark = pytest.mark.root


def cli(*argv: str, socket: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"MIRRORSETUP_SOCKET": socket} if socket else {})}
    return subprocess.run([sys.executable, "-m", "app", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True)


@pytest.fixture
def running(tmp_path, tmpfs_mount):
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    src.mkdir()
    (src / "a").write_text("alpha")
    tmpfs_mount(src / "nested")  # a file system below the entry: passed through, not captured
    (src / "nested" / "inner").write_text("n")
    cfg = write_config(tmp_path / "etc" / "replication.toml", [{"path": str(src), "target": str(tgt)}])
    eng = Engine(tmp_path, cfg)
    eng.start()
    yield eng, str(src), str(tgt), str(cfg)
    eng.cleanup()
    assert not [m for m in mirrorfs_mounts() if m.startswith(str(tmp_path))]


def test_service_install_writes_the_unit_with_this_executable(tmp_path):
    r = cli("service", "install", "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "etc" / "systemd" / "system" / "mirrorsetup.service"
    assert str(unit) in r.stdout
    text = unit.read_text()
    exec_line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    exe = exec_line.split("=", 1)[1].split()[0]
    assert os.path.isabs(exe) and exe.endswith("mirrorsetup") and exec_line.endswith(" daemon")


def test_cli_without_daemon_says_how_to_start(tmp_path):
    r = cli("fs", "mount-all", socket=str(tmp_path / "absent.sock"))
    assert r.returncode == 2 and "systemctl start mirrorsetup" in r.stderr


def test_status_mirror_verify_unmount_all_through_the_cli(running):
    eng, src, tgt, cfg = running
    st = eng.status(src)
    assert st["mounted"] and st["nested_mounts"] == [os.path.join(src, "nested")]
    for key in ("captured_ops", "bytes_queued", "applied_seq", "last_seq", "lag_seconds", "target"):
        assert key in st
    # the nested file system is reachable through mirrorfs, but nothing of it is replicated
    open(os.path.join(src, "nested", "inner2"), "w").write("not captured")
    open(os.path.join(src, "b"), "w").write("beta")
    eng.drain(src)
    assert not os.path.exists(os.path.join(tgt, "nested", "inner2"))
    r = cli("--config", cfg, "fs", "verify", src, "--json", socket=eng.socket)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["differences"] == []
    os.unlink(os.path.join(tgt, "a"))  # damage the target behind the engine's back
    r = cli("--config", cfg, "fs", "verify", src, socket=eng.socket)
    assert r.returncode == 1 and "missing at target" in r.stdout  # the differences: the result
    assert f"mirrorsetup fs mirror {src}" in r.stderr  # and what to do about them
    r = cli("fs", "mirror", src, "--json", "--config", cfg, socket=eng.socket)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["outcome"] == "ok"
    assert open(os.path.join(tgt, "a")).read() == "alpha"
    r = cli("fs", "unmount-all", socket=eng.socket)  # another config than the daemon's: refused
    assert r.returncode == 2 and f"works from {os.path.realpath(cfg)}" in r.stderr
    assert src in mirrorfs_mounts()
    with open(os.path.join(src, "a")) as held:  # in use: refused (exit 2, nothing was changed;
        r = cli("--config", cfg, "fs", "unmount-all", socket=eng.socket)  # it said FAILED, 1)
    assert r.returncode == 2 and f"REFUSED  {src}: files are open under {src}: pid {os.getpid()}" \
        in r.stderr and "nothing was changed" in r.stderr, r.stdout + r.stderr
    assert src in mirrorfs_mounts() and held.closed
    r = cli("--config", cfg, "fs", "unmount-all", socket=eng.socket)
    assert r.returncode == 0 and src not in mirrorfs_mounts()
    r = cli("fs", "verify", src, "--config", cfg, socket=eng.socket)  # offline verify works on the directories
    assert r.returncode == 0, r.stdout


def test_status_warns_that_a_file_system_mounted_below_an_entry_is_not_replicated(running):
    """Found by a walk: a second disk mounted below a captured entry (ENTRY/nested) is passed
    through unrecorded: nothing written there reaches the target. Only Mount all's result and
    the daemon's log said so; status and the dashboard showed the entry "established" with
    no warning, and `status --json` had it only in the engine's nested_mounts."""
    eng, src, tgt, cfg = running
    nested = os.path.join(src, "nested")
    r = cli("--config", cfg, "status", "--json", socket=eng.socket)
    assert r.returncode == 0, r.stderr
    said = [w for w in json.loads(r.stdout)["warnings"] if w["subject"] == src]
    assert [w["message"] for w in said] == [
        f"not captured below it: {nested} (another file system mounted there: what is written "
        "there is not replicated; add it as an entry of its own to replicate it)"], said
    r = cli("--config", cfg, "status", socket=eng.socket)
    assert f"not captured below it: {nested}" in r.stdout.replace("\n    ", " "), r.stdout


def test_an_ext4_entrys_own_lost_and_found_is_no_difference_at_verify(tmp_path, scratch_loop):
    """Found by a walk: the entry is the mount point of its own ext4 (a data disk), whose
    root has a lost+found. A target leaves its root's lost+found out as the file system's own
    (app/engine/target.py), the source's was compared: every verify of such an entry said
    "lost+found: missing at target" and exit 1, and the mirror it advised changed nothing.
    A difference below the entry is still found."""
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    dev = scratch_loop(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
    src.mkdir()
    subprocess.run(["mount", dev, str(src)], check=True)
    try:
        (src / "a").write_text("alpha")
        cfg = write_config(tmp_path / "etc" / "replication.toml", [{"path": str(src), "target": str(tgt)}])
        eng = Engine(tmp_path, cfg)
        try:
            eng.start()
            eng.drain(str(src))
            r = cli("--config", str(cfg), "fs", "verify", str(src), "--json", socket=eng.socket)
            assert r.returncode == 0 and json.loads(r.stdout)["differences"] == [], r.stdout + r.stderr
            os.unlink(tgt / "a")  # damage the target behind the engine's back
            r = cli("--config", str(cfg), "fs", "verify", str(src), socket=eng.socket)
            assert r.returncode == 1 and "a: missing at target" in r.stdout, r.stdout + r.stderr
            assert "lost+found" not in r.stdout, r.stdout
            assert cli("--config", str(cfg), "fs", "unmount-all", socket=eng.socket).returncode == 0
            r = cli("--config", str(cfg), "fs", "mirror", str(src), socket=eng.socket)
            assert r.returncode == 0, r.stdout + r.stderr
            r = cli("--config", str(cfg), "fs", "verify", str(src), socket=eng.socket)  # offline
            assert r.returncode == 0, r.stdout + r.stderr
        finally:
            eng.cleanup()
    finally:
        subprocess.run(["umount", "-l", str(src)], check=False)


def test_a_target_edited_by_hand_while_captured_is_not_shown_as_the_one_replicated_to(running):
    """Found by a walk: an entry's target changed in the file by hand while its capture ran
    (b1:data3 to b1:data3x); status showed the new target "consistent, established" while
    every change still went to the old one (the capture reads its target when it starts),
    and the new one did not exist. Status now says where it replicates and what applies it."""
    eng, src, tgt, cfg = running
    open(os.path.join(src, "b"), "w").write("beta")
    eng.drain(src)
    moved = tgt + "-moved"
    write_config(Path(cfg), [{"path": src, "target": moved, "queue_limit": "64MiB"}])
    r = cli("--config", cfg, "status", "--json", socket=eng.socket)
    assert r.returncode == 0, r.stderr
    said = json.loads(r.stdout)
    row = said["filesystem"][0]
    assert row["target"] == moved and row["engine"]["target"] == tgt, row  # the file / the truth
    assert row["engine"]["not_applied"] == {"target": [tgt, moved], "queue_limit": [None, "64MiB"]}
    warning = [w for w in said["warnings"] if w["subject"] == src and "configuration" in w["message"]]
    assert len(warning) == 1, said["warnings"]
    text = warning[0]["message"]
    assert f"replicates to {tgt}" in text and f"target {moved}" in text, text
    assert "Unmount all, then Mount all" in text, text
    assert f"`mirrorsetup fs set {src} --target {moved}` (or Unmount all" in text, text
    r = cli("--config", cfg, "status", socket=eng.socket)
    assert f"replicates to {tgt}" in r.stdout.replace("\n    ", " "), r.stdout
    open(os.path.join(src, "c"), "w").write("gamma")  # still replicated where it says
    eng.drain(src)
    assert open(os.path.join(tgt, "c")).read() == "gamma" and not os.path.exists(moved)
    r = cli("--config", cfg, "fs", "unmount-all", socket=eng.socket)
    assert r.returncode == 0, r.stderr
    r = cli("--config", cfg, "fs", "mount-all", socket=eng.socket)
    assert r.returncode == 0, r.stderr
    row = json.loads(cli("--config", cfg, "status", "--json", socket=eng.socket).stdout)["filesystem"][0]
    assert row["engine"]["target"] == moved and row["engine"]["not_applied"] == {}, row


def test_a_target_edited_while_no_daemon_ran_is_said_by_the_daemon_that_takes_it_over(running):
    """The capture outlived its daemon (a file open there) and the target was edited in the
    file before the next daemon took it over: that daemon knew the entry only from the file,
    and said the new target was the one replicated to. The worker says its own target."""
    eng, src, tgt, cfg = running
    held = open(os.path.join(src, "a"))  # keeps the capture running without its daemon
    try:
        eng.stop()
        moved = tgt + "-moved"
        write_config(Path(cfg), [{"path": src, "target": moved}])
        eng.start()
        row = json.loads(cli("--config", cfg, "status", "--json", socket=eng.socket).stdout)
        engine = row["filesystem"][0]["engine"]
        assert engine["captured"] and engine["target"] == tgt, engine
        assert engine["not_applied"] == {"target": [tgt, moved]}, engine
    finally:
        held.close()


def test_mount_all_with_an_entry_naming_no_configured_target_fails_that_entry_only(tmp_path):
    """Found by a walk: one [[filesystem]] whose target names no [[target]] (written by hand)
    made `fs mount-all` say "FAILED all file-system entries: target ghost:x: …" (exit 1), while
    it had mounted the others. Now that entry fails by its own name and the others say ok."""
    good, ghost, tgt = tmp_path / "good", tmp_path / "ghost", tmp_path / "tgt"
    good.mkdir()
    ghost.mkdir()
    cfg = write_config(tmp_path / "etc" / "replication.toml",
                       [{"path": str(ghost), "target": "ghost:x"}, {"path": str(good), "target": str(tgt)}])
    eng = Engine(tmp_path, cfg)
    eng.start()
    try:
        cli("--config", str(cfg), "fs", "unmount-all", socket=eng.socket)
        r = cli("--config", str(cfg), "fs", "mount-all", socket=eng.socket)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "all file-system entries" not in r.stdout + r.stderr, r.stdout + r.stderr
        assert f"{ghost}: target ghost:x: no remote target named 'ghost' is configured" in r.stderr, r.stderr
        assert re.search(rf"^ *ok +{re.escape(str(good))}: mounted mirrorfs on ", r.stdout, re.M), r.stdout
        assert str(good) in mirrorfs_mounts() and str(ghost) not in mirrorfs_mounts()
    finally:
        eng.cleanup()


def test_a_directory_whose_file_system_did_not_come_up_is_not_captured_nor_its_replica_emptied(
        tmp_path, tmpfs_mount):
    """The directory an entry names is the mount point of its own file system, and at the next
    start that file system is not mounted (a disk that did not come up at boot): the directory
    below is empty, and the catch-up made the replica equal to it, removing every file there
    (seen by hand: 174 names to 2). The first capture records the file system the directory
    lies on (its type and mount point, app/services/mounts.tree_identity); a capture on another
    one is refused, the replica untouched. `fs accept-filesystem` takes it as it is."""
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    tmpfs_mount(src)
    (src / "d").mkdir()
    for i in range(20):
        (src / "d" / f"f{i}").write_text(f"file {i}")
    cfg = write_config(tmp_path / "etc" / "replication.toml", [{"path": str(src), "target": str(tgt)}])
    eng = Engine(tmp_path, cfg)
    try:
        eng.start()
        eng.drain(str(src))
        assert len(os.listdir(tgt / "d")) == 20
        assert eng.stop() == 0
        subprocess.run(["umount", str(src)], check=True)  # "the disk did not come up"
        assert os.listdir(src) == []
        eng.start()
        r = cli("--config", str(cfg), "fs", "mount-all", socket=eng.socket)
        assert r.returncode == 1, r.stdout + r.stderr
        said = f"{src} is not on the file system this entry was made for: its file system was " \
            f"tmpfs mounted on {src}, it is now"
        assert said in r.stderr and "accept-filesystem" in r.stderr, r.stderr
        row = eng.status(str(src))
        assert not row["captured"] and row["last_errno"] == errno.EMEDIUMTYPE, row  # (the TUI's n)
        assert len(os.listdir(tgt / "d")) == 20  # not one name removed
        r = cli("--config", str(cfg), "fs", "accept-filesystem", str(src), socket=eng.socket)
        assert r.returncode == 0 and "is forgotten" in r.stdout, r.stdout + r.stderr
        row = eng.status(str(src))  # not the refusal any more, nor its errno: what captures it
        assert row["last_errno"] is None and "accepted since, and Mount all captures it" in \
            row["last_error"], row
        r = cli("--config", str(cfg), "fs", "mount-all", socket=eng.socket)
        assert r.returncode == 0, r.stdout + r.stderr
        assert eng.status(str(src))["last_errno"] is None
        eng.drain(str(src))
        assert not (tgt / "d").exists()  # what the administrator accepted: the empty directory
    finally:
        eng.cleanup()


@contextlib.contextmanager
def refused_after(tmp_path, src, tgt, change):
    """The entry `src` (20 files) replicated to `tgt`, the daemon stopped, `change()` made, the
    daemon started: its Mount all is refused (exit 1) and the replica keeps its 20 files.
    Yields (engine, configuration, the refusal's stderr); the engine is cleaned up after."""
    cfg = write_config(tmp_path / "etc" / "replication.toml", [{"path": str(src), "target": str(tgt)}])
    eng = Engine(tmp_path, cfg)
    try:
        eng.start()
        eng.drain(str(src))
        assert len(os.listdir(tgt)) == 20
        assert eng.stop() == 0
        change()
        eng.start()
        r = cli("--config", str(cfg), "fs", "mount-all", socket=eng.socket)
        assert r.returncode == 1, r.stdout + r.stderr
        assert not eng.status(str(src))["captured"]
        assert len(os.listdir(tgt)) == 20  # not one name removed
        yield eng, cfg, r.stderr
    finally:
        eng.cleanup()


def test_a_new_empty_file_system_in_the_old_ones_place_does_not_empty_the_replica(
        tmp_path, tmpfs_mount):
    """The entry's disk failed; a new one, formatted with the same file system type, is
    mounted at the same place, empty, and the daemon starts: type and mount point are the
    same, and the catch-up made the replica equal to the empty directory. The file system's
    own UUID (recorded at the first capture) tells them apart: refused, the replica kept."""
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    tmpfs_mount(src)
    for i in range(20):
        (src / f"f{i}").write_text(f"file {i}")

    def new_disk() -> None:
        subprocess.run(["umount", str(src)], check=True)  # the old disk is gone
        tmpfs_mount(src)  # "a new disk, formatted": same type, same place, empty
    with refused_after(tmp_path, src, tgt, new_disk) as (eng, cfg, err):
        assert f"{src} is not on the file system this entry was made for: its file system " \
            "UUID was " in err, err
        assert "another file system of its type is mounted in its place" in err, err
        said = cli("--config", str(cfg), "status", socket=eng.socket).stdout
        assert "changes there are not captured (its capture is refused: it is not on the file " \
            "system or device recorded for it; see below)" in " ".join(said.split()), said
        assert "(Mount all)" not in said, said  # which this refusal refuses
        r = cli("--config", str(cfg), "fs", "accept-filesystem", str(src), socket=eng.socket)
        assert r.returncode == 0 and "is forgotten" in r.stdout, r.stdout + r.stderr
        assert "; `mirrorsetup fs mount-all` captures it now" in r.stdout, r.stdout  # the next step
        r = cli("--config", str(cfg), "fs", "mount-all", socket=eng.socket)
        assert r.returncode == 0, r.stdout + r.stderr
        eng.drain(str(src))
        assert os.listdir(tgt) == []  # what the administrator accepted


def test_what_an_entry_is_is_recorded_as_it_is_added_not_at_its_first_capture(
        tmp_path, tmpfs_mount):
    """The record of what an entry is (its file system here) was written by its first capture,
    which trusted what it found: an entry added while its disk was mounted, first captured
    after a start at which another (empty) one was there, recorded that one, and its catch-up
    made a replica kept from before equal to it. `fs add` records it now."""
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    tmpfs_mount(src)
    (src / "f").write_text("on the disk")
    tgt.mkdir()
    (tgt / "f").write_text("on the disk")  # a replica kept from before (an earlier entry)
    cfg = tmp_path / "etc" / "replication.toml"
    eng = Engine(tmp_path, cfg)  # (not started: the entry is added without the daemon)
    r = subprocess.run([sys.executable, "-m", "app", "--config", str(cfg), "fs", "add", str(src),
                        "--target", str(tgt), "--adopt-target"], cwd=REPO, text=True,
                       capture_output=True, env={**os.environ, "MIRRORSETUP_SOCKET": eng.socket,
                                                 "MIRRORSETUP_STATE_DIR": eng.state})
    assert r.returncode == 0, r.stdout + r.stderr
    subprocess.run(["umount", str(src)], check=True)
    tmpfs_mount(src)  # at the next start another, empty, file system is there
    try:
        eng.start()
        r = cli("--config", str(cfg), "fs", "mount-all", socket=eng.socket)
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"{src} is not on the file system this entry was made for" in r.stderr, r.stderr
        assert (tgt / "f").read_text() == "on the disk"
    finally:
        eng.cleanup()


def test_a_bind_mounted_directory_that_is_not_bound_is_not_captured_nor_its_replica_emptied(
        tmp_path, tmpfs_mount):
    """Found by a walk: the entry is a directory bind-mounted from another directory of the
    same file system (`mount --bind /disk/store /disk/src`), and at the next start the bind
    is not made. The record said only "tmpfs mounted on /disk" (the bind of the same file
    system was taken for a switch-over's fence of the directory onto itself), the empty
    directory below matched it, and the catch-up emptied the replica. The record now says
    which directory of the file system the entry shows."""
    disk = tmpfs_mount(tmp_path / "disk")
    store, src, tgt = disk / "store", disk / "src", tmp_path / "tgt"
    store.mkdir()
    src.mkdir()
    for i in range(20):
        (store / f"f{i}").write_text(f"file {i}")
    subprocess.run(["mount", "--bind", str(store), str(src)], check=True)

    def not_bound() -> None:
        subprocess.run(["umount", str(src)], check=True)  # "the bind was not made at boot"
        assert os.listdir(src) == []
    try:
        with refused_after(tmp_path, src, tgt, not_bound) as (eng, cfg, err):
            said = f"{src} is not on the file system this entry was made for: its directory " \
                "of the file system was /store, it is now /src"
            assert said in err and "accept-filesystem" in err, err
            assert "a bind mount that was not made" in err, err
            subprocess.run(["mount", "--bind", str(store), str(src)], check=True)  # made again
            r = cli("--config", str(cfg), "fs", "mount-all", socket=eng.socket)
            assert r.returncode == 0, r.stdout + r.stderr
            eng.drain(str(src))
            assert len(os.listdir(tgt)) == 20
    finally:
        subprocess.run(["umount", "-l", str(src)], check=False)


def test_a_directory_reachable_beside_its_capture_is_said(tmp_path, tmpfs_mount):
    """Found by thinking of the raw device's twin: a directory's file system mounted a second
    time (the same disk at /mnt/disk and, by a bind, at the entry), or a bind of a directory in
    the entry made before Mount all (an application's, a container's), reaches the directory
    beneath mirrorfs: what is written there is not captured, and status said nothing. Said
    now, naming where; a bind made after Mount all shows the capture and is not said."""
    disk = tmpfs_mount(tmp_path / "disk")
    src, tgt = disk / "data", tmp_path / "tgt"
    (src / "sub").mkdir(parents=True)
    second, bound, later = tmp_path / "second", tmp_path / "bound", tmp_path / "later"
    made: list[Path] = []

    def bind(what: Path, where: Path) -> None:
        where.mkdir(exist_ok=True)
        subprocess.run(["mount", "--bind", str(what), str(where)], check=True)
        made.append(where)

    def said() -> list[str]:
        r = cli("--config", str(cfg), "status", "--json", socket=eng.socket)
        assert r.returncode == 0, r.stdout + r.stderr
        return [w["message"] for w in json.loads(r.stdout)["warnings"]
                if w["subject"] == str(src) and "reachable beside its capture" in w["message"]]
    try:
        bind(disk, second)  # the file system a second time
        bind(src / "sub", bound)  # a directory in the entry, before Mount all
        cfg = write_config(tmp_path / "etc" / "replication.toml",
                           [{"path": str(src), "target": str(tgt)}])
        eng = Engine(tmp_path, cfg)
        eng.start()
        try:
            found = said()
            assert len(found) == 2, found
            assert any(f"also reachable beside its capture at {second}/data (mirrorsetup-test "
                       f"mounted at {second}): changes made there are not captured" in t
                       for t in found), found
            assert any(f"at {bound} (a bind of sub in it)" in t for t in found), found
            # what it says is so: a write there is not replicated, one through the entry is
            (second / "data" / "beside").write_text("not captured")
            (src / "through").write_text("captured")
            eng.drain(str(src))
            assert (tgt / "through").read_text() == "captured" and not (tgt / "beside").exists()
            bind(src / "sub", later)  # after Mount all: a bind of the capture
            for where in (second, bound):
                subprocess.run(["umount", str(where)], check=True)
                made.remove(where)
            assert said() == []
            subprocess.run(["umount", str(later)], check=True)  # (it holds the capture's mount)
            made.remove(later)
        finally:
            eng.cleanup()
    finally:
        for where in reversed(made):
            subprocess.run(["umount", "-l", str(where)], check=False)


def test_an_entrys_target_is_set_by_the_cli_captured_or_not(running, tmp_path):
    """An entry's target could only be changed by removing the entry and adding it again (the
    add's own hint said so). `fs set --target` checks the new target as an add does, lifts the
    capture and makes it again (refused, naming who, when something uses the directory), and
    the new capture makes the new target equal to the directory; the old replica is left."""
    eng, src, tgt, cfg = running
    open(os.path.join(src, "b"), "w").write("beta")
    eng.drain(src)
    configured = lambda: json.loads(cli("--config", cfg, "--json", "fs", "list").stdout)[0]["target"]  # noqa: E731
    full = tmp_path / "full"
    full.mkdir()
    (full / "theirs").write_text("not ours")
    new = str(tmp_path / "new")
    r = cli("--config", cfg, "fs", "set", src, "--target", str(full), socket=eng.socket)
    assert r.returncode == 2 and f"target {full} is not empty" in r.stderr, r.stdout + r.stderr
    assert "--adopt-target" in r.stderr and "unmounted" not in r.stdout, r.stdout
    r = cli("--config", cfg, "fs", "set", src, socket=eng.socket)
    assert r.returncode == 2 and "say what to set" in r.stderr, r.stderr
    holder = subprocess.Popen(["sleep", "60"], cwd=src)
    try:
        r = cli("--config", cfg, "fs", "set", src, "--target", new, socket=eng.socket)
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"pid {holder.pid} (sleep)" in r.stderr and "kept the target" in r.stderr, r.stderr
        assert "set it again once they let go of it" in r.stderr and "--force" not in r.stderr, r.stderr
    finally:
        holder.kill()
        holder.wait()
    assert configured() == tgt and src in mirrorfs_mounts() and (full / "theirs").exists()
    r = cli("--config", cfg, "fs", "set", src, "--target", new, socket=eng.socket)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.replace("\n", " ")
    assert f"{src} replicates to {new} now" in out and f"its replica at {tgt} is left" in out, out
    assert f"mounted mirrorfs on {src}" in out and configured() == new, out
    open(os.path.join(src, "c"), "w").write("gamma")
    eng.drain(src)
    assert eng.status(src)["target"] == new
    assert {"a", "b", "c"} <= set(os.listdir(new)), os.listdir(new)
    assert [open(os.path.join(new, n)).read() for n in "abc"] == ["alpha", "beta", "gamma"]
    assert not os.path.exists(os.path.join(tgt, "c")) and os.path.exists(os.path.join(tgt, "b"))
    r = cli("--config", cfg, "fs", "set", src, "--target", new, socket=eng.socket)
    assert r.returncode == 0 and "unchanged" in r.stdout and "unmounted" not in r.stdout, r.stdout
    r = cli("--config", cfg, "fs", "set", src, "--no-target", socket=eng.socket)
    assert r.returncode == 0 and "has no target now" in r.stdout, r.stdout + r.stderr
    assert configured() is None and src in mirrorfs_mounts()


def test_a_target_set_to_what_a_hand_edit_named_applies_it_to_the_capture(running):
    """The file was edited by hand while the capture ran (status says the capture still
    replicates to the old target). `fs set --target` with that very target said "unchanged:
    it replicates there already" and left the capture where it was; it makes it again now."""
    eng, src, tgt, cfg = running
    moved = tgt + "-moved"
    write_config(Path(cfg), [{"path": src, "target": moved}])
    r = cli("--config", cfg, "fs", "set", src, "--target", moved, socket=eng.socket)
    out = r.stdout.replace("\n", " ")
    assert r.returncode == 0 and f"its capture, which replicated to {tgt} (it began before the " \
        "configuration was edited), was made again" in out, out + r.stderr
    open(os.path.join(src, "c"), "w").write("gamma")
    st = eng.drain(src)
    assert st["target"] == moved and open(os.path.join(moved, "c")).read() == "gamma"
    r = cli("--config", cfg, "fs", "set", src, "--target", moved, socket=eng.socket)
    assert r.returncode == 0 and "unchanged" in r.stdout and "unmounted" not in r.stdout, r.stdout
