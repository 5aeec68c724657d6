"""Volant's agent API, sans-IO: which answer a request gets, and the rewritten messages.

``GET /healthz`` is kestrel's own answer; ``/v1/<path>`` passes through to
the workload's ``base_url`` + ``/<path>`` (query kept, hop-by-hop headers
dropped, Host rewritten). Everything here takes and returns h11 events and
bytes; kestrel/apiserver.py moves them between sockets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import h11

from kestrel.manifest import BaseUrl
from kestrel.record import Record

PREFIX = b"/v1"
HEALTHZ = b"/healthz"
# RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
# Transfer-Encoding is among them because h11 frames each side's body itself.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
# Supervisor states in which nothing answers at base_url: say so at once
# instead of waiting on a connect that cannot succeed.
DOWN_STATES = frozenset({"restarting", "stopping", "failed", "poweroff"})

# The statuses kestrel answers with itself (RFC 9110 15), for its status lines.
REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
           408: b"Request Timeout", 413: b"Content Too Large", 431:
           b"Request Header Fields Too Large", 502: b"Bad Gateway", 503: b"Service Unavailable"}

Headers = list[tuple[bytes, bytes]]
# h11's header lists are Sequences of pairs (its own class)
AnyHeaders = Sequence[tuple[bytes, bytes]]


class Reply(Record):
    """kestrel answers the request itself (health, or an error as JSON)."""

    __slots__ = ("status", "body")
    status: int
    body: bytes

    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body

    def response(self, *, close: bool = False) -> h11.Response:
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(self.body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        return h11.Response(status_code=self.status, headers=headers,
                            reason=REASONS.get(self.status, b""))


class Passthrough(Record):
    """Forward to the workload: ``request`` is what goes upstream, as is."""

    __slots__ = ("url", "request")
    url: BaseUrl
    request: h11.Request

    def __init__(self, url: BaseUrl, request: h11.Request) -> None:
        self.url, self.request = url, request


def json_reply(status: int, obj: dict[str, str]) -> Reply:
    return Reply(status, json.dumps(obj, separators=(",", ":")).encode() + b"\n")


def error(status: int, message: str) -> Reply:
    return json_reply(status, {"error": message})


HEALTHY = json_reply(200, {"status": "ok"})


def route(request: h11.Request, *, url: BaseUrl | None, state: str) -> Reply | Passthrough:
    """The answer to ``request``; ``url`` is the workload's base_url (None: none
    in the manifest), ``state`` the supervisor's state of the workload."""
    path, _, query = request.target.partition(b"?")
    if path == HEALTHZ:
        if request.method not in (b"GET", b"HEAD"):
            return error(405, f"{HEALTHZ.decode()} answers GET only")
        return HEALTHY
    if path != PREFIX and not path.startswith(PREFIX + b"/"):
        return error(404, f"no such endpoint {_show(path)}: kestrel serves /healthz and /v1/...")
    if url is None:
        return error(404, "the workload has no base_url in its manifest: nothing to pass "
                          "/v1 requests to")
    if state in DOWN_STATES:
        return error(503, f"the workload is {state}: nothing answers at {url.authority}")
    rest = path[len(PREFIX):] or b"/"
    return Passthrough(url, upstream_request(request, url, rest, query))


def upstream_request(request: h11.Request, url: BaseUrl, path: bytes, query: bytes) -> h11.Request:
    """``request`` as the workload gets it: base_url's prefix and query joined
    to the client's, Host set to base_url's, one request per connection."""
    target = url.prefix.encode() + path
    queries = [q for q in (query, url.query[1:].encode()) if q]
    if queries:
        target += b"?" + b"&".join(queries)
    headers = [(b"host", url.authority.encode())]
    headers += forwarded_headers(request.headers)
    if _chunked(request.headers):
        headers.append((b"transfer-encoding", b"chunked"))  # h11 re-chunks the body
    headers.append((b"connection", b"close"))
    return h11.Request(method=request.method, target=target, headers=headers)


def forwarded_headers(headers: AnyHeaders) -> Headers:
    """Headers minus the hop-by-hop ones (and those the Connection header names),
    minus Host and Expect: the proxy answers 100-continue itself."""
    named = {token.strip().lower() for name, value in headers if name.lower() == b"connection"
             for token in value.split(b",")}
    drop = HOP_BY_HOP | named | {b"host", b"expect"}
    return [(name, value) for name, value in headers if name.lower() not in drop]


def downstream_response(response: h11.Response) -> h11.Response:
    """The workload's response as the host gets it: h11 frames the body again
    (Content-Length kept, else chunked), so a streamed response stays streamed."""
    return h11.Response(status_code=response.status_code, reason=response.reason,
                        headers=forwarded_headers(response.headers))


def upstream_failure(url: BaseUrl, exc: BaseException) -> Reply:
    """A connect or exchange with the workload that failed: 502 naming why."""
    # trio's open_tcp_stream says "all attempts ... failed" with the real
    # errors (Connection refused, ...) in a group as its cause.
    while isinstance(exc.__cause__, BaseExceptionGroup) and exc.__cause__.exceptions:
        exc = exc.__cause__.exceptions[0]
    if isinstance(exc, OSError) and exc.errno:
        detail = os.strerror(exc.errno)  # trio's strerror also repeats the address
    else:
        detail = str(exc) or type(exc).__name__
    return error(502, f"workload at {url.authority}: {detail}")


def _chunked(headers: AnyHeaders) -> bool:
    return any(name.lower() == b"transfer-encoding" and b"chunked" in value.lower()
               for name, value in headers)


def _show(path: bytes) -> str:
    text = path[:80].decode("ascii", "replace")
    return text + ("..." if len(path) > 80 else "")
