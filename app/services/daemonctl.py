"""The daemon's life as a service: where it works (config, socket, state directory, log),
whether it runs, and start / stop / restart — the same calls for the TUI and the CLI.

With systemd as PID 1 and the unit's own paths, systemctl does it (the unit restarts a daemon
that dies). Otherwise `mirrorsetup daemon` is started in its own session with its output
appended to a log beside the control socket, and stopped with the socket's `shutdown`.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.services.config import DEFAULT_PATH, ConfigStore, default_path
from app.services.control import ANSWER_SECONDS, ControlClient, DaemonNotAnswering
from app.services.host import process_state
from app.services.socketpath import DEFAULT_SOCKET, default_socket
from app.services.layout import DEFAULT_STATE_DIR, STATE_ENV as STATE_DIR_ENV, default_state_dir
from app.services.results import ConfigError, MirrorError, Outcome, Result

SYSTEMD_RUNNING = "/run/systemd/system"  # exists only when systemd is PID 1 (sd_booted)
SYSTEMD_UNIT = "mirrorsetup"
UNIT_CGROUP = "/mirrorsetup.service"
LOG_NAME = "daemon.log"  # beside the control socket, when we start the daemon ourselves
RUN_DIR_MODE = 0o700  # as the daemon makes /run/mirrorsetup: root's only
WAIT_STEPS = 100  # × WAIT_STEP: up to 10 s for the daemon to bind its socket or let go of it
WAIT_STEP = 0.1
# ping and shutdown are waited for ANSWER_SECONDS (control.py): without a bound a SIGSTOPped
# daemon made `daemon stop` wait forever.


@dataclass(frozen=True)
class DaemonSettings:
    """Where a daemon for this configuration works; None means the environment or default."""

    config: str
    socket: str
    state_dir: str

    @classmethod
    def resolve(cls, config=None, socket=None, state_dir=None) -> DaemonSettings:
        return cls(os.path.realpath(os.fspath(config or default_path())),
                   os.fspath(socket or default_socket()),
                   os.fspath(state_dir or default_state_dir()))

    @property
    def log_path(self) -> str:
        return os.path.join(os.path.dirname(self.socket), LOG_NAME)

    @property
    def is_the_units(self) -> bool:
        """The packaged unit runs `mirrorsetup daemon` with every default."""
        return (self.config == os.path.realpath(DEFAULT_PATH) and self.socket == DEFAULT_SOCKET
                and self.state_dir == DEFAULT_STATE_DIR)


@dataclass(frozen=True)
class DaemonInfo:
    """What the Daemon screen and `daemon status` show."""

    running: bool
    socket: str
    pid: int | None = None
    started_at: float | None = None  # epoch seconds
    config: str | None = None  # the file the running daemon works from
    state_dir: str | None = None
    log: str | None = None
    problem: str | None = None  # why we cannot tell, or a daemon for another config
    answers: bool = True  # False: a process holds the socket but does not answer (problem says)

    def to_json(self) -> dict:
        return {"running": self.running, "pid": self.pid, "started_at": self.started_at,
                "config": self.config, "socket": self.socket, "state_dir": self.state_dir,
                "log": self.log, "problem": self.problem, "answers": self.answers}


def describe(settings: DaemonSettings, control: ControlClient | None = None) -> DaemonInfo:
    """Ask the daemon on the settings' socket who it is; its process says the rest."""
    control = control or ControlClient(settings.socket, timeout=ANSWER_SECONDS)
    try:
        ping = control.request("ping")
    except DaemonNotAnswering as exc:
        pid, log = exc.pid, _log_of(exc.pid)
        return DaemonInfo(True, settings.socket, pid, _started_at(pid), None, _state_dir_of(pid),
                          log, _not_answering_text(exc, log), answers=False)
    except MirrorError as exc:
        problem = None if exc.errno == errno.ENOENT else exc.message
        return DaemonInfo(False, settings.socket, state_dir=settings.state_dir,
                          log=settings.log_path, problem=problem)
    pid = ping.get("pid")
    config = ping.get("config")
    problem = None
    if config and config != settings.config:
        problem = (f"this daemon works from {config}, not {settings.config}: start one for this "
                   "configuration on another socket (--socket)")
    return DaemonInfo(True, settings.socket, pid, _started_at(pid), config,
                      _state_dir_of(pid), _log_of(pid), problem)


_KILL_TEXT = ("`kill -KILL {pid}` ends it at once (its captures go on and the next daemon takes "
              "them over)")


