"""Textual screens. No syscalls here: every action calls app.services (in thread workers)."""

from __future__ import annotations

import importlib

# screen name -> (module, class); imported on first use so `mirrorsetup --help` stays fast.
SCREEN_CLASSES = {
    "main_menu": ("app.screens.main_menu", "MainMenuScreen"),
    "filesystem": ("app.screens.filesystem", "FilesystemScreen"),
    "block": ("app.screens.block", "BlockScreen"),
    "manual": ("app.screens.manual", "ManualScreen"),
    "dashboard": ("app.screens.dashboard", "DashboardScreen"),
    "daemon": ("app.screens.daemon", "DaemonScreen"),
    "help": ("app.screens.help", "HelpScreen"),
}


def screen_class(name: str) -> type:
    module, cls = SCREEN_CLASSES[name]
    return getattr(importlib.import_module(module), cls)
