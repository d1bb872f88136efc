"""Prometheus metrics: every metric of the server, defined here and only here.

The code paths call the functions below with one line each (``metrics.
connection("smtp")``); until the composition root calls ``enable`` (serve,
and each extra smtp process) they do nothing, so unit tests and the CLI
count nothing and write no files.

Why module state, against the "no global state" habit: a metric is a fact
about the process (prometheus_client names each multiprocess file by PID),
like the logging tree, and the hooks sit in layers (dns/, policy/, net/,
delivery/) that share no object but the settings.  ``enable`` is called
once per process, before the loop runs.

Multiprocess mode: ``[limits] smtp_processes`` runs more processes that
take mail, so every process writes its values to mmap'd files in
``data_dir/metrics`` (``PROMETHEUS_MULTIPROC_DIR``, inherited by the extra
processes) and the scrape, served by the first process, sums them.  The
server empties the directory when it starts (a counter starts at 0 with
the server, which Prometheus reads as a reset) and marks a restarted smtp
process's files dead (``process_gone``).

Labels never carry client input: each label value is checked against a
fixed set here, and anything else becomes "other", so no client can grow
the number of series.  Leaf module: it imports nothing of ours.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram
    from prometheus_client.metrics_core import Metric

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
NAMESPACE = "postoffice"

LISTENERS = frozenset(
    {
        "smtp",
        "submission",
        "submissions",
        "pop3",
        "pop3s",
        "imap",
        "imaps",
        "http",
        "https",
        "metrics",
        "none",
    }
)
TLS_VERSIONS = frozenset({"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"})
DNS_TYPES = frozenset({"MX", "A", "AAAA", "TXT", "PTR", "SOA", "CNAME", "SRV", "TLSA"})
DNS_FAILURES = frozenset({"nxdomain", "servfail", "timeout", "error"})
AUTH_PROTOCOLS = frozenset({"smtp", "pop3", "imap", "managesieve", "web"})
AUTH_RESULTS = frozenset({"success", "failure", "throttled"})
DELIVERY_RESULTS = frozenset({"delivered", "deferred", "bounced"})
DESTINATIONS = frozenset({"local", "remote", "smarthost"})
POP3_COMMANDS = frozenset(
    {"CAPA", "STLS", "USER", "PASS", "AUTH", "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE"}
    | {"NOOP", "RSET", "QUIT"}
)
IMAP_COMMANDS = frozenset(
    {"CAPABILITY", "NOOP", "CHECK", "LOGOUT", "STARTTLS", "AUTHENTICATE", "LOGIN", "ENABLE"}
    | {"SELECT", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "NAMESPACE"}
    | {"STATUS", "APPEND", "IDLE", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE"}
    | {"COPY", "ID", "GETQUOTAROOT", "GETQUOTA", "COMPRESS"}
)
MANAGESIEVE_COMMANDS = frozenset(
    {"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "AUTHENTICATE", "UNAUTHENTICATE"}
    | {"LISTSCRIPTS", "GETSCRIPT", "PUTSCRIPT", "CHECKSCRIPT", "SETACTIVE", "DELETESCRIPT"}
    | {"RENAMESCRIPT", "HAVESPACE"}
)
# Event class names (protocol/imap_events.py) that are not the command's name.
_IMAP_EVENT_NAMES = {"LISTMAILBOXES": "LIST"}
# Events that are no command of their own (a SASL response line, a literal's
# continuation, IDLE's DONE): not counted.  A bad command counts as "other".
_NOT_COMMANDS = frozenset({"AUTHRESPONSE", "LITERALEXPECTED", "IDLEDONE"})
FETCH_PROTOCOLS = frozenset({"pop3", "imap"})
SESSION_PROTOCOLS = frozenset({"pop3", "imap", "managesieve"})
# SMTP reply codes a server sends to refuse (RFC 5321 §4.2.3; 454, 530, 534,
# 535, 538: RFC 4954 AUTH; 521, 556: RFC 7504 null MX) and 250 for "accepted".
SMTP_CODES = frozenset(
    {"250", "421", "450", "451", "452", "454", "455", "500", "501", "502", "503", "504"}
    | {"521", "530", "534", "535", "538", "550", "551", "552", "553", "554", "555", "556"}
)
# The enhanced status codes (RFC 3463 and the IANA registry of RFC 5248):
# class 2, 4 or 5, and for each subject the details registered so far
# (X.7.30 is REQUIRETLS, RFC 8689).  About 200 values at most.
_DETAILS_PER_SUBJECT = {0: 0, 1: 10, 2: 4, 3: 6, 4: 7, 5: 6, 6: 10, 7: 30}
SMTP_STATUSES = frozenset(
    f"{cls}.{subject}.{detail}"
    for cls in (2, 4, 5)
    for subject, last in _DETAILS_PER_SUBJECT.items()
    for detail in range(last + 1)
)
# The commands of a mail transaction that can be refused before its data
# (a refusal after the data is the message's own: smtp_messages).
SMTP_STAGES = frozenset({"helo", "ehlo", "mail", "rcpt", "data", "bdat"})

# Seconds.  The 250 after DATA waits for a durable commit (a journal
# fdatasync: about a millisecond; a large message's fsyncs: tens).
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
# One delivery attempt: a local Maildir write, or DNS + connect + SMTP dialogue.
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# POP3 RETR / IMAP FETCH: from the command to its answer being queued for the client.
FETCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)


def _one_of(value: str, allowed: frozenset[str]) -> str:
    return value if value in allowed else "other"


class _Metrics:
    """The metric objects of one process (made once ``enable`` has set the
    multiprocess directory: prometheus_client picks its value store on import)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            # registry=None: nothing registers in the library's global registry;
            # the scrape reads the files (MultiProcessCollector).
            return Counter(name, doc, labels, namespace=NAMESPACE, registry=None)

        def histogram(
            name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
        ) -> Histogram:
            return Histogram(name, doc, labels, namespace=NAMESPACE, registry=None, buckets=buckets)

        self.connections = counter(
            "connections", "Connections that became sessions, by listener.", ("listener",)
        )
        self.refused = counter(
            "connections_refused",
            "Connections refused over a connection cap, by listener.",
            ("listener",),
        )
        self.tls = counter(
            "tls_connections",
            "TLS handshakes completed (implicit TLS or STARTTLS), by listener and version.",
            ("listener", "version"),
        )
        self.messages = counter(
            "smtp_messages",
            "Messages answered after DATA: accepted (250) or refused, by reply code"
            " and enhanced status.",
            ("listener", "result", "code", "status"),
        )
        self.command_refusals = counter(
            "smtp_refused_commands",
            "HELO/EHLO, MAIL, RCPT, DATA or BDAT refused before the message data,"
            " by command, reply code and enhanced status.",
            ("listener", "command", "code", "status"),
        )
        self.received_bytes = counter(
            "smtp_received_bytes", "Octets of message data accepted, by listener.", ("listener",)
        )
        self.commit_seconds = histogram(
            "smtp_data_commit_seconds",
            "From the end of DATA to the 250 (the message made durable).",
            (),
            COMMIT_BUCKETS,
        )
        self.deliveries = counter(
            "delivery_attempts",
            "Outbound delivery attempts per recipient, by result and destination class.",
            ("result", "destination"),
        )
        self.delivery_seconds = histogram(
            "delivery_seconds",
            "One delivery attempt to one destination, by destination class.",
            ("destination",),
            DELIVERY_BUCKETS,
        )
        self.dns_lookups = counter("dns_lookups", "DNS queries, by record type.", ("type",))
        self.dns_failures = counter(
            "dns_failures",
            "DNS queries without an answer, by record type and reason.",
            ("type", "reason"),
        )
        self.auth = counter(
            "auth_attempts",
            "Logins by protocol and result (throttled: refused unchecked).",
            ("protocol", "result"),
        )
        self.sessions = counter(
            "sessions", "POP3, IMAP and ManageSieve sessions, by protocol.", ("protocol",)
        )
        self.pop3_commands = counter("pop3_commands", "POP3 commands.", ("command",))
        self.imap_commands = counter("imap_commands", "IMAP commands.", ("command",))
        self.managesieve_commands = counter(
            "managesieve_commands", "ManageSieve commands.", ("command",)
        )
        self.fetch_seconds = histogram(
            "fetch_seconds", "POP3 RETR and IMAP FETCH latency.", ("protocol",), FETCH_BUCKETS
        )


