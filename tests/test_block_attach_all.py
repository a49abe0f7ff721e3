"""`block attach-all` / `detach-all` without a daemon: they do not load the daemon's client when
its socket does not exist (its imports were ~5 ms of each call's start), and decide as before."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import block
from app.services.control import ControlClient
from app.services.socketpath import SOCKET_ENV

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("given, env", [(None, None), (None, "/tmp/env.sock"),
                                        ("/tmp/given.sock", "/tmp/env.sock")])
def test_the_socket_looked_for_is_the_one_the_client_uses(given, env, monkeypatch):
    if env is None:
        monkeypatch.delenv(SOCKET_ENV, raising=False)
    else:
        monkeypatch.setenv(SOCKET_ENV, env)
    args = argparse.Namespace(socket=given)
    assert block.socket_path(args) == ControlClient(given).socket_path


def _run(config: Path, socket: Path, action: str, *, check: bool = True) -> tuple[list[dict], bool]:
    """(results, whether app.services.control was imported) of one call in a fresh interpreter."""
    code = ("import json, sys\nfrom app.cli import main\n"
            f"rc = main(['--config', {str(config)!r}, '--socket', {str(socket)!r}, '--json', "
            f"'block', {action!r}])\n"
            "print(json.dumps({'rc': rc, 'control': 'app.services.control' in sys.modules}), "
            "file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    tail = json.loads(p.stderr.strip().splitlines()[-1])
    assert tail["rc"] == 0 or not check, p.stderr
    return json.loads(p.stdout), tail["control"]


@pytest.mark.root
def test_without_a_socket_the_daemons_client_is_not_loaded(config_path, disks, tmp_path):
    disk = disks()
    from app.services.config import ConfigStore
    ConfigStore(config_path).add_block(disk)
    missing = tmp_path / "no-daemon.sock"
    attached, loaded = _run(config_path, missing, "attach-all")
    assert not loaded
    assert [r["outcome"] for r in attached] == ["ok"] and "NOT captured" in attached[0]["message"]
    detached, loaded = _run(config_path, missing, "detach-all")
    assert not loaded and [r["outcome"] for r in detached] == ["ok"]

    # Something at the socket's path: the client is asked, as before (here it is no socket, so
    # no daemon answers and the entry is attached plainly all the same).
    missing.write_text("")
    attached, loaded = _run(config_path, missing, "attach-all")
    assert loaded and [r["outcome"] for r in attached] == ["ok"]
    detached, loaded = _run(config_path, missing, "detach-all")
    assert loaded and [r["outcome"] for r in detached] == ["ok"]


# What attach-all and detach-all printed without --json never used, yet every call imported it:
# typing, json, textwrap and shlex (7-16 ms of each start here) and the entries module.
UNUSED = {"typing", "json", "textwrap", "shlex", "app.services.entries"}


@pytest.mark.root
def test_attach_all_and_detach_all_load_nothing_they_do_not_use(config_path, disks, tmp_path):
    from app.services.config import ConfigStore
    ConfigStore(config_path).add_block(disks())
    for action in ("attach-all", "detach-all"):
        code = ("import sys\nfrom app.cli import main\n"
                f"rc = main(['--config', {str(config_path)!r}, '--socket', "
                f"{str(tmp_path / 'no-daemon.sock')!r}, 'block', {action!r}])\n"
                "print(rc, *sys.modules, file=sys.stderr)\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        rc, *loaded = p.stderr.strip().splitlines()[-1].split()
        assert rc == "0" and "ok" in p.stdout, (p.stdout, p.stderr)
        assert "app.services.replication" in loaded  # the imports really happened
        assert not UNUSED & set(loaded), (action, UNUSED & set(loaded))


@pytest.mark.root
def test_an_entry_without_a_fixed_loop_leaves_the_loop_another_entry_keeps(config_path, disks,
                                                                           tmp_path):
    """Found by helper-27's walk on a busy host: the first entry (no fixed loop) was attached to
    the first free loop, the very one the second entry keeps, which then failed 'busy'."""
    from app.services import loop
    from app.services.config import ConfigStore
    first, second = disks(), disks()
    kept = loop.find_free()  # the first free loop now: the one the first entry would get
    store = ConfigStore(config_path)
    store.add_block(first)
    store.add_block(second, loop=kept)
    attached, _ = _run(config_path, tmp_path / "no-daemon.sock", "attach-all", check=False)
    try:
        assert attached[0]["outcome"] == "ok" and attached[0]["details"]["loop"] != kept, attached
        if attached[1]["outcome"] != "ok":  # a busy host: only another's loop may be in its way
            assert "is busy" in attached[1]["message"] and str(tmp_path) not in attached[1]["message"]
        else:
            assert attached[1]["details"]["loop"] == kept
    finally:
        _run(config_path, tmp_path / "no-daemon.sock", "detach-all", check=False)
