"""Remote targets and fail-over: the hosts replicas are kept on (add with the host key shown
and pinned, test, the authorized_keys line, remove), and each entry replicated to one of them
with its role and state (source with a secondary replica, switched over, split brain), with
switch-over, fail-back and "this host wins" behind confirmations that say what happens to
which host's data."""

from __future__ import annotations

import dataclasses
import time

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, Static, TextArea

from app.screens.banner import RootBanner
from app.screens.base import Col, KeyedTable, TaskScreen, elide, selected_key
from app.screens.dialogs import ConfirmDialog, labelled
from app.services import layout
from app.services.events import Interest, MountsChanged
from app.services.results import MirrorError, Outcome, Result
from app.services.status import (healthy_secondary, nothing_to_fail_back,
                                 replication_lines, short_connection)
from app.services.units import cap_shown, shown

TARGET_COLUMNS = (Col("name", "Name", 9, 16), Col("host", "Host", 8, 30),
                  Col("root", "Root", 6, 30, path=True), Col("bandwidth", "Bandwidth", 2, 14))
# the state is what the table is for: at 80 columns the replica's name (in the details, i) goes
# before the state is cut
REPLICA_COLUMNS = (Col("entry", "Entry", 9, 30, path=True),
                   Col("target", "Replica", 3, 24, path=True), Col("role", "Role", 9, 16),
                   Col("state", "State", 8, 40))


def entry_width(screen_width: int) -> int:
    """An entry's path in the table (its end kept): narrower at 80 columns, for the state."""
    return 20 if screen_width < 100 else 30
NOTES = ("A replica on another host can take over: Switch over (planned), or on that host "
         "`mirrorsetup replica promote` when this one is gone. Fail back brings it home.")


def remote_name(target: str | None, config) -> str | None:
    """The remote target an entry's target names (NAME:PATH), or None for a local path."""
    if not target or target.startswith("/") or ":" not in target:
        return None
    name = target.split(":", 1)[0]
    return name if config.target_host(name) is not None else None


def role_and_state(row, *, long: bool = False, marked: dict | None = None) -> tuple[Text, Text]:
    """An entry's role toward its replica, and the state of both, in words: what tells them
    apart first (a cell's end is cut at 80 columns); `long`: the details' words, in full.
    `marked`: without a daemon, the switch-over marker its state directory holds (status
    reads it, so this screen says "switched over" as the dashboard and `status` do)."""
    if row is None:
        if marked:
            role, state = _handed_over(marked, long)
            return role, Text(f"{state.plain} (the daemon is not running)", style=state.style)
        return Text("?", style="yellow"), Text("the daemon is not running", style="yellow")
    if row.switched:
        return _handed_over(row.switched, long)
    return _source_role_and_state(row, long)


