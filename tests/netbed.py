"""A two-host test bed on one machine: a target network namespace with its own sshd, and faults.

The source is this machine's root network namespace (so the source daemon's mounts stay visible
to the test); the target is a network namespace made for this run, joined to it by a veth pair
with a random private /30 in 10.0.0.0/8 that no interface or route of the host uses. The target
runs `sshd -D -e -f CONFIG` with throwaway ed25519 keys; its config is written here and names
every file it reads, so nothing of /etc/ssh/sshd_config (or its Include files) applies. The
client side gets a generated ssh_config, a known_hosts pinning the host key and its own key.

Namespaces are joined with `nsenter --net=/run/netns/NAME`, not `ip netns exec`: the latter
also unshares a fresh mount namespace for every command (and remounts /sys), so a mount made by
one command would be invisible to the next and to the test. With `private_mounts=True` the
target is a second "host" with its own mount view: a long-lived anchor process made by
`nsenter --net=... unshare --mount --propagation private` holds that mount namespace, and sshd,
`run_on_target` and `spawn_on_target` all enter it with `nsenter --mount=/proc/ANCHOR/ns/mnt`;
the test reads the target's files through `target_view(path)` (/proc/ANCHOR/root/...).

Faults (each undone at teardown): `link_down`/`link_up`; `blackhole` (nft drop on the sshd
port, in the target namespace) and `reject` (tcp reset or an icmp type), both lifted by
`unblock`; `rate_limit` (tbf on a veth end) / `unlimit`; `relay()` (this kernel has no netem):
a user-space TCP relay process with one-way delays, `stall` (stops forwarding, keeps both
connections open), `resume` and `cut` (resets both sides); `kill_on_target(pid)`; and
`target_disk()`, a small ext4 on a loop device (made with `-m 0`, so root hits ENOSPC too) with
`fill`/`unfill`.

Teardown (`close`, also on a failed start) goes by PID and by the names made here only: relay
processes, then every process whose network namespace is ours (sshd, its sessions, spawned
processes), the target disks (unmounted in the view that mounted them, loops detached after
checking they still back our image), the anchor, nft table and tc qdiscs, the namespace (which
removes the veth pair) and /run/sshd when this bed created it and no other sshd is left.
`leftovers()` lists anything that survived; the `two_hosts` fixture asserts it is empty.

    from netbed import TwoHosts

    with TwoHosts(tmp_path, private_mounts=True) as bed:
        bed.set_authorized_keys([bed.authorized_key_line('command="mirrorsetup serve-target '
                                                         '--root /srv/r",restrict')])
        disk = bed.target_disk(32 << 20)          # /srv/r would be disk.mountpoint
        relay = bed.relay(delay_up=0.05, delay_down=0.05)
        proc = subprocess.Popen(bed.ssh_argv("true", via=relay), ...)
        relay.stall(); ...; relay.resume()
        bed.link_down(); ...; bed.link_up()
        disk.fill(); ...; disk.unfill()

Caveats: the remote command runs as root through root's login shell, with sshd's PATH
(/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin: name a venv's programs by
absolute path). sshd sets SHLVL=1, so Debian's bash does not source root's ~/.bashrc for ssh
commands as it would on a real target. Only the target has a private mount view; the source is
the host itself. /run/sshd is shared with any other sshd on the machine (see "/run/sshd" below).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")  # compiled into sshd: it refuses to start without it
PRIVSEP_MARK = PRIVSEP_DIR / ".made-by-mirrorsetup-netbed"  # sshd minds the dir, not its files
NETNS_DIR = Path("/run/netns")
NETNS_MARK = Path("/run/.netns-mount-made-by-mirrorsetup-netbed")  # not in it: `ip netns` lists it
NFT_TABLE = "netbed"
START_TIMEOUT = 30.0  # generous: the host is shared and busy
STOP_TIMEOUT = 10.0


def run(argv: list[str], *, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a tool with an argv list (never a shell string); output captured as text."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(argv, check=check, **kw)


class NetbedError(RuntimeError):
    """The bed could not be built or torn down; the message names the object."""


# -- addresses and names ---------------------------------------------------------------------

def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the root namespace has on an interface or in a route."""
    nets = []
    for a in json.loads(run(["ip", "-j", "-4", "addr"]).stdout or "[]"):
        for info in a.get("addr_info", []):
            nets.append(ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network)
    for r in json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]"):
        dst = r.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.ip_network(dst, strict=False))
    return nets


