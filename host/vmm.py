"""The one small interface every VMM driver implements.

A driver turns a LaunchSpec into a command line, starts the VMM, gives the
monitor a byte stream to kestrel, and stops the VMM when asked. The monitor
(host/monitor.py) owns the sequence: start -> agent stream -> stop.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import trio

from kestrel.cmdline import Channel

if TYPE_CHECKING:
    from host.vsock import AgentListener


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
    # Disks the guest may write while QEMU keeps the file unchanged (its
    # snapshot=on: writes go to a deleted temporary file), so VMs can share
    # one image: the containerd shim's rootfs images.
    scratch_disks: tuple[Path, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)
    # The serial console as a byte stream (open_console_stream) instead of a
    # log file: whoever runs the VM then drains it and writes the log.
    console_socket: Path | None = None


def prepare_launch(spec: LaunchSpec, *, binary: str, install_hint: str) -> None:
    """What every driver checks before starting: the VMM, the boot files, a private run dir."""
    if shutil.which(binary) is None:
        raise VmmError(f"{binary} not found ({install_hint})")
    for path, what in ((spec.kernel, "kernel"), (spec.initramfs, "initramfs")):
        if not path.is_file():
            raise VmmError(f"{what} {path} does not exist")
    spec.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)


class Proc(Protocol):
    """A process a monitor watches: trio.Process for its own children, AdoptedProcess
    for a VMM (and its helpers) that a monitor which died left running."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...


class AdoptedProcess:
    """A process this one did not start, watched through a pidfd (Linux >= 5.3).

    The pidfd names one process: a pid recycled after it exits can be neither
    mistaken for it nor signalled. It is not our child, so its exit status is
    not ours to read: ``returncode`` is 0 once it is gone and ``status_known``
    says not to believe it.
    """

    status_known = False

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._fd = pidfd
        self._gone = False
        self._wait_lock = trio.Lock()

    @classmethod
    def open(cls, pid: int, start: int) -> AdoptedProcess | None:
        """The live process ``pid`` if it is still the one that started at ``start``."""
        from host.state import proc_start_time

        if pid <= 0 or start <= 0:
            return None
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone (ESRCH), or not ours to watch
            return None
        # Checked after the pidfd is open: from here on the pid cannot be reused
        # under us, so a match means the pidfd holds the process we recorded.
        if proc_start_time(pid) != start:
            os.close(fd)
            return None
        return cls(pid, fd)

    @property
    def returncode(self) -> int | None:
        if not self._gone and select.select([self._fd], [], [], 0)[0]:
            self._gone = True
        return 0 if self._gone else None

    async def wait(self) -> int:
        async with self._wait_lock:  # one waiter on the fd at a time, as trio.Process
            if self.returncode is None:
                await trio.lowlevel.wait_readable(self._fd)
                self._gone = True
        return 0

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, sig)


def exit_text(process: Proc) -> str:
    """How a process ended, in words (an adopted one's status is unknown)."""
    code = process.returncode
    if not getattr(process, "status_known", True):
        return "exited (its status is unknown: not a child of this monitor)"
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exited {code}"


async def terminate(process: Proc, *, grace: float = 3.0, what: str = "process") -> None:
    """SIGTERM, ``grace`` seconds, SIGKILL; returns once the process is reaped."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        with trio.move_on_after(wait):
            await process.wait()
    if process.returncode is None:
        raise VmmError(f"{what} pid {process.pid} survived SIGKILL")


@dataclass
class Helper:
    """A process the VM needs besides the VMM (the vsock backend): it lives and dies with it."""

    name: str
    process: Proc
    log: Path

    def log_tail(self, chars: int = 800) -> str:
        try:
            return self.log.read_text(errors="replace").strip()[-chars:]
        except OSError:
            return ""

    def failure(self) -> str:
        """Why the VM cannot go on: the helper's exit and the end of its log."""
        tail = self.log_tail()
        return (f"{self.name} (pid {self.process.pid}) {exit_text(self.process)}"
                + (f": {tail}" if tail else ""))

    async def stop(self) -> None:
        await terminate(self.process, grace=2.0, what=self.name)


@dataclass
class Running:
    """What a started VMM looks like to the monitor."""

    process: Proc
    console_log: Path
    # Where the workload is reachable from the host, e.g. "127.0.0.1:34567".
    address: str = ""
    # Processes the VM depends on: if one dies, the VM is crashed.
    helpers: list[Helper] = field(default_factory=list)
    # The hybrid vsock listener for kestrel's connections (vsock channel only).
    agent_listener: AgentListener | None = None
    # The VM's tap on the bridge (host/bridge.py), bridge networking only.
    tap: str = ""

    async def release(self) -> None:
        """After the VMM is gone: stop the helpers, close the listener, remove the tap
        (however the VMM ended: power-off, stop or crash)."""
        for helper in self.helpers:
            await helper.stop()
        if self.agent_listener is not None:
            await self.agent_listener.aclose()
        if self.tap:
            from host.bridge import release_tap  # bridge.py needs this module's VmmError

            release_tap(self.tap)
            self.tap = ""


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


@runtime_checkable
class SerialConsoleDriver(Protocol):
    """A driver that can hand the serial console over as a stream and press the
    guest's power button (what a VM without kestrel is stopped and reached with)."""

    async def open_console_stream(self, spec: LaunchSpec, running: Running) -> trio.abc.Stream:
        """The serial line, both ways (spec.console_socket must be set)."""
        ...

    async def powerdown(self, spec: LaunchSpec, running: Running) -> None:
        """Ask the guest to power off (ACPI power button); returns at once."""
        ...


@runtime_checkable
class SnapshotDriver(Protocol):
    """A driver that can save a running VM and start a new one from the saved state."""

    binary: str  # its --version is recorded: a saved state is good for that VMM only

    def check_snapshot(self, name: str) -> None:
        """VmmError, in one line, if this VM's configuration cannot be snapshotted."""
        ...

    async def snapshot(self, spec: LaunchSpec, running: Running, state: Path, *,
                       paused: Callable[[], None] = ...) -> None:
        """Pause, save to ``state`` (calling ``paused`` while stopped), run on."""
        ...

    async def restore(self, spec: LaunchSpec, state: Path) -> Running:
        """A new VMM that loads ``state`` and runs; on failure nothing is left."""
        ...


@runtime_checkable
class AdoptingDriver(Protocol):
    """A driver that can take over a VMM whose monitor died (host/adopt.py)."""

    async def adopt(self, spec: LaunchSpec, vmm: AdoptedProcess,
                    backend: AdoptedProcess | None, *, address: str) -> Running:
        """Reconnect to a running VMM: the agent listener, the VMM's control
        channel, the console; a VmmError says why it cannot be adopted."""
        ...
