"""The workload's last output reaches the host even when the host is slow.

kestrel stops waiting for a pipe's EOF a little after the workload exits (a
grandchild may hold it open for ever); bytes already in the pipe by then are
the workload's and must not be lost to that deadline.
"""

from __future__ import annotations

import hashlib

import trio

from host.vsock import private_listener
from kestrel.supervisor import LOG_DRAIN_S
from tests.pid1 import PYTHON, Kestrel, manifest, run_kestrel

PAYLOAD = 2 * 1024 * 1024  # more than the outbox's high-water mark, less than it plus the pipe


class _SlowToRead(trio.abc.Stream):
    """A host connection whose first read waits past kestrel's drain deadline."""

    def __init__(self, inner: trio.abc.Stream, stall_s: float) -> None:
        self.inner = inner
        # A deadline, not a per-call sleep: the session loop cancels and
        # retries its reads (re-attach, keepalive) while it waits.
        self.until = trio.current_time() + stall_s

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await trio.sleep_until(self.until)
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_output_left_in_the_pipe_at_exit_reaches_a_slow_host() -> None:
    prog = ("import os, sys\n"
            f"data = bytes(range(256)) * ({PAYLOAD} // 256)\n"
            "sys.stdout.buffer.write(data); sys.stdout.flush()\n")
    want = hashlib.sha256(bytes(range(256)) * (PAYLOAD // 256)).hexdigest()

    async def scenario(k: Kestrel) -> None:
        listener = await private_listener(k.run.dir / "agent.sock")
        stream = await listener.accept()
        # Attached, then silent for longer than the drain deadline: the pump
        # sits in backpressure while the rest of the output waits in the pipe.
        await k.run.loop._serve_one(_SlowToRead(stream, LOG_DRAIN_S + 2))
        await listener.aclose()

    run = await run_kestrel(manifest([PYTHON, "-c", prog]), scenario=scenario, serve=False)
    assert [e.status for e in run.exits] == [0]
    got = run.logs("stdout")
    assert len(got) == PAYLOAD
    assert hashlib.sha256(got).hexdigest() == want
    assert run.session.lost == 0
