"""The mail log: one record per event in a message's life (chasquid's maillog).

Each function here is one mail event; every record carries the message's
queue id (the id of the 250 reply, the Received: header and the outbound
queue), so ``grep ID`` or ``postoffice trace ID`` finds the whole life of a
message: received (with the checks' verdicts), queued, each delivery
attempt with the remote reply, delivered / deferred / failed, the bounce,
the local mailbox file, and POP3/IMAP retrieval and deletion of that file.

A record goes to the logger ``postoffice.mail`` twice over: as its message,
``<event> id=<queue id> key=value ...`` (values through logfmt, so a client's
words cannot add fields), and as ``record.mail``, the same fields as a dict
that the json format (logsetup.py) writes as JSON members without parsing
text.  Retrieval knows a Maildir file, not the queue id: its records carry
``file=`` (the file's stable stem), which the ``stored`` record of the
delivery names next to the id; ``postoffice trace`` (trace.py) joins them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from postoffice import logfmt

log = logging.getLogger("postoffice.mail")
LOGGER = log.name

# The events, in the order of a message's life.
RECEIVED = "received"  # the 250 after DATA: from whom, client, TLS, auth, size
REJECTED = "rejected"  # refused after DATA (content, checks, storage)
CHECKS = "checks"  # SPF/DKIM/DMARC verdicts (policy/mailauth.py)
QUEUED = "queued"  # in the outbound queue
DELIVERED = "delivered"  # an attempt the next hop (or a mailbox) accepted
DEFERRED = "deferred"  # an attempt that failed for now: retried
FAILED = "failed"  # an attempt that failed for good
EXPIRED = "expired"  # retried too long: failed
BOUNCED = "bounced"  # a DSN (failure or delay notice) queued for the sender
REMOVED = "removed"  # `postoffice queue remove`
STORED = "stored"  # written to a local mailbox (Maildir file)
RETRIEVED = "retrieved"  # read by POP3 RETR or IMAP FETCH of the body
DELETED = "deleted"  # removed by POP3 DELE + QUIT or IMAP EXPUNGE
QUARANTINED = "quarantined"  # local copies filed in Junk (DMARC p=quarantine)
EVENTS = (
    RECEIVED,
    REJECTED,
    CHECKS,
    QUEUED,
    DELIVERED,
    DEFERRED,
    FAILED,
    EXPIRED,
    BOUNCED,
    REMOVED,
    STORED,
    RETRIEVED,
    DELETED,
)
# Fields that hold envelope addresses: written <a@b> in text, bare in JSON.
ADDRESS_FIELDS = frozenset({"from", "to", "sender", "mailbox"})


class _Path:
    """An envelope address: ``<a@b>`` in text (as Postfix logs it), ``a@b`` in JSON."""

    __slots__ = ("address",)

    def __init__(self, address: object | None) -> None:
        self.address = "" if address is None else str(address)


class _Paths:
    __slots__ = ("addresses",)

    def __init__(self, addresses: Iterable[object]) -> None:
        self.addresses = [str(a) for a in addresses]


def _text(value: object) -> str:
    if isinstance(value, _Path):
        return logfmt.path(value.address)
    if isinstance(value, _Paths):
        return logfmt.paths(value.addresses)
    if isinstance(value, float):
        return f"{value:.3f}"
    return logfmt.field(value)


def _json(value: object) -> Any:
    if isinstance(value, _Path):
        return value.address
    if isinstance(value, _Paths):
        return value.addresses
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, int | str | bool):
        return value
    return str(value)


# The members the json format gives every record (logsetup.py): no event field may be one.
RESERVED = frozenset({"time", "pid", "level", "logger", "msg"})


def _emit(event: str, queue_id: str | None, fields: dict[str, object]) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    assert RESERVED.isdisjoint(fields), fields
    given = {k: v for k, v in fields.items() if v is not None}
    head = [event] if queue_id is None else [event, f"id={logfmt.field(queue_id)}"]
    text = " ".join(head + [f"{k}={_text(v)}" for k, v in given.items()])
    mail: dict[str, Any] = {"event": event}
    if queue_id is not None:
        mail["id"] = queue_id
    mail.update((k, _json(v)) for k, v in given.items())
    log.info("%s", text, extra={"mail": mail})


# --- receiving ---------------------------------------------------------------------------
def received(
    queue_id: str,
    *,
    mode: str,
    client: str,
    helo: str,
    tls: str,
    user: object | None,
    sender: object | None,
    recipients: Sequence[object],
    size: int,
    code: int,
    status: str,
    seconds: float,
) -> None:
    """The reply to the end of DATA: ``received`` if positive, else ``rejected``."""
    _emit(
        RECEIVED if 200 <= code < 300 else REJECTED,
        queue_id,
        {
            "mode": mode,
            "client": client,
            "helo": helo or "-",
            "tls": tls,
            "user": user or "-",
            "from": _Path(sender),
            "to": _Paths(recipients),
            "size": size,
            "result": code,
            "status": status or None,
            "seconds": seconds,  # from MAIL FROM to the reply ("time" is the record's)
        },
    )


def checks(
    queue_id: str | None,
    *,
    client: str,
    helo: str,
    sender: object | None,
    spf: str,
    dkim: str,
    dmarc: str,
    result: str,
) -> None:
    """SPF/DKIM/DMARC verdicts (RFC 7208, 6376, 7489) and what they decided."""
    _emit(
        CHECKS,
        queue_id,
        {
            "client": client,
            "helo": helo or "-",
            "from": _Path(sender),
            "spf": spf,
            "dkim": dkim,
            "dmarc": dmarc,
            "result": result,
        },
    )


def quarantined(queue_id: str, *, reason: str, folder: str) -> None:
    """The local copies go to ``folder`` (Junk; INBOX when it cannot be made)."""
    _emit(QUARANTINED, queue_id, {"reason": reason, "folder": folder})


def stored(queue_id: str, *, mailbox: object, file: str) -> None:
    """A local mailbox got its copy: ``file``, the Maildir name's stable stem."""
    _emit(STORED, queue_id, {"mailbox": _Path(mailbox), "file": maildir_stem(file)})


