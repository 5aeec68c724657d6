"""The two things every agent task shares: a console line and the kernel's clock.

Console lines go to fd 2 (the serial console in a VM) and never raise: a
console that is gone must not take PID 1 with it.
"""

from __future__ import annotations

import os
import time


def uptime() -> float:
    """Kernel uptime in seconds (CLOCK_BOOTTIME: the timeline's clock)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def console(line: str) -> None:
    try:
        os.write(2, f"kestrel: {line}\n".encode(errors="replace"))
    except OSError:
        pass
