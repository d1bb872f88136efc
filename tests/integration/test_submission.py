"""Submission (RFC 6409) on 587 (STARTTLS) and 465 (implicit TLS) with AUTH (RFC 4954)."""

from __future__ import annotations

import base64
import smtplib
import ssl
import subprocess

import pytest

from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def submit(server: PostofficeServer) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=15)
    client.ehlo("laptop.test")
    client.starttls(context=tls_context())
    client.ehlo("laptop.test")
    return client


def test_auth_is_not_offered_or_accepted_before_tls(server: PostofficeServer) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10) as client:
        client.ehlo("laptop.test")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        plain = base64.b64encode(b"\0alice@example.test\0alice-password-1").decode()
        code, _ = client.docmd("AUTH", f"PLAIN {plain}")
        assert code == 538
        code, _ = client.docmd("MAIL", "FROM:<alice@example.test>")
        assert code == 530


def test_starttls_auth_plain_and_login(server: PostofficeServer) -> None:
    with submit(server) as client:
        assert "PLAIN" in client.esmtp_features["auth"]
        assert "LOGIN" in client.esmtp_features["auth"]
        client.login("alice@example.test", "alice-password-1")
        client.sendmail(
            "alice@example.test",
            ["bob@example.test"],
            b"From: alice@example.test\r\nSubject: hi bob\r\n\r\nhello\r\n",
        )
    with submit(server) as client:
        client.user, client.password = "bob@example.test", "bob-password-2"
        code, _ = client.auth("LOGIN", client.auth_login)
        assert code == 235
    (path,) = server.messages("bob@example.test")
    content = path.read_bytes()
    assert b"with ESMTPSA id" in content
    assert b"\nMessage-ID: <" in content and b"@mail.example.test>\n" in content
    assert b"\nDate: " in content


def test_implicit_tls_submissions(server: PostofficeServer) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", server.ports["submissions"], timeout=15, context=tls_context()
    ) as client:
        client.ehlo("laptop.test")
        assert not client.has_extn("starttls")
        client.login("alice@example.test", "alice-password-1")
        client.sendmail(
            "alice@example.test",
            ["bob@example.test"],
            b"From: Alice <alice@example.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            b"Message-ID: <given@laptop.test>\r\n\r\nhello\r\n",
        )
    (path,) = server.messages("bob@example.test")
    content = path.read_bytes()
    assert content.count(b"Message-ID:") == 1 and b"<given@laptop.test>" in content
    assert content.count(b"\nDate:") == 1


def test_wrong_password_is_535(server: PostofficeServer) -> None:
    with submit(server) as client, pytest.raises(smtplib.SMTPAuthenticationError) as err:
        client.login("alice@example.test", "wrong")
    assert err.value.smtp_code == 535


@pytest.mark.abuse
def test_envelope_sender_spoofing_is_553(server: PostofficeServer) -> None:
    with submit(server) as client:
        client.login("alice@example.test", "alice-password-1")
        code, msg = client.mail("bob@example.test")
        assert code == 553 and msg.startswith(b"5.7.1")
        code, _ = client.mail("ceo@elsewhere.test")
        assert code == 553
        code, _ = client.mail("")
        assert code == 553


@pytest.mark.abuse
def test_from_header_spoofing_is_553(server: PostofficeServer) -> None:
    with submit(server) as client:
        client.login("alice@example.test", "alice-password-1")
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail(
                "alice@example.test",
                ["bob@example.test"],
                b"From: Bob <bob@example.test>\r\nSubject: x\r\n\r\nfake\r\n",
            )
        assert err.value.smtp_code == 553
    assert server.messages("bob@example.test") == []


@pytest.mark.abuse
def test_from_spoofing_in_a_message_without_body_is_553(server: PostofficeServer) -> None:
    with submit(server) as client:
        client.login("alice@example.test", "alice-password-1")
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail(
                "alice@example.test", ["bob@example.test"], b"From: bob@example.test\r\n"
            )
        assert err.value.smtp_code == 553


def test_alias_and_plus_address_may_be_used_as_sender(server: PostofficeServer) -> None:
    server.cli("alias", "add", "sales@example.test", "alice@example.test")
    with submit(server) as client:
        client.login("alice@example.test", "alice-password-1")
        client.sendmail(
            "sales@example.test", ["bob@example.test"], b"From: sales@example.test\r\n\r\nhi\r\n"
        )
        client.sendmail(
            "alice+shop@example.test",
            ["bob@example.test"],
            b"From: alice+shop@example.test\r\n\r\nhi\r\n",
        )
    assert len(server.messages("bob@example.test")) == 2


def test_mail_without_auth_is_530(server: PostofficeServer) -> None:
    with submit(server) as client:
        code, _ = client.mail("alice@example.test")
        assert code == 530


def test_auth_cancel_and_garbage(server: PostofficeServer) -> None:
    client = RawSmtp("127.0.0.1", server.ports["submissions"])
    client.starttls()
    assert client.reply()[0] == 220
    assert client.cmd("EHLO laptop.test")[0] == 250
    assert client.cmd("AUTH PLAIN")[0] == 334
    assert client.cmd("*")[0] == 501
    assert client.cmd("AUTH PLAIN !!!notbase64")[0] == 501
    assert client.cmd("AUTH CRAM-MD5")[0] == 504
    client.close()


@pytest.mark.interop
def test_swaks_submission_587_and_465(server: PostofficeServer, require_program) -> None:  # type: ignore[no-untyped-def]
    swaks = require_program("swaks")
    common = [
        "--from",
        "alice@example.test",
        "--to",
        "bob@example.test",
        "--auth",
        "LOGIN",
        "--auth-user",
        "alice@example.test",
        "--auth-password",
        "alice-password-1",
        "--header",
        "From: alice@example.test",
    ]
    for extra in (
        ["--port", str(server.ports["submission"]), "-tls"],
        ["--port", str(server.ports["submissions"]), "-tlsc"],
    ):
        result = subprocess.run(
            [swaks, "--server", "127.0.0.1", *extra, *common],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    # without TLS, swaks cannot authenticate
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(server.ports["submission"]), *common],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert len(server.messages("bob@example.test")) == 2


@pytest.mark.abuse
def test_from_hidden_behind_a_huge_header_block_is_refused(server: PostofficeServer) -> None:
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 120) for i in range(2200))  # > 256 KiB
    with submit(server) as client:
        client.login("alice@example.test", "alice-password-1")
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail(
                "alice@example.test",
                ["bob@example.test"],
                b"From: alice@example.test\r\n" + padding + b"From: ceo@example.test\r\n\r\nhi\r\n",
            )
        assert err.value.smtp_code == 552
    assert server.messages("bob@example.test") == []


def test_starttls_forgets_a_login_made_before_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    srv = PostofficeServer(tmp_path, sections={"auth": {"allow_plaintext_loopback": True}})
    srv.add_user("alice@example.test", "alice-password-1")
    srv.start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=15) as client:
            client.ehlo("laptop.test")
            client.login("alice@example.test", "alice-password-1")  # plaintext, allowed on loopback
            client.starttls(context=tls_context())
            client.ehlo("laptop.test")
            code, _ = client.mail("alice@example.test")
            assert code == 530  # RFC 3207 §4.2: AUTH again after TLS
    finally:
        srv.stop()
