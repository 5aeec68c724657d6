"""kestrel's wire protocol, sans I/O: framing and both sessions (the messages
themselves are in kestrel/messages.py; this module re-exports them).

A frame is a 4-byte big-endian length and a msgpack map whose "t" names the
message. The host speaks first on every connection (``attach`` with the last
sequence number it holds); the guest answers ``hello`` and replays every
buffered record after that number, then streams live. Records (logs, state,
health, exit, ...) carry a sequence number, are kept in a bounded replay
buffer until acknowledged, and a ``dropped`` record accounts for any record
the bound forced out. Telemetry (hello, metrics, heartbeat, pong) is not
sequenced: it is only worth anything live.

Like h11, nothing here touches a socket: kestrel and the host feed bytes in
and write the bytes that come out.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterator
from typing import Any

import msgpack

from kestrel.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SCHEMA,
    Ack,
    Attach,
    Dropped,
    Exit,
    Fatal,
    Health,
    Heartbeat,
    Hello,
    Log,
    Message,
    Metrics,
    Oom,
    Ping,
    Pong,
    Signal,
    State,
    Stop,
    Timeline,
    Unknown,
    register,
)

MAX_FRAME = 4 * 1024 * 1024
# A log record carries at most this much; larger reads are split.
MAX_LOG_CHUNK = 256 * 1024
_LEN = struct.Struct(">I")
# A host that promises a keepalive (attach.keepalive_s) and then says nothing
# for this many intervals is gone, even if the transport never said so:
# vhost-device-vsock 0.3 swallows the read error of a host peer that died
# with unread bytes and never resets the guest's connection.
KEEPALIVE_MISSES = 8


class ProtocolError(ValueError):
    """The peer sent bytes that are not a valid kestrel frame or message."""


# The messages are part of this module's face: callers import them from here.
__all__ = [
    "KEEPALIVE_MISSES",
    "MAX_FRAME",
    "MAX_LOG_CHUNK",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "SCHEMA",
    "Ack",
    "Attach",
    "Dropped",
    "Exit",
    "Fatal",
    "FrameDecoder",
    "GuestSession",
    "Health",
    "Heartbeat",
    "Hello",
    "HostSession",
    "Log",
    "Message",
    "Metrics",
    "Oom",
    "Ping",
    "Pong",
    "ProtocolError",
    "Signal",
    "State",
    "Stop",
    "Timeline",
    "Unknown",
    "encode",
    "register",
]


def encode(msg: Message) -> bytes:
    """One frame for ``msg``."""
    body: dict[str, Any] = {"t": msg.TYPE}
    for name in SCHEMA[type(msg)]:
        body[name] = getattr(msg, name)
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"{msg.TYPE} frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(payload)) + payload


def _decode_body(payload: bytes) -> Message:
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"frame is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(body, dict) or not isinstance(body.get("t"), str):
        raise ProtocolError("frame is not a map with a string 't'")
    kind = body.pop("t")
    cls = MESSAGE_TYPES.get(kind)
    if cls is None:
        return Unknown(type=kind, body=body)
    schema = SCHEMA[cls]
    kwargs: dict[str, Any] = {}
    for name, value in body.items():
        accepted = schema.get(name)
        if accepted is None:
            continue  # a field added by a newer peer
        if (isinstance(value, bool) and bool not in accepted) or not isinstance(value, accepted):
            raise ProtocolError(f"{kind}.{name}: unexpected {type(value).__name__}")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ProtocolError(f"{kind}.{name}: a list of strings expected")
        kwargs[name] = value
    for counter in ("seq", "last_seq", "first_seq", "count"):
        if kwargs.get(counter, 0) < 0:
            raise ProtocolError(f"{kind}.{counter}: negative")
    return cls(**kwargs)


class FrameDecoder:
    """Turns a byte stream into messages; survives arbitrary split points."""

    def __init__(self, *, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes received but not yet a whole frame."""
        return len(self._buf)

    def __iter__(self) -> Iterator[Message]:
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= 4:
                (n,) = _LEN.unpack_from(buf, pos)
                if n > self._max:
                    raise ProtocolError(f"frame length {n} exceeds the limit {self._max}")
                if len(buf) - pos - 4 < n:
                    break
                payload = bytes(buf[pos + 4 : pos + 4 + n])
                pos += 4 + n
                yield _decode_body(payload)
        finally:
            del buf[:pos]


