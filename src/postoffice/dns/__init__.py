"""DNS for the whole server: the one way any part of it looks a name up.

``resolver.Resolver`` is the interface (MX, A/AAAA, TXT, PTR) and
``DnsError`` its failure; ``resolver.DnsResolver`` implements it with
dnspython on ``[relay] dns_servers`` (SPEC: every lookup goes through them
when set), and ``static.StaticResolver`` with fixed tables, for tests.  The
composition root builds one ``DnsResolver`` and hands it to whatever needs
names: the outbound router (delivery/remote.py), the inbound SPF, DKIM and
DMARC checks (policy/), and ``postoffice doctor``.  ``mx`` is the pure MX
ordering of RFC 5321 §5.1 and RFC 7505.

This package is ``postoffice.dns``; dnspython is the top-level ``dns``.
Every import of either is absolute, so neither hides the other.
"""
