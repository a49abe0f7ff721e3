"""Remote targets and fail-over screen: the real app over a temp config. Wrong input in the Add
dialog changes nothing; the key line is the one `target authorized-key` prints; the fail-over
confirmations say what happens on which host and "No" changes nothing; and, on a real second
host (tests/netbed.py), a target is added through the dialog with its host key shown and
pinned, and tested."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from textual.widgets import Static, TextArea
from test_tui_support import (  # noqa: F401
    cell, config_bytes, notices, pilot_test, settle, static_text, table_keys, tui, wait_until,
    wait_while_a_worker_waits)

from app.screens.dialogs import ConfirmDialog, DetailsDialog, ResultsDialog
from app.screens.targets import AddTargetDialog, KeyLineDialog, TargetsScreen, remote_name
from app.services.config import ConfigStore

AGENT = str(Path(sys.executable).parent / "mirrorsetup")


def write_config(config_path: Path, tmp_path: Path) -> None:
    key = tmp_path / "etc" / "keys" / "backup1_ed25519"
    key.parent.mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config_path.write_text(f"""schema = 1

[[target]]
name = "backup1"
host = "backup1.example.net"
root = "/srv/replicas"
identity = "{key}"

[[filesystem]]
path = "{tmp_path / 'src'}"
target = "backup1:data"
""")
    (tmp_path / "src").mkdir()


async def open_targets(pilot):
    await settle(pilot)
    await pilot.press("7")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, TargetsScreen)
                     and pilot.app.screen.query_one("#targets").row_count == 1, "the targets")


async def add_with(pilot, typed: dict[str, str]) -> None:
    """On the Targets screen, a: the Add dialog's fields typed as `typed` says, Add pressed."""
    await open_targets(pilot)
    await pilot.press("a")
    await settle(pilot)
    assert isinstance(pilot.app.screen, AddTargetDialog)
    for field, value in typed.items():
        pilot.app.screen.query_one(f"#{field}").value = value
    await settle(pilot)
    await pilot.click("#add")


@pytest.fixture
def canned_targets(tui, config_path):
    """canned_targets(rows) -> async context of (app, pilot, screen): the real app on Targets
    over the config file the test wrote, every replicated entry listed, the daemon's status
    answering the file-system `rows` (a list, read at each refresh: change it in place, then
    post FiguresMoved). `rows` None: no daemon runs."""
    from app.services.status import snapshot

    @contextlib.asynccontextmanager
    async def run(rows):
        class Control:
            def request(self, what, **_):
                return {"filesystem": list(rows), "block": []}
        app = tui(is_root=True)
        app.services._status = lambda: snapshot(ConfigStore(config_path),
                                                None if rows is None else Control(),
                                                scan_writers=False)
        config = ConfigStore(config_path).load()
        replicated = [e for e in (*config.filesystem, *config.block) if remote_name(e.target, config)]
        async with app.run_test(size=(80, 24)) as pilot:
            await open_targets(pilot)
            screen = app.screen
            await wait_until(pilot, lambda: screen.query_one("#replicas").row_count ==
                             len(replicated), "the replicated entries")
            yield app, pilot, screen
    return run


