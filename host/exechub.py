"""The monitor's exec switchboard: clients on control.sock, sessions on the agent channel.

A client (``volar vms exec``, or a library user through host.execclient)
connects to the VM's 0600 control socket, says ``exec`` on one line and
then speaks kestrel's exec frames. The hub gives each session a
guest-unique id (the client's own ids are ignored), relays the frames both
ways and ends every session of a lost agent connection with ``exec_abort``.
Credit is end to end (kestrel <-> client), so the hub holds at most one
window per session, and a slow client never stalls the agent link (each
client has its own queue and writer).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import trio

from kestrel.execproto import (
    EXEC_MESSAGES,
    ExecAbort,
    ExecClose,
    ExecCredit,
    ExecData,
    ExecExit,
    ExecOpen,
    ExecResize,
    ExecSignal,
)
from kestrel.protocol import FrameDecoder, Message, ProtocolError, encode

CONTROL_LINE_MAX = 256
FROM_CLIENT = (ExecData, ExecCredit, ExecResize, ExecSignal, ExecClose)
Send = Callable[[bytes], Awaitable[None]]


class NotAttached(Exception):
    """No agent connection to carry the session."""


async def read_line(stream: trio.abc.Stream, *, timeout: float = 5.0) -> tuple[str, bytes]:
    """A control socket's first line, and whatever bytes came after it."""
    data = b""
    with trio.move_on_after(timeout):
        while b"\n" not in data and len(data) < CONTROL_LINE_MAX:
            chunk = await stream.receive_some(CONTROL_LINE_MAX)
            if not chunk:
                break
            data += chunk
    line, _, rest = data.partition(b"\n")
    return line.decode("ascii", "replace"), rest


class ExecHub:
    def __init__(self, send: Send, *, log: Callable[[str], None] = print) -> None:
        """``send`` writes frames to the agent; it raises NotAttached when there is none."""
        self._send = send
        self._log = log
        self._next_id = 1
        # Session id -> (its client's queue, the agent connection it was opened on):
        # kestrel hangs up a connection's sessions when that connection ends.
        self._clients: dict[int, tuple[trio.MemorySendChannel[Message], int]] = {}
        self.connection = 0  # the current agent connection (SessionLoop numbers them)

    @property
    def sessions(self) -> int:
        return len(self._clients)

    def route(self, messages: list[Message]) -> list[Message]:
        """Take the exec frames out of a batch from kestrel; return the rest."""
        rest: list[Message] = []
        for m in messages:
            if not isinstance(m, EXEC_MESSAGES):
                rest.append(m)
                continue
            sid: int = getattr(m, "id", 0)
            entry = self._clients.get(sid)
            if entry is None:
                self._log(f"{m.TYPE} for unknown exec session {sid} ignored")
                continue
            entry[0].send_nowait(m)  # unbounded, but credit bounds it to one window
            if isinstance(m, ExecExit | ExecAbort):
                self._end(sid)
        return rest

    def connection_lost(self, connection: int, why: str) -> None:
        """An agent connection ended: kestrel hangs its sessions up; tell their clients."""
        for sid, (queue, opened_on) in list(self._clients.items()):
            if opened_on == connection:
                queue.send_nowait(ExecAbort(id=sid,
                                            message=f"connection to kestrel lost ({why})"))
                self._end(sid)

    def _end(self, sid: int) -> None:
        entry = self._clients.pop(sid, None)
        if entry is not None:
            entry[0].close()

    async def serve_client(self, stream: trio.abc.Stream, already: bytes = b"") -> None:
        """One client connection, after its ``exec`` line: one session, start to end."""
        decoder = FrameDecoder()
        decoder.feed(already)
        opened: ExecOpen | None = None
        try:
            while opened is None:
                for m in decoder:
                    if not isinstance(m, ExecOpen):
                        raise ProtocolError(f"expected exec_open first, got {m.TYPE}")
                    opened = m
                    break
                else:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    decoder.feed(bytes(data))
        except ProtocolError as exc:
            await _say(stream, ExecAbort(message=f"bad request: {exc}"))
            return
        sid = self._next_id
        self._next_id += 1
        send, receive = trio.open_memory_channel[Message](math.inf)
        self._clients[sid] = (send, self.connection)
        opened.id = sid
        try:
            await self._send(encode(opened))
        except (NotAttached, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._end(sid)
            await _say(stream, ExecAbort(message=str(exc) or "no agent connection"))
            return
        async with trio.open_nursery() as nursery:

            async def to_client() -> None:
                async with receive:
                    async for m in receive:
                        try:
                            await stream.send_all(encode(m))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            break
                nursery.cancel_scope.cancel()

            nursery.start_soon(to_client)
            try:
                await self._from_client(stream, decoder, sid)
            except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError,
                    NotAttached, OSError) as exc:
                self._log(f"exec session {sid}: client: {exc}")
            # The client hung up (or broke the protocol) before the end: so does kestrel.
            if sid in self._clients:
                try:
                    await self._send(encode(ExecClose(id=sid)))
                except (NotAttached, trio.BrokenResourceError, trio.ClosedResourceError,
                        OSError):
                    pass
                self._end(sid)

    async def _from_client(self, stream: trio.abc.Stream, decoder: FrameDecoder,
                           sid: int) -> None:
        while True:
            for m in decoder:
                if isinstance(m, FROM_CLIENT):
                    m.id = sid
                    await self._send(encode(m))
            data = await stream.receive_some(65536)
            if not data:
                return
            decoder.feed(bytes(data))


async def _say(stream: trio.abc.Stream, msg: Message) -> None:
    try:
        await stream.send_all(encode(msg))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass

