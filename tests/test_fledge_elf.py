"""ELF facts and library closures, on binaries gcc builds here and on Debian's caddy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from builder.elf import host_library_closure, read_elf, resolve_closure, resolve_in_root


def _gcc() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip(reason="needs gcc (apt-get install gcc libc6-dev)")
    return gcc


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A dynamic program with RUNPATH $ORIGIN/../lib and its library libgreet.so."""
    gcc = _gcc()
    work = tmp_path_factory.mktemp("elf")
    (work / "greet.c").write_text('#include <stdio.h>\nvoid greet(void){puts("hi");}\n')
    (work / "hello.c").write_text("void greet(void);\nint main(void){greet();return 0;}\n")
    lib = work / "libgreet.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-Wl,-soname,libgreet.so", "-o", str(lib),
                    str(work / "greet.c")], check=True)
    exe = work / "hello"
    subprocess.run([gcc, "-o", str(exe), str(work / "hello.c"), f"-L{work}", "-lgreet",
                    "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib"], check=True)
    return exe, lib


def _image(root: Path, exe: Path, lib: Path | None) -> None:
    (root / "app/bin").mkdir(parents=True)
    shutil.copy(exe, root / "app/bin/hello")
    if lib is not None:
        (root / "app/lib").mkdir()
        shutil.copy(lib, root / "app/lib/libgreet.so")


def test_read_elf_reports_dynamic_linking(hello: tuple[Path, Path]) -> None:
    exe, _ = hello
    info = read_elf(exe)
    assert info is not None
    assert info.interpreter == "/lib64/ld-linux-x86-64.so.2"
    assert info.needed == ("libgreet.so", "libc.so.6")
    assert info.runpath == ("$ORIGIN/../lib",) and not info.is_static
    assert info.machine == "EM_X86_64"


def test_read_elf_on_static_and_non_elf_files(tmp_path: Path) -> None:
    text = tmp_path / "t"
    text.write_text("#!/bin/sh\n")
    assert read_elf(text) is None
    assert read_elf(tmp_path) is None
    (tmp_path / "short").write_bytes(b"\x7fELF\x02")
    assert read_elf(tmp_path / "short") is None
    if Path("/bin/busybox").is_file():
        bb = read_elf(Path("/bin/busybox"))
        assert bb is not None and bb.is_static and bb.interpreter is None


def test_closure_follows_runpath_origin_and_finds_what_is_missing(
    tmp_path: Path, hello: tuple[Path, Path]
) -> None:
    exe, lib = hello
    _image(tmp_path, exe, lib)
    closure = resolve_closure([tmp_path / "app/bin/hello"], root=tmp_path)
    assert closure.present["libgreet.so"] == "/app/lib/libgreet.so"
    missing = {m.soname: m for m in closure.missing}
    assert set(missing) == {"/lib64/ld-linux-x86-64.so.2", "libc.so.6"}
    libc_users = {m.needed_by for m in closure.missing if m.soname == "libc.so.6"}
    assert libc_users == {"/app/bin/hello", "/app/lib/libgreet.so"}
    assert missing["libc.so.6"].host_path is not None

    for dest, src in host_library_closure(sorted(missing)).items():
        target = tmp_path / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    closure = resolve_closure([Path("/app/bin/hello")], root=tmp_path)  # image paths work too
    assert closure.ok, closure.missing


def test_missing_library_unknown_to_the_host(tmp_path: Path, hello: tuple[Path, Path]) -> None:
    exe, _ = hello
    _image(tmp_path, exe, None)
    closure = resolve_closure([tmp_path / "app/bin/hello"], root=tmp_path)
    greet = next(m for m in closure.missing if m.soname == "libgreet.so")
    assert greet.host_path is None


def test_symlinks_resolve_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/libx.so.1.2").write_bytes(b"x")
    (tmp_path / "lib").symlink_to("/usr/lib")  # absolute: must stay inside tmp_path
    (tmp_path / "usr/lib/libx.so.1").symlink_to("../../../../../usr/lib/libx.so.1.2")
    assert resolve_in_root(tmp_path, "/lib/libx.so.1") == tmp_path / "usr/lib/libx.so.1.2"
    (tmp_path / "loop").symlink_to("loop")
    assert resolve_in_root(tmp_path, "/loop") is None
    assert resolve_in_root(tmp_path, "/nope/x") is None


def test_host_closure_of_debian_caddy() -> None:
    caddy = Path("/usr/bin/caddy")
    if not caddy.is_file():
        pytest.skip(reason="needs Debian's dynamic caddy (apt-get install caddy)")
    files = host_library_closure([caddy])
    assert "/lib64/ld-linux-x86-64.so.2" in files  # the interpreter at its PT_INTERP path
    names = {Path(d).name for d in files}
    assert {"libzstd.so.1", "libc.so.6"} <= names
    assert all(src.is_file() and not src.is_symlink() for src in files.values())
    # libc's own NEEDED ld-linux-x86-64.so.2 is the interpreter: not copied twice.
    assert sum(1 for d in files if Path(d).name == "ld-linux-x86-64.so.2") == 1
