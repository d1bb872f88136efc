"""Running the server as an administrator does (#19): signals from logrotate and
systemctl, log destinations and format, one server per data directory, a
broken mailbox among good ones, and the CLI run as root on a service user's
data directory."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.helpers import smtp_processes, wait_for
from tests.support.ports import free_port
from tests.support.server import PostofficeServer, write_config

ALICE, BOB = "alice@example.test", "bob@example.test"
# ISO 8601 with the UTC offset, then the PID (RFC 5424-ish "tag[pid]:").
LINE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d postoffice\[(\d+)\]: [A-Z]+ "


def send(srv: PostofficeServer, *rcpts: str, body: str = "hello") -> tuple[dict[str, int], int]:
    """(RCPT code per recipient, DATA code) of one transaction on the smtp listener."""
    codes: dict[str, int] = {}
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as smtp:
        smtp.ehlo("client.example.net")
        smtp.mail("sender@example.net")
        for rcpt in rcpts:
            codes[rcpt] = smtp.rcpt(rcpt)[0]
        if not any(code == 250 for code in codes.values()):
            return codes, 0
        code, _ = smtp.data(f"Subject: {body}\r\n\r\n{body}\r\n".encode())
    return codes, code


# --- signals and logs (items 2, 8, 12) ----------------------------------------------------


def test_sighup_and_sigusr1_neither_stop_the_server(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    srv = PostofficeServer(tmp_path, sections={"log": {"file": str(log)}})
    srv.add_user(ALICE, "alice-password-1")
    srv.start()
    try:
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "SIGHUP" in log.read_text())
        assert send(srv, ALICE) == ({ALICE: 250}, 250)
        # logrotate: move the file away, then SIGUSR1; new lines go to a new file.
        log.rename(tmp_path / "mail.log.1")
        srv.proc.send_signal(signal.SIGUSR1)
        assert wait_for(log.exists)
        assert send(srv, ALICE, body="after rotation") == ({ALICE: 250}, 250)
        assert wait_for(lambda: f"to=<{ALICE}>" in log.read_text())
        old = (tmp_path / "mail.log.1").read_text()
        assert "SIGHUP: reloaded" in old
        assert old.count(f"to=<{ALICE}>") == 1  # the first message only
        assert srv.proc.poll() is None
        pid = srv.proc.pid
        assert all(re.match(LINE, line) for line in log.read_text().splitlines())
        assert {re.match(LINE, line).group(1) for line in old.splitlines()} == {str(pid)}  # type: ignore[union-attr]
        assert "INFO postoffice" not in srv.log()  # with a log file, nothing on stderr
    finally:
        code = srv.stop()
    assert code == 0
    data = tmp_path / "data"
    assert not (data / "accounts.sqlite3-wal").exists()
    assert not (data / "accounts.sqlite3-shm").exists()


def test_signals_to_every_smtp_process_stop_none(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path, sections={"limits": {"smtp_processes": 2}})
    srv.add_user(ALICE, "alice-password-1")
    srv.start()
    try:
        assert srv.proc is not None
        assert wait_for(lambda: len(smtp_processes(srv.proc.pid)) == 1)  # type: ignore[union-attr]
        group = [srv.proc.pid, *smtp_processes(srv.proc.pid)]
        for sig in (signal.SIGHUP, signal.SIGUSR1):  # as `kill -HUP -PGID` would
            for pid in group:
                os.kill(pid, sig)
        time.sleep(0.5)
        assert srv.proc.poll() is None
        assert sorted(smtp_processes(srv.proc.pid)) == sorted(group[1:])  # none restarted
        for _ in range(10):  # both processes take turns accepting
            assert send(srv, ALICE) == ({ALICE: 250}, 250)
    finally:
        assert srv.stop() == 0


def test_log_lines_carry_a_timezone_and_the_pid(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path)
    srv.start()
    try:
        send(srv, "nobody@example.test")
        assert wait_for(lambda: "smtp reject" in srv.log())
        assert srv.proc is not None
        lines = [line for line in srv.log().splitlines() if "smtp reject" in line]
        match = re.match(LINE, lines[0])
        assert match is not None, lines[0]
        assert match.group(1) == str(srv.proc.pid)
    finally:
        srv.stop()


def test_logging_to_syslog(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"  # what /dev/log is to journald and rsyslog
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(10)
    srv = PostofficeServer(tmp_path, sections={"log": {"syslog": str(path)}})
    srv.start()
    try:
        assert srv.proc is not None
        send(srv, "nobody@example.test")
        seen: list[bytes] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(b"smtp reject" in d for d in seen):
            seen.append(receiver.recv(65536))
        # <22>: facility mail (2) * 8 + severity info (6); the tag carries the PID.
        line = next(d for d in seen if b"smtp reject" in d)
        assert line.startswith(f"<22>postoffice[{srv.proc.pid}]: INFO postoffice.smtp: ".encode())
    finally:
        srv.stop()
        receiver.close()


def test_a_stuck_syslog_reader_holds_up_no_client(tmp_path: Path) -> None:
    """syslog stops reading (its datagram queue fills, and a send would block):
    the server must go on answering other clients (review #4), and the lines
    that waited arrive once it reads again."""
    path = tmp_path / "log.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.setblocking(False)
    srv = PostofficeServer(
        tmp_path, sections={"log": {"syslog": str(path)}, "limits": {"soft_errors": 19}}
    )
    srv.start()
    try:
        with contextlib.suppress(BlockingIOError):
            while True:  # what start-up logged; from now on the reader is stuck
                receiver.recv(65536)
        first = socket.create_connection(("127.0.0.1", srv.ports["smtp"]), timeout=10)
        first.recv(1000)
        rcpts = b"".join(b"RCPT TO:<nobody%d@example.test>\r\n" % i for i in range(15))
        first.sendall(b"EHLO x\r\nMAIL FROM:<a@remote.test>\r\n" + rcpts)
        time.sleep(1)  # 15 rejections logged: more than the 10 datagrams a reader queues
        with socket.create_connection(("127.0.0.1", srv.ports["smtp"]), timeout=5) as second:
            assert second.recv(100).startswith(b"220 ")  # before: timed out
        first.close()
        receiver.settimeout(10)
        seen = b""
        while seen.count(b"smtp reject") < 15:
            seen += receiver.recv(65536)
        assert seen.count(b"smtp reject") == 15  # within the queue's bound nothing is lost
    finally:
        assert srv.stop() == 0
        receiver.close()


@pytest.mark.parametrize("command", [["serve"], ["check"]])
def test_a_bad_log_level_is_a_message(tmp_path: Path, command: list[str]) -> None:
    srv = PostofficeServer(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "postoffice", *command, "-c", str(srv.config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "POSTOFFICE_LOG_LEVEL": "LOUD"},
    )
    assert result.returncode in (1, 2), result.stderr
    assert "$POSTOFFICE_LOG_LEVEL: 'LOUD' is not a log level" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_log_file_that_cannot_be_opened_is_a_message(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path, sections={"log": {"file": str(tmp_path / "no" / "x.log")}})
    result = subprocess.run(
        [sys.executable, "-m", "postoffice", "serve", "-c", str(srv.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"[log] file {tmp_path / 'no' / 'x.log'}: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_log_records_the_start_with_every_listener(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    srv = PostofficeServer(tmp_path, sections={"log": {"file": str(log)}})
    srv.start()
    try:
        assert wait_for(lambda: " started " in log.read_text())
    finally:
        assert srv.stop() == 0
    started = next(line for line in log.read_text().splitlines() if " started " in line)
    assert re.match(LINE + "postoffice: started ", started), started
    for name, port in srv.ports.items():
        assert f" {name}=127.0.0.1:{port} " in started
    assert f"config={srv.config} data_dir={srv.data_dir}" in started
    assert log.read_text().splitlines()[-1].endswith("postoffice: stopped")


def postrotate_lines() -> str:
    """The postrotate script of the README's logrotate example."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    return readme.split("    postrotate\n", 1)[1].split("    endscript", 1)[0]


def test_the_readmes_logrotate_lines_cope_with_a_stopped_server(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    srv = PostofficeServer(tmp_path, sections={"log": {"file": str(log)}})
    script = postrotate_lines().replace("/var/lib/postoffice", str(srv.data_dir))
    assert str(srv.data_dir) in script

    def postrotate() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=30)

    srv.start()
    try:
        log.rename(tmp_path / "mail.log.1")
        result = postrotate()
        assert result.returncode == 0 and result.stderr == ""
        assert wait_for(lambda: log.exists() and "SIGUSR1: log file reopened" in log.read_text())
    finally:
        assert srv.stop() == 0
    assert (srv.data_dir / "postoffice.pid").read_text() == ""  # left, emptied
    result = postrotate()  # logrotate's weekly run, the server stopped
    assert result.returncode == 0 and result.stderr == ""


# --- one server per data directory (item 4), listen errors (item 7) ----------------------


def test_a_second_server_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    first = PostofficeServer(tmp_path / "one")
    first.start()
    # Other ports, same data directory: nothing else stops it.
    second = PostofficeServer(tmp_path / "two")
    text = second.config.read_text().replace(str(second.data_dir), str(first.data_dir))
    second.config.write_text(text)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "postoffice", "serve", "-c", str(second.config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert first.proc is not None
        assert result.returncode == 1
        assert (
            f"data directory {first.data_dir} is in use by another server (pid {first.proc.pid})"
            in result.stderr
        )
        assert first.proc.poll() is None
        assert (first.data_dir / "postoffice.pid").read_text() == f"{first.proc.pid}\n"
    finally:
        first.stop()
    assert (first.data_dir / "postoffice.pid").read_text() == ""  # no stale PID left
    second.data_dir = first.data_dir
    second.start()  # free again
    second.stop()


def test_cannot_listen_names_the_listener_and_address(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", srv.ports["pop3s"]))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "postoffice", "serve", "-c", str(srv.config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert (
        f"cannot listen: pop3s listener on 127.0.0.1:{srv.ports['pop3s']}: Address already in use"
        in result.stderr
    )


def test_serve_that_cannot_listen_makes_no_data_dir(tmp_path: Path) -> None:
    """trial #14: a port in use (or an address this machine does not have)
    fails the start before a data directory and certificate are made for it."""
    data = tmp_path / "new" / "data"
    config = tmp_path / "postoffice.toml"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_config(
            config,
            {"hostname": "mail.example.test", "data_dir": str(data)},
            {
                "listen": {
                    "smtp": [f"127.0.0.1:{free_port()}"],
                    "submission": [],
                    "submissions": [],
                    "pop3": [f"127.0.0.1:{port}"],
                    "pop3s": [],
                }
            },
        )
        result = subprocess.run(
            [sys.executable, "-m", "postoffice", "serve", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot listen: pop3 listener on 127.0.0.1:{port}: Address already in use" in (
        result.stderr
    )
    assert not (tmp_path / "new").exists()


# --- a broken mailbox among good ones (item 3) --------------------------------------------


def break_mailbox(srv: PostofficeServer, address: str) -> Path:
    tmp = srv.maildir(address) / "tmp"
    tmp.rmdir()
    tmp.write_text("a file where the Maildir's tmp/ belongs")
    return tmp


def assert_only_that_mailbox_fails(srv: PostofficeServer, broken: str) -> None:
    # The first delivery finds it out: 4xx, logged with the mailbox's path.
    assert send(srv, broken) == ({broken: 250}, 451)
    assert wait_for(lambda: f"mailbox {srv.maildir(broken)} unavailable" in srv.log())
    # From then on it is refused at RCPT, and the message's other recipients
    # get their copy.
    assert send(srv, broken, ALICE) == ({broken: 450, ALICE: 250}, 250)
    assert len(srv.messages(ALICE)) == 1
    assert srv.messages(broken) == []
    assert srv.proc is not None and srv.proc.poll() is None


def test_a_broken_maildir_fails_its_own_deliveries_not_the_start(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path)
    srv.add_user(ALICE, "alice-password-1")
    srv.add_user(BOB, "bob-password-2")
    tmp = break_mailbox(srv, BOB)
    srv.start()
    try:
        assert f"mailbox {srv.maildir(BOB)}: cannot read tmp/: Not a directory" in srv.log()
        assert_only_that_mailbox_fails(srv, BOB)
        # Repaired: after the pause (UNAVAILABLE_SECONDS) it is tried again;
        # a restart forgets at once.
        tmp.unlink()
        tmp.mkdir()
    finally:
        srv.stop()
    srv.start()
    try:
        assert send(srv, BOB) == ({BOB: 250}, 250)
    finally:
        srv.stop()


def test_a_maildir_the_server_may_not_write_fails_only_its_deliveries(
    tmp_path: Path, require_program: Callable[[str], str], require_root: None
) -> None:
    """As after `user add` run as root on a service user's data directory: the
    server (here root without CAP_DAC_OVERRIDE, so permission bits bind it)
    cannot use one mailbox that belongs to someone else."""
    setpriv = require_program("setpriv")
    srv = PostofficeServer(tmp_path)
    srv.add_user(ALICE, "alice-password-1")
    rooty = "rooty@example.test"
    srv.add_user(rooty, "rooty-password-1")
    for path in (srv.maildir(rooty), *(srv.maildir(rooty) / s for s in ("tmp", "new", "cur"))):
        os.chown(path, 65534, 65534)  # nobody's, mode 0700
    caps = "-dac_override,-dac_read_search"
    srv.start(prefix=[setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"])
    try:
        assert f"mailbox {srv.maildir(rooty)}: cannot read tmp/: Permission denied" in srv.log()
        assert_only_that_mailbox_fails(srv, rooty)
    finally:
        assert srv.stop() == 0


def test_an_alias_member_that_is_gone_is_logged_at_delivery(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path)
    srv.add_user(ALICE, "alice-password-1")
    # `alias add` says what the server then does with the mail (trial #11).
    added = srv.cli("alias", "add", "team@example.test", ALICE, "ghost@example.test")
    assert (
        "warning: ghost@example.test is not a user or alias (yet); its copy of mail to"
        " team@example.test is dropped (and logged) until it does" in added.stderr
    )
    added = srv.cli("alias", "add", "lonely@example.test", "ghost@example.test")
    assert (
        "warning: ghost@example.test is not a user or alias (yet); mail to lonely@example.test"
        " is refused (550 5.1.1 User unknown) until it does" in added.stderr
    )
    srv.start()
    try:
        assert send(srv, "lonely@example.test") == ({"lonely@example.test": 550}, 0)
        assert send(srv, "team@example.test") == ({"team@example.test": 250}, 250)
        assert wait_for(
            lambda: (
                "alias team@example.test: member ghost@example.test is no user or alias"
                in srv.log()
            )
        )
        assert len(srv.messages(ALICE)) == 1
    finally:
        srv.stop()


# --- the CLI as root on a service user's data directory (item 3; review #1) -------------


def owners(root: Path) -> dict[str, int]:
    found = {}
    for top, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = Path(top, name)
            found[str(path.relative_to(root))] = path.lstat().st_uid
    return found


def service_config(base: Path, **top: object) -> Path:
    """A config (root's, 0644) for a data directory ``base/data`` that nobody owns."""
    data = base / "data"
    data.mkdir(mode=0o700, exist_ok=True)
    os.chown(data, 65534, 65534)  # the service user's
    config = base / "postoffice.toml"
    values: dict[str, object] = {
        "hostname": "mail.example.test",
        "data_dir": str(data),
        "domains": ["example.test", "other.test"],
    }
    values.update(top)
    write_config(config, values, {"listen": {"smtp": [f"127.0.0.1:{free_port()}"]}})
    return config


def as_root(config: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postoffice", "-c", str(config), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_cli_run_as_root_makes_files_as_the_owner(service_dir: Path) -> None:
    config = service_config(service_dir)
    data = service_dir / "data"

    def po(*args: str, input: str | None = None) -> None:
        result = as_root(config, *args, input=input)
        assert result.returncode == 0, result.stderr

    po("domain", "add", "third.test")
    po("user", "add", ALICE, "--password-stdin", input="alice-password-1\n")
    po("alias", "add", "postmaster@example.test", ALICE)
    po("dkim", "generate", "example.test")
    po("queue", "flush")
    po("user", "add", BOB, "--password-stdin", input="bob-password-2\n")
    po("user", "remove", BOB)  # moved aside into removed/
    po("user", "list")
    made = owners(data)
    assert {p: uid for p, uid in made.items() if uid != 65534} == {}
    assert {"accounts.sqlite3", "mail/example.test/alice/new", "removed/example.test"} <= set(made)
    assert any(p.startswith("dkim/example.test/") for p in made)
    # And `check` (its ports and [tls] files as root, the data dir as the owner)
    # agrees: nothing in it that its owner cannot use.
    result = as_root(config, "check")
    assert result.returncode == 0, result.stderr
    assert "not owned by its owner" not in result.stderr


def test_an_owner_that_cannot_reach_its_data_dir_is_told(
    tmp_path: Path, require_root: None
) -> None:
    # tmp_path is under root's private /tmp/pytest-of-root: nobody cannot get in.
    config = service_config(tmp_path)
    result = as_root(config, "user", "list")
    assert result.returncode == 1
    assert (
        f"postoffice: the data directory {tmp_path / 'data'} belongs to nobody, who cannot"
        " reach it" in result.stderr
    )
    assert "Traceback" not in result.stderr


def victim(path: Path) -> Path:
    """Root's files outside any data directory (/etc, say)."""
    (path / "sub").mkdir(parents=True)
    (path / "shadow").write_text("root:secret\n")
    (path / "shadow").chmod(0o600)
    return path


def state(path: Path) -> dict[str, tuple[int, int, int, str]]:
    found = {}
    for top, dirs, files in os.walk(path):
        for name in [".", *dirs, *files]:
            p = Path(top, name)
            st = p.lstat()
            text = p.read_text() if p.is_file() else ""
            found[str(p.relative_to(path))] = (st.st_uid, st.st_gid, st.st_mode, text)
    return found


def test_symlinks_the_owner_plants_give_root_nothing_away(service_dir: Path) -> None:
    """The service user (owner of the data directory) replaces what root's CLI
    walks with symlinks to root's files; the CLI, run as root, must neither give
    them away nor write there (review #1).  Mid-path too: mail/other.test."""
    config = service_config(service_dir)
    data = service_dir / "data"
    assert as_root(config, "init").returncode == 0
    added = as_root(config, "user", "add", BOB, "--password-stdin", input="bob-pw-1234\n")
    assert added.returncode == 0, added.stderr
    for top, dirs, files in os.walk(data):  # the service user's, as it runs
        for name in [".", *dirs, *files]:
            os.chown(Path(top, name), 65534, 65534, follow_symlinks=False)
    victims = {name: victim(service_dir / f"victim-{name}") for name in ("q", "m", "d", "r")}
    before = {name: state(v) for name, v in victims.items()}
    (data / "queue").mkdir(exist_ok=True)
    os.rename(data / "queue", service_dir / "old-queue")
    plants = {
        data / "queue": victims["q"],
        data / "mail" / "other.test": victims["m"],
        data / "dkim": victims["d"],
        data / "removed": victims["r"],
    }
    for link, target in plants.items():
        link.symlink_to(target)
        os.chown(link, 65534, 65534, follow_symlinks=False)
    results = [
        as_root(config, "user", "list"),
        as_root(config, "domain", "list"),
        as_root(config, "queue", "list"),
        as_root(config, "queue", "flush"),
        as_root(
            config, "user", "add", "carol@other.test", "--password-stdin", input="carol-pw-1\n"
        ),
        as_root(config, "dkim", "generate", "example.test"),
        as_root(config, "user", "remove", BOB),
        as_root(config, "check"),
    ]
    # Root's files kept their owners, modes and contents, and nothing was added.
    assert {name: state(v) for name, v in victims.items()} == before
    for result in results:
        assert "Traceback" not in result.stderr, result.stderr
    assert [r.returncode for r in results[:3]] == [0, 0, 0]
    # The owner may not write there, so neither may the command: refused.
    assert results[4].returncode == 1 and "Permission denied" in results[4].stderr
