"""Addresses, MACs and tap names for bridged (cloud-hypervisor) VMs.

Subnet 192.168.127.0/24 with the bridge on .1; leases go from .2 upwards in
numeric order (Volant sorted them as strings, so .10 came before .2) and are
kept in the store's ip_allocations table until the VM is deleted.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time

from host.errors import VolarError
from host.state import Store

SUBNET = ipaddress.IPv4Network("192.168.127.0/24")
GATEWAY = SUBNET.network_address + 1  # the bridge, vbr0
BRIDGE = "vbr0"
IFNAMSIZ = 16  # include/uapi/linux/if.h, counting the NUL: 15 usable


class AddressesExhausted(VolarError):
    pass


def mac_for(name: str, ip: str) -> str:
    """Volant's rule: ``02:`` (locally administered) + 5 bytes of sha1(name|ip)."""
    digest = hashlib.sha1(f"{name}|{ip}".encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest[:5])


def tap_name(name: str) -> str:
    """``vttap-<name>``, cut to 15 bytes; a cut name gets a hash suffix.

    Two long names with the same prefix would otherwise share a tap.
    """
    full = f"vttap-{name}"
    if len(full.encode()) <= IFNAMSIZ - 1:
        return full
    suffix = hashlib.sha1(name.encode()).hexdigest()[:4]
    return f"vttap-{name[: IFNAMSIZ - 1 - len('vttap-') - 5]}-{suffix}"


def allocate(store: Store, vm: str) -> tuple[str, str]:
    """Lease the lowest free address to ``vm`` (idempotent); returns (ip, mac)."""
    with store.transaction():
        row = store.db.execute(
            "SELECT ip, mac FROM ip_allocations WHERE vm = ?", (vm,)
        ).fetchone()
        if row is not None:
            return str(row[0]), str(row[1])
        used = {
            ipaddress.IPv4Address(r[0])
            for r in store.db.execute("SELECT ip FROM ip_allocations")
        }
        for host in SUBNET.hosts():  # numeric order
            if host == GATEWAY or host in used:
                continue
            ip = str(host)
            mac = mac_for(vm, ip)
            store.db.execute(
                "INSERT INTO ip_allocations (ip, vm, mac, allocated_at) VALUES (?, ?, ?, ?)",
                (ip, vm, mac, time.time()),
            )
            return ip, mac
    raise AddressesExhausted(f"no free address left in {SUBNET} ({len(used)} leased)")


def release(store: Store, vm: str) -> None:
    store.db.execute("DELETE FROM ip_allocations WHERE vm = ?", (vm,))
