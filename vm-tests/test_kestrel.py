"""kestrel as PID 1 in a real guest: what the host sees over the agent channel and console.

One fledge-built image (shim + frozen kestrel + busybox + virtio modules);
each test boots it with its own manifest on the kernel command line.
"""

from __future__ import annotations

import itertools
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from harness import Vm, boot

from host.kernel import KernelInfo
from host.qemu import QemuDriver
from kestrel.cmdline import build_cmdline
from kestrel.protocol import Exit, Fatal, Health, Log, State, Stop, Timeline

BOOT_S = 150  # TCG boot + frozen kestrel start, with a wide margin for a loaded CI box
HTTPD = "httpd -f -p 8080 -h"


def manifest(workload: dict[str, Any], *, health: dict[str, Any] | None = None) -> bytes:
    doc: dict[str, Any] = {
        "schema_version": "1.0", "name": "vmtest", "version": "0.1.0",
        "initramfs": {"url": "/unused.cpio.gz"}, "workload": workload,
    }
    if health is not None:
        doc["health_check"] = health
    return json.dumps(doc).encode()


def http_workload(script: str, **extra: Any) -> dict[str, Any]:
    return {"type": "http", "entrypoint": ["/bin/sh", "-c", script],
            "base_url": "http://127.0.0.1:8080", **extra}


def exec_workload(script: str) -> dict[str, Any]:
    return {"type": "exec", "entrypoint": ["/bin/sh", "-c", script]}


def cmdline(manifest_json: bytes, *, channel: str = "vsock") -> str:
    return build_cmdline(manifest_json=manifest_json,
                         channel=QemuDriver(channel=channel).agent_channel())


def stdout_of(vm: Vm) -> bytes:
    return b"".join(m.data for m in vm.of(Log) if m.stream == "stdout")


def states(vm: Vm) -> list[str]:
    return [m.state for m in vm.of(State)]


def assert_clean_console(vm: Vm) -> None:
    text = vm.console_text()
    assert "Kernel panic" not in text
    assert "KESTREL PANIC" not in text


async def test_hello_carries_the_boot_timeline_and_the_workload_turns_healthy(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path
) -> None:
    m = manifest(http_workload(f"{HTTPD} /www"), health={"endpoint": "/index.html",
                                                          "timeout_ms": 2000, "interval_ms": 250})
    async with boot(kernel=kernel.vmlinux, initramfs=kestrel_image, run_dir=run_dir,
                    cmdline=cmdline(m), guest_port=8080) as vm:
        await vm.message(Health, timeout=BOOT_S, where=lambda h: h.status == "healthy")
        assert vm.hello is not None
        marks = vm.hello.timeline | {t.mark: t.uptime for t in vm.of(Timeline)}
        print("boot timeline (guest uptime s):", dict(sorted(marks.items(), key=lambda kv: kv[1])))
        assert 0 < marks["kestrel_start"] <= marks["workload_exec"]

        def get() -> bytes:
            with urllib.request.urlopen(f"http://{vm.address}/index.html", timeout=10) as r:
                body: bytes = r.read()
                return body

        assert await trio.to_thread.run_sync(get) == b"hello from kestrel's workload\n"
        await vm.send(Stop(grace_s=5))
        assert await vm.wait_exit(timeout=60) == 0
    assert_clean_console(vm)


# vsock is every VM's channel; virtio-serial (--channel serial) keeps this one test.
@pytest.mark.parametrize("channel", ["vsock", "serial"])
async def test_batch_workload_streams_logs_in_order_then_reports_exit_and_powers_off(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path, channel: str
) -> None:
    script = ('i=1; while [ $i -le 400 ]; do echo "line $i"; i=$((i+1)); done; '
              'echo oops >&2; exit 7')
    async with boot(kernel=kernel.vmlinux, initramfs=kestrel_image, run_dir=run_dir,
                    cmdline=cmdline(manifest(exec_workload(script)), channel=channel),
                    driver=QemuDriver(channel=channel)) as vm:
        assert await vm.wait_exit(timeout=BOOT_S) == 0  # the guest powered itself off
    expected = "".join(f"line {i}\n" for i in range(1, 401)).encode()
    assert stdout_of(vm) == expected
    assert b"oops" in b"".join(m.data for m in vm.of(Log) if m.stream == "stderr")
    (exit_msg,) = vm.of(Exit)
    assert (exit_msg.code, exit_msg.signal, exit_msg.status) == (7, None, 7)
    last_log = max(m.seq for m in vm.of(Log))
    assert exit_msg.seq > last_log, "the exit record must follow every log record"
    assert vm.session.lost == 0
    assert_clean_console(vm)


