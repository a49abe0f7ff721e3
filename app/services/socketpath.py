"""Where the daemon's control socket is. Without imports of its own: `block attach-all` and
`detach-all` look whether anything is there before they load the daemon's client (its imports
were ~5 ms of each call's start)."""

from __future__ import annotations

import os

DEFAULT_SOCKET = "/run/mirrorsetup/control.sock"
SOCKET_ENV = "MIRRORSETUP_SOCKET"


def default_socket() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


# How long an answer the daemon gives from its event loop (ping, shutdown, status) is waited
# for: one silent this long is stopped, stuck, or still starting (it binds its socket before it
# takes over its captures and mounts its entries). Commands that do work (mount-all, mirror,
# verify, ...) wait as long as they take.
ANSWER_SECONDS = 10
# status asks every capture worker too, giving one that does not answer 10 s (all at once)
STATUS_ANSWER_SECONDS = 30