@pilot_test
async def test_targets_and_replicas_are_listed_and_wrong_input_changes_nothing(
        tui, config_path, tmp_path, config_bytes):
    write_config(config_path, tmp_path)
    before = config_bytes()
    app = tui(is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_targets(pilot)
        screen = app.screen
        assert cell(screen.query_one("#targets"), "backup1", "host") == "backup1.example.net:22"
        src = str(tmp_path / "src")
        await wait_until(pilot, lambda: screen.query_one("#replicas").row_count == 1, "the entry")
        assert cell(screen.query_one("#replicas"), src, "state") == "the daemon is not running"

        await pilot.press("k")  # the authorized_keys line, as `target authorized-key` prints it
        await settle(pilot)
        assert isinstance(app.screen, KeyLineDialog)
        line = subprocess.run([sys.executable, "-m", "app", "--config", str(config_path), "target",
                               "authorized-key", "backup1"], capture_output=True, text=True).stdout
        area = app.screen.query_one("#key-line", TextArea)
        # one line, never wrapped (a wrapped one was copied from the terminal with breaks in it),
        # selected whole; c copies it; the CLI that prints it is named
        assert area.text == line.strip() and 'serve-target --root /srv/replicas",restrict' in area.text
        assert not area.soft_wrap and area.read_only and area.wrapped_document.height == 1
        assert area.selected_text == line.strip()
        assert "mirrorsetup target authorized-key backup1" in "".join(
            static_text(s) for s in app.screen.query(Static))
        copied = []
        app.copy_to_clipboard = copied.append
        await pilot.press("c")
        await settle(pilot)
        assert copied == [line.strip()] and "clipboard" in notices(app)[-1]
        await pilot.press("escape")
        await settle(pilot)
        assert app.screen is screen

        await pilot.press("a")
        await settle(pilot)
        assert isinstance(app.screen, AddTargetDialog)
        await pilot.click("#add")
        await settle(pilot)
        assert "name, host and root are needed" in static_text(app.screen.query_one("#problem"))
        app.screen.query_one("#name").value = "b 2"  # a name the file refuses: said at once
        await settle(pilot)
        await pilot.click("#add")
        await settle(pilot)
        problem = static_text(app.screen.query_one("#problem")).replace("\n", " ")
        assert "✘ host and root are needed; name: must be letters" in problem, problem
        app.screen.query_one("#name").value = "b2"
        await settle(pilot)  # checked as typed first, then on Add
        await pilot.click("#add")
        await settle(pilot)
        assert "✘ host and root are needed" in static_text(app.screen.query_one("#problem"))
        assert "name:" not in static_text(app.screen.query_one("#problem"))
        for field, value in (("host", "10.0.0.9"), ("root", "relative/dir")):
            app.screen.query_one(f"#{field}").value = value
        app.screen.query_one("#port").value = "99999"
        await settle(pilot)
        await pilot.click("#add")
        await settle(pilot)
        problem = static_text(app.screen.query_one("#problem")).replace("\n", " ")
        assert "'99999' is not a port number; the root is an absolute path" in problem  # both at once
        app.screen.query_one("#port").value = ""  # ssh_config's, else 22, as the placeholder says
        await settle(pilot)
        await pilot.click("#add")
        await settle(pilot)
        assert "✘ the root is an absolute path" in static_text(app.screen.query_one("#problem"))
        assert "port" not in static_text(app.screen.query_one("#problem"))
        assert app.screen._check(final=True)[1] is None
        app.screen.query_one("#root").value = "/srv/b2"
        await settle(pilot)
        problem, target = app.screen._check(final=True)
        assert problem is None and target.port is None, (problem, target)  # read when asked
        app.screen.query_one("#root").value = "relative/dir"
        app.screen.query_one("#port").value = "22"
        await pilot.click("#add")
        await settle(pilot)
        assert "the root is an absolute path" in static_text(app.screen.query_one("#problem"))
        # checked as typed, with the configuration's rules (no Add pressed)
        app.screen.query_one("#host").value = "-oProxyCommand=x"
        app.screen.query_one("#root").value = "/srv/b2"
        await settle(pilot)
        assert "✘" in static_text(app.screen.query_one("#problem")) and \
            "-oProxyCommand=x" in static_text(app.screen.query_one("#problem"))
        app.screen.query_one("#host").value = "10.0.0.9"
        await settle(pilot)
        assert "✔ ready to add" in static_text(app.screen.query_one("#problem"))
        app.screen.query_one("#port").value = "0"
        await settle(pilot)
        assert "'0' is not a port number" in static_text(app.screen.query_one("#problem"))
        await pilot.press("escape")
        await settle(pilot)

        await pilot.press("s")  # the daemon's work, and no daemon runs: said, not asked
        await settle(pilot)
        assert app.screen is screen, f"s asked: {type(app.screen).__name__}"
        assert f"the daemon is not running: the switch-over, fail-back and keep-this-host of " \
               f"{src} are its work" in notices(app)[-1], notices(app)
    assert config_bytes() == before


@pilot_test
async def test_the_add_dialog_says_every_field_the_configuration_refuses_at_once(
        tui, config_path, tmp_path, config_bytes):
    """The dialog checks its fields by the rule `target add` uses (ConfigStore.check_target):
    it said the first field that rule refused (a bad name hid a bad host until it was fixed);
    now every one, as `target add` does."""
    write_config(config_path, tmp_path)
    before = config_bytes()
    app = tui(is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await add_with(pilot, {"name": "b 2", "host": "-oProxyCommand=x", "root": "/srv/b2"})
        await settle(pilot)
        problem = static_text(app.screen.query_one("#problem")).replace("\n", " ")
        assert "name: must be letters" in problem and "host: must be an address" in problem, problem
        assert isinstance(app.screen, AddTargetDialog)
        await pilot.press("escape")
        await settle(pilot)
    assert config_bytes() == before


@pilot_test
async def test_without_the_daemon_fail_over_actions_say_so_at_once(
        canned_targets, config_path, tmp_path, config_bytes):
    """Found by a walk: with the daemon stopped, s (and f, o) asked to confirm a switch-over
    (what happens on which host) and only then failed with "the daemon is not running". All
    three are the daemon's work (app/engine/failover.py runs in it; the CLI requires the
    daemon for them too): now said at once, from the status shown. What works without the
    daemon still does (the key line)."""
    write_config(config_path, tmp_path)
    before = config_bytes()
    src = str(tmp_path / "src")
    async with canned_targets(None) as (app, pilot, screen):
        assert cell(screen.query_one("#replicas"), src, "state") == "the daemon is not running"
        for key in ("s", "f", "o"):
            await pilot.press(key)
            await settle(pilot)
            assert app.screen is screen, f"{key} asked: {type(app.screen).__name__}"
            assert f"the daemon is not running: the switch-over, fail-back and keep-this-host " \
                   f"of {src} are its work. Start it on the Daemon screen (5 in the main menu)" \
                   in notices(app)[-1], notices(app)
        await pilot.press("k")
        await settle(pilot)
        assert isinstance(app.screen, KeyLineDialog)
    assert config_bytes() == before


@pilot_test
async def test_without_the_daemon_an_entry_switched_over_is_said_so_not_unknown(
        tui, config_path, tmp_path, config_bytes):
    """Found by helper-35's walk: with the daemon stopped, `status` and the dashboard read the
    switch-over marker from the state directory and said "switched over", while this screen
    said role "?", "the daemon is not running" (the one screen where the hand-over is ended
    hid it). Now it says switched over (or fail-back interrupted) too, and that the daemon is
    not running."""
    import json

    from app.services.layout import entry_state
    from app.services.status import snapshot
    write_config(config_path, tmp_path)
    src = str(tmp_path / "src")
    state = tmp_path / "state"
    marker = Path(entry_state(str(state), "fs", src))
    marker.mkdir(parents=True)
    (marker / "switched").write_text(json.dumps({"state": "switched", "time": 1, "seq": 9,
                                                 "target": "backup1:data"}) + "\n")
    before = config_bytes()
    app = tui(is_root=True)
    app.services._status = lambda: snapshot(ConfigStore(config_path), None, scan_writers=False,
                                            state_dir=str(state))
    async with app.run_test(size=(80, 24)) as pilot:
        await open_targets(pilot)
        screen = app.screen
        table = screen.query_one("#replicas")
        await wait_until(pilot, lambda: table.row_count == 1, "the replicated entry")
        assert cell(table, src, "role") == "switched over", cell(table, src, "role")
        await pilot.press("i")
        await wait_until(pilot, lambda: isinstance(app.screen, DetailsDialog), "the details")
        said = static_text(app.screen.query_one("#details-text"))
        assert "the replica is primary there since" in said and "(seq 9)" in said, said
        assert "(the daemon is not running)" in said, said
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is screen, "the details closed")
        # found by helper-39's walk: m said "the switch-over, fail-back and keep-this-host of
        # … are its work", not what m does
        await pilot.press("m")
        await settle(pilot)
        assert app.screen is screen, f"m asked: {type(app.screen).__name__}"
        said = notices(app)[-1]
        assert f"the daemon is not running: ending the hand-over of {src} (lifting its " \
               "read-only fence here) is its work. Start it on the Daemon screen (5 in the main " \
               "menu), then try again. Nothing was changed." in said, said
        assert (marker / "switched").exists()
        (marker / "failback").write_text(json.dumps({"generation": "0" * 32, "applied": 3}) + "\n")
        screen.reload()
        await wait_until(pilot, lambda: cell(table, src, "role").startswith("fail-back inter"),
                         "the interrupted fail-back")  # (cut at 80 columns)
        assert cell(table, src, "state").startswith("this host's copy is a mix"), \
            cell(table, src, "state")
    assert config_bytes() == before


@pilot_test
async def test_fail_back_and_keep_this_host_of_a_connected_secondary_ask_nothing(
        canned_targets, config_path, tmp_path, config_bytes):
    """Found by a walk: f and o on an entry replicating as usual asked whether to REPLACE this
    host's data (or OVERWRITE the replica) before the daemon refused with "nothing to fail
    back". Now a connected secondary gets a notice; switch over still asks."""
    write_config(config_path, tmp_path)
    before = config_bytes()
    src = str(tmp_path / "src")
    rows = [{"kind": "fs", "key": src, "captured": True, "target": "backup1:data",
             "state": "capturing", "replication": "established", "connection": "connected",
             "target_data": "consistent"}]
    async with canned_targets(rows) as (app, pilot, screen):
        for key in ("f", "o", "m"):  # m: moved for good (remove --keep-replica-primary)
            await pilot.press(key)
            await settle(pilot)
            assert app.screen is screen, f"{key} asked: {type(app.screen).__name__}"
            assert f"{src} was not switched over" in notices(app)[-1], notices(app)
        await pilot.press("s")  # a switch-over of it is what there is to do: asked
        await settle(pilot)
        assert isinstance(app.screen, ConfirmDialog)  # what happens on which host, then No
        question = static_text(app.screen.query_one("#question"))
        assert "On THIS host: capture stops" in question and "On backup1.example.net: the " \
            "replica backup1:data becomes primary" in question and "No data is lost" in question
        await pilot.press("n")
        await settle(pilot)
    assert config_bytes() == before


@pilot_test
async def test_what_the_status_shown_rules_out_is_said_without_a_question(
        canned_targets, config_path, tmp_path, config_bytes):
    """Found by a walk: s on an entry switched over already, and f while the target refuses
    the connection, asked to confirm first and failed after. Now said at once."""
    write_config(config_path, tmp_path)
    before = config_bytes()
    src = str(tmp_path / "src")
    rows = {"switched": {"kind": "fs", "key": src, "captured": False, "target": "backup1:data",
                         "state": "switched over", "switched": {"state": "switched", "seq": 9,
                                                                "target": "backup1:data"}},
            "refused": {"kind": "fs", "key": src, "captured": True, "target": "backup1:data",
                        "state": "capturing", "replication": "established",
                        "connection": "disconnected: ssh: connect to host backup1.example.net port "
                                      "22: Connection refused, retry in 8 s",
                        "target_data": "consistent"}}
    now = [rows["switched"]]
    async with canned_targets(now) as (app, pilot, screen):
        await pilot.press("s")
        await settle(pilot)
        assert app.screen is screen, f"s asked: {type(app.screen).__name__}"
        assert f"{src} is switched over already: f fails back" in notices(app)[-1], notices(app)
        await pilot.press("f")  # what there is to do: asked
        await settle(pilot)
        assert isinstance(app.screen, ConfirmDialog)
        question = static_text(app.screen.query_one("#question"))
        assert "is REPLACED by the replica's where it differs" in question
        await pilot.press("n")
        await settle(pilot)
        await pilot.press("o")  # as is keeping this host's data
        await settle(pilot)
        assert isinstance(app.screen, ConfirmDialog)
        question = static_text(app.screen.query_one("#question"))
        assert "On backup1.example.net: everything written to backup1:data since it was " \
               "promoted is OVERWRITTEN" in question
        await pilot.press("n")
        await settle(pilot)
        assert app.screen is screen
        now[0] = rows["refused"]  # the daemon's figures moved: the screen reads again
        screen.post_message(screen.FiguresMoved())
        await wait_until(pilot, lambda: screen._replicated()[0][2].captured, "the new status")
        for key in ("f", "s"):
            await pilot.press(key)
            await settle(pilot)
            assert app.screen is screen, f"{key} asked: {type(app.screen).__name__}"
            assert f"cannot reach the target of {src} (disconnected: ssh" in notices(app)[-1], notices(app)
    assert config_bytes() == before


@pilot_test
async def test_moved_for_good_of_an_entry_switched_over_says_what_stays_where(
        canned_targets, config_path, tmp_path, config_bytes):
    """m (`fs remove --keep-replica-primary`) on an entry switched over: the question says
    what stays on which host, and No changes nothing (on a secondary it is refused at once:
    test_fail_back_and_keep_this_host_of_a_connected_secondary_ask_nothing)."""
    write_config(config_path, tmp_path)
    before = config_bytes()
    src = str(tmp_path / "src")
    now = [{"kind": "fs", "key": src, "captured": False, "target": "backup1:data",
            "state": "switched over", "switched": {"state": "switched", "seq": 9,
                                                   "target": "backup1:data"}}]
    async with canned_targets(now) as (app, pilot, screen):
        await pilot.press("m")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmDialog), type(app.screen).__name__
        question = static_text(app.screen.query_one("#question"))
        assert "On backup1.example.net: the replica backup1:data stays primary" in question, question
        assert f"{src} is made writable again, is no longer replicated and is removed" in question
        # how it comes back (helper-39's walk: "add the entry again with a new target" would
        # copy this host's old data there; the same target and a fail-back bring the replica's
        # back: test_an_entry_moved_for_good_is_removed_here_and_its_replica_stays_primary)
        assert "add the entry again with the same target, then f fails back" in question, question
        await pilot.press("n")
        await settle(pilot)
        assert app.screen is screen
    assert config_bytes() == before


