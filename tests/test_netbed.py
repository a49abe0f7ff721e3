"""The two-host test bed (tests/netbed.py) against the real kernel, sshd and ssh on this machine.

Each piece the remote-target tests rely on is shown to work: ssh reaches the target namespace,
pinning refuses a changed host key, every fault does what it says and is undone, and teardown
leaves nothing (the fixture asserts it for every test; the last test checks with independent
witnesses: `ip`, sysfs, pidfds). No timing is asserted except lower bounds that only a broken
fault could miss (a delay or a rate limit making things *slower*), so a busy host cannot fail
them; the figures go to bench/netbed.py.
"""

from __future__ import annotations

import errno
from ipaddress import ip_interface
import json
import os
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import losetup_json, run
from netbed import (NETNS_DIR, PRIVSEP_DIR, PRIVSEP_MARK, NetbedError, TwoHosts,
                    _other_sshd_running, _privsep_lock, is_mount_point, running)

pytestmark = pytest.mark.root

MiB = 1 << 20
WAIT = 60  # seconds: an upper bound for things that take a few seconds on an idle host


def ssh(bed: TwoHosts, *cmd: str, input: str | bytes | None = None, **kw):
    text = not isinstance(input, bytes)
    return subprocess.run(bed.ssh_argv(*cmd, **kw), input=input, capture_output=True,
                          text=text, timeout=WAIT)


