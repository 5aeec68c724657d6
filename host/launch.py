"""How a VM's monitor gets its VMM: the driver and the LaunchSpec built from the
store's rows, to launch one, or to adopt the one a dead monitor left running.

host/monitor.py builds the spec for a launch, and again for an adoption
(host/adopt.py decides when), which must rebuild what the first monitor launched.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
from pathlib import Path
from typing import Any

from host.ipam import GATEWAY, SUBNET
from host.qemucmd import QEMU_USER_IP
from host.rows import Vm
from host.vmm import (
    AdoptedProcess,
    AdoptingDriver,
    LaunchSpec,
    Running,
    SerialConsoleDriver,
    VmmDriver,
    VmmError,
    terminate,
)
from kestrel.cmdline import build_cmdline
from kestrel.manifest import load_manifest

BASE_CMDLINE = "console=ttyS0 panic=-1 quiet loglevel=1"
# kestrel's ip= for a VM on volar's bridge (host/ipam.py's subnet and gateway).
BRIDGE_IP = f"{{ip}}::{GATEWAY}:{SUBNET.netmask}:{{name}}:eth0:off"
CONSOLE_TAIL_LINES = 20


def make_driver(vmm: str, *, channel: str = "", guest_cid: int = 0,
                machine: str = "") -> VmmDriver:
    """The driver for ``--vmm``: qemu, cloud-hypervisor or ``module:Class``."""
    if vmm == "qemu":
        from host.qemu import QemuDriver
        from host.state import FIRST_GUEST_CID

        cid = guest_cid or FIRST_GUEST_CID
        if machine:  # chosen at create (snapshots need q35); else the driver's default
            return QemuDriver(channel=channel or "vsock", guest_cid=cid, machine=machine)
        return QemuDriver(channel=channel or "vsock", guest_cid=cid)
    if vmm == "cloud-hypervisor":
        from host.cloud_hypervisor import CloudHypervisorDriver

        return CloudHypervisorDriver()
    module, sep, cls = vmm.partition(":")
    if not sep:
        raise VmmError(f"unknown VMM {vmm!r}: expected qemu or cloud-hypervisor")
    factory: Any = getattr(importlib.import_module(module), cls)
    driver: VmmDriver = factory()
    return driver


def console_tail(path: Path | str, *, lines: int = CONSOLE_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").replace("\r", "")
    return "\n".join(text.rstrip("\n").split("\n")[-lines:])


def guest_port(manifest_json: str) -> int | None:
    m = load_manifest(manifest_json)
    return m.workload.url.port if m.workload is not None and m.workload.url else None


def launch_spec(vm: Vm, manifest_json: str, driver: VmmDriver) -> LaunchSpec:
    """What ``driver`` launches for ``vm``: the same from the same rows, so a monitor
    that adopts a running VMM rebuilds the spec its first monitor launched."""
    run_dir = Path(vm.run_dir)
    ip = (BRIDGE_IP if vm.ip else QEMU_USER_IP).format(ip=vm.ip, name=vm.name)
    manifest = json.loads(manifest_json)
    manifest.pop("$schema", None)  # a URL the guest never reads: cmdline bytes are scarce
    cmdline = build_cmdline(
        manifest_json=json.dumps(manifest, separators=(",", ":")).encode(),
        channel=driver.agent_channel(),
        base=BASE_CMDLINE,
        extra={
            "volant.plugin": vm.plugin,
            "volant.runtime": manifest.get("runtime") or vm.plugin,
            "kestrel.hostname": vm.name,
            "ip": ip,
            **({"kestrel.debug_shell": "1"} if vm.debug_shell else {}),
            **json.loads(vm.cmdline_extra_json),
        },
    )
    extra = {k: v for k, v in (("ip", vm.ip), ("mac", vm.mac), ("tap", vm.tap),
                               ("cid", str(vm.guest_cid or ""))) if v}
    return LaunchSpec(
        name=vm.name,
        run_dir=run_dir,
        kernel=Path(vm.kernel),
        initramfs=Path(vm.initramfs),
        cmdline=cmdline,
        cpus=vm.cpus,
        memory_mb=vm.memory_mb,
        guest_port=guest_port(manifest_json),
        host_port=vm.host_port,
        scratch_disks=tuple(Path(d) for d in json.loads(vm.scratch_disks_json)),
        extra=extra,
        console_socket=(run_dir / "serial.sock"
                        if isinstance(driver, SerialConsoleDriver) else None),
    )


class AdoptionFailed(Exception):
    """The VMM a dead monitor left cannot be taken over; says why (and what was killed)."""


def own_vm(lock: Path) -> int:
    """One monitor per VM: an exclusive flock the kernel drops when its holder dies.

    The fd to keep open for the monitor's life, or -1 if another monitor holds it."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    return fd


async def adopt_vmm(vm: Vm, driver: VmmDriver, spec: LaunchSpec) -> Running:
    """The recorded VMM and backend, taken over through ``driver``; on failure both are
    killed and AdoptionFailed says why."""
    vmm = AdoptedProcess.open(vm.vmm_pid, vm.vmm_start)
    if vmm is None:
        raise AdoptionFailed(f"its VMM (pid {vm.vmm_pid}) is gone too")
    backend = AdoptedProcess.open(vm.backend_pid, vm.backend_start)
    try:
        if not isinstance(driver, AdoptingDriver):
            raise VmmError(f"the {driver.name} driver cannot adopt a running VMM")
        running: Running = await driver.adopt(spec, vmm, backend, address=vm.address)
    except (VmmError, OSError) as exc:
        for process in (vmm, backend):
            if process is not None:
                await terminate(process, grace=2.0, what=f"adopted pid {process.pid}")
        raise AdoptionFailed(f"could not adopt its VMM (pid {vm.vmm_pid}): {exc}; "
                             "killed it") from None
    return running
