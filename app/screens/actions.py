"""Every screen and every key in one registry: the main menu, each screen's bindings (and so
its footer), the command palette and the Help screen's key list are derived from it.

A new screen (e.g. "Targets") is one module with its Screen class, one `ScreenInfo` below and
its `Action`s; nothing else is edited. An action named `x` runs the screen's `action_x`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from textual.binding import Binding


@dataclass(frozen=True)
class ScreenInfo:
    name: str
    module: str
    cls: str
    label: str  # main menu and palette
    hint: str  # the menu's second line and the palette's help
    menu_key: str | None = None  # "1".."9": on the main menu


@dataclass(frozen=True)
class Action:
    screen: str
    name: str  # the screen's action_<name>
    keys: str  # Textual key names, comma-separated
    label: str  # the footer's word(s)
    title: str  # the palette's title
    help: str  # the palette's help line and the Help screen's description
    footer: bool = True  # shown in the footer (else: Help screen, palette and buttons)
    palette: bool = True
    key_display: str | None = None


SCREENS: tuple[ScreenInfo, ...] = (
    ScreenInfo("main_menu", "app.screens.main_menu", "MainMenuScreen", "Main menu",
               "back to the setup tasks"),
    ScreenInfo("filesystem", "app.screens.filesystem", "FilesystemScreen",
               "Configure file system replication",
               "directories captured by mirrorfs; add, remove, mount/unmount all", "1"),
    ScreenInfo("block", "app.screens.block", "BlockScreen", "Configure block device replication",
               "devices used through /dev/loopN; add, remove, attach/detach all", "2"),
    ScreenInfo("manual", "app.screens.manual", "ManualScreen", "Manual replication (deprecated)",
               "attach or detach a loop now; not persisted across restarts", "3"),
    ScreenInfo("dashboard", "app.screens.dashboard", "DashboardScreen", "Status dashboard",
               "live mounts, loops, warnings, events and rates", "4"),
    ScreenInfo("daemon", "app.screens.daemon", "DaemonScreen", "Daemon",
               "start, stop or restart the replication engine", "5"),
    ScreenInfo("help", "app.screens.help", "HelpScreen", "Help",
               "keys, and what to know before replicating", "6"),
    ScreenInfo("targets", "app.screens.targets", "TargetsScreen", "Remote targets and fail-over",
               "hosts that keep replicas; switch over, fail back, split brain", "7"),
)

ACTIONS: tuple[Action, ...] = (
    Action("filesystem", "add", "a", "Add", "Add file system entry", "replicate a directory"),
    Action("filesystem", "remove", "r,delete", "Remove", "Remove file system entry",
           "stop replicating the selected directory (its mirrorfs is unmounted first)"),
    Action("filesystem", "toggle_atime", "t", "Atime", "Toggle access-time replication",
           "replicate access times for the selected directory, or stop"),
    Action("filesystem", "set_target", "e", "Target", "Set file system entry target",
           "replicate the selected directory to another target, or to none (checked as at an "
           "add; a captured directory is unmounted and mounted again)", footer=False),
    Action("filesystem", "mount_all", "m", "Mount all", "Mount all file system entries",
           "mount mirrorfs on every entry now (via the daemon)"),
    Action("filesystem", "unmount_all", "u", "Unmount all", "Unmount all file system entries",
           "unmount mirrorfs from every entry (via the daemon)"),
    Action("filesystem", "mirror", "c", "Mirror", "Mirror file system entry",
           "make the selected directory's target equal to it (what differs is copied)"),
    Action("filesystem", "verify", "v", "Verify", "Verify file system entry",
           "compare the selected directory with its target, list every difference"),
    Action("filesystem", "accept", "n", "Accept FS", "Accept a directory's new file system",
           "the selected directory's capture was refused: it is not on the file system recorded "
           "for it; take that as it is now (shown first; its replica is then made equal to it)"),
    Action("filesystem", "details", "i", "Details", "File system entry details",
           "everything about the selected directory (Enter too)", footer=False, palette=False),

    Action("block", "add", "a", "Add", "Add block entry",
           "replicate the device selected in the picker (Enter on it does too)"),
    Action("block", "remove", "r,delete", "Remove", "Remove / detach block entry",
           "detach and stop replicating the selected entry"),
    Action("block", "attach_all", "t", "Attach all", "Attach all block entries",
           "attach every entry to its loop device now (captured when the daemon runs)"),
    Action("block", "detach_all", "d", "Detach all", "Detach all block entries",
           "detach the loop devices of every entry"),
    Action("block", "set_target", "e", "Target", "Set block entry target",
           "replicate the selected entry to another target, or to none (while it is detached)",
           footer=False),
    Action("block", "mirror", "m", "Mirror", "Mirror block entry",
           "make the selected entry's target equal to its device (blocks that differ)"),
    Action("block", "verify", "v", "Verify", "Verify block entry",
           "compare the selected entry with its target, list the ranges that differ"),
    Action("block", "toggle_excluded", "x", "Swap", "Show excluded block devices",
           "show or hide swap and LVM physical volumes in the picker"),
    Action("block", "accept", "n", "Accept dev", "Accept a block entry's new device",
           "the selected entry's capture was refused: its device is not the one recorded for it; "
           "take it as it is now (shown first; its replica is then made equal to it)"),
    Action("block", "details", "i", "Details", "Block entry details",
           "everything about the selected entry (Enter in the lower table too)", footer=False,
           palette=False),

    Action("manual", "detach_selected", "ctrl+d", "Detach selected", "Detach selected loop",
           "detach the loop selected in the table now (not persisted)", palette=False),

    Action("dashboard", "events", "e", "Events", "Dashboard event log",
           "every mount, device and state change seen since the dashboard opened"),
    Action("dashboard", "engine", "g", "Engine", "Dashboard engine and rates",
           "the daemon's figures per entry and the I/O rates"),
    Action("dashboard", "warnings", "w", "Warnings", "Dashboard warnings",
           "every warning in full"),
    Action("dashboard", "accept", "n", "Accept", "Accept an entry's new device or file system",
           "the selected entry's capture was refused: it is not on the device or file system "
           "recorded for it; take that as it is now (shown first)"),
    Action("dashboard", "details", "i", "Details", "Dashboard entry details",
           "everything about the selected entry (Enter too)", footer=False, palette=False),

    Action("targets", "add", "a", "Add", "Add remote target",
           "add a host that keeps replicas: a dedicated key, its host key shown and pinned"),
    # (not in the footer: no room at 80 columns; the screen has its button)
    Action("targets", "edit", "e", "Edit", "Edit remote target",
           "change the selected target's port, user, key, pins, bandwidth or compression (not "
           "its host or root)", footer=False),
    Action("targets", "test", "t", "Test", "Test remote target",
           "connect to the selected target and greet its agent"),
    Action("targets", "key_line", "k", "Key line", "Remote target authorized_keys line",
           "the line for the target's ~/.ssh/authorized_keys"),
    Action("targets", "rekey", "h", "Re-pin", "Re-pin remote target host key",
           "after a reinstall: the key the selected target offers now is shown, then pinned"),
    Action("targets", "remove", "r,delete", "Remove", "Remove remote target",
           "remove the selected target (refused while an entry uses it)"),
    # "Switch", not "Switch over": the footer has room for r at 80 columns
    Action("targets", "switchover", "s", "Switch", "Switch over to the replica",
           "planned: drain, stop capturing here, promote the selected entry's replica"),
    Action("targets", "failback", "f", "Fail back", "Fail back from the replica",
           "the promoted replica's data comes back (what differs); capture here again"),
    Action("targets", "resolve", "o", "Keep this host", "Split brain: keep this host",
           "discard the replica's promotion; it is made equal to this host's data"),
    Action("targets", "moved", "m", "Moved for good", "Moved for good: remove the entry here",
           "the service moved to the replica's host for good (switched over): it stays primary "
           "there, the entry is removed here and its copy made writable", footer=False),
    Action("targets", "details", "i", "Details", "Replica details",
           "everything about the selected entry's replication (Enter too)", footer=False,
           palette=False),

    Action("daemon", "start", "s", "Start", "Start daemon", "start the replication engine"),
    Action("daemon", "stop", "p", "Stop", "Stop daemon", "stop the replication engine"),
    Action("daemon", "restart", "r", "Restart", "Restart daemon",
           "restart the replication engine"),
)

# Keys every screen has (the App's and TaskScreen's bindings), for the Help screen.
GLOBAL_KEYS = (("q / Esc", "back one level (q on the main menu quits)"),
               ("ctrl+q", "quit from anywhere"),
               ("ctrl+p", "every command, searchable"))


def screen_info(name: str) -> ScreenInfo:
    return next(s for s in SCREENS if s.name == name)


def screen_class(name: str) -> type:
    info = screen_info(name)
    return getattr(importlib.import_module(info.module), info.cls)


def menu() -> list[ScreenInfo]:
    return [s for s in SCREENS if s.menu_key]


def actions(screen: str) -> list[Action]:
    return [a for a in ACTIONS if a.screen == screen]


def action(screen: str, name: str) -> Action:
    return next(a for a in ACTIONS if a.screen == screen and a.name == name)


def key_of(screen: str, name: str) -> str:
    """The key an administrator presses for an action, as the footer shows it."""
    a = action(screen, name)
    return a.key_display or a.keys.split(",")[0]


def bindings(screen: str) -> list[Binding]:
    return [Binding(a.keys, a.name, a.label, show=a.footer, key_display=a.key_display,
                    tooltip=a.help) for a in actions(screen)]


def palette() -> list[tuple[str, str, str, str | None]]:
    """(title, help, screen, action or None to open the screen) for the command palette."""
    entries = [(s.label, s.hint, s.name, None) for s in SCREENS]
    entries += [(a.title, a.help, a.screen, a.name) for a in ACTIONS if a.palette]
    return entries


def keys_markdown() -> str:
    """The Help screen's key list: one line per key, grouped by screen."""
    lines = ["## Keys", "**Everywhere**", ""]
    lines += [f"- **{k}** — {w}" for k, w in GLOBAL_KEYS]
    lines += ["", "**Main menu**", "",
              "- **↑ ↓ Enter**, " + ", ".join(f"**{s.menu_key}**" for s in menu())
              + ", or a click — open a task"]
    for s in menu():
        acts = actions(s.name)
        if acts:
            title = s.label.removeprefix("Configure ")
            lines += ["", f"**{title[0].upper() + title[1:]}**", ""]
            lines += [f"- **{_keys(a)}** — {a.help}" for a in acts]
    return "\n".join(lines)


def _keys(a: Action) -> str:
    return a.key_display or " / ".join(k.replace("delete", "Del").replace("enter", "Enter")
                                       for k in a.keys.split(","))
