"""Asking a VM's monitor, over the control socket in its run dir: stop, snapshot,
and delete (a stop, then everything the VM held).

The monitor serves the socket (host/monitorctl.py); these are its CLI-side clients.
Like host/lifecycle.py, nothing here imports trio: ``volar vms stop`` starts quickly.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from host.errors import VolarError
from host.rows import Vm
from host.state import LIVE, TERMINAL, Store, process_alive

UP = ("running", "healthy", "unhealthy")
CONTROL_SOCKET = "control.sock"  # in the VM's run dir; host/monitorctl.py serves it
POLL_S = 0.05


def take_snapshot(store: Store, name: str, *, out: str | None,
                  timeout: float = 600) -> tuple[Path, int, float]:
    """Ask the VM's monitor to snapshot it into ``out``; (directory, bytes, seconds)."""
    import socket

    from host.snapshot import META, SnapshotError

    vm = store.vm(name)
    if vm.status not in UP:
        raise VolarError(f"VM {name} is {vm.status}: only a running VM can be snapshotted")
    directory = (Path(out) if out else store.dir / "snapshots" / name).resolve()
    if (directory / META).exists():
        raise SnapshotError(f"{directory} already holds a snapshot; choose another --out")
    made = not directory.exists()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    reply = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(Path(vm.run_dir) / CONTROL_SOCKET))
            s.sendall(f"snapshot {directory}\n".encode())
            while chunk := s.recv(4096):
                reply += chunk
    except OSError as exc:
        reply = f"error VM {name}: its monitor did not answer ({exc})".encode()
    text = reply.decode(errors="replace").strip()
    if not text.startswith("ok "):
        if made and not any(directory.iterdir()):
            directory.rmdir()  # nothing half-made is left behind
        raise SnapshotError(text.removeprefix("error ") or f"VM {name}: no answer from its "
                            "monitor")
    size, seconds = text.split()[1:3]
    return directory, int(size), float(seconds)


def stop(store: Store, name: str, *, grace: float, timeout: float | None = None) -> Vm:
    """Ask the monitor to stop the VM and wait until it records a final status."""
    from host.adopt import reconcile

    vm = store.vm(name)
    if vm.status in TERMINAL:
        return vm
    import socket

    limit = timeout if timeout is not None else grace + 60
    path = Path(vm.run_dir) / CONTROL_SOCKET
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(limit)
            s.connect(str(path))
            s.sendall(f"stop {grace:g}\n".encode())
            while s.recv(64):  # "ok" then EOF, or EOF when the monitor ends
                pass
    except OSError:
        # No control socket (the monitor is still starting, or it is gone):
        # SIGTERM asks the same thing.
        if process_alive(vm.monitor_pid, vm.monitor_start):
            os.kill(vm.monitor_pid, 15)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        reconcile(store, [name])  # a monitor that dies meanwhile is noticed
        vm = store.vm(name)
        if vm.status in TERMINAL:
            return vm
        time.sleep(POLL_S)
    raise VolarError(f"VM {name} did not stop within {limit:g} s (status {vm.status})")


def delete(store: Store, name: str) -> None:
    from host import ipam

    vm = store.vm(name)
    if vm.status in LIVE:
        vm = stop(store, name, grace=float(vm.stop_grace))
    # The monitor writes the final status, then needs a moment to exit.
    deadline = time.monotonic() + 10
    while process_alive(vm.monitor_pid, vm.monitor_start):
        if time.monotonic() > deadline:
            raise VolarError(f"VM {name}: its monitor (pid {vm.monitor_pid}) is still running")
        time.sleep(POLL_S)
    if process_alive(vm.backend_pid, vm.backend_start):
        os.kill(vm.backend_pid, 9)  # a vsock backend left by a VMM that died with its monitor
    # The run directory holds every socket: control, QMP, vsock, the backend's.
    shutil.rmtree(vm.run_dir, ignore_errors=True)
    if vm.tap:
        from host.bridge import delete_tap

        try:
            delete_tap(vm.tap)
        except RuntimeError as exc:  # VmmError: report it, keep deleting
            print(f"volar: warning: {exc}", file=sys.stderr)
    ipam.release(store, name)
    store.delete_vm(name)
