"""Facts about this host that screens must not ask the kernel for themselves."""

from __future__ import annotations

import os

ROOT_UID = 0


def is_root() -> bool:
    return os.geteuid() == ROOT_UID
