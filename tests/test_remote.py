"""Replication to another host over SSH: a target network namespace with its own sshd
(tests/netbed.py), the agent as the forced command of a dedicated key, real faults."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_engine_support import REPO, engine_maker

pytestmark = pytest.mark.root
AGENT = str(Path(sys.executable).parent / "mirrorsetup")  # sshd's PATH does not hold the venv


def cli(cfg: Path, *argv: str, socket: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"MIRRORSETUP_SOCKET": socket} if socket else {})}
    return subprocess.run([sys.executable, "-m", "app", "--config", str(cfg), *argv],
                          capture_output=True, text=True, cwd=REPO, env=env)


def tree(root: Path) -> dict[str, str]:
    """Every path below root with its type, mode, owner, content hash or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link " + os.readlink(p)
            elif p.is_file():
                out[rel] = f"file {st.st_mode:o} {st.st_uid}:{st.st_gid} {st.st_mtime_ns} " + \
                    hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = f"dir {st.st_mode:o} {st.st_uid}:{st.st_gid}"
    return out


class Remote:
    """A configured remote target `backup1` on a bed, added the way an administrator does."""

    def __init__(self, tmp_path: Path, bed, **opts):
        self.bed = bed
        self.cfg = tmp_path / "etc" / "replication.toml"
        self.root = tmp_path / "replicas"
        self.root.mkdir()
        fp = subprocess.run(["ssh-keygen", "-lf", f"{bed.host_key}.pub"], capture_output=True,
                            text=True, check=True).stdout.split()[1]
        argv = ["target", "add", "backup1", "--host", bed.target_addr, "--port", str(bed.port),
                "--user", "root", "--root", str(self.root), "--agent", AGENT,
                "--ssh-config", str(bed.ssh_config), "--accept-host-key", fp]
        for k, v in opts.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        r = cli(self.cfg, *argv)
        assert r.returncode == 0, r.stdout + r.stderr
        self.add_output = r.stdout
        line = cli(self.cfg, "target", "authorized-key", "backup1").stdout.strip()
        bed.set_authorized_keys([line])
        self.authorized_line = line


@pytest.fixture
def remote(tmp_path, make_two_hosts):
    with engine_maker(tmp_path) as make:
        def build(*, bed_opts=None, **opts):
            bed = make_two_hosts(**(bed_opts or {}))
            return make, Remote(tmp_path, bed, **opts)
        yield build


def test_target_add_pins_the_host_key_and_test_reaches_the_agent(remote, tmp_path):
    make, r = remote()
    assert "pinned host key SHA256:" in r.add_output and "generated key" in r.add_output
    assert r.authorized_line.startswith(f'command="{AGENT} serve-target --root {r.root}",restrict ssh-ed25519 ')
    t = cli(r.cfg, "target", "test", "backup1", "--json")
    assert t.returncode == 0, t.stdout + t.stderr
    info = json.loads(t.stdout)
    assert info["wire_version"] == info["source_wire_version"] and info["free_bytes"] > 0
    assert info["rtt_ms"] is not None and info["root"] == str(r.root)
    listed = json.loads(cli(r.cfg, "target", "list", "--json").stdout)
    assert [t["name"] for t in listed] == ["backup1"]


def test_fs_entry_replicates_every_kind_of_change_to_the_other_host(remote, tmp_path):
    make, r = remote()
    src = tmp_path / "src"
    src.mkdir()
    (src / "before").write_text("there before the first mount")
    a = cli(r.cfg, "fs", "add", str(src), "--target", "backup1:data")
    assert a.returncode == 0, a.stdout + a.stderr
    eng, _, _ = make(config=r.cfg)
    (src / "d").mkdir(mode=0o750)
    (src / "d" / "f").write_bytes(os.urandom(300_000))
    with open(src / "d" / "f", "r+b") as f:
        f.seek(5000)
        f.write(b"patched")
    os.symlink("d/f", src / "link")
    os.link(src / "d" / "f", src / "hard")
    os.rename(src / "before", src / "d" / "moved")
    os.chmod(src / "d" / "moved", 0o600)
    os.truncate(src / "hard", 1000)
    (src / "gone").write_text("x")
    os.unlink(src / "gone")
    eng.drain(str(src))
    st = eng.status(str(src))
    assert st["connection"] == "connected" and st["target_data"] == "consistent", st
    assert st["resync_bytes"] > 0 and st["wire_bytes"] > 0
    assert tree(src) == tree(r.root / "data")
    assert eng.verify(str(src)) == []
