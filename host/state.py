"""volar's store: one SQLite database (WAL) in the state directory.

Every command and every per-VM monitor opens it; the monitor writes what
the VM does (status history, log records, boot timeline, metrics) and the
commands read the truth from here. A schema_version table and an ordered
list of migrations let an old state directory open under a newer volar.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from host.errors import NotFound, StateError
from host.rows import Event, Plugin, Vm, from_row

# Statuses after which nothing runs any more; a VM in any other status has a
# live monitor, or is reconciled when its monitor is gone (host/adopt.py).
TERMINAL = ("stopped", "crashed", "failed")
LIVE = ("pending", "starting", "running", "healthy", "unhealthy", "stopping")

MIGRATIONS: list[str] = [
    # 1: the first layout.
    """
    CREATE TABLE plugins (
        name TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        runtime TEXT NOT NULL,
        enabled INTEGER NOT NULL,
        strategy TEXT NOT NULL,
        manifest_json TEXT NOT NULL,
        source TEXT NOT NULL,
        artifact_path TEXT NOT NULL,
        artifact_sha256 TEXT NOT NULL,
        installed_at REAL NOT NULL
    );
    CREATE TABLE vms (
        name TEXT PRIMARY KEY,
        plugin TEXT NOT NULL,
        vmm TEXT NOT NULL,
        status TEXT NOT NULL,
        cpus INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL,
        kernel TEXT NOT NULL,
        initramfs TEXT NOT NULL,
        run_dir TEXT NOT NULL,
        address TEXT NOT NULL DEFAULT '',
        ip TEXT NOT NULL DEFAULT '',
        mac TEXT NOT NULL DEFAULT '',
        tap TEXT NOT NULL DEFAULT '',
        host_port INTEGER NOT NULL DEFAULT 0,
        cmdline TEXT NOT NULL DEFAULT '',
        vmm_command TEXT NOT NULL DEFAULT '',
        console_log TEXT NOT NULL DEFAULT '',
        monitor_pid INTEGER NOT NULL DEFAULT 0,
        monitor_start INTEGER NOT NULL DEFAULT 0,
        vmm_pid INTEGER NOT NULL DEFAULT 0,
        vmm_start INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        running_at REAL,
        ended_at REAL,
        detail TEXT NOT NULL DEFAULT '',
        fatal TEXT NOT NULL DEFAULT '',
        health TEXT NOT NULL DEFAULT '',
        exit_json TEXT NOT NULL DEFAULT '',
        boot_json TEXT NOT NULL DEFAULT '{}',
        metrics_json TEXT NOT NULL DEFAULT '{}',
        last_seq INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE vm_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm TEXT NOT NULL,
        time REAL NOT NULL,
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX vm_events_vm ON vm_events (vm, id);
    CREATE TABLE vm_logs (
        vm TEXT NOT NULL,
        seq INTEGER NOT NULL,
        stream TEXT NOT NULL,
        data BLOB NOT NULL,
        time REAL NOT NULL,
        PRIMARY KEY (vm, seq)
    ) WITHOUT ROWID;
    CREATE TABLE ip_allocations (
        ip TEXT PRIMARY KEY,
        vm TEXT NOT NULL UNIQUE,
        mac TEXT NOT NULL,
        allocated_at REAL NOT NULL
    );
    """,
    # 2: the stop grace a user asked for, kept so the monitor can read it.
    "ALTER TABLE vms ADD COLUMN stop_grace REAL NOT NULL DEFAULT 10.0;",
    # 3: how kestrel talks to the host (vsock or serial), each VM's own guest
    # CID, and the vsock backend process (QEMU's vhost-device-vsock).
    """
    ALTER TABLE vms ADD COLUMN channel TEXT NOT NULL DEFAULT '';
    ALTER TABLE vms ADD COLUMN guest_cid INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE vms ADD COLUMN backend_pid INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE vms ADD COLUMN backend_start INTEGER NOT NULL DEFAULT 0;
    UPDATE vms SET channel = CASE vmm WHEN 'qemu' THEN 'serial' ELSE 'vsock' END;
    CREATE UNIQUE INDEX vms_guest_cid ON vms (guest_cid) WHERE guest_cid > 0;
    """,
    # 4: what answers inside the VM (kestrel | none, from the plugin's manifest at
    # create) and whether kestrel was asked for its debug shell.
    """
    ALTER TABLE vms ADD COLUMN agent TEXT NOT NULL DEFAULT 'kestrel';
    ALTER TABLE vms ADD COLUMN debug_shell INTEGER NOT NULL DEFAULT 0;
    """,
    # 5: QEMU's machine ('' = the driver's default) and, for a VM restored from a
    # snapshot, the snapshot directory its monitor restores instead of booting.
    """
    ALTER TABLE vms ADD COLUMN machine TEXT NOT NULL DEFAULT '';
    ALTER TABLE vms ADD COLUMN snapshot TEXT NOT NULL DEFAULT '';
    """,
    # 6: what a VM brings beside its plugin (the containerd shim: one VM per
    # container): its own manifest (the container's process), disks whose
    # writes QEMU discards (the container's rootfs image, shared read-only
    # between VMs) and extra kernel command-line keys (the rootfs device).
    """
    ALTER TABLE vms ADD COLUMN manifest_json TEXT NOT NULL DEFAULT '';
    ALTER TABLE vms ADD COLUMN scratch_disks_json TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE vms ADD COLUMN cmdline_extra_json TEXT NOT NULL DEFAULT '{}';
    """,
]
# linux/vm_sockets.h: CIDs 0-2 are the hypervisor, local and the host.
FIRST_GUEST_CID = 3


def default_state_dir() -> Path:
    env = os.environ.get("VOLAR_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/volar")
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "volar"


def proc_start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot, 0 if it is gone.

    Together with the pid it names one process: a reused pid has a later
    start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] == "Z":
        return 0  # a zombie is as dead as it gets
    return int(fields[19])


def process_alive(pid: int, start: int) -> bool:
    return pid > 0 and start > 0 and proc_start_time(pid) == start


class Store:
    """A connection to the state database; cheap to open, one per process."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(state_dir, 0o700)
            # Created 0600 before SQLite opens it; its -wal/-shm files copy
            # the database file's mode.
            os.close(os.open(state_dir / "state.db", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
            self.db = sqlite3.connect(
                state_dir / "state.db", timeout=10.0, isolation_level=None
            )
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open state directory {state_dir}: {exc}") from None
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    @property
    def vms_dir(self) -> Path:
        return self.dir / "vms"

    @property
    def artifacts_dir(self) -> Path:
        return self.dir / "artifacts"

    def close(self) -> None:
        self.db.close()

    def _current_version(self) -> int:
        exists = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if not exists:
            return 0
        return int(self.db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0)

    def _migrate(self) -> None:
        # The common case reads only: every command opens the store, and a
        # write lock here would queue behind monitors writing log records.
        if self._current_version() == len(MIGRATIONS):
            return
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        try:
            row = self.db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            current = row[0] or 0
            if current > len(MIGRATIONS):
                raise StateError(
                    f"{self.dir / 'state.db'} has schema version {current}, newer than "
                    f"this volar understands ({len(MIGRATIONS)})"
                )
            for version in range(current + 1, len(MIGRATIONS) + 1):
                for stmt in MIGRATIONS[version - 1].split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def schema_version(self) -> int:
        return int(self.db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])

    def transaction(self) -> _Tx:
        return _Tx(self.db)

    # --- plugins -------------------------------------------------------------

    def plugin(self, name: str) -> Plugin:
        row = self.db.execute("SELECT * FROM plugins WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"unknown plugin {name!r} (see `volar plugins list`)")
        return from_row(Plugin, row)

    def plugins(self) -> list[Plugin]:
        return [from_row(Plugin, r) for r in self.db.execute("SELECT * FROM plugins ORDER BY name")]

    # --- VMs -----------------------------------------------------------------
    # Reading is only reading: a VM whose monitor died is what the row says
    # until a command reconciles it (host/adopt.py).

    def vm(self, name: str) -> Vm:
        row = self.db.execute("SELECT * FROM vms WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"unknown VM {name!r} (see `volar vms list`)")
        return from_row(Vm, row)

    def vms(self) -> list[Vm]:
        return [from_row(Vm, r) for r in self.db.execute("SELECT * FROM vms ORDER BY name")]

    def vm_names(self) -> list[str]:
        return [str(r[0]) for r in self.db.execute("SELECT name FROM vms ORDER BY name")]

    def update_vm(self, name: str, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE vms SET {cols} WHERE name = ?", (*fields.values(), name))

    def set_status(self, name: str, status: str, detail: str = "", **fields: Any) -> None:
        """Move a VM to ``status`` and append it to the status history."""
        now = time.time()
        if status in TERMINAL:
            fields.setdefault("ended_at", now)
        if status == "running":
            fields.setdefault("running_at", now)
        with self.transaction():
            self.update_vm(name, status=status, detail=detail, **fields)
            self.add_event(name, "status", status, detail, when=now)

    def add_event(self, vm: str, kind: str, value: str, detail: str = "", *,
                  when: float | None = None) -> None:
        self.db.execute(
            "INSERT INTO vm_events (vm, time, kind, value, detail) VALUES (?, ?, ?, ?, ?)",
            (vm, when or time.time(), kind, value, detail),
        )

    def events(self, vm: str) -> list[Event]:
        return [
            from_row(Event, r)
            for r in self.db.execute("SELECT * FROM vm_events WHERE vm = ? ORDER BY id", (vm,))
        ]

    def add_logs(self, vm: str, records: list[tuple[int, str, bytes, float]]) -> None:
        self.db.executemany(
            "INSERT OR IGNORE INTO vm_logs (vm, seq, stream, data, time) VALUES (?, ?, ?, ?, ?)",
            [(vm, *r) for r in records],
        )

    def logs(self, vm: str, *, after_seq: int = 0, since: float = 0.0
             ) -> Iterator[tuple[int, str, bytes, float]]:
        cur = self.db.execute(
            "SELECT seq, stream, data, time FROM vm_logs WHERE vm = ? AND seq > ? AND time >= ?"
            " ORDER BY seq",
            (vm, after_seq, since),
        )
        for r in cur:
            yield int(r[0]), str(r[1]), bytes(r[2]), float(r[3])

    def allocate_cid(self, name: str) -> int:
        """The lowest guest CID no other VM holds (>= 3), recorded for ``name``."""
        with self.transaction():
            used = {int(r[0]) for r in self.db.execute(
                "SELECT guest_cid FROM vms WHERE guest_cid > 0 AND name != ?", (name,))}
            cid = next(c for c in range(FIRST_GUEST_CID, FIRST_GUEST_CID + len(used) + 1)
                       if c not in used)
            self.update_vm(name, guest_cid=cid)
        return cid

    def delete_vm(self, name: str) -> None:
        with self.transaction():
            for table in ("vm_logs", "vm_events"):
                self.db.execute(f"DELETE FROM {table} WHERE vm = ?", (name,))
            self.db.execute("DELETE FROM ip_allocations WHERE vm = ?", (name,))
            self.db.execute("DELETE FROM vms WHERE name = ?", (name,))


class _Tx:
    """``with store.transaction():`` - one IMMEDIATE transaction (nests flat)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.outer = False

    def __enter__(self) -> None:
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
            self.outer = True

    def __exit__(self, exc_type: object, *_: object) -> None:
        if not self.outer:
            return
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
