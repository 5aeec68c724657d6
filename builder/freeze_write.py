"""Writing the frozen kestrel's tree: bytecode, reproducible zips, stripped
extensions, the glibc closure, and the checks that the tree is whole and imports.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

from builder import elf
from builder.freeze_select import FreezeError, Source, run_python

log = logging.getLogger("builder.freeze")

# Zip entries carry this date (the zip format's earliest; matches the cpio's idea of
# fixed timestamps without depending on SOURCE_DATE_EPOCH).
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def compile_sources(python: Path, items: list[tuple[Source, Path, str]], *, work: Path) -> None:
    """Compile (source, destination .pyc, in-bundle file name) with the frozen interpreter."""
    config = work / "compile.json"
    config.write_text(json.dumps({"files": [[str(s.path), str(d), f] for s, d, f in items]}))
    for _, dst, _ in items:
        dst.parent.mkdir(parents=True, exist_ok=True)
    # no_debug_ranges: line numbers without column ranges in the location
    # tables (tracebacks lose their ^^^ markers): -11% bytecode, and less of
    # PID 1's memory holds code objects.
    run_python(python, ["compile", str(config)], what="bytecode compilation",
                flags=("-X", "no_debug_ranges"))
    config.unlink()


def write_zip(dest: Path, members: dict[str, Path]) -> None:
    """A reproducible zip: sorted names, fixed dates and modes, stored (the image's gzip
    compresses it better than per-member deflate would, and import skips inflating)."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.create_system = 3  # Unix, so external_attr means a mode
            info.external_attr = 0o644 << 16
            zf.writestr(info, members[name].read_bytes())


def copy_file(src: Path, dest: Path, *, mode: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    dest.chmod(mode)


def install_extension(src: Path, dest: Path) -> None:
    """Copy a third-party extension module without its symbol table: wheels ship them
    unstripped (msgpack's is 1.6 MB, 196 KB stripped). strip's output is deterministic."""
    strip = shutil.which("strip")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if strip is None:
        log.warning("strip (binutils) not found: %s is copied unstripped", src.name)
        shutil.copyfile(src, dest)
    else:
        proc = subprocess.run([strip, "--strip-unneeded", "-o", str(dest), str(src)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise FreezeError(f"strip {src}: {proc.stderr.strip()}")
    dest.chmod(0o755)


def install_libraries(root: Path, binaries: list[Path]) -> None:
    """Copy the glibc closure of *binaries* to the paths the build host's ld.so found
    them at; the interpreter stays a symlink when the host has it as one (Debian:
    /lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2)."""
    for dest, real in sorted(elf.host_library_closure(binaries).items()):
        host = Path(dest)
        target = root / dest.lstrip("/")
        if host.is_symlink() and os.readlink(host).startswith("/"):
            link = os.readlink(host)
            copy_file(real, root / link.lstrip("/"), mode=0o755)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(link)
        else:
            copy_file(real, target, mode=0o755)


def check_closure(root: Path) -> None:
    elves = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()
             and elf.is_elf(p)]
    closure = elf.resolve_closure(elves, root=root)
    if not closure.ok:
        missing = ", ".join(f"{m.soname} (needed by {m.needed_by})" for m in closure.missing)
        raise FreezeError(f"frozen tree is missing libraries: {missing}")


def smoke_test(exe: Path, names: list[str]) -> None:
    """Start the bundled interpreter from the tree and import every kestrel module and
    dependency, so a bundle that cannot import never reaches an image. It runs with the
    build host's glibc (the same files the tree holds); tests/test_freeze.py proves the
    tree also runs in an empty root."""
    code = f"for n in {names!r}: __import__(n)\nimport encodings.idna"
    proc = subprocess.run([str(exe), "-IOO", "-c", code], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise FreezeError(f"the frozen interpreter cannot import kestrel:\n{tail}")
