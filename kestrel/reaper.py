"""The one owner of wait(): reaps every child and orphan, keeps their statuses.

On every SIGCHLD (they coalesce) and at least once a second,
``waitpid(-1, WNOHANG)`` until nothing is left. Nothing else in kestrel
waits: the supervisor asks the reaper for its workload's status, so the
exit-status race of Popen.wait() beside a reaper cannot happen.
"""

from __future__ import annotations

import os
import signal as _signal

import trio

from kestrel.record import Record

SWEEP_INTERVAL_S = 1.0


class ExitStatus(Record):
    """Both forms of an exit: raw (code or signal) and shell (N or 128+S)."""

    __slots__ = ("code", "signal")
    code: int | None
    signal: int | None

    def __init__(self, *, code: int | None = None, signal: int | None = None) -> None:
        self.code, self.signal = code, signal

    @classmethod
    def from_wait(cls, status: int) -> ExitStatus:
        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status))
        return cls(code=os.WEXITSTATUS(status))

    @property
    def shell(self) -> int:
        return 128 + self.signal if self.signal is not None else (self.code or 0)

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name} (status {self.shell})"
        return f"exited {self.code}"


class Reaper:
    def __init__(self) -> None:
        self.reaped = 0
        self._watched: dict[int, trio.Event] = {}
        self._statuses: dict[int, ExitStatus] = {}

    def watch(self, pid: int) -> None:
        """Keep ``pid``'s status when it is reaped (call before it can exit)."""
        self._watched.setdefault(pid, trio.Event())

    async def wait(self, pid: int) -> ExitStatus:
        self.watch(pid)
        await self._watched[pid].wait()
        del self._watched[pid]
        return self._statuses.pop(pid)

    def sweep(self) -> int:
        """Reap everything that has exited; return how many."""
        n = 0
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            n += 1
            event = self._watched.get(pid)
            if event is not None:
                self._statuses[pid] = ExitStatus.from_wait(status)
                event.set()
        self.reaped += n
        return n

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(_signal.SIGCHLD) as signals:
            task_status.started()
            self.sweep()
            while True:
                with trio.move_on_after(SWEEP_INTERVAL_S):
                    async for _ in signals:
                        break
                self.sweep()
