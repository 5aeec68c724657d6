"""The store: migrations, re-open, stale monitors, IPAM allocations."""

from __future__ import annotations

import dataclasses
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from host import ipam
from host.adopt import reconcile
from host.errors import StateError
from host.state import MIGRATIONS, Store, proc_start_time


def _add_vm(store: Store, name: str, *, status: str = "running", pid: int = 0,
            start: int = 0) -> None:
    store.db.execute(
        "INSERT INTO vms (name, plugin, vmm, status, cpus, memory_mb, kernel, initramfs, run_dir,"
        " created_at, monitor_pid, monitor_start) VALUES (?, 'p', 'qemu', ?, 1, 512, '/k', '/i',"
        " '/r', ?, ?, ?)", (name, status, time.time(), pid, start))


def test_fresh_dir_gets_every_migration_and_private_mode(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    assert store.schema_version() == len(MIGRATIONS)
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    tables = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"plugins", "vms", "vm_events", "vm_logs", "ip_allocations",
            "schema_version"} <= tables
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopen_keeps_data_and_does_not_migrate_twice(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _add_vm(store, "a")
    store.close()
    again = Store(tmp_path)
    assert [v.name for v in again.vms()] == ["a"]
    rows = again.db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [r[0] for r in rows] == list(range(1, len(MIGRATIONS) + 1))


def test_old_database_is_migrated_forward(tmp_path: Path) -> None:
    # A database made by a volar that knew only the first migration.
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.executescript(MIGRATIONS[0])
    db.execute("INSERT INTO schema_version VALUES (1)")
    db.commit()
    db.close()
    store = Store(tmp_path)
    _add_vm(store, "old")
    assert store.vm("old").stop_grace == 10.0  # column from migration 2


def test_newer_schema_is_refused_with_the_path(tmp_path: Path) -> None:
    Store(tmp_path).db.execute("INSERT INTO schema_version VALUES (999)")
    with pytest.raises(StateError, match="schema version 999"):
        Store(tmp_path)


def test_reading_has_no_side_effects_and_reconcile_says_the_monitor_is_gone(
        tmp_path: Path) -> None:
    store = Store(tmp_path)
    proc = subprocess.Popen(["sleep", "60"])
    start = proc_start_time(proc.pid)
    _add_vm(store, "live", pid=proc.pid, start=start)
    reconcile(store)
    assert store.vm("live").status == "running"
    proc.kill()
    proc.wait()
    assert store.vm("live").status == "running"  # a read changes nothing
    assert [v.status for v in store.vms()] == ["running"]
    reconcile(store, ["live"])
    vm = store.vm("live")
    assert vm.status == "crashed" and "is gone" in vm.detail
    assert [e.value for e in store.events("live")][-1] == "crashed"


def test_reused_pid_is_not_mistaken_for_the_monitor(tmp_path: Path) -> None:
    store = Store(tmp_path)
    proc = subprocess.Popen(["sleep", "60"])
    try:
        # Same pid, different start time: another process got the pid.
        _add_vm(store, "reused", pid=proc.pid, start=proc_start_time(proc.pid) - 1)
        reconcile(store)
        assert store.vm("reused").status == "crashed"
    finally:
        proc.kill()
        proc.wait()


def test_stopped_vm_without_monitor_stays_stopped(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _add_vm(store, "done", status="stopped", pid=999999, start=1)
    reconcile(store)
    assert store.vm("done").status == "stopped"


def test_rows_are_typed_and_frozen(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _add_vm(store, "a")
    vm = store.vm("a")
    assert (vm.cpus, vm.debug_shell, vm.agent, vm.boot) == (1, False, "kestrel", {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        vm.status = "stopped"  # type: ignore[misc]


def test_ipam_allocates_in_numeric_order_and_reuses_released(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ips = [ipam.allocate(store, f"vm{i}")[0] for i in range(12)]
    assert ips[0] == "192.168.127.2"
    assert ips[8] == "192.168.127.10"  # after .9, not after .1 as strings would sort
    assert ipam.allocate(store, "vm3") == (ips[3], ipam.mac_for("vm3", ips[3]))  # idempotent
    ipam.release(store, "vm3")
    assert ipam.allocate(store, "new")[0] == "192.168.127.5"
    assert ipam.allocate(store, "next")[0] == "192.168.127.14"
    store.close()
    again = Store(tmp_path)  # persisted
    row = again.db.execute("SELECT vm FROM ip_allocations WHERE ip = ?", (ips[3],)).fetchone()
    assert row[0] == "new"


def test_mac_follows_volants_rule() -> None:
    import hashlib

    mac = ipam.mac_for("caddy-demo", "192.168.127.2")
    digest = hashlib.sha1(b"caddy-demo|192.168.127.2").digest()
    assert mac == "02:" + ":".join(f"{b:02x}" for b in digest[:5])


def test_tap_names_fit_ifnamsiz_and_stay_distinct() -> None:
    assert ipam.tap_name("web") == "vttap-web"
    a, b = ipam.tap_name("caddy-demo-1"), ipam.tap_name("caddy-demo-2")
    assert len(a) <= 15 and len(b) <= 15 and a != b
    assert a.startswith("vttap-")


def test_exhausted_subnet_is_an_error(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.transaction():
        for i in range(2, 255):
            store.db.execute("INSERT INTO ip_allocations VALUES (?, ?, 'm', 0)",
                             (f"192.168.127.{i}", f"v{i}"))
    with pytest.raises(ipam.AddressesExhausted):
        ipam.allocate(store, "one-too-many")
