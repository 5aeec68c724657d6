"""An OCI bundle's config.json -> what one kestrel microVM runs, or a SpecError.

Parsed once, at Create: the process (args, env, cwd, user, terminal), the
hostname and the limits that size the VM. What a VM cannot honour is
refused here by name (joining a host namespace), so containerd shows the
reason instead of a container that runs wrong.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Below this a TCG guest cannot hold the kernel, kestrel and a workload.
MIN_MEMORY_MB = 128
# Namespaces a VM has of its own anyway; joining an existing one (a path) would
# mean sharing the host's, which a VM boundary cannot do.
SYMLINK_HOPS = 40  # Linux's MAXSYMLINKS


class SpecError(ValueError):
    """config.json asks for something this runtime cannot do; names the key."""


@dataclass(frozen=True)
class ProcessSpec:
    args: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    terminal: bool
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class ContainerSpec:
    process: ProcessSpec
    hostname: str
    memory_mb: int | None  # from linux.resources.memory.limit
    cpus: int | None  # from linux.resources.cpu quota/period


def parse_process(doc: Any, *, where: str = "process") -> ProcessSpec:
    if not isinstance(doc, dict):
        raise SpecError(f"{where}: missing or not an object")
    args = doc.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise SpecError(f"{where}.args: expected a non-empty list of strings")
    env: dict[str, str] = {}
    for item in doc.get("env") or []:
        if not isinstance(item, str) or "=" not in item:
            raise SpecError(f"{where}.env: {item!r} is not KEY=VALUE")
        key, _, value = item.partition("=")
        env[key] = value
    cwd = doc.get("cwd") or "/"
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise SpecError(f"{where}.cwd: {cwd!r} is not an absolute path")
    user = doc.get("user") or {}
    uid, gid = user.get("uid", 0), user.get("gid", 0)
    if not isinstance(uid, int) or not isinstance(gid, int) or uid < 0 or gid < 0:
        raise SpecError(f"{where}.user: uid {uid!r} gid {gid!r} are not ids")
    if set(user.get("additionalGids") or []) - {0, gid}:
        # kestrel's exec sessions set one uid and one gid; more would run wrong.
        raise SpecError(f"{where}.user.additionalGids: {user['additionalGids']}: "
                        "supplementary groups are not supported")
    return ProcessSpec(args=tuple(args), env=env, cwd=cwd, terminal=bool(doc.get("terminal")),
                       uid=uid, gid=gid)


def parse_config(doc: Any) -> ContainerSpec:
    if not isinstance(doc, dict):
        raise SpecError("config.json: not a JSON object")
    process = parse_process(doc.get("process"))
    linux = doc.get("linux") or {}
    for ns in linux.get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("path"):
            raise SpecError(f"linux.namespaces: joining the {ns.get('type')} namespace at "
                            f"{ns['path']} is not possible from a VM")
    resources = linux.get("resources") or {}
    memory_mb = None
    limit = (resources.get("memory") or {}).get("limit")
    if isinstance(limit, int) and limit > 0:
        memory_mb = max(MIN_MEMORY_MB, math.ceil(limit / (1 << 20)))
    cpus = None
    cpu = resources.get("cpu") or {}
    quota, period = cpu.get("quota"), cpu.get("period")
    if isinstance(quota, int) and quota > 0 and isinstance(period, int) and period > 0:
        cpus = max(1, math.ceil(quota / period))
    hostname = doc.get("hostname") or ""
    return ContainerSpec(process=process, hostname=str(hostname), memory_mb=memory_mb, cpus=cpus)


def find_in_rootfs(root: Path, program: str, path_env: str) -> str | None:
    """Where ``program`` resolves inside ``root`` (PATH search, symlinks kept
    inside the root), as the guest will see it; None when it is not there."""
    candidates = [program] if "/" in program else [
        f"{d.rstrip('/')}/{program}" for d in path_env.split(":") if d.startswith("/")]
    for cand in candidates:
        if not cand.startswith("/"):
            continue  # relative to cwd: the guest decides
        real = _resolve(root, cand)
        if real is not None and real.is_file() and os.access(real, os.X_OK):
            return cand
    return None


def _resolve(root: Path, path: str) -> Path | None:
    """``path`` inside ``root`` with every symlink followed as chroot would."""
    parts = [p for p in path.split("/") if p]
    current: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if current:
                current.pop()
            continue
        here = root.joinpath(*current, part)
        if here.is_symlink():
            hops += 1
            if hops > SYMLINK_HOPS:
                return None
            target = os.readlink(here)
            if target.startswith("/"):
                current = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        if not here.exists():
            return None
        current.append(part)
    return root.joinpath(*current)
