"""Python's IMAPClient (PyPI ``IMAPClient``) against the real server.

IMAPClient is the IMAP library most Python mail programs are built on; it
parses what the server says (ENVELOPE, FLAGS, MODSEQ, IDLE responses) with
its own lexer, not imaplib's, so a reply it cannot read shows here.  Each
test connects over IMAPS and verifies the server's own certificate
(data_dir/tls/cert.pem), as a user would configure it, and does one of what
issue #13 asks of every client: full sync, a second sync that moves nothing,
flags, delete, move, IDLE, and reconnect after kill -9.  Mail arrives over
SMTP, as it does in life.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError

from tests.support.helpers import wait_for
from tests.support.imap import ALICE, ALICE_PW, MESSAGE, context, deliver_smtp
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.interop

SUBJECTS = ("one", "two", "three")


def sent(subject: str) -> bytes:
    """The message ``deliver_smtp`` sends with ``subject``."""
    return MESSAGE.replace(b"hello", subject.encode())


def connect(srv: PostofficeServer) -> IMAPClient:
    client = IMAPClient("127.0.0.1", port=srv.ports["imaps"], ssl_context=context(srv), timeout=15)
    client.login(ALICE, ALICE_PW)
    return client


@contextmanager
def session(srv: PostofficeServer) -> Iterator[IMAPClient]:
    client = connect(srv)
    try:
        yield client
    finally:
        try:
            client.logout()
        except (IMAPClientAbortError, OSError):
            client.shutdown()


def deliver(srv: PostofficeServer, *subjects: str) -> None:
    """Send ``subjects`` over SMTP and wait until they are in alice's Maildir."""
    before = len(srv.messages(ALICE))
    for subject in subjects:
        deliver_smtp(srv, subject)
    assert wait_for(lambda: len(srv.messages(ALICE)) == before + len(subjects), 10)


def uids_by_subject(client: IMAPClient) -> dict[str, int]:
    """Subject -> UID of the selected folder, from ENVELOPE."""
    fetched = client.fetch(client.search(), ["ENVELOPE"])
    return {data[b"ENVELOPE"].subject.decode(): uid for uid, data in fetched.items()}


def uid_set(text: bytes) -> list[int]:
    """The UIDs of a uid-set (RFC 4315 §3: ``1:3,7``), in its order."""
    uids: list[int] = []
    for part in text.split(b","):
        low, _, high = part.partition(b":")
        uids += range(int(low), int(high or low) + 1)
    return uids


