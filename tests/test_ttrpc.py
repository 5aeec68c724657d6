"""ttRPC framing (host/containerd/ttrpc.py): what containerd's Go client sends and reads."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from host.containerd import ttrpc
from host.containerd.proto import shim_pb2, ttrpc_pb2

SERVICE = "containerd.task.v2.Task"


def test_a_request_round_trips_and_its_answer_finds_its_stream() -> None:
    client, server = ttrpc.Connection(client=True), ttrpc.Connection(client=False)
    body = shim_pb2.StateRequest(id="c1").SerializeToString()
    sid, wire = client.request(SERVICE, "State", body, timeout_ns=5)
    assert sid == 1 and wire[:10] == len(wire[10:]).to_bytes(4, "big") + b"\0\0\0\x01\x01\0"
    (call,) = server.receive(wire)
    assert isinstance(call, ttrpc.Call)
    assert (call.stream_id, call.service, call.method, call.timeout_ns) == (1, SERVICE, "State", 5)
    assert shim_pb2.StateRequest.FromString(call.payload).id == "c1"
    answer = shim_pb2.StateResponse(id="c1", pid=42).SerializeToString()
    (reply,) = client.receive(server.respond(call.stream_id, answer))
    assert isinstance(reply, ttrpc.Reply) and reply.code == ttrpc.OK
    assert shim_pb2.StateResponse.FromString(reply.payload).pid == 42


def test_client_stream_ids_are_odd_and_increasing() -> None:
    client = ttrpc.Connection(client=True)
    assert [client.request(SERVICE, "Pids", b"")[0] for _ in range(3)] == [1, 3, 5]


def test_messages_split_anywhere_and_batched_arrive_whole() -> None:
    client, server = ttrpc.Connection(client=True), ttrpc.Connection(client=False)
    wire = b"".join(client.request(SERVICE, m, b"x" * 300)[1] for m in ("Wait", "Kill"))
    calls: list[ttrpc.Event] = []
    for i in range(len(wire)):
        calls += server.receive(wire[i:i + 1])
    assert [c.method for c in calls if isinstance(c, ttrpc.Call)] == ["Wait", "Kill"]


def test_an_error_status_reaches_the_client_with_its_code() -> None:
    client, server = ttrpc.Connection(client=True), ttrpc.Connection(client=False)
    sid, _ = client.request(SERVICE, "Update", b"")
    (reply,) = client.receive(server.fail(sid, ttrpc.UNIMPLEMENTED, "update: unsupported"))
    assert isinstance(reply, ttrpc.Reply)
    assert (reply.code, reply.message) == (ttrpc.UNIMPLEMENTED, "update: unsupported")


def test_an_oversized_message_is_skipped_and_the_next_one_still_read() -> None:
    server = ttrpc.Connection(client=False)
    big = ttrpc.HEADER.pack(ttrpc.MAX_MESSAGE + 1, 7, ttrpc.REQUEST, 0)
    events = server.receive(big + b"\0" * 1000)
    assert events == [ttrpc.Oversized(7, ttrpc.REQUEST, ttrpc.MAX_MESSAGE + 1)]
    assert server.receive(b"\0" * (ttrpc.MAX_MESSAGE + 1 - 1000)) == []
    req = ttrpc_pb2.Request(service=SERVICE, method="Pids").SerializeToString()
    (call,) = server.receive(ttrpc.frame(9, ttrpc.REQUEST, req))
    assert isinstance(call, ttrpc.Call) and call.stream_id == 9


def test_a_response_sent_to_a_server_is_a_protocol_error() -> None:
    with pytest.raises(ttrpc.TtrpcError, match="message type 2"):
        ttrpc.Connection(client=False).receive(ttrpc.frame(1, ttrpc.RESPONSE, b""))


def test_a_response_nobody_asked_for_is_a_protocol_error() -> None:
    with pytest.raises(ttrpc.TtrpcError, match="no request opened"):
        ttrpc.Connection(client=True).receive(ttrpc.frame(3, ttrpc.RESPONSE, b""))


@given(st.binary(max_size=400))
def test_garbage_gives_events_or_a_ttrpc_error(data: bytes) -> None:
    try:
        ttrpc.Connection(client=False).receive(data)
    except ttrpc.TtrpcError:
        pass
