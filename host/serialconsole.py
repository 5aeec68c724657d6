"""The monitor's side of a VM's serial console: log it, and let users attach.

The VMM hands the monitor the serial line as a stream. One task drains it
for as long as the VM lives, appending every byte to console.log, so the
guest never waits on its console whether anybody is attached or not. Users
attach through ``console.sock`` (0600, in the VM's private run directory):
each attacher gets everything the guest writes from then on, and what any
attacher types goes to the guest. An attacher that cannot keep up is
dropped, never waited for: the guest and the log come first.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from host.vsock import private_listener

CONSOLE_SOCKET = "console.sock"
READ_SIZE = 65536
# Chunks queued for one attacher before it counts as stuck (~16 MiB at most).
ATTACHER_QUEUE = 256


class SerialConsole:
    def __init__(self, run_dir: Path, log_path: Path) -> None:
        self.socket_path = run_dir / CONSOLE_SOCKET
        self.log_path = log_path
        self.done = trio.Event()  # the VMM's end of the line is closed, log complete
        self._vmm: trio.abc.Stream | None = None
        self._attachers: dict[int, trio.MemorySendChannel[bytes]] = {}
        self._ids = 0
        self._input_lock = trio.Lock()

    async def run(self, open_stream: Callable[[], Awaitable[trio.abc.Stream]]) -> None:
        """Drain the console to the end; serve attachers meanwhile."""
        try:
            stream = await open_stream()
        except BaseException:
            self.done.set()
            raise
        self._vmm = stream
        listener = await private_listener(self.socket_path)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._attacher, [listener])
            try:
                await self._drain(stream)
            finally:
                self.done.set()
                self.socket_path.unlink(missing_ok=True)
                nursery.cancel_scope.cancel()

    async def _drain(self, stream: trio.abc.Stream) -> None:
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    data = await stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    return
                os.write(fd, data)  # a local file: short, and never waits for a reader
                for ident, channel in list(self._attachers.items()):
                    try:
                        channel.send_nowait(bytes(data))
                    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                        self._attachers.pop(ident, None)
                        channel.close()  # too slow or gone: its sender ends
        finally:
            os.close(fd)
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _attacher(self, client: trio.SocketStream) -> None:
        self._ids += 1
        ident = self._ids
        send, receive = trio.open_memory_channel[bytes](ATTACHER_QUEUE)
        self._attachers[ident] = send
        try:
            async with client, receive, trio.open_nursery() as nursery:
                nursery.start_soon(self._to_attacher, client, receive, nursery.cancel_scope)
                await self._from_attacher(client)
                nursery.cancel_scope.cancel()
        finally:
            self._attachers.pop(ident, None)
            send.close()

    async def _to_attacher(self, client: trio.SocketStream,
                           receive: trio.MemoryReceiveChannel[bytes],
                           scope: trio.CancelScope) -> None:
        try:
            async for data in receive:
                await client.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()  # dropped as too slow, or the VM is gone: hang up

    async def _from_attacher(self, client: trio.SocketStream) -> None:
        """Keystrokes to the guest; input while the line is down is dropped."""
        while True:
            try:
                data = await client.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            vmm = self._vmm
            if vmm is None or self.done.is_set():
                continue
            async with self._input_lock:  # two typists: whole chunks, never interleaved
                try:
                    await vmm.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
