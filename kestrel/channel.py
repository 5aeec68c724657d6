"""Byte streams to the host: vsock, a virtio-serial port, or a unix socket.

Each transport's ``open()`` retries until the host is there: the
host may start listening after the guest boots. A virtio-serial port is
opened once and kept: when the host goes away the guest reads EOF until
it comes back (QEMU 7.2's virtio-serial chardev, verified under TCG), so
EOF there means "detached", not "closed".
"""

from __future__ import annotations

import errno
import os
import socket

import trio

from kestrel.cmdline import Channel

# Host CID for a guest's vsock connections (linux/vm_sockets.h VMADDR_CID_HOST).
VMADDR_CID_HOST = 2
VIRTIO_PORTS = "/sys/class/virtio-ports"
SERIAL_WAIT_S = 10.0
RETRY_MIN_S = 0.05
RETRY_MAX_S = 1.0


class ChannelMissing(Exception):
    """The channel's device does not exist; kestrel cannot reach any host."""


def find_serial_port(name: str, root: str = VIRTIO_PORTS) -> str | None:
    """/dev path of the virtio-serial port called ``name``, if it exists yet."""
    try:
        ports = sorted(os.listdir(root))
    except OSError:
        return None
    for port in ports:
        try:
            with open(f"{root}/{port}/name", "rb") as f:
                if f.read().strip().decode(errors="replace") == name:
                    return f"/dev/{port}"
        except OSError:
            continue
    return None


class Transport:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        # serial ports stay open across host reconnects
        self.persistent = channel.kind == "serial"
        self._serial: trio.lowlevel.FdStream | None = None
        # Once a vsock connection worked, a missing device is one being
        # replaced (volar unplugs it around a snapshot and plugs a new one
        # into each restored VM), not a VM without one: wait for it.
        self._connected = False

    async def open(self) -> trio.abc.Stream:
        ch = self.channel
        if ch.kind == "serial":
            return await self._open_serial(ch.name)
        if ch.kind not in ("unix", "vsock"):
            raise ChannelMissing(f"{ch}: no such channel kind")
        delay = RETRY_MIN_S
        while True:
            try:
                if ch.kind == "unix":
                    return await trio.open_unix_socket(ch.path)
                stream = await self._open_vsock(ch.port)
                self._connected = True
                return stream
            except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError,
                    TimeoutError):
                await trio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
            except ChannelMissing:
                if not self._connected:
                    raise
                # A restore plugs the new device in within a second: poll at
                # the short end so the restored VM reports back promptly.
                await trio.sleep(RETRY_MIN_S)

    async def _open_vsock(self, port: int) -> trio.abc.Stream:
        # Only ever reached inside a guest: on a host, CID 2 is somebody else.
        try:
            sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        except (OSError, AttributeError) as exc:
            raise ChannelMissing(f"{self.channel}: no vsock in this kernel ({exc})") from None
        try:
            await sock.connect((VMADDR_CID_HOST, port))
        except OSError as exc:
            sock.close()
            # No vsock transport (no device, module not loaded): no retry helps.
            if exc.errno in (errno.ENODEV, errno.ENXIO, errno.EAFNOSUPPORT, errno.ENETUNREACH):
                raise ChannelMissing(
                    f"{self.channel}: no vsock device ({exc.strerror}); is "
                    "vmw_vsock_virtio_transport loaded and does the VMM give the VM a vsock?"
                ) from None
            raise
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def _open_serial(self, name: str) -> trio.abc.Stream:
        if self._serial is not None:
            return self._serial
        # The port appears asynchronously after virtio_console loads: poll.
        path = None
        with trio.move_on_after(SERIAL_WAIT_S):
            while (path := find_serial_port(name)) is None:
                await trio.sleep(0.02)
        if path is None:
            raise ChannelMissing(
                f"{self.channel}: no virtio-serial port named {name!r} under {VIRTIO_PORTS} "
                f"after {SERIAL_WAIT_S:g} s (virtio_console not loaded, or the VMM has no "
                "such virtserialport)"
            )
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        self._serial = trio.lowlevel.FdStream(fd)
        return self._serial