def kept(flags: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The stored flags: without \\Recent, which IMAPClient (a rev1 client)
    is shown for messages its session was the first to see (RFC 3501 §2.3.2)."""
    return tuple(f for f in flags if f != b"\\Recent")


def stored_flags(by_uid: dict[int, tuple[bytes, ...]]) -> dict[int, tuple[bytes, ...]]:
    return {uid: kept(flags) for uid, flags in by_uid.items()}


def test_full_sync_then_a_second_sync_moves_nothing(server: PostofficeServer) -> None:
    deliver(server, *SUBJECTS)
    with session(server) as client:
        # Full sync, read-only (EXAMINE) so fetching BODY[] sets no \Seen.
        selected = client.select_folder("INBOX", readonly=True)
        assert selected[b"EXISTS"] == 3
        validity = selected[b"UIDVALIDITY"]
        # IMAPClient 4 keeps only the UIDs asked for (its fetch() drops
        # unsolicited FETCH responses), so a sync asks SEARCH ALL first.
        fetched = client.fetch(client.search(), ["UID", "FLAGS", "ENVELOPE", "BODY[]"])
        assert len(fetched) == 3
        seen_subjects = set()
        # Keyed by UID (from the UID items); SEQ 1..3 in UID order.
        assert [fetched[uid][b"SEQ"] for uid in sorted(fetched)] == [1, 2, 3]
        for data in fetched.values():
            assert kept(data[b"FLAGS"]) == ()
            envelope = data[b"ENVELOPE"]
            subject = envelope.subject.decode()
            seen_subjects.add(subject)
            assert [(a.mailbox, a.host) for a in envelope.from_] == [(b"bob", b"example.test")]
            assert [(a.mailbox, a.host) for a in envelope.to] == [(b"alice", b"example.test")]
            # RFC 5321 §4.4: delivery prepends trace fields (Return-Path,
            # Delivered-To, Received); what was sent follows, octet for octet.
            body = data[b"BODY[]"]
            assert body.startswith(b"Return-Path: <bob@example.test>\r\n"), body
            assert b"\r\nReceived: " in body.split(b"\r\n\r\n")[0], body
            assert body.endswith(b"\r\n" + sent(subject)), body
        assert seen_subjects == set(SUBJECTS)
        # The fetch was read-only: still no \Seen.
        assert all(kept(f) == () for f in client.get_flags(list(fetched)).values())

        # Second sync with CONDSTORE (RFC 7162 §3.1.4): nothing changed since
        # the HIGHESTMODSEQ of the first, same UIDVALIDITY, same UIDs.
        modseq = selected[b"HIGHESTMODSEQ"]
        again = client.select_folder("INBOX", readonly=True)
        assert again[b"UIDVALIDITY"] == validity
        assert again[b"HIGHESTMODSEQ"] == modseq
        assert client.fetch(list(fetched), ["FLAGS"], modifiers=[f"CHANGEDSINCE {modseq}"]) == {}
        assert sorted(client.search()) == sorted(fetched)

        # ...and CHANGEDSINCE does report a change, so the empty answer above
        # means something: a flag set from a second connection.
        first = min(fetched)
        with session(server) as other:
            other.select_folder("INBOX")
            other.add_flags([first], [b"\\Flagged"])
        client.select_folder("INBOX", readonly=True)
        changed = client.fetch(list(fetched), ["FLAGS"], modifiers=[f"CHANGEDSINCE {modseq}"])
        assert list(changed) == [first]
        assert kept(changed[first][b"FLAGS"]) == (b"\\Flagged",)
        assert changed[first][b"MODSEQ"][0] > modseq


def test_flags_added_and_removed_are_seen_from_a_second_connection(
    server: PostofficeServer,
) -> None:
    deliver(server, *SUBJECTS)
    with session(server) as client, session(server) as other:
        client.select_folder("INBOX")
        uids = uids_by_subject(client)
        one, two, three = uids["one"], uids["two"], uids["three"]
        other.select_folder("INBOX", readonly=True)
        assert stored_flags(other.get_flags([one, two, three])) == {one: (), two: (), three: ()}

        client.add_flags([one], [b"\\Seen", b"\\Flagged"])
        client.add_flags([two], [b"\\Answered", b"$Label1"])
        # The other connection learns of them at its next sync point (RFC 9051
        # §5.2: a server sends flag updates as untagged FETCH, here on NOOP).
        told = {r[0]: r for r in other.noop()[1] if r[1:2] == (b"FETCH",)}
        assert set(told) == {1, 2}, told
        flags = stored_flags(other.get_flags([one, two, three]))
        assert set(flags[one]) == {b"\\Seen", b"\\Flagged"}
        assert set(flags[two]) == {b"\\Answered", b"$Label1"}
        assert flags[three] == ()

        client.remove_flags([one], [b"\\Flagged"])
        client.remove_flags([two], [b"$Label1"])
        other.noop()
        assert stored_flags(other.get_flags([one, two])) == {
            one: (b"\\Seen",),
            two: (b"\\Answered",),
        }
        # A connection opened now sees the same.
        with session(server) as third:
            third.select_folder("INBOX", readonly=True)
            assert stored_flags(third.get_flags([one, two, three])) == {
                one: (b"\\Seen",),
                two: (b"\\Answered",),
                three: (),
            }


def test_deleted_and_expunged_is_gone_for_the_other_connection(
    server: PostofficeServer,
) -> None:
    deliver(server, *SUBJECTS)
    with session(server) as client, session(server) as other:
        client.select_folder("INBOX")
        uids = uids_by_subject(client)
        other.select_folder("INBOX")
        client.delete_messages([uids["two"]])
        assert b"\\Deleted" in other.get_flags([uids["two"]])[uids["two"]]
        client.expunge()
        assert uids["two"] not in client.search()
        # The other connection is told (RFC 9051 §7.5.1: EXPUNGE on NOOP)...
        assert (2, b"EXPUNGE") in other.noop()[1]
        # ...and the message is gone for it, the others kept with their UIDs.
        assert uids_by_subject(other) == {"one": uids["one"], "three": uids["three"]}


def test_move_to_a_folder_reports_copyuid(server: PostofficeServer) -> None:
    deliver(server, *SUBJECTS)
    with session(server) as client:
        if not client.folder_exists("Archive"):
            client.create_folder("Archive")
        assert b"MOVE" in client.capabilities()
        archive = client.select_folder("Archive")
        assert archive[b"EXISTS"] == 0
        client.select_folder("INBOX")
        uids = uids_by_subject(client)
        client.add_flags([uids["one"]], [b"\\Flagged"])
        client.move([uids["one"], uids["three"]], "Archive")
        # RFC 6851 §4.3: COPYUID (RFC 4315 §3) in an untagged OK before the
        # EXPUNGEs: destination UIDVALIDITY, source UIDs, new UIDs, in order.
        # IMAPClient returns only the tagged text; the untagged OK stays in
        # its imaplib object.
        untagged: list[bytes] = client._imap.untagged_responses.get("OK", [])
        copyuid = [r for r in untagged if r.startswith(b"[COPYUID ")]
        assert len(copyuid) == 1, untagged
        validity, sources, targets = copyuid[0][len(b"[COPYUID ") :].split(b"]")[0].split()
        assert int(validity) == archive[b"UIDVALIDITY"]
        new_uid = dict(zip(uid_set(sources), uid_set(targets), strict=True))
        assert set(new_uid) == {uids["one"], uids["three"]}
        # Gone from INBOX; in Archive under the UIDs COPYUID named, flags kept.
        assert uids_by_subject(client) == {"two": uids["two"]}
    with session(server) as other:
        other.select_folder("Archive", readonly=True)
        assert uids_by_subject(other) == {
            "one": new_uid[uids["one"]],
            "three": new_uid[uids["three"]],
        }
        flags = stored_flags(other.get_flags(list(new_uid.values())))
        assert flags == {new_uid[uids["one"]]: (b"\\Flagged",), new_uid[uids["three"]]: ()}


def test_idle_reports_mail_delivered_over_smtp_within_2_seconds(
    server: PostofficeServer,
) -> None:
    deliver(server, "one")
    with session(server) as client:
        client.select_folder("INBOX")
        client.idle()
        try:
            # Nothing happens while idling with no mail: no spurious EXISTS.
            quiet = client.idle_check(timeout=0.3)
            assert not [r for r in quiet if r[1:2] == (b"EXISTS",)], quiet
            start = time.monotonic()
            deliver_smtp(server, "two")
            responses: list[tuple[Any, ...]] = []
            deadline = start + 2.0
            while not any(r[1:2] == (b"EXISTS",) for r in responses):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                responses += client.idle_check(timeout=left)
            elapsed = time.monotonic() - start
        finally:
            client.idle_done()
        # RFC 2177: the new message is reported as EXISTS while idling.
        assert (2, b"EXISTS") in responses, (responses, elapsed)
        assert elapsed < 2.0
        assert set(uids_by_subject(client)) == {"one", "two"}


def test_reconnect_after_kill_keeps_uidvalidity_uids_and_flags(
    server: PostofficeServer,
) -> None:
    deliver(server, *SUBJECTS)
    client = connect(server)
    validity = client.select_folder("INBOX")[b"UIDVALIDITY"]
    uids = uids_by_subject(client)
    client.add_flags([uids["one"]], [b"\\Seen", b"\\Flagged"])
    client.add_flags([uids["three"]], [b"\\Answered"])
    before = stored_flags(client.get_flags(list(uids.values())))

    server.kill()
    # The client sees the connection die (not a hang: its 15 s timeout bounds it).
    with pytest.raises((IMAPClientAbortError, OSError)):
        client.noop()
    client.shutdown()
    server.start()

    with session(server) as again:
        assert again.select_folder("INBOX")[b"UIDVALIDITY"] == validity
        assert uids_by_subject(again) == uids
        assert stored_flags(again.get_flags(list(uids.values()))) == before
    assert set(before[uids["one"]]) == {b"\\Seen", b"\\Flagged"}