@pilot_test
async def test_moved_for_good_that_cannot_be_done_says_why_and_what_can(
        canned_targets, config_path, tmp_path, config_bytes):
    """Found by helper-39's walk: m on an entry whose replica was promoted by a fail-over (split
    brain, or failed over) said "was not switched over … (s switches over)", and s is refused
    there; on a switch-over that was interrupted it said "was not switched over" (it may be
    primary there). Now each says what it is and what does it: r
    on File system replication removes an entry failed over (its replica is not touched), s finishes the switch-over."""
    write_config(config_path, tmp_path)
    before = config_bytes()
    src = str(tmp_path / "src")
    rows = {"split-brain": {"kind": "fs", "key": src, "captured": True, "target": "backup1:data",
                            "state": "capturing", "replication": "split brain",
                            "connection": "refused: split brain, retry in 9 s",
                            "target_data": "split-brain"},
            "switching": {"kind": "fs", "key": src, "captured": False, "target": "backup1:data",
                          "state": "switch-over interrupted",
                          "switched": {"state": "switching", "time": 1, "target": "backup1:data",
                                       "promote_sent": True}}}
    now = [rows["split-brain"]]
    async with canned_targets(now) as (app, pilot, screen):
        for data in ("split-brain", "promoted"):
            now[0] = {**rows["split-brain"], "target_data": data}
            screen.post_message(screen.FiguresMoved())
            await wait_until(pilot, lambda: screen._replicated()[0][2].target_data == data,
                             "the new status")
            await pilot.press("m")
            await settle(pilot)
            assert app.screen is screen, f"m asked: {type(app.screen).__name__}"
            said = notices(app)[-1]
            assert "s switches over" not in said and "was not switched over" not in said, said
            assert f"the replica of {src} was promoted there by a fail-over" in said, said
            assert "r on File system replication (1 in the main menu) removes the entry here" \
                in said and \
                "the replica there is not touched" in said and "Nothing was changed" in said, said
        now[0] = rows["switching"]
        screen.post_message(screen.FiguresMoved())
        await wait_until(pilot, lambda: screen._replicated()[0][2].switched is not None,
                         "the new status")
        await pilot.press("m")
        await settle(pilot)
        assert app.screen is screen, f"m asked: {type(app.screen).__name__}"
        said = notices(app)[-1]
        assert "was not switched over" not in said, said
        assert f"the switch-over of {src} did not finish: whether its replica is primary there " \
               "is not known; s runs it again to finish it, then m" in said, said
    assert config_bytes() == before


