"""`mirrorsetup config …`: tools for the configuration file."""

from __future__ import annotations

import errno

from app.cli.common import Refused, add, group, store
from app.cli.output import report


def cmd_import_legacy(args) -> int:
    if not args.fs and not args.block:
        raise Refused("give --fs FILE and/or --block FILE (the old /etc/DT/dtfs_mounts and "
                      "/etc/DT/dtloop_devices)")
    for file in filter(None, (args.fs, args.block)):
        _readable(file)
    return report(store(args, missing_ok=True).import_legacy(fs_file=args.fs,
                                                             block_file=args.block),
                  as_json=args.json)


def _readable(file: str) -> None:
    """A file named on the command line that cannot be read is a bad argument (exit 2, nothing
    imported from the other one either), not a failed entry."""
    import os
    import stat

    from app.services.results import MirrorError
    try:
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        finally:
            os.close(fd)
    except OSError as exc:
        error = MirrorError.from_oserror("read", file, exc)
        raise Refused(f"{error}; nothing was imported", errno=exc.errno, obj=file) from None


def register(sub, common) -> None:
    cfg = group(sub, "config", "configuration file tools", "config actions")
    p = add(cfg, "import-legacy", cmd_import_legacy, "import the old one-entry-per-line files",
            common)
    p.add_argument("--fs", metavar="FILE", help="a dtfs_mounts-style list of directories")
    p.add_argument("--block", metavar="FILE", help="a dtloop_devices-style list of devices")
