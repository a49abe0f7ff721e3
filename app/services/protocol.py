"""The one wire format of mirrorsetup's local sockets, and the messages it carries.

Console/CLI ↔ daemon (control socket) and daemon ↔ capture worker (socketpair, or the worker's
take-over socket) speak the same thing: one JSON object per line.

    request   {"cmd": NAME, "args": {...}}
    progress  {"progress": {...}}                (any number, before the reply)
    reply     {"ok": true, ...}                  or  {"ok": false, "error": TEXT, "errno": N}
                                                 ("refused": true: nothing was changed)
    event     {"event": "ready" | "error", ...}  (a worker, once, when it starts)

The daemon's commands and their arguments are listed in COMMANDS (the daemon binds each to a
handler, the client checks names against it); a worker's in WORKER_COMMANDS. Status rows are
typed (`CaptureRow`): the daemon builds them, the CLI and the dashboard read their fields.
"""

from __future__ import annotations

import errno as errno_module
import json
import socket
from dataclasses import asdict, dataclass, field, fields
from typing import Any

VERSION = 2  # a worker started by another version is taken over only when this matches
MAX_LINE = 64 << 20  # no message is larger (a verify's list of differences included)


class ProtocolError(Exception):
    pass


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":"), default=str).encode() + b"\n"


def decode(line: bytes) -> dict:
    try:
        msg = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"not a JSON line: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a JSON object")
    return msg


def request(cmd: str, **args) -> bytes:
    return encode({"cmd": cmd, "args": args})


def ok(**data) -> dict:
    return {"ok": True, **data}


def error(message: str, err: int | None = None, *, refused: bool = False) -> dict:
    return {"ok": False, "error": message, "errno": err,
            "errno_name": errno_module.errorcode.get(err) if err else None,
            **({"refused": True} if refused else {})}


def progress(**data) -> dict:
    return {"progress": data}


def is_progress(msg: dict) -> bool:
    return "progress" in msg and "ok" not in msg


