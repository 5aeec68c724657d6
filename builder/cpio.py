"""The cpio "newc" format, written and read by fledge itself for reproducible initramfs.

`write_archive` turns entries into bytes on a file object (file contents are streamed
from disk, never held twice); every field that is not content is fixed: sorted names,
uid/gid 0, one mtime, sequential inodes, no hard links. `read_archive` parses it back.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

# "070701" is newc without checksums (the kernel's initramfs unpacker reads it);
# see Documentation/driver-api/early-userspace/buffer-format.rst.
NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110  # 6 magic + 13 fields x 8 hex digits
DEFAULT_MTIME = 1704067200  # 2024-01-01T00:00:00Z, Volant fledge's fixed timestamp
_CHUNK = 1 << 20


class CpioError(Exception):
    """A malformed archive or an entry that cannot be written."""


@dataclass(frozen=True)
class Entry:
    """One archive member. *name* is the image path ("/bin/busybox" or "bin/busybox").

    Regular files take their bytes from *data* or stream them from *source*; symlinks
    carry their target in *data*; directories carry nothing."""

    name: str
    mode: int  # full st_mode: S_IFDIR/S_IFREG/S_IFLNK | permission bits
    data: bytes | None = None
    source: Path | None = None

    @property
    def path(self) -> PurePosixPath:
        return PurePosixPath("/", self.name)

    @property
    def archive_name(self) -> str:
        return str(self.path).lstrip("/")


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name=name, mode=stat.S_IFDIR | perm)


def symlink(name: str, target: str) -> Entry:
    # The kernel ignores a symlink's mode; 0777 is what every cpio tool writes.
    return Entry(name=name, mode=stat.S_IFLNK | 0o777, data=target.encode())


def regular(
    name: str, perm: int, *, data: bytes | None = None, source: Path | None = None
) -> Entry:
    if (data is None) == (source is None):
        raise ValueError("a regular file needs exactly one of data or source")
    return Entry(name=name, mode=stat.S_IFREG | perm, data=data, source=source)


def sort_key(entry: Entry) -> tuple[str, ...]:
    # Component-wise order puts every parent before its children ("a" < "a/b").
    return entry.path.parts[1:]


def _header(*, ino: int, mode: int, nlink: int, mtime: int, size: int, namesize: int) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, 0, 0, namesize, 0)
    return NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_archive(entries: Iterable[Entry], out: BinaryIO, *, mtime: int = DEFAULT_MTIME) -> int:
    """Write *entries* (sorted here, duplicates refused) and the trailer; returns bytes written."""
    ordered = sorted(entries, key=sort_key)
    written = 0
    previous: tuple[str, ...] | None = None
    for ino, entry in enumerate(ordered, start=1):
        key = sort_key(entry)
        if not key:
            raise CpioError("an entry may not be the root directory itself")
        if ".." in key:
            raise CpioError(f"{entry.name}: '..' in an archive name")
        if key == previous:
            raise CpioError(f"duplicate entry {entry.path}")
        previous = key
        written += _write_entry(entry, out, ino=ino, mtime=mtime)
    written += _write_member(out, name=TRAILER, ino=0, mode=0, nlink=1, mtime=0, size=0)
    return written


def _write_member(
    out: BinaryIO, *, name: str, ino: int, mode: int, nlink: int, mtime: int, size: int
) -> int:
    raw = name.encode() + b"\0"
    head = _header(ino=ino, mode=mode, nlink=nlink, mtime=mtime, size=size, namesize=len(raw))
    blob = head + raw + _pad(HEADER_SIZE + len(raw))
    out.write(blob)
    return len(blob)


def _write_entry(entry: Entry, out: BinaryIO, *, ino: int, mtime: int) -> int:
    kind = stat.S_IFMT(entry.mode)
    if kind == stat.S_IFDIR:
        return _write_member(
            out, name=entry.archive_name, ino=ino, mode=entry.mode, nlink=2, mtime=mtime, size=0
        )
    if kind not in (stat.S_IFREG, stat.S_IFLNK):
        raise CpioError(f"{entry.path}: only directories, files and symlinks are supported")
    size = entry.source.stat().st_size if entry.source is not None else len(entry.data or b"")
    n = _write_member(
        out, name=entry.archive_name, ino=ino, mode=entry.mode, nlink=1, mtime=mtime, size=size
    )
    if entry.source is not None:
        with entry.source.open("rb") as f:
            copied = _copy(f, out)
        if copied != size:
            raise CpioError(f"{entry.source} changed size while being archived")
    else:
        out.write(entry.data or b"")
    out.write(_pad(size))
    return n + size + len(_pad(size))


def _copy(src: BinaryIO, dst: BinaryIO) -> int:
    total = 0
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        total += len(chunk)
    return total


@dataclass(frozen=True)
class Member:
    """One member as read back from an archive."""

    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    devmajor: int
    devminor: int
    data: bytes

    @property
    def path(self) -> str:
        return str(PurePosixPath("/", self.name))

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def perm(self) -> int:
        return stat.S_IMODE(self.mode)


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise CpioError("archive truncated")
    return data


def read_archive(stream: BinaryIO) -> Iterator[Member]:
    """Yield the members of one or more concatenated newc archives (the trailers and the
    zero padding between archives are skipped, as the kernel does)."""
    while True:
        magic = stream.read(6)
        while magic[:1] == b"\0":  # padding between concatenated archives
            magic = magic[1:] + stream.read(1)
        if not magic:
            return
        if magic != NEWC_MAGIC:
            raise CpioError(f"not a newc cpio archive (magic {magic!r})")
        raw = _read_exact(stream, HEADER_SIZE - 6)
        try:
            f = [int(raw[i : i + 8], 16) for i in range(0, len(raw), 8)]
        except ValueError as e:
            raise CpioError("bad hex field in cpio header") from e
        ino, mode, uid, gid, nlink, mtime, size, major, minor, _rmaj, _rmin, namesize, _ = f
        name_raw = _read_exact(stream, namesize)
        _read_exact(stream, -(HEADER_SIZE + namesize) % 4)
        name = name_raw.rstrip(b"\0").decode("utf-8", "surrogateescape")
        data = _read_exact(stream, size)
        _read_exact(stream, -size % 4)
        if name == TRAILER:
            continue
        yield Member(name, ino, mode, uid, gid, nlink, mtime, major, minor, data)


def extract(members: Iterable[Member], dest: Path) -> None:
    """Unpack *members* under *dest* without ever writing outside it: `..` names are
    skipped, nothing is created through a symlink, and a later member replaces an
    earlier one instead of writing through it (hostile archives repeat names)."""
    for m in members:
        rel = PurePosixPath(m.name.lstrip("/"))
        if ".." in rel.parts or str(rel) in ("", "."):
            continue
        target = dest.joinpath(*rel.parts)
        parent = target.parent
        if parent != dest and any(
            p.is_symlink() for p in [parent, *parent.parents] if dest in p.parents
        ):
            raise CpioError(f"{m.path}: refusing to extract through a symlink")
        if m.is_dir:
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                target.unlink()
            target.mkdir(parents=True, exist_ok=True)
            continue
        if not (m.is_symlink or m.is_file):
            continue  # devices and fifos: nothing fledge inspects
        parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            raise CpioError(f"{m.path}: a file replaces a directory")
        if m.is_symlink:
            target.symlink_to(m.data.decode("utf-8", "surrogateescape"))
            continue
        # O_EXCL|O_NOFOLLOW: never open through a symlink that appeared meanwhile.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(m.data)
            os.fchmod(out.fileno(), m.perm)
