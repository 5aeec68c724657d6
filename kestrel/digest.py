"""sha256: the one checksum rule and the one hashing copy loop.

Shared by the manifest (``initramfs.checksum``), fledge (``busybox_sha256``,
``agent.checksum``, its download cache, the freeze cache key) and volar's
downloads. The rule: exactly 64 hex digits, either case, optionally after
``sha256:``. Import-light: the manifest checks the rule on kestrel's boot path.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import BinaryIO

SHA256_RULE = "64 hex digits, optionally after 'sha256:'"
CHUNK = 1 << 20
_HEX = frozenset("0123456789abcdef")


def parse_sha256(text: str) -> str | None:
    """Lowercase hex of a checksum that follows the rule, else None."""
    value = text.strip()
    if value[:7].lower() == "sha256:":
        value = value[7:]
    value = value.lower()
    return value if len(value) == 64 and set(value) <= _HEX else None


def copy_hashing(src: BinaryIO, out: BinaryIO | None = None,
                 progress: Callable[[int], None] | None = None) -> str:
    """Stream ``src`` (into ``out`` if given); return its sha256 hex.

    ``progress`` gets each chunk's size, for a progress bar."""
    import hashlib

    h = hashlib.sha256()
    while chunk := src.read(CHUNK):
        h.update(chunk)
        if out is not None:
            out.write(chunk)
        if progress is not None:
            progress(len(chunk))
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return copy_hashing(f)
