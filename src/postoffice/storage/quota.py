"""Per-mailbox quotas, counted in Maildir++'s ``maildirsize`` file.

The usage of a mailbox must be cheap to know at every RCPT, so it is never
found by listing the Maildir there.  It is kept where Courier, maildrop,
Exim and Dovecot's ``maildir`` quota backend keep it (the Maildir++ quota
convention, README.maildirquota): a file ``maildirsize`` in the Maildir,
whose first line is the limit (``<bytes>S``) and every further line a
change, ``<bytes> <messages>``; the usage is their sum.  Every writer
appends a line with one ``O_APPEND`` write -- a delivery ``+size 1``, a
POP3 deletion ``-size -1`` -- and only while the file exists: a missing
file is never begun by an append, it is recounted.  So the processes of
one server (``smtp_processes``), the CLI and other Maildir++ programs
pointed at the tree keep one count between them.  Sizes are file sizes
(the ``S=`` of a name; ``stat`` for names without it), in new/ and cur/ of
the mailbox and of its Maildir++ folders, as Dovecot counts them.

A recount lists the Maildir and writes a fresh file (tmp/, then rename).
It is done when the count cannot be trusted -- "recount when in doubt":

* the file is missing, unreadable, longer than 5120 bytes, or its sums are
  negative (Maildir++);
* its limit line is not the limit that applies now (Dovecot does the same);
* new/ or cur/ changed after the file's last line was written (someone else
  delivered or deleted, or a crash fell between a rename and its line: every
  writer here renames first and appends after).  Modification times have
  the file system's resolution (on older kernels a clock tick, 1-10 ms): a
  change in the same tick as the last line waits for one of the other rules;
* the mailbox looks over quota and the file is older than 15 minutes
  (Maildir++, Dovecot);
* and once per server process for each mailbox, on its first use: whatever
  happened while the server was down (a crash, a quota turned off and on)
  is counted afresh.

Like every Maildir++ implementation, the count is approximate under races:
two deliveries that each fit may together pass the limit by one message.

Everything that touches files here blocks; ``QuotaTracker`` is what the
event loop uses: its RCPT answer costs a few ``stat`` calls and never waits
for a recount (one in doubt starts in the I/O pool, and the answer is "not
known to be full"); its DATA answer waits for the recount, off the loop.

A message with several recipients that one mailbox has no room for is
deferred as a whole (the SMTP reply is per message); the tracker then
remembers, for WANTED_SECONDS, the size that mailbox lacked room for, and
RCPT counts it as the incoming size when MAIL declared no ``SIZE=``.  So
the client's retry is refused for that mailbox alone, at RCPT, and the
others get their copies: with ``SIZE=`` (what MTAs send) because the count
is trusted by then, without it because of the remembered size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from postoffice.mail.address import Address

log = logging.getLogger("postoffice.storage")

MAILDIRSIZE = "maildirsize"
MAX_FILE = 5120  # Maildir++: a longer maildirsize is recounted
STALE_SECONDS = 15 * 60  # Maildir++: over quota and this old: recounted
RECOUNT_TRIES = 3  # the Maildir changed during the count: count again
_S_FIELD = re.compile(r",S=(\d+)(?=[,:]|$)")
_LINE = re.compile(rb" *(-?\d{1,19}) +(-?\d{1,19}) *")
_MAX_TRACKED = 100_000
# How long a size a mailbox had no room for counts at RCPT: past the first
# retries of a deferred message (Postfix: 5 minutes, then doubling).
WANTED_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Usage:
    bytes: int
    messages: int


@dataclass(frozen=True, slots=True)
class Recorded:
    """What a ``maildirsize`` file says."""

    limit_line: str  # its first line, e.g. "10485760S"
    usage: Usage
    changes: int  # lines after the first
    state: tuple[int, int, int]  # inode, size, mtime (ns): a change shows in one

    @property
    def age(self) -> float:
        """Seconds since the file was last written."""
        return time.time() - self.state[2] / 1e9


def limit_line(limit: int) -> str:
    """The first line of a ``maildirsize`` for ``limit`` bytes (0: none, as Dovecot writes it)."""
    return f"{max(limit, 0)}S"


def read_recorded(maildir: Path) -> Recorded | None:
    """Parse ``maildir/maildirsize``; None if it is missing or cannot be trusted."""
    try:
        fd = os.open(maildir / MAILDIRSIZE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        data = os.read(fd, MAX_FILE + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE or b"\0" in data:
        return None
    # A last line without its LF is a write in progress (or torn): not yet counted.
    lines = data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]
    if not lines:
        return None
    total = count = 0
    for line in lines[1:]:
        m = _LINE.fullmatch(line)
        if m is None:
            return None
        total += int(m[1])
        count += int(m[2])
    if total < 0 or count < 0:
        return None
    return Recorded(
        limit_line=lines[0].decode("ascii", "replace").strip(),
        usage=Usage(total, count),
        changes=len(lines) - 1,
        state=(st.st_ino, st.st_size, st.st_mtime_ns),
    )


def record(maildir: Path, size: int, messages: int) -> None:
    """Append one change (``+size 1`` after a delivery, ``-size -1`` after a
    deletion) if the mailbox has a ``maildirsize``; never creates it.
    Call after the rename or unlink it records.  A failed append (a full
    disk) removes the file, so the next look recounts instead of trusting
    a sum that misses a change; so does an append that takes the file past
    5120 bytes, which Maildir++ readers recount anyway: the file stays
    small even for a mailbox whose count nobody reads (no quota)."""
    path = maildir / MAILDIRSIZE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError:
        _forget(path)
        return
    try:
        line = f"{size} {messages}\n".encode("ascii")
        if os.write(fd, line) != len(line) or os.fstat(fd).st_size > MAX_FILE:
            raise OSError("short write, or the file is due for a recount")
    except OSError:
        _forget(path)
    finally:
        os.close(fd)


def _forget(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _folders(maildir: Path) -> list[Path]:
    """The mailbox and its Maildir++ folders (``.Sent``, ``.Work.Projects``)."""
    folders = [maildir]
    with contextlib.suppress(OSError), os.scandir(maildir) as it:
        for entry in it:
            name = entry.name
            if name.startswith(".") and name not in (".", "..") and entry.is_dir():
                folders.append(Path(entry.path))
    return folders


def _mtimes(folders: list[Path]) -> list[int]:
    out = []
    for folder in folders:
        for sub in ("new", "cur"):
            try:
                out.append(os.stat(folder / sub).st_mtime_ns)
            except OSError:
                out.append(0)
    return out


def count_blocking(maildir: Path) -> Usage:
    """List the Maildir: its messages' total size and number."""
    total = count = 0
    for folder in _folders(maildir):
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError), os.scandir(folder / sub) as it:
                for entry in it:
                    name = entry.name
                    if name.startswith("."):
                        continue  # not a message (Maildir spec)
                    m = _S_FIELD.search(name.partition(":2,")[0])
                    if m is not None:
                        size = int(m[1])
                    else:
                        try:
                            size = entry.stat(follow_symlinks=False).st_size
                        except FileNotFoundError:
                            continue  # moved or removed while we listed
                    total += size
                    count += 1
    return Usage(total, count)


