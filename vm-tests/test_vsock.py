"""kestrel over real vsock: QEMU's vhost-user-vsock device, rust-vmm's backend, volar's listener.

Through volar as a user runs it: the channel and the hybrid socket in
``vms show``, a vsock backend killed under a running VM, a missing or
broken backend binary. Through the harness: q35's PCI device, and the
stale sockets a crashed VM leaves behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from harness import boot, volar, volar_json

from host.kernel import KernelInfo
from host.qemu import QemuDriver
from host.state import proc_start_time, process_alive
from host.vsock import BACKEND_SOCKET, find_backend, in_ci
from kestrel.cmdline import build_cmdline
from kestrel.protocol import Log

BOOT_S = 150
VM = "vsock-vm"


@pytest.fixture(scope="module")
def backend() -> Path:
    found = find_backend()
    if found is None:
        if in_ci():
            pytest.fail("CI=true: vhost-device-vsock must be installed (make vhost-device-vsock)")
        pytest.skip(reason="vhost-device-vsock not found ($KESTREL_VHOST_VSOCK, PATH, .cache)")
    return found


def install_plugin(state: Path, image: Path, work: Path) -> None:
    """A plugin whose workload prints numbered lines, then serves /www over HTTP."""
    data = image.read_bytes()
    (work / "plugin.cpio.gz").write_bytes(data)
    manifest: dict[str, Any] = {
        "schema_version": "1.0", "name": "vsocktest", "version": "0.1.0", "runtime": "busybox",
        "initramfs": {"url": "../plugin.cpio.gz", "checksum": hashlib.sha256(data).hexdigest()},
        "resources": {"cpu_cores": 1, "memory_mb": 256},
        "workload": {
            "type": "http", "base_url": "http://127.0.0.1:8080", "workdir": "/",
            "entrypoint": ["/bin/sh", "-c", 'for i in 1 2 3; do echo "vsock line $i"; done; '
                           "exec httpd -f -p 8080 -h /www"],
        },
        "health_check": {"endpoint": "/index.html", "timeout_ms": 2000},
    }
    path = work / "manifest" / "vsocktest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    done = volar(state, "plugins", "install", "--manifest", str(path))
    assert done.returncode == 0, done.stderr


def wait_status(state: Path, name: str, want: tuple[str, ...], *, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        info = volar_json(state, "vms", "show", name)
        if info["status"] in want or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def private_socket(path: Path) -> bool:
    mode = path.stat().st_mode
    return stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_volar_vm_talks_vsock_and_a_killed_backend_crashes_it_with_a_reason(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path, backend: Path
) -> None:
    state = run_dir / "state"
    install_plugin(state, kestrel_image, run_dir)
    created = volar(state, "vms", "create", VM, "--plugin", "vsocktest", "--timeout", str(BOOT_S))
    assert created.returncode == 0, created.stderr
    try:
        info = volar_json(state, "vms", "show", VM)
        assert info["channel"] == "vsock" and info["guest_cid"] >= 3
        uds = Path(info["vsock_socket"])
        run = Path(info["run_dir"])
        # (The backend's vhost-user socket is gone once QEMU connected: it
        # unlinks its listener. tests/test_host_vsock.py checks it is born 0600.)
        for sock in (uds, Path(f"{uds}_9000")):
            assert private_socket(sock), sock
        assert "kestrel.channel=vsock:9000" in info["cmdline"]
        assert "vhost-user-vsock-device" in info["vmm_command"]
        logs = ""
        deadline = time.monotonic() + 60
        while "vsock line 3" not in logs and time.monotonic() < deadline:
            logs = volar(state, "vms", "logs", VM).stdout
            time.sleep(0.5)
        assert "vsock line 1\nvsock line 2\nvsock line 3" in logs

        pid, vmm_pid = info["backend_pid"], info["vmm_pid"]
        vmm_start = proc_start_time(vmm_pid)
        assert pid > 0 and process_alive(pid, proc_start_time(pid))
        os.kill(pid, signal.SIGKILL)
        info = wait_status(state, VM, ("stopped", "crashed", "failed"), timeout=60)
        assert info["status"] == "crashed", info["detail"]
        assert "vhost-device-vsock" in info["detail"]
        assert "killed by signal 9" in info["detail"]
        assert not process_alive(vmm_pid, vmm_start), "QEMU must not outlive its backend"
    finally:
        volar(state, "vms", "stop", VM, timeout=120)
        deleted = volar(state, "vms", "delete", VM, timeout=120)
    assert deleted.returncode == 0, deleted.stderr
    assert not run.exists()  # every socket with it


def test_serial_channel_is_still_a_choice(kernel: KernelInfo, kestrel_image: Path,
                                          run_dir: Path) -> None:
    state = run_dir / "state"
    install_plugin(state, kestrel_image, run_dir)
    created = volar(state, "vms", "create", VM, "--plugin", "vsocktest", "--channel", "serial",
                    "--timeout", str(BOOT_S))
    try:
        assert created.returncode == 0, created.stderr
        info = volar_json(state, "vms", "show", VM)
        assert (info["channel"], info["vsock_socket"]) == ("serial", "")
        assert "virtserialport" in info["vmm_command"]
        stopped = volar(state, "vms", "stop", VM, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert volar_json(state, "vms", "show", VM)["status"] == "stopped"
    finally:
        volar(state, "vms", "delete", VM, timeout=120)


def test_a_missing_backend_binary_is_one_line_and_nothing_is_created(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path
) -> None:
    state = run_dir / "state"
    install_plugin(state, kestrel_image, run_dir)
    done = volar(state, "vms", "create", VM, "--plugin", "vsocktest",
                 env={"KESTREL_VHOST_VSOCK": "/nonexistent/vhost-device-vsock"}, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "KESTREL_VHOST_VSOCK=/nonexistent/vhost-device-vsock" in done.stderr
    assert volar_json(state, "vms", "list") == []


def test_a_broken_backend_binary_fails_the_vm_with_its_output(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path
) -> None:
    state = run_dir / "state"
    install_plugin(state, kestrel_image, run_dir)
    broken = run_dir / "broken-backend"
    broken.write_text("#!/bin/sh\necho 'vhost-device-vsock: pretend failure' >&2\nexit 1\n")
    broken.chmod(0o755)
    try:
        done = volar(state, "vms", "create", VM, "--plugin", "vsocktest",
                     env={"KESTREL_VHOST_VSOCK": str(broken)}, timeout=120)
        assert done.returncode != 0
        first = done.stderr.splitlines()[0]
        assert "exited with status 1 before creating vhost-vsock.sock" in first, first
        assert "pretend failure" in first
        assert volar_json(state, "vms", "show", VM)["status"] == "failed"
    finally:
        volar(state, "vms", "delete", VM, timeout=60)


async def test_stale_sockets_of_a_crashed_vm_do_not_block_the_next_boot(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path, backend: Path
) -> None:
    import trio

    for name in (BACKEND_SOCKET, "vsock.sock", "vsock.sock_9000"):  # bound, never unlinked
        sock = trio.socket.socket(trio.socket.AF_UNIX)
        await sock.bind(str(run_dir / name))
        sock.close()
    m = json.dumps({"schema_version": "1.0", "name": "t", "version": "0.1.0",
                    "initramfs": {"url": "/x"},
                    "workload": {"type": "exec", "entrypoint": ["/bin/echo", "fresh boot"]}})
    line = build_cmdline(manifest_json=m.encode(), channel=QemuDriver().agent_channel())
    async with boot(kernel=kernel.vmlinux, initramfs=kestrel_image, run_dir=run_dir,
                    cmdline=line) as vm:
        assert await vm.wait_exit(timeout=BOOT_S) == 0
    assert b"fresh boot\n" in b"".join(m.data for m in vm.of(Log))


async def test_q35_uses_the_pci_vsock_device(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path, backend: Path
) -> None:
    driver = QemuDriver(machine="q35")
    m = json.dumps({"schema_version": "1.0", "name": "t", "version": "0.1.0",
                    "initramfs": {"url": "/x"},
                    "workload": {"type": "exec", "entrypoint": ["/bin/echo", "over pci"]}})
    line = build_cmdline(manifest_json=m.encode(), channel=driver.agent_channel())
    async with boot(kernel=kernel.vmlinux, initramfs=kestrel_image, run_dir=run_dir,
                    cmdline=line, driver=driver) as vm:
        devices = [a for a in driver.command(vm.spec) if a.startswith("vhost-user-vsock")]
        assert [d.split(",")[0] for d in devices] == ["vhost-user-vsock-pci"]
        assert await vm.wait_exit(timeout=BOOT_S) == 0
    assert b"over pci\n" in b"".join(m.data for m in vm.of(Log))
    assert vm.session.lost == 0