def maildir_stem(name: str) -> str:
    """The part of a Maildir file name that no flag change or new/ -> cur/ move alters."""
    return name.rpartition("/")[2].partition(":2,")[0]


# --- the outbound queue --------------------------------------------------------------------
def queued(queue_id: str, *, sender: object | None, nrcpt: int, size: int) -> None:
    _emit(QUEUED, queue_id, {"from": _Path(sender), "nrcpt": nrcpt, "size": size})


def attempt(
    queue_id: str,
    *,
    recipient: object,
    relay: str,
    delay: float,
    tries: int,
    result: str,
    status: str,
    reply: str,
) -> None:
    """One delivery attempt for one recipient; ``result``: delivered, deferred
    or failed (the event), ``reply``: the remote server's words."""
    event = result if result in (DELIVERED, DEFERRED, FAILED) else DEFERRED
    _emit(
        event,
        queue_id,
        {
            "to": _Path(recipient),
            "relay": relay,
            "delay": f"{delay:.1f}s",
            "tries": tries,
            "result": result,
            "status": status,
            "reply": reply,
        },
    )


def expired(queue_id: str, *, recipient: object, status: str) -> None:
    _emit(EXPIRED, queue_id, {"to": _Path(recipient), "result": "expired", "status": status})


def bounced(queue_id: str, *, sender: object | None, kind: str, notice: str | None) -> None:
    """A DSN (``kind``: failed, delayed, or the success actions delivered,
    relayed, expanded of RFC 3464 §2.3.3) queued as ``notice``; None: none
    could be sent (a bounce is never bounced, RFC 3461 §6.2)."""
    _emit(BOUNCED, queue_id, {"sender": _Path(sender), "kind": kind, "notice": notice or "none"})


def removed(queue_id: str) -> None:
    _emit(REMOVED, queue_id, {"by": "queue remove"})


# --- reading -------------------------------------------------------------------------------
def retrieved(protocol: str, *, user: object, client: str, files: Iterable[str]) -> None:
    """Messages a POP3/IMAP client read whole, one record each."""
    for name in files:
        _emit(
            RETRIEVED,
            None,
            {"protocol": protocol, "user": user, "client": client, "file": maildir_stem(name)},
        )


def deleted(protocol: str, *, user: object, client: str, files: Iterable[str]) -> None:
    for name in files:
        _emit(
            DELETED,
            None,
            {"protocol": protocol, "user": user, "client": client, "file": maildir_stem(name)},
        )
