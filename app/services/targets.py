"""Remote targets from the administrator's side: adding one (a dedicated key, the host key
shown and pinned, never accepted silently), the authorized_keys line for the target, and a
connection test. The replication itself runs in the capture workers (app/engine/remote.py)
over the same ssh settings and wire.

OpenSSH is a subprocess, given everything on its command line: BatchMode (never a prompt),
StrictHostKeyChecking=yes against the target's own known_hosts file, the dedicated key only
(IdentitiesOnly), keep-alives for dead-peer detection, no ssh-level compression (we compress
per batch) and no forwarding. The administrator's ssh_config still applies unless the target
names its own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, replace

from app.services import wire
from app.services.config import ConfigStore
from app.services.config_toml import TargetHost
from app.services.layout import command
from app.services.results import ConfigError, ConfigErrors, MirrorError, Outcome, Refusal, Result

KEYSCAN_SECONDS = 10
PROBE_SECONDS = 30
# a `block add`'s room check: a target that drops packets is said at once, not after the
# ConnectTimeout replication waits for (Settings.connect_timeout)
ROOM_CONNECT_SECONDS = 3
ROOM_SECONDS = 10


@functools.cache
def ssh_version() -> tuple[int, int]:
    """The OpenSSH client's version (`ssh -V`, once per process); (0, 0) when it does not say."""
    try:
        said = subprocess.run(["ssh", "-V"], capture_output=True, timeout=10).stderr.decode(
            errors="replace")
    except (OSError, subprocess.TimeoutExpired):
        said = ""
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", said)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


@dataclass(frozen=True)
class Settings:
    """A configured [[target]] and the path of one replica below its root."""

    name: str
    host: str
    root: str
    path: str = ""
    port: int = 22
    user: str | None = None
    identity: str | None = None
    known_hosts: str | None = None
    ssh_config: str | None = None
    bandwidth: int | None = None  # wire bytes per second
    resync_bandwidth: int | None = None
    compression: str = "zstd"
    alive_interval: int = 2
    alive_count: int = 3
    connect_timeout: int = 10

    def ssh_argv(self, *remote: str) -> list[str]:
        argv = ["ssh"]
        if self.ssh_config:
            argv += ["-F", self.ssh_config]
        opts = {"BatchMode": "yes", "StrictHostKeyChecking": "yes", "Compression": "no",
                "ServerAliveInterval": str(self.alive_interval),
                "ServerAliveCountMax": str(self.alive_count),
                "ConnectTimeout": str(self.connect_timeout), "LogLevel": "INFO",
                "ForwardAgent": "no", "ForwardX11": "no", "ClearAllForwardings": "yes",
                # a connection of its own, whatever ssh_config says: one over an administrator's
                # multiplexing master (ControlMaster auto, …) is authenticated by the master's
                # key and host key, not this target's, and runs the remote command without the
                # forced one; one that became a master outlived its session (ControlPersist)
                "ControlMaster": "no", "ControlPath": "none",
                # a RemoteCommand there (e.g. "tmux attach" for that host) made ssh refuse the
                # agent's command line: "Cannot execute command-line and remote command."
                "RemoteCommand": "none"}
        if ssh_version() >= (8, 7):  # options older clients refuse: set only where known
            # ssh_config's SessionType none (-N), StdinNull yes (-n) and ForkAfterAuthentication
            # yes (-f) for a host: no agent ran, or it read nothing, and every session failed
            opts.update(SessionType="default", StdinNull="no", ForkAfterAuthentication="no")
        if self.known_hosts:
            opts["UserKnownHostsFile"] = self.known_hosts
            opts["GlobalKnownHostsFile"] = "/dev/null"
        if self.identity:
            opts["IdentityFile"] = self.identity
            opts["IdentitiesOnly"] = "yes"
        for k, v in opts.items():
            argv += ["-o", f"{k}={v}"]
        argv += ["-p", str(self.port), "-T"]
        if self.user:
            argv += ["-l", self.user]
        return argv + ["--", self.host, *remote]


    @classmethod
    def of(cls, host: TargetHost, path: str = "") -> Settings:
        spec = host.to_spec()
        return cls(**{k: v for k, v in spec.items() if k in cls.__dataclass_fields__}, path=path)


# ssh's own last words, most telling first, and the errno each stands for (None: it names none;
# a later one said may). The reason shown is the line that has the first said (its banners,
# "@@@…" and "Someone could be eavesdropping…", and the remedies it suggests are not); the errno
# is the first said that names one.
SSH_VERDICTS = (("Host key verification failed", errno.EACCES),
                ("REMOTE HOST IDENTIFICATION HAS CHANGED", errno.EACCES),
                ("Permission denied (", errno.EACCES),  # ssh's own: "… denied (publickey)."
                ("Permission denied", None),  # a forced command's shell (its status 126 says)
                ("Could not resolve hostname", errno.EHOSTUNREACH),
                ("Connection refused", errno.ECONNREFUSED),
                ("timed out", errno.ETIMEDOUT),  # also "Connection to H port P timed out"
                ("No route to host", errno.EHOSTUNREACH),
                ("Network is unreachable", errno.ENETUNREACH),
                ("not responding", errno.ETIMEDOUT),
                ("kex_exchange_identification", None),
                ("Connection closed by", errno.ECONNRESET),
                ("Connection reset", errno.ECONNRESET),
                ("Broken pipe", errno.EPIPE),
                ("command not found", None))
