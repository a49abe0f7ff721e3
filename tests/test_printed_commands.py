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


SSH_REFUSALS = [  # (ssh's stderr, its exit status): each ends in a hint naming a command
    ("@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n@    WARNING: REMOTE HOST "
     "IDENTIFICATION HAS CHANGED!     @\n", 255),
    ("No ED25519 host key is known for backup1.example and you have requested strict "
     "checking.\nHost key verification failed.\n", 255),
    ("Host key verification failed.\n", 255),
    ("sh: 1: mirrorsetup: Permission denied\n", 126),
    ("sh: 1: mirrorsetup: not found\n", 127),
]


@pytest.mark.parametrize("stderr,status", SSH_REFUSALS)
def test_the_target_hints_run_as_printed_and_come_from_the_one_builder(stderr, status,
                                                                      monkeypatch):
    """The rekey and authorized-key hints were f-strings of their own: each now is
    layout.command's (quoted as every other printed command), and parses as printed."""
    from app.cli import build_parser
    from app.services import targets
    text, _retry = targets.ssh_failure_text(stderr, status, "backup1")
    (argv,) = advised(text)
    args = build_parser("target").parse_args(argv[1:])
    assert args.name == "backup1" and argv[2] in ("rekey", "authorized-key"), argv
    monkeypatch.setattr(targets, "command", lambda *words: "<built: " + " ".join(words) + ">")
    text, _retry = targets.ssh_failure_text(stderr, status, "backup1")
    assert f"<built: target {argv[2]} backup1>" in text and "`mirrorsetup target" not in text, text


def test_the_verify_hint_to_mirror_quotes_the_entry(monkeypatch, capsys):
    """`fs verify`'s "to make the target equal" named the entry unquoted."""
    from app.cli import fs
    entry = types.SimpleNamespace(path=ENTRY)
    monkeypatch.setattr("app.services.entries.configured_fs", lambda store, path: entry)
    monkeypatch.setattr("app.services.entries.fs_verify",
                        lambda rep, path: ([], [{"path": "x", "what": "content"}]))
    monkeypatch.setattr(fs, "replication", lambda args: types.SimpleNamespace(store=None))
    monkeypatch.setattr(fs, "require_daemon", lambda rep: None)
    monkeypatch.setattr("app.services.entries.describe_difference", lambda d: "x differs")
    assert fs.cmd_verify(types.SimpleNamespace(path=ENTRY, json=False)) == 1
    from app.cli import build_parser
    (argv,) = advised(capsys.readouterr().err)
    assert argv[1:3] == ["fs", "mirror"] and build_parser("fs").parse_args(argv[1:]).path == ENTRY