def _mark_switched(tmp_path: Path, kind: str, key: str, **marker) -> Path:
    """An entry's switch-over marker in the test's state directory, as the daemon leaves it."""
    import json

    from app.services.layout import entry_state
    where = Path(entry_state(str(tmp_path / "state"), kind, key))
    where.mkdir(parents=True, exist_ok=True)
    (where / "switched").write_text(json.dumps({"time": 1, "seq": 9, **marker}) + "\n")
    return where / "switched"


@pilot_test
async def test_remove_of_an_entry_switched_over_says_at_once_which_keys_end_the_hand_over(
        tui, config_path, tmp_path, config_bytes):
    """Found by helper-39's walk: r on File system replication for an entry switched over asked
    "Stop replicating …?" and then failed with the daemon's "… to leave it primary for good and
    remove the entry here, add --keep-replica-primary" (a CLI option: there is nothing to add
    in the app). Now said at once, with the keys of Remote targets and fail-over (m moves it
    for good); the entry and its marker stay."""
    from app.screens.filesystem import FilesystemScreen
    write_config(config_path, tmp_path)
    src = str(tmp_path / "src")
    marker = _mark_switched(tmp_path, "fs", src, state="switched", target="backup1:data")
    before = config_bytes()
    app = tui(is_root=True, state_dir=str(tmp_path / "state"))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("1")
        await wait_until(pilot, lambda: isinstance(app.screen, FilesystemScreen) and cell(
            app.screen.query_one("#fs-entries"), src, "state") == "switched over", "the entry")
        screen = app.screen
        await pilot.press("r")
        await settle(pilot)
        assert app.screen is screen, f"r asked: {type(app.screen).__name__}"
        said = notices(app)[-1]
        assert f"{src} was switched over to backup1:data: removing the entry here would not end " \
               "the hand-over" in said and "--keep-replica-primary" not in said, said
        assert "On Remote targets and fail-over (7 in the main menu): f fails back, o keeps this " \
               "host's data, m leaves the service there for good" in said, said
        _mark_switched(tmp_path, "fs", src, state="switching", target="backup1:data")
        screen.reload()
        await wait_until(pilot, lambda: cell(screen.query_one("#fs-entries"), src, "state")
                         == "switch-over interrupted", "the interrupted switch-over")
        await pilot.press("r")
        await settle(pilot)
        assert app.screen is screen, f"r asked: {type(app.screen).__name__}"
        assert f"a switch-over of {src} to backup1:data did not finish" in notices(app)[-1] and \
            "s runs it again to finish it" in notices(app)[-1], notices(app)
    assert marker.exists() and config_bytes() == before


@pytest.mark.root
@pilot_test
async def test_remove_of_a_block_entry_switched_over_says_at_once_which_keys_end_it(
        tui, config_path, tmp_path, config_bytes, scratch_loop):
    """As for a directory (above), on Block device replication."""
    from app.screens.block import BlockScreen
    write_config(config_path, tmp_path)
    disk = scratch_loop(8 << 20)
    with config_path.open("a") as f:
        f.write(f'\n[[block]]\ndevice = "{disk}"\ntarget = "backup1:disk.img"\n')
    marker = _mark_switched(tmp_path, "block", disk, state="switched", target="backup1:disk.img")
    before = config_bytes()
    app = tui(devices=[disk], is_root=True, state_dir=str(tmp_path / "state"))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("2")
        await wait_until(pilot, lambda: isinstance(app.screen, BlockScreen) and disk in
                         table_keys(app.screen.query_one("#block-entries")), "the entry")
        screen = app.screen
        table = screen.query_one("#block-entries")
        table.focus()
        table.move_cursor(row=table.get_row_index(disk))
        await pilot.press("r")
        await settle(pilot)
        assert app.screen is screen, f"r asked: {type(app.screen).__name__}"
        said = notices(app)[-1]
        assert f"{disk} was switched over to backup1:disk.img: removing the entry here would " \
               "not end the hand-over" in said and "m leaves the service there for good" in said, said
    assert marker.exists() and config_bytes() == before


@pilot_test
async def test_keep_this_host_of_a_mix_left_by_an_interrupted_fail_back_is_refused_at_once(
        canned_targets, config_path, tmp_path, config_bytes):
    """Found by helper-35's walk: after a fail-back cut mid-way, o asked "Keep THIS host's data
    … OVERWRITTEN with this host's data" although this host's copy is a mix of both (the
    daemon now refuses that resolve). Said at once; f (finish the fail-back) is still asked."""
    write_config(config_path, tmp_path)
    before = config_bytes()
    src = str(tmp_path / "src")
    now = [{"kind": "fs", "key": src, "captured": False, "target": "backup1:data",
            "state": "fail-back interrupted",
            "switched": {"state": "switched", "seq": 9, "target": "backup1:data",
                         "failback": "interrupted", "failback_applied": 5}}]
    async with canned_targets(now) as (app, pilot, screen):
        await pilot.press("o")
        await settle(pilot)
        assert app.screen is screen, f"o asked: {type(app.screen).__name__}"
        assert f"a fail-back of {src} was interrupted: this host's copy is a mix" in \
            notices(app)[-1], notices(app)
        await pilot.press("f")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmDialog)
        await pilot.press("n")
        await settle(pilot)
        now[0] = {**now[0], "switched": {**now[0]["switched"], "failback_applied": 0}}
        screen.post_message(screen.FiguresMoved())  # nothing came back: this host's own data
        await wait_until(pilot, lambda: screen._replicated()[0][2].switched[
            "failback_applied"] == 0, "the new status")
        await pilot.press("o")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmDialog)
        await pilot.press("n")
        await settle(pilot)
    assert config_bytes() == before