def recount_blocking(maildir: Path, limit: int) -> Usage:
    """Count the Maildir and write a fresh ``maildirsize`` (tmp/, then rename).
    A Maildir that changes during the count is counted again, like Dovecot
    does; after ``RECOUNT_TRIES`` the last count is written anyway (the next
    look sees the directories newer than the file and recounts)."""
    folders = _folders(maildir)
    for _ in range(RECOUNT_TRIES):
        before = _mtimes(folders)
        usage = count_blocking(maildir)
        if _mtimes(folders) == before:
            break
    body = f"{limit_line(limit)}\n{usage.bytes} {usage.messages}\n".encode("ascii")
    tmp = maildir / "tmp" / f"{MAILDIRSIZE}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if os.write(fd, body) != len(body):
                raise OSError("short write")
        finally:
            os.close(fd)
        os.replace(tmp, maildir / MAILDIRSIZE)
    except OSError:
        _forget(tmp)  # the count stands; the file is written by a later recount
    return usage


def doubtful(maildir: Path, recorded: Recorded | None, limit: int) -> bool:
    """Must ``recorded`` be recounted before it is used?  (See the module
    docstring; the once-per-process rule is the tracker's.)  A few stats."""
    if recorded is None or recorded.limit_line != limit_line(limit):
        return True
    written = recorded.state[2]
    for sub in ("new", "cur"):
        try:
            if os.stat(maildir / sub).st_mtime_ns > written:
                return True
        except FileNotFoundError:
            continue
        except OSError:
            return True
    # Maildir++: a mailbox over quota is recounted once its count is 15
    # minutes old, before it refuses more mail on it.
    over = limit > 0 and recorded.usage.bytes >= limit
    return over and recorded.age > STALE_SECONDS


def usage_blocking(maildir: Path, limit: int) -> Usage:
    """The usage to show (CLI, POP3): the file's, recounted when in doubt."""
    recorded = read_recorded(maildir)
    if recorded is not None and not doubtful(maildir, recorded, limit):
        return recorded.usage
    return recount_blocking(maildir, limit)


