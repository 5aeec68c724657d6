"""VM lifecycle for the CLI: create (spawn a monitor, wait for hello); stop, snapshot
and delete are in host/vmcontrol.py.

Commands never own a VM: they record it, start its detached monitor
(``python -m host.monitor``) and read what the monitor writes. Nothing here
imports trio, so ``volar vms list`` and friends stay quick to start.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from host.errors import AlreadyExists, BootFailed, MissingKernel, NotFound, VolarError
from host.names import NAME_RULE, valid_name
from host.rows import Vm
from host.state import TERMINAL, Store, proc_start_time
from host.vmcontrol import POLL_S, UP, stop
from kestrel.layout import kernel_dir

if TYPE_CHECKING:
    import subprocess

    from host.snapshot import SnapshotMeta

VMMS = ("qemu", "cloud-hypervisor")
MONITOR_LOG = "monitor.log"  # in the VM's run dir: the monitor's stdout and stderr
MONITOR_LOCK = "monitor.lock"  # flock(2)ed by the one monitor that owns the VM


def load_config(store: Store) -> dict[str, Any]:
    path = store.dir / "config.json"
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise VolarError(f"{path}: not valid JSON ({exc})") from None


def resolve_kernel(store: Store, requested: str | None) -> Path:
    """--kernel, else config.json's "kernel", else the fetched kernel's vmlinux."""
    if requested:
        path, origin = Path(requested), "--kernel"
    elif load_config(store).get("kernel"):
        path, origin = Path(load_config(store)["kernel"]), f"{store.dir / 'config.json'}"
    else:
        path = kernel_dir() / "current" / "vmlinux"
        if not path.is_file():
            raise MissingKernel(
                f"no kernel at {path}: run `volar kernel fetch` or pass --kernel PATH"
            )
        return path.resolve()
    if not path.is_file():
        raise MissingKernel(f"kernel {path} (from {origin}) does not exist or is not a file")
    return path.resolve()


def spawn_monitor(store: Store, vm: Vm, *, boot_timeout: float | None = None,
                  adopt: bool = False) -> subprocess.Popen[bytes]:
    """Start ``vm``'s detached monitor: to launch it, or (``adopt``) to take over its VMM."""
    import subprocess

    run_dir = Path(vm.run_dir)
    log = open(run_dir / MONITOR_LOG, "ab")  # noqa: SIM115 - handed to the child
    with log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "host.monitor", str(store.dir), vm.name,
             *(["--boot-timeout", str(boot_timeout)] if boot_timeout is not None else []),
             *(["--adopt"] if adopt else [])],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command and its terminal
            close_fds=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": _package_root()},
        )
    # Recorded before the monitor writes its own: a monitor that dies before
    # it gets that far is still detected as gone.
    store.update_vm(vm.name, monitor_pid=proc.pid, monitor_start=proc_start_time(proc.pid))
    return proc


def _package_root() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    old = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{old}" if old else root


