"""Fuzz the wire protocol decoder: any bytes from the peer give messages or ProtocolError.

Both ends read bytes from a channel they do not control (a VMM socket, a
serial port); garbage must never raise anything but ProtocolError, which the
caller answers by dropping the connection.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from host.exechub import ExecHub
from kestrel.execproto import EXEC_MESSAGES, ExecOpen, check_open
from kestrel.execsession import ExecSessions
from kestrel.outbox import Outbox
from kestrel.protocol import (
    Ack,
    Attach,
    FrameDecoder,
    GuestSession,
    HostSession,
    Message,
    Ping,
    ProtocolError,
    encode,
)
from kestrel.reaper import Reaper
from tests.test_fuzz_manifest import mutated_bytes
from tests.test_protocol import any_message, message_strategy


def drain(decoder: FrameDecoder) -> list[Message]:
    try:
        return list(decoder)
    except ProtocolError:
        return []


@given(st.binary(max_size=2000))
def test_fuzz_protocol_arbitrary_bytes(data: bytes) -> None:
    d = FrameDecoder()
    d.feed(data)
    for m in drain(d):
        assert isinstance(m, Message)


@given(st.lists(any_message, min_size=1, max_size=5).flatmap(
    lambda msgs: mutated_bytes(b"".join(encode(m) for m in msgs))
))
def test_fuzz_protocol_mutated_frames(data: bytes) -> None:
    d = FrameDecoder()
    d.feed(data)
    drain(d)


@given(st.binary(max_size=600))
def test_fuzz_protocol_garbage_after_a_valid_frame_keeps_the_valid_one(tail: bytes) -> None:
    d = FrameDecoder()
    d.feed(encode(Ping(id=1)) + tail)
    got: list[Message] = []
    try:
        for m in d:
            got.append(m)
    except ProtocolError:
        pass
    assert got[0] == Ping(id=1)


host_frames = st.one_of(
    st.builds(Attach, last_seq=st.integers(0, 2**64 - 1)),
    st.builds(Ack, seq=st.integers(0, 2**64 - 1)),
    any_message,
)


@given(st.lists(host_frames, max_size=6).flatmap(
    lambda msgs: mutated_bytes(b"".join(encode(m) for m in msgs))
), st.integers(0, 30))
def test_fuzz_protocol_guest_session_input(data: bytes, records: int) -> None:
    guest = GuestSession(agent="k", boot_id="b", max_buffer_records=8)
    for i in range(records):
        guest.record(_log(i))
    try:
        _, out = guest.receive(data)
    except ProtocolError:
        return
    # Whatever the guest answers is itself well formed.
    d = FrameDecoder()
    d.feed(out)
    list(d)
    assert d.pending == 0


@given(st.lists(any_message, max_size=6).flatmap(
    lambda msgs: mutated_bytes(b"".join(encode(m) for m in msgs))
))
def test_fuzz_protocol_host_session_input(data: bytes) -> None:
    host = HostSession()
    host.attach()
    try:
        host.receive(data)
    except ProtocolError:
        return
    assert host.lost >= 0 and host.duplicates >= 0
    d = FrameDecoder()
    d.feed(host.ack())
    list(d)


def _log(i: int) -> Message:
    from kestrel.protocol import Log

    return Log(data=str(i).encode())


# --- exec frames ----------------------------------------------------------------

exec_frames = st.one_of([message_strategy(c) for c in EXEC_MESSAGES])


@given(st.lists(st.one_of(exec_frames, host_frames), max_size=8).flatmap(
    lambda msgs: mutated_bytes(b"".join(encode(m) for m in msgs))
))
def test_fuzz_exec_frames_from_the_host_never_crash_kestrel(data: bytes) -> None:
    """Whatever decodes is checked (opens) or routed by id; unknown ids are a line, not a crash."""
    guest = GuestSession(agent="k", boot_id="b")
    guest.attached = True
    sessions = ExecSessions(Outbox(guest), Reaper(), {})
    try:
        commands, _ = guest.receive(data)
    except ProtocolError:
        return
    for cmd in commands:
        if isinstance(cmd, ExecOpen):
            check_open(cmd)  # a real open would fork; its validation must hold any input
        elif isinstance(cmd, EXEC_MESSAGES):
            sessions.handle(cmd)
    assert sessions.sessions == {}


@given(st.lists(exec_frames, max_size=8))
def test_fuzz_exec_frames_from_kestrel_for_unknown_sessions_are_dropped(msgs: list[Message]
                                                                      ) -> None:
    lines: list[str] = []

    async def nowhere(data: bytes) -> None:
        raise AssertionError("nothing is sent for frames nobody asked for")

    hub = ExecHub(nowhere, log=lines.append)
    assert hub.route(msgs) == []
    assert len(lines) == len(msgs)
