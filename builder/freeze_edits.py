"""What the freeze changes in the bundle's copies of the stdlib and dependencies.

Each change keeps a module out of PID 1 that kestrel never calls (measured
by bench P2 and the agent's import time); builder/freeze.py applies them.
STUBBED replaces a file with a stub from builder/data; PATCHED edits a
file's text, and a release where an edit no longer applies fails the
freeze instead of silently shipping the unedited file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


class EditError(Exception):
    """A source edit does not apply to the installed version of its file."""


# Module files replaced by a stub (builder/data) in the bundle: parts of the
# dependencies kestrel never calls that trio imports eagerly. Each cut measured
# on the frozen PID 1 (bench P2): together about -1 MB RSS and -15% import time.
STUBBED = {
    "trio/_dtls.py": "unused_stub.py",  # DTLS: hashlib, hmac
    "trio/_ssl.py": "unused_stub.py",
    "trio/_highlevel_ssl_helpers.py": "unused_stub.py",
    "trio/_path.py": "unused_stub.py",  # pathlib, urllib.parse, ipaddress
    "trio/_subprocess.py": "unused_stub.py",  # kestrel spawns with posix_spawn
    # Never called by kestrel, imported only by trio/__init__ (and each other):
    # file wrappers, TCP serving, memory channels, the test clock. Together
    # ~0.4 MB of code objects and attrs-generated methods in PID 1 (bench P2).
    "trio/_file_io.py": "unused_stub.py",
    "trio/_highlevel_open_tcp_listeners.py": "unused_stub.py",
    "trio/_highlevel_serve_listeners.py": "unused_stub.py",
    "trio/_channel.py": "unused_stub.py",
    "trio/_core/_mock_clock.py": "unused_stub.py",
    "ctypes/util.py": "ctypes_util_stub.py",  # subprocess, shutil, tempfile
    "datetime.py": "datetime_stub.py",  # msgpack: the C _datetime without the Python one
    "platform.py": "platform_stub.py",  # attrs asks python_implementation() only
    "logging/__init__.py": "logging_stub.py",  # trio's three error-path loggers
}


# Source edits to dependencies, applied to the bundle's copy: (old, new) text
# pairs; a dependency release that no longer has `old` fails the freeze, so
# an edit never silently stops applying.
PATCHED: dict[str, tuple[tuple[str, str], ...]] = {
    # attrs asks inspect.signature() of each converter when a class is
    # created, at import time, even for plain functions without annotations
    # (where there is nothing to find): that alone loads inspect, ast, dis
    # and tokenize into PID 1 (~0.8 MB of heap, ~10% of the agent's import).
    # kestrel's agent defers `inspect` (courtesy.DEFERRED) and this skips it
    # for such functions, with the same answer (no annotation).
    # dataclasses gives every class without a docstring one made from
    # inspect.signature(cls); the bundle is -OO, so that is every dataclass
    # (kestrel.protocol's messages): the class name alone, without inspect.
    "dataclasses.py": ((
        "        cls.__doc__ = (cls.__name__ +\n"
        "                       str(inspect.signature(cls)).replace(' -> None', ''))\n",
        "        cls.__doc__ = cls.__name__  # kestrel's freeze: -OO, no inspect\n",
    ),),
    # trio names its worker threads through ctypes: when find_library finds
    # nothing it dlopens "libc.so", which glibc ships as a linker script
    # (dlopen fails) and an image does not have at all. Same answer (no
    # thread names) without importing ctypes, _ctypes and libffi into PID 1.
    "trio/_core/_thread_cache.py": ((
        '        libpthread_path = "libc.so"\n',
        "        return None  # kestrel's freeze: no libpthread to name threads with\n",
    ),),
    "attr/_compat.py": ((
        "    def __init__(self, callable):\n        try:\n",
        "    def __init__(self, callable):\n"
        "        if type(callable) is type(_kestrel_plain) and not callable.__annotations__:\n"
        "            self.sig = None  # kestrel's freeze: no annotation, no inspect\n"
        "            return\n"
        "        try:\n",
    ), (
        "\nclass _AnnotationExtractor:",
        "\ndef _kestrel_plain():\n    pass\n\n\nclass _AnnotationExtractor:",
    )),
}


def edited(rel: str, path: Path, *, work: Path, data: Callable[[str], Path]) -> Path:
    """The file to compile for module path ``rel`` (a/b.py): its stub, an edited
    copy under ``work``, or ``path`` itself. ``data`` finds builder/data files."""
    stub = STUBBED.get(rel)
    if stub:
        return data(stub)
    edits = PATCHED.get(rel)
    if not edits:
        return path
    text = path.read_text()
    for old, new in edits:
        if text.count(old) != 1:
            raise EditError(f"{rel}: the freeze's source edit no longer applies "
                            f"(expected once: {old.strip()!r}); update "
                            "builder/freeze_edits.PATCHED")
        text = text.replace(old, new)
    out = work / "patched" / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
