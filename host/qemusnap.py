"""QEMU's part of snapshots: unplug vsock, migrate to a file, load it, plug a fresh vsock.

QEMU 7.2 marks vhost-user-vsock unmigratable (hw/virtio/vhost-user-vsock.c:
``.unmigratable = 1``): a migration of a VM with kestrel's default channel is
refused. So the device leaves the machine before the migration (device_del,
then DEVICE_DELETED once the guest's ACPI hotplug let go: ~50 ms under TCG)
and a new one on a fresh vhost-device-vsock joins the source and every copy
after it; kestrel's connection resets and it reconnects. Only a PCIe root
port unplugs cleanly (microvm's virtio-mmio has no hot-unplug), so
snapshots need q35. QEMU 7.2 has no ``file:`` migration URI: a snapshot
is written through ``exec:cat`` and read from an inherited descriptor.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Callable
from pathlib import Path

import trio

# Imported by QemuDriver's snapshot methods, after host.qemu itself has loaded.
from host.qemu import QemuDriver
from host.qemucmd import VSOCK_CHARDEV, VSOCK_DEVICE, VSOCK_PORT_ID
from host.qmp import QmpClient, QmpError
from host.vmm import LaunchSpec, Running, VmmError
from host.vsock import BACKEND_BINARY, BACKEND_SOCKET, require_backend, start_backend

# The guest acks an ACPI unplug in ~50 ms under TCG; a busy host is slower.
UNPLUG_TIMEOUT_S = 15.0


def check(driver: QemuDriver, name: str) -> None:
    """Refuse, in one line, a VM this driver cannot snapshot."""
    if driver.machine != "q35":
        raise VmmError(f"{name} runs on QEMU's {driver.machine} machine, whose vsock device "
                       "cannot be unplugged for a snapshot; create it with --machine q35")
    if driver.channel != "vsock":
        raise VmmError(f"{name} talks over {driver.channel}: snapshots are made with the "
                       "vsock channel only")


async def snapshot(driver: QemuDriver, spec: LaunchSpec, running: Running, state: Path, *,
                   paused: Callable[[], None]) -> None:
    """Unplug vsock, pause, migrate to ``state``; then a fresh vsock and run again.

    ``paused`` runs while the guest is stopped and its channel gone: what
    the host holds then is exactly what the saved guest has sent.
    """
    check(driver, spec.name)
    partial = state.with_name(state.name + ".partial")
    try:
        async with await QmpClient.connect(spec.run_dir / "qmp.sock", timeout=10) as qmp:
            await qmp.device_del(VSOCK_DEVICE, timeout=UNPLUG_TIMEOUT_S)
            try:
                await qmp.execute("stop")
                paused()
                await qmp.migrate_to(f"exec:cat > {shlex.quote(str(partial))}")
                partial.rename(state)  # whole or absent
            finally:
                with trio.CancelScope(shield=True):
                    await plug_vsock(driver, qmp, spec, running, new_backend=True)
                    await qmp.execute("cont")
    except QmpError as exc:
        raise VmmError(f"{spec.name}: snapshot: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)


async def restore(driver: QemuDriver, spec: LaunchSpec, state: Path) -> Running:
    """A new QEMU that loads ``state``, then gets its own vsock backend and runs."""
    check(driver, spec.name)
    running = await driver.start(spec, incoming=state)
    try:
        async with await driver._qmp(spec, running) as qmp:
            await qmp.wait_loaded()
            await plug_vsock(driver, qmp, spec, running, new_backend=False)
            await qmp.execute("cont")
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await driver._kill(running)
            await running.release()
        if isinstance(exc, QmpError):
            if running.process.returncode is not None:
                raise driver._qemu_failure(spec, running) from None
            raise VmmError(f"{spec.name}: restore: {exc}") from None
        raise
    return running


async def plug_vsock(driver: QemuDriver, qmp: QmpClient, spec: LaunchSpec, running: Running,
                     *, new_backend: bool) -> None:
    """Chardev and device for a vsock; ``new_backend``: replace the one whose frontend
    went away with the unplug (a restore's start() made a fresh one)."""
    if new_backend:
        for helper in [h for h in running.helpers if h.name == BACKEND_BINARY]:
            await helper.stop()
            running.helpers.remove(helper)
        with contextlib.suppress(QmpError):  # the unplugged device's chardev
            await qmp.execute("chardev-remove", {"id": VSOCK_CHARDEV})
        running.helpers.append(await start_backend(require_backend(), cid=driver.guest_cid,
                                                   run_dir=spec.run_dir))
    await qmp.execute("chardev-add", {"id": VSOCK_CHARDEV, "backend": {
        "type": "socket", "data": {"server": False, "addr": {
            "type": "unix", "data": {"path": str(spec.run_dir / BACKEND_SOCKET)}}}}})
    await qmp.execute("device_add", {"driver": "vhost-user-vsock-pci", "id": VSOCK_DEVICE,
                                     "chardev": VSOCK_CHARDEV, "bus": VSOCK_PORT_ID})