_m: _Metrics | None = None


def enable(directory: Path, *, clean: bool) -> None:
    """Count from now on, in ``directory`` (``clean``: empty it first; the
    server does, its extra smtp processes do not).  Before anything counts."""
    global _m
    if clean and directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(directory)  # inherited by the extra smtp processes
    if "prometheus_client.values" in sys.modules:
        # The value store was chosen on import, before the directory was set.
        from prometheus_client import values

        values.ValueClass = values.get_value_class()
    _m = _Metrics()


def enabled() -> bool:
    return _m is not None


def process_gone(pid: int) -> None:
    """An smtp process died: its live gauges no longer count (its counters do)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if _m is not None and directory:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)


# --- hooks: one line each in the code paths ----------------------------------------------
def connection(listener: str) -> None:
    if _m is not None:
        _m.connections.labels(_one_of(listener, LISTENERS)).inc()


def connection_refused(listener: str) -> None:
    if _m is not None:
        _m.refused.labels(_one_of(listener, LISTENERS)).inc()


def tls_established(listener: str, version: str | None) -> None:
    if _m is not None:
        _m.tls.labels(_one_of(listener, LISTENERS), _one_of(version or "", TLS_VERSIONS)).inc()


def smtp_message(
    listener: str, code: int, status: str | None, size: int, commit_seconds: float | None
) -> None:
    """The reply to a message's data: ``code`` (ours, 250 or a refusal) and
    its enhanced ``status``, the message's ``size`` in octets, and how long
    the commit took (None: none was tried)."""
    if _m is None:
        return
    where = _one_of(listener, LISTENERS)
    accepted = 200 <= code < 300
    result = "accepted" if accepted else "refused"
    _m.messages.labels(where, result, *_reason(code, status)).inc()
    if accepted:
        _m.received_bytes.labels(where).inc(size)
    if commit_seconds is not None:
        _m.commit_seconds.observe(commit_seconds)


def smtp_refused(listener: str, command: str, code: int, status: str | None) -> None:
    """A command of the mail transaction refused before the data (``command``
    lower case, as the session tallies it), with its reply code and status."""
    if _m is not None:
        where, stage = _one_of(listener, LISTENERS), _one_of(command, SMTP_STAGES)
        _m.command_refusals.labels(where, stage, *_reason(code, status)).inc()


def _reason(code: int, status: str | None) -> tuple[str, str]:
    """The reply code and enhanced status as labels ("none": the reply had no status)."""
    return _one_of(str(code), SMTP_CODES), _one_of(status, SMTP_STATUSES) if status else "none"


def delivery(results: Iterable[str], destination: str, seconds: float) -> None:
    """One attempt to one destination: each recipient's result
    (delivered / deferred / bounced) and the attempt's time."""
    if _m is None:
        return
    where = _one_of(destination, DESTINATIONS)
    for result in results:
        _m.deliveries.labels(_one_of(result, DELIVERY_RESULTS), where).inc()
    _m.delivery_seconds.labels(where).observe(seconds)


