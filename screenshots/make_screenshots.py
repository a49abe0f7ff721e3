#!/usr/bin/env python3
"""The README's pictures, of the product at work (as root):

    .venv/bin/python screenshots/make_screenshots.py [--size 120x36] [--out DIR]

It builds a small throw-away demo in a private temp directory: two sparse images on loop
devices (one with ext4, mounted, holding the file-system entry and its target side by side:
the engine's first copy uses copy_file_range, which this kernel refuses across file systems;
one a bare "disk" for the block entry), a configuration file, control socket and state
directory of its own, and a
daemon of its own started through the same service as the Daemon screen. The daemon mounts
mirrorfs on the file-system entry and captures the block entry, both with a local target; a
second file-system entry replicates to a remote target, `backup1`: a second "host" made by
tests/netbed.py (a network namespace with its own sshd, torn down with the demo), added the
way an administrator does (`target add`, its host key pinned, the key's authorized_keys line
installed there). A little traffic (files written through mirrorfs, blocks written through the captured loop)
makes the rates, queues and lag real. Then it runs the real app over those services and saves
an SVG of each screen. Everything is torn down in a finally: the daemon stopped (killed by
pid if it will not), mounts under the temp directory unmounted, the loops backed by its files
detached, the directory removed. The picker shows the host's disks and the demo's loops only
(never other programs' loops).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from app.services import blockdevs, daemonctl  # noqa: E402
from app.services import loop as loopdev  # noqa: E402
from app.services.config import ConfigStore  # noqa: E402
from app.services.control import ControlClient  # noqa: E402
from app.services.mounts import read_mountinfo  # noqa: E402
from app.ui import make_app  # noqa: E402
from netbed import TwoHosts  # noqa: E402

IMAGE_SIZE = 256 << 20  # sparse
TRAFFIC_CHUNK = 256 << 10
TRAFFIC_PAUSE = 0.05  # seconds between writes: a few MiB/s, enough for real rates and queues
RATE_SAMPLES = 3.5  # seconds on the dashboard: the sampler needs two samples for a rate
SETTLE_TRIES = 300  # × 0.1 s: the daemon mounts and captures a moment after it answers
SHOTS = [  # (file name, keys pressed from the main menu)
    ("main-menu", []),
    ("filesystem", ["1"]),
    ("filesystem-add", ["1", "a"]),
    ("block", ["2"]),
    ("block-details", ["2", "i"]),
    ("manual", ["3"]),
    ("dashboard", ["4"]),
    ("daemon", ["5"]),
    ("help", ["6"]),
    ("targets", ["7"]),
]
WATCHERS = ("_loader",)  # workers that never finish (DirectoryTree's queue): not waited for


def run(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout.strip()


class Demo:
    """The throw-away installation; `close()` undoes every part that was made."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ms-demo-"))  # short: paths fit the tables
        os.chmod(self.root, 0o755)
        self.volume = self.root / "srv"
        self.data = self.volume / "data"
        self.shared = self.volume / "shared"
        self.bed: TwoHosts | None = None
        self.settings = daemonctl.DaemonSettings.resolve(
            self.root / "etc" / "replication.toml", self.root / "run" / "control.sock",
            self.root / "state")
        self.loops: list[str] = []
        self.stop = threading.Event()
        self.traffic: list[threading.Thread] = []

    def image(self, name: str) -> str:
        path = self.root / "images" / name
        path.parent.mkdir(exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(IMAGE_SIZE)
        loop = loopdev.attach(str(path)).device
        self.loops.append(loop)
        return loop

    def build(self) -> None:
        fs_disk, block_disk = self.image("data.img"), self.image("disk.img")
        run("mkfs.ext4", "-q", "-L", "srv", fs_disk)
        self.volume.mkdir()
        run("mount", fs_disk, str(self.volume))
        for name in ("reports", "photos"):
            (self.data / name).mkdir(parents=True)
            (self.data / name / "readme.txt").write_text(f"{name}\n")
        (self.volume / "backup").mkdir()
        (self.root / "backup").mkdir()
        store = ConfigStore(self.settings.config)
        store.add_filesystem(self.data, target=str(self.volume / "backup" / "data"))
        self.remote_target()
        self.shared.mkdir()
        (self.shared / "plan.txt").write_text("kept on backup1 too\n")
        store.add_filesystem(self.shared, target="backup1:shared")
        store.add_block(block_disk, target=str(self.root / "backup" / "disk.img"))
        self.block_disk = block_disk
        result = daemonctl.start(self.settings)
        if result.failed:
            raise SystemExit(f"the demo daemon did not start: {result.message}")
        for _ in range(SETTLE_TRIES):
            mounted = {m.mount_point for m in read_mountinfo() if m.fstype == "fuse.mirrorfs"}
            if self.captured_loop() and {str(self.data), str(self.shared)} <= mounted:
                break
            time.sleep(0.1)
        else:
            raise SystemExit("the demo daemon did not mount and capture its entries")

    def cli(self, *argv: str) -> str:
        return run(sys.executable, "-m", "app", "--config", str(self.settings.config), *argv)

    def remote_target(self) -> None:
        """backup1: another "host" (a network namespace with its sshd), added as an
        administrator adds one: the host key's fingerprint pinned, the key line installed."""
        self.bed = TwoHosts(self.root)
        self.bed.start()
        replicas = self.root / "replicas"
        replicas.mkdir()
        fingerprint = run("ssh-keygen", "-lf", f"{self.bed.host_key}.pub").split()[1]
        self.cli("target", "add", "backup1", "--host", self.bed.target_addr, "--port",
                 str(self.bed.port), "--root", str(replicas), "--ssh-config",
                 str(self.bed.ssh_config), "--agent", str(Path(sys.executable).parent /
                                                          "mirrorsetup"),
                 "--bandwidth", "20MiB/s", "--accept-host-key", fingerprint)
        self.bed.set_authorized_keys([self.cli("target", "authorized-key", "backup1")])

    def captured_loop(self) -> str | None:
        status = ControlClient(self.settings.socket).request("status")
        row = next((b for b in status.get("block", []) if b.get("key") == self.block_disk), {})
        return row.get("loop") if row.get("captured") else None

    def start_traffic(self) -> None:
        loop = self.captured_loop()

        def files() -> None:
            n = 0
            while not self.stop.wait(TRAFFIC_PAUSE):
                for path in (self.data / "reports" / f"day-{n % 50:02d}.log",
                             self.shared / f"notes-{n % 20:02d}.txt"):
                    with open(path, "ab") as f:
                        f.write(os.urandom(TRAFFIC_CHUNK // 4))
                        os.fsync(f.fileno())  # to the disk now, so its rate shows
                n += 1

        def blocks() -> None:
            fd = os.open(loop, os.O_WRONLY | os.O_CLOEXEC)
            try:
                offset = 0
                while not self.stop.wait(TRAFFIC_PAUSE):
                    os.pwrite(fd, os.urandom(TRAFFIC_CHUNK), offset)
                    os.fsync(fd)  # through the loop now (not at writeback), so it is captured
                    offset = (offset + TRAFFIC_CHUNK) % (IMAGE_SIZE // 2)
            finally:
                os.close(fd)

        for target in (files, blocks):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self.traffic.append(thread)

    def close(self) -> None:
        self.stop.set()
        for thread in self.traffic:
            thread.join(10)
        client = ControlClient(self.settings.socket)
        pid = None
        if client.is_running():
            pid = client.request("ping").get("pid")
            daemonctl.stop(self.settings)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)  # only if it would not stop
            except ProcessLookupError:
                pass
        for m in sorted(read_mountinfo(), key=lambda m: -len(m.mount_point)):
            if m.mount_point.startswith(str(self.root) + "/"):
                subprocess.run(["umount", "-l", m.mount_point], capture_output=True)
        for s in loopdev.list_attached():  # the demo's disks and any capture loop left behind
            if s.device in self.loops or (s.backing_file or "").startswith(str(self.root) + "/"):
                loopdev.detach(s.device)
        if self.bed is not None:
            self.bed.close()  # sshd, the namespace and its link
        shutil.rmtree(self.root, ignore_errors=True)


async def settle(pilot) -> None:
    for _ in range(3):
        busy = [w for w in pilot.app.workers if w.group not in WATCHERS and not w.is_finished]
        if busy:
            await pilot.app.workers.wait_for_complete(busy)
        await pilot.pause()


async def shoot(demo: Demo, name: str, keys: list[str], size: tuple[int, int], out: Path) -> None:
    app = make_app(config_path=demo.settings.config, control_socket=demo.settings.socket,
                   state_dir=demo.settings.state_dir, is_root=True)
    app.services.device_lister = lambda include_excluded=True: [
        d for d in blockdevs.list_block_devices(include_excluded=include_excluded)
        if d.type != "loop" or d.path in demo.loops
        or (d.backing_file or "").startswith(str(demo.root) + "/")]  # no other program's loops
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        for key in keys:
            await pilot.press(key)
            await settle(pilot)
        if name == "dashboard":
            await pilot.pause(RATE_SAMPLES)
            await settle(pilot)
        app.save_screenshot(str(out / f"{name}.svg"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="120x36", help="terminal size, WIDTHxHEIGHT")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root: the demo attaches loops, mounts and runs a daemon", file=sys.stderr)
        return 2
    size = tuple(int(n) for n in args.size.split("x"))
    demo = Demo()
    try:
        demo.build()
        demo.start_traffic()
        for name, keys in SHOTS:
            asyncio.run(shoot(demo, name, keys, size, args.out))
            print(args.out / f"{name}.svg")
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