def create(
    store: Store,
    name: str,
    *,
    plugin: str,
    cpu: int | None,
    memory: int | None,
    kernel: str | None,
    vmm: str | None,
    port: int,
    boot_timeout: float,
    say: Callable[[str], None],
    channel: str | None = None,
    debug_shell: bool = False,
    network: str | None = None,
    machine: str | None = None,
    from_snapshot: str | None = None,
) -> Vm:
    from host import ipam
    from host.plugins import manifest_of

    if not valid_name(name):
        raise VolarError(f"invalid VM name {name!r}: {NAME_RULE}")
    snap = None
    if from_snapshot is not None:
        snap = _restorable(store, Path(from_snapshot), plugin=plugin, vmm=vmm, kernel=kernel,
                           network=network)
        plugin, vmm, channel, machine = snap.plugin, snap.vmm, snap.channel, snap.machine
        cpu, memory, debug_shell = snap.cpus, snap.memory_mb, snap.debug_shell
    if not plugin:
        raise VolarError("vms create: --plugin NAME, or --from-snapshot DIR")
    if machine not in (None, "", "microvm", "q35"):
        raise VolarError(f"--machine {machine}: expected microvm or q35")
    vmm = vmm or str(load_config(store).get("vmm", "qemu"))
    if vmm not in VMMS and ":" not in vmm:
        raise VolarError(f"unknown VMM {vmm!r}: expected one of {', '.join(VMMS)}")
    # Before anything is looked up or recorded: a network mode that cannot work
    # here (not root) is the first thing to fix.
    bridged = _bridged(vmm, network)
    row = store.plugin(plugin)
    if not row.enabled:
        raise VolarError(f"plugin {plugin!r} is disabled (`volar plugins enable {plugin}`)")
    if row.strategy != "initramfs":
        raise VolarError(f"plugin {plugin!r} uses the {row.strategy} strategy; "
                         "volar boots initramfs plugins only")
    manifest = manifest_of(row)
    if store.db.execute("SELECT 1 FROM vms WHERE name = ?", (name,)).fetchone():
        raise AlreadyExists(f"a VM named {name!r} already exists (`volar vms delete {name}`)")
    kernel_path = resolve_kernel(store, kernel)
    if not Path(row.artifact_path).is_file():
        raise VolarError(f"plugin {plugin!r}: its initramfs {row.artifact_path} is missing; "
                         "reinstall the plugin")
    if vmm == "cloud-hypervisor" and shutil.which("cloud-hypervisor") is None:
        raise VolarError("cloud-hypervisor is not installed (no `cloud-hypervisor` on PATH)")
    if not 0 <= port <= 65535:
        raise VolarError(f"--port {port}: must be 0..65535")
    if bridged and port:
        raise VolarError(f"--port {port}: a bridged VM is reached at its own address on the "
                         "bridge, not through a host port")
    channel = _channel(vmm, channel, say)
    if debug_shell and manifest.agent == "none":
        raise VolarError(f"--debug-shell: plugin {plugin!r} has no kestrel (agent: none); "
                         f"its serial console is already the way in (`volar vms console {name}`)")
    cpus = cpu or manifest.resources.cpu_cores
    mem = memory or manifest.resources.memory_mb
    if cpus < 1 or mem < 64:
        raise VolarError(f"--cpu must be >= 1 and --memory >= 64 (got {cpus}, {mem})")
    run_dir = store.vms_dir / name
    say(f"Creating VM {name}...")
    try:
        with store.transaction():
            store.db.execute(
                "INSERT INTO vms (name, plugin, vmm, status, cpus, memory_mb, kernel, initramfs,"
                " run_dir, host_port, created_at, channel, agent, debug_shell, machine,"
                " snapshot, last_seq)"
                " VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, plugin, vmm, cpus, mem, str(kernel_path), row.artifact_path,
                 str(run_dir), port, time.time(), channel, manifest.agent, int(debug_shell),
                 machine or "", str(Path(from_snapshot).resolve()) if from_snapshot else "",
                 snap.last_seq if snap else 0),
            )
            store.add_event(name, "status", "pending", "created")
            store.allocate_cid(name)
            if bridged:
                ip, mac = ipam.allocate(store, name)
                store.update_vm(name, ip=ip, mac=mac, tap=ipam.tap_name(name))
                say(f"Allocating IP: {ip}")
    except sqlite3.IntegrityError as exc:
        # Another create of the same name won the race since the check above.
        if exc.sqlite_errorname != "SQLITE_CONSTRAINT_PRIMARYKEY":
            raise
        raise AlreadyExists(f"a VM named {name!r} already exists") from None
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(mode=0o700, parents=True)
    say(f"Restoring VM from snapshot {from_snapshot}..." if snap
        else f"Booting VM with {row.strategy} strategy...")
    vm = store.vm(name)
    proc = spawn_monitor(store, vm, boot_timeout=boot_timeout)
    vm = wait_for_boot(store, name, proc, timeout=boot_timeout + 15)
    where = f"IP {vm.ip}" if vm.ip else f"address {vm.address or '(none published)'}"
    say(f"VM {name} created with {where}")
    if manifest.agent == "none":
        say(f"Agent: none (the image has no kestrel): `volar vms console {name}` is the way in")
    elif debug_shell:
        say(f"Debug shell: unauthenticated root on the serial console (`volar vms console {name}`)")
    return vm


def _restorable(store: Store, directory: Path, *, plugin: str, vmm: str | None,
                kernel: str | None, network: str | None) -> SnapshotMeta:
    """The snapshot at ``directory``, checked against this host; SnapshotError if not."""
    from host import snapshot

    meta = snapshot.load(directory)
    if plugin and plugin != meta.plugin:
        raise VolarError(f"--plugin {plugin}: snapshot {directory} is of plugin {meta.plugin!r}")
    if vmm and vmm != meta.vmm:
        raise VolarError(f"--vmm {vmm}: snapshot {directory} was taken under {meta.vmm}")
    if network == "bridge":
        raise VolarError("--network bridge: a restored VM would carry the snapshot's MAC and "
                         "address onto the shared bridge; restores use user networking")
    try:
        plugin_sha: str | None = store.plugin(meta.plugin).artifact_sha256
    except NotFound:
        plugin_sha = None
    kernel_path = resolve_kernel(store, kernel)
    binary = "qemu-system-x86_64" if meta.vmm == "qemu" else meta.vmm
    snapshot.check_restorable(meta, directory, plugin_sha256=plugin_sha,
                              kernel_sha256=snapshot.kernel_digest(kernel_path, meta),
                              vmm_version=snapshot.vmm_version(binary))
    return meta



