"""QEMU's command line: a pure function of the machine choice and a LaunchSpec.

QemuCommand holds what the choice is (machine, accelerator, channel, guest
CID, TSC rate) and turns a LaunchSpec into the kernel command line and
qemu-system-x86_64's argv; host/qemu.py's QemuDriver runs what it builds.

Machine choice (measured here, busybox init, 2 boots at a time on a loaded
2-core host): microvm + tsc_early_khz 16/16 boots, wall median 6.4 s; q35
8/8, median 11.3 s; microvm without tsc_early_khz 0/12 (hung at calibration).
KESTREL_QEMU_MACHINE=q35 and KESTREL_QEMU_ACCEL=kvm override the defaults.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from host.state import FIRST_GUEST_CID
from host.vmm import LaunchSpec, VmmError
from host.vsock import BACKEND_SOCKET
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
class QemuCommand:
    """The machine choice, and the guest and QEMU command lines it gives."""

    binary: str = "qemu-system-x86_64"
    machine: str = field(default_factory=lambda: os.environ.get("KESTREL_QEMU_MACHINE", "microvm"))
    # KVM here is PVM-only and cannot boot a Debian kernel; opt in explicitly.
    accel: str = field(default_factory=lambda: os.environ.get("KESTREL_QEMU_ACCEL", "tcg"))
    tsc_khz: int | None = None
    # How kestrel reaches the host: vsock (production's path) or virtio-serial.
    channel: str = "vsock"
    guest_cid: int = FIRST_GUEST_CID

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
