"""Where the server's log lines go and what they look like (``[log]``).

A line in the text format::

    2026-01-31T14:02:03.123+01:00 postoffice[4242]: INFO postoffice.mail: received id=...

and in the json format (``[log] format = "json"``), one object per line::

    {"time":"2026-01-31T14:02:03.123+01:00","pid":4242,"level":"INFO",
     "logger":"postoffice.mail","event":"received","id":"...","client":"192.0.2.1",...}

The time is ISO 8601 with its UTC offset, so lines from machines in other
zones (or from before a DST change) still compare; the PID tells the server
from its extra smtp processes (workers.py), which log to the same places.

Destinations: standard error by default; ``[log] file`` (appended to, and
reopened on SIGUSR1, so logrotate can move it away and signal); ``[log]
syslog``, a syslog socket such as /dev/log, where journald and rsyslog both
listen (facility "mail", tag ``postoffice[PID]``).  With a file or syslog set,
nothing goes to standard error.  ``$POSTOFFICE_LOG_LEVEL`` overrides
``[log] level`` (one of LOG_LEVELS); a bad value is refused, not a traceback.

Log calls run on the event loop, and a destination can block: a syslog
reader that falls behind (a full datagram queue blocks ``send``), a file on a
stuck disk.  So the file and syslog are each written by a thread of their own
(``logging.handlers.QueueListener``) from a bounded queue (``QUEUE_LINES``): a
log call only puts the record there.  When the queue is full the record is
dropped and counted, and the count is logged as soon as that destination
takes lines again; the server never waits for them.  Standard error, the
default, is written at once, in order with everything else the process
prints there (a terminal, or a supervisor that reads it; for a server that
must not wait on its log, set ``file`` or ``syslog``).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import io
import json
import logging
import logging.handlers
import os
import queue
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TextIO

from postoffice.config.settings import LOG_LEVEL_ENV, LOG_LEVELS, LogSettings

TEXT_FORMAT = "%(asctime)s postoffice[%(process)d]: %(levelname)s %(name)s: %(message)s"
# Syslog stamps the time itself; the tag "postoffice[PID]:" is what it files lines under.
SYSLOG_FORMAT = "postoffice[%(process)d]: %(levelname)s %(name)s: %(message)s"
ERROR_NOTE_SECONDS = 60.0
QUEUE_LINES = 8192  # records waiting per destination; more are dropped (and counted)
CLOSE_SECONDS = 5.0  # how long close() waits for a destination to take what waits


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
assert set(_LEVELS) == set(LOG_LEVELS)


class LogSetupError(Exception):
    """The log cannot be set up as configured; ``str()`` is the line users see."""


class _TextFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.datetime.fromtimestamp(record.created).astimezone()
        return moment.isoformat(timespec="milliseconds")


class _JsonFormatter(_TextFormatter):
    """``[log] format = "json"``: one object per line.  A mail event
    (maillog.py) brings its fields as members ("event", "id", ...); any other
    record has "msg"."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": self.formatTime(record),
            "pid": record.process,
            "level": record.levelname,
            "logger": record.name,
        }
        mail = getattr(record, "mail", None)
        if isinstance(mail, dict):
            line.update(mail)
        else:
            line["msg"] = record.getMessage()
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        # ensure_ascii: a client's words never bring a control or a line
        # separator into the file (as logfmt's quoting does for text).
        return json.dumps(line, ensure_ascii=True, separators=(",", ":"))


class _JsonSyslogFormatter(_JsonFormatter):
    """Syslog files a line under the tag before the object."""

    def format(self, record: logging.LogRecord) -> str:
        return f"postoffice[{record.process}]: {super().format(record)}"


