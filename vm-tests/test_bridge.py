"""`volar vms create --network bridge` under QEMU, as the seeds' walkthrough runs it.

Only ever inside a network namespace this test makes (`ip netns add`): volar,
its monitor, QEMU and curl all run under `ip netns exec`, so the vbr0 bridge,
the tap and every packet to 192.168.127.x exist there and nowhere else. The
namespace goes away at the end, and with it every link the test made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import REPO, fledge_build, volar

from host.kernel import KernelInfo

EXAMPLE = REPO / "examples" / "caddy"
EXPECTED = "Hello from Caddy in a Volant microVM!"
VM = "br-caddy"


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip(reason="bridge mode needs root and iproute2 (`ip`) for a network namespace")
    name = f"kvt-br-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout


@pytest.fixture
def caddy_plugin(run_dir: Path) -> Path:
    """The seeds' Caddy appliance, built by fledge; returns its manifest."""
    import sys

    sys.path.insert(0, str(EXAMPLE))
    from fetch_caddy import FetchError, fetch_caddy

    try:
        fetch_caddy(quiet=True)
    except FetchError as exc:
        pytest.skip(reason=f"no static caddy for the example: {exc}")
    manifest = run_dir / "manifest" / "caddy.json"
    manifest.parent.mkdir()
    shutil.copyfile(EXAMPLE / "manifest" / "caddy.json", manifest)
    fledge_build(EXAMPLE / "fledge.toml", run_dir / "plugin.cpio.gz",
                 "--update-manifest", str(manifest), "--url", "../plugin.cpio.gz")
    return manifest


def _curl_until_ok(ns: str, url: str, *, timeout: float) -> str:
    """curl from inside the namespace until the guest answers (Caddy may still start)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        done = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "5",
                               "-w", "\n%{http_code}", url],
                              capture_output=True, text=True, check=False)
        body, _, code = done.stdout.rpartition("\n")
        if done.returncode == 0 and code == "200":
            return body
        last = done.stderr.strip() or f"HTTP {code}"
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer 200 from namespace {ns} (last: {last})")


def _link(ns: str | None, dev: str) -> dict[str, object] | None:
    where = ["-n", ns] if ns else []
    done = subprocess.run(["ip", *where, "-j", "-d", "link", "show", "dev", dev],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None
    info: dict[str, object] = json.loads(done.stdout)[0]
    return info


def test_caddy_on_the_bridge_answers_at_its_pool_address(
    kernel: KernelInfo, run_dir: Path, netns: str, caddy_plugin: Path
) -> None:
    state = run_dir / "state"
    inside = ("ip", "netns", "exec", netns)
    assert volar(state, "plugins", "install", "--manifest", str(caddy_plugin)).returncode == 0
    try:
        done = volar(state, "vms", "create", VM, "--plugin", "caddy", "--network", "bridge",
                     "--timeout", "240", wrap=inside)
        assert done.returncode == 0, done.stderr
        # The seeds' walkthrough, line for line (the pool starts at .2 here).
        assert done.stdout.splitlines() == [
            f"Creating VM {VM}...", "Allocating IP: 192.168.127.2",
            "Booting VM with initramfs strategy...", f"VM {VM} created with IP 192.168.127.2"]
        shown = json.loads(volar(state, "vms", "show", VM, "--json").stdout)
        assert shown["network"] == "bridge" and shown["ip"] == "192.168.127.2"
        assert shown["address"] == "192.168.127.2:80" and shown["channel"] == "vsock"
        tap = str(shown["tap"])
        listed = volar(state, "vms", "list").stdout.splitlines()
        assert listed[1].split()[:3] == [VM, "caddy", "192.168.127.2"]

        assert EXPECTED in _curl_until_ok(netns, "http://192.168.127.2:80/", timeout=240)

        # The tap is a port of vbr0 in the test's namespace, with the leased MAC; this
        # machine's own namespace has neither.
        link = _link(netns, tap)
        assert link is not None and link["master"] == "vbr0"
        assert _link(netns, "vbr0") is not None
        assert _link(None, tap) is None
        qemu_cmd = (Path(shown["run_dir"]) / "qemu.cmd").read_text()
        assert f"ifname={tap}" in qemu_cmd and f"mac={shown['mac']}" in qemu_cmd
        assert "hostfwd" not in qemu_cmd

        stopped = volar(state, "vms", "stop", VM, "--grace", "5", wrap=inside)
        assert stopped.returncode == 0 and stopped.stdout.startswith(f"VM {VM} stopped")
        assert _link(netns, tap) is None  # the VM's tap goes with its VMM
    finally:
        volar(state, "vms", "delete", VM, wrap=inside)
    assert volar(state, "vms", "list", "--json").stdout.strip() == "[]"
