"""`mirrorsetup service mount-units`: unit names as systemd spells them, and units made from a
real ext4 mounted on a real fixed loop device over a scratch "disk", through the CLI.

The independent witnesses are systemd's own tools when installed (`systemd-escape` for names,
`systemd-analyze verify` for the unit and its ordering) and util-linux `mount` for Options=.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run

from app.cli.service import unit_text as daemon_unit_text
from app.engine.mountunits import NO_LOOP, escape_path, options_of, unit_name, unit_text
from app.services import loop as loopsvc
from app.services.config_toml import BlockEntry
from app.services.mounts import parse_mountinfo, read_mountinfo
from app.services.layout import CAPTURE_FILE
from app.services.layout import entry_id as capture_id

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_ESCAPE = shutil.which("systemd-escape")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

# path -> what `systemd-escape --path` prints (systemd 252)
ESCAPES = {
    "/": "-",
    "//": "-",
    "/srv/data": "srv-data",
    "/mnt/my disk": "mnt-my\\x20disk",
    "/a-b": "a\\x2db",
    "/.hidden/x": "\\x2ehidden-x",
    "/a/.b": "a-.b",
    "/srv//data/": "srv-data",
    "/a/./b": "a-b",
    "/a\\b": "a\\x5cb",
    "/a:b_c.d": "a:b_c.d",
    "/%x": "\\x25x",
    "/ü": "\\xc3\\xbc",
    "/a/b-c/d e": "a-b\\x2dc-d\\x20e",
}


def test_escape_path_matches_systemd_escape():
    for path, expected in ESCAPES.items():
        assert escape_path(path) == expected, path
        assert escape_path(os.fsencode(path)) == expected, path
        if SYSTEMD_ESCAPE:
            assert run(SYSTEMD_ESCAPE, "--path", "--", path).stdout.strip() == expected, path
    assert unit_name("/srv/data") == "srv-data.mount"
    for bad in ("/a/../b", ".."):
        with pytest.raises(ValueError):
            escape_path(bad)


def test_options_keep_mount_flags_and_drop_what_mount_does_not_take():
    line = ("36 25 7:5 / /srv/data ro,nosuid,noatime shared:1 - ext4 /dev/loop5 "
            "rw,seclabel,errors=remount-ro\n")
    assert options_of(parse_mountinfo(line)[0]) == "ro,nosuid,noatime,errors=remount-ro"


@pytest.mark.skipif(not SYSTEMD_ANALYZE, reason="systemd-analyze not installed")
def test_unit_and_daemon_unit_have_no_ordering_cycle(tmp_path):
    """A mount unit's implicit Before=local-fs.target plus the daemon's After=local-fs.target
    would be a cycle; systemd-analyze finds it when there is one."""
    m = parse_mountinfo("36 25 7:5 / /srv/data rw,relatime - ext4 /dev/loop5 rw\n")[0]
    entry = BlockEntry("/dev/sdb", "/dev/loop5")
    units = tmp_path / "units"
    units.mkdir()
    (units / "srv-data.mount").write_text(unit_text(entry, m, "now"))
    (units / "mirrorsetup.service").write_text(daemon_unit_text("/usr/bin/true"))
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(units / "srv-data.mount"),
                        str(units / "mirrorsetup.service")], capture_output=True, text=True,
                       env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"})
    assert r.returncode == 0 and "cycle" not in r.stderr and "Refusing" not in r.stderr, r.stderr
    assert "\nBefore=local-fs.target" not in (units / "srv-data.mount").read_text()


# ---- the real thing: a disk, its fixed loop, ext4 mounted on the loop -------------------------

def cli(config: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", "--config", str(config), *argv],
                          capture_output=True, text=True, cwd=REPO)


def unit_fields(text: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            fields.setdefault(key, []).append(value)
    return fields


@pytest.fixture
def mounted(tmp_path, disks):
    """mount(dev, path, *opts) with util-linux; every mount is undone (lazily) at teardown."""
    made: list[Path] = []

    def mount(dev: str, path: Path, *options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        run("mount", "-t", "ext4", *(["-o", ",".join(options)] if options else []), dev, str(path))
        made.append(path)
        return path

    yield mount
    for path in reversed(made):
        run("umount", "-l", str(path), check=False)


@pytest.fixture
def fixed_loop(unused_loop):
    """A fixed loop nobody else takes (conftest's unused_loop), made by `block attach-all`."""
    return unused_loop


@pytest.fixture
def setup(tmp_path, config_path, disks, fixed_loop, mounted):
    """Entry 1: disk A with fixed loop B (ext4 on B, mounted by hand). Entry 2: disk C with no
    fixed loop, its ext4 mounted RAW. The disks fixture detaches B before A at teardown."""
    disk, raw_disk, loop = disks(), disks(), fixed_loop
    assert cli(config_path, "block", "add", disk, "--loop", loop).returncode == 0
    r = cli(config_path, "block", "attach-all", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [x["details"]["loop"] for x in json.loads(r.stdout)] == [loop]
    assert cli(config_path, "block", "add", raw_disk).returncode == 0  # added after: not attached
    run("mkfs.ext4", "-q", "-F", loop)
    run("mkfs.ext4", "-q", "-F", raw_disk)
    where = mounted(loop, tmp_path / "srv data", "noatime", "nodev")
    raw_where = mounted(raw_disk, tmp_path / "raw")
    return disk, loop, where, raw_disk, raw_where


@pytest.mark.root
def test_mount_units_from_the_live_mount_table(tmp_path, config_path, setup):
    disk, loop, where, raw_disk, raw_where = setup
    root = tmp_path / "root"
    name = escape_path(str(where)) + ".mount"
    unit_file = root / "etc" / "systemd" / "system" / name

    # default: show the text, write nothing
    r = cli(config_path, "service", "mount-units", "--root", str(root))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"==> {unit_file}" in r.stdout and f"What={loop}" in r.stdout
    # an entry without a unit makes the exit status 1: its line is on stderr, as every failed
    # line is (the exit-status rule of --help; helper-26's walk found it on stdout)
    assert f"no unit for {raw_disk}: {NO_LOOP}" in r.stderr and "no unit for" not in r.stdout
    assert f"raw device mounted on {raw_where}" in r.stderr  # a problem: stderr
    assert not root.exists()

    out = json.loads(cli(config_path, "service", "mount-units", "--json").stdout)
    [unit] = out["units"]
    assert unit["name"] == name and not unit["written"]
    assert out["skipped"] == [{"device": raw_disk, "reason": NO_LOOP}]
    assert [(p["device"], p["mount_point"]) for p in out["problems"]] == [(raw_disk, str(raw_where))]
    fields = unit_fields(unit["text"])
    assert fields["What"] == [loop] and fields["Where"] == [str(where)]
    assert fields["Type"] == ["ext4"]
    assert fields["Requires"] == ["mirrorsetup.service"] and "mirrorsetup.service" in fields["After"]
    assert fields["DefaultDependencies"] == ["no"] and fields["Before"] == ["umount.target"]
    options = fields["Options"][0].split(",")
    assert options[0] == "rw" and {"noatime", "nodev"} <= set(options)

    # --write below --root: mode 0644, the shown text, a hint
    r = cli(config_path, "service", "mount-units", "--write", "--root", str(root))
    assert r.returncode == 1 and f"wrote {unit_file}" in r.stdout, r.stdout + r.stderr
    assert "next: systemctl --root" in r.stdout and name in r.stdout
    assert stat.S_IMODE(unit_file.stat().st_mode) == 0o644
    written = unit_file.read_text()
    assert written.splitlines()[1:] == unit["text"].splitlines()[1:]
    assert [p.name for p in unit_file.parent.iterdir()] == [name]  # no temp file left

    if SYSTEMD_ANALYZE:  # systemd accepts the file under this name, and there is no cycle
        (unit_file.parent / "mirrorsetup.service").write_text(daemon_unit_text("/usr/bin/true"))
        r = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit_file),
                            str(unit_file.parent / "mirrorsetup.service")], capture_output=True,
                           text=True, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_file.parent}:"})
        assert "cycle" not in r.stderr and "Refusing" not in r.stderr, r.stderr

    # mount(8) takes What/Where/Type/Options back as they are
    run("umount", str(where))
    run("mount", "-t", fields["Type"][0], "-o", fields["Options"][0], loop, str(where))
    remounted = [m for m in read_mountinfo() if m.mount_point == str(where)]
    assert remounted and "noatime" in remounted[-1].options.split(",")

    # a unit file we did not write is never replaced
    foreign = tmp_path / "root2" / "etc" / "systemd" / "system" / name
    foreign.parent.mkdir(parents=True)
    foreign.write_text("[Mount]\nWhat=/dev/sdz\n")
    r = cli(config_path, "--json", "service", "mount-units", "--write", "--root", str(tmp_path / "root2"))
    assert r.returncode == 1 and foreign.read_text() == "[Mount]\nWhat=/dev/sdz\n"
    out = json.loads(r.stdout)
    assert not out["units"][0]["written"]
    assert any(p.get("path") == str(foreign) and "not generated by mirrorsetup" in p["message"]
               for p in out["problems"])

    # all fine: only the entry with its fixed loop, the raw mount gone -> exit 0
    run("umount", str(raw_where))
    assert cli(config_path, "block", "remove", raw_disk).returncode == 0
    r = cli(config_path, "service", "mount-units", "--write", "--root", str(root), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["units"][0]["written"] and out["skipped"] == [] and out["problems"] == []


@pytest.mark.root
def test_fixed_loop_not_mounted_gets_no_unit(config_path, disks, fixed_loop):
    disk, loop = disks(), fixed_loop
    assert cli(config_path, "block", "add", disk, "--loop", loop).returncode == 0
    r = cli(config_path, "service", "mount-units", "--json")
    assert r.returncode == 1
    [skip] = json.loads(r.stdout)["skipped"]
    assert skip["device"] == disk and "not attached" in skip["reason"]
    assert cli(config_path, "block", "attach-all").returncode == 0
    r = cli(config_path, "service", "mount-units", "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["skipped"] == [
        {"device": disk, "reason": f"mount {loop} where it belongs once, then run this again"}]
    assert json.loads(r.stdout)["units"] == []


@pytest.mark.root
def test_loop_on_the_daemons_capture_file_counts_as_the_entrys(tmp_path, config_path, disks,
                                                                fixed_loop, mounted):
    """With the daemon running, the loop is backed by the entry's capture file (FUSE), not by the
    device: that layout (the same path, here on a plain file) must get its unit too."""
    disk = disks()
    assert cli(config_path, "block", "add", disk, "--loop", fixed_loop).returncode == 0
    capture = tmp_path / "state" / "block" / capture_id(disk) / CAPTURE_FILE
    capture.parent.mkdir(parents=True)
    capture.write_bytes(b"")
    os.truncate(capture, 64 << 20)
    loopsvc.attach(str(capture), loop=fixed_loop)
    run("mkfs.ext4", "-q", "-F", fixed_loop)
    where = mounted(fixed_loop, tmp_path / "data")
    r = cli(config_path, "service", "mount-units", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    [unit] = json.loads(r.stdout)["units"]
    assert unit["name"] == escape_path(str(where)) + ".mount"
    assert f"What={fixed_loop}" in unit["text"].splitlines()
