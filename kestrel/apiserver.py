"""Volant's agent API on vsock port 8080: the trio edge of kestrel/agentapi.py.

The host reaches it through its hybrid vsock socket (``CONNECT 8080``).
Each connection is an h11 server; a /v1 request opens one TCP connection to
the workload and pumps both bodies at once, so a streamed response (or an
echo that answers while the upload still runs) flows without buffering.
Started only inside a VM (kestrel's channel is vsock), after the workload.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import h11
import trio

from kestrel import agentapi
from kestrel.agentapi import Passthrough, Reply
from kestrel.console import console
from kestrel.layout import AGENT_API_PORT
from kestrel.manifest import BaseUrl

# linux/vm_sockets.h: bind to every CID this guest has.
VMADDR_CID_ANY = 0xFFFFFFFF
# Connections served at once; more wait in the listen backlog. Each costs a
# task and two 64 KiB buffers, and the host is the only peer vsock has.
MAX_CONNECTIONS = 64
BACKLOG = 128
# A connection that sends no (next) request head within this is closed, so
# an idle host cannot hold a slot for ever (nor a stalled body kestrel answers itself).
REQUEST_HEAD_TIMEOUT_S = 30.0
# A workload that is up accepts at once; one that is wedged must not hang the host.
UPSTREAM_CONNECT_TIMEOUT_S = 5.0
CHUNK = 65536
# Request bodies kestrel answers itself (an error, /healthz) are read up to
# this much to keep the connection; past it the connection is closed.
SKIP_MAX = 1 << 20


class UpstreamError(Exception):
    """The workload's side of a passthrough failed (connect, send or receive)."""


class Api:
    def __init__(self, url: BaseUrl | None, state: Callable[[], str]) -> None:
        self.url = url
        self.state = state  # the supervisor's workload state, read per request


