"""Capture workers forked from one template process instead of each starting Python anew.

A worker is a whole Python interpreter with trio, the FUSE wire code, the journal and the
target code imported: about 20 MiB of private memory when each starts on its own, so a hundred
entries cost two gigabytes. The daemon starts this template once: it imports what a worker
imports, freezes those objects for the garbage collector (a collection would otherwise write to
every page of them) and then forks a worker per request. The workers share those pages with
the template and each other until they write to them; each entry still has its own process,
so one entry's failure stays its own, and a worker outlives the daemon and the template as
before (its own session; the template is not its parent's parent: it is reparented).

Protocol, on a SOCK_SEQPACKET socket from the daemon: a request is a JSON object with the
worker's spec (`{"spec": SPEC}`, as `--spec` takes it) and one file descriptor (SCM_RIGHTS), the
worker's end of its socket to the daemon; the answer is `{"pid": P}` or `{"error": MESSAGE, "errno": E}`. The
template ends when the daemon's end closes, and reaps its children until then.
"""

from __future__ import annotations

import array
import ctypes
import gc
import json
import os
import signal
import socket
import sys

# What a worker imports while it starts (capture.py imports most of them lazily).
PRELOAD = ("app.engine.capture", "app.engine.journal", "app.engine.target", "app.engine.shipper",
           "app.engine.remote", "app.engine.mirrorfs", "app.engine.fusewire", "app.engine.applier",
           "app.engine.inodes", "app.engine.sync", "app.engine.blocksync", "app.engine.blockfs",
           "trio", "zstandard", "uuid", "hashlib", "cProfile")
MAX_REQUEST = 1 << 20
ENV = "MIRRORSETUP_ZYGOTE"  # "0": every worker starts Python anew (bench comparisons)


def worker_env() -> dict:
    """A worker's (and the template's) environment: the daemon's, this checkout importable."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def spawn() -> tuple:
    """Start a template: (its Popen, the daemon's end of its socket). Raises OSError."""
    import subprocess
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "app.engine.zygote", "--fd", str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),), start_new_session=True, env=worker_env())
    except OSError:
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, ours


_early: tuple | None = None  # spawn()'s answer for a template started before trio ran


def start_early() -> None:
    """Start the worker template as the daemon's process begins, before the daemon's own
    imports: the template's (~0.2 s) then run beside them, not after them. The daemon takes
    it for its first worker (take_early); one never taken ends when the daemon's process
    does (its socket closes)."""
    global _early
    if _early is not None or os.geteuid() != 0 or os.environ.get(ENV, "1") == "0":
        return
    try:
        _early = spawn()
    except OSError:
        pass  # started at the first worker then, as spawn() says why


def take_early() -> tuple | None:
    """The template start_early() started, once (None when there is none)."""
    global _early
    early, _early = _early, None
    return early


class _MMMap(ctypes.Structure):  # struct prctl_mm_map (linux/prctl.h)
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
        "arg_start", "arg_end", "env_start", "env_end", "auxv")] + [
        ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]


_title = None  # the buffer /proc/PID/cmdline points at: kept for the process's life


def set_cmdline(argv: list[str]) -> bool:
    """Make /proc/self/cmdline (what ps and pgrep show) read `argv`: a forked worker then
    looks like the `python -m app.engine.capture --spec ...` it stands for. PR_SET_MM_MAP with
    every other field as it is (no capability needed for that). False when the kernel refuses."""
    global _title
    raw = b"\0".join(os.fsencode(a) for a in argv) + b"\0"
    buf = ctypes.create_string_buffer(raw, len(raw))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sbrk.restype = ctypes.c_void_p
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()

        def field(n: int) -> int:  # proc(5) numbers fields from 1; the split starts at field 3
            return int(fields[n - 3])
        addr = ctypes.addressof(buf)
        mm = _MMMap(start_code=field(26), end_code=field(27), start_data=field(45),
                    end_data=field(46), start_brk=field(47), brk=libc.sbrk(0) or 0,
                    start_stack=field(28), arg_start=addr, arg_end=addr + len(raw),
                    env_start=field(50), env_end=field(51), auxv=0, auxv_size=0,
                    exe_fd=0xFFFFFFFF)
        if libc.prctl(35, 14, ctypes.byref(mm), ctypes.sizeof(mm), 0) != 0:  # PR_SET_MM, _MAP
            return False
    except (OSError, ValueError, IndexError, AttributeError):
        return False
    _title = buf
    return True


def _reap(*_args) -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _child(sock: socket.socket, argv: list[str]) -> None:
    """In the forked worker: become what `python -m app.engine.capture ARGV` would have been."""
    code = 1
    try:
        sock.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.setsid()
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        full = [sys.executable, "-m", "app.engine.capture", *argv]
        set_cmdline(full)
        sys.argv = ["-m", *argv]
        gc.enable()
        from app.engine import capture
        code = capture.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the worker must never return into the template's loop
        import traceback
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code or 0)


def serve(sock: socket.socket) -> int:
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon's terminal is not ours to answer
    while True:
        try:
            data, anc, _flags, _addr = sock.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(4 * 4))
        except InterruptedError:
            continue
        if not data:
            return 0
        fds = array.array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        try:
            spec = json.loads(data)["spec"]
            if not isinstance(spec, str):
                raise TypeError("the spec is a string")
            if len(fds) != 1:
                raise ValueError(f"a request carries one descriptor, not {len(fds)}")
        except (ValueError, KeyError, TypeError) as exc:
            for fd in fds:
                os.close(fd)
            sock.send(json.dumps({"error": f"bad request: {exc}", "errno": 22}).encode())
            continue
        # SIGCHLD held until the pidfd is open: a worker that ends at once is not reaped (and
        # its pid reused) before the daemon holds it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            try:
                pid = os.fork()
            except OSError as exc:
                sock.send(json.dumps({"error": f"fork: {exc.strerror}", "errno": exc.errno}).encode())
                continue
            if pid == 0:
                _child(sock, ["--spec", spec, "--fd", str(fds[0])])
            pidfd = os.pidfd_open(pid)
            try:
                sock.sendmsg([json.dumps({"pid": pid}).encode()],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))])
            finally:
                os.close(pidfd)
        finally:
            os.close(fds[0])
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="mirrorsetup-zygote")
    p.add_argument("--fd", type=int, required=True)
    args = p.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    os.umask(0)  # as a worker's: mirrorfs creates with the callers' own modes
    import importlib
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # a worker that needs it reports it itself
            pass
    gc.collect()
    gc.freeze()  # what exists now stays shared: collections skip it
    gc.disable()  # nothing to collect here; a worker enables it again
    try:
        return serve(sock)
    except (ConnectionError, OSError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
