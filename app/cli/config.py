"""`mirrorsetup config …`: tools for the configuration file."""

from __future__ import annotations

from app.cli.common import Refused, add, group, store
from app.cli.output import report


def cmd_import_legacy(args) -> int:
    if not args.fs and not args.block:
        raise Refused("give --fs FILE and/or --block FILE (the old /etc/DT/dtfs_mounts and "
                      "/etc/DT/dtloop_devices)")
    return report(store(args).import_legacy(fs_file=args.fs, block_file=args.block),
                  as_json=args.json)


def register(sub, common) -> None:
    cfg = group(sub, "config", "configuration file tools", "config actions")
    p = add(cfg, "import-legacy", cmd_import_legacy, "import the old one-entry-per-line files",
            common)
    p.add_argument("--fs", metavar="FILE", help="a dtfs_mounts-style list of directories")
    p.add_argument("--block", metavar="FILE", help="a dtloop_devices-style list of devices")
