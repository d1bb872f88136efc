"""``[listen] metrics``: Prometheus metrics from the real server, scraped over HTTP.

Real mail over smtplib, real POP3 and IMAP logins and fetches, then GET
/metrics and the counters must have moved by exactly what was done.  The
scrape passes ``promtool check metrics``, and a real ``prometheus`` server
(its own config and storage in a temp dir, on loopback) scrapes the
endpoint and answers a query for one of our series.
"""

from __future__ import annotations

import imaplib
import json
import poplib
import smtplib
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.helpers import (
    ALICE,
    ALICE_PW,
    make_server,
    plain_auth,
    raw,
    tls_context,
    wait_for,
)
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_text(srv: PostofficeServer, path: str = "/metrics") -> str:
    url = f"http://127.0.0.1:{srv.ports['metrics']}{path}"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(response.read().decode())


def scrape(srv: PostofficeServer) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(scrape_text(srv)):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def message(size: int = 400, sender: str = "sender@client.test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ALICE
    msg["Subject"] = "metrics"
    msg["Message-ID"] = "<m@client.test>"
    msg["Date"] = "Thu, 01 Jan 2026 00:00:00 +0000"
    msg.set_content("x" * size)
    return msg


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[PostofficeServer]:
    server = make_server(tmp_path, limits={"max_message_size": 20000})
    yield server
    server.stop()


def test_counters_move_by_what_was_done(srv: PostofficeServer) -> None:
    before = scrape(srv)
    data = message().as_bytes()
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=20) as s:
        s.sendmail("sender@client.test", [ALICE], data)
        s.sendmail("sender@client.test", [ALICE], data)
        # No SIZE= on MAIL: refused only after the data, for being too big.
        assert s.mail("sender@client.test")[0] == 250
        assert s.rcpt(ALICE)[0] == 250
        assert s.data(message(30000).as_bytes())[0] == 552
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=20) as s:
        s.starttls(context=tls_context())
        s.ehlo()
        # One AUTH each (smtplib's login() would try a second mechanism after a failure).
        assert s.docmd("AUTH", "PLAIN " + plain_auth(ALICE, "wrong-password"))[0] == 535
        assert s.docmd("AUTH", "PLAIN " + plain_auth(ALICE, ALICE_PW))[0] == 235
    assert wait_for(lambda: len(srv.messages(ALICE)) == 2)
    pop = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=tls_context(), timeout=20)
    pop.user(ALICE)
    pop.pass_(ALICE_PW)
    assert pop.stat()[0] == 2
    pop.retr(1)
    pop.retr(2)
    pop.quit()
    imap = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=tls_context())
    imap.login(ALICE, ALICE_PW)
    imap.select("INBOX")
    imap.fetch("1:*", "(FLAGS RFC822.SIZE)")
    imap.logout()

    after = scrape(srv)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("postoffice_connections_total", listener="smtp") == 1
    assert delta("postoffice_connections_total", listener="submission") == 1
    assert delta("postoffice_connections_total", listener="pop3s") == 1
    assert delta("postoffice_connections_total", listener="imaps") == 1
    tls = "postoffice_tls_connections_total"
    assert delta(tls, listener="submission", version="TLSv1.3") == 1  # STARTTLS
    assert delta(tls, listener="pop3s", version="TLSv1.3") == 1  # implicit TLS
    assert delta(tls, listener="smtp", version="TLSv1.3") == 0
    msgs = "postoffice_smtp_messages_total"
    accepted = dict(listener="smtp", result="accepted", code="250", status="2.0.0")
    assert delta(msgs, **accepted) == 2
    assert delta(msgs, listener="smtp", result="refused", code="552", status="5.3.4") == 1
    # The 250 after DATA was timed twice (the refused message was never committed).
    assert delta("postoffice_smtp_data_commit_seconds_count") == 2
    assert delta("postoffice_smtp_data_commit_seconds_bucket", le="+Inf") == 2
    received = delta("postoffice_smtp_received_bytes_total", listener="smtp")
    assert 2 * len(data) <= received <= 2 * (len(data) + data.count(b"\n"))
    auth = "postoffice_auth_attempts_total"
    assert delta(auth, protocol="smtp", result="failure") == 1
    assert delta(auth, protocol="smtp", result="success") == 1
    assert delta(auth, protocol="pop3", result="success") == 1
    assert delta(auth, protocol="imap", result="success") == 1
    assert delta("postoffice_sessions_total", protocol="pop3") == 1
    assert delta("postoffice_sessions_total", protocol="imap") == 1
    assert delta("postoffice_pop3_commands_total", command="RETR") == 2
    assert delta("postoffice_pop3_commands_total", command="USER") == 1
    assert delta("postoffice_imap_commands_total", command="LOGIN") == 1
    assert delta("postoffice_imap_commands_total", command="SELECT") == 1
    assert delta("postoffice_imap_commands_total", command="FETCH") == 1
    assert delta("postoffice_fetch_seconds_count", protocol="pop3") == 2
    assert delta("postoffice_fetch_seconds_count", protocol="imap") == 1
    # Gauges read at scrape time: local mail never enters the queue.
    assert value(after, "postoffice_queue_messages") == 0
    assert value(after, "postoffice_queue_oldest_age_seconds") == 0


