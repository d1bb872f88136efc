"""A per-domain message size cap (docs/filters.md, example 2).

[limits] max_message_size is one limit for the whole server; some domains
want less (a small hosted customer, a list domain).  A SIZE= declared at
MAIL is checked at RCPT, so the client learns before sending the data; a
message that turns out larger is refused after it.

    [filters]
    hooks = ["size_cap:SizeCap"]

Environment: SIZE_CAPS, e.g. "example.org=1000000,lists.example.org=200000".
"""

from __future__ import annotations

import os
from collections import OrderedDict

from postoffice.filters.interface import SessionFacts, SpooledMessage
from postoffice.filters.verdicts import Reject


def _caps(text: str) -> dict[str, int]:
    caps = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        domain, _, size = item.partition("=")
        caps[domain.strip().lower()] = int(size)
    return caps


# Declared sizes kept for messages under way, at most (a client that says
# MAIL and never finishes must not grow the table without end).
MAX_TRACKED = 10_000


class SizeCap:
    def __init__(self) -> None:
        self.caps = _caps(os.environ.get("SIZE_CAPS", ""))
        # One object serves every connection: state is per message, keyed by
        # the queue id the server gives each MAIL (facts.queue_id).
        self.declared: OrderedDict[str, int] = OrderedDict()

    def _cap(self, address: str) -> int | None:
        return self.caps.get(address.rpartition("@")[2].lower())

    async def mail(self, facts: SessionFacts, sender: str, args: str) -> None:
        # SIZE=n (RFC 1870) as the client declared it; 0 if it did not.
        sizes = [p.partition("=")[2] for p in args.split() if p.upper().startswith("SIZE=")]
        if sizes and sizes[0].isdigit():
            self.declared[facts.queue_id] = int(sizes[0])
            while len(self.declared) > MAX_TRACKED:
                self.declared.popitem(last=False)

    async def rcpt(self, facts: SessionFacts, recipient: str, args: str) -> Reject | None:
        cap = self._cap(recipient)
        if cap is not None and self.declared.get(facts.queue_id, 0) > cap:
            return Reject(552, f"Message too big for {recipient} (limit {cap} octets)", "5.3.4")
        return None

    async def message(self, facts: SessionFacts, message: SpooledMessage) -> Reject | None:
        self.declared.pop(facts.queue_id, None)
        for recipient in message.recipients:
            cap = self._cap(recipient)
            if cap is not None and message.size > cap:
                return Reject(552, f"Message too big for {recipient} (limit {cap} octets)", "5.3.4")
        return None