@pilot_test
async def test_a_capture_still_connecting_or_paused_is_said_without_a_question(
        canned_targets, config_path, tmp_path, config_bytes):
    """Found by a walk: with the target REJECTing, the capture says "connecting" until its first
    attempt ends, and f and s asked to confirm first and failed after (a switch-over's drain
    refuses anything but connected; a paused target too). Now said at once; f on a paused
    target (reachable) still asks."""
    write_config(config_path, tmp_path)
    before = config_bytes()
    src = str(tmp_path / "src")
    row = {"kind": "fs", "key": src, "captured": True, "target": "backup1:data",
           "state": "capturing", "replication": "waiting for the target",
           "connection": "connecting", "target_data": "inconsistent"}
    now = [row]
    async with canned_targets(now) as (app, pilot, screen):
        for key in ("f", "s", "o"):
            await pilot.press(key)
            await settle(pilot)
            assert app.screen is screen, f"{key} asked: {type(app.screen).__name__}"
            assert f"the capture of {src} is still connecting to its target" in notices(app)[-1]
        now[0] = {**row, "connection": "paused: target full (ENOSPC)", "replication": "established"}
        screen.post_message(screen.FiguresMoved())
        await wait_until(pilot, lambda: screen._replicated()[0][2].connection.startswith("paused"),
                         "the new status")
        await pilot.press("s")
        await settle(pilot)
        assert app.screen is screen, f"s asked: {type(app.screen).__name__}"
        assert f"the target of {src} takes no records now (paused: target full" in notices(app)[-1]
        await pilot.press("f")  # reachable: the fail-back asks the target itself
        await settle(pilot)
        assert isinstance(app.screen, ConfirmDialog)
        await pilot.press("n")
        await settle(pilot)
    assert config_bytes() == before


@pilot_test
async def test_at_80_columns_the_state_is_readable_and_every_key_is_in_the_footer(
        canned_targets, config_path, tmp_path):
    """Found by a walk at 80x24: the entries table cut the state ("replica consistent;
    establ…", "since 2026-09-21 12:13 (se…"), a disconnected capture's reason came last and was
    cut away, and h (re-pin) worked but was not in the footer. Now the replica's name (in the
    details) gives way at 80 columns, the table's state is short (the seq is in the details),
    a connection problem comes first, and every key of the screen is in the footer (the
    palette's hint gives way at 80 columns; at 120 it is back)."""
    from textual.widgets import Footer
    from textual.widgets._footer import FooterKey
    from app.screens import actions
    write_config(config_path, tmp_path)
    src = str(tmp_path / "src")
    shared, other = tmp_path / "shared", tmp_path / "other"
    shared.mkdir(), other.mkdir()
    with config_path.open("a") as f:
        f.write(f'\n[[filesystem]]\npath = "{shared}"\ntarget = "backup1:shared"\n'
                f'\n[[filesystem]]\npath = "{other}"\ntarget = "backup1:other"\n')
    rows = [{"kind": "fs", "key": src, "captured": True, "target": "backup1:data",
             "state": "capturing", "replication": "established", "connection": "connected",
             "target_data": "consistent"},
            {"kind": "fs", "key": str(shared), "captured": False, "target": "backup1:shared",
             "state": "switched over", "switched": {"state": "switched", "seq": 20417,
                                                    "time": 1_790_000_000 - 7200,
                                                    "target": "backup1:shared"}},
            {"kind": "fs", "key": str(other), "captured": True, "target": "backup1:other",
             "state": "capturing", "replication": "waiting for the target",
             "connection": "disconnected: the target stopped answering (Timeout, server "
                           "backup1.example.net not responding.), retry in 8 s",
             "target_data": "consistent"}]
    async with canned_targets(rows) as (app, pilot, screen):
        table = screen.query_one("#replicas")
        assert table.shown_columns == ("entry", "role", "state"), table.shown_columns
        state = {k: cell(table, k, "state") for k in (src, str(shared), str(other))}
        assert state[src] == "replica consistent; established", state
        assert state[str(shared)].startswith("primary there since 2026-") and \
            "…" not in state[str(shared)], state
        assert cell(table, str(shared), "role") == "switched over"
        assert state[str(other)].startswith("disconnected: the target stopped"), state
        footer = screen.query_one(Footer)
        shown = {k.key for k in footer.query(FooterKey) if k.region.right <= 80}
        wanted = {a.keys.split(",")[0] for a in actions.actions("targets") if a.footer}
        assert "h" in wanted and wanted <= shown, (wanted, shown)
        assert footer.virtual_size.width <= 80, footer.virtual_size.width
        table.move_cursor(row=table.get_row_index(str(shared)))
        await pilot.press("i")  # what the table leaves out is in the details
        await settle(pilot)
        assert isinstance(app.screen, DetailsDialog)
        text = static_text(app.screen.query_one("#details-text"))
        assert "backup1:shared" in text and "(seq 20417); not captured here" in text, text
        await pilot.press("escape")
        await settle(pilot)
        await pilot.resize_terminal(120, 36)
        await settle(pilot)
        assert "replica" in table.shown_columns or "target" in table.shown_columns
        assert "ctrl+p" in {k.key for k in screen.query_one(Footer).query(FooterKey)}


@pilot_test
async def test_a_host_whose_key_cannot_be_read_brings_the_dialog_back_as_typed(
        tui, config_path, tmp_path, config_bytes):
    """ssh-keyscan really runs, on a name that never resolves (RFC 6761's .invalid): the
    dialog comes back with every field as typed and the reason, so a typo in the host is
    corrected, not the whole form typed again; nothing is added."""
    write_config(config_path, tmp_path)
    before = config_bytes()
    app = tui(is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        typed = {"name": "b2", "host": "nowhere.invalid", "port": "2222", "user": "repl",
                 "root": "/srv/b2"}
        await add_with(pilot, typed)
        await wait_until(pilot, lambda: isinstance(app.screen, AddTargetDialog)
                         and "nowhere.invalid" in static_text(app.screen.query_one("#problem")),
                         "the dialog back with the reason")
        dialog = app.screen
        assert {f: dialog.query_one(f"#{f}").value for f in typed} == typed
        problem = static_text(dialog.query_one("#problem")).replace("\n", " ")
        assert problem.startswith("✘ could not read the host key of nowhere.invalid port 2222"), problem
        dialog.query_one("#host").value = "nowhere2.invalid"  # a change clears the old reason
        await settle(pilot)
        assert "✔ ready to add" in static_text(dialog.query_one("#problem"))
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, TargetsScreen)
    assert config_bytes() == before


