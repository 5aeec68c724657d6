"""kestrel.protocol: frames, the decoder, and both sessions driven without sockets.

The sessions are the guarantee users rely on for logs: every record arrives
once and in order, and whatever the replay bound forced out is announced by a
``dropped`` record with the exact count and range.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import kestrel.execproto  # noqa: F401  (registers the exec frames: every test covers them)
from kestrel.protocol import (
    KEEPALIVE_MISSES,
    MAX_FRAME,
    MESSAGE_TYPES,
    SCHEMA,
    Ack,
    Attach,
    Dropped,
    FrameDecoder,
    GuestSession,
    Hello,
    HostSession,
    Log,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Signal,
    State,
    Stop,
    Timeline,
    Unknown,
    encode,
)

# --- strategies: one per message type, derived from the schema ------------------

_U64 = 2**64 - 1
_FIELD_STRATEGIES: dict[tuple[type, ...], st.SearchStrategy[Any]] = {
    (int,): st.integers(-(2**63), _U64),
    (float, int): st.floats(allow_nan=False) | st.integers(-(2**63), 2**63),
    (str,): st.text(max_size=50),
    (bytes,): st.binary(max_size=300),
    (int, type(None)): st.none() | st.integers(-(2**31), 2**31),
    (dict,): st.dictionaries(st.text(max_size=10), st.floats(allow_nan=False), max_size=5),
    (bool,): st.booleans(),
    (list,): st.lists(st.text(max_size=20), max_size=5),
}


def message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    kwargs = {}
    for name, accepted in SCHEMA[cls].items():
        kwargs[name] = (
            st.integers(0, _U64) if name in ("seq", "last_seq", "first_seq", "count")
            else _FIELD_STRATEGIES[accepted]
        )
    return st.builds(cls, **kwargs)


any_message = st.one_of([message_strategy(c) for c in MESSAGE_TYPES.values()])


def decode_all(data: bytes) -> list[Message]:
    d = FrameDecoder()
    d.feed(data)
    out = list(d)
    assert d.pending == 0
    return out


# --- frames -------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(MESSAGE_TYPES.values()), ids=lambda c: c.TYPE)
@settings(max_examples=30)
@given(data=st.data())
def test_every_message_type_round_trips(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(message_strategy(cls))
    frame = encode(msg)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert decode_all(frame) == [msg]


@given(st.lists(any_message, max_size=8), st.data())
def test_decoder_survives_arbitrary_split_points(msgs: list[Message], data: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    d = FrameDecoder()
    got: list[Message] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        d.feed(stream[last:cut])
        got.extend(d)
        last = cut
    assert got == msgs
    assert d.pending == 0


def test_decoder_fed_byte_by_byte_yields_each_message_once() -> None:
    msgs: list[Message] = [
        Log(stream="stderr", data=b"x" * 1000, seq=1),
        State(state="running", seq=2),
        Hello(agent="kestrel", timeline={"spawn": 0.5}),
        Ping(id=3),
    ]
    stream = b"".join(encode(m) for m in msgs)
    d = FrameDecoder()
    got: list[Message] = []
    for i in range(len(stream)):
        d.feed(stream[i : i + 1])
        got.extend(d)
        assert d.pending == (i + 1) - sum(len(encode(m)) for m in got)
    assert got == msgs


def test_oversize_length_is_a_protocol_error_before_the_body_arrives() -> None:
    d = FrameDecoder()
    d.feed(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        list(d)
    small = FrameDecoder(max_frame=16)
    small.feed(encode(Log(data=b"y" * 64, seq=1)))
    with pytest.raises(ProtocolError):
        list(small)


def test_encoding_a_frame_over_the_limit_is_refused() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(Log(data=b"z" * (MAX_FRAME + 1), seq=1))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never used in msgpack
        msgpack.packb([1, 2]),
        msgpack.packb({"x": 1}),
        msgpack.packb({"t": 5}),
        msgpack.packb({"t": "log", "seq": "1"}),
        msgpack.packb({"t": "log", "seq": -1}),
        msgpack.packb({"t": "log", "data": "text, not bytes"}),
        msgpack.packb({"t": "exit", "code": True}),
        msgpack.packb({1: 2}),
        msgpack.packb({"t": "log"}) + b"trailing",
        b"\x91" * 3000,  # deeply nested arrays
    ],
)
def test_bad_payloads_are_protocol_errors(payload: bytes) -> None:
    d = FrameDecoder()
    d.feed(struct.pack(">I", len(payload)) + payload)
    with pytest.raises(ProtocolError):
        list(d)


def test_unknown_message_type_is_passed_on_not_fatal() -> None:
    payload = msgpack.packb({"t": "snapshot", "id": 7}, use_bin_type=True)
    after = Pong(id=1)
    msgs = decode_all(struct.pack(">I", len(payload)) + payload + encode(after))
    assert msgs == [Unknown(type="snapshot", body={"id": 7}), after]


def test_fields_from_a_newer_peer_are_ignored() -> None:
    payload = msgpack.packb({"t": "ping", "id": 4, "priority": "high"}, use_bin_type=True)
    assert decode_all(struct.pack(">I", len(payload)) + payload) == [Ping(id=4)]


def test_missing_fields_take_their_defaults() -> None:
    payload = msgpack.packb({"t": "stop"}, use_bin_type=True)
    assert decode_all(struct.pack(">I", len(payload)) + payload) == [Stop(grace_s=10.0)]


# --- sessions -------------------------------------------------------------------


def log(i: int) -> Log:
    return Log(stream="stdout", data=f"line {i}\n".encode())


def connect(guest: GuestSession, host: HostSession) -> tuple[list[Message], bytes]:
    """Attach the host; returns guest commands and what the guest sends back."""
    return guest.receive(host.attach())


def test_attach_is_answered_with_hello_then_the_buffered_records() -> None:
    guest = GuestSession(agent="kestrel 0.1", boot_id="b1")
    guest.record(Timeline(mark="spawn", uptime=0.25))
    assert guest.record(log(1)) == b""  # nobody attached: kept, not sent
    host = HostSession()
    commands, out = connect(guest, host)
    assert [type(c) for c in commands] == [Attach]
    msgs = host.receive(out)
    assert isinstance(msgs[0], Hello)
    assert msgs[0].agent == "kestrel 0.1" and msgs[0].timeline == {"spawn": 0.25}
    assert msgs[0].next_seq == 3
    assert [m.seq for m in msgs[1:]] == [1, 2]  # type: ignore[attr-defined]
    assert host.hello == msgs[0]
    # Live records now go straight out.
    frame = guest.record(log(2))
    assert [m.seq for m in host.receive(frame)] == [3]  # type: ignore[attr-defined]


def test_ack_prunes_the_replay_buffer() -> None:
    guest = GuestSession(agent="k", boot_id="b")
    host = HostSession()
    host.receive(connect(guest, host)[1])
    for i in range(5):
        host.receive(guest.record(log(i)))
    assert guest.buffered == 5
    guest.receive(host.ack())
    assert guest.buffered == 0
    assert host.ack() == b""  # nothing new since


def test_reconnect_after_partial_delivery_resends_exactly_the_missing_records() -> None:
    guest = GuestSession(agent="k", boot_id="b")
    host = HostSession()
    host.receive(connect(guest, host)[1])
    frames = [guest.record(log(i)) for i in range(1, 11)]
    # Records 1..4 arrive and are acked, 5..6 arrive unacked, 7 arrives half.
    got = host.receive(b"".join(frames[:4]))
    guest.receive(host.ack())
    got += host.receive(b"".join(frames[4:6]) + frames[6][:5])
    guest.detach()
    guest.record(log(11))  # while nobody listens
    _, out = connect(guest, host)
    # The host's attach names 6 as its last record: the replay is 7..11 only.
    assert [m.seq for m in decode_all(out) if isinstance(m, Log)] == list(range(7, 12))
    got += host.receive(out)
    seqs = [m.seq for m in got if isinstance(m, Log)]
    assert seqs == list(range(1, 12))
    assert [m.data for m in got if isinstance(m, Log)] == [f"line {i}\n".encode() for i in
                                                           range(1, 12)]
    assert host.duplicates == 0 and host.lost == 0


def test_host_drops_replayed_duplicates_and_counts_them() -> None:
    guest = GuestSession(agent="k", boot_id="b")
    for i in range(1, 4):
        guest.record(log(i))
    host = HostSession()
    _, out = connect(guest, host)
    first = host.receive(out)
    # The same replay arrives again (a host that lost its place, a proxy):
    again = host.receive(out)
    assert [m.seq for m in first if isinstance(m, Log)] == [1, 2, 3]
    assert [m for m in again if isinstance(m, Log)] == []
    assert host.duplicates == 3 and host.lost == 0


def test_overflow_while_detached_is_announced_with_count_and_range() -> None:
    guest = GuestSession(agent="k", boot_id="b", max_buffer_records=10)
    host = HostSession()
    host.receive(connect(guest, host)[1])
    host.receive(b"".join(guest.record(log(i)) for i in range(1, 4)))
    guest.receive(host.ack())
    guest.detach()
    for i in range(4, 29):  # 25 records, 10 kept: 4..18 are pushed out
        guest.record(log(i))
    msgs = host.receive(connect(guest, host)[1])
    # Hello, the announcement (standing for seqs 4..18), then the replay.
    assert msgs[1] == Dropped(count=15, first_seq=4, last_seq=18, seq=18)
    assert [m.seq for m in msgs[2:] if isinstance(m, Log)] == list(range(19, 29))
    assert guest.dropped_total == host.dropped == 15
    assert host.lost == 0


def test_dropped_record_never_pushes_out_an_unsent_record() -> None:
    # The buffer is full when the host attaches: the dropped record itself
    # must not evict a record the host has not seen yet.
    guest = GuestSession(agent="k", boot_id="b", max_buffer_records=3)
    for i in range(1, 6):
        guest.record(log(i))
    host = HostSession()
    msgs = host.receive(connect(guest, host)[1])
    got = [m.seq for m in msgs if isinstance(m, Log)]
    (d,) = [m for m in msgs if isinstance(m, Dropped)]
    assert set(range(d.first_seq, d.last_seq + 1)) | set(got) == set(range(1, 6))
    assert d.count == guest.dropped_total == host.dropped == 5 - len(got)
    assert host.lost == 0


def test_reattaching_before_the_dropped_record_arrives_counts_the_loss_once() -> None:
    guest = GuestSession(agent="k", boot_id="b", max_buffer_records=4)
    for i in range(1, 9):
        guest.record(log(i))
    host = HostSession()
    connect(guest, host)  # the reply is lost with the connection
    guest.detach()
    msgs = host.receive(connect(guest, host)[1])
    counts = sum(m.count for m in msgs if isinstance(m, Dropped))
    assert counts == guest.dropped_total == host.dropped == 4
    assert host.lost == 0


def test_announcement_missed_by_the_host_is_repeated_and_counted_once() -> None:
    guest = GuestSession(agent="k", boot_id="b", max_buffer_records=1)
    guest.record(log(1))
    guest.record(log(2))
    host = HostSession()
    _, out = connect(guest, host)  # hello, dropped(1..1), log 2
    hello_len = len(encode(Hello(agent="k", boot_id="b", next_seq=3)))
    host.receive(out[:hello_len])  # the connection breaks after the hello
    guest.record(log(3))  # pushes out 2 as well
    guest.detach()
    msgs = host.receive(connect(guest, host)[1])
    assert [m for m in msgs if isinstance(m, Dropped)] == [
        Dropped(count=2, first_seq=1, last_seq=2, seq=2)
    ]
    assert guest.dropped_total == host.dropped == 2 and host.lost == 0


def test_ping_is_answered_and_stop_signal_are_handed_to_kestrel() -> None:
    guest = GuestSession(agent="k", boot_id="b")
    host = HostSession()
    host.receive(connect(guest, host)[1])
    commands, out = guest.receive(
        host.command(Ping(id=9)) + host.command(Stop(grace_s=2.5)) + host.command(Signal(signum=1))
    )
    assert commands == [Stop(grace_s=2.5), Signal(signum=1)]
    assert host.receive(out) == [Pong(id=9)]


def test_a_host_that_promises_keepalives_sets_the_guests_silence_limit() -> None:
    guest = GuestSession(agent="k", boot_id="b")
    assert guest.silence_limit_s is None  # nobody attached: nothing to lose
    old_host = HostSession()  # promises nothing: the guest waits for it forever
    guest.receive(old_host.attach())
    assert guest.silence_limit_s is None
    host = HostSession(keepalive_s=2.0)
    assert decode_all(host.attach()) == [Attach(last_seq=0, keepalive_s=2.0)]
    guest.receive(host.attach())
    assert guest.silence_limit_s == 2.0 * KEEPALIVE_MISSES
    _, out = guest.receive(host.ping())
    assert host.receive(out) == [Pong(id=1)]
    guest.detach()
    assert guest.silence_limit_s is None


def test_telemetry_is_not_buffered_while_detached() -> None:
    guest = GuestSession(agent="k", boot_id="b")
    assert guest.telemetry(Pong(id=1)) == b""
    assert guest.buffered == 0


def test_ack_frame_carries_the_highest_seq_received() -> None:
    host = HostSession(last_seq=41)
    host.receive(encode(Log(seq=42)))
    assert decode_all(host.ack()) == [Ack(seq=42)]


# --- stateful: any sequence of record / deliver / ack / detach / attach ----------


class SessionMachine(RuleBasedStateMachine):
    """A guest and a host joined by a lossy, resettable byte pipe."""

    @initialize(records=st.integers(1, 12), bound_bytes=st.sampled_from([200, 600, 10**6]))
    def setup(self, records: int, bound_bytes: int) -> None:
        self.guest = GuestSession(
            agent="k", boot_id="b", max_buffer_records=records, max_buffer_bytes=bound_bytes
        )
        self.host = HostSession()
        self.connected = False
        self.to_host = b""
        self.to_guest = b""
        self.sent: dict[int, bytes] = {}  # seq -> log payload as recorded
        self.received: list[Message] = []
        self.counter = 0

    def _host_receive(self, data: bytes) -> None:
        msgs = self.host.receive(data)
        self.received += [m for m in msgs if m.SEQUENCED]

    @rule(size=st.integers(0, 120))
    def record(self, size: int) -> None:
        self.counter += 1
        msg = Log(data=bytes([self.counter % 256]) * size)
        frame = self.guest.record(msg)
        self.sent[msg.seq] = msg.data
        if self.connected:
            self.to_host += frame
        else:
            assert frame == b""

    @precondition(lambda self: self.connected and self.to_host)
    @rule(n=st.integers(1, 400))
    def deliver(self, n: int) -> None:
        chunk, self.to_host = self.to_host[:n], self.to_host[n:]
        self._host_receive(chunk)

    @precondition(lambda self: self.connected)
    @rule()
    def ack(self) -> None:
        self.to_guest += self.host.ack()

    @precondition(lambda self: self.connected and self.to_guest)
    @rule()
    def deliver_to_guest(self) -> None:
        _, out = self.guest.receive(self.to_guest)
        self.to_guest = b""
        self.to_host += out

    @precondition(lambda self: self.connected)
    @rule()
    def disconnect(self) -> None:
        # Whatever is in flight either way is lost with the connection.
        self.guest.detach()
        self.connected = False
        self.to_host = self.to_guest = b""

    @precondition(lambda self: not self.connected)
    @rule()
    def connect(self) -> None:
        self.connected = True
        _, out = self.guest.receive(self.host.attach())
        self.to_host = out

    @invariant()
    def host_sees_every_seq_once_in_order_or_announced_dropped(self) -> None:
        if not hasattr(self, "host"):
            return
        expected = 1
        for m in self.received:
            if isinstance(m, Dropped):
                assert (m.first_seq, m.seq) == (expected, m.last_seq)
                assert m.count == m.last_seq - m.first_seq + 1
                expected = m.last_seq + 1
            else:
                assert isinstance(m, Log) and m.seq == expected
                assert self.sent[m.seq] == m.data
                expected += 1
        assert self.host.lost == 0

    def teardown(self) -> None:
        if not hasattr(self, "host"):
            return
        # Settle: connect, deliver everything both ways, until quiet.
        if not self.connected:
            self.connect()
        self._host_receive(self.to_host)
        self.to_host = b""
        self.host_sees_every_seq_once_in_order_or_announced_dropped()
        # Everything the guest ever sequenced is either received or announced.
        last = self.received[-1].seq if self.received else 0  # type: ignore[attr-defined]
        assert last == self.guest.next_seq - 1
        dropped = sum(m.count for m in self.received if isinstance(m, Dropped))
        assert dropped == self.guest.dropped_total == self.host.dropped


SessionMachine.TestCase.settings = settings(
    max_examples=SessionMachine.TestCase.settings.max_examples, stateful_step_count=40
)
test_session_machine = SessionMachine.TestCase


def test_negative_counters_from_a_peer_are_protocol_errors() -> None:
    import msgpack
    import pytest as _pytest

    from kestrel.protocol import FrameDecoder, ProtocolError

    for body in ({"t": "attach", "last_seq": -5}, {"t": "ack", "seq": -1},
                 {"t": "dropped", "count": -3, "first_seq": 1, "last_seq": 2, "seq": 9}):
        payload = msgpack.packb(body)
        d = FrameDecoder()
        d.feed(len(payload).to_bytes(4, "big") + payload)
        with _pytest.raises(ProtocolError, match="negative"):
            list(d)
