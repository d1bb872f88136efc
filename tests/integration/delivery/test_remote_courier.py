"""Routing and delivery by the remote courier: real DNS (dnsmasq), real MTAs.

RFC 5321 §5.1 (MX order, fallback, implicit MX), RFC 7505 (null MX),
opportunistic STARTTLS, and the capability checks (8BITMIME, SMTPUTF8, SIZE).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from postoffice.config.settings import ListenAddress, RelaySettings
from postoffice.delivery.courier import Outcome, RecipientResult
from postoffice.delivery.queue.message import QueuedMessage
from postoffice.delivery.queue.records import QueueEntry
from postoffice.delivery.queue.store import QueueStore
from postoffice.delivery.remote import RemoteCourier
from postoffice.delivery.smtp_connection import ClientTimeouts
from postoffice.dns.resolver import DnsResolver
from postoffice.mail.address import Address
from postoffice.net.tls import ensure_self_signed, server_context
from postoffice.policy.tls_rpt_store import (
    TlsPolicy,
    TlsReportRecorder,
    connect,
    seal_blocking,
    sealed_blocking,
    store_path,
)
from tests.support.peers import Dnsmasq, ScriptedMta, SmtpSink
from tests.support.ports import free_port

ALICE = Address("alice", "example.test")
MX_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
FAST = ClientTimeouts(
    connect=3, greeting=10, command=10, data_init=10, data_block=10, data_end=10, tls=10
)


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    server = Dnsmasq(
        tmp_path_factory.mktemp("dns"),
        mx=[
            ("pref.test", "mx1.pref.test", 10),
            ("pref.test", "mx2.pref.test", 20),
            ("one.test", "mx.one.test", 10),
            ("dangling.test", "nohost.dangling.test", 10),
        ],
        hosts={
            "mx1.pref.test": ["127.0.0.2"],
            "mx2.pref.test": ["127.0.0.3"],
            "mx.one.test": ["127.0.0.2"],
            "implicit.test": ["127.0.0.4"],
            "dangling.test": ["127.0.0.4"],
        },
        null_mx=["nullmx.test"],
    ).start()
    yield server
    server.stop()


@pytest.fixture
def port() -> int:
    return free_port(MX_IPS)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


def courier(dnsmasq: Dnsmasq, port: int, **relay: object) -> RemoteCourier:
    settings = RelaySettings(
        mx_port=port, dns_servers=(ListenAddress("127.0.0.1", dnsmasq.port),), **relay
    )  # type: ignore[arg-type]
    return RemoteCourier(
        settings,
        "mail.example.test",
        DnsResolver(settings.dns_servers, 5.0),
        timeouts=FAST,
        rng=random.Random(7),
    )


def queued(store: QueueStore, entry: QueueEntry, executor: ThreadPoolExecutor) -> QueuedMessage:
    """The committed ``entry`` as a courier reads it (without the queue's claim)."""
    assert entry.traits is not None
    path = store.msg_path(entry.queue_id)
    return QueuedMessage(path, entry.body_offset, entry.traits, executor)


async def deliver_one(
    c: RemoteCourier, store: QueueStore, executor: ThreadPoolExecutor, rcpt: Address
) -> RecipientResult:
    """Queue one message to ``rcpt`` (in one.test) and deliver it with ``c``
    (whose parked connections stay for the next call in the same loop)."""
    committed: list[QueueEntry] = []
    writer = store.writer(ALICE, [rcpt], on_commit=committed.append)
    await writer.write(b"Subject: t\n\nbody\n")
    await writer.commit()
    entry = committed[0]
    assert entry.traits is not None
    (result,) = await c.deliver("one.test", ALICE, [rcpt], queued(store, entry, executor))
    return result


def deliver(
    tmp_path: Path,
    executor: ThreadPoolExecutor,
    c: RemoteCourier,
    domain: str,
    recipients: Sequence[Address],
    content: bytes = b"Subject: t\n\nbody\n",
    sender: Address | None = ALICE,
) -> list[RecipientResult]:
    store = QueueStore(tmp_path / "queue", executor)
    committed: list[QueueEntry] = []

    async def go() -> list[RecipientResult]:
        writer = store.writer(sender, list(recipients), on_commit=committed.append)
        await writer.write(content)
        await writer.commit()
        entry = committed[0]
        assert entry.traits is not None
        try:
            return await c.deliver(domain, sender, recipients, queued(store, entry, executor))
        finally:
            await c.close()  # parked connections belong to this event loop

    return asyncio.run(go())


def test_best_mx_gets_the_mail_in_one_transaction(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    mx1 = SmtpSink(tmp_path, "127.0.0.2", port).start()
    mx2 = SmtpSink(tmp_path, "127.0.0.3", port).start()
    try:
        rcpts = [Address("bob", "pref.test"), Address("carol", "pref.test")]
        results = deliver(tmp_path, executor, courier(dnsmasq, port), "pref.test", rcpts)
        assert [r.outcome for r in results] == [Outcome.DELIVERED] * 2
        assert results[0].remote == f"mx1.pref.test[127.0.0.2]:{port}"
        (dump,) = mx1.messages()
        assert dump.count(b"X-Rcpt-Args:") == 2  # one transaction for both
        assert b"X-Helo-Args: mail.example.test" in dump
        assert mx2.messages() == []
    finally:
        mx1.stop()
        mx2.stop()


def test_next_mx_when_the_first_refuses_connections(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    mx2 = SmtpSink(tmp_path, "127.0.0.3", port).start()
    try:
        results = deliver(
            tmp_path, executor, courier(dnsmasq, port), "pref.test", [Address("bob", "pref.test")]
        )
        assert results[0].outcome is Outcome.DELIVERED
        assert results[0].remote.startswith("mx2.pref.test[127.0.0.3]")
        assert len(mx2.messages()) == 1
    finally:
        mx2.stop()


def test_next_mx_when_the_first_greets_with_421(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    busy = ScriptedMta("127.0.0.2", port, greeting="421 4.3.2 busy").start()
    mx2 = SmtpSink(tmp_path, "127.0.0.3", port).start()
    try:
        results = deliver(
            tmp_path, executor, courier(dnsmasq, port), "pref.test", [Address("bob", "pref.test")]
        )
        assert results[0].outcome is Outcome.DELIVERED and len(mx2.messages()) == 1
    finally:
        busy.stop()
        mx2.stop()


def test_implicit_mx_from_address_records(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    sink = SmtpSink(tmp_path, "127.0.0.4", port).start()
    try:
        results = deliver(
            tmp_path,
            executor,
            courier(dnsmasq, port),
            "implicit.test",
            [Address("bob", "implicit.test")],
        )
        assert results[0].outcome is Outcome.DELIVERED
        assert results[0].remote == f"implicit.test[127.0.0.4]:{port}"
    finally:
        sink.stop()


def test_null_mx_fails_at_once(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    (r,) = deliver(
        tmp_path, executor, courier(dnsmasq, port), "nullmx.test", [Address("bob", "nullmx.test")]
    )
    assert r.outcome is Outcome.FAILED and r.status == "5.1.10" and "null MX" in r.text


def test_nonexistent_domain_fails(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    (r,) = deliver(
        tmp_path, executor, courier(dnsmasq, port), "nowhere.test", [Address("bob", "nowhere.test")]
    )
    assert r.outcome is Outcome.FAILED and r.status == "5.1.2"


def test_unreachable_mx_hosts_defer(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    (r,) = deliver(
        tmp_path, executor, courier(dnsmasq, port), "pref.test", [Address("bob", "pref.test")]
    )
    assert r.outcome is Outcome.DEFERRED and r.status.startswith("4.")
    assert "127.0.0.3" in r.text  # the last host tried


def test_mx_host_without_address_defers(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    # The MX names a host that does not resolve: no fallback to the domain's own A.
    sink = SmtpSink(tmp_path, "127.0.0.4", port).start()
    try:
        (r,) = deliver(
            tmp_path,
            executor,
            courier(dnsmasq, port),
            "dangling.test",
            [Address("bob", "dangling.test")],
        )
        assert r.outcome is Outcome.DEFERRED and sink.messages() == []
    finally:
        sink.stop()


@pytest.mark.parametrize(
    ("option", "outcome", "status"), [("-f", Outcome.FAILED, "5"), ("-r", Outcome.DEFERRED, "4")]
)
def test_rcpt_refusals_keep_the_peers_words(
    tmp_path: Path,
    executor: ThreadPoolExecutor,
    dnsmasq: Dnsmasq,
    port: int,
    option: str,
    outcome: Outcome,
    status: str,
) -> None:
    sink = SmtpSink(tmp_path, "127.0.0.2", port, option, "RCPT").start()
    try:
        (r,) = deliver(
            tmp_path, executor, courier(dnsmasq, port), "one.test", [Address("bob", "one.test")]
        )
        assert r.outcome is outcome and r.status.startswith(status) and r.smtp_reply
        assert r.text.startswith(status)  # the reply itself, e.g. "500 5.3.0 Error: ..."
        assert sink.messages() == []
    finally:
        sink.stop()


def test_8bit_body_is_converted_for_a_peer_without_8bitmime(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    content = "Subject: t\n\nGr\u00fc\u00dfe\n".encode()
    sink = SmtpSink(tmp_path, "127.0.0.2", port, "-8", name="7bit").start()
    try:
        (r,) = deliver(
            tmp_path,
            executor,
            courier(dnsmasq, port),
            "one.test",
            [Address("bob", "one.test")],
            content,
        )
        # RFC 6152 §3: converted to 7 bits (quoted-printable for text), not returned.
        assert r.outcome is Outcome.DELIVERED, r.text
        (dump,) = sink.messages()
        assert b"BODY=8BITMIME" not in dump
        assert b"Content-Transfer-Encoding: quoted-printable\nMIME-Version: 1.0\n" in dump
        assert b"\n\nGr=C3=BC=C3=9Fe\n" in dump
    finally:
        sink.stop()
    sink = SmtpSink(tmp_path, "127.0.0.2", port, name="8bit").start()
    try:
        (r,) = deliver(
            tmp_path,
            executor,
            courier(dnsmasq, port),
            "one.test",
            [Address("bob", "one.test")],
            content,
        )
        assert r.outcome is Outcome.DELIVERED
        assert b"BODY=8BITMIME" in sink.messages()[0]
    finally:
        sink.stop()


def test_smtputf8_and_size_limits_are_checked_before_sending(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    mta = ScriptedMta("127.0.0.2", port, extensions=("PIPELINING", "8BITMIME", "SIZE 100")).start()
    try:
        (r,) = deliver(
            tmp_path,
            executor,
            courier(dnsmasq, port),
            "one.test",
            [Address("j\u00f6rg", "one.test")],
        )
        assert r.outcome is Outcome.FAILED and r.status == "5.6.7"
        (r,) = deliver(
            tmp_path,
            executor,
            courier(dnsmasq, port),
            "one.test",
            [Address("bob", "one.test")],
            b"Subject: big\n\n" + b"x" * 200 + b"\n",
        )
        assert r.outcome is Outcome.FAILED and r.status == "5.3.4"
        assert mta.received == []
    finally:
        mta.stop()


def test_opportunistic_starttls(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    cert, key = ensure_self_signed(tmp_path / "tls", "mx.one.test")
    mta = ScriptedMta("127.0.0.2", port, tls=server_context(cert, key)).start()
    try:
        (r,) = deliver(
            tmp_path, executor, courier(dnsmasq, port), "one.test", [Address("bob", "one.test")]
        )
        assert r.outcome is Outcome.DELIVERED and "TLS" in r.text
        assert mta.received[0].tls
    finally:
        mta.stop()


def test_broken_tls_falls_back_to_plaintext(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    cert, key = ensure_self_signed(tmp_path / "tls", "mx.one.test")
    mta = ScriptedMta("127.0.0.2", port, tls=server_context(cert, key), break_tls=True).start()
    try:
        (r,) = deliver(
            tmp_path, executor, courier(dnsmasq, port), "one.test", [Address("bob", "one.test")]
        )
        assert r.outcome is Outcome.DELIVERED
        assert [m.tls for m in mta.received] == [False]
        assert mta.commands.count("STARTTLS") == 1
    finally:
        mta.stop()


def test_each_new_connection_is_recorded_for_tls_reports(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    """RFC 8460: a failed handshake is one failed session (the plaintext
    retry is not another); a peer without STARTTLS is another kind."""
    cert, key = ensure_self_signed(tmp_path / "tls", "mx.one.test")
    mta = ScriptedMta("127.0.0.2", port, tls=server_context(cert, key), break_tls=True).start()
    sink = SmtpSink(tmp_path, "127.0.0.4", port).start()  # implicit.test: no STARTTLS
    (tmp_path / "data").mkdir()
    recorder = TlsReportRecorder(tmp_path / "data")
    relay = RelaySettings(mx_port=port, dns_servers=(ListenAddress("127.0.0.1", dnsmasq.port),))
    c = RemoteCourier(
        relay,
        "mail.example.test",
        DnsResolver(relay.dns_servers, 5.0),
        timeouts=FAST,
        tls_reports=recorder,
    )
    try:
        for domain in ("one.test", "implicit.test"):
            (r,) = deliver(tmp_path, executor, c, domain, [Address("bob", domain)])
            assert r.outcome is Outcome.DELIVERED, r
    finally:
        mta.stop()
        sink.stop()
    recorder.close()  # writes what is queued
    db = connect(store_path(tmp_path / "data"))
    seal_blocking(db, time.time(), today_too=True)
    found = {r.domain: r.policies for r in sealed_blocking(db)}
    ((one,),) = [found["one.test"]]
    assert one.policy == TlsPolicy.none_found("one.test")
    assert (one.successes, one.failures) == (0, 1)
    ((failure, count),) = one.details
    assert (failure.result_type, failure.mx_host, failure.receiving_ip, count) == (
        "validation-failure",
        "mx.one.test",
        "127.0.0.2",
        1,
    )
    # The garbage arrives with the 220 (plaintext buffered after it: refused,
    # RFC 3207 §5) or after it (OpenSSL names it, e.g. "wrong version number"):
    # timing decides which; either way it is this one failed session.
    assert failure.sending_ip == "127.0.0.1"
    assert "not a TLS record" in failure.reason or failure.reason.startswith(
        "TLS handshake failed: [SSL: "
    ), failure.reason
    ((plain,),) = [found["implicit.test"]]
    assert (plain.successes, plain.failures) == (0, 1)
    assert plain.details[0][0].result_type == "starttls-not-supported"


def test_smarthost_takes_everything(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    relay_port = free_port(("127.0.0.5",))
    sink = SmtpSink(tmp_path, "127.0.0.5", relay_port).start()
    try:
        c = courier(dnsmasq, port, smarthost=ListenAddress("127.0.0.5", relay_port))
        assert c.destination("nullmx.test") == f"127.0.0.5:{relay_port}"
        (r,) = deliver(tmp_path, executor, c, "nullmx.test", [Address("bob", "nullmx.test")])
        assert r.outcome is Outcome.DELIVERED and len(sink.messages()) == 1
    finally:
        sink.stop()


def test_address_literal_goes_to_that_address(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    sink = SmtpSink(tmp_path, "127.0.0.3", port).start()
    try:
        (r,) = deliver(
            tmp_path,
            executor,
            courier(dnsmasq, port),
            "[127.0.0.3]",
            [Address("bob", "[127.0.0.3]")],
        )
        assert r.outcome is Outcome.DELIVERED and len(sink.messages()) == 1
    finally:
        sink.stop()


def test_bounce_goes_out_with_null_sender(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    sink = SmtpSink(tmp_path, "127.0.0.2", port).start()
    try:
        (r,) = deliver(
            tmp_path,
            executor,
            courier(dnsmasq, port),
            "one.test",
            [Address("bob", "one.test")],
            sender=None,
        )
        assert r.outcome is Outcome.DELIVERED
        assert b"X-Mail-Args: <>" in sink.messages()[0]
    finally:
        sink.stop()


def test_connections_are_reused_for_the_same_destination(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    mta = ScriptedMta("127.0.0.2", port).start()
    store = QueueStore(tmp_path / "queue", executor)
    c = courier(dnsmasq, port)

    async def one(rcpt: Address) -> RecipientResult:
        return await deliver_one(c, store, executor, rcpt)

    async def go() -> list[RecipientResult]:
        try:
            first = [await one(Address(f"u{i}", "one.test")) for i in range(3)]
            # The peer drops the idle connection: the next message notices
            # and opens a new one without counting a failure.
            mta.stop()
            mta.start()
            return [*first, await one(Address("late", "one.test"))]
        finally:
            await c.close()

    try:
        results = asyncio.run(go())
        assert [r.outcome for r in results] == [Outcome.DELIVERED] * 4
        assert len(mta.received) == 4
        assert mta.commands.count("EHLO mail.example.test") == 2  # two connections, four messages
        assert mta.commands[-1] == "QUIT"  # closed politely at the end
    finally:
        mta.stop()


def test_long_recipient_lists_are_split_into_transactions_of_100(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    mta = ScriptedMta("127.0.0.2", port).start()
    try:
        rcpts = [Address(f"u{i}", "one.test") for i in range(230)]
        results = deliver(tmp_path, executor, courier(dnsmasq, port), "one.test", rcpts)
        assert [r.address for r in results] == rcpts
        assert all(r.outcome is Outcome.DELIVERED for r in results)
        assert [len(m.recipients) for m in mta.received] == [100, 100, 30]
        assert mta.commands.count("EHLO mail.example.test") == 1  # one connection
    finally:
        mta.stop()


def test_a_parked_connection_is_not_reused_below_the_tls_policy(
    tmp_path: Path, executor: ThreadPoolExecutor, dnsmasq: Dnsmasq, port: int
) -> None:
    """A connection parked after unverified TLS does not carry the next
    message once the policy asks for verified TLS ([relay] tls = "verify",
    here through a reload); a verified one does."""
    cert, key = ensure_self_signed(tmp_path / "tls", "mx.one.test")
    mta = ScriptedMta("127.0.0.2", port, tls=server_context(cert, key)).start()
    store = QueueStore(tmp_path / "queue", executor)

    async def go(c: RemoteCourier, relay: RelaySettings | None) -> list[RecipientResult]:
        try:
            first = await deliver_one(c, store, executor, Address("first", "one.test"))
            if relay is not None:
                c.reconfigure(relay)
            return [first, await deliver_one(c, store, executor, Address("second", "one.test"))]
        finally:
            await c.close()

    try:
        # Unverified TLS parked, then "verify" with nothing trusting the peer: deferred.
        c = courier(dnsmasq, port)
        dns = (ListenAddress("127.0.0.1", dnsmasq.port),)
        stricter = RelaySettings(mx_port=port, dns_servers=dns, tls="verify")
        first, second = asyncio.run(go(c, stricter))
        assert first.outcome is Outcome.DELIVERED and "verified" not in first.text
        assert second.outcome is Outcome.DEFERRED and second.status == "4.7.5", second
        assert len(mta.received) == 1
        assert mta.commands.count("STARTTLS") == 2  # a new connection was tried
        # Verified TLS parked: it meets "verify" and carries the next message.
        c = courier(dnsmasq, port, tls="verify", ca_file=str(cert))
        first, second = asyncio.run(go(c, None))
        assert [first.outcome, second.outcome] == [Outcome.DELIVERED] * 2, second
        assert "verified" in second.text
        assert len(mta.received) == 3
        assert mta.commands.count("STARTTLS") == 3  # one connection, two messages
    finally:
        mta.stop()
