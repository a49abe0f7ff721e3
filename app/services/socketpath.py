"""Where the daemon's control socket is. Without imports of its own: `block attach-all` and
`detach-all` look whether anything is there before they load the daemon's client (its imports
were ~5 ms of each call's start)."""

from __future__ import annotations

import os

DEFAULT_SOCKET = "/run/mirrorsetup/control.sock"
SOCKET_ENV = "MIRRORSETUP_SOCKET"


def default_socket() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