def session(bed: TwoHosts, *cmd: str, **kw) -> subprocess.Popen:
    """A long-running ssh with pipes (closed and reaped by `end`)."""
    return subprocess.Popen(bed.ssh_argv(*cmd, **kw), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def end(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for an ssh session to end by itself; its exit code and stderr."""
    try:
        _, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err.decode()


def line_within(proc: subprocess.Popen, seconds: float) -> bytes | None:
    """The next line of the session's stdout, or None if none arrives within `seconds`."""
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    return proc.stdout.readline() if ready else None


def sshd_logs(bed: TwoHosts, text: str) -> bool:
    """True once sshd's log holds `text` (sshd writes it when it notices, soon but not at once)."""
    deadline = time.monotonic() + WAIT
    while text not in bed.sshd_log.read_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def accepted(bed: TwoHosts) -> int:
    return bed.sshd_log.read_text().count("Accepted publickey")


# -- reaching the target -----------------------------------------------------------------------

def test_ssh_runs_a_command_in_the_target_namespace(two_hosts):
    r = ssh(two_hosts, "id", "-u", ";", "stat", "-L", "-c", "%i", "/proc/self/ns/net")
    assert r.returncode == 0, r.stderr
    uid, netns_inode = r.stdout.split()
    assert uid == "0"
    assert int(netns_inode) == os.stat(f"/run/netns/{two_hosts.netns}").st_ino
    assert int(netns_inode) != os.stat("/proc/self/ns/net").st_ino


def test_a_changed_host_key_is_refused_before_login(two_hosts, tmp_path):
    assert ssh(two_hosts, "true").returncode == 0
    before = accepted(two_hosts)
    new_key = two_hosts.change_host_key()

    r = ssh(two_hosts, "touch", str(tmp_path / "ran"))
    assert r.returncode == 255
    assert "Host key verification failed" in r.stderr
    assert not (tmp_path / "ran").exists()
    assert accepted(two_hosts) == before  # refused before authentication, so before any data

    pinned = tmp_path / "known_hosts_new"
    pinned.write_text(two_hosts.known_hosts_line(two_hosts.target_addr, two_hosts.port, new_key))
    assert ssh(two_hosts, "true", known_hosts=pinned).returncode == 0


def test_authorized_keys_options_are_honoured(two_hosts):
    two_hosts.set_authorized_keys([two_hosts.authorized_key_line('command="echo forced",restrict')])
    r = ssh(two_hosts, "id", "-u")
    assert (r.returncode, r.stdout) == (0, "forced\n")
    two_hosts.set_authorized_keys([])
    r = ssh(two_hosts, "true")
    assert r.returncode == 255 and "Permission denied" in r.stderr


def privsep_made_elsewhere() -> bool:
    """/run/sshd is there and no bed made it (the host's, or another tool's)."""
    with _privsep_lock():
        return PRIVSEP_DIR.exists() and not PRIVSEP_MARK.exists()


def check_privsep_dir(made_elsewhere: bool) -> None:
    """After the last bed closed: a /run/sshd made by a bed is gone unless an sshd still runs
    (another bed's, or the host's); one made by anyone else is left alone. Looked at under the
    beds' lock, so no other bed is half-way through starting its sshd."""
    with _privsep_lock():
        if _other_sshd_running():
            assert PRIVSEP_DIR.exists()
        else:
            assert not PRIVSEP_MARK.exists()
            assert PRIVSEP_DIR.exists() == made_elsewhere


def test_two_beds_at_once_are_apart_and_closing_one_leaves_the_other(make_two_hosts):
    made_elsewhere = privsep_made_elsewhere()
    netns_mounted = is_mount_point(NETNS_DIR)  # `ip netns add` mounts it the first time
    a, b = make_two_hosts(), make_two_hosts()
    assert a.netns != b.netns and a.source_if != b.source_if
    subnet = {ip_interface(f"{bed.source_addr}/30").network for bed in (a, b)}
    assert len(subnet) == 2
    a.close()
    assert not Path(f"/run/netns/{a.netns}").exists()
    assert ssh(b, "true").returncode == 0  # b's sshd still has its namespace and /run/sshd
    assert is_mount_point(NETNS_DIR)  # b's namespace is in it
    b.close()
    check_privsep_dir(made_elsewhere)  # whichever bed made it, the last one removed it
    assert is_mount_point(NETNS_DIR) == netns_mounted  # so for the /run/netns mount


# -- faults ------------------------------------------------------------------------------------

def test_link_down_is_detected_by_server_alive_and_link_up_recovers(two_hosts):
    s = session(two_hosts, "echo", "up;", "exec", "sleep", "600", alive_interval=1, alive_count=3)
    assert line_within(s, WAIT) == b"up\n"
    two_hosts.link_down()
    code, err = end(s)  # ends by itself: ServerAlive noticed the dead peer
    assert code == 255
    assert "not responding" in err
    two_hosts.link_up()
    assert ssh(two_hosts, "true").returncode == 0


def test_blackhole_times_out_connects_and_established_sessions(two_hosts):
    s = session(two_hosts, "echo", "up;", "exec", "sleep", "600")
    assert line_within(s, WAIT) == b"up\n"
    two_hosts.blackhole()

    r = ssh(two_hosts, "true", connect_timeout=2)
    assert r.returncode == 255
    assert "timed out" in r.stderr
    code, err = end(s)
    assert code == 255 and "not responding" in err

    two_hosts.unblock()
    assert ssh(two_hosts, "true").returncode == 0


@pytest.mark.parametrize("with_, message", [
    ("tcp reset", "Connection refused"),
    ("icmpx type host-unreachable", "No route to host"),
])
def test_reject_fails_at_once(two_hosts, with_, message):
    two_hosts.reject(with_=with_)
    # A connect timeout longer than `ssh`'s own WAIT: only a refusal can end it in time.
    r = ssh(two_hosts, "true", connect_timeout=WAIT * 4)
    assert r.returncode == 255
    assert message in r.stderr
    two_hosts.unblock()
    assert ssh(two_hosts, "true").returncode == 0


@pytest.mark.parametrize("direction, cmd", [
    ("up", ("cat", ">/dev/null")),
    ("down", ("head", "-c", str(4 * MiB), "/dev/zero")),
])
def test_tbf_limits_a_transfer(two_hosts, direction, cmd):
    rate_bits = 16_000_000
    two_hosts.rate_limit(rate="16mbit", burst="32kb", latency="50ms", direction=direction)
    payload = os.urandom(4 * MiB) if direction == "up" else b""
    t0 = time.monotonic()
    r = ssh(two_hosts, *cmd, input=payload)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    moved = len(payload) or len(r.stdout)
    assert moved == 4 * MiB
    # A lower bound on the time only: a busy host makes it slower, never faster.
    assert moved * 8 / elapsed < 2 * rate_bits

    assert "tbf" in qdiscs(two_hosts, direction)
    two_hosts.unlimit()
    assert "tbf" not in qdiscs(two_hosts, direction)


def qdiscs(bed: TwoHosts, direction: str) -> list[str]:
    """Kinds of the qdiscs on the veth end that sends in `direction`."""
    argv = (["tc", "-j", "qdisc", "show", "dev", bed.source_if] if direction == "up" else
            ["tc", "-j", "-n", bed.netns, "qdisc", "show", "dev", bed.target_if])
    return [q["kind"] for q in json.loads(run(*argv).stdout)]


def test_relay_delays_each_way_stalls_and_cuts(two_hosts):
    relay = two_hosts.relay(delay_up=0.2, delay_down=0.3)
    # alive 5 s × 3: the stall below must not be mistaken for a dead peer
    s = session(two_hosts, "cat", via=relay, alive_interval=5)
    s.stdin.write(b"ping\n")
    s.stdin.flush()
    assert line_within(s, WAIT) == b"ping\n"

    t0 = time.monotonic()
    s.stdin.write(b"echo\n")
    s.stdin.flush()
    assert line_within(s, WAIT) == b"echo\n"
    assert time.monotonic() - t0 >= 0.5  # up + down delay: a lower bound only

    relay.stall()
    s.stdin.write(b"held\n")
    s.stdin.flush()
    assert line_within(s, 2.0) is None
    assert s.poll() is None  # nothing closed
    relay.resume()
    assert line_within(s, WAIT) == b"held\n"

    stats = relay.stats()
    assert stats["connections"] == 1 and stats["open"] == 1
    assert stats["up_bytes"] > 0 and stats["down_bytes"] > 0
    assert relay.cut() == 1
    code, err = end(s)
    assert code == 255, err  # "Broken pipe" or "Connection reset by peer", by who moves first


def test_relay_cut_resets_both_sides(two_hosts):
    relay = two_hosts.relay()
    with socket.create_connection((relay.host, relay.port), timeout=WAIT) as c:
        assert c.recv(64).startswith(b"SSH-2.0-")  # the target's sshd answered through it
        assert relay.cut() == 1
        with pytest.raises(ConnectionResetError):
            c.recv(64)  # a RST, not an orderly close (which would read b"")
    assert sshd_logs(two_hosts, "Connection reset by peer")  # and sshd got a RST too


def test_relay_stall_is_detected_by_server_alive(two_hosts):
    relay = two_hosts.relay()
    s = session(two_hosts, "echo", "up;", "exec", "sleep", "600", via=relay,
                alive_interval=1, alive_count=3)
    assert line_within(s, WAIT) == b"up\n"
    relay.stall()
    code, err = end(s)
    assert code == 255 and "not responding" in err
    assert relay.stats()["open"] == 1  # the relay closed nothing: the stall was silent
    relay.resume()


def test_target_disk_fills_to_enospc_and_unfills(two_hosts):
    disk = two_hosts.target_disk(16 * MiB)
    (disk.path / "before").write_bytes(b"x" * 65536)
    disk.fill()
    assert disk.free_bytes() == 0
    with pytest.raises(OSError) as e:
        (disk.path / "more").write_bytes(b"x" * 65536)
    assert e.value.errno == errno.ENOSPC
    r = ssh(two_hosts, "head", "-c", "65536", "/dev/zero", ">", str(disk.mountpoint / "remote"))
    assert r.returncode != 0 and "No space left on device" in r.stderr

    disk.unfill()
    assert disk.free_bytes() > 8 * MiB
    (disk.path / "more").write_bytes(b"x" * 65536)
    assert ssh(two_hosts, "head", "-c", "65536", "/dev/zero", ">",
               str(disk.mountpoint / "remote")).returncode == 0


def test_kill_on_target_kills_its_processes_only(two_hosts):
    s = session(two_hosts, "exec", "sleep", "613")
    sleeper = two_hosts.wait_target_process("613")
    two_hosts.kill_on_target(sleeper)
    assert not running(sleeper)
    code, _ = end(s)
    assert code == 255  # ssh's answer to a remote command that died of a signal

    with pytest.raises(NetbedError, match="is not in"):
        two_hosts.kill_on_target(os.getpid())


def test_private_mounts_give_the_target_its_own_view(make_two_hosts, tmpfs_mount, tmp_path):
    bed = make_two_hosts(private_mounts=True)
    disk = bed.target_disk(16 * MiB)
    assert not os.path.ismount(disk.mountpoint)  # the host (source) does not see it
    assert os.path.ismount(disk.path)  # /proc/ANCHOR/root/... does
    r = ssh(bed, "findmnt", "-n", "-o", "SOURCE", str(disk.mountpoint))
    assert r.stdout.strip() == disk.device  # sshd and its sessions live in the target's view

    late = tmpfs_mount(tmp_path / "source-only")  # mounted on the source after the target began
    assert bed.run_on_target(["findmnt", str(late)], check=False).returncode == 1

    bed.spawn_on_target(["sleep", "600"])  # a long-lived process on the target "host"
    worker = bed.wait_target_process("600")
    same = run("nsenter", f"--mount=/proc/{worker}/ns/mnt", "--", "findmnt", "-n", "-o",
               "SOURCE", str(disk.mountpoint))
    assert same.stdout.strip() == disk.device


# -- teardown ----------------------------------------------------------------------------------

def test_close_removes_everything_it_made(tmp_path):
    made_elsewhere = privsep_made_elsewhere()
    bed = TwoHosts(tmp_path, private_mounts=True)
    bed.start()
    relay = bed.relay(delay_up=0.01)
    s = session(bed, "echo", "up;", "exec", "sleep", "600", via=relay)
    assert line_within(s, WAIT) == b"up\n"
    bed.rate_limit(direction="both")
    bed.blackhole(port=9)
    disk = bed.target_disk(16 * MiB)
    disk.fill()
    bed.spawn_on_target(["sleep", "600"])
    pids = [pid for pid, _ in bed.target_processes()] + [relay.pid]
    pidfds = [os.pidfd_open(pid) for pid in pids]
    assert len(pids) >= 5  # anchor, sshd, its session, the remote sleep, ours, the relay

    bed.close()
    try:
        ready, _, _ = select.select(pidfds, [], [], 0)
        assert sorted(ready) == sorted(pidfds)  # every one of them has ended
    finally:
        for fd in pidfds:
            os.close(fd)
    netns = json.loads(run("ip", "-j", "netns", "list").stdout or "[]")
    assert bed.netns not in [n["name"] for n in netns]
    links = json.loads(run("ip", "-j", "link").stdout)
    assert bed.source_if not in [link["ifname"] for link in links]
    assert str(disk.image) not in [d["back-file"] for d in losetup_json()]
    assert bed.leftovers() == []
    check_privsep_dir(made_elsewhere)
    end(s)
