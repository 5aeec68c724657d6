"""The QEMU driver: LaunchSpec -> qemu-system-x86_64 command, start, agent stream, stop.

TCG by default (this machine's /dev/kvm is PVM-only); the guest boots the
PVH vmlinux directly; its network is user networking with ``restrict=on``
and a 127.0.0.1 port forward, or, with a tap in ``spec.extra`` (``--network
bridge``), that tap on volar's bridge (host/bridge.py). kestrel talks to the host
over vsock, as in production: a vhost-user-vsock device served by rust-vmm's
vhost-device-vsock in hybrid mode (host/vsock.py, the same host code as
cloud-hypervisor). ``channel="serial"`` keeps the older virtio-serial port.

Machine choice (measured here, busybox init, 2 boots at a time on a loaded
2-core host): microvm + tsc_early_khz 16/16 boots, wall median 6.4 s; q35
8/8, median 11.3 s; microvm without tsc_early_khz 0/12 (hung at calibration).
KESTREL_QEMU_MACHINE=q35 and KESTREL_QEMU_ACCEL=kvm override the defaults.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from host.bridge import attach_tap, release_tap
from host.qmp import QmpClient, QmpError
from host.state import FIRST_GUEST_CID
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
    BACKEND_SOCKET,
    AgentListener,
    hybrid_socket,
    private_listener,
    require_backend,
    start_backend,
)
from kestrel.cmdline import Channel, parse_cmdline
from kestrel.layout import SERIAL_PORT_NAME, VSOCK_PORT

MACHINES = ("microvm", "q35")
# q35's vsock device and the PCIe root port it sits on (host/qemusnap.py unplugs it).
VSOCK_DEVICE = "vsock0"
VSOCK_CHARDEV = "vvsock"
VSOCK_PORT_ID = "vsockport"
CHANNELS = ("vsock", "serial")
# user networking's fixed addresses (QEMU docs, "Using the user mode network stack").
# QEMU user networking's fixed guest address and gateway, as kestrel's ip=.
QEMU_USER_IP = "10.0.2.15::10.0.2.2:255.255.255.0:{name}:eth0:off"


def host_tsc_khz() -> int | None:
    """The host TSC rate: TCG's guest TSC runs on the host's, so this skips calibration.

    microvm has no reliable PIT under TCG: the kernel's calibration fails now
    and then and boot hangs ("tsc: Unable to calibrate against PIT": 1 boot in
    6 idle, 3 in 4 under load, measured on the TCG test machine);
    ``tsc_early_khz`` sidesteps it.
    """
    try:
        log = subprocess.run(
            ["dmesg"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        log = ""
    # "Refined TSC clocksource calibration" wins over the first "Detected".
    found = re.findall(r"tsc: (?:Refined TSC clocksource calibration|Detected): ?([\d.]+) MHz", log)
    if found:
        return round(float(found[-1]) * 1000)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    # dmesg is root-only on many hosts. Intel's model name carries the nominal
    # (= TSC) rate; "cpu MHz" is the current clock, right only without scaling.
    nominal = re.search(r"^model name\s*:.*@\s*([\d.]+)\s*GHz", cpuinfo, re.M)
    if nominal:
        return round(float(nominal.group(1)) * 1_000_000)
    match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    return round(float(match.group(1)) * 1000) if match else None


def _hostname(name: str) -> str:
    label = re.sub(r"[^A-Za-z0-9-]", "-", name).strip("-")[:63]
    return label or "kestrel"


@dataclass
class QemuDriver:
    """Launches one VM per start(); stateless between calls except the binary choice."""

    name: str = "qemu"
    binary: str = "qemu-system-x86_64"
    machine: str = field(default_factory=lambda: os.environ.get("KESTREL_QEMU_MACHINE", "microvm"))
    # KVM here is PVM-only and cannot boot a Debian kernel; opt in explicitly.
    accel: str = field(default_factory=lambda: os.environ.get("KESTREL_QEMU_ACCEL", "tcg"))
    tsc_khz: int | None = None
    connect_timeout: float = 60.0
    # How kestrel reaches the host: vsock (production's path) or virtio-serial.
    channel: str = "vsock"
    guest_cid: int = FIRST_GUEST_CID
    _consoles: dict[str, trio.SocketListener] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.machine not in MACHINES:
            raise VmmError(f"QEMU machine {self.machine!r}: expected one of {', '.join(MACHINES)}")
        if self.channel not in CHANNELS:
            raise VmmError(f"channel {self.channel!r}: expected one of {', '.join(CHANNELS)}")
        if self.guest_cid < FIRST_GUEST_CID:
            raise VmmError(f"guest CID {self.guest_cid}: must be >= {FIRST_GUEST_CID}")
        if self.machine == "microvm" and self.tsc_khz is None:
            self.tsc_khz = host_tsc_khz()
            if self.tsc_khz is None:
                # microvm without tsc_early_khz hung in 12 of 12 boots on a busy
                # host here; q35 is slower but calibrates against a real PIT.
                self.machine = "q35"

    def agent_channel(self) -> Channel:
        if self.channel == "vsock":
            return Channel("vsock", port=VSOCK_PORT)
        return Channel("serial", name=SERIAL_PORT_NAME)

    # --- command line ---------------------------------------------------------

    def guest_cmdline(self, spec: LaunchSpec) -> str:
        """spec.cmdline plus what this driver's devices need, unless already given."""
        words = spec.cmdline.split()
        given = parse_cmdline(spec.cmdline)
        if "console" not in given:
            words.append("console=ttyS0")
        if "panic" not in given:
            words.append("panic=-1")  # with -no-reboot a panic ends QEMU
        # vsock:9000 is kestrel's own default: only serial needs saying.
        if "kestrel.channel" not in given and self.channel != "vsock":
            words.append(f"kestrel.channel={self.agent_channel()}")
        if "ip" not in given:
            host = _hostname(spec.name)
            words.append("ip=" + QEMU_USER_IP.format(name=host))
        if self.machine == "microvm" and self.tsc_khz and "tsc_early_khz" not in given:
            words.append(f"tsc_early_khz={self.tsc_khz}")
        if self.accel == "tcg" and "tsc" not in given:
            # TCG's TSC is the host's (constant); the guest's jiffies are what
            # lag on a busy host, so the watchdog would wrongly drop the TSC
            # for jiffies-based timekeeping ("skew is too large").
            words.append("tsc=reliable")
        return " ".join(words)

    def _dev(self, kind: str) -> str:
        # microvm has no PCI: its virtio devices sit on virtio-mmio.
        return f"virtio-{kind}-device" if self.machine == "microvm" else f"virtio-{kind}-pci"

    def _channel_args(self, spec: LaunchSpec, *, incoming: bool = False) -> list[str]:
        run = spec.run_dir
        if self.channel == "serial":
            return [
                "-chardev", f"socket,id=agent0,path={run / 'agent.sock'},server=on,wait=off",
                "-device", self._dev("serial"),
                "-device", f"virtserialport,chardev=agent0,name={SERIAL_PORT_NAME}",
            ]
        # vhost-user: the backend maps guest RAM, so RAM is a shared memfd.
        device = ("vhost-user-vsock-device" if self.machine == "microvm"
                  else "vhost-user-vsock-pci")
        args = ["-object", f"memory-backend-memfd,id=mem0,size={spec.memory_mb}M,share=on"]
        if self.machine == "q35":
            args += ["-device", f"pcie-root-port,id={VSOCK_PORT_ID},chassis=1"]
            device += f",bus={VSOCK_PORT_ID}"
        if incoming:
            return args  # a restore plugs its own vsock in after loading (_plug_vsock)
        # The guest CID is the backend's (vhost-user config space), not a QEMU property.
        return [*args, "-chardev", f"socket,id={VSOCK_CHARDEV},path={run / BACKEND_SOCKET}",
                "-device", f"{device},chardev={VSOCK_CHARDEV},id={VSOCK_DEVICE}"]

    def command(self, spec: LaunchSpec, *, incoming_fd: int | None = None) -> list[str]:
        """QEMU's command line; ``incoming_fd``: the same machine, loading a saved state
        from that (inherited) file descriptor."""
        incoming = incoming_fd is not None
        run = spec.run_dir
        # microvm keeps rtc on: without it the guest spends ~2 s more (measured under TCG).
        machine = "microvm,rtc=on,isa-serial=on" if self.machine == "microvm" else "q35"
        if self.channel == "vsock":
            machine += ",memory-backend=mem0"
        tap = spec.extra.get("tap")
        if tap:
            # Bridge mode: a persistent tap made by start() (host/bridge.py); QEMU
            # only opens it, and no script runs with QEMU's privileges.
            netdev = f"tap,id=n0,ifname={tap},script=no,downscript=no"
        else:
            netdev = "user,id=n0,restrict=on"
            if spec.guest_port is not None:
                netdev += f",hostfwd=tcp:127.0.0.1:{spec.host_port}-:{spec.guest_port}"
        net = f"{self._dev('net')},netdev=n0"
        if tap and spec.extra.get("mac"):
            net += f",mac={spec.extra['mac']}"  # ipam's, so a lease keeps its MAC
        if self.machine != "microvm":
            net += ",romfile="  # no iPXE option ROM: nothing boots from the network
        cmd = [
            self.binary,
            "-accel", self.accel,
            "-M", machine,
            "-m", f"{spec.memory_mb}M",
            "-smp", str(spec.cpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(spec.kernel),
            "-initrd", str(spec.initramfs),
            "-append", self.guest_cmdline(spec),
            # A file never fills up, so the guest can never block on its console.
            # With a console socket QEMU is the client of the monitor's listener:
            # it connects at start-up (nothing is lost before), and once nobody
            # reads any more its writes fail and the UART drops the bytes.
            "-chardev", (f"socket,id=con0,path={spec.console_socket}" if spec.console_socket
                         else f"file,id=con0,path={run / 'console.log'}"),
            "-serial", "chardev:con0",
            *self._channel_args(spec, incoming=incoming),
            "-netdev", netdev,
            "-device", net,
            "-device", self._dev("rng"),  # entropy early: no boot stalls in getrandom
            "-qmp", f"unix:{run / 'qmp.sock'},server=on,wait=off",
        ]
        disks = [(d, "") for d in spec.disks] + [(d, ",snapshot=on") for d in spec.scratch_disks]
        for i, (disk, mode) in enumerate(disks):
            cmd += [
                "-drive", f"file={disk},if=none,id=disk{i},format=raw{mode}",
                "-device", f"{self._dev('blk')},drive=disk{i}",
            ]
        if incoming:
            # Read straight from the file: ~0.1 s faster for 170 MB than exec:cat's
            # pipe (0.55 vs 0.65 s, measured here); QEMU 7.2 has no file: URI.
            cmd += ["-incoming", f"fd:{incoming_fd}"]
        return cmd

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
