"""Support for the engine tests (no tests here): a real daemon subprocess with its own config, socket and state."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.services.control import ControlClient
from app.services.mounts import read_mountinfo

REPO = Path(__file__).resolve().parent.parent
START_SECONDS = 60  # the first mount runs a difference mirror of the source
DRAIN_SECONDS = 120


def resident(path: str | Path) -> list[bool]:
    """Which pages of a file or block device are in the page cache now (mincore(2) over a
    mapping that is never touched, so looking brings nothing in)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
    finally:
        os.close(fd)
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore {path}")
        return [bool(v & 1) for v in vec]
    finally:
        libc.munmap(addr, size)


def mirrorfs_mounts() -> list[str]:
    return [m.mount_point for m in read_mountinfo() if m.fstype == "fuse.mirrorfs"]


@contextlib.contextmanager
def engine_maker(tmp_path: Path):
    """make(entries=None, *, start=True, seed=None, config=None) -> (Engine, src, tgt); the
    default entry replicates tmp_path/src to tmp_path/tgt (`config`: a file already written,
    e.g. by the CLI). Every engine is cleaned up on exit, and no mirrorfs mount under
    tmp_path may remain."""
    made: list[Engine] = []
    src, tgt = tmp_path / "src", tmp_path / "tgt"

    def make(entries=None, *, start: bool = True, seed=None, config: Path | None = None):
        src.mkdir(exist_ok=True)
        if seed:
            seed(src)
        cfg = config or write_config(tmp_path / "etc" / "replication.toml",
                                     entries if entries is not None else [{"path": str(src), "target": str(tgt)}])
        eng = Engine(tmp_path, cfg)
        made.append(eng)
        if start:
            eng.start()
        return eng, str(src), str(tgt)

    try:
        yield make
    finally:  # also when the body raised (used as a context manager, not only as a fixture)
        for eng in made:
            eng.cleanup()
    assert not [m for m in mirrorfs_mounts() if m.startswith(str(tmp_path))]
    # A traceback in the daemon's log is a bug somewhere below a test that passed (a discard
    # answered EIO, an xattr on a nameless file, a shipper that failed and retried): found
    # by reading these logs, now checked after every engine test.
    for eng in made:
        text = eng.logtext() if (eng.tmp / "daemon.log").exists() else ""
        if "Traceback (most recent call last)" in text:
            at = text.index("Traceback (most recent call last)")
            raise AssertionError("the daemon logged a traceback:\n" + text[max(0, at - 600):at + 2400])


def stderr_until(p: subprocess.Popen, words: str, seconds: float = 40) -> str:
    """What `p` (text, stderr piped) said on stderr until it said `words` (or ended, or
    `seconds` passed): a CLI that says what it waits for while it waits."""
    import select
    said, deadline = "", time.monotonic() + seconds
    while words not in said and time.monotonic() < deadline:
        if select.select([p.stderr], [], [], 1)[0]:
            line = p.stderr.readline()
            if not line:  # it ended without saying it
                break
            said += line
    return said


