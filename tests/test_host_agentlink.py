"""The monitor's agent session against the real guest protocol over socketpairs.

The guest side is kestrel.protocol.GuestSession (the code kestrel runs); the
host side is host.agentlink.AgentLink writing into a real store.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import cast

import trio

from host.agentlink import AgentLink
from host.state import Store
from host.vmm import LaunchSpec, Running, VmmDriver
from kestrel.cmdline import Channel
from kestrel.protocol import (
    Exit,
    Fatal,
    GuestSession,
    Health,
    Log,
    Message,
    State,
    Stop,
    Timeline,
)


class Guest:
    """A guest end: answers attach/ack through GuestSession, records what it is told."""

    def __init__(self) -> None:
        self.session = GuestSession(agent="kestrel/test", boot_id="b1")
        self.stream: trio.SocketStream | None = None
        self.commands: list[Message] = []

    async def emit(self, msg: Message) -> None:
        frame = self.session.record(msg)
        if frame and self.stream is not None:
            try:
                await self.stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # kept in the replay buffer; the next attach gets it

    async def serve(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        try:
            while data := await stream.receive_some(65536):
                commands, reply = self.session.receive(data)
                self.commands += commands
                if reply:
                    await stream.send_all(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.stream = None
            self.session.detach()


class PairDriver:
    """Each open_agent_stream() is a fresh socketpair whose other end the guest serves."""

    name = "pair"

    def __init__(self, guest: Guest, nursery: trio.Nursery) -> None:
        self.guest = guest
        self.nursery = nursery
        self.opened = 0

    def agent_channel(self) -> Channel:
        return Channel("unix", path="/unused")

    async def open_agent_stream(self, spec: LaunchSpec, running: Running) -> trio.abc.Stream:
        a, b = trio.socket.socketpair()
        self.opened += 1
        self.nursery.start_soon(self.guest.serve, trio.SocketStream(b))
        return trio.SocketStream(a)


async def _run_link(link: AgentLink, driver: PairDriver, exited: trio.Event) -> None:
    # The link only asks the driver for streams: no launch spec, no VMM process.
    await link.run(cast(VmmDriver, driver), cast(LaunchSpec, None), cast(Running, None), exited)


def _store(tmp_path: Path) -> Store:
    store = Store(tmp_path)
    store.db.execute(
        "INSERT INTO vms (name, plugin, vmm, status, cpus, memory_mb, kernel, initramfs, run_dir,"
        " created_at) VALUES ('vm', 'p', 'pair', 'starting', 1, 512, '/k', '/i', '/r', ?)",
        (time.time(),))
    return store


async def _until(predicate: object, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.01)


async def test_records_are_stored_then_acked_and_hello_means_running(tmp_path: Path) -> None:
    store = _store(tmp_path)
    guest = Guest()
    for i in range(50):
        await guest.emit(Log(stream="stdout", data=f"line {i}\n".encode()))
    await guest.emit(Timeline(mark="workload_exec", uptime=0.42))
    link = AgentLink(store, "vm")
    exited = trio.Event()
    async with trio.open_nursery() as nursery:
        driver = PairDriver(guest, nursery)
        nursery.start_soon(_run_link, link, driver, exited)
        await link.hello_seen.wait()
        await _until(lambda: guest.session.buffered == 0)  # everything acked
        await guest.emit(Health(status="healthy", detail="200"))
        await _until(lambda: store.vm("vm").status == "healthy")
        exited.set()
        nursery.cancel_scope.cancel()
    data = b"".join(d for _, _, d, _ in store.logs("vm"))
    assert data == b"".join(f"line {i}\n".encode() for i in range(50))
    vm = store.vm("vm")
    assert vm.boot["timeline"]["workload_exec"] == 0.42
    statuses = [e.value for e in store.events("vm") if e.kind == "status"]
    assert statuses == ["running", "healthy"]


async def test_reconnect_replays_without_loss_or_duplicates(tmp_path: Path) -> None:
    store = _store(tmp_path)
    guest = Guest()
    link = AgentLink(store, "vm")
    exited = trio.Event()
    async with trio.open_nursery() as nursery:
        driver = PairDriver(guest, nursery)
        nursery.start_soon(_run_link, link, driver, exited)
        await link.hello_seen.wait()
        for i in range(10):
            await guest.emit(Log(stream="stdout", data=b"%d\n" % i))
        await _until(lambda: link.session.last_seq >= 10)
        # The transport breaks; the guest keeps producing while detached.
        broken, guest.stream = guest.stream, None
        assert broken is not None
        await broken.aclose()
        for i in range(10, 20):
            await guest.emit(Log(stream="stderr", data=b"%d\n" % i))
        await _until(lambda: driver.opened >= 2 and link.session.last_seq >= 20)
        await guest.emit(Exit(pid=7, code=0, status=0))
        await guest.emit(State(state="poweroff"))
        await _until(lambda: link.poweroff)
        exited.set()
        nursery.cancel_scope.cancel()
    logs = list(store.logs("vm"))
    assert [int(d) for _, _, d, _ in logs] == list(range(20))
    assert [s for _, s, _, _ in logs] == ["stdout"] * 10 + ["stderr"] * 10
    assert link.session.lost == 0 and link.exit_seen


async def test_stop_reaches_the_guest_and_fatal_is_kept(tmp_path: Path) -> None:
    store = _store(tmp_path)
    guest = Guest()
    link = AgentLink(store, "vm")
    exited = trio.Event()
    async with trio.open_nursery() as nursery:
        driver = PairDriver(guest, nursery)
        nursery.start_soon(_run_link, link, driver, exited)
        await link.hello_seen.wait()
        assert await link.send_stop(3.5)
        await _until(lambda: any(isinstance(c, Stop) for c in guest.commands))
        await guest.emit(Fatal(message="manifest: workload.entrypoint: required"))
        await _until(lambda: bool(link.fatal))
        exited.set()
        nursery.cancel_scope.cancel()
    stop = next(c for c in guest.commands if isinstance(c, Stop))
    assert stop.grace_s == 3.5
    assert "workload.entrypoint" in store.vm("vm").fatal
