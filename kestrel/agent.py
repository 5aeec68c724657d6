"""kestrel after the workload has started: one trio nursery owns every task.

Tasks: the reaper (the only waiter), signal forwarding, the host channel
(reader + writer), log pumps, the health watch, heartbeats/metrics, eth0
setup, and the supervisor that decides restart or power-off. ``run`` returns
when the VM should power off; main.py does the power-off.
"""

from __future__ import annotations

import os
import signal
import time

import trio

from kestrel import __version__, health
from kestrel.channel import ChannelMissing, Transport
from kestrel.cmdline import BootConfig
from kestrel.manifest import Manifest, Workload
from kestrel.protocol import (
    MAX_LOG_CHUNK,
    Exit,
    Fatal,
    GuestSession,
    Health,
    Heartbeat,
    Log,
    Message,
    Metrics,
    Oom,
    Signal,
    State,
    Stop,
    Timeline,
)
from kestrel.reaper import ExitStatus, Reaper
from kestrel.spawn import Child, SpawnError, oom_kills, spawn

# Signals PID 1 passes to the workload's group. Not KILL/STOP (cannot be
# caught), CHLD (the reaper's), PIPE (kestrel's own writes to a vanished
# host raise it; forwarding would kill the workload for the agent's error).
FORWARDED = tuple(
    s for s in range(1, 32) if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD,
                                         signal.SIGPIPE)
)
STOPPING = (signal.SIGTERM, signal.SIGINT)  # Ctrl-Alt-Del arrives as SIGINT
LOG_DRAIN_S = 2.0  # a grandchild holding the pipe must not hold the exit report
FINAL_FLUSH_S = 5.0
HEARTBEAT_S = 5.0
CONSOLE_MIRROR_BYTES = 64 * 1024  # the serial console is slow: mirror a bounded amount
OUT_HIGH_WATER = 1024 * 1024  # unsent bytes before log pumps wait for the host
F_SETPIPE_SZ = 1031


def uptime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def console(line: str) -> None:
    try:
        os.write(2, f"kestrel: {line}\n".encode(errors="replace"))
    except OSError:
        pass