def dns_lookup(rdtype: str) -> None:
    if _m is not None:
        _m.dns_lookups.labels(_one_of(rdtype, DNS_TYPES)).inc()


def dns_failure(rdtype: str, reason: str) -> None:
    if _m is not None:
        _m.dns_failures.labels(_one_of(rdtype, DNS_TYPES), _one_of(reason, DNS_FAILURES)).inc()


def auth(protocol: str, result: str) -> None:
    if _m is not None:
        _m.auth.labels(_one_of(protocol, AUTH_PROTOCOLS), _one_of(result, AUTH_RESULTS)).inc()


def session(protocol: str) -> None:
    if _m is not None:
        _m.sessions.labels(_one_of(protocol, SESSION_PROTOCOLS)).inc()


def pop3_command(event_name: str) -> None:
    """A POP3 command, named by its event class (protocol/pop3.py: ``Retr`` is RETR)."""
    name = event_name.upper()
    if _m is not None and name not in _NOT_COMMANDS:
        _m.pop3_commands.labels(_one_of(name, POP3_COMMANDS)).inc()


def imap_command(event: object) -> None:
    """An IMAP command, named by its event (protocol/imap_events.py)."""
    name = type(event).__name__.upper()
    if _m is not None and name not in _NOT_COMMANDS:
        _m.imap_commands.labels(_one_of(_IMAP_EVENT_NAMES.get(name, name), IMAP_COMMANDS)).inc()


