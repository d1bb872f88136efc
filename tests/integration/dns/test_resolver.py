"""DnsResolver against a real DNS server (dnsmasq on a loopback port)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from postoffice.config.settings import ListenAddress
from postoffice.delivery.mx import MxRecord
from postoffice.delivery.resolver import DnsError, DnsResolver, StaticResolver
from tests.support.peers import Dnsmasq
from tests.support.ports import free_port


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    server = Dnsmasq(
        tmp_path_factory.mktemp("dns"),
        mx=[("multi.test", "mx1.multi.test", 10), ("multi.test", "mx2.multi.test", 20)],
        hosts={
            "mx1.multi.test": ["127.0.0.2"],
            "mx2.multi.test": ["127.0.0.3", "::1"],
            "plain.test": ["127.0.0.4"],
        },
        null_mx=["nullmx.test"],
    ).start()
    yield server
    server.stop()


def resolver(dnsmasq: Dnsmasq) -> DnsResolver:
    return DnsResolver([ListenAddress("127.0.0.1", dnsmasq.port)], lifetime=5.0)


def test_mx_records(dnsmasq: Dnsmasq) -> None:
    records = asyncio.run(resolver(dnsmasq).mx("multi.test"))
    assert sorted(records, key=lambda r: r.preference) == [
        MxRecord(10, "mx1.multi.test"),
        MxRecord(20, "mx2.multi.test"),
    ]


def test_addresses_ipv6_first(dnsmasq: Dnsmasq) -> None:
    r = resolver(dnsmasq)
    assert asyncio.run(r.addresses("mx2.multi.test")) == ["::1", "127.0.0.3"]
    assert asyncio.run(r.addresses("mx1.multi.test")) == ["127.0.0.2"]


def test_domain_without_mx_gives_empty_list(dnsmasq: Dnsmasq) -> None:
    assert asyncio.run(resolver(dnsmasq).mx("plain.test")) == []


def test_null_mx_comes_back_as_root_target(dnsmasq: Dnsmasq) -> None:
    assert asyncio.run(resolver(dnsmasq).mx("nullmx.test")) == [MxRecord(0, "")]


def test_nonexistent_domain_is_permanent(dnsmasq: Dnsmasq) -> None:
    with pytest.raises(DnsError) as err:
        asyncio.run(resolver(dnsmasq).mx("nowhere.test"))
    assert not err.value.temporary
    assert asyncio.run(resolver(dnsmasq).addresses("nowhere.test")) == []


def test_refused_query_is_temporary(dnsmasq: Dnsmasq) -> None:
    # dnsmasq is authoritative only for .test: it REFUSEs anything else.
    with pytest.raises(DnsError) as err:
        asyncio.run(resolver(dnsmasq).mx("example.org"))
    assert err.value.temporary


def test_silent_server_is_temporary() -> None:
    silent = DnsResolver(
        [ListenAddress("127.0.0.1", free_port(kind=socket.SOCK_DGRAM))], lifetime=0.5
    )
    with pytest.raises(DnsError) as err:
        asyncio.run(silent.addresses("anything.test"))
    assert err.value.temporary


def test_static_resolver_follows_the_same_contract() -> None:
    r = StaticResolver(
        mx={"a.test": [MxRecord(5, "mx.a.test")]},
        hosts={"mx.a.test": ["127.0.0.2", "::1"], "b.test": ["127.0.0.3"]},
        failing=["broken.test"],
    )
    assert asyncio.run(r.mx("a.test")) == [MxRecord(5, "mx.a.test")]
    assert asyncio.run(r.mx("b.test")) == []
    assert asyncio.run(r.addresses("mx.a.test")) == ["::1", "127.0.0.2"]
    with pytest.raises(DnsError) as err:
        asyncio.run(r.mx("c.test"))
    assert not err.value.temporary
    with pytest.raises(DnsError) as err:
        asyncio.run(r.mx("broken.test"))
    assert err.value.temporary
