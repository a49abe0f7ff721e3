"""What an ssh failure is said to be, from OpenSSH's own words.

The stderr texts below are what OpenSSH_9.2p1 (Debian 12) printed on this machine against the
tests/netbed.py target and against listeners on 127.0.0.1 (collected while fixing the findings
these tests stand for); the changed-host-key banner is in tests/test_remote.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.services.targets import ssh_failure_text, ssh_reason

# (exit status, stderr) as ssh left them
NOT_PINNED = (255, "No ED25519 host key is known for [10.173.165.250]:32063 and you have "
                   "requested strict checking.\r\nHost key verification failed.\r\n")
NOT_EXECUTABLE = (126, "bash: line 1: /srv/mirrorsetup/bin/mirrorsetup: Permission denied\n")
NOT_INSTALLED = (127, "bash: line 1: /nonexistent/mirrorsetup: No such file or directory\n")
KEY_REFUSED = (255, "root@10.173.165.250: Permission denied (publickey).\r\n")
HUNG_UP_BEFORE_HANDSHAKE = (255, "kex_exchange_identification: Connection closed by remote host\r\n"
                                 "Connection closed by 127.0.0.1 port 38419\r\n")
RESET_BEFORE_HANDSHAKE = (255, "kex_exchange_identification: read: Connection reset by peer\r\n"
                               "Connection reset by 127.0.0.1 port 44673\r\n")


def test_a_host_key_not_pinned_at_all_is_said_so_not_changed():
    """Before: 'refused: host key not pinned or changed (Host key verification failed.)' for a
    known_hosts that holds no key for the target: ssh had said which it was."""
    state, retry = ssh_failure_text(NOT_PINNED[1], NOT_PINNED[0], "backup1")
    assert state.startswith("refused: no host key is pinned for [10.173.165.250]:32063 "), state
    assert "changed" not in state and "target rekey backup1" in state and not retry, state


def test_an_agent_that_cannot_be_executed_is_not_said_to_refuse_our_key():
    """Before: status 126 with bash's 'Permission denied' (the forced command names a file that is
    not executable) was 'refused: the target does not accept our key (…)', sending the
    administrator to the authorized_keys key instead of the program."""
    state, retry = ssh_failure_text(NOT_EXECUTABLE[1], NOT_EXECUTABLE[0], "backup1")
    assert state.startswith("refused: the target cannot run the agent (bash: line 1: "
                            "/srv/mirrorsetup/bin/mirrorsetup: Permission denied)"), state
    assert "does not accept our key" not in state and "cannot be run" in state, state
    assert "target authorized-key backup1" in state and "--agent" not in state, state
    # the other two stay what they were
    state, _ = ssh_failure_text(NOT_INSTALLED[1], NOT_INSTALLED[0], "backup1")
    assert state.startswith("refused: the target cannot run the agent (bash: line 1: "
                            "/nonexistent/mirrorsetup: No such file or directory); install"), state
    state, retry = ssh_failure_text(KEY_REFUSED[1], KEY_REFUSED[0], "backup1")
    assert state == "refused: the target does not accept our key (root@10.173.165.250: " \
                    "Permission denied (publickey).)" and not retry


def test_a_hang_up_before_the_ssh_handshake_is_told_by_the_line_that_says_so():
    """Before: 'Connection closed by 127.0.0.1 port 38419' (the same as a session that ended
    later): the kex_exchange_identification line says the server hung up before any ssh was
    spoken (sshd's MaxStartups, a wrapper, or no sshd on that port)."""
    assert ssh_reason(HUNG_UP_BEFORE_HANDSHAKE[1], 255) == \
        "kex_exchange_identification: Connection closed by remote host"
    assert ssh_reason(RESET_BEFORE_HANDSHAKE[1], 255) == \
        "kex_exchange_identification: read: Connection reset by peer"
    state, retry = ssh_failure_text(*reversed(HUNG_UP_BEFORE_HANDSHAKE))
    assert state == "disconnected: kex_exchange_identification: Connection closed by remote host"
    assert retry


@pytest.mark.parametrize("ended_by", [KeyboardInterrupt, EOFError])
def test_a_pin_question_ended_at_the_terminal_leaves_no_key(tmp_path, monkeypatch, ended_by):
    """Found by a walk: ^C or ^D at `target add`'s pin question left the key generated for the
    target (etc/keys/NAME_ed25519) though nothing was added; a plain "no" already removed it."""
    from app.services import targets
    from app.services.config import ConfigStore, TargetHost
    store = ConfigStore(tmp_path / "etc" / "replication.toml")
    monkeypatch.setattr(targets, "scan_host_keys", lambda host, port, ssh_config=None: [
        ("h ssh-ed25519 AAAA", "SHA256:" + "B" * 43, "ED25519")])

    def ask(keys):
        raise ended_by()
    with pytest.raises(ended_by):
        targets.add_target(store, TargetHost(name="t4", host="192.0.2.1", root="/srv/r"), confirm=ask)
    assert not (tmp_path / "etc" / "keys").exists() or not list((tmp_path / "etc" / "keys").iterdir())
    assert not store.path.exists() or not store.load().target


def test_an_identity_without_its_public_key_or_a_missing_ssh_config_adds_nothing(
        tmp_path, monkeypatch):
    """Found by helper-35's walk: `target add --identity FILE` whose FILE.pub is not there (or
    FILE the .pub itself) pinned the host key, wrote the target into the configuration and
    then died with a Python traceback (FileNotFoundError) making its authorized_keys line; a
    missing --ssh-config was added, and every connection then failed ("Can't open user config
    file"). Each is refused now, naming the file, and nothing is added; `target
    authorized-key` of a target whose .pub went says so instead of a traceback."""
    import subprocess

    from app.services import targets
    from app.services.config import ConfigStore, TargetHost
    from app.services.results import MirrorError
    store = ConfigStore(tmp_path / "etc" / "replication.toml")
    monkeypatch.setattr(targets, "scan_host_keys", lambda host, port, ssh_config=None: [
        ("h ssh-ed25519 AAAA", "SHA256:" + "B" * 43, "ED25519")])
    fp = "SHA256:" + "B" * 43
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    junk = tmp_path / "junk"
    junk.write_text("not a key\n")
    cases = [(dict(identity=str(junk)), f"the public key {junk}.pub of identity {junk} does not exist"),
             (dict(identity=f"{key}.pub"), f"identity {key}.pub is a public key: give the private key"),
             (dict(identity=str(key), ssh_config=str(tmp_path / "nope")),
              f"ssh_config {tmp_path / 'nope'} does not exist"),
             # (mine: its directories were made, every one of them, and the host key pinned)
             (dict(identity=str(key), known_hosts=str(tmp_path / "no" / "such" / "kh")),
              f"known_hosts {tmp_path / 'no' / 'such' / 'kh'}: its directory {tmp_path / 'no' / 'such'} "
              "does not exist"),
             (dict(identity=str(key), known_hosts=str(tmp_path)), f"known_hosts {tmp_path} is a directory")]
    for opts, said in cases:
        r = targets.add_target(store, TargetHost(name="t1", host="192.0.2.1", root="/srv/r", **opts),
                               accept_host_key=fp)
        assert r.failed and said in r.message, r.message
        assert not store.path.exists() or not store.load().target, opts
    assert not (tmp_path / "no").exists()
    (tmp_path / "junk.pub").write_text("junk\n")
    r = targets.add_target(store, TargetHost(name="t1", host="192.0.2.1", root="/srv/r",
                                             identity=str(junk)), accept_host_key=fp)
    assert r.failed and f"{junk}.pub is not an OpenSSH public key" in r.message, r.message
    assert not store.path.exists() or not store.load().target
    r = targets.add_target(store, TargetHost(name="t1", host="192.0.2.1", root="/srv/r",
                                             identity=str(key)), accept_host_key=fp)
    assert not r.failed and r.details["authorized_key"].startswith(
        'command="mirrorsetup serve-target --root /srv/r",restrict ssh-ed25519 '), r.message
    Path(f"{key}.pub").unlink()
    with pytest.raises(MirrorError, match=f"the public key {key}.pub of identity {key} does not exist"):
        targets.authorized_key_line(store.load().target_host("t1"))


def test_the_back_off_between_reconnects_never_goes_above_its_cap(tmp_path, monkeypatch):
    """Found by a walk: status said `retry in 68 s` (65, 63) while the README says the back-off
    doubles from 1 s to 60 s: the ±20 % jitter was applied after the cap."""
    import random

    from app.engine import shipper as shipper_mod
    from app.engine.journal import Journal

    class Gone:  # a remote target that is never reachable
        on_positions = None

        def open(self):
            raise shipper_mod.TargetUnavailable("disconnected: the connection was refused")

        def close(self):
            pass

    monkeypatch.setattr(random, "uniform", lambda a, b: b)  # the jitter at its largest
    journal = Journal(tmp_path)
    ship = shipper_mod.Shipper(journal, Gone(), local=False)
    waits = []

    def wait(delay):
        waits.append(delay)
        if len(waits) >= 12:
            ship._stop.set()
        return False
    monkeypatch.setattr(ship._kick, "wait", wait)
    try:
        ship._run()
    finally:
        journal.close()
    assert waits[0] == pytest.approx(1.2) and len(waits) == 12, waits
    assert max(waits) == shipper_mod.BACKOFF_MAX == 60.0, waits


def test_a_session_that_broke_is_said_in_words_not_as_a_python_errno(tmp_path):
    """Found by a walk: during a blackhole status said `disconnected: [Errno 32] Broken pipe`
    (str() of the OSError from writing to the ssh that had ended). The words now say what
    broke, with the errno's name."""
    import errno

    from app.services.targets import session_error_text

    assert session_error_text(BrokenPipeError(errno.EPIPE, "Broken pipe")) == \
        "the connection broke (EPIPE)"
    assert session_error_text(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")) \
        == "the connection was reset (ECONNRESET)"
    assert session_error_text(OSError(errno.EIO, "Input/output error")) == "Input/output error (EIO)"
    assert session_error_text(ValueError("stream ended inside a frame")) == "stream ended inside a frame"
    state, retry = ssh_failure_text("client_loop: send disconnect: Broken pipe\r\n", 255)
    assert state == "disconnected: the connection broke (client_loop: send disconnect: Broken pipe)"
    assert retry


def test_a_full_remote_target_says_where_to_make_room():
    """Found by a walk: `paused: target full (data2: No space left on device)` said nothing of
    what to do, nor where (the agent's words; it knows neither the name we reach its host by
    nor the root the administrator configured)."""
    from app.engine.remote import paused_text
    from app.services.targets import Settings

    s = Settings(name="backup1", host="backup1.example", root="/srv/replica", path="data2")
    assert paused_text("target full (data2: No space left on device)", s) == \
        "target full (data2: No space left on device): free space below /srv/replica on " \
        "backup1.example"
    assert paused_text("target over quota (data2: Disk quota exceeded)", s).endswith(
        ": free space below /srv/replica on backup1.example, or raise the quota there")
    assert paused_text("target read-only (data2: Read-only file system)", s) == \
        "target read-only (data2: Read-only file system)"


def test_a_session_whose_ssh_ended_under_the_sender_says_the_connection_broke():
    """The walk's case itself: the sender writes to an ssh that has ended (EPIPE)."""
    import subprocess

    from app.engine.journal import KIND_FS, Record
    from app.engine.remote import RemoteTarget
    from app.engine.shipper import TargetUnavailable
    from app.services.targets import Settings

    t = RemoteTarget(Settings(name="backup1", host="backup1.example", root="/srv/replica",
                              path="data", compression="none"), "fs", None, None)
    t.proc = subprocess.Popen(["true"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, bufsize=0)
    t.proc.wait()
    t._expect = 1
    with pytest.raises(TargetUnavailable) as lost:
        t.send([Record(1, KIND_FS, "write", {"path": "f", "offset": 0}, b"x" * 100)])
    assert lost.value.state == "disconnected: the connection broke (EPIPE)", lost.value.state


def test_a_reconnect_under_way_is_said_as_connecting_again_not_as_about_to_try(tmp_path):
    """Found by a walk: while the shipper's next attempt was under way (ssh can take seconds to
    answer or time out), status said `disconnected: …, trying again now` for all that time.
    Now the capture's figures say `connecting again (last: …)`, and status keeps its warning,
    its level and the reason in the short form."""
    import threading
    import time
    import types

    from app.engine import shipper as shipper_mod
    from app.engine.capture import Capture
    from app.engine.journal import Journal
    from app.services import wire
    from app.services.protocol import CaptureRow
    from app.services.status import _replication_warnings, replication_text, short_connection

    why = "disconnected: the connection was refused"
    trying, release = threading.Event(), threading.Event()

    class Slow:  # refuses, then its next attempt hangs until released
        on_positions = None
        tries = 0

        def open(self):
            self.tries += 1
            if self.tries == 2:
                trying.set()
                release.wait(30)
            raise shipper_mod.TargetUnavailable(why, delay=0.5 if self.tries == 1 else 30)

        def close(self):
            pass

    journal = Journal(tmp_path)
    ship = shipper_mod.Shipper(journal, Slow(), local=False)
    cap = Capture.__new__(Capture)
    cap.journal, cap.shipper, cap.catching, cap.consistent = journal, ship, None, True
    cap.target = types.SimpleNamespace(consistent=True, rtt=None, codec=wire.Codec("zstd"))
    cap.remote, cap.resync_bytes, cap.read_only_here = True, 0, None
    cap.spec = types.SimpleNamespace(kind="fs")
    cap.ops = types.SimpleNamespace(open_handles=lambda: 0, waits_for_room=False)
    runner = threading.Thread(target=ship._run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while ship.fig.retry_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = cap.figures()["connection"]
        assert waiting == f"{why}, retry in 1 s", waiting  # (the retry is not due yet)
        assert trying.wait(10), "the second attempt never began"
        time.sleep(0.2)
        figures = cap.figures()
    finally:
        ship._stop.set()
        ship._kick.set()  # (its back-off ends at once)
        release.set()
        runner.join(10)
        journal.close()
    assert figures["connection"] == f"connecting again (last: {why})", figures
    row = CaptureRow("fs", "/srv/data", captured=True)
    row.update(figures)
    assert short_connection(row.connection) == \
        "connecting again (last: disconnected: the connection was refused)"
    assert "(connecting again (last: disconnected: the connection was refused))" in \
        replication_text(row), replication_text(row)
    warnings = []
    _replication_warnings("/srv/data", row, warnings)
    assert [(w.message, w.level) for w in warnings] == \
        [(f"target: connecting again (last: {why})", "warning")], warnings
    refused = CaptureRow("fs", "/srv/data", captured=True,
                         connection="connecting again (last: refused: split brain: promoted. Choose)")
    assert short_connection(refused.connection) == "connecting again (last: refused: split brain)"
    warnings = []
    _replication_warnings("/srv/data", refused, warnings)
    assert [w.level for w in warnings] == ["error"], warnings


def test_a_killed_agents_last_log_line_is_not_said_as_the_reason():
    """Found by a walk: after the agent was killed, status said "disconnected:
    mirrorsetup-agent[N] WARNING paused: …", its last log line, which read as the cause. Log
    lines below ERROR are what it was doing; an ERROR line is still the reason."""
    said = "mirrorsetup-agent[4242] INFO session from h\nmirrorsetup-agent[4242] WARNING paused: target full\n"
    state, retry = ssh_failure_text(said, 255, "backup1")
    assert "WARNING" not in state and "paused" not in state, state
    assert state == "disconnected: the agent ended without saying why (killed?); ssh exited with status 255"
    assert retry
    error = said + "mirrorsetup-agent[4242] ERROR records missing: the source must resync\n"
    assert ssh_reason(error, 1) == "mirrorsetup-agent[4242] ERROR records missing: the source must resync"
    assert ssh_reason("ssh: connect to host 10.0.0.1 port 22: Connection refused\n", 255) == \
        "ssh: connect to host 10.0.0.1 port 22: Connection refused"


def test_an_agent_whose_root_is_missing_says_how_to_make_it(tmp_path):
    """Found by a walk: `target test` of a target whose --root did not exist said only "serve-
    target root R is not a directory", not where or what to do."""
    import json
    import subprocess
    import sys

    from app.services import wire
    root = tmp_path / "no such root"
    out = subprocess.run([sys.executable, "-m", "app", "serve-target", "--root", str(root)],
                         input=b"", capture_output=True, timeout=60).stdout
    assert out.startswith(wire.GREETING), out
    kind, payload = wire.read_frame(_reader(out[len(wire.GREETING):]))
    msg = json.loads(payload)
    assert kind == wire.ERROR and msg["code"] == "root", msg
    assert f"create it there (mkdir -m 700 -p '{root}')" in msg["message"], msg
    assert "or correct the --root of the key's command= line there" in msg["message"], msg


def _reader(data: bytes):
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        pos += n
        return data[pos - n:pos]
    return read


def test_a_verify_whose_session_was_lost_says_to_try_again_once_connected():
    """Found by a walk: `block verify` while the link had just died ended, seconds later, in
    "cannot reach the target (disconnected: …)" without the next step that `block mirror`,
    refused at once, gave: the session was lost while the verify asked it."""
    import errno

    from app.engine.capture import unavailable_reply
    lost = unavailable_reply("disconnected: the target stopped answering (Timeout, server not responding.)")
    assert lost["error"] == ("cannot reach the target (disconnected: the target stopped answering "
                             "(Timeout, server not responding.)); try again once status says connected")
    assert lost["errno"] == errno.ENOTCONN
    said = "cannot reach the target (connecting); try again once status says connected"
    assert unavailable_reply(said)["error"] == said  # said already: not twice
    assert unavailable_reply("paused: target full")["errno"] == errno.ENOSPC


def test_a_block_fence_whose_loop_cannot_be_looked_at_is_said_not_set_blind(tmp_path, monkeypatch):
    """Review of the block fence after a fail-over: the loops are looked at (is one mounted or
    open for writing?) from the shipper's thread, as the agent refuses the session. A loop
    detached meanwhile raised out of that callback; now it is said (status: could NOT be made
    read-only, why) and the writes are not refused blind (a file system there would take the
    errors as a broken disk); the next refusal tries again and fences once nothing uses it."""
    import types

    from app.engine.capture import Capture
    from app.services import blockplan
    cap = Capture.__new__(Capture)
    cap.read_only_here = None
    cap.spec = types.SimpleNamespace(kind="block", key="/dev/xvdq", run=str(tmp_path))
    cap.ops = types.SimpleNamespace(fenced=False)

    def gone():
        raise FileNotFoundError(2, "No such file or directory", "/dev/loop77")
    monkeypatch.setattr(blockplan, "View", gone)
    cap._on_refused("split-brain", {"changes_here": False})
    assert cap.ops.fenced is False
    assert isinstance(cap.read_only_here, str) and "its loop could not be looked at" in \
        cap.read_only_here and "/dev/loop77" in cap.read_only_here, cap.read_only_here
    monkeypatch.setattr(blockplan, "View", lambda: types.SimpleNamespace(  # (its loop is gone)
        captures_of=lambda key: []))
    cap._on_refused("split-brain", {"changes_here": False})
    assert cap.ops.fenced is True and cap.read_only_here is True
    cap._fence_block(False)  # what _on_connect does once resolve has taken the session
    assert cap.ops.fenced is False and cap.read_only_here is None