class GuestSession:
    """kestrel's side: sequence numbers, replay buffer, attach/ack handling."""

    def __init__(
        self,
        *,
        agent: str,
        boot_id: str,
        # Bounded by memory: the agent's whole budget is ~20 MB. At 100 MB/s
        # this covers a short disconnect; longer ones get a Dropped record.
        max_buffer_bytes: int = 4 * 1024 * 1024,
        max_buffer_records: int = 100_000,
    ) -> None:
        self.agent = agent
        self.boot_id = boot_id
        self.timeline: dict[str, float] = {}
        self.next_seq = 1
        self.attached = False
        self.host_keepalive_s = 0.0
        self.dropped_total = 0
        # Highest seq already counted in dropped_total: a range announced
        # again (the host missed the first announcement) is not lost twice.
        self._counted_through = 0
        self._max_bytes = max_buffer_bytes
        self._max_records = max_buffer_records
        self._buffer: deque[tuple[int, bytes]] = deque()
        self._buffered_bytes = 0
        self._decoder = FrameDecoder()

    @property
    def buffered(self) -> int:
        """Records kept for replay (sent or not, not yet acknowledged)."""
        return len(self._buffer)

    def record(self, msg: Message) -> bytes:
        """Sequence a record and keep it; return its frame to send if attached."""
        assert msg.SEQUENCED
        if isinstance(msg, Timeline):
            self.timeline[msg.mark] = msg.uptime
        frame = self._keep(msg)
        return frame if self.attached else b""

    def telemetry(self, msg: Message) -> bytes:
        """Frame for an unsequenced message; empty when no host is attached."""
        assert not msg.SEQUENCED
        return encode(msg) if self.attached else b""

    def _keep(self, msg: Message) -> bytes:
        msg.seq = self.next_seq  # type: ignore[attr-defined]
        self.next_seq += 1
        frame = encode(msg)
        self._buffer.append((msg.seq, frame))  # type: ignore[attr-defined]
        self._buffered_bytes += len(frame)
        # Past the bound the oldest record goes. Whether that loses anything
        # is only known at the next attach, when the host says what it holds.
        while self._buffer and (
            self._buffered_bytes > self._max_bytes or len(self._buffer) > self._max_records
        ):
            self._buffered_bytes -= len(self._buffer.popleft()[1])
        return frame

    @property
    def silence_limit_s(self) -> float | None:
        """How long the host may say nothing before the connection counts as dead."""
        if not self.attached or self.host_keepalive_s <= 0:
            return None
        return self.host_keepalive_s * KEEPALIVE_MISSES

    def detach(self) -> None:
        """The transport went away; keep everything unacknowledged."""
        self.attached = False
        self.host_keepalive_s = 0.0
        self._decoder = FrameDecoder()

    def receive(self, data: bytes) -> tuple[list[Message], bytes]:
        """Feed host bytes: returns (commands for kestrel, bytes to send back).

        ``attach`` is answered here (hello + replay); ``ack`` prunes the
        buffer; ``ping`` is answered with ``pong``. Commands (stop, signal,
        the exec frames) are returned for kestrel to act on.
        """
        self._decoder.feed(data)
        commands: list[Message] = []
        out = bytearray()
        for msg in self._decoder:
            if isinstance(msg, Attach):
                out += self._on_attach(msg)
                commands.append(msg)
            elif isinstance(msg, Ack):
                self._on_ack(msg.seq)
            elif isinstance(msg, Ping):
                out += self.telemetry(Pong(id=msg.id))
            elif msg.COMMAND:
                commands.append(msg)
        return commands, bytes(out)

    def _on_attach(self, msg: Attach) -> bytes:
        self._on_ack(msg.last_seq)
        self.attached = True
        self.host_keepalive_s = msg.keepalive_s
        out = bytearray(
            encode(
                Hello(
                    agent=self.agent,
                    boot_id=self.boot_id,
                    timeline=dict(self.timeline),
                    next_seq=self.next_seq,
                )
            )
        )
        # Records between the host's last one and our oldest kept one were
        # pushed out by the bound: announce them before the replay. The
        # announcement is not buffered (it is worked out again at every attach
        # from what the host holds) and carries the seq of the last record it
        # stands for, so the host's position moves past the range: a second
        # attach before the host got it announces the range again, never twice
        # to the host, and it can never push out a record of its own.
        oldest = self._buffer[0][0] if self._buffer else self.next_seq
        if msg.last_seq + 1 < oldest:
            first, last = msg.last_seq + 1, oldest - 1
            self.dropped_total += max(0, last - max(first - 1, self._counted_through))
            self._counted_through = max(self._counted_through, last)
            out += encode(Dropped(count=last - first + 1, first_seq=first, last_seq=last, seq=last))
        for _seq, frame in self._buffer:
            out += frame
        return bytes(out)

    def _on_ack(self, seq: int) -> None:
        buf = self._buffer
        while buf and buf[0][0] <= seq:
            self._buffered_bytes -= len(buf.popleft()[1])