def test_refusals_before_the_data_by_reason(srv: PostofficeServer) -> None:
    """MAIL and RCPT refusals count with their reply code and enhanced
    status (RFC 3463), so an admin sees relay attempts apart from unknown
    users and oversized mail; a refusal after the data counts as the message's."""
    before = scrape(srv)
    client = raw(srv)
    # SIZE= over max_message_size (20000): refused at MAIL (RFC 1870 §6.1).
    assert client.cmd("MAIL FROM:<a@client.test> SIZE=900000")[0] == 552
    assert client.cmd("MAIL FROM:<a@client.test>")[0] == 250
    assert client.cmd("RCPT TO:<someone@elsewhere.test>")[0] == 554  # relay denied
    assert client.cmd("RCPT TO:<nobody@example.test>")[0] == 550  # unknown user
    assert client.cmd("RCPT TO:<nobody2@example.test>")[0] == 550
    assert client.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
    assert client.cmd("QUIT")[0] == 221
    client.close()
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=20) as s:
        assert s.mail("sender@client.test")[0] == 503  # the core's: no EHLO yet
        s.ehlo()
        assert s.mail("sender@client.test")[0] == 530  # no AUTH on submission
    after = scrape(srv)

    def delta(**labels: str) -> float:
        name = "postoffice_smtp_refused_commands_total"
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(listener="smtp", command="mail", code="552", status="5.3.4") == 1
    assert delta(listener="smtp", command="rcpt", code="554", status="5.7.1") == 1
    assert delta(listener="smtp", command="rcpt", code="550", status="5.1.1") == 2
    assert delta(listener="submission", command="mail", code="503", status="5.5.1") == 1
    assert delta(listener="submission", command="mail", code="530", status="5.7.0") == 1
    refused = [
        (dict(labels), n - before.get((name, labels), 0.0))
        for (name, labels), n in after.items()
        if name == "postoffice_smtp_refused_commands_total"
    ]
    assert sum(n for _, n in refused) == 6, refused  # nothing else, the 250s not at all
    # Nothing reached the data: no message counted, accepted or refused.
    msgs = [k for k in after if k[0] == "postoffice_smtp_messages_total"]
    assert all(after[k] == before.get(k, 0.0) for k in msgs)


def test_the_queue_and_delivery_attempts(tmp_path: Path) -> None:
    """Mail to a domain whose MX cannot be reached waits in the queue: the
    queue gauges show it, and the attempt counts as deferred, remote."""
    dead = free_port()
    srv = make_server(
        tmp_path,
        relay={"smarthost": f"127.0.0.1:{dead}", "retry_schedule": [3600]},
    )
    try:
        with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=20) as s:
            s.starttls(context=tls_context())
            s.login(ALICE, ALICE_PW)
            s.sendmail(ALICE, ["someone@remote.test"], message(sender=ALICE).as_bytes())

        def deferred() -> bool:
            samples = scrape(srv)
            key = ("postoffice_delivery_attempts_total", "deferred", "smarthost")
            return value(samples, key[0], result=key[1], destination=key[2]) == 1

        assert wait_for(deferred), scrape_text(srv)
        samples = scrape(srv)
        assert value(samples, "postoffice_queue_messages") == 1
        assert value(samples, "postoffice_queue_oldest_age_seconds") > 0
        assert value(samples, "postoffice_delivery_seconds_count", destination="smarthost") == 1
    finally:
        srv.stop()


