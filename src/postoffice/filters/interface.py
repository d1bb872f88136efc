"""The interface every filter kind implements: ``Filter`` and ``FilterSession``.

Why: the SMTP session must not know whether a milter socket or a Python
object answers it.  It opens one ``FilterSession`` per SMTP connection from
each configured ``Filter`` (through ``chain.FilterChain``), calls one
coroutine per SMTP stage, and acts on the ``verdicts.FilterResult`` each
returns.  A milter adapter and the Python hook adapter are the two
implementations.

Contract for implementers:

- Stages come in SMTP order: ``connect`` once, ``helo`` per HELO/EHLO,
  then per message ``mail``, ``rcpt`` (once per recipient the server itself
  accepted), ``message`` (after DATA, the message spooled to a file), and
  ``delivered`` (after the 250, for information: its result is ignored).
  ``abort`` ends a message early (RSET, a refused MAIL/RCPT/DATA, a
  verdict of another filter); ``close`` ends the connection, always once,
  also after errors.  A new message starts again with ``mail``.
- Every method may raise or hang: the chain bounds nothing itself but
  catches everything; an adapter enforces its own per-stage timeouts
  (raising ``TimeoutError``) and the chain turns any exception into the
  filter's ``default_action`` with a log line carrying the traceback.
- ``SessionFacts`` is a snapshot passed with every call, so facts that
  change mid-session (STARTTLS, AUTH, the queue id) are current; a milter
  adapter builds its macros (``{client_addr}``, ``{auth_authen}``,
  ``{tls_version}``, ``i``, ``j`` ...) from it.
- The message is on disk: ``SpooledMessage.headers`` are parsed, the body is
  read from ``path`` at ``body_offset`` (``body_chunks`` streams it through
  an executor so the event loop is never blocked and the body is never
  held whole in memory).  Filters see the message as received; the chain
  applies modifications in config order after the last filter answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from postoffice.filters.verdicts import FilterResult

BODY_CHUNK = 64 * 1024  # milter's MILTER_CHUNK_SIZE is 65535; the same order


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What is known about the SMTP connection at the time of a call."""

    client_address: str  # IP address text ("127.0.0.1", "::1")
    client_port: int
    client_name: str  # verified reverse DNS name, "" unknown
    hostname: str  # our own name (milter macro j)
    listener: str  # "smtp", "submission", "submissions"
    helo: str = ""  # the last HELO/EHLO argument
    tls_version: str = ""  # "TLSv1.3"; "" no TLS
    tls_cipher: str = ""
    auth_user: str = ""  # SASL login; "" not authenticated
    queue_id: str = ""  # this message's id once MAIL is accepted (macro i)
    sender: str = ""  # envelope sender of the current message ("" null)


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    """A received message on disk for the message stage.

    ``path`` holds the whole message as stored: header and body, LF line
    ends (a milter adapter sends CRLF on the wire), no dot-stuffing, our
    Received: field on top.  ``headers`` are its fields in order as (name,
    value), the value as after the colon with one leading space removed and
    folding kept as "\\n\\t"/"\\n " (values returned in modifications
    may use CRLF or LF).  The file belongs to the server: read it,
    never change it (ask for ``ReplaceBody``/header changes instead).
    """

    path: Path
    headers: tuple[tuple[str, str], ...]
    body_offset: int  # where the body starts in ``path`` (after the blank line)
    size: int  # octets of the whole file
    sender: str
    recipients: tuple[str, ...]

    def header(self, name: str) -> str | None:
        """The first field named ``name`` (case-insensitive), else None."""
        key = name.lower()
        return next((v for n, v in self.headers if n.lower() == key), None)

    async def body_chunks(self, size: int = BODY_CHUNK) -> AsyncIterator[bytes]:
        """The body in chunks of at most ``size`` octets, read in an executor."""
        loop = asyncio.get_running_loop()
        f = await loop.run_in_executor(None, open, self.path, "rb")
        try:
            await loop.run_in_executor(None, f.seek, self.body_offset)
            while chunk := await loop.run_in_executor(None, f.read, size):
                yield chunk
        finally:
            await loop.run_in_executor(None, f.close)


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What became of a message that was answered 250."""

    sender: str
    local: tuple[str, ...]  # mailboxes written
    remote: tuple[str, ...]  # recipients queued for relay
    folder: str  # "INBOX", "Junk", or a DeliverToFolder folder
    size: int
    queue_id: str
    discarded: bool = False


@runtime_checkable
class FilterSession(Protocol):
    """One filter's view of one SMTP connection (see the module contract)."""

    async def connect(self, facts: SessionFacts) -> FilterResult: ...

    async def helo(self, facts: SessionFacts, name: str) -> FilterResult: ...

    async def mail(self, facts: SessionFacts, sender: str, args: str) -> FilterResult: ...

    async def rcpt(self, facts: SessionFacts, recipient: str, args: str) -> FilterResult: ...

    async def message(self, facts: SessionFacts, message: SpooledMessage) -> FilterResult: ...

    async def delivered(self, facts: SessionFacts, report: DeliveryReport) -> None: ...

    async def abort(self) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class Filter(Protocol):
    """A configured filter: opens a session per SMTP connection.

    ``name`` is what logs call it ("milter inet:127.0.0.1:11332",
    "hook examples.greylist:Greylist"); ``default_action`` ("tempfail",
    "accept" or "reject") is what its failures turn into.
    """

    @property
    def name(self) -> str: ...

    @property
    def default_action(self) -> str: ...

    async def open(self, facts: SessionFacts) -> FilterSession:
        """A session for a new connection (called before ``connect``); may
        raise (e.g. the milter is down): the chain then applies
        ``default_action`` for this connection's stages."""
        ...

    async def aclose(self) -> None:
        """Release what the filter holds at server shutdown."""
        ...
