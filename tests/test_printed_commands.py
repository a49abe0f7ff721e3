"""The commands a message tells the administrator to run (`mirrorsetup …`) run as printed,
without a terminal: each parses with the CLI's own parser, with the entry it names (a path
with a space), and one that asks to confirm carries its --yes (tests/test_remote.py checks the
split brain's and a switched-over entry's the same way)."""

from __future__ import annotations

import re
import shlex
import types

import pytest
import trio

from app.services.results import MirrorError

ENTRY = "/srv/my data"


def advised(text: str) -> list[list[str]]:
    return [shlex.split(c) for c in re.findall(r"`(mirrorsetup [^`]*)`", text)]


def runs_as_printed(text: str, *, verbs: set[str]) -> None:
    """Every command in `text` parses, names ENTRY, and has --yes where it confirms; together
    they are the `verbs` (a command's first words)."""
    from app.cli import build_parser, command_of
    commands = advised(text)
    assert {" ".join(c[1:2] if c[1] != "replica" else c[1:3]) for c in commands} == verbs, text
    for argv in commands:
        args = build_parser(command_of(argv[1:])).parse_args(argv[1:])
        assert getattr(args, "yes", True), f"{shlex.join(argv)} asks to confirm: give --yes"
        assert getattr(args, "entry", ENTRY) == ENTRY, argv


def test_resolve_without_a_side_names_a_fail_back_that_runs():
    """The daemon's "say which side wins" told `mirrorsetup failback KEY`, refused for want of
    --yes (exit 2), and a path with a space split in two."""
    from app.engine.failover import Failover
    with pytest.raises(MirrorError) as said:
        trio.run(Failover.__new__(Failover).resolve, "fs", ENTRY, None, False)
    runs_as_printed(said.value.message, verbs={"failback"})


def test_the_cli_s_resolve_without_a_side_quotes_the_entry(monkeypatch):
    from app.cli import replica
    from app.cli.common import Refused
    monkeypatch.setattr(replica, "_require_entry", lambda args: None)
    monkeypatch.setattr(replica, "replication", lambda args: None)
    monkeypatch.setattr(replica, "require_daemon", lambda rep: None)
    with pytest.raises(Refused) as said:
        replica.cmd_resolve(types.SimpleNamespace(entry=ENTRY, discard_target=False, yes=False,
                                                  json=False))
    runs_as_printed(str(said.value), verbs={"failback"})


def test_a_switch_over_refused_by_a_split_brain_quotes_the_entry():
    """The capture's refusal of a switch-over in a split brain named the entry unquoted."""
    from app.engine.capture import Capture
    cap = Capture.__new__(Capture)
    cap.spec = types.SimpleNamespace(key=ENTRY)
    cap.catching, cap.consistent = None, False
    cap.journal = types.SimpleNamespace(behind=False)
    for said, how in ((None, "split brain"), ({"changes_here": False}, "fail-over")):
        cap.shipper = types.SimpleNamespace(fig=types.SimpleNamespace(
            connection="refused: split brain", refusal="split-brain", refusal_said=said))
        reply = trio.run(cap._drain, 5.0)
        assert not reply.get("ok") and f"promoted meanwhile ({how})" in reply["error"], reply
        runs_as_printed(reply["error"], verbs={"failback", "replica resolve"})
