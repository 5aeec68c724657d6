"""The serial console path without a VM: the monitor's SerialConsole over a unix
socket playing the VMM's serial line, volar's attach in a real PTY, and
cloud-hypervisor's `--serial socket=` up to where its binary would be."""

from __future__ import annotations

import os
import pty
import socket
import termios
import threading
import time
from pathlib import Path

import pytest
import trio

from host.cloud_hypervisor import CloudHypervisorDriver
from host.console import attach
from host.errors import VolarError
from host.rows import Vm
from host.serialconsole import CONSOLE_SOCKET, SerialConsole
from host.vmm import LaunchSpec, Running, SerialConsoleDriver
from host.vsock import private_listener


async def _vmm_pair(tmp_path: Path) -> tuple[trio.SocketStream, trio.SocketStream]:
    """(the guest's side of the serial line, the side the monitor reads)."""
    listener = await private_listener(tmp_path / "serial.sock")
    async with listener:
        guest = await trio.open_unix_socket(str(tmp_path / "serial.sock"))
        monitor = await listener.accept()
    return guest, monitor


async def _read_until(stream: trio.abc.Stream, text: bytes) -> bytes:
    seen = b""
    with trio.fail_after(10):
        while text not in seen:
            seen += await stream.receive_some(65536)
    return seen


async def test_everything_is_logged_and_two_attachers_share_the_line(tmp_path: Path) -> None:
    guest, monitor = await _vmm_pair(tmp_path)
    log = tmp_path / "console.log"
    con = SerialConsole(tmp_path, log)

    async def opened() -> trio.abc.Stream:
        return monitor

    async with trio.open_nursery() as nursery:
        nursery.start_soon(con.run, opened)
        # Nobody attached: the guest's writes still go somewhere (the log).
        await guest.send_all(b"early boot line\n")
        path = tmp_path / CONSOLE_SOCKET
        with trio.fail_after(10):
            while not path.exists():
                await trio.sleep(0.01)
        assert path.stat().st_mode & 0o777 == 0o600
        a = await trio.open_unix_socket(str(path))
        b = await trio.open_unix_socket(str(path))
        await trio.sleep(0.1)  # both registered before the guest speaks
        await guest.send_all(b"login: ")
        assert b"login: " in await _read_until(a, b"login: ")
        assert b"login: " in await _read_until(b, b"login: ")
        await a.send_all(b"typed by a\r")
        assert await _read_until(guest, b"typed by a\r") == b"typed by a\r"
        await b.send_all(b"typed by b\r")
        assert await _read_until(guest, b"typed by b\r") == b"typed by b\r"
        await guest.aclose()  # the VM is gone: attachers are hung up on
        with trio.fail_after(10):
            assert await a.receive_some(100) == b""
            await con.done.wait()
        nursery.cancel_scope.cancel()
    assert log.read_bytes() == b"early boot line\nlogin: "
    assert not path.exists()


async def test_a_stuck_attacher_is_dropped_and_never_blocks_the_guest(tmp_path: Path) -> None:
    guest, monitor = await _vmm_pair(tmp_path)
    log = tmp_path / "console.log"
    con = SerialConsole(tmp_path, log)

    async def opened() -> trio.abc.Stream:
        return monitor

    async with trio.open_nursery() as nursery:
        nursery.start_soon(con.run, opened)
        path = tmp_path / CONSOLE_SOCKET
        with trio.fail_after(10):
            while not path.exists():
                await trio.sleep(0.01)
        stuck = await trio.open_unix_socket(str(path))  # connects, never reads
        await trio.sleep(0.1)
        chunk = b"x" * 65535 + b"\n"
        with trio.fail_after(60):  # 64 MiB through while the attacher sleeps
            for _ in range(1024):
                await guest.send_all(chunk)
        await guest.aclose()
        with trio.fail_after(30):
            await con.done.wait()
        nursery.cancel_scope.cancel()
        await stuck.aclose()
    assert log.stat().st_size == 1024 * len(chunk)


def _Row(run_dir: Path, status: str = "running") -> Vm:
    return Vm(name="vm1", status=status, run_dir=str(run_dir))


def test_attach_in_a_pty_detaches_on_ctrl_bracket_and_restores(tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / CONSOLE_SOCKET))
    server.listen(1)
    got = bytearray()

    master, slave = pty.openpty()
    cooked = termios.tcgetattr(slave)

    def guest() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"guest says hi\r\n")
            # The user types once the terminal is raw (cooked mode would eat ^C).
            while termios.tcgetattr(slave)[3] & termios.ICANON:
                time.sleep(0.01)
            shown = b""
            while b"guest says hi" not in shown:  # the guest's output reaches the screen
                shown += os.read(master, 4096)
            os.write(master, b"ls\r\x03more\x1dafter")  # Ctrl-C is a byte for the guest
            try:
                while data := conn.recv(100):
                    got.extend(data)
            except ConnectionResetError:
                pass  # volar hung up with our greeting unread: that is fine

    thread = threading.Thread(target=guest, daemon=True)
    thread.start()
    try:
        code = attach(_Row(tmp_path), stdin=slave, stdout=slave)
        assert code == 0
        assert termios.tcgetattr(slave) == cooked  # the terminal is given back
        thread.join(10)
        assert bytes(got) == b"ls\r\x03more"  # nothing after Ctrl-] reached the guest
    finally:
        os.close(master)
        os.close(slave)
        server.close()


def test_attach_to_a_stopped_or_consoleless_vm_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(VolarError, match="is stopped: no console to attach to"):
        attach(_Row(tmp_path, "stopped"))
    with pytest.raises(VolarError, match=r"console socket .* does not answer"):
        attach(_Row(tmp_path))


def _ch_spec(tmp_path: Path) -> LaunchSpec:
    return LaunchSpec(name="vm1", run_dir=tmp_path, kernel=Path("/k"), initramfs=Path("/i"),
                      cmdline="console=ttyS0", console_socket=tmp_path / "serial.sock")


def test_cloud_hypervisor_serves_the_serial_line_on_a_socket(tmp_path: Path) -> None:
    driver = CloudHypervisorDriver()
    assert isinstance(driver, SerialConsoleDriver)
    cmd = driver.command(_ch_spec(tmp_path))
    assert cmd[cmd.index("--serial") + 1] == f"socket={tmp_path / 'serial.sock'}"


async def test_cloud_hypervisor_console_stream_waits_for_its_socket(tmp_path: Path) -> None:
    """CH creates the socket as it starts: the monitor retries until it can connect."""
    spec = _ch_spec(tmp_path)
    process = await trio.lowlevel.open_process(["sleep", "30"])
    try:
        running = Running(process=process, console_log=tmp_path / "console.log")
        async with trio.open_nursery() as nursery:
            async def serve_late() -> None:
                await trio.sleep(0.3)
                listener = await private_listener(tmp_path / "serial.sock")
                async with listener, await listener.accept() as conn:
                    await conn.send_all(b"ch serial\n")

            nursery.start_soon(serve_late)
            stream = await CloudHypervisorDriver().open_console_stream(spec, running)
            async with stream:
                assert await _read_until(stream, b"ch serial\n") == b"ch serial\n"
    finally:
        process.kill()
        await process.wait()
