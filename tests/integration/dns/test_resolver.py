"""The Resolver contract, against a real DNS server (dnsmasq on a loopback
port) and against StaticResolver holding the same records: the fake that
unit tests use answers as the real resolver does."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine, Iterator
from typing import TypeVar

import pytest

from postoffice.config.settings import ListenAddress
from postoffice.dns.mx import MxRecord
from postoffice.dns.resolver import DnsError, DnsResolver, Resolver
from postoffice.dns.static import StaticResolver
from tests.support.dns import auth_dns
from tests.support.peers import Dnsmasq
from tests.support.ports import free_port

T = TypeVar("T")

MX = [("multi.test", "mx1.multi.test", 10), ("multi.test", "mx2.multi.test", 20)]
HOSTS = {
    "mx1.multi.test": ["127.0.0.2"],
    "mx2.multi.test": ["127.0.0.3", "::1"],
    "plain.test": ["127.0.0.4"],
}
TXT = {"txt.test": ["v=spf1 -all", "second record"], "plain.test": ["v=spf1 a -all"]}
NULL_MX = "nullmx.test"
# dnsmasq answers for .test and, here, for 192.0.2.0/24's reverse zone
# (NXDOMAIN for what it does not list); everything else it REFUSEs, which
# a resolver sees as a temporary failure: StaticResolver's ``failing``.
NO_PTR = "192.0.2.1"
REFUSED = ("example.org", "198.51.100.1")


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    server = auth_dns(
        tmp_path_factory.mktemp("dns"), mx=MX, hosts=HOSTS, txt=TXT, null_mx=[NULL_MX]
    )
    server.args.append("--local=/2.0.192.in-addr.arpa/")
    server.start()
    yield server
    server.stop()


def static() -> StaticResolver:
    mx: dict[str, list[MxRecord]] = {NULL_MX: [MxRecord(0, "")]}
    for domain, host, preference in MX:
        mx.setdefault(domain, []).append(MxRecord(preference, host))
    # dnsmasq makes the PTR of every --host-record address.
    ptr = {address: [name] for name, addresses in HOSTS.items() for address in addresses}
    return StaticResolver(mx=mx, hosts=HOSTS, txt=TXT, ptr=ptr, failing=REFUSED)


@pytest.fixture(params=["dnspython", "static"])
def resolver(request: pytest.FixtureRequest) -> Resolver:
    if request.param == "static":
        return static()
    server = request.getfixturevalue("dnsmasq")
    return DnsResolver([ListenAddress("127.0.0.1", server.port)], lifetime=5.0)


def run(lookup: Coroutine[object, object, T]) -> T:
    return asyncio.run(lookup)


def error(lookup: Coroutine[object, object, object]) -> DnsError:
    with pytest.raises(DnsError) as err:
        run(lookup)
    return err.value


def test_mx_records(resolver: Resolver) -> None:
    assert sorted(run(resolver.mx("multi.test")), key=lambda r: r.preference) == [
        MxRecord(10, "mx1.multi.test"),
        MxRecord(20, "mx2.multi.test"),
    ]


def test_domain_without_mx_gives_empty_list(resolver: Resolver) -> None:
    assert run(resolver.mx("plain.test")) == []
    assert run(resolver.mx("txt.test")) == []


def test_null_mx_comes_back_as_root_target(resolver: Resolver) -> None:
    assert run(resolver.mx(NULL_MX)) == [MxRecord(0, "")]


def test_addresses_ipv6_first(resolver: Resolver) -> None:
    assert run(resolver.addresses("mx2.multi.test")) == ["::1", "127.0.0.3"]
    assert run(resolver.addresses("mx1.multi.test")) == ["127.0.0.2"]
    assert run(resolver.addresses("MX1.Multi.Test.")) == ["127.0.0.2"]


def test_nonexistent_domain_is_permanent(resolver: Resolver) -> None:
    assert not error(resolver.mx("nowhere.test")).temporary
    assert not error(resolver.txt("nowhere.test")).temporary
    assert not error(resolver.ips("nowhere.test", "A")).temporary
    # For routing, a host that does not exist simply has no addresses.
    assert run(resolver.addresses("nowhere.test")) == []


def test_refused_query_is_temporary(resolver: Resolver) -> None:
    name, address = REFUSED
    assert error(resolver.mx(name)).temporary
    assert error(resolver.addresses(name)).temporary
    assert error(resolver.txt(name)).temporary
    assert error(resolver.ips(name, "AAAA")).temporary
    assert error(resolver.ptr(address)).temporary


def test_txt_records(resolver: Resolver) -> None:
    assert sorted(run(resolver.txt("txt.test"))) == ["second record", "v=spf1 -all"]
    assert run(resolver.txt("plain.test")) == ["v=spf1 a -all"]
    assert run(resolver.txt("mx1.multi.test")) == []


def test_ips_of_one_family(resolver: Resolver) -> None:
    assert run(resolver.ips("mx2.multi.test", "A")) == ["127.0.0.3"]
    assert run(resolver.ips("mx2.multi.test", "AAAA")) == ["::1"]
    assert run(resolver.ips("mx1.multi.test", "AAAA")) == []
    assert run(resolver.ips("multi.test", "A")) == []


def test_ptr_names(resolver: Resolver) -> None:
    assert run(resolver.ptr("127.0.0.2")) == ["mx1.multi.test"]
    assert run(resolver.ptr("::1")) == ["mx2.multi.test"]
    assert run(resolver.ptr(NO_PTR)) == []  # NXDOMAIN included


def test_silent_server_is_temporary() -> None:
    silent = DnsResolver(
        [ListenAddress("127.0.0.1", free_port(kind=socket.SOCK_DGRAM))], lifetime=0.5
    )
    assert error(silent.addresses("anything.test")).temporary
    # The doctor's probe: a shorter wait than its lookups get.
    assert run(silent.unreachable(lifetime=1.0)) == "no answer within 1 s"
    port = free_port(kind=socket.SOCK_DGRAM)
    assert run(DnsResolver([ListenAddress("127.0.0.1", port)], 2.0).unreachable()) == (
        "no answer within 2 s"
    )


def test_a_server_that_refuses_is_reachable(dnsmasq: Dnsmasq) -> None:
    r = DnsResolver([ListenAddress("127.0.0.1", dnsmasq.port)], lifetime=5.0)
    assert run(r.unreachable(lifetime=1.0)) == ""
