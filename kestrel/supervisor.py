"""The workload's supervisor: run it, pump its output, stop it, restart it per policy.

``decide`` is the whole restart policy as a pure function of what happened
(exit status, how long the run lasted, the attempt count): tests call it
without processes. ``Supervisor`` is its I/O edge: it spawns, asks the
reaper (the one owner of wait) for the workload's status, signals the
workload's process group and reports through the Outbox.
"""

from __future__ import annotations

import os
import signal

import trio

from kestrel import health
from kestrel.console import console, uptime
from kestrel.manifest import Manifest, RestartPolicy, Workload
from kestrel.outbox import Outbox
from kestrel.protocol import MAX_LOG_CHUNK, Exit, Health, Log, Oom, State, Timeline
from kestrel.reaper import ExitStatus, Reaper
from kestrel.record import Record
from kestrel.spawn import Child, SpawnError, oom_kills, spawn

LOG_DRAIN_S = 2.0  # a grandchild holding the pipe must not hold the exit report
CONSOLE_MIRROR_BYTES = 64 * 1024  # the serial console is slow: mirror a bounded amount
F_SETPIPE_SZ = 1031  # <linux/fcntl.h> F_LINUX_SPECIFIC_BASE + 7
# A bound on reading a pipe that a grandchild keeps filling: 4x the 1 MiB pipe.
PIPE_REST_READS = 4 * (1 << 20) // MAX_LOG_CHUNK


class Decision(Record):
    """What follows a run: ``restart`` after ``delay_ms`` as ``attempt``, or the end."""

    __slots__ = ("restart", "attempt", "delay_ms")
    restart: bool
    attempt: int
    delay_ms: int

    def __init__(self, *, restart: bool, attempt: int, delay_ms: int = 0) -> None:
        self.restart, self.attempt, self.delay_ms = restart, attempt, delay_ms


def decide(policy: RestartPolicy, *, status: int, ran_ms: float, attempt: int) -> Decision:
    """The restart policy: ``attempt`` restarts so far, a run of ``ran_ms`` ended in ``status``.

    A run that lasted ``reset_after_ms`` counts as a success of the backoff:
    the attempt count (and so the delay) starts over.
    """
    if ran_ms >= policy.reset_after_ms:
        attempt = 0
    again = policy.policy == "always" or (policy.policy == "on-failure" and status != 0)
    if not again or (policy.max_restarts is not None and attempt >= policy.max_restarts):
        return Decision(restart=False, attempt=attempt)
    attempt += 1
    return Decision(restart=True, attempt=attempt, delay_ms=policy.backoff_ms(attempt))


