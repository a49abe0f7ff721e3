"""Drive the real app (real services, this host's devices and mounts) against a temp config and
save an SVG of every screen into screenshots/. Run after a screen changes:

    .venv/bin/python screenshots/make_screenshots.py [--size 120x36]

Nothing on the host is changed: the config lives in a temp directory, and no action that
attaches, mounts or writes outside it is pressed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from app.services.config import ConfigStore  # noqa: E402
from app.ui import make_app  # noqa: E402

# WATCHERS never finish (kernel watchers, DirectoryTree's queue): do not wait for them.
WATCHERS = ("mount-watcher", "uevent-monitor", "daemon-watcher", "_loader")
SHOTS = [  # (file name, keys pressed from the main menu)
    ("main-menu", []),
    ("filesystem", ["1"]),
    ("filesystem-add", ["1", "a"]),
    ("block", ["2"]),
    ("block-excluded", ["2", "x"]),
    ("manual", ["3"]),
    ("dashboard", ["4"]),
    ("daemon", ["5"]),
    ("help", ["6"]),
]


async def settle(pilot) -> None:
    for _ in range(3):
        busy = [w for w in pilot.app.workers if w.group not in WATCHERS and not w.is_finished]
        if busy:
            await pilot.app.workers.wait_for_complete(busy)
        await pilot.pause()


async def shoot(config: Path, name: str, keys: list[str], size: tuple[int, int], out: Path) -> None:
    app = make_app(config_path=config)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        for key in keys:
            await pilot.press(key)
            await settle(pilot)
        await pilot.pause(0.3)  # let the dashboard's first rate sample land
        app.save_screenshot(str(out / f"{name}.svg"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="120x36", help="terminal size, WIDTHxHEIGHT")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    size = tuple(int(n) for n in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="mirrorsetup-shots-") as tmp:
        data = Path(tmp) / "srv" / "data"
        data.mkdir(parents=True)
        config = Path(tmp) / "replication.toml"
        ConfigStore(config).add_filesystem(data)
        for name, keys in SHOTS:
            asyncio.run(shoot(config, name, keys, size, args.out))
            print(args.out / f"{name}.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
