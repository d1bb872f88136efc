"""Which names the ACME certificate holds, and when it is renewed without ARI."""

from __future__ import annotations

import datetime
from pathlib import Path

from postoffice.config.settings import AcmeSettings, ListenAddress, ListenSettings, Settings
from postoffice.net.cert_status import CertificateInfo, certificate_names
from postoffice.net.tls import served_certificate


def settings(https: bool, names: tuple[str, ...] = ()) -> Settings:
    listen = ListenSettings(https=(ListenAddress("0.0.0.0", 443),) if https else ())
    return Settings(
        hostname="mail.example.test",
        domains=("example.test", "example.org"),
        listen=listen,
        acme=AcmeSettings(directory="https://ca.test/dir", names=names),
    )


def test_hostname_and_extra_names_without_https() -> None:
    assert certificate_names(settings(False, ("imap.example.test", "mail.example.test"))) == [
        "mail.example.test",
        "imap.example.test",
    ]


def test_https_adds_mta_sts_and_autoconfig_per_domain() -> None:
    assert certificate_names(settings(True)) == [
        "mail.example.test",
        "mta-sts.example.test",
        "autoconfig.example.test",
        "mta-sts.example.org",
        "autoconfig.example.org",
    ]


def test_renewal_at_two_thirds_of_the_lifetime() -> None:
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    info = CertificateInfo(("a.test",), "CA", start, start + datetime.timedelta(days=90))
    assert info.default_renewal == start + datetime.timedelta(days=60)


def test_served_certificate_prefers_an_issued_one(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, acme=AcmeSettings(directory="https://ca.test/dir"))
    assert served_certificate(s) == ("self-signed", tmp_path / "tls" / "cert.pem")
    issued = tmp_path / "acme" / "certificate.pem"
    issued.parent.mkdir()
    issued.write_text("x")
    assert served_certificate(s) == ("acme", issued)
