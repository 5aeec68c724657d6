"""Exec into a VM as a library: open a session, stream, resize, signal, wait.

    async with open_exec(control_socket, ["sh", "-c", "echo hi"]) as s:
        await s.close_stdin()
        async for stream, data in s:      # ("stdout" | "stderr", bytes)
            ...
        status = await s.wait()           # ExecStatus: code/signal, status (N or 128+S)

It speaks kestrel's exec frames to the VM's monitor over the VM's 0600
control socket (host.exechub relays them to kestrel). Credit goes back as
the caller consumes output, so a caller that stops reading stops the
process's output in the guest, not memory growth here. Errors that leave
no status (no agent, connection lost) raise ExecError.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from host.errors import VolarError
from kestrel.execproto import (
    MAX_EXEC_CHUNK,
    ExecAbort,
    ExecCredit,
    ExecData,
    ExecExit,
    ExecOpen,
    ExecResize,
    ExecSignal,
    ExecStarted,
    ReceiveWindow,
    SendWindow,
)
from kestrel.protocol import FrameDecoder, Message, ProtocolError, encode

# kestrel answers an open at once (started, or exit 126/127); silence means a
# guest that does not speak exec (a kestrel older than it, no kestrel at all).
OPEN_TIMEOUT_S = 30.0


class ExecError(VolarError):
    """The session could not run or ended without an exit status."""

    exit_code = 125  # docker exec's convention for the tool's own failures


@dataclass(frozen=True)
class ExecStatus:
    status: int  # shell form: N, or 128+S
    code: int | None
    signal: int | None
    message: str  # "exited N", "killed by SIGKILL (status 137)", or why it never started
    started: bool  # False: the program was missing (127) or not executable (126)
    pid: int  # in the guest; 0 when it never started


class ExecSession:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._send_lock = trio.Lock()
        self._stdin = SendWindow()
        self._credit = trio.Event()
        self._received = ReceiveWindow()
        self._out_send, self._out = trio.open_memory_channel[tuple[str, bytes]](math.inf)
        self._done = trio.Event()
        self._opened = trio.Event()
        self.pid = 0  # the program's pid in the guest, once it runs
        self._status: ExecStatus | None = None
        self._error = ""

    async def _frame(self, msg: Message) -> None:
        if self._done.is_set():
            return  # over: stdin, credit, resize and signals have nowhere to go
        try:
            async with self._send_lock:
                await self._stream.send_all(encode(msg))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The monitor closed the session (its last frame may still be in
            # our receive buffer): the receiving task says how it ended.
            await self._done.wait()

    # --- the caller's side ------------------------------------------------------

    async def write(self, data: bytes) -> None:
        """Stdin for the process; waits while the guest's window is full."""
        view = memoryview(data)
        while view:
            while self._stdin.available <= 0:
                if self._done.is_set():
                    return  # it ended: stdin has nowhere to go
                self._credit = trio.Event()
                await self._credit.wait()
            n = self._stdin.take(len(view))
            await self._frame(ExecData(stream="stdin", data=bytes(view[:n])))
            view = view[n:]

    async def close_stdin(self) -> None:
        await self._frame(ExecData(stream="stdin", data=b""))

    async def resize(self, rows: int, cols: int) -> None:
        await self._frame(ExecResize(rows=rows, cols=cols))

    async def signal(self, signum: int) -> None:
        await self._frame(ExecSignal(signum=signum))

    async def read(self) -> tuple[str, bytes] | None:
        """The next (stream, bytes) of output; None once all of it was read."""
        try:
            stream, data = await self._out.receive()
        except trio.EndOfChannel:
            return None
        credit = self._received.consumed(len(data))
        if credit:
            await self._frame(ExecCredit(bytes=credit))
        return stream, data

    def __aiter__(self) -> AsyncIterator[tuple[str, bytes]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[str, bytes]]:
        while (item := await self.read()) is not None:
            yield item

    async def wait(self) -> ExecStatus:
        """The exit status (output not read is discarded); ExecError if there is none."""
        await self._done.wait()
        if self._status is None:
            raise ExecError(self._error)
        return self._status

    # --- the receiving task -----------------------------------------------------

    async def _receive(self) -> None:
        decoder = FrameDecoder()
        try:
            async with self._out_send:
                while not self._done.is_set():
                    data = await self._stream.receive_some(MAX_EXEC_CHUNK * 2)
                    if not data:
                        self._error = "the VM's monitor closed the session without a status"
                        return
                    decoder.feed(bytes(data))
                    for m in decoder:
                        self._on(m)
        except ProtocolError as exc:
            self._error = f"bad frame from the VM's monitor: {exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._error = f"connection to the VM's monitor lost: {exc}"
        finally:
            self._done.set()
            self._opened.set()
            self._credit.set()

    def _on(self, m: Message) -> None:
        if isinstance(m, ExecData):
            self._out_send.send_nowait((m.stream, m.data))
        elif isinstance(m, ExecCredit):
            self._stdin.grant(m.bytes)
            self._credit.set()
        elif isinstance(m, ExecStarted):
            self.pid = m.pid
            self._opened.set()
        elif isinstance(m, ExecExit):
            self._status = ExecStatus(status=m.status, code=m.code, signal=m.signal,
                                      message=m.message, started=m.pid != 0, pid=m.pid)
            self._done.set()
            self._opened.set()
        elif isinstance(m, ExecAbort):
            self._error = m.message
            self._done.set()
            self._opened.set()


@asynccontextmanager
async def open_exec(
    control_socket: Path | str,
    argv: Sequence[str],
    *,
    env: Sequence[str] = (),
    cwd: str = "/",
    uid: int = 0,
    gid: int = 0,
    tty: bool = False,
    rows: int = 24,
    cols: int = 80,
    open_timeout: float = OPEN_TIMEOUT_S,
) -> AsyncIterator[ExecSession]:
    """A session for ``argv`` (``env``: ``K=V`` strings) in the VM behind ``control_socket``."""
    try:
        stream = await trio.open_unix_socket(str(control_socket))
    except OSError as exc:
        raise ExecError(f"cannot reach the VM's monitor at {control_socket}: "
                        f"{exc.strerror or exc}") from None
    async with stream:
        session = ExecSession(stream)
        try:
            await stream.send_all(b"exec\n" + encode(ExecOpen(
                argv=list(argv), env=list(env), cwd=cwd, uid=uid, gid=gid, tty=tty,
                rows=rows, cols=cols)))
        except (trio.BrokenResourceError, OSError) as exc:
            raise ExecError(f"the VM's monitor hung up: {exc}") from None
        # The caller's exception is raised outside the nursery: callers catch
        # ExecError itself, not an ExceptionGroup around it.
        raised: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session._receive)
            try:
                with trio.move_on_after(open_timeout) as waited:
                    await session._opened.wait()
                if waited.cancelled_caught:
                    raise ExecError(f"no answer from kestrel within {open_timeout:g} s "
                                    "(does the image's kestrel support exec?)")
                yield session
            except BaseException as exc:
                raised = exc
            nursery.cancel_scope.cancel()
        if raised is not None:
            raise raised
