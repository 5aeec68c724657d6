"""containerd's stdio for a process: FIFO paths (ctr, CRI) or file:// URIs (a log file).

A ``Sink`` owns one output: data is queued by the caller and written by the
sink's own task, so a reader that stops reading (a full FIFO) never stalls
the process's exit report; closing it flushes and then closes, which is
the EOF containerd's copy loop waits for.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

import trio

QUEUE = 4096  # chunks


class StdioError(RuntimeError):
    """A stdio path or URI the shim cannot open; says which."""


async def open_writer(target: str) -> trio.lowlevel.FdStream | None:
    if not target:
        return None
    if "://" in target:
        url = urlparse(target)
        if url.scheme != "file":
            raise StdioError(f"stdio {target}: only FIFOs and file:// URIs are supported")
        path = unquote(url.path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise StdioError(f"stdio {target}: {exc.strerror}") from None
        return trio.lowlevel.FdStream(fd)
    try:
        # A FIFO's open blocks until containerd's reader is there (it already is).
        fd = await trio.to_thread.run_sync(os.open, target, os.O_WRONLY | os.O_CLOEXEC,
                                           abandon_on_cancel=True)
    except OSError as exc:
        raise StdioError(f"stdio {target}: {exc.strerror}") from None
    return trio.lowlevel.FdStream(fd)


async def open_reader(target: str) -> trio.lowlevel.FdStream | None:
    if not target:
        return None
    try:
        fd = await trio.to_thread.run_sync(os.open, target, os.O_RDONLY | os.O_CLOEXEC,
                                           abandon_on_cancel=True)
    except OSError as exc:
        raise StdioError(f"stdin {target}: {exc.strerror}") from None
    return trio.lowlevel.FdStream(fd)


class Sink:
    def __init__(self, stream: trio.lowlevel.FdStream | None) -> None:
        self.stream = stream
        self._send, self._receive = trio.open_memory_channel[bytes](QUEUE)
        self.done = trio.Event()

    def write(self, data: bytes) -> None:
        if self.stream is None or not data:
            return
        try:
            self._send.send_nowait(data)
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass  # nobody reads: drop, as a full pipe would block the process otherwise

    def close(self) -> None:
        self._send.close()

    async def run(self) -> None:
        try:
            if self.stream is None:
                return
            async with self.stream:
                async for data in self._receive:
                    try:
                        await self.stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        break  # the reader went away
        finally:
            self.done.set()
