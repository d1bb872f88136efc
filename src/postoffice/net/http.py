"""A small, bounded HTTP/1.1 server session on the event loop, for [listen] https and http.

The wire protocol is h11's (sans-I/O, like our own cores in protocol/): it
parses and frames, we decide.  A listener (net/listener.py: connection caps,
the TLS handshake with its deadline, shutdown) runs one ``HttpSession`` per
connection, which answers from a ``Routes`` table: exact paths (optionally
matched in any case) to an async handler, with the methods and the request
body size each route allows.  Other parts add their routes to the table
the composition root builds (net/web.py); nothing here knows what is served.

Bounds, so that anyone who reaches the port cannot hold memory or a slot:
- the request head is at most MAX_HEAD octets (h11 answers 431 past it);
- a body is refused with 413 before it is read when its Content-Length is
  over the route's ``max_body`` (0 for GET routes), and cut off with 413 when a
  chunked one grows past it;
- a whole request (head and body) must arrive within REQUEST_SECONDS of its
  first octet (a slow-loris client trickling a byte at a time is closed);
- a kept-alive connection waits at most IDLE_SECONDS for its next request
  and serves at most MAX_REQUESTS (RFC 9112 §9.3: the server may close an
  idle persistent connection at any time);
- a response that the client does not take within WRITE_SECONDS aborts.
Anything h11 cannot parse is answered 400 (its own hint, e.g. 431) and closed.
"""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import h11

from postoffice import logfmt
from postoffice.net.connection import Connection, ConnectionClosed, ShuttingDown, WriteTimeout

log = logging.getLogger("postoffice.http")

MAX_HEAD = 8192  # octets of request line and header fields
REQUEST_SECONDS = 10.0  # from a request's first octet to its last
IDLE_SECONDS = 15.0  # between requests on a kept-alive connection
MAX_REQUESTS = 100  # on one connection; then Connection: close
WRITE_SECONDS = 30.0
MAX_QUERY_FIELDS = 20

REASONS = {
    200: b"OK",
    301: b"Moved Permanently",
    303: b"See Other",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
}

# What a listener sends a plaintext client over its connection caps
# (net/listener.py ``busy_reply``; an https client gets no answer).
BUSY_REPLY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Request:
    method: str  # "GET", as sent (h11 keeps its case; methods are case-sensitive)
    path: str  # the target's path, still percent-encoded, without the query
    query: dict[str, str]  # the query's fields, first value of each, decoded
    host: str  # the Host field, lower case, without a port; "" when absent
    headers: tuple[tuple[bytes, bytes], ...]  # names in lower case (h11)
    body: bytes
    peer: str
    tls: bool
    target: str  # the request target as sent ("/a?b=c")

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode() + b"\n")


RouteHandler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Route:
    handler: RouteHandler
    methods: frozenset[str]
    max_body: int  # octets a request body may have (413 past it)


@dataclass
class Routes:
    """Path -> handler.  Exact paths: no prefix matching, no dot-segment
    resolution, no percent-decoding, so ``/a/../b`` or ``/%2e%2e/`` name no
    route (404) and cannot reach one by a detour.  ``fallback`` answers
    every path without a route (the http listener's redirect)."""

    exact: dict[str, Route] = field(default_factory=dict)
    folded: dict[str, Route] = field(default_factory=dict)  # lower-cased paths
    fallback: Route | None = None

    def add(
        self,
        path: str,
        handler: RouteHandler,
        methods: Iterable[str] = ("GET",),
        *,
        max_body: int = 0,
        any_case: bool = False,
    ) -> None:
        """``any_case``: the path matches in any case (autodiscover clients
        send /Autodiscover/Autodiscover.xml and /autodiscover/autodiscover.xml)."""
        route = Route(handler, _with_head(methods), max_body)
        table = self.folded if any_case else self.exact
        key = path.lower() if any_case else path
        if key in self.exact or key.lower() in self.folded:
            raise ValueError(f"route {path} added twice")
        table[key] = route

    def find(self, path: str) -> Route | None:
        return self.exact.get(path) or self.folded.get(path.lower()) or self.fallback


def _with_head(methods: Iterable[str]) -> frozenset[str]:
    found = frozenset(methods)
    return found | {"HEAD"} if "GET" in found else found  # RFC 9110 §9.3.2


