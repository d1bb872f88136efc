"""SPF record parsing (RFC 7208 §4.6, §6, §7): no DNS needed.

The evaluation against a real DNS server is in tests/integration/policy/test_spf.py.
"""

from __future__ import annotations

import pytest

from postoffice.policy.spf import parse_record


def test_parse_rejects_duplicate_redirect() -> None:
    from postoffice.policy.spf import _PermError

    with pytest.raises(_PermError):
        parse_record("v=spf1 redirect=a.test redirect=b.test")
    with pytest.raises(_PermError):
        parse_record("v=spf1 exists:%{x}.test")  # unknown macro letter
    assert len(parse_record("v=spf1  a   mx  -all").mechanisms) == 3  # runs of spaces
