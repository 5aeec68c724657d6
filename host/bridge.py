"""Bridge networking for every VMM: the vbr0 bridge, one persistent tap per VM.

One module for QEMU and cloud-hypervisor alike (Volant's ``volar setup``
layout: vbr0 carries the gateway 192.168.127.1/24, each VM's tap is a port of
it, addresses come from host/ipam.py). Everything goes through iproute2 in
the caller's network namespace, or in ``netns`` when given; both VMMs then
open the tap by name. A tap is created before the VMM starts and removed
when the VM stops or is deleted.
"""

from __future__ import annotations

import os
import subprocess
import sys

from host.errors import VolarError
from host.ipam import BRIDGE, GATEWAY, SUBNET
from host.vmm import VmmError

TUN_DEVICE = "/dev/net/tun"  # what both VMMs open to attach to a tap


class BridgeRefused(VolarError):
    """Bridge networking cannot work here (not root, no tun device); says which."""


def check_bridge_possible() -> None:
    """Refuse early, before a VM is recorded, what would fail at launch anyway."""
    if os.geteuid() != 0:
        raise BridgeRefused("--network bridge needs root: volar creates the vbr0 bridge and a "
                            "tap device for the VM (run as root, or leave out --network for "
                            "user networking on 127.0.0.1)")
    if not os.path.exists(TUN_DEVICE):
        raise BridgeRefused(f"--network bridge needs {TUN_DEVICE} (the tun module) for the "
                            "VM's tap device")


def _ip(netns: str | None, *args: str) -> None:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise VmmError("`ip` not found: bridge networking needs iproute2 "
                       "(apt-get install iproute2)") from None
    if done.returncode != 0:
        raise VmmError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}")


def _link_exists(name: str, netns: str | None) -> bool:
    cmd = ["ip", *(["-n", netns] if netns else []), "link", "show", "dev", name]
    try:
        return subprocess.run(cmd, capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def ensure_bridge(*, netns: str | None = None, bridge: str = BRIDGE) -> None:
    """The bridge with the gateway address (Volant's `volar setup`), if missing."""
    if _link_exists(bridge, netns):
        return
    _ip(netns, "link", "add", bridge, "type", "bridge")
    _ip(netns, "addr", "add", f"{GATEWAY}/{SUBNET.prefixlen}", "dev", bridge)
    _ip(netns, "link", "set", bridge, "up")


def create_tap(tap: str, *, netns: str | None = None, bridge: str = BRIDGE) -> None:
    """A persistent tap on the bridge, up; the VMM opens it by name."""
    if not _link_exists(tap, netns):
        _ip(netns, "tuntap", "add", "dev", tap, "mode", "tap")
    _ip(netns, "link", "set", tap, "master", bridge)
    _ip(netns, "link", "set", tap, "up")


def attach_tap(tap: str, *, netns: str | None = None, bridge: str = BRIDGE) -> None:
    """What a driver does before launching a bridged VM: the bridge, then its tap."""
    ensure_bridge(netns=netns, bridge=bridge)
    create_tap(tap, netns=netns, bridge=bridge)


def delete_tap(tap: str, *, netns: str | None = None) -> None:
    if _link_exists(tap, netns):
        _ip(netns, "link", "del", tap)


def release_tap(tap: str) -> None:
    """Remove a VM's tap once its VMM is gone; a failure is reported, never raised.

    The VM's own outcome (stopped, crashed, failed to start) is what the
    caller is recording; `vms delete` removes a tap left behind.
    """
    if not tap:
        return
    try:
        delete_tap(tap)
    except VmmError as exc:
        print(f"volar: warning: {exc}", file=sys.stderr, flush=True)
