"""SPF evaluation (RFC 7208) against a real DNS server (dnsmasq)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from postoffice.dns.resolver import DnsResolver, Resolver
from postoffice.policy.spf import SpfResult, check_host
from tests.support.dns import auth_dns, resolver_for
from tests.support.peers import Dnsmasq

CLIENT = "192.0.2.10"

RECORDS = {
    "pass.test": "v=spf1 ip4:192.0.2.0/24 -all",
    "fail.test": "v=spf1 ip4:198.51.100.1 -all",
    "soft.test": "v=spf1 ip4:198.51.100.1 ~all",
    "neutral.test": "v=spf1 ?all",
    "nomatch.test": "v=spf1 ip4:198.51.100.1",
    "two.test": ["v=spf1 -all", "v=spf1 +all"],
    "other-txt.test": ["google-site-verification=abc", "v=spf10 +all"],
    "include.test": "v=spf1 include:pass.test -all",
    "include-none.test": "v=spf1 include:nothing.test -all",
    "include-fail.test": "v=spf1 include:fail.test ?all",
    "redirect.test": "v=spf1 redirect=pass.test",
    "redirect-none.test": "v=spf1 redirect=nothing.test",
    "a.test": "v=spf1 a -all",
    "a-other.test": "v=spf1 a:host.a.test/24 -all",
    "mx.test": "v=spf1 mx -all",
    "exists.test": "v=spf1 exists:%{i}.allow.test -all",
    "ptr.test": "v=spf1 ptr -all",
    "macro.test": "v=spf1 exists:%{l1r-}.%{o} -all",
    "void.test": "v=spf1 a:v1.nothing.test a:v2.nothing.test a:v3.nothing.test +all",
    "loop.test": "v=spf1 include:loop.test -all",
    "many.test": "v=spf1 " + " ".join(f"a:h{i}.a.test" for i in range(11)) + " +all",
    "syntax.test": "v=spf1 ip4:192.0.2.10 foo:bar -all",
    "badcidr.test": "v=spf1 ip4:192.0.2.0/33 -all",
    "v6.test": "v=spf1 ip6:2001:db8::/32 -all",
    "temp.test": "v=spf1 include:broken.example -all",
    "mod.test": "v=spf1 unknown=thing exp=explain.test ip4:192.0.2.10 -all",
    "case.test": "V=SPF1 IP4:192.0.2.10 -ALL",
    "nothing.test": "not spf",
}


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    server = auth_dns(
        tmp_path_factory.mktemp("spf-dns"),
        txt=RECORDS,
        hosts={
            "a.test": [CLIENT],
            "host.a.test": ["192.0.2.200"],
            **{f"h{i}.a.test": ["203.0.113.1"] for i in range(11)},
            "mx1.mx.test": ["203.0.113.5"],
            "mx2.mx.test": [CLIENT],
            "192.0.2.10.allow.test": ["127.0.0.2"],
            "client.ptr.test": [CLIENT],
            "jane.example.m.test": ["127.0.0.2"],
        },
        mx=[("mx.test", "mx1.mx.test", 10), ("mx.test", "mx2.mx.test", 20)],
        ptr={"10.2.0.192.in-addr.arpa": "client.ptr.test"},
    ).start()
    yield server
    server.stop()


def check(
    resolver: Resolver,
    domain: str,
    ip: str = CLIENT,
    local: str = "jane",
    sender_domain: str = "",
) -> tuple[SpfResult, str]:
    verdict = asyncio.run(
        check_host(resolver, ip, domain, (local, sender_domain or domain), "client.test")
    )
    return verdict.result, verdict.reason


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("pass.test", SpfResult.PASS),
        ("fail.test", SpfResult.FAIL),
        ("soft.test", SpfResult.SOFTFAIL),
        ("neutral.test", SpfResult.NEUTRAL),
        ("nomatch.test", SpfResult.NEUTRAL),  # §4.7: no match, no redirect
        ("include.test", SpfResult.PASS),
        ("include-fail.test", SpfResult.NEUTRAL),  # include's fail is "no match"
        ("redirect.test", SpfResult.PASS),
        ("a.test", SpfResult.PASS),
        ("a-other.test", SpfResult.PASS),  # 192.0.2.200/24 covers the client
        ("mx.test", SpfResult.PASS),  # the second MX host is the client
        ("exists.test", SpfResult.PASS),  # %{i} expands to the client address
        ("ptr.test", SpfResult.PASS),  # validated reverse name inside ptr.test
        ("mod.test", SpfResult.PASS),  # unknown modifiers and exp= are ignored
        ("case.test", SpfResult.PASS),
        ("v6.test", SpfResult.FAIL),  # an IPv4 client never matches ip6:
    ],
)
def test_results(dns: Dnsmasq, domain: str, expected: SpfResult) -> None:
    result, reason = check(resolver_for(dns), domain, sender_domain="example.m.test")
    assert result is expected, reason


@pytest.mark.parametrize(
    ("domain", "words"),
    [
        ("two.test", "2 SPF records"),  # §4.5
        ("include-none.test", "include:nothing.test"),  # §5.2
        ("redirect-none.test", "redirect=nothing.test"),  # §6.1
        ("void.test", "void DNS lookups"),  # §4.6.4: more than two
        ("loop.test", "DNS-querying terms"),  # the 10-term limit ends the recursion
        ("many.test", "DNS-querying terms"),  # §4.6.4: 11 "a" terms
        ("syntax.test", "unknown mechanism"),  # §4.6: even after a matching term
        ("badcidr.test", "CIDR"),
    ],
)
def test_permanent_errors(dns: Dnsmasq, domain: str, words: str) -> None:
    result, reason = check(resolver_for(dns), domain)
    assert result is SpfResult.PERMERROR
    assert words in reason


def test_macros_split_reverse_and_truncate(dns: Dnsmasq) -> None:
    # RFC 7208 §7.4: %{l1r-} of "jane-doe" is "jane"; %{o} is the sender's domain.
    r = resolver_for(dns)
    assert (
        check(r, "macro.test", local="jane-doe", sender_domain="example.m.test")[0]
        is SpfResult.PASS
    )
    assert (
        check(r, "macro.test", local="doe-jane", sender_domain="example.m.test")[0]
        is SpfResult.FAIL
    )


def test_no_record_is_none(dns: Dnsmasq) -> None:
    r = resolver_for(dns)
    assert check(r, "nothing.test")[0] is SpfResult.NONE  # TXT, but not SPF
    assert check(r, "other-txt.test")[0] is SpfResult.NONE  # "v=spf10" is not v=spf1
    assert check(r, "nowhere.test")[0] is SpfResult.NONE  # NXDOMAIN
    assert check(r, "single-label")[0] is SpfResult.NONE  # §4.3: not a FQDN


def test_dns_failure_is_temperror(dns: Dnsmasq) -> None:
    # dnsmasq REFUSEs names outside .test: the resolver's "servers failed".
    r = resolver_for(dns)
    assert check(r, "broken.example")[0] is SpfResult.TEMPERROR
    assert check(r, "temp.test")[0] is SpfResult.TEMPERROR  # inside an include, too


def test_unreachable_dns_server_is_temperror(dns: Dnsmasq) -> None:
    import socket

    from postoffice.config.settings import ListenAddress
    from tests.support.ports import free_port

    dead = DnsResolver(
        [ListenAddress("127.0.0.1", free_port(kind=socket.SOCK_DGRAM))], lifetime=1.0
    )
    assert check(dead, "pass.test")[0] is SpfResult.TEMPERROR


def test_ipv6_client_and_mapped_ipv4(dns: Dnsmasq) -> None:
    r = resolver_for(dns)
    assert check(r, "v6.test", ip="2001:db8::25")[0] is SpfResult.PASS
    assert check(r, "v6.test", ip="2001:db9::25")[0] is SpfResult.FAIL
    # An IPv4 client seen on a dual-stack socket is checked as IPv4 (§5).
    assert check(r, "pass.test", ip="::ffff:192.0.2.10")[0] is SpfResult.PASS
