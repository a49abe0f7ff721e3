"""`mirrorsetup target …` (remote targets: replicas on other hosts, over SSH) and
`mirrorsetup serve-target` (the other host's side, run by sshd as a forced command)."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from dataclasses import asdict

from app.cli.common import Refused, add, group, replication, require, store
from app.cli.output import complain, print_table, report
from app.services.results import ConfigError, ConfigErrors, MirrorError, Outcome, Result


def _host(args):
    host = require(store(args).load).target_host(args.name)
    if host is None:
        raise Refused(f"no remote target named {args.name!r} is configured (mirrorsetup target list)",
                      errno=errno.ENOENT, obj=args.name)
    return host


def cmd_add(args) -> int:
    from app.services import targets
    from app.services.config import target_errors
    from app.services.config_toml import TargetHost
    port = args.port
    if port is None:  # the port ssh_config gives the host (Port), as ssh itself would use
        port = targets.ssh_resolved(args.host, None, args.ssh_config).get("port", 22)
    host = TargetHost(name=args.name, host=args.host, root=args.root, port=_port(port),
                      user=args.user, identity=args.identity, known_hosts=args.known_hosts,
                      ssh_config=args.ssh_config, bandwidth=args.bandwidth,
                      resync_bandwidth=args.resync_bandwidth, compression=args.compression,
                      agent=args.agent)
    st = store(args, missing_ok=True)
    config = require(st.load)
    # every malformed field and a name in use, all said at once (one line each): refused,
    # nothing made. The Targets screen's dialog checks its fields with the same target_errors
    errors = target_errors(host)
    if args.accept_host_key is not None:  # "" too: not a fingerprint
        try:
            targets.check_fingerprint(args.accept_host_key)
        except ConfigError as exc:
            errors.append(exc)
    if config.target_host(args.name) is not None:
        errors.append(ConfigError(f"a target named {args.name!r} is already configured",
                                  key="name", obj=args.name, errno=errno.EEXIST))
    if errors:
        raise ConfigErrors.of(errors)

    return report([targets.add_target(st, host, accept_host_key=args.accept_host_key,
                                      confirm=_confirm(args, args.host, args.port))], as_json=args.json)


def _port(text):
    """--port as a number; text that is none is kept, to be said with every other malformed
    field (argparse's own refusal of it ended the run before they were looked at)."""
    try:
        return int(text)
    except (TypeError, ValueError):
        return text


def _confirm(args, host: str, port: int):
    def confirm(keys) -> bool:
        """At a terminal only: show what the host offers and ask; scripts give the key."""
        if args.json or not sys.stdin.isatty():
            return False
        for _line, fp, kind in keys:
            complain(f"{host} port {port} offers the host key {fp} ({kind})")
        answer = input(f"Pin {keys[0][1]} for target {args.name}? Compare it with "
                       "`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the target [y/N] ")
        return answer.strip().lower() in ("y", "yes")
    return confirm


def cmd_rekey(args) -> int:
    from app.services import targets
    if args.accept_host_key is not None:  # "" too: not a fingerprint
        require(targets.check_fingerprint, args.accept_host_key)
    host = _host(args)  # a name that is not configured is a refusal (exit 2)
    return report([targets.rekey_target(store(args), args.name, accept_host_key=args.accept_host_key,
                                        confirm=_confirm(args, host.host, host.port))],
                  as_json=args.json)


def cmd_set(args) -> int:
    from dataclasses import replace
    from app.services import targets
    from app.services.layout import command
    errors = [ConfigError(f"{flag}: the {key} of a target cannot be changed: its replicas are "
                          f"there. Remove the target and add it again "
                          f"({command('target', 'remove', args.name)}, then "
                          f"{command('target', 'add', args.name, '--host', 'H', '--root', 'DIR')}"
                          f"); for a host key that changed, {command('target', 'rekey', args.name)}",
                          key=key, obj=args.name, errno=errno.EINVAL)
              for key, flag in (("host", "--host"), ("root", "--root"))
              if getattr(args, key) is not None]
    changes = {key: getattr(args, key) for key in targets.SETTABLE if getattr(args, key) is not None}
    for key in ("bandwidth", "resync_bandwidth"):  # none: no cap (the key goes from the file)
        if changes.get(key) == "none":
            changes[key] = None
    if "port" in changes:
        changes["port"] = _port(changes["port"])
    if not changes and not errors:
        errors.append(ConfigError("nothing to set: give at least one of --"
                                  + ", --".join(k.replace("_", "-") for k in targets.SETTABLE),
                                  obj=args.name, errno=errno.EINVAL))
    host = _host(args)  # a name that is not configured is a refusal (exit 2)
    # every malformed value said at once, one line each, as target add says them
    errors += targets.set_errors(replace(host, **changes), changes)
    if errors:
        raise ConfigErrors.of(errors)
    # then the running captures of the target take them (the daemon, when it runs)
    return report(replication(args).set_target(args.name, changes), as_json=args.json)


def cmd_apply(args) -> int:
    _host(args)  # a name that is not configured is a refusal (exit 2)
    return report(replication(args).apply_target(args.name), as_json=args.json)


def cmd_list(args) -> int:
    from app.services.units import cap_shown
    hosts = require(store(args).load).target
    rows = [asdict(t) for t in hosts]
    if not args.json:  # the file's words in JSON; a table says what 0 means
        rows = [{**r, "bandwidth": cap_shown(r["bandwidth"])} for r in rows]
    print_table(rows, ["name", "host", "port", "user", "root", "bandwidth", "compression",
                       "identity"], as_json=args.json)
    return 0


def cmd_remove(args) -> int:
    _host(args)  # a name that is not configured is a refusal (exit 2), as for test and the others
    try:
        host = store(args).remove_target(args.name)
    except ConfigError as exc:  # used by an entry: refused, nothing was changed (exit 2)
        raise Refused(exc.message, errno=exc.errno, obj=exc.obj) from None
    except MirrorError as exc:
        return report([Result.from_error("remove target", args.name, exc)], as_json=args.json)
    return report([Result("remove target", args.name, Outcome.OK, f"removed target {host.name} "
                          f"({host.host}); its key {host.identity} and the replicas there were kept")],
                  as_json=args.json)


def cmd_test(args) -> int:
    from app.services import targets
    host = _host(args)
    try:
        info = targets.probe(host)
    except MirrorError as exc:
        return report([Result.from_error("test target", args.name, exc)], as_json=args.json)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    return report([Result("test target", args.name, Outcome.OK,
                          f"agent {info['agent_version']} on {info['agent_host']} (wire "
                          f"{info['wire_version']}, ours {info['source_wire_version']}), root "
                          f"{info['root']} has {targets.room_text(info)}, connect "
                          f"{info['connect_seconds']} s, round trip {info['rtt_ms']} ms")])


def cmd_authorized_key(args) -> int:
    from app.services import targets
    print(targets.authorized_key_line(_host(args)))
    return 0


def cmd_serve_target(args) -> int:
    from app.cli import run_agent  # (sshd's `mirrorsetup serve-target` goes there directly)
    return run_agent(args.root)


def register(sub, common) -> None:
    tgt = group(sub, "target", "remote targets: replicas on other hosts, over SSH", "target actions")
    p = add(tgt, "add", cmd_add, "add a remote target: a dedicated key, its host key shown and "
            "pinned (never accepted silently)", common)
    p.add_argument("name")
    p.add_argument("--host", required=True, help="ssh destination (your ssh_config applies)")
    p.add_argument("--port", default=None,  # checked with the other fields (_port)
                   help="ssh port (default: the one ssh_config gives the host, else 22)")
    p.add_argument("--user", default=None)
    p.add_argument("--identity", default=None, help="private key (default: a new ed25519 key "
                   "next to the configuration, keys/NAME_ed25519)")
    p.add_argument("--known-hosts", default=None, help="where the host key is pinned (default: "
                   "known_hosts next to the configuration)")
    p.add_argument("--ssh-config", default=None, help="an ssh_config to use instead of yours")
    p.add_argument("--root", required=True, help="what serve-target serves on the target")
    p.add_argument("--bandwidth", default=None, help="cap on wire bytes, e.g. 20MiB/s or "
                   "100Mbit/s; 0 (as rsync's --bwlimit=0) or none given: no cap")
    p.add_argument("--resync-bandwidth", default=None, help="a lower cap for resyncs, so live "
                   "changes still get through (at most --bandwidth); 0 or none given: no cap "
                   "of their own")
    # (no choices=: a wrong one is said with the other malformed fields, not alone)
    p.add_argument("--compression", metavar="{zstd,none}", default="zstd")
    p.add_argument("--agent", default="mirrorsetup", help="the mirrorsetup command on the target, "
                   "for the authorized_keys line (default: mirrorsetup on its PATH)")
    p.add_argument("--accept-host-key", metavar="SHA256:…", default=None, help="pin the host key "
                   "with this fingerprint (scripts); without it a terminal is asked")
    p = add(tgt, "rekey", cmd_rekey, "pin the host key a target offers now in place of the one "
            "pinned (a reinstalled target; checked as at add, never accepted silently)", common)
    p.add_argument("name")
    p.add_argument("--accept-host-key", metavar="SHA256:…", default=None, help="the new host key's "
                   "fingerprint (scripts); without it a terminal is asked")
    p = add(tgt, "set", cmd_set, "change how a target is reached or how fast (not its host or "
            "root: remove and add it again); the daemon's running captures take it at once "
            "(rates) or by a new session that resumes where the last one was", common)
    p.add_argument("name")
    p.add_argument("--bandwidth", metavar="RATE|none", default=None, help="cap on wire bytes, "
                   "e.g. 20MiB/s; 0 or none: no cap")
    p.add_argument("--resync-bandwidth", metavar="RATE|none", default=None, help="a lower cap "
                   "for resyncs (at most --bandwidth); 0 or none: no cap of their own")
    p.add_argument("--compression", metavar="{zstd,none}", default=None)
    p.add_argument("--port", metavar="P", default=None, help="another ssh port (the host key "
                   "pinned now is pinned for it too if the host offers it there)")
    p.add_argument("--user", metavar="U", default=None)
    p.add_argument("--identity", metavar="FILE", default=None, help="another private key (its "
                   ".pub beside it; its authorized_keys line is printed: put it on the target, "
                   "then target test)")
    p.add_argument("--known-hosts", metavar="FILE", default=None, help="another file the host "
                   "key is pinned in (the key pinned now is copied there if the host offers it)")
    for flag in ("--host", "--root"):  # refused with what to do instead
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)
    p = add(tgt, "apply", cmd_apply, "make the running captures of a target take its settings "
            "as the configuration says them now (after a hand edit; target set does it itself)",
            common)
    p.add_argument("name")
    add(tgt, "list", cmd_list, "list the remote targets", common)
    p = add(tgt, "remove", cmd_remove, "remove a remote target that no entry uses", common)
    p.add_argument("name")
    p = add(tgt, "test", cmd_test, "connect and greet the agent: versions, free space, round trip",
            common)
    p.add_argument("name")
    p = add(tgt, "authorized-key", cmd_authorized_key, "print the line for the target's "
            "~/.ssh/authorized_keys (the agent as a forced command, restrict)", common)
    p.add_argument("name")
    p = add(sub, "serve-target", cmd_serve_target, "the target side: serve replicas below --root "
            "(run by sshd as the forced command of the replication key)", common)
    p.add_argument("--root", required=True)
