"""Reconciling the store with processes that died: an explicit step, never a read.

A VM in a live status belongs to its monitor. When that monitor is gone,
the commands that mean to act on the truth (list, show, stop, ...) call
``reconcile``: the VM is declared crashed with the reason, and what its
monitor left running is killed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from host.lifecycle import MONITOR_LOG
from host.state import LIVE, Store, process_alive


def reconcile(store: Store, names: list[str] | None = None) -> None:
    """Settle every VM in ``names`` (default: all) whose monitor is gone."""
    for name in store.vm_names() if names is None else names:
        _reconcile_one(store, name)


def _reconcile_one(store: Store, name: str) -> None:
    vm = store.vm(name)
    if vm.status not in LIVE or vm.monitor_pid == 0:
        return
    if process_alive(vm.monitor_pid, vm.monitor_start):
        return
    # Re-read inside the write lock: the monitor may have written a final
    # status just before exiting, or another command settled it meanwhile.
    with store.transaction():
        vm = store.vm(name)
        if vm.status not in LIVE or process_alive(vm.monitor_pid, vm.monitor_start):
            return
        detail = f"monitor process {vm.monitor_pid} is gone" + _log_tail(vm.run_dir)
        if process_alive(vm.vmm_pid, vm.vmm_start):
            # Nobody owns the VMM any more: it would run unobserved forever.
            os.kill(vm.vmm_pid, signal.SIGKILL)
            detail += f"; killed its orphaned VMM (pid {vm.vmm_pid})"
        if process_alive(vm.backend_pid, vm.backend_start):
            # The vsock backend serves the next VMM forever: it goes with its VMM.
            os.kill(vm.backend_pid, signal.SIGKILL)
        now = time.time()
        store.update_vm(name, status="crashed", detail=detail, ended_at=now)
        store.add_event(name, "status", "crashed", detail, when=now)


def _log_tail(run_dir: str, lines: int = 5) -> str:
    """The end of the monitor's own log: why it died, when it had time to say."""
    try:
        text = (Path(run_dir) / MONITOR_LOG).read_text(errors="replace").strip()
    except OSError:
        return ""
    tail = text.splitlines()[-lines:]
    return "; monitor.log ends:" + "".join(f"\n{line}" for line in tail) if tail else ""