class HostSession:
    """The host's side: attach, dedupe replays, count gaps, produce acks."""

    def __init__(self, *, last_seq: int = 0, restore_id: str = "", hostname: str = "",
                 keepalive_s: float = 0.0) -> None:
        self.last_seq = last_seq
        self.keepalive_s = keepalive_s
        self._pings = 0
        # Set for a VM restored from a snapshot: every attach then says so.
        self.restore_id = restore_id
        self.hostname = hostname
        self.lost = 0  # records never received and never accounted for
        self.dropped = 0  # records the guest announced as lost to its replay bound
        self.duplicates = 0
        self.hello: Hello | None = None
        self._acked = last_seq
        self._decoder = FrameDecoder()

    def attach(self, *, wall_ns: int = 0, entropy: bytes = b"") -> bytes:
        """The first frame to send on a new connection.

        ``wall_ns`` and ``entropy`` (the I/O edge reads the clock and the
        RNG) go out only with a restore_id: a cold-booted guest needs neither.
        """
        self._decoder = FrameDecoder()
        return self.reattach(wall_ns=wall_ns, entropy=entropy)

    def reattach(self, *, wall_ns: int = 0, entropy: bytes = b"") -> bytes:
        """attach() again on the same connection, keeping a half-received frame."""
        if not self.restore_id:
            return encode(Attach(last_seq=self.last_seq, keepalive_s=self.keepalive_s))
        return encode(Attach(last_seq=self.last_seq, restore_id=self.restore_id,
                             hostname=self.hostname, wall_ns=wall_ns, entropy=entropy,
                             keepalive_s=self.keepalive_s))

    def ping(self) -> bytes:
        """What the host sends when it has had nothing to say for keepalive_s."""
        self._pings += 1
        return encode(Ping(id=self._pings))

    def receive(self, data: bytes) -> list[Message]:
        """Feed guest bytes; returns new messages (replayed duplicates removed)."""
        self._decoder.feed(data)
        out: list[Message] = []
        for msg in self._decoder:
            if msg.SEQUENCED:
                seq: int = msg.seq  # type: ignore[attr-defined]
                if seq <= self.last_seq:
                    self.duplicates += 1
                    continue
                # A dropped record stands for first_seq..seq: explained, not lost.
                first = msg.first_seq if isinstance(msg, Dropped) else seq
                if first > self.last_seq + 1:
                    self.lost += first - self.last_seq - 1
                if isinstance(msg, Dropped):
                    self.dropped += seq - max(first - 1, self.last_seq)
                self.last_seq = seq
            elif isinstance(msg, Hello):
                self.hello = msg
            out.append(msg)
        return out

    def ack(self) -> bytes:
        """An ack frame if anything new arrived since the last one."""
        if self.last_seq == self._acked:
            return b""
        self._acked = self.last_seq
        return encode(Ack(seq=self.last_seq))

    def command(self, msg: Message) -> bytes:
        return encode(msg)
