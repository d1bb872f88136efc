"""Our own MTA-STS policy (RFC 8461) on [listen] https, and its id.

``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (§3.3) answers, for
each local domain, ``text/plain``:

    version: STSv1
    mode: <[mta_sts] mode>
    mx: <hostname>
    max_age: <[mta_sts] max_age>

The one ``mx:`` is the server's ``hostname``: the name the MX record the
doctor asks for points at (doctor.py ``mx_line``) and the name its
certificate is for, which an enforcing sender checks (§4.1).

Mode "none" is served, not answered 404: §8.3 withdraws a policy by
publishing ``mode: none`` (with a new id), so senders that cached a
testing/enforce policy replace it; on a failed fetch they would keep using
the cached one until its max_age ran out (§5.1).  Another Host than
``mta-sts.<local domain>`` gets 404: the policy is about that domain only.

``policy_id``: the ``id=`` of the ``_mta-sts.<domain>`` TXT record (§3.1)
is a hash of the policy text, so it changes exactly when the policy does
(senders refetch only on a new id).  Written at request time from the
settings, so a reload changes it at once.
"""

from __future__ import annotations

import hashlib

from postoffice.config.settings import MtaStsSettings
from postoffice.net.http import Request, Response, Routes
from postoffice.services import Services

POLICY_PATH = "/.well-known/mta-sts.txt"
HOST_PREFIX = "mta-sts."
ID_LENGTH = 20  # §3.1: sts-id = 1*32(ALPHA / DIGIT)


def policy_text(hostname: str, policy: MtaStsSettings) -> str:
    """The policy document (§3.2), CRLF line ends as in its ABNF."""
    lines = [
        "version: STSv1",
        f"mode: {policy.mode}",
        f"mx: {hostname}",
        f"max_age: {policy.max_age}",
    ]
    return "".join(f"{line}\r\n" for line in lines)


def policy_id(hostname: str, policy: MtaStsSettings) -> str:
    return hashlib.sha256(policy_text(hostname, policy).encode()).hexdigest()[:ID_LENGTH]


def txt_text(hostname: str, policy: MtaStsSettings) -> str:
    """The ``_mta-sts.<domain>`` TXT record (§3.1)."""
    return f"v=STSv1; id={policy_id(hostname, policy)}"


def add_routes(routes: Routes, services: Services) -> None:
    async def policy(request: Request) -> Response:
        host = request.host
        if not (
            host.startswith(HOST_PREFIX) and services.is_local_domain(host[len(HOST_PREFIX) :])
        ):
            return Response.text(404, "no MTA-STS policy for this host here")
        settings = services.settings
        text = policy_text(settings.hostname, settings.mta_sts).encode()
        return Response(200, text, content_type="text/plain")

    routes.add(POLICY_PATH, policy)