def _not_answering_text(exc: DaemonNotAnswering, log: str | None) -> str:
    """Who does not answer, that nothing was asked of it, and what the administrator can do;
    nothing is killed for them (its captures would be left to a daemon that may yet answer)."""
    pid = exc.pid
    if pid is None:
        return (f"{exc.message}: nothing was asked of it; `ss -xlp` names the process "
                "listening there")
    state = process_state(pid)
    if state:  # e.g. stopped by a signal: what resumes it
        return f"{exc.message}{state}: nothing was asked of it"
    return (f"{exc.message}: nothing was asked of it. A daemon that is still starting answers "
            f"once its log ({log or 'its stderr'}) says it is ready; one that stays stuck: "
            f"`kill {pid}` asks it to stop as `daemon stop` does, {_KILL_TEXT.format(pid=pid)}")


def _asked_but_silent(info: DaemonInfo) -> str:
    """A daemon asked to stop that answers no more (its shutdown sent, or stopping already):
    which, and what the administrator can do; it is not killed for them either."""
    said = (f"asked the daemon (pid {info.pid}) to stop, but it does not answer on {info.socket} "
            f"(nothing in {ANSWER_SECONDS} s)")
    state = process_state(info.pid) if info.pid else ""
    if state:  # (resumed, it reads what was asked and stops)
        return f"{said}{state}: resumed, it goes on and stops"
    return (f"{said}: its log ({info.log or 'its stderr'}) says what it does; if it stays stuck, "
            + _KILL_TEXT.format(pid=info.pid))


def _started_at(pid: int | None) -> float | None:
    import psutil
    try:
        return psutil.Process(pid).create_time() if pid else None
    except psutil.Error:
        return None


def _state_dir_of(pid: int | None) -> str | None:
    """From the daemon's own command line (or environment, or the default it then used)."""
    import psutil
    try:
        proc = psutil.Process(pid)
        argv = proc.cmdline()
        for i, arg in enumerate(argv):
            if arg == "--state-dir" and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith("--state-dir="):
                return arg.split("=", 1)[1]
        return proc.environ().get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    except (psutil.Error, TypeError):
        return None


