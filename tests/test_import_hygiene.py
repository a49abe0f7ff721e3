"""The layers' import rules (DESIGN.md): services never import Textual or the engine; the
engine never imports the CLI, the screens or the App; screens (and the App) make no syscalls,
they call services; and a scripted CLI call never loads Textual."""

from __future__ import annotations

import argparse
import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import app.engine
import app.services

APP = Path(__file__).resolve().parent.parent / "app"
SERVICES = sorted(m.name for m in pkgutil.iter_modules(app.services.__path__))
ENGINE = sorted(m.name for m in pkgutil.iter_modules(app.engine.__path__))
# Modules through which a screen would talk to the kernel itself.
SYSCALL_MODULES = {"os", "subprocess", "socket", "fcntl", "ctypes", "select", "psutil",
                   "pyudev", "shutil", "signal", "mmap", "pathlib"}


def _imported_in_fresh_interpreter(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         check=True, capture_output=True, text=True).stdout
    return set(out.split())


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _under(names: set[str], *packages: str) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in packages)}


def test_services_do_not_import_textual_or_the_engine():
    assert len(SERVICES) > 10 and "daemonctl" in SERVICES and "events" in SERVICES
    code = "\n".join(f"import app.services.{name}" for name in SERVICES)
    modules = _imported_in_fresh_interpreter(code)
    assert "app.services.events" in modules  # the imports really happened
    assert not _under(modules, "textual", "app.engine"), _under(modules, "textual", "app.engine")
    for name in SERVICES:  # lazy imports inside functions count too
        path = APP / "services" / f"{name}.py"
        assert not _under(_imports(path), "textual", "app.engine"), path


def test_the_engine_does_not_import_the_cli_the_screens_or_the_app():
    assert "daemon" in ENGINE and "commands" not in ENGINE  # the CLI's commands left the engine
    code = "\n".join(f"import app.engine.{name}" for name in ENGINE)
    modules = _imported_in_fresh_interpreter(code)
    assert "app.engine.daemon" in modules
    assert not _under(modules, "app.cli", "app.screens", "app.ui", "textual")
    for name in ENGINE:
        path = APP / "engine" / f"{name}.py"
        if not path.exists():  # a compiled module (app/engine/_fuseread.c): it imports nothing
            assert "PyImport_" not in (APP / "engine" / f"{name}.c").read_text(), name
            continue
        assert not _under(_imports(path), "app.cli", "app.screens", "app.ui"), path


def test_screens_and_the_app_make_no_syscalls():
    """They import no module that talks to the kernel and never open() a file themselves."""
    files = sorted((APP / "screens").glob("*.py")) + [APP / "ui.py"]
    for path in files:
        imported = {n.split(".")[0] for n in _imports(path) if not n.startswith("app.")}
        assert not imported & SYSCALL_MODULES, (path.name, imported & SYSCALL_MODULES)
        calls = [n for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "open"]
        assert not calls, path.name


def test_cli_module_does_not_import_textual():
    modules = _imported_in_fresh_interpreter("import app.cli; app.cli.build_parser()")
    assert "app.cli" in modules and "app.cli.block" in modules
    assert not _under(modules, "textual")


def test_serve_target_starts_without_the_other_commands():
    """sshd runs `mirrorsetup serve-target` once per replication session, in series with the
    handshake: it builds only its own parser and imports no other command's module (they
    were about 35 ms of each session's start)."""
    code = ("import os, sys\nimport app.engine.agent as agent\nagent.main = lambda root: 0\n"
            "os._exit = lambda code: None\nimport app.cli\n"
            "app.cli.main(['serve-target', '--root', '/nonexistent'])")
    modules = _imported_in_fresh_interpreter(code)
    assert "app.cli" in modules
    assert not {m for m in modules if m.startswith("app.cli.")}, modules
    # nor what only some sessions need (OpenSSL's start, uuid with platform, socket, random):
    # about 15 ms more of each start; importlib.metadata (its version) was 29 ms of each HELLO
    agent = _imported_in_fresh_interpreter("import app.engine.agent as a\na._version()")
    assert "app.engine.agent" in agent
    assert not agent & {"hashlib", "uuid", "socket", "random", "importlib.metadata"}, \
        agent & {"hashlib", "uuid", "socket", "random", "importlib.metadata"}


def test_a_call_that_names_its_command_builds_only_that_ones_parser_with_the_same_result():
    """Every scripted call built the parser of every command (about 17 ms of `block
    detach-all`'s 170 here): a call naming its command builds and imports only that one, and
    parses to exactly what the whole parser gives, errors included."""
    from app import cli
    calls = [["block", "detach-all"], ["--json", "--config", "/c", "fs", "list"],
             ["--config=/c", "status", "--watch"], ["--socket", "/s", "target", "list", "--json"],
             ["failback", "--help"], ["replica", "promote", "x", "--force"], ["tui"],
             ["block", "attach", "--no-such-option"], ["config", "nonsense"]]
    for argv in calls:
        got = []
        for parser in (cli.build_parser(), cli.build_parser(cli.command_of(argv))):
            try:
                got.append(vars(parser.parse_args(argv)))
            except SystemExit as exc:
                got.append(("exit", exc.code))
        assert got[0] == got[1], argv
    assert [cli.command_of(a) for a in calls[:3]] == ["block", "fs", "status"]
    for argv in ([], ["--help"], ["-V", "fs"], ["--conf", "/c", "fs"], ["fs2"], ["--json"]):
        assert cli.command_of(argv) is None, argv  # the whole parser: help, -V, abbreviations
    modules = _imported_in_fresh_interpreter(
        "import app.cli; app.cli.build_parser(app.cli.command_of(['block', 'list']))")
    assert {f"app.cli.{g}" for g in cli._GROUPS} & modules == {"app.cli.block"}
    usage = cli.build_parser().format_help()
    assert all(name in usage for name in cli.COMMANDS)
    for name in cli.COMMANDS:  # each name's module registers it
        sub = next(a for a in cli.build_parser(name)._actions
                   if isinstance(a, argparse._SubParsersAction))
        assert name in sub.choices, name
