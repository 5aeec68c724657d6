"""Read manifests and download artifacts from http(s)://, file:// or a path.

Artifacts are streamed into the state directory under their sha256 (content
addressed), so a checksum mismatch leaves nothing installed and two plugins
sharing an image share the file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urljoin, urlparse

from host.errors import FetchError
from kestrel.cliout import QUIET, Output
from kestrel.digest import copy_hashing

TIMEOUT_S = 60.0


def is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://", "file://"))


def resolve(ref: str, *, base: str) -> str:
    """Resolve ``ref`` (URL, absolute or relative path) against ``base``.

    ``base`` is the manifest's own location: a URL or a local path. A
    relative reference is relative to the folder holding the manifest.
    """
    if ref.startswith(("http://", "https://")):
        return ref
    if ref.startswith("file://"):
        return local_path(ref)
    if ref.startswith("/"):
        return ref
    if base.startswith(("http://", "https://")):
        return urljoin(base, ref)
    folder = Path(local_path(base) if base.startswith("file://") else base).parent
    return str((folder / ref).resolve())


def local_path(url: str) -> str:
    """The path of a ``file://`` URL (``file:///p`` or ``file://localhost/p``).

    Volant accepted file:// at validation and then handed the URL to a plain
    open(), which failed: here it means a path.
    """
    parts = urlparse(url)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"{url}: file:// URLs must name a local path (host {parts.netloc!r})")
    return unquote(parts.path)


@contextmanager
def open_source(ref: str) -> Iterator[BinaryIO]:
    """An open binary stream for a URL or path; errors name the source."""
    if ref.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            resp = urllib.request.urlopen(ref, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise FetchError(f"{ref}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FetchError(f"{ref}: {reason}") from None
        with resp:
            yield resp
        return
    path = local_path(ref) if ref.startswith("file://") else ref
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise FetchError(f"{path}: {exc.strerror or exc}") from None
    with f:
        if os.path.isdir(path):
            raise FetchError(f"{path}: is a directory")
        yield f


def read_text(ref: str, *, limit: int = 16 << 20) -> str:
    with open_source(ref) as src:
        try:
            data = src.read(limit + 1)
        except OSError as exc:
            raise FetchError(f"{ref}: {exc}") from None
    if len(data) > limit:
        raise FetchError(f"{ref}: larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FetchError(f"{ref}: not UTF-8 text ({exc})") from None


def download(ref: str, *, dest_dir: Path, output: Output | None = None) -> tuple[Path, str]:
    """Copy ``ref`` into ``dest_dir`` as a temporary file; return (path, sha256 hex).

    The caller verifies the sum and renames (or deletes) the file. ``output``
    shows a progress bar on a terminal.
    """
    dest_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".download-")
    say = output or Output(verbosity=QUIET)
    try:
        with os.fdopen(fd, "wb") as out, open_source(ref) as src, \
                say.progress(f"Downloading {ref}", _size(src)) as advance:
            digest = copy_hashing(src, out, advance)
    except OSError as exc:
        os.unlink(tmp)
        raise FetchError(f"{ref}: {exc}") from None
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp), digest


def _size(src: BinaryIO) -> int | None:
    """The byte count to expect, for the progress bar: Content-Length or the file's size."""
    headers = getattr(src, "headers", None)
    if headers is not None:
        value = headers.get("Content-Length")
        return int(value) if value and value.isdigit() else None
    try:
        return os.fstat(src.fileno()).st_size
    except (OSError, ValueError, AttributeError):
        return None


def store_artifact(tmp: Path, sha256: str, *, dest_dir: Path, suffix: str) -> Path:
    """Move a verified download to its content-addressed name."""
    final = dest_dir / f"{sha256}{suffix}"
    if final.exists():
        tmp.unlink()
    else:
        os.chmod(tmp, 0o644)
        shutil.move(str(tmp), final)
    return final
