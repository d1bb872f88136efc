"""TLS-RPT (RFC 8460): the store's counts per policy, sealing, the record parser."""

from __future__ import annotations

from pathlib import Path

from postoffice.policy.tls_rpt_report import mail_destinations, report_json, reporting_uris
from postoffice.policy.tls_rpt_store import (
    DAY,
    MAX_DETAILS,
    TlsFailure,
    TlsPolicy,
    add_blocking,
    connect,
    finish_blocking,
    seal_blocking,
    sealed_blocking,
)

NOW = 20000 * DAY + 3600.0


def test_reporting_uris_need_exactly_one_record() -> None:
    rua = "v=TLSRPTv1; rua=mailto:a@x.test,https://r.x.test/tls"
    assert reporting_uris([rua, "v=spf1 -all"]) == ("mailto:a@x.test", "https://r.x.test/tls")
    assert reporting_uris([rua, rua]) == ()  # §3: not exactly one: no reports
    assert reporting_uris(["v=TLSRPTv1x; rua=mailto:a@x.test"]) == ()
    assert [str(a) for a in mail_destinations(reporting_uris([rua]))] == ["a@x.test"]


def test_counts_per_policy_sealed_once(tmp_path: Path) -> None:
    db = connect(tmp_path / "r.sqlite3")
    day = int(NOW) // DAY
    none = TlsPolicy.none_found("x.test")
    sts = TlsPolicy("sts", "x.test", ("version: STSv1", "mode: testing"), ("mx.x.test",))
    fail = TlsFailure("starttls-not-supported", "192.0.2.1", "mx.x.test", "192.0.2.2")
    db.execute("BEGIN")
    for _ in range(3):
        add_blocking(db, day, none, None)
    add_blocking(db, day, none, fail)
    add_blocking(db, day, none, fail)
    add_blocking(db, day, sts, None)
    # Past MAX_DETAILS distinct failures a failure still counts in the summary.
    for n in range(MAX_DETAILS + 5):
        add_blocking(db, day, sts, TlsFailure("validation-failure", reason=f"r{n}"))
    db.execute("COMMIT")
    assert seal_blocking(db, NOW) == 0  # today is not over
    assert seal_blocking(db, NOW, today_too=True) == 1
    (report,) = sealed_blocking(db)
    by_type = {p.policy.type: p for p in report.policies}
    assert (by_type["no-policy-found"].successes, by_type["no-policy-found"].failures) == (3, 2)
    assert by_type["no-policy-found"].details == ((fail, 2),)
    assert by_type["sts"].failures == MAX_DETAILS + 5
    assert len(by_type["sts"].details) == MAX_DETAILS - 1  # one detail slot went to `fail`
    doc = report_json(report, organization="mail.s.test", contact="postmaster@s.test")
    assert b'"policy-type": "sts"' in doc and b'"mx-host": [' in doc
    finish_blocking(db, report.report_id, "sent", "")
    assert sealed_blocking(db) == []
    assert seal_blocking(db, NOW, today_too=True) == 0
