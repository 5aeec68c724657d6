"""This machine's rule, enforced: no AF_VSOCK socket is ever made here.

The machine is itself a VM and its vsock peer is not ours; vsock belongs to
guests. GUARD is Python source for an audit hook that refuses an AF_VSOCK
socket before socket(2) runs (CPython raises "socket.__new__" first). The test
processes install it, and every kestrel the tests run as PID 1 starts with it.
"""

GUARD = """
import sys as _sys
def _no_vsock(event, args):
    if event == "socket.__new__" and args[1] == 40:  # AF_VSOCK, linux/socket.h
        raise PermissionError("AF_VSOCK on the test host: vsock runs only inside guests")
_sys.addaudithook(_no_vsock)
"""


def install() -> None:
    exec(GUARD, {})
