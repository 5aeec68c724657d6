"""Fetch Debian 12's kernel through apt and lay it out for QEMU and fledge.

The package comes from the Debian archive only (``apt-get download``); the
bzImage's xz payload is unpacked into a PVH-bootable vmlinux (~4 s faster to
boot under TCG) next to the package's module tree in kestrel.layout.kernel_dir().
"""

from __future__ import annotations

import io
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import NoteSegment

from kestrel.cliout import NORMAL, QUIET, Output
from kestrel.layout import canonical_module, kernel_dir

# Modules the QEMU driver's devices need; a flavour without them is no use.
REQUIRED_MODULES = (
    "virtio_pci",
    "virtio_console",
    "virtio_net",
    "vmw_vsock_virtio_transport",
)
# The cloud flavour is a quarter of the size and carries every module above.
FLAVOURS = ("cloud-amd64", "amd64")

XZ_MAGIC = b"\xfd7zXZ\x00"
# The kernel's LZ4 "legacy" frame (lib/decompress_unlz4.c): this magic, then
# chunks of <u32 LE compressed size><LZ4 block>. Debian's cloud flavour uses it.
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
ELF_MAGIC = b"\x7fELF"
# Xen's ELF note that marks a PVH entry point (xen/include/public/elfnote.h).
XEN_ELFNOTE_PHYS32_ENTRY = 18


class KernelError(RuntimeError):
    """The kernel could not be resolved, downloaded or unpacked; says which step."""


