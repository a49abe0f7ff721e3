"""One entry's capture process: mirrorfs mount, journal and applier for a single directory.

pyfuse3 keeps its FUSE session in module globals (`pyfuse3.init` can be called once per
process), so the daemon runs one worker process per mounted entry and talks to it over a
socketpair (JSON lines). The worker dies with the daemon: end of file on the socketpair means
the daemon is gone, and the worker exits at once, as if it had crashed with it. (Not
PR_SET_PDEATHSIG: it fires when the *thread* that forked exits, and trio forks from a
short-lived worker thread.) A killed daemon so leaves stale mounts (ENOTCONN) that the next
daemon cleans and an unclean journal that it repairs by a difference mirror, never an orphan
capturing where nobody watches.

Order at start: the O_PATH fd of the directory first, then (after an unclean stop) a difference
mirror to the target, then the mount; nothing here touches the mount point after the mount.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import socket
import sys

PROFILE_ENV = "MIRRORSETUP_WORKER_PROFILE"
CLEAN_MARKER = "clean"  # written at a clean stop, removed at start: absent means unclean
FUSE_OPTIONS = ("fsname=mirrorfs", "subtype=mirrorfs", "allow_other", "default_permissions")

log = logging.getLogger("mirrorsetup.worker")


class Channel:
    """Blocking JSON-lines writer to the daemon (used before trio runs and from threads)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, **msg) -> None:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")


