"""SEARCH keys answered from a parsed message (net/imap_fetch_items.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from postoffice.net.imap_fetch_items import search_matches
from postoffice.protocol.imap_events import SearchArg, SearchKey
from postoffice.protocol.imap_fetch import FetchMessage
from postoffice.storage.imap_index import MessageRecord

RECORD = MessageRecord(1, "1.M1P1Q1.host", "", frozenset(), 1, 0, 10)


def matches(message: bytes, op: str, *args: SearchArg) -> bool:
    key = SearchKey(op, args)
    return search_matches(key, RECORD, 1, 1, 1, lambda: FetchMessage(message))


# RFC 9051 §6.4.4: SENT* compare the Date: field's day as written, its time
# and timezone disregarded (23:30 -0700 is the next day in UTC).
LATE = b"Date: Tue, 15 Aug 2023 23:30:00 -0700\nSubject: x\n\nbody\n"


@pytest.mark.parametrize(
    ("op", "day", "found"),
    [
        ("SENTON", dt.date(2023, 8, 15), True),
        ("SENTON", dt.date(2023, 8, 16), False),
        ("SENTBEFORE", dt.date(2023, 8, 16), True),
        ("SENTBEFORE", dt.date(2023, 8, 15), False),
        ("SENTSINCE", dt.date(2023, 8, 15), True),
        ("SENTSINCE", dt.date(2023, 8, 16), False),
    ],
)
def test_sent_dates_use_the_day_written_in_the_date_field(
    op: str, day: dt.date, found: bool
) -> None:
    assert matches(LATE, op, day) is found


@pytest.mark.parametrize("date", [b"", b"Date: not a date\n", b"Date: 31 Feb 2023 10:00 +0000\n"])
def test_a_message_without_a_usable_date_is_sent_at_the_epoch_as_in_dovecot(date: bytes) -> None:
    message = date + b"Subject: x\n\nbody\n"
    assert matches(message, "SENTBEFORE", dt.date(1970, 1, 2))
    assert matches(message, "SENTON", dt.date(1970, 1, 1))
    assert not matches(message, "SENTSINCE", dt.date(2000, 1, 1))


def test_header_search_decodes_encoded_words_and_unfolds() -> None:
    message = (
        b"From: =?UTF-8?B?SsO8cmdlbiBNw7xsbGVy?= <juergen@example.test>\n"
        b"Subject: a long\n subject =?ISO-8859-1?Q?Gr=FC=DFe?=\n\nbody\n"
    )
    assert matches(message, "FROM", "m\u00fcller")  # RFC 2047: decoded, case-folded
    assert not matches(message, "FROM", "SsO8")  # not the encoded form
    assert matches(message, "SUBJECT", "subject gr\u00fc\u00dfe")  # across the fold
    assert matches(message, "HEADER", "Subject", "long")