@pilot_test
async def test_a_host_key_that_arrives_after_the_screen_was_left_adds_nothing_and_says_so(
        tui, config_path, tmp_path, config_bytes, monkeypatch):
    """The host key scan runs in a thread; the administrator may leave Targets meanwhile. Its
    answer was then lost without a word (in the worker, self.app is not found once the screen
    is gone). It must not push the pin confirmation over another screen either, where "Pin
    and add" would start an action on a screen that is gone: a notice says it was not added."""
    import threading

    from app.screens.main_menu import MainMenuScreen
    from app.services import targets
    write_config(config_path, tmp_path)
    before = config_bytes()
    release, asked = threading.Event(), threading.Event()

    def slow_scan(host, port, ssh_config=None):
        asked.set()
        release.wait(20)
        return [("b2.example.net ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA", "SHA256:abc", "ED25519")]
    monkeypatch.setattr(targets, "scan_host_keys", slow_scan)
    app = tui(is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_targets(pilot)
        await pilot.press("a")
        await settle(pilot)
        for field, value in {"name": "b2", "host": "b2.example.net", "root": "/srv/b2"}.items():
            app.screen.query_one(f"#{field}").value = value
        await settle(pilot)
        await pilot.click("#add")
        await wait_while_a_worker_waits(pilot, asked.is_set, "the scan to start")
        await pilot.pause(0.2)
        await pilot.press("escape")  # back to the main menu while it scans
        await pilot.pause(0.2)
        assert asked.is_set() and isinstance(app.screen, MainMenuScreen), app.screen
        release.set()
        await wait_until(pilot, lambda: any("b2 was not added" in n for n in notices(app)), "the notice")
        await settle(pilot)
        assert isinstance(app.screen, MainMenuScreen)  # no dialog pushed over it
        [notice] = [n for n in notices(app) if "b2 was not added" in n]
        assert "Targets was left before b2.example.net answered" in notice, notice
    assert config_bytes() == before


@pilot_test
async def test_a_port_and_user_left_empty_are_what_ssh_config_gives_the_host(
        tui, config_path, tmp_path, config_bytes, monkeypatch):
    """The dialog offered port 22 and user root filled in, so a host whose ssh_config says
    `Port 2222` (or another User) was asked on 22 and written so, where `target add` without
    --port takes ssh_config's port (ssh -G), as ssh itself would. Now both start empty and the
    port is read from ssh_config in the scan's thread. What ssh -G answers is stood in for: the
    ssh_config it reads is root's own (~/.ssh/config, /etc/ssh/ssh_config), not ours to write;
    tests/test_remote.py runs the real ssh -G with an ssh_config of its own."""
    from app.services import targets
    from app.services.results import MirrorError
    write_config(config_path, tmp_path)
    before = config_bytes()
    resolved, scanned = [], []

    def ssh_resolved(host, port, ssh_config=None):
        resolved.append((host, port))
        return {"hostname": "10.9.9.9", "port": "2222"}

    def scan(host, port, ssh_config=None):
        scanned.append((host, port))
        raise MirrorError(f"could not read the host key of {host} port {port}: connection refused")
    monkeypatch.setattr(targets, "ssh_resolved", ssh_resolved)
    monkeypatch.setattr(targets, "scan_host_keys", scan)
    app = tui(is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await add_with(pilot, {"name": "b2", "host": "b2-alias", "root": "/srv/b2"})
        await wait_until(pilot, lambda: isinstance(app.screen, AddTargetDialog)
                         and "port 2222" in static_text(app.screen.query_one("#problem")),
                         "the dialog back with the reason")
        assert resolved == [("b2-alias", None)] and scanned == [("b2-alias", 2222)]
        # back as typed: the port still ssh_config's to choose
        assert app.screen.query_one("#port").value == "" and app.screen.query_one("#user").value == ""
        await pilot.press("escape")
        await settle(pilot)
    assert config_bytes() == before


@pytest.mark.root
@pilot_test
async def test_add_a_real_target_through_the_dialog_pins_its_key_and_tests_it(
        tui, config_path, tmp_path, make_two_hosts):
    bed = make_two_hosts()
    fp = subprocess.run(["ssh-keygen", "-lf", f"{bed.host_key}.pub"], capture_output=True,
                        text=True, check=True).stdout.split()[1]
    root = tmp_path / "replicas"
    root.mkdir()
    app = tui(is_root=True)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await pilot.press("7")
        await settle(pilot)
        for answer in ("enter", "y"):  # Enter is "No" (focused): said, and nothing is added
            await pilot.press("a")
            await settle(pilot)
            dialog = app.screen
            for field, value in (("name", "backup1"), ("host", bed.target_addr),
                                 ("port", str(bed.port)), ("root", str(root))):
                dialog.query_one(f"#{field}").value = value
            await pilot.click("#add")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the host key")
            question = static_text(app.screen.query_one("#question"))
            assert fp in question and f"{bed.target_addr} port {bed.port}" in question
            await pilot.press(answer)
            if answer == "enter":
                await settle(pilot)
                assert any("backup1 was not added: its host key was not pinned" in str(n.message)
                           for n in app._notifications)
                assert ConfigStore(config_path).load().target == ()
        await wait_until(pilot, lambda: isinstance(app.screen, ResultsDialog), "the result")
        notes = static_text(app.screen.query_one("#results-notes"))
        assert "authorized_keys" in notes and "k on this screen shows it again" in notes
        shown_text = "".join(static_text(w) for w in app.screen.query(".result")) + notes
        # the line once (it was twice: in the result and again below it)
        assert shown_text.replace("\n", " ").count("restrict ssh-ed25519") == 1, shown_text
        await pilot.press("enter")
        await settle(pilot)
        host = ConfigStore(config_path).load().target_host("backup1")
        assert host is not None and host.port == bed.port
        assert fp.split(":", 1)[1] in subprocess.run(
            ["ssh-keygen", "-lf", host.known_hosts], capture_output=True, text=True).stdout
        line = subprocess.run([sys.executable, "-m", "app", "--config", str(config_path), "target",
                               "authorized-key", "backup1"], capture_output=True, text=True).stdout
        bed.set_authorized_keys([line.strip().replace('command="mirrorsetup ', f'command="{AGENT} ')])
        await wait_until(pilot, lambda: app.screen.query_one("#targets").row_count == 1, "the row")
        await pilot.press("t")
        await wait_until(pilot, lambda: isinstance(app.screen, ResultsDialog), "the test")
        text = " ".join(static_text(w) for w in app.screen.query(".result"))
        assert "agent" in text and f"root {root}" in text and "round trip" in text, text
        # the room for replicas, as `target test` says it (the screen said the bare free space)
        assert " for replicas (" in text and "the agent keeps free for its journal" in text, text
        await pilot.press("enter")
        await settle(pilot)

        # the target is reinstalled: h shows the new key beside the pinned one, then pins it
        bed.change_host_key()
        new = subprocess.run(["ssh-keygen", "-lf", f"{bed.host_key}.pub"], capture_output=True,
                             text=True, check=True).stdout.split()[1]
        await pilot.press("h")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the new host key")
        question = static_text(app.screen.query_one("#question"))
        assert new in question and f"Pinned now: {fp}" in question, question
        await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen, ResultsDialog), "the re-pin")
        text = " ".join(static_text(w) for w in app.screen.query(".result"))
        assert f"pinned host key {new}" in text and f"in place of {fp}" in text, text
        pinned = subprocess.run(["ssh-keygen", "-lf", host.known_hosts], capture_output=True,
                                text=True).stdout
        assert new.split(":", 1)[1] in pinned and fp.split(":", 1)[1] not in pinned, pinned


