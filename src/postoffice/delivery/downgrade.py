"""8-bit to 7-bit conversion for a peer without 8BITMIME (RFC 6152 §3).

RFC 6152 §3 leaves a relay two choices for 8-bit content and a next hop
that does not announce 8BITMIME: return it, or convert it to 7 bits (RFC
1652 §5 describes the conversion).  ``to_7bit`` converts the stored form
(LF line ends): every MIME leaf with 8-bit octets gets quoted-printable
(``text/*``) or base64 (anything else, encoded from its CRLF wire form, so
the decoded octets are what the 8bit part meant), multiparts are walked
part by part (delimiters, preambles and untouched parts kept byte for
byte), and an embedded ``message/rfc822`` is converted inside and relabelled
7bit.  Headers are not touched except Content-Transfer-Encoding, and a
top-level ``MIME-Version: 1.0`` when the message had none (without it no
reader would decode the new encoding).

What cannot be converted raises ``DowngradeError`` and the message is
returned as before (5.6.3): 8-bit octets in an embedded message's header
or a body part's header (that needs SMTPUTF8, RFC 6532), in a part that claims base64 or
quoted-printable already (it lies; re-encoding would hide it), or nesting
past ``MAX_DEPTH``.  A conversion breaks every DKIM signature over the
body; the remote courier signs our own mail again afterwards, a foreign
signature stays broken (RFC 6376 §5.3 asks signers to sign the 7-bit form
for exactly this reason; few do).
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import quopri
import re

from postoffice.protocol.dotstuff import to_crlf

MAX_DEPTH = 50  # nested multiparts / messages followed before refusing
_HIGH = re.compile(rb"[\x80-\xff]")
_CTE_FIELD = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:.*\n(?:[ \t].*\n)*")
_MIME_VERSION = re.compile(rb"(?im)^mime-version[ \t]*:")


class DowngradeError(ValueError):
    """The message cannot be made 7-bit without changing what it says."""


def to_7bit(message: bytes) -> bytes:
    """``message`` (LF form) with no octet above 127 in its body; unchanged
    if it had none.  Raises DowngradeError (see the module docstring)."""
    head, body = _split(message)
    if _HIGH.search(head):
        raise DowngradeError("8-bit octets in the header need SMTPUTF8")
    new_head, new_body = _entity(head, body, 0)
    if new_body is body:
        return message
    if not _MIME_VERSION.search(new_head):
        new_head += b"MIME-Version: 1.0\n"
    return new_head + b"\n" + new_body


def _split(entity: bytes) -> tuple[bytes, bytes]:
    """(header block ending in LF or empty, body); the blank line dropped."""
    if entity.startswith(b"\n"):
        return b"", entity[1:]
    end = entity.find(b"\n\n")
    if end < 0:
        return entity if entity.endswith(b"\n") else entity + b"\n", b""
    return entity[: end + 1], entity[end + 2 :]


def _entity(head: bytes, body: bytes, depth: int) -> tuple[bytes, bytes]:
    """(header, body) converted; ``body`` itself (the same object) when
    nothing needed converting."""
    if not _HIGH.search(body):
        return head, body
    if depth > MAX_DEPTH:
        raise DowngradeError("MIME nesting too deep to convert")
    fields = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    maintype = fields.get_content_maintype()
    boundary = fields.get_boundary()
    cte = str(fields.get("content-transfer-encoding", "")).strip().lower()
    if maintype == "multipart" and boundary:
        return head, _multipart(body, boundary.encode("utf-8", "replace"), depth)
    if fields.get_content_type() in ("message/rfc822", "message/news"):
        inner_head, inner_body = _split(body)
        if _HIGH.search(inner_head):
            raise DowngradeError("8-bit octets in an embedded message's header")
        inner_head, inner_body = _entity(inner_head, inner_body, depth + 1)
        return _with_cte(head, b"7bit"), inner_head + b"\n" + inner_body
    if cte in ("base64", "quoted-printable"):
        raise DowngradeError(f"8-bit octets in a part encoded as {cte}")
    if maintype == "text":
        # Line ends stay line ends (RFC 2045 §6.7 rule 4); quopri wraps at 76.
        return _with_cte(head, b"quoted-printable"), quopri.encodestring(body)
    return _with_cte(head, b"base64"), base64.encodebytes(to_crlf(body))


def _with_cte(head: bytes, cte: bytes) -> bytes:
    return _CTE_FIELD.sub(b"", head) + b"Content-Transfer-Encoding: " + cte + b"\n"


def _multipart(body: bytes, boundary: bytes, depth: int) -> bytes:
    """Each body part converted in place (RFC 2046 §5.1.1): the LF before a
    delimiter line belongs to the delimiter; preamble and epilogue are to
    be ignored by readers, so their 8-bit octets become "?"."""
    delimiter = re.compile(rb"(?m)^--" + re.escape(boundary) + rb"(--)?[ \t]*$")
    out: list[bytes] = []
    start = 0  # of the text before the next delimiter
    in_part = False  # that text is a body part (not the preamble)
    for match in delimiter.finditer(body):
        end = match.start() - 1 if match.start() > 0 else 0
        segment = body[start:end]
        out.append(_part(segment, depth) if in_part else _HIGH.sub(b"?", segment))
        out.append(body[end : match.end()])
        start = match.end()
        if match.group(1):  # the close delimiter: the rest is the epilogue
            out.append(_HIGH.sub(b"?", body[start:]))
            return b"".join(out)
        in_part = True
    rest = body[start:]  # no close delimiter: the last part runs to the end
    out.append(_part(rest, depth) if in_part else _HIGH.sub(b"?", rest))
    return b"".join(out)


def _part(segment: bytes, depth: int) -> bytes:
    """One body part; ``segment`` starts with the LF that ended its delimiter line."""
    if not _HIGH.search(segment):
        return segment
    lead = b"\n" if segment.startswith(b"\n") else b""
    head, body = _split(segment[len(lead) :])
    if _HIGH.search(head):
        raise DowngradeError("8-bit octets in a body part's header")
    new_head, new_body = _entity(head, body, depth + 1)
    if not new_body.endswith(b"\n"):
        new_body += b"\n"  # base64 and quopri end their lines; the delimiter needs its own LF
    return lead + new_head + b"\n" + new_body[:-1]
