"""Volant's agent API: the sans-IO routing (kestrel/agentapi.py), then the trio
edge (kestrel/apiserver.py) with volar's own client (host/httpcli.exchange).

The edge tests serve on 127.0.0.1 instead of vsock (the same listener code
after the socket is made) and pass through to real workloads: busybox httpd
with a CGI echo, and small servers that stream or die mid-answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import pytest
import trio

from host.httpcli import HttpError, Response, exchange
from kestrel import agentapi
from kestrel.agentapi import Passthrough, Reply
from kestrel.apiserver import Api, serve
from kestrel.manifest import BaseUrl

ECHO_CGI = b'#!/bin/sh\nprintf "Content-Type: application/octet-stream\\r\\n\\r\\n"\nexec cat\n'
MIB = 1024 * 1024


def request(target: bytes, method: bytes = b"GET", headers: list[tuple[bytes, bytes]] | None
            = None) -> h11.Request:
    return h11.Request(method=method, target=target,
                       headers=[(b"host", b"x"), *(headers or [])])


URL = BaseUrl("127.0.0.1", 80)


# --- routing ---------------------------------------------------------------------

def test_healthz_is_kestrels_own_answer() -> None:
    reply = agentapi.route(request(b"/healthz"), url=URL, state="running")
    assert isinstance(reply, Reply) and reply.status == 200
    assert json.loads(reply.body) == {"status": "ok"}
    # Even with the workload down: /healthz is the agent's health, not the workload's.
    assert agentapi.route(request(b"/healthz"), url=None, state="failed") == reply


def test_v1_paths_map_onto_base_url_with_both_queries() -> None:
    url = BaseUrl("127.0.0.1", 9000, "/api", "?key=1")
    p = agentapi.route(request(b"/v1/items/7?x=2"), url=url, state="running")
    assert isinstance(p, Passthrough)
    assert p.request.target == b"/api/items/7?x=2&key=1"
    for bare in (b"/v1", b"/v1/"):
        p = agentapi.route(request(bare), url=BaseUrl("127.0.0.1", 80), state="starting")
        assert isinstance(p, Passthrough) and p.request.target == b"/"


def test_passthrough_keeps_end_to_end_headers_and_drops_hop_by_hop_ones() -> None:
    req = request(b"/v1/x", b"POST", [
        (b"content-type", b"text/plain"), (b"x-trace", b"abc"), (b"connection", b"x-private"),
        (b"x-private", b"1"), (b"keep-alive", b"5"), (b"te", b"trailers"),
        (b"expect", b"100-continue"), (b"transfer-encoding", b"chunked"),
    ])
    p = agentapi.route(req, url=BaseUrl("10.0.0.1", 8000), state="running")
    assert isinstance(p, Passthrough)
    assert p.request.method == b"POST"
    assert list(p.request.headers) == [
        (b"host", b"10.0.0.1:8000"), (b"content-type", b"text/plain"), (b"x-trace", b"abc"),
        (b"transfer-encoding", b"chunked"), (b"connection", b"close"),
    ]


def test_responses_are_reframed_by_h11() -> None:
    upstream = h11.Response(status_code=201, reason=b"Made", headers=[
        (b"content-type", b"a/b"), (b"transfer-encoding", b"chunked"), (b"connection", b"close"),
        (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"),
    ])
    down = agentapi.downstream_response(upstream)
    assert (down.status_code, down.reason) == (201, b"Made")
    assert list(down.headers) == [(b"content-type", b"a/b"), (b"set-cookie", b"a=1"),
                                  (b"set-cookie", b"b=2")]


@pytest.mark.parametrize("target,method,url,state,status,words", [
    (b"/nope", b"GET", URL, "running", 404, "/healthz and /v1"),
    (b"/v1x", b"GET", URL, "running", 404, "no such endpoint /v1x"),
    (b"/healthz", b"POST", URL, "running", 405, "GET only"),
    (b"/v1/", b"GET", None, "running", 404, "no base_url"),
    (b"/v1/", b"GET", URL, "restarting", 503, "the workload is restarting"),
    (b"/v1/", b"GET", URL, "failed", 503, "127.0.0.1:80"),
])
def test_what_kestrel_cannot_pass_on_is_a_json_error(
        target: bytes, method: bytes, url: BaseUrl | None, state: str, status: int,
        words: str) -> None:
    reply = agentapi.route(request(target, method), url=url, state=state)
    assert isinstance(reply, Reply) and reply.status == status
    assert words in json.loads(reply.body)["error"]


def test_a_refused_connect_names_the_real_error() -> None:
    cause = ExceptionGroup("all attempts", [ConnectionRefusedError(111, "Connection refused")])
    exc = OSError("all attempts to connect to 127.0.0.1:80 failed")
    exc.__cause__ = cause
    reply = agentapi.upstream_failure(URL, exc)
    assert reply.status == 502
    assert json.loads(reply.body) == {"error": "workload at 127.0.0.1:80: Connection refused"}


# --- the edge, with real workloads -------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def httpd(tmp_path: Path) -> Iterator[BaseUrl]:
    """busybox httpd with /cgi-bin/echo: the workload the VM tests echo through."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip(reason="busybox is not installed (apt-get install busybox-static)")
    (tmp_path / "www" / "cgi-bin").mkdir(parents=True)
    (tmp_path / "www" / "index.html").write_text("hello from httpd\n")
    echo = tmp_path / "www" / "cgi-bin" / "echo"
    echo.write_bytes(ECHO_CGI)
    echo.chmod(0o755)
    port = free_port()
    proc = subprocess.Popen([busybox, "httpd", "-f", "-p", f"127.0.0.1:{port}",
                             "-h", str(tmp_path / "www")])
    try:
        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.01)
        yield BaseUrl("127.0.0.1", port)
    finally:
        proc.kill()
        proc.wait()


