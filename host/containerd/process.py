"""What the shim tracks of each process (the container's own, and execs), and
how an exec runs: a kestrel exec session (host.execclient) wired to
containerd's stdio FIFOs, its status kept for Wait and State.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from google.protobuf import timestamp_pb2

from host.containerd.proto import types_task_pb2 as types
from host.containerd.spec import ProcessSpec
from host.containerd.stdio import Sink, open_reader, open_writer
from host.execclient import ExecError, ExecSession, open_exec

STDIN_CHUNK = 64 * 1024
# The status a shell gives a program it could not start at all.
EXEC_FAILED = 126


def now_ts() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


@dataclass
class Process:
    """containerd's view of a process: stdio, pid, status and exit."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    pid: int = 0
    status: int = types.CREATED
    exit_status: int = 0
    exited_at: timestamp_pb2.Timestamp = field(default_factory=timestamp_pb2.Timestamp)
    exited: trio.Event = field(default_factory=trio.Event)

    def finish(self, status: int) -> bool:
        """Record the exit once; False when it was already recorded (the VM's end
        and the session's end can both report the container's process)."""
        if self.exited.is_set():
            return False
        self.exit_status, self.exited_at = status, now_ts()
        self.status = types.STOPPED
        self.exited.set()
        return True


@dataclass
class Exec(Process):
    spec: ProcessSpec | None = None
    session: ExecSession | None = None
    error: str = ""  # why it never ran, for Start to say

    async def run(self, control_socket: Path, started: trio.Event,
                  say: Callable[[str], None]) -> None:
        """The whole session: open, relay stdio both ways, record the exit."""
        assert self.spec is not None
        spec = self.spec
        status = EXEC_FAILED
        # The stdin relay ends with the session: ctr's copy from a terminal (or any
        # stdin that never ends) keeps the FIFO open until ctr itself exits.
        stdin_scope = trio.CancelScope()
        try:
            out = Sink(await open_writer(self.stdout))
            # With a terminal the pty is one stream: stdout (kestrel's exec frames).
            err = out if self.terminal else Sink(await open_writer(self.stderr))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(out.run)
                if err is not out:
                    nursery.start_soon(err.run)
                try:
                    async with open_exec(
                            control_socket, list(spec.args),
                            env=[f"{k}={v}" for k, v in spec.env.items()], cwd=spec.cwd,
                            uid=spec.uid, gid=spec.gid, tty=self.terminal) as session:
                        self.session, self.pid = session, session.pid
                        self.status = types.RUNNING
                        started.set()
                        if self.stdin:
                            nursery.start_soon(self._stdin, session, stdin_scope)
                        async for stream, data in session:
                            (err if stream == "stderr" else out).write(data)
                        result = await session.wait()
                        status = result.status
                        if not result.started:
                            err.write(f"kestrel: exec {spec.args[0]}: {result.message}\n"
                                      .encode())
                finally:
                    stdin_scope.cancel()
                    out.close()
                    err.close()
                    nursery.cancel_scope.deadline = trio.current_time() + 5
        except (ExecError, OSError) as exc:
            self.error = str(exc)
            say(f"exec {spec.args[0]}: {exc}")
        finally:
            self.session = None
            self.finish(status)
            started.set()

    async def _stdin(self, session: ExecSession, scope: trio.CancelScope) -> None:
        with scope:
            stream = await open_reader(self.stdin)
            if stream is None:
                return
            async with stream:
                while data := await stream.receive_some(STDIN_CHUNK):
                    await session.write(bytes(data))
            await session.close_stdin()