def _pick_free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    used = _networks_in_use()
    for _ in range(200):
        net = ipaddress.ip_network(
            f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(64) * 4}/30")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetbedError("no free /30 in 10.0.0.0/8 after 200 tries: the host uses most of it")


def _holders(net: ipaddress.IPv4Network) -> list[str]:
    """Interfaces of the root namespace with an IPv4 address inside `net`."""
    return [a["ifname"] for a in json.loads(run(["ip", "-j", "-4", "addr"]).stdout or "[]")
            for info in a.get("addr_info", [])
            if ipaddress.ip_address(info["local"]) in net]


def _ns_key(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a namespace file: equal keys mean the same namespace."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pids_in_netns(key: tuple[int, int]) -> list[int]:
    """Every process whose network namespace is `key` (what `ip netns pids` reports)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ns_key(f"/proc/{entry}/ns/net") == key:
            pids.append(int(entry))
    return pids


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def running(pid: int) -> bool:
    """The process exists and has not ended (a zombie has ended: only its parent's wait is
    missing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _given(value, default):
    return default if value is None else value


def _wait_pidfds(fds: list[int], timeout: float) -> bool:
    """True when every process behind `fds` has ended (a pidfd polls readable at exit)."""
    deadline = time.monotonic() + timeout
    pending = list(fds)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select(pending, [], [], left)
        pending = [fd for fd in pending if fd not in ready]
    return True


def is_mount_point(path: Path) -> bool:
    """Is something mounted at `path` (by the mount table: a directory bind-mounted onto
    itself, as /run/netns is, has its parent's device, so os.path.ismount says no)?"""
    want = os.fsencode(path)
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4].replace(b"\\040", b" ") == want for line in f)


# -- /run/sshd --------------------------------------------------------------------------------
# sshd chroots its pre-authentication child into /run/sshd on every connection, so the directory
# must outlive every sshd using it, whoever started them. A bed that has to create it leaves a
# mark inside; the last bed to close (no sshd left on the machine) removes mark and directory.

