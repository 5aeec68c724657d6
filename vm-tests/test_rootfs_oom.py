"""What only a real guest can show: the rootfs pivot, a data disk left alone, OOM.

The pivot mounts /dev/vda and runs kestrel again from the kept initramfs;
a disk that nobody named as root is never pivoted into (Volant's bug);
an OOM-killed workload is reported as ``oom`` before its ``exit``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness import boot

from host.kernel import KernelInfo
from host.qemu import QemuDriver
from kestrel.cmdline import build_cmdline
from kestrel.protocol import Exit, Log, Oom, Stop

BOOT_S = 150


def _manifest(workload: dict[str, Any], **top: Any) -> bytes:
    doc: dict[str, Any] = {"name": "vmtest", "version": "0.1.0", "workload": workload, **top}
    doc.setdefault("initramfs", {"url": "/unused.cpio.gz"})
    return json.dumps(doc).encode()


def _cmdline(manifest_json: bytes, **extra: str) -> str:
    return build_cmdline(manifest_json=manifest_json, channel=QemuDriver().agent_channel(),
                         extra=extra)


def _ext4_with_marker(tmp: Path, busybox: Path) -> Path:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip(reason="mkfs.ext4 is missing (apt-get install e2fsprogs)")
    root = tmp / "rootfs"
    for d in ("bin", "etc", "proc", "sys", "dev", "run", "tmp"):
        (root / d).mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in ("sh", "cat", "grep", "echo"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "marker").write_text("rootfs-ok\n")
    img = tmp / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(img), "32M"], check=True)
    return img


def _stdout(vm: Any) -> bytes:
    return b"".join(m.data for m in vm.of(Log) if m.stream == "stdout")


async def test_a_named_rootfs_is_pivoted_into_and_the_workload_runs_there(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path, busybox: Path
) -> None:
    disk = _ext4_with_marker(run_dir, busybox)
    script = "cat /etc/marker; grep ' / / ' /proc/self/mountinfo"
    line = _cmdline(
        _manifest({"type": "exec", "entrypoint": ["/bin/sh", "-c", script]},
                  rootfs={"url": "/unused.img", "format": "raw"}),
        **{"volant.rootfs_device": "vda", "volant.rootfs_fstype": "ext4"},
    )
    async with boot(kernel=kernel.vmlinux, initramfs=kestrel_image, run_dir=run_dir,
                    cmdline=line, disks=(disk,)) as vm:
        assert await vm.wait_exit(timeout=BOOT_S) == 0
    out = _stdout(vm)
    assert b"rootfs-ok" in out, vm.tail()
    assert b"ext4" in out  # / is the disk now
    assert [e.status for e in vm.of(Exit)] == [0]
    assert "switching root to /dev/vda" in vm.console_text()


async def test_a_data_disk_is_not_mistaken_for_a_root_disk(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path, busybox: Path
) -> None:
    disk = _ext4_with_marker(run_dir, busybox)
    script = "test -b /dev/vda && echo disk-present; cat /etc/marker 2>/dev/null || echo stayed"
    line = _cmdline(_manifest({"type": "exec", "entrypoint": ["/bin/sh", "-c", script]}))
    async with boot(kernel=kernel.vmlinux, initramfs=kestrel_image, run_dir=run_dir,
                    cmdline=line, disks=(disk,)) as vm:
        assert await vm.wait_exit(timeout=BOOT_S) == 0
    out = _stdout(vm)
    assert b"disk-present" in out and b"stayed" in out, vm.tail()
    assert "switching root" not in vm.console_text()


async def test_an_oom_kill_is_reported_before_the_exit(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path
) -> None:
    # awk doubles a string until the kernel's OOM killer takes it (SIGKILL).
    hog = {"type": "exec", "entrypoint": ["/bin/awk", 'BEGIN { s = "x"; while (1) s = s s }']}
    async with boot(kernel=kernel.vmlinux, initramfs=kestrel_image, run_dir=run_dir,
                    cmdline=_cmdline(_manifest(hog)), memory_mb=192) as vm:
        assert await vm.wait_exit(timeout=BOOT_S) == 0
    (oom,) = vm.of(Oom)
    (exit_msg,) = vm.of(Exit)
    assert (exit_msg.signal, exit_msg.status) == (9, 137)
    assert oom.seq < exit_msg.seq and oom.pid == exit_msg.pid
    assert "Kernel panic" not in vm.console_text()


async def test_a_full_tmp_leaves_the_agent_responsive(
    kernel: KernelInfo, kestrel_image: Path, run_dir: Path
) -> None:
    # /tmp is a tmpfs sized at half the guest's RAM: fill it, then ask kestrel
    # to stop. It must still report and power off on time.
    script = ("dd if=/dev/zero of=/tmp/fill bs=1M 2>/dev/null; echo tmp-full; "
              "df /tmp | tail -1; while :; do sleep 1; done")
    line = _cmdline(_manifest({"type": "http", "entrypoint": ["/bin/sh", "-c", script],
                               "base_url": "http://127.0.0.1:1"}))
    async with boot(kernel=kernel.vmlinux, initramfs=kestrel_image, run_dir=run_dir,
                    cmdline=line, memory_mb=256) as vm:
        await vm.until(lambda: b"tmp-full" in _stdout(vm), timeout=BOOT_S, what="/tmp full")
        await vm.send(Stop(grace_s=1))
        assert await vm.wait_exit(timeout=60) == 0
    assert b"100%" in _stdout(vm)
    (exit_msg,) = vm.of(Exit)
    assert exit_msg.signal == 15
    assert "Kernel panic" not in vm.console_text()
