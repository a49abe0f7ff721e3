"""The CLI as scripts use it (util-linux is the model): results on stdout, failures and refusals
on stderr, one exit-code rule (0 done, 1 an entry failed, 2 refused) written in --help and the
README, errno names in --json, and entries shown safely (a newline in a path) and flagged when
invalid (a hand-edited `path = "/"`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli.common import EXIT_CODES
from app.cli.output import report
from app.services.results import Outcome, Result

REPO = Path(__file__).resolve().parent.parent


def cli(*argv: str, env: dict | None = None, timeout: float | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *argv], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture
def config(tmp_path) -> Path:
    """An empty configuration and a socket where no daemon listens, both in the test's dir."""
    return tmp_path / "etc" / "replication.toml"


def args(config: Path, *argv: str) -> list[str]:
    return ["--config", str(config), "--socket", str(config.parent / "none.sock"), *argv]


@pytest.mark.parametrize("argv", [
    ["fs", "remove", "/nope"], ["fs", "verify", "/nope"], ["fs", "mirror", "/nope"],
    ["block", "remove", "/dev/nope"], ["block", "verify", "/dev/nope"],
    # 2**20: above every loop index the kernel hands out (LOOP_CTL_ADD refuses it: EINVAL), so
    # nobody can have made it (CI failed once a session by hand had left /dev/loop99999 unbound)
    ["block", "mirror", "/dev/nope"], ["manual", "detach", "/dev/loop1048576"],
    ["fs", "add", "/nope"], ["config", "import-legacy", "--fs", "/nope"],
    ["config", "import-legacy", "--block", "/nope"],
])
def test_the_same_mistake_is_refused_the_same_way(config, argv):
    """Naming something that does not exist: exit 2, the reason on stderr only, ENOENT in JSON."""
    empty = write_empty(config)
    r = cli(*args(config, *argv))
    assert r.returncode == 2, (argv, r.returncode, r.stdout, r.stderr)
    named = argv[-1]
    assert r.stdout == "" and r.stderr.startswith("mirrorsetup: ") and named in r.stderr
    r = cli(*args(config, *argv, "--json"))
    assert r.returncode == 2
    refusal = json.loads(r.stdout)
    assert refusal["errno_name"] == "ENOENT" and named in refusal["error"], refusal
    assert named in r.stderr  # the human message stays on stderr
    assert config.read_bytes() == empty


def write_empty(config: Path) -> bytes:
    """An empty configuration file, as the CLI writes one."""
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("schema = 1\n")
    config.chmod(0o600)
    return config.read_bytes()


@pytest.mark.parametrize("argv", [
    ["fs", "list"], ["block", "list"], ["target", "list"], ["status"], ["status", "--watch"],
    ["block", "attach-all"], ["block", "detach-all", "--dry-run"], ["fs", "mount-all"],
    ["fs", "remove", "/srv/data"], ["block", "verify", "/dev/nope"], ["target", "test", "b1"],
    ["switchover", "/srv/data"], ["service", "mount-units"], ["block", "devices"],
])
def test_a_named_configuration_that_does_not_exist_is_refused_by_what_reads_it(config, argv):
    """A mistyped --config (or $MIRRORSETUP_CONFIG) is not an empty configuration: a command
    that only reads it is refused (exit 2) naming the file, ENOENT in JSON, nothing made."""
    for how, env in (("--config", None), ("env", {"MIRRORSETUP_CONFIG": str(config)})):
        argv_ = ["--socket", str(config.parent / "none.sock"), *argv] if env else args(config, *argv)
        r = cli(*argv_, env=env, timeout=60)  # `status --watch` read an empty one for good
        assert r.returncode == 2, (how, argv, r.returncode, r.stdout, r.stderr)
        assert r.stdout == "" and f"configuration file {config} does not exist" in r.stderr, how
        refusal = json.loads(cli(*argv_, "--json", env=env, timeout=60).stdout)
        assert refusal["errno_name"] == "ENOENT" and str(config) in refusal["error"], refusal
        assert not config.parent.exists()  # not even the lock file's directory


