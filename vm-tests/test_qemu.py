"""The QEMU driver's own promises: QMP answers, the VMM stops when asked, failures say why."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from harness import boot, busybox_image

from host.kernel import KernelInfo, current_kernel, has_pvh_note
from host.qemu import QemuDriver
from host.qmp import QmpClient
from host.vmm import LaunchSpec, VmmError

STUBBORN_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "STUBBORN ready"
# Ignores the ACPI button and every signal it can: only the VMM can end this.
trap '' TERM INT HUP
while :; do /bin/busybox sleep 1000; done
"""


@pytest.fixture(scope="module")
def stubborn_image(kernel: KernelInfo, busybox: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stubborn") / "stubborn.cpio"
    return busybox_image(out, modules_dir=kernel.modules, modules=(), init=STUBBORN_INIT,
                         busybox=busybox)


async def test_qmp_reports_running_and_shutdown_ends_a_guest_that_never_powers_off(
    kernel: KernelInfo, stubborn_image: Path, run_dir: Path
) -> None:
    driver = QemuDriver()
    async with boot(kernel=kernel.vmlinux, initramfs=stubborn_image, run_dir=run_dir,
                    guest_port=8080, protocol=False, driver=driver) as vm:
        await vm.console_line("STUBBORN ready", timeout=120)
        async with await QmpClient.connect(run_dir / "qmp.sock") as qmp:
            assert await qmp.status() == "running"
            port = await qmp.forwarded_port(8080)
        assert vm.address == f"127.0.0.1:{port}"
        with trio.fail_after(30):
            await driver.shutdown(vm.spec, vm.running, timeout=10)
        assert vm.running.process.returncode is not None
    assert "Kernel panic" not in vm.console_text()


async def test_a_vmm_that_cannot_start_says_why(kernel: KernelInfo, run_dir: Path) -> None:
    not_a_kernel = run_dir / "vmlinux"
    not_a_kernel.write_text("not a kernel\n")
    spec = LaunchSpec(name="broken", run_dir=run_dir / "run", kernel=not_a_kernel,
                      initramfs=not_a_kernel, cmdline="")
    with pytest.raises(VmmError, match=r"broken: QEMU exited with status 1: .*kernel"):
        await QemuDriver().start(spec)


async def test_missing_initramfs_is_named(kernel: KernelInfo, run_dir: Path) -> None:
    spec = LaunchSpec(name="x", run_dir=run_dir, kernel=kernel.vmlinux,
                      initramfs=run_dir / "nope.cpio.gz", cmdline="")
    with pytest.raises(VmmError, match=r"initramfs .*nope\.cpio\.gz does not exist"):
        await QemuDriver().start(spec)


def test_fetched_kernel_is_complete_and_bootable_by_pvh(kernel: KernelInfo) -> None:
    current = current_kernel()
    assert current is not None and current.release == kernel.release
    assert has_pvh_note(kernel.vmlinux.read_bytes())
    assert (kernel.modules / "kernel" / "drivers" / "char" / "virtio_console.ko").is_file()
    assert kernel.release in (kernel.directory / "release").read_text()
