"""The DSN parameters of the SMTP envelope (RFC 3461 §4): their wire form.

One home for what MAIL's RET and ENVID and RCPT's NOTIFY and ORCPT may
hold, read (server side) and written (client side), and the xtext codec
(§4) they are carried in.  What the parameters make us do (which notices,
what they say) is delivery/dsn.py's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+")  # RFC 3461 §4
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")  # atom, as RFC 3461 §4.2 uses it
MAX_ENVID = 100  # RFC 3461 §4.4: ENVID MUST NOT exceed 100 characters
MAX_ORCPT = 500  # RFC 3461 §4.2: ORCPT MUST NOT exceed 500 characters
SUCCESS, FAILURE, DELAY = "SUCCESS", "FAILURE", "DELAY"
NOTIFY_VALUES = frozenset({SUCCESS, FAILURE, DELAY})
DEFAULT_NOTIFY = frozenset({FAILURE, DELAY})  # §4.1: NOTIFY absent = FAILURE,DELAY


def xtext_decode(text: str) -> str:
    """``+XX`` hex escapes undone (RFC 3461 §4); the text must be xtext."""
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    """Every character outside ``!``..``~``, and ``+`` and ``=``, as ``+XX``
    (UTF-8 octets for non-ASCII text)."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        out.append(ch if 0x21 <= byte <= 0x7E and ch not in "+=" else f"+{byte:02X}")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class MessageDsn:
    """MAIL FROM's RET and ENVID; empty strings when not given.  It also
    carries REQUIRETLS (RFC 8689 §4.1), the other MAIL parameter that stays
    with the message through the queue (``mail_params`` leaves it out: it
    goes to a peer that offers REQUIRETLS, not DSN)."""

    ret: str = ""  # "FULL" or "HDRS" (§4.3)
    envid: str = ""  # xtext, as received (relayed unchanged, §4.4)
    requiretls: bool = False  # RFC 8689: deliver only over verified TLS

    @property
    def given(self) -> bool:
        return bool(self.ret or self.envid)

    def mail_params(self) -> list[str]:
        return [f"RET={self.ret}"] * bool(self.ret) + [f"ENVID={self.envid}"] * bool(self.envid)


@dataclass(frozen=True, slots=True)
class RecipientDsn:
    """RCPT TO's NOTIFY and ORCPT."""

    notify: frozenset[str] | None = None  # None: not given; empty: NEVER
    orcpt: str = ""  # "addr-type;xtext", as received (relayed unchanged, §4.2)

    @property
    def given(self) -> bool:
        return self.notify is not None or bool(self.orcpt)

    def wants(self, kind: str) -> bool:
        """Whether a notice of ``kind`` (SUCCESS, FAILURE, DELAY) is asked for."""
        return kind in (DEFAULT_NOTIFY if self.notify is None else self.notify)

    def rcpt_params(self) -> list[str]:
        out = []
        if self.notify is not None:
            words = [w for w in (SUCCESS, FAILURE, DELAY) if w in self.notify]
            out.append("NOTIFY=" + (",".join(words) or "NEVER"))
        if self.orcpt:
            out.append(f"ORCPT={self.orcpt}")
        return out

    def original_recipient(self) -> str:
        """The Original-Recipient field's value (RFC 3464 §2.3.1), or ""."""
        addr_type, _semi, address = self.orcpt.partition(";")
        return f"{addr_type}; {xtext_decode(address)}" if self.orcpt else ""


def parse_ret(value: str | None) -> str | None:
    """``FULL``/``HDRS`` upper-cased, or None when invalid."""
    word = (value or "").upper()
    return word if word in ("FULL", "HDRS") else None


def valid_envid(value: str | None) -> bool:
    return value is not None and len(value) <= MAX_ENVID and XTEXT.fullmatch(value) is not None


def parse_notify(value: str | None) -> frozenset[str] | None:
    """NEVER -> frozenset(); a set of SUCCESS/FAILURE/DELAY; None when invalid
    (NEVER combined with others is invalid, §4.1)."""
    words = (value or "").upper().split(",")
    if words == ["NEVER"]:
        return frozenset()
    if words and all(w in NOTIFY_VALUES for w in words):
        return frozenset(words)
    return None


def valid_orcpt(value: str | None) -> bool:
    """``addr-type;xtext`` within MAX_ORCPT characters (§4.2)."""
    if value is None or len(value) > MAX_ORCPT:
        return False
    addr_type, semi, address = value.partition(";")
    return bool(semi) and bool(_ADDR_TYPE.fullmatch(addr_type)) and bool(XTEXT.fullmatch(address))


NO_MESSAGE_DSN = MessageDsn()  # RET and ENVID not given
NO_RECIPIENT_DSN = RecipientDsn()  # NOTIFY and ORCPT not given
