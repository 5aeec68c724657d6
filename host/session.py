"""The host's side of kestrel's channel: one loop for volar, the tests and the benchmarks.

``SessionLoop`` attaches, feeds kestrel.protocol.HostSession, hands every
batch of new records to a ``Sink`` and acks only after the sink returned:
a record the guest drops from its replay buffer is always one the sink
holds. It reconnects (``run``) or accepts (``serve_listener``) after a
connection ends, keeping one HostSession so replays are deduplicated and
gaps counted exactly. Every write to the stream (attach, re-attach, ack,
commands) goes through one lock: a command can never interleave with the
loop's own writes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from host.exechub import ExecHub, NotAttached
from kestrel.protocol import (
    Hello,
    HostSession,
    Message,
    Pong,
    ProtocolError,
)

RECEIVE_SIZE = 256 * 1024
# Re-send attach while no hello came back: bytes written to a virtio-serial
# port before the guest opened it may be lost. Doubling: QEMU may also hold
# them and deliver each copy, and each copy earns a hello and a replay.
REATTACH_S = 2.0
RETRY_S = 0.1
# The host says something at least this often (a ping when it has nothing
# else); kestrel drops a connection that stays quiet for several of these
# (kestrel.protocol.KEEPALIVE_MISSES).
KEEPALIVE_S = 2.0
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# Bytes of host randomness a restored guest mixes into its kernel RNG: a
# ChaCha20 key's worth (the kernel's CRNG key is 32 bytes).
RESTORE_ENTROPY = 32


class Sink(Protocol):
    """Where records go. ``record`` returns only once they are kept: then they are acked."""

    def record(self, messages: list[Message]) -> None: ...


class SessionLoop:
    def __init__(self, sink: Sink, *, last_seq: int = 0, session: HostSession | None = None,
                 reattach_s: float = REATTACH_S, keepalive_s: float = KEEPALIVE_S,
                 say: Callable[[str], None] | None = None) -> None:
        self.sink = sink
        self.session = session or HostSession(last_seq=last_seq)
        if not self.session.keepalive_s:
            self.session.keepalive_s = keepalive_s
        self.reattach_s = reattach_s
        self.say = say or (lambda line: print(f"agent: {line}", flush=True))
        self.stream: trio.abc.Stream | None = None
        self.hello_seen = trio.Event()
        self.drained = trio.Event()  # run()/serve_listener() ended
        self.connections = 0
        self._send_lock = trio.Lock()
        self._sent_at = 0.0  # trio.current_time() of the last write, for the keepalive
        self.exec = ExecHub(self._send_exec, log=self.say)  # exec sessions ride the connection

    # --- one connection ------------------------------------------------------

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Attach, then record and ack until EOF. Stream errors propagate."""
        self.connections += 1
        self.stream = stream
        connection = self.exec.connection = self.connections  # exec sessions opened now ride it
        opened = time.monotonic()
        keepalive = self.session.keepalive_s or float("inf")
        try:
            wall_ns, entropy = self._restore_facts()
            await self._send(self.session.attach(wall_ns=wall_ns, entropy=entropy), stream)
            greeted = False
            reattach, resent = self.reattach_s, 0
            reattach_at = trio.current_time() + reattach
            while True:
                wake = self._sent_at + keepalive
                data: bytes | bytearray | None = None
                with trio.move_on_at(wake if greeted else min(wake, reattach_at)):
                    data = await stream.receive_some(RECEIVE_SIZE)
                if data is None:  # quiet: re-attach (no hello yet) or keep the guest's faith
                    now = trio.current_time()
                    if not greeted and now >= reattach_at:
                        resent += 1
                        reattach *= 2
                        reattach_at = now + reattach
                        # Not session.attach(): that resets the decoder, and a
                        # frame may be half-way through it.
                        wall_ns, entropy = self._restore_facts()
                        await self._send(self.session.reattach(wall_ns=wall_ns,
                                                               entropy=entropy), stream)
                    elif now >= wake:
                        await self._send(self.session.ping(), stream)
                    continue
                if not data:
                    return
                messages = self.session.receive(bytes(data))
                if not greeted and any(isinstance(m, Hello) for m in messages):
                    greeted = True
                    self.say(f"hello {time.monotonic() - opened:.2f} s after connecting "
                             f"({resent} attach re-sent)")
                # Pongs answer keepalive pings: liveness only, nothing to keep.
                rest = [m for m in self.exec.route(messages) if not isinstance(m, Pong)]
                if rest:  # a batch of exec output alone is no store transaction
                    self.sink.record(rest)
                if greeted:
                    self.hello_seen.set()
                ack = self.session.ack()
                if ack:
                    await self._send(ack, stream)
        finally:
            # A newer connection may already have replaced this one (a listener
            # accepts the guest's reconnect before this one has seen its EOF).
            if self.stream is stream:
                self.stream = None
            self.exec.connection_lost(connection, "the agent connection ended")

    def _restore_facts(self) -> tuple[int, bytes]:
        """What a restored guest needs from the host: its clock and fresh randomness."""
        if not self.session.restore_id:
            return 0, b""
        return time.time_ns(), os.urandom(RESTORE_ENTROPY)

    async def _send(self, data: bytes, stream: trio.abc.Stream | None = None) -> None:
        """Write whole frames under the one lock; to ``stream``, else the current one."""
        async with self._send_lock:
            target = stream or self.stream
            if target is None:
                raise trio.ClosedResourceError("no agent connection")
            await target.send_all(data)
            self._sent_at = trio.current_time()

    async def _send_exec(self, data: bytes) -> None:
        if self.stream is None or not self.hello_seen.is_set():
            raise NotAttached("kestrel is not connected")
        await self._send(data)

    async def command(self, msg: Message) -> bool:
        """Send a command to kestrel; False when no connection (or no hello yet) takes it."""
        if self.stream is None or not self.hello_seen.is_set():
            return False
        try:
            await self._send(self.session.command(msg))
        except STREAM_ERRORS:
            return False
        return True

    async def disconnect(self) -> None:
        """Close the current connection (kestrel reconnects and replays)."""
        if self.stream is not None:
            await self.stream.aclose()

    async def _serve_one(self, stream: trio.abc.Stream) -> None:
        try:
            await self.serve(stream)
        except STREAM_ERRORS as exc:
            self.say(f"connection lost: {exc!r}")
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    # --- many connections ------------------------------------------------------

    async def run(self, connect: Callable[[], Awaitable[trio.abc.Stream]],
                  alive: Callable[[], bool], *,
                  on_protocol_error: Callable[[ProtocolError], None] | None = None,
                  connect_errors: tuple[type[Exception], ...] = (OSError,)) -> None:
        """Connect, serve, repeat while ``alive()``: the monitor's and the VM tests' loop."""
        last_error = ""
        try:
            while alive():
                try:
                    stream = await connect()
                except connect_errors as exc:
                    if alive():
                        if str(exc) != last_error:  # once per distinct reason, not 10/s
                            self.say(f"connect: {exc}")
                            last_error = str(exc)
                        await trio.sleep(RETRY_S)
                    continue
                try:
                    await self._serve_one(stream)
                except ProtocolError as exc:
                    if on_protocol_error is None:
                        raise
                    on_protocol_error(exc)
                if alive():
                    await trio.sleep(RETRY_S)
        finally:
            self.drained.set()

    async def serve_listener(self, listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        """Accept kestrel's connections one at a time, forever (a unix channel)."""
        try:
            async with listener:
                while True:
                    await self._serve_one(await listener.accept())
        finally:
            self.drained.set()


class Collector:
    """A sink that keeps everything in memory (tests, benchmarks) and wakes waiters."""

    def __init__(self, *, on_message: Callable[[Message], None] | None = None) -> None:
        self.messages: list[Message] = []
        self.on_message = on_message
        self.changed = trio.Event()

    def record(self, messages: list[Message]) -> None:
        self.messages.extend(messages)
        if self.on_message is not None:
            for m in messages:
                self.on_message(m)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, check: Callable[[], bool]) -> None:
        while not check():
            await self.changed.wait()
