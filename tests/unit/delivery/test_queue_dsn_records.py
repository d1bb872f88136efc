"""The DSN parameters in queue files: written only when given, and files
written before they existed still read (as "not given": RFC 3461 defaults)."""

from __future__ import annotations

from postoffice.delivery.queue.records import (
    QueueEntry,
    Recipient,
    RecipientState,
    StoredEnvelope,
)
from postoffice.mail.address import Address
from postoffice.protocol.dsn_params import MessageDsn, RecipientDsn

OLD_HEADER = (
    b'postoffice-queue 1 {"id":"0190abcdef12345678","from":["alice","example.test"],'
    b'"to":[["bob","remote.test"],["carol","remote.test"]],"created":1700000000.0}\n'
)
OLD_STATE = (
    b'{"v":1,"warned":false,"dsn":0,"recipients":[{"to":["bob","remote.test"],'
    b'"state":"deferred","attempts":1,"next_try":1700000600.0,"error":"451 busy",'
    b'"status":"4.0.0","remote":"","smtp":true,"last":1700000001.0}]}\n'
)


def test_a_queue_file_from_before_dsn_reads_with_the_defaults() -> None:
    envelope = StoredEnvelope.parse(OLD_HEADER)
    assert envelope.dsn == MessageDsn()
    entry = QueueEntry.new(envelope, len(OLD_HEADER))
    assert all(r.dsn == RecipientDsn() for r in entry.recipients)
    assert entry.recipients[0].dsn.wants("FAILURE") and not entry.recipients[0].dsn.wants("SUCCESS")
    entry.apply_state(OLD_STATE)
    (bob,) = entry.recipients
    assert bob.state is RecipientState.DEFERRED and bob.dsn == RecipientDsn() and bob.notice == ""
    # Nothing new is written for a message without DSN parameters.
    assert envelope.header_line() == OLD_HEADER
    assert b"notify" not in entry.state_json() and b"notice" not in entry.state_json()


def test_dsn_parameters_survive_the_round_trip() -> None:
    bob, carol = Address("bob", "remote.test"), Address("carol", "remote.test")
    envelope = StoredEnvelope(
        "0190abcdef12345678",
        Address("alice", "example.test"),
        (bob, carol),
        1700000000.0,
        MessageDsn("FULL", "QQ+2B1"),
        (RecipientDsn(frozenset({"SUCCESS"}), "rfc822;bob@remote.test"), RecipientDsn()),
    )
    again = StoredEnvelope.parse(envelope.header_line())
    assert again == envelope
    entry = QueueEntry.new(again, 0)
    entry.recipients[0].notice = "relayed"
    entry.recipients.append(Recipient(Address("dan", "remote.test"), dsn=RecipientDsn(frozenset())))
    copy = QueueEntry.new(again, 0)
    copy.apply_state(entry.state_json())
    assert [r.dsn for r in copy.recipients] == [r.dsn for r in entry.recipients]
    assert copy.recipients[0].notice == "relayed"
    assert copy.recipients[2].dsn.notify == frozenset()  # NEVER stays NEVER, not "not given"
