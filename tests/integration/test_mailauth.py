"""SPF, DKIM and DMARC on the real server, with a real DNS server (dnsmasq).

The receiving server judges clients on 127.0.0.0/8 because its
``[checks] exempt_networks`` is narrowed to ``::1/128``.  Clients connect
from 127.0.0.1 (allowed by sender.test's SPF record) or 127.0.0.2 (not).
The end-to-end test sends from a second postoffice whose DKIM keys are made
with the CLI while it runs.
"""

from __future__ import annotations

import re
import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from postoffice.policy.dkim_keys import KeyStore, generate, txt_record
from postoffice.policy.dkim_sign import DkimSigner
from tests.support.dns import auth_dns, start_keeping_port
from tests.support.helpers import wait_for
from tests.support.peers import Dnsmasq
from tests.support.server import PostofficeServer

BOB = "bob@receiver.test"
RX_HOST = "mx.receiver.test"
# A signed field (RFC 6376 §5.4.1), one line of 2,431 octets.
LONG_HEADER = b"Subject: signed on the way out " + b"r" * 1200 + b" " + b"s" * 1200
LONG_BODY = bytes(range(33, 127)) * 26 + b"x" * 56  # 2,500 octets


@pytest.fixture(scope="module")
def signer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys of sender.test, as another mail system would have them."""
    data = tmp_path_factory.mktemp("sender-keys")
    generate(data, "sender.test")
    return data


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory, signer_dir: Path) -> Iterator[Dnsmasq]:
    keys = KeyStore(signer_dir).keys_for("sender.test")
    server = auth_dns(
        tmp_path_factory.mktemp("dns"),
        txt={
            "sender.test": "v=spf1 ip4:127.0.0.1 -all",
            "_dmarc.sender.test": "v=DMARC1; p=reject",
            "quarantine.test": "v=spf1 ip4:192.0.2.1 -all",
            "_dmarc.quarantine.test": "v=DMARC1; p=quarantine",
            **{k.key.dns_name: txt_record(k.key) for k in keys},
        },
    ).start()
    yield server
    server.stop()


def receiver_server(root: Path, dns: Dnsmasq, **relay: object) -> PostofficeServer:
    srv = PostofficeServer(
        root,
        domains=("receiver.test",),
        hostname=RX_HOST,
        sections={
            "checks": {"exempt_networks": ["::1/128"]},
            "relay": {"dns_servers": [dns.server], **relay},
        },
    )
    srv.add_user(BOB, "bob-password-3")
    return srv


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory, dns: Dnsmasq) -> Iterator[PostofficeServer]:
    srv = receiver_server(tmp_path_factory.mktemp("receiver"), dns)
    srv.start()
    yield srv
    srv.stop()


def message(
    from_addr: str = "alice@sender.test", body: str = "Hello Bob.\n", extra: str = ""
) -> bytes:
    return (
        f"From: Alice <{from_addr}>\nTo: {BOB}\nSubject: test\n"
        f"Date: Mon, 06 Jan 2025 10:00:00 +0000\nMessage-ID: <{abs(hash(body))}@sender.test>\n"
        f"{extra}\n{body}"
    ).encode()


def send(
    srv: PostofficeServer,
    msg: bytes,
    *,
    source: str = "127.0.0.1",
    sender: str = "alice@sender.test",
) -> tuple[int, bytes]:
    """The reply to the end of DATA."""
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], source_address=(source, 0), timeout=30) as c:
        c.ehlo("client.sender.test")
        try:
            c.sendmail(sender, [BOB], msg.replace(b"\n", b"\r\n"))
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients[BOB]
            return code, text
    return 250, b""


def sign(signer_dir: Path, msg: bytes) -> bytes:
    return DkimSigner(KeyStore(signer_dir)).sign_blocking(msg) + msg


def newest(srv: PostofficeServer, before: int) -> bytes:
    assert wait_for(lambda: len(srv.messages(BOB)) > before, 10)
    paths = srv.messages(BOB)
    return max(paths, key=lambda p: p.stat().st_mtime_ns).read_bytes()


def auth_results(content: bytes, helo: str = "client.sender.test") -> str:
    """Our Authentication-Results field, unfolded; it must come right after Received:."""
    head = content.split(b"\n\n", 1)[0].decode()
    fields = re.split(r"\n(?![ \t])", head)
    ours = [f for f in fields if f.lower().startswith(f"authentication-results: {RX_HOST};")]
    assert len(ours) == 1, head
    index = fields.index(ours[0])
    assert fields[index - 1].startswith(f"Received: from {helo} ")
    return re.sub(r"\n[ \t]+", " ", ours[0])


def test_unsigned_mail_with_spf_pass_is_accepted_and_forged_results_removed(
    receiver: PostofficeServer,
) -> None:
    before = len(receiver.messages(BOB))
    forged = (
        f"Authentication-Results: {RX_HOST}; dkim=pass header.d=sender.test\n"
        "Authentication-Results: elsewhere.test; spf=pass smtp.mailfrom=x@elsewhere.test\n"
    )
    code, _ = send(receiver, message(extra=forged))
    assert code == 250
    content = newest(receiver, before)
    ar = auth_results(content)
    assert "spf=pass (sender.test: ip4:127.0.0.1) smtp.mailfrom=alice@sender.test" in ar
    assert "dkim=none" in ar and "dmarc=pass" in ar
    assert b"dkim=pass header.d=sender.test" not in content  # the forgery is gone
    assert b"Authentication-Results: elsewhere.test; spf=pass" in content  # others stay


def test_spf_fail_under_dmarc_reject_is_refused_at_end_of_data(receiver: PostofficeServer) -> None:
    before = len(receiver.messages(BOB))
    code, text = send(receiver, message(body="from the wrong address\n"), source="127.0.0.2")
    assert (code, text[:5]) == (550, b"5.7.1")
    assert b"DMARC" in text
    assert wait_for(lambda: re.search(r"checks id=\S+ client=127\.0\.0\.2 ", receiver.log()), 5)
    assert len(receiver.messages(BOB)) == before


def test_signed_mail_passes_from_any_address(receiver: PostofficeServer, signer_dir: Path) -> None:
    before = len(receiver.messages(BOB))
    code, _ = send(receiver, sign(signer_dir, message(body="signed\n")), source="127.0.0.2")
    assert code == 250
    ar = auth_results(newest(receiver, before))
    assert "spf=fail" in ar
    assert ar.count("dkim=pass") == 2 and "header.d=sender.test" in ar
    assert "dmarc=pass" in ar


def test_tampered_signed_mail_is_refused(receiver: PostofficeServer, signer_dir: Path) -> None:
    signed = sign(signer_dir, message(body="Pay 10 EUR\n"))
    code, text = send(receiver, signed.replace(b"10 EUR", b"90 EUR"), source="127.0.0.2")
    assert (code, text[:5]) == (550, b"5.7.1")
    assert "dkim=fail:sender.test" in receiver.log()


def test_dns_failure_is_a_temporary_refusal(receiver: PostofficeServer) -> None:
    # dnsmasq refuses names outside .test: SPF and DMARC cannot be looked up now.
    msg = message(from_addr="alice@broken.example")
    code, text = send(receiver, msg, sender="alice@broken.example")
    assert (code, text[:5]) == (451, b"4.7.0")


def test_exempt_clients_are_not_judged(tmp_path: Path, dns: Dnsmasq) -> None:
    # The default exempt_networks (loopback): no lookups, no verdict, no header.
    srv = PostofficeServer(
        tmp_path,
        domains=("receiver.test",),
        hostname=RX_HOST,
        sections={"relay": {"dns_servers": [dns.server]}},
    )
    srv.add_user(BOB, "bob-password-3")
    srv.start()
    try:
        code, _ = send(srv, message(body="exempt\n"), source="127.0.0.2")
        assert code == 250
        content = newest(srv, 0)
        assert b"Authentication-Results" not in content
        assert "mailauth" not in srv.log()
    finally:
        srv.stop()


def zone_records(cli_output: str) -> dict[str, str]:
    """TXT records from the zone-file lines `dkim generate` printed."""
    found = {}
    for line in cli_output.splitlines():
        if " IN TXT " in line:
            name = line.split(". IN TXT", 1)[0]
            found[name] = "".join(re.findall(r'"([^"]*)"', line))
    return found


def test_submitted_mail_is_signed_once_and_verified_by_the_receiver(tmp_path: Path) -> None:
    """With lines over 998 octets in header and body: the relayed copy is folded
    (as Postfix's smtp_line_length_limit does) and signed in that form, so the
    receiver's dkimpy finds both signatures good; the local copy keeps them whole."""
    (tmp_path / "dns").mkdir()
    dns = auth_dns(
        tmp_path / "dns",
        txt={
            "example.test": "v=spf1 ip4:127.0.0.0/8 -all",
            "_dmarc.example.test": "v=DMARC1; p=reject",
        },
        mx=[("receiver.test", RX_HOST, 10)],
        hosts={RX_HOST: ["127.0.0.1"]},
    )
    receiver = receiver_server(tmp_path / "rx", dns)
    sender = PostofficeServer(
        tmp_path / "tx",
        sections={
            "relay": {
                "dns_servers": [dns.server],
                "mx_port": receiver.ports["smtp"],
                "retry_schedule": [1],
                "connect_timeout": 5,
            }
        },
    )
    sender.add_user("alice@example.test", "alice-password-1")
    sender.add_user("carol@example.test", "carol-password-1")
    sender.start()  # before the keys exist: they must be picked up without a restart
    try:
        out = sender.cli("dkim", "generate", "example.test").stdout
        records = zone_records(out)
        assert len(records) == 2 and all(n.endswith("._domainkey.example.test") for n in records)
        assert sender.cli("dkim", "show", "example.test").stdout.count(" IN TXT ") == 2
        for name, value in records.items():
            dns.args.append(f"--txt-record={name},{value}")
        start_keeping_port(dns)  # its port is in both configs already
        receiver.start()
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP("127.0.0.1", sender.ports["submission"], timeout=30) as c:
            c.starttls(context=ctx)
            c.login("alice@example.test", "alice-password-1")
            c.sendmail(
                "alice@example.test",
                [BOB, "carol@example.test"],
                b"From: Alice <alice@example.test>\r\nTo: bob@receiver.test\r\n"
                + LONG_HEADER
                + b"\r\n\r\nHi Bob.\r\n"
                + LONG_BODY
                + b"\r\n",
            )
        assert wait_for(lambda: len(receiver.messages(BOB)) == 1, 30), sender.log()
        content = receiver.messages(BOB)[0].read_bytes()
        assert content.count(b"DKIM-Signature:") == 2  # signed once: RSA and Ed25519
        ar = auth_results(content, helo="mail.example.test")
        assert ar.count("dkim=pass") == 2 and "header.d=example.test" in ar
        assert "spf=pass" in ar and "dmarc=pass" in ar
        assert max(len(line) for line in content.split(b"\n")) <= 998
        assert content.replace(b"\n ", b"").endswith(b"\nHi Bob.\n" + LONG_BODY + b"\n")
        # The local copy was not signed: local deliveries need no signature.
        local = sender.messages("carol@example.test")
        assert len(local) == 1 and b"DKIM-Signature" not in local[0].read_bytes()
        assert (
            local[0].read_bytes().endswith(LONG_HEADER + b"\n\nHi Bob.\n" + LONG_BODY + b"\n")
        )  # kept whole, byte for byte
    finally:
        sender.stop()
        receiver.stop()
        dns.stop()


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc), zombies left out."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("how", ["stop", "kill -9"])
def test_dkim_worker_processes_end_with_the_server(tmp_path: Path, dns: Dnsmasq, how: str) -> None:
    srv = receiver_server(tmp_path, dns)
    srv.start()
    assert srv.proc is not None
    server_pid = srv.proc.pid
    assert wait_for(lambda: len(children(server_pid)) == 2, 10)  # DKIM verifiers, ready
    workers = children(server_pid)
    cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in workers]
    assert all(b"postoffice.policy.cpu_workers" in c for c in cmdlines), cmdlines
    if how == "stop":
        assert srv.stop() == 0
    else:
        srv.kill()
    assert wait_for(lambda: not any(alive(p) for p in workers), 10)


