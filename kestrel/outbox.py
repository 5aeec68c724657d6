"""Everything kestrel says to the host goes through one Outbox.

It owns the protocol's guest session (sequencing, the replay buffer, acks),
the unsent bytes, the writer task that hands them to the current stream, and
backpressure: a producer past the high-water mark waits until the writer has
taken the buffer. The channel task feeds it the host's bytes and gets the
host's commands back; nothing here knows what a log or a workload is.
"""

from __future__ import annotations

import trio

from kestrel.protocol import Attach, GuestSession, Message

OUT_HIGH_WATER = 1024 * 1024  # unsent bytes before producers wait for the host


class Outbox:
    def __init__(self, session: GuestSession, *, high_water: int = OUT_HIGH_WATER) -> None:
        self.session = session
        self.high_water = high_water
        self.ever_attached = False
        self._out = bytearray()
        self._wake = trio.Event()
        self._drained = trio.Event()
        self._acked = trio.Event()

    @property
    def attached(self) -> bool:
        return self.session.attached

    @property
    def unsent(self) -> int:
        return len(self._out)

    def emit(self, msg: Message) -> None:
        """A record (kept for replay) or a live frame (dropped when detached)."""
        frame = self.session.record(msg) if msg.SEQUENCED else self.session.telemetry(msg)
        self._push(frame)

    def _push(self, frame: bytes) -> None:
        if frame:
            self._out += frame
            self._wake.set()

    async def backpressure(self) -> None:
        """Wait while the host is attached and slower than the producers."""
        if len(self._out) > self.high_water and self.session.attached:
            await self._drained.wait()

    def receive(self, data: bytes) -> list[Message]:
        """Host bytes in; the protocol's answers queued; the host's commands out."""
        commands, out = self.session.receive(data)
        self._push(out)
        if self.session.buffered == 0:
            self._acked.set()
        if any(isinstance(c, Attach) for c in commands):
            self.ever_attached = True
        return commands

    async def writer(self, stream: trio.abc.Stream) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not self._out:
                continue
            data, self._out = self._out, bytearray()  # hand over, no copy
            self._drained.set()
            self._drained = trio.Event()
            await stream.send_all(data)

    def detach(self) -> None:
        """The stream is gone: records stay for replay, live bytes are dropped."""
        self.session.detach()
        self._out.clear()
        self._drained.set()

    async def flush(self, deadline_s: float) -> None:
        """Wait until the host has acknowledged every record, or the deadline."""
        with trio.move_on_after(deadline_s):
            while self.session.buffered:
                self._acked = trio.Event()
                await self._acked.wait()
