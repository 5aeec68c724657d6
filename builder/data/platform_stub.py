"""``platform`` inside kestrel's frozen bundle.

Only attrs imports it, to ask ``python_implementation()`` once at import time;
the standard module (its regexes and compiled code, ~85 KB of PID 1's heap)
answers that from sys.version. Any other use fails with a message naming it.
"""

from __future__ import annotations

import sys

__kestrel_stub__ = True

_NAMES = {"cpython": "CPython", "pypy": "PyPy", "ironpython": "IronPython", "jython": "Jython"}


def python_implementation() -> str:
    return _NAMES.get(sys.implementation.name, sys.implementation.name)


def __getattr__(name: str) -> object:
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    raise AttributeError(f"platform.{name} is not available in kestrel's frozen agent (its bundle "
                         "ships a stub platform module; kestrel itself never uses it)")