@pytest.mark.root
@pilot_test
async def test_a_host_key_pinned_already_is_not_asked_again_and_another_one_still_is(
        tui, config_path, tmp_path, make_two_hosts):
    """A second target on a host whose key is pinned already (target add backup1 pinned it):
    the Add dialog asked to pin that very key again. It adds it saying the key is pinned
    already, with its fingerprint, as `target add` does. After a reinstall (another key) it
    still asks, and the add is refused: a key is never pinned in place of another silently."""
    bed = make_two_hosts()

    def fingerprint() -> str:
        return subprocess.run(["ssh-keygen", "-lf", f"{bed.host_key}.pub"], capture_output=True,
                              text=True, check=True).stdout.split()[1]
    fp = fingerprint()
    root = tmp_path / "replicas"
    root.mkdir()
    where = ["--host", bed.target_addr, "--port", str(bed.port), "--root", str(root)]
    added = subprocess.run([sys.executable, "-m", "app", "--config", str(config_path), "target",
                            "add", "backup1", *where, "--accept-host-key", fp],
                           capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    app = tui(is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await add_with(pilot, {"name": "backup2", "host": bed.target_addr,
                               "port": str(bed.port), "root": str(root)})
        await wait_until(pilot, lambda: isinstance(app.screen, (ResultsDialog, ConfirmDialog)),
                         "the result")
        assert isinstance(app.screen, ResultsDialog), static_text(app.screen.query_one("#question"))
        text = " ".join(static_text(w) for w in app.screen.query(".result")).replace("\n  ", " ")
        assert text.startswith("✔ ok") and "already pinned" in text and fp in text, text
        await pilot.press("enter")
        await settle(pilot)

        bed.change_host_key()  # reinstalled: another key, asked as before, then refused
        new = fingerprint()
        await pilot.press("a")
        await settle(pilot)
        for field, value in {"name": "backup3", "host": bed.target_addr, "port": str(bed.port),
                             "root": str(root)}.items():
            app.screen.query_one(f"#{field}").value = value
        await settle(pilot)
        await pilot.click("#add")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the question")
        assert new in static_text(app.screen.query_one("#question"))
        await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen, ResultsDialog), "the refusal")
        [result] = app.screen.results
        assert result.refused and fp in result.message and new in result.message, result
    assert [t.name for t in ConfigStore(config_path).load().target] == ["backup1", "backup2"]


@pilot_test
async def test_testing_a_target_that_does_not_answer_names_it_and_says_why(
        tui, config_path, tmp_path):
    """t on a target whose host does not answer showed "✘ failed" with an empty subject, the
    reason alone below it. The result names the target, as `target test` does, and says why."""
    write_config(config_path, tmp_path)
    with socket.socket() as s:  # a port nobody listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = config_path.read_text().replace('host = "backup1.example.net"',
                                           f'host = "127.0.0.1"\nport = {port}')
    config_path.write_text(text)
    app = tui(is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_targets(pilot)
        await pilot.press("t")
        await wait_until(pilot, lambda: isinstance(app.screen, ResultsDialog), "the test")
        text = " ".join(static_text(w) for w in app.screen.query(".result"))
        assert text.startswith("✘ failed    backup1\n"), text
        assert "connection refused" in text.lower() and f"port {port}" in text, text
        cli = subprocess.run([sys.executable, "-m", "app", "--config", str(config_path), "target",
                              "test", "backup1"], capture_output=True, text=True)
        said = cli.stderr.split("backup1: ", 1)[1].strip()  # the CLI's words, after its subject
        assert " ".join(said.split()) in " ".join(text.split()), (said, text)


def test_a_switched_over_entry_is_said_as_such_not_as_mount_all(tmp_path):
    """The dashboard's warning and engine cell for an entry handed over to its replica point to
    fail-back, not to Mount all (which refuses it with EREMOTE)."""
    from app.services.protocol import CaptureRow
    from app.services.status import replication_text, snapshot

    class Control:
        def request(self, what, **_):
            return {"filesystem": [{"kind": "fs", "key": str(tmp_path / "src"),
                                    "target": "backup1:data", "state": "switched over",
                                    "switched": {"state": "switched", "time": 1, "seq": 9,
                                                 "target": "backup1:data"},
                                    "last_error": "mount refused: switched over"}], "block": []}

    cfg = tmp_path / "etc" / "replication.toml"
    write_config(cfg, tmp_path)
    snap = snapshot(ConfigStore(cfg), Control(), scan_writers=False)
    [warning] = [w for w in snap.warnings if w.subject == str(tmp_path / "src")]
    assert "switched over to backup1:data" in warning.message and "Mount all" not in warning.message
    row = CaptureRow("fs", "/x", state="switched over", switched={"state": "switching",
                                                                  "target": "backup1:x"})
    assert replication_text(row).startswith("switch-over to backup1:x interrupted")

def warning_of(tmp_path: Path, row: dict):
    """Status's warning of the entry of the daemon's status `row` (a file-system entry of the
    test's configuration, written the first time)."""
    from app.services.status import snapshot

    class Control:
        def request(self, what, **_):
            return {"filesystem": [row], "block": []}

    cfg = tmp_path / "etc" / "replication.toml"
    if not cfg.exists():
        write_config(cfg, tmp_path)
    [warning] = [w for w in snapshot(ConfigStore(cfg), Control(), scan_writers=False).warnings
                 if w.subject == row["key"]]
    return warning



def test_the_warning_of_an_entry_handed_over_names_the_keys_that_end_it(tmp_path):
    """Found by helper-39's walk: the warning of an entry switched over named f and o, not m
    (moved for good, the third way out, found only in Help); an interrupted switch-over's
    named f, where s finishes it (m is refused there)."""
    src = str(tmp_path / "src")
    row = {"kind": "fs", "key": src, "target": "backup1:data", "state": "switched over",
           "switched": {"state": "switched", "time": 1, "seq": 9, "target": "backup1:data"}}

    warning = warning_of(tmp_path, row)
    assert warning.message.endswith("(Targets screen: f fails back, o keeps this side, m: moved "
                                    "there for good)"), warning.message
    row["switched"] = {"state": "switching", "time": 1, "target": "backup1:data"}
    warning = warning_of(tmp_path, row)
    assert warning.message.endswith("(Targets screen: s runs it again, o keeps this side)"), \
        warning.message


def test_a_fail_back_that_brought_nothing_back_is_not_said_to_leave_a_mix(tmp_path):
    """Found by helper-39's walk on the two-host bed: a fail-back refused by the agent before
    anything came back (the promoted replica's directory had been moved away there) records
    applied = 0, and the daemon then allows keeping this host's data; status said, as an ERROR,
    "this host's copy may be a mix of its own data and the replica's" (0 was read as not
    known). Now it says the copy is its own, as a warning, with both ways on; a copy that
    is a mix is said as before."""
    src = str(tmp_path / "src")
    row = {"kind": "fs", "key": src, "target": "backup1:data", "state": "fail-back interrupted",
           "switched": {"state": "switched", "time": 1, "seq": 9, "target": "backup1:data",
                        "failback": "interrupted", "failback_applied": 0}}

    warning = warning_of(tmp_path, row)
    assert warning.level == "warning" and "mix" not in warning.message, warning
    assert "this host's copy is still its own data (nothing of the replica's was written here)" \
        in warning.message and f"mirrorsetup replica resolve {src} --discard-target --yes" in \
        warning.message and f"mirrorsetup failback {src} --yes" in warning.message, warning
    row["switched"] = {**row["switched"], "failback_applied": 3}
    warning = warning_of(tmp_path, row)
    assert warning.level == "error" and "this host's copy is a mix of its own data and the " \
        "replica's" in warning.message, warning


@pilot_test
async def test_the_targets_screen_says_a_fail_back_that_brought_nothing_back_left_no_mix(
        canned_targets, config_path, tmp_path, config_bytes):
    """As above, on the Targets screen: its state said "this host's copy may be a mix", and m's
    question "(this host's copy may be a mix …)"; nothing came back."""
    write_config(config_path, tmp_path)
    before = config_bytes()
    src = str(tmp_path / "src")
    now = [{"kind": "fs", "key": src, "captured": False, "target": "backup1:data",
            "state": "fail-back interrupted",
            "switched": {"state": "switched", "seq": 9, "time": 1, "target": "backup1:data",
                         "failback": "interrupted", "failback_applied": 0}}]
    async with canned_targets(now) as (app, pilot, screen):
        table = screen.query_one("#replicas")
        assert cell(table, src, "state") == "nothing came back: f again or o", \
            cell(table, src, "state")  # (at 80 columns; the details and warning say it whole)
        await pilot.press("m")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmDialog), type(app.screen).__name__
        question = static_text(app.screen.query_one("#question"))
        assert "mix" not in question and "its data stays as it was at the switch-over" in \
            question, question
        await pilot.press("n")
        await settle(pilot)
    assert config_bytes() == before


