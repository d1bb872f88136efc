"""The free-space reserve ([limits] min_free_space) over a real SMTP connection.

A reserve larger than any disk's free space stands for a disk that is nearly
full: new mail is refused at MAIL FROM with 452 4.3.1 (RFC 3463 "mail system
full"), before the client sends any data, and the session goes on.  The
fault tests (tests/faults/test_disk_full.py) fill a real small file system.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

from tests.support.server import PostofficeServer


def test_mail_is_refused_at_mail_from_below_the_reserve(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path, sections={"limits": {"min_free_space": 2**62}})
    srv.add_user("alice@example.test", "alice-password-1")
    srv.start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
            s.ehlo("client.test")
            code, text = s.mail("sender@remote.test")
            assert (code, text[:5]) == (452, b"4.3.1"), text
            code, text = s.rcpt("alice@example.test")
            assert code == 503, text  # no transaction was started
            assert s.noop()[0] == 250
        assert srv.messages("alice@example.test") == []
    finally:
        srv.stop()
    assert "below the reserve" in srv.log()