class LineReader:
    """Lines from a blocking socket (the client side, and workers before trio runs)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def next(self) -> dict | None:
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise ProtocolError("message too long")
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return decode(line)


class TrioLines:
    """Lines from a trio stream (the daemon and the workers' event loops)."""

    def __init__(self, stream):
        self.stream = stream
        self.buf = b""

    async def next(self) -> dict | None:
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise ProtocolError("message too long")
            data = await self.stream.receive_some(1 << 16)
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return decode(line)

    async def send(self, msg: dict) -> None:
        await self.stream.send_all(encode(msg))


@dataclass(frozen=True)
class Command:
    args: tuple[str, ...] = ()
    help: str = ""


# The daemon's control commands. Arguments not listed are refused (EINVAL).
COMMANDS: dict[str, Command] = {
    "ping": Command((), "pid, version, configuration file and state directory; while it stops, "
                        "what its stop waits for (stopping: entry, what, seconds_left)"),
    "status": Command((), "one CaptureRow per entry and the daemon's own figures"),
    "watch": Command((), "held open while the daemon runs: its end says the daemon stopped"),
    "shutdown": Command(("keep_captures",), "stop the daemon; captures in use go on (all of them "
                        "with keep_captures: a restart applications do not see)"),
    "reload": Command((), "mount new file-system entries, unmount removed ones"),
    "mount_all": Command(("force",), "mount mirrorfs on every file-system entry"),
    "unmount_all": Command(("force",), "unmount mirrorfs from every file-system entry"),
    "mount": Command(("path",), "mount one file-system entry"),
    "unmount": Command(("path", "force"), "unmount one file-system entry"),
    "mirror": Command(("path",), "copy what differs of a file-system entry to its target"),
    "verify": Command(("path",), "compare a file-system entry with its target"),
    "block_attach_all": Command(("dry_run", "force"), "capture every block entry"),
    "block_detach_all": Command(("dry_run",), "detach every block entry's loop"),
    "block_attach": Command(("device",), "capture one block entry"),
    "block_detach": Command(("device",), "detach one block entry"),
    "block_mirror": Command(("device",), "copy what differs of a block entry to its target"),
    "block_verify": Command(("device",), "compare a block entry with its target"),
    "capture_end": Command(("id",), "end an orphaned capture (its entry was removed)"),
    "target_settings": Command(("name",), "apply a remote target's settings (target set) to "
                               "the running captures that replicate to it"),
    "switchover": Command(("entry",), "planned switch-over: drain, lift capture, promote the "
                          "remote replica"),
    "failback": Command(("entry",), "bring the promoted remote replica back (what differs) and "
                        "capture again"),
    "resolve": Command(("entry", "discard_target"), "end a split brain: the source wins, the "
                       "target's promotion is discarded"),
    "end_handover": Command(("entry",), "a switch-over made for good: lift this side's fence and "
                            "drop its markers (the replica stays primary; the entry is removed next)"),
}

# What the daemon asks a capture worker.
# A worker's hello lists it: status may be asked while a long command runs (answered as a
# {"figures": ...} message, not a reply).
FIGURES_WHILE_BUSY = "figures-while-busy"
WORKER_COMMANDS: dict[str, Command] = {
    "status": Command(("figures",)),
    "mirror": Command(),
    "verify": Command(),
    "drain": Command(("timeout",), "until the target applied every record captured so far"),
    "resync": Command(("reason",), "connect to the target again now and catch up with it"),
    "target_settings": Command(("remote",), "the remote target's new settings (target set): "
                               "rates at once, the rest by a new session"),
    "stop": Command(("abort",), "end capture: drain, mark clean; abort the FUSE connection if "
                    "the mount lives on elsewhere"),
}


def check_request(msg: dict, table: dict[str, Command]) -> tuple[str, dict]:
    """(command, arguments) of a request, or ProtocolError saying what is wrong with it."""
    cmd = msg.get("cmd")
    if cmd not in table:
        raise ProtocolError(f"unknown command {cmd!r}")
    args = msg.get("args") or {}
    if not isinstance(args, dict):
        raise ProtocolError("args must be an object")
    extra = set(args) - set(table[cmd].args)
    if extra:
        raise ProtocolError(f"{cmd}: unknown argument(s) {', '.join(sorted(extra))}")
    return cmd, args


def replicating(connection: str | None, target_data: str | None) -> bool:
    """A capture connected to its replica and replicating into it (no split brain): a
    fail-back or keep-this-host has nothing to do. The daemon's figures and status rows."""
    return connection == "connected" and target_data not in ("split-brain", "promoted")


# What starts an entry's capture (its first, or one after a refused start)
CAPTURE = {"fs": "Mount all", "block": "Attach all"}
# What starts an entry's capture anew, so that it reads its entry again (CaptureRow.not_applied)
CAPTURE_AGAIN = {"fs": "Unmount all, then Mount all", "block": "Detach all, then Attach all"}
# What a capture takes from its remote target's [[target]] when it starts: `target set` (or a
# hand edit) while it runs applies at its next start too (CaptureRow.not_applied)
TARGET_SETTINGS_AT_START = ("port", "user", "identity", "known_hosts", "ssh_config", "bandwidth",
                            "resync_bandwidth", "compression")


@dataclass
class CaptureRow:
    """One entry's capture and replication as the daemon sees it (a file-system entry's key
    is its path, a block entry's its device)."""

    kind: str  # "fs" | "block"
    key: str
    target: str | None = None
    captured: bool = False  # a worker captures it now
    state: str = ""  # "capturing" | "catching up" | "stopping" | "not captured" | "orphaned" | "switched over"
    #                  | "switch-over interrupted" | "fail-back interrupted"
    switched: dict[str, Any] | None = None  # handed over to the remote replica (switch-over)
    worker_pid: int | None = None
    # journal positions
    captured_ops: int = 0
    last_seq: int = 0
    sent_seq: int = 0
    received_seq: int = 0
    applied_seq: int = 0
    bytes_queued: int = 0
    lag_seconds: float | None = None
    behind: bool = False  # pull-ahead: records dropped, a dirty map kept for a resync
    # replication to the target
    connection: str = ""  # local | connected | connecting | disconnected …, retry in N s | connecting again (last: disconnected …) | paused: … | refused: …
    replication: str = ""  # established | catching up x % | verifying | behind | idle
    target_data: str = ""  # consistent | inconsistent | outdated | split-brain | promoted (a
    # fail-over: the replica was promoted and this source changed nothing since)
    catch_up: dict[str, Any] | None = None  # progress of a resync while capturing
    apply_errors: int = 0
    superseded: int = 0  # catch-up records with no place at the target yet: the walk sent those whole
    last_error: str | None = None
    last_errno: int | None = None  # not captured: the errno of its refused start (last_error)
    reconnects: int = 0
    attempts: int = 0  # failed connection attempts
    rtt: float | None = None
    resent_bytes: int = 0
    resync_bytes: int = 0
    wire_bytes: int = 0
    logical_bytes: int = 0
    wire_rate: float = 0.0
    logical_rate: float = 0.0
    # a remote target's compression now: "zstd", "none" (the configuration's), or "zstd off: …"
    # while the link is faster than compressing saves (wire.Codec.adaptive); None: local target
    compression: str | None = None
    open_handles: int = 0
    # its replica promoted and nothing changed here since (a fail-over): True, made read-only
    # here; a str: why it could not be (a file open for writing); None: neither
    read_only_here: bool | str | None = None
    # file-system entries
    mounted: bool = False
    replicate_atime: bool = False
    nested_mounts: list[str] = field(default_factory=list)
    # block entries
    offset: int = 0
    size: int | None = None
    loop: str | None = None
    file: str | None = None
    pending_detach: bool = False
    holders: list[str] = field(default_factory=list)  # who keeps a pending detach or a mount alive
    # the raw device (or a node sharing its bytes) opened for writing outside the loop and
    # closed: {"count": n, "last": time, "nodes": [...], "overflows": n (the watch lost events)}
    raw_writes: dict[str, Any] | None = None
    error: str | None = None  # the daemon could not ask the worker
    # settings the running capture started with that the configuration no longer says (a
    # hand edit, `target set`; applied at its next start): {setting: [running, configured]}; a
    # remote target's rates in bytes a second
    not_applied: dict[str, list] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CaptureRow:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def update(self, figures: dict) -> None:
        """Take a worker's figures (the fields it knows)."""
        known = {f.name for f in fields(self)}
        for k, v in figures.items():
            if k in known and k not in ("kind", "key"):
                setattr(self, k, v)