def managesieve_command(name: str) -> None:
    """A ManageSieve command by name (protocol/managesieve.py upper-cases it);
    a SASL response line is none, an unknown or bad one counts as "other"."""
    if _m is not None and name:
        _m.managesieve_commands.labels(_one_of(name, MANAGESIEVE_COMMANDS)).inc()


def fetched(protocol: str, seconds: float) -> None:
    if _m is not None:
        _m.fetch_seconds.labels(_one_of(protocol, FETCH_PROTOCOLS)).observe(seconds)


def clock() -> float:
    """The clock latencies are measured by."""
    return time.perf_counter()


# --- the scrape ----------------------------------------------------------------------------
QueueStats = Callable[[], "tuple[int, float | None]"]


def exposition(queue: tuple[int, float | None] | None, now: float) -> bytes:
    """The text exposition of every process's values, plus the queue gauges
    (``queue``: message count and the oldest one's creation time, read by the
    caller on the loop; None: this process has no queue).  Blocking: reads
    the files; run it in an executor."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        MultiProcessCollector(registry, path=directory)
    if queue is not None:
        registry.register(_QueueCollector(queue, now))
    return generate_latest(registry)


TRAFFIC = ("received", "delivered", "deferred", "bounced")


def traffic_totals() -> dict[str, float]:
    """Messages accepted after DATA, and outbound recipients delivered,
    deferred and bounced, since the server started, summed over its
    processes (the web dashboard's plots).  Blocking: reads the files."""
    totals = dict.fromkeys(TRAFFIC, 0.0)
    directory = os.environ.get(MULTIPROC_ENV)
    if _m is None or not directory:
        return totals
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=directory)
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == f"{NAMESPACE}_smtp_messages_total":
                if sample.labels.get("result") == "accepted":
                    totals["received"] += sample.value
            elif sample.name == f"{NAMESPACE}_delivery_attempts_total":
                result = sample.labels.get("result", "")
                if result in totals:
                    totals[result] += sample.value
    return totals


class _QueueCollector:
    """The outbound queue's size and oldest message's age, as read at scrape time."""

    def __init__(self, queue: tuple[int, float | None], now: float) -> None:
        self._queue = queue
        self._now = now

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        count, oldest = self._queue
        yield GaugeMetricFamily(
            f"{NAMESPACE}_queue_messages", "Messages in the outbound queue.", value=count
        )
        age = max(0.0, self._now - oldest) if oldest is not None else 0.0
        yield GaugeMetricFamily(
            f"{NAMESPACE}_queue_oldest_age_seconds",
            "Age of the oldest message in the outbound queue (0: empty).",
            value=age,
        )
