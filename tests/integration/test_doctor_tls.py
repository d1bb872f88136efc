"""``postoffice doctor`` on the TLS records: our MTA-STS policy's TXT record
(its id the served policy's), its host name and certificate, the TLS-RPT
record, and the smtp port's TLSA record for the current certificate, from
a real DNS server (dnsmasq, the TLSA record as a raw type-52 record)."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from postoffice.config.settings import load_settings
from postoffice.doctor import records_to_publish, run_doctor, tlsa_line
from postoffice.net.mta_sts import txt_text
from tests.integration.test_doctor import good_zone, lookups, statuses, with_dns
from tests.support.certs import Pki, make_pki
from tests.support.dns import auth_dns
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

HOST = "mail.example.test"
DOMAIN = "example.test"
STS_HOST = f"mta-sts.{DOMAIN}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), [HOST, STS_HOST])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[PostofficeServer]:
    https = free_port(("127.0.0.1",))
    srv = PostofficeServer(
        tmp_path_factory.mktemp("doctor-tls"),
        hostname=HOST,
        domains=(DOMAIN,),
        sections={
            "listen": {"https": [f"127.0.0.1:{https}"]},
            "tls": {"cert": str(pki.cert), "key": str(pki.key)},
            "mta_sts": {"mode": "enforce", "max_age": 604800},
        },
    )
    srv.ports["https"] = https
    srv.cli("dkim", "generate", DOMAIN)
    srv.start()
    yield srv
    srv.stop()


def tlsa_rr(line: str) -> str:
    """dnsmasq's --dns-rr for a "NAME. IN TLSA 3 1 1 HEX" line."""
    name, _in, _type, usage, selector, mtype, data = line.split()
    return (
        f"--dns-rr={name.rstrip('.')},52,{int(usage):02x}{int(selector):02x}{int(mtype):02x}{data}"
    )


def run(
    srv: PostofficeServer, tmp_path: Path, zone: dict[str, Any], *args: str
) -> tuple[int, dict[str, str], str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    dns = auth_dns(tmp_path, **zone)
    dns.args += list(args)
    dns.start()
    try:
        settings = with_dns(load_settings(srv.config), dns)
        out = io.StringIO()
        code = run_doctor(settings, lookups(settings), [DOMAIN], out)
    finally:
        dns.stop()
    return code, statuses(out.getvalue()), out.getvalue()


def test_tls_records_published_and_checked(
    server: PostofficeServer, pki: Pki, tmp_path: Path
) -> None:
    settings = load_settings(server.config)
    cert = x509.load_pem_x509_certificate(pki.cert.read_bytes())
    tlsa = tlsa_line(HOST, cert)
    sts_txt = txt_text(HOST, settings.mta_sts)
    sts_line = f'_mta-sts.{DOMAIN}. IN TXT "{sts_txt}"'
    rpt_line = f'_smtp._tls.{DOMAIN}. IN TXT "v=TLSRPTv1; rua=mailto:postmaster@{DOMAIN}"'
    cname = f"{STS_HOST}. IN CNAME {HOST}."
    # `init` prints the same lines (one helper).
    lines = records_to_publish(HOST, DOMAIN, [], settings.listen, settings.mta_sts)
    assert sts_line in lines and rpt_line in lines and cname in lines

    zone = good_zone(server)
    zone["txt"] |= {f"_mta-sts.{DOMAIN}": sts_txt, f"_smtp._tls.{DOMAIN}": rpt_line.split('"')[1]}
    # With [listen] https on, the autoconfig names are needed too.
    names = (STS_HOST, f"autoconfig.{DOMAIN}", f"autodiscover.{DOMAIN}")
    zone["hosts"] = {**zone["hosts"], **{name: ["127.0.0.1"] for name in names}}
    code, seen, text = run(server, tmp_path / "good", zone, tlsa_rr(tlsa))
    assert code == 0, text
    assert seen[sts_line] == "ok", text
    assert seen[rpt_line] == "ok", text
    assert seen[cname] == "ok", text
    assert seen[tlsa] == "ok", text
    assert tlsa.startswith(f"_25._tcp.{HOST}. IN TLSA 3 1 1 ") and len(tlsa.split()[-1]) == 64

    # A policy id of an older policy, a TLSA record of another key, no TLS-RPT
    # record: the first two are wrong (senders keep the old policy; DANE
    # senders defer), the last only a warning.
    stale = dict(zone, txt=dict(zone["txt"]))
    stale["txt"][f"_mta-sts.{DOMAIN}"] = "v=STSv1; id=20240101000000"
    del stale["txt"][f"_smtp._tls.{DOMAIN}"]
    other_key = tlsa.rsplit(" ", 1)[0] + " " + "ab" * 32
    code, seen, text = run(server, tmp_path / "stale", stale, tlsa_rr(other_key))
    assert code == 1
    assert seen[sts_line] == "wrong" and "another policy's id" in text
    assert seen[tlsa] == "wrong" and "DANE senders will defer" in text
    assert seen[rpt_line] == "warn"


def test_the_policy_id_changes_with_the_policy(server: PostofficeServer) -> None:
    settings = load_settings(server.config)
    enforce = txt_text(HOST, settings.mta_sts)
    testing = txt_text(HOST, type(settings.mta_sts)(mode="testing", max_age=604800))
    assert enforce != testing and enforce.startswith("v=STSv1; id=")
    assert txt_text("mx2.example.test", settings.mta_sts) != enforce


def test_init_prints_the_tls_records(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "postoffice",
            "-c",
            str(tmp_path / "postoffice.toml"),
            "init",
            HOST,
            DOMAIN,
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f'_smtp._tls.{DOMAIN}. IN TXT "v=TLSRPTv1; rua=mailto:postmaster@{DOMAIN}"' in (
        result.stdout
    )
    # [mta_sts] mode stays "none" in a new config: no policy record to publish yet.
    assert "_mta-sts." not in result.stdout
