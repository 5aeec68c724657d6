"""The store's rows as typed, frozen values: what commands and monitors read.

One class per table (vms, plugins, vm_events), built from a sqlite3.Row by
field name: a column a migration adds needs a field here, and mypy checks
every use. Reading a row never changes anything (host/adopt.py reconciles
with processes that died, when a command asks it to).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def from_row(cls: type[T], row: sqlite3.Row | dict[str, Any]) -> T:
    """``cls`` from the columns it names; SQLite's 0/1 become bools where the field says so."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        value = row[f.name]
        values[f.name] = bool(value) if f.type == "bool" else value
    return cls(**values)


@dataclass(frozen=True, slots=True)
class Plugin:
    name: str
    version: str
    runtime: str
    enabled: bool
    strategy: str
    manifest_json: str
    source: str
    artifact_path: str
    artifact_sha256: str
    installed_at: float


@dataclass(frozen=True, slots=True)
class Event:
    """One line of a VM's history: a status, a health change, a timeline mark..."""

    time: float
    kind: str
    value: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Vm:
    """One row of ``vms``; the defaults are the schema's (tests build partial rows)."""

    name: str
    plugin: str = ""
    vmm: str = "qemu"
    status: str = "pending"
    cpus: int = 1
    memory_mb: int = 512
    kernel: str = ""
    initramfs: str = ""
    run_dir: str = ""
    address: str = ""
    ip: str = ""
    mac: str = ""
    tap: str = ""
    host_port: int = 0
    cmdline: str = ""
    vmm_command: str = ""
    console_log: str = ""
    monitor_pid: int = 0
    monitor_start: int = 0
    vmm_pid: int = 0
    vmm_start: int = 0
    created_at: float = 0.0
    running_at: float | None = None
    ended_at: float | None = None
    detail: str = ""
    fatal: str = ""
    health: str = ""
    exit_json: str = ""
    boot_json: str = "{}"
    metrics_json: str = "{}"
    last_seq: int = 0
    stop_grace: float = 10.0
    channel: str = ""
    guest_cid: int = 0
    backend_pid: int = 0
    backend_start: int = 0
    # What answers inside the VM: "kestrel", or "none" for an image without an
    # agent (custom/none init): nothing there speaks the protocol (no exec, no logs).
    agent: str = "kestrel"
    debug_shell: bool = False
    # QEMU's -M ("" = the driver's default); the snapshot directory a restored VM came from.
    machine: str = ""
    snapshot: str = ""
    # A VM's own manifest (the containerd shim's container), else its plugin's;
    # disks QEMU opens with snapshot=on; extra kernel command-line keys.
    manifest_json: str = ""
    scratch_disks_json: str = "[]"
    cmdline_extra_json: str = "{}"

    @property
    def uptime(self) -> float | None:
        if self.running_at is None:
            return None
        end = float(self.ended_at or time.time())
        return max(0.0, end - float(self.running_at))

    @property
    def boot(self) -> dict[str, Any]:
        return dict(json.loads(self.boot_json or "{}"))

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(json.loads(self.metrics_json or "{}"))
