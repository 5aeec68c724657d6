"""The few Linux syscalls the os module lacks: mount and reboot.

ctypes is imported on first use only: in a VM the shim has already mounted
everything, so the common boot path never pays for it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# <sys/mount.h>
MS_MOVE = 8192
MS_BIND = 4096
# <linux/reboot.h>, as the libc wrapper takes it (the magic numbers are added by libc).
RB_POWER_OFF = 0x4321FEDC

_libc = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    lib = _lib()
    _check(
        lib.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None),
        f"mount {fstype} on {target}",
    )


def reboot(cmd: int) -> None:
    """reboot(2). In a PID namespace this ends the namespace (init gets SIGINT)."""
    _check(_lib().reboot(cmd), "reboot")
