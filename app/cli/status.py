"""`mirrorsetup status`: the dashboard's content as text or JSON, once or on every change."""

from __future__ import annotations

import json
import queue
import sys
import time

from app.cli.common import add, control, require, store
from app.cli.output import print_status


def cmd_status(args) -> int:
    from app.services.events import Interest
    from app.services.layout import default_state_dir
    from app.services.status import daemon_answering, snapshot
    s, client = store(args), control(args)

    interest = None  # which mount and block events can change what is printed

    def show() -> None:
        nonlocal interest
        answers, silent = daemon_answering(client)  # (one that does not answer is not waited on)
        snap = require(snapshot, s, client if answers else None,
                       state_dir=args.state_dir or default_state_dir())
        if silent:
            snap.daemon_silent(silent)
        interest = Interest.of(snap)
        if args.json and args.watch:  # JSON Lines: a reader takes one document per line
            print(json.dumps(snap.to_json(), default=str))
        else:
            print_status(snap, as_json=args.json)
        sys.stdout.flush()

    show()
    if not args.watch:
        return 0
    from app.services.events import Watchers
    from app.services.status import FIGURES_INTERVAL, moving_figures
    events: queue.Queue = queue.Queue()
    watchers = Watchers(events.put, config_path=s.path, control=client)
    watchers.start()
    figures = moving_figures(client)
    ask_at = time.monotonic() + FIGURES_INTERVAL  # when the daemon's figures are asked next
    try:
        while True:
            try:
                event = events.get(timeout=max(0.0, ask_at - time.monotonic()))
            except queue.Empty:
                event = None
            if event is not None:
                wanted = interest.wants(event)
                while not events.empty():  # one redraw for a burst
                    wanted = interest.wants(events.get_nowait()) or wanted
                if wanted:
                    figures = moving_figures(client)
                    show()
                    ask_at = time.monotonic() + FIGURES_INTERVAL
                    continue
                # another tool's loops and mounts: nothing printed changed
                if time.monotonic() < ask_at:
                    continue
            ask_at = time.monotonic() + FIGURES_INTERVAL  # did the figures move meanwhile?
            now = moving_figures(client)
            if now is None or now == figures:
                continue
            figures = now
            show()
    finally:
        watchers.close()


def register(sub, common) -> None:
    p = add(sub, "status", cmd_status, "configured entries against the kernel's live state",
            common)
    p.add_argument("--watch", action="store_true", help="print again on every mount, device, "
                   "daemon or configuration change, and when the daemon's figures move "
                   "(positions, queue, lag, connection: asked every 2 s); with --json one document "
                   "per line (JSON Lines)")
