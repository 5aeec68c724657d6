"""What goes into the frozen kestrel: kestrel's own files, its dependencies'
files (stubbed or edited by builder/freeze_edits.py), and the stdlib modules a
probe under the interpreter being frozen finds that importing them loads.
"""

from __future__ import annotations

import ast
import importlib.metadata
import logging
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import kestrel
from builder.freeze_edits import EditError, edited

log = logging.getLogger("builder.freeze")

# The interpreter that is frozen, and the extension-module names it loads.
PYTHON = Path("/usr/bin/python3.11")
EXT_SUFFIXES = (".cpython-311-x86_64-linux-gnu.so", ".abi3.so")

# Distribution name -> import names: kestrel's dependencies and theirs (trio needs
# attrs, outcome, sniffio, sortedcontainers, idna).
DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "trio": ("trio",),
    "outcome": ("outcome",),
    "sniffio": ("sniffio",),
    "sortedcontainers": ("sortedcontainers",),
    "idna": ("idna",),
    "attrs": ("attr", "attrs"),
    "msgpack": ("msgpack",),
    "h11": ("h11",),
}

# Imported at run time by the interpreter or on paths the import probe does not take.
# Codecs are looked up by name (encodings.search_function): _socket.getaddrinfo
# encodes every str host with "idna", even "127.0.0.1" (found by a VM test: health
# probes died with "unknown encoding: idna"); open() and bytes.decode may name the
# others. traceback/linecache print kestrel's panic.
EXTRA_STDLIB = (
    "encodings.idna",
    "encodings.punycode",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.utf_8_sig",
    "encodings.utf_16",
    "encodings.utf_32",
    "encodings.unicode_escape",
    "encodings.raw_unicode_escape",
    "traceback",
    "linecache",
)

# Never shipped. ssl: replaced by the stub. The others are optional imports inside
# try/except ImportError in the stdlib (hashlib and hmac fall back to the built-in
# _sha*/_md5; shutil only loses bz2/xz archives) and would bring libcrypto, libbz2 and
# liblzma into the image.
EXCLUDED_TOP = frozenset(
    {"ssl", "_ssl", "_hashlib", "bz2", "_bz2", "lzma", "_lzma", "__main__"}
)
SKIP_DIRS = frozenset({"__pycache__", "_tests", "tests", "testing"})

class FreezeError(Exception):
    """Freezing kestrel failed; the message names the file, module or tool at fault."""


@dataclass(frozen=True)
class Source:
    """One Python file to compile into the bundle: *rel* is its module path (a/b.py)."""

    path: Path
    rel: str


# ---- inputs -----------------------------------------------------------------------


def data_file(name: str) -> Path:
    return Path(str(resources.files("builder").joinpath("data", name)))


def kestrel_sources() -> list[Source]:
    pkg = Path(kestrel.__file__).parent
    return sorted(
        (Source(p, p.relative_to(pkg.parent).as_posix()) for p in pkg.rglob("*.py")
         if not SKIP_DIRS.intersection(p.relative_to(pkg).parts)),
        key=lambda s: s.rel,
    )


def dependency_files(dist_name: str) -> tuple[str, list[Source]]:
    """The installed version of a dependency and its importable files (.py and .so)."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FreezeError(f"dependency {dist_name} is not installed for the builder") from exc
    tops = DEPENDENCIES[dist_name]
    files: list[Source] = []
    for f in dist.files or ():
        parts = PurePosixPath(str(f)).parts
        stem = parts[0].removesuffix(".py")
        if stem not in tops or SKIP_DIRS.intersection(parts):
            continue
        if f.name.endswith(".so") and not f.name.endswith(EXT_SUFFIXES):
            raise FreezeError(
                f"{dist_name}: {f} is not built for CPython 3.11 x86_64; install the "
                f"dependencies with a Python 3.11 (the frozen interpreter is {PYTHON})"
            )
        if f.suffix in (".py", ".so"):
            files.append(Source(Path(str(dist.locate_file(f))), PurePosixPath(str(f)).as_posix()))
    if not files:
        raise FreezeError(f"dependency {dist_name}: no files found for {', '.join(tops)}")
    return dist.version, sorted(files, key=lambda s: s.rel)


def imported_names(sources: Iterable[Source]) -> set[str]:
    """Every module named by an import statement anywhere in *sources*, function bodies
    included: kestrel imports some modules lazily (ctypes, json) to keep boot lean."""
    names: set[str] = set()
    for src in sources:
        tree = ast.parse(src.path.read_bytes(), filename=str(src.path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    return {n for n in names if n.split(".")[0] not in ("kestrel", "__future__")}


def edited_source(src: Source, work: Path) -> Source:
    """The bundle's version of a file: a stub, an edited copy, or the file itself."""
    try:
        return Source(edited(src.rel, src.path, work=work, data=data_file), src.rel)
    except EditError as exc:
        raise FreezeError(str(exc)) from None


# ---- the import probe ------------------------------------------------------------


def run_python(python: Path, args: list[str], *, what: str,
                flags: tuple[str, ...] = ()) -> str:
    cmd = [str(python), "-I", "-S", *flags, str(data_file("freeze_probe.py")), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except OSError as exc:
        raise FreezeError(f"{what}: cannot run {python}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise FreezeError(f"{what} failed under {python} (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def probe_imports(python: Path, *, path: list[Path], required: list[str],
                  optional: list[str]) -> dict[str, tuple[str | None, bool]]:
    """Import the targets in a clean interpreter; return module -> (origin, is_package)."""
    out = run_python(
        python,
        ["probe", ":".join(map(str, path)), ",".join(required), ",".join(optional)],
        what="import probe",
    )
    result = ast.literal_eval(out)
    for name, why in sorted(result["failed"].items()):
        log.debug("optional import %s skipped: %s", name, why)
    modules: dict[str, tuple[str | None, bool]] = result["modules"]
    return modules


def stdlib_selection(modules: dict[str, tuple[str | None, bool]], *, stdlib: Path
                     ) -> tuple[list[Source], list[Path]]:
    """Split the probe's answer into stdlib sources to compile and lib-dynload modules."""
    sources: list[Source] = []
    dynload: list[Path] = []
    for name, (origin, _) in sorted(modules.items()):
        if origin is None or origin in ("built-in", "frozen"):
            continue
        if name.split(".")[0] in EXCLUDED_TOP:
            continue
        path = Path(origin)
        if not path.is_relative_to(stdlib):
            continue
        rel = path.relative_to(stdlib)
        if rel.parts[0] == "lib-dynload":
            dynload.append(path)
        elif path.suffix == ".py":
            sources.append(Source(path, rel.as_posix()))
    return sources, dynload
