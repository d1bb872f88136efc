"""The Sendmail milter protocol (version 6), MTA side, sans I/O.

Postfix and Sendmail hand each message to content filters (rspamd,
OpenDKIM, ClamAV...) over the milter protocol; libraries exist only for
the filter side, so the MTA side is ours.  ``MilterClient`` turns our
stages (connect, helo, mail, rcpt, data, header, eoh, body, eom) into
packets and the milter's packets into typed events.  It keeps the
negotiated flags and the sequence, and never decides: the filter session
(``postoffice.filters``) maps events to verdicts and owns sockets and
timeouts.

Wire format (libmilter's ``mfdef.h``): every packet is a 32-bit
big-endian length (command byte included), one command byte, then data.
Strings are NUL-terminated.  OPTNEG carries version, action flags and
protocol flags; a version-6 milter may append per-stage macro lists
(``smfi_setsymlist``).  Protocol flags let the milter skip stages
(``SMFIP_NO*``), say it will not reply to one (``SMFIP_NR_*``), ask for
``SKIP`` support and for header values with their leading space.

Bounds: a packet whose announced length exceeds ``max_packet`` is refused
before anything of it is buffered; unknown or out-of-place responses are
``RemoteProtocolError`` -- the session then applies the milter's
``default_action``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from postoffice.protocol.errors import LocalProtocolError, RemoteProtocolError

VERSION = 6
# libmilter's MILTER_CHUNK_SIZE: the largest BODY packet a milter must accept
# unless SMFIP_MDS_256K/1M was negotiated (we never offer those).
BODY_CHUNK = 65535
# A REPLBODY or header change may be as large as the milter's own buffer
# (1 MiB with SMFIP_MDS_1M); anything beyond is garbage or hostility.
DEFAULT_MAX_PACKET = 1024 * 1024 + 64

# --- commands (MTA -> milter), mfdef.h SMFIC_* --------------------------------
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"

# --- responses (milter -> MTA), SMFIR_* ---------------------------------------
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SHUTDOWN = b"4"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"

# --- action flags (what the milter may change), SMFIF_* -----------------------
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100
ALL_ACTIONS = 0x1FF

# --- protocol flags, SMFIP_* --------------------------------------------------
SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000
# Everything we can honour.  Not offered: RCPT_REJ (we do not pass rejected
# recipients on) and the MDS_* larger-buffer flags (we send 64 KiB chunks).
OFFERED_PROTOCOL = 0x1FFFFF & ~SMFIP_RCPT_REJ

# --- macro stages (OPTNEG symbol lists), SMFIM_* ------------------------------
SMFIM_CONNECT = 0
SMFIM_HELO = 1
SMFIM_ENVFROM = 2
SMFIM_ENVRCPT = 3
SMFIM_DATA = 4
SMFIM_EOM = 5
SMFIM_EOH = 6

# Per command: the stage whose macros precede it, the "skip this stage"
# flag and the "no reply to it" flag.
_STAGES: dict[bytes, tuple[int | None, int, int]] = {
    SMFIC_CONNECT: (SMFIM_CONNECT, SMFIP_NOCONNECT, SMFIP_NR_CONN),
    SMFIC_HELO: (SMFIM_HELO, SMFIP_NOHELO, SMFIP_NR_HELO),
    SMFIC_MAIL: (SMFIM_ENVFROM, SMFIP_NOMAIL, SMFIP_NR_MAIL),
    SMFIC_RCPT: (SMFIM_ENVRCPT, SMFIP_NORCPT, SMFIP_NR_RCPT),
    SMFIC_DATA: (SMFIM_DATA, SMFIP_NODATA, SMFIP_NR_DATA),
    SMFIC_HEADER: (None, SMFIP_NOHDRS, SMFIP_NR_HDR),
    SMFIC_EOH: (SMFIM_EOH, SMFIP_NOEOH, SMFIP_NR_EOH),
    SMFIC_BODY: (None, SMFIP_NOBODY, SMFIP_NR_BODY),
    SMFIC_BODYEOB: (SMFIM_EOM, 0, 0),
}

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")


# --- events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The milter's OPTNEG answer: what it will do and which macros it wants."""

    version: int
    actions: int
    protocol: int
    # stage (SMFIM_*) -> macro names the milter asked for; a stage absent
    # here gets every macro we have.
    macros: Mapping[int, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Continue:
    pass


@dataclass(frozen=True, slots=True)
class Accept:
    pass


@dataclass(frozen=True, slots=True)
class Reject:
    pass


@dataclass(frozen=True, slots=True)
class Tempfail:
    pass


@dataclass(frozen=True, slots=True)
class Discard:
    pass


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The milter is going away (SMFIR_SHUTDOWN / SMFIR_CONN_FAIL)."""


@dataclass(frozen=True, slots=True)
class ReplyCode:
    """A reject or tempfail with the milter's own SMTP reply."""

    code: int
    enhanced: str | None
    lines: tuple[str, ...]

    @property
    def permanent(self) -> bool:
        return self.code >= 500


@dataclass(frozen=True, slots=True)
class Progress:
    """Still working: the session restarts its timeout."""


@dataclass(frozen=True, slots=True)
class Skip:
    """Send no more body chunks; go on to EOM."""


@dataclass(frozen=True, slots=True)
class Quarantine:
    reason: str


@dataclass(frozen=True, slots=True)
class AddHeader:
    name: str
    value: str  # as it goes after "Name:" (leading space included)


@dataclass(frozen=True, slots=True)
class InsertHeader:
    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """Change the ``index``-th (1-based) header called ``name``; ``None`` deletes it."""

    index: int
    name: str
    value: str | None


@dataclass(frozen=True, slots=True)
class AddRecipient:
    address: str
    args: str = ""


@dataclass(frozen=True, slots=True)
class DeleteRecipient:
    address: str


@dataclass(frozen=True, slots=True)
class ChangeSender:
    address: str
    args: str = ""


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """One chunk of the new body; successive chunks concatenate."""

    chunk: bytes


Final = Continue | Accept | Reject | Tempfail | Discard | ReplyCode | Shutdown
Modification = (
    Quarantine
    | AddHeader
    | InsertHeader
    | ChangeHeader
    | AddRecipient
    | DeleteRecipient
    | ChangeSender
    | ReplaceBody
)
Event = Negotiated | Final | Modification | Progress | Skip

# Which action flag each modification needs (mfapi.h).
_MOD_FLAG: dict[bytes, int] = {
    SMFIR_ADDHEADER: SMFIF_ADDHDRS,
    SMFIR_INSHEADER: SMFIF_ADDHDRS,
    SMFIR_CHGHEADER: SMFIF_CHGHDRS,
    SMFIR_ADDRCPT: SMFIF_ADDRCPT,
    SMFIR_ADDRCPT_PAR: SMFIF_ADDRCPT_PAR,
    SMFIR_DELRCPT: SMFIF_DELRCPT,
    SMFIR_CHGFROM: SMFIF_CHGFROM,
    SMFIR_REPLBODY: SMFIF_CHGBODY,
    SMFIR_QUARANTINE: SMFIF_QUARANTINE,
}


def _enc(text: str) -> bytes:
    # Mail may carry 8-bit headers; surrogateescape round-trips them.
    data = text.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise LocalProtocolError("NUL in a milter string")
    return data


def _dec(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    """One wire packet: length (command byte included), command, data."""
    return struct.pack("!I", len(data) + 1) + cmd + data


def _strings(data: bytes, count: int) -> list[bytes]:
    """Split ``count`` NUL-terminated strings (the last may lack its NUL)."""
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) != count:
        raise RemoteProtocolError(f"milter: expected {count} strings, got {len(parts)}")
    return parts


def parse_reply_code(text: str) -> ReplyCode:
    """``550 5.7.1 text`` (possibly several ``550-...`` lines) as a ReplyCode."""
    raw_lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    code: int | None = None
    enhanced: str | None = None
    lines: list[str] = []
    for i, line in enumerate(raw_lines):
        last = i == len(raw_lines) - 1
        if len(line) < 3 or not line[:3].isdigit() or line[0] not in "45":
            raise RemoteProtocolError(f"milter: bad reply code {line[:40]!r}")
        sep = line[3:4]
        expected = ("", " ") if last else ("-",)
        if sep not in expected:
            raise RemoteProtocolError(f"milter: bad reply continuation {line[:40]!r}")
        this = int(line[:3])
        if code is not None and this != code:
            raise RemoteProtocolError("milter: reply lines with different codes")
        code = this
        rest = line[4:]
        word, _, after = rest.partition(" ")
        if _ENHANCED.match(word) and word[0] == line[0]:
            enhanced = enhanced or word
            rest = after
        lines.append(rest)
    assert code is not None
    return ReplyCode(code, enhanced, tuple(lines))


def _wanted(names: Sequence[str] | None, macros: Mapping[str, str]) -> list[tuple[str, str]]:
    if names is None:
        return list(macros.items())
    out: list[tuple[str, str]] = []
    for name in names:
        # Milters name long macros with or without braces ("{auth_authen}"
        # or "auth_authen"); single letters never have them.
        bare = name.strip("{}")
        for key in (name, bare, "{" + bare + "}"):
            if key in macros:
                out.append((name, macros[key]))
                break
    return out


class MilterClient:
    """One milter conversation from the MTA side: stages in, events out.

    Each stage method returns the bytes to send (empty when the milter
    asked to skip that stage).  ``awaiting_reply`` then says whether the
    milter will answer; ``next_event`` yields its packets once fed with
    ``receive_data``.  Modifications are accepted only after ``eom``.
    """

    def __init__(
        self,
        *,
        actions: int = ALL_ACTIONS,
        protocol: int = OFFERED_PROTOCOL,
        max_packet: int = DEFAULT_MAX_PACKET,
    ) -> None:
        self._actions = actions
        self._protocol = protocol
        self._max_packet = max_packet
        self._buffer = bytearray()
        self._pending: bytes | None = None
        self.negotiated: Negotiated | None = None
        self.skipped_body = False
        self.closed = False

    # --- negotiated facts -----------------------------------------------------

    @property
    def awaiting_reply(self) -> bool:
        return self._pending is not None

    @property
    def header_leading_space(self) -> bool:
        return self._neg().protocol & SMFIP_HDR_LEADSPC != 0

    def wants(self, cmd: bytes) -> bool:
        """Whether the milter takes this stage at all (not ``SMFIP_NO*``)."""
        return self._neg().protocol & _STAGES[cmd][1] == 0

    def _neg(self) -> Negotiated:
        if self.negotiated is None:
            raise LocalProtocolError("milter: stage before option negotiation")
        return self.negotiated

    # --- commands -------------------------------------------------------------

    def start(self) -> bytes:
        """OPTNEG: our version, the actions we allow, the protocol steps we offer."""
        if self._pending is not None or self.negotiated is not None:
            raise LocalProtocolError("milter: negotiated twice")
        self._pending = SMFIC_OPTNEG
        return packet(SMFIC_OPTNEG, struct.pack("!III", VERSION, self._actions, self._protocol))

    def connect(
        self,
        hostname: str,
        family: str,
        port: int,
        address: str,
        macros: Mapping[str, str] | None = None,
    ) -> bytes:
        """``family``: "4", "6", "L" (unix socket) or "U" (unknown)."""
        if family not in ("4", "6", "L", "U"):
            raise LocalProtocolError(f"milter: unknown family {family!r}")
        data = _enc(hostname) + b"\0" + family.encode()
        if family != "U":
            data += struct.pack("!H", port) + _enc(address) + b"\0"
        return self._stage(SMFIC_CONNECT, data, macros)

    def helo(self, name: str, macros: Mapping[str, str] | None = None) -> bytes:
        return self._stage(SMFIC_HELO, _enc(name) + b"\0", macros)

    def mail(self, args: Sequence[str], macros: Mapping[str, str] | None = None) -> bytes:
        """``args``: ``<sender>`` then ESMTP parameters, as in MAIL FROM."""
        return self._stage(SMFIC_MAIL, b"".join(_enc(a) + b"\0" for a in args), macros)

    def rcpt(self, args: Sequence[str], macros: Mapping[str, str] | None = None) -> bytes:
        return self._stage(SMFIC_RCPT, b"".join(_enc(a) + b"\0" for a in args), macros)

    def data(self, macros: Mapping[str, str] | None = None) -> bytes:
        if self._neg().version < 4:
            return b""
        return self._stage(SMFIC_DATA, b"", macros)

    def header(self, name: str, value: str) -> bytes:
        """``value`` as after the colon; without HDR_LEADSPC one leading space goes."""
        if not self.header_leading_space and value.startswith(" "):
            value = value[1:]
        return self._stage(SMFIC_HEADER, _enc(name) + b"\0" + _enc(value) + b"\0", None)

    def eoh(self, macros: Mapping[str, str] | None = None) -> bytes:
        return self._stage(SMFIC_EOH, b"", macros)

    def body(self, chunk: bytes) -> bytes:
        """One body chunk (at most ``BODY_CHUNK``; the session splits larger)."""
        if len(chunk) > BODY_CHUNK:
            raise LocalProtocolError("milter: body chunk over 65535 bytes")
        if self.skipped_body or not chunk:
            return b""
        return self._stage(SMFIC_BODY, chunk, None)

    def eom(self, macros: Mapping[str, str] | None = None) -> bytes:
        """End of message: the milter answers with modifications then a final reply."""
        return self._stage(SMFIC_BODYEOB, b"", macros)

    def abort(self) -> bytes:
        """Forget this message; the connection stays (no reply)."""
        self._check_idle()
        self.skipped_body = False
        return packet(SMFIC_ABORT)

    def quit(self) -> bytes:
        self._check_idle()
        self.closed = True
        return packet(SMFIC_QUIT)

    def quit_nc(self) -> bytes:
        """Quit this connection's conversation but keep the socket for the next."""
        self._check_idle()
        self.negotiated = None
        return packet(SMFIC_QUIT_NC)

    def _check_idle(self) -> None:
        if self._pending is not None:
            raise LocalProtocolError("milter: command while a reply is awaited")
        if self.closed:
            raise LocalProtocolError("milter: conversation is closed")

    def _stage(self, cmd: bytes, data: bytes, macros: Mapping[str, str] | None) -> bytes:
        neg = self._neg()
        self._check_idle()
        stage, skip_flag, noreply_flag = _STAGES[cmd]
        if neg.protocol & skip_flag:
            return b""
        out = b""
        if macros and stage is not None:
            pairs = _wanted(neg.macros.get(stage), macros)
            if pairs:
                body = b"".join(_enc(k) + b"\0" + _enc(v) + b"\0" for k, v in pairs)
                out += packet(SMFIC_MACRO, cmd + body)
        out += packet(cmd, data)
        if not neg.protocol & noreply_flag:
            self._pending = cmd
        return out

    # --- responses ------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._buffer += data
        # Refuse an oversized announcement before it is buffered whole.
        if len(self._buffer) >= 4:
            (length,) = struct.unpack_from("!I", self._buffer)
            if length == 0 or length > self._max_packet:
                raise RemoteProtocolError(f"milter: packet length {length} out of bounds")

    def next_event(self) -> Event | None:
        """The next decoded response, or ``None`` until more bytes arrive."""
        if len(self._buffer) < 4:
            return None
        (length,) = struct.unpack_from("!I", self._buffer)
        if length == 0 or length > self._max_packet:
            raise RemoteProtocolError(f"milter: packet length {length} out of bounds")
        if len(self._buffer) < 4 + length:
            return None
        cmd = bytes(self._buffer[4:5])
        data = bytes(self._buffer[5 : 4 + length])
        del self._buffer[: 4 + length]
        event = self._decode(cmd, data)
        # The next packet's length may already be here: bound it too.
        self.receive_data(b"")
        return event

    def _decode(self, cmd: bytes, data: bytes) -> Event:
        pending = self._pending
        if pending is None:
            raise RemoteProtocolError(f"milter: unsolicited response {cmd!r}")
        if pending == SMFIC_OPTNEG:
            if cmd != SMFIC_OPTNEG:
                raise RemoteProtocolError(f"milter: {cmd!r} in answer to OPTNEG")
            self._pending = None
            self.negotiated = self._decode_optneg(data)
            return self.negotiated
        if cmd == SMFIR_PROGRESS:
            return Progress()
        if cmd in _MOD_FLAG:
            if pending != SMFIC_BODYEOB:
                raise RemoteProtocolError(f"milter: modification {cmd!r} before end of message")
            if not self._neg().actions & _MOD_FLAG[cmd]:
                raise RemoteProtocolError(f"milter: modification {cmd!r} not negotiated")
            return self._decode_modification(cmd, data)
        if cmd == SMFIR_SKIP:
            if pending != SMFIC_BODY or not self._neg().protocol & SMFIP_SKIP:
                raise RemoteProtocolError("milter: SKIP outside the body")
            self._pending = None
            self.skipped_body = True
            return Skip()
        final: Final
        if cmd == SMFIR_CONTINUE:
            final = Continue()
        elif cmd == SMFIR_ACCEPT:
            final = Accept()
        elif cmd == SMFIR_REJECT:
            final = Reject()
        elif cmd == SMFIR_TEMPFAIL:
            final = Tempfail()
        elif cmd == SMFIR_DISCARD:
            final = Discard()
        elif cmd in (SMFIR_SHUTDOWN, SMFIR_CONN_FAIL):
            final = Shutdown()
        elif cmd == SMFIR_REPLYCODE:
            (text,) = _strings(data, 1)
            final = parse_reply_code(_dec(text))
        else:
            raise RemoteProtocolError(f"milter: unknown response {cmd!r}")
        if data and cmd != SMFIR_REPLYCODE:
            raise RemoteProtocolError(f"milter: data after response {cmd!r}")
        self._pending = None
        return final

    def _decode_optneg(self, data: bytes) -> Negotiated:
        if len(data) < 12:
            raise RemoteProtocolError("milter: short OPTNEG")
        version, actions, protocol = struct.unpack_from("!III", data)
        if not 2 <= version <= VERSION:
            raise RemoteProtocolError(f"milter: unsupported version {version}")
        if actions & ~self._actions:
            raise RemoteProtocolError(f"milter: asks for actions {actions:#x} not offered")
        # Larger-buffer flags (MDS_*) are requests we simply do not grant.
        protocol &= 0x0FFFFFFF
        if protocol & ~self._protocol:
            raise RemoteProtocolError(f"milter: asks for protocol {protocol:#x} not offered")
        macros: dict[int, tuple[str, ...]] = {}
        rest = data[12:]
        while rest:
            if len(rest) < 5:
                raise RemoteProtocolError("milter: truncated macro list")
            (stage,) = struct.unpack_from("!I", rest)
            names, nul, rest = rest[4:].partition(b"\0")
            if not nul:
                raise RemoteProtocolError("milter: unterminated macro list")
            if stage > SMFIM_EOH or stage in macros:
                raise RemoteProtocolError(f"milter: bad macro stage {stage}")
            macros[stage] = tuple(_dec(names).split())
        return Negotiated(version, actions, protocol, macros)

    def _decode_modification(self, cmd: bytes, data: bytes) -> Modification:
        if cmd == SMFIR_REPLBODY:
            return ReplaceBody(data)
        if cmd in (SMFIR_INSHEADER, SMFIR_CHGHEADER):
            if len(data) < 4:
                raise RemoteProtocolError("milter: short header change")
            (index,) = struct.unpack_from("!I", data)
            name, value = (_dec(p) for p in _strings(data[4:], 2))
            self._check_header_name(name)
            if cmd == SMFIR_CHGHEADER:
                return ChangeHeader(index, name, self._header_value(value) if value else None)
            return InsertHeader(index, name, self._header_value(value))
        if cmd == SMFIR_ADDHEADER:
            name, value = (_dec(p) for p in _strings(data, 2))
            self._check_header_name(name)
            return AddHeader(name, self._header_value(value))
        if cmd in (SMFIR_ADDRCPT_PAR, SMFIR_CHGFROM):
            parts = [_dec(p) for p in data.split(b"\0")]
            if parts and parts[-1] == "":
                parts.pop()
            if not 1 <= len(parts) <= 2 or not parts[0]:
                raise RemoteProtocolError(f"milter: bad {cmd!r} arguments")
            args = parts[1] if len(parts) == 2 else ""
            if cmd == SMFIR_CHGFROM:
                return ChangeSender(parts[0], args)
            return AddRecipient(parts[0], args)
        (text,) = (_dec(p) for p in _strings(data, 1))
        if cmd == SMFIR_QUARANTINE:
            return Quarantine(text)
        if not text:
            raise RemoteProtocolError(f"milter: empty address in {cmd!r}")
        if cmd == SMFIR_ADDRCPT:
            return AddRecipient(text)
        return DeleteRecipient(text)

    @staticmethod
    def _check_header_name(name: str) -> None:
        # RFC 5322 §2.2: printable ASCII except colon; a bad name would
        # corrupt the stored message.
        if not name or any(not 33 <= ord(c) <= 126 or c == ":" for c in name):
            raise RemoteProtocolError(f"milter: bad header name {name[:40]!r}")

    def _header_value(self, value: str) -> str:
        if "\r" in value.replace("\r\n", "") or "\0" in value:
            raise RemoteProtocolError("milter: bare CR in a header value")
        if self.header_leading_space:
            return value
        return " " + value
