"""Stand-in for the standard ``ssl`` module inside kestrel's frozen bundle.

kestrel never speaks TLS. trio imports ``ssl`` at import time only to name types
inside function bodies, and the real module would pull in libssl and libcrypto
(5.4 MB on disk, 1-2 MB of RSS). Any use of TLS fails here with a clear message.
"""

from __future__ import annotations

__kestrel_stub__ = True


class TLSUnavailableError(AttributeError):
    """Raised on any use of ``ssl`` in the frozen agent.

    An AttributeError so that feature probes (``hasattr(ssl, ...)``,
    ``getattr(ssl, ..., None)``) see "not available" instead of crashing.
    """


def __getattr__(name: str) -> object:
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    raise TLSUnavailableError(
        f"ssl.{name}: TLS is not available in kestrel's frozen agent (its bundle ships a "
        "stub ssl module without OpenSSL; kestrel itself never uses TLS)"
    )
