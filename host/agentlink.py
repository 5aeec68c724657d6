"""The monitor's side of kestrel's channel: the one session loop, writing into the store.

One AgentLink per VM: host.session.SessionLoop (attach, ack, reconnect,
serialised sends) with this module's store sink, which writes every batch
in one transaction *before* the loop acknowledges it, so a record the
guest dropped from its buffer is always one the store holds.
"""

from __future__ import annotations

import json
import time
from typing import Any

import trio

from host.exechub import ExecHub
from host.session import SessionLoop
from host.state import Store
from host.vmm import LaunchSpec, Running, VmmDriver, VmmError
from kestrel.protocol import (
    Dropped,
    Exit,
    Fatal,
    Health,
    Hello,
    HostSession,
    Log,
    Message,
    Metrics,
    Oom,
    ProtocolError,
    State,
    Stop,
    Timeline,
)


class AgentLink:
    def __init__(self, store: Store, name: str, *, last_seq: int = 0,
                 adopted: bool = False) -> None:
        self.store = store
        self.name = name
        self.loop = SessionLoop(self, last_seq=last_seq)
        # Every hello after a first one (or any, for a monitor that adopted a
        # running VM) is kestrel coming back: the history says so.
        self.hellos = 1 if adopted else 0
        self.launched_at = 0.0
        self.fatal = ""
        self.poweroff = False
        self.exit_seen = False

    @property
    def session(self) -> HostSession:
        return self.loop.session

    @property
    def hello_seen(self) -> trio.Event:
        return self.loop.hello_seen

    @property
    def drained(self) -> trio.Event:
        return self.loop.drained

    @property
    def exec(self) -> ExecHub:
        """Exec sessions ride the agent connection (the monitor's control socket feeds it)."""
        return self.loop.exec

    async def run(
        self, driver: VmmDriver, spec: LaunchSpec, running: Running, exited: trio.Event
    ) -> None:
        """Keep a session up until the VMM exits and the last stream ends."""

        async def connect() -> trio.abc.Stream:
            return await driver.open_agent_stream(spec, running)

        def protocol_error(exc: ProtocolError) -> None:
            self.store.add_event(self.name, "protocol", "error", str(exc))

        await self.loop.run(connect, lambda: not exited.is_set(),
                            on_protocol_error=protocol_error,
                            connect_errors=(VmmError, OSError))

    async def send_stop(self, grace: float) -> bool:
        """Ask kestrel to stop the workload and power off; False when unreachable."""
        return await self.loop.command(Stop(grace_s=grace))

    # --- into the store ---------------------------------------------------

    def record(self, messages: list[Message]) -> None:
        """Write a batch in one transaction (then, and only then, it is acked)."""
        store, name = self.store, self.name
        now = time.time()
        logs: list[tuple[int, str, bytes, float]] = []
        with store.transaction():
            vm = store.vm(name)
            status = vm.status
            boot: dict[str, Any] = vm.boot
            boot_changed = False
            for m in messages:
                if isinstance(m, Log):
                    logs.append((m.seq, m.stream, m.data, now))
                elif isinstance(m, Hello):
                    self.hellos += 1
                    if self.hellos > 1:
                        store.add_event(name, "agent", "reattached",
                                        f"kestrel {m.agent} is back; it replays what follows "
                                        f"seq {self.session.last_seq}", when=now)
                    boot.setdefault("launched_at", self.launched_at)
                    boot.setdefault("hello_at", now)
                    boot.update(agent=m.agent, boot_id=m.boot_id)
                    boot.setdefault("timeline", {}).update(m.timeline)
                    boot_changed = True
                    if status == "starting":
                        status = "running"
                        store.set_status(name, status, f"kestrel {m.agent} said hello")
                elif isinstance(m, Timeline):
                    boot.setdefault("timeline", {})[m.mark] = m.uptime
                    boot_changed = True
                    store.add_event(name, "timeline", m.mark, f"{m.uptime:.3f}", when=now)
                elif isinstance(m, Health):
                    store.add_event(name, "health", m.status, m.detail, when=now)
                    store.update_vm(name, health=m.status)
                    if m.status == "healthy":
                        boot.setdefault("first_healthy_at", now)
                        boot_changed = True
                    if m.status in ("healthy", "unhealthy") and status in (
                        "running", "healthy", "unhealthy") and status != m.status:
                        status = m.status
                        store.set_status(name, status, m.detail)
                elif isinstance(m, State):
                    store.add_event(name, "state", m.state, m.detail, when=now)
                    if m.state == "poweroff":
                        self.poweroff = True
                elif isinstance(m, Exit):
                    self.exit_seen = True
                    body: dict[str, Any] = {
                        "pid": m.pid, "code": m.code, "signal": m.signal,
                        "status": m.status, "message": m.message,
                    }
                    store.update_vm(name, exit_json=json.dumps(body))
                    what = m.message or (
                        f"killed by signal {m.signal}" if m.signal else f"exited {m.code}")
                    store.add_event(name, "exit", str(m.status), what, when=now)
                elif isinstance(m, Oom):
                    store.add_event(name, "oom", str(m.pid), m.detail, when=now)
                elif isinstance(m, Fatal):
                    self.fatal = m.message
                    store.update_vm(name, fatal=m.message)
                    store.add_event(name, "fatal", "kestrel", m.message, when=now)
                elif isinstance(m, Dropped):
                    store.add_event(
                        name, "dropped", str(m.count),
                        f"records {m.first_seq}..{m.last_seq} lost to the guest's buffer bound",
                        when=now,
                    )
                elif isinstance(m, Metrics):
                    metrics: dict[str, Any] = {
                        "at": now, "uptime": m.uptime, "workload_rss": m.workload_rss,
                        "workload_cpu_s": m.workload_cpu_s, "agent_rss": m.agent_rss,
                        "mem_total": m.mem_total, "mem_available": m.mem_available,
                        "reaped": m.reaped,
                    }
                    store.update_vm(name, metrics_json=json.dumps(metrics))
            if logs:
                store.add_logs(name, logs)
            if boot_changed:
                store.update_vm(name, boot_json=json.dumps(boot))
            store.update_vm(name, last_seq=self.session.last_seq)
