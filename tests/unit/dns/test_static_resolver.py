"""StaticResolver, the fake: its tables and failures (the contract it shares
with DnsResolver is checked against dnsmasq in tests/integration/dns)."""

from __future__ import annotations

import asyncio

import pytest

from postoffice.dns.mx import MxRecord
from postoffice.dns.resolver import DnsError
from postoffice.dns.static import StaticResolver


def test_tables_and_failures() -> None:
    r = StaticResolver(
        mx={"a.test": [MxRecord(5, "mx.a.test")]},
        hosts={"mx.a.test": ["127.0.0.2", "::1"], "b.test": ["127.0.0.3"]},
        failing=["broken.test", "192.0.2.9"],
        txt={"Txt.Test.": ["v=spf1 -all"]},
        ptr={"::0001": ["MX.A.Test."]},
    )
    assert asyncio.run(r.mx("a.test")) == [MxRecord(5, "mx.a.test")]
    assert asyncio.run(r.mx("b.test")) == []
    assert asyncio.run(r.mx("txt.test")) == []  # a name with only TXT exists
    assert asyncio.run(r.addresses("mx.a.test")) == ["::1", "127.0.0.2"]
    assert asyncio.run(r.addresses("c.test")) == []
    assert asyncio.run(r.txt("TXT.test")) == ["v=spf1 -all"]
    assert asyncio.run(r.ips("mx.a.test", "A")) == ["127.0.0.2"]
    assert asyncio.run(r.ptr("::1")) == ["mx.a.test"]
    assert asyncio.run(r.ptr("127.0.0.2")) == []
    with pytest.raises(DnsError) as err:
        asyncio.run(r.mx("c.test"))
    assert not err.value.temporary
    for lookup in (r.mx("broken.test"), r.addresses("broken.test"), r.ptr("192.0.2.9")):
        with pytest.raises(DnsError) as err:
            asyncio.run(lookup)
        assert err.value.temporary
