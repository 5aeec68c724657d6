"""The QEMU plumbing without kestrel: kernel, devices, console, channel, port forward, power-off.

A busybox-only initramfs whose shell /init loads the virtio modules, serves
a page with busybox httpd, writes a line into the agent port, waits for the
host's answer on it and powers off.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import trio
from harness import boot, busybox_image

from host.kernel import KernelInfo
from host.qemu import QemuDriver
from kestrel.layout import SERIAL_PORT_NAME

SMOKE_MODULES = ("virtio_pci", "virtio_mmio", "virtio_console", "virtio_net", "virtio_rng")
PAGE = b"hello from the smoke guest\n"

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "SMOKE init $(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /etc/modules.list); do insmod $m || echo "SMOKE insmod $m failed"; done
ifconfig lo 127.0.0.1 up
ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up && route add default gw 10.0.2.2
httpd -p 8080 -h /www
# The port's sysfs entry appears asynchronously after virtio_console loads.
port=""
for i in $(seq 100); do
  for n in /sys/class/virtio-ports/*/name; do
    [ "$(cat $n 2>/dev/null)" = "{SERIAL_PORT_NAME}" ] && port=/dev/$(basename $(dirname $n))
  done
  [ -n "$port" ] && break
  sleep 0.05
done
echo "SMOKE port $port"
exec 3<>$port
echo "SMOKE ready $(cut -d' ' -f1 /proc/uptime)" >&3
read -r answer <&3
echo "SMOKE host said: $answer"
echo "SMOKE done $(cut -d' ' -f1 /proc/uptime)"
poweroff -f
"""


@pytest.fixture(scope="module")
def smoke_image(
    kernel: KernelInfo, busybox: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "smoke.cpio"
    return busybox_image(out, modules_dir=kernel.modules, modules=SMOKE_MODULES, init=INIT,
                         files={"www/index.html": PAGE}, busybox=busybox)


async def _fetch(url: str) -> bytes:
    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=5) as r:
            body: bytes = r.read()
            return body

    return await trio.to_thread.run_sync(get)


@pytest.mark.parametrize("machine", ["microvm", "q35"])
async def test_guest_boots_talks_serves_and_powers_off(
    kernel: KernelInfo, smoke_image: Path, run_dir: Path, machine: str
) -> None:
    # The raw virtio-serial plumbing (kestrel's vsock path is in test_vsock.py).
    driver = QemuDriver(machine=machine, channel="serial")
    async with boot(kernel=kernel.vmlinux, initramfs=smoke_image, run_dir=run_dir,
                    name="smoke", guest_port=8080, protocol=False, driver=driver) as vm:
        host, _, port = vm.address.partition(":")
        assert host == "127.0.0.1" and int(port) > 0

        # The guest speaks first on the agent channel, then waits for us.
        stream = await driver.open_agent_stream(vm.spec, vm.running)
        buf = b""
        with trio.fail_after(120):
            while b"\n" not in buf:
                chunk = await stream.receive_some(4096)
                assert chunk, "agent socket closed before the guest wrote"
                buf += chunk
        assert buf.startswith(b"SMOKE ready")

        # The forwarded 127.0.0.1 port reaches the guest's httpd.
        assert await _fetch(f"http://{vm.address}/index.html") == PAGE

        await stream.send_all(b"goodbye\n")
        assert await vm.wait_exit(timeout=60) == 0
        await stream.aclose()

    text = vm.console_text()
    assert "SMOKE host said: goodbye" in text
    assert "SMOKE insmod" not in text  # every module loaded
    assert "Kernel panic" not in text
    done = next(c for c in vm.console if c.text.startswith("SMOKE done"))
    print(f"{machine}: guest uptime at power-off {done.text.split()[-1]} s, "
          f"QEMU wall {vm.exited_at:.2f} s")
