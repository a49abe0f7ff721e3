"""mirrorsetup(8), written from the CLI's own parser: every command, its arguments and their
help as `--help` says them, so the page never drifts from the program. `mirrorsetup service
man` prints it (`… | man -l -`); `mirrorsetup service install` installs it beside the unit,
whose Documentation= names it."""

from __future__ import annotations

import argparse
import re

from app import __version__
from app.services.config import DEFAULT_PATH
from app.services.daemonctl import DEFAULT_SOCKET, DEFAULT_STATE_DIR, LOG_NAME, STATE_DIR_ENV

MAN_DIR = "/usr/local/share/man/man8"
MAN_NAME = "mirrorsetup.8"

DESCRIPTION = (
    "mirrorsetup replicates directories and block devices, change by change and in order, to a "
    "target: a local path, or a directory or file on another host reached over OpenSSH, where "
    "the replica can take over when this host is gone. A directory is replicated through "
    "mirrorfs, a FUSE file system laid over it; a block device through a loop device "
    "(/dev/loopN) that applications use instead of the device. A daemon journals every change "
    "durably and applies the journal to each target; after any fault it resumes from the "
    "target's own position.",
    "Without a command (or with tui), mirrorsetup starts the full-screen console (keyboard and "
    "mouse) over the same calls as the commands below. Every command that changes something "
    "prints one line per entry; --json prints the same results as JSON on standard output.")
FILES = (
    (DEFAULT_PATH, "the configuration: directories, block devices, remote targets (TOML; "
                   "written atomically, under a lock)"),
    (DEFAULT_SOCKET, "the daemon's control socket (root only)"),
    (f"{DEFAULT_SOCKET.rsplit('/', 1)[0]}/{LOG_NAME}",
     "the daemon's log when it was started without systemd"),
    (DEFAULT_STATE_DIR, "the journals, positions and claims of every entry"),
    ("/etc/systemd/system/mirrorsetup.service", "the unit `mirrorsetup service install` writes"),
)
ENVIRONMENT = (
    ("MIRRORSETUP_CONFIG", "the configuration file, when --config is not given"),
    ("MIRRORSETUP_SOCKET", "the control socket, when --socket is not given"),
    (STATE_DIR_ENV, "the daemon's state directory, when --state-dir is not given"),
)
SEE_ALSO = ("losetup(8)", "mount(8)", "fusermount3(1)", "ssh(1)", "sshd(8)",
            "ssh_config(5)", "systemctl(1)", "systemd.mount(5)")


def _roff(text: str) -> str:
    """Plain text as roff: backslashes escaped, hyphens as \\-, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.split("\n"))


def _bold(text: str) -> str:
    return f"\\fB{_roff(text)}\\fR"


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    return parser._get_formatter()._expand_help(action)


def _subcommands(parser: argparse.ArgumentParser):
    """(name, help, parser) of each command below `parser`, in --help's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:  # an alias
                    continue
                seen.add(id(sub))
                yield name, helps.get(name) or sub.description or "", sub


COMMON_USAGE = re.compile(r" \[(-h|--config PATH|--socket PATH|--json)\]")


def _usage(parser: argparse.ArgumentParser) -> str:
    """The command's usage line without the options every command has (see OPTIONS)."""
    usage = re.sub(r"\s+", " ", parser.format_usage().strip().removeprefix("usage:").strip())
    return COMMON_USAGE.sub("", usage)


def _arguments(parser: argparse.ArgumentParser, skip: set[str],
               only: set[str] | None = None) -> list[str]:
    """.TP items of the parser's arguments: not those with an option string in `skip`;
    with `only`, just those with one in it."""
    out = []
    for action in parser._actions:
        if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)):
            continue
        if set(action.option_strings) & skip:
            continue
        if only is not None and not set(action.option_strings) & only:
            continue
        if action.option_strings:
            metavar = ""
            if action.nargs != 0:
                metavar = " \\fI" + _roff(parser._get_formatter()._metavar_formatter(
                    action, action.dest.upper())(1)[0]) + "\\fR"
            term = ", ".join(_bold(o) for o in action.option_strings) + metavar
        elif not _help(parser, action):
            continue  # a positional its usage line names and nothing more says
        else:
            term = "\\fI" + _roff(action.metavar or action.dest) + "\\fR"
        out += [".TP", term, _roff(_help(parser, action)) or "\\&"]
    return out