class Supervisor:
    def __init__(self, outbox: Outbox, reaper: Reaper, manifest: Manifest | None, *,
                 grace_s: float, workload_env: dict[str, str]) -> None:
        self.outbox = outbox
        self.reaper = reaper
        self.manifest = manifest
        self.grace_s = grace_s
        self.workload_env = workload_env  # what restarts spawn with
        self.state = "starting"
        self.health = ""
        self.child: Child | None = None
        self.stopping = False
        self.stop_event = trio.Event()
        self._mirror_left = CONSOLE_MIRROR_BYTES

    def set_state(self, state: str, detail: str = "") -> None:
        self.state = state
        self.outbox.emit(State(state=state, detail=detail))
        console(f"state {state}" + (f": {detail}" if detail else ""))

    # --- signals and stop ---------------------------------------------------

    def forward(self, signum: int) -> None:
        if self.child is None:
            return
        try:
            os.killpg(self.child.pgid, signum)
        except ProcessLookupError:
            pass

    async def stop(self, signum: int, grace_s: float) -> None:
        """Signal the group, wait the grace, KILL what is left."""
        if self.stopping:
            self.forward(signum)
            return
        self.stopping = True
        self.stop_event.set()
        self.set_state("stopping", f"{signal.Signals(signum).name}, grace {grace_s:g} s")
        self.outbox.emit(Timeline(mark="stop", uptime=uptime()))
        child = self.child
        if child is None:
            return
        self.forward(signum)
        await trio.sleep(grace_s)
        try:
            os.killpg(child.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def _kill_group_later(self, pgid: int) -> None:
        """The main process is gone; its group gets TERM now and KILL after the grace."""
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        await trio.sleep(self.grace_s)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # --- one run ------------------------------------------------------------

    def _mirror(self, stream: str, data: bytes) -> None:
        if self.outbox.ever_attached or self._mirror_left <= 0:
            return
        chunk = data[: self._mirror_left]
        self._mirror_left -= len(chunk)
        try:
            os.write(1 if stream == "stdout" else 2, chunk)
        except OSError:
            pass
        if self._mirror_left <= 0:
            console(f"console mirror stopped after {CONSOLE_MIRROR_BYTES} bytes; "
                    "logs are kept for the host")

    async def _pump(self, fd: int, stream: str) -> None:
        try:
            import fcntl

            fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass
        async with trio.lowlevel.FdStream(fd) as pipe:
            try:
                while True:
                    data = await pipe.receive_some(MAX_LOG_CHUNK)
                    if not data:
                        return
                    self._log(stream, data)
                    await self.outbox.backpressure()  # a slow host slows the workload's logs
            except trio.Cancelled:
                # The drain deadline: what the workload wrote before it exited
                # may still sit in the pipe (a slow host kept this pump in
                # backpressure). Take it now; only output written after this
                # point by a process still holding the pipe goes uncollected,
                # and that is said.
                self._take_rest(fd, stream)
                raise

    def _log(self, stream: str, data: bytes) -> None:
        self.outbox.emit(Log(stream=stream, data=data))
        self._mirror(stream, data)

    def _take_rest(self, fd: int, stream: str) -> None:
        """Read a pipe to empty without waiting (FdStream made it non-blocking)."""
        for _ in range(PIPE_REST_READS):
            try:
                data = os.read(fd, MAX_LOG_CHUNK)
            except BlockingIOError:
                break  # empty, but a writer still holds it open
            except OSError:
                return
            if not data:
                return  # EOF: every byte was taken
            self._log(stream, data)
        console(f"workload {stream}: still held open by another process after the workload "
                f"exited; its later output is not collected")

    async def _run_child(
        self, child: Child, workload: Workload, nursery: trio.Nursery
    ) -> ExitStatus:
        self.child = child
        self.reaper.watch(child.pid)
        self.set_state("running", f"pid {child.pid}")
        # The pumps' nursery ends when both pipes reach EOF; once the main
        # process is gone, a deadline stops a grandchild holding a pipe from
        # holding the exit report too.
        with trio.CancelScope() as drain:
            async with trio.open_nursery() as pumps:
                pumps.start_soon(self._pump, child.stdout_fd, "stdout")
                pumps.start_soon(self._pump, child.stderr_fd, "stderr")
                async with trio.open_nursery() as watchers:
                    check = self.manifest.health_check if self.manifest else None
                    if workload.url and check and workload.type != "exec":
                        watchers.start_soon(health.watch, workload.url, check,
                                            self._on_health)
                    status = await self.reaper.wait(child.pid)
                    watchers.cancel_scope.cancel()
                nursery.start_soon(self._kill_group_later, child.pgid)
                drain.deadline = trio.current_time() + LOG_DRAIN_S
        if status.signal == signal.SIGKILL and oom_kills() > child.oom_kills_before >= 0:
            self.outbox.emit(Oom(pid=child.pid, detail="killed by the kernel OOM killer"))
            console(f"workload pid {child.pid} was OOM-killed")
        self.outbox.emit(Timeline(mark="workload_exit", uptime=uptime()))
        self.outbox.emit(Exit(pid=child.pid, code=status.code, signal=status.signal,
                              status=status.shell, message=status.describe()))
        console(f"workload pid {child.pid} {status.describe()}")
        return status

    async def _on_health(self, status: str, detail: str) -> None:
        self.health = status
        self.outbox.emit(Health(status=status, detail=detail))
        if status == "healthy" and "first_healthy" not in self.outbox.session.timeline:
            self.outbox.emit(Timeline(mark="first_healthy", uptime=uptime()))
            console(f"READY: workload healthy ({detail})")
        else:
            console(f"health {status}: {detail}")

    # --- the whole life -------------------------------------------------------

    async def supervise(self, child: Child | None, error: SpawnError | None,
                        nursery: trio.Nursery) -> int:
        """Run, restart per policy; return the last shell status when it is over."""
        assert self.manifest is not None and self.manifest.workload is not None
        workload = self.manifest.workload
        attempt = 0
        while True:
            started = trio.current_time()
            if child is not None:
                status = (await self._run_child(child, workload, nursery)).shell
            else:
                assert error is not None
                status = error.status
                self.outbox.emit(Exit(pid=0, code=status, status=status, message=error.message))
                console(f"KESTREL: workload did not start: {error.message} (status {status})")
            self.child = None
            if self.stopping:
                return status
            step = decide(workload.restart, status=status, attempt=attempt,
                          ran_ms=(trio.current_time() - started) * 1000)
            if not step.restart:
                return status
            attempt = step.attempt
            self.set_state("restarting", f"attempt {attempt} in {step.delay_ms} ms")
            with trio.move_on_after(step.delay_ms / 1000):
                await self.stop_event.wait()
            if self.stopping:
                return status
            child, error = None, None
            try:
                child = spawn(workload.entrypoint, self.workload_env, workload.workdir)
            except SpawnError as exc:
                error = exc
