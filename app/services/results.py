"""Result objects and errors shared by every service, so the TUI and the CLI say the same words.

A state-changing call returns one `Result` per entry it touched. A call that cannot even start
(bad input, corrupt config) raises `MirrorError`, which keeps the errno and names the object.
"""

from __future__ import annotations

import errno as errno_module
import os
from dataclasses import dataclass, field
from enum import Enum

TYPE_CHECKING = False  # typing is not imported at run time: ~5 ms of every command's start
if TYPE_CHECKING:
    from typing import Any


class Outcome(str, Enum):
    OK = "ok"  # the action was done
    UNCHANGED = "unchanged"  # already in the wanted state (e.g. "already attached")
    PENDING = "pending"  # the kernel deferred it (e.g. LOOP_CLR_FD on an open device)
    SKIPPED = "skipped"  # deliberately not done (dry run, not ours)
    FAILED = "failed"


REFUSED = {"refused": True}  # a Result's details: refused, nothing was changed (CLI: exit 2)


@dataclass(frozen=True)
class Result:
    """What happened to one entry: `target` names it the way an administrator would."""

    action: str
    target: str
    outcome: Outcome
    message: str
    errno: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.outcome is Outcome.FAILED

    @property
    def refused(self) -> bool:
        """Failed as a refusal: nothing was changed (e.g. the object is in use)."""
        return self.failed and self.details.get("refused") is True

    @property
    def word(self) -> str:
        """What happened, in the word the TUI shows and the CLI prints (in capitals): "refused"
        for a refusal (the CLI's exit 2: nothing was changed), "failed" only for what failed
        while it was being done."""
        return "refused" if self.refused else self.outcome.value

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "target": self.target,
            "outcome": self.outcome.value,
            "message": self.message,
            "errno": self.errno,
            "errno_name": errno_module.errorcode.get(self.errno) if self.errno else None,
            **({"details": self.details} if self.details else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        """Inverse of `to_json`, for results that crossed the daemon's control socket."""
        return cls(data["action"], data["target"], Outcome(data["outcome"]), data["message"],
                   data.get("errno"), data.get("details") or {})

    @classmethod
    def from_error(cls, action: str, target: str, exc: BaseException, *,
                   refused: bool | None = None) -> Result:
        """`refused`: True where the caller knows nothing was changed yet (its checks raised,
        which the CLI refuses with exit 2 before it asks); by default by the error (refuses())."""
        err = getattr(exc, "errno", None)
        refused = refuses(exc) if refused is None else refused
        return cls(action, target, Outcome.FAILED, str(exc), err if isinstance(err, int) else None,
                   {"refused": True} if refused else {})


class MirrorError(Exception):
    """A refusal or a failed syscall. `str()` is the message the administrator reads."""

    def __init__(self, message: str, *, errno: int | None = None, obj: str | None = None):
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.obj = obj

    def __str__(self) -> str:
        return self.message

    @classmethod
    def from_oserror(cls, what: str, obj: str, exc: OSError) -> MirrorError:
        """`what` says what we tried ("attach", "mount"); the errno and its name are kept."""
        name = errno_module.errorcode.get(exc.errno or 0, "E?")
        reason = exc.strerror or os.strerror(exc.errno or 0)
        return cls(f"{what} {obj}: {reason} ({name})", errno=exc.errno, obj=obj)


class Refusal(MirrorError):
    """A request refused before anything was changed (the object is in use, or not in the
    state the request needs): the CLI exits 2 for it, as for bad arguments, not 1."""


class ConfigError(MirrorError):
    """The configuration file or an entry is wrong; `line` and `key` point at it when known."""

    def __init__(self, message: str, *, line: int | None = None, key: str | None = None,
                 obj: str | None = None, errno: int | None = None):
        super().__init__(message, errno=errno, obj=obj)
        self.line = line
        self.key = key


class ConfigErrors(ConfigError):
    """Every problem of one request at once, so an administrator fixes them in one go rather
    than meeting the next at each try. `errors` keep their own key and errno; the message is
    theirs joined by "; " (the CLI says each on its own line)."""

    def __init__(self, errors: list[ConfigError]):
        first = errors[0]
        super().__init__("; ".join(e.message for e in errors), line=first.line, key=first.key,
                         obj=first.obj, errno=first.errno)
        self.errors = list(errors)

    @classmethod
    def of(cls, errors: list[ConfigError]) -> ConfigError | None:
        """None for no problem, the error itself for one, else all of them."""
        return None if not errors else errors[0] if len(errors) == 1 else cls(errors)


def refuses(exc: BaseException) -> bool:
    """Whether `exc` refused a request before anything was changed, the one rule of the CLI's
    exit 2 and the TUI's "refused": a Refusal (in use, not in the state the action is for, a
    daemon that is needed but not running) or a ConfigError (bad input: an entry or a
    configuration file that is wrong). Any other error failed while the action was done."""
    return isinstance(exc, (Refusal, ConfigError))


def exit_code(results: list[Result]) -> int:
    """The CLI contract: 0 when no entry failed; 2 when every failed entry was refused and
    nothing was done (no entry ok or pending); else 1."""
    failed = [r for r in results if r.failed]
    if not failed:
        return 0
    done = any(r.outcome in (Outcome.OK, Outcome.PENDING) for r in results)
    return 2 if all(r.refused for r in failed) and not done else 1


class DaemonNotAnswering(MirrorError):
    """A process holds the socket but sent no reply within the client's timeout: stopped,
    stuck, or still starting (the daemon binds its socket before it takes over its captures
    and mounts its entries, and answers only then). `pid`: the process listening there, as the
    kernel says (SO_PEERCRED); None when even the connection was not accepted."""

    def __init__(self, message: str, *, pid: int | None, obj: str):
        super().__init__(message, errno=errno_module.ETIMEDOUT, obj=obj)
        self.pid = pid

    @property
    def said(self) -> str:
        """The message, with why as the kernel says (e.g. stopped by a signal: what resumes it)."""
        from app.services.host import process_state
        return self.message + (process_state(self.pid) if self.pid else "")