# (kex_exchange_identification before "Connection closed by": OpenSSH 9.2 says both when the
# server hangs up before the ssh handshake, and only the first says at what point; the second
# gives the errno)
SSH_NOISE = ("@", "Warning: Permanently added", "Pseudo-terminal", "debug", "IT IS POSSIBLE",
             "Someone could be", "It is also possible", "Please contact", "Add correct host key",
             "Offending", "remove with", "ssh-keygen", "The fingerprint for", "SHA256:")

# The agent's own log lines below ERROR, on ssh's stderr (agent.py's logging format): what it
# was doing, not why the session ended ("mirrorsetup-agent[N] WARNING paused: …" was said as
# the reason of a killed agent's disconnect)
AGENT_CHATTER = re.compile(r"mirrorsetup-agent\[\d+\] (DEBUG|INFO|WARNING) ")


def ssh_verdict(stderr: str) -> tuple[str | None, int | None]:
    """(the line of an ssh's stderr that has the first verdict said, the errno of the first
    said that names one); None for what it does not say. SSH_VERDICTS read once for both."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    line = err = None
    for words, words_errno in SSH_VERDICTS:
        said = [ln for ln in lines if words.lower() in ln.lower()]
        if said:
            line = line or said[-1]
            err = err or words_errno
            if err:
                break
    return line, err


def ssh_reason(stderr: str, status: int | None) -> str:
    """The line of an ssh's stderr that says why it ended (a verdict; else its last line that
    is not a banner or a remedy; else its exit status)."""
    verdict, _ = ssh_verdict(stderr)
    if verdict:
        return verdict
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    plain = [ln for ln in lines if not ln.startswith(SSH_NOISE) and any(c.isalpha() for c in ln)
             and not AGENT_CHATTER.match(ln)]
    if plain:
        return plain[-1]
    if any(ln.startswith("mirrorsetup-agent[") for ln in lines):
        return (f"the agent ended without saying why (killed?); ssh exited with status {status}"
                if status is not None else "the agent ended without saying why (killed?)")
    if status == 255:
        return "ssh exited with status 255 and said nothing (it could not connect, or was cut off)"
    return f"ssh exited with status {status}"


# A session's OSError in an administrator's words; its errno name is kept beside them
SESSION_ERRORS = {errno.EPIPE: "the connection broke", errno.ECONNRESET: "the connection was reset",
                  errno.ETIMEDOUT: "the connection timed out",
                  errno.EHOSTUNREACH: "the target's host cannot be reached",
                  errno.ENETUNREACH: "the target's network cannot be reached"}


def session_error_text(exc: BaseException) -> str:
    """What broke a session, as status words: "the connection broke (EPIPE)", not Python's
    "[Errno 32] Broken pipe"; an error without an errno as it says itself."""
    if isinstance(exc, OSError) and exc.errno:
        words = SESSION_ERRORS.get(exc.errno) or exc.strerror or os.strerror(exc.errno)
        return f"{words} ({errno.errorcode.get(exc.errno, 'E?')})"
    return str(exc)


def ssh_failure_text(stderr: str, status: int | None, target: str = "TARGET") -> tuple[str, bool]:
    """(status words, retry?) for an ssh to `target` that ended before the agent answered."""
    last = ssh_reason(stderr, status)
    low = stderr.lower()
    if "remote host identification has changed" in low:
        offered = re.search(r"sent by the remote host is\s+(SHA256:[A-Za-z0-9+/=]+)", stderr)
        return ("refused: the target's host key changed" +
                (f" (it offers {offered.group(1)}, not the key pinned for it)" if offered else "") +
                f"; if the target was reinstalled, check its key there, then "
                f"{command('target', 'rekey', target)} (Targets screen: h)"), False
    unknown = re.search(r"No (\S+) host key is known for (\S+)", stderr)
    if unknown and "host key verification failed" in low:  # an empty or other known_hosts
        return (f"refused: no host key is pinned for {unknown.group(2)} in the known_hosts ssh was "
                f"given ({last}); check the target's key there, then "
                f"{command('target', 'rekey', target)} (Targets screen: h)"), False
    if "host key verification failed" in low:
        return (f"refused: host key not pinned or changed ({last}); check the target's key there, "
                f"then {command('target', 'rekey', target)} (Targets screen: h)"), False
    if status == 126:  # the forced command's shell found the program and could not run it
        return (f"refused: the target cannot run the agent ({last}); the program that the command= "
                "of the key's line names is there but cannot be run (not executable?): fix it "
                f"there, or that command= ({command('target', 'authorized-key', target)} prints "
                "the line)"), True
    if status == 127 or "command not found" in low:
        return (f"refused: the target cannot run the agent ({last}); install mirrorsetup there so "
                "that `mirrorsetup` is on the PATH of the forced command, or put its full path in "
                f"the command= of the key's line ({command('target', 'authorized-key', target)} "
                "prints it)"), True
    if "permission denied (" in low:  # ssh's own: "user@host: Permission denied (publickey)."
        return f"refused: the target does not accept our key ({last})", False
    if "not responding" in low:
        return f"disconnected: the target stopped answering ({last})", True
    if "broken pipe" in last.lower():  # "client_loop: send disconnect: Broken pipe"
        return f"disconnected: the connection broke ({last})", True
    return f"disconnected: {last}", True


def ssh_errno(stderr: str, status: int | None) -> int:
    """The errno of an ssh that ended before the agent answered (ECONNREFUSED when ssh's words
    name none: it was not let through to the agent)."""
    if status == 127:  # the forced command's program is not there
        return errno.ENOENT
    if status == 126:  # there, and cannot be run
        return errno.EACCES
    return ssh_verdict(stderr)[1] or errno.ECONNREFUSED


def keys_dir(store: ConfigStore) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(store.path)), "keys")


def default_known_hosts(store: ConfigStore) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(store.path)), "known_hosts")


def host_pattern(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def ssh_resolved(host: str, port: int | None, ssh_config: str | None = None) -> dict[str, str]:
    """What ssh makes of the destination after ssh_config (`ssh -G`, which connects nowhere):
    its hostname, port (ssh_config's when `port` is None), hostkeyalias, proxyjump, proxycommand.
    An ssh that cannot read the configuration says so at the first connection: the destination
    is taken as given here."""
    argv = ["ssh", "-G", *(["-F", ssh_config] if ssh_config else []),
            *(["-p", str(port)] if port is not None else []), "--", host]
    try:
        r = _run(argv, timeout=KEYSCAN_SECONDS)
    except (OSError, subprocess.TimeoutExpired):
        r = None
    if r is None or r.returncode != 0:
        return {"hostname": host, "port": str(port or 22)}
    said = dict(line.partition(" ")[::2] for line in r.stdout.decode(errors="replace").splitlines())
    return {k: v for k, v in said.items() if v and v != "none"}


def known_name(host: str, port: int, ssh_config: str | None = None) -> str:
    """The name ssh looks the host key up by in known_hosts: a HostKeyAlias, else the host name
    ssh_config gives (HostName) with the port. The destination as typed was pinned before, and
    a host reached by an alias of ssh_config was refused at every connection."""
    g = ssh_resolved(host, port, ssh_config)
    if "hostkeyalias" in g:
        return g["hostkeyalias"]
    return host_pattern(g.get("hostname") or host, port)


def _run(argv: list[str], *, input: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)


def scan_host_keys(host: str, port: int, ssh_config: str | None = None) -> list[tuple[str, str, str]]:
    """(key line for known_hosts, fingerprint SHA256:…, type) for each key the host offers.
    ssh-keyscan reads no ssh_config: a host reached through a ProxyJump or ProxyCommand is asked
    by ssh itself (its key is all it keeps of that connection), an alias by its HostName."""
    g = ssh_resolved(host, port, ssh_config)
    if "proxyjump" in g or "proxycommand" in g:
        return _keys_through_ssh(host, port, ssh_config)
    began, named = time.monotonic(), g.get("hostname") or host
    r = _run(["ssh-keyscan", "-T", str(KEYSCAN_SECONDS), "-p", str(port), "--", named],
             timeout=KEYSCAN_SECONDS + 10)
    waited = time.monotonic() - began
    lines = [ln for ln in r.stdout.decode(errors="replace").splitlines()
             if ln.strip() and not ln.startswith("#")]
    if not lines:
        said = dict.fromkeys(ln.strip() for ln in r.stderr.decode(errors="replace").splitlines()
                             if ln.strip() and not ln.startswith("#"))  # once each, no \r
        err, why = errno.EHOSTUNREACH, "; ".join(said)
        if not why and waited >= KEYSCAN_SECONDS:  # its own time-out (it says nothing of that
            # either): a port that drops packets, or a service that never sends an ssh banner.
            # Asked again, the kernel would wait as long once more.
            err, why = errno.ETIMEDOUT, f"timed out: no ssh answer within {KEYSCAN_SECONDS} s"
        if not why:  # ssh-keyscan says nothing of a refused or unreachable port: ask the kernel
            try:
                socket.create_connection((named, port), timeout=KEYSCAN_SECONDS).close()
                why = "it answered no ssh host key"
            except OSError as exc:
                err = exc.errno or errno.ETIMEDOUT
                why = (os.strerror(exc.errno) if exc.errno else str(exc) or "timed out").lower()
        raise MirrorError(f"could not read the host key of {host} port {port}: {why}",
                          errno=err, obj=host)
    return _fingerprinted(lines)


def _fingerprinted(lines: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for line in lines:
        fp = _run(["ssh-keygen", "-l", "-E", "sha256", "-f", "-"], input=line.encode() + b"\n")
        parts = fp.stdout.decode().split()
        if fp.returncode == 0 and len(parts) >= 2:
            out.append((line, parts[1], parts[-1].strip("()")))
    return out


def _keys_through_ssh(host: str, port: int, ssh_config: str | None) -> list[tuple[str, str, str]]:
    """The host key of a host behind a ProxyJump or ProxyCommand: ssh connects through it,
    writes the key it is offered to a known_hosts file of its own (accept-new, in a directory
    made for it and removed after) and offers no credentials (at most `true` runs there). The
    key is shown and pinned as an ssh-keyscan one is: never trusted by this."""
    tmp = tempfile.mkdtemp(prefix="mirrorsetup-hostkey-")
    try:
        seen = os.path.join(tmp, "known_hosts")
        opts = {"StrictHostKeyChecking": "accept-new", "UserKnownHostsFile": seen,
                "GlobalKnownHostsFile": "/dev/null", "HashKnownHosts": "no", "BatchMode": "yes",
                "PreferredAuthentications": "none", "ConnectTimeout": str(KEYSCAN_SECONDS),
                "ControlMaster": "no", "ControlPath": "none", "RemoteCommand": "none",
                "UpdateHostKeys": "no", "LogLevel": "ERROR"}
        argv = ["ssh", *(["-F", ssh_config] if ssh_config else [])]
        for k, v in opts.items():
            argv += ["-o", f"{k}={v}"]
        r = _run([*argv, "-p", str(port), "-T", "--", host, "true"], timeout=KEYSCAN_SECONDS + 20)
        try:
            with open(seen, errors="replace") as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        except FileNotFoundError:
            lines = []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not lines:
        said = r.stderr.decode(errors="replace")
        line, err = ssh_verdict(said)
        why = line or "; ".join(ln.strip() for ln in said.splitlines() if ln.strip()) or \
            f"ssh ended with status {r.returncode}"
        raise MirrorError(f"could not read the host key of {host} port {port} through its "
                          f"ProxyJump/ProxyCommand: {why}", errno=err or errno.EHOSTUNREACH, obj=host)
    return _fingerprinted(lines)


def pinned_fingerprints(known_hosts: str, host: str, port: int,
                        ssh_config: str | None = None) -> list[str]:
    """The SHA256 fingerprints pinned for host:port in `known_hosts` (ours: unhashed lines),
    under the name ssh looks it up by (known_name)."""
    if not os.path.exists(known_hosts):
        return []
    r = _run(["ssh-keygen", "-F", known_name(host, port, ssh_config), "-f", known_hosts])
    out = []
    for line in r.stdout.decode(errors="replace").splitlines():
        if line.strip() and not line.startswith("#"):
            fp = _run(["ssh-keygen", "-l", "-E", "sha256", "-f", "-"], input=line.encode() + b"\n")
            parts = fp.stdout.decode().split()
            if fp.returncode == 0 and len(parts) >= 2:
                out.append(parts[1])
    return out


def check_fingerprint(fp: str) -> None:
    """--accept-host-key as ssh-keygen -l prints it: SHA256: and 32 bytes in base64 without
    padding (43 characters); anything else is refused before any host is asked, saying what
    it looks like (the SHA256 form is the only one documented and compared)."""
    if re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fp):
        return
    if not fp:
        what = "an empty --accept-host-key is not a fingerprint"
    elif re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}\.", fp):
        what = (f"--accept-host-key {fp!r} is not a fingerprint: drop the '.' after it (ssh's "
                "warning ends its sentence with one)")
    elif re.fullmatch(r"(MD5:)?[0-9a-fA-F]{2}(:[0-9a-fA-F]{2})+", fp):
        what = (f"--accept-host-key {fp!r} is not a fingerprint taken here: it looks like an MD5 "
                "one (xx:xx:…), and only SHA256 ones are compared")
    elif re.fullmatch(r"[A-Za-z0-9+/]{43}", fp):
        what = f"--accept-host-key {fp!r} is not a fingerprint: it lacks the SHA256: in front"
    else:
        what = f"--accept-host-key {fp!r} is not a fingerprint"
    raise ConfigError(f"{what}; give it as ssh-keygen -lf prints it, SHA256: and 43 characters "
                      "(e.g. ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub on the target)",
                      errno=errno.EINVAL, obj=fp or "--accept-host-key")


def _repin(known_hosts: str, host: str, port: int, line: str, ssh_config: str | None = None) -> None:
    """Replace every key pinned for host:port by `line` (a new file renamed over the old one:
    an ssh reading it sees the old pin or the new one)."""
    pattern = known_name(host, port, ssh_config)
    _keyhost, keytype, key = line.split(None, 2)
    fd = _locked(known_hosts)
    try:
        with os.fdopen(os.dup(fd), "r", errors="surrogateescape") as f:
            kept = [ln for ln in f.read().splitlines()
                    if not ln.strip() or ln.startswith("#") or pattern not in ln.split()[0].split(",")]
        kept.append(f"{pattern} {keytype} {key}")
        tmp = f"{known_hosts}.{os.getpid()}.tmp"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(out, ("\n".join(kept) + "\n").encode(errors="surrogateescape"))
            os.fsync(out)
            os.rename(tmp, known_hosts)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(out)
        dfd = os.open(os.path.dirname(known_hosts) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(fd)


def pinned_for(store: ConfigStore, host: TargetHost) -> tuple[str, list[str]]:
    """(known_hosts, the fingerprints pinned there for the host and port): what add and rekey
    compare the key the host offers with (its own known_hosts, else the configuration's)."""
    known_hosts = host.known_hosts or default_known_hosts(store)
    return known_hosts, pinned_fingerprints(known_hosts, host.host, host.port, host.ssh_config)


def offered_and_pinned(keys: list[tuple[str, str, str]], pinned: list[str]
                       ) -> tuple[str, str, str] | None:
    """Of the keys a host offers (scan_host_keys), the one pinned already: an add asks nothing
    for it (as `target add` asks nothing for a host pinned already). None: none is, and a key
    is never pinned without a question (or --accept-host-key), nor in place of another."""
    return next((k for k in keys if k[1] in pinned), None)


def rekey_target(store: ConfigStore, name: str, *, accept_host_key: str | None = None,
                 confirm=None) -> Result:
    """`target rekey NAME`: pin the key the host offers now in place of the one pinned (a
    reinstalled target). Like add, the new key is never taken silently: `accept_host_key` must
    match what the host offers, or `confirm(keys)` asks at a terminal."""
    try:
        host = store.load().target_host(name)
        if host is None:
            raise ConfigError(f"no remote target named {name!r} is configured (mirrorsetup target "
                              "list)", errno=errno.ENOENT, obj=name)
        if accept_host_key is not None:
            check_fingerprint(accept_host_key)
        kh, old = pinned_for(store, host)
        keys = scan_host_keys(host.host, host.port, host.ssh_config)
        where = f"{host.host} port {host.port}"
        shown = ", ".join(f"{fp} ({kind})" for _line, fp, kind in keys)
        still = next((k for k in keys if old == [k[1]]), None)
        if still is not None and accept_host_key in (None, still[1]):
            # nothing to re-pin: the host still offers the key pinned (asked or not)
            return Result("rekey target", name, Outcome.UNCHANGED, f"{where} still offers the "
                          f"pinned host key {still[1]} ({still[2]}, in {kh}): nothing to re-pin")
        if accept_host_key:
            chosen = next((k for k in keys if k[1] == accept_host_key), None)
            if chosen is None:
                raise Refusal(f"the host key of {where} is not {accept_host_key}: it offers "
                                  f"{shown}. Nothing was changed", errno=errno.EACCES, obj=name)
        elif confirm is not None and confirm(keys):
            chosen = keys[0]
        else:
            raise Refusal(f"{where} offers {shown}; pinned: {', '.join(old) or 'nothing'}. Check "
                              "it on the target (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) "
                              f"and run again with --accept-host-key {keys[0][1]}. Nothing was "
                              "changed", errno=errno.EACCES, obj=name)
        if old == [chosen[1]]:
            return Result("rekey target", name, Outcome.UNCHANGED, f"the host key of {where} is "
                          f"pinned as {chosen[1]} already (in {kh})")
        if old:
            _repin(kh, host.host, host.port, chosen[0], host.ssh_config)
        else:
            _pin(kh, host.host, host.port, chosen[0], host.ssh_config)
    except (MirrorError, subprocess.TimeoutExpired, OSError) as exc:
        return _failed("rekey target", name, exc)
    users = [t.name for t in store.load().target
             if (t.host, t.port) == (host.host, host.port) and (t.known_hosts or kh) == kh]
    return Result("rekey target", name, Outcome.OK, f"pinned host key {chosen[1]} ({chosen[2]}) of "
                  f"{where} in {kh}" + (f" in place of {', '.join(old)}" if old else "") +
                  f"; targets using it: {', '.join(users)}. Their captures connect with it on their "
                  "next try", details={"fingerprint": chosen[1], "was": old, "known_hosts": kh,
                                       "targets": users})


# What `target set` may change: how the target is reached and how fast. Its name, host and
# root are where its replicas are (remove and add it again; `rekey` for a new host key).
SETTABLE = ("bandwidth", "resync_bandwidth", "compression", "port", "user", "identity",
            "known_hosts")


def setting_shown(value) -> str:
    return "none" if value is None else str(value)


def set_target(store: ConfigStore, name: str, changes: dict, *, live: bool = False) -> Result:
    """`target set NAME`: change how a target is reached or how fast, checked as `target add`
    checks them. No connection is made for a new user or identity (the target may be down;
    `target test` tells whether it takes them). A new known_hosts or port must hold a pin for
    the host there: one missing is filled from the key pinned now, if the host offers that
    very key there (ssh-keyscan); any other key is refused, never pinned silently.
    `live`: the daemon applies them to the running captures next (Replication.set_target),
    so the result does not say they keep the old ones."""
    try:
        seen = store.load().target_host(name)
        if seen is None:
            raise ConfigError(f"no remote target named {name!r} is configured (mirrorsetup target "
                              "list)", errno=errno.ENOENT, obj=name)
        wanted = replace(seen, **changes)
        changed = {k: [getattr(seen, k), getattr(wanted, k)] for k in SETTABLE
                   if getattr(seen, k) != getattr(wanted, k)}
        if not changed:
            return Result("set target", name, Outcome.UNCHANGED, f"target {name} has these "
                          "settings already: nothing was changed")
        error = ConfigErrors.of(set_errors(wanted, changed))
        if error is not None:
            raise error
        line = authorized_key_line(wanted)
        note = ""
        if changed.keys() & {"known_hosts", "port"}:
            note = _pin_moved(store, seen, wanted)

        def same_as_seen(old: TargetHost, new: TargetHost) -> TargetHost:
            if old != seen:  # another console changed it while the host was asked
                raise Refusal(f"target {name} was changed meanwhile; nothing was changed: look "
                              "at it again (mirrorsetup target list)", errno=errno.EAGAIN, obj=name)
            return new
        store.set_target(name, same_as_seen, **changes)
    except (MirrorError, subprocess.TimeoutExpired, OSError) as exc:
        return _failed("set target", name, exc)
    from app.services.config import target_users
    from app.services.protocol import CAPTURE_AGAIN
    users = target_users(store.load(), name)
    said = ", ".join(f"{k} {setting_shown(old)} -> {setting_shown(new)}"
                     for k, (old, new) in changed.items())
    # not `live`: a running capture keeps what it has until the daemon applies the settings
    # (CaptureRow.not_applied says them meanwhile)
    then = "" if live else "".join(
        f"; {', '.join(key for k, key in users if k == kind)}: a running capture keeps the old "
        f"settings until the daemon applies them ({command('target', 'apply', name)}; its start "
        f"does too) or {CAPTURE_AGAIN[kind]} (status says them not applied until then)"
        for kind in ("fs", "block") if any(k == kind for k, _key in users))
    key = (f"; put this line in the target's authorized_keys, then "
           f"{command('target', 'test', name)}: {line}") if "identity" in changed else ""
    return Result("set target", name, Outcome.OK, f"changed {said}{note}{then}{key}",
                  details={"changed": changed, "entries": [key for _kind, key in users],
                           **({"authorized_key": line} if key else {})})


def set_errors(wanted: TargetHost, changed) -> list[ConfigError]:
    """Every problem of a target as `target set` would write it (`changed`: the settings it
    changes): its fields, then the files a changed identity or known_hosts names, all at once
    (the CLI says each on its line, the Targets screen's Edit says them together)."""
    from app.services.config import target_errors
    errors = target_errors(wanted)
    bad = {e.key for e in errors}
    checks = {"identity": lambda: (check_identity(wanted.identity), authorized_key_line(wanted)),
              "known_hosts": lambda: check_known_hosts_place(wanted.known_hosts)}
    for key, check in checks.items():
        if key in changed and key not in bad:
            try:
                check()
            except MirrorError as exc:  # (a public key that is missing: its own words)
                errors.append(exc if isinstance(exc, ConfigError) else
                              ConfigError(exc.message, key=key, obj=exc.obj, errno=exc.errno))
    return errors


def _pin_moved(store: ConfigStore, old: TargetHost, new: TargetHost) -> str:
    """The host's key pinned where `new` looks it up (its known_hosts, its port): there
    already, or pinned from `old`'s pin when the host offers that key there. Else a Refusal."""
    kh, pinned = pinned_for(store, new)
    if pinned:
        return ""
    _old_kh, was = pinned_for(store, old)
    keys = scan_host_keys(new.host, new.port, new.ssh_config)
    same = offered_and_pinned(keys, was)
    where = f"{new.host} port {new.port}"
    if same is None:
        shown = ", ".join(f"{fp} ({kind})" for _line, fp, kind in keys)
        raise Refusal(f"no host key is pinned for {where} in {kh}, and it offers {shown}, not the "
                      f"key pinned for target {new.name} ({', '.join(was) or 'none'}): its "
                      "connections would be refused. Check the key on the target (ssh-keygen -lf "
                      "/etc/ssh/ssh_host_ed25519_key.pub) and pin it there, or keep the old "
                      "setting. Nothing was changed", errno=errno.EACCES, obj=new.name)
    _pin(kh, new.host, new.port, same[0], new.ssh_config)
    return f"; pinned its host key {same[1]} ({same[2]}) for {where} in {kh}"


def _locked(known_hosts: str, flags: int = os.O_RDWR) -> int:
    """`known_hosts` opened and flock'ed, and still the file at that name (a rekey before us
    may have renamed a new one over it): pins and re-pins go one after the other."""
    while True:
        fd = os.open(known_hosts, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_ino == os.stat(known_hosts).st_ino:
            return fd
        os.close(fd)


def _pin(known_hosts: str, host: str, port: int, line: str, ssh_config: str | None = None) -> None:
    """Append `line` (as ssh-keyscan printed it) with the host named the way ssh looks it up."""
    _keyhost, keytype, key = line.split(None, 2)
    os.makedirs(os.path.dirname(known_hosts), mode=0o700, exist_ok=True)
    fd = _locked(known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{known_name(host, port, ssh_config)} {keytype} {key}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_key(path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    r = _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"mirrorsetup@{socket.gethostname()}",
              "-f", path])
    if r.returncode != 0:
        raise MirrorError(f"ssh-keygen could not make {path}: {r.stderr.decode(errors='replace').strip()}",
                          errno=errno.EIO, obj=path)


def add_target(store: ConfigStore, host: TargetHost, *, accept_host_key: str | None = None,
               confirm=None) -> Result:
    """Add a [[target]]: a dedicated ed25519 key unless one is given, and the host key pinned
    (`accept_host_key` must match what the host offers; without it `confirm(fingerprints)`
    asks an administrator at a terminal; without either the host is refused, naming its key)."""
    name = host.name
    made_key = False
    try:
        store.check_target(host)  # refused before anything is made
        if store.load().target_host(name) is not None:
            raise ConfigError(f"a target named {name!r} is already configured", obj=name, errno=errno.EEXIST)
        if host.identity is None:
            host = replace(host, identity=os.path.join(keys_dir(store), f"{name}_ed25519"))
            if not os.path.exists(host.identity):
                generate_key(host.identity)
                made_key = True
        else:
            check_identity(host.identity)
        line = authorized_key_line(host)  # its public key, read before anything is pinned
        if host.ssh_config is not None and not os.path.isfile(host.ssh_config):
            raise ConfigError(f"ssh_config {host.ssh_config} does not exist (ssh would refuse "
                              "every connection: \"Can't open user config file\")",
                              obj=host.ssh_config, errno=errno.ENOENT)
        if host.known_hosts is not None:  # the default one's directory is the configuration's
            check_known_hosts_place(host.known_hosts)
        else:
            host = replace(host, known_hosts=default_known_hosts(store))
        note = ""
        if accept_host_key is not None:
            check_fingerprint(accept_host_key)
        _known_hosts, old = pinned_for(store, host)
        if old and accept_host_key and accept_host_key not in old:
            # pinned by an earlier add: another key now is a reinstall or a man in the middle
            raise Refusal(f"{host.host} port {host.port} is pinned in {host.known_hosts} with the "
                              f"host key {', '.join(old)}, not {accept_host_key}. If the target was "
                              "reinstalled, check its key there, add this target without "
                              "--accept-host-key, then "
                              f"{command('target', 'rekey', name, '--accept-host-key', accept_host_key)}"
                              ". Nothing was added",
                              errno=errno.EACCES, obj=name)
        if old:
            note = f"host key of {host.host} already pinned in {host.known_hosts} ({', '.join(old)})"
        else:
            keys = scan_host_keys(host.host, host.port, host.ssh_config)
            shown = ", ".join(f"{fp} ({kind})" for _line, fp, kind in keys)
            chosen = None
            if accept_host_key:
                chosen = next((k for k in keys if k[1] == accept_host_key), None)
                if chosen is None:
                    raise Refusal(f"the host key of {host.host} port {host.port} is not "
                                      f"{accept_host_key}: it offers "
                                      f"{shown}. Nothing was added", errno=errno.EACCES, obj=name)
            elif confirm is not None and confirm(keys):
                chosen = keys[0]
            else:
                raise Refusal(f"the host key of {host.host} port {host.port} is not pinned: it offers "
                                  f"{shown}. Check it on the target (ssh-keygen -lf "
                                  "/etc/ssh/ssh_host_ed25519_key.pub) and add the target again with "
                                  f"--accept-host-key {keys[0][1]}. Nothing was added",
                                  errno=errno.EACCES, obj=name)
            _pin(host.known_hosts, host.host, host.port, chosen[0], host.ssh_config)
            note = f"pinned host key {chosen[1]} ({chosen[2]}) in {host.known_hosts}"
        store.add_target(host)
    except BaseException as exc:
        if made_key:  # nothing was added: the key made for it goes too (also when the question
            # at the terminal was ended by ^C or ^D: a walk found the key left then)
            for path in (host.identity, host.identity + ".pub"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            with contextlib.suppress(OSError):  # the keys directory, when it holds nothing else
                os.rmdir(os.path.dirname(host.identity))
        if not isinstance(exc, (MirrorError, subprocess.TimeoutExpired, OSError)):
            raise
        return _failed("add target", name, exc)
    key_note = f"; generated key {host.identity}" if made_key else ""
    return Result("add target", name, Outcome.OK, f"added target {name} ({host.user + '@' if host.user else ''}"
                  f"{host.host}:{host.port}, root {host.root}); {note}{key_note}. Put this line in "
                  f"the target's authorized_keys: {line}",
                  details={"authorized_key": line, "identity": host.identity,
                           "known_hosts": host.known_hosts})


def check_identity(identity: str) -> None:
    """A given --identity: a private key that is there (add and set refuse it otherwise)."""
    if not os.path.exists(identity):
        raise ConfigError(f"identity {identity} does not exist", obj=identity, errno=errno.ENOENT)
    if _public_key_fields(identity) is not None:
        raise ConfigError(f"identity {identity} is a public key: give the private key (its .pub "
                          "beside it)", obj=identity, errno=errno.EINVAL)


def check_known_hosts_place(known_hosts: str) -> None:
    """A given --known-hosts: a file (there or not yet) in a directory that is there."""
    where = os.path.dirname(os.path.abspath(known_hosts))
    if os.path.isdir(known_hosts):
        raise ConfigError(f"known_hosts {known_hosts} is a directory: give a file",
                          obj=known_hosts, errno=errno.EISDIR)
    if not os.path.isdir(where):  # (it was made, with every directory above it)
        raise ConfigError(f"known_hosts {known_hosts}: its directory {where} does not exist: "
                          "create it, or leave --known-hosts out (known_hosts next to the "
                          "configuration)", obj=known_hosts, errno=errno.ENOENT)


def _failed(action: str, name: str, exc: MirrorError | subprocess.TimeoutExpired | OSError
            ) -> Result:
    """An add, rekey or set that ended on `exc`: its Result (a ConfigError or Refusal: refused)."""
    if isinstance(exc, OSError) and not isinstance(exc, MirrorError):
        exc = MirrorError.from_oserror(action, name, exc)
    if isinstance(exc, subprocess.TimeoutExpired):
        exc = MirrorError(f"{exc.cmd[0]} did not answer in {exc.timeout:.0f} s", errno=errno.ETIMEDOUT)
    return Result.from_error(action, name, exc)


def _public_key_fields(path: str) -> tuple[str, str] | None:
    """(type, key) of an OpenSSH public key file (its first line), else None."""
    with open(path, "rb") as f:
        fields = f.readline(1 << 16).split()
    if len(fields) >= 2 and re.fullmatch(rb"(ssh|ecdsa|sk)-[A-Za-z0-9@.-]+", fields[0]) \
            and re.fullmatch(rb"[A-Za-z0-9+/]+={0,2}", fields[1]):
        return fields[0].decode(), fields[1].decode()
    return None


def authorized_key_line(host: TargetHost) -> str:
    """The exact line for the target's ~/.ssh/authorized_keys: the agent as a forced command,
    `restrict` (no pty, no forwarding, no agent, no X11). A public key that is missing or is
    not one: MirrorError, naming it."""
    pub = f"{host.identity}.pub"
    try:
        fields = _public_key_fields(pub)
    except FileNotFoundError:
        raise MirrorError(f"the public key {pub} of identity {host.identity} does not exist (the "
                          f"authorized_keys line is made from it): `ssh-keygen -y -f "
                          f"{host.identity} > {pub}` writes it", errno=errno.ENOENT,
                          obj=pub) from None
    except OSError as exc:
        raise MirrorError.from_oserror("read the public key", pub, exc) from None
    if fields is None:
        raise MirrorError(f"{pub} is not an OpenSSH public key (a line such as 'ssh-ed25519 "
                          "AAAA… comment')", errno=errno.EINVAL, obj=pub)
    keytype, key = fields
    forced = shlex.join([host.agent, "serve-target", "--root", host.root]).replace('"', '\\"')
    return f'command="{forced}",restrict {keytype} {key} mirrorsetup@{socket.gethostname()}'


def room_for_replicas(welcome: dict) -> dict:
    """The agent's free space less what its own journals take there (the room it keeps free,
    the records they hold not yet applied): what replicas can still use. An agent that does
    not say what its journals take (an older one): None."""
    free, room = welcome.get("free_bytes"), welcome.get("journal_room_bytes")
    pending = welcome.get("journal_pending_bytes")
    available = None if None in (free, room, pending) else max(0, free - room - pending)
    return {"journal_room_bytes": room, "journal_pending_bytes": pending,
            "available_bytes": available}


def probe(host: TargetHost, *, image: str | None = None, connect_timeout: int | None = None,
          seconds: float = PROBE_SECONDS) -> dict:
    """Connect, greet the agent, time a heartbeat: versions, free space, round-trip time; and
    what the replica `image` (a path below its root) takes there already, if the agent tells."""
    s = Settings.of(host)
    if connect_timeout is not None:
        s = replace(s, connect_timeout=connect_timeout)
    hello = {"version": wire.VERSION, "action": "test", **({"path": image} if image else {})}
    started = time.monotonic()
    proc = subprocess.Popen(s.ssh_argv("mirrorsetup-agent"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    result: dict = {}

    def talk() -> None:
        try:
            wire.skip_to_greeting(proc.stdout.read)
            proc.stdin.write(wire.jframe(wire.HELLO, hello))
            kind, payload = wire.read_frame(proc.stdout.read) or (None, b"{}")
            result["welcome"] = (kind, json.loads(payload))
            result["connect"] = time.monotonic() - started
            t0 = time.monotonic()
            proc.stdin.write(wire.jframe(wire.BEAT, {"ts": time.time()}))
            got = wire.read_frame(proc.stdout.read)
            if got is not None and got[0] == wire.BEAT:
                result["rtt"] = time.monotonic() - t0
        except (wire.WireError, OSError, ValueError, TypeError) as exc:
            result["error"] = str(exc)
    t = threading.Thread(target=talk, daemon=True)
    t.start()
    t.join(seconds)
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    stderr = proc.stderr.read().decode(errors="replace")
    if "welcome" not in result:
        state, _retry = ssh_failure_text(stderr, proc.returncode, host.name)
        raise MirrorError(f"target {host.name}: {state}" + (f" ({result['error']})" if result.get("error")
                                                             and "ssh exited" in state else ""),
                          errno=ssh_errno(stderr, proc.returncode), obj=host.name)
    kind, msg = result["welcome"]
    if kind == wire.ERROR:
        raise MirrorError(f"target {host.name}: the agent refused: {msg.get('message')}",
                          errno=msg.get("errno") or errno.EPROTO, obj=host.name)
    return {"target": host.name, "host": host.host, "port": host.port, "agent_version": msg.get("agent"),
            "wire_version": msg.get("version"), "source_wire_version": wire.VERSION,
            "agent_host": msg.get("host"), "root": msg.get("root"), "free_bytes": msg.get("free_bytes"),
            **room_for_replicas(msg),
            **({"image_bytes": msg.get("replica_bytes")} if image else {}),
            "connect_seconds": round(result.get("connect", 0.0), 3),
            "rtt_ms": None if "rtt" not in result else round(result["rtt"] * 1000, 2)}


def room_warning(host: TargetHost, target: str, window: int) -> str | None:
    """A block entry's remote `target` (NAME:PATH on `host`) without room for its `window`, as
    `target test` tells the room (probe); or that the room could not be checked. A warning at
    its add, never a refusal: room can be made there before it is captured. An image already
    there (a re-added entry's) is reused: the room it takes counts as the entry's."""
    from app.services.config import short_of
    from app.services.units import exact_size
    try:
        info = probe(host, image=target.partition(":")[2], connect_timeout=ROOM_CONNECT_SECONDS,
                     seconds=ROOM_SECONDS)
    except MirrorError as exc:
        return (f"the room for {target} could not be checked ({exc}); "
                f"{command('target', 'test', host.name)} tells it once the target answers")
    room = info.get("available_bytes")
    if room is None:  # an older agent: its free space
        room = info["free_bytes"]
    held = info.get("image_bytes") or 0  # (an older agent tells neither)
    if held:  # the room replicas would have without it
        room = room_for_replicas({**info, "free_bytes": info["free_bytes"] + held}
                                 )["available_bytes"]
    if room is None or room >= window:
        return None
    there = f", with the {exact_size(held)} its image there takes" if held else ""
    return f"target {target} " + short_of(f"has {exact_size(room)} for replicas ({host.root} "
                                          f"on {host.host}{there})", window)


def room_text(info: dict) -> str:
    """What replicas can use below a target's root (a `probe`'s answer), and what was
    subtracted from the free space to say it: `target test` and the Targets screen's Test."""
    from app.services.units import human_size
    free = human_size(info["free_bytes"] or 0)
    if info.get("available_bytes") is None:
        return f"{free} free (an older agent: what its journal takes is not known)"
    return (f"{human_size(info['available_bytes'])} for replicas ({free} free, less "
            f"{human_size(info['journal_room_bytes'])} the agent keeps free for its journal and "
            f"{human_size(info['journal_pending_bytes'])} its journals hold not yet applied)")
