"""The QEMU driver: start, adopt, agent and console streams, stop (QemuCommand in
host/qemucmd.py builds the command line it runs).

TCG by default (this machine's /dev/kvm is PVM-only); the guest boots the
PVH vmlinux directly; its network is user networking with ``restrict=on``
and a 127.0.0.1 port forward, or, with a tap in ``spec.extra`` (``--network
bridge``), that tap on volar's bridge (host/bridge.py). kestrel talks to the host
over vsock, as in production: a vhost-user-vsock device served by rust-vmm's
vhost-device-vsock in hybrid mode (host/vsock.py, the same host code as
cloud-hypervisor). ``channel="serial"`` keeps the older virtio-serial port.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from host.bridge import attach_tap, release_tap
from host.qemucmd import QemuCommand
from host.qmp import QmpClient, QmpError
from host.vmm import (
    AdoptedProcess,
    Helper,
    LaunchSpec,
    Running,
    VmmError,
    prepare_launch,
    terminate,
)
from host.vsock import (
    BACKEND_BINARY,
    BACKEND_LOG,
    AgentListener,
    hybrid_socket,
    private_listener,
    require_backend,
    start_backend,
)
from kestrel.layout import VSOCK_PORT


@dataclass
class QemuDriver(QemuCommand):
    """Launches one VM per start(); stateless between calls except the machine choice
    (QemuCommand: what its command line is)."""

    name: str = "qemu"
    connect_timeout: float = 60.0
    _consoles: dict[str, trio.SocketListener] = field(default_factory=dict)

    # --- lifecycle --------------------------------------------------------------

    async def start(self, spec: LaunchSpec, *, incoming: Path | None = None) -> Running:
        """Tap, listener, backend, QEMU, QMP - in that order; on failure nothing is left.

        ``incoming``: QEMU loads this saved state (restore()) and has no vsock
        device yet; the backend is already up for the one restore() plugs in.
        """
        prepare_launch(spec, binary=self.binary, install_hint="apt-get install qemu-system-x86")
        backend = require_backend() if self.channel == "vsock" else None
        tap = spec.extra.get("tap", "")
        for stale in ("agent.sock", "qmp.sock", "console.log"):
            (spec.run_dir / stale).unlink(missing_ok=True)
        console = spec.run_dir / "console.log"
        console.touch()
        listener: AgentListener | None = None
        helpers: list[Helper] = []
        try:
            if tap:
                attach_tap(tap)
            if spec.console_socket is not None:
                # QEMU dials it while starting: it must listen before the launch.
                self._consoles[spec.name] = await private_listener(spec.console_socket)
            if backend is not None:
                # Listen first: the guest may connect as soon as its driver loads.
                listener = await AgentListener.open(hybrid_socket(spec.run_dir), VSOCK_PORT)
                # QEMU talks vhost-user to the backend while creating the device.
                helpers.append(await start_backend(backend, cid=self.guest_cid,
                                                   run_dir=spec.run_dir))
            with contextlib.ExitStack() as files:
                state = files.enter_context(open(incoming, "rb")) if incoming else None
                cmd = self.command(spec, incoming_fd=state.fileno() if state else None)
                (spec.run_dir / "qemu.cmd").write_text(" ".join(cmd) + "\n")
                qemu_log = files.enter_context(open(spec.run_dir / "qemu.log", "wb"))
                process = await trio.lowlevel.open_process(
                    cmd, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT,
                    pass_fds=(state.fileno(),) if state else (),
                    start_new_session=True,  # the VM outlives a monitor that dies
                )
        except BaseException:
            with trio.CancelScope(shield=True):
                for helper in helpers:
                    await helper.stop()
                if listener is not None:
                    await listener.aclose()
                serial = self._consoles.pop(spec.name, None)
                if serial is not None:
                    await serial.aclose()
                if tap:
                    release_tap(tap)
            raise
        running = Running(process=process, console_log=console, helpers=helpers,
                          agent_listener=listener, tap=tap)
        if tap and spec.guest_port is not None:
            running.address = f"{spec.extra['ip']}:{spec.guest_port}"
        try:
            async with await self._qmp(spec, running) as qmp:
                if spec.guest_port is not None and not tap:
                    port = await qmp.forwarded_port(spec.guest_port)
                    if port is None:
                        raise VmmError(f"{spec.name}: QEMU reports no forward to guest port "
                                       f"{spec.guest_port}")
                    running.address = f"127.0.0.1:{port}"
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._kill(running)
                await running.release()
            raise
        return running

    async def adopt(self, spec: LaunchSpec, vmm: AdoptedProcess,
                    backend: AdoptedProcess | None, *, address: str) -> Running:
        """Take over a QEMU whose monitor died: kestrel's listener, QMP, the console.

        The guest's vsock connection went with the old monitor; kestrel comes
        back to a fresh ``<uds>_9000`` listener (it drops a silent connection,
        kestrel.protocol.KEEPALIVE_MISSES) and replays what the store lacks.
        """
        helpers: list[Helper] = []
        if self.channel == "vsock":
            if backend is None:
                raise VmmError(f"{spec.name}: its vsock backend is gone too, so kestrel "
                               "cannot reach the host any more")
            helpers.append(Helper(name=BACKEND_BINARY, process=backend,
                                  log=spec.run_dir / BACKEND_LOG))
        running = Running(process=vmm, console_log=spec.run_dir / "console.log",
                          address=address, helpers=helpers)
        try:
            if self.channel == "vsock":
                running.agent_listener = await AgentListener.open(hybrid_socket(spec.run_dir),
                                                                  VSOCK_PORT)
            async with await self._qmp(spec, running, timeout=10.0) as qmp:
                try:
                    status = await qmp.status()
                    if status != "running":
                        raise VmmError(f"{spec.name}: QEMU is {status or 'in an unknown state'}"
                                       ", not running")
                    if spec.console_socket is not None:
                        # The UART's old peer died with the monitor: point it at a
                        # fresh listener (QEMU dials it during the command).
                        self._consoles[spec.name] = await private_listener(spec.console_socket)
                        await qmp.execute("chardev-change", {"id": "con0", "backend": {
                            "type": "socket", "data": {"server": False, "addr": {
                                "type": "unix", "data": {"path": str(spec.console_socket)}}}}})
                except QmpError as exc:
                    raise VmmError(f"{spec.name}: {exc}") from None
        except BaseException:
            with trio.CancelScope(shield=True):
                if running.agent_listener is not None:
                    await running.agent_listener.aclose()
                serial = self._consoles.pop(spec.name, None)
                if serial is not None:
                    await serial.aclose()
            raise
        return running

    def _qemu_failure(self, spec: LaunchSpec, running: Running) -> VmmError:
        try:
            tail = (spec.run_dir / "qemu.log").read_text(errors="replace").strip()[-800:]
        except OSError:
            tail = ""
        return VmmError(
            f"{spec.name}: QEMU exited with status {running.process.returncode}"
            + (f": {tail}" if tail else "")
        )

    async def _qmp(self, spec: LaunchSpec, running: Running, *, timeout: float = 15.0) -> QmpClient:
        """Connect to QMP, failing fast with QEMU's own message if it died."""
        result: list[QmpClient] = []
        errors: list[QmpError] = []

        async def connect(cancel: trio.CancelScope) -> None:
            try:
                result.append(await QmpClient.connect(spec.run_dir / "qmp.sock",
                                                      timeout=timeout))
            except QmpError as exc:
                errors.append(exc)
                # A QEMU that dies mid-greeting is the usual cause: let its
                # exit (and its own message) win if it comes.
                with trio.move_on_after(2):
                    await running.process.wait()
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect, nursery.cancel_scope)
            await running.process.wait()
            nursery.cancel_scope.cancel()
        if result:
            return result[0]
        if running.process.returncode is not None:
            raise self._qemu_failure(spec, running)
        raise VmmError(f"{spec.name}: {errors[0] if errors else 'QMP unreachable'}")

    async def open_agent_stream(self, spec: LaunchSpec, running: Running) -> trio.abc.Stream:
        """vsock: kestrel's next connection. serial: connect to QEMU's socket, retrying.

        QEMU serves one client at a time on the serial socket: a second
        connection waits until the first goes away.
        """
        if running.agent_listener is not None:
            return await running.agent_listener.accept(
                running.process, timeout=self.connect_timeout, what=spec.name)
        path = str(spec.run_dir / "agent.sock")
        with trio.move_on_after(self.connect_timeout):
            while running.process.returncode is None:
                try:
                    return await trio.open_unix_socket(path)
                except OSError:
                    await trio.sleep(0.05)
            raise self._qemu_failure(spec, running)
        raise VmmError(f"{spec.name}: agent socket {path} not reachable "
                       f"within {self.connect_timeout:.0f} s")

    async def open_console_stream(self, spec: LaunchSpec, running: Running) -> trio.abc.Stream:
        """QEMU's connection to the console listener (it dialled at start-up)."""
        listener = self._consoles.pop(spec.name, None)
        if listener is None or spec.console_socket is None:
            raise VmmError(f"{spec.name}: no console socket (spec.console_socket is unset)")
        async with listener:
            with trio.move_on_after(self.connect_timeout):
                stream = await listener.accept()
                spec.console_socket.unlink(missing_ok=True)  # one VMM, one connection
                return stream
        raise VmmError(f"{spec.name}: QEMU did not connect its serial console")

    async def powerdown(self, spec: LaunchSpec, running: Running) -> None:
        """The ACPI power button (QMP system_powerdown); the guest decides what to do."""
        try:
            async with await QmpClient.connect(spec.run_dir / "qmp.sock", timeout=5.0) as qmp:
                await qmp.powerdown()
        except QmpError as exc:
            raise VmmError(f"{spec.name}: power button: {exc}") from None

    async def shutdown(self, spec: LaunchSpec, running: Running, *, timeout: float) -> None:
        """QMP quit, then SIGTERM, then SIGKILL; returns once QEMU and its backend are gone."""
        process = running.process
        if process.returncode is None:
            with trio.move_on_after(max(timeout, 0.5)):
                try:
                    async with await QmpClient.connect(
                        spec.run_dir / "qmp.sock", timeout=min(timeout, 5.0)
                    ) as qmp:
                        await qmp.quit()
                except QmpError:
                    pass  # QEMU may be gone already, or wedged: signals follow
                await process.wait()
        await self._kill(running)
        await running.release()

    # --- snapshots (host/qemusnap.py: why q35 and a vsock unplug) ---------------

    def check_snapshot(self, name: str) -> None:
        from host import qemusnap

        qemusnap.check(self, name)

    async def snapshot(self, spec: LaunchSpec, running: Running, state: Path, *,
                       paused: Callable[[], None] = lambda: None) -> None:
        from host import qemusnap

        await qemusnap.snapshot(self, spec, running, state, paused=paused)

    async def restore(self, spec: LaunchSpec, state: Path) -> Running:
        from host import qemusnap

        return await qemusnap.restore(self, spec, state)

    async def _kill(self, running: Running) -> None:
        await terminate(running.process, grace=3.0, what="QEMU")