class Agent:
    def __init__(
        self,
        cfg: BootConfig,
        manifest: Manifest | None,
        *,
        timeline: dict[str, float],
        boot_id: str,
        workload_env: dict[str, str],
    ) -> None:
        self.cfg = cfg
        self.manifest = manifest
        self.session = GuestSession(agent=__version__, boot_id=boot_id)
        self.reaper = Reaper()
        self.timeline = timeline
        self.state = "starting"
        self.health = ""
        self.child: Child | None = None
        self.stopping = False
        self.stop_event = trio.Event()
        self.grace_s = 10.0
        if cfg.stop_grace_s is not None:
            self.grace_s = cfg.stop_grace_s
        elif manifest and manifest.workload:
            self.grace_s = manifest.workload.stop_grace_ms / 1000
        self._out = bytearray()
        self._wake = trio.Event()
        self._drained = trio.Event()
        self._mirror_left = CONSOLE_MIRROR_BYTES
        self._ever_attached = False
        self._acked = trio.Event()
        self.workload_env = workload_env  # what restarts spawn with

    # --- output -------------------------------------------------------------

    def emit(self, msg: Message) -> None:
        frame = self.session.record(msg) if msg.SEQUENCED else self.session.telemetry(msg)
        if frame:
            self._out += frame
            self._wake.set()

    def _mirror(self, stream: str, data: bytes) -> None:
        if self._ever_attached or self._mirror_left <= 0:
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

    def set_state(self, state: str, detail: str = "") -> None:
        self.state = state
        self.emit(State(state=state, detail=detail))
        console(f"state {state}" + (f": {detail}" if detail else ""))

    # --- the channel --------------------------------------------------------

    async def _writer(self, stream: trio.abc.Stream) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not self._out:
                continue
            data, self._out = self._out, bytearray()  # hand over, no copy
            self._drained.set()
            self._drained = trio.Event()
            await stream.send_all(data)

    async def _reader(self, stream: trio.abc.Stream, nursery: trio.Nursery) -> None:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            commands, out = self.session.receive(bytes(data))
            if out:
                self._out += out
                self._wake.set()
            if self.session.buffered == 0:
                self._acked.set()
            for cmd in commands:
                if isinstance(cmd, Stop):
                    nursery.start_soon(self.stop, signal.SIGTERM, cmd.grace_s)
                elif isinstance(cmd, Signal):
                    self.forward(cmd.signum)
                elif not self._ever_attached:
                    self._ever_attached = True
                    console("host attached")

    async def channel_loop(self, outer: trio.Nursery) -> None:
        if self.cfg.channel.kind == "none":
            return  # no usable kestrel.channel: the console is all there is
        transport = Transport(self.cfg.channel)
        while True:
            try:
                stream = await transport.open()
            except ChannelMissing as exc:
                console(f"KESTREL PANIC: channel: {exc}")
                raise
            try:
                async with trio.open_nursery() as n:
                    n.start_soon(self._writer, stream)
                    await self._reader(stream, outer)
                    n.cancel_scope.cancel()
            # A nursery raises an ExceptionGroup: a reset seen by the reader or
            # the writer is the host going away, not a kestrel failure.
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            self.session.detach()
            self._out.clear()
            self._drained.set()
            if not transport.persistent:
                await stream.aclose()
            await trio.sleep(0.1)

    # --- signals and stop ---------------------------------------------------

    def forward(self, signum: int) -> None:
        if self.child is None:
            return
        try:
            os.killpg(self.child.pgid, signum)
        except ProcessLookupError:
            pass

    async def signal_loop(self, nursery: trio.Nursery, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(*FORWARDED) as signals:
            task_status.started()
            async for signum in signals:
                if signum in STOPPING:
                    nursery.start_soon(self.stop, signum, self.grace_s)
                else:
                    self.forward(signum)

    async def stop(self, signum: int, grace_s: float) -> None:
        """Signal the group, wait the grace, KILL what is left."""
        if self.stopping:
            self.forward(signum)
            return
        self.stopping = True
        self.stop_event.set()
        self.set_state("stopping", f"{signal.Signals(signum).name}, grace {grace_s:g} s")
        self.emit(Timeline(mark="stop", uptime=uptime()))
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

    # --- the workload -------------------------------------------------------

    async def _pump(self, fd: int, stream: str) -> None:
        try:
            import fcntl

            fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass
        async with trio.lowlevel.FdStream(fd) as pipe:
            while True:
                data = await pipe.receive_some(MAX_LOG_CHUNK)
                if not data:
                    return
                self.emit(Log(stream=stream, data=data))
                self._mirror(stream, data)
                if len(self._out) > OUT_HIGH_WATER and self.session.attached:
                    await self._drained.wait()  # backpressure from a slow host

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
            self.emit(Oom(pid=child.pid, detail="killed by the kernel OOM killer"))
            console(f"workload pid {child.pid} was OOM-killed")
        self.emit(Timeline(mark="workload_exit", uptime=uptime()))
        self.emit(Exit(pid=child.pid, code=status.code, signal=status.signal,
                       status=status.shell, message=status.describe()))
        console(f"workload pid {child.pid} {status.describe()}")
        return status

    async def _on_health(self, status: str, detail: str) -> None:
        self.health = status
        self.emit(Health(status=status, detail=detail))
        if status == "healthy" and "first_healthy" not in self.session.timeline:
            self.emit(Timeline(mark="first_healthy", uptime=uptime()))
            console(f"READY: workload healthy ({detail})")
        else:
            console(f"health {status}: {detail}")

    async def supervise(self, child: Child | None, error: SpawnError | None,
                        nursery: trio.Nursery) -> int:
        """Run, restart per policy; return the last shell status when it is over."""
        assert self.manifest is not None and self.manifest.workload is not None
        workload = self.manifest.workload
        policy = workload.restart
        attempt = 0
        while True:
            started = trio.current_time()
            if child is not None:
                status = (await self._run_child(child, workload, nursery)).shell
            else:
                assert error is not None
                status = error.status
                self.emit(Exit(pid=0, code=status, status=status, message=error.message))
                console(f"KESTREL: workload did not start: {error.message} (status {status})")
            self.child = None
            if self.stopping:
                return status
            again = policy.policy == "always" or (policy.policy == "on-failure" and status != 0)
            if (trio.current_time() - started) * 1000 >= policy.reset_after_ms:
                attempt = 0
            if not again or (policy.max_restarts is not None and attempt >= policy.max_restarts):
                return status
            attempt += 1
            delay = policy.backoff_ms(attempt)
            self.set_state("restarting", f"attempt {attempt} in {delay} ms")
            with trio.move_on_after(delay / 1000):
                await self.stop_event.wait()
            if self.stopping:
                return status
            child, error = None, None
            try:
                child = spawn(workload.entrypoint, self.workload_env, workload.workdir)
            except SpawnError as exc:
                error = exc

    # --- periodic -----------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        from kestrel import metrics

        while True:
            await trio.sleep(HEARTBEAT_S)
            self.emit(Heartbeat(uptime=uptime(), state=self.state, health=self.health))
            m = Metrics(uptime=uptime(), agent_rss=metrics.own_rss(), reaped=self.reaper.reaped)
            m.mem_total, m.mem_available = metrics.memory()
            if self.child is not None:
                m.workload_rss, m.workload_cpu_s = metrics.group_usage(self.child.pgid)
            self.emit(m)

    async def network_setup(self) -> None:
        ip = self.cfg.ip
        if ip is None:
            return
        from kestrel import boot

        with trio.move_on_after(10):
            while not os.path.exists(f"/sys/class/net/{ip.device}"):
                await trio.sleep(0.02)
        line = boot.setup_ipv4(ip)
        if line:
            console(line)

    async def flush(self, deadline_s: float) -> None:
        """Wait until the host has acknowledged every record, or the deadline."""
        with trio.move_on_after(deadline_s):
            while self.session.buffered:
                self._acked = trio.Event()
                await self._acked.wait()


async def run(agent: Agent, child: Child | None, error: SpawnError | None,
              fatal: str | None) -> int:
    """The whole life of the agent; returns the status to report at power-off."""
    for mark, t in agent.timeline.items():
        agent.emit(Timeline(mark=mark, uptime=t))
    status = 0
    async with trio.open_nursery() as nursery:
        if child is not None:
            agent.reaper.watch(child.pid)
        await nursery.start(agent.reaper.run)
        await nursery.start(agent.signal_loop, nursery)
        # Handlers exist now: let the signals main.py blocked come in.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        nursery.start_soon(agent.channel_loop, nursery)
        if agent.cfg.debug_shell:
            from kestrel import debugshell

            nursery.start_soon(debugshell.run, agent.reaper, agent.workload_env, console)
        if fatal is not None:
            agent.emit(Fatal(message=fatal))
            agent.set_state("failed", fatal)
        else:
            nursery.start_soon(agent.heartbeat_loop)
            nursery.start_soon(agent.network_setup)
            status = await agent.supervise(child, error, nursery)
        agent.set_state("poweroff", f"status {status}")
        await agent.flush(FINAL_FLUSH_S)
        nursery.cancel_scope.cancel()
    return status
