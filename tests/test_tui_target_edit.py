"""Targets → Edit (e): the selected target's settings filled in, host and root shown and not
changeable, a bad value said at once and nothing written, Save changes the file as `target set`
does (in a worker) and says old -> new; the same values are "unchanged"."""

from __future__ import annotations

import threading

from test_tui_support import (  # noqa: F401
    config_bytes, pilot_test, settle, static_text, tui, wait_until)
from test_tui_targets import open_targets, write_config

from app.screens.dialogs import ResultsDialog
from app.screens.target_edit import EditTargetDialog
from app.services.config import ConfigStore


async def edit(pilot, typed: dict[str, str]) -> EditTargetDialog:
    """e on the selected target, `typed` into its fields (nothing saved yet)."""
    await pilot.press("e")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, EditTargetDialog), "the dialog")
    dialog = pilot.app.screen
    for field, value in typed.items():
        dialog.query_one(f"#{field}").value = value
    await settle(pilot)
    return dialog


async def saved(pilot) -> str:
    """Save pressed: the results dialog's text."""
    await pilot.click("#save")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, ResultsDialog), "the result")
    text = " ".join(static_text(w) for w in pilot.app.screen.query(".result")).replace("\n  ", " ")
    await pilot.press("enter")
    await settle(pilot)
    return text


@pilot_test
async def test_edit_fills_in_the_target_and_saves_what_was_changed(
        tui, config_path, tmp_path, config_bytes):
    write_config(config_path, tmp_path)
    host = ConfigStore(config_path).load().target_host("backup1")
    app = tui(is_root=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_targets(pilot)
        dialog = await edit(pilot, {})
        assert dialog.query_one("#port").value == "22"
        assert dialog.query_one("#identity").value == host.identity
        assert dialog.query_one("#compression").value == "zstd"
        assert dialog.query_one("#bandwidth").value == ""  # none: no cap
        fixed = static_text(dialog.query_one("#fixed"))
        assert "backup1.example.net" in fixed and "/srv/replicas" in fixed  # shown, no input
        assert not dialog.query("#host") and not dialog.query("#root")

        before = config_bytes()
        await edit(pilot, {"bandwidth": "fast", "port": "70000"})  # (still the same dialog)
        problem = static_text(dialog.query_one("#problem")).replace("\n", " ")
        assert "bandwidth: not a rate: 'fast'" in problem and "port" in problem, problem
        await pilot.click("#save")
        await settle(pilot)
        assert app.screen is dialog and config_bytes() == before  # refused: nothing written
        await pilot.press("escape")  # Cancel: nothing written
        await settle(pilot)
        assert not isinstance(app.screen, EditTargetDialog) and config_bytes() == before

        threads = []
        real = ConfigStore.set_target

        def witness(self, *args, **kwargs):
            threads.append(threading.current_thread() is threading.main_thread())
            return real(self, *args, **kwargs)
        ConfigStore.set_target = witness
        try:
            await edit(pilot, {"bandwidth": "5MiB/s", "compression": "none"})
            text = await saved(pilot)
        finally:
            ConfigStore.set_target = real
        assert threads == [False]  # written off the UI thread
        assert "bandwidth none -> 5MiB/s" in text and "compression zstd -> none" in text, text
        now = ConfigStore(config_path).load().target_host("backup1")
        assert (now.bandwidth, now.compression) == ("5MiB/s", "none")
        assert (now.host, now.root, now.identity) == (host.host, host.root, host.identity)

        await edit(pilot, {})  # the new values filled in; saved as they are: unchanged
        assert app.screen.query_one("#bandwidth").value == "5MiB/s"
        before = config_bytes()
        assert "unchanged" in await saved(pilot)
        assert config_bytes() == before
