"""Pilot tests over the snapshot tests' fake host (test_tui_snapshots: its devices, its status
and a Replication that changes nothing): what an administrator's walk found at 80x24, checked
without touching this host — confirmations before Unmount all / Detach all, one Capture line in
a block entry's details, toasts that leave a dialog's buttons alone, the directory picker that
follows a typed path, and the Targets screen's keys in its footer."""

from __future__ import annotations

import pytest

from test_tui_snapshots import (  # noqa: F401 (fixture)
    SnapshotReplication, fake_status, snap_services, snapshot_app)
from test_tui_support import pilot_test, settle, static_text

from app.screens.dialogs import ConfirmDialog, DetailsDialog, ResultsDialog
from app.services.status import StatusSnapshot


class CountingReplication(SnapshotReplication):
    """The fake host's Replication, counting the calls that would change something."""

    def __init__(self, store) -> None:
        super().__init__(store)
        self.calls: list[str] = []

    def unmount_all(self, force: bool = False, **kw):
        self.calls.append("unmount_all")
        return super().unmount_all(force=force, **kw)

    def detach_all(self, dry_run: bool = False, **kw):
        self.calls.append("detach_all")
        return super().detach_all(dry_run=dry_run, **kw)


def counting(services) -> CountingReplication:
    services._replication = CountingReplication(services.store)
    return services._replication


async def press(pilot, *keys: str) -> None:
    for key in keys:
        await pilot.press(key)
        await settle(pilot)


@pytest.mark.parametrize("menu, key, call, screen, says, not_said", [
    ("1", "u", "unmount_all", "FilesystemScreen",
     ["1 directory is captured now", "/srv/data → backup1:data", "until Mount all"],
     ["/home/shared"]),
    ("2", "d", "detach_all", "BlockScreen",
     ["2 block entries are attached, 1 of them captured now",
      "/dev/sdb1 → /backup/sdb1.img: /dev/loop7, captured",
      "/dev/sdc → /dev/sdf: /dev/loop8, not captured", "until Attach all"],
     ["/dev/sdg"])])
@pilot_test
async def test_unmount_all_and_detach_all_ask_first_and_say_what_stops(
        snap_services, menu, key, call, screen, says, not_said):
    """u and d used to end every capture at once; now a dialog says which entries are captured
    and that their replication stops until Mount all / Attach all; Esc and n change nothing."""
    replication = counting(snap_services)
    app = snapshot_app(snap_services)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await press(pilot, menu, key)
        assert type(app.screen) is ConfirmDialog
        question = static_text(app.screen.query_one("#question"))
        assert all(x in question for x in says) and not any(x in question for x in not_said), question
        assert app.screen.query_one("#no").has_focus  # Enter on it says no too
        await press(pilot, "escape")
        await press(pilot, key, "n")
        assert replication.calls == []
        assert type(app.screen).__name__ == screen
        await press(pilot, key, "y")
        assert replication.calls == [call]
        assert type(app.screen) is ResultsDialog


@pilot_test
async def test_with_nothing_mounted_or_attached_there_is_nothing_to_ask(snap_services):
    replication = counting(snap_services)
    snap_services._status = lambda: StatusSnapshot(
        taken_at=0.0, filesystem=[s for s in fake_status().filesystem if s.state != "mounted"],
        block=[s for s in fake_status().block if not s.loops])
    app = snapshot_app(snap_services)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await press(pilot, "1", "u")
        assert type(app.screen).__name__ == "FilesystemScreen"
        await press(pilot, "escape", "2", "d")
        assert type(app.screen).__name__ == "BlockScreen"
        said = [n.message for n in app._notifications]
        assert "Nothing to unmount: no directory is mounted as mirrorfs." in said, said
        assert "Nothing to detach: no block entry is attached to a loop device." in said, said
        assert replication.calls == []


@pilot_test
async def test_a_capture_left_by_a_removed_entry_is_asked_about_too(snap_services):
    """Unmount all and Detach all also end the captures whose entry was removed (orphans):
    with nothing else mounted or attached, the question names them."""
    from app.services.protocol import CaptureRow
    replication = counting(snap_services)
    snap_services._status = lambda: StatusSnapshot(
        taken_at=0.0, filesystem=[s for s in fake_status().filesystem if s.state != "mounted"],
        block=[s for s in fake_status().block if not s.loops],
        orphans=[CaptureRow("fs", "/srv/old", captured=True, state="orphaned"),
                 CaptureRow("block", "/dev/sdh", captured=True, state="orphaned",
                            loop="/dev/loop9")])
    app = snapshot_app(snap_services)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await press(pilot, "1", "u")
        assert type(app.screen) is ConfirmDialog
        question = static_text(app.screen.query_one("#question"))
        assert "1 directory is captured now" in question, question
        assert "/srv/old (orphaned: no longer configured)" in question
        await press(pilot, "escape", "escape", "2", "d")
        question = static_text(app.screen.query_one("#question"))
        assert "1 block entry is attached, captured now" in question, question
        assert "/dev/sdh: /dev/loop9, captured (orphaned" in question
        await press(pilot, "escape")
        assert replication.calls == []


