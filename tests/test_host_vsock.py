"""Hybrid vsock on the host: the handshake, the agent listener, the backend and the session loop.

The handshake runs against a unix socket playing the VMM; the backend is
the real vhost-device-vsock (found as volar finds it; in CI it must be
there), started in hybrid mode only - nothing here opens AF_VSOCK.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from host.qemu import QemuDriver
from host.session import Collector, SessionLoop
from host.vmm import LaunchSpec, VmmError
from host.vsock import (
    BACKEND_SOCKET,
    AgentListener,
    BackendMissing,
    HybridError,
    NoBackend,
    NotListening,
    backend_command,
    connect,
    default_channel,
    find_backend,
    hybrid_connect,
    hybrid_socket,
    in_ci,
    listen_path,
    start_backend,
)
from kestrel.layout import SERIAL_PORT_NAME, VSOCK_PORT
from kestrel.protocol import Attach, FrameDecoder, GuestSession, Log, Stop


def _executable(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def backend() -> Path:
    found = find_backend()
    if found is None:
        if in_ci():
            pytest.fail("CI=true: vhost-device-vsock must be installed (make vhost-device-vsock)")
        pytest.skip(reason="vhost-device-vsock not found ($KESTREL_VHOST_VSOCK, PATH, .cache)")
    return found


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="kvs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- finding the backend ----------------------------------------------------------

def test_backend_is_found_in_env_then_path_then_cache(tmp_path: Path) -> None:
    env_bin = _executable(tmp_path / "env-backend")
    (tmp_path / "bin").mkdir()
    path_bin = _executable(tmp_path / "bin" / "vhost-device-vsock")
    cache = _executable(tmp_path / "cache-backend")
    on_path = {"PATH": str(tmp_path / "bin")}
    assert find_backend({"KESTREL_VHOST_VSOCK": str(env_bin), **on_path}, cache=cache) == env_bin
    assert find_backend(on_path, cache=cache) == path_bin
    assert find_backend({"PATH": "/nonexistent"}, cache=cache) == cache
    assert find_backend({"PATH": "/nonexistent"}, cache=tmp_path / "nope") is None


def test_an_explicit_backend_that_is_missing_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(BackendMissing, match=r"KESTREL_VHOST_VSOCK=/nonexistent/vhost: no "):
        find_backend({"KESTREL_VHOST_VSOCK": "/nonexistent/vhost"})


def test_without_a_backend_volar_says_so_and_uses_serial_but_ci_refuses(tmp_path: Path) -> None:
    env = {"PATH": "/nonexistent"}
    channel, why = default_channel(env, cache=tmp_path / "nope")
    assert channel == "serial"
    assert "vhost-device-vsock not found" in why and "\n" not in why
    with pytest.raises(BackendMissing, match="vhost-device-vsock not found"):
        default_channel({**env, "CI": "true"}, cache=tmp_path / "nope")


def test_backend_runs_in_hybrid_mode_only_never_forwarding_to_host_vsock(tmp_path: Path) -> None:
    cmd = backend_command(Path("/b/vhost-device-vsock"), cid=7, run_dir=tmp_path)
    assert cmd == ["/b/vhost-device-vsock", "--vm",
                   f"guest-cid=7,socket={tmp_path}/{BACKEND_SOCKET},"
                   f"uds-path={tmp_path}/vsock.sock"]
    # forward-cid/forward-listen open AF_VSOCK sockets on this host: never.
    assert not any("forward" in word for word in cmd)


# --- the QEMU command line ----------------------------------------------------------

def _spec(tmp_path: Path) -> LaunchSpec:
    return LaunchSpec(name="vm", run_dir=tmp_path, kernel=Path("/k"), initramfs=Path("/i"),
                      cmdline="console=ttyS0", memory_mb=256)


@pytest.mark.parametrize(("machine", "device"), [("microvm", "vhost-user-vsock-device"),
                                                 ("q35", "vhost-user-vsock-pci")])
def test_qemu_vsock_has_shared_memory_and_the_vhost_user_device(
        tmp_path: Path, machine: str, device: str) -> None:
    driver = QemuDriver(machine=machine, tsc_khz=1000000, guest_cid=5)
    cmd = driver.command(_spec(tmp_path))
    assert "memory-backend-memfd,id=mem0,size=256M,share=on" in cmd
    assert cmd[cmd.index("-M") + 1].endswith(",memory-backend=mem0")
    assert f"socket,id=vvsock,path={tmp_path}/{BACKEND_SOCKET}" in cmd
    (dev,) = [w for w in cmd if w.startswith(device)]
    assert "chardev=vvsock" in dev and "id=vsock0" in dev  # snapshots unplug it by id
    assert ("bus=vsockport" in dev) == (machine == "q35")  # a hot-pluggable root port
    assert not any("virtserialport" in word for word in cmd)
    # kestrel's own default channel is vsock:9000: the driver adds none.
    assert "kestrel.channel" not in driver.guest_cmdline(_spec(tmp_path))
    assert str(driver.agent_channel()) == f"vsock:{VSOCK_PORT}"


def test_qemu_restore_command_waits_for_the_state_and_has_no_vsock_yet(tmp_path: Path) -> None:
    """A restore loads the snapshot first, then plugs in its own vsock (migration refuses one)."""
    driver = QemuDriver(machine="q35", guest_cid=5)
    cold, restore = driver.command(_spec(tmp_path)), driver.command(_spec(tmp_path), incoming_fd=7)
    assert restore[-2:] == ["-incoming", "fd:7"]  # the state file, inherited
    assert not any("vhost-user-vsock" in w or "id=vvsock" in w for w in restore)
    assert "pcie-root-port,id=vsockport,chassis=1" in restore  # where the vsock goes
    for option in ("-M", "-m", "-smp", "-append"):  # the same machine the state came from
        assert cold[cold.index(option) + 1] == restore[restore.index(option) + 1]


def test_qemu_serial_channel_keeps_virtio_serial(tmp_path: Path) -> None:
    driver = QemuDriver(tsc_khz=1000000, channel="serial")
    cmd = driver.command(_spec(tmp_path))
    assert f"virtserialport,chardev=agent0,name={SERIAL_PORT_NAME}" in cmd
    assert not any("vhost-user" in word or "memfd" in word for word in cmd)
    assert f"kestrel.channel=serial:{SERIAL_PORT_NAME}" in driver.guest_cmdline(_spec(tmp_path))


def test_qemu_refuses_a_reserved_cid_and_an_unknown_channel() -> None:
    with pytest.raises(VmmError, match="guest CID 2"):
        QemuDriver(tsc_khz=1, guest_cid=2)
    with pytest.raises(VmmError, match="channel 'pipe'"):
        QemuDriver(tsc_khz=1, channel="pipe")


# --- the real backend ------------------------------------------------------------------

async def test_backend_sockets_are_private_and_it_stops(backend: Path, short_dir: Path) -> None:
    helper = await start_backend(backend, cid=3, run_dir=short_dir)
    try:
        for sock in (short_dir / BACKEND_SOCKET, hybrid_socket(short_dir)):
            mode = sock.stat().st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, sock
        assert os.getsid(helper.process.pid) == helper.process.pid  # its own session
    finally:
        await helper.stop()
    assert helper.process.returncode is not None


async def test_a_broken_backend_is_one_line_with_its_output(short_dir: Path) -> None:
    broken = _executable(short_dir / "broken",
                         "#!/bin/sh\necho 'cannot map guest memory'\nexit 1\n")
    with trio.fail_after(20), pytest.raises(VmmError) as info:
        await start_backend(broken, cid=3, run_dir=short_dir)
    message = str(info.value)
    assert "exited with status 1 before creating vhost-vsock.sock" in message
    assert "cannot map guest memory" in message and "\n" not in message


async def test_stale_sockets_of_a_crashed_vm_do_not_stop_a_new_backend(
        backend: Path, short_dir: Path) -> None:
    for name in (BACKEND_SOCKET, "vsock.sock"):  # bound, then left behind
        s = trio.socket.socket(trio.socket.AF_UNIX)
        await s.bind(str(short_dir / name))
        s.close()
    helper = await start_backend(backend, cid=3, run_dir=short_dir)
    try:
        assert helper.process.returncode is None
    finally:
        await helper.stop()


# --- the handshake and the agent listener (cloud-hypervisor and QEMU alike) ------------------

async def _serve_unix(path: Path, handler: Any, nursery: trio.Nursery) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(str(path))
    sock.listen(8)
    nursery.start_soon(trio.serve_listeners, handler, [trio.SocketListener(sock)])


async def test_connect_handshake_retries_and_keeps_bytes_after_ok(tmp_path: Path) -> None:
    path = tmp_path / "vm.vsock"
    seen: list[bytes] = []

    async def vmm(stream: trio.SocketStream) -> None:
        line = b""
        while not line.endswith(b"\n"):
            line += await stream.receive_some(1)
        seen.append(line)
        if len(seen) < 3:
            await stream.aclose()  # nothing listens in the guest yet: closed, no OK
            return
        # OK and the guest's first bytes can arrive in one read.
        await stream.send_all(b"OK 1073741824\nhello from kestrel")
        assert await stream.receive_some(100) == b"ping"
        await stream.send_all(b"pong")

    async with trio.open_nursery() as nursery:
        await _serve_unix(path, vmm, nursery)
        stream, rest = await hybrid_connect(path, VSOCK_PORT, deadline_s=10)
        assert rest == b"hello from kestrel"
        await stream.send_all(b"ping")
        assert await stream.receive_some(100) == b"pong"
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert seen == [f"CONNECT {VSOCK_PORT}\n".encode()] * 3


async def test_connect_without_ok_gives_up_at_the_deadline(tmp_path: Path) -> None:
    path = tmp_path / "vm.vsock"

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()  # never answers: the ~1 s OK deadline applies

    async with trio.open_nursery() as nursery:
        await _serve_unix(path, silent, nursery)
        with pytest.raises(VmmError,
                           match=r"no answer to CONNECT within 1 s .*; still so after 2\.5 s"):
            await hybrid_connect(path, VSOCK_PORT, deadline_s=2.5)
        nursery.cancel_scope.cancel()


async def test_one_connect_says_at_once_that_nothing_listens(tmp_path: Path) -> None:
    path = tmp_path / "vm.vsock"
    seen: list[bytes] = []

    async def nobody(stream: trio.SocketStream) -> None:
        seen.append(await stream.receive_some(100))
        await stream.aclose()  # what the VMM does when the guest resets the port

    async with trio.open_nursery() as nursery:
        await _serve_unix(path, nobody, nursery)
        closed = re.escape("closed the connection without OK (nothing listens on that port")
        with pytest.raises(NotListening, match=closed):
            await connect(path, 8080)
        nursery.cancel_scope.cancel()
    assert seen == [b"CONNECT 8080\n"]


async def test_connect_to_a_missing_socket_names_it(tmp_path: Path) -> None:
    with pytest.raises(NoBackend, match=r"vm\.vsock: No such file or directory \(is the VM"):
        await connect(tmp_path / "vm.vsock", 8080)


async def test_a_vmm_answering_nonsense_is_not_taken_for_ok(tmp_path: Path) -> None:
    path = tmp_path / "vm.vsock"

    async def odd(stream: trio.SocketStream) -> None:
        await stream.receive_some(100)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    async with trio.open_nursery() as nursery:
        await _serve_unix(path, odd, nursery)
        answer = re.escape("the VMM answered b'HTTP/1.1 400 Bad Request\\r', not OK")
        with pytest.raises(HybridError, match=answer):
            await connect(path, 8080)
        nursery.cancel_scope.cancel()


async def test_guest_connection_arrives_on_the_private_port_listener(tmp_path: Path) -> None:
    uds = tmp_path / "vsock.sock"
    listener = await AgentListener.open(uds, VSOCK_PORT)
    path = listen_path(uds, VSOCK_PORT)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    vmm = await trio.lowlevel.open_process(["sleep", "30"])
    try:
        # What the VMM does on the guest's behalf, before volar asks for a stream.
        vmm_side = await trio.open_unix_socket(str(path))
        await vmm_side.send_all(b"frames")
        with trio.fail_after(5):
            stream = await listener.accept(vmm, timeout=5, what="vm")
            assert await stream.receive_some(10) == b"frames"
        await stream.aclose()
        await vmm_side.aclose()
        vmm.kill()
        with trio.fail_after(5), pytest.raises(VmmError, match="the VMM exited"):
            await listener.accept(vmm, timeout=60, what="vm")
    finally:
        vmm.kill()
        await vmm.wait()
        await listener.aclose()
    assert not path.exists()


# --- the session loop -------------------------------------------------------------------------

def _frames(data: bytes) -> list[Any]:
    decoder = FrameDecoder()
    decoder.feed(data)
    return list(decoder)


async def test_a_command_waits_for_a_reattach_in_flight_instead_of_colliding() -> None:
    """The harness's BusyResourceError: a Stop sent while the loop's re-attach was sending."""
    guest = GuestSession(agent="kestrel/test", boot_id="b")
    loop = SessionLoop(Collector(), reattach_s=0.05, say=lambda line: None)

    async def serve(stream: trio.abc.Stream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # the test hangs up at the end
            await loop.serve(stream)

    async with trio.open_nursery() as nursery:
        # Connection 1: the guest says hello; the loop has heard kestrel once.
        host1, guest1 = trio.testing.lockstep_stream_pair()
        nursery.start_soon(loop.serve, host1)
        _, reply = guest.receive(bytes(await guest1.receive_some()))
        await guest1.send_all(reply + guest.record(Log(stream="stdout", data=b"x")))
        await guest1.receive_some()  # the ack
        await guest1.aclose()
        guest.detach()
        assert loop.hello_seen.is_set()
        # Connection 2: nobody reads, so attach and re-attach block in send_all.
        host2, guest2 = trio.testing.lockstep_stream_pair()
        nursery.start_soon(serve, host2)
        await trio.sleep(0.2)  # attach sent, re-attach timer fired: a send is in flight
        sent = trio.Event()

        async def stop() -> None:
            assert await loop.command(Stop(grace_s=1))
            sent.set()

        nursery.start_soon(stop)
        data = b""
        with trio.fail_after(10):
            while not sent.is_set() or not any(isinstance(f, Stop) for f in _frames(data)):
                data += await guest2.receive_some()
        await guest2.aclose()
    frames = _frames(data)
    assert isinstance(frames[0], Attach) and frames[0].last_seq == 1
    assert any(isinstance(f, Stop) for f in frames)
    assert all(isinstance(f, (Attach, Stop)) for f in frames)  # whole frames, none torn


async def test_records_reach_the_sink_before_the_ack() -> None:
    order: list[str] = []

    class Recording:
        def record(self, messages: list[Any]) -> None:
            order.extend(f"stored {type(m).__name__}" for m in messages)

    guest = GuestSession(agent="kestrel/test", boot_id="b")
    loop = SessionLoop(Recording(), say=lambda line: None)
    host, peer = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.serve, host)
        _, reply = guest.receive(bytes(await peer.receive_some()))
        await peer.send_all(reply + guest.record(Log(stream="stdout", data=b"1")))
        with trio.fail_after(5):
            while True:
                frames = _frames(bytes(await peer.receive_some()))
                if frames:
                    order.append(f"acked {frames[-1].seq}")
                    break
        await peer.aclose()
    assert order == ["stored Hello", "stored Log", "acked 1"]


# --- guest CIDs ---------------------------------------------------------------------------------

def test_each_vm_gets_its_own_guest_cid_and_a_deleted_vms_cid_is_reused(tmp_path: Path) -> None:
    from host.state import Store

    store = Store(tmp_path / "state")

    def add(name: str) -> int:
        store.db.execute(
            "INSERT INTO vms (name, plugin, vmm, status, cpus, memory_mb, kernel, initramfs,"
            " run_dir, created_at) VALUES (?, 'p', 'qemu', 'pending', 1, 64, 'k', 'i', 'r', 0)",
            (name,))
        return store.allocate_cid(name)

    assert [add("a"), add("b"), add("c")] == [3, 4, 5]
    store.delete_vm("b")
    assert add("d") == 4
    assert store.vm("c").guest_cid == 5
