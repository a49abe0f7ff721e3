"""The read-only banner, in a module of its own: the main menu shows it and must not load the
task screens' machinery (tables, workers) before its first frame."""

from __future__ import annotations

from textual.widgets import Static


class RootBanner(Static):
    """Shown when not root: everything is read-only, and why."""

    DEFAULT_CLASSES = "banner"

    def on_mount(self) -> None:
        self.display = not self.app.is_root
        self.update("Read-only: not running as root. Configuration, loop devices and mounts "
                    "belong to root; run `sudo mirrorsetup` to change them.")
