"""Not as root (#15): started as root on ports below 1024, ``serve`` binds them,
then runs as the ``[run]`` user (every smtp process too), and mail still
flows; without such a user it refuses to run as root unless told to."""

from __future__ import annotations

import os
import poplib
import pwd
import signal
import smtplib
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.helpers import smtp_processes, wait_for
from tests.support.ports import free_port
from tests.support.server import LISTENERS, write_config

PASSWORD = "alice-password-1"


def free_low_port() -> int:
    """A port below 1024 free on loopback (only root may bind it)."""
    for port in range(700, 1024):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 1024")


def uids(pid: int) -> list[int]:
    """Real, effective, saved and file-system uid (/proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(v) for v in line.split()[1:]]
    raise AssertionError("no Uid line")


@pytest.fixture
def system_user(
    require_root: None, require_program: Callable[[str], str]
) -> Iterator[pwd.struct_passwd]:
    """A throwaway system user, removed afterwards."""
    name = f"potest{os.getpid() % 100000}"
    useradd, userdel = require_program("useradd"), require_program("userdel")
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run([userdel, name], check=False)


def python_reachable_by_all(scratch: Path, require_program: Callable[[str], str]) -> list[str]:
    """A command prefix under which a plain user can run this interpreter.

    Where Python lives under a directory only root may enter (pyenv in
    /root), the server would lose its interpreter, standard library and
    child processes the moment it drops root.  Then it runs in its own mount
    namespace where that directory is an open tmpfs holding only the way to
    the interpreter (bound back in); elsewhere (a system Python) nothing."""
    target = Path(os.path.realpath(sys.executable))
    for closed in target.parents:
        if not closed.stat().st_mode & 0o001:
            break
    else:
        return []
    inner = target.relative_to(closed).parts[0]
    saved = scratch / "saved"
    saved.mkdir()
    script = (
        "set -e; "
        f'mount --bind "{closed}" "{saved}"; '
        f'mount -t tmpfs -o mode=755 tmpfs "{closed}"; '
        f'mkdir "{closed / inner}"; '
        f'mount --bind "{saved / inner}" "{closed / inner}"; '
        'exec "$@"'
    )
    return [require_program("unshare"), "--mount", "sh", "-c", script, "sh"]


def config_for(
    base: Path,
    run: dict[str, object],
    ports: dict[str, int | list[int]],
    more: dict[str, dict[str, object]] | None = None,
) -> Path:
    config = base / "postoffice.toml"
    listen: dict[str, list[str]] = {}
    for name in LISTENERS:
        wanted = ports.get(name, [])
        listen[name] = [
            f"127.0.0.1:{p}" for p in (wanted if isinstance(wanted, list) else [wanted])
        ]
    write_config(
        config,
        {
            "hostname": "mail.example.test",
            "data_dir": str(base / "data"),
            "domains": ["example.test"],
        },
        {"listen": listen, "limits": {"smtp_processes": 2}, "run": run, **(more or {})},
    )
    return config


def po(config: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postoffice", "-c", str(config), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def serve_as_root(
    config: Path, scratch: Path, out: Path, require_program: Callable[[str], str]
) -> subprocess.Popen[bytes]:
    with open(out, "ab") as stream:
        return subprocess.Popen(
            [
                *python_reachable_by_all(scratch, require_program),
                sys.executable,
                "-m",
                "postoffice",
                "serve",
                "-c",
                str(config),
            ],
            stdout=stream,
            stderr=subprocess.STDOUT,
        )


def pop3_greets(port: int) -> bool:
    try:
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
    except OSError:
        return False
    pop.quit()
    return True


def test_the_log_file_the_pid_file_and_a_reload_work_as_the_run_user(
    service_dir: Path, system_user: pwd.struct_passwd, require_program: Callable[[str], str]
) -> None:
    """Root opens the log and binds the ports; the smtp processes (started
    after the drop) write the same log; SIGUSR1 after logrotate reopens it as
    the user; a reload that adds a port below 1024 is refused without closing
    the one that stays; postoffice.pid stays the user's (it can run serve)."""
    uid, gid = system_user.pw_uid, system_user.pw_gid
    low = free_low_port()
    other = next(p for p in range(low + 1, 1024) if _free(p))
    logs = service_dir / "logs"
    logs.mkdir()
    os.chown(logs, uid, gid)
    mail_log = logs / "mail.log"
    data = service_dir / "data"
    data.mkdir(mode=0o700)
    os.chown(data, uid, gid)  # a second start: the data directory is the user's already
    config = config_for(
        service_dir,
        {"user": system_user.pw_name},
        {"pop3": low, "smtp": free_port()},
        {"log": {"file": str(mail_log)}},
    )
    out = service_dir / "stdout.log"
    proc = serve_as_root(config, service_dir, out, require_program)
    try:
        assert wait_for(
            lambda: mail_log.exists() and "smtp process 1 accepting" in mail_log.read_text()
        ), out.read_text() + (mail_log.read_text() if mail_log.exists() else "")
        assert "Permission denied" not in mail_log.read_text()
        assert mail_log.stat().st_uid == uid
        assert (data / "postoffice.pid").stat().st_uid == uid
        # logrotate: move it away, signal; the new file is the user's.
        mail_log.rename(logs / "mail.log.1")
        os.kill(proc.pid, signal.SIGUSR1)
        assert wait_for(lambda: mail_log.exists() and "log file reopened" in mail_log.read_text())
        assert "cannot reopen" not in (logs / "mail.log.1").read_text()
        # A reload that adds a privileged port: refused (no root to bind it),
        # and the address that stays was never closed.
        config.write_text(
            config.read_text().replace(
                f'pop3 = ["127.0.0.1:{low}"]', f'pop3 = ["127.0.0.1:{low}", "127.0.0.1:{other}"]'
            )
        )
        assert f"127.0.0.1:{other}" in config.read_text()
        os.kill(proc.pid, signal.SIGHUP)
        assert wait_for(lambda: "reload refused" in mail_log.read_text()), mail_log.read_text()
        assert pop3_greets(low), mail_log.read_text()
        assert proc.poll() is None
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, out.read_text()
    assert (data / "postoffice.pid").stat().st_uid == uid