class Client:
    """volar's side: host.httpcli.exchange on a fresh connection per request."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def __call__(self, method: str, target: str, body: bytes = b"",
                       headers: list[tuple[str, str]] | None = None,
                       sink: Callable[[bytes], Awaitable[None]] | None = None
                       ) -> tuple[Response, bytes]:
        got: list[bytes] = []

        async def keep(data: bytes) -> None:
            got.append(data)

        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            response = await exchange(stream, method=method, target=target,
                                      headers=headers or [], body=body, sink=sink or keep)
        return response, b"".join(got)


@asynccontextmanager
async def agent_api(url: BaseUrl | None, state: str = "running", *,
                    max_connections: int = 64) -> AsyncIterator[Client]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve(
            listeners[0], Api(url, lambda: state), max_connections=max_connections,
            task_status=task_status))
        yield Client(port)
        nursery.cancel_scope.cancel()


async def test_healthz_and_a_page_through_the_passthrough(httpd: BaseUrl) -> None:
    async with agent_api(httpd) as call:
        response, body = await call("GET", "/healthz")
        assert (response.status, json.loads(body)) == (200, {"status": "ok"})
        response, body = await call("GET", "/v1/index.html")
        assert (response.status, body) == (200, b"hello from httpd\n")
        response, body = await call("GET", "/v1/missing.html")
        assert response.status == 404  # the workload's own status, passed on
        # busybox's CGI takes a PUT body only if it came with the head: one write.
        response, body = await call("PUT", "/v1/cgi-bin/echo", b"small", [("X-Test", "yes")])
        assert (response.status, body) == (200, b"small")


async def test_twenty_concurrent_one_mib_echoes_arrive_intact(httpd: BaseUrl) -> None:
    payloads = [os.urandom(MIB) for _ in range(20)]
    results: dict[int, tuple[int, str]] = {}

    async with agent_api(httpd) as call:
        async def one(i: int) -> None:
            response, body = await call("POST", "/v1/cgi-bin/echo", payloads[i])
            results[i] = (response.status, hashlib.sha256(body).hexdigest())

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
    assert results == {i: (200, hashlib.sha256(p).hexdigest()) for i, p in enumerate(payloads)}


async def test_a_workload_that_is_down_is_a_502_at_once() -> None:
    url = BaseUrl("127.0.0.1", free_port())  # nothing listens there
    async with agent_api(url) as call:
        response, body = await call("GET", "/v1/")
    assert (response.status, response.reason) == (502, "Bad Gateway")
    assert json.loads(body) == {"error": f"workload at {url.authority}: Connection refused"}


async def test_a_stopped_workload_is_a_503_without_a_connect() -> None:
    async with agent_api(BaseUrl("127.0.0.1", 1), state="restarting") as call:
        response, body = await call("POST", "/v1/x", b"data")
    assert response.status == 503 and "restarting" in json.loads(body)["error"]


@asynccontextmanager
async def raw_workload(handler: Callable[[trio.SocketStream], Awaitable[None]]
                       ) -> AsyncIterator[BaseUrl]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handler, listeners)
        yield BaseUrl("127.0.0.1", port)
        nursery.cancel_scope.cancel()


async def read_head(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(4096)
    return data


async def test_a_streamed_response_reaches_the_host_piece_by_piece() -> None:
    # The workload sends its second piece only after the host has seen the first:
    # a proxy that buffered whole responses would deadlock here.
    first_seen = trio.Event()

    async def streaming(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
        await first_seen.wait()
        await stream.send_all(b"7\r\nsecond\n\r\n0\r\n\r\n")

    pieces: list[bytes] = []

    async def sink(data: bytes) -> None:
        pieces.append(data)
        first_seen.set()

    async with raw_workload(streaming) as url, agent_api(url) as call:
        with trio.fail_after(10):
            response, _ = await call("GET", "/v1/events", sink=sink)
    assert response.status == 200
    assert dict(response.headers)["content-type"] == "text/event-stream"
    assert b"".join(pieces) == b"first\nsecond\n" and pieces[0] == b"first\n"


async def test_a_workload_dying_mid_answer_truncates_it_and_the_api_lives_on() -> None:
    async def dying(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..")

    async with raw_workload(dying) as url, agent_api(url) as call:
        with pytest.raises(HttpError, match=r"truncated .*received 10 bytes, expected 100"):
            await call("GET", "/v1/")
        response, _ = await call("GET", "/healthz")
        assert response.status == 200


async def test_a_workload_closing_without_an_answer_is_a_502() -> None:
    async def rude(stream: trio.SocketStream) -> None:
        await read_head(stream)

    async with raw_workload(rude) as url, agent_api(url) as call:
        response, body = await call("GET", "/v1/")
    assert response.status == 502
    assert "closed the connection without answering" in json.loads(body)["error"]


async def test_connections_past_the_bound_wait_their_turn(httpd: BaseUrl) -> None:
    async with agent_api(httpd, max_connections=2) as call:
        idle = [await trio.open_tcp_stream("127.0.0.1", call.port) for _ in range(2)]
        async with trio.open_nursery() as nursery:
            done: list[int] = []

            async def third() -> None:
                response, _ = await call("GET", "/healthz")
                done.append(response.status)

            nursery.start_soon(third)
            await trio.sleep(0.2)
            assert done == []  # both slots are taken by the idle connections
            await idle[0].aclose()
        assert done == [200]
        await idle[1].aclose()


async def test_keep_alive_serves_several_requests_on_one_connection(httpd: BaseUrl) -> None:
    async with agent_api(httpd) as call:
        stream = await trio.open_tcp_stream("127.0.0.1", call.port)
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                                  b"GET /v1/index.html HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            with trio.fail_after(10):
                while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"httpd\n"):
                    data += await stream.receive_some(4096)
    assert b'{"status":"ok"}' in data and data.endswith(b"hello from httpd\n")


async def test_garbage_is_a_400_and_nothing_else() -> None:
    async with agent_api(URL) as call:
        stream = await trio.open_tcp_stream("127.0.0.1", call.port)
        async with stream:
            await stream.send_all(b"\x00\x01 not http\r\n\r\n")
            data = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(4096):
                    data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"bad request" in data


# --- the rule: AF_VSOCK only inside a VM ----------------------------------------------

# An audit hook in the frozen kestrel's interpreter: every socket kestrel makes
# is named on the console. (tests/vsockguard.py's hook, which every PID 1 run
# starts with, refuses an AF_VSOCK one before socket(2), so a broken rule opens none.)
SOCKET_AUDIT = """
import os, sys
def _audit(event, args):
    if event == "socket.__new__":
        os.write(2, b"AUDIT socket family %d\\n" % args[1])
