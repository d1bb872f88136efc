"""The POP3 session's pieces that need no socket: the read-ahead encoding."""

from __future__ import annotations

from pathlib import Path

from postoffice.net.pop3_session import _read_wire
from postoffice.protocol.pop3 import wire_form
from postoffice.storage.maildir import ensure_maildir
from postoffice.storage.pop3_mailbox import Pop3Mailbox


def test_read_ahead_gives_the_wire_form_or_none_when_the_size_is_off(tmp_path: Path) -> None:
    ensure_maildir(tmp_path)
    messages = [b"a\n.b\n", b"no final newline", b"short\n", b"gone\n"]
    for i, data in enumerate(messages):
        (tmp_path / "new" / f"170000000{i}.m").write_bytes(data)
    box = Pop3Mailbox.open(tmp_path)
    try:
        (tmp_path / "new" / "1700000002.m").write_bytes(b"sh\n")  # shrank: a short read
        (tmp_path / "new" / "1700000003.m").unlink()
        assert _read_wire(box, box.messages) == [
            wire_form(messages[0]),
            wire_form(messages[1]),
            None,
            None,
        ]
    finally:
        box.close()
