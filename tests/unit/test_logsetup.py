"""logsetup: levels (and $POSTOFFICE_LOG_LEVEL), the line format, files reopened
after rotation, what `check` reports about [log]."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from postoffice import maillog
from postoffice.config.settings import LogSettings
from postoffice.logsetup import LogSetupError, configure, level_of, problems


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_levels_and_the_environment_override() -> None:
    assert level_of(LogSettings(), {}) == logging.INFO
    assert level_of(LogSettings(level="warning"), {}) == logging.WARNING
    assert level_of(LogSettings(level="warning"), {"POSTOFFICE_LOG_LEVEL": "DEBUG"}) == 10
    assert level_of(LogSettings(), {"POSTOFFICE_LOG_LEVEL": " "}) == logging.INFO  # unset
    with pytest.raises(LogSetupError, match=r"'LOUD' is not a log level \(one of: debug"):
        level_of(LogSettings(), {"POSTOFFICE_LOG_LEVEL": "LOUD"})


def test_file_lines_and_reopening_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    logs = configure(LogSettings(file=path), {})
    try:
        assert not logs.to_stderr
        logging.getLogger("postoffice.smtp").info("first")
        path.rename(tmp_path / "mail.log.1")
        logging.getLogger("postoffice.smtp").info("second, still to the old file")
        logs.reopen()
        logging.getLogger("postoffice.smtp").warning("third")
        logging.getLogger("postoffice.smtp").debug("not at info level")
    finally:
        logs.close()
    old = (tmp_path / "mail.log.1").read_text().splitlines()
    new = path.read_text().splitlines()
    line = (
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"
        rf" postoffice\[{os.getpid()}\]: (INFO|WARNING) postoffice\.smtp: "
    )
    assert [re.sub(line, "", text) for text in old] == ["first", "second, still to the old file"]
    reopened = rf".* postoffice\[{os.getpid()}\]: INFO postoffice: SIGUSR1: log file reopened"
    assert re.fullmatch(reopened, new[0])  # said in the new file: it could
    assert [re.sub(line, "", text) for text in new[1:]] == ["third"]


def test_a_reopen_that_fails_keeps_the_old_file(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    logs = configure(LogSettings(file=directory / "mail.log"), {})
    try:
        (directory / "mail.log").rename(tmp_path / "moved.log")
        directory.rmdir()  # nowhere to make the new file
        logs.reopen()
        logging.getLogger("postoffice").info("after")
    finally:
        logs.close()
    text = (tmp_path / "moved.log").read_text()
    assert "cannot reopen log file" in text and "after" in text


def test_problems_check_reports(tmp_path: Path) -> None:
    assert problems(LogSettings(file=tmp_path / "ok.log"), {}) == []
    found = problems(
        LogSettings(file=tmp_path / "no" / "x.log", syslog=str(tmp_path / "nosock")),
        {"POSTOFFICE_LOG_LEVEL": "chatty"},
    )
    assert len(found) == 3
    assert "'chatty' is not a log level" in found[0]
    assert f"[log] file {tmp_path / 'no' / 'x.log'} cannot be created" in found[1]
    assert f"[log] syslog {tmp_path / 'nosock'}: No such file or directory" in found[2]
    (tmp_path / "plain").write_text("")
    assert problems(LogSettings(syslog=str(tmp_path / "plain")), {}) == [
        f"[log] syslog {tmp_path / 'plain'} is not a socket"
    ]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(tmp_path / "sock"))
        assert problems(LogSettings(syslog=str(tmp_path / "sock")), {}) == []
    finally:
        sock.close()


def test_configure_refuses_what_cannot_be_opened(tmp_path: Path) -> None:
    with pytest.raises(LogSetupError, match=r"\[log\] file .*: No such file or directory"):
        configure(LogSettings(file=tmp_path / "no" / "x.log"), {})
    with pytest.raises(LogSetupError, match=r"\[log\] syslog .*nosock"):
        configure(LogSettings(syslog=str(tmp_path / "nosock")), {})


def test_a_syslog_that_goes_away_costs_one_line_not_a_traceback_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "log.sock"))
    logs = configure(LogSettings(syslog=str(tmp_path / "log.sock")), {})
    try:
        logging.getLogger("postoffice").info("delivered")
        assert sock.recv(4096).startswith(f"<22>postoffice[{os.getpid()}]: INFO".encode())
        sock.close()
        (tmp_path / "log.sock").unlink()  # journald restarting, say
        for n in range(5):
            logging.getLogger("postoffice").info("lost %d", n)
    finally:
        logs.close()
    err = capsys.readouterr().err
    assert err.count("postoffice: cannot write the log to") == 1
    assert "Traceback" not in err


def test_a_stuck_syslog_never_blocks_a_log_call_and_drops_are_counted(tmp_path: Path) -> None:
    """A syslog reader that stops reading fills its datagram queue and makes
    send() block: log calls (made on the event loop) must not wait for it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "log.sock"))
    logs = configure(LogSettings(syslog=str(tmp_path / "log.sock")), {}, queue_lines=50)
    try:
        finished = threading.Event()

        def flood() -> None:
            for n in range(500):
                logging.getLogger("postoffice.smtp").info("lost %d", n)
            finished.set()

        threading.Thread(target=flood, daemon=True).start()
        assert finished.wait(30)  # before: stuck at the 11th line for good
        received = []
        sock.settimeout(0.5)
        destination = logs.handlers[0]
        while True:  # the reader is back: take what waited
            try:
                received.append(sock.recv(65536))
            except TimeoutError:
                if destination.lines.empty():  # type: ignore[attr-defined]
                    break
        logging.getLogger("postoffice.smtp").info("after")
        sock.settimeout(10)
        while not received[-1].rstrip(b"\0").endswith(b"after"):
            received.append(sock.recv(65536))
    finally:
        logs.close()
        sock.close()
    lost = [d for d in received if b"postoffice.smtp: lost " in d]
    # A note each time the queue had room again, before the next line that
    # got through (lines logged after the room came back may follow it).
    notes = [d for d in received if b"log dropped=" in d]
    assert notes and received.index(notes[-1]) < len(received) - 1
    assert all(note.startswith(b"<20>postoffice[") for note in notes)  # mail.warning
    dropped = sum(int(note.split(b"log dropped=")[1].split()[0]) for note in notes)
    assert len(lost) + dropped == 500
    assert b"[log] syslog " in notes[-1] and b"did not take them fast enough" in notes[-1]


def test_json_format_one_object_per_line_mail_events_as_members(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    logs = configure(LogSettings(file=path, format="json"), {})
    try:
        logging.getLogger("postoffice.smtp").info('a "quoted"\nline')
        maillog.queued("q1", sender='"x y"@example.test', nrcpt=2, size=10)
        maillog.queued("q2", sender=None, nrcpt=1, size=1)
    finally:
        logs.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(line.isascii() and line.isprintable() for line in lines)
    plain, queued, bounce = (json.loads(line) for line in lines)
    assert plain["msg"] == 'a "quoted"\nline' and plain["logger"] == "postoffice.smtp"
    assert plain["pid"] == os.getpid() and plain["level"] == "INFO"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", plain["time"])
    assert {k: queued[k] for k in ("event", "id", "from", "nrcpt", "size")} == {
        "event": "queued",
        "id": "q1",
        "from": '"x y"@example.test',
        "nrcpt": 2,
        "size": 10,
    }
    assert "msg" not in queued and queued["logger"] == "postoffice.mail"
    assert bounce["from"] == ""  # the null sender