@pilot_test
async def test_a_block_entrys_details_say_capture_once(snap_services):
    """The details listed "Capture: captured" and then the daemon's "Capture: capturing
    (worker pid 4243)"; one line says both."""
    app = snapshot_app(snap_services)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await press(pilot, "2", "i")
        assert type(app.screen) is DetailsDialog
        lines = static_text(app.screen.query_one("#details-text")).splitlines()
        capture = [line for line in lines if line.startswith("Capture:")]
        assert capture == ["Capture:          captured: capturing (worker pid 4243)"], lines


def covering_toasts(screen, widget) -> list:
    """The notices drawn over `widget`: their regions as the screen shows them (clipped)."""
    from textual.errors import NoWidget
    from textual.widgets._toast import Toast
    covering = []
    for toast in screen.query(Toast):
        try:
            geometry = screen.find_widget(toast)
        except NoWidget:  # not drawn
            continue
        if geometry.region.intersection(geometry.clip).overlaps(widget.region):
            covering.append(toast)
    return covering


@pilot_test
async def test_notices_leave_a_dialogs_buttons_alone_at_80x24(snap_services):
    """At 80x24 the notices (toasts), docked at the bottom right, hid the Add and Cancel of
    the add dialog and the Yes and No of a confirmation. On a dialog they are drawn in the
    upper half: every button stays visible and clickable, however many notices there are."""
    app = snapshot_app(snap_services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await settle(pilot)
        for keys in (("1", "a"), ("escape", "u"), ("escape", "escape", "2", "d")):
            await press(pilot, *keys)
            dialog = app.screen
            assert dialog.is_modal, keys
            for n in range(3):
                app.notify(f"notice {n}: a sentence long enough to take two lines in a toast "
                           "at 80 columns", title="Notice", timeout=60)
            await settle(pilot)
            await pilot.pause(0.2)
            buttons = list(dialog.query("Button"))
            assert buttons
            assert covering_toasts(dialog, dialog.query_one(".dialog")), "no notice drawn"
            for button in buttons:
                assert not covering_toasts(dialog, button), (keys, button.id)
                x, y = button.region.center
                assert dialog.get_widget_at(x, y)[0] is button, (keys, button.id)
            app.clear_notifications()


@pilot_test
async def test_the_directory_picker_follows_a_typed_directory(snap_services):
    """The tree stayed at its top whatever was typed into Path; now it opens its way down to
    a typed directory that exists and puts its cursor there, leaving the input as typed."""
    from textual.widgets import DirectoryTree, Input
    browse = snap_services.browse_root
    app = snapshot_app(snap_services)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await press(pilot, "1", "a")
        dialog = app.screen
        tree, path = dialog.query_one("#picker", DirectoryTree), dialog.query_one("#path", Input)

        def at() -> str:
            return str(tree.cursor_node.data.path)

        path.value = f"{browse}/srv/da"  # on the way: no such directory, the tree stays
        await settle(pilot)
        assert at() == browse and not [n for n in tree.root.children if n.is_expanded]
        path.value = f"{browse}/home/../srv/./www"
        await settle(pilot)
        assert at() == f"{browse}/srv/www"
        path.value = f"{browse}/srv/data/"
        await settle(pilot)
        assert at() == f"{browse}/srv/data"
        assert [n.data.path.name for n in tree.root.children if n.is_expanded] == ["srv"]
        assert path.value == f"{browse}/srv/data/"  # as typed
        assert tree.cursor_node.is_expanded  # its subdirectories, to pick one below
        path.value = f"{browse}/var"
        await settle(pilot)
        assert at() == f"{browse}/var"
        path.value = "/somewhere/else"  # not below the picker's top: it stays
        await settle(pilot)
        assert at() == f"{browse}/var"


@pilot_test
async def test_the_targets_screen_shows_its_remove_and_details_keys(snap_services):
    """r removed a target and i showed an entry's details, but the screen said neither. Now r
    is in the footer, as on the other screens (whole at 80 columns), and the replicas' title
    says i, as the block screen's does."""
    from textual.widgets import Footer
    from textual.widgets._footer import FooterKey
    for size in ((80, 24), (120, 36)):
        app = snapshot_app(snap_services)
        async with app.run_test(size=size) as pilot:
            await settle(pilot)
            await press(pilot, "7")
            footer = app.screen.query_one(Footer)
            shown = {k.key: k.description for k in footer.query(FooterKey)}
            assert shown.get("r") == "Remove", shown
            assert footer.virtual_size.width <= size[0]
            titles = [static_text(t) for t in app.screen.query(".section-title")]
            assert "Replicated entries and their replicas (i or Enter: details)" in titles