class _OneLineErrors(logging.Handler):
    """A destination that fails (a full disk, syslog restarting) costs a line
    lost and one note on stderr a minute, not a traceback per line."""

    _noted = -ERROR_NOTE_SECONDS

    def handleError(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        if now - self._noted >= ERROR_NOTE_SECONDS:
            self._noted = now
            exc = sys.exc_info()[1]
            with contextlib.suppress(OSError, ValueError):
                print(f"postoffice: cannot write the log to {self}: {exc}", file=sys.stderr)


class _Syslog(_OneLineErrors, logging.handlers.SysLogHandler):
    pass


def open_log_file(path: str, hand_to: tuple[int, int] | None = None) -> int:
    """The log file's descriptor, opened to append, safely for root.

    Serve opens it as root before it becomes the ``[run]`` user (``hand_to``:
    that uid and gid), in a directory that user may be able to write: a
    symlink planted there (O_NOFOLLOW), a FIFO (O_NONBLOCK, then refused) or
    a hard link to another file, or a file of a third user, is refused, or
    root would append client-chosen text to it.  A file root owns is handed
    to the run user, so its extra smtp processes can open it and it can be
    reopened after it dropped root."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    fd = os.open(path, flags, 0o640)
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
            raise OSError(errno.EINVAL, "not a regular file of its own (a link?)", path)
        owners = {0, os.geteuid()} | ({hand_to[0]} if hand_to else set())
        if found.st_uid not in owners:
            raise OSError(errno.EPERM, f"belongs to uid {found.st_uid}, not to us", path)
        if hand_to is not None and found.st_uid != hand_to[0]:
            os.fchown(fd, *hand_to)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _ReopenableFile(_OneLineErrors, logging.FileHandler):
    """A log file opened in append mode (``open_log_file``), opened again by
    ``reopen`` (after logrotate renamed it: the new lines go to a new file at
    the same path)."""

    def __init__(self, path: str, hand_to: tuple[int, int] | None) -> None:
        self.hand_to = hand_to
        super().__init__(path, encoding="utf-8")

    def _open(self) -> io.TextIOWrapper:
        fd = open_log_file(self.baseFilename, self.hand_to)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def reopen(self) -> None:
        self.acquire()
        try:
            fresh = self._open()  # raises OSError: the old stream stays
            old, self.stream = self.stream, fresh
            if old is not None:
                old.close()
        finally:
            self.release()


_REOPEN = logging.makeLogRecord({"msg": "reopen"})  # in a queue: reopen the file, in order


class _Writer(logging.handlers.QueueListener):
    """The thread that writes one destination's queue."""

    def __init__(self, lines: queue.Queue[logging.LogRecord | None], target: logging.Handler):
        super().__init__(lines, target)
        self.lines = lines
        self.target = target

    def handle(self, record: logging.LogRecord) -> None:
        if record is _REOPEN:
            if isinstance(self.target, _ReopenableFile):
                try:
                    self.target.reopen()
                except OSError as exc:  # said in the file it goes on writing to
                    self._note(
                        logging.ERROR,
                        f"SIGUSR1: cannot reopen log file {self.target.baseFilename}:"
                        f" {exc.strerror}; still writing to the old one",
                    )
                else:
                    self._note(logging.INFO, "SIGUSR1: log file reopened")
            return
        self.target.handle(record)

    def _note(self, level: int, message: str) -> None:
        self.target.handle(
            logging.makeLogRecord(
                {
                    "name": "postoffice",
                    "levelno": level,
                    "levelname": logging.getLevelName(level),
                    "msg": message,
                }
            )
        )

    def stop_within(self, seconds: float) -> bool:
        """Ask the thread to finish what waits, for at most ``seconds``: a
        destination stuck for good must not hold the server's exit.  False if
        the thread did not finish."""
        thread, deadline = self._thread, time.monotonic() + seconds
        if thread is None:
            return True
        with contextlib.suppress(queue.Full):
            self.lines.put(None, timeout=seconds)  # QueueListener's sentinel
        thread.join(max(0.0, deadline - time.monotonic()))
        self._thread = None
        return not thread.is_alive()


class _Destination(logging.handlers.QueueHandler):
    """One destination (``target``) behind a bounded queue and its writer
    thread (see the module doc).  ``emit`` never blocks."""

    def __init__(self, target: logging.Handler, name: str, size: int = QUEUE_LINES) -> None:
        lines: queue.Queue[logging.LogRecord | None] = queue.Queue(size)
        super().__init__(lines)
        self.lines = lines
        self.target = target
        self.name = name
        self.dropped = 0
        self._reopen_waiting = False
        self._writer = _Writer(lines, target)
        self._writer.start()

    def _put(self, record: logging.LogRecord) -> bool:
        try:
            self.lines.put_nowait(record)
        except queue.Full:
            return False
        return True

    def enqueue(self, record: logging.LogRecord) -> None:
        # Handler.handle holds self.lock: one enqueue at a time.
        if self._reopen_waiting:
            self._reopen_waiting = not self._put(_REOPEN)
        if self.dropped:
            note = logging.makeLogRecord(
                {
                    "name": "postoffice.log",
                    "levelno": logging.WARNING,
                    "levelname": "WARNING",
                    "msg": f"log dropped={self.dropped} lines: {self.name} did not take them"
                    f" fast enough (at most {self.lines.maxsize} wait)",
                }
            )
            if not self._put(note):
                self.dropped += 1
                return
            self.dropped = 0
        if not self._put(record):
            self.dropped += 1

    def reopen(self) -> None:
        """Reopen the file after the lines queued so far (they belong in the old one)."""
        self.acquire()  # the lock enqueue runs under
        try:
            if self._reopen_waiting or not self._put(_REOPEN):
                self._reopen_waiting = True
        finally:
            self.release()

    def close(self) -> None:
        if self._writer.stop_within(CLOSE_SECONDS):
            self.target.close()
        else:
            left = self.lines.qsize() + self.dropped
            with contextlib.suppress(OSError, ValueError):
                print(
                    f"postoffice: {left} log line(s) not written: {self.name} took none"
                    f" for {CLOSE_SECONDS:.0f} s",
                    file=sys.stderr,
                )
        super().close()


def level_of(settings: LogSettings, environ: Mapping[str, str]) -> int:
    """The logging level: $POSTOFFICE_LOG_LEVEL if set, else ``[log] level``."""
    name = environ.get(LOG_LEVEL_ENV, "").strip().lower() or settings.level
    if name not in LOG_LEVELS:
        raise LogSetupError(
            f"${LOG_LEVEL_ENV}: {environ.get(LOG_LEVEL_ENV)!r} is not a log level"
            f" (one of: {', '.join(LOG_LEVELS)})"
        )
    return _LEVELS[name]


def problems(settings: LogSettings, environ: Mapping[str, str] = os.environ) -> list[str]:
    """What would stop ``configure`` (for ``postoffice check``); changes nothing."""
    found: list[str] = []
    try:
        level_of(settings, environ)
    except LogSetupError as exc:
        found.append(str(exc))
    path = settings.file
    if path is not None:
        if path.exists():
            if path.is_dir() or not os.access(path, os.W_OK):
                found.append(f"[log] file {path} cannot be written")
        elif not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
            found.append(f"[log] file {path} cannot be created in {path.parent}")
    if settings.syslog:
        problem = _syslog_problem(settings.syslog)
        if problem:
            found.append(problem)
    return found


def _syslog_problem(path: str) -> str:
    try:
        is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError as exc:
        return f"[log] syslog {path}: {exc.strerror}"
    return "" if is_socket else f"[log] syslog {path} is not a socket"


@dataclass
class Logs:
    """The handlers ``configure`` installed; ``reopen`` on SIGUSR1."""

    handlers: list[logging.Handler] = field(default_factory=list)
    to_stderr: bool = True

    def reopen(self) -> None:
        """Reopen the log files (SIGUSR1), each in its own writer thread,
        after the lines already queued for it."""
        for handler in self.handlers:
            if isinstance(handler, _Destination) and isinstance(handler.target, _ReopenableFile):
                handler.reopen()

    def fatal(self, message: str, err: TextIO | None = None) -> None:
        """Log why the server cannot run, and say it on stderr too if the log
        goes elsewhere (the administrator at the terminal must see it)."""
        logging.getLogger("postoffice").error("%s", message)
        if not self.to_stderr:
            print(f"postoffice: {message}", file=err or sys.stderr, flush=True)

    def close(self) -> None:
        root = logging.getLogger()
        for handler in self.handlers:
            root.removeHandler(handler)
            handler.close()
        self.handlers = []


def configure(
    settings: LogSettings,
    environ: Mapping[str, str] = os.environ,
    queue_lines: int = QUEUE_LINES,
    hand_to: tuple[int, int] | None = None,
) -> Logs:
    """Send the root logger's records where ``[log]`` says; raise LogSetupError.
    ``queue_lines``: records that may wait per destination (tests make it small).
    ``hand_to``: the uid and gid serve started as root becomes ([run]): the
    log file is theirs (``open_log_file``)."""
    level = level_of(settings, environ)
    logs = Logs(to_stderr=settings.file is None and not settings.syslog)
    text = _JsonFormatter() if settings.format == "json" else _TextFormatter(TEXT_FORMAT)
    handler: logging.Handler
    if settings.file is not None:
        try:
            handler = _ReopenableFile(str(settings.file), hand_to)
        except OSError as exc:
            raise LogSetupError(f"[log] file {settings.file}: {exc.strerror or exc}") from None
        handler.setFormatter(text)
        logs.handlers.append(_Destination(handler, f"[log] file {settings.file}", queue_lines))
    if settings.syslog:
        found = _syslog_problem(settings.syslog)  # SysLogHandler would not say
        if found:
            logs.close()
            raise LogSetupError(found)
        handler = _Syslog(settings.syslog, facility=logging.handlers.SysLogHandler.LOG_MAIL)
        handler.setFormatter(
            _JsonSyslogFormatter()
            if settings.format == "json"
            else logging.Formatter(SYSLOG_FORMAT)
        )
        logs.handlers.append(_Destination(handler, f"[log] syslog {settings.syslog}", queue_lines))
    if logs.to_stderr:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(text)
        logs.handlers.append(handler)
    root = logging.getLogger()
    for old in list(root.handlers):  # a second configure (tests) replaces the first
        root.removeHandler(old)
    for handler in logs.handlers:
        root.addHandler(handler)
    root.setLevel(level)
    return logs
