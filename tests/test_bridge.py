"""`volar vms create --network bridge`: the QEMU command line and every refusal.

A real boot on the bridge is vm-tests/test_bridge.py (inside a network
namespace of its own); these never create a link: each refusal comes before
anything is recorded, launched or plumbed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from host import ipam
from host.qemu import QemuDriver
from host.state import Store
from host.vmm import LaunchSpec
from tests import host_helpers
from tests.host_helpers import Volar, write_plugin

volar = host_helpers.volar  # fixtures
kernel = host_helpers.kernel
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def installed(volar: Volar, tmp_path: Path) -> Volar:
    volar.ok("plugins", "install", "--manifest", str(write_plugin(tmp_path / "p")))
    return volar


def _nothing_left(volar: Volar) -> None:
    assert volar.json("vms", "list") == []
    assert not (volar.state / "vms" / "web").exists()  # no run directory, so no monitor
    assert Store(volar.state).db.execute(
        "SELECT COUNT(*) FROM ip_allocations WHERE vm = 'web'").fetchone()[0] == 0


def test_qemu_on_the_bridge_opens_the_tap_with_the_leased_mac(tmp_path: Path) -> None:
    spec = LaunchSpec(name="web", run_dir=tmp_path, kernel=tmp_path / "k",
                      initramfs=tmp_path / "i", cmdline="quiet", guest_port=80,
                      extra={"tap": "vttap-web", "mac": "02:aa:bb:cc:dd:ee",
                             "ip": "192.168.127.2"})
    for machine, dev in (("microvm", "virtio-net-device"), ("q35", "virtio-net-pci")):
        cmd = QemuDriver(machine=machine, tsc_khz=1000000).command(spec)
        netdev = cmd[cmd.index("-netdev") + 1]
        # QEMU only opens the tap volar made: no helper script runs with its rights.
        assert netdev == "tap,id=n0,ifname=vttap-web,script=no,downscript=no"
        device = cmd[cmd.index("-netdev") + 3]
        assert device.startswith(f"{dev},netdev=n0") and "mac=02:aa:bb:cc:dd:ee" in device
        assert not any("hostfwd" in word or word.startswith("user,") for word in cmd)


def test_user_networking_stays_the_default(tmp_path: Path) -> None:
    spec = LaunchSpec(name="web", run_dir=tmp_path, kernel=tmp_path / "k",
                      initramfs=tmp_path / "i", cmdline="quiet", guest_port=80)
    cmd = QemuDriver(tsc_khz=1000000).command(spec)
    assert cmd[cmd.index("-netdev") + 1] == "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:0-:80"


def test_bridge_mode_without_root_is_one_line(tmp_path: Path) -> None:
    """A real non-root volar: a user namespace without a uid map makes it nobody."""
    if shutil.which("unshare") is None:
        pytest.skip(reason="needs util-linux's unshare for a non-root volar")
    state = tmp_path / "state"
    done = subprocess.run(
        ["unshare", "--user", sys.executable, "-m", "host.cli", "vms", "create", "web",
         "--plugin", "caddy", "--network", "bridge"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
        env={**os.environ, "VOLAR_STATE_DIR": str(state)},
    )
    if "unshare failed" in done.stderr:
        pytest.skip(reason=f"cannot make a user namespace here: {done.stderr.strip()}")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "volar: --network bridge needs root: volar creates the vbr0 bridge and a tap device "
        "for the VM (run as root, or leave out --network for user networking on 127.0.0.1)"]
    assert done.stdout == ""


def test_exhausted_pool_is_one_line_and_records_nothing(installed: Volar, kernel: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(reason="bridge mode is refused earlier without root")
    store = Store(installed.state)
    for i in range(253):  # .2 .. .254: every host address but the bridge's
        ipam.allocate(store, f"other{i}")
    r = installed("vms", "create", "web", "--plugin", "caddy", "--kernel", str(kernel),
                  "--network", "bridge")
    assert r.code == 1
    assert r.err.splitlines() == [
        "volar: no free address left in 192.168.127.0/24 (253 leased)"]
    _nothing_left(installed)


def test_a_lease_goes_back_to_the_pool_on_delete(installed: Volar, kernel: Path) -> None:
    """The refusal above is not forever: deleting a VM frees its address."""
    if os.geteuid() != 0:
        pytest.skip(reason="bridge mode is refused earlier without root")
    store = Store(installed.state)
    for i in range(252):
        ipam.allocate(store, f"other{i}")
    assert ipam.allocate(store, "last") == ("192.168.127.254", ipam.mac_for("last",
                                                                           "192.168.127.254"))
    ipam.release(store, "other7")
    assert ipam.allocate(store, "again")[0] == "192.168.127.9"


@pytest.mark.parametrize(("args", "line"), [
    (("--vmm", "cloud-hypervisor", "--network", "user"),
     "volar: --network user: cloud-hypervisor has no user-mode networking; "
     "its VMs always get a tap on the bridge"),
    (("--network", "bridge", "--port", "8080"),
     "volar: --port 8080: a bridged VM is reached at its own address on the bridge, "
     "not through a host port"),
])
def test_network_options_that_cannot_work_are_one_line(
    installed: Volar, kernel: Path, args: tuple[str, ...], line: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip(reason="bridge mode is refused earlier without root")
    r = installed("vms", "create", "web", "--plugin", "caddy", "--kernel", str(kernel), *args)
    assert r.code == 1
    assert r.err.splitlines() == [line]
    _nothing_left(installed)