def _handed_over(sw: dict, long: bool) -> tuple[Text, Text]:
    """An entry handed over to its replica (`sw`: its switch-over marker)."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(sw.get("time") or 0))
    if sw.get("failback") == "interrupted" and sw.get("failback_applied") == 0:
        # nothing came back: still switched over, this host's data its own
        return (Text("fail-back interrupted", style="bold yellow"), Text(
            f"nothing came back: this host's copy {layout.mix_words(0)}; the replica is primary there; "
            "f fails back again, o keeps this host's data" if long else
            "nothing came back: f again or o"))
    if sw.get("failback") == "interrupted":  # this host's copy is a mix: said first
        return (Text("fail-back interrupted", style="bold red"), Text(
            f"this host's copy {layout.mix_words(sw.get('failback_applied'))}: f fails back again"))
    if sw.get("state") == "switched":
        if long:
            return (Text("switched over", style="bold cyan"), Text(
                f"the replica is primary there since {when} (seq {sw.get('seq')}); not "
                "captured here"))
        return Text("switched over", style="bold cyan"), Text(f"primary there since {when}")
    return Text("switching", style="bold yellow"), Text("a switch-over was interrupted: run it again")


def _source_role_and_state(row, long: bool) -> tuple[Text, Text]:
    if row.target_data == "promoted":
        # promoted there while this host changed nothing: not both sides moved on
        here = ("read-only here; " if row.read_only_here is True else
                "NOT read-only here (status says why); " if row.read_only_here else "")
        return Text("FAILED OVER", style="bold yellow"), Text(here + shown(
            row.last_error or "the replica was promoted"))
    if row.target_data == "split-brain":
        return Text("SPLIT BRAIN", style="bold red"), Text(shown(row.last_error or "both sides moved on"))
    if not row.captured:
        return Text("source", style="yellow"), Text("not captured" + (f": {row.last_error}"
                                                                      if row.last_error else ""))
    if row.error:  # its figures are not known (e.g. the worker has not answered for N s)
        return Text("source", style="yellow"), Text(f"capture: {row.error}", style="bold red")
    data = row.target_data or "—"
    style = "green" if data == "consistent" else "yellow"
    how = row.replication or row.state
    conn = row.connection or ""
    if conn in ("connected", "local", ""):
        return Text("source", style="green"), Text(f"replica {data}; {how}", style=style)
    # not connected: that first (the replica's data and the replication are known from before)
    return Text("source", style="green"), Text(
        f"{conn if long else short_connection(conn)}; replica {data}; {how}", style="yellow")


class AddTargetDialog(ModalScreen["object | None"]):
    """Name, host, port, user, root: the fields `mirrorsetup target add` asks for."""

    CSS_PATH = "dialogs.tcss"
    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    FIELDS = ("name", "host", "port", "user", "root")  # the inputs' ids

    def __init__(self, typed=None, problem: str | None = None) -> None:
        """`typed`: a TargetHost to show again, with the `problem` it met (its host key could
        not be read): the administrator corrects a field instead of typing them all again."""
        super().__init__()
        self._given = None if typed is None else \
            {f: str(getattr(typed, f) or "") for f in self.FIELDS}  # TargetHost's own names
        self._given_problem = problem

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="add-target"):
            yield Label(Text("Add a remote target (a host replicas are kept on)", style="bold"))
            yield labelled(("Name", Input(placeholder="e.g. backup1", id="name", compact=True)))
            yield labelled(("Host", Input(placeholder="an address or ssh_config name", id="host",
                                          compact=True)))
            # empty: what ssh_config gives the host (Port, User), else 22 and root, as
            # `target add` without --port and --user, and as ssh itself would connect
            yield labelled(("Port", Input(placeholder="ssh_config's or 22", id="port",
                                          compact=True)),
                           ("user", Input(placeholder="ssh_config's or root", id="user",
                                          compact=True)))
            yield labelled(("Root", Input(placeholder="directory on the target, e.g. /srv/replicas",
                                          id="root", compact=True)))
            yield Static("", id="problem")
            yield Static("A dedicated key is made; the host key is shown for you to compare "
                         "before it is pinned.", classes="notes")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Add", id="add", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        for field, value in (self._given or {}).items():
            self.query_one(f"#{field}", Input).value = value
        self.query_one("#host" if self._given else "#name").focus()

    def _values(self) -> dict[str, str]:
        return {f: self.query_one(f"#{f}", Input).value for f in self.FIELDS}

    def _value(self, field: str) -> str:
        return self.query_one(f"#{field}", Input).value.strip()

    def _check(self, *, final: bool):
        """(problem, target): the fields as typed, by the configuration's own rules. While
        typing (`final` False) a field not typed yet is not a problem."""
        from app.services.config_toml import TargetHost
        from app.services.results import ConfigError
        name, host, root, port = (self._value("name"), self._value("host"), self._value("root"),
                                  self._value("port"))
        problems = []  # every one at once: an administrator fixes them in one go
        # (an empty port is ssh_config's for the host, else 22, as its placeholder says)
        missing = [f for f, v in (("name", name), ("host", host), ("root", root)) if not v]
        if final and missing:
            problems.append((" and ".join([", ".join(missing[:-1]), missing[-1]])
                             if len(missing) > 1 else missing[0])
                            + (" is" if len(missing) == 1 else " are") + " needed")
        port_ok = port.isdigit() and 0 < int(port) < 65536
        if port and not port_ok:
            problems.append(f"port {port!r} is not a port number")
        if root and not root.startswith("/"):
            problems.append("the root is an absolute path on the target")
        # The configuration file's rules, for what is typed (a bad name is said at once, not
        # only once the host and root are there); fields already refused above stand in.
        target = TargetHost(name=name or "x", host=host or "x",
                            root=root if root.startswith("/") else "/x",
                            port=int(port) if port_ok else 22, user=self._value("user") or None)
        try:
            self.app.services.store.check_target(target)
        except ConfigError as exc:
            problems.append(str(exc))
        if problems:
            return "; ".join(problems), None
        if not port:  # read from ssh_config off the UI thread, when the host key is asked for
            target = dataclasses.replace(target, port=None)
        return None, target

    @on(Input.Changed)
    def _typed(self) -> None:
        problem, _ = self._check(final=False)
        shown = self.query_one("#problem", Static)
        if not problem and self._given_problem and self._values() == self._given:
            problem = self._given_problem  # shown again: nothing was changed yet
        if problem:
            shown.update(Text("✘ " + problem, style="bold red"))
        elif self._value("name") and self._value("host") and self._value("root"):
            shown.update(Text("✔ ready to add: the host is asked for its key next",
                              style="green"))
        else:
            shown.update("")

    @on(Button.Pressed, "#add")
    @on(Input.Submitted)
    def action_add(self) -> None:
        problem, target = self._check(final=True)
        if problem:
            self.query_one("#problem", Static).update(Text("✘ " + problem, style="bold red"))
            return
        self.dismiss(target)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class KeyLineDialog(ModalScreen[None]):
    """The authorized_keys line of a target, on one line that scrolls sideways (a line the
    dialog wrapped was copied from the terminal with line breaks in it: a broken key), selected
    whole; c copies it (OSC 52), and `target authorized-key NAME` prints it for a shell."""

    CSS_PATH = "dialogs.tcss"
    DEFAULT_CSS = """
    #key-line { height: 2; margin: 1 0; background: $boost; }
    """
    BINDINGS = [Binding("escape,enter,q", "close", "Close"), Binding("c", "copy", "Copy")]

    def __init__(self, name: str, line: str) -> None:
        super().__init__(classes="dialog-screen")
        self.target_name = name
        self.line = line

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog details", id="key-line-dialog"):
            yield Label(Text(f"authorized_keys line for {self.target_name}", style="bold"))
            yield Static("Put this line in ~/.ssh/authorized_keys of the target's user: the key "
                         "runs the agent and nothing else. It is one line (← → scroll it):",
                         classes="notes")
            yield TextArea(self.line, id="key-line", read_only=True, soft_wrap=False,
                           compact=True, highlight_cursor_line=False)
            yield Static(Text.assemble("c copies it (where the terminal lets an application set "
                                       "the clipboard); also: ",
                                       (layout.command("target", "authorized-key",
                                                       self.target_name).strip("`"), "bold")),
                         classes="notes")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Copy", id="copy", compact=True)
                yield Button("Close", id="close", variant="primary", compact=True)

    def on_mount(self) -> None:
        area = self.query_one("#key-line", TextArea)
        area.focus()
        area.select_all()  # (its end is under the cursor: the start is shown)
        self.call_after_refresh(area.scroll_home, animate=False)

    @on(Button.Pressed, "#copy")
    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.line)
        self.notify(f"the authorized_keys line of {self.target_name} was sent to the terminal's "
                    "clipboard (OSC 52); a terminal that does not take it copies nothing: "
                    f"{layout.command('target', 'authorized-key', self.target_name)} prints it",
                    title="Key line", markup=False)

    @on(Button.Pressed, "#close")
    def action_close(self) -> None:
        self.dismiss(None)


class TargetsScreen(TaskScreen):
    NAME = "targets"
    CSS_PATH = ["task.tcss", "targets.tcss"]
    busy_target = "#replicas"

    def __init__(self) -> None:
        super().__init__()
        self._config = None
        self._snap = None
        self._interest: Interest | None = None  # which mount events can change the rows

    def compose(self) -> ComposeResult:
        yield Header()
        yield RootBanner()
        yield Static("", id="load-error", classes="banner error")
        yield Static("Remote targets: hosts that keep replicas (over SSH)", classes="section-title")
        yield KeyedTable(TARGET_COLUMNS, id="targets", zebra_stripes=True)
        yield Static("Replicated entries and their replicas (i or Enter: details)",
                     classes="section-title")
        yield KeyedTable(REPLICA_COLUMNS, id="replicas", zebra_stripes=True)
        yield Static("", id="empty", classes="notes")
        yield Static("", id="waiting")
        yield Static(NOTES, classes="notes")
        with Horizontal(classes="buttons"):
            yield Button("Add target", id="add", compact=True)
            yield Button("Edit", id="edit", compact=True)
            yield Button("Test", id="test", compact=True)
            yield Button("Switch over", id="switchover", compact=True)
            yield Button("Fail back", id="failback", compact=True)
            yield Button("Keep this host", id="resolve", compact=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        super().on_mount()
        # the replicas' rows are the daemon's; block uevents (a busy host's loops) change
        # nothing here, nor do other tools' mounts (events.Interest)
        self.reload_on(self.app.daemon_signal, self.app.config_signal)
        self.app.mounts_signal.subscribe(self, self._mounts_changed)
        self.follow_daemon_figures()  # connection, positions, lag
        self.query_one("#replicas").focus()

    def load(self):
        snap = self.services.status(scan_writers=False)
        self._interest = Interest.of(snap)
        return self.services.store.load(), snap

    def _mounts_changed(self, diff) -> None:
        if self._interest is None or self._interest.wants(MountsChanged(diff)):
            self.reload()

    def show(self, data) -> None:
        config, snap = data
        self._config, self._snap = config, snap
        self.query_one("#targets", KeyedTable).show_rows({
            t.name: (t.name, elide(f"{t.user + '@' if t.user else ''}{t.host}:{t.port}", 30),
                     elide(t.root, 30), cap_shown(t.bandwidth) or "—") for t in config.target})
        rows = {}
        for key, target, row in self._replicated():
            role, state = role_and_state(row, marked=self._marked(key))
            rows[key] = (elide(key, entry_width(self.app.size.width)), elide(target, 24), role,
                         state)
        self.query_one("#replicas", KeyedTable).show_rows(rows)
        empty = self.query_one("#empty", Static)
        empty.update("No remote target yet: press a to add one, then give an entry the target "
                     "NAME:PATH." if not config.target else
                     "No entry replicates to a remote target: give one the target NAME:PATH.")
        empty.display = not rows

    def on_resize(self) -> None:
        if self._config is not None:  # the entries' paths: as wide as there is room for
            self.show((self._config, self._snap))

    def _marked(self, key: str) -> dict | None:
        """An entry's switch-over marker as status read it without a daemon (else None)."""
        if self._snap is None:
            return None
        state = self._snap.fs_state(key) or self._snap.block_state(key)
        return state.switched if state is not None else None

    def _replicated(self):
        """(key, target, CaptureRow or None) of every entry with a remote target."""
        if self._snap is None:
            return []
        out = []
        for s in self._snap.filesystem:
            if remote_name(s.entry.target, self._config):
                out.append((s.entry.path, s.entry.target, s.engine))
        for b in self._snap.block:
            if remote_name(b.entry.target, self._config):
                out.append((b.entry.device, b.entry.target, b.engine))
        return out

    @on(Button.Pressed)
    def _button(self, event: Button.Pressed) -> None:
        getattr(self, f"action_{event.button.id}")()

    # -- targets ----------------------------------------------------------------------------
    def _selected_target(self):
        name = selected_key(self.query_one("#targets", DataTable))
        host = self._config.target_host(name) if (name and self._config) else None
        if host is None:
            self.notify("No remote target is selected.", severity="warning")
        return host

    def action_add(self) -> None:
        if self.app.needs_root("Adding a remote target"):
            return
        self.app.push_screen(AddTargetDialog(), self._add_typed)

    def _add_typed(self, host) -> None:
        if host is not None:
            port = "" if host.port is None else f" port {host.port}"
            self._set_busy(True, f"asking {host.host}{port} for its host key")
            self._scan(self.app, host)

    @work(thread=True, exit_on_error=False, group="scan")
    def _scan(self, app, typed) -> None:
        from app.services import targets
        host = typed
        try:
            if host.port is None:  # not typed: ssh_config's Port for the host, else 22
                port = targets.ssh_resolved(host.host, None, host.ssh_config).get("port", "22")
                host = dataclasses.replace(host, port=int(port) if port.isdigit() else 22)
            keys = targets.scan_host_keys(host.host, host.port, host.ssh_config)
            # app's services, not self's: the screen may be gone by now, and self.app with it
            _known_hosts, old = targets.pinned_for(app.services.store, host)
            error = None
        except (MirrorError, OSError) as exc:
            keys, old, error = [], [], str(exc)
        # Targets left while it asked: a notice, no dialog over another screen
        self.from_thread(app, lambda: self._scanned(host, keys, old, error, typed), lambda: app.notify(
            f"{host.name} was not added: Targets was left before {host.host} answered. Add it "
            "again there.", title="Add target", severity="warning", markup=False))

    def _scanned(self, host, keys, old, error, typed) -> None:
        from app.services import targets
        self._set_busy(False)
        if error or not keys:  # the dialog again, as typed, with what went wrong
            self.app.push_screen(AddTargetDialog(typed, shown(error or f"{host.host} offered no host key")),
                                 self._add_typed)
            return
        pinned = targets.offered_and_pinned(keys, old)
        if pinned is not None:  # (another target on that host): nothing to ask, the result
            # says it is pinned already, with its fingerprint, as `target add` says it
            self.run_action(f"Add target {host.name}", lambda: self._add(host, pinned[1]),
                            subject=host.name)
            return
        _line, fp, kind = keys[0]

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.run_action(f"Add target {host.name}", lambda: self._add(host, fp),
                                subject=host.name)
            else:  # the safe default: say so, an Enter on "No" must not look like nothing
                self.notify(f"{host.name} was not added: its host key was not pinned.",
                            title="Add target", severity="warning", markup=False)
        self.app.push_screen(ConfirmDialog(
            f"{host.host} port {host.port} offers the host key\n\n  {fp} ({kind})\n\nCompare it "
            "with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the target. Pin it? A "
            "different key later is refused before any data is sent.", yes="Pin and add"), confirmed)

    def _add(self, host, fp: str):
        from app.services import targets
        result = targets.add_target(self.services.store, host, accept_host_key=fp)
        if result.failed:
            return result
        # (the result already holds the line: it was shown twice, and filled the dialog at 80x24)
        return [result], ["That line goes in ~/.ssh/authorized_keys of the target's user; k on "
                          "this screen shows it again."]

    def action_edit(self) -> None:
        """`target set`: the selected target's settings, filled in; run off the UI thread."""
        host = self._selected_target()
        if host is None or self.app.needs_root("Editing a remote target"):
            return
        from app.screens.target_edit import EditTargetDialog

        def typed(changes: dict | None) -> None:
            if changes is not None:  # the running captures of the target take them too
                self.run_action(f"Edit target {host.name}", lambda: self.services.replication.set_target(
                    host.name, changes), subject=host.name, waiting=f"changing {host.name}")
        self.app.push_screen(EditTargetDialog(host), typed)

    def action_rekey(self) -> None:
        """A reinstalled target: what it offers now is shown beside what is pinned, asked,
        then pinned in its place (target rekey)."""
        host = self._selected_target()
        if host is None or self.app.needs_root("Re-pinning a host key"):
            return
        self._set_busy(True, f"asking {host.host} port {host.port} for its host key")
        self._scan_again(self.app, host)

    @work(thread=True, exit_on_error=False, group="scan")
    def _scan_again(self, app, host) -> None:
        from app.services import targets
        try:
            keys = targets.scan_host_keys(host.host, host.port, host.ssh_config)
            _known_hosts, old = targets.pinned_for(self.services.store, host)
            error = None
        except (MirrorError, OSError) as exc:
            keys, old, error = [], [], str(exc)
        self.from_thread(app, lambda: self._rescanned(host, keys, old, error), lambda: app.notify(
            f"the host key of {host.name} was not re-pinned: Targets was left before "
            f"{host.host} answered.", title="Re-pin host key", severity="warning", markup=False))

    def _rescanned(self, host, keys, old, error) -> None:
        self._set_busy(False)
        if error or not keys:
            self.notify(shown(error or f"{host.host} offered no host key"), title="Re-pin host key",
                        severity="error", markup=False)
            return
        _line, fp, kind = keys[0]
        if old == [fp]:
            self.notify(f"{host.host} port {host.port} offers {fp}, the key pinned already: "
                        "nothing to re-pin.", title="Re-pin host key", markup=False)
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                from app.services import targets
                self.run_action(f"Re-pin {host.name}", lambda: targets.rekey_target(
                    self.services.store, host.name, accept_host_key=fp), subject=host.name)
            else:
                self.notify(f"the host key of {host.name} was not re-pinned.",
                            title="Re-pin host key", severity="warning", markup=False)
        self.app.push_screen(ConfirmDialog(
            f"{host.host} port {host.port} offers the host key\n\n  {fp} ({kind})\n\nPinned now: "
            f"{', '.join(old) or 'nothing'}.\n\nA changed key is a reinstall or someone in between: "
            "compare it with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the target. "
            "Pin it instead?", yes="Pin the new key"), confirmed)

    def action_test(self) -> None:
        host = self._selected_target()
        if host is None:
            return

        def test():
            from app.services import targets
            info = targets.probe(host)
            return Result("test target", host.name, Outcome.OK,
                          f"agent {info['agent_version']} on {info['agent_host']}, root {info['root']} "
                          f"has {targets.room_text(info)}, round trip {info['rtt_ms']} ms")
        self.run_action(f"Test {host.name}", test, root=False, subject=host.name,
                        waiting=f"connecting to {host.host} and greeting its agent")

    def action_key_line(self) -> None:
        host = self._selected_target()
        if host is None:
            return
        from app.services import targets
        try:
            line = targets.authorized_key_line(host)
        except MirrorError as exc:  # missing, or not a public key: it says which
            self.notify(exc.message, title="Key line", severity="error", markup=False)
            return
        except (OSError, TypeError, ValueError) as exc:
            self.notify(f"the key of {host.name} ({host.identity}.pub) cannot be read: {exc}",
                        title="Key line", severity="error", markup=False)
            return
        self.app.push_screen(KeyLineDialog(host.name, line.strip()))

    def action_remove(self) -> None:
        host = self._selected_target()
        if host is None or self.app.needs_root("Removing a remote target"):
            return

        def remove():
            try:
                self.services.store.remove_target(host.name)
            except MirrorError as exc:
                return Result.from_error("remove target", host.name, exc)
            return Result("remove target", host.name, Outcome.OK, f"removed {host.name}; its key "
                          "and the replicas on it were kept")

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.run_action(f"Remove target {host.name}", remove, subject=host.name)
        self.app.push_screen(ConfirmDialog(
            f"Remove the remote target {host.name} ({host.host})?\nRefused while an entry "
            "replicates to it. Nothing on the target is deleted.", yes="Remove"), confirmed)

    # -- fail-over --------------------------------------------------------------------------
    def _selected_replica(self):
        key = selected_key(self.query_one("#replicas", DataTable))
        found = next(((k, t, r) for k, t, r in self._replicated() if k == key), None)
        if found is None:
            self.notify("No replicated entry is selected.", severity="warning")
        return found

    def _host_of(self, target: str) -> str:
        host = self._config.target_host(target.split(":", 1)[0])
        return host.host if host else target

    @on(DataTable.RowSelected, "#replicas")
    def action_details(self) -> None:
        found = self._selected_replica()
        if found is None:
            return
        key, target, _row = found

        def follow():
            now = next((r for r in self._replicated() if r[:2] == (key, target)), None)
            if now is None:  # removed, or replicated elsewhere now
                return None
            row = now[2]  # None while the daemon does not run
            role, state = role_and_state(row, long=True, marked=self._marked(key))
            return [("Entry", key), ("Replica", target), ("Role", role.plain),
                    ("State", state.plain)] + replication_lines(row)
        self.push_details(f"{shown(key)} → {shown(target)}", follow)

    def _on_replica(self, ask, *, promoted_only: bool = False, switching: bool = False,
                    keeping: bool = False) -> None:
        """Confirm, then run, an action on the selected replica: `ask(key, target, host)` gives
        (title, question, yes, call, what it waits for). `promoted_only`: an action on a
        promoted replica (fail back, keep this host); `switching`: the switch-over; `keeping`:
        keep this host. What the status shown already says cannot be done is said at once,
        without a question."""
        found = self._selected_replica()
        if found is None:
            return
        key, target, row = found
        title, question, yes, call, waiting = ask(key, target, self._host_of(target))
        if self.app.needs_root(title):
            return
        if promoted_only and healthy_secondary(row):
            # what the daemon would refuse: no overwrite question for nothing
            self.notify(nothing_to_fail_back(key, target), title=title, severity="warning",
                        markup=False)
            return
        # was the daemon running when the status shown was taken? (one that did not answer it
        # is running: it may answer the action)
        daemon = self._snap.engine is not None or self._snap.engine_error is not None
        refused = _cannot(key, row, switching=switching, daemon=daemon, keeping=keeping)
        if refused:
            self.notify(refused, title=title, severity="warning", markup=False)
            return

        def confirmed(ok: bool | None) -> None:
            if ok:
                self.run_action(title, call, waiting=waiting, subject=key)
        self.app.push_screen(ConfirmDialog(question, yes=yes), confirmed)

    def action_switchover(self) -> None:
        rep = self.services.replication
        self._on_replica(lambda key, target, host: (
            f"Switch over {shown(key)}",
            f"Switch {shown(key)} over to its replica on {shown(host)}?\n\nOn THIS host: capture "
            "stops once the replica has applied every change; nothing may use the entry (stop "
            f"the applications first). It is not captured here afterwards, and read-only here "
            f"until the fail-back.\nOn {shown(host)}: "
            f"the replica {shown(target)} becomes primary and can be used there.\nNo data is lost "
            "or overwritten on either host.", "Switch over",
            lambda: rep.switchover(key), f"draining {shown(key)} to {shown(host)}, then promoting"),
            switching=True)

    def action_failback(self) -> None:
        rep = self.services.replication
        self._on_replica(lambda key, target, host: (
            f"Fail back {shown(key)}",
            f"Fail back {shown(key)} from {shown(host)}?\n\nOn THIS host: the data of "
            f"{shown(key)} is REPLACED by the replica's where it differs; what was changed here "
            f"since the replica was promoted is lost. Capture starts again.\nOn {shown(host)}: "
            "the replica becomes a secondary again; applications there must have stopped using "
            "it.", "Fail back",
            lambda: rep.failback(key), f"comparing {shown(key)} with the replica on {shown(host)}"),
            promoted_only=True)

    def action_resolve(self) -> None:
        rep = self.services.replication
        self._on_replica(lambda key, target, host: (
            f"Keep this host's {shown(key)}",
            f"Keep THIS host's data of {shown(key)} and discard the promotion on "
            f"{shown(host)}?\n\nOn {shown(host)}: everything written to {shown(target)} since it "
            "was promoted is OVERWRITTEN with this host's data (only what differs is sent).\nOn "
            "THIS host: nothing changes; replication resumes.", "Keep this host",
            lambda: rep.resolve(key, discard_target=True),
            f"handing {shown(target)} back to this host"), promoted_only=True, keeping=True)

    def action_moved(self) -> None:
        """`fs/block remove --keep-replica-primary`: a switch-over made for good."""
        found = self._selected_replica()
        if found is None:
            return
        key, target, row = found
        title = f"Moved for good: {shown(key)}"
        if self.app.needs_root(title):
            return
        sw = (row.switched if row is not None else self._marked(key)) or {}
        fs = self._snap.fs_state(key) is not None
        refused = _cannot_move(key, row, sw, fs=fs, daemon=self._snap.engine is not None
                               or self._snap.engine_error is not None)
        if refused:
            self.notify(refused, title=title, severity="warning", markup=False)
            return
        host = self._host_of(target)
        rep = self.services.replication
        copy = (f"this host's copy {layout.mix_words(sw.get('failback_applied'))}"
                if sw.get("failback") == "interrupted" and sw.get("failback_applied") != 0 else
                "its data stays as it was at the switch-over")
        question = (f"Has the service of {shown(key)} moved to {shown(host)} for good?\n\nOn "
                    f"{shown(host)}: the replica {shown(target)} stays primary; it is not "
                    f"touched.\nOn THIS host: {shown(key)} is made writable again, is no longer "
                    f"replicated and is removed from the configuration ({copy}). To bring the "
                    "service back here later: add the entry again with the same target, then f "
                    "fails back (the replica's data comes back).")

        def confirmed(ok: bool | None) -> None:
            if ok:
                self.run_action(title, (lambda: rep.remove_filesystem(key, keep_replica_primary=True))
                                if fs else
                                (lambda: rep.remove_block(key, keep_replica_primary=True)),
                                waiting=f"ending the hand-over of {shown(key)}", subject=key)
        self.app.push_screen(ConfirmDialog(question, yes="Remove here"), confirmed)


