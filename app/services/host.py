"""Facts about this host that screens must not ask the kernel for themselves."""

from __future__ import annotations

import os

ROOT_UID = 0


def is_root() -> bool:
    return os.geteuid() == ROOT_UID


def process_state(pid: int) -> str:
    """Why a process may not answer, as the kernel says: stopped, or waiting on I/O ("" when
    it is none of these, or gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
    return {b"T": f" (stopped by a signal: kill -CONT {pid} resumes it)",
            b"t": " (stopped by a debugger)",
            b"D": " (waiting in the kernel, on I/O)"}.get(state, "")
