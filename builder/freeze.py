"""Freeze kestrel into a self-contained tree that runs as PID 1 in an image with no Python.

The tree holds a relocated copy of Debian's python3.11 (libpython linked in) under
/opt/kestrel, a ``._pth`` file that fixes sys.path, two zips of -OO bytecode (exactly the
stdlib modules kestrel and its dependencies import, the pure-Python dependencies, stubs
for what kestrel never calls, and kestrel itself; the first zip holds only what runs
before the workload's spawn), the C-extension packages and lib-dynload modules on disk, the
glibc closure at Debian's paths, and /bin/kestrel, a two-line script the shim execs.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import kestrel
from builder import elf, freeze_edits
from builder.freeze_edits import STUBBED, EditError, edited
from kestrel.digest import sha256_file

log = logging.getLogger(__name__)

# Bump when the layout or anything else that changes the output without changing the
# inputs hashed in _cache_key changes.
FORMAT = "kestrel-freeze-6"

PYTHON = Path("/usr/bin/python3.11")
PY_TAG = "python3.11"
PREFIX = PurePosixPath("/opt/kestrel")
ZIP_NAME = "python311.zip"  # the name CPython itself would look for under lib/
# Everything else: read only once the workload runs. Each zip's directory is
# parsed in Python on its first use (0.6 ms for the 215 entries of one
# zip, on every boot): the first zip holds only what runs before the spawn.
AGENT_ZIP_NAME = "agent.zip"
BOOT_TOPS = frozenset({"kestrel", "encodings", "__future__"})
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

# Zip entries carry this date (the zip format's earliest; matches the cpio's idea of
# fixed timestamps without depending on SOURCE_DATE_EPOCH).
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class FreezeError(Exception):
    """Freezing kestrel failed; the message names the file, module or tool at fault."""


@dataclass(frozen=True)
class FrozenAgent:
    root: Path  # merge at the image root: bin/kestrel, opt/kestrel/, lib/, lib64/
    version: str


@dataclass(frozen=True)
class Source:
    """One Python file to compile into the bundle: *rel* is its module path (a/b.py)."""

    path: Path
    rel: str


# ---- inputs -----------------------------------------------------------------------


def _data(name: str) -> Path:
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


def _edited(src: Source, work: Path) -> Source:
    """The bundle's version of a file: a stub, an edited copy, or the file itself."""
    try:
        return Source(edited(src.rel, src.path, work=work, data=_data), src.rel)
    except EditError as exc:
        raise FreezeError(str(exc)) from None


# ---- steps ------------------------------------------------------------------------


