"""IMAP mailbox names on the wire: INBOX, and what a UTF-8 name may hold.

IMAP4rev1 clients send and expect mailbox names in modified UTF-7 (RFC 3501
§5.1.3; the codec is ``mail/mutf7.py``, shared with the Maildir++ folder
names on disk); IMAP4rev2 (RFC 9051 §5.1) and clients that ENABLE
UTF8=ACCEPT (RFC 6855 §3) use UTF-8.
"""

from __future__ import annotations

INBOX = "INBOX"


def normalize_mailbox(name: str) -> str:
    """INBOX in any case is INBOX (RFC 9051 §5.1); other names are kept."""
    return INBOX if name.upper() == INBOX else name


def valid_utf8_name(name: str) -> bool:
    """RFC 9051 §5.1 / RFC 6855 §3: no control characters in a UTF-8 name
    (RFC 5198's Net-Unicode: no C0/C1 controls, no U+2028/2029)."""
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in name)
