"""Snapshot directories: what one holds, and when it may be restored.

``volar vms snapshot`` writes DIR/snapshot.json (this module's SnapshotMeta)
next to the VMM's own saved state (QEMU: DIR/state, its migration stream;
cloud-hypervisor: DIR/vmm/, its snapshot). The saved state is only valid
against the exact boot files, VMM and machine it was taken with, so a
restore compares them all first and refuses a difference in one line.
The monitor calls take() and restore(); the drivers do the VMM's part.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from host.errors import VolarError
from kestrel.digest import sha256_file

if TYPE_CHECKING:
    from host.rows import Plugin, Vm
    from host.vmm import LaunchSpec, Running, VmmDriver

FORMAT = 1
META = "snapshot.json"
QEMU_STATE = "state"  # QEMU's migration stream
CH_STATE = "vmm"  # cloud-hypervisor's snapshot directory (config.json, state.json, memory)


class SnapshotError(VolarError):
    """A snapshot cannot be taken or restored; the message says which and why."""


@dataclass(frozen=True)
class SnapshotMeta:
    """Everything the saved state depends on, and what the restored VM needs."""

    format: int
    vm: str  # the VM it was taken of
    taken_at: float
    plugin: str
    plugin_sha256: str  # the initramfs the guest's memory came from
    kernel: str
    kernel_sha256: str
    vmm: str  # "qemu" | "cloud-hypervisor"
    vmm_version: str
    machine: str  # QEMU's -M ("q35"); "" for cloud-hypervisor
    cpus: int
    memory_mb: int
    channel: str
    guest_port: int  # the workload's port inside, 0 if none
    last_seq: int  # the last record the source's host held: the copy's replay starts after it
    state_bytes: int  # the saved state's size: a shorter file is a truncated snapshot
    debug_shell: bool = False
    kernel_stamp: str = ""  # "size:mtime_ns" of the kernel file when it was hashed


def save(directory: Path, meta: SnapshotMeta) -> Path:
    path = directory / META
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(meta), indent=2) + "\n")
    os.replace(tmp, path)  # a snapshot.json is whole or absent
    return path


def load(directory: Path) -> SnapshotMeta:
    """The snapshot at ``directory``; SnapshotError naming the file otherwise."""
    path = directory / META
    try:
        doc: Any = json.loads(path.read_text())
    except FileNotFoundError:
        raise SnapshotError(f"no snapshot at {directory}: {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"snapshot {path}: unreadable ({exc})") from None
    names = {f.name: f for f in fields(SnapshotMeta)}
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise SnapshotError(f"snapshot {path}: format {found!r}, this volar reads {FORMAT}")
    try:
        return SnapshotMeta(**{k: v for k, v in doc.items() if k in names})
    except TypeError as exc:
        raise SnapshotError(f"snapshot {path}: {exc}") from None


def state_path(directory: Path, meta: SnapshotMeta) -> Path:
    return directory / (QEMU_STATE if meta.vmm == "qemu" else CH_STATE)


def state_size(path: Path) -> int:
    """Bytes of saved state: a file, or a directory's files (cloud-hypervisor)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def vmm_version(binary: str) -> str:
    """The VMM's own version line (``--version``): a saved state is only good for it."""
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SnapshotError(f"{binary} --version: {exc}") from None
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0] if first else ""


def stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def kernel_digest(path: Path, meta: SnapshotMeta) -> str:
    """The kernel's sha256; the snapshot's own when it is the same file, unchanged since.

    Hashing 50 MB of vmlinux costs ~0.1 s of every restore (measured here);
    a file with the same path, size and mtime is the one that was hashed.
    """
    if str(path) == meta.kernel and meta.kernel_stamp and stamp(path) == meta.kernel_stamp:
        return meta.kernel_sha256
    return sha256_file(path)