def _commands(parser: argparse.ArgumentParser, path: list[str], skip: set[str]) -> list[str]:
    out = []
    for name, help, sub in _subcommands(parser):
        if name == "tui":
            continue
        here = path + [name]
        children = list(_subcommands(sub))
        if children:
            out += [f'.SS "{_roff(" ".join(here))}"', _roff(help[:1].upper() + help[1:]) + "."]
            out += _commands(sub, here, skip)
            continue
        out += [".PP", _bold(_usage(sub)), ".RS"]
        text = sub.description or help
        if text:
            out += [_roff(text[:1].upper() + text[1:])]
        out += _arguments(sub, skip) + [".RE"]
    return out


def render(parser: argparse.ArgumentParser, serve_target: argparse.ArgumentParser) -> str:
    """The page, from the whole CLI parser (build_parser()) and serve-target's own."""
    from app.cli.common import EXIT_CODES
    common = {"--config", "--socket", "--json", "-h", "--help"}
    lines = [f'.TH MIRRORSETUP 8 "" "mirrorsetup {__version__}" "System Administration"',
             ".SH NAME", "mirrorsetup \\- replicate directories and block devices to another host",
             ".SH SYNOPSIS", ".B mirrorsetup",
             "[\\fB\\-\\-config\\fR \\fIPATH\\fR] [\\fB\\-\\-socket\\fR \\fIPATH\\fR] "
             "[\\fB\\-\\-json\\fR] [\\fICOMMAND\\fR ...]", ".br",
             ".B mirrorsetup serve\\-target \\-\\-root \\fIDIR\\fR", ".SH DESCRIPTION"]
    for i, para in enumerate(DESCRIPTION):
        lines += ([".PP"] if i else []) + [_roff(para)]
    lines += [".SH OPTIONS", "\\fB\\-\\-config\\fR, \\fB\\-\\-socket\\fR and \\fB\\-\\-json\\fR may "
              "stand before the command or after it."]
    lines += _arguments(parser, set(), only=common | {"--version"})
    lines += [".SH COMMANDS"] + _commands(parser, ["mirrorsetup"], common)
    lines += [".SS \"mirrorsetup serve-target\"".replace("-", "\\-"),
              "On the target host, run by sshd as the replication key's forced command "
              "(see \\fBmirrorsetup target authorized\\-key\\fR); no daemon and no listening "
              "port there.",
              ".PP", _bold(_usage(serve_target)), ".RS"]
    lines += _arguments(serve_target, {"-h", "--help"}) + [".RE"]
    codes = [line.strip() for line in EXIT_CODES.splitlines()[1:]]
    lines += [".SH EXIT STATUS"]
    for line in codes:
        code, _, text = line.partition("  ")
        if code.isdigit():
            lines += [".TP", _bold(code), _roff(text.strip())]
        else:
            lines[-1] += " " + _roff(line)
    lines += [".SH ENVIRONMENT"]
    for name, text in ENVIRONMENT:
        lines += [".TP", _bold(name), _roff(text)]
    lines += [".SH FILES"]
    for name, text in FILES:
        lines += [".TP", f"\\fI{_roff(name)}\\fR", _roff(text)]
    lines += [".SH SEE ALSO", ",\n".join(f"\\fB{_roff(p.split('(')[0])}\\fR({p.split('(')[1]}"
                                         for p in SEE_ALSO)]
    return "\n".join(lines) + "\n"


def page() -> str:
    from app.cli import build_parser, serve_target_parser
    return render(build_parser(), serve_target_parser())
