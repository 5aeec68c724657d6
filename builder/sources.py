"""Fetch build inputs (busybox, an http agent) from http(s)://, file:// or a path.

Downloads are verified against their sha256 when one is given and cached by it under
~/.cache/fledge/sha256/ (FLEDGE_CACHE overrides), so a machine that built once, or that
has the file locally, builds offline.
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from builder.elf import read_elf
from builder.errors import BuildError
from kestrel.cliout import QUIET, Output
from kestrel.digest import copy_hashing, sha256_file

DOWNLOAD_TIMEOUT = 30.0  # seconds without progress before a download is abandoned
HOST_BUSYBOX = Path("/bin/busybox")


def cache_dir() -> Path:
    env = os.environ.get("FLEDGE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fledge"


def fetch(
    url: str, *, sha256: str | None, key: str, file: str, base: Path, sha_key: str | None = None,
    output: Output | None = None,
) -> Path:
    """A local path holding the bytes *url* names, verified against *sha256*.

    *key* and *file* name the config entry for error messages (*sha_key* the checksum's,
    default *key*); relative paths and
    file:// URLs without a host resolve against *base* (the toml's folder)."""
    sha_key = sha_key or key
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme in ("http", "https"):
        return _download(url, sha256=sha256, key=key, file=file, sha_key=sha_key,
                         output=output or Output(verbosity=QUIET))
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise BuildError(key, file, f"{url}: file:// URLs must name a local file")
        local = Path(urllib.parse.unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:
        raise BuildError(key, file, f"{url}: unsupported URL scheme {parsed.scheme!r} "
                         "(use http://, https://, file:// or a path)")
    else:
        local = Path(url).expanduser()
    local = local if local.is_absolute() else base / local
    try:
        found = local.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte
        found = False
    if not found:
        raise BuildError(key, file, f"{url}: no such file")
    if sha256 is not None:
        _verify(local, sha256, key=sha_key, file=file, what=url)
    return local


def _verify(path: Path, sha256: str, *, key: str, file: str, what: str) -> None:
    got = sha256_file(path)
    if got != sha256.lower():
        raise BuildError(key, file, f"{what}: checksum mismatch: expected sha256 {sha256}, "
                         f"got {got}")


def _download(url: str, *, sha256: str | None, key: str, file: str, sha_key: str,
              output: Output) -> Path:
    store = cache_dir() / "sha256"
    if sha256 is not None:
        cached = store / sha256.lower()
        if cached.is_file() and sha256_file(cached) == sha256.lower():
            return cached
    store.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=store, prefix=".download-")
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
                url, timeout=DOWNLOAD_TIMEOUT
            ) as resp, output.progress(f"  {url}", _length(resp)) as advance:
                digest = copy_hashing(resp, out, advance)
        except urllib.error.HTTPError as e:
            msg = f"cannot download {url}: HTTP {e.code} {e.reason}"
            raise BuildError(key, file, msg) from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", None) or e
            raise BuildError(key, file, f"cannot download {url}: {reason}") from None
        if sha256 is not None and digest != sha256.lower():
            raise BuildError(sha_key, file, f"{url}: checksum mismatch: expected sha256 {sha256}, "
                             f"got {digest}")
        final = store / digest
        os.replace(tmp, final)
        return final
    finally:
        tmp.unlink(missing_ok=True)


def _length(resp: object) -> int | None:
    """Content-Length, for the progress bar; None when the server does not say."""
    headers = getattr(resp, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    return int(value) if value and value.isdigit() else None


def busybox(*, url: str | None, sha256: str | None, file: str, base: Path,
            output: Output | None = None) -> Path:
    """The busybox binary to install: the configured one, else the host's static one."""
    if url is not None:
        path = fetch(url, sha256=sha256, key="source.busybox_url", file=file, base=base,
                     sha_key="source.busybox_sha256", output=output)
    else:
        path = HOST_BUSYBOX
        if not path.exists():
            raise BuildError("source.busybox_url", file, "not set and this host has no "
                             "/bin/busybox: apt-get install busybox-static, or set busybox_url")
        if sha256 is not None:
            _verify(path, sha256, key="source.busybox_sha256", file=file, what=str(path))
    info = read_elf(path)
    if info is None:
        raise BuildError("source.busybox_url", file, f"{path} is not an ELF executable")
    if not info.is_static:
        hint = ("apt-get install busybox-static, or set busybox_url" if url is None
                else "use a statically linked busybox")
        raise BuildError("source.busybox_url", file, f"{path} is dynamically linked: {hint}")
    return path
