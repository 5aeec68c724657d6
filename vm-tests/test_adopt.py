"""The VM outlives its monitor: a monitor killed with -9 is replaced, nothing is lost.

Through volar as a user runs it, over real vsock (QEMU's vhost-user-vsock
device, vhost-device-vsock): the next command adopts the running QEMU, and
kestrel comes back to the new monitor's listener and replays what the
store lacks. (A killed vsock backend, a missing or broken backend binary
and stale sockets are vm-tests/test_vsock.py's.)
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from harness import volar, volar_json

from host.kernel import KernelInfo
from host.state import proc_start_time, process_alive
from host.vsock import find_backend, in_ci

BOOT_S = 150
LINES = 1500
# kestrel drops its silent connection after 16 s (kestrel.protocol.KEEPALIVE_MISSES
# x host.session.KEEPALIVE_S), then reconnects: well inside this.
BACK_S = 120


@pytest.fixture(scope="module")
def backend() -> Path:
    found = find_backend()
    if found is None:
        if in_ci():
            pytest.fail("CI=true: vhost-device-vsock must be installed (make vhost-device-vsock)")
        pytest.skip(reason="vhost-device-vsock not found ($KESTREL_VHOST_VSOCK, PATH, .cache)")
    return found


@pytest.fixture
def state(kestrel_image: Path, run_dir: Path) -> Path:
    """A plugin whose workload writes numbered lines with its pid, then stays up."""
    data = kestrel_image.read_bytes()
    (run_dir / "plugin.cpio.gz").write_bytes(data)
    script = (f'i=0; while [ $i -lt {LINES} ]; do i=$((i+1)); echo "$$ line $i"; '
              "sleep 0.02; done; exec sleep 100000")
    manifest: dict[str, Any] = {
        "schema_version": "1.0", "name": "counter", "version": "0.1.0", "runtime": "busybox",
        "initramfs": {"url": "../plugin.cpio.gz", "checksum": hashlib.sha256(data).hexdigest()},
        "resources": {"cpu_cores": 1, "memory_mb": 256},
        "workload": {"type": "exec", "workdir": "/", "entrypoint": ["/bin/sh", "-c", script]},
    }
    path = run_dir / "manifest" / "counter.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest))
    state = run_dir / "state"
    done = volar(state, "plugins", "install", "--manifest", str(path))
    assert done.returncode == 0, done.stderr
    return state


def lines_of(state: Path, name: str) -> list[str]:
    done = volar(state, "vms", "logs", name)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def wait_lines(state: Path, name: str, n: int, *, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(lines := lines_of(state, name)) < n and time.monotonic() < deadline:
        time.sleep(1.0)
    return lines


def events(state: Path, name: str, kind: str) -> list[str]:
    return [e["value"] for e in volar_json(state, "vms", "show", name)["events"]
            if e["kind"] == kind]


def kill_monitor(state: Path, name: str, *, unread: bool = False) -> dict[str, Any]:
    """kill -9 the VM's monitor; ``unread``: stop it first, so that it dies with
    bytes from kestrel unread in its socket (a busy monitor hit by the OOM killer)."""
    vm: dict[str, Any] = volar_json(state, "vms", "show", name)
    start = proc_start_time(vm["monitor_pid"])
    if unread:
        os.kill(vm["monitor_pid"], signal.SIGSTOP)
        time.sleep(2.0)  # the workload writes on; kestrel's frames pile up unread
    os.kill(vm["monitor_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process_alive(vm["monitor_pid"], start):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return vm


def assert_runs_on_under_a_new_monitor(state: Path, name: str, before: dict[str, Any]) -> None:
    after = volar_json(state, "vms", "show", name)
    assert after["status"] == "running", after["detail"]
    assert after["monitor_pid"] not in (0, before["monitor_pid"])
    assert process_alive(after["monitor_pid"], proc_start_time(after["monitor_pid"]))
    # The same QEMU and backend: the guest never noticed anything but a reconnect.
    assert (after["vmm_pid"], after["backend_pid"]) == (before["vmm_pid"], before["backend_pid"])
    assert events(state, name, "monitor")[-2:] == ["gone", "adopted"]
    deadline = time.monotonic() + BACK_S
    while "reattached" not in events(state, name, "agent"):
        assert time.monotonic() < deadline, "kestrel did not come back to the new monitor"
        time.sleep(1.0)


def stop_and_delete(state: Path, name: str) -> None:
    stopped = volar(state, "vms", "stop", name, "--grace", "2", timeout=180)
    deleted = volar(state, "vms", "delete", name, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    assert deleted.returncode == 0, deleted.stderr


def test_a_monitor_killed_mid_stream_is_replaced_and_no_line_is_lost(
    kernel: KernelInfo, backend: Path, state: Path
) -> None:
    name = "adopt-vm"
    created = volar(state, "vms", "create", name, "--plugin", "counter",
                    "--timeout", str(BOOT_S), timeout=BOOT_S + 60)
    assert created.returncode == 0, created.stderr
    try:
        early = wait_lines(state, name, 100, timeout=120)
        assert len(early) >= 100, early[-3:]
        pid = early[0].split()[0]
        before = kill_monitor(state, name, unread=True)  # mid-stream: lines keep coming
        listed = volar_json(state, "vms", "list")
        assert [(v["name"], v["status"]) for v in listed] == [(name, "running")], listed
        assert_runs_on_under_a_new_monitor(state, name, before)
        lines = wait_lines(state, name, LINES, timeout=BACK_S + 120)
        # Every line once, in order, from the same workload process.
        assert lines == [f"{pid} line {i}" for i in range(1, LINES + 1)], (
            [x for x in lines if not x.endswith(f" line {lines.index(x) + 1}")][:3])
        assert not [e for e in volar_json(state, "vms", "show", name)["events"]
                    if e["kind"] == "dropped"]
        # A peer that dies with unread bytes gets the backend's read error, not
        # EOF, and vhost-device-vsock 0.3 then never resets the guest's
        # connection: kestrel noticed the host's silence by itself.
        console = volar(state, "vms", "console", name, "--log").stdout
        assert "host silent for 16 s: reconnecting" in console
    finally:
        stop_and_delete(state, name)


def test_vms_recover_adopts_explicitly_and_the_vm_answers_exec(
    kernel: KernelInfo, backend: Path, state: Path
) -> None:
    name = "recover-vm"
    created = volar(state, "vms", "create", name, "--plugin", "counter",
                    "--timeout", str(BOOT_S), timeout=BOOT_S + 60)
    assert created.returncode == 0, created.stderr
    try:
        pid = wait_lines(state, name, 10, timeout=120)[0].split()[0]
        before = kill_monitor(state, name)
        recovered = volar(state, "vms", "recover", name, timeout=120)
        assert recovered.returncode == 0, recovered.stderr
        new = volar_json(state, "vms", "show", name)["monitor_pid"]
        assert recovered.stdout.strip() == f"VM {name} running under a new monitor (pid {new})"
        assert_runs_on_under_a_new_monitor(state, name, before)
        # The new monitor carries commands into the guest: the workload is the same process.
        ps = volar(state, "vms", "exec", name, "--", "cat", f"/proc/{pid}/comm", timeout=120)
        assert ps.returncode == 0, ps.stderr
        assert ps.stdout.strip() in ("sh", "sleep")  # the loop, or what it exec'd at the end
    finally:
        stop_and_delete(state, name)