def _open_dir(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SystemExit(json.dumps({"event": "error", "message": f"open {what} {path}: "
                                     f"{exc.strerror} ({errno.errorcode.get(exc.errno, '?')})",
                                     "errno": exc.errno}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mirrorsetup-worker")
    p.add_argument("--path", required=True)
    p.add_argument("--target")
    p.add_argument("--state", required=True)
    p.add_argument("--atime", action="store_true")
    p.add_argument("--fd", type=int, required=True)
    args = p.parse_args(argv)
    return guarded(args.fd, lambda chan: _run(args, chan))


def guarded(fd: int, run) -> int:
    """Run a worker body; report any failure to the daemon as an "error" event, exit 1."""
    logging.basicConfig(level=logging.INFO, format=f"worker[{os.getpid()}] %(levelname)s %(message)s")
    os.umask(0)  # modes come from the caller's request, masked by the caller's umask
    chan = Channel(socket.socket(fileno=fd))
    profile_to = os.environ.get(PROFILE_ENV)  # bench/capture.py --profile: the FUSE thread's time
    try:
        if profile_to:
            import cProfile
            prof = cProfile.Profile()
            try:
                return prof.runcall(run, chan)
            finally:
                prof.dump_stats(profile_to)
        return run(chan)
    except SystemExit as exc:
        if isinstance(exc.code, str) and exc.code.startswith("{"):
            chan.sock.sendall(exc.code.encode() + b"\n")
            return 1
        raise
    except Exception as exc:  # reported to the daemon, which turns it into a FAILED result
        log.exception("worker failed")
        chan.send(event="error", message=f"{type(exc).__name__}: {exc}",
                  errno=getattr(exc, "errno", None))
        return 1


def open_state(state: str, ident: bytes) -> tuple[bool, bool]:
    """(first, unclean): is this the journal's first start (the initial copy is due), and did
    the last run stop without writing the clean marker (a resync is due)? Consumes the marker."""
    os.makedirs(state, mode=0o700, exist_ok=True)
    id_file = os.path.join(state, "entry")  # which directory or device this journal belongs to
    first = not os.path.exists(id_file)
    if first:
        with open(id_file, "wb") as f:
            f.write(ident + b"\n")
            os.fsync(f.fileno())
    marker = os.path.join(state, CLEAN_MARKER)
    unclean = not os.path.exists(marker)
    if not unclean:
        os.unlink(marker)
    return first, unclean


def run_until_unmounted(chan: Channel, ready: dict, handle, label: str, applier, journal,
                        flush=None, adopt: socket.socket | None = None, session=None) -> None:
    """Serve FUSE and the daemon until the daemon unmounts us; then drain the journal onto the
    target, make it durable (and `flush()`), and write the clean marker last. `session` is the
    FUSE session to serve (mirrorfs speaks the protocol itself); pyfuse3's by default."""
    import pyfuse3
    import trio
    fuse = session or pyfuse3

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_daemon, chan.sock, ready, handle, label, adopt)
            await fuse.main()  # returns when the daemon unmounts us (ENODEV on /dev/fuse)
            nursery.cancel_scope.cancel()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    try:
        trio.run(run)
    finally:
        fuse.close(unmount=False)
        applier.stop()
        applier.drain()
        applier.persist()
        journal.close()
        if flush is not None:
            flush()
        with open(os.path.join(journal.dir, CLEAN_MARKER), "w") as f:
            f.write("clean stop\n")
            os.fsync(f.fileno())


async def serve_daemon(sock: socket.socket, ready: dict, handle, label: str,
                       adopt: socket.socket | None = None) -> None:
    """Say "ready", then answer the daemon's JSON-line requests with `handle(req, stream)`.
    End of file means the daemon is gone. Without `adopt` exit at once, as if we had crashed
    with it; with `adopt` (a listening socket) keep capturing and wait for the next daemon to
    connect there and take us over (block entries: their applications' I/O never stops)."""
    import trio
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    await stream.send_all(json.dumps({"event": "ready", **ready}).encode() + b"\n")
    listener = None if adopt is None else trio.socket.from_stdlib_socket(adopt)
    buf = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            if listener is None:
                log.error("%s: the daemon is gone; stopping capture now", label)
                os._exit(1)
            log.error("%s: the daemon is gone; capture goes on, waiting to be taken over", label)
            conn, _ = await listener.accept()
            stream = trio.SocketStream(conn)
            await stream.send_all(json.dumps({"event": "ready", **ready, "adopted": True,
                                              "first": False, "resync": None}).encode() + b"\n")
            buf = b""
            continue
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            reply = await handle(json.loads(line), stream)
            await stream.send_all(json.dumps(reply).encode() + b"\n")


def _run(args, chan: Channel) -> int:
    import trio

    from app.engine import sync
    from app.engine.applier import Applier
    from app.engine.journal import Journal
    from app.engine.mirrorfs import MirrorFS, mount

    root_fd = _open_dir(args.path, "directory")  # before the mount: the lower tree's only door
    target_fd = None
    if args.target:
        os.makedirs(args.target, mode=0o700, exist_ok=True)
        target_fd = _open_dir(args.target, "target")
    first, unclean = open_state(args.state, os.fsencode(args.path))
    journal = Journal(args.state)
    diffs_done = None
    if target_fd is not None and (unclean or journal.torn_bytes):
        chan.send(event="progress", stage="difference mirror", files=0, bytes=0)
        diffs_done = sync.mirror(root_fd, target_fd, lambda f, b: chan.send(
            event="progress", stage="difference mirror", files=f, bytes=b))
        journal.discard_pending()  # the target now equals the source: old records are moot
    ops = MirrorFS(root_fd, journal, replicate_atime=args.atime)
    session = mount(ops, args.path, FUSE_OPTIONS)
    if target_fd is None:
        journal.discard_pending()  # nothing to replay onto; records are counted, then dropped
    applier = Applier(journal, target_fd)
    applier.start()

    async def frozen_drained():
        ops.unfrozen = trio.Event()  # mutations wait from here on
        await trio.to_thread.run_sync(journal.wait_applied, journal.last_seq)

    async def handle(req: dict, stream) -> dict:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, **journal.stats(), "open_handles": ops.open_handles(),
                    "apply_errors": applier.errors, "last_apply_error": applier.last_error}
        if target_fd is None and cmd in ("verify", "mirror"):
            return {"ok": False, "error": f"{args.path} has no target", "errno": errno.EINVAL}
        if cmd == "verify":
            await frozen_drained()
            try:
                diffs = await trio.to_thread.run_sync(sync.verify, root_fd, target_fd)
            finally:
                ops.unfrozen.set()
            return {"ok": True, "differences": diffs}
        if cmd == "mirror":
            await frozen_drained()
            token = trio.lowlevel.current_trio_token()

            def progress(files, nbytes):
                msg = json.dumps({"progress": {"files": files, "bytes": nbytes}}).encode() + b"\n"
                trio.from_thread.run(stream.send_all, msg, trio_token=token)

            try:
                applier.pause()
                counts = await trio.to_thread.run_sync(sync.mirror, root_fd, target_fd, progress)
                journal.discard_pending()
            finally:
                applier.resume()
                ops.unfrozen.set()
            return {"ok": True, **counts}
        return {"ok": False, "error": f"unknown worker command {cmd!r}", "errno": errno.EINVAL}

    run_until_unmounted(chan, {"unclean": unclean and not first, "first": first,
                               "mirrored": diffs_done}, handle, args.path, applier, journal,
                        session=session)
    log.info("%s: stopped cleanly (applied seq %d)", args.path, journal.applied_seq)
    return 0


if __name__ == "__main__":
    sys.exit(main())
