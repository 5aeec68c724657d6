"""The container's VM as volar sees it: rootfs image, manifest, control line, cleanup.

Everything here goes through volar's own pieces (host.lifecycle, the
monitor's control socket, host.adopt); the shim keeps no VM logic of its own.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from host.adopt import reconcile
from host.containerd.rootfs import MountSpec, build_image, mount_all, snapshot_key, unmount_all
from host.containerd.spec import DEFAULT_PATH, ContainerSpec, SpecError, find_in_rootfs
from host.state import Store
from host.vmcontrol import CONTROL_SOCKET
from kestrel.manifest import load_manifest


async def prepare_rootfs(*, bundle: Path, images: Path, vm: str, spec: ContainerSpec,
                         mounts: Sequence[MountSpec],
                         say: Callable[[str], None]) -> tuple[Path, bool]:
    """Mount, check the program is there, image it (or find it cached), unmount:
    (the image, whether it is the cache's)."""
    root = bundle / "rootfs"
    key = snapshot_key(mounts)
    image = images / (f"{key}.ext4" if key else f"container-{vm}.ext4")
    await mount_all(mounts, root)
    try:
        argv0 = spec.process.args[0]
        path_env = spec.process.env.get("PATH", DEFAULT_PATH)
        if find_in_rootfs(root, argv0, path_env) is None:
            raise SpecError(f"process.args[0] {argv0!r}: no such executable in the "
                            f"container's rootfs (PATH {path_env})")
        if not image.exists():
            say(f"building rootfs image {image.name}")
            await build_image(root, image)
    finally:
        with trio.CancelScope(shield=True):
            await unmount_all(root, len(mounts))
    return image, key is not None


# An idle workload from kestrel's own initramfs (static busybox, kept reachable
# under /run/kestrel/initramfs after the switch to the container's rootfs), so
# a rootfs without a sleep of its own still works.
IDLE = ("/run/kestrel/initramfs/bin/busybox", "sleep", "2147483647")


def manifest_for(spec: ContainerSpec, *, initramfs: Path, image: Path,
                 idle: bool = False) -> str:
    """The VM's manifest: the container's process as kestrel's batch workload, or
    (``idle``) a placeholder that keeps the VM up while the process runs as an
    exec session."""
    entrypoint = list(IDLE) if idle else list(spec.process.args)
    doc = {
        "name": "containerd", "version": "0.1.0", "runtime": "containerd",
        "initramfs": {"url": str(initramfs)},
        "rootfs": {"url": str(image), "format": "ext4"},
        "workload": {"type": "exec", "entrypoint": entrypoint,
                     "env": spec.process.env, "workdir": spec.process.cwd},
    }
    text = json.dumps(doc, separators=(",", ":"))
    load_manifest(text)  # the guest must accept what it is given
    return text


async def control(run_dir: Path, line: str) -> str:
    """One line to the VM's monitor (its control socket, host/monitorctl.py); its answer."""
    try:
        stream = await trio.open_unix_socket(str(run_dir / CONTROL_SOCKET))
    except OSError as exc:
        return f"error {exc.strerror}"
    async with stream:
        await stream.send_all(line.encode() + b"\n")
        reply = b""
        while chunk := await stream.receive_some(256):
            reply += chunk
            if b"\n" in reply:
                break
    return reply.decode(errors="replace").strip()


async def reap(monitor: subprocess.Popen[bytes]) -> None:
    """The monitor is our child: wait for it, or it lingers as a zombie."""
    await trio.to_thread.run_sync(monitor.wait, abandon_on_cancel=True)


def cleanup_vm(state_dir: Path, name: str, image: Path | None) -> None:
    """Stop and forget the VM; remove an image that was this container's alone.
    Blocking (volar's lifecycle polls): the daemon runs it in a thread, the delete
    subcommand directly."""
    from host.errors import NotFound
    from host.vmcontrol import delete

    store = Store(state_dir)
    try:
        reconcile(store, [name])  # a dead monitor's VM: settled, its VMM killed
        delete(store, name)
    except NotFound:
        pass
    finally:
        store.close()
    if image is not None:
        image.unlink(missing_ok=True)