def launch_with_manifest(
    store: Store,
    name: str,
    *,
    manifest_json: str,
    initramfs: Path,
    cpus: int,
    memory_mb: int,
    scratch_disks: tuple[Path, ...] = (),
    cmdline_extra: dict[str, str] | None = None,
    boot_timeout: float,
) -> subprocess.Popen[bytes]:
    """A VM that carries its own manifest, not a plugin's (the containerd shim's
    container), on QEMU with user networking: recorded and its monitor started;
    the caller watches the store."""
    if not valid_name(name):
        raise VolarError(f"invalid VM name {name!r}: {NAME_RULE}")
    kernel_path = resolve_kernel(store, None)
    if not initramfs.is_file():
        raise VolarError(f"initramfs {initramfs} does not exist or is not a file")
    channel = _channel("qemu", None, lambda _line: None)
    run_dir = store.vms_dir / name
    columns: dict[str, Any] = dict(
        name=name, plugin="", vmm="qemu", status="pending", cpus=cpus, memory_mb=memory_mb,
        kernel=str(kernel_path), initramfs=str(initramfs), run_dir=str(run_dir),
        created_at=time.time(), channel=channel, manifest_json=manifest_json,
        scratch_disks_json=json.dumps([str(d) for d in scratch_disks]),
        cmdline_extra_json=json.dumps(cmdline_extra or {}))
    try:
        with store.transaction():
            store.db.execute(
                f"INSERT INTO vms ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                tuple(columns.values()),
            )
            store.add_event(name, "status", "pending", "created")
            store.allocate_cid(name)
    except sqlite3.IntegrityError as exc:
        if exc.sqlite_errorname != "SQLITE_CONSTRAINT_PRIMARYKEY":
            raise
        raise AlreadyExists(f"a VM named {name!r} already exists") from None
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(mode=0o700, parents=True)
    return spawn_monitor(store, store.vm(name), boot_timeout=boot_timeout)


def _bridged(vmm: str, requested: str | None) -> bool:
    """user (QEMU's default: a 127.0.0.1 port) or bridge (a tap on vbr0, a pool address)."""
    if requested not in (None, "user", "bridge"):
        raise VolarError(f"--network {requested}: expected user or bridge")
    if vmm == "cloud-hypervisor":
        if requested == "user":
            raise VolarError("--network user: cloud-hypervisor has no user-mode networking; "
                             "its VMs always get a tap on the bridge")
        requested = "bridge"
    if requested != "bridge":
        return False
    from host.bridge import check_bridge_possible

    check_bridge_possible()
    return True


def _channel(vmm: str, requested: str | None, say: Callable[[str], None]) -> str:
    """vsock unless asked otherwise; QEMU without vhost-device-vsock falls back to serial."""
    if requested not in (None, "vsock", "serial"):
        raise VolarError(f"--channel {requested}: expected vsock or serial")
    if vmm == "cloud-hypervisor":
        if requested == "serial":
            raise VolarError("--channel serial: cloud-hypervisor has no virtio-serial port; "
                             "it talks vsock only")
        return "vsock"
    if vmm != "qemu":
        return requested or ""  # a custom driver chooses its own channel
    if requested == "serial":
        return "serial"
    from host.vmm import VmmError
    from host.vsock import default_channel, require_backend

    try:
        if requested == "vsock":
            require_backend()
            return "vsock"
        chosen, why = default_channel()
    except VmmError as exc:
        raise VolarError(str(exc)) from None
    if why:
        say(f"volar: {why}")
    return chosen


def wait_for_boot(store: Store, name: str, proc: subprocess.Popen[bytes], *,
                  timeout: float) -> Vm:
    from host.adopt import reconcile

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            # Gone before a final status: adopted if its VMM runs, else crashed
            # with the end of its log. Either way the store says what is true.
            reconcile(store, [name])
        vm = store.vm(name)
        if vm.status in UP:
            return vm
        if vm.status in TERMINAL:
            proc.wait()
            raise BootFailed(_failure(vm))
        if time.monotonic() > deadline:
            stop(store, name, grace=0)
            raise BootFailed(f"VM {name} did not boot within {timeout:g} s; stopped it. "
                             f"See `volar vms console {name}`")
        time.sleep(POLL_S)


def _failure(vm: Vm) -> str:
    why = vm.fatal or vm.detail or vm.status
    why = why.replace("\n", "\n  ")
    return (f"VM {vm.name} {vm.status}: {why}\n"
            f"  (`volar vms show {vm.name}` for its history, `volar vms delete {vm.name}` "
            "to remove it)")