def _run_python(python: Path, args: list[str], *, what: str,
                flags: tuple[str, ...] = ()) -> str:
    cmd = [str(python), "-I", "-S", *flags, str(_data("freeze_probe.py")), *args]
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
    out = _run_python(
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


def compile_sources(python: Path, items: list[tuple[Source, Path, str]], *, work: Path) -> None:
    """Compile (source, destination .pyc, in-bundle file name) with the frozen interpreter."""
    config = work / "compile.json"
    config.write_text(json.dumps({"files": [[str(s.path), str(d), f] for s, d, f in items]}))
    for _, dst, _ in items:
        dst.parent.mkdir(parents=True, exist_ok=True)
    # no_debug_ranges: line numbers without column ranges in the location
    # tables (tracebacks lose their ^^^ markers): -11% bytecode, and less of
    # PID 1's memory holds code objects.
    _run_python(python, ["compile", str(config)], what="bytecode compilation",
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


def smoke_test(root: Path, kestrel_files: list[Source]) -> None:
    """Start the bundled interpreter from the tree and import every kestrel module and
    dependency, so a bundle that cannot import never reaches an image. It runs with the
    build host's glibc (the same files the tree holds); tests/test_freeze.py proves the
    tree also runs in an empty root."""
    names = [s.rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
             for s in kestrel_files if not s.rel.endswith("__main__.py")]
    names += [t for ts in DEPENDENCIES.values() for t in ts]
    exe = root / str(PREFIX).lstrip("/") / "bin" / PY_TAG
    code = f"for n in {names!r}: __import__(n)\nimport encodings.idna"
    proc = subprocess.run([str(exe), "-IOO", "-c", code], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise FreezeError(f"the frozen interpreter cannot import kestrel:\n{tail}")


# ---- the whole freeze ---------------------------------------------------------------


def _cache_key(python: Path, kestrel_files: list[Source],
               deps: dict[str, tuple[str, list[Source]]]) -> str:
    h = hashlib.sha256()

    def feed(*parts: str) -> None:
        for p in parts:
            h.update(p.encode() + b"\0")

    feed(FORMAT, sha256_file(Path(__file__)), sha256_file(Path(freeze_edits.__file__)),
         sha256_file(python))
    for name in ("freeze_probe.py", "ssl_stub.py", *sorted(set(STUBBED.values()))):
        feed(name, sha256_file(_data(name)))
    for src in kestrel_files:
        feed(src.rel, sha256_file(src.path))
    for dist, (version, files) in sorted(deps.items()):
        feed(dist, version, *(f"{s.rel}={sha256_file(s.path)}" for s in files))
    return h.hexdigest()


def freeze_kestrel(*, cache_dir: Path, python: Path = PYTHON) -> FrozenAgent:
    """Return the frozen kestrel tree for the current sources, building it on a miss."""
    if not python.is_file():
        raise FreezeError(f"{python} not found: install Debian's python3.11 (apt python3)")
    kestrel_files = kestrel_sources()
    deps = {name: dependency_files(name) for name in DEPENDENCIES}
    key = _cache_key(python, kestrel_files, deps)
    out = cache_dir / "frozen" / key[:24]
    if (out / "root").is_dir():
        return FrozenAgent(root=out / "root", version=kestrel.__version__)
    log.info("Freezing kestrel %s with %s", kestrel.__version__, python)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="freeze-", dir=out) as tmp:
        root = Path(tmp) / "root"
        _build(root, Path(tmp) / "work", python=python, kestrel_files=kestrel_files,
               deps=deps)
        check_closure(root)
        smoke_test(root, kestrel_files)
        os.replace(root, out / "root")
    return FrozenAgent(root=out / "root", version=kestrel.__version__)


def _build(root: Path, work: Path, *, python: Path, kestrel_files: list[Source],
           deps: dict[str, tuple[str, list[Source]]]) -> None:
    opt = root / str(PREFIX).lstrip("/")
    lib = opt / "lib"
    stdlib = python.resolve().parent.parent / "lib" / PY_TAG

    # 1. Stage the dependencies and the ssl stub the way the bundle will see them,
    #    then ask the interpreter what importing kestrel really loads.
    site = work / "site"
    deps = {name: (version, [_edited(s, work) for s in files])
            for name, (version, files) in deps.items()}
    for _, files in deps.values():
        for src in files:
            copy_file(src.path, site / src.rel, mode=0o644)
    copy_file(_data("ssl_stub.py"), site / "ssl.py", mode=0o644)
    kestrel_root = Path(kestrel.__file__).parent.parent
    # Every kestrel module is imported (a broken one is a build error), except
    # __main__ modules, which run the agent when imported.
    names = [s.rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
             for s in kestrel_files]
    required = [n for n in names if not n.endswith("__main__")]
    required += [t for ts in DEPENDENCIES.values() for t in ts]
    optional = sorted(imported_names(kestrel_files)) + list(EXTRA_STDLIB)
    modules = probe_imports(python, path=[site, kestrel_root], required=required,
                            optional=optional)
    std_sources, dynload = stdlib_selection(modules, stdlib=stdlib)
    std_sources = [_edited(s, work) for s in std_sources]

    # 2. Packages with C extensions stay on disk (extensions cannot load from a zip);
    #    everything else, bytecode only, goes into one zip.
    on_disk = {s.rel.split("/")[0] for _, fs in deps.values() for s in fs
               if s.rel.endswith(".so")}
    zipped: list[Source] = list(std_sources) + list(kestrel_files)
    zipped.append(Source(_data("ssl_stub.py"), "ssl.py"))
    disk: list[Source] = []
    for _, files in deps.values():
        for src in files:
            (disk if src.rel.split("/")[0] in on_disk else zipped).append(src)

    pyc_dir = work / "pyc"
    items: list[tuple[Source, Path, str]] = []
    members: dict[str, Path] = {}
    agent_members: dict[str, Path] = {}
    for src in zipped:
        pyc = src.rel.removesuffix(".py") + ".pyc"
        boot = src.rel.split("/")[0].removesuffix(".py") in BOOT_TOPS
        name = ZIP_NAME if boot else AGENT_ZIP_NAME
        items.append((src, pyc_dir / pyc, f"{PREFIX}/lib/{name}/{src.rel}"))
        (members if boot else agent_members)[pyc] = pyc_dir / pyc
    for src in disk:
        if src.rel.endswith(".so"):
            install_extension(src.path, lib / "site-packages" / src.rel)
            continue
        pyc = src.rel.removesuffix(".py") + ".pyc"
        items.append((src, lib / "site-packages" / pyc, f"{PREFIX}/lib/site-packages/{src.rel}"))
    compile_sources(python, items, work=work)
    for _, dst, _ in items:
        if dst.is_relative_to(lib):
            dst.chmod(0o644)
    write_zip(lib / ZIP_NAME, members)
    write_zip(lib / AGENT_ZIP_NAME, agent_members)
    for so in dynload:
        copy_file(so, lib / "lib-dynload" / so.name, mode=0o755)

    # 3. The interpreter and its ._pth: CPython 3.11 reads "<executable>._pth" next to
    #    the real executable; its presence also means -I semantics and no site.
    exe = opt / "bin" / PY_TAG
    copy_file(python, exe, mode=0o755)
    (opt / "bin" / f"{PY_TAG}._pth").write_text(
        f"../lib/{ZIP_NAME}\n../lib/{AGENT_ZIP_NAME}\n../lib/site-packages\n"
        "../lib/lib-dynload\n"
    )
    (opt / "VERSION").write_text(kestrel.__version__ + "\n")
    for dest in (opt / "bin" / f"{PY_TAG}._pth", opt / "VERSION"):
        dest.chmod(0o644)

    # 4. The agent entry point the shim execs. -I: ignore PYTHON* variables from the
    #    kernel command line; -OO: match the bytecode. Linux passes one shebang
    #    argument, so the flags are one word.
    agent = root / "bin" / "kestrel"
    agent.parent.mkdir(parents=True, exist_ok=True)
    agent.write_text(f"#!{PREFIX}/bin/{PY_TAG} -IOO\nfrom kestrel.main import main\nmain()\n")
    agent.chmod(0o755)

    # 5. glibc and friends for the interpreter and every extension module.
    binaries = [exe, *sorted(p for p in lib.rglob("*.so"))]
    install_libraries(root, binaries)