async def test_health_goes_unhealthy_and_back(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path
) -> None:
    # The page disappears for a while, then comes back.
    script = ("mkdir -p /tmp/www && echo ok > /tmp/www/h && "
              f"({HTTPD} /tmp/www &) && sleep 10 && rm /tmp/www/h && sleep 10 && "
              "echo ok > /tmp/www/h && sleep 1000")
    m = manifest(http_workload(script), health={"endpoint": "/h", "timeout_ms": 2000,
                                                "interval_ms": 300, "failure_threshold": 2})
    async with boot(kernel=kernel.vmlinux, initramfs=kestrel_image, run_dir=run_dir,
                    cmdline=cmdline(m), guest_port=8080) as vm:
        def seen() -> list[str]:
            return [h.status for h in vm.of(Health)]

        def went_back() -> bool:
            s = [x for x in seen() if x in ("healthy", "unhealthy")]
            return s[:3] == ["healthy", "unhealthy", "healthy"]

        await vm.until(went_back, timeout=BOOT_S + 40, what="healthy -> unhealthy -> healthy")
        await vm.send(Stop(grace_s=2))
        assert await vm.wait_exit(timeout=60) == 0
    statuses = seen()
    assert all(a != b for a, b in itertools.pairwise(statuses)), \
        f"only transitions are reported: {statuses}"
    assert_clean_console(vm)


async def test_stop_ends_the_workload_then_powers_off(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path
) -> None:
    m = manifest(http_workload(f"{HTTPD} /www"), health={"endpoint": "/", "interval_ms": 250})
    async with boot(kernel=kernel.vmlinux, initramfs=kestrel_image, run_dir=run_dir,
                    cmdline=cmdline(m), guest_port=8080) as vm:
        await vm.message(Health, timeout=BOOT_S, where=lambda h: h.status == "healthy")
        await vm.send(Stop(grace_s=5))
        assert await vm.wait_exit(timeout=60) == 0
    exits = vm.of(Exit)
    assert exits, "a stop must report the workload's exit"
    assert exits[-1].signal == 15 or exits[-1].status == 143
    assert states(vm)[-1] == "poweroff"
    assert_clean_console(vm)


def _delay_ms(detail: str) -> float:
    match = re.search(r"(\d+(?:\.\d+)?)\s*(ms|s)\b", detail)
    assert match, f"restart record without a delay: {detail!r}"
    value = float(match.group(1))
    return value if match.group(2) == "ms" else value * 1000


async def test_crashing_workload_restarts_with_growing_backoff(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path
) -> None:
    restart = {"policy": "on-failure", "initial_backoff_ms": 200, "max_backoff_ms": 10_000}
    m = manifest(http_workload("echo crashing; exit 3", restart=restart))
    async with boot(kernel=kernel.vmlinux, initramfs=kestrel_image, run_dir=run_dir,
                    cmdline=cmdline(m), guest_port=8080) as vm:
        def restarts() -> list[State]:
            return [s for s in vm.of(State) if s.state == "restarting"]

        await vm.until(lambda: len(restarts()) >= 4, timeout=BOOT_S, what="four restarts")
        await vm.send(Stop(grace_s=2))
        assert await vm.wait_exit(timeout=60) == 0
    delays = [_delay_ms(s.detail) for s in restarts()[:4]]
    print("restart delays (ms):", delays)
    assert delays == sorted(delays) and delays[0] < delays[-1], delays
    assert all(e.code == 3 for e in vm.of(Exit)[:4])
    assert stdout_of(vm).count(b"crashing\n") >= 4
    assert_clean_console(vm)


async def test_bad_manifest_powers_off_with_a_message_not_a_kernel_panic(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path
) -> None:
    bad = json.dumps({"name": "vmtest", "version": "0.1.0",
                      "initramfs": {"url": "/x"},
                      "workload": {"type": "http", "entrypoint": []}}).encode()
    async with boot(kernel=kernel.vmlinux, initramfs=kestrel_image, run_dir=run_dir,
                    cmdline=cmdline(bad)) as vm:
        line = await vm.console_line("KESTREL PANIC", timeout=BOOT_S)
        assert await vm.wait_exit(timeout=60) == 0
    assert "workload.entrypoint" in line.text, line.text
    assert "Kernel panic" not in vm.console_text()
    fatal = vm.of(Fatal)
    if fatal:  # the channel may not be up yet; if it is, it says the same
        assert "workload.entrypoint" in fatal[0].message