def parse_size(text: str) -> int:
    """``"500M"``, ``"2G"``, ``"1.5GiB"``, ``"1048576"`` -> bytes (K, M, G, T are
    powers of 1024); raise ValueError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if m is None:
        raise ValueError(f"{text!r} is not a size (e.g. 500M, 2G, 1048576)")
    scale = 1024 ** " kmgt".index(m[2].lower() or " ")
    value = float(m[1]) * scale if "." in m[1] else int(m[1]) * scale
    if value >= 2**63:
        raise ValueError(f"{text!r} is too large")
    return int(value)


def format_size(size: int) -> str:
    """Bytes for people: ``524288000`` -> ``500 MiB``."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} bytes"


class QuotaTracker:
    """The server's view of mailbox quotas: which limit applies, and whether a
    mailbox is full, without listing Maildirs on the event loop."""

    def __init__(
        self,
        default: int,
        own_quota: Callable[[Address], int | None],
        executor: Executor,
    ) -> None:
        self.default = default
        self._own_quota = own_quota
        self._executor = executor
        self._recorded: dict[Path, Recorded] = {}  # last read, by Maildir
        self._counted: set[Path] = set()  # recounted in this process
        self._recounts: dict[Path, asyncio.Future[Usage]] = {}
        # Maildir -> (octets it had no room for, when): see the module docstring.
        self._wanted: dict[Path, tuple[int, float]] = {}
        self._clock = time.monotonic

    def limit(self, mailbox: Address) -> int:
        """The quota of ``mailbox`` in bytes; 0: none."""
        own = self._own_quota(mailbox)
        return self.default if own is None else own

    def full(self, mailbox: Address, maildir: Path, incoming: int = 0) -> bool:
        """For RCPT: is the mailbox known to be full (or to have no room for
        ``incoming`` octets, a SIZE= of MAIL)?  Never waits: a count in doubt
        starts a recount in the background and answers False."""
        limit = self.limit(mailbox)
        if limit <= 0:
            return False
        usage = self._trusted(maildir, limit)
        if usage is None:
            self._recount(maildir, limit)
            return False
        if not incoming:  # no SIZE=: the size this mailbox lacked room for lately
            incoming = self._wanted_size(maildir)
        return usage.bytes >= limit or usage.bytes + incoming > limit

    def no_room(self, maildir: Path, size: int) -> None:
        """A message of ``size`` octets did not fit ``maildir`` (and was
        deferred): count that size at RCPT for WANTED_SECONDS."""
        if len(self._wanted) >= _MAX_TRACKED:
            self._wanted.clear()  # bounded memory; the next retries defer once more
        self._wanted[maildir] = (max(size, self._wanted_size(maildir)), self._clock())

    def _wanted_size(self, maildir: Path) -> int:
        wanted = self._wanted.get(maildir)
        if wanted is None:
            return 0
        if self._clock() - wanted[1] > WANTED_SECONDS:
            del self._wanted[maildir]
            return 0
        return wanted[0]

    async def room(self, mailbox: Address, maildir: Path, size: int) -> bool:
        """For the end of DATA: does a message of ``size`` octets fit?  Waits
        for a recount (in the I/O pool) when the count is in doubt."""
        limit = self.limit(mailbox)
        if limit <= 0:
            return True
        usage = self._trusted(maildir, limit)
        if usage is None:
            try:
                # Shielded: the recount is shared, one session's end must not cancel it.
                usage = await asyncio.shield(self._recount(maildir, limit))
            except OSError as exc:
                # Unknown is not full: a quota is never a reason to lose mail.
                log.error("quota: cannot count %s: %s", maildir, exc)
                return True
        return usage.bytes + size <= limit

    def _trusted(self, maildir: Path, limit: int) -> Usage | None:
        """The recorded usage if nothing casts doubt on it; None otherwise."""
        if maildir not in self._counted or maildir in self._recounts:
            return None
        try:
            st = os.stat(maildir / MAILDIRSIZE)
        except OSError:
            return None
        recorded = self._recorded.get(maildir)
        if recorded is None or recorded.state != (st.st_ino, st.st_size, st.st_mtime_ns):
            recorded = read_recorded(maildir)
            if recorded is None:
                return None
            self._recorded[maildir] = recorded
        if doubtful(maildir, recorded, limit):
            return None
        return recorded.usage

    def _recount(self, maildir: Path, limit: int) -> asyncio.Future[Usage]:
        running = self._recounts.get(maildir)
        if running is not None:
            return running
        if len(self._counted) >= _MAX_TRACKED:
            self._counted.clear()  # bounded memory; a recount each is the price
            self._recorded.clear()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, recount_blocking, maildir, limit)
        self._recounts[maildir] = future

        def done(f: asyncio.Future[Usage]) -> None:
            del self._recounts[maildir]
            if not f.cancelled() and f.exception() is None:
                self._counted.add(maildir)
                self._recorded.pop(maildir, None)

        future.add_done_callback(done)
        return future