def test_a_long_connection_state_is_short_in_a_cell_and_whole_in_the_warnings(tmp_path, capsys):
    """A split brain's refusal is a paragraph (what happened, both ways out): `status` printed
    all of it in the table's replication cell (a 300-column row, found by hand) and the
    dashboard cut it mid-word. The cell says its kind and first reason with the retry; the
    warnings, the details and --json keep every word."""
    from app.cli.output import print_status
    from app.services.protocol import CaptureRow
    from app.services.status import replication_text, snapshot
    refusal = ("refused: split brain: the target was promoted at 2026-12-02 02:50:36 (generation "
               "c595); nothing was written. Choose: `mirrorsetup replica resolve ENTRY "
               "--discard-target` (the source wins) or `mirrorsetup failback ENTRY`, retry in 1 s")

    class Control:
        def request(self, what, **_):
            return {"filesystem": [{"kind": "fs", "key": str(tmp_path / "src"), "captured": True,
                                    "target": "backup1:data", "state": "captured",
                                    "replication": "split brain", "connection": refusal,
                                    "last_error": refusal}], "block": []}

    cfg = tmp_path / "etc" / "replication.toml"
    write_config(cfg, tmp_path)
    snap = snapshot(ConfigStore(cfg), Control(), scan_writers=False)
    print_status(snap)
    out = capsys.readouterr().out
    [line] = [x for x in out.splitlines() if x.startswith(str(tmp_path / "src"))]
    assert "split brain (refused: split brain, retry in 1 s)" in line and "Choose" not in line
    assert "--discard-target" in out  # the warning below the table says what to do
    row = CaptureRow.from_json(Control().request("status")["filesystem"][0])
    assert replication_text(row).startswith("split brain (refused: split brain, retry in 1 s)")
    assert refusal in replication_text(row, long=True)
    due = CaptureRow.from_json({**Control().request("status")["filesystem"][0], "connection":
                                refusal.replace(", retry in 1 s", ", trying again now")})
    assert replication_text(due).startswith("split brain (refused: split brain, trying again now)")


def test_a_short_connection_state_keeps_ssh_s_reason():
    """Found by helper-11: "disconnected: ssh: connect to host H port 22: Connection refused"
    was cut to "disconnected: ssh" in the tables, the dashboard and status."""
    from app.services.status import short_connection
    assert short_connection("disconnected: ssh: connect to host backup1.example.net port 22: "
                            "Connection refused, retry in 8 s") \
        == "disconnected: Connection refused, retry in 8 s"
    assert short_connection("refused: split brain: the target was promoted at 12:00. Choose") \
        == "refused: split brain"


def test_an_entry_whose_capture_does_not_answer_is_said_so_not_as_an_unknown_replica():
    """The daemon's row of a capture that has not answered carries only its error: the
    Targets screen said "replica —; " (its data and replication unknown, nothing said)."""
    from app.screens.targets import role_and_state
    from app.services.protocol import CaptureRow
    row = CaptureRow("fs", "/srv/data", target="backup1:data", captured=True,
                     error="the worker (pid 5) has not answered for 12 s")
    role, state = role_and_state(row)
    assert (role.plain, state.plain) == ("source", "capture: the worker (pid 5) has not answered "
                                                   "for 12 s"), (role, state)


def test_a_failed_over_source_says_whether_it_is_read_only_here():
    """The source after a fail-over is read-only (its capture's mount), or not while a file is
    open for writing: the Targets screen's FAILED OVER line says which, before the reason."""
    from app.screens.targets import _source_role_and_state
    from app.services.protocol import CaptureRow
    said = "failed over: the target was promoted at 12:00"
    base = {"kind": "fs", "key": "/srv/data", "captured": True, "target": "backup1:data",
            "target_data": "promoted", "last_error": said}
    for read_only, start in ((True, "read-only here; "),
                             ("EBUSY; open for writing: pid 7 (vi) holds /srv/data/a",
                              "NOT read-only here (status says why); "), (None, "")):
        role, state = _source_role_and_state(CaptureRow.from_json(
            {**base, "read_only_here": read_only}), long=True)
        assert role.plain == "FAILED OVER" and state.plain.startswith(start + "failed over"), state
