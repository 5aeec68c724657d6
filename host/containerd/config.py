"""The shim's settings and the names it derives from (namespace, container id).

Settings come from the JSON file at $KESTREL_SHIM_CONFIG, else
/etc/kestrel/containerd-shim.json (containerd passes its environment to
every shim). Everything the ``delete`` subcommand needs after a shim died
is derived again from the same inputs, or read from the bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from host.names import valid_name

CONFIG_ENV = "KESTREL_SHIM_CONFIG"
DEFAULT_CONFIG = Path("/etc/kestrel/containerd-shim.json")
DEFAULT_STATE = Path("/var/lib/kestrel-shim")
# Sockets go here, named by a hash: a unix socket path is at most 107 bytes.
SOCKET_DIR = Path("/run/kestrel-shim")
RECORD = "kestrel-shim.json"  # in the bundle: what the delete subcommand cleans up
RUNTIME = "io.containerd.kestrel.v1"


class ConfigError(ValueError):
    """The shim's settings are missing or wrong; names the file and key."""


@dataclass(frozen=True)
class ShimConfig:
    initramfs: Path  # the kestrel initramfs every container's VM boots (fledge build)
    state_dir: Path = DEFAULT_STATE  # volar's store for the shims' VMs, and the image cache
    memory_mb: int = 256  # when config.json sets no memory limit
    cpus: int = 1
    boot_timeout: float = 120.0

    @property
    def images(self) -> Path:
        return self.state_dir / "images"


def load_config() -> ShimConfig:
    path = Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (the shim's settings: "
                          f'{{"initramfs": PATH}}; ${CONFIG_ENV} names another file)') from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("initramfs"), str):
        raise ConfigError(f"{path}: \"initramfs\" (the kestrel image to boot) is required")
    try:
        cfg = ShimConfig(
            initramfs=Path(doc["initramfs"]),
            state_dir=Path(doc.get("state_dir") or DEFAULT_STATE),
            memory_mb=int(doc.get("memory_mb", 256)),
            cpus=int(doc.get("cpus", 1)),
            boot_timeout=float(doc.get("boot_timeout", 120.0)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not cfg.initramfs.is_file():
        raise ConfigError(f"{path}: initramfs {cfg.initramfs} does not exist")
    return cfg


def vm_name(namespace: str, container_id: str) -> str:
    """The VM's name in volar's store: readable when it can be, unique always."""
    plain = f"{namespace}.{container_id}".lower()
    name = re.sub(r"[^a-z0-9_.-]", "-", plain)
    if name != f"{namespace}.{container_id}" or not valid_name(name):
        digest = hashlib.sha256(f"{namespace}/{container_id}".encode()).hexdigest()[:12]
        name = f"{name.strip('-_.')[:48] or 'c'}-{digest}"
    return name


def socket_path(containerd_address: str, namespace: str, container_id: str) -> Path:
    digest = hashlib.sha256(f"{containerd_address}/{namespace}/{container_id}".encode())
    return SOCKET_DIR / digest.hexdigest()[:32]