sys.addaudithook(_audit)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")
async def test_outside_a_vm_the_agent_api_stays_off_and_no_vsock_socket_is_made() -> None:
    from tests.pid1 import manifest, run_kestrel

    # An http workload with a base_url: in a VM this one would get the API.
    # It lives until the host has attached, so every agent task has started.
    doc = manifest(["/bin/sh", "-c", "sleep 1; echo done"], type="http",
                   base_url="http://127.0.0.1:8080")
    run = await run_kestrel(doc, prelude=SOCKET_AUDIT)
    assert run.powered_off and run.logs("stdout") == b"done\n"
    families = {line.split()[-1] for line in run.console.splitlines()
                if line.startswith("AUDIT socket family")}
    assert str(socket.AF_UNIX) in families  # the hook saw the unix channel being made
    assert str(socket.AF_VSOCK) not in families
    assert "AF_VSOCK on the test host" not in run.console  # the guard's refusal, had it tried
    assert "agent API" not in run.console


async def test_a_stalled_body_to_an_endpoint_kestrel_answers_does_not_hold_a_slot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kestrel import apiserver

    monkeypatch.setattr(apiserver, "REQUEST_HEAD_TIMEOUT_S", 0.5)
    async with agent_api(URL, max_connections=1) as call:
        stream = await trio.open_tcp_stream("127.0.0.1", call.port)
        async with stream:
            # 3 of 10 promised bytes, then nothing: answered, closed, slot freed.
            await stream.send_all(b"POST /healthz HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 10\r\n\r\nabc")
            data = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(4096):
                    data += chunk
        assert data.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
        assert b"connection: close" in data
        with trio.fail_after(10):
            response, _ = await call("GET", "/healthz")
        assert response.status == 200
