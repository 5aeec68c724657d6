"""No starvation: a CPU-bound workload never holds kestrel's agent, signals or stop back.

kestrel yields the guest's one vCPU while it imports its agent (nice 19,
kestrel/courtesy.py); these tests boot a workload that never sleeps and check
that the host still gets the agent, and that a stop ends within the grace
plus one second of guest time (kestrel's own `stop` and `workload_exit`
timeline marks: the guest's clock, so a slow host cannot fake a pass or a
failure).
"""

from __future__ import annotations

from pathlib import Path

from harness import boot
from test_kestrel import BOOT_S, assert_clean_console, cmdline, exec_workload, manifest

from host.kernel import KernelInfo
from kestrel.protocol import Exit, State, Stop, Timeline

GRACE_S = 2
# Ignores TERM, so the stop has to wait out the grace and KILL.
HOG = "trap '' TERM; while :; do :; done"


async def test_cpu_bound_workload_stops_within_the_grace_plus_one_second(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path
) -> None:
    async with boot(kernel=kernel.vmlinux, initramfs=kestrel_image, run_dir=run_dir,
                    cmdline=cmdline(manifest(exec_workload(HOG)))) as vm:
        # The agent came up next to a workload that never yields the CPU.
        await vm.message(State, timeout=BOOT_S, where=lambda s: s.state == "running")
        assert vm.hello is not None
        await vm.send(Stop(grace_s=GRACE_S))
        assert await vm.wait_exit(timeout=BOOT_S) == 0  # the guest powered itself off
    (exit_msg,) = vm.of(Exit)
    assert exit_msg.signal == 9, exit_msg  # TERM ignored: KILLed after the grace
    marks = {t.mark: t.uptime for t in vm.of(Timeline)}
    took = marks["workload_exit"] - marks["stop"]
    print(f"stop -> workload exit: {took:.2f} s guest time (grace {GRACE_S} s)")
    assert GRACE_S - 0.1 <= took <= GRACE_S + 1, marks
    assert_clean_console(vm)