def _log_of(pid: int | None) -> str | None:
    """Where the daemon's messages go: the file on its stderr, or systemd's journal."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            if any(line.rstrip().endswith(UNIT_CGROUP) for line in f):
                return f"the journal (journalctl -u {SYSTEMD_UNIT})"
        target = os.readlink(f"/proc/{pid}/fd/2")
    except OSError:
        return None
    return target if target.startswith("/") else f"{target} (not a file)"


def uptime_text(seconds: float) -> str:
    """"3 d 4 h", "2 h 5 min", "4 min 10 s", "12 s"."""
    s = int(max(seconds, 0))
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    if d:
        return f"{d} d {h} h"
    if h:
        return f"{h} h {m} min"
    if m:
        return f"{m} min {s % 60} s"
    return f"{s} s"


def info_lines(info: DaemonInfo, now: float) -> list[tuple[str, str]]:
    """What the Daemon screen and `daemon status` say, as (label, value) lines."""
    if info.running:
        up = f", up {uptime_text(now - info.started_at)}" if info.started_at else ""
        state = "running" if info.answers else "not answering"
        return [("state", f"{state} (pid {info.pid}{up})"), ("config", info.config or "?"),
                ("socket", info.socket), ("state directory", info.state_dir or "?"),
                ("log", info.log or "?")]
    return [("state", "not running"), ("socket", f"{info.socket} (nothing listening)"),
            ("state directory", f"{info.state_dir} (when started from here)"),
            ("log", f"{info.log} (when started from here; under systemd: journalctl -u "
                    f"{SYSTEMD_UNIT})")]


# -- start / stop / restart --------------------------------------------------------------

def _use_systemd(settings: DaemonSettings) -> bool:
    return (os.path.isdir(SYSTEMD_RUNNING) and shutil.which("systemctl") is not None
            and settings.is_the_units)


def start(settings: DaemonSettings) -> Result:
    return _control("start", settings)


def stop(settings: DaemonSettings, say: Callable[[str], None] | None = None) -> Result:
    """`say`: told each thing the daemon's stop waits for, once, as it begins (a capture
    that ships its queue to its target, one that does not answer)."""
    return _control("stop", settings, say)


def restart(settings: DaemonSettings) -> Result:
    """Reads and checks the configuration first (as `nginx -t` before a reload): a file the
    new daemon would refuse raises ConfigError, and the running daemon is left as it is."""
    return _control("restart", settings)


def _control(action: str, settings: DaemonSettings, say: Callable[[str], None] | None = None
             ) -> Result:
    def result(outcome: Outcome, message: str, err: int | None = None) -> Result:
        return Result(action, "daemon", outcome, message, err)

    info = describe(settings)
    if info.running and info.config and info.config != settings.config:
        return result(Outcome.FAILED, f"the daemon on {settings.socket} works from {info.config}, "
                      f"not {settings.config}: {action} it with --config {info.config}",
                      errno.EINVAL)
    if not info.running and info.problem:  # e.g. a socket that is not root-only
        return result(Outcome.FAILED, info.problem, errno.EPERM)
    if not info.answers:
        return Result(action, "daemon", Outcome.FAILED, info.problem, errno.ETIMEDOUT,
                      {"refused": True})
    if action == "start" and info.running:
        return result(Outcome.UNCHANGED, f"the daemon is already running (pid {info.pid})")
    if action == "stop" and not info.running:
        return result(Outcome.UNCHANGED, "the daemon is not running")
    if action in ("restart", "start"):  # a daemon that would exit on it is not started
        _check_config(settings, info, action)
    control = ControlClient(settings.socket, timeout=ANSWER_SECONDS)
    systemd = _use_systemd(settings)
    # A restart leaves every capture running: the daemon is asked to leave them to the next
    # one, which takes them over, so applications never see it (a stop ends the captures
    # nothing uses). Under systemd too: `systemctl restart` alone would send SIGTERM, which
    # ends them as a stop does; asked first, the daemon has exited by the time systemd starts
    # the next one (KillMode=process: systemd signals only the daemon, never the captures).
    if info.running and (action == "restart" or not systemd):
        try:
            control.request("shutdown", keep_captures=action == "restart")
        except DaemonNotAnswering:  # (sent: it reads it once it goes on)
            return result(Outcome.FAILED, _asked_but_silent(info), errno.ETIMEDOUT)
        except MirrorError as exc:
            return result(Outcome.FAILED, f"could not stop the daemon: {exc}", exc.errno)
        stopped, waits, silent = _wait_stopped(control, info.pid, say)
        if silent:
            return result(Outcome.FAILED, _asked_but_silent(info), errno.ETIMEDOUT)
        if not stopped:
            return result(Outcome.FAILED, f"asked the daemon (pid {info.pid}) to stop, but it "
                          "is still running" + (f": {'; '.join(waits)}" if waits else ""),
                          errno.ETIMEDOUT)
        if action == "stop":
            left = captures_left(settings.state_dir)
            return result(Outcome.OK, f"stopped the daemon (pid {info.pid})" + (
                "; still in use, these captures go on without it and the next daemon takes "
                f"them over: {', '.join(left)}" if left else ""))
    if systemd:
        proc = _systemctl(action, control if action == "stop" else None, say)
        if proc.returncode == 0:
            return result(Outcome.OK, f"systemctl {action} {SYSTEMD_UNIT}: done"
                          + (" (every capture kept)" if action == "restart" and info.running
                             else ""))
        return result(Outcome.FAILED, f"systemctl {action} {SYSTEMD_UNIT} failed: "
                      f"{proc.stderr.strip() or proc.returncode}")
    # (a new daemon answers only once it has mounted its entries: its wait is its own)
    return _spawn(action, settings, ControlClient(settings.socket))


def _systemctl(action: str, stopping: ControlClient | None,
               say: Callable[[str], None] | None) -> subprocess.CompletedProcess:
    """`systemctl ACTION mirrorsetup`. A stop (`stopping`: the daemon's socket) may take a
    minute while the captures drain, and systemctl says nothing meanwhile: the daemon's `ping`
    is asked in the meantime and each thing it waits for told to `say` once, as without
    systemd (_wait_stopped)."""
    argv = ["systemctl", action, SYSTEMD_UNIT]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    said: set[str] = set()
    while True:
        try:  # (read while it runs: a pipe left unread could make it wait on us)
            out, err = proc.communicate(timeout=WAIT_STEP)
            return subprocess.CompletedProcess(argv, proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            if stopping is not None:
                _stop_waits(stopping, said, say)


def captures_left(state_dir: str) -> list[str]:
    """The capture workers of this installation (their journals in `state_dir`) still running:
    a stop leaves those whose loop is in use (a file system mounted on it), so that its I/O
    does not fail. 'KEY (pid N)', as their command lines say."""
    from app.services.status import worker_specs
    base = os.path.realpath(state_dir).rstrip("/") + "/"
    return [f"{spec.get('key')} (pid {pid})" for pid, spec in worker_specs()
            if str(spec.get("state", "")).startswith(base)]


def _check_config(settings: DaemonSettings, info: DaemonInfo, action: str) -> None:
    """The new daemon reads the file as its first step and exits (status 2) on what this
    refuses; found only then, the old one would already have stopped, leaving none."""
    try:
        ConfigStore(settings.config).load()
    except MirrorError as exc:
        left = (f"the running daemon (pid {info.pid}) was left as it is" if info.running
                else "no daemon was started")
        raise ConfigError(f"{exc.message}; {left}: correct the file, then {action} it",
                          line=getattr(exc, "line", None), key=getattr(exc, "key", None),
                          obj=exc.obj or settings.config,
                          errno=exc.errno or errno.EINVAL) from exc


def _alive(pid: int | None) -> bool:
    """Whether process `pid` still exists (a zombie counts as gone: it has exited)."""
    import psutil
    try:
        return bool(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _spawn(action: str, settings: DaemonSettings, control: ControlClient) -> Result:
    argv = [sys.executable, "-m", "app", "daemon", "--config", settings.config,
            "--socket", settings.socket, "--state-dir", settings.state_dir]
    log_path = settings.log_path
    try:
        os.makedirs(os.path.dirname(log_path), mode=RUN_DIR_MODE, exist_ok=True)
        with open(log_path, "ab") as log:
            os.fchmod(log.fileno(), 0o600)
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
    except OSError as exc:
        err = MirrorError.from_oserror("start the daemon, log", log_path, exc)
        return Result(action, "daemon", Outcome.FAILED, err.message, exc.errno)
    answers = _wait_for(lambda: control.is_running() or proc.poll() is not None)
    if proc.poll() is None:
        # reaped when it exits (a stop, a crash): the console that started it runs on, and
        # kept a zombie of it until its own end (from here on poll() says None: not asked)
        threading.Thread(target=proc.wait, name="reap the daemon", daemon=True).start()
        if answers:
            return Result(action, "daemon", Outcome.OK,
                          f"{'re' if action == 'restart' else ''}started the daemon (pid "
                          f"{proc.pid}, log {log_path}); systemd is not running it, so nothing "
                          "restarts it if it dies")
        return Result(action, "daemon", Outcome.PENDING,
                      f"started the daemon (pid {proc.pid}), but it does not answer on "
                      f"{settings.socket} yet (log {log_path})")
    return Result(action, "daemon", Outcome.FAILED,
                  f"the daemon exited with status {proc.returncode}: "
                  f"{_last_line(log_path) or 'no output'} (log {log_path})")


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _wait_stopped(control: ControlClient, pid: int | None,
                  say: Callable[[str], None] | None) -> tuple[bool, list[str], bool]:
    """(gone, what it still waits for, silent: it no longer answered) of a daemon asked to
    stop. It answers `ping` while it stops, with what it waits for and until when (a capture
    shipping its queue to its target: up to 45 s, a worker that does not answer: 45 s, then it
    is killed): waited for as long as it says, each said once through `say`; otherwise
    WAIT_STEPS × WAIT_STEP, as a start. (It was 10 s whatever the daemon waited for: 'still
    running', with no reason.)"""
    said: set[str] = set()
    waits: list[str] = []
    deadline = time.monotonic() + WAIT_STEPS * WAIT_STEP
    while True:
        waiting = _stop_waits(control, said, say)
        silent = waiting is None
        if silent:  # its socket is gone (or no longer answers): its process says
            if not _alive(pid):
                return True, [], False
            waiting = []
        waits = [w["what"] for w in waiting]
        for w in waiting:
            deadline = max(deadline, time.monotonic() + w["seconds_left"] + WAIT_STEPS * WAIT_STEP)
        if time.monotonic() >= deadline:
            return False, waits, silent
        time.sleep(WAIT_STEP)


def _stop_waits(control: ControlClient, said: set[str], say: Callable[[str], None] | None
                ) -> list[dict] | None:
    """What a stopping daemon waits for now, as its `ping` says it; each not in `said` yet is
    told to `say` and added there. None when its socket is gone or does not answer."""
    try:
        waiting = control.request("ping").get("stopping", [])
    except MirrorError:
        return None
    for w in waiting:
        if w["what"] not in said and say is not None:
            say(w["what"])
        said.add(w["what"])
    return waiting


def _wait_for(condition: Callable[[], bool]) -> bool:
    """The daemon binds its socket (or lets go of it) a moment after start/shutdown and says
    nothing else: poll, bounded at WAIT_STEPS × WAIT_STEP seconds."""
    for _ in range(WAIT_STEPS):
        if condition():
            return True
        time.sleep(WAIT_STEP)
    return condition()
