"""ttRPC over a unix socket, in trio: host/containerd/ttrpc.py's state machine on a stream.

Each request runs in its own task (Wait blocks until the process ends while
Kill must still get through); responses go out under one lock. When the
connection ends, its requests are cancelled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import trio
from google.protobuf.message import DecodeError

from host.containerd import ttrpc

RECEIVE_SIZE = 64 * 1024
Method = Callable[[bytes], Awaitable[bytes]]


class RpcError(Exception):
    """An RPC's failure with its gRPC status code; containerd shows the message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def serve_connection(stream: trio.abc.Stream, methods: Mapping[str, Method], *,
                           say: Callable[[str], None]) -> None:
    conn = ttrpc.Connection(client=False)
    lock = trio.Lock()

    async def send(data: bytes) -> None:
        async with lock:
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the caller went away; its answer has nowhere to go

    async def handle(call: ttrpc.Call) -> None:
        method = methods.get(f"{call.service}/{call.method}")
        if method is None:
            await send(conn.fail(call.stream_id, ttrpc.UNIMPLEMENTED,
                                 f"{call.service}.{call.method}: not implemented"))
            return
        try:
            out = conn.respond(call.stream_id, await method(call.payload))
        except RpcError as exc:
            out = conn.fail(call.stream_id, exc.code, exc.message)
        except DecodeError as exc:
            out = conn.fail(call.stream_id, ttrpc.INVALID_ARGUMENT,
                            f"{call.method}: undecodable request ({exc})")
        await send(out)

    async with stream, trio.open_nursery() as nursery:
        try:
            while data := await stream.receive_some(RECEIVE_SIZE):
                for event in conn.receive(bytes(data)):
                    if isinstance(event, ttrpc.Call):
                        nursery.start_soon(handle, event)
                    elif isinstance(event, ttrpc.Oversized):
                        nursery.start_soon(send, conn.fail(
                            event.stream_id, ttrpc.RESOURCE_EXHAUSTED,
                            f"message of {event.length} bytes exceeds {ttrpc.MAX_MESSAGE}"))
        except ttrpc.TtrpcError as exc:
            say(f"ttrpc: {exc}; closing the connection")
        except (trio.BrokenResourceError, OSError) as exc:
            say(f"ttrpc: connection lost: {exc}")
        nursery.cancel_scope.cancel()


async def serve(listener: trio.abc.Listener[trio.SocketStream], methods: Mapping[str, Method],
                say: Callable[[str], None]) -> None:
    async with listener, trio.open_nursery() as nursery:
        while True:
            stream = await listener.accept()
            nursery.start_soon(_serve_one, stream, methods, say)


async def _serve_one(stream: trio.SocketStream, methods: Mapping[str, Method],
                     say: Callable[[str], None]) -> None:
    await serve_connection(stream, methods, say=say)
