"""The seed's block-device steps through the CLI, on real loop devices, checked in sysfs and by losetup.

A "disk" here is a loop device made by util-linux on a sparse file (scratch_loop); the entry's
access point is a second loop device attached by mirrorsetup on top of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import losetup_json, loops_on, run

pytestmark = pytest.mark.root


def cli(config: Path, *argv: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "app", "--config", str(config), *argv],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def sysfs(loop: str, key: str) -> str:
    return Path(f"/sys/block/{Path(loop).name}/loop/{key}").read_text().strip()


def test_add_attach_all_detach_all(config_path, disks):
    disk = disks()
    said = cli(config_path, "block", "add", disk, "--offset", "1M").stdout
    # the offset in the size's words (it was "1 MiB … from offset 1048576", bytes beside MiB)
    assert "at offset 1 MiB" in said, said
    listed = json.loads(cli(config_path, "block", "list", "--json").stdout)
    assert [(e["device"], e["offset"]) for e in listed] == [(disk, 1 << 20)]

    out = json.loads(cli(config_path, "--json", "block", "attach-all").stdout)
    assert [r["outcome"] for r in out] == ["ok"]
    loop = out[0]["details"]["loop"]
    assert loops_on(disk) == [loop]
    assert sysfs(loop, "offset") == str(1 << 20)
    witness = {d["name"]: d for d in losetup_json()}
    assert witness[loop]["back-file"] == disk and int(witness[loop]["offset"]) == 1 << 20

    again = json.loads(cli(config_path, "block", "attach-all", "--json").stdout)
    assert again[0]["outcome"] == "unchanged" and loops_on(disk) == [loop]

    status = json.loads(cli(config_path, "status", "--json").stdout)
    assert status["block"][0]["state"] == "attached" and status["block"][0]["attached_loop"] == loop

    gone = json.loads(cli(config_path, "block", "detach-all", "--json").stdout)
    assert [r["outcome"] for r in gone] == ["ok"]
    assert loops_on(disk) == []


def test_dry_run_changes_nothing(config_path, disks):
    disk = disks()
    cli(config_path, "block", "add", disk)
    before = config_path.read_bytes()
    out = json.loads(cli(config_path, "block", "attach-all", "--dry-run", "--json").stdout)
    assert out[0]["outcome"] == "skipped" and "would attach" in out[0]["message"]
    assert loops_on(disk) == [] and config_path.read_bytes() == before


def test_fixed_loop_is_used(config_path, disks, unused_loop):
    disk = disks()
    free = unused_loop  # nobody else takes it
    cli(config_path, "block", "add", disk, "--loop", free)
    out = json.loads(cli(config_path, "block", "attach-all", "--json").stdout)
    assert out[0]["details"]["loop"] == free and loops_on(disk) == [free]


def test_mounted_device_is_refused_unless_forced(config_path, disks, tmp_path):
    disk = disks()
    run("mkfs.ext4", "-q", disk)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", "-t", "ext4", disk, str(mnt))
    try:
        cli(config_path, "block", "add", disk)
        proc = cli(config_path, "block", "attach-all", check_rc=2)  # refused: nothing changed
        assert f"REFUSED  {disk}: {disk} is mounted on {mnt}" in proc.stderr, proc.stderr
        assert "refused: " not in proc.stderr and loops_on(disk) == []
        forced = json.loads(cli(config_path, "block", "attach-all", "--force", "--json").stdout)
        assert forced[0]["outcome"] == "ok" and len(loops_on(disk)) == 1
    finally:
        run("umount", "-l", str(mnt), check=False)


def _entry_with_a_mounted_loop(config_path, disks, tmp_path) -> tuple[str, str, Path]:
    """An entry attached (plain loop, no daemon) with ext4 mounted on its loop: (disk, loop,
    mount point). The caller unmounts it."""
    disk = disks()
    cli(config_path, "block", "add", disk)
    loop = json.loads(cli(config_path, "block", "attach-all", "--json").stdout)[0]["details"]["loop"]
    run("mkfs.ext4", "-q", loop)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", "-t", "ext4", loop, str(mnt))
    return disk, loop, mnt


def test_detach_all_reports_a_mounted_loop_and_unmounts_nothing(config_path, disks, tmp_path):
    disk, loop, mnt = _entry_with_a_mounted_loop(config_path, disks, tmp_path)
    try:
        proc = cli(config_path, "block", "detach-all", "--json", check_rc=2)
        res = json.loads(proc.stdout)[0]
        assert res["errno_name"] == "EBUSY" and str(mnt) in res["message"]
        assert loops_on(disk) == [loop]
        assert any(line.split()[4] == str(mnt) for line in Path("/proc/self/mountinfo").read_text().splitlines())
    finally:
        run("umount", "-l", str(mnt), check=False)


def test_remove_detaches_first(config_path, disks):
    disk = disks()
    cli(config_path, "block", "add", disk)
    cli(config_path, "block", "attach-all")
    assert len(loops_on(disk)) == 1
    out = json.loads(cli(config_path, "block", "remove", disk, "--json").stdout)
    assert [r["action"] for r in out] == ["detach", "remove"]
    assert loops_on(disk) == [] and json.loads(cli(config_path, "block", "list", "--json").stdout) == []


def test_remove_of_an_entry_whose_loop_is_mounted_is_refused_and_keeps_it(config_path, disks,
                                                                          tmp_path):
    """Found by a walk: the entry kept because its loop was mounted printed as "plan" on stdout
    (a dry run's word). The remove did not happen: REFUSED (exit 2: nothing was changed, as
    the exit-status rule says of what is in use; it said FAILED, exit 1), EBUSY, on stderr."""
    disk, _loop, mnt = _entry_with_a_mounted_loop(config_path, disks, tmp_path)
    try:
        proc = cli(config_path, "block", "remove", disk, check_rc=2)
        assert "plan" not in proc.stdout and proc.stdout == "", proc.stdout
        assert f"REFUSED  {disk}: kept {disk} in the configuration: its loop is still in use" \
            in proc.stderr, proc.stderr
        res = json.loads(cli(config_path, "block", "remove", disk, "--json", check_rc=2).stdout)
        assert [(r["action"], r["outcome"]) for r in res] == [("detach", "failed"), ("remove", "failed")]
        assert res[1]["errno_name"] == "EBUSY", res
        assert [e["device"] for e in json.loads(cli(config_path, "block", "list", "--json").stdout)] == [disk]
    finally:
        run("umount", str(mnt), check=False)
    cli(config_path, "block", "remove", disk)


def test_bad_input_is_refused_and_changes_nothing(config_path, disks, tmp_path):
    disk = disks(8 << 20)
    cli(config_path, "block", "add", disk)
    before = config_path.read_bytes()
    swap = disks(8 << 20)
    run("mkswap", "-q", swap)
    not_block = tmp_path / "plain-file"
    not_block.write_text("x")
    cases = [
        (["block", "add", swap], "swap"),
        (["block", "add", str(not_block)], "not a block device"),
        (["block", "add", disk], disk),  # duplicate
        (["block", "add", disks(8 << 20), "--offset", "1G"], "past the end"),
        (["block", "add", disks(8 << 20), "--offset", "100"], "512"),
        (["block", "add", disks(8 << 20), "--loop", "/dev/sda"], "/dev/loopN"),
        (["block", "add", disks(8 << 20), "--encryption", "aes"], "encryption"),
    ]
    for argv, words in cases:  # refused (exit 2): the reason on stderr, JSON on stdout
        proc = cli(config_path, *argv, "--json", check_rc=2)
        refusal = json.loads(proc.stdout)
        assert words in refusal["error"] and words in proc.stderr, (argv, refusal)
        assert config_path.read_bytes() == before, argv
        if words == "not a block device":  # the errno a script reads, as stat(2) would say
            assert refusal["errno_name"] == "ENOTBLK", refusal
    assert cli(config_path, "block", "add", disk, "--offset", "12x", check_rc=2).stderr


def test_block_add_says_every_malformed_option_at_once(config_path, disks):
    """A bad --offset, --sizelimit and --loop were said joined by "; " on one line (and a
    --offset that is no size alone, by argparse, before the others were looked at), where
    `target add` says each on its own line. Each is its own stderr line now, --json lists them
    in the entry's field order; exit 2, nothing changed."""
    disk = disks(8 << 20)
    wrong = {"loop": "/dev/sda", "offset": "ten", "sizelimit": "100", "queue_limit": "1K"}
    proc = cli(config_path, "block", "add", disk, "--json",
               *[w for k, v in wrong.items() for w in (f"--{k.replace('_', '-')}", v)], check_rc=2)
    lines = proc.stderr.splitlines()
    for key, value in wrong.items():
        assert [ln for ln in lines if ln.startswith(f"mirrorsetup: {key}: ") and value in ln], \
            (key, proc.stderr)
    assert len(lines) == len(wrong), proc.stderr
    said = json.loads(proc.stdout)
    assert [e["key"] for e in said["errors"]] == list(wrong), said
    assert {e["errno_name"] for e in said["errors"]} == {"EINVAL"}, said
    assert not config_path.exists() and loops_on(disk) == []
    # two sizes that are none: both said, not the first alone
    proc = cli(config_path, "block", "add", disk, "--offset", "12x", "--sizelimit", "1.5G",
               check_rc=2)
    assert proc.stderr.splitlines() == [
        "mirrorsetup: offset: not a size: '12x' (use bytes or a suffix: 512, 4K, 1M, 2G)",
        "mirrorsetup: sizelimit: not a size: '1.5G' (use bytes or a suffix: 512, 4K, 1M, 2G)"]
    assert not config_path.exists()