@pytest.mark.parametrize("argv", [
    ["block", "add", "/dev/nope", "--on-full", "10X"], ["manual", "attach", "/dev/nope",
                                                        "--sizelimit", "-5"],
    ["fs", "nosuch"], ["fs", "add"], ["status", "--bogus"], ["nosuch"],
])
def test_bad_arguments_with_json_give_the_refusal_object_on_stdout(config, argv):
    """argparse's refusals printed nothing on stdout under --json (helper-26's walk): a
    script's json.loads read '' for `--offset 10X`, an object for `--queue-limit 10X`. Now
    the same {error, errno, errno_name} as every refusal; usage and reason stay on stderr,
    and without --json stdout stays empty."""
    for where in ("before", "after"):
        argv_ = ["--json", *argv] if where == "before" else [*argv, "--json"]
        if argv == ["nosuch"] and where == "after":
            continue  # argparse stops at the unknown command
        r = cli(*args(config, *argv_))
        assert r.returncode == 2, (argv_, r.stdout, r.stderr)
        refusal = json.loads(r.stdout)
        assert refusal["errno_name"] == "EINVAL" and refusal["error"].startswith("mirrorsetup"), refusal
        assert "error:" in r.stderr and "usage:" in r.stderr
    r = cli(*args(config, *argv))
    assert r.returncode == 2 and r.stdout == "" and "error:" in r.stderr
    assert not config.exists()


def test_fs_add_of_a_file_says_enotdir_in_json(config, tmp_path):
    """A file where a directory is expected said errno null in --json (block add says
    ENOTBLK for its like); the path and the target now say ENOTDIR, as stat(2)'s callers do,
    and a target whose parent is missing ENOENT (helper-26's walk)."""
    data, plain = tmp_path / "data", tmp_path / "plain"
    data.mkdir()
    plain.write_text("x")
    for argv, name in ((["fs", "add", str(plain)], "ENOTDIR"),
                       (["fs", "add", str(data), "--target", str(plain)], "ENOTDIR"),
                       (["fs", "add", str(data), "--target", str(tmp_path / "no" / "t")], "ENOENT")):
        r = cli(*args(config, *argv, "--json"))
        assert r.returncode == 2 and json.loads(r.stdout)["errno_name"] == name, (argv, r.stdout)


def test_an_entry_refused_as_wrong_says_einval_in_json(config, tmp_path):
    """helper-26's walk: `fs add /` and many refusals of the configuration's checks ("is
    inside …, which is already replicated", "overlaps …") said "errno": null in --json: a
    script could not tell them from a success's missing field. A wrong entry is EINVAL; a
    missing one stays ENOENT."""
    top = tmp_path / "top"
    (top / "inner").mkdir(parents=True)
    assert cli(*args(config, "fs", "add", str(top))).returncode == 0
    for argv, name in ((["fs", "add", "/"], "EINVAL"),
                       (["fs", "add", str(top / "inner")], "EINVAL"),
                       (["fs", "add", str(tmp_path / "nowhere")], "ENOENT")):
        r = cli(*args(config, *argv, "--json"))
        said = json.loads(r.stdout)
        assert r.returncode == 2 and said["errno_name"] == name and said["errno"], (argv, r.stdout)


