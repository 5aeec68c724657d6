"""The one small interface every VMM driver implements.

A driver turns a LaunchSpec into a command line, starts the VMM, gives the
monitor a byte stream to kestrel, and stops the VMM when asked. The monitor
(host/monitor.py) owns the sequence: start -> agent stream -> stop.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from kestrel.cmdline import Channel


class VmmError(RuntimeError):
    """A VMM could not be found, started, reached or stopped; says which and why."""


@dataclass(frozen=True)
class LaunchSpec:
    name: str
    run_dir: Path  # private 0700 directory for sockets, console log, pid files
    kernel: Path
    initramfs: Path
    cmdline: str  # everything but kestrel.channel, which the driver chooses
    cpus: int = 1
    memory_mb: int = 512
    # Guest TCP port to publish on the host (the workload's port), if any.
    guest_port: int | None = None
    # Requested host port; 0 lets the driver pick a free one.
    host_port: int = 0
    disks: tuple[Path, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)


def prepare_launch(spec: LaunchSpec, *, binary: str, install_hint: str) -> None:
    """What every driver checks before starting: the VMM, the boot files, a private run dir."""
    if shutil.which(binary) is None:
        raise VmmError(f"{binary} not found ({install_hint})")
    for path, what in ((spec.kernel, "kernel"), (spec.initramfs, "initramfs")):
        if not path.is_file():
            raise VmmError(f"{what} {path} does not exist")
    spec.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)


@dataclass
class Running:
    """What a started VMM looks like to the monitor."""

    process: trio.Process
    console_log: Path
    # Where the workload is reachable from the host, e.g. "127.0.0.1:34567".
    address: str = ""


class VmmDriver(Protocol):
    name: str

    def agent_channel(self) -> Channel:
        """The ``kestrel.channel`` the guest must use with this driver."""
        ...

    def command(self, spec: LaunchSpec) -> list[str]:
        """The full VMM command line (printed on failure to reproduce)."""
        ...

    async def start(self, spec: LaunchSpec) -> Running:
        ...

    async def open_agent_stream(self, spec: LaunchSpec, running: Running) -> trio.abc.Stream:
        """A fresh byte stream to kestrel; called again after a disconnect."""
        ...

    async def shutdown(self, spec: LaunchSpec, running: Running, *, timeout: float) -> None:
        """Ask the VMM itself to stop (QMP quit, CH vmm.shutdown); then signals."""
        ...