@contextlib.contextmanager
def _privsep_lock():
    """Serialise the check-and-create / check-and-remove of /run/sshd (and of the /run/netns
    mount) between beds.

    The lock is a flock on the /run directory itself, so nothing is left behind.
    """
    fd = os.open("/run", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _other_sshd_running() -> list[int]:
    """PIDs of any sshd on the machine (ours are gone by the time this is asked)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/exe") == SSHD:
                    found.append(int(entry))
    return found


# -- the bed ----------------------------------------------------------------------------------

class TwoHosts:
    """Source = root network namespace; target = a namespace of its own with sshd on it."""

    def __init__(self, workdir: Path, *, private_mounts: bool = False, alive_interval: int = 1,
                 alive_count: int = 3, connect_timeout: int = 10, seed: int | None = None):
        self.dir = Path(workdir) / "netbed"
        self.private_mounts = private_mounts
        self.alive_interval = alive_interval
        self.alive_count = alive_count
        self.connect_timeout = connect_timeout
        self._rng = random.Random(seed)
        suffix = f"{os.getpid():x}{self._rng.randrange(1 << 16):04x}"
        self.netns = f"netbed-{suffix}"
        self.source_if = f"nb{suffix}s"[:15]  # IFNAMSIZ 16 with the NUL
        self.target_if = f"nb{suffix}t"[:15]
        self.port = self._rng.randrange(20000, 60000)
        self.source_addr = self.target_addr = ""
        self.anchor: subprocess.Popen | None = None
        self.sshd: subprocess.Popen | None = None
        self._netns_key: tuple[int, int] | None = None  # set while the namespace is ours
        self._made_netns = self._made_link = False
        self._spawned: list[subprocess.Popen] = []
        self._relays: list[Relay] = []
        self._disks: list[TargetDisk] = []
        self._qdiscs: set[str] = set()  # "up" / "down"
        self._nft_table = False
        self._ns_pids_at_delete: list[int] = []
        self._host_key_gen = 0

    # lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> TwoHosts:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=False)
        try:
            self._make_network()
            self._make_keys()
            if self.private_mounts:
                self._start_anchor()
            self.set_authorized_keys([self.authorized_key_line()])
            self._start_sshd()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Undo everything this bed made, in dependency order; raise if something stayed."""
        errors: list[str] = []

        def step(what, fn, *args):
            try:
                fn(*args)
            except Exception as e:  # keep tearing down; report all at the end
                errors.append(f"{what}: {e}")

        for relay in self._relays:
            step(f"relay {relay.pid}", relay.close)
        step("target processes", self._kill_target_processes, True)
        for disk in reversed(self._disks):
            step(f"target disk {disk.device}", disk.close)
        if self.anchor is not None:
            step("anchor", self._kill_target_processes, False)
        for p in self._spawned + [self.sshd, self.anchor]:
            if p is not None:
                step(f"reap {p.pid}", p.wait, STOP_TIMEOUT)
        step("nft table", self.unblock)
        step("tc qdiscs", self.unlimit)
        step("namespace", self._delete_network)
        step("/run/sshd", self._release_privsep_dir)
        errors += [f"left behind: {x}" for x in self.leftovers()]
        if errors:
            raise NetbedError("teardown of " + self.netns + ": " + "; ".join(errors))

    def leftovers(self) -> list[str]:
        """What of this bed still exists on the machine (empty after a clean `close`)."""
        left = []
        if self._made_netns and (NETNS_DIR / self.netns).exists():
            left.append(f"namespace {self.netns}")
        if self._made_link and Path(f"/sys/class/net/{self.source_if}").exists():
            left.append(f"link {self.source_if}")
        if self._ns_pids_at_delete:
            left.append(f"processes in the namespace at deletion: {self._ns_pids_at_delete}")
        for p in self._spawned + [self.sshd, self.anchor] + [r.proc for r in self._relays]:
            if p is not None and p.poll() is None:
                left.append(f"process {p.pid} {p.args}")
        for d in self._disks:
            left += d.leftovers()
        return left

    # network -------------------------------------------------------------------------------

    def _make_network(self) -> None:
        # `ip netns add` makes /run/netns a mount point of itself the first time and leaves it
        # so: when a bed's was that first time, a mark says so and the last bed to close
        # takes the mount back (see _delete_network).
        with _privsep_lock():
            if not is_mount_point(NETNS_DIR):
                NETNS_MARK.touch()
        run(["ip", "netns", "add", self.netns])  # fails if the name is taken: then not ours
        self._made_netns = True
        self._netns_key = _ns_key(str(NETNS_DIR / self.netns))
        run(["ip", "link", "add", self.source_if, "type", "veth", "peer", "name",
             self.target_if, "netns", self.netns])
        self._made_link = True
        for _ in range(20):
            net = _pick_free_subnet(self._rng)
            src, tgt = (str(h) for h in net.hosts())
            run(["ip", "addr", "add", f"{src}/30", "dev", self.source_if])
            # Another bed may have picked the same /30 at the same moment: whoever looks sees
            # two interfaces on it and tries again elsewhere.
            if _holders(net) == [self.source_if]:
                break
            run(["ip", "addr", "del", f"{src}/30", "dev", self.source_if])
        else:
            raise NetbedError("could not claim a /30 of our own after 20 tries")
        self.source_addr, self.target_addr = src, tgt
        run(["ip", "link", "set", self.source_if, "up"])
        run(["ip", "-n", self.netns, "addr", "add", f"{tgt}/30", "dev", self.target_if])
        run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        run(["ip", "-n", self.netns, "link", "set", self.target_if, "up"])

    def _delete_network(self) -> None:
        if self._netns_key is not None:
            # A process left in the namespace keeps it (and the veth) alive after `ip netns del`.
            self._ns_pids_at_delete = _pids_in_netns(self._netns_key)
            run(["ip", "netns", "del", self.netns])
            self._netns_key = None  # the kernel may give its inode number to another namespace
            with _privsep_lock():  # (not lazily: another's namespace in it keeps it: EBUSY)
                if NETNS_MARK.exists() and is_mount_point(NETNS_DIR) and \
                        not any(NETNS_DIR.iterdir()) and \
                        run(["umount", str(NETNS_DIR)], check=False).returncode == 0:
                    NETNS_MARK.unlink()
        if not self._made_link:
            return
        # The kernel frees a namespace (and with it the veth pair) asynchronously.
        deadline = time.monotonic() + STOP_TIMEOUT
        link = Path(f"/sys/class/net/{self.source_if}")
        while link.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if link.exists():
            run(["ip", "link", "del", self.source_if], check=False)
        self._made_link = link.exists()

    # keys and sshd -------------------------------------------------------------------------

    def _keygen(self, name: str) -> Path:
        path = self.dir / name
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@{self.netns}",
             "-f", str(path)])
        return path

    def _make_keys(self) -> None:
        self.host_key = self._keygen("host_ed25519")
        self.client_key = self._keygen("client_ed25519")
        self.authorized_keys = self.dir / "authorized_keys"
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text(self.known_hosts_line(self.target_addr, self.port))
        self.ssh_config = self.dir / "ssh_config"
        self.ssh_config.write_text(
            "# written by tests/netbed.py; ssh -F reads this file only\n"
            "Host *\n"
            f"  User root\n"
            f"  IdentityFile {self.client_key}\n"
            "  IdentitiesOnly yes\n"
            "  IdentityAgent none\n"
            f"  UserKnownHostsFile {self.known_hosts}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n"
            "  UpdateHostKeys no\n"
            "  CheckHostIP no\n"
            "  BatchMode yes\n"
            "  PasswordAuthentication no\n"
            "  KbdInteractiveAuthentication no\n"
            "  ControlMaster no\n"
            "  ControlPath none\n"
            "  Compression no\n"
            "  ForwardAgent no\n"
            "  ForwardX11 no\n"
            "  LogLevel INFO\n")  # "Timeout, server ... not responding." is an INFO line

    def _sshd_config(self) -> Path:
        path = self.dir / "sshd_config"
        path.write_text(
            "# written by tests/netbed.py; sshd -f reads this file only (no Include)\n"
            f"ListenAddress {self.target_addr}:{self.port}\n"
            "AddressFamily inet\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.dir / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            "AuthorizedKeysCommand none\n"
            "AuthorizedPrincipalsFile none\n"
            "AuthenticationMethods publickey\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "HostbasedAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            "PermitUserEnvironment no\n"
            "PermitUserRC no\n"
            "PrintMotd no\n"
            "PrintLastLog no\n"
            "UseDNS no\n"
            "LogLevel VERBOSE\n"
            "LoginGraceTime 30\n"
            # Debian's bash sources ~/.bashrc for commands run by sshd when SHLVL < 2: the
            # host's own root .bashrc (here: pyenv init, many processes) must not run in the bed
            "SetEnv SHLVL=1\n"
            # reconnect loops in tests open many connections at once
            "MaxStartups 100:30:200\n")
        return path

    def _start_sshd(self) -> None:
        config = self._sshd_config()
        self.sshd_log = self.dir / "sshd.log"
        with _privsep_lock():
            if not PRIVSEP_DIR.exists():
                PRIVSEP_DIR.mkdir(mode=0o755)
                PRIVSEP_MARK.touch()
            with open(self.sshd_log, "ab") as log:
                self.sshd = subprocess.Popen(
                    self._enter(True) + [SSHD, "-D", "-e", "-f", str(config)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.sshd.poll() is not None:
                raise NetbedError(f"sshd in {self.netns} exited {self.sshd.returncode}: "
                                  + self.sshd_log.read_text()[-2000:])
            with contextlib.suppress(OSError), socket.create_connection(
                    (self.target_addr, self.port), timeout=1):
                return
            time.sleep(0.05)
        raise NetbedError(f"sshd in {self.netns} not listening on {self.target_addr}:"
                          f"{self.port} after {START_TIMEOUT:.0f} s")

    def _stop_sshd(self) -> None:
        self.sshd.kill()
        self.sshd.wait(STOP_TIMEOUT)

    def change_host_key(self) -> Path:
        """Restart sshd with a new host key (a reinstalled target); known_hosts keeps the old."""
        self._stop_sshd()
        self._host_key_gen += 1
        self.host_key = self._keygen(f"host{self._host_key_gen}_ed25519")
        self._start_sshd()
        return self.host_key

    def _release_privsep_dir(self) -> None:
        """Remove /run/sshd if a bed made it (its mark is in it) and no sshd is left to use it.

        Every bed asks, not only the one that made it: with two beds, the maker may close first
        while the other's sshd still needs the directory for each new connection.
        """
        with _privsep_lock():
            if PRIVSEP_MARK.exists() and not _other_sshd_running():
                PRIVSEP_MARK.unlink()
                PRIVSEP_DIR.rmdir()

    # client side ---------------------------------------------------------------------------

    def known_hosts_line(self, host: str, port: int, key: Path | None = None) -> str:
        pub = Path(f"{key or self.host_key}.pub").read_text().split()
        return f"[{host}]:{port} {pub[0]} {pub[1]}\n"

    def authorized_key_line(self, options: str = "") -> str:
        """An authorized_keys line for the client key, with `options` (e.g. command=...)."""
        pub = Path(f"{self.client_key}.pub").read_text().strip()
        return f"{options} {pub}".strip()

    def set_authorized_keys(self, lines: list[str]) -> None:
        """Replace the target's authorized_keys (atomically: sshd reads it per connection)."""
        tmp = self.authorized_keys.with_suffix(".new")
        tmp.write_text("".join(line.rstrip("\n") + "\n" for line in lines))
        tmp.rename(self.authorized_keys)

    def ssh_argv(self, *remote_cmd: str, via: Relay | None = None,
                 alive_interval: int | None = None, alive_count: int | None = None,
                 connect_timeout: int | None = None, known_hosts: Path | None = None,
                 options: dict[str, str] | None = None) -> list[str]:
        """`ssh` to the target (through `via` when given) running `remote_cmd`.

        The remote shell joins and parses `remote_cmd` (ssh's own rule), so pass simple words.
        """
        host, port = (via.host, via.port) if via else (self.target_addr, self.port)
        opts = {
            "ServerAliveInterval": _given(alive_interval, self.alive_interval),
            "ServerAliveCountMax": _given(alive_count, self.alive_count),
            "ConnectTimeout": _given(connect_timeout, self.connect_timeout),
            **({"UserKnownHostsFile": known_hosts} if known_hosts else {}),
            **(options or {}),
        }
        argv = ["ssh", "-F", str(self.ssh_config), "-p", str(port)]
        for k, v in opts.items():
            argv += ["-o", f"{k}={v}"]
        return argv + [host, *remote_cmd]

    def target_fields(self) -> dict:
        """What `mirrorsetup target add` needs to reach this target directly."""
        return {"host": self.target_addr, "port": self.port, "user": "root",
                "identity": str(self.client_key), "known_hosts": str(self.known_hosts)}

    # running things on the target ----------------------------------------------------------

    def _enter(self, mount: bool) -> list[str]:
        argv = ["nsenter", f"--net={NETNS_DIR / self.netns}"]
        if mount and self.anchor is not None:
            argv.append(f"--mount=/proc/{self.anchor.pid}/ns/mnt")
        return argv + ["--"]

    def run_on_target(self, argv: list[str], *, check: bool = True,
                      **kw) -> subprocess.CompletedProcess:
        """Run `argv` in the target's network (and, with private_mounts, mount) namespace."""
        return run(self._enter(True) + list(argv), check=check, **kw)

    def spawn_on_target(self, argv: list[str], **popen_kw) -> subprocess.Popen:
        """Start a long-lived process on the target; killed at teardown if still running."""
        p = subprocess.Popen(self._enter(True) + list(argv), **popen_kw)
        self._spawned.append(p)
        return p

    def target_view(self, path: str | Path) -> Path:
        """`path` as the target's mount namespace sees it, readable from this process."""
        if self.anchor is None:
            return Path(path)
        return Path(f"/proc/{self.anchor.pid}/root") / Path(path).relative_to("/")

    def _start_anchor(self) -> None:
        self.anchor = subprocess.Popen(
            self._enter(False) + ["unshare", "--mount", "--propagation", "private",
                                  "sleep", "infinity"], stdin=subprocess.DEVNULL)
        # nsenter and unshare exec (no fork), so the anchor's PID is the sleep's: wait for it
        # to be in its own mount namespace before anyone enters it.
        mine = _ns_key("/proc/self/ns/mnt")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            key = _ns_key(f"/proc/{self.anchor.pid}/ns/mnt")
            if key and key != mine and _cmdline(self.anchor.pid)[:1] == ["sleep"]:
                return
            if self.anchor.poll() is not None:
                raise NetbedError(f"mount namespace anchor exited {self.anchor.returncode}")
            time.sleep(0.02)
        raise NetbedError("mount namespace anchor did not start")

    def target_processes(self) -> list[tuple[int, list[str]]]:
        """(pid, argv) of every process in the target namespace (sshd, sessions, agents...)."""
        if self._netns_key is None:
            return []
        found = []
        for pid in _pids_in_netns(self._netns_key):
            argv = _cmdline(pid)
            if _ns_key(f"/proc/{pid}/ns/net") == self._netns_key:  # still ours: PID not reused
                found.append((pid, argv))
        return found

    def wait_target_process(self, word: str, timeout: float = START_TIMEOUT) -> int:
        """PID of the first target process with `word` as one of its arguments, once one
        appears (e.g. "serve-target")."""
        deadline = time.monotonic() + timeout
        while True:
            for pid, argv in self.target_processes():
                if word in argv:
                    return pid
            if time.monotonic() > deadline:
                raise NetbedError(f"no process with {word!r} in {self.netns} after {timeout} s")
            time.sleep(0.02)

    def kill_on_target(self, pid: int, sig: int = signal.SIGKILL, wait: float = STOP_TIMEOUT):
        """Signal a process of the target namespace (refused for any other) and wait for it."""
        fd = os.pidfd_open(pid)  # pins the process: a reused PID cannot be hit by mistake
        try:
            if _ns_key(f"/proc/{pid}/ns/net") != self._netns_key:
                raise NetbedError(f"process {pid} {_cmdline(pid)} is not in {self.netns}")
            signal.pidfd_send_signal(fd, sig)
            if wait and not _wait_pidfds([fd], wait):
                raise NetbedError(f"process {pid} still running {wait} s after signal {sig}")
        finally:
            os.close(fd)

    def _kill_target_processes(self, spare_anchor: bool) -> None:
        """SIGKILL everything in our namespace (the namespace is ours, so all of it is)."""
        if self._netns_key is None:
            return
        spare = {self.anchor.pid} if spare_anchor and self.anchor else set()
        for _ in range(10):  # sshd may fork a session while we kill: look again
            fds = []
            for pid in _pids_in_netns(self._netns_key):
                if pid in spare:
                    continue
                with contextlib.suppress(ProcessLookupError):
                    fd = os.pidfd_open(pid)
                    if _ns_key(f"/proc/{pid}/ns/net") == self._netns_key:  # not a reused PID
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                        fds.append(fd)
                    else:
                        os.close(fd)
            if not fds:
                return
            try:
                if not _wait_pidfds(fds, STOP_TIMEOUT):
                    raise NetbedError("processes survived SIGKILL for "
                                      f"{STOP_TIMEOUT:.0f} s in {self.netns}")
            finally:
                for fd in fds:
                    os.close(fd)
            # Our own children stay zombies (still listed, namespace links gone) until reaped.
            for p in self._spawned + [self.sshd]:
                if p is not None:
                    p.poll()
        raise NetbedError(f"processes keep appearing in {self.netns}")

    # faults: link, firewall, rate ----------------------------------------------------------

    def link_down(self) -> None:
        """Cut the cable: the source end goes down (the target end loses carrier)."""
        run(["ip", "link", "set", self.source_if, "down"])

    def link_up(self) -> None:
        run(["ip", "link", "set", self.source_if, "up"])

    def _nft(self, script: str) -> None:
        run(self._enter(False) + ["nft", "-f", "-"], input=script)

    def _nft_rule(self, rule: str) -> None:
        if not self._nft_table:
            self._nft(f"table inet {NFT_TABLE} {{\n  chain input {{\n"
                      "    type filter hook input priority filter; policy accept;\n  }\n}\n")
            self._nft_table = True
        self._nft(f"add rule inet {NFT_TABLE} input {rule}\n")

    def blackhole(self, port: int | None = None) -> None:
        """Silently drop every packet to the target's `port` (default: sshd's), new or not."""
        self._nft_rule(f"tcp dport {port or self.port} drop")

    def reject(self, port: int | None = None, with_: str = "tcp reset") -> None:
        """Refuse packets to `port`: `with_` is "tcp reset" or e.g. "icmpx type host-unreachable"
        (an nft reject clause; icmpx port-unreachable reads as ECONNREFUSED to the client)."""
        self._nft_rule(f"tcp dport {port or self.port} reject with {with_}")

    def unblock(self) -> None:
        """Lift every blackhole and reject (drops the bed's nft table in the target namespace)."""
        if self._nft_table:
            self._nft(f"delete table inet {NFT_TABLE}\n")
            self._nft_table = False

    def _tc(self, action: str, direction: str) -> list[str]:
        if direction == "up":
            return ["tc", "qdisc", action, "dev", self.source_if, "root"]
        return ["tc", "-n", self.netns, "qdisc", action, "dev", self.target_if, "root"]

    def rate_limit(self, rate: str = "100mbit", burst: str = "256kb", latency: str = "50ms",
                   direction: str = "up") -> None:
        """tbf on the veth end that sends: "up" = source → target, "down" = back, or "both"."""
        for d in ("up", "down") if direction == "both" else (direction,):
            run(self._tc("replace", d) + ["tbf", "rate", rate, "burst", burst,
                                          "latency", latency])
            self._qdiscs.add(d)

    def unlimit(self) -> None:
        for d in sorted(self._qdiscs):
            run(self._tc("del", d))
            self._qdiscs.discard(d)

    # faults: relay, disk -------------------------------------------------------------------

    def relay(self, delay_up: float = 0.0, delay_down: float = 0.0,
              target_port: int | None = None) -> Relay:
        """A relay on the source address forwarding to the target's `target_port` (sshd's);
        its address is pinned in known_hosts, so `ssh_argv(via=relay)` just works."""
        r = Relay(self.source_addr, self.target_addr, target_port or self.port)
        self._relays.append(r)
        r.set_delay(delay_up, delay_down)
        with open(self.known_hosts, "a") as f:
            f.write(self.known_hosts_line(r.host, r.port))
        return r

    def target_disk(self, size: int = 32 << 20) -> TargetDisk:
        """A small ext4 on a loop device, mounted in the target's view under the bed's dir."""
        d = TargetDisk(self, len(self._disks), size)
        self._disks.append(d)
        d.create()
        return d


# -- the relay --------------------------------------------------------------------------------

class Relay:
    """A user-space TCP relay process (this kernel has no netem), controlled over its stdin.

    Delays are one-way and apply to data read after the change; `stall` stops forwarding in
    both directions without closing anything (peers see a silent path), `resume` lets the held
    data go, `cut` resets both sides of every connection (a RST each way).
    """

    def __init__(self, listen: str, target: str, target_port: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", __file__, "relay", listen, target, str(target_port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        try:
            first = self._line()
            if not first.startswith("listening "):
                raise NetbedError(f"relay {self.pid} did not start: {first!r}")
        except BaseException:
            self.close()
            raise
        _, self.host, port = first.split()
        self.port = int(port)

    def _line(self) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
        if not ready:
            raise NetbedError(f"relay {self.pid} gave no answer in {START_TIMEOUT:.0f} s")
        return self.proc.stdout.readline().strip()

    def _ask(self, *words) -> dict:
        self.proc.stdin.write(" ".join(str(w) for w in words) + "\n")
        self.proc.stdin.flush()
        answer = self._line()
        if not answer.startswith("ok "):
            raise NetbedError(f"relay {self.pid}: {words} -> {answer!r}")
        return json.loads(answer[3:])

    def set_delay(self, up: float, down: float) -> None:
        self._ask("delay", up, down)

    def stall(self) -> None:
        self._ask("stall")

    def resume(self) -> None:
        self._ask("resume")

    def cut(self) -> int:
        """Reset every connection now; returns how many there were."""
        return self._ask("cut")["cut"]

    def stats(self) -> dict:
        """connections (accepted so far), open, up_bytes, down_bytes (forwarded)."""
        return self._ask("stats")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)
        self.proc.stdin.close()
        self.proc.stdout.close()


class _RelayState:
    def __init__(self):
        self.delay = {"up": 0.0, "down": 0.0}
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.open: dict[asyncio.Task, tuple] = {}  # connection handler -> its two writers
        self.stats = {"connections": 0, "up_bytes": 0, "down_bytes": 0}


def _reset(writer) -> None:
    """Close with SO_LINGER 0, so the kernel sends RST instead of FIN."""
    with contextlib.suppress(OSError):
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _pump(state: _RelayState, src, dst, direction: str) -> None:
    """Forward src → dst, each chunk held until its read time + the one-way delay."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=1024)

    async def reader():
        while True:
            await state.flowing.wait()
            data = await src.read(65536)
            await queue.put((loop.time() + state.delay[direction], data))
            if not data:
                return

    async def writer():
        while True:
            release, data = await queue.get()
            if (wait := release - loop.time()) > 0:
                await asyncio.sleep(wait)
            await state.flowing.wait()
            if not data:
                if dst.can_write_eof():
                    dst.write_eof()
                return
            dst.write(data)
            await dst.drain()
            state.stats[f"{direction}_bytes"] += len(data)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(reader())
        tg.create_task(writer())


async def _relay_main(listen: str, target: str, target_port: int) -> None:
    state = _RelayState()

    async def handle(client_r, client_w):
        state.stats["connections"] += 1
        try:
            up_r, up_w = await asyncio.open_connection(target, target_port,
                                                       local_addr=(listen, 0))
        except OSError:
            _reset(client_w)  # what the client would see from a refusing target
            return
        me = asyncio.current_task()
        state.open[me] = (client_w, up_w)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_pump(state, client_r, up_w, "up"))
                tg.create_task(_pump(state, up_r, client_w, "down"))
            client_w.close()
            up_w.close()
        except BaseException:  # one side reset, or `cut`: reset the other side too
            _reset(client_w)
            _reset(up_w)
        finally:
            state.open.pop(me, None)

    server = await asyncio.start_server(handle, listen, 0)
    port = server.sockets[0].getsockname()[1]
    print(f"listening {listen} {port}", flush=True)
    loop = asyncio.get_running_loop()
    control = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(control), sys.stdin)
    while line := await control.readline():
        cmd, *args = line.decode().split()
        answer: dict = {}
        if cmd == "delay":
            state.delay = {"up": float(args[0]), "down": float(args[1])}
        elif cmd == "stall":
            state.flowing.clear()
        elif cmd == "resume":
            state.flowing.set()
        elif cmd == "cut":
            answer["cut"] = len(state.open)
            for task, writers in list(state.open.items()):
                for w in writers:
                    _reset(w)
                task.cancel()
        elif cmd == "stats":
            answer = {**state.stats, "open": len(state.open)}
        else:
            print(f"error unknown command {cmd!r}", flush=True)
            continue
        print("ok " + json.dumps(answer), flush=True)
    server.close()


# -- the target disk --------------------------------------------------------------------------

class TargetDisk:
    """A small ext4 on a loop device over a file in the bed's dir, mounted where the target
    sees it (inside its mount namespace with private_mounts). `path` is the mount as this
    process can reach it; `mountpoint` is the path the target uses."""

    def __init__(self, bed: TwoHosts, index: int, size: int):
        self.bed = bed
        self.image = bed.dir / f"disk{index}.img"
        self.mountpoint = bed.dir / f"disk{index}"
        self.path = bed.target_view(self.mountpoint)
        self.size = size
        self.device = ""
        self._image_id: tuple[int, int] | None = None
        self._mounted = False
        self._ballast = self.path / ".netbed-ballast"

    def create(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(self.size)
        st = self.image.stat()
        self._image_id = (st.st_dev, st.st_ino)
        self.device = run(["losetup", "--find", "--show", str(self.image)]).stdout.strip()
        run(["mkfs.ext4", "-q", "-F", "-m", "0",
             "-E", "lazy_itable_init=0,lazy_journal_init=0", self.device])
        self.mountpoint.mkdir()
        self._mount_argv(["mount", "-t", "ext4", self.device, str(self.mountpoint)])
        self._mounted = True

    def _mount_argv(self, argv: list[str]) -> subprocess.CompletedProcess:
        if self.bed.anchor is not None:
            return self.bed.run_on_target(argv)
        return run(argv)

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self) -> int:
        """Take all free space with a ballast file (until ENOSPC); returns its size."""
        fd = os.open(self._ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        block = b"\0" * 4096
        try:
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, os.fstat(fd).st_size, max(self.free_bytes() - (1 << 20),
                                                                  4096))
            while True:
                try:
                    os.write(fd, block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
            with contextlib.suppress(OSError):  # ENOSPC may surface at fsync too
                os.fsync(fd)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def unfill(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._ballast.unlink()
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)  # commits the freeing transaction, so statvfs and writers see it
        finally:
            os.close(fd)

    def _loop_backs_image(self) -> bool:
        """The loop still serves OUR file (loop numbers are reused by other tests at once)."""
        name = os.path.basename(self.device)
        try:
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
            st = os.stat(backing)
        except OSError:
            return False
        return backing == str(self.image) and (st.st_dev, st.st_ino) == self._image_id

    def close(self) -> None:
        if self._mounted:
            self._mount_argv(["umount", str(self.mountpoint)])
            self._mounted = False
        if self.device and self._loop_backs_image():
            run(["losetup", "-d", self.device])
            # While anyone holds the loop open (udev, or another test probing every loop
            # device), the kernel only marks it for detach at the last close. (10 s was not
            # always enough with the suite under busy_host.py and load 10-13: helper-31's run
            # failed at teardown with the loop gone by the end)
            deadline = time.monotonic() + 3 * STOP_TIMEOUT
            while self._loop_backs_image() and time.monotonic() < deadline:
                time.sleep(0.05)

    def leftovers(self) -> list[str]:
        left = []
        if self.device and self._loop_backs_image():
            left.append(f"loop {self.device} on {self.image}")
        if os.path.ismount(self.mountpoint):
            left.append(f"mount {self.mountpoint}")
        return left


if __name__ == "__main__" and sys.argv[1:2] == ["relay"]:
    asyncio.run(_relay_main(sys.argv[2], sys.argv[3], int(sys.argv[4])))