def test_a_tls_key_the_run_user_cannot_read_is_refused_at_start(
    service_dir: Path, system_user: pwd.struct_passwd, require_program: Callable[[str], str]
) -> None:
    """Every reload loads the [tls] files as the run user: a root-only key
    would start and then refuse every SIGHUP, so start refuses it, and
    check says why."""
    from postoffice.net.tls import ensure_self_signed

    tls = service_dir / "tls"
    tls.mkdir()
    cert, key = ensure_self_signed(tls, "mail.example.test")
    key.chmod(0o600)  # root's only, as an ACME client leaves it
    config = config_for(
        service_dir,
        {"user": system_user.pw_name},
        {"pop3": free_low_port()},
        {"tls": {"cert": str(cert), "key": str(key)}},
    )
    out = service_dir / "stdout.log"
    proc = serve_as_root(config, service_dir, out, require_program)
    try:
        assert proc.wait(60) == 1, out.read_text()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    assert (
        f"the [run] user {system_user.pw_name} cannot load the TLS certificate" in out.read_text()
    )
    checked = po(config, "check")
    assert checked.returncode == 1
    assert f"chgrp {system_user.pw_name} {key}" in checked.stderr


def test_a_log_file_symlinked_elsewhere_is_refused(service_dir: Path) -> None:
    """Root appends client-chosen text to the log: a symlink the service
    user planted in its place must not lead it to another file."""
    victim = service_dir / "victim"
    victim.write_text("root's\n")
    planted = service_dir / "mail.log"
    planted.symlink_to(victim)
    config = config_for(
        service_dir, {"user": "root"}, {"pop3": free_port()}, {"log": {"file": str(planted)}}
    )
    refused = subprocess.run(
        [sys.executable, "-m", "postoffice", "serve", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2, refused.stderr
    assert f"[log] file {planted}" in refused.stderr
    assert victim.read_text() == "root's\n"


def test_started_as_root_on_low_ports_it_runs_as_the_run_user(
    service_dir: Path, system_user: pwd.struct_passwd, require_program: Callable[[str], str]
) -> None:
    ports = {"smtp": free_low_port()}
    ports["pop3"] = next(p for p in range(ports["smtp"] + 1, 1024) if _free(p))
    config = config_for(service_dir, {"user": system_user.pw_name}, ports)
    log = service_dir / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                *python_reachable_by_all(service_dir, require_program),
                sys.executable,
                "-m",
                "postoffice",
                "serve",
                "-c",
                str(config),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        assert wait_for(lambda: "smtp process 1 accepting" in log.read_text()), log.read_text()
        assert proc.poll() is None
        uid = system_user.pw_uid
        assert uids(proc.pid) == [uid] * 4
        workers = smtp_processes(proc.pid)
        assert len(workers) == 1 and uids(workers[0]) == [uid] * 4
        assert f"running as {system_user.pw_name} (uid {uid})" in log.read_text()
        data = service_dir / "data"
        assert data.stat().st_uid == uid
        assert (data / "accounts.sqlite3").stat().st_uid == uid
        # The CLI as root works on the user's data (it becomes the owner), and
        # mail flows: SMTP in on port < 1024, POP3 out.
        added = po(config, "user", "add", "alice@example.test", "--password-stdin", input=PASSWORD)
        assert added.returncode == 0, added.stderr
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as smtp:
            smtp.sendmail("bob@elsewhere.test", ["alice@example.test"], b"Subject: hi\r\n\r\nx\r\n")
        pop = poplib.POP3("127.0.0.1", ports["pop3"], timeout=10)
        pop.stls(_insecure())
        pop.user("alice@example.test")
        pop.pass_(PASSWORD)
        assert wait_for(lambda: pop.stat()[0] == 1)
        pop.quit()
        assert po(config, "check").returncode == 0
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _insecure() -> object:
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_without_the_run_user_root_is_refused_unless_allowed(service_dir: Path) -> None:
    ports = {"smtp": free_low_port()}
    config = config_for(service_dir, {"user": "no-such-user-here"}, ports)
    refused = subprocess.run(
        [sys.executable, "-m", "postoffice", "serve", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert "no user no-such-user-here ([run] user) to run as" in refused.stderr
    assert "allow_root = true" in refused.stderr
