"""kestrel.execproto without sockets: the frames, open validation and the credit windows."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kestrel.execproto import (
    EXEC_WINDOW,
    MAX_EXEC_CHUNK,
    ExecData,
    ExecExit,
    ExecOpen,
    ReceiveWindow,
    SendWindow,
    check_open,
)
from kestrel.protocol import FrameDecoder, GuestSession, HostSession, Stop, encode


def test_exec_frames_are_commands_for_kestrel_and_live_for_the_host() -> None:
    guest = GuestSession(agent="k", boot_id="b")
    host = HostSession()
    _, hello = guest.receive(host.attach())
    host.receive(hello)
    opened = ExecOpen(id=3, argv=["sh"], env=["A=b"], tty=True, rows=40, cols=120)
    commands, _ = guest.receive(encode(opened) + encode(Stop(grace_s=1)))
    assert commands == [opened, Stop(grace_s=1)]
    # Guest -> host exec frames are not records: no sequence number, no replay.
    frame = guest.telemetry(ExecData(id=3, data=b"out"))
    frame += guest.telemetry(ExecExit(id=3, pid=9, code=0, status=0, message="exited 0"))
    assert guest.buffered == 0
    assert host.receive(frame) == [ExecData(id=3, data=b"out"),
                                   ExecExit(id=3, pid=9, code=0, status=0, message="exited 0")]
    guest.detach()
    assert guest.telemetry(ExecData(id=3, data=b"x")) == b""  # nobody to replay it to


def test_bad_open_requests_are_named() -> None:
    ok = ExecOpen(id=1, argv=["true"])
    assert check_open(ok) == ""
    assert "empty" in check_open(ExecOpen(id=1, argv=[]))
    assert "positive" in check_open(ExecOpen(id=0, argv=["true"]))
    assert "'NOEQUALS'" in check_open(ExecOpen(id=1, argv=["true"], env=["NOEQUALS"]))
    assert "NUL" in check_open(ExecOpen(id=1, argv=["a\0b"]))
    assert "uid/gid" in check_open(ExecOpen(id=1, argv=["true"], uid=-1))
    assert "terminal size" in check_open(ExecOpen(id=1, argv=["true"], rows=0))


def test_a_bool_field_refuses_an_int_and_a_list_refuses_non_strings() -> None:
    import msgpack

    from kestrel.protocol import _LEN, ProtocolError

    for body in ({"t": "exec_open", "id": 1, "tty": 1}, {"t": "exec_open", "argv": ["a", 1]}):
        payload = msgpack.packb(body)
        d = FrameDecoder()
        d.feed(_LEN.pack(len(payload)) + payload)
        try:
            list(d)
        except ProtocolError:
            continue
        raise AssertionError(f"{body} accepted")


@given(st.lists(st.tuples(st.sampled_from(["send", "consume"]), st.integers(0, 200_000)),
                max_size=60))
def test_credit_never_lets_more_than_a_window_be_outstanding(steps: list[tuple[str, int]]
                                                             ) -> None:
    """Sender and receiver driven by hand: in flight + unconsumed never exceed the window,
    and a blocked sender is always unblocked once the receiver consumed everything."""
    send, recv = SendWindow(), ReceiveWindow()
    in_flight = 0  # sent, not yet consumed by the receiver
    for what, n in steps:
        if what == "send":
            took = send.take(n)
            assert took <= MAX_EXEC_CHUNK
            in_flight += took
        else:
            n = min(n, in_flight)
            in_flight -= n
            send.grant(recv.consumed(n))
        assert in_flight <= EXEC_WINDOW
        assert 0 <= send.available <= EXEC_WINDOW
    send.grant(recv.consumed(in_flight))
    if send.available == 0:
        raise AssertionError("sender blocked with nothing in flight")


def test_a_peer_granting_too_much_credit_is_capped() -> None:
    send = SendWindow()
    send.grant(10 * EXEC_WINDOW)
    assert send.available == EXEC_WINDOW