def test_fs_add_takes_a_relative_path_as_remove_does(config, tmp_path):
    """helper-26's walk: `fs add data` said "must be an absolute path" while `fs remove data`
    (and mirror, verify) took it from the working directory, as mount(8) and losetup(8) do."""
    (tmp_path / "data").mkdir()
    r = subprocess.run([sys.executable, "-m", "app", "--config", str(config), "fs", "add", "data"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and f"added {tmp_path / 'data'}" in r.stdout, r.stdout + r.stderr
    listed = json.loads(cli(*args(config, "fs", "list", "--json")).stdout)
    assert [e["path"] for e in listed] == [str(tmp_path / "data")], listed


def test_an_entry_added_without_a_target_is_told_so(config, tmp_path):
    """helper-26's walk: `fs add DIR` without --target was taken in silence (`fs list` then
    showed TARGET "-" and nothing said what that means)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    r = cli(*args(config, "fs", "add", str(tmp_path / "a")))
    assert r.returncode == 0 and "no target: its changes are captured and replicated nowhere until " \
        f"it has one (`mirrorsetup fs set {tmp_path / 'a'} --target DIR`)" in r.stdout, r.stdout
    r = cli(*args(config, "fs", "add", str(tmp_path / "b"), "--target", str(tmp_path / "t")))
    assert r.returncode == 0 and "no target" not in r.stdout, r.stdout


def test_a_command_that_adds_an_entry_creates_the_named_configuration(config, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    r = cli(*args(config, "fs", "add", str(data)))
    assert r.returncode == 0, r.stderr
    assert json.loads(cli(*args(config, "fs", "list", "--json")).stdout)[0]["path"] == str(data)


def test_a_corrupt_configuration_is_a_refusal_on_stderr(config, tmp_path):
    config.parent.mkdir(parents=True)
    config.write_text('schema = 1\n[[filesystem]]\npath = "relative"\n')
    before = config.read_bytes()
    r = cli(*args(config, "fs", "add", str(tmp_path)))
    assert r.returncode == 2 and r.stdout == ""
    assert "line 3" in r.stderr
    for argv in (["fs", "list"], ["block", "list"], ["status"], ["block", "attach-all"]):
        r = cli(*args(config, *argv))
        assert r.returncode == 2 and r.stdout == "" and "line 3" in r.stderr, argv
    assert config.read_bytes() == before


def test_exit_codes_are_written_in_every_help_and_the_readme():
    for argv in ([], ["fs"], ["fs", "verify"], ["block", "attach-all"], ["manual", "detach"],
                 ["status"], ["daemon"], ["daemon", "status"], ["service", "mount-units"]):
        r = cli(*argv, "--help")
        assert r.returncode == 0 and EXIT_CODES in r.stdout, argv
    readme = (REPO / "README.md").read_text()
    assert EXIT_CODES in readme
    for name in ("MIRRORSETUP_SOCKET", "MIRRORSETUP_STATE_DIR", "--state-dir", "daemon.log"):
        assert name in readme, name


def test_failed_lines_go_to_stderr_and_the_rest_to_stdout(capsys):
    results = [Result("attach", "/dev/a", Outcome.OK, "attached /dev/a as /dev/loop4"),
               Result("attach", "/dev/b", Outcome.FAILED, "refused: /dev/b is mounted on /m", 16)]
    assert report(results) == 1
    out, err = capsys.readouterr()
    assert "/dev/a" in out and "/dev/b" not in out
    assert "/dev/b" in err and "/dev/a" not in err
    assert report(results, as_json=True) == 1
    out, err = capsys.readouterr()
    assert [r["errno_name"] for r in json.loads(out)] == [None, "EBUSY"]
    assert "/dev/b" in err and "/dev/a" not in err


def test_a_newline_in_a_path_stays_on_one_line_and_slash_is_flagged(config, tmp_path):
    odd = tmp_path / "two\nlines"
    odd.mkdir()
    r = cli(*args(config, "fs", "add", str(odd)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and "two\\nlines" in r.stdout
    listed = cli(*args(config, "fs", "list"))
    assert listed.returncode == 0
    assert listed.stdout.splitlines()[1].split()[0] == str(tmp_path / "two\\nlines")
    assert json.loads(cli(*args(config, "fs", "list", "--json")).stdout)[0]["path"] == str(odd)

    config.write_text(config.read_text() + '\n[[filesystem]]\npath = "/"\n')  # by hand
    listed = cli(*args(config, "fs", "list"))
    assert listed.returncode == 0
    assert "warning: invalid entry /: Do not select the root" in listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("/ "))
    assert "Do not select the root" in row
    problem = {e["path"]: e["problem"] for e in json.loads(cli(*args(config, "fs", "list",
                                                                     "--json")).stdout)}
    assert problem["/"].startswith("Do not select the root")
    status = cli(*args(config, "status"))
    assert status.returncode == 0
    assert "ERROR: /: invalid entry: Do not select the root" in status.stdout
    assert [line.split()[1] for line in status.stdout.splitlines() if line.startswith("/ ")] \
        == ["INVALID"]
    assert all("\\n" in line for line in status.stdout.splitlines() if "two" in line)


def test_daemon_status_and_stop_without_a_daemon(config, tmp_path):
    state = tmp_path / "state"
    r = cli(*args(config, "daemon", "status"), env={"MIRRORSETUP_STATE_DIR": str(state)})
    assert r.returncode == 1 and "not running" in r.stdout
    assert f"state directory: {state}" in r.stdout
    assert f"{config.parent / 'daemon.log'}" in r.stdout
    info = json.loads(cli(*args(config, "daemon", "status", "--json")).stdout)
    assert info["running"] is False and info["socket"] == str(config.parent / "none.sock")
    r = cli(*args(config, "daemon", "stop"))
    assert r.returncode == 0 and "unchanged" in r.stdout and "not running" in r.stdout


def test_status_watch_prints_again_when_the_configuration_changes(config, tmp_path):
    """`status --watch` follows the same watchers as the TUI (app.services.events): an entry
    added by another command shows in the next print, without a timer."""
    data = tmp_path / "data"
    data.mkdir()
    write_empty(config)
    watch = subprocess.Popen([sys.executable, "-m", "app", *args(config, "status", "--watch")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = ""
        while "Warnings" not in first and "Daemon: " not in first:  # the first print, whole
            first += watch.stdout.readline()
        assert str(data) not in first
        assert cli(*args(config, "fs", "add", str(data))).returncode == 0
        seen = ""
        while str(data) not in seen:
            line = watch.stdout.readline()
            assert line, watch.stderr.read()
            seen += line
    finally:
        watch.kill()
        watch.wait()


def test_status_watch_json_prints_one_document_per_line(config, tmp_path):
    """`status --json --watch` printed indented documents one after another, which no JSON
    reader splits (helper-26's walk). Each print is now one line (JSON Lines)."""
    data = tmp_path / "data"
    data.mkdir()
    write_empty(config)
    watch = subprocess.Popen([sys.executable, "-m", "app", *args(config, "status", "--watch",
                                                                   "--json")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(watch.stdout.readline())
        assert first["filesystem"] == []
        assert cli(*args(config, "fs", "add", str(data))).returncode == 0
        while True:
            line = watch.stdout.readline()
            assert line, watch.stderr.read()
            if json.loads(line)["filesystem"]:
                break
        assert json.loads(line)["filesystem"][0]["path"] == str(data)
    finally:
        watch.kill()
        watch.wait()


@pytest.mark.root
def test_status_watch_prints_again_for_an_entrys_mount_not_for_other_tools_mounts(config, tmp_path):
    """On a host churning other tools' mounts, `status --watch` printed everything again for
    each (reading every loop and every process's descriptors each time); it prints again only
    for what can change it (events.Interest): here a mount at the entry's directory."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    write_empty(config)
    assert cli(*args(config, "fs", "add", str(data))).returncode == 0
    watch = subprocess.Popen([sys.executable, "-m", "app", *args(config, "status", "--watch",
                                                                   "--json")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mounted = []

    def next_line() -> str:  # (a watch that prints nothing more fails the test, never hangs it)
        import queue
        import threading
        got: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: got.put(watch.stdout.readline()), daemon=True).start()
        return got.get(timeout=60)
    try:
        first = json.loads(next_line())
        assert first["filesystem"][0]["other_fstype"] is None
        for _ in range(3):  # another tool's mounts
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "watch-test", str(elsewhere)],
                           check=True)
            subprocess.run(["umount", str(elsewhere)], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "watch-test", str(data)], check=True)
        mounted.append(data)
        second = json.loads(next_line())  # the next print is the entry's mount
        assert second["filesystem"][0]["other_fstype"] == "tmpfs", second
    finally:
        watch.kill()
        watch.wait()
        for point in mounted:
            subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_is_printed_on_stdout(flag):
    from app import __version__
    proc = cli(flag)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"mirrorsetup {__version__}\n", "")
    from importlib.metadata import version  # what the package says; the agent reports __version__
    assert version("mirrorsetup") == __version__


def test_removing_a_target_an_entry_uses_is_a_refusal(config, tmp_path):
    """`target remove` of a target an entry still uses changes nothing: refused (exit 2, as
    the README's rule says), EBUSY and the entry named; it said FAILED and exited 1."""
    data = tmp_path / "data"
    data.mkdir()
    config.parent.mkdir(parents=True)
    config.write_text(f'schema = 1\n\n[[target]]\nname = "b1"\nhost = "b1.example"\n'
                      f'root = "/srv/replica"\n\n[[filesystem]]\npath = "{data}"\n'
                      f'target = "b1:data"\n')
    before = config.read_bytes()
    r = cli(*args(config, "target", "remove", "b1"))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "" and "used by" in r.stderr and str(data) in r.stderr
    r = cli(*args(config, "target", "remove", "b1", "--json"))
    assert r.returncode == 2 and json.loads(r.stdout)["errno_name"] == "EBUSY"
    assert config.read_bytes() == before


def test_an_entry_refused_before_anything_changed_exits_2_not_1(capsys):
    """A result failed as a refusal (nothing was changed, e.g. a switch-over of an entry in
    use) exits 2; once something was done, or something really failed, it is 1."""
    from app.services.results import Refusal
    busy = Result.from_error("switchover", "/srv/data", Refusal("/srv/data is in use", errno=16))
    assert busy.refused and busy.to_json()["details"] == {"refused": True}
    assert Result.from_json(busy.to_json()).refused  # as it crosses the daemon's socket
    assert report([busy]) == 2
    done = Result("attach", "/dev/a", Outcome.OK, "attached /dev/a as /dev/loop4")
    assert report([done, busy]) == 1
    broke = Result("switchover", "/srv/b", Outcome.FAILED, "promotion got no answer", 5)
    assert report([busy, broke]) == 1
    assert report([busy, Result("attach", "/dev/c", Outcome.UNCHANGED, "attached")]) == 2


def test_a_refusal_says_refused_and_a_failure_failed_as_the_exit_status_tells_them_apart(capsys):
    """One rule (results.refuses, Result.word) for the CLI's exit 2 and the TUI's word: an
    error raised before anything changed (a Refusal, a wrong entry or file, a daemon that is
    needed but not running) is "refused"; the line said FAILED for it, as for a syscall that
    failed while it was done, and only the exit status told them apart."""
    import errno

    from app.services.control import ControlClient, DaemonNotRunning
    from app.services.results import ConfigError, MirrorError
    wrong = Result.from_error("add", "/", ConfigError("/ is never replicated", obj="/"))
    no_daemon = Result.from_error("verify", "/dev/a", DaemonNotRunning("the daemon is not running"))
    broke = Result.from_error("unmount", "/srv/b", MirrorError("umount2: Operation not permitted",
                                                              errno=errno.EPERM))
    assert (wrong.word, no_daemon.word, broke.word) == ("refused", "refused", "failed")
    for refused in (wrong, no_daemon):
        assert report([refused]) == 2
        assert capsys.readouterr().err.split()[:2] == ["REFUSED", f"{refused.target}:"]
    assert report([broke]) == 1
    assert capsys.readouterr().err.split()[:2] == ["FAILED", "/srv/b:"]
    # a manual detach of a loop that does not exist changed nothing either (the CLI refuses it)
    from app.services.config import ConfigStore
    from app.services.replication import Replication
    gone = Replication(ConfigStore("/nonexistent/replication.toml"), ControlClient(
        "/nonexistent/mirrorsetup-control.sock")).manual_detach("/dev/loop999999")
    assert (gone.errno, gone.word) == (errno.ENOENT, "refused"), gone
    # what the client raises for a socket nobody serves is such a refusal
    with pytest.raises(DaemonNotRunning) as exc:
        ControlClient("/nonexistent/mirrorsetup-control.sock").request("ping")
    assert Result.from_error("ping", "daemon", exc.value).refused


def test_status_at_80_columns_keeps_the_replicas_state_readable(monkeypatch, capsys):
    """At 80 columns a long connection state ("disconnected since …: …, retry in …") made the
    file-system row 120 columns wide: the terminal wrapped it and the replica's state was lost
    in the wrap (the table did not even say it). The data state has its own column, and a
    table wider than the terminal prints the replication text on its own wrapped line under
    the row: no line is wider than 80, nothing is cut. Piped without $COLUMNS, rows stay whole."""
    import tempfile

    from app.cli.output import print_status
    from app.services.config import ConfigStore
    from app.services.status import snapshot
    top = Path(tempfile.mkdtemp(prefix="h38-"))  # a short path, as an administrator's
    try:
        (top / "src").mkdir()
        cfg = top / "replication.toml"
        cfg.write_text(f'schema = 1\n\n[[target]]\nname = "backup1"\nhost = "backup1.example.net"\n'
                       f'root = "/srv/replicas"\n\n[[filesystem]]\npath = "{top / "src"}"\n'
                       f'target = "backup1:data"\n')
        connection = ("disconnected since 10:52:01: no answer from backup1.example.net within 15 s"
                      ", retry in 12 s")

        class Control:
            def request(self, what, **_):
                return {"filesystem": [{"kind": "fs", "key": str(top / "src"), "captured": True,
                                        "target": "backup1:data", "state": "capturing",
                                        "replication": "waiting for the target",
                                        "connection": connection, "target_data": "consistent",
                                        "bytes_queued": 4096, "lag_seconds": 3.5}], "block": []}

        snap = snapshot(ConfigStore(cfg), Control(), scan_writers=False)
        monkeypatch.setenv("COLUMNS", "80")
        print_status(snap)
        out = capsys.readouterr().out
        assert max(len(line) for line in out.splitlines()) <= 80, out
        lines = out.splitlines()
        [i] = [n for n, line in enumerate(lines) if line.startswith(str(top / "src"))]
        assert "REPLICA" in lines[i - 1] and "consistent" in lines[i].split(), out
        [j] = [n for n, line in enumerate(lines) if line.startswith("    replication: ")]
        below = " ".join(x.strip() for x in lines[j:j + 2])
        assert "    lag 3.5 s" in lines[i + 1:j], out  # moved too: the rest fits
        assert below.startswith("replication: waiting for the target (disconnected since "
                                "10:52:01: no answer from backup1.example"), out
        assert "retry in 12 s)" in below, out
        monkeypatch.delenv("COLUMNS")
        print_status(snap)  # piped (capsys is no terminal), no $COLUMNS: one line per row
        [row] = [x for x in capsys.readouterr().out.splitlines() if x.startswith(str(top / "src"))]
        assert "consistent" in row.split() and row.rstrip().endswith("retry in 12 s)"), row
    finally:
        shutil.rmtree(top)


def test_status_at_80_columns_says_the_figures_under_a_row_with_their_units_after(
        monkeypatch, capsys):
    """The lag and the queue moved under a row at 80 columns read "lag s: 12.2" and
    "queued: 1.2 MiB", the table's column names. They read as the rest of the product says
    them ("queued 1.2 MiB · lag 12.2 s"): "lag 12.2 s", "queued 1.2 MiB"."""
    import tempfile

    from app.cli.output import print_status
    from app.services.config import ConfigStore
    from app.services.status import snapshot
    top = Path(tempfile.mkdtemp(prefix="h40-"))  # a short path, as an administrator's
    try:
        (top / "src").mkdir()
        (top / "disk.img").write_bytes(b"")
        cfg = top / "replication.toml"
        cfg.write_text(f'schema = 1\n\n[[target]]\nname = "backup1"\nhost = "backup1.example.net"\n'
                       f'root = "/srv/replicas"\n\n[[filesystem]]\npath = "{top / "src"}"\n'
                       f'target = "backup1:data"\n\n[[block]]\ndevice = "{top / "disk.img"}"\n'
                       'target = "backup1:disk.img"\n')
        figures = {"captured": True, "state": "capturing", "connection": "connected",
                   "target_data": "consistent", "bytes_queued": 1234567, "lag_seconds": 12.2}

        class Control:
            def request(self, what, **_):
                return {"filesystem": [{**figures, "kind": "fs", "key": str(top / "src"),
                                        "target": "backup1:data", "replication": "established"}],
                        "block": [{**figures, "kind": "block", "key": str(top / "disk.img"),
                                   "target": "backup1:disk.img", "replication": "established"}]}
        monkeypatch.setenv("COLUMNS", "80")
        print_status(snapshot(ConfigStore(cfg), Control(), scan_writers=False))
        out = capsys.readouterr().out
        assert max(len(line) for line in out.splitlines()) <= 80, out
        lines = out.splitlines()
        [b] = [n for n, line in enumerate(lines) if line.startswith(str(top / "disk.img"))]
        under = lines[b + 1:lines.index("", b)]
        assert "    lag 12.2 s" in under and "    queued 1.2 MiB" in under, out
        assert "    lag 12.2 s" in lines[:b], out  # the file-system row's too
        assert "lag s" not in out and "queued:" not in out, out
    finally:
        shutil.rmtree(top)


def test_fs_set_changes_the_access_time_choice_as_the_consoles_t_does(config, tmp_path):
    """The console's t (toggle access-time replication) had no command: a script could only
    remove the entry and add it again. `fs set PATH --atime/--no-atime` sets it; already so is
    unchanged (the file not written); no choice, both, or an entry not configured: refused."""
    data = tmp_path / "data"
    data.mkdir()
    assert cli(*args(config, "fs", "add", str(data))).returncode == 0

    def listed() -> bool:
        out = cli(*args(config, "fs", "list", "--json"))
        return json.loads(out.stdout)[0]["replicate_atime"]
    r = cli(*args(config, "fs", "set", str(data), "--atime", "--json"))
    assert r.returncode == 0 and json.loads(r.stdout)[0]["outcome"] == "ok", r.stdout + r.stderr
    assert listed() is True and "replicate_atime = true" in config.read_text()
    before = config.read_bytes()
    r = cli(*args(config, "fs", "set", str(data), "--atime"))
    assert r.returncode == 0 and "already" in r.stdout and config.read_bytes() == before, r.stdout
    for argv, said in ((["fs", "set", str(data)], "say what to set: --atime, --no-atime, "
                                                  "--target DIR or --no-target"),
                       (["fs", "set", str(data), "--adopt-target"], "say what to set"),
                       (["fs", "set", str(data), "--atime", "--no-atime"], "not allowed with"),
                       (["fs", "set", str(tmp_path / "nope"), "--no-atime"],
                        "is not a configured file-system entry")):
        r = cli(*args(config, *argv))
        assert r.returncode == 2 and said in r.stderr and r.stdout == "", (argv, r.stderr)
        assert config.read_bytes() == before
    r = cli(*args(config, "fs", "set", str(data), "--no-atime"))
    assert r.returncode == 0 and "now not replicated" in r.stdout and listed() is False, r.stdout
