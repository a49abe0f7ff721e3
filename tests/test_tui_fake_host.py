"""Pilot tests over the snapshot tests' fake host (test_tui_snapshots: its devices, its status
and a Replication that changes nothing): what an administrator's walk found at 80x24, checked
without touching this host — confirmations before Unmount all / Detach all, one Capture line in
a block entry's details, toasts that leave a dialog's buttons alone, the directory picker that
follows a typed path, and the Targets screen's keys in its footer."""

from __future__ import annotations

from test_tui_snapshots import snap_services, snapshot_app  # noqa: F401 (fixture)
from test_tui_support import pilot_test, settle, static_text

from app.screens.dialogs import DetailsDialog


async def press(pilot, *keys: str) -> None:
    for key in keys:
        await pilot.press(key)
        await settle(pilot)


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
