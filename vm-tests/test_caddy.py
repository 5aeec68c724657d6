"""The seed quick start's Caddy appliance, as a user runs it.

The walkthrough goes through the documented commands (fledge build, volar
plugins install, volar vms create, curl, stop, delete); the Debian variant
proves fledge's host-library opt-in carries a dynamically linked binary.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest
import trio
from harness import REPO, boot, fledge_build, volar, volar_json

from host.kernel import KernelInfo
from host.qemu import QemuDriver
from kestrel.cmdline import build_cmdline
from kestrel.protocol import Health, Stop

EXAMPLE = REPO / "examples" / "caddy"
EXPECTED = "Hello from Caddy in a Volant microVM!"
sys.path.insert(0, str(EXAMPLE))


def test_quick_start_walkthrough_answers_hello(kernel: KernelInfo, run_dir: Path) -> None:
    from demo import demo
    from fetch_caddy import FetchError, fetch_caddy

    try:
        fetch_caddy(quiet=True)
    except FetchError as exc:
        pytest.skip(reason=f"no static caddy for the example: {exc}")
    state = run_dir / "state"  # demo()'s VOLAR_STATE_DIR
    try:
        answer = demo(work=run_dir, timeout=300, keep=True)
        assert EXPECTED in answer
        info = volar_json(state, "vms", "show", "caddy-demo")
        # The walkthrough runs production's data path: vsock, not virtio-serial.
        assert info["channel"] == "vsock" and info["guest_cid"] >= 3
        assert Path(info["vsock_socket"]).is_socket()
    finally:
        for verb in ("stop", "delete"):
            volar(state, "vms", verb, "caddy-demo")


async def test_debian_caddy_runs_with_host_libraries(kernel: KernelInfo, run_dir: Path) -> None:
    if not Path("/usr/bin/caddy").is_file():
        pytest.skip(reason="Debian's caddy is not installed (apt-get install caddy)")
    image = fledge_build(EXAMPLE / "fledge-debian.toml", run_dir / "debian.cpio.gz")
    manifest = (EXAMPLE / "manifest" / "caddy.json").read_bytes()
    json.loads(manifest)  # the example must stay valid JSON
    cmdline = build_cmdline(manifest_json=manifest, channel=QemuDriver().agent_channel())
    async with boot(kernel=kernel.vmlinux, initramfs=image, run_dir=run_dir, cmdline=cmdline,
                    guest_port=80, name="caddy-debian") as vm:
        await vm.message(Health, timeout=240, where=lambda h: h.status == "healthy")

        def get() -> str:
            with urllib.request.urlopen(f"http://{vm.address}/", timeout=10) as r:
                return bytes(r.read()).decode()

        assert EXPECTED in await trio.to_thread.run_sync(get)
        await vm.send(Stop(grace_s=5))
        assert await vm.wait_exit(timeout=60) == 0
    assert "Kernel panic" not in vm.console_text()
