"""Accept an entry's new file system (or device) in the TUI, as `fs accept-filesystem` does:
a capture refused because the entry is not on what its first capture recorded offers n on its
row; n shows what was recorded and what it is now, Cancel (the default) changes nothing, and
Accept forgets the record and says that Mount all captures it next."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from test_engine_support import Engine, engine_maker, mirrorfs_mounts, write_config
from test_tui_support import (  # noqa: F401 (fixtures)
    cell, pilot_test, settle, static_text, store, tui, wait_until)
from textual.widgets import DataTable

from app.screens.accept import AcceptDialog
from app.screens.block import BlockScreen
from app.screens.dashboard import DashboardScreen
from app.screens.dialogs import ResultsDialog
from app.screens.filesystem import FilesystemScreen
from app.services import blockdevs, mounts
from app.services.control import ControlClient
from app.services.layout import IDENTITY_RECORD, entry_state, private_dir
from app.services.replication import Replication


def record_identity(state_dir: str, kind: str, key: str, ident: dict) -> Path:
    """An entry's identity record, as capture.check_identity writes it at its first capture:
    here one of another file system or device than the entry's."""
    entry_dir = entry_state(state_dir, kind, key)
    private_dir(entry_dir, "entry state directory")
    record = Path(entry_dir) / IDENTITY_RECORD
    record.write_text(json.dumps(ident) + "\n")
    return record


def record_another_file_system(state_dir: str, src: str) -> Path:
    """What a first capture would have recorded had `src` been a tmpfs of its own (that did
    not come up since)."""
    return record_identity(state_dir, "fs", src, {"file system": f"tmpfs mounted on {src}"})


@pytest.fixture
def refused_fs(tmp_path):
    """(engine, src, record): a real daemon whose one entry's capture was refused at its start
    (EMEDIUMTYPE): its state directory records another file system than its directory is on."""
    with engine_maker(tmp_path) as make:
        eng, src, _ = make(seed=lambda s: (s / "a").write_text("alpha"), start=False)
        record = record_another_file_system(eng.state, src)
        eng.start()
        yield eng, src, record


def offered(app) -> bool:
    """n (Accept) is in the footer: the screen's active bindings."""
    return "n" in app.screen.active_bindings


async def ask(pilot, what: str) -> AcceptDialog:
    await pilot.press("n")
    await wait_until(pilot, lambda: type(pilot.app.screen) is AcceptDialog, what)
    return pilot.app.screen


async def accept_then_capture(pilot, record: Path, accept, key: str, next_step: str) -> None:
    """Accept (`accept()`: a key or a click) in the question: its result, which says the next
    step, the record forgotten; then that step (`key`: Mount all, Attach all), which is done."""
    app = pilot.app
    await accept()
    await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "the result")
    [result] = app.screen.results
    assert result.outcome.value == "ok" and "is forgotten" in result.message, result
    notes = static_text(app.screen.query_one("#results-notes"))
    assert next_step in notes, notes
    assert not record.exists()
    await pilot.press("enter")
    await wait_until(pilot, lambda: not offered(app), "n gone: the daemon's row says accepted")
    await pilot.press(key)
    await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, next_step)
    assert [r.outcome.value for r in app.screen.results] == ["ok"], app.screen.results
    await pilot.press("enter")


@pytest.mark.root
@pilot_test
async def test_a_refused_directory_is_accepted_from_its_row_and_cancel_changes_nothing(
        tui, refused_fs):
    eng, src, record = refused_fs
    before = record.read_bytes()
    now = mounts.tree_identity(src)  # (its type and place, the directory it shows, its UUID)
    app = tui(control_socket=eng.socket, is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("1")
        await wait_until(pilot, lambda: offered(app), "n on the refused entry's row")
        rows = app.screen.query_one("#fs-entries", DataTable)
        assert cell(rows, src, "state") == "not mounted (other FS)"
        await pilot.press("m")  # refused again: its result names the key, not the CLI's command
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "mount all")
        [result] = app.screen.results
        assert result.failed and result.errno == errno.EMEDIUMTYPE, result
        said = static_text(app.screen.query_one(".result"))
        assert "Accept (n on its row) takes it" in said and "accept-filesystem" not in said, said
        await pilot.press("enter")
        dialog = await ask(pilot, "the question")
        question = static_text(dialog.query_one("#question"))
        assert f"recorded: file system tmpfs mounted on {src}" in question, question
        assert f"now:      file system {now['file system']}" in question, question
        assert "Mount all" in question and "deleted from it" in question, question
        assert dialog.focused.id == "no"  # Cancel is the default
        await pilot.press("enter")
        await settle(pilot)
        assert type(app.screen) is FilesystemScreen
        assert record.read_bytes() == before and offered(app)

        await pilot.press("escape", "4")  # the dashboard offers it on the entry's row too
        await wait_until(pilot, lambda: type(app.screen) is DashboardScreen and offered(app),
                         "n on the dashboard")
        warnings = static_text(app.screen.query_one("#warnings"))
        assert "Accept (n on its row) takes it" in warnings, warnings
        await ask(pilot, "the dashboard's question")
        await pilot.press("escape")
        await settle(pilot)
        assert record.read_bytes() == before

        await pilot.press("escape", "1")
        await wait_until(pilot, lambda: offered(app), "n on the File systems screen again")
        await ask(pilot, "the question again")
        await accept_then_capture(pilot, record, lambda: pilot.press("y"), "m",
                                  "Mount all (m on the File systems screen")
        assert src in mirrorfs_mounts() and not offered(app)
    assert json.loads(record.read_text()) == now  # what the capture took


