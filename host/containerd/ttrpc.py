"""ttRPC, containerd's RPC for shims, as a sans-IO state machine.

A ttRPC message is a 10-byte header (big-endian payload length u32, stream
id u32, type u8, flags u8; ttrpc's channel.go) and a protobuf payload: a
``Request`` (service, method, payload) from the client on an odd stream id,
a ``Response`` (a google.rpc.Status and a payload) back on the same id.
``Connection`` turns bytes into requests or responses and back, with no
socket in sight; host/containerd/server.py wraps it in trio.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from host.containerd.proto import ttrpc_pb2

HEADER = struct.Struct(">IIBB")
# ttrpc's messageLengthMax: a larger message is refused, its bytes skipped.
MAX_MESSAGE = 4 << 20
REQUEST, RESPONSE = 1, 2

# google.golang.org/grpc/codes, which containerd's errdefs map to its errors.
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
FAILED_PRECONDITION = 9
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14


class TtrpcError(Exception):
    """The peer broke the framing (or an RPC failed, with its status code)."""

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Call:
    """A request that arrived: answer it with ``Connection.respond``/``fail``."""

    stream_id: int
    service: str
    method: str
    payload: bytes
    timeout_ns: int
    metadata: dict[str, str]


@dataclass(frozen=True)
class Reply:
    """A response that arrived for ``stream_id`` (code 0: ``payload`` is the answer)."""

    stream_id: int
    code: int
    message: str
    payload: bytes


@dataclass(frozen=True)
class Oversized:
    """A message past MAX_MESSAGE: its bytes were skipped; a server answers RESOURCE_EXHAUSTED."""

    stream_id: int
    kind: int
    length: int


Event = Call | Reply | Oversized


def frame(stream_id: int, kind: int, payload: bytes) -> bytes:
    if len(payload) > MAX_MESSAGE:
        raise TtrpcError(f"message of {len(payload)} bytes exceeds ttrpc's {MAX_MESSAGE}",
                         RESOURCE_EXHAUSTED)
    return HEADER.pack(len(payload), stream_id, kind, 0) + payload


class Connection:
    """One end of a ttRPC connection: ``client=True`` sends requests, else answers them."""

    def __init__(self, *, client: bool) -> None:
        self.client = client
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversized message still to drop
        self._next_id = 1  # clients use odd stream ids (ttrpc's client.go)
        self._pending: set[int] = set()

    # --- bytes in -------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        self._buf += data
        events: list[Event] = []
        while True:
            if self._skip:
                dropped = min(self._skip, len(self._buf))
                del self._buf[:dropped]
                self._skip -= dropped
                if self._skip:
                    return events
            if len(self._buf) < HEADER.size:
                return events
            length, stream_id, kind, _flags = HEADER.unpack_from(self._buf)
            if length > MAX_MESSAGE:
                del self._buf[:HEADER.size]
                self._skip = length
                events.append(Oversized(stream_id, kind, length))
                continue
            if len(self._buf) < HEADER.size + length:
                return events
            payload = bytes(self._buf[HEADER.size:HEADER.size + length])
            del self._buf[:HEADER.size + length]
            events.append(self._message(stream_id, kind, payload))

    def _message(self, stream_id: int, kind: int, payload: bytes) -> Event:
        expected = RESPONSE if self.client else REQUEST
        if kind != expected:
            raise TtrpcError(f"stream {stream_id}: message type {kind}, expected {expected}")
        try:
            if kind == REQUEST:
                req = ttrpc_pb2.Request.FromString(payload)
                return Call(stream_id, req.service, req.method, req.payload, req.timeout_nano,
                            {kv.key: kv.value for kv in req.metadata})
            res = ttrpc_pb2.Response.FromString(payload)
        except Exception as exc:  # protobuf's DecodeError, and the C backend's variants
            raise TtrpcError(f"stream {stream_id}: undecodable message ({exc})") from None
        if stream_id not in self._pending:
            raise TtrpcError(f"response on stream {stream_id}, which no request opened")
        self._pending.discard(stream_id)
        return Reply(stream_id, res.status.code, res.status.message, res.payload)

    # --- bytes out ------------------------------------------------------------

    def request(self, service: str, method: str, payload: bytes, *,
                timeout_ns: int = 0) -> tuple[int, bytes]:
        """A new request's stream id and its bytes."""
        stream_id = self._next_id
        self._next_id += 2
        self._pending.add(stream_id)
        req = ttrpc_pb2.Request(service=service, method=method, payload=payload,
                                timeout_nano=timeout_ns)
        return stream_id, frame(stream_id, REQUEST, req.SerializeToString())

    def respond(self, stream_id: int, payload: bytes) -> bytes:
        return frame(stream_id, RESPONSE, ttrpc_pb2.Response(payload=payload).SerializeToString())

    def fail(self, stream_id: int, code: int, message: str) -> bytes:
        status = ttrpc_pb2.Status(code=code, message=message)
        return frame(stream_id, RESPONSE, ttrpc_pb2.Response(status=status).SerializeToString())
