"""The monitor's side of kestrel's channel: connect, attach, store, ack, repeat.

One AgentLink per VM. It asks the driver for a fresh stream whenever the
previous one ends (while the VMM lives), speaks kestrel.protocol.HostSession
and writes every record into the store *before* acknowledging it, so a
record the guest dropped from its buffer is always one the store holds.
"""

from __future__ import annotations

import json
import time
from typing import Any

import trio

from host.state import Store
from host.vmm import LaunchSpec, Running, VmmDriver, VmmError
from kestrel.protocol import (
    Attach,
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
    encode,
)

RECEIVE_SIZE = 256 * 1024
# Re-send attach while no hello came back: bytes written to a virtio-serial
# port before the guest opened it may be lost.
REATTACH_S = 2.0
RETRY_S = 0.1


class AgentLink:
    def __init__(self, store: Store, name: str, *, last_seq: int = 0) -> None:
        self.store = store
        self.name = name
        self.session = HostSession(last_seq=last_seq)
        self.stream: trio.abc.Stream | None = None
        self.hello_seen = trio.Event()
        self.drained = trio.Event()
        self.launched_at = 0.0
        self.fatal = ""
        self.poweroff = False
        self.exit_seen = False
        self.connections = 0
        self._send_lock = trio.Lock()

    async def run(
        self, driver: VmmDriver, spec: LaunchSpec, running: Running, exited: trio.Event
    ) -> None:
        """Keep a session up until the VMM exits and the last stream ends."""
        last_error = ""
        try:
            while not exited.is_set():
                try:
                    stream = await driver.open_agent_stream(spec, running)
                except (VmmError, OSError) as exc:
                    if not exited.is_set():
                        if str(exc) != last_error:  # once per distinct reason, not 10/s
                            print(f"agent: connect: {exc}", flush=True)
                            last_error = str(exc)
                        await trio.sleep(RETRY_S)
                    continue
                try:
                    await self.serve(stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    print(f"agent: connection lost: {exc}", flush=True)
                except ProtocolError as exc:
                    self.store.add_event(self.name, "protocol", "error", str(exc))
                finally:
                    self.stream = None
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                if not exited.is_set():
                    await trio.sleep(RETRY_S)
        finally:
            self.drained.set()

    async def serve(self, stream: trio.abc.Stream) -> None:
        """One connection: attach, then store and ack until EOF."""
        self.connections += 1
        self.stream = stream
        opened = time.monotonic()
        print(f"agent: connection {self.connections} open, attach last_seq="
              f"{self.session.last_seq}", flush=True)
        await self._send(self.session.attach())
        greeted = False
        reattached = 0
        while True:
            with trio.move_on_after(REATTACH_S) as idle:
                data = await stream.receive_some(RECEIVE_SIZE)
            if idle.cancelled_caught:
                if not greeted:
                    reattached += 1
                    await self._send(encode(Attach(last_seq=self.session.last_seq)))
                continue
            if not data:
                return
            messages = self.session.receive(bytes(data))
            if not greeted and any(isinstance(m, Hello) for m in messages):
                greeted = True
                print(f"agent: hello {time.monotonic() - opened:.2f} s after connecting "
                      f"({reattached} attach re-sent)", flush=True)
            self.record(messages)
            ack = self.session.ack()
            if ack:
                await self._send(ack)

    async def _send(self, data: bytes) -> None:
        stream = self.stream
        if stream is None:
            raise trio.ClosedResourceError("no agent connection")
        async with self._send_lock:
            await stream.send_all(data)

    async def send_stop(self, grace: float) -> bool:
        """Ask kestrel to stop the workload and power off; False when unreachable."""
        if self.stream is None or not self.hello_seen.is_set():
            return False
        try:
            await self._send(self.session.command(Stop(grace_s=grace)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
        return True

    # --- into the store ---------------------------------------------------

    def record(self, messages: list[Message]) -> None:
        """Write a batch in one transaction (then, and only then, it is acked)."""
        store, name = self.store, self.name
        now = time.time()
        logs: list[tuple[int, str, bytes, float]] = []
        with store.transaction():
            vm = store.vm(name, refresh=False)
            status = vm.status
            boot: dict[str, Any] = vm.boot
            boot_changed = False
            for m in messages:
                if isinstance(m, Log):
                    logs.append((m.seq, m.stream, m.data, now))
                elif isinstance(m, Hello):
                    boot.setdefault("launched_at", self.launched_at)
                    boot.setdefault("hello_at", now)
                    boot.update(agent=m.agent, boot_id=m.boot_id)
                    boot.setdefault("timeline", {}).update(m.timeline)
                    boot_changed = True
                    if status == "starting":
                        status = "running"
                        store.set_status(name, status, f"kestrel {m.agent} said hello")
                    self.hello_seen.set()
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