@pytest.fixture
def refused_block(tmp_path, disks):
    """(engine, disk, record): a real daemon whose block entry's capture was refused at its
    start (EMEDIUMTYPE): its state directory records another loop file than the disk's."""
    disk = disks(16 << 20)
    cfg = write_config(tmp_path / "etc" / "replication.toml", [],
                       [{"device": disk, "target": str(tmp_path / "target.img")}])
    eng = Engine(tmp_path, cfg)
    record = record_identity(eng.state, "block", disk, {
        "loop file": f"{tmp_path}/gone.img (inode 12)", "loop offset": "0"})
    try:
        eng.start()
        yield eng, disk, record
    finally:
        eng.cleanup()


@pytest.mark.root
@pilot_test
async def test_a_refused_device_is_accepted_by_mouse_on_the_block_screen(
        tui, refused_block, tmp_path):
    eng, disk, record = refused_block
    before = record.read_bytes()
    app = tui(devices=[disk], control_socket=eng.socket, is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2")
        await wait_until(pilot, lambda: type(app.screen) is BlockScreen and offered(app),
                         "n on the refused entry's row")
        rows = app.screen.query_one("#block-entries", DataTable)
        assert cell(rows, disk, "state") == "detached (other device)"
        dialog = await ask(pilot, "the question")
        question = static_text(dialog.query_one("#question"))
        assert f"recorded: loop file {tmp_path}/gone.img (inode 12); loop offset 0" in question
        assert "now:      loop file " in question and "Attach all" in question, question
        await pilot.click("#no")
        await settle(pilot)
        assert type(app.screen) is BlockScreen and record.read_bytes() == before

        await ask(pilot, "the question again")
        await accept_then_capture(pilot, record, lambda: pilot.click("#yes"), "t",
                                  "Attach all (t on the Block devices screen")
        await wait_until(pilot, lambda: cell(rows, disk, "capture") == "captured", "captured")
        assert not offered(app)
    with open(disk, "rb") as f:
        assert json.loads(record.read_text()) == blockdevs.device_identity(f.fileno())


def test_an_accept_is_refused_when_the_file_system_changed_since_it_was_shown(tmp_path, store):
    """The TUI shows what the entry is now, then accepts that: if it is something else by the
    time Accept is pressed, nothing is accepted (the record stays) and it says why."""
    src = tmp_path / "src"
    src.mkdir()
    store.add_filesystem(str(src))
    record = record_another_file_system(str(tmp_path / "state"), str(src))
    before = record.read_bytes()
    rep = Replication(store, ControlClient(str(tmp_path / "no.sock")), str(tmp_path / "state"))
    was, now = rep.identity_change("fs", str(src))
    assert was == {"file system": f"tmpfs mounted on {src}"}
    assert now == mounts.tree_identity(str(src))
    shown = {"file system": "xfs mounted on /elsewhere"}
    r = rep.accept_identity("fs", str(src), expected=shown)
    assert r.failed and r.refused and r.errno == errno.EAGAIN, r
    assert "changed since it was shown" in r.message and "xfs mounted on /elsewhere" in r.message
    assert record.read_bytes() == before
    r = rep.accept_identity("fs", str(src), expected=now)
    assert r.outcome.value == "ok" and not record.exists(), r
    assert rep.identity_change("fs", str(src)) is None


@pilot_test
async def test_without_the_daemon_the_palette_accepts_and_says_its_start_captures_it(
        tui, store, tmp_path):
    """No daemon: no capture was refused (n is not on the row), but the command palette's
    entry still asks with what was recorded and what it is now, and the result says the
    daemon's start captures it."""
    src = tmp_path / "src"
    src.mkdir()
    store.add_filesystem(str(src))
    record = record_another_file_system(str(tmp_path / "state"), str(src))
    app = tui(is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        assert not offered(app)
        app.run_on("filesystem", "accept")
        await wait_until(pilot, lambda: type(app.screen) is AcceptDialog, "the question")
        question = static_text(app.screen.query_one("#question"))
        assert f"recorded: file system tmpfs mounted on {src}" in question, question
        await pilot.press("y")
        await wait_until(pilot, lambda: type(app.screen) is ResultsDialog, "the result")
        assert [r.outcome.value for r in app.screen.results] == ["ok"], app.screen.results
        notes = static_text(app.screen.query_one("#results-notes"))
        assert f"The daemon captures {src} when it starts" in notes, notes
    assert not record.exists()
