"""fledge's newc writer: what GNU cpio and the kernel read, byte-for-byte stable."""

from __future__ import annotations

import io
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder import compress, cpio


def _entries(tmp_path: Path) -> list[cpio.Entry]:
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * 4099)  # not a multiple of 4: padding matters
    return [
        cpio.regular("usr/bin/app", 0o755, source=big),
        cpio.directory("usr/bin"),
        cpio.directory("usr"),
        cpio.symlink("bin/sh", "busybox"),
        cpio.directory("bin"),
        cpio.regular("etc/a", 0o644, data=b"abc"),
        cpio.directory("etc"),
    ]


def test_roundtrip_keeps_everything_and_sorts_parents_first(tmp_path: Path) -> None:
    out = io.BytesIO()
    n = cpio.write_archive(_entries(tmp_path), out, mtime=42)
    assert n == len(out.getvalue()) and n % 4 == 0
    out.seek(0)
    got = list(cpio.read_archive(out))
    assert [m.name for m in got] == ["bin", "bin/sh", "etc", "etc/a", "usr", "usr/bin",
                                     "usr/bin/app"]
    by = {m.name: m for m in got}
    assert by["usr/bin/app"].data == (tmp_path / "big").read_bytes()
    assert by["bin/sh"].mode == stat.S_IFLNK | 0o777 and by["bin/sh"].data == b"busybox"
    assert by["etc/a"].perm == 0o644 and by["usr"].nlink == 2
    assert {m.mtime for m in got} == {42}
    assert [m.ino for m in got] == list(range(1, 8))


def test_gnu_cpio_lists_and_extracts_it(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.skip(reason="needs GNU cpio (apt-get install cpio)")
    archive = tmp_path / "a.cpio"
    with archive.open("wb") as f:
        cpio.write_archive(_entries(tmp_path), f)
    listing = subprocess.run(["cpio", "-itv", "--quiet"], stdin=archive.open("rb"),
                             capture_output=True, text=True, check=True).stdout
    assert "lrwxrwxrwx   1 root     root            7 Jan  1  2024 bin/sh -> busybox" in listing
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], stdin=archive.open("rb"), cwd=dest, check=True)
    assert (dest / "usr/bin/app").read_bytes() == (tmp_path / "big").read_bytes()
    assert (dest / "usr/bin/app").stat().st_mtime == cpio.DEFAULT_MTIME


def test_duplicates_and_bad_entries_are_refused(tmp_path: Path) -> None:
    with pytest.raises(cpio.CpioError, match="duplicate"):
        cpio.write_archive([cpio.directory("a"), cpio.directory("/a")], io.BytesIO())
    with pytest.raises(ValueError):
        cpio.regular("x", 0o644)
    with pytest.raises(cpio.CpioError, match="only directories"):
        cpio.write_archive([cpio.Entry(name="dev/null", mode=stat.S_IFCHR | 0o666)],
                           io.BytesIO())


def test_file_that_changes_size_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"1234")

    class Grower(io.BytesIO):
        def write(self, b: object) -> int:
            if f.stat().st_size == 4:
                f.write_bytes(b"123456789")
            return super().write(b)  # type: ignore[arg-type]

    with pytest.raises(cpio.CpioError, match="changed size"):
        cpio.write_archive([cpio.regular("f", 0o644, source=f)], Grower())


def test_truncated_archive_is_an_error() -> None:
    out = io.BytesIO()
    cpio.write_archive([cpio.regular("a", 0o644, data=b"x" * 100)], out)
    with pytest.raises(cpio.CpioError, match="truncated"):
        list(cpio.read_archive(io.BytesIO(out.getvalue()[:150])))


@pytest.mark.parametrize("kind", ["gzip", "zstd", "none"])
def test_compressed_streams_read_back(tmp_path: Path, kind: str) -> None:
    if kind == "zstd" and shutil.which("zstd") is None:
        pytest.skip(reason="needs the zstd program (apt-get install zstd)")
    image = tmp_path / "img"
    with image.open("wb") as f, compress.compressor(f, kind) as stream:
        cpio.write_archive(_entries(tmp_path), stream)
    with compress.open_image(image) as stream:
        assert len(list(cpio.read_archive(stream))) == 7


names = st.lists(st.text(alphabet="abcxyz-_.", min_size=1, max_size=6)
                 .filter(lambda s: s not in (".", "..")), min_size=1, max_size=3)


@given(paths=st.lists(names, min_size=1, max_size=12, unique_by=tuple),
       data=st.binary(max_size=40), mtime=st.integers(0, 2**32 - 1))
def test_any_tree_roundtrips_identically(paths: list[list[str]], data: bytes,
                                         mtime: int) -> None:
    entries: dict[str, cpio.Entry] = {}
    for parts in paths:
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            entries.setdefault(d, cpio.directory(d))
        leaf = "/".join(parts)
        if leaf not in entries:
            entries[leaf] = cpio.regular(leaf, 0o644, data=data)
    # A name that is both a parent and a leaf is a directory.
    for name in list(entries):
        if any(other.startswith(name + "/") for other in entries):
            entries[name] = cpio.directory(name)
    a, b = io.BytesIO(), io.BytesIO()
    cpio.write_archive(list(entries.values()), a, mtime=mtime)
    cpio.write_archive(list(reversed(entries.values())), b, mtime=mtime)
    assert a.getvalue() == b.getvalue()
    a.seek(0)
    back = {m.name: m for m in cpio.read_archive(a)}
    assert set(back) == set(entries)
    for name, e in entries.items():
        assert back[name].mode == e.mode and back[name].mtime == mtime
        assert back[name].data == (e.data or b"")
