"""client_key: the one key every per-client limit counts by (IPv4 address, IPv6 /64)."""

from __future__ import annotations

import pytest

from postoffice.policy.netkey import client_key


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
    ],
)
def test_client_key(ip: str, key: str) -> None:
    assert client_key(ip) == key