def test_dmarc_quarantine_goes_to_the_junk_folder(receiver: PostofficeServer) -> None:
    """RFC 7489 §6.3 p=quarantine: a message failing DMARC is accepted into
    the recipient's Junk folder (RFC 6154 \\Junk), not INBOX, with a header
    saying why."""
    before = len(receiver.messages(BOB))
    junk = receiver.maildir(BOB) / ".Junk" / "new"
    junk_before = len(list(junk.iterdir())) if junk.is_dir() else 0
    code, _text = send(
        receiver,
        message("mallory@quarantine.test", body="Quarantine me.\n"),
        sender="mallory@quarantine.test",
    )
    assert code == 250
    assert wait_for(lambda: junk.is_dir() and len(list(junk.iterdir())) == junk_before + 1), (
        receiver.log()
    )
    assert len(receiver.messages(BOB)) == before  # not in INBOX
    content = max(junk.iterdir(), key=lambda p: p.stat().st_mtime_ns).read_bytes()
    assert b"X-Postoffice-Quarantine: DMARC policy of quarantine.test is quarantine" in content
    ar = auth_results(content)
    assert "dmarc=fail" in ar and "p=quarantine dis=quarantine" in ar
    assert (receiver.maildir(BOB) / ".Junk" / "maildirfolder").exists()
    assert "quarantined" in receiver.log()
