"""kestrel after the workload has started: the tasks that wire its roles together.

Roles live in their own modules: the Outbox (framing, backpressure, replay),
the Supervisor (the workload: run, pump, stop, restart by a pure decision),
the Reaper (the only waiter) and the exec sessions (ExecSessions). This module owns the
nursery and the tasks between them: the host channel, signal forwarding,
heartbeats/metrics, eth0 setup and the agent API (kestrel/apiserver.py).
``run`` returns when the VM should power off; main.py does the power-off.
"""

from __future__ import annotations

import gc
import os
import signal
import time

import trio

from kestrel import __version__
from kestrel.channel import ChannelMissing, Transport
from kestrel.cmdline import BootConfig
from kestrel.console import console, uptime
from kestrel.execproto import EXEC_MESSAGES
from kestrel.execsession import ExecSessions
from kestrel.manifest import Manifest
from kestrel.outbox import Outbox
from kestrel.protocol import (
    Attach,
    Fatal,
    GuestSession,
    Health,
    Heartbeat,
    Metrics,
    Signal,
    Stop,
    Timeline,
)
from kestrel.reaper import Reaper
from kestrel.spawn import Child, SpawnError
from kestrel.supervisor import Supervisor

# Signals PID 1 passes to the workload's group. Not KILL/STOP (cannot be
# caught), CHLD (the reaper's), PIPE (kestrel's own writes to a vanished
# host raise it; forwarding would kill the workload for the agent's error).
FORWARDED = tuple(
    s for s in range(1, 32) if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD,
                                         signal.SIGPIPE)
)
STOPPING = (signal.SIGTERM, signal.SIGINT)  # Ctrl-Alt-Del arrives as SIGINT
FINAL_FLUSH_S = 5.0
HEARTBEAT_S = 5.0


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
        self.timeline = timeline
        self.reaper = Reaper()
        self.outbox = Outbox(GuestSession(agent=__version__, boot_id=boot_id))
        grace_s = 10.0
        if cfg.stop_grace_s is not None:
            grace_s = cfg.stop_grace_s
        elif manifest and manifest.workload:
            grace_s = manifest.workload.stop_grace_ms / 1000
        self.supervisor = Supervisor(self.outbox, self.reaper, manifest, grace_s=grace_s,
                                     workload_env=workload_env)
        self.execs = ExecSessions(self.outbox, self.reaper, workload_env)
        self._announced = False
        self._restore_id = ""  # the last restore acted on (kestrel.restore)

    # --- the channel --------------------------------------------------------

    async def _reader(self, stream: trio.abc.Stream, nursery: trio.Nursery) -> None:
        while True:
            # A host that promised keepalives and went quiet is gone, even when
            # the transport never says so (kestrel.protocol.KEEPALIVE_MISSES):
            # reconnect, and the replay makes the gap lossless.
            limit = self.outbox.session.silence_limit_s
            with trio.move_on_after(float("inf") if limit is None else limit) as quiet:
                data = await stream.receive_some(65536)
            if quiet.cancelled_caught:
                console(f"host silent for {limit:g} s: reconnecting")
                return
            if not data:
                return
            for cmd in self.outbox.receive(bytes(data)):
                if isinstance(cmd, Stop):
                    nursery.start_soon(self.supervisor.stop, signal.SIGTERM, cmd.grace_s)
                elif isinstance(cmd, Signal):
                    self.supervisor.forward(cmd.signum)
                elif isinstance(cmd, EXEC_MESSAGES):
                    self.execs.handle(cmd)
                elif isinstance(cmd, Attach):
                    if not self._announced:
                        self._announced = True
                        console("host attached")
                    if cmd.restore_id and cmd.restore_id != self._restore_id:
                        self._restored(cmd, nursery)

    def _restored(self, attach: Attach, nursery: trio.Nursery) -> None:
        """The host says this VM was restored from a snapshot: become this VM.

        Done before anything else is read: the workload draws on the kernel's
        RNG, and until the reseed it shares that stream with its siblings.
        """
        from kestrel import restore

        try:
            p = restore.plan(attach, handled=self._restore_id, now_ns=time.time_ns())
            if p is None:
                return
            self._restore_id = p.restore_id
            lines = restore.apply(p)
        except restore.RestoreError as exc:
            self._restore_id = attach.restore_id  # refused once is refused
            console(f"KESTREL PANIC: {exc}")
            self.outbox.emit(Fatal(message=str(exc)))
            nursery.start_soon(self.supervisor.stop, signal.SIGTERM, self.supervisor.grace_s)
            return
        for line in lines:
            console(line)
        self.outbox.emit(Timeline(mark="restored", uptime=uptime()))
        if self.supervisor.health:
            # The new VM's host has heard no health yet: say where it stands.
            self.outbox.emit(Health(status=self.supervisor.health, detail="restored"))

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
                    n.start_soon(self.outbox.writer, stream)
                    await self._reader(stream, outer)
                    n.cancel_scope.cancel()
            # A nursery raises an ExceptionGroup: a reset seen by the reader or
            # the writer is the host going away, not a kestrel failure.
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            self.outbox.detach()
            self.execs.hangup_all()  # sessions belong to the connection that opened them
            if not transport.persistent:
                await stream.aclose()
            await trio.sleep(0.1)

    # --- signals ------------------------------------------------------------

    async def signal_loop(self, nursery: trio.Nursery, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(*FORWARDED) as signals:
            task_status.started()
            async for signum in signals:
                if signum in STOPPING:
                    nursery.start_soon(self.supervisor.stop, signum, self.supervisor.grace_s)
                else:
                    self.supervisor.forward(signum)

    # --- periodic -----------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        from kestrel import metrics

        sup = self.supervisor
        man = sup.manifest
        unsettled = bool(man and man.health_check and man.workload and man.workload.url)
        while True:
            await trio.sleep(HEARTBEAT_S)
            if unsettled:
                # Startup is over (main.py leaves this to here when a health
                # event was waiting): free the import garbage it froze.
                unsettled = False
                gc.unfreeze()
                gc.collect()
                gc.freeze()
            self.outbox.emit(Heartbeat(uptime=uptime(), state=sup.state, health=sup.health))
            m = Metrics(uptime=uptime(), agent_rss=metrics.own_rss(), reaped=self.reaper.reaped)
            m.mem_total, m.mem_available = metrics.memory()
            if sup.child is not None:
                m.workload_rss, m.workload_cpu_s = metrics.group_usage(sup.child.pgid)
            self.outbox.emit(m)

    async def agent_api(self) -> None:
        """Volant's agent API, inside a VM only: the vsock channel says kestrel is
        a guest. Anywhere else (a namespace test's unix channel) AF_VSOCK would
        reach this machine's hypervisor, so nothing here opens one."""
        if self.cfg.channel.kind != "vsock":
            return
        from kestrel import apiserver  # after the spawn: not on the boot path

        sup = self.supervisor
        workload = sup.manifest.workload if sup.manifest else None
        await apiserver.run(apiserver.Api(workload.url if workload else None,
                                          lambda: sup.state))

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


async def run(agent: Agent, child: Child | None, error: SpawnError | None,
              fatal: str | None) -> int:
    """The whole life of the agent; returns the status to report at power-off."""
    for mark, t in agent.timeline.items():
        agent.outbox.emit(Timeline(mark=mark, uptime=t))
    sup = agent.supervisor
    status = 0
    async with trio.open_nursery() as nursery:
        if child is not None:
            agent.reaper.watch(child.pid)
        await nursery.start(agent.reaper.run)
        await nursery.start(agent.signal_loop, nursery)
        await nursery.start(agent.execs.run)
        # Handlers exist now: let the signals main.py blocked come in.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        nursery.start_soon(agent.channel_loop, nursery)
        if agent.cfg.debug_shell:
            from kestrel import debugshell

            nursery.start_soon(debugshell.run, agent.reaper, agent.supervisor.workload_env, console)
        if fatal is not None:
            agent.outbox.emit(Fatal(message=fatal))
            sup.set_state("failed", fatal)
        else:
            nursery.start_soon(agent.heartbeat_loop)
            nursery.start_soon(agent.network_setup)
            nursery.start_soon(agent.agent_api)
            status = await sup.supervise(child, error, nursery)
        sup.set_state("poweroff", f"status {status}")
        await agent.outbox.flush(FINAL_FLUSH_S)
        nursery.cancel_scope.cancel()
    return status
