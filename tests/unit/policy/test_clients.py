"""A client's address read one way: loopback, exempt networks, the counting key."""

from __future__ import annotations

import ipaddress

import pytest

from postoffice.policy.clients import (
    client_address,
    client_key,
    in_networks,
    is_loopback,
    may_send_password,
)

GARBAGE = ["", "not-an-address", "localhost", "127.", "127.0.0.1.5", "::1::", "/run/sock", "%"]


@pytest.mark.parametrize(
    ("ip", "address"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:DB8::7", "2001:db8::7"),
        ("::ffff:192.0.2.1", "192.0.2.1"),  # an IPv4 peer on a dual-stack socket
        ("::FFFF:c000:201", "192.0.2.1"),  # ... however it is spelled
        ("fe80::1%eth0", "fe80::1"),  # the zone is no part of the address
        ("::1%lo", "::1"),
        ("::", "::"),
    ],
)
def test_client_address(ip: str, address: str) -> None:
    assert client_address(ip) == ipaddress.ip_address(address)


@pytest.mark.parametrize("ip", GARBAGE)
def test_client_address_of_no_ip_address_is_none(ip: str) -> None:
    assert client_address(ip) is None


@pytest.mark.parametrize(
    ("ip", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),  # all of 127.0.0.0/8 (RFC 1122 §3.2.1.3)
        ("::1", True),
        ("0:0:0:0:0:0:0:1", True),
        ("::1%lo", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:7f00:2", True),
        ("128.0.0.1", False),
        ("126.255.255.255", False),
        ("192.0.2.1", False),
        ("::2", False),
        ("::", False),
        ("::127.0.0.1", False),  # IPv4-compatible (deprecated), not mapped: not loopback
        ("fe80::1%lo", False),
        ("::ffff:192.0.2.1", False),
        ("2001:db8::1", False),
        *((ip, False) for ip in GARBAGE),
        ("127.evil.example", False),  # a name that merely starts like 127.
        ("::ffff:127.example", False),
    ],
)
def test_is_loopback(ip: str, loopback: bool) -> None:
    assert is_loopback(ip) is loopback


EXEMPT = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("2001:db8:1::/48"))


@pytest.mark.parametrize(
    ("ip", "inside"),
    [
        ("127.0.0.9", True),
        ("::ffff:127.0.0.9", True),  # mapped: judged as the IPv4 address
        ("2001:db8:1:2::3", True),
        ("2001:db8:1:2::3%eth0", True),
        ("2001:db8:2::1", False),
        ("::1", False),  # not listed: loopback is exempt only when listed
        ("10.0.0.1", False),
        ("::7f00:9", False),  # ::127.0.0.9 is IPv6, not in an IPv4 network
    ],
)
def test_in_networks(ip: str, inside: bool) -> None:
    address = client_address(ip)
    assert address is not None
    assert in_networks(address, EXEMPT) is inside


def test_in_no_networks() -> None:
    address = client_address("127.0.0.1")
    assert address is not None and not in_networks(address, ())


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("127.0.0.2", "127.0.0.2"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:eeee:dddd:cccc", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::7", "2001:db8:1:2::/64"),  # one spelling per /64
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::1", "::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),  # an IPv4 peer on a dual-stack socket
        ("not-an-address", "not-an-address"),
        ("%", "%"),
    ],
)
def test_client_key(ip: str, key: str) -> None:
    assert client_key(ip) == key


@pytest.mark.parametrize(
    ("tls", "ip", "loopback_allowed", "expected"),
    [
        (True, "192.0.2.7", False, True),  # inside TLS: always
        (False, "192.0.2.7", True, False),  # plaintext from afar: never
        (False, "127.0.0.1", False, False),  # loopback, but not allowed
        (False, "127.0.0.1", True, True),
        (False, "::ffff:127.0.0.2", True, True),
        (False, "::1", True, True),
        (False, "not an address", True, False),
    ],
)
def test_may_send_password(tls: bool, ip: str, loopback_allowed: bool, expected: bool) -> None:
    assert may_send_password(tls, ip, loopback_allowed) is expected
