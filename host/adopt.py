"""Reconciling the store with processes that died: an explicit step, never a read.

A VM in a live status belongs to its monitor. When that monitor is gone,
the commands that act on the truth (list, show, stop, ...) call
``reconcile``. A VMM that still runs is adopted: a fresh monitor
(``python -m host.monitor --adopt``) takes it over, reconnects QMP and the
agent listener, and kestrel's replay makes the gap lossless. Only what
cannot be adopted is killed, and the VM's detail says why. Nothing here
imports trio: listing stays quick.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from host.errors import VolarError
from host.lifecycle import MONITOR_LOG, spawn_monitor
from host.state import LIVE, TERMINAL, Store, proc_start_time, process_alive
from host.vmcontrol import CONTROL_SOCKET

# A VM in one of these has a VMM to take over; "pending" has none yet.
ADOPTABLE = ("starting", "running", "healthy", "unhealthy", "stopping")
# How long a command waits for the adopting monitor to answer on its control
# socket (a Python start-up and a QMP round trip on a loaded host).
READY_S = 30.0
POLL_S = 0.05


def reconcile(store: Store, names: list[str] | None = None) -> dict[str, str]:
    """Settle every VM in ``names`` (default: all) whose monitor is gone.

    Returns what happened to each VM that needed it, in words.
    """
    done: dict[str, str] = {}
    for name in store.vm_names() if names is None else names:
        what = _reconcile_one(store, name)
        if what:
            done[name] = what
    return done


def recover(store: Store, name: str) -> str:
    """``volar vms recover NAME``: adopt now, or say why there is nothing to do."""
    vm = store.vm(name)
    if vm.status in TERMINAL:
        raise VolarError(f"VM {name} is {vm.status}: nothing runs to recover "
                         f"(`volar vms show {name}` says why)")
    if process_alive(vm.monitor_pid, vm.monitor_start):
        return f"VM {name}: its monitor (pid {vm.monitor_pid}) is running; nothing to recover"
    _reconcile_one(store, name)
    vm = store.vm(name)
    if vm.status in TERMINAL:
        raise VolarError(f"VM {name} could not be recovered: {vm.detail}")
    return f"VM {name} {vm.status} under a new monitor (pid {vm.monitor_pid})"


def _reconcile_one(store: Store, name: str) -> str:
    vm = store.vm(name)
    if vm.status not in LIVE or vm.monitor_pid == 0:
        return ""
    if process_alive(vm.monitor_pid, vm.monitor_start):
        return ""
    # Decide inside the write lock: the monitor may have written a final status
    # just before exiting, or another command is adopting the VM right now
    # (it records its new monitor before it lets go of the lock).
    with store.transaction():
        vm = store.vm(name)
        if vm.status not in LIVE or process_alive(vm.monitor_pid, vm.monitor_start):
            return ""
        gone = f"monitor process {vm.monitor_pid} is gone"
        if vm.status not in ADOPTABLE or not process_alive(vm.vmm_pid, vm.vmm_start):
            return _bury(store, name, gone + "; its VMM is gone too" + _log_tail(vm.run_dir))
        proc = spawn_monitor(store, vm, adopt=True)
        store.add_event(name, "monitor", "gone", f"{gone}; monitor {proc.pid} adopts its VMM")
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if _answers(Path(vm.run_dir) / CONTROL_SOCKET):
            return f"adopted by monitor {proc.pid}"
        if proc.poll() is not None:
            now = store.vm(name)
            if now.status in TERMINAL:  # it said why (the VMM could not be adopted)
                return f"{now.status}: {now.detail}"
            return _bury(store, name, f"the monitor adopting it (pid {proc.pid}) exited with "
                         f"{proc.returncode}" + _log_tail(vm.run_dir))
        time.sleep(POLL_S)
    return f"monitor {proc.pid} is still adopting it"


def _bury(store: Store, name: str, why: str) -> str:
    """Crashed with ``why``; what the monitor left running is killed."""
    with store.transaction():
        vm = store.vm(name)
        if vm.status not in LIVE:
            return ""
        detail = why
        if _kill(vm.vmm_pid, vm.vmm_start):
            detail += f"; killed its VMM (pid {vm.vmm_pid})"
        # The vsock backend serves the next VMM forever: it goes with its VMM.
        _kill(vm.backend_pid, vm.backend_start)
        store.set_status(name, "crashed", detail, vmm_pid=0, backend_pid=0)
    return f"crashed: {detail}"


def _kill(pid: int, start: int) -> bool:
    """SIGKILL the process recorded as (pid, start), never a pid's next owner."""
    if pid <= 0 or start <= 0:
        return False
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if proc_start_time(pid) != start:
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def _answers(control: Path) -> bool:
    """The monitor is serving its control socket: adopted, and ready for commands."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5.0)
            s.connect(str(control))
            s.sendall(b"ping\n")
            return s.recv(16).startswith(b"ok")
    except OSError:
        return False


def _log_tail(run_dir: str, lines: int = 5) -> str:
    """The end of the monitor's own log: why it died, when it had time to say."""
    try:
        text = (Path(run_dir) / MONITOR_LOG).read_text(errors="replace").strip()
    except OSError:
        return ""
    tail = text.splitlines()[-lines:]
    return "; monitor.log ends:" + "".join(f"\n{line}" for line in tail) if tail else ""
