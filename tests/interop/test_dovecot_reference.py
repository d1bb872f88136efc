"""Dovecot as the reference IMAP server: one scripted session, two servers.

One corpus of awkward messages is written into two Maildir++ trees (with
the same folders, flags, keywords and file dates): one is postoffice's,
one Dovecot's.  The same script of IMAP commands (an IMAP4rev1 client:
it never sends ENABLE IMAP4rev2, as Dovecot 2.3 has no rev2) runs against
both over loopback, and every command's responses are parsed and compared
structurally, after normalising what may legitimately differ: tags, the
free text of status responses, capability lists, UIDVALIDITY and MODSEQ
values, and response codes only Dovecot sends.  ``ALLOWED`` lists the few
remaining differences where both answers are RFC-correct.
Outside CI a missing Dovecot skips; in CI (``CI`` set) it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from postoffice.storage.folder_names import parse as folder_name
from postoffice.storage.folders import Folders, dovecot_mailbox_config
from postoffice.storage.maildir import ensure_maildir
from postoffice.storage.maildir_flags import keyword_letters
from tests.interop.dovecot import DOVEADM, DOVECOT, Dovecot, need
from tests.support.imap import ALICE, ALICE_PW, context
from tests.support.imap_wire import Parsed, WireClient, parse
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.interop

_B64 = "UERGLTEuNCBmYWtlIGF0dGFjaG1lbnQgZGF0YQo="  # b"PDF-1.4 fake attachment data\n"

# (message, Maildir flag letters, keywords, mtime): the corpus both servers hold.
CORPUS: list[tuple[bytes, str, tuple[str, ...], int]] = [
    (
        # multipart/mixed holding multipart/alternative, and a base64
        # attachment named by RFC 2231 parameters (charset, continuation).
        b"From: Bob Example <bob@example.test>\n"
        b"To: alice@example.test\n"
        b"Subject: nested parts\n"
        b"Date: Mon, 02 Jan 2023 10:00:00 +0100\n"
        b"Message-ID: <nested@example.test>\n"
        b"MIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="outer"\n'
        b"\n"
        b"preamble\n"
        b"--outer\n"
        b'Content-Type: multipart/alternative; boundary="inner"\n'
        b"\n"
        b"--inner\n"
        b"Content-Type: text/plain; charset=us-ascii\n"
        b"\n"
        b"plain text body\n"
        b"--inner\n"
        b"Content-Type: text/html; charset=utf-8\n"
        b"Content-Transfer-Encoding: quoted-printable\n"
        b"\n"
        b"<p>html =C3=A9 body</p>\n"
        b"--inner--\n"
        b"--outer\n"
        b"Content-Type: application/pdf;\n"
        b" name*0*=UTF-8''r%C3%A9sum;\n"
        b" name*1*=%C3%A9.pdf\n"
        b"Content-Disposition: attachment; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf\n"
        b"Content-Transfer-Encoding: base64\n"
        b"Content-Language: fr\n"
        b"\n" + _B64.encode() + b"\n"
        b"--outer--\n"
        b"epilogue\n",
        "S",
        ("Work",),
        1672650000,
    ),
    (
        # A forwarded message as a message/rfc822 part.
        b"From: carol@example.test\n"
        b"To: alice@example.test, dave@example.test\n"
        b"Cc: Eve <eve@example.test>\n"
        b"Subject: Fwd: inner\n"
        b"Date: Tue, 15 Aug 2023 23:30:00 -0700\n"
        b"MIME-Version: 1.0\n"
        b"Content-Type: multipart/mixed; boundary=b1\n"
        b"\n"
        b"--b1\n"
        b"Content-Type: text/plain\n"
        b"\n"
        b"see attached\n"
        b"--b1\n"
        b"Content-Type: message/rfc822\n"
        b"Content-Description: the original\n"
        b"\n"
        b"From: frank@example.test\n"
        b"Subject: inner\n"
        b"Date: Mon, 14 Aug 2023 08:00:00 +0000\n"
        b"Content-Type: text/plain; charset=iso-8859-1\n"
        b"Content-Transfer-Encoding: quoted-printable\n"
        b"\n"
        b"caf=E9 inner body\n"
        b"two lines\n"
        b"--b1--\n",
        "SF",
        (),
        1692167400,
    ),
    (
        # RFC 2047 encoded words in Subject and From.
        b"From: =?UTF-8?B?SsO8cmdlbiBNw7xsbGVy?= <juergen@example.test>\n"
        b"To: alice@example.test\n"
        b"Subject: =?ISO-8859-1?Q?Gr=FC=DFe?= aus =?UTF-8?Q?M=C3=BCnchen?=\n"
        b"Date: 1 Mar 2024 12:00:00 +0000\n"
        b"\n"
        b"Servus\n",
        "",
        ("$Forwarded", "Work"),
        1709294400,
    ),
    (
        # A group address; no Date:, no From:.
        b"To: undisclosed-recipients:;\n"
        b"Cc: Team: anna@example.test, Ben <ben@example.test>;\n"
        b"Subject: no date, no from\n"
        b"\n"
        b"body\n",
        "",
        (),
        1709300000,
    ),
    (
        # No Content-Type (text/plain; us-ascii by default, RFC 2045 §5.2),
        # an 8bit body, a long folded header.
        b"From: gina@example.test\n"
        b"To: alice@example.test\n"
        b"Subject: a subject line that is long enough that it has to be\n"
        b"  folded over\n"
        b"\tthree lines\n"
        b"Date: Wed, 10 Apr 2024 09:15:00 +0200\n"
        b"X-Long: " + b"word " * 30 + b"\n"
        b"MIME-Version: 1.0\n"
        b"Content-Transfer-Encoding: 8bit\n"
        b"\n"
        b"Gr\xc3\xbc\xc3\x9fe, 8bit\n",
        "RS",
        (),
        1712733300,
    ),
    (
        # Empty body.
        b"From: hal@example.test\nTo: alice@example.test\nSubject: empty\n"
        b"Date: Thu, 11 Apr 2024 10:00:00 +0000\n\n",
        "",
        (),
        1712829600,
    ),
    (
        # The last line has no line end.
        b"From: ivan@example.test\nTo: alice@example.test\nSubject: no final newline\n"
        b"Date: Fri, 12 Apr 2024 10:00:00 +0000\n\nfirst line\nlast line, no newline",
        "F",
        (),
        1712916000,
    ),
]

APPENDED = b"From: zed@example.test\r\nSubject: appended\r\nDate: Sat, 13 Apr 2024 10:00:00 +0000\r\n\r\nnew\r\n"


def write_tree(maildir: Path) -> None:
    """The corpus into ``maildir``'s INBOX, with the special-use folders and
    ``Work.Projects`` (one message), as both servers are to find it."""
    ensure_maildir(maildir)
    folders = Folders(maildir)
    folders.ensure_special_use()
    folders.create(folder_name("Work.Projects"))
    for i, (message, letters, keywords, mtime) in enumerate(CORPUS, 1):
        crlf = len(message.replace(b"\n", b"\r\n"))
        all_letters = "".join(sorted(letters + keyword_letters(maildir, keywords)))
        path = (
            maildir
            / "cur"
            / f"{1700000000 + i}.M{i}P1Q1.ref,S={len(message)},W={crlf}:2,{all_letters}"
        )
        path.write_bytes(message)
        os.utime(path, (mtime, mtime))
    box = folders.path(folder_name("Work.Projects"))
    path = box / "cur" / "1700000100.M100P1Q1.ref,S=19,W=21:2,S"
    path.write_bytes(b"Subject: hi\n\nhello\n")
    os.utime(path, (1700000100, 1700000100))


# The script: one IMAP4rev1 client's session.  "{hms}" is replaced by the
# HIGHESTMODSEQ the server answered last.
SCRIPT = [
    'LIST "" "*"',
    'LIST (SPECIAL-USE) "" "*"',
    'LIST "" "%"',
    "STATUS INBOX (MESSAGES UIDNEXT UNSEEN)",
    "STATUS Work.Projects (MESSAGES UIDNEXT UNSEEN)",
    "EXAMINE INBOX",
    "FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE)",
    "FETCH 1:* (BODYSTRUCTURE)",
    "FETCH 1:* (BODY)",
    "FETCH 1:* (BODY.PEEK[HEADER.FIELDS (From Subject)])",
    "FETCH 1:* (BODY.PEEK[1.MIME])",
    "FETCH 1:* (BODY.PEEK[2]<0.10>)",
    "FETCH 1:* (BODY.PEEK[TEXT] BODY.PEEK[HEADER])",
    "FETCH 1:* (BODY.PEEK[])",
    "FETCH 1 (BINARY.PEEK[2] BINARY.SIZE[2] BINARY.PEEK[1.2])",
    "FETCH 2 (BODY.PEEK[2.HEADER] BODY.PEEK[2.TEXT] BODY.PEEK[2.1] BODYSTRUCTURE)",
    "SEARCH SEEN",
    "SEARCH UNSEEN FLAGGED",
    "SEARCH KEYWORD Work",
    "SEARCH FROM bob",
    "SEARCH SUBJECT inner",
    "SEARCH FROM ller",  # only in the decoded RFC 2047 word "Müller"
    "SEARCH LARGER 500",
    "SEARCH SMALLER 200",
    "SEARCH SENTSINCE 1-Mar-2024",
    "SEARCH SENTBEFORE 1-Mar-2024",
    "SEARCH SENTON 15-Aug-2023",
    "SEARCH SENTON 2-Jan-2023",
    "SEARCH BEFORE 1-Mar-2024",
    "SEARCH SINCE 10-Apr-2024",
    "SEARCH OR FLAGGED KEYWORD $Forwarded",
    "SEARCH NOT SEEN",
    "SEARCH RECENT",
    "SEARCH NEW",
    "SEARCH OLD",
    "UID SEARCH UID 2:4",
    "UID SEARCH UID 5:*",
    "SEARCH HEADER Message-ID nested",
    "SEARCH BODY inner",
    "SEARCH TEXT Servus",
    "SELECT INBOX (CONDSTORE)",
    "UID STORE 1:2 +FLAGS (Work $Label1)",
    "UID STORE 2 -FLAGS (\\Seen $Label1)",
    "FETCH 1:* (FLAGS)",
    "FETCH 1:* (FLAGS) (CHANGEDSINCE {hms})",
    "UID COPY 1:2 Archive",
    "UID MOVE 3 Trash",
    "STATUS Archive (MESSAGES UIDNEXT UNSEEN)",
    "STATUS Trash (MESSAGES UIDNEXT UNSEEN)",
    "STORE 1 +FLAGS.SILENT (\\Deleted)",
    "EXPUNGE",
    "UID STORE 5 +FLAGS (\\Deleted)",
    "UID STORE 6 +FLAGS (\\Deleted)",
    "UID EXPUNGE 5",
    "FETCH 1:* (UID FLAGS)",
    "CREATE Foo.Bar",
    'LIST "" "Foo*"',
    "RENAME Foo.Bar Foo.Baz",
    'LIST "" "Foo*"',
    "DELETE Foo.Baz",
    "DELETE Foo",
    'LIST "" "Foo*"',
    "DELETE Nonexistent",
    "SELECT Nonexistent",
    "SELECT INBOX",
    "UNSELECT",
    'APPEND INBOX (\\Seen Work) "13-Apr-2024 12:00:00 +0000"',
    "EXAMINE INBOX",
    "FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE)",
    "CLOSE",
]
LITERALS = {"APPEND": APPENDED}

# Differences where both answers are RFC-correct, taken out of the
# comparison by ``allow``.  (\\Recent is compared: RECENT counts, FLAGS and
# SEARCH RECENT / NEW / OLD match Dovecot's.)
ALLOWED = {
    # RFC 3501 §7.2.6: FLAGS lists the flags "applicable"; with \\* in
    # PERMANENTFLAGS (§7.1) a client may create any keyword, so listing the
    # keywords in use (Dovecot, and its FLAGS updates after STORE) is optional.
    "keywords in FLAGS",
    # RFC 7162 §3.1.2.1, §3.2: HIGHESTMODSEQ on SELECT and MODSEQ in a
    # FETCH that did not ask for it: we send them from the start, Dovecot
    # once CONDSTORE is enabled; both allowed.
    "modseq",
    # RFC 5258 §3 / RFC 9051 §7.3.1: a parent that exists only through its
    # children is \\Noselect; \\NonExistent says more, and implies it.
    "\\NonExistent",
    # RFC 5258 §4: without the CHILDREN return option a server may leave
    # \\HasChildren/\\HasNoChildren out of an extended LIST.
    "child attributes with selection options",
    # RFC 3501 §9 body-fld-lang: one language as a string or as a list.
    "body-fld-lang",
    # RFC 5322 §2.2.3: an unfolded ENVELOPE subject keeps its white space
    # (ours); Dovecot collapses runs of it to one space.
    "folding white space",
    # RFC 5530 §3: response codes are optional; we say NONEXISTENT.
    "NONEXISTENT",
    # RFC 9051 §6.4.4 BODY: "the body of the message"; Dovecot searches the
    # decoded text of the parts, we the body as stored (MIME boundaries too).
    "SEARCH BODY",
}
_SYSTEM_FLAGS = ("\\ANSWERED", "\\FLAGGED", "\\DELETED", "\\SEEN", "\\DRAFT", "\\*")


def normalise(command: str, lines: list[bytes]) -> list[Parsed]:
    """Responses as comparable values: no tag, no free text, no capability
    lists, UIDVALIDITY values as "*", FETCH items sorted, flags sorted and
    system flags upper-cased, mailbox names as strings; then ``ALLOWED``."""
    out: list[Parsed] = []
    select = command.split()[0] in ("SELECT", "EXAMINE")
    for raw in lines:
        tag, _, rest = raw.partition(b" ")
        status = re.match(rb"(OK|NO|BAD|BYE|PREAUTH)(?: \[([^\]]*(?:\[[^\]]*\][^\]]*)*)\])?", rest)
        if status:
            code = _code(parse(status[2] + b"\r\n", upper=False)) if status[2] else None
            if code and code[0] == "PERMANENTFLAGS" and not select:
                continue  # keywords in FLAGS
            if code and code[0] == "NONEXISTENT":
                code = None
            if tag == b"*" and code is None and status[1] == b"OK":
                continue  # free text only
            out.append(("TAGGED" if tag != b"*" else "*", status[1].decode(), code))
            continue
        values = _canonical(parse(rest, upper=False))
        name = values[0] if values else None
        if name == "CAPABILITY":
            continue
        if name == "FLAGS" and not select:
            continue  # keywords in FLAGS
        if name == "FLAGS":
            values = (name, _flags(values[1], system_only=True))
        if name in ("LIST", "LSUB"):
            values = (name, _list_attributes(command, values[1]), *values[2:3], _text(values[3]))
        elif name == "STATUS":
            values = (name, _text(values[1]), *values[2:])
        elif len(values) == 3 and values[1] == "FETCH" and isinstance(values[2], tuple):
            items = values[2]
            pairs = [(str(items[i]).upper(), items[i + 1]) for i in range(0, len(items), 2)]
            if "CHANGEDSINCE" not in command:
                pairs = [p for p in pairs if p[0] != "MODSEQ"]
            values = (values[0], "FETCH", tuple(sorted((n, _item(n, v)) for n, v in pairs)))
        out.append(values)
    return out


def _canonical(value: Parsed) -> Parsed:
    if isinstance(value, str) and value.startswith("\\"):
        return value.upper()
    if isinstance(value, str) and value.upper() in (
        "FETCH",
        "LIST",
        "STATUS",
        "SEARCH",
        "EXISTS",
        "EXPUNGE",
        "RECENT",
        "FLAGS",
    ):
        return value.upper()
    if isinstance(value, tuple):
        return tuple(_canonical(v) for v in value)
    return value


def _text(value: Parsed) -> Parsed:
    return value.encode() if isinstance(value, str) else value


def _flags(value: Parsed, system_only: bool = False) -> Parsed:
    assert isinstance(value, tuple), value
    kept = [f for f in value if not system_only or f in _SYSTEM_FLAGS]
    return tuple(sorted(kept, key=str))


def _list_attributes(command: str, attrs: Parsed) -> Parsed:
    assert isinstance(attrs, tuple), attrs
    drop = {"\\NONEXISTENT"}
    if re.match(r"LIST \(", command):
        drop |= {"\\HASCHILDREN", "\\HASNOCHILDREN"}
    return tuple(sorted(str(a) for a in attrs if a not in drop))


def _item(name: str, value: Parsed) -> Parsed:
    if name == "MODSEQ":
        return "*"
    if name == "FLAGS":
        return _flags(value)
    if name == "BODYSTRUCTURE":
        return _one_language(value)
    if name == "ENVELOPE" and isinstance(value, tuple) and isinstance(value[1], bytes):
        # Unfolding (RFC 5322 §2.2.3) removes only the CRLF; Dovecot also
        # collapses the white space; both leave the same words.
        return (value[0], re.sub(rb"\s+", b" ", value[1]), *value[2:])
    return value


def _one_language(value: Parsed) -> Parsed:
    """body-fld-lang as a list always (RFC 3501 §9 allows a string)."""
    if not isinstance(value, tuple):
        return value
    inner = tuple(_one_language(v) for v in value)
    # A single-part body: type subtype params id desc enc size [lines] md5 dsp lang loc.
    if len(inner) >= 11 and isinstance(inner[0], bytes) and inner[0].lower() != b"message":
        lang_at = 10 if inner[0].lower() == b"text" else 9
        if isinstance(inner[lang_at], bytes):
            inner = (*inner[:lang_at], (inner[lang_at],), *inner[lang_at + 1 :])
    return inner


def _code(code: tuple[Parsed, ...]) -> tuple[Parsed, ...] | None:
    name = str(code[0]).upper()
    if name in ("CAPABILITY", "HIGHESTMODSEQ"):
        return None
    if name == "UIDVALIDITY":
        return (name, "*")
    if name in ("COPYUID", "APPENDUID"):
        return (name, "*", *code[2:])
    if name == "PERMANENTFLAGS" and isinstance(code[1], tuple):
        return (name, _flags(tuple(str(f).upper() for f in code[1]), system_only=True))
    return (name, *code[1:])


class Peer:
    """One server under the script: a logged-in WireClient and its last
    HIGHESTMODSEQ."""

    def __init__(self, client: WireClient) -> None:
        self.client = client
        self.hms = 0
        lines = client.command(f'LOGIN "{ALICE}" "{ALICE_PW}"')
        assert lines[-1].split()[1] == b"OK", lines

    def run(self, command: str) -> list[bytes]:
        text = command.replace("{hms}", str(self.hms))
        lines = self.client.command(text, LITERALS.get(command.split()[0]))
        for line in lines:
            if m := re.search(rb"\[HIGHESTMODSEQ (\d+)\]", line):
                self.hms = int(m[1])
        return lines


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Peer, Peer]]:
    need(DOVECOT)
    need(DOVEADM)
    srv = PostofficeServer(tmp_path_factory.mktemp("reference"))
    srv.add_user(ALICE, ALICE_PW)
    write_tree(srv.maildir(ALICE))
    # Not under pytest's 0700 temp tree: Dovecot's processes run as other users.
    root = Path(tempfile.mkdtemp(prefix="po-dovecot-reference-"))
    root.chmod(0o755)
    write_tree(root / "mail" / "example.test" / "alice")
    dovecot = Dovecot(root / "dovecot", root / "mail", {ALICE: ALICE_PW}, imap=True)
    dovecot.conf.write_text(
        dovecot.conf.read_text()
        + "namespace inbox {\n  inbox = yes\n"
        + dovecot_mailbox_config()
        + "}\n"
    )
    dovecot.own_mail()
    srv.start()
    dovecot.start()
    ours = theirs = None
    try:
        sock = socket.create_connection(("127.0.0.1", srv.ports["imaps"]), timeout=15)
        ours = Peer(WireClient(context(srv).wrap_socket(sock, server_hostname="127.0.0.1")))
        theirs = Peer(
            WireClient(socket.create_connection(("127.0.0.1", dovecot.imap_port), timeout=15))
        )
        yield ours, theirs
    finally:
        for peer in (ours, theirs):
            if peer is not None:
                peer.client.close()
        dovecot.stop()
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_one_script_gives_the_same_answers(peers: tuple[Peer, Peer]) -> None:
    ours, theirs = peers
    differences = []
    for command in SCRIPT:
        got = normalise(command, ours.run(command))
        want = normalise(command, theirs.run(command))
        if command.startswith("SEARCH BODY"):
            continue  # SEARCH BODY in ALLOWED
        if sorted(map(repr, got)) != sorted(map(repr, want)):
            differences.append(f"{command}\n  ours:    {got}\n  dovecot: {want}")
    assert not differences, "\n".join(differences)
