"""Stand-in for a part of trio that kestrel never calls, inside its frozen bundle.

trio's ``__init__`` imports DTLS, TLS streams, trio.Path, trio.open_file and
subprocesses eagerly; kestrel uses none of them (it spawns with posix_spawn and
speaks plain sockets). The real modules and what they pull in (hashlib, hmac,
pathlib, urllib, ipaddress, subprocess) cost import time and about 1 MB of RSS
on PID 1. Every name still resolves, so ``from trio._x import Name`` works, but
using one fails with a message naming it.
"""

from __future__ import annotations

__kestrel_stub__ = True


class NotInFrozenAgentError(RuntimeError):
    """A stubbed-out part of trio was used."""


def _unavailable(name: str) -> type:
    where = f"{__name__}.{name}"

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise NotInFrozenAgentError(
            f"{where} is not available in kestrel's frozen agent (its bundle ships a stub "
            f"{__name__}; kestrel itself never uses it)"
        )

    # A class, so that uses as a type (isinstance, subclassing, annotations) keep
    # working; calling or instantiating it raises.
    return type(name, (), {"__new__": refuse, "__call__": refuse, "__module__": __name__})


def __getattr__(name: str) -> object:
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    value = _unavailable(name)
    globals()[name] = value
    return value