def _cannot_move(key: str, row, sw: dict, *, fs: bool, daemon: bool) -> str | None:
    """Why m (moved for good: `remove --keep-replica-primary`) cannot be done now, from the
    status shown (`sw`: the entry's switch-over marker); None when it is asked."""
    if sw.get("state") == "switching":  # the daemon refuses it too (failover.end_handover)
        return (f"the switch-over of {key} did not finish: whether its replica is primary there "
                "is not known; s runs it again to finish it, then m. Nothing was changed.")
    if sw.get("state") != "switched":
        if row is not None and row.target_data in ("split-brain", "promoted"):
            screen = "File system replication (1" if fs else "Block device replication (2"
            return (f"the replica of {key} was promoted there by a fail-over, not handed over by "
                    "a switch-over: f fails back, o keeps this host. To leave the service there "
                    f"for good, r on {screen} in the main menu) removes the entry here; the "
                    "replica there is not touched. Nothing was changed.")
        return (f"{key} was not switched over to its replica: only the entry of a service that "
                "moved there (s switches over) can be left to it for good. Nothing was changed.")
    if not daemon:
        return (f"the daemon is not running: ending the hand-over of {key} (lifting its "
                "read-only fence here) is its work. Start it on the Daemon screen (5 in the main "
                "menu), then try again. Nothing was changed.")
    return None


