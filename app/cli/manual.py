"""`mirrorsetup manual …`: attach or detach a loop now, as the old manual menu did (not persisted)."""

from __future__ import annotations

import os

from app.cli.common import Refused, add, group, loop_options, replication, require
from app.cli.output import report


def cmd_attach(args) -> int:
    from app.services import blockdevs
    from app.services.config import check_window
    require(blockdevs.describe, args.device)  # no such device: refused, not "failed"
    # a bad window is a bad argument, refused as `block add` refuses it, not a FAILED attach
    require(check_window, args.device, args.offset, args.sizelimit,
            require(blockdevs.device_size, args.device))
    return report([replication(args, missing_ok=True).manual_attach(
        args.device, loop=args.loop, offset=args.offset, sizelimit=args.sizelimit,
        read_only=args.read_only, force=args.force)], as_json=args.json)


def cmd_detach(args) -> int:
    import errno

    from app.services import loop as loopdev
    require(loopdev.parse_loop_path, args.loop)
    if not os.path.exists(args.loop):
        raise Refused(f"{args.loop}: no such loop device", errno=errno.ENOENT, obj=args.loop)
    return report([replication(args, missing_ok=True).manual_detach(args.loop)], as_json=args.json)


def register(sub, common) -> None:
    manual = group(sub, "manual", "attach or detach now, not persisted", "manual actions")
    p = add(manual, "attach", cmd_attach, "attach a block device to a loop device now", common)
    p.add_argument("device", help="the block device to attach")
    loop_options(p)
    p.add_argument("--force", action="store_true", help="attach even over a mounted or held "
                   "device")
    p = add(manual, "detach", cmd_detach, "detach a loop device now", common)
    p.add_argument("loop", metavar="/dev/loopN")
