"""The container's root filesystem -> one ext4 image a VM boots into.

containerd hands the shim the snapshot's mounts (overlay layers, or a bind
mount); the shim mounts them on bundle/rootfs as runc's shim does, checks
the program is there, turns the tree into an ext4 image with mkfs.ext4 -d
and unmounts. An image made of committed layers only (an overlay whose
upper directory is still empty, or a read-only bind) is cached under the
layers' identity: the next container of that image boots without a build.
QEMU opens it with snapshot=on, so VMs share it and none can change it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

# Headroom over the files' own blocks: ext4's metadata, the journal, and a
# little room for the workload's writes (which QEMU throws away at exit).
SLACK = 1.25
EXTRA_MB = 16
INODE_SLACK = 1024


class RootfsError(RuntimeError):
    """The rootfs could not be mounted or imaged; says which step and why."""


@dataclass(frozen=True)
class MountSpec:
    type: str
    source: str
    options: tuple[str, ...]


def snapshot_key(mounts: Sequence[MountSpec]) -> str | None:
    """An identity for the image, or None when the tree is this container's own."""
    if not mounts:
        return None  # a rootfs the caller filled in bundle/rootfs (ctr run --rootfs)
    ident: list[object] = []
    for m in mounts:
        opts = sorted(o for o in m.options if not o.startswith(("upperdir=", "workdir=")))
        if m.type == "overlay":
            upper = next((o[9:] for o in m.options if o.startswith("upperdir=")), "")
            if upper and any(os.scandir(upper)):
                return None  # the container already wrote into its layer
            ident.append(["overlay", opts])
        elif m.type == "bind" and "ro" in m.options:
            ident.append(["bind", m.source, opts])
        else:
            return None  # a writable bind (the native snapshotter): this container's
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


async def _run(argv: list[str], what: str) -> None:
    proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise RootfsError(f"{what}: {argv[0]} exited {proc.returncode}"
                          + (f": {err[-1]}" if err else ""))


async def mount_all(mounts: Sequence[MountSpec], target: Path) -> None:
    target.mkdir(exist_ok=True)
    for m in mounts:
        argv = ["mount", "-t", m.type, m.source, str(target)]
        if m.options:
            argv[3:3] = ["-o", ",".join(m.options)]
        await _run(argv, f"mounting the rootfs ({m.type}) on {target}")


async def unmount_all(target: Path, count: int) -> None:
    for _ in range(count):
        await _run(["umount", str(target)], f"unmounting {target}")


def _tree_size(root: Path) -> tuple[int, int]:
    used, files = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            used += math.ceil(st.st_size / 4096) * 4096
            files += 1
    return used, files


async def build_image(root: Path, image: Path) -> None:
    """mkfs.ext4 -d of ``root`` into ``image``, atomically (a temp name, then rename)."""
    used, files = await trio.to_thread.run_sync(_tree_size, root)
    size_mb = math.ceil(used * SLACK / (1 << 20)) + EXTRA_MB
    image.parent.mkdir(parents=True, exist_ok=True)
    tmp = image.with_name(f".{image.name}.{secrets.token_hex(4)}.tmp")
    try:
        await _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-N", str(files + INODE_SLACK),
                    "-L", "kestrel-root", "-d", str(root), str(tmp), f"{size_mb}M"],
                   f"building the rootfs image from {root}")
        os.rename(tmp, image)
    finally:
        tmp.unlink(missing_ok=True)
