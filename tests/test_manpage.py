"""mirrorsetup(8): written from the CLI's own parser, so it names every command and option
`--help` does; groff reads it without a warning; `service install` puts it where man finds it
and the unit's Documentation= points."""

from __future__ import annotations

import argparse
import shutil
import subprocess

import pytest
from test_cli_conventions import cli

from app.cli import build_parser, serve_target_parser
from app.cli.manpage import MAN_DIR, MAN_NAME, _subcommands, page


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every command that runs something."""
    for name, _help, sub in _subcommands(parser):
        children = list(_subcommands(sub))
        if children:
            yield from _leaves(sub, path + (name,))
        elif name != "tui":
            yield path + (name,), sub


def _roffed(text: str) -> str:
    return text.replace("-", "\\-")


def test_the_page_names_every_command_and_option_the_parser_has():
    text = page()
    leaves = list(_leaves(build_parser()))
    assert len(leaves) > 30  # fs, block, manual, status, daemon, service, config, target, …
    for words, sub in leaves + [(("serve-target",), serve_target_parser())]:
        heading = _roffed("mirrorsetup " + " ".join(words))
        assert f"\\fB{heading}" in text, f"no entry for {' '.join(words)}"
        for action in sub._actions:
            for option in action.option_strings:
                if option in ("-h", "--help", "--config", "--socket", "--json"):
                    continue  # said once, under OPTIONS
                assert _roffed(option) in text, f"{' '.join(words)}: {option} missing"
    for common in ("--config", "--socket", "--json", "MIRRORSETUP_STATE_DIR", "EXIT STATUS"):
        assert _roffed(common) in text


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed "
                    "(packaging/setup.sh --test installs groff-base)")
def test_groff_reads_the_page_without_a_warning():
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=page(),
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    shown = subprocess.run(["groff", "-man", "-Tutf8"], input=page(), capture_output=True,
                           text=True, check=True).stdout
    assert "MIRRORSETUP(8)" in shown and "serve-target" in shown.replace("\u2010", "-")


def test_service_man_prints_it_and_install_puts_it_beside_the_unit(tmp_path):
    r = cli("service", "man")
    assert r.returncode == 0 and r.stdout == page(), r.stderr
    r = cli("service", "install", "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    installed = tmp_path / MAN_DIR.lstrip("/") / MAN_NAME
    assert installed.read_text() == page() and str(installed) in r.stdout
    assert oct(installed.stat().st_mode & 0o777) == "0o644"
    unit = (tmp_path / "etc" / "systemd" / "system" / "mirrorsetup.service").read_text()
    assert "Documentation=man:mirrorsetup(8)" in unit
