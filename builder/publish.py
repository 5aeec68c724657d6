"""`fledge manifest update`: point a plugin manifest at a built image.

Sets initramfs.url and initramfs.checksum ("sha256:<hex>") and keeps every other key,
their order and the file's indentation; the file is replaced atomically.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from builder.errors import BuildError, ConfigError
from kestrel.digest import sha256_file


def _indent_of(text: str) -> int | str:
    m = re.search(r"\n([ \t]+)\"", text)
    if m is None:
        return 2
    ws = m.group(1)
    return ws if "\t" in ws else len(ws)


def update_manifest(manifest: Path, *, image: Path, url: str | None = None,
                    sha256: str | None = None, agent: str | None = None) -> dict[str, Any]:
    """Write url (default: the image's absolute path), checksum and, for an image
    without kestrel, ``"agent": "none"`` into *manifest*.

    ``agent`` is what the build knows (kestrel | none); without it the image is read.
    """
    file = str(manifest)
    try:
        text = manifest.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("", file, f"cannot read: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("", file, f"invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("", file, "a plugin manifest is a JSON object")
    if not image.is_file():
        raise BuildError("initramfs", file, f"image {image} does not exist")
    section = data.get("initramfs")
    if section is None:
        section = data["initramfs"] = {}
    if not isinstance(section, dict):
        raise ConfigError("initramfs", file, "must be an object")
    section["url"] = url if url is not None else str(image.resolve())
    section["checksum"] = "sha256:" + (sha256 or sha256_file(image))
    if agent is None:
        from builder.inspect import ImageReport, read_members

        agent = ImageReport(path=image, compression="", size=0,
                            members=read_members(image)).agent
    # volar reads this to wait for no hello from an image that has no kestrel.
    if agent == "none":
        data["agent"] = "none"
    elif data.get("agent") == "none":
        del data["agent"]
    body = json.dumps(data, indent=_indent_of(text), ensure_ascii=False) + "\n"
    fd, tmp_name = tempfile.mkstemp(dir=manifest.resolve().parent, prefix=f".{manifest.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, manifest.stat().st_mode & 0o7777)
        os.replace(tmp_name, manifest)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return data
