"""ELF facts fledge needs: interpreter, DT_NEEDED, RUNPATH, and the library closure.

`read_elf` reads one file with pyelftools; `resolve_closure` checks that every ELF in an
image tree finds its interpreter and libraries *inside the tree* the way ld.so would;
`host_library_closure` says which build-host files to copy to fill the gaps.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from elftools.common.exceptions import ELFError
from elftools.construct.core import ConstructError
from elftools.elf.elffile import ELFFile

ELF_MAGIC = b"\x7fELF"
# ld.so's compiled-in search path on Debian x86_64 (plus the usual local dirs); used
# when no ld.so.cache exists, which is always the case in our images.
STANDARD_DIRS: tuple[str, ...] = (
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/lib",
    "/usr/lib",
    "/usr/local/lib",
)
_MAX_SYMLINK_HOPS = 40  # same limit as the kernel's MAXSYMLINKS


@dataclass(frozen=True)
class ElfInfo:
    path: Path
    interpreter: str | None
    needed: tuple[str, ...]
    runpath: tuple[str, ...]
    rpath: tuple[str, ...]
    is_static: bool
    machine: str
    elfclass: int = 64
    soname: str | None = None


@dataclass(frozen=True)
class Missing:
    soname: str  # a DT_NEEDED name, or the interpreter's absolute path
    needed_by: str  # image path of the ELF that needs it
    host_path: Path | None  # where the build host has it, if anywhere


@dataclass
class Closure:
    present: dict[str, str] = field(default_factory=dict)  # soname -> image path
    missing: list[Missing] = field(default_factory=list)
    elves: dict[str, ElfInfo] = field(default_factory=dict)  # image path -> info

    @property
    def ok(self) -> bool:
        return not self.missing


def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def read_elf(path: Path) -> ElfInfo | None:
    """Read the dynamic-linking facts of *path*; None if it is not a readable ELF file."""
    try:
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    info = _read_elf_cached(str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return None if info is None else dataclasses.replace(info, path=path)


@functools.lru_cache(maxsize=4096)
def _read_elf_cached(path: str, dev: int, ino: int, size: int, mtime: int) -> ElfInfo | None:
    # Keyed by identity and mtime: a closure check reads each library many times.
    del dev, ino, size, mtime
    try:
        with open(path, "rb") as f:
            if f.read(4) != ELF_MAGIC:
                return None
            f.seek(0)
            return _parse(Path(path), f)
    except (ELFError, OSError, ValueError, KeyError, AssertionError, ConstructError):
        # Truncated or exotic files: not something ld.so could run either.
        return None


def _parse(path: Path, f: BinaryIO) -> ElfInfo:
    # Only the ELF header and program headers are parsed (PT_INTERP, PT_DYNAMIC and the
    # PT_LOADs that map DT_STRTAB), as ld.so does: pyelftools' section iteration builds
    # every section (hash tables included) and took ~16 ms a file here.
    elf = ELFFile(f)
    interp: str | None = None
    tags: list[tuple[str, int]] = []
    seg: Any  # pyelftools' own hints miss the per-type attributes
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_INTERP":
            interp = str(seg.get_interp_name())
        elif seg["p_type"] == "PT_DYNAMIC":
            dyn = elf.structs.Elf_Dyn
            size = dyn.sizeof()
            f.seek(seg["p_offset"])
            raw = f.read(seg["p_filesz"])
            for i in range(0, len(raw) - size + 1, size):
                entry = dyn.parse(raw[i : i + size])
                if entry.d_tag == "DT_NULL":
                    break
                tags.append((str(entry.d_tag), int(entry.d_val)))
    strtab = next((v for t, v in tags if t == "DT_STRTAB"), None)
    offset = next(iter(elf.address_offsets(strtab)), None) if strtab is not None else None

    def string(at: int) -> str:
        if offset is None:
            raise ValueError("DT_STRTAB outside the loaded segments")
        f.seek(offset + at)
        chunk = f.read(4096)
        return chunk.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")

    needed = [string(v) for t, v in tags if t == "DT_NEEDED"]
    runpath = [p for t, v in tags if t == "DT_RUNPATH" for p in string(v).split(":") if p]
    rpath = [p for t, v in tags if t == "DT_RPATH" for p in string(v).split(":") if p]
    soname = next((string(v) for t, v in tags if t == "DT_SONAME"), None)
    return ElfInfo(
        path=path,
        interpreter=interp,
        needed=tuple(needed),
        runpath=tuple(runpath),
        rpath=tuple(rpath),
        is_static=interp is None and not needed,
        machine=str(elf["e_machine"]),
        elfclass=int(elf.elfclass),
        soname=soname,
    )


def requirements(info: ElfInfo) -> list[str]:
    """What must be present for *info* to run: its interpreter (unless it is a library:
    libc.so.6 carries a PT_INTERP for running it directly, which ld.so ignores when it
    loads libc as a dependency) and its DT_NEEDED names."""
    interp = [info.interpreter] if info.interpreter and info.soname is None else []
    return interp + list(info.needed)


def resolve_in_root(root: Path, image_path: str) -> Path | None:
    """The real file *image_path* names inside *root*, following symlinks as if *root*
    were "/" (absolute targets stay inside), or None if it does not exist."""
    if root == Path("/"):
        real = Path(os.path.realpath(image_path))
        return real if real.exists() else None
    parts = list(PurePosixPath("/", image_path).parts[1:])
    current: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            if current:
                current.pop()
            continue
        candidate = root.joinpath(*current, name)
        if candidate.is_symlink():
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = []
            parts = list(PurePosixPath(target).parts) + parts
            if parts and parts[0] == "/":
                parts.pop(0)
            continue
        if not candidate.exists():
            return None
        current.append(name)
    return root.joinpath(*current)


def _search_dirs(info: ElfInfo, image_path: str, extra: Sequence[Path]) -> Iterator[str]:
    origin = str(PurePosixPath(image_path).parent)

    def expand(entry: str) -> str:
        return entry.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)

    # DT_RUNPATH, when present, makes ld.so ignore DT_RPATH.
    for entry in info.runpath or info.rpath:
        yield expand(entry)
    for d in extra:
        yield str(d)
    yield from STANDARD_DIRS


def _compatible(candidate: Path, needer: ElfInfo) -> bool:
    # ld.so skips libraries of the wrong class/machine (e.g. a 32-bit libc in /lib).
    info = read_elf(candidate)
    return info is not None and (info.machine, info.elfclass) == (
        needer.machine,
        needer.elfclass,
    )


def find_library(
    soname: str,
    needer: ElfInfo,
    *,
    needer_image_path: str,
    root: Path,
    extra_search: Sequence[Path] = (),
) -> tuple[str, Path] | None:
    """Search like ld.so; returns (image path as found, real file) or None."""
    if "/" in soname:
        real = resolve_in_root(root, soname)
        return (soname, real) if real is not None and real.is_file() else None
    for d in _search_dirs(needer, needer_image_path, extra_search):
        image_path = os.path.normpath(str(PurePosixPath("/", d) / soname))
        real = resolve_in_root(root, image_path)
        if real is not None and real.is_file() and _compatible(real, needer):
            return image_path, real
    return None


def _image_path(path: Path, root: Path) -> str:
    try:
        return "/" + str(path.relative_to(root)) if path.is_absolute() else str(path)
    except ValueError:
        return str(PurePosixPath("/", path))


def resolve_closure(
    files: Iterable[Path], *, root: Path, extra_search: Sequence[Path] = ()
) -> Closure:
    """Check that every ELF among *files* (paths under *root*, or image-absolute paths)
    finds its interpreter and DT_NEEDED libraries, recursively, inside *root*."""
    closure = Closure()
    queue: list[tuple[str, Path]] = []
    for f in files:
        image_path = _image_path(f, root)
        if image_path in ("/.", "/"):
            continue
        real = root / image_path.lstrip("/")
        queue.append((image_path, real))
    seen: set[str] = set()
    loaded: dict[str, str] = {}
    while queue:
        image_path, real = queue.pop(0)
        if image_path in seen:
            continue
        seen.add(image_path)
        info = read_elf(real)
        if info is None:
            continue
        closure.elves[image_path] = info
        if info.soname:
            loaded.setdefault(info.soname, image_path)
        wanted = requirements(info)
        for soname in wanted:
            if soname in loaded:
                # ld.so satisfies DT_NEEDED by the DT_SONAME of an already loaded
                # object (libc's NEEDED ld-linux-x86-64.so.2 is the interpreter).
                closure.present.setdefault(soname, loaded[soname])
                continue
            found = find_library(
                soname,
                info,
                needer_image_path=image_path,
                root=root,
                extra_search=extra_search,
            )
            if found is not None:
                closure.present.setdefault(soname, found[0])
                queue.append(found)
                continue
            host = find_library(
                soname, info, needer_image_path=image_path, root=Path("/"),
                extra_search=extra_search,
            )
            closure.missing.append(
                Missing(soname=soname, needed_by=image_path, host_path=host[1] if host else None)
            )
    return closure


def host_library_closure(items: Iterable[str | Path]) -> dict[str, Path]:
    """Build-host files to copy so the given sonames (str; an absolute str is an
    interpreter path) or binaries (Path; their own file is not included) run.

    Returns image destination -> host source. The source is the symlink-resolved real
    file; the destination keeps the soname as its name in the host directory where
    ld.so found it, and interpreters stay at their PT_INTERP path."""
    result: dict[str, Path] = {}
    probe = ElfInfo(
        path=Path("/"), interpreter=None, needed=(), runpath=(), rpath=(),
        is_static=True, machine="EM_X86_64", elfclass=64,
    )
    pending: list[tuple[str, ElfInfo, str]] = []
    for item in items:
        if isinstance(item, Path):
            info = read_elf(item)
            if info is None:
                continue
            probe = info
            for soname in requirements(info):
                pending.append((soname, info, str(item)))
        else:
            pending.append((item, probe, "/"))
    done: set[str] = set()
    while pending:
        soname, needer, needer_path = pending.pop(0)
        if soname in done:
            continue
        done.add(soname)
        found = find_library(soname, needer, needer_image_path=needer_path, root=Path("/"))
        if found is None:
            continue
        dest, real = found
        result.setdefault(dest, real)
        info = read_elf(real)
        if info is not None:
            if info.soname:
                done.add(info.soname)
            for sub in requirements(info):
                pending.append((sub, info, dest))
    return result