def test_only_get_metrics_is_served_and_requests_are_bounded(srv: PostofficeServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as missing:
        scrape_text(srv, "/")
    assert missing.value.code == 404
    missing.value.close()
    with pytest.raises(urllib.error.HTTPError) as other:
        scrape_text(srv, "/metrics/../etc")
    assert other.value.code == 404
    other.value.close()
    assert scrape_text(srv, "/metrics?name=x")  # Prometheus may add a query string
    # A request head over 8 KiB is refused, not read on.
    with socket.create_connection(("127.0.0.1", srv.ports["metrics"]), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 431 ")
    # The endpoint still answers after that.
    assert "postoffice_" in scrape_text(srv)


def test_the_endpoint_holds_the_connection_caps(
    tmp_path: Path,
) -> None:
    # An ordinary listener: a client holding its connections open cannot
    # take more than [limits] max_connections_per_ip (the same 503 as the
    # https listener), and the port keeps answering others.
    srv = make_server(tmp_path, limits={"max_connections_per_ip": 3})
    held = []
    try:
        for _ in range(3):
            held.append(socket.create_connection(("127.0.0.1", srv.ports["metrics"]), timeout=10))
        with socket.create_connection(("127.0.0.1", srv.ports["metrics"]), timeout=10) as extra:
            assert extra.recv(100).startswith(b"HTTP/1.1 503 "), "over the cap"
        held.pop().close()
        for sock in held:
            sock.close()

        # The server frees a slot when it sees the close, on its own time
        # (a loaded machine may take a moment): a scrape then succeeds.
        def scrape_succeeds() -> bool:
            try:
                return "postoffice_" in scrape_text(srv)
            except urllib.error.HTTPError as error:
                assert error.code == 503, error
                return False

        assert wait_for(scrape_succeeds, timeout=10), (
            "a slot is freed once the held connections close"
        )
    finally:
        for sock in held:
            sock.close()
        srv.stop()


def test_metrics_off_with_an_empty_list(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path, sections={"listen": {"metrics": []}})
    srv.ports.pop("metrics")
    srv.start()
    try:
        assert "\n  metrics " not in srv.log()  # no banner line for it
        assert not (srv.data_dir / "metrics").exists()
    finally:
        srv.stop()


def test_extra_smtp_processes_are_counted(tmp_path: Path) -> None:
    """Multiprocess mode: connections taken by either smtp process add up."""
    srv = make_server(tmp_path, limits={"smtp_processes": 2})
    try:
        assert wait_for(lambda: "smtp process 1 accepting" in srv.log(), 20), srv.log()
        before = scrape(srv)  # the test's own start-up probes connected once
        for _ in range(12):
            with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=20) as s:
                s.sendmail("sender@client.test", [ALICE], message().as_bytes())
        samples = scrape(srv)
        connections = ("postoffice_connections_total", "smtp")
        assert (
            value(samples, connections[0], listener="smtp")
            - value(before, connections[0], listener="smtp")
            == 12
        )
        accepted = dict(listener="smtp", result="accepted", code="250", status="2.0.0")
        assert value(samples, "postoffice_smtp_messages_total", **accepted) == 12
        pids = {p.name.rsplit("_", 1)[-1] for p in (srv.data_dir / "metrics").glob("*.db")}
        assert len(pids) == 2, pids  # both processes wrote their counts
    finally:
        srv.stop()


def test_promtool_checks_the_scrape(
    require_program: Callable[[str], str], srv: PostofficeServer
) -> None:
    promtool = require_program("promtool")
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=20) as s:
        s.sendmail("sender@client.test", [ALICE], message().as_bytes())
    text = scrape_text(srv)
    assert "postoffice_smtp_data_commit_seconds_bucket" in text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result


def test_a_real_prometheus_scrapes_the_endpoint(
    require_program: Callable[[str], str], srv: PostofficeServer, tmp_path: Path
) -> None:
    prometheus = require_program("prometheus")
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=20) as s:
        s.sendmail("sender@client.test", [ALICE], message().as_bytes())
    web = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: postoffice\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{srv.ports['metrics']}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    query = "postoffice_smtp_messages_total{result='accepted'}"
    url = f"http://127.0.0.1:{web}/api/v1/query?query=" + urllib.request.quote(query)
    answer: list[dict[str, object]] = []

    def scraped() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.load(response)
        except (OSError, ValueError):
            return False
        answer[:] = body["data"]["result"]
        return bool(answer)

    try:
        assert wait_for(scraped, 60, 0.5), (tmp_path / "prometheus.log").read_text()
        series = answer[0]
        labels = series["metric"]
        assert isinstance(labels, dict)
        assert labels["job"] == "postoffice" and labels["code"] == "250"
        value_pair = series["value"]
        assert isinstance(value_pair, list) and float(value_pair[1]) == 1
        targets_url = f"http://127.0.0.1:{web}/api/v1/targets"
        with urllib.request.urlopen(targets_url, timeout=5) as response:
            targets = json.load(response)["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"], targets
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