def _cannot(key: str, row, *, switching: bool, daemon: bool = True,
            keeping: bool = False) -> str | None:
    """Why the status shown says a switch-over (`switching`), a fail-back or keep-this-host
    (`keeping`) of `key` cannot be done now; None when only trying tells (the daemon checks it
    again). `daemon`: the daemon was running when the status shown was taken."""
    if not daemon:  # all three are the daemon's (app/engine/failover.py runs in it)
        return ("the daemon is not running: the switch-over, fail-back and keep-this-host of "
                f"{key} are its work. Start it on the Daemon screen (5 in the main menu), then "
                "try again. Nothing was changed.")
    if row is None:
        return None  # the daemon has no figures of it: the action says why
    sw = row.switched or {}
    if keeping and sw.get("failback") == "interrupted" and sw.get("failback_applied") != 0:
        # (the daemon refuses it too: app/engine/failover.py, resolve)
        return (f"a fail-back of {key} was interrupted: this host's copy "
                f"{layout.mix_words(sw.get('failback_applied'))}; keeping it would overwrite the "
                "replica with that mix. f fails "
                "back again (the replica's data wins). Nothing was changed.")
    if switching and sw.get("state") == "switched":
        return (f"{key} is switched over already: f fails back to this host, o keeps this "
                "host's data. Nothing was changed.")
    if switching and not row.captured and not sw:
        return f"{key} is not captured: mount or attach it first (Mount all / Attach all)."
    if row.target_data in ("split-brain", "promoted"):
        what = ("failed over (its replica was promoted meanwhile; nothing changed here since)"
                if row.target_data == "promoted" else
                "in a split brain: the replica was promoted meanwhile")
        return (f"{key} is {what}; f fails back, o keeps this host. Nothing was "
                "changed.") if switching else None
    conn = row.connection or ""
    if not row.captured or conn in ("", "connected", "local", "none"):
        return None
    if conn.startswith(("disconnected", "refused", "connecting again")):  # its last try failed
        return (f"cannot reach the target of {key} ({conn}): nothing was "
                "changed; try again once it is connected.")
    if conn.startswith("connecting"):  # no answer yet: refused, or promoted there, not known
        return (f"the capture of {key} is still connecting to its target: whether it can be "
                "reached is not known yet; nothing was changed. Try again once its state says "
                "connected, or why not.")
    if switching:  # paused: the switch-over's drain refuses anything but connected
        return (f"the target of {key} takes no records now ({conn}): a "
                "switch-over needs it to have them all; nothing was changed. Try again once it "
                "is connected.")
    return None