def said_while_stopped(eng, pid: int, argv: list[str], words: str) -> str:
    """The CLI `argv` on `eng`'s daemon while its worker `pid` is stopped (SIGSTOP): it must
    say (stderr) `words`, then that it waits for that worker, how to resume it and when it
    gives up; resumed as the line says, it must end cleanly (exit 0, no worker killed). Its
    stdout. The worker is resumed whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        p = subprocess.Popen([sys.executable, "-m", "app", "--config", str(eng.config), *argv],
                             cwd=REPO, env={**os.environ, "MIRRORSETUP_SOCKET": eng.socket},
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        said = stderr_until(p, f"kill -CONT {pid}")
        assert f"mirrorsetup: {words}" in said, said
        assert f"worker pid {pid} (stopped by a signal: kill -CONT {pid} resumes it); given up " \
               "after 45 s, then it is killed" in said, said
        os.kill(pid, signal.SIGCONT)  # the worker answers, drains and ends
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, said + out + err
        assert "did not end; killing it" not in eng.logtext()
        return out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def block_mounts() -> list[str]:
    return [m.mount_point for m in read_mountinfo() if m.fstype == "fuse.mirrorblk"]


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, entries: list[dict], block: list[dict] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["schema = 1"]
    for table, rows in (("filesystem", entries), ("block", block)):
        for e in rows:
            lines.append(f"[[{table}]]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in e.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Engine:
    """One daemon under test. `stop()` is idempotent; the finalizer also lazily unmounts."""

    def __init__(self, tmp: Path, config: Path):
        self.tmp = tmp
        self.config = config
        self.socket = str(tmp / "run" / "control.sock")
        self.state = str(tmp / "state")
        self.proc: subprocess.Popen | None = None
        self.client = ControlClient(self.socket, timeout=300)
        self.paths: set[str] = set()

    def start(self, *, wait: bool = True) -> None:
        self.log = open(self.tmp / "daemon.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "daemon", "--config", str(self.config),
             "--socket", self.socket, "--state-dir", self.state],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        if wait:
            deadline = time.monotonic() + START_SECONDS
            while not self.client.is_running():
                assert self.proc.poll() is None, self.logtext()
                assert time.monotonic() < deadline, "daemon did not come up:\n" + self.logtext()
                time.sleep(0.1)

    def logtext(self) -> str:
        return (self.tmp / "daemon.log").read_text(errors="replace")

    def _row(self, table: str, value: str) -> dict:
        for e in self.client.request("status")[table]:
            if e["key"] == value:
                return e
        raise AssertionError(f"{value} not in status")

    def status(self, path: str) -> dict:
        return self._row("filesystem", path)

    def block(self, device: str) -> dict:
        return self._row("block", device)

    def drain(self, path: str, *, table: str = "filesystem") -> dict:
        """Wait until the target holds everything captured so far and any catching-up is
        over (status is the witness), a remote replica's word that it is consistent again
        included: a catch-up's end is sent to the agent after its status row is cleared, and
        a drain that came in between saw "inconsistent" (seen once, a block fail-back)."""
        deadline = time.monotonic() + DRAIN_SECONDS
        while True:
            st = self._row(table, path)
            if st["captured"] and st["applied_seq"] == st["last_seq"] and st["catch_up"] is None \
                    and not st["behind"] and st["target_data"] != "inconsistent":
                return st
            assert time.monotonic() < deadline, f"journal did not drain: {st}"
            time.sleep(0.05)

    def block_drain(self, device: str) -> dict:
        return self.drain(device, table="block")

    def verify(self, path: str) -> list[dict]:
        return self.client.request("verify", path=path)["differences"]

    def workers(self) -> list[int]:
        """Capture worker processes of this engine (still running after a daemon died)."""
        import psutil
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = p.info["cmdline"] or []
            if "app.engine.capture" in cmd and any(str(self.tmp) in a for a in cmd):
                found.append(p.info["pid"])
        return found

    def kill_orphan_workers(self) -> None:
        for pid in self.workers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int | None:
        """SIGTERM and wait; the daemon's exit status (None when it was not running)."""
        status = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                status = self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        return status

    def cleanup(self) -> None:
        self.stop()
        self.kill_orphan_workers()
        from app.services import loop as loopdev
        run_dir = os.path.dirname(self.socket) + "/"
        for lp in loopdev.list_attached():  # loops left on our capture files (a killed daemon's)
            if lp.backing_file and lp.backing_file.startswith(run_dir):
                subprocess.run(["umount", "-l", lp.device], capture_output=True)
                subprocess.run(["losetup", "-d", lp.device], capture_output=True)
        # the daemon's captures (mirrorfs, block files), the fs entries' doors and a switch-over's
        # read-only fence (a directory bound onto itself), deepest first; nothing else of the
        # test's (a target disk, a tmpfs it made) is ours to unmount
        inside = str(self.tmp) + "/"

        def ours(m) -> bool:
            return m.mount_point.startswith(run_dir) or (
                m.mount_point.startswith(inside)
                and (m.fstype in ("fuse.mirrorfs", "fuse.mirrorblk")
                     or (m.root != "/" and m.mount_point.endswith(m.root))))
        for mp in sorted({m.mount_point for m in read_mountinfo() if ours(m)}, key=len, reverse=True):
            for _ in range(8):  # stacked ones too (a fence made twice), while the top one is ours
                top = [m for m in read_mountinfo() if m.mount_point == mp]
                if not top or not ours(top[-1]):
                    break
                subprocess.run(["umount", "-l", mp], capture_output=True)
