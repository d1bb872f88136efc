"""Property-based fuzzing of address parsing where it meets storage and headers.

tests/unit/mail/test_address.py checks that parsing never crashes and that
account names are single safe path components.  Here the two places an
address from the wire ends up: a Maildir path (``mailbox_path`` stays under
the mail directory, or refuses) and a header line (``Return-Path``,
``Received ... for``: no CR, LF or NUL can come out of any parsed address).
The number of examples comes from ``POSTOFFICE_FUZZ_EXAMPLES``.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postoffice.mail.address import (
    Address,
    AddressError,
    format_local_part,
    normalise_domain,
    parse_mailbox,
    parse_path,
    unquote_local_part,
)
from postoffice.storage.maildir import mailbox_path

EXAMPLES = int(os.environ.get("POSTOFFICE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAIL_DIR = Path("/srv/mail")

_PIECES = st.sampled_from(["/", "\\", ".", "..", "\x00", "\r", "\n", "\u2028", "\u0085", "%",
                           "!", "+", "@", '"', "<", ">", ":", ",", "[", "]", "a", "Z", "9",
                           "-", "_", "\u00e9", " ", "~", "IPv6:",
                           # IDNA 2008 / UTS #46: deviations, symbols, joiners, bidi,
                           # compatibility forms, dots that map to ".", fake A-labels.
                           "\u00df", "\u03c2", "\u2603", "\u200d", "\u200c", "\u0663", "\u05d0",
                           "\u2170", "\uff21", "\u3002", "\uff0e", "\u0301", "\udcff", "xn--",
                           "\u00a0", "\ufeff"])  # fmt: skip
_WORDS = st.lists(st.one_of(_PIECES, st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True)),
                  max_size=12).map("".join)  # fmt: skip
_PATHS = st.builds(lambda local, domain: f"<{local}@{domain}>", _WORDS, _WORDS)


@FUZZ
@given(_PATHS, st.booleans())
def test_parsed_addresses_cannot_break_a_header_line(text: str, utf8: bool) -> None:
    try:
        addr = parse_path(text, utf8=utf8)
    except AddressError:
        return
    if addr is None:
        return
    rendered = f"Return-Path: <{addr}>\n".encode("utf-8", "surrogateescape")
    assert rendered.count(b"\n") == 1 and b"\r" not in rendered and b"\0" not in rendered


@FUZZ
@given(_PATHS)
def test_maildir_paths_stay_under_the_mail_directory(text: str) -> None:
    try:
        addr = parse_path(text, utf8=True)
    except AddressError:
        return
    candidates = [addr] if addr is not None else []
    if addr is not None:
        with contextlib.suppress(AddressError):
            candidates.append(parse_mailbox(str(addr)))
    for candidate in candidates:
        assert isinstance(candidate, Address)
        try:
            path = mailbox_path(MAIL_DIR, candidate)
        except AddressError:
            continue
        resolved = Path(os.path.normpath(path))
        assert resolved.parent.parent == MAIL_DIR, path
        assert resolved == path  # nothing for normpath to fold: no "..", no "//"


_LDH_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")


@FUZZ
@given(_WORDS)
def test_domains_come_out_as_ldh_ascii_or_are_refused(text: str) -> None:
    """IDNA 2008 + UTS #46: whatever a client names, the result is an ASCII
    LDH name (A-labels) that normalises to itself, or an AddressError (the
    501 5.1.3 / 5.1.7 of the SMTP core) -- never another exception."""
    try:
        domain = normalise_domain(text)
    except AddressError:
        return
    if domain.startswith("["):
        return
    assert _LDH_DOMAIN.fullmatch(domain), domain
    assert normalise_domain(domain) == domain


@settings(max_examples=EXAMPLES)
@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=60))
def test_format_local_part_is_one_valid_local_part_that_unquotes_back(text: str) -> None:
    """What SRS relies on (policy/srs.py): any printable text, written as a
    local part, parses as one and reads back as the same text."""
    local = format_local_part(text)
    parsed = parse_path(f"<{local}@example.test>")
    assert parsed is not None and parsed.local == local
    assert unquote_local_part(local) == text
