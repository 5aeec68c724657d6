"""Facts about the image and the kernel directory that guest, builder and host share.

The builder writes these paths, the shim and kestrel read them in the guest,
and the host's kernel command fills the kernel directory fledge packs from.
"""

from __future__ import annotations

import os
from pathlib import Path

from kestrel.cmdline import DEFAULT_VSOCK_PORT

# In the image.
AGENT_PATH = "/bin/kestrel"  # what the shim execs
INIT_PATH = "/init"  # what the kernel runs from an initramfs
# One module path per line, relative to /lib/modules/<release>/, in load order.
MODULES_LOAD_LIST = "/etc/kestrel/modules.load"
# fledge's init mode (default | custom | none), one word: the host reads it to
# know whether kestrel will answer (custom and none images have no agent).
INIT_MODE_FILE = "/etc/kestrel/init-mode"
INIT_MODES = ("default", "custom", "none")


def agent_of_init_mode(mode: str) -> str:
    """The manifest's ``agent`` for an image built in ``mode``."""
    return "kestrel" if mode == "default" else "none"


# The virtio-serial port name of the agent channel under QEMU.
SERIAL_PORT_NAME = "org.kestrel.agent.0"
# vsock port kestrel connects to on the host (CID 2) by default: the
# command line codec owns the default, this is its name for the host.
VSOCK_PORT = DEFAULT_VSOCK_PORT
# vsock port of Volant's agent API in the guest (GET /healthz, /v1/... passthrough):
# the port Volant's kestrel serves, so hosts written for Volant find it.
AGENT_API_PORT = 8080

# Modules the default image loads (dependencies are resolved by fledge).
DEFAULT_MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_console",
    "virtio_net",
    "virtio_rng",
    "virtio_blk",
    "vmw_vsock_virtio_transport",
)


def canonical_module(name: str) -> str:
    """The kernel treats '-' and '_' in module names alike (virtio-rng.ko is virtio_rng)."""
    return name.replace("-", "_")


def kernel_dir() -> Path:
    """Where ``volar kernel fetch`` puts kernels and fledge finds their modules.

    Layout: ``<dir>/current`` -> ``<release>/`` holding ``vmlinux`` (PVH,
    uncompressed), ``vmlinuz`` (the package's bzImage), ``modules/`` (the
    package's ``lib/modules/<release>`` tree) and ``release`` (the text).
    Override with KESTREL_KERNEL_DIR.
    """
    env = os.environ.get("KESTREL_KERNEL_DIR")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "kestrel" / "kernel"