def test_manual_attach_and_detach_are_not_persisted(config_path, disks, unused_loop):
    disk = disks()
    out = json.loads(cli(config_path, "manual", "attach", disk, "--read-only", "--loop",
                         unused_loop, "--json").stdout)[0]
    loop = out["details"]["loop"]
    assert loop == unused_loop
    assert loops_on(disk) == [loop] and sysfs(loop, "../ro") == "1"
    assert not config_path.exists()
    done = cli(config_path, "manual", "detach", loop)
    assert done.stdout.split() == ["ok", f"{loop}:", "detached"], done.stdout  # named once
    assert loops_on(disk) == []
    # Detached twice: on a busy host another program may attach the number we freed (the
    # project's CI saw it once), and a second detach would end its loop. Held exclusively, it
    # cannot be attached (an attach claims the device) and it stays ours to ask about.
    held = os.open(loop, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    try:
        again = json.loads(cli(config_path, "manual", "detach", loop, "--json").stdout)[0]
    finally:
        os.close(held)
    assert again["outcome"] == "unchanged", again
    assert "/dev/loopN" in cli(config_path, "manual", "detach", "/dev/sda", check_rc=2).stderr


def test_manual_attach_refuses_a_bad_window_as_block_add_does(config_path, disks):
    """`manual attach --offset 100` said 'FAILED … must be a multiple of 512' with exit 1 (an
    entry failed) where `block add --offset 100` refuses it, exit 2 (helper-26's walk). Bad
    arguments are refused, with EINVAL, and no loop is attached."""
    disk = disks(8 << 20)
    for argv, words in ((["--offset", "100"], "512"), (["--sizelimit", "100"], "512"),
                        (["--offset", "1G"], "past the end"),
                        (["--offset", "4M", "--sizelimit", "8M"], "past the end")):
        proc = cli(config_path, "manual", "attach", disk, *argv, "--json", check_rc=2)
        refusal = json.loads(proc.stdout)
        assert words in refusal["error"] and refusal["errno_name"] == "EINVAL", (argv, refusal)
        assert proc.stderr.startswith("mirrorsetup: "), proc.stderr
        assert loops_on(disk) == []
    # the device as its own loop: refused as block add refuses it (it said the loop was busy)
    proc = cli(config_path, "manual", "attach", disk, "--loop", disk, "--json", check_rc=2)
    [refusal] = json.loads(proc.stdout)
    assert "cannot be its own loop device" in refusal["message"], refusal
    assert refusal["errno_name"] == "EINVAL" and loops_on(disk) == []


def test_detach_pending_while_the_loop_is_open(config_path, disks):
    disk = disks()
    loop = json.loads(cli(config_path, "manual", "attach", disk, "--json").stdout)[0]["details"]["loop"]
    holder = os.open(loop, os.O_RDONLY)
    try:
        res = json.loads(cli(config_path, "manual", "detach", loop, "--json").stdout)[0]
        assert res["outcome"] == "pending" and "pending" in res["message"]
        assert loops_on(disk) == [loop] and sysfs(loop, "autoclear") == "1"
    finally:
        os.close(holder)
    assert loops_on(disk) == []  # the kernel detached at last close


def test_parallel_attach_all_never_shares_a_loop(tmp_path, disks):
    """Several processes attach different entries at once: each gets its own loop device."""
    configs = []
    for i in range(6):
        cfg = tmp_path / f"c{i}.toml"
        for _ in range(3):
            cli(cfg, "block", "add", disks(4 << 20))
        configs.append(cfg)
    procs = [subprocess.Popen([sys.executable, "-m", "app", "--config", str(c), "block", "attach-all",
                               "--json"], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parent.parent) for c in configs]
    loops = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
        loops += [r["details"]["loop"] for r in json.loads(out)]
    assert len(loops) == 18 and len(set(loops)) == 18
    for cfg in configs:
        for entry in json.loads(cli(cfg, "block", "list", "--json").stdout):
            assert len(loops_on(entry["device"])) == 1


def test_devices_json_lists_a_disk_and_excludes_swap(config_path, disks):
    good, swap = disks(16 << 20), disks(16 << 20)
    run("mkfs.ext4", "-q", good)
    run("mkswap", "-q", swap)
    config_path.parent.mkdir()  # it says which are replicated: a named file must be there
    config_path.write_text("schema = 1\n")
    config_path.chmod(0o600)
    listed = {d["path"]: d for d in json.loads(cli(config_path, "block", "devices", "--json").stdout)}
    assert good in listed and swap not in listed
    assert listed[good]["fstype"] == "ext4" and listed[good]["size"] == 16 << 20
    assert {"path", "size", "type", "fstype", "mountpoints", "excluded"} <= set(listed[good])
    everything = {d["path"]: d for d in json.loads(cli(config_path, "block", "devices", "--all",
                                                       "--json").stdout)}
    assert "swap" in everything[swap]["excluded"]


def test_devices_say_which_are_replicated_and_which_loop_is_an_entrys(config_path, disks):
    """As the TUI's picker says it: the entry's device and its loop, by device number (the
    entry may name the device by another path)."""
    disk = disks(16 << 20)
    alias = config_path.parent.parent / "disk-alias"
    alias.symlink_to(disk)
    cli(config_path, "block", "add", str(alias))
    loop = json.loads(cli(config_path, "block", "attach-all", "--json").stdout)[0]["details"]["loop"]
    try:
        listed = {d["path"]: d for d in json.loads(cli(config_path, "block", "devices",
                                                       "--json").stdout)}
        assert listed[disk]["replicated"] == f"replicated: not captured via {loop}"
        assert listed[loop]["replicated"] == f"the loop of replicated {alias}"
        others = [d for p, d in listed.items() if p not in (disk, loop)]
        assert all(d["replicated"] is None for d in others)
        line = next(x for x in cli(config_path, "block", "devices").stdout.splitlines()
                    if x.startswith(disk + " "))
        assert f"replicated: not captured via {loop}" in line
    finally:
        cli(config_path, "block", "detach-all")
    assert loops_on(disk) == []


def test_attach_all_reads_the_loops_of_the_host_once(config_path, disks, tmp_path, monkeypatch):
    """Each attached loop joins the picture the next entry is planned against: the loops of the
    host are read once per attach-all, not once per entry (256 entries took 17 s that way), and
    only their backing files: a loop's whole status is read when it is one of the entry's."""
    from app.services import loop as loopdev
    from app.services.config import ConfigStore
    from app.services.control import ControlClient
    from app.services.replication import Replication
    made = [disks(8 << 20) for _ in range(3)]
    store = ConfigStore(config_path)
    for d in made:
        store.add_block(d)
    reads, whole = [], []
    real, real_status = loopdev.bound_backing, loopdev.status_of
    monkeypatch.setattr(loopdev, "bound_backing", lambda: reads.append(1) or real())
    monkeypatch.setattr(loopdev, "status_of", lambda i: whole.append(i) or real_status(i))
    results = Replication(store, ControlClient(str(tmp_path / "no-daemon.sock"))).attach_all()
    assert [r.outcome.value for r in results] == ["ok"] * 3, [r.message for r in results]
    assert len(reads) == 1 and whole == []  # nothing was on them; what we bound we knew
    assert all(len(loops_on(d)) == 1 for d in made)
    whole.clear()
    again = Replication(store, ControlClient(str(tmp_path / "no-daemon.sock"))).attach_all()
    assert [r.outcome.value for r in again] == ["unchanged"] * 3
    assert sorted(whole) == sorted(int(loops_on(d)[0][len("/dev/loop"):]) for d in made)


def test_attach_all_reads_the_configuration_once(config_path, disks, tmp_path, monkeypatch):
    """The configured devices that name a busy loop's entry are the ones attach-all loaded:
    it read and compared the whole file again for each entry (256 entries: 256 reads of a
    20 KB file, ~20 ms of its ~300 ms here)."""
    from app.services.config import ConfigStore
    from app.services.control import ControlClient
    from app.services.replication import Replication
    made = [disks(8 << 20) for _ in range(3)]
    store = ConfigStore(config_path)
    for d in made:
        store.add_block(d)
    loads = []
    real = ConfigStore.load
    monkeypatch.setattr(ConfigStore, "load", lambda self: loads.append(1) or real(self))
    try:
        results = Replication(store, ControlClient(str(tmp_path / "no-daemon.sock"))).attach_all()
        assert [r.outcome.value for r in results] == ["ok"] * 3, [r.message for r in results]
        assert len(loads) == 1
    finally:
        cli(config_path, "block", "detach-all")
    assert all(loops_on(d) == [] for d in made)


def test_capture_loops_are_indexed_exactly_as_the_per_device_comparison_found_them():
    """The loops reaching a device through a capture file are looked up in an index built once
    per action (the comparison per entry and per loop was 98,176 calls for 256 entries); the
    index finds what is_capture_of finds, no more: another device's capture, a file merely
    named like one, a deleted one."""
    from app.services.blockplan import View
    from app.services.layout import capture_suffix, is_capture_of
    from app.services.loop import LoopStatus
    devs = ["/dev/vdb", "/dev/disk/by-id/x", "/srv/disk.img"]
    backings = [f"/var/lib/mirrorsetup{capture_suffix(d)}" for d in devs] + [
        f"/other/install{capture_suffix(devs[0])}",  # another installation's: counts too
        f"/var/lib/mirrorsetup{capture_suffix(devs[1])} (deleted)",
        f"/var/lib/mirrorsetup{capture_suffix(devs[2])}.bak",
        "/srv/block/x/capture", "capture", "", None]
    loops = [LoopStatus(device=f"/dev/loop{i}", index=i, backing_file=b, offset=0, sizelimit=0,
                        size=0, read_only=False, autoclear=False, partscan=False, direct_io=False)
             for i, b in enumerate(backings)]
    view = View(attached=loops, table=[])
    for d in [*devs, "/dev/vdc"]:
        want = [s.device for s in loops if is_capture_of(d, s.backing_file)]
        assert [s.device for s in view.captures_of(d)] == want
    assert [s.device for s in view.captures_of(devs[0])] == ["/dev/loop0", "/dev/loop3"]


def test_a_loop_rebound_to_another_file_since_the_view_was_read_is_not_detached(disks, sparse_file):
    """A detach reads one picture of every loop's backing file (View), then for the entry's
    loops only their offset: a loop detached and bound by someone else meanwhile, at the same
    offset, is theirs now and not named for detaching."""
    from app.services import loop as loopdev
    from app.services.blockplan import View, plain_loops_of
    from app.services.config import BlockEntry
    import errno
    from app.services.results import MirrorError
    disk = disks(4 << 20)
    mine = loopdev.attach(disk)
    ours = [mine.device]  # what this test detaches at the end
    try:
        entry = BlockEntry(disk)
        view = View()
        assert plain_loops_of(entry, view) == [mine.device]
        assert loopdev.detach(mine.device).outcome.name == "OK"
        ours = []
        try:  # someone else's now: ours, on another file
            other = loopdev.attach(str(sparse_file(4 << 20)), loop=mine.device)
            ours = [other.device]
            assert other.backing_file != disk
        except MirrorError as exc:  # a busy host's process took the number first: theirs
            assert exc.errno == errno.EBUSY, exc
        assert plain_loops_of(entry, view) == []  # the same View: its picture is older
        assert plain_loops_of(entry, View()) == []
    finally:
        for loop in ours:
            loopdev.detach(loop)


def test_attach_all_without_the_daemon_refuses_an_entry_switched_over(config_path, disks, tmp_path):
    """An entry handed over to its remote replica (the daemon's marker in its state directory)
    was attached by `block attach-all` without a daemon as a plain read-write loop, exit 0,
    while the daemon and `fs mount-all` refuse it: writes there fork the replica's history."""
    from app.services.layout import SWITCHED_MARKER, entry_state
    disk = disks()
    cli(config_path, "block", "add", disk)
    state = tmp_path / "state"
    marker = Path(entry_state(str(state), "block", disk)) / SWITCHED_MARKER
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"state": "switched", "target": "backup1:disk.img", "seq": 7,
                                  "time": 1_700_000_000}))
    env = {**os.environ, "MIRRORSETUP_STATE_DIR": str(state)}

    def attach_all():
        return subprocess.run([sys.executable, "-m", "app", "--config", str(config_path), "block",
                               "attach-all", "--json"], capture_output=True, text=True, env=env,
                              cwd=Path(__file__).parent.parent)
    p = attach_all()
    assert p.returncode == 2, p.stdout + p.stderr  # refused: nothing was changed
    [r] = json.loads(p.stdout)
    assert r["outcome"] == "failed" and "switched over to backup1:disk.img" in r["message"], r
    assert "mirrorsetup failback" in r["message"] and loops_on(disk) == []
    marker.unlink()  # failed back: attached as before
    p = attach_all()
    try:
        assert p.returncode == 0 and json.loads(p.stdout)[0]["outcome"] == "ok", p.stdout + p.stderr
    finally:
        cli(config_path, "block", "detach-all", check_rc=None)