@dataclass(frozen=True)
class KernelInfo:
    release: str  # e.g. 6.1.0-56-cloud-amd64
    directory: Path  # <kernel_dir>/<release>
    package: str  # linux-image-<release>
    version: str  # the Debian package version, "" when unknown

    @property
    def vmlinux(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def modules(self) -> Path:
        return self.directory / "modules"

    @property
    def config(self) -> Path:
        return self.directory / "config"


def _run(cmd: list[str], *, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise KernelError(f"{cmd[0]} not found: kernel fetching needs apt and dpkg") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise KernelError(f"{' '.join(cmd)} failed ({done.returncode}): {' / '.join(tail)}")
    return done.stdout


def resolve_package(flavour: str) -> tuple[str, str]:
    """The versioned image package behind ``linux-image-<flavour>`` and its version."""
    meta = f"linux-image-{flavour}"
    # One apt-cache call: the metapackage pins its image, e.g.
    # "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)".
    out = _run(["apt-cache", "show", "--no-all-versions", meta])
    found = re.search(
        rf"^Depends:.*?\b(linux-image-[0-9][^\s,]*-{re.escape(flavour)})(?:\s*\(=\s*([^)\s]+)\))?",
        out, re.M,
    )
    if not found:
        raise KernelError(f"apt-cache show {meta}: no linux-image-<release> dependency")
    return found.group(1), found.group(2) or ""


def _lz4_legacy(data: bytes, pos: int) -> bytes:
    """Decode the legacy LZ4 stream at ``pos`` with Debian's ``lz4`` command.

    The command, not a Python decoder: it is an apt package `make setup`
    installs, and it is 50x faster than pure Python (0.16 s against 7.7 s for
    Debian's 14 MB cloud bzImage, same run); the lz4 wheel from PyPI (0.09 s)
    would add a compiled dependency to volar for this one step.
    """
    pos += len(LZ4_LEGACY_MAGIC)
    first = end = pos
    while end + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, end)
        # The stream ends at a new magic or at the appended image size,
        # which cannot fit in what is left of the bzImage.
        if size == 0x184C2102 or size > len(data) - end - 4:
            break
        end += 4 + size
    if end == first:
        return b""
    if shutil.which("lz4") is None:
        raise KernelError("the kernel is LZ4-compressed and the lz4 command is missing "
                          "(apt-get install lz4)")
    done = subprocess.run(["lz4", "-dc"], input=LZ4_LEGACY_MAGIC + data[first:end],
                          capture_output=True, check=False)
    return done.stdout if done.returncode == 0 else b""


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage whose payload is xz or LZ4."""
    start = bzimage.find(LZ4_LEGACY_MAGIC)
    while start != -1:
        data = _lz4_legacy(bzimage, start)  # b"" where the magic occurred by chance
        if data.startswith(ELF_MAGIC):
            return data
        start = bzimage.find(LZ4_LEGACY_MAGIC, start + 1)
    start = bzimage.find(XZ_MAGIC)
    while start != -1:
        try:
            data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
        except lzma.LZMAError:
            data = b""
        if data.startswith(ELF_MAGIC):
            return data
        start = bzimage.find(XZ_MAGIC, start + 1)
    raise KernelError("no xz- or LZ4-compressed ELF payload in the bzImage")


def has_pvh_note(elf: bytes) -> bool:
    """True when a PT_NOTE segment holds Xen's PHYS32_ENTRY note (PVH boot)."""
    try:
        f = ELFFile(io.BytesIO(elf))
        for segment in f.iter_segments():
            if isinstance(segment, NoteSegment):
                for note in segment.iter_notes():
                    # pyelftools names some Xen types after GNU ones; 18 stays a number.
                    n_type: object = note["n_type"]
                    if note["n_name"] == "Xen" and n_type == XEN_ELFNOTE_PHYS32_ENTRY:
                        return True
    except ELFError:
        return False
    return False


def _module_names(tree: Path) -> set[str]:
    return {canonical_module(p.name.split(".ko")[0]) for p in tree.rglob("*.ko*")}


def _complete(directory: Path) -> bool:
    return all(
        (directory / name).exists() for name in ("vmlinux", "vmlinuz", "modules", "release")
    )


def _info_from(directory: Path) -> KernelInfo:
    release = (directory / "release").read_text().strip()
    package_file = directory / "package"
    package, _, version = (
        package_file.read_text().strip().partition(" ") if package_file.exists() else ("", "", "")
    )
    return KernelInfo(release, directory, package or f"linux-image-{release}", version)


def _point_current(root: Path, release: str) -> None:
    # Atomic swap: a reader sees the old target or the new one, never none.
    tmp = root / f".current.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(release)
    os.replace(tmp, root / "current")


def current_kernel(*, root: Path | None = None) -> KernelInfo | None:
    """The kernel ``current`` points at, or None when none was fetched."""
    link = (root or kernel_dir()) / "current"
    if not link.exists() or not _complete(link.resolve()):
        return None
    return _info_from(link.resolve())


def _download(package: str, work: Path, out: Output) -> Path:
    out.step(f"kernel: apt-get download {package}")
    # apt drops to the _apt user to write the file; let it into the directory.
    work.chmod(0o755)
    _run(["apt-get", "download", "-q", package], cwd=work)
    debs = sorted(work.glob(f"{package}_*.deb"))
    if not debs:
        raise KernelError(f"apt-get download {package} produced no .deb in {work}")
    return debs[0]


def _install(package: str, version: str, *, root: Path, say: Output) -> KernelInfo:
    release = package.removeprefix("linux-image-")
    root.mkdir(parents=True, exist_ok=True)
    # Work inside root so the final moves are renames on one filesystem.
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        work = Path(tmp)
        deb = _download(package, work, say)
        tree = work / "tree"
        say.step(f"kernel: dpkg-deb -x {deb.name}")
        _run(["dpkg-deb", "-x", str(deb), str(tree)])
        modules = tree / "lib" / "modules" / release
        vmlinuz = tree / "boot" / f"vmlinuz-{release}"
        if not modules.is_dir() or not vmlinuz.is_file():
            raise KernelError(f"{deb.name} lacks boot/vmlinuz-{release} or lib/modules/{release}")
        missing = sorted(set(REQUIRED_MODULES) - _module_names(modules))
        if missing:
            raise KernelError(f"{package} lacks the modules {', '.join(missing)}")
        say.step("kernel: extracting vmlinux from the bzImage")
        vmlinux = extract_vmlinux(vmlinuz.read_bytes())
        if not has_pvh_note(vmlinux):
            raise KernelError(f"{package}: vmlinux has no PVH entry note; QEMU cannot boot it")
        out = work / "out"
        out.mkdir()
        (out / "vmlinux").write_bytes(vmlinux)
        shutil.move(str(vmlinuz), out / "vmlinuz")
        config = tree / "boot" / f"config-{release}"
        if config.exists():
            shutil.move(str(config), out / "config")
        shutil.move(str(modules), out / "modules")
        (out / "package").write_text(f"{package} {version}\n")
        (out / "release").write_text(release + "\n")
        final = root / release
        if final.exists():
            shutil.rmtree(final)  # an incomplete earlier attempt
        os.rename(out, final)
    _point_current(root, release)
    say.step(f"kernel: {release} ready in {root / release}")
    return _info_from(root / release)


def fetch_kernel(
    *, dest: Path | None = None, flavour: str = "cloud-amd64", quiet: bool = False,
    output: Output | None = None,
) -> KernelInfo:
    """Make ``<dest>/current`` a complete kernel of ``flavour``; quick when already there.

    ``flavour`` is a Debian flavour ("cloud-amd64", "amd64") or "auto" to take
    the first one in FLAVOURS that carries REQUIRED_MODULES.
    """
    out = output or Output(verbosity=QUIET if quiet else NORMAL, stream=sys.stderr)
    root = dest or kernel_dir()
    choices = FLAVOURS if flavour == "auto" else (flavour,)
    errors: list[str] = []
    for choice in choices:
        try:
            package, version = resolve_package(choice)
        except KernelError as exc:
            existing = current_kernel(root=root)
            if existing is not None and existing.release.endswith(choice):
                # apt's lists are missing (offline box): the kernel we have will do.
                out.step(f"kernel: {exc}; keeping {existing.release}")
                return existing
            errors.append(str(exc))
            continue
        release = package.removeprefix("linux-image-")
        if _complete(root / release):
            current = root / "current"
            if not current.is_symlink() or os.readlink(current) != release:
                _point_current(root, release)
            return _info_from(root / release)
        try:
            return _install(package, version, root=root, say=out)
        except KernelError as exc:
            errors.append(str(exc))
    raise KernelError("; ".join(errors))