def check_restorable(meta: SnapshotMeta, directory: Path, *, plugin_sha256: str | None,
                     kernel_sha256: str, vmm_version: str) -> None:
    """Refuse, in one line, a restore whose saved state would not match what runs it.

    ``plugin_sha256`` is the installed plugin's initramfs checksum (None: not
    installed). Checked in the order a user can act on.
    """
    where = f"snapshot {directory}"
    state = state_path(directory, meta)
    if not state.exists():
        raise SnapshotError(f"{where}: its saved state {state} is missing")
    size = state_size(state)
    if size != meta.state_bytes:
        raise SnapshotError(f"{where}: {state} is {size} bytes, the snapshot recorded "
                            f"{meta.state_bytes}: truncated or altered")
    if plugin_sha256 is None:
        raise SnapshotError(f"{where}: plugin {meta.plugin!r} is not installed")
    if plugin_sha256 != meta.plugin_sha256:
        raise SnapshotError(f"{where}: plugin {meta.plugin!r} changed since the snapshot "
                            f"(initramfs sha256 {plugin_sha256[:12]}, snapshot has "
                            f"{meta.plugin_sha256[:12]})")
    if kernel_sha256 != meta.kernel_sha256:
        raise SnapshotError(f"{where}: the kernel changed since the snapshot (sha256 "
                            f"{kernel_sha256[:12]}, snapshot has {meta.kernel_sha256[:12]} "
                            f"from {meta.kernel})")
    if vmm_version != meta.vmm_version:
        raise SnapshotError(f"{where}: taken with {meta.vmm_version!r}, this host runs "
                            f"{vmm_version!r}")


# --- the monitor's side: up to the VMM edge, the same for every driver ----------


async def take(driver: VmmDriver, spec: LaunchSpec, running: Running, *, directory: Path,
               vm: Vm, plugin: Plugin, last_seq: Callable[[], int]
               ) -> tuple[SnapshotMeta, float]:
    """Pause the VM, save it into ``directory``, let it run on; (meta, seconds paused+saving).

    ``last_seq`` is read while the guest is paused: the copy's host starts
    from what the source's host held at that moment.
    """
    # Here, not at the top: `volar vms create --from-snapshot` reads this
    # module too, and trio is a tenth of a second of every restore.
    import trio

    from host.vmm import SnapshotDriver

    if not isinstance(driver, SnapshotDriver):
        raise SnapshotError(f"{driver.name} cannot take snapshots")
    driver.check_snapshot(spec.name)
    if (directory / META).exists():
        raise SnapshotError(f"{directory} already holds a snapshot; choose another --out")
    if vm.mac and vm.tap:
        # Saved into the device state: every copy would come back with it.
        raise SnapshotError(f"{vm.name} sits on the shared bridge as {vm.mac} ({vm.ip}); "
                            "a restored copy could not get another MAC or address, so "
                            "snapshots are made of user-networking VMs only")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    kernel_stamp = stamp(Path(vm.kernel))
    kernel_sha = await trio.to_thread.run_sync(sha256_file, Path(vm.kernel))
    version = await trio.to_thread.run_sync(vmm_version, driver.binary)
    held = [vm.last_seq]

    def paused() -> None:
        held[0] = last_seq()

    state = directory / (QEMU_STATE if vm.vmm == "qemu" else CH_STATE)
    started = time.monotonic()
    await driver.snapshot(spec, running, state, paused=paused)
    took = time.monotonic() - started
    meta = SnapshotMeta(
        format=FORMAT, vm=vm.name, taken_at=time.time(), plugin=plugin.name,
        plugin_sha256=plugin.artifact_sha256, kernel=vm.kernel, kernel_sha256=kernel_sha,
        vmm=vm.vmm, vmm_version=version, machine=getattr(driver, "machine", ""),
        cpus=vm.cpus, memory_mb=vm.memory_mb, channel=vm.channel,
        guest_port=spec.guest_port or 0, last_seq=held[0], state_bytes=state_size(state),
        debug_shell=vm.debug_shell, kernel_stamp=kernel_stamp,
    )
    save(directory, meta)
    return meta, took


async def restore(driver: VmmDriver, spec: LaunchSpec, directory: Path) -> Running:
    """Start a VMM from the snapshot (volar checked it against this host at create)."""
    from host.vmm import SnapshotDriver

    if not isinstance(driver, SnapshotDriver):
        raise SnapshotError(f"{driver.name} cannot restore snapshots")
    meta = load(directory)
    return await driver.restore(spec, state_path(directory, meta))
