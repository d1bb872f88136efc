"""The Outbound service in-process: scheduling, limits, retries, local delivery, shutdown.

Real sockets (a scripted MTA as smarthost), a real queue directory, a real
account store and Maildirs; only the clock is the real one too, with short
retry delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from postoffice.config.settings import ListenAddress, RelaySettings, Settings
from postoffice.delivery.local import LocalCourier
from postoffice.delivery.outbound import Outbound
from postoffice.delivery.queue.records import RecipientState
from postoffice.delivery.queue.store import QueueStore
from postoffice.delivery.remote import RemoteCourier
from postoffice.dns.static import StaticResolver
from postoffice.mail.address import Address
from postoffice.storage.maildir import MaildirStore
from postoffice.storage.sqlite_accounts import SqliteAccountStore
from tests.support.helpers import until
from tests.support.peers import ScriptedMta
from tests.support.ports import free_port

ALICE = Address("alice", "example.test")


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        yield pool


@pytest.fixture
def mta() -> Iterator[ScriptedMta]:
    server = ScriptedMta("127.0.0.1", free_port()).start()
    yield server
    server.stop()


def make(
    tmp_path: Path,
    executor: ThreadPoolExecutor,
    mta: ScriptedMta,
    *,
    local: bool = False,
    **relay: object,
) -> tuple[Outbound, Settings]:
    settings = Settings(
        hostname="mail.example.test",
        data_dir=tmp_path / "data",
        domains=("example.test",),
        relay=RelaySettings(
            smarthost=ListenAddress(mta.host, mta.port),  # type: ignore[arg-type]
            **{"retry_schedule": (0.2,), **relay},
        ),
    )
    store = QueueStore(settings.queue_dir, executor)
    store.ensure_dirs()
    remote = RemoteCourier(settings.relay, settings.hostname, StaticResolver())
    courier = None
    if local:
        accounts = SqliteAccountStore(
            tmp_path / "accounts.sqlite3", config_domains=settings.domains
        )
        accounts.add_user(ALICE, "x")
        accounts.add_alias("team@example.test", [ALICE, Address("carol", "remote.test")])
        maildirs = MaildirStore(settings.mail_dir, executor, settings.hostname)
        courier = LocalCourier(accounts, maildirs, accounts.is_local_domain)
    return Outbound(settings, store, remote, courier, poll_interval=0.05), settings


async def enqueue(
    ob: Outbound,
    rcpts: list[Address],
    body: bytes = b"Subject: t\n\nhi\n",
    sender: Address | None = ALICE,
) -> str:
    writer = ob.writer(sender, rcpts)
    await writer.write(body)
    return await writer.commit()


def with_service(ob: Outbound, body: Callable[[], Awaitable[None]]) -> None:
    async def go() -> None:
        task = asyncio.create_task(ob.run())
        try:
            await body()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(go())


def queued(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.queue_dir.glob("*.msg"))


def test_concurrency_per_destination_is_capped(
    tmp_path: Path, executor: ThreadPoolExecutor, mta: ScriptedMta
) -> None:
    mta.data_delay = 0.2
    ob, settings = make(tmp_path, executor, mta, max_per_destination=2)

    async def body() -> None:
        for i in range(8):
            await enqueue(ob, [Address(f"u{i}", "remote.test")])
        assert await until(lambda: len(mta.received) == 8)
        assert await until(lambda: queued(settings) == [])

    with_service(ob, body)
    assert mta.max_active == 2  # used, and never exceeded
    assert mta.commands.count("EHLO mail.example.test") == 2  # connections were reused


def test_4xx_is_retried_and_then_delivered(
    tmp_path: Path, executor: ThreadPoolExecutor, mta: ScriptedMta
) -> None:
    answers = iter(["451 4.7.1 greylisted, come back later"])
    mta.rcpt_reply = lambda _a: next(answers, "250 2.1.5 Ok")
    ob, settings = make(tmp_path, executor, mta)
    seen: list[str] = []

    async def body() -> None:
        qid = await enqueue(ob, [Address("bob", "remote.test")])
        assert await until(lambda: ob.store.state_path(qid).exists())
        entry = ob.store.load_blocking(qid)
        assert entry is not None and entry.recipients[0].state is RecipientState.DEFERRED
        seen.append(entry.recipients[0].last_error)
        assert await until(lambda: len(mta.received) == 1)
        assert await until(lambda: queued(settings) == [])

    with_service(ob, body)
    assert seen == ["451 4.7.1 greylisted, come back later"]


def test_local_recipients_and_alias_forwards(
    tmp_path: Path, executor: ThreadPoolExecutor, mta: ScriptedMta
) -> None:
    ob, settings = make(tmp_path, executor, mta, local=True)
    inbox = settings.mail_dir / "example.test" / "alice" / "new"

    async def body() -> None:
        await enqueue(
            ob,
            [Address("team", "example.test"), Address("nobody", "example.test")],
            sender=Address("x", "remote.test"),
        )
        assert await until(lambda: inbox.is_dir() and len(list(inbox.iterdir())) >= 1)
        assert await until(lambda: len(mta.received) == 2)  # the forward, and a DSN for nobody@
        assert await until(lambda: queued(settings) == [])

    with_service(ob, body)
    (stored,) = inbox.iterdir()  # exactly one copy
    assert stored.read_bytes().startswith(b"Return-Path: <x@remote.test>\nSubject: t\n")
    forward = next(m for m in mta.received if m.sender == "<x@remote.test>")
    assert forward.recipients == ["<carol@remote.test>"]
    dsn = next(m for m in mta.received if m.sender == "<>")
    assert dsn.recipients == ["<x@remote.test>"]
    assert b"Final-Recipient: rfc822; nobody@example.test" in dsn.data
    assert b"Status: 5.1.1" in dsn.data


def test_shutdown_mid_delivery_keeps_the_message(
    tmp_path: Path, executor: ThreadPoolExecutor, mta: ScriptedMta
) -> None:
    mta.data_delay = 30  # the final reply never comes before we stop
    ob, settings = make(tmp_path, executor, mta)

    async def body() -> None:
        await enqueue(ob, [Address("bob", "remote.test")])
        assert await until(lambda: any(c == "DATA" for c in mta.commands))

    with_service(ob, body)
    assert len(queued(settings)) == 1
    mta.data_delay = 0
    again, _ = make(tmp_path, executor, mta)

    async def body2() -> None:
        assert await until(lambda: len(mta.received) == 1 and queued(settings) == [])

    with_service(again, body2)


def test_flush_request_makes_deferred_mail_due(
    tmp_path: Path, executor: ThreadPoolExecutor, mta: ScriptedMta
) -> None:
    refuse = [True]
    mta.rcpt_reply = lambda _a: "450 4.2.0 busy" if refuse[0] else "250 2.1.5 Ok"
    ob, _settings = make(tmp_path, executor, mta, retry_schedule=(3600.0,))

    async def body() -> None:
        qid = await enqueue(ob, [Address("bob", "remote.test")])
        assert await until(lambda: ob.store.state_path(qid).exists())
        refuse[0] = False
        await asyncio.sleep(0.3)
        assert mta.received == []  # not due for an hour
        ob.store.requests.request_flush_blocking()
        assert await until(lambda: len(mta.received) == 1)

    with_service(ob, body)


def test_a_message_that_cannot_be_claimed_now_is_tried_again(
    tmp_path: Path,
    executor: ThreadPoolExecutor,
    mta: ScriptedMta,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Locking a message may fail for a while (no descriptors left): it is
    retried on the schedule, not dropped until the next restart."""
    ob, settings = make(tmp_path, executor, mta)
    real_lock = QueueStore.try_lock_blocking
    failures = [OSError(errno.EMFILE, os.strerror(errno.EMFILE))]

    def lock(store: QueueStore, queue_id: str) -> int | None:
        if failures:
            raise failures.pop()
        return real_lock(store, queue_id)

    monkeypatch.setattr(QueueStore, "try_lock_blocking", lock)

    async def body() -> None:
        await enqueue(ob, [Address("bob", "remote.test")])
        assert await until(lambda: len(mta.received) == 1)
        assert await until(lambda: queued(settings) == [])

    with_service(ob, body)
    assert failures == []