class HttpSession:
    """One connection: requests in, responses out, until close or a bound."""

    def __init__(self, conn: Connection, routes: Routes, listener: str) -> None:
        self.conn = conn
        self.routes = routes
        self.listener = listener
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        conn.write_timeout = WRITE_SECONDS

    async def run(self) -> None:
        served = 0
        try:
            while served < MAX_REQUESTS:
                if not await self._one(last=served == MAX_REQUESTS - 1):
                    return
                served += 1
                if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                    return
                self.h11.start_next_cycle()
        except (ConnectionClosed, ShuttingDown, WriteTimeout, OSError):
            return

    async def _event(self, deadline: float) -> object:
        """The next h11 event; reads (until ``deadline``, loop time) when h11 needs data."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            left = deadline - self.conn.time()
            if left <= 0:
                raise TimeoutError
            self._receive(await self.conn.read(left))

    def _receive(self, data: bytes) -> None:
        """``data`` to h11, the head's bound checked first: h11 bounds only a
        head still incomplete, so one that arrives whole in a single read
        (a read returns all that is buffered) would be parsed at any size."""
        self.h11.receive_data(data)
        if self.h11.their_state is h11.IDLE:  # still reading a request head
            head = self.h11.trailing_data[0][: MAX_HEAD + 4]
            if len(head) > MAX_HEAD and b"\n\r\n" not in head and b"\n\n" not in head:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)

    async def _one(self, *, last: bool) -> bool:
        """Serve one request; False: the connection ends here."""
        try:
            request_event = await self._first_event()
            if request_event is None:
                return False
            deadline = self.conn.time() + REQUEST_SECONDS
            answer = await self._answer(request_event, deadline)
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if exc.error_status_hint in REASONS else 400
            await self._send_error(Response.text(status, "bad request"))
            return False
        except TimeoutError:
            await self._send_error(Response.text(408, "request timeout"))
            return False
        if answer is None:
            return False
        request, response = answer
        await self._send(request, response, close=last)
        return True

    async def _first_event(self) -> h11.Request | None:
        """The next request's head: IDLE_SECONDS for its first octet, then
        REQUEST_SECONDS for the rest (one timer from the first octet on)."""
        if not self.h11.trailing_data[0]:
            try:
                first = await self.conn.read(IDLE_SECONDS, interruptible=True)
            except (TimeoutError, ConnectionClosed, ShuttingDown):
                return None
            self._receive(first)
        deadline = self.conn.time() + REQUEST_SECONDS
        event = await self._event(deadline)
        if isinstance(event, h11.Request):
            return event
        return None  # ConnectionClosed (a clean close between requests)

    async def _answer(
        self, event: h11.Request, deadline: float
    ) -> tuple[h11.Request, Response] | None:
        target = event.target.decode("ascii", "replace")
        split = urllib.parse.urlsplit(target)  # absolute-form too (RFC 9112 §3.2.2)
        path = split.path or "/"
        method = event.method.decode("ascii", "replace")
        route = self.routes.find(path)
        if route is None:
            return event, await self._refuse(Response.text(404, "not found"), deadline, event)
        if method not in route.methods:
            allow = ", ".join(sorted(route.methods))
            refusal = Response(405, b"method not allowed\n", headers=(("Allow", allow),))
            return event, await self._refuse(refusal, deadline, event)
        declared = _content_length(event)
        if declared is not None and declared > route.max_body:
            return event, self._too_large()
        body = await self._body(route.max_body, deadline)
        if body is None:
            return event, self._too_large()
        try:
            fields = urllib.parse.parse_qsl(split.query, max_num_fields=MAX_QUERY_FIELDS)
        except ValueError:
            return event, await self._refuse(
                Response.text(400, "too many query fields"), deadline, event
            )
        query = dict(reversed(fields))  # the first of repeated fields
        request = Request(
            method=method,
            path=path,
            query=query,
            host=_host(event),
            headers=tuple((k, v) for k, v in event.headers),
            body=body,
            peer=self.conn.peer[0],
            tls=self.conn.tls,
            target=target,
        )
        try:
            response = await route.handler(request)
        except Exception:
            log.exception("%s: %s %s failed", self.listener, method, logfmt.field(path))
            response = Response.text(500, "internal error")
        return event, response

    async def _body(self, limit: int, deadline: float) -> bytes | None:
        """The request body, or None once it passes ``limit``."""
        parts: list[bytes] = []
        size = 0
        while True:
            event = await self._event(deadline)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    return None
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:
                raise h11.RemoteProtocolError("connection ended inside a request body")

    async def _refuse(self, response: Response, deadline: float, event: h11.Request) -> Response:
        """A refusal of a request that may carry a body: read it (bounded) so
        the connection can go on, else the response closes it."""
        if _has_body(event):
            return _closing(response)
        await self._body(0, deadline)  # a bodiless request: just its end
        return response

    def _too_large(self) -> Response:
        return _closing(Response.text(413, "request body too large"))

    async def _send(self, request: h11.Request, response: Response, *, close: bool) -> None:
        reason = REASONS.get(response.status, b"")
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("X-Content-Type-Options", "nosniff"),
            ("Cache-Control", "no-store"),
            *response.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        self.conn.write(
            self.h11.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        )
        if request.method != b"HEAD" and response.body:
            self.conn.write(self.h11.send(h11.Data(data=response.body)))
        self.conn.write(self.h11.send(h11.EndOfMessage()))
        await self.conn.drain()
        log.info(
            "%s request client=%s method=%s path=%s status=%d size=%d",
            self.listener,
            self.conn.peer[0],
            logfmt.field(request.method.decode("ascii", "replace")),
            logfmt.field(request.target.decode("ascii", "replace")[:200]),
            response.status,
            len(response.body),
        )

    async def _send_error(self, response: Response) -> None:
        """An answer where h11 may be in an error state: written by hand when
        h11 cannot (it already failed to parse the request)."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        head = (
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n"
            % (response.status, REASONS.get(response.status, b""), len(response.body))
        )
        self.conn.write(head + response.body)
        log.info(
            "%s request client=%s refused status=%d",
            self.listener,
            self.conn.peer[0],
            response.status,
        )
        with contextlib.suppress(WriteTimeout):
            await self.conn.drain()


def _content_length(event: h11.Request) -> int | None:
    for name, value in event.headers:
        if name == b"content-length":
            return int(value)  # h11 checked it is digits
    return None


def _has_body(event: h11.Request) -> bool:
    """The request announces a body (RFC 9112 §6.3): Content-Length over 0, or chunked."""
    length = _content_length(event)
    return bool(length) or any(name == b"transfer-encoding" for name, _v in event.headers)


def _closing(response: Response) -> Response:
    return Response(
        response.status,
        response.body,
        response.content_type,
        (*response.headers, ("Connection", "close")),
    )


def _host(event: h11.Request) -> str:
    for name, value in event.headers:
        if name == b"host":
            host = value.decode("ascii", "replace").strip().lower()
            if host.startswith("["):
                return host.split("]", 1)[0] + "]"
            return host.rsplit(":", 1)[0] if ":" in host else host
    return ""
