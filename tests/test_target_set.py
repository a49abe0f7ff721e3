"""`mirrorsetup target set NAME`: a remote target's settings changed without editing the
file by hand, checked as `target add` checks them; the daemon's running captures take them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_engine_support import REPO
from test_remote import block_remote, cli, dd, fs_remote, remote, sha, wait_for  # noqa: F401 - the fixtures

MiB = 1 << 20


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture
def two_targets(tmp_path):
    """A configuration with two targets, b1 and b2, as `target add` writes them (no host is
    asked: nothing here connects)."""
    etc = tmp_path / "etc"
    etc.mkdir()
    key = keygen(etc / "k")
    (etc / "known_hosts").write_text(f"10.231.9.2 ssh-ed25519 {key.with_suffix('.pub').read_text().split()[1]}\n")
    cfg = etc / "replication.toml"
    tables = "".join(f'\n[[target]]\nname = "{n}"\nhost = "10.231.9.2"\nroot = "/srv/{n}"\n'
                     f'identity = "{key}"\nknown_hosts = "{etc / "known_hosts"}"\n'
                     'bandwidth = "20MiB/s"\n' for n in ("b1", "b2"))
    cfg.write_text("schema = 1\n" + tables)
    cfg.chmod(0o600)
    return cfg


def targets(cfg: Path) -> dict[str, dict]:
    listed = cli(cfg, "target", "list", "--json")
    assert listed.returncode == 0, listed.stderr  # the file is still valid
    return {t["name"]: t for t in json.loads(listed.stdout)}


def test_target_set_changes_what_it_is_given_and_nothing_else(two_targets, tmp_path):
    cfg = two_targets
    before = targets(cfg)
    other = keygen(tmp_path / "etc" / "other")
    r = cli(cfg, "--json", "target", "set", "b1", "--bandwidth", "5MiB/s", "--resync-bandwidth",
            "1MiB/s", "--compression", "none", "--user", "repl", "--identity", str(other))
    assert r.returncode == 0, r.stdout + r.stderr
    [res] = json.loads(r.stdout)
    assert res["outcome"] == "ok", res
    assert res["details"]["changed"] == {"bandwidth": ["20MiB/s", "5MiB/s"],
                                         "resync_bandwidth": [None, "1MiB/s"],
                                         "compression": ["zstd", "none"], "user": [None, "repl"],
                                         "identity": [before["b1"]["identity"], str(other)]}
    # a new identity: the line for the target's authorized_keys is its public key's
    public = other.with_suffix(".pub").read_text().split()[1]
    assert public in res["details"]["authorized_key"], res
    after = targets(cfg)
    assert after["b2"] == before["b2"]  # the other target is untouched
    changed = {k for k in after["b1"] if after["b1"][k] != before["b1"][k]}
    assert changed == {"bandwidth", "resync_bandwidth", "compression", "user", "identity"}
    assert after["b1"]["bandwidth"] == "5MiB/s" and after["b1"]["user"] == "repl"
    said = cli(cfg, "target", "set", "b1", "--bandwidth", "none")  # none: no cap
    assert said.returncode == 0 and "bandwidth 5MiB/s -> none" in said.stdout, said
    assert targets(cfg)["b1"]["bandwidth"] is None
    assert "\nbandwidth = " not in cfg.read_text().split("[[target]]")[1]  # the key is gone


def test_target_set_of_the_same_values_is_unchanged_and_writes_nothing(two_targets):
    cfg = two_targets
    text, mtime = cfg.read_text(), cfg.stat().st_mtime_ns
    r = cli(cfg, "--json", "target", "set", "b1", "--bandwidth", "20MiB/s", "--compression", "zstd")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["outcome"] == "unchanged"
    assert cfg.read_text() == text and cfg.stat().st_mtime_ns == mtime


def test_target_set_refuses_bad_values_all_at_once_and_changes_nothing(two_targets, tmp_path):
    cfg = two_targets
    text = cfg.read_text()
    r = cli(cfg, "--json", "target", "set", "b1", "--bandwidth", "fast", "--port", "70000",
            "--compression", "lz4", "--host", "elsewhere", "--root", "/srv/x")
    assert r.returncode == 2, r.stdout + r.stderr
    said = r.stderr.splitlines()
    assert len(said) == 5, said  # one line each
    for word in ("--host:", "--root:", "port:", "bandwidth:", "compression:"):
        assert any(line.startswith(f"mirrorsetup: {word}") for line in said), (word, said)
    # host and root are where the replicas are: what to do instead
    assert "target remove b1" in r.stderr and "target rekey b1" in r.stderr, r.stderr
    assert json.loads(r.stdout)["errno_name"] == "EINVAL"
    etc = tmp_path / "etc"
    for argv, words, name in (
            ([], "nothing to set: give at least one of --bandwidth", "EINVAL"),
            (["--resync-bandwidth", "40MiB/s"], "is above bandwidth 20MiB/s", "EINVAL"),
            (["--identity", str(etc / "k.pub")], "is a public key: give the private key", "EINVAL"),
            (["--identity", str(etc / "missing")], f"identity {etc / 'missing'} does not exist",
             "ENOENT"),
            (["--known-hosts", str(etc)], "is a directory: give a file", "EISDIR"),
            (["--known-hosts", str(etc / "no" / "kh")], "does not exist: create it", "ENOENT")):
        r = cli(cfg, "--json", "target", "set", "b1", *argv)
        assert r.returncode == 2 and words in r.stderr, (argv, r.stdout, r.stderr)
        got = json.loads(r.stdout)
        assert (got[0] if isinstance(got, list) else got)["errno_name"] == name, (argv, got)
    r = cli(cfg, "--json", "target", "set", "nosuch", "--port", "2222")
    assert r.returncode == 2 and "no remote target named 'nosuch'" in r.stderr, r.stderr
    assert cfg.read_text() == text  # nothing was changed


def test_help_names_every_setting_and_not_host_or_root():
    r = subprocess.run([sys.executable, "-m", "app", "target", "set", "--help"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for flag in ("--bandwidth", "--resync-bandwidth", "--compression", "--port", "--user",
                 "--identity", "--known-hosts", "--json"):
        assert flag in r.stdout, flag
    assert "--host" not in r.stdout and "--root" not in r.stdout


@pytest.mark.root
def test_the_daemons_running_captures_take_target_set_at_once(fs_remote, tmp_path):
    """`target set` applies to the running captures of the target (as `drbdadm adjust` does):
    a rate at once, in the same session; what ssh is started with (known_hosts here) by a new
    session that resumes where the last one was (no resync). Before, a running capture kept
    the settings it started with until Unmount all / Mount all, which an administrator cannot
    do with applications using the file system. A `target set` that does not reach the daemon
    says so, status says the settings not applied, and `target apply` applies them."""
    eng, src, r = fs_remote()
    old_kh = targets(r.cfg)["backup1"]["known_hosts"]
    kh = tmp_path / "etc" / "pins"  # a file of its own: the key pinned now is copied there

    def engine_row() -> tuple[dict, list[str]]:
        said = json.loads(cli(r.cfg, "status", "--json", socket=eng.socket).stdout)
        return (said["filesystem"][0]["engine"],
                [w["message"] for w in said["warnings"] if w["subject"] == src])

    # not reaching the daemon (another socket): the file changes, the capture is told later
    done = cli(r.cfg, "--json", "target", "set", "backup1", "--known-hosts", str(kh),
               socket=str(tmp_path / "nodaemon.sock"))
    assert done.returncode == 0, done.stdout + done.stderr
    [res] = json.loads(done.stdout)
    assert res["details"]["entries"] == [src], res
    assert "pinned its host key SHA256:" in res["message"] and "mirrorsetup target apply backup1" \
        in res["message"], res
    assert f"{r.bed.target_addr}]:{r.bed.port} ssh-ed25519 " in kh.read_text()
    row, warnings = engine_row()
    assert row["not_applied"] == {"known_hosts": [old_kh, str(kh)]}, row
    [text] = [w for w in warnings if "configuration now says" in w]
    assert "as the entry and its target backup1 were when it started" in text, text
    assert "`mirrorsetup target apply backup1` (or Unmount all, then Mount all) applies it" in text, text

    before = eng.status(src)
    applied = cli(r.cfg, "--json", "target", "apply", "backup1", socket=eng.socket)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    [res] = json.loads(applied.stdout)
    assert res["outcome"] == "ok" and res["target"] == src, res
    assert "known_hosts applied to its running capture: a new session to backup1 takes them" \
        in res["message"], res
    row, warnings = engine_row()
    assert row["not_applied"] == {} and not [w for w in warnings if "configuration" in w], row
    Path(src, "after").write_text("through the new pins")
    eng.drain(src)
    assert (r.root / "data" / "after").read_text() == "through the new pins"
    now = eng.status(src)
    assert now["reconnects"] == before["reconnects"] + 1 and now["resync_bytes"] == 0, now
    assert now["connection"] == "connected", now

    # a rate, through the daemon: the session goes on, and the cap holds for what comes next
    done = cli(r.cfg, "--json", "target", "set", "backup1", "--bandwidth", "256KiB/s",
               socket=eng.socket)
    assert done.returncode == 0, done.stdout + done.stderr
    said, res = json.loads(done.stdout)
    assert "until" not in said["message"], said  # nothing is said to wait for a next start
    assert res["outcome"] == "ok" and "bandwidth applied to its running capture (its session " \
        "goes on)" in res["message"], res
    assert engine_row()[0]["not_applied"] == {}
    data = os.urandom(2 * MiB)  # 8 s at the cap; far less than a second without it
    Path(src, "capped").write_bytes(data)
    time.sleep(1.5)
    row = eng.status(src)
    assert row["applied_seq"] < row["last_seq"], f"2 MiB went in 1.5 s at a 256 KiB/s cap: {row}"
    done = cli(r.cfg, "--json", "target", "set", "backup1", "--bandwidth", "none", socket=eng.socket)
    assert done.returncode == 0, done.stdout + done.stderr
    eng.drain(src)
    assert (r.root / "data" / "capped").read_bytes() == data
    assert eng.status(src)["reconnects"] == now["reconnects"]  # rates: the same session

    # applied again: nothing to do
    again = cli(r.cfg, "--json", "target", "apply", "backup1", socket=eng.socket)
    assert again.returncode == 0 and json.loads(again.stdout)[0]["outcome"] == "unchanged", again.stdout

    # another key at the host: a file without a pin for it is refused, never pinned silently
    r.bed.change_host_key()
    text = r.cfg.read_text()
    refused = cli(r.cfg, "target", "set", "backup1", "--known-hosts", str(tmp_path / "etc" / "n"),
                  socket=eng.socket)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "no host key is pinned for" in refused.stderr and "Nothing was changed" in refused.stderr
    assert r.cfg.read_text() == text and not (tmp_path / "etc" / "n").exists()


@pytest.mark.root
def test_a_new_key_not_yet_on_the_target_is_tried_again_by_target_apply(fs_remote, tmp_path):
    """`target set --identity` takes effect at once, so until the new key's line is on the
    target the capture is refused there (said in status, tried again with back-off). Once the
    line is there, `target apply` says so and has it connect now, not at the end of the back-off;
    nothing written meanwhile is lost."""
    eng, src, r = fs_remote()
    key = keygen(tmp_path / "etc" / "newkey")
    done = cli(r.cfg, "--json", "target", "set", "backup1", "--identity", str(key), socket=eng.socket)
    assert done.returncode == 0, done.stdout + done.stderr
    said, res = json.loads(done.stdout)
    line = said["details"]["authorized_key"]
    assert "identity applied to its running capture: a new session" in res["message"], res
    Path(src, "meanwhile").write_text("written while the target refused the key")
    refused = wait_for("the refusal", lambda: next((row for row in [eng.status(src)]
                                                    if "ermission denied" in (row["connection"] or "")), None), 60)
    assert refused["applied_seq"] < refused["last_seq"], refused
    r.bed.set_authorized_keys([line])
    again = cli(r.cfg, "--json", "target", "apply", "backup1", socket=eng.socket)
    assert again.returncode == 0, again.stdout + again.stderr
    [res] = json.loads(again.stdout)
    assert res["outcome"] == "unchanged" and "uses the settings of backup1 already; it was " \
        "refused" in res["message"] and "it tries again now" in res["message"], res
    eng.drain(src)
    assert (r.root / "data" / "meanwhile").read_text() == "written while the target refused the key"
    assert eng.status(src)["resync_bytes"] == 0


@pytest.mark.root
def test_a_block_capture_that_went_on_without_the_daemon_takes_target_set_at_its_start(
        block_remote):
    """A block capture outlives its daemon; `target set` while no daemon runs cannot reach it.
    The next daemon takes the capture over and applies the settings then (a new session:
    compression here), instead of leaving it on the old ones until Detach all / Attach all."""
    eng, disk, r = block_remote()
    before = eng.block(disk)
    assert before["compression"] != "none", before
    eng.kill9()  # the worker goes on alone
    done = cli(r.cfg, "--json", "target", "set", "backup1", "--compression", "none",
               socket=eng.socket)
    assert done.returncode == 0, done.stdout + done.stderr
    [res] = json.loads(done.stdout)
    assert "mirrorsetup target apply backup1" in res["message"], res
    eng.start()
    row = eng.block(disk)
    assert row["worker_pid"] == before["worker_pid"], (row, before)  # taken over, not restarted
    assert row["not_applied"] == {} and row["compression"] == "none", row
    dd(eng.block(disk)["loop"], mib=2, seek_mib=8)
    st = eng.block_drain(disk)
    assert st["connection"] == "connected" and st["resync_bytes"] == 0, st
    assert sha(r.root / "disk.img") == sha(disk)
    assert "compression applied to its running capture: a new session" in eng.logtext()
    assert "Traceback" not in eng.logtext(), eng.logtext()[-3000:]


def test_target_set_says_every_bad_file_and_field_at_once(two_targets, tmp_path):
    """A missing key, a known_hosts in a directory that is not there and a bad port: three
    lines, not the first one alone."""
    cfg = two_targets
    text = cfg.read_text()
    missing, nowhere = tmp_path / "etc" / "missing", tmp_path / "no" / "kh"
    r = cli(cfg, "target", "set", "b1", "--identity", str(missing), "--known-hosts", str(nowhere),
            "--port", "0")
    assert r.returncode == 2, r.stdout + r.stderr
    said = r.stderr.splitlines()
    assert len(said) == 3, said
    assert f"mirrorsetup: identity {missing} does not exist" in said, said
    assert any(line.startswith(f"mirrorsetup: known_hosts {nowhere}: its directory") for line in said)
    assert any(line.startswith("mirrorsetup: port:") for line in said), said
    assert cfg.read_text() == text


def test_a_port_that_makes_two_entries_share_a_replica_is_refused_and_changes_nothing(tmp_path):
    """Two targets of one host on two ports with the same root, an entry on each with the same
    replica path: `target set b2 --port 22` made both name one replica there (fs add refuses
    that; set did not check it) and `fs list` then called both entries invalid. Refused now,
    the file untouched, and a port that makes no such overlap is still taken."""
    etc = tmp_path / "etc"
    etc.mkdir()
    key = keygen(etc / "k")
    public = key.with_suffix(".pub").read_text().split()[1]
    (etc / "known_hosts").write_text("".join(f"{h} ssh-ed25519 {public}\n" for h in (
        "10.231.9.2", "[10.231.9.2]:2222", "[10.231.9.2]:2200")))
    srcs = [tmp_path / n for n in ("a", "b")]
    for d in srcs:
        d.mkdir()
    cfg = etc / "replication.toml"
    cfg.write_text("schema = 1\n" + "".join(
        f'\n[[target]]\nname = "{n}"\nhost = "10.231.9.2"\nport = {port}\nroot = "/srv/r"\n'
        f'identity = "{key}"\nknown_hosts = "{etc / "known_hosts"}"\n'
        for n, port in (("b1", 22), ("b2", 2222))) + "".join(
        f'\n[[filesystem]]\npath = "{d}"\ntarget = "{n}:data"\n' for d, n in zip(srcs, ("b1", "b2"))))
    cfg.chmod(0o600)
    before = cfg.read_bytes()
    r = cli(cfg, "target", "set", "b2", "--port", "22")
    assert r.returncode != 0, r.stdout + r.stderr
    assert "port 22: target b2:data overlaps b1:data" in r.stderr and "nothing was changed" in r.stderr, r.stderr
    assert cfg.read_bytes() == before
    ok = cli(cfg, "target", "set", "b2", "--port", "2200")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert targets(cfg)["b2"]["port"] == 2200


def test_target_set_while_a_mirror_runs_is_pending_and_taken_when_it_ends(fs_remote):
    """A capture busy with a mirror for more than 10 s was given up on: `target set` said FAILED
    (exit 1) and the capture kept its old settings until the administrator ran `target apply`
    after the mirror; nothing told them when. Now the call waits its turn in the daemon: said
    pending (exit 0), taken as soon as the mirror ends, and the daemon's log says so."""
    eng, src, r = fs_remote()
    data = os.urandom(8 * MiB)
    Path(src, "big").write_bytes(data)
    eng.drain(src)
    capped = cli(r.cfg, "target", "set", "backup1", "--bandwidth", "512KiB/s", socket=eng.socket)
    assert capped.returncode == 0 and "bandwidth applied to its running capture" in capped.stdout, \
        capped.stdout + capped.stderr
    (r.root / "data" / "big").write_bytes(os.urandom(8 * MiB))  # sent again: 16 s at the cap
    env = {**os.environ, "MIRRORSETUP_SOCKET": eng.socket}
    mirror = subprocess.Popen([sys.executable, "-m", "app", "--config", str(r.cfg), "fs",
                               "mirror", src], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for("the mirror to send", lambda: eng.status(src)["resync_bytes"] > 0, 30, 0.1)
        p = cli(r.cfg, "--json", "target", "set", "backup1", "--bandwidth", "9MiB/s",
                socket=eng.socket)
        out, err = mirror.communicate(timeout=120)
    finally:
        if mirror.poll() is None:
            mirror.kill()
            mirror.wait()
    assert mirror.returncode == 0, out + err
    assert p.returncode == 0, p.stdout + p.stderr
    said = json.loads(p.stdout)
    [pending] = [x for x in said if x["target"] == src]
    assert pending["outcome"] == "pending" and "is busy with a mirror" in pending["message"], said
    assert "applied as soon as it is done" in pending["message"], pending
    # taken once the mirror ended, without `target apply`
    row = wait_for("the settings to be taken", lambda: (
        lambda e: e if e["not_applied"] == {} else None)(
            json.loads(cli(r.cfg, "status", "--json", socket=eng.socket).stdout)
            ["filesystem"][0]["engine"]), 20, 0.2)
    assert row["not_applied"] == {}, row
    assert f"{src}: the settings of target backup1 applied once its capture was free " \
           "(bandwidth)" in eng.logtext(), eng.logtext()[-2000:]
    assert (r.root / "data" / "big").read_bytes() == data