def listen_vsock(port: int = AGENT_API_PORT) -> trio.SocketListener:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((VMADDR_CID_ANY, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def run(api: Api, port: int = AGENT_API_PORT) -> None:
    """Serve on vsock ``port`` until cancelled; a listener that cannot be made
    is a console line, not a failure: the workload runs on without the API."""
    try:
        listener = listen_vsock(port)
    except OSError as exc:
        console(f"agent API: cannot listen on vsock port {port}: {exc.strerror or exc}")
        return
    console(f"agent API on vsock port {port}")
    async with listener:
        await serve(listener, api)


async def serve(listener: trio.abc.Listener[trio.abc.Stream], api: Api, *,
                max_connections: int = MAX_CONNECTIONS,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept until cancelled, at most ``max_connections`` served at once."""
    slots = trio.Semaphore(max_connections)
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: wait, the next accept may succeed
                slots.release()
                console(f"agent API: accept: {exc.strerror or exc}")
                await trio.sleep(0.1)
                continue
            except BaseException:
                slots.release()
                raise
            nursery.start_soon(_connection, stream, api, slots)


async def _connection(stream: trio.abc.Stream, api: Api, slots: trio.Semaphore) -> None:
    try:
        async with stream:
            conn = h11.Connection(h11.SERVER)
            while True:
                event: object = None
                with trio.move_on_after(REQUEST_HEAD_TIMEOUT_S):  # the head only, not the answer
                    try:
                        event = await _receive(conn, stream)
                    except h11.RemoteProtocolError as exc:
                        await _bad_request(conn, stream, exc)
                        return
                if not isinstance(event, h11.Request):
                    return  # closed between requests, or no request head in time
                if not await _exchange(conn, stream, event, api):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError):
        pass  # the host went away or spoke nonsense mid-exchange: drop this connection
    finally:
        slots.release()


async def _receive(conn: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(bytes(await stream.receive_some(CHUNK)))


async def _bad_request(conn: h11.Connection, stream: trio.abc.Stream,
                       exc: h11.RemoteProtocolError) -> None:
    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
        reply = agentapi.error(exc.error_status_hint, f"bad request: {exc}")
        await _reply(conn, stream, reply, head_only=False, close=True)


async def _reply(conn: h11.Connection, stream: trio.abc.Stream, reply: Reply, *,
                 head_only: bool, close: bool) -> None:
    data = conn.send(reply.response(close=close)) or b""
    if not head_only:
        data += conn.send(h11.Data(data=reply.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _exchange(conn: h11.Connection, stream: trio.abc.Stream, request: h11.Request,
                    api: Api) -> bool:
    """Answer one request; False when the connection must close afterwards."""
    decision = agentapi.route(request, url=api.url, state=api.state())
    if isinstance(decision, Reply):
        # The request's body is read (and dropped) so the connection can serve
        # the next one; a large one is not worth reading: close instead.
        close = not await _skip_body(conn, stream)
        await _reply(conn, stream, decision, head_only=request.method == b"HEAD", close=close)
        return not close
    return await _passthrough(conn, stream, decision)


async def _skip_body(conn: h11.Connection, stream: trio.abc.Stream) -> bool:
    """Read the rest of the request; False when it ended badly, stalls for
    REQUEST_HEAD_TIMEOUT_S or exceeds SKIP_MAX (the answer then closes)."""
    if conn.they_are_waiting_for_100_continue:
        return False  # the host sends no body before a 100: the answer comes first
    skipped = 0
    with trio.move_on_after(REQUEST_HEAD_TIMEOUT_S):
        while conn.their_state is h11.SEND_BODY and skipped <= SKIP_MAX:
            event = await _receive(conn, stream)
            if isinstance(event, h11.Data):
                skipped += len(event.data)
            elif not isinstance(event, h11.EndOfMessage):
                return False
    return conn.their_state is h11.DONE


async def _passthrough(conn: h11.Connection, stream: trio.abc.Stream, p: Passthrough) -> bool:
    head_only = p.request.method == b"HEAD"
    try:
        with trio.fail_after(UPSTREAM_CONNECT_TIMEOUT_S):
            upstream = await trio.open_tcp_stream(p.url.host, p.url.port)
    except (OSError, trio.TooSlowError) as exc:
        failure = (exc if isinstance(exc, OSError) else
                   UpstreamError(f"no connection within {UPSTREAM_CONNECT_TIMEOUT_S:g} s"))
        close = not await _skip_body(conn, stream)
        await _reply(conn, stream, agentapi.upstream_failure(p.url, failure),
                     head_only=head_only, close=close)
        return not close
    if conn.they_are_waiting_for_100_continue:
        go_on = h11.InformationalResponse(status_code=100, headers=[])
        await stream.send_all(conn.send(go_on) or b"")
    up = h11.Connection(h11.CLIENT)
    sent: list[bool] = []  # the response head went to the host
    failed: list[BaseException] = []
    async with upstream:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump_request, conn, stream, up, upstream,
                                   up.send(p.request) or b"")
                await _pump_response(conn, stream, up, upstream, sent)
                nursery.cancel_scope.cancel()  # an unread upload is abandoned: we close
        except* UpstreamError as group:
            failed.extend(group.exceptions)
    if not failed:
        return conn.their_state is h11.DONE
    if not sent:
        first = failed[0]
        await _reply(conn, stream, agentapi.upstream_failure(p.url, first.__cause__ or first),
                     head_only=head_only, close=True)
    # With the head sent, a truncated body is the only honest signal left.
    return False


async def _pump_response(conn: h11.Connection, stream: trio.abc.Stream, up: h11.Connection,
                         upstream: trio.abc.Stream, sent: list[bool]) -> None:
    """The workload's response to the host, as it arrives."""
    while True:
        event = await _from_upstream(up, upstream)
        if isinstance(event, h11.Response):
            sent.append(True)
            out = conn.send(agentapi.downstream_response(event))
        elif isinstance(event, h11.Data):
            out = conn.send(h11.Data(data=event.data))
        elif isinstance(event, h11.EndOfMessage):
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            return
        elif isinstance(event, h11.ConnectionClosed):
            raise UpstreamError("closed the connection before a complete response")
        else:
            continue  # 1xx: ours was sent already, or none was asked for
        await stream.send_all(out or b"")


async def _pump_request(conn: h11.Connection, stream: trio.abc.Stream, up: h11.Connection,
                        upstream: trio.abc.Stream, head: bytes) -> None:
    """The request head, then the host's body as it arrives. What h11 already
    holds goes in one write with the head: some servers (busybox httpd's CGI
    for PUT) take only the body bytes that arrived with the head."""
    out = head
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if out and not await _to_upstream_or_stop(upstream, out):
                return
            out = b""
            conn.receive_data(bytes(await stream.receive_some(CHUNK)))
            continue
        if isinstance(event, h11.Data):
            out += up.send(h11.Data(data=event.data)) or b""
        elif isinstance(event, h11.EndOfMessage):
            await _to_upstream_or_stop(upstream, out + (up.send(h11.EndOfMessage()) or b""))
            return
        else:
            # The host closed mid-upload: the workload would wait for the rest for ever.
            raise trio.BrokenResourceError("the host closed the connection mid-request")


async def _to_upstream_or_stop(upstream: trio.abc.Stream, data: bytes) -> bool:
    """False when the workload stopped reading: it may have answered early (a
    413, say); its response, or its absence, is what the host needs to see."""
    try:
        await _to_upstream(upstream, data)
    except UpstreamError:
        return False
    return True


async def _to_upstream(upstream: trio.abc.Stream, data: bytes) -> None:
    try:
        await upstream.send_all(data)
    except (trio.BrokenResourceError, OSError) as exc:
        raise UpstreamError(str(exc)) from exc


async def _from_upstream(up: h11.Connection, upstream: trio.abc.Stream) -> object:
    """The workload's next event; every way it can fail is an UpstreamError."""
    while True:
        try:
            event = up.next_event()
        except h11.RemoteProtocolError as exc:
            raise UpstreamError(f"not a valid HTTP answer: {exc}") from None
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await upstream.receive_some(CHUNK)
        except (trio.BrokenResourceError, OSError) as exc:
            raise UpstreamError(str(exc)) from exc
        if not data and up.their_state is h11.SEND_RESPONSE:
            raise UpstreamError("closed the connection without answering")
        up.receive_data(bytes(data))
