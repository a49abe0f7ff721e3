"""Client of the daemon's control socket: one JSON object per line each way.

Request `{"cmd": "...", "args": {...}}`; reply `{"ok": true, ...}` or
`{"ok": false, "error": message, "errno": n}`. Long commands (mirror) send progress lines
`{"progress": {...}}` before the final reply. The socket must be root's and 0600 (its directory
0700): anyone who can talk to it can unmount capture, so we refuse to talk to any other.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from collections.abc import Callable

from app.services import protocol
from app.services.results import DaemonNotAnswering, MirrorError, Refusal, Result
from app.services.socketpath import ANSWER_SECONDS, default_socket


SOCKET_MODE = 0o600
DIR_MODE = 0o700


class DaemonNotRunning(Refusal):
    """A daemon that is needed but not running: nothing was asked of it, so nothing changed
    (the CLI exits 2, the TUI says "refused")."""


class DaemonEnded(MirrorError):
    """The daemon's connection ended before its reply: it died (or was killed) while it
    worked on the request. What it had done by then is for its state directory to tell."""


class ControlClient:
    """`timeout`: seconds to wait for the daemon at each step (connect, send, each reply line);
    None waits as long as it takes. Past it, DaemonNotAnswering."""

    def __init__(self, socket_path: str | None = None, *, timeout: float | None = None):
        self.socket_path = socket_path or default_socket()
        self.timeout = timeout

    def _not_running(self, reason: str) -> DaemonNotRunning:
        return DaemonNotRunning(
            f"the mirrorsetup daemon is not running ({reason} at {self.socket_path}): start it with "
            "`mirrorsetup daemon start` (or `systemctl start mirrorsetup`)", errno=errno.ENOENT,
            obj=self.socket_path)

    def _check_socket(self) -> None:
        try:
            st = os.stat(self.socket_path)
        except FileNotFoundError:
            raise self._not_running("no socket") from None
        except OSError as exc:
            raise MirrorError.from_oserror("check control socket", self.socket_path, exc) from exc
        if not stat.S_ISSOCK(st.st_mode):
            raise MirrorError(f"{self.socket_path} is not a socket", errno=errno.ENOTSOCK,
                              obj=self.socket_path)
        if st.st_uid != 0 or st.st_mode & 0o077:
            raise MirrorError(f"control socket {self.socket_path} is not root-only (owner uid "
                              f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it",
                              errno=errno.EPERM, obj=self.socket_path)

    def _connect(self, timeout: float | None) -> socket.socket:
        self._check_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(self.socket_path)
        except TimeoutError:  # its backlog is full: nobody accepts
            sock.close()
            raise self._not_answering(None, "no connection accepted", timeout) from None
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            raise self._not_running("nobody listening on the socket") from None
        except OSError as exc:
            sock.close()
            raise MirrorError.from_oserror("connect to the daemon", self.socket_path, exc) from exc
        return sock

    def _answers_at_all(self, cmd: str) -> None:
        """Before a command that may take long (a mount-all, a mirror: waited for as long as
        it takes): a ping answered within ANSWER_SECONDS, else nothing is asked of a daemon
        that is stopped by a signal, stuck or still starting (the command waited forever)."""
        try:
            self.request("ping", answer_within=ANSWER_SECONDS)
        except DaemonNotAnswering as exc:
            raise not_asked(exc, f"{cmd.replace('_', ' ')} was not asked of it") from None

    def _not_answering(self, pid: int | None, what: str, timeout: float) -> DaemonNotAnswering:
        who = f"the daemon (pid {pid})" if pid else "the daemon"
        return DaemonNotAnswering(f"{who} on {self.socket_path} does not answer ({what} in "
                                  f"{timeout:g} s)", pid=pid, obj=self.socket_path)

    def is_running(self, answer_within: float | None = None) -> bool:
        """Does the daemon answer a ping (within `answer_within` s, else the client's timeout)?"""
        try:
            return bool(self.request("ping", answer_within=answer_within).get("ok"))
        except MirrorError:
            return False

    def request(self, cmd: str, *, progress: Callable[[dict], None] | None = None,
                answer_within: float | None = None, **args) -> dict:
        """Send one command; progress lines go to `progress`, the final reply is returned.
        A refusal (`ok: false`) raises MirrorError with the daemon's message and errno (a
        Refusal when the daemon says nothing was changed: the CLI exits 2 for it).
        `answer_within`: this request's bound in place of the client's `timeout`."""
        if cmd not in protocol.COMMANDS:
            raise MirrorError(f"unknown daemon command {cmd!r}", errno=errno.EINVAL)
        timeout = self.timeout if answer_within is None else answer_within
        if timeout is None and cmd not in ("ping", "watch"):
            self._answers_at_all(cmd)
        sock = self._connect(timeout)
        try:
            sock.sendall(protocol.request(cmd, **args))
            reader = protocol.LineReader(sock)
            while (msg := reader.next()) is not None:
                if protocol.is_progress(msg):
                    if progress:
                        progress(msg["progress"])
                    continue
                if not msg.get("ok"):
                    kind = Refusal if msg.get("refused") is True else MirrorError
                    raise kind(msg.get("error", "the daemon refused"), errno=msg.get("errno"))
                return msg
            raise DaemonEnded("the daemon closed the connection without a reply",
                              errno=errno.ECONNRESET, obj=self.socket_path)
        except protocol.ProtocolError as exc:
            raise MirrorError(f"the daemon's reply to {cmd}: {exc}", errno=errno.EPROTO,
                              obj=self.socket_path) from exc
        except TimeoutError:
            raise self._not_answering(peer_pid(sock), f"no reply to {cmd}", timeout) from None
        except ConnectionResetError as exc:  # it ended with our request unread
            raise DaemonEnded("the daemon reset the connection without a reply",
                              errno=errno.ECONNRESET, obj=self.socket_path) from exc
        except OSError as exc:
            raise MirrorError.from_oserror(f"talk to the daemon ({cmd})", self.socket_path, exc) from exc
        finally:
            sock.close()

    def open_watch(self) -> socket.socket:
        """A connection the daemon holds open while it runs: it becomes readable (a reply or end
        of file) when the daemon stops or dies. Raises DaemonNotRunning when there is none."""
        sock = self._connect(self.timeout)
        try:
            sock.sendall(protocol.request("watch"))
        except OSError as exc:
            sock.close()
            raise MirrorError.from_oserror("watch the daemon", self.socket_path, exc) from exc
        return sock

    def results(self, cmd: str, **args) -> list[Result]:
        return [Result.from_json(r) for r in self.request(cmd, **args).get("results", [])]


def not_asked(exc: DaemonNotAnswering, done: str) -> DaemonNotAnswering:
    """A daemon that did not answer, said with why (the kernel's word), what `done` of it (e.g.
    "nothing was asked of it"), and what the administrator can do about it."""
    return DaemonNotAnswering(f"{exc.said}: {done} (a daemon still "
                              "starting answers once its log says it is ready; `mirrorsetup daemon "
                              "status` says more)", pid=exc.pid, obj=exc.obj)


def peer_pid(sock) -> int | None:
    """The pid of the process at the other end of a control connection (SO_PEERCRED): on the
    client's side, the one that listens (its credentials as at listen(), kept by the kernel)."""
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        return None
    return pid or None
