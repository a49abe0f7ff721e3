"""`mirrorsetup daemon`: the long-running service behind `fs mount-all`, status and mirrors.

Foreground, trio. On start: clean stale mirrorfs mounts a killed daemon left, mount every
configured file-system entry (one capture worker each), then serve the control socket. On
SIGTERM/SIGINT or `shutdown`: unmount every entry (lazily when files are still open, and said
so) and exit. The config file is re-read by every mount request, so new entries need no restart.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import socket
import stat
import sys

import trio

from app.engine import sync
from app.engine.blocksup import BlockSupervisor
from app.engine.supervisor import Supervisor, nested_mounts, our_mount
from app.services.config import BlockEntry, ConfigStore, FsEntry
from app.services.replication import Replication, same_device
from app.services.control import DEFAULT_SOCKET, DIR_MODE, SOCKET_MODE
from app.services.results import MirrorError, Outcome, Result

DEFAULT_STATE_DIR = "/var/lib/mirrorsetup"
DETACHED_WAIT_SECONDS = 10  # at stop, lazily unmounted entries get this long to see files closed
log = logging.getLogger("mirrorsetup.daemon")


class Daemon:
    def __init__(self, config: str | None, socket_path: str, state_dir: str):
        self.store = ConfigStore(config)
        self.socket_path = socket_path
        self.sup = Supervisor(state_dir)
        self.blk = BlockSupervisor(state_dir, os.path.dirname(socket_path), Replication(self.store))
        self.stopping = trio.Event()

    def _entries(self) -> tuple[FsEntry, ...]:
        return self.store.load().filesystem

    def _entry(self, path: str) -> FsEntry:
        real = os.path.realpath(path) if path else path
        for e in self._entries():
            if e.path in (path, real):
                return e
        raise MirrorError(f"{path} is not a configured file-system entry", errno=errno.ENOENT, obj=path)

    def _blocks(self) -> tuple[BlockEntry, ...]:
        return self.store.load().block

    def _block(self, device: str) -> BlockEntry:
        for e in self._blocks():
            if e.device == device or same_device(e.device, device):
                return e
        raise MirrorError(f"{device} is not a configured block device", errno=errno.ENOENT, obj=device)

    # -- commands ---------------------------------------------------------------------------
    async def cmd_ping(self, send, **_):
        return {"pid": os.getpid(), "config": os.path.realpath(self.store.path)}

    async def cmd_status(self, send, **_):
        await self.sup.reap()
        entries = []
        for e in self._entries():
            row = {"path": e.path, "target": e.target, "replicate_atime": e.replicate_atime,
                   "mounted": our_mount(e.path) is not None,
                   "capturing": e.path in self.sup.workers,
                   "nested_mounts_not_captured": nested_mounts(e.path),
                   "captured_ops": 0, "bytes_queued": 0, "applied_seq": None, "last_seq": None,
                   "lag_seconds": None, "worker_pid": None}
            w = self.sup.workers.get(e.path)
            if w is not None:
                try:
                    st = await w.call("status")
                    row.update({k: v for k, v in st.items() if k != "ok"}, worker_pid=w.proc.pid)
                except (MirrorError, trio.BrokenResourceError) as exc:
                    row["error"] = str(exc)
            entries.append(row)
        block = [await self.blk.status_row(e) for e in self._blocks()]
        return {"pid": os.getpid(), "socket": self.socket_path, "entries": entries, "block": block,
                "pids": sorted({os.getpid()} | self.blk.pids() | {w.proc.pid for w in self.sup.workers.values()})}

    # -- block entries ----------------------------------------------------------------------
    async def cmd_block_attach_all(self, send, dry_run=False, force=False, **_):
        results = [] if dry_run else await self.blk.clean_stale()

        async def progress(p):
            await send({"progress": p})
        for e in self._blocks():
            results.append(await self.blk.attach(e, dry_run=bool(dry_run), progress=progress))
        return {"results": [r.to_json() for r in results]}

    async def cmd_block_detach_all(self, send, dry_run=False, **_):
        results = []
        entries = list(self._blocks())
        configured = {e.device for e in entries}
        entries += [c.entry for d, c in self.blk.captures.items() if d not in configured]  # removed by hand
        for e in entries:
            results += await self.blk.detach(e, dry_run=bool(dry_run))
        return {"results": [r.to_json() for r in results]}

    async def cmd_block_attach(self, send, device="", **_):
        return {"results": [(await self.blk.attach(self._block(device))).to_json()]}

    async def cmd_block_detach(self, send, device="", **_):
        return {"results": [r.to_json() for r in await self.blk.detach(self._block(device))]}

    async def cmd_block_mirror(self, send, device="", **_):
        return await self._block_command("mirror", device, send)

    async def cmd_block_verify(self, send, device="", **_):
        return await self._block_command("verify", device, send)

    async def _block_command(self, cmd: str, device: str, send) -> dict:
        entry = self._block(device)
        cap = self.blk.captures.get(entry.device)
        # not attached: nothing writes through us, work on the devices directly
        reply = await _run_on_target(cmd, entry, entry.device, cap and cap.worker, _block_offline, send)
        n = reply["differing"]
        if cmd == "verify":
            res = Result("verify", entry.device, Outcome.OK if n == 0 else Outcome.FAILED,
                         "target matches" if n == 0 else f"{n} of {reply['blocks']} blocks differ",
                         None if n == 0 else errno.EIO)
        else:
            res = Result("mirror", entry.device, Outcome.OK, f"mirrored {reply['copied_bytes']} bytes "
                         f"from offset {entry.offset} to {entry.target}")
        return {**reply, "results": [res.to_json()]}

    async def cmd_mount_all(self, send, force=False, **_):
        results = list(await self.sup.clean_stale())
        for e in self._entries():
            results.append(await self.sup.mount(e))
        return {"results": [r.to_json() for r in results]}

    async def cmd_unmount_all(self, send, force=False, **_):
        paths = [e.path for e in self._entries()] + [p for p in self.sup.workers if
                                                     p not in {e.path for e in self._entries()}]
        return {"results": [(await self.sup.unmount(p, bool(force))).to_json() for p in paths]}

    async def cmd_mount(self, send, path="", **_):
        return {"results": [(await self.sup.mount(self._entry(path))).to_json()]}

    async def cmd_unmount(self, send, path="", force=False, **_):
        entry = self._entry(path)
        return {"results": [(await self.sup.unmount(entry.path, bool(force))).to_json()]}

    async def cmd_reload(self, send, **_):
        wanted = {e.path for e in self._entries()}
        results = [await self.sup.unmount(p) for p in list(self.sup.workers) if p not in wanted]
        results += [await self.sup.mount(e) for e in self._entries() if e.path not in self.sup.workers]
        return {"results": [r.to_json() for r in results]}

    async def cmd_watch(self, send, **_):
        """Hold the connection until the daemon stops: its end (or EOF, if we are killed) tells
        a console that the daemon is gone, without polling."""
        await self.stopping.wait()
        return {"stopping": True}

    async def cmd_shutdown(self, send, **_):
        self.stopping.set()
        return {"results": [Result("shutdown", "daemon", Outcome.OK, "stopping").to_json()]}

    async def cmd_mirror(self, send, path="", **_):
        return await self._tree_command("mirror", path, send)

    async def cmd_verify(self, send, path="", **_):
        return await self._tree_command("verify", path, send)

    async def _tree_command(self, cmd: str, path: str, send) -> dict:
        entry = self._entry(path)
        # not mounted: nothing is being captured, work on the directories directly
        reply = await _run_on_target(cmd, entry, entry.path, self.sup.workers.get(entry.path),
                                     _offline, send)
        if cmd == "verify":
            n = len(reply["differences"])
            res = Result("verify", entry.path, Outcome.OK if n == 0 else Outcome.FAILED,
                         "target matches" if n == 0 else f"{n} differences",
                         None if n == 0 else errno.EIO)
        else:
            res = Result("mirror", entry.path, Outcome.OK, f"mirrored {reply['files']} files "
                         f"({reply['copied']} copied, {reply['bytes']} bytes, {reply['removed']} removed)")
        return {**reply, "results": [res.to_json()]}

    # -- socket -----------------------------------------------------------------------------
    async def serve_client(self, stream: trio.SocketStream) -> None:
        buf = b""
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    await self._answer(stream, line)

    async def _answer(self, stream, line: bytes) -> None:
        async def send(msg: dict) -> None:
            await stream.send_all(json.dumps(msg).encode() + b"\n")
        try:
            req = json.loads(line)
            handler = getattr(self, "cmd_" + str(req.get("cmd")), None)
            if handler is None:
                raise MirrorError(f"unknown command {req.get('cmd')!r}", errno=errno.EINVAL)
            reply = {"ok": True, **await handler(send, **(req.get("args") or {}))}
        except MirrorError as exc:
            reply = {"ok": False, "error": str(exc), "errno": exc.errno}
        except (ValueError, TypeError) as exc:
            reply = {"ok": False, "error": f"bad request: {exc}", "errno": errno.EINVAL}
        except OSError as exc:
            err = MirrorError.from_oserror("daemon", "request", exc)
            reply = {"ok": False, "error": str(err), "errno": exc.errno}
        try:
            await send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def bind(self) -> socket.socket:
        """Make the socket root-only: directory 0700, socket 0600, a live one is never taken."""
        parent = os.path.dirname(self.socket_path)
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=DIR_MODE)
        if self.socket_path == DEFAULT_SOCKET:
            os.chmod(parent, DIR_MODE)
        if os.path.lexists(self.socket_path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.socket_path)
                raise MirrorError(f"another mirrorsetup daemon is listening on {self.socket_path}",
                                  errno=errno.EADDRINUSE, obj=self.socket_path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.socket_path)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(self.socket_path)
        finally:
            os.umask(old)
        os.chmod(self.socket_path, SOCKET_MODE)
        assert stat.S_IMODE(os.stat(self.socket_path).st_mode) == SOCKET_MODE
        sock.listen(16)
        return sock

    async def run(self) -> int:
        sock = self.bind()
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        try:
            async with trio.open_nursery() as nursery:
                self.sup.nursery = nursery
                nursery.start_soon(self._signals, nursery)
                for r in await self.sup.clean_stale():
                    log.info("%s: %s", r.target, r.message)
                for e in self._entries():
                    r = await self.sup.mount(e)
                    log.info("%s %s: %s", r.outcome.value, r.target, r.message)
                self.blk.nursery = nursery
                for r in await self.blk.clean_stale():
                    log.info("%s %s: %s", r.outcome.value, r.target, r.message)
                for e in self._blocks():
                    r = await self.blk.attach(e)
                    log.info("%s %s: %s", r.outcome.value, r.target, r.message)
                nursery.start_soon(trio.serve_listeners, self.serve_client, [listener])
                print(f"mirrorsetup daemon ready on {self.socket_path}", flush=True)
                sd_notify(b"READY=1")
                await self.stopping.wait()
                sd_notify(b"STOPPING=1")
                for r in await self.blk.stop_all():
                    log.info("%s %s: %s", r.outcome.value, r.target, r.message)
                for path in list(self.sup.workers):
                    r = await self.sup.unmount(path, force=True)
                    log.info("%s %s: %s", r.outcome.value, r.target, r.message)
                await self.sup.wait_detached(DETACHED_WAIT_SECONDS)
                nursery.cancel_scope.cancel()
        finally:
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        return 0

    async def _signals(self, nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                self.stopping.set()
                return


async def _run_on_target(cmd: str, entry, name: str, worker, offline, send) -> dict:
    """Mirror or verify an entry against its target: through its capture worker when it has
    one (writes held still there), else `offline(cmd, entry, token, send)` in a thread."""
    if not entry.target:
        raise MirrorError(f"{name} has no target to {cmd}", errno=errno.EINVAL, obj=name)

    async def progress(p):
        await send({"progress": p})
    if worker is None:
        return await trio.to_thread.run_sync(offline, cmd, entry, trio.lowlevel.current_trio_token(), send)
    reply = await worker.call(cmd, progress=progress)
    if not reply.pop("ok", False):
        raise MirrorError(reply.get("error", f"{cmd} failed"), errno=reply.get("errno"))
    return reply


def _offline(cmd: str, entry: FsEntry, token, send) -> dict:
    os.makedirs(entry.target, mode=0o700, exist_ok=True)
    src = os.open(entry.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    dst = os.open(entry.target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if cmd == "verify":
            return {"differences": sync.verify(src, dst)}

        def progress(files, nbytes):
            trio.from_thread.run(send, {"progress": {"files": files, "bytes": nbytes}}, trio_token=token)
        return sync.mirror(src, dst, progress)
    finally:
        os.close(src)
        os.close(dst)


def _block_offline(cmd: str, entry: BlockEntry, token, send) -> dict:
    from app.engine import blocksync
    src = os.open(entry.device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end = os.lseek(src, 0, os.SEEK_END)
        size = min(entry.sizelimit or end - entry.offset, end - entry.offset)
        dst = blocksync.open_target(entry.target, size, create=cmd == "mirror")
        try:
            def progress(done, total):
                trio.from_thread.run(send, {"progress": {"bytes": done, "total": total}}, trio_token=token)
            return {"size": size, **blocksync.compare(src, entry.offset, size, dst, progress=progress,
                                                      copy="none" if cmd == "verify" else "all")}
        finally:
            os.close(dst)
    finally:
        os.close(src)


def sd_notify(state: bytes) -> None:
    """Tell systemd (Type=notify) we are ready: every entry is mounted and attached."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(addr)
            s.sendall(state)
        except OSError as exc:
            log.warning("sd_notify %s: %s", addr, exc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mirrorsetup daemon")
    p.add_argument("--socket", default=None, help=f"control socket (default {DEFAULT_SOCKET})")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="journals and replication state")
    p.add_argument("--config", default=None)
    return run(p.parse_args(argv))


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="mirrorsetup %(levelname)s %(message)s")
    if os.geteuid() != 0:
        print("mirrorsetup daemon: must run as root (mount(2), allow_other)", file=sys.stderr)
        return 2
    from app.services.control import default_socket
    daemon = Daemon(getattr(args, "config", None), args.socket or default_socket(), args.state_dir)
    try:
        return trio.run(daemon.run)
    except MirrorError as exc:
        print(f"mirrorsetup daemon: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
