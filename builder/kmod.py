"""Kernel modules for the image: find them in a lib/modules/<release> tree, resolve their
dependencies and order them so that every module loads after the ones it needs.

Dependencies come from each module's .modinfo ELF section (`depends=`), with the tree's
modules.dep as fallback. .ko.xz and .ko.zst are decompressed here, so the shim loads
plain .ko files with finit_module and needs no decompressor.
"""

from __future__ import annotations

import io
import lzma
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from builder.errors import BuildError
from kestrel.layout import canonical_module

SUFFIXES = (".ko", ".ko.xz", ".ko.zst")


canonical = canonical_module


@dataclass(frozen=True)
class Module:
    name: str  # canonical name
    source: Path  # the file in the tree (maybe compressed)
    rel: str  # path relative to the tree, compression suffix removed
    depends: tuple[str, ...]
    data: bytes  # the plain .ko


@dataclass(frozen=True)
class ModulePlan:
    release: str
    modules: tuple[Module, ...]  # load order: dependencies first
    builtin: tuple[str, ...]  # requested but built into the kernel

    def load_list(self) -> str:
        """The text of /etc/kestrel/modules.load: one path (relative to
        /lib/modules/<release>/) per line, in load order."""
        return "".join(m.rel + "\n" for m in self.modules)


def strip_suffix(name: str) -> str:
    for suffix in (".xz", ".zst"):
        if name.endswith(".ko" + suffix):
            return name[: -len(suffix)]
    return name


def index_tree(modules_dir: Path) -> dict[str, Path]:
    """Canonical module name -> file, for every module in the tree (sorted walk, so the
    first of two same-named modules wins deterministically)."""
    index: dict[str, Path] = {}
    for path in sorted(modules_dir.rglob("*.ko*")):
        if path.name.endswith(SUFFIXES) and path.is_file():
            index.setdefault(canonical(strip_suffix(path.name)[:-3]), path)
    return index


def decompress(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ValueError(f"{path.name} is zstd-compressed: apt-get install zstd")
        return subprocess.run([zstd, "-q", "-d", "-c"], input=raw, check=True,
                              capture_output=True).stdout
    return raw


def modinfo(ko: bytes) -> dict[str, list[str]] | None:
    """The key=value pairs of a module's .modinfo section; None if it has none."""
    try:
        elf = ELFFile(io.BytesIO(ko))
        section = elf.get_section_by_name(".modinfo")
        if section is None:
            return None
        blob: bytes = section.data()
    except (ELFError, ValueError, KeyError, AssertionError):
        return None
    info: dict[str, list[str]] = {}
    for item in blob.split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def _modules_dep(modules_dir: Path) -> dict[str, tuple[str, ...]]:
    deps: dict[str, tuple[str, ...]] = {}
    dep_file = modules_dir / "modules.dep"
    if not dep_file.is_file():
        return deps
    for line in dep_file.read_text(errors="replace").splitlines():
        target, _, rest = line.partition(":")
        name = canonical(strip_suffix(Path(target).name)[:-3])
        deps[name] = tuple(canonical(strip_suffix(Path(d).name)[:-3]) for d in rest.split())
    return deps


def _builtin(modules_dir: Path) -> set[str]:
    f = modules_dir / "modules.builtin"
    if not f.is_file():
        return set()
    return {canonical(strip_suffix(Path(line.strip()).name)[:-3])
            for line in f.read_text(errors="replace").splitlines() if line.strip()}


def release_of(modules_dir: Path, modules: Sequence[Module]) -> str:
    """The kernel release: the kernel dir's `release` file, else the first module's
    vermagic, else the tree's own name (lib/modules/<release>)."""
    release_file = modules_dir.parent / "release"
    if release_file.is_file() and (text := release_file.read_text().strip()):
        return text
    for m in modules:
        info = modinfo(m.data) or {}
        if info.get("vermagic"):
            return info["vermagic"][0].split()[0]
    return modules_dir.resolve().name


def plan_modules(modules_dir: Path, names: Iterable[str], *, file: str) -> ModulePlan:
    """Resolve *names* and their dependencies into load order, or raise BuildError
    naming the module and the tree."""
    index = index_tree(modules_dir)
    builtin = _builtin(modules_dir)
    dep_fallback: dict[str, tuple[str, ...]] | None = None
    loaded: dict[str, Module] = {}
    order: list[Module] = []
    skipped: list[str] = []

    def load(name: str, chain: tuple[str, ...]) -> None:
        nonlocal dep_fallback
        if name in loaded:
            return
        if name in chain:
            raise BuildError("kernel.modules", file,
                             f"dependency cycle: {' -> '.join((*chain, name))}")
        path = index.get(name)
        if path is None:
            if name in builtin:
                if name not in skipped:
                    skipped.append(name)
                return
            needed = f" (needed by {chain[-1]})" if chain else ""
            raise BuildError("kernel.modules", file,
                             f"module {name!r}{needed} not found in {modules_dir}")
        try:
            data = decompress(path)
        except (ValueError, lzma.LZMAError, subprocess.CalledProcessError, OSError) as e:
            raise BuildError("kernel.modules", file, f"{path}: cannot decompress: {e}") from None
        info = modinfo(data)
        if info is not None and "depends" in info:
            depends = tuple(canonical(d) for v in info["depends"] for d in v.split(",") if d)
        else:
            if dep_fallback is None:
                dep_fallback = _modules_dep(modules_dir)
            depends = dep_fallback.get(name, ())
        for dep in depends:
            load(dep, (*chain, name))
        rel = strip_suffix(str(path.relative_to(modules_dir)))
        module = Module(name=name, source=path, rel=rel, depends=depends, data=data)
        loaded[name] = module
        order.append(module)

    for name in names:
        load(canonical(name), ())
    return ModulePlan(release=release_of(modules_dir, order), modules=tuple(order),
                      builtin=tuple(skipped))
