"""Freeze kestrel into a self-contained tree that runs as PID 1 in an image with no Python.

The tree holds a relocated copy of Debian's python3.11 (libpython linked in) under
/opt/kestrel, a ``._pth`` file that fixes sys.path, two zips of -OO bytecode (exactly the
stdlib modules kestrel and its dependencies import, the pure-Python dependencies, stubs
for what kestrel never calls, and kestrel itself; the first zip holds only what runs
before the workload's spawn), the C-extension packages and lib-dynload modules on disk, the
glibc closure at Debian's paths, and /bin/kestrel, a two-line script the shim execs.

This module lays the tree out and caches it; builder/freeze_select.py picks the files
and builder/freeze_write.py writes them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import kestrel
from builder.freeze_edits import STUBBED
from builder.freeze_select import (
    DEPENDENCIES,
    EXTRA_STDLIB,
    PYTHON,
    FreezeError,
    Source,
    data_file,
    dependency_files,
    edited_source,
    imported_names,
    kestrel_sources,
    probe_imports,
    stdlib_selection,
)
from builder.freeze_write import (
    check_closure,
    compile_sources,
    copy_file,
    install_extension,
    install_libraries,
    smoke_test,
    write_zip,
)
from kestrel.digest import sha256_file

log = logging.getLogger(__name__)

# Bump when the layout or anything else that changes the output without changing the
# inputs hashed in _cache_key changes.
FORMAT = "kestrel-freeze-7"

PY_TAG = "python3.11"
PREFIX = PurePosixPath("/opt/kestrel")
ZIP_NAME = "python311.zip"  # the name CPython itself would look for under lib/
# Everything else: read only once the workload runs. Each zip's directory is
# parsed in Python on its first use (0.6 ms for the 215 entries of one
# zip, on every boot): the first zip holds only what runs before the spawn.
AGENT_ZIP_NAME = "agent.zip"
BOOT_TOPS = frozenset({"kestrel", "encodings", "__future__"})

__all__ = ["PREFIX", "PYTHON", "PY_TAG", "FreezeError", "FrozenAgent", "Source", "freeze_kestrel"]


@dataclass(frozen=True)
class FrozenAgent:
    root: Path  # merge at the image root: bin/kestrel, opt/kestrel/, lib/, lib64/
    version: str


# ---- the whole freeze ---------------------------------------------------------------


def _import_names(kestrel_files: list[Source]) -> list[str]:
    """Every kestrel module and dependency, by import name: the probe and the smoke
    test import them all (a broken one is a build error), except __main__ modules,
    which run the agent when imported."""
    names = [s.rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
             for s in kestrel_files if not s.rel.endswith("__main__.py")]
    return names + [t for ts in DEPENDENCIES.values() for t in ts]


def _cache_key(python: Path, kestrel_files: list[Source],
               deps: dict[str, tuple[str, list[Source]]]) -> str:
    h = hashlib.sha256()

    def feed(*parts: str) -> None:
        for p in parts:
            h.update(p.encode() + b"\0")

    feed(FORMAT, sha256_file(python))
    # The freeze's own code changes its output as much as its inputs do.
    for name in ("freeze.py", "freeze_edits.py", "freeze_select.py", "freeze_write.py"):
        feed(sha256_file(Path(__file__).with_name(name)))
    for name in ("freeze_probe.py", "ssl_stub.py", *sorted(set(STUBBED.values()))):
        feed(name, sha256_file(data_file(name)))
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
        smoke_test(root / str(PREFIX).lstrip("/") / "bin" / PY_TAG, _import_names(kestrel_files))
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
    deps = {name: (version, [edited_source(s, work) for s in files])
            for name, (version, files) in deps.items()}
    for _, files in deps.values():
        for src in files:
            copy_file(src.path, site / src.rel, mode=0o644)
    copy_file(data_file("ssl_stub.py"), site / "ssl.py", mode=0o644)
    kestrel_root = Path(kestrel.__file__).parent.parent
    required = _import_names(kestrel_files)
    optional = sorted(imported_names(kestrel_files)) + list(EXTRA_STDLIB)
    modules = probe_imports(python, path=[site, kestrel_root], required=required,
                            optional=optional)
    std_sources, dynload = stdlib_selection(modules, stdlib=stdlib)
    std_sources = [edited_source(s, work) for s in std_sources]

    # 2. Packages with C extensions stay on disk (extensions cannot load from a zip);
    #    everything else, bytecode only, goes into one zip.
    on_disk = {s.rel.split("/")[0] for _, fs in deps.values() for s in fs
               if s.rel.endswith(".so")}
    zipped: list[Source] = list(std_sources) + list(kestrel_files)
    zipped.append(Source(data_file("ssl_stub.py"), "ssl.py"))
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
    #    lib-dynload comes before agent.zip: the boot path's one extension
    #    (_json, for the manifest) is then found without a zipimporter parsing
    #    agent.zip's directory before the spawn (-0.5 ms of bench P1).
    exe = opt / "bin" / PY_TAG
    copy_file(python, exe, mode=0o755)
    (opt / "bin" / f"{PY_TAG}._pth").write_text(
        f"../lib/{ZIP_NAME}\n../lib/lib-dynload\n../lib/{AGENT_ZIP_NAME}\n"
        "../lib/site-packages\n"
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

