"""`mirrorsetup …`: the scriptable face, over the same service calls as the TUI.

Exit codes: 0 when every entry succeeded (ok, unchanged, pending, skipped), 1 when any entry
failed, 2 for bad usage or a refused request (corrupt config, bad input). Textual is imported
only by the `tui` path, so scripted calls start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from app.cli_output import print_devices, print_results, print_status, print_table
from app.services.results import MirrorError, Result, exit_code
from app.services.units import human_size, parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _store(args):
    from app.services.config import ConfigStore
    return ConfigStore(args.config)


def _replication(args):
    from app.services.replication import Replication
    return Replication(_store(args))


def _report(args, results: list[Result]) -> int:
    print_results(results, as_json=args.json)
    return exit_code(results)


# -- handlers: each returns an exit code ---------------------------------------------------

def cmd_tui(args) -> int:
    from app.ui import run_tui
    return run_tui(config_path=args.config)


def cmd_fs_list(args) -> int:
    entries = _store(args).load().filesystem
    rows = [{"path": e.path, "replicate_atime": e.replicate_atime, "target": e.target} for e in entries]
    print_table(rows, ["path", "replicate_atime", "target"], as_json=args.json)
    return 0


def cmd_fs_add(args) -> int:
    return _report(args, [_replication(args).add_filesystem(
        args.path, replicate_atime=args.atime, target=args.target, adopt_target=args.adopt_target,
        queue_limit=args.queue_limit, on_full=args.on_full)])


def cmd_fs_remove(args) -> int:
    return _report(args, _replication(args).remove_filesystem(args.path, force=args.force))


def cmd_block_devices(args) -> int:
    from app.services import blockdevs
    devices = blockdevs.list_block_devices(include_excluded=args.all)
    print_devices(devices, as_json=args.json)
    return 0


def cmd_block_list(args) -> int:
    from dataclasses import asdict
    entries = _store(args).load().block
    print_table([asdict(e) for e in entries],
                ["device", "loop", "offset", "sizelimit", "read_only", "encryption", "target"],
                as_json=args.json)
    return 0


def cmd_block_add(args) -> int:
    return _report(args, [_replication(args).add_block(
        args.device, loop=args.loop, offset=args.offset, sizelimit=args.sizelimit,
        read_only=args.read_only, encryption=args.encryption, target=args.target,
        adopt_target=args.adopt_target, queue_limit=args.queue_limit, on_full=args.on_full)])


def cmd_block_remove(args) -> int:
    return _report(args, _replication(args).remove_block(args.device))


def cmd_block_attach_all(args) -> int:
    return _report(args, _replication(args).attach_all(dry_run=args.dry_run, force=args.force))


def cmd_block_detach_all(args) -> int:
    return _report(args, _replication(args).detach_all(dry_run=args.dry_run))


def cmd_block_mirror(args) -> int:
    as_json = args.json
    bar = not as_json and sys.stderr.isatty()

    def progress(p: dict) -> None:
        if bar and p.get("total"):
            done, total = p["bytes"], p["total"]
            filled = int(30 * done / total)
            sys.stderr.write(f"\r  [{'#' * filled}{'.' * (30 - filled)}] {done * 100 // total:3d}% "
                             f"{done >> 20} of {total >> 20} MiB")
            sys.stderr.flush()

    results = _replication(args).block_mirror(args.device, progress=progress)
    if bar:
        sys.stderr.write("\n")
    return _report(args, results)


def cmd_block_verify(args) -> int:
    results, ranges = _replication(args).block_verify(args.device)
    if args.json:
        print(json.dumps({"ranges": ranges, "results": [r.to_json() for r in results]}, indent=2))
        return exit_code(results)
    for start, end in ranges:
        print(f"  differs: bytes {start}-{end - 1} of the target ({human_size(end - start)})")
    return _report(args, results)


def cmd_manual_attach(args) -> int:
    return _report(args, [_replication(args).manual_attach(
        args.device, loop=args.loop, offset=args.offset, sizelimit=args.sizelimit,
        read_only=args.read_only, force=args.force)])


def cmd_manual_detach(args) -> int:
    return _report(args, [_replication(args).manual_detach(args.loop)])


def cmd_status(args) -> int:
    from app.services.status import snapshot
    store = _store(args)
    control = _control_or_none()
    print_status(snapshot(store, control), as_json=args.json)
    if not args.watch:
        return 0
    for _event in _kernel_events():
        print_status(snapshot(store, control), as_json=args.json)
        sys.stdout.flush()
    return 0


def _control_or_none():
    try:
        from app.services.control import ControlClient
    except ImportError:
        return None
    client = ControlClient()
    return client if client.is_running() else None


def _kernel_events():
    """Yield on every mount-table change or block uevent: what `status --watch` redraws on."""
    import queue
    import threading

    import pyudev

    from app.services.mounts import MountWatcher

    events: queue.Queue = queue.Queue()
    watcher = MountWatcher()
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
    monitor.filter_by("block")

    def pump_mounts():
        for diff in watcher:
            events.put(diff)

    def pump_uevents():
        for device in iter(monitor.poll, None):
            events.put(device)

    for target in (pump_mounts, pump_uevents):
        threading.Thread(target=target, daemon=True).start()
    try:
        while True:
            yield events.get()
    finally:
        watcher.close()


def cmd_target_add(args) -> int:
    from app.services import targets
    from app.services.config_toml import TargetHost
    host = TargetHost(name=args.name, host=args.host, root=args.root, port=args.port, user=args.user,
                      identity=args.identity, known_hosts=args.known_hosts, ssh_config=args.ssh_config,
                      bandwidth=args.bandwidth, resync_bandwidth=args.resync_bandwidth,
                      compression=args.compression, agent=args.agent)

    def confirm(keys) -> bool:
        if args.json or not sys.stdin.isatty():
            return False
        for _line, fp, kind in keys:
            print(f"{args.host} port {args.port} offers the host key {fp} ({kind})", file=sys.stderr)
        answer = input(f"Pin {keys[0][1]} for target {args.name}? Compare it with the target's "
                       "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub [y/N] ")
        return answer.strip().lower() in ("y", "yes")
    return _report(args, [targets.add_target(_store(args), host, accept_host_key=args.accept_host_key,
                                             confirm=confirm)])


def cmd_target_list(args) -> int:
    from dataclasses import asdict
    hosts = _store(args).load().target
    print_table([asdict(t) for t in hosts], ["name", "host", "port", "user", "root", "bandwidth",
                                             "compression", "identity"], as_json=args.json)
    return 0


def cmd_target_remove(args) -> int:
    from app.services.results import Outcome
    try:
        host = _store(args).remove_target(args.name)
    except MirrorError as exc:
        return _report(args, [Result.from_error("remove target", args.name, exc)])
    return _report(args, [Result("remove target", args.name, Outcome.OK, f"removed target {host.name} "
                                 f"({host.host}); its key {host.identity} and the replicas there were kept")])


def _target_host(args):
    host = _store(args).load().target_host(args.name)
    if host is None:
        raise MirrorError(f"no remote target named {args.name!r} is configured (mirrorsetup target list)",
                          errno=2)
    return host


def cmd_target_test(args) -> int:
    from app.services import targets
    from app.services.results import Outcome
    from app.services.units import human_size
    host = _target_host(args)
    try:
        info = targets.probe(host)
    except MirrorError as exc:
        return _report(args, [Result.from_error("test target", args.name, exc)])
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    return _report(args, [Result("test target", args.name, Outcome.OK,
                                 f"agent {info['agent_version']} on {info['agent_host']} (wire {info['wire_version']}, "
                                 f"ours {info['source_wire_version']}), root {info['root']} has "
                                 f"{human_size(info['free_bytes'] or 0)} free, connect {info['connect_seconds']} s, "
                                 f"round trip {info['rtt_ms']} ms")])


def cmd_target_authorized_key(args) -> int:
    from app.services import targets
    print(targets.authorized_key_line(_target_host(args)))
    return 0


def cmd_serve_target(args) -> int:
    from app.engine import agent
    return agent.main(args.root)


def cmd_import_legacy(args) -> int:
    if not args.fs and not args.block:
        raise MirrorError("give --fs FILE and/or --block FILE (the old /etc/DT/dtfs_mounts and "
                          "/etc/DT/dtloop_devices)")
    return _report(args, _store(args).import_legacy(fs_file=args.fs, block_file=args.block))


# -- parser ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help="configuration file (default: $MIRRORSETUP_CONFIG or "
                             "/etc/mirrorsetup/replication.toml)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")

    parser = argparse.ArgumentParser(prog="mirrorsetup", parents=[common],
                                     description="Choose what is replicated, and see live whether it is.")
    parser.set_defaults(func=cmd_tui)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def add(parent, name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=func)
        return p

    add(sub, "tui", cmd_tui, "start the full-screen console (the default)")

    fs = sub.add_parser("fs", help="file-system replication entries").add_subparsers(
        title="fs actions", metavar="ACTION", required=True)
    add(fs, "list", cmd_fs_list, "list the configured directories")
    p = add(fs, "add", cmd_fs_add, "add the highest directory to capture (never /)")
    p.add_argument("path")
    p.add_argument("--atime", action="store_true", help="replicate access times (off by default; "
                   "times at close are always replicated)")
    p.add_argument("--target", help="directory the changes are replicated to, or NAME:PATH on a "
                   "remote target")
    _replica_options(p)
    p = add(fs, "remove", cmd_fs_remove, "remove an entry (its mirrorfs is unmounted first)")
    p.add_argument("path")
    p.add_argument("--force", action="store_true", help="lazy-unmount even when files are open")

    block = sub.add_parser("block", help="block-device replication entries").add_subparsers(
        title="block actions", metavar="ACTION", required=True)
    p = add(block, "devices", cmd_block_devices, "list block devices that can be replicated")
    p.add_argument("--all", action="store_true", help="also show swap and LVM physical volumes, "
                   "with the reason they are excluded")
    add(block, "list", cmd_block_list, "list the configured block devices")
    p = add(block, "add", cmd_block_add, "add a block device entry")
    p.add_argument("device")
    _loop_options(p)
    p.add_argument("--encryption", help=argparse.SUPPRESS)  # legacy field: refused with a reason
    p.add_argument("--target", help="file or device the writes are replicated to, or NAME:PATH "
                   "on a remote target")
    _replica_options(p)
    p = add(block, "remove", cmd_block_remove, "detach and remove a block device entry")
    p.add_argument("device")
    p = add(block, "attach-all", cmd_block_attach_all, "attach every entry to its loop device now")
    p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    p.add_argument("--force", action="store_true", help="attach even over a mounted or held device")
    p = add(block, "detach-all", cmd_block_detach_all, "detach the loop devices of every entry now")
    p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    p = add(block, "mirror", cmd_block_mirror, "copy the whole device (from its offset) to its "
            "target, with a progress bar (via the daemon)")
    p.add_argument("device")
    p = add(block, "verify", cmd_block_verify, "compare a device with its target by block hashes; "
            "print the differing ranges (via the daemon)")
    p.add_argument("device")

    manual = sub.add_parser("manual", help="attach or detach now, not persisted").add_subparsers(
        title="manual actions", metavar="ACTION", required=True)
    p = add(manual, "attach", cmd_manual_attach, "attach a block device to a loop device now")
    p.add_argument("device")
    _loop_options(p)
    p.add_argument("--force", action="store_true", help="attach even over a mounted or held device")
    p = add(manual, "detach", cmd_manual_detach, "detach a loop device now")
    p.add_argument("loop", metavar="/dev/loopN")

    p = add(sub, "status", cmd_status, "configured entries against the kernel's live state")
    p.add_argument("--watch", action="store_true", help="print again on every mount or device change")

    cfg = sub.add_parser("config", help="configuration file tools").add_subparsers(
        title="config actions", metavar="ACTION", required=True)
    p = add(cfg, "import-legacy", cmd_import_legacy, "import the old one-entry-per-line files")
    p.add_argument("--fs", metavar="FILE", help="a dtfs_mounts-style list of directories")
    p.add_argument("--block", metavar="FILE", help="a dtloop_devices-style list of devices")

    tgt = sub.add_parser("target", help="remote targets (replicas on other hosts, over SSH)").add_subparsers(
        title="target actions", metavar="ACTION", required=True)
    p = add(tgt, "add", cmd_target_add, "add a remote target: a dedicated key, its host key pinned")
    p.add_argument("name")
    p.add_argument("--host", required=True, help="ssh destination (the administrator's ssh_config applies)")
    p.add_argument("--port", type=int, default=22)
    p.add_argument("--user", default=None)
    p.add_argument("--identity", default=None, help="private key (default: a new ed25519 key "
                   "next to the configuration, in keys/NAME_ed25519)")
    p.add_argument("--known-hosts", default=None, help="where the host key is pinned (default: "
                   "known_hosts next to the configuration)")
    p.add_argument("--ssh-config", default=None, help="an ssh_config to use instead of yours")
    p.add_argument("--root", required=True, help="what serve-target serves on the target")
    p.add_argument("--bandwidth", default=None, help="cap on wire bytes, e.g. 20MiB/s or 100Mbit/s")
    p.add_argument("--resync-bandwidth", default=None, help="a lower cap for resyncs")
    p.add_argument("--compression", choices=("zstd", "none"), default="zstd")
    p.add_argument("--agent", default="mirrorsetup", help="the mirrorsetup command on the target "
                   "(for the authorized_keys line; default: mirrorsetup on its PATH)")
    p.add_argument("--accept-host-key", metavar="SHA256:…", default=None, help="pin the host key "
                   "with this fingerprint (scripts); without it, a terminal is asked")
    add(tgt, "list", cmd_target_list, "list the remote targets")
    p = add(tgt, "remove", cmd_target_remove, "remove a remote target no entry uses")
    p.add_argument("name")
    p = add(tgt, "test", cmd_target_test, "connect, greet the agent: versions, free space, round trip")
    p.add_argument("name")
    p = add(tgt, "authorized-key", cmd_target_authorized_key, "print the target's authorized_keys line")
    p.add_argument("name")
    p = add(sub, "serve-target", cmd_serve_target, "the target side (run by sshd as the forced "
            "command of the replication key): serve replicas below --root")
    p.add_argument("--root", required=True)

    _register_engine_commands(sub, fs, common)
    return parser


def _replica_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adopt-target", action="store_true", help="replace the contents of a target "
                   "that is not empty and is no replica of ours (otherwise refused)")
    p.add_argument("--queue-limit", metavar="SIZE", help="unreplicated changes kept at most "
                   "(default: a tenth of the state directory's file system, 64 MiB-16 GiB)")
    p.add_argument("--on-full", choices=("pull-ahead", "block"), help="when the queue is full: "
                   "track what changed and resync it later (pull-ahead, default) or make writers wait")


def _loop_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loop", metavar="/dev/loopN", help="always use this loop device "
                   "(default: the first free one)")
    p.add_argument("--offset", type=_size, default=0, help="start this far into the device "
                   "(bytes, or 512, 4K, 1M …; a multiple of 512)")
    p.add_argument("--sizelimit", type=_size, default=0, help="use at most this many bytes")
    p.add_argument("--read-only", action="store_true", help="attach read-only")


def _register_engine_commands(sub, fs, common) -> None:
    """The daemon's commands (daemon, fs mount-all …) live with the engine, imported lazily."""
    try:
        from app.engine import commands
    except ImportError:
        return
    commands.register(sub, fs, common)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # --config/--json may stand before or after the subcommand (SUPPRESS keeps either).
    args.config = getattr(args, "config", None)
    args.json = getattr(args, "json", False)
    try:
        return args.func(args)
    except MirrorError as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "errno": exc.errno,
                              **({"line": exc.line, "key": exc.key} if hasattr(exc, "line") else {})}))
        else:
            print(f"mirrorsetup: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
