"""JSON decoding without importing ``json``.

``json`` imports ``re`` and its compiler; kestrel parses the manifest before
spawning the workload, so it drives CPython's C scanner (``_json``) directly.
Errors are ValueError with the position, like json.loads.
"""

from __future__ import annotations

TYPE_CHECKING = False  # `typing` imports re: not on the boot path
if TYPE_CHECKING:
    from typing import Any

_WS = " \t\n\r"


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _Context:
    # The attributes _json.make_scanner reads from its context object
    # (Modules/_json.c, scanner_new).
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_constant)


def loads(text: str | bytes) -> Any:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8 at byte {exc.start}") from None
    from _json import make_scanner

    scan = make_scanner(_Context)  # type: ignore[arg-type]
    n = len(text)
    i = 0
    while i < n and text[i] in _WS:
        i += 1
    try:
        obj, end = scan(text, i)
    except StopIteration as stop:
        raise ValueError(f"expecting a value at char {stop.value}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except SystemError:
        # CPython 3.11's scanner reports syntax errors through
        # json.decoder.JSONDecodeError, and only if json is already imported
        # (else: SystemError). Errors are off the fast path: let json say it.
        import json

        json.loads(text)
        raise
    while end < n and text[end] in _WS:
        end += 1
    if end != n:
        raise ValueError(f"extra data at char {end}")
    return obj
