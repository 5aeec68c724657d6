"""Stand-in for ``ctypes.util`` inside kestrel's frozen bundle.

trio calls ``find_library("pthread")`` at import time (to name its worker
threads). The real function tries to run ldconfig, gcc and ld through
subprocess; an image has none of them, so it returns None after importing
subprocess, shutil and tempfile and trying to spawn them (time on the guest's
vCPU while the workload starts, and RSS). This one returns None at once, the
same answer.
"""

from __future__ import annotations

__kestrel_stub__ = True


def find_library(name: str) -> None:
    return None
