"""A stand-in VMM for volar's tests: a host process that plays the guest.

``FakeDriver`` (selected with ``--vmm tests.host_fakevmm:FakeDriver``) runs
this module as the "VMM". It decodes the manifest from the command line it
was given, runs the workload's entrypoint as a real host process and speaks
the real kestrel protocol (kestrel.protocol.GuestSession) on a unix socket
the monitor connects to, as QEMU's chardev server would. Stop powers it off
with exit 0, like a guest calling reboot(POWER_OFF).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import trio

from host.vmm import AdoptedProcess, LaunchSpec, Running, VmmError
from kestrel.cmdline import Channel, boot_config
from kestrel.manifest import ManifestError, load_manifest
from kestrel.protocol import (
    Exit,
    Fatal,
    GuestSession,
    Health,
    Log,
    Message,
    Metrics,
    State,
    Stop,
    Timeline,
)


class FakeDriver:
    name = "fake"

    def agent_channel(self) -> Channel:
        return Channel("serial", name="org.kestrel.agent.0")

    def command(self, spec: LaunchSpec) -> list[str]:
        return [sys.executable, "-m", "tests.host_fakevmm", str(spec.run_dir), spec.cmdline]

    async def start(self, spec: LaunchSpec) -> Running:
        console = spec.run_dir / "console.log"
        with open(console, "ab") as log:
            proc = await trio.lowlevel.open_process(
                self.command(spec), stdout=log, stderr=log, stdin=-3
            )
        return Running(process=proc, console_log=console, address="127.0.0.1:0")

    async def open_agent_stream(self, spec: LaunchSpec, running: Running) -> trio.abc.Stream:
        try:
            return await trio.open_unix_socket(str(spec.run_dir / "agent.sock"))
        except OSError as exc:
            raise VmmError(f"agent socket: {exc}") from None

    async def shutdown(self, spec: LaunchSpec, running: Running, *, timeout: float) -> None:
        running.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(timeout):
            await running.process.wait()

    async def adopt(self, spec: LaunchSpec, vmm: AdoptedProcess, backend: AdoptedProcess | None,
                    *, address: str) -> Running:
        """The fake guest keeps listening on agent.sock: the new monitor just connects."""
        return Running(process=vmm, console_log=spec.run_dir / "console.log", address=address)


class RigidDriver:
    """The fake VMM through a driver that cannot adopt (as cloud-hypervisor's today)."""

    name = "rigid"

    def __init__(self) -> None:
        self._fake = FakeDriver()

    def agent_channel(self) -> Channel:
        return self._fake.agent_channel()

    def command(self, spec: LaunchSpec) -> list[str]:
        return self._fake.command(spec)

    async def start(self, spec: LaunchSpec) -> Running:
        return await self._fake.start(spec)

    async def open_agent_stream(self, spec: LaunchSpec, running: Running) -> trio.abc.Stream:
        return await self._fake.open_agent_stream(spec, running)

    async def shutdown(self, spec: LaunchSpec, running: Running, *, timeout: float) -> None:
        await self._fake.shutdown(spec, running, timeout=timeout)


class Guest:
    def __init__(self, run_dir: Path, cmdline: str) -> None:
        self.run_dir = run_dir
        self.cmdline = cmdline
        self.session = GuestSession(agent="fake-kestrel/0", boot_id="fake")
        self.conn: trio.abc.Stream | None = None
        self.lock = trio.Lock()
        self.stop_grace: float | None = None
        self.stop_event = trio.Event()

    def cmdline_manifest_env(self) -> dict[str, str]:
        try:
            cfg = boot_config(self.cmdline)
            assert cfg.manifest_json is not None
            workload = load_manifest(cfg.manifest_json).workload
        except (ManifestError, AssertionError, ValueError):
            return {}
        return workload.env if workload else {}

    async def emit(self, msg: Message) -> None:
        frame = self.session.record(msg) if msg.SEQUENCED else self.session.telemetry(msg)
        if frame and self.conn is not None:
            async with self.lock:
                try:
                    await self.conn.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.conn = None
                    self.session.detach()

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.conn = stream
        try:
            while data := await stream.receive_some(65536):
                commands, reply = self.session.receive(bytes(data))
                if reply:
                    async with self.lock:
                        await stream.send_all(reply)
                for c in commands:
                    if isinstance(c, Stop):
                        self.stop_grace = c.grace_s
                        self.stop_event.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if self.conn is stream:
                self.conn = None
                self.session.detach()

    async def pump(self, pipe: trio.abc.ReceiveStream, name: str) -> None:
        while data := await pipe.receive_some(65536):
            await self.emit(Log(stream=name, data=bytes(data)))

    async def run(self) -> int:
        print("fake guest: booting", flush=True)
        if "FAKE_CRASH" in self.cmdline_manifest_env():
            await trio.sleep(0.3)
            print("Kernel panic - not syncing: fake", flush=True)
            return 3  # dies before kestrel ever answers, like a kernel panic
        if "FAKE_SILENT" in self.cmdline_manifest_env():
            print("fake guest: hangs before kestrel starts", flush=True)
            await trio.sleep_forever()
        sock = self.run_dir / "agent.sock"
        sock.unlink(missing_ok=True)
        s = trio.socket.socket(trio.socket.AF_UNIX)
        await s.bind(str(sock))
        s.listen(1)
        listener = trio.SocketListener(s)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self.serve, [listener])
            code = await self.workload()
            await trio.sleep(0.3)  # let the last records go out
            nursery.cancel_scope.cancel()
        print("fake guest: power off", flush=True)
        return code

    async def workload(self) -> int:
        await self.emit(Timeline(mark="kestrel_start", uptime=0.05))
        try:
            cfg = boot_config(self.cmdline)
            assert cfg.manifest_json is not None
            manifest = load_manifest(cfg.manifest_json)
            assert manifest.workload is not None
        except (ManifestError, AssertionError, ValueError) as exc:
            print(f"KESTREL PANIC: {exc}", flush=True)
            await self.emit(Fatal(message=f"bad manifest: {exc}"))
            await trio.sleep(1.0)
            return 0
        if manifest.workload.env.get("FAKE_FATAL"):
            await self.emit(Fatal(message=manifest.workload.env["FAKE_FATAL"]))
            await trio.sleep(1.0)
            return 0
        env = {**os.environ, **manifest.workload.env}
        proc = await trio.lowlevel.open_process(
            list(manifest.workload.entrypoint), stdout=-1, stderr=-1, stdin=-3, env=env
        )
        await self.emit(State(state="running", detail=f"pid {proc.pid}"))
        await self.emit(Timeline(mark="workload_exec", uptime=0.1))
        if manifest.health_check is not None:
            await self.emit(Health(status="healthy", detail="200"))
        await self.emit(Metrics(uptime=0.2, workload_rss=5 << 20, mem_total=512 << 20,
                                mem_available=480 << 20, agent_rss=20 << 20))
        async with trio.open_nursery() as nursery:
            assert proc.stdout is not None and proc.stderr is not None
            nursery.start_soon(self.pump, proc.stdout, "stdout")
            nursery.start_soon(self.pump, proc.stderr, "stderr")

            async def stopper() -> None:
                await self.stop_event.wait()
                await self.emit(State(state="stopping", detail="host asked"))
                proc.terminate()

            nursery.start_soon(stopper)
            status = await proc.wait()
            nursery.cancel_scope.deadline = trio.current_time() + 1.0
        code = status if status >= 0 else None
        sig = -status if status < 0 else None
        await self.emit(Exit(pid=proc.pid, code=code, signal=sig,
                             status=status if status >= 0 else 128 - status))
        await self.emit(State(state="poweroff"))
        return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("cmdline")
    args = p.parse_args()
    return trio.run(Guest(args.run_dir, args.cmdline).run)


if __name__ == "__main__":
    sys.exit(main())
