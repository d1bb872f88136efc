"""The route tables of [listen] https and [listen] http, in one place.

https: client autoconfiguration (net/autoconfig.py), our MTA-STS policy
(net/mta_sts.py); the composition root adds the admin and account pages
(web/, which sees more than net/ may).

http (port 80) only redirects to https, keeping the path and query, the way
a web server set up for a mail host usually is: nothing is served in
plaintext (an autodiscover POST carries the user's address), and a client
that tries ``http://autoconfig.<domain>/mail/config-v1.1.xml`` first (as
Thunderbird does when https fails) lands on the same document over TLS.
GET and HEAD get 301, other methods 308, which keeps the method and body
(RFC 9110 §15.4.9).  ACME http-01 challenges (RFC 8555 §8.3) are the one
thing served here in plaintext: the key authorization of a token published
while an order is validated (net/acme.py); any other path redirects.
"""

from __future__ import annotations

import re

from postoffice.net import autoconfig, mta_sts
from postoffice.net.http import Request, Response, Route, Routes
from postoffice.services import Services

MAX_REDIRECT_BODY = 0  # a redirect reads no body; one announced closes the connection

_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


def https_routes(services: Services) -> Routes:
    routes = Routes()
    autoconfig.add_routes(routes, services)
    mta_sts.add_routes(routes, services)
    return routes


ACME_CHALLENGE = "/.well-known/acme-challenge/"


def http_routes(services: Services) -> Routes:
    async def redirect(request: Request) -> Response:
        if request.path.startswith(ACME_CHALLENGE) and request.method in ("GET", "HEAD"):
            answer = services.acme_http01.get(request.path[len(ACME_CHALLENGE) :])
            if answer is not None:
                return Response(200, answer.encode(), content_type="application/octet-stream")
        return Response(
            301 if request.method in ("GET", "HEAD") else 308,
            b"",
            headers=(("Location", https_location(services, request)),),
        )

    every = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")
    return Routes(fallback=Route(redirect, frozenset(every), MAX_REDIRECT_BODY))


def https_location(services: Services, request: Request) -> str:
    """Where a plaintext request goes: the same host when it is one of ours
    (the hostname, a local domain or a name under one: autoconfig.<domain>),
    else the hostname; the https listener's port when it is not 443."""
    settings = services.settings
    host = request.host
    ours = _HOST_NAME.fullmatch(host) is not None and (
        host == settings.hostname
        or services.is_local_domain(host)
        or services.is_local_domain(host.partition(".")[2])
    )
    if not ours:
        host = settings.hostname
    https = settings.listen.https
    port = https[0].port if https else 443
    where = host if port == 443 else f"{host}:{port}"
    target = request.target if request.target.startswith("/") else request.path
    return f"https://{where}{target}"
