"""Signals at the edges of the server's life: while it starts, and while it stops.

While ``serve`` starts, before its event loop handles signals, SIGHUP's
default action would end it and SIGTERM's would kill it half-made: they
are held (blocked, so pending) until the loop's handlers exist (app.py
``_hold_signals``).  To send them inside that window the test freezes the
server (SIGSTOP) as soon as it has taken its data directory (its PID in
``postoffice.pid``), checks that it does not listen yet, sends the signals,
and lets it go on (SIGCONT).

A reload that comes while the server stops must not rebind listeners nor
keep it from ending (``Server.stopping``, ``_on_reload``).
"""

from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import wait_for
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

HELO = "client.example.test"


class FrozenStart:
    """A server frozen (SIGSTOP) after it took its data directory and before
    it listens; ``go_on`` lets it run."""

    def __init__(self, root: Path) -> None:
        self.srv = PostofficeServer(root)
        self.proc: subprocess.Popen[bytes] | None = None

    def freeze_while_starting(self, attempts: int = 5) -> subprocess.Popen[bytes]:
        pid_file = self.srv.data_dir / "postoffice.pid"
        for _ in range(attempts):
            pid_file.unlink(missing_ok=True)
            with open(self.srv.log_path, "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "postoffice", "serve", "-c", str(self.srv.config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            self.srv.proc = self.proc = proc  # stopped by PID at the end
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                if _holds(pid_file, proc.pid):
                    proc.send_signal(signal.SIGSTOP)
                    break
                time.sleep(0.001)
            assert proc.poll() is None, self.srv.log()
            if not self.accepting():
                return proc  # frozen inside the window
            # It got to listen before it froze (a slow test machine): again.
            proc.send_signal(signal.SIGCONT)
            self.srv.stop()
        raise AssertionError(f"never caught the server before it listened:\n{self.srv.log()}")

    def accepting(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.srv.ports["smtp"]), timeout=2).close()
        except OSError:
            return False
        return True

    def go_on(self) -> None:
        assert self.proc is not None
        time.sleep(0.1)  # the signals sent are pending in the frozen process
        self.proc.send_signal(signal.SIGCONT)

    def listening(self) -> bool:
        try:
            with smtplib.SMTP("127.0.0.1", self.srv.ports["smtp"], timeout=5) as s:
                return s.ehlo(HELO)[0] == 250
        except OSError:
            return False


def _holds(pid_file: Path, pid: int) -> bool:
    try:
        return pid_file.read_text().strip() == str(pid)
    except OSError:
        return False


@pytest.fixture
def frozen(tmp_path: Path) -> Iterator[FrozenStart]:
    started = FrozenStart(tmp_path)
    yield started
    if started.proc is not None and started.proc.poll() is None:
        started.proc.send_signal(signal.SIGCONT)
    started.srv.stop()


def test_a_sighup_while_starting_is_applied_once_it_listens(frozen: FrozenStart) -> None:
    proc = frozen.freeze_while_starting()
    # Inside the window: SIGHUP's (and SIGUSR1's) default action would end it.
    proc.send_signal(signal.SIGHUP)
    proc.send_signal(signal.SIGUSR1)
    frozen.go_on()
    assert wait_for(frozen.listening), frozen.srv.log()
    # Not lost either: the reload happened, after the start.
    assert wait_for(lambda: "SIGHUP: reloaded" in frozen.srv.log()), frozen.srv.log()
    log = frozen.srv.log()
    assert log.index("started ") < log.index("SIGHUP: reloaded")
    assert proc.poll() is None and frozen.listening()
    assert frozen.srv.stop() == 0, frozen.srv.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_starting_ends_it_cleanly(frozen: FrozenStart, sig: int) -> None:
    proc = frozen.freeze_while_starting()
    proc.send_signal(sig)
    frozen.go_on()
    # It finishes starting (nothing half made), then stops as on any SIGTERM.
    assert proc.wait(30) == 0, frozen.srv.log()
    log = frozen.srv.log()
    assert "Traceback" not in log, log
    assert log.index("started ") < log.index("shutting down") < log.index("stopped")


def test_a_reload_during_the_stop_rebinds_nothing_and_the_stop_ends(tmp_path: Path) -> None:
    """SIGTERM, then SIGHUPs while sessions still get their grace: no
    listener comes back (not the moved one either), and the server ends,
    exit 0, once the grace is over."""
    grace = 4.0
    srv = PostofficeServer(tmp_path, sections={"limits": {"shutdown_grace": grace}})
    srv.add_user("alice@example.test", "alice-password-1")
    srv.start()
    try:
        assert srv.proc is not None
        # A message under way keeps the stop waiting for its grace.
        busy = smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30)
        busy.ehlo(HELO)
        assert busy.mail("a@client.test")[0] == 250
        assert busy.rcpt("alice@example.test")[0] == 250
        assert busy.docmd("DATA")[0] == 354
        busy.send(b"Subject: half\r\n\r\nnot finished\r\n")
        # A reload would move the pop3 listener here.
        old_port, new_port = srv.ports["pop3"], free_port()
        text = srv.config.read_text()
        moved = text.replace(f'pop3 = ["127.0.0.1:{old_port}"]', f'pop3 = ["127.0.0.1:{new_port}"]')
        assert moved != text
        srv.config.write_text(moved)
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.send_signal(signal.SIGHUP)  # at once: while the stop begins
        assert wait_for(lambda: "shutting down" in srv.log(), 10), srv.log()
        srv.proc.send_signal(signal.SIGHUP)  # and once the listeners are closing

        def accepts(port: int) -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
            return True

        # Linux delivers pending signals lowest number first: the SIGHUP sent
        # "at once" may be handled before the SIGTERM (a reload that moves
        # pop3 before the stop). Either way the stop closes both ports.
        assert wait_for(lambda: not accepts(old_port) and not accepts(new_port), 10), srv.log()
        came_back = []
        while srv.proc.poll() is None and time.monotonic() - started < grace + 15:
            came_back += [port for port in (new_port, old_port) if accepts(port)]
            time.sleep(0.05)
        code = srv.proc.wait(1)
        busy.close()
        log = srv.log()
        assert code == 0, log
        assert time.monotonic() - started < grace + 10, log
        assert not came_back, (came_back, log)
        stopping = log.index("shutting down")
        assert "SIGHUP: reloaded" not in log[stopping:], log  # none once the stop began
        assert "SIGHUP: not reloaded, the server is stopping" in log, log
        assert log.index("shutting down") < log.index("stopped")
    finally:
        srv.stop()
