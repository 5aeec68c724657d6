"""Mappings can never reach outside the image: no `..`, no escaping or absolute symlinks
in copied directories, nothing placed through a symlink, no special files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from builder import cpio
from builder.build import BuildOptions, Progress, build
from builder.errors import FledgeError
from builder.tree import ImageTree, TreeError
from tests.fledge_helpers import members, need_busybox, offline_busybox, write_project

HEAD = ('version = "1"\nstrategy = "initramfs"\n[agent]\nsource_strategy = "local"\n'
        'path = "agent"\n[source]\nbusybox_url = "x"\n[kernel]\nmodules = []\n')


def _build(tmp_path: Path, mappings: str, setup: dict[str, bytes] | None = None) -> Path:
    bb = need_busybox()
    cfg = write_project(tmp_path, offline_busybox(HEAD) + "[mappings]\n" + mappings,
                        {"agent": bb, **(setup or {})})
    out = tmp_path / "out.cpio"
    build(BuildOptions(config_path=cfg, output=out, compression="none",
                       cache_dir=tmp_path / "cache"), progress=Progress(verbosity=0))
    return out


def _fails(tmp_path: Path, mappings: str) -> FledgeError:
    with pytest.raises(FledgeError) as err:
        _build(tmp_path, mappings, {"site/index.html": b"<p>hi</p>\n"})
    assert not (tmp_path / "out.cpio").exists()
    return err.value


def test_absolute_symlink_in_a_mapped_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "passwd").symlink_to("/etc/passwd")
    err = _fails(tmp_path, '"site" = "/var/www"\n')
    assert err.key == "mappings" and "absolute symlink" in err.message


def test_symlink_escaping_the_mapped_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "site" / "a").mkdir(parents=True)
    (tmp_path / "site" / "a" / "up").symlink_to("../../agent")
    err = _fails(tmp_path, '"site" = "/var/www"\n')
    assert "points outside the mapped directory" in err.message


def test_dotdot_destination_is_refused(tmp_path: Path) -> None:
    err = _fails(tmp_path, '"site" = "/var/../../../tmp/pwned"\n')
    assert err.key == 'mappings."site"' and "'..'" in err.message


def test_nothing_is_placed_through_a_symlink(tmp_path: Path) -> None:
    # /bin/sh is a busybox symlink: a file "under" it would land wherever it points.
    err = _fails(tmp_path, '"site/index.html" = "/bin/sh/index.html"\n')
    assert "/bin/sh is a symlink in the image" in err.message


def test_a_directory_symlink_from_one_mapping_does_not_redirect_another(tmp_path: Path) -> None:
    (tmp_path / "site" / "real").mkdir(parents=True)
    (tmp_path / "site" / "link").symlink_to("real")
    err = _fails(tmp_path, '"site" = "/srv"\n"agent" = "/srv/link/agent"\n')
    assert "/srv/link is a symlink" in err.message


def test_special_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    os.mkfifo(tmp_path / "site" / "fifo")
    err = _fails(tmp_path, '"site" = "/srv"\n')
    assert "special files" in err.message


def test_inside_symlinks_are_kept_as_symlinks_and_user_files_replace_applets(
    tmp_path: Path,
) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_bytes(b"x")
    (tmp_path / "site" / "home.html").symlink_to("index.html")
    (tmp_path / "sh").write_bytes(b"#!/bin/busybox sh\n")
    image = members(_build(tmp_path, '"site" = "/srv"\n"sh" = "/bin/sh"\n'))
    assert image["/srv/home.html"].is_symlink and image["/srv/home.html"].data == b"index.html"
    assert image["/bin/sh"].is_file and image["/bin/sh"].perm == 0o755


def test_tree_refuses_to_replace_fledge_files() -> None:
    tree = ImageTree()
    tree.add_file("/init", perm=0o755, data=b"x", origin="C init")
    with pytest.raises(TreeError, match="already in the image"):
        tree.add_file("/init", perm=0o755, data=b"y", origin="mapping", replace=frozenset())
    with pytest.raises(TreeError, match="is a file"):
        tree.add_file("/init/x", perm=0o644, data=b"y", origin="mapping")


def test_cpio_writer_refuses_dotdot_and_reader_extract_skips_it(tmp_path: Path) -> None:
    with pytest.raises(cpio.CpioError):
        cpio.write_archive([cpio.regular("../evil", 0o644, data=b"x")], io.BytesIO())
    # A hostile archive made by hand: extract() must not write outside dest.
    raw = io.BytesIO()
    cpio._write_member(raw, name="../evil", ino=1, mode=0o100644, nlink=1, mtime=0, size=0)
    cpio._write_member(raw, name=cpio.TRAILER, ino=0, mode=0, nlink=1, mtime=0, size=0)
    raw.seek(0)
    dest = tmp_path / "x"
    dest.mkdir()
    cpio.extract(cpio.read_archive(raw), dest)
    assert not (tmp_path / "evil").exists()


def test_extract_never_writes_through_a_symlink_of_the_same_archive(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    raw = io.BytesIO()
    # A hostile archive: "x" -> victim, then a regular file "x", then "d" -> outside dir
    # and "d/y" under it.
    members = [("x", 0o120777, str(victim).encode()), ("x", 0o100644, b"pwned"),
               ("d", 0o120777, str(tmp_path).encode()), ("d/y", 0o100644, b"pwned")]
    for ino, (name, mode, data) in enumerate(members, start=1):
        cpio._write_member(raw, name=name, ino=ino, mode=mode, nlink=1, mtime=0,
                           size=len(data))
        raw.write(data + cpio._pad(len(data)))
    cpio._write_member(raw, name=cpio.TRAILER, ino=0, mode=0, nlink=1, mtime=0, size=0)
    raw.seek(0)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(cpio.CpioError, match="through a symlink"):
        cpio.extract(cpio.read_archive(raw), dest)
    assert victim.read_bytes() == b"precious"
    assert (dest / "x").read_bytes() == b"pwned" and not (dest / "x").is_symlink()
    assert not (tmp_path / "y").exists()
