"""volar vms: create/list/show/logs/stats/stop/delete through real monitors.

The "VMM" is tests/host_fakevmm.py: a host process that runs the manifest's
entrypoint and speaks the real kestrel protocol (GuestSession); the monitor,
the store and the CLI are the real ones.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from host.state import Store, proc_start_time
from tests import host_helpers
from tests.host_helpers import FAKE_VMM, Volar, write_plugin

volar = host_helpers.volar  # fixtures
kernel = host_helpers.kernel


@pytest.fixture
def installed(volar: Volar, tmp_path: Path) -> Volar:
    volar.ok("plugins", "install", "--manifest", str(write_plugin(tmp_path / "p", entrypoint=[
        "/bin/sh", "-c", "for i in 1 2 3; do echo out$i; echo err$i >&2; done; exec sleep 600",
    ])))
    return volar


def _create(volar: Volar, kernel: Path, name: str = "caddy-demo", *extra: str) -> str:
    return volar.ok("vms", "create", name, "--plugin", "caddy", "--kernel", str(kernel),
                    "--vmm", FAKE_VMM, "--timeout", "30", *extra)


def _wait_logs(volar: Volar, name: str, want: int) -> list[str]:
    deadline = time.monotonic() + 20
    while True:
        r = volar("vms", "logs", name)
        lines = (r.out + r.err).split()
        if len(lines) >= want or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_create_prints_like_the_quick_start_and_lists(
    installed: Volar, kernel: Path
) -> None:
    out = _create(installed, kernel)
    try:
        assert out.splitlines()[:2] == ["Creating VM caddy-demo...",
                                        "Booting VM with initramfs strategy..."]
        assert out.splitlines()[2].startswith("VM caddy-demo created with address 127.0.0.1:")
        lines = installed.ok("vms", "list").splitlines()
        assert lines[0].split() == ["NAME", "PLUGIN", "ADDRESS", "STATE", "CPU", "MEM", "UPTIME"]
        row = lines[1].split()
        assert row[0:2] == ["caddy-demo", "caddy"] and row[4:6] == ["1", "512MB"]
        assert row[3] in ("running", "healthy")
        listed = installed.json("vms", "list")
        assert listed[0]["name"] == "caddy-demo" and listed[0]["cpus"] == 1
    finally:
        installed.ok("vms", "delete", "caddy-demo")


def test_logs_arrive_in_order_per_stream(installed: Volar, kernel: Path) -> None:
    _create(installed, kernel)
    try:
        _wait_logs(installed, "caddy-demo", 6)
        r = installed("vms", "logs", "caddy-demo")
        assert r.out.split() == ["out1", "out2", "out3"]
        assert r.err.split() == ["err1", "err2", "err3"]
        # --since in the future: nothing yet
        assert installed("vms", "logs", "caddy-demo", "--since", str(time.time() + 60)).out == ""
    finally:
        installed.ok("vms", "delete", "caddy-demo")


def test_show_and_stats_carry_history_timeline_and_health(installed: Volar,
                                                          kernel: Path) -> None:
    _create(installed, kernel)
    try:
        deadline = time.monotonic() + 20
        while installed.json("vms", "show", "caddy-demo")["status"] != "healthy":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        show = installed.json("vms", "show", "caddy-demo")
        statuses = [e["value"] for e in show["events"] if e["kind"] == "status"]
        assert statuses[:3] == ["pending", "starting", "running"]
        assert statuses[-1] == "healthy"
        assert "kestrel_start" in show["boot"]["guest_uptime_s"]
        assert "volant.manifest=H4sI" in show["cmdline"]
        assert "kestrel.hostname=caddy-demo" in show["cmdline"]
        assert Path(show["console_log"]).name == "console.log"
        stats = installed.json("vms", "stats", "caddy-demo")
        assert "hello" in stats["boot"]["host_since_launch_s"]
        text = installed.ok("vms", "stats", "caddy-demo")
        assert "boot timeline:" in text
    finally:
        installed.ok("vms", "delete", "caddy-demo")


def test_stop_powers_off_gracefully_and_delete_cleans_up(installed: Volar,
                                                         kernel: Path) -> None:
    _create(installed, kernel)
    vm = installed.json("vms", "show", "caddy-demo")
    out = installed.ok("vms", "stop", "caddy-demo", "--grace", "2")
    assert out.startswith("VM caddy-demo stopped")
    show = installed.json("vms", "show", "caddy-demo")
    assert show["status"] == "stopped"
    kinds = [(e["kind"], e["value"]) for e in show["events"]]
    # the guest reported the workload's exit and its power-off before the VMM ended
    assert kinds.index(("exit", "143")) < kinds.index(("status", "stopped"))
    assert ("state", "poweroff") in kinds
    assert proc_start_time(vm["vmm_pid"]) == 0
    installed.ok("vms", "delete", "caddy-demo")
    assert not Path(vm["run_dir"]).exists()
    assert installed.json("vms", "list") == []


def test_duplicate_name_is_refused(installed: Volar, kernel: Path) -> None:
    _create(installed, kernel)
    try:
        r = installed("vms", "create", "caddy-demo", "--plugin", "caddy",
                      "--kernel", str(kernel), "--vmm", FAKE_VMM)
        assert r.code != 0 and "already exists" in r.err
    finally:
        installed.ok("vms", "delete", "caddy-demo")


def test_unknown_plugin_and_missing_kernel(installed: Volar, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    r = installed("vms", "create", "x", "--plugin", "nginx")
    assert r.code != 0 and "unknown plugin 'nginx'" in r.err
    r = installed("vms", "create", "x", "--plugin", "caddy", "--kernel", str(tmp_path / "nope"))
    assert r.code != 0 and str(tmp_path / "nope") in r.err
    monkeypatch.setenv("KESTREL_KERNEL_DIR", str(tmp_path / "kernels"))
    r = installed("vms", "create", "x", "--plugin", "caddy")
    assert r.code != 0
    assert str(tmp_path / "kernels" / "current" / "vmlinux") in r.err
    assert "volar kernel fetch" in r.err
    assert installed.json("vms", "list") == []


def test_missing_vmm_binary_fails_clearly(installed: Volar, kernel: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    r = installed("vms", "create", "ch", "--plugin", "caddy", "--kernel", str(kernel),
                  "--vmm", "cloud-hypervisor")
    assert r.code != 0 and "cloud-hypervisor is not installed" in r.err


def test_kestrel_fatal_marks_failed_with_its_message(volar: Volar, tmp_path: Path,
                                                     kernel: Path) -> None:
    volar.ok("plugins", "install", "--manifest", str(write_plugin(
        tmp_path / "p", env={"FAKE_FATAL": "workload.entrypoint: /usr/bin/caddy not found"})))
    r = volar("vms", "create", "bad", "--plugin", "caddy", "--kernel", str(kernel),
              "--vmm", FAKE_VMM, "--timeout", "30")
    # hello came first, so create succeeds; the fatal record follows
    deadline = time.monotonic() + 20
    while (show := volar.json("vms", "show", "bad"))["status"] not in ("failed", "crashed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert r.code == 0 or "failed" in r.err
    assert show["status"] == "failed"
    assert "/usr/bin/caddy not found" in show["fatal"]
    assert "/usr/bin/caddy not found" in volar.ok("vms", "show", "bad")
    volar.ok("vms", "delete", "bad")


def test_vmm_dying_without_poweroff_is_crashed(volar: Volar, tmp_path: Path,
                                              kernel: Path) -> None:
    volar.ok("plugins", "install", "--manifest", str(write_plugin(
        tmp_path / "p", env={"FAKE_CRASH": "1"})))
    r = volar("vms", "create", "boom", "--plugin", "caddy", "--kernel", str(kernel),
              "--vmm", FAKE_VMM, "--timeout", "30")
    assert r.code != 0
    assert "boom crashed" in r.err and "code 3" in r.err
    assert "fake guest: booting" in r.err  # the console tail comes with it
    volar.ok("vms", "delete", "boom")


def _kill_monitor(volar: Volar, name: str) -> dict[str, Any]:
    vm: dict[str, Any] = volar.json("vms", "show", name)
    os.kill(vm["monitor_pid"], signal.SIGKILL)
    _wait_gone(vm["monitor_pid"])
    return vm


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while proc_start_time(pid) != 0:
        assert time.monotonic() < deadline, f"pid {pid} still there"
        time.sleep(0.02)


def _events(volar: Volar, name: str, kind: str) -> list[str]:
    return [e["value"] for e in volar.json("vms", "show", name)["events"] if e["kind"] == kind]


def test_a_killed_monitor_is_replaced_and_the_vm_runs_on(installed: Volar, kernel: Path) -> None:
    _create(installed, kernel)
    _wait_logs(installed, "caddy-demo", 6)
    before = _kill_monitor(installed, "caddy-demo")
    listed = installed.json("vms", "list")[0]  # any command adopts; list is the usual one
    assert listed["status"] == "healthy", listed["detail"]  # as before the kill
    after = installed.json("vms", "show", "caddy-demo")
    assert after["monitor_pid"] not in (0, before["monitor_pid"])
    assert after["vmm_pid"] == before["vmm_pid"]  # the same VMM, its workload untouched
    assert _events(installed, "caddy-demo", "monitor") == ["gone", "adopted"]
    deadline = time.monotonic() + 20
    while "reattached" not in _events(installed, "caddy-demo", "agent"):
        assert time.monotonic() < deadline, "the fake kestrel never came back"
        time.sleep(0.05)
    assert sorted(_wait_logs(installed, "caddy-demo", 6)) == [
        "err1", "err2", "err3", "out1", "out2", "out3"]  # each once: the replay is deduplicated
    stopped = installed.ok("vms", "stop", "caddy-demo", "--grace", "1")
    assert "VM caddy-demo stopped" in stopped
    assert installed.json("vms", "show", "caddy-demo")["exit"] is not None  # kestrel's report
    installed.ok("vms", "delete", "caddy-demo")


def test_two_commands_that_find_a_dead_monitor_at_once_adopt_once(
        installed: Volar, kernel: Path) -> None:
    _create(installed, kernel)
    _kill_monitor(installed, "caddy-demo")
    lists = [subprocess.Popen(
        [sys.executable, "-m", "host.cli", "--state-dir", str(installed.state), "vms", "list"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    for p in lists:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert b"healthy" in out
    assert _events(installed, "caddy-demo", "monitor") == ["gone", "adopted"]
    vm = installed.json("vms", "show", "caddy-demo")
    assert proc_start_time(vm["monitor_pid"]) != 0
    installed.ok("vms", "stop", "caddy-demo", "--grace", "1")
    installed.ok("vms", "delete", "caddy-demo")


def test_vms_recover_adopts_or_says_why_not(installed: Volar, kernel: Path) -> None:
    _create(installed, kernel)
    pid = installed.json("vms", "show", "caddy-demo")["monitor_pid"]
    assert installed.ok("vms", "recover", "caddy-demo").strip() == (
        f"VM caddy-demo: its monitor (pid {pid}) is running; nothing to recover")
    _kill_monitor(installed, "caddy-demo")
    out = installed.ok("vms", "recover", "caddy-demo")
    new = installed.json("vms", "show", "caddy-demo")["monitor_pid"]
    assert out.strip() == f"VM caddy-demo healthy under a new monitor (pid {new})"
    installed.ok("vms", "stop", "caddy-demo", "--grace", "1")
    r = installed("vms", "recover", "caddy-demo")
    assert r.code == 1 and r.err.strip() == (
        "volar: VM caddy-demo is stopped: nothing runs to recover "
        "(`volar vms show caddy-demo` says why)")
    installed.ok("vms", "delete", "caddy-demo")


def test_a_vmm_that_cannot_be_adopted_is_killed_and_the_reason_says_why(
        installed: Volar, kernel: Path) -> None:
    installed.ok("vms", "create", "rigid", "--plugin", "caddy", "--kernel", str(kernel),
                 "--vmm", "tests.host_fakevmm:RigidDriver", "--timeout", "30")
    vm = _kill_monitor(installed, "rigid")
    listed = installed.json("vms", "list")[0]
    assert listed["status"] == "crashed"
    assert listed["detail"] == (
        f"its monitor died and could not adopt its VMM (pid {vm['vmm_pid']}): the rigid "
        "driver cannot adopt a running VMM; killed it")
    _wait_gone(vm["vmm_pid"])  # not left running unobserved
    installed.ok("vms", "delete", "rigid")


def test_a_monitor_and_vmm_both_gone_is_a_crash_that_says_so(
        installed: Volar, kernel: Path) -> None:
    _create(installed, kernel)
    vm = installed.json("vms", "show", "caddy-demo")
    os.kill(vm["vmm_pid"], signal.SIGKILL)
    _kill_monitor(installed, "caddy-demo")
    _wait_gone(vm["vmm_pid"])
    listed = installed.json("vms", "list")[0]
    if listed["status"] == "crashed" and "gone too" in listed["detail"]:
        assert listed["detail"].startswith(f"monitor process {vm['monitor_pid']} is gone; "
                                           "its VMM is gone too")
    else:  # the monitor saw its VMM die before its own death
        assert listed["status"] == "crashed", listed
    installed.ok("vms", "delete", "caddy-demo")


def test_plugin_in_use_cannot_be_removed(installed: Volar, kernel: Path) -> None:
    _create(installed, kernel)
    try:
        r = installed("plugins", "remove", "caddy")
        assert r.code != 0 and "caddy-demo" in r.err
    finally:
        installed.ok("vms", "delete", "caddy-demo")
    installed.ok("plugins", "remove", "caddy")


def test_list_with_100_vms(installed: Volar) -> None:
    store = Store(installed.state)
    with store.transaction():
        for i in range(100):
            store.db.execute(
                "INSERT INTO vms (name, plugin, vmm, status, cpus, memory_mb, kernel, initramfs,"
                " run_dir, created_at, running_at) VALUES (?, 'caddy', 'qemu', 'stopped', 1, 512,"
                " '/k', '/i', '/r', ?, ?)", (f"vm{i:03d}", time.time(), time.time()))
    lines = installed.ok("vms", "list").splitlines()
    assert len(lines) == 101 and lines[1].split()[0] == "vm000"


def test_logs_follow_ends_when_the_vm_stops(installed: Volar, kernel: Path) -> None:
    _create(installed, kernel)
    _wait_logs(installed, "caddy-demo", 6)
    follower = subprocess.Popen(
        [sys.executable, "-m", "host.cli", "--state-dir", str(installed.state),
         "vms", "logs", "-f", "caddy-demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    installed.ok("vms", "stop", "caddy-demo", "--grace", "1")
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0
    assert out.split() == [b"out1", b"out2", b"out3"] and err.split() == [b"err1", b"err2", b"err3"]
    assert "fake guest: booting" in installed.ok("vms", "console", "caddy-demo")
    installed.ok("vms", "delete", "caddy-demo")


def test_silent_guest_fails_at_the_boot_deadline_and_stop_before_hello(
    volar: Volar, tmp_path: Path, kernel: Path
) -> None:
    volar.ok("plugins", "install", "--manifest", str(write_plugin(
        tmp_path / "p", env={"FAKE_SILENT": "1"})))
    r = volar("vms", "create", "mute", "--plugin", "caddy", "--kernel", str(kernel),
              "--vmm", FAKE_VMM, "--timeout", "2")
    assert r.code != 0
    assert "no hello from kestrel within 2 s" in r.err
    assert "hangs before kestrel starts" in r.err  # console tail
    assert volar.json("vms", "show", "mute")["status"] == "failed"
    volar.ok("vms", "delete", "mute")


def test_stop_while_booting_kills_the_vmm(volar: Volar, tmp_path: Path, kernel: Path) -> None:
    volar.ok("plugins", "install", "--manifest", str(write_plugin(
        tmp_path / "p", env={"FAKE_SILENT": "1"})))
    create = subprocess.Popen(
        [sys.executable, "-m", "host.cli", "--state-dir", str(volar.state), "vms", "create",
         "slow", "--plugin", "caddy", "--kernel", str(kernel), "--vmm", FAKE_VMM,
         "--timeout", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while True:
        r = volar("vms", "show", "slow", "--json")
        if r.code == 0 and '"status": "starting"' in r.out and '"vmm_pid": 0' not in r.out:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert volar.ok("vms", "stop", "slow", "--grace", "1").startswith("VM slow stopped")
    _, err = create.communicate(timeout=30)
    assert create.returncode != 0 and "VM slow stopped" in err
    vmm_pid = volar.json("vms", "show", "slow")["vmm_pid"]
    assert vmm_pid == 0  # the monitor reaped it
    volar.ok("vms", "delete", "slow")


def test_missing_qemu_is_reported_by_the_monitor(installed: Volar, kernel: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    r = installed("vms", "create", "q", "--plugin", "caddy", "--kernel", str(kernel),
                  "--vmm", "qemu", "--timeout", "30")
    assert r.code != 0
    assert "qemu-system-x86_64 not found" in r.err
    assert installed.json("vms", "show", "q")["status"] == "failed"
    installed.ok("vms", "delete", "q")


def test_control_socket_is_private(installed: Volar, kernel: Path) -> None:
    _create(installed, kernel)
    try:
        run_dir = Path(installed.json("vms", "show", "caddy-demo")["run_dir"])
        assert (run_dir / "control.sock").stat().st_mode & 0o777 == 0o600
        assert run_dir.stat().st_mode & 0o777 == 0o700
    finally:
        installed.ok("vms", "delete", "caddy-demo")


def test_agentless_plugin_is_running_at_once_and_refuses_a_debug_shell(
        volar: Volar, tmp_path: Path, kernel: Path) -> None:
    """agent: none (a custom-init image): no hello is awaited, even from a silent guest."""
    volar.ok("plugins", "install", "--manifest", str(write_plugin(
        tmp_path / "p", env={"FAKE_SILENT": "1"}, extra={"agent": "none"})))
    r = volar("vms", "create", "nokestrel", "--plugin", "caddy", "--kernel", str(kernel),
              "--vmm", FAKE_VMM, "--debug-shell")
    assert r.code == 1 and "--debug-shell" in r.err and "agent: none" in r.err
    assert len(r.err.strip().splitlines()) == 1
    out = _create(volar, kernel, "nokestrel")
    assert "Agent: none" in out
    info = volar.json("vms", "show", "nokestrel")
    assert (info["status"], info["agent"]) == ("running", "none")
    stopped = volar.ok("vms", "stop", "nokestrel", "--grace", "1")
    assert stopped.startswith("VM nokestrel stopped")
    assert volar.json("vms", "show", "nokestrel")["vmm_pid"] == 0
