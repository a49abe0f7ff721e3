"""Keys (from the action registry), and the seed's notes in our words: what an administrator
must know before replicating."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Markdown

from app.screens import actions

NOTES = """\
## Before you change what is replicated
- **Stop the applications** that use a directory or device first, and start them again
  after the change: mirrorsetup must be in place *before* any application writes, or some
  changes are never replicated.
- **Load order at boot:** the daemon starts before the applications, and before NFS and Samba.
- **NFS and Samba go above mirrorfs**: export the replicated directory (mounted as mirrorfs),
  never the storage underneath. mirrorfs sits just above the storage file system.
- **Never the root directory `/`.** On a single-disk system, add the directories directly
  under `/` that you want replicated instead. An entry that breaks a rule (added by hand to
  the file) is shown as **invalid** everywhere, with the reason.
- Add the *highest* directory whose changes should be captured: a mount point or any
  directory inside one.

## Access times
Replicating access times turns every read into a replication operation, during the initial
mirror too; that can cost a lot of performance. It is off by default. Access times at file close
are replicated either way.

## Block devices
- Replicated block devices are reached **only through their loop device `/dev/loopN`**.
  A write to the device itself is not captured and **corrupts the target**; the dashboard
  warns when the raw device is mounted or open for writing.
- **Do not mount them from `/etc/fstab`.** Mount the loop device from a script that runs after
  the daemon has attached it.
- Give an entry a fixed `/dev/loopN` when you use more than one, so it is the same device after
  a restart; "first free" may pick another one next time.
- The daemon **captures** an attached entry: it holds the device exclusively and journals every
  write through the loop device to the entry's **target** (a file or another block device).
  Without the daemon, Attach all still attaches a loop, but its writes are **not captured**;
  the Capture column says which. **Mirror** makes the target equal to the device, copying
  only the 1 MiB blocks whose hashes differ; **Verify** compares them the same way and lists
  the byte ranges that differ.
- Swap and LVM physical volumes are not offered (`x` shows them, greyed, with the reason); the
  disk holding the root file system cannot be picked.
- Loop encryption no longer exists in Linux; put dm-crypt/LUKS under the device instead.

## Manual replication (deprecated)
Attaches and detaches a loop device *now*. Nothing is written to the configuration, so it is
gone after a restart; use block device replication to keep it.

## Mount all / Attach all, and Force
Apply the configuration now instead of at the next daemon start, so you can check the effect.
Unmount all / Detach all let you change the configuration without stopping the daemon. Each entry
reports its own result; a busy mount lists the processes holding it. When an entry is refused
because it is busy, the results offer **Force…**, which first says what it means: a *lazy
unmount* detaches the path now while open files keep using mirrorfs; a *forced attach* lets
writes reach the device around the loop, uncaptured. A file manager that keeps a replicated
directory open (the old guide warned about Konqueror) keeps it busy: close it, or the directory
can only be released by a restart.

## The daemon
Start, stop and restart it from its screen (5) or with `mirrorsetup daemon start|stop|restart|
status`. With systemd it is the `mirrorsetup` unit (log: `journalctl -u mirrorsetup`);
otherwise it runs detached and logs to `daemon.log` beside its control socket. Its state
directory is `--state-dir` or `$MIRRORSETUP_STATE_DIR` (default `/var/lib/mirrorsetup`).
"""


class HelpScreen(Screen):
    CSS_PATH = "help.tcss"
    BINDINGS = [Binding("escape", "app.back", "Back"), Binding("q", "app.back", "Back", show=False)]

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="help"):
            yield Markdown(actions.keys_markdown() + "\n\n" + NOTES)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#help").focus()
