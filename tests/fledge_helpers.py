"""Shared helpers for the fledge tests: projects on disk, the CLI as a subprocess,
images read back with fledge's own cpio reader, and tiny kernel-module ELF files."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from builder import compress, cpio

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "fledge"
BUSYBOX = Path("/bin/busybox")


def need_busybox() -> Path:
    if not BUSYBOX.is_file():
        pytest.skip(reason="needs /bin/busybox (apt-get install busybox-static)")
    return BUSYBOX


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def offline_busybox(text: str) -> str:
    """Replace a seed's busybox_url/busybox_sha256 with this host's busybox (file://)."""
    bb = need_busybox()
    text = re.sub(r'(?m)^busybox_sha256\s*=.*\n', "", text)
    return re.sub(r'(?m)^busybox_url\s*=.*$',
                  f'busybox_url = "file://{bb}"\nbusybox_sha256 = "{sha256(bb)}"', text)


def write_project(root: Path, toml: str, files: dict[str, bytes | Path] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in (files or {}).items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
            target.chmod(0o755)
        else:
            target.write_bytes(content)
    cfg = root / "fledge.toml"
    cfg.write_text(toml)
    return cfg


def fledge_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["FLEDGE_CACHE"] = str(cache)
    env.pop("SOURCE_DATE_EPOCH", None)
    return env


def run_fledge(args: list[str], *, cwd: Path, cache: Path,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], cwd=cwd,
                          env={**fledge_env(cache), **(env or {})}, capture_output=True,
                          text=True, timeout=300)


def members(image: Path) -> dict[str, cpio.Member]:
    with compress.open_image(image) as stream:
        return {m.path: m for m in cpio.read_archive(stream)}


def fake_ko(path: Path, *, name: str, depends: str = "", vermagic: str = "6.1.0-test SMP",
            with_modinfo: bool = True) -> Path:
    """Write a minimal ELF64 relocatable object whose .modinfo has name=, depends=,
    vermagic= (what fledge reads from a real module)."""
    modinfo = f"name={name}\0depends={depends}\0vermagic={vermagic}\0".encode()
    section = b".modinfo" if with_modinfo else b".comment"
    shstr = b"\0" + section + b"\0.shstrtab\0"
    data_off = 64
    shstr_off = data_off + len(modinfo)
    sh_off = (shstr_off + len(shstr) + 7) & ~7
    # e_ident: ELFCLASS64, little endian, version 1; ET_REL (1), EM_X86_64 (62).
    header = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack(
        "<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, 3, 2)

    def shdr(name_off: int, kind: int, off: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name_off, kind, 0, 0, off, size, 0, 0, 1, 0)

    body = header + modinfo + shstr
    body += b"\0" * (sh_off - len(body))
    body += shdr(0, 0, 0, 0)
    body += shdr(1, 1, data_off, len(modinfo))  # SHT_PROGBITS
    body += shdr(1 + len(section) + 1, 3, shstr_off, len(shstr))  # SHT_STRTAB
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path
