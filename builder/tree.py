"""The image as a tree of cpio entries in memory (file contents stay on disk).

Nothing is ever written under a real root while assembling, so no mapping can write
through a symlink: a path whose parent is a symlink or a file is refused, `..` never
reaches here, and directory mappings refuse symlinks that are absolute or point out of
the mapped directory. Modes follow Volant's rules (see `file_mode`).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from builder import cpio
from builder.elf import ELF_MAGIC

EXEC_DIRS = ("/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin",
             "/opt/bin", "/opt/sbin")
LIB_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64")
BASE_DIRS = ("/bin", "/sbin", "/etc", "/proc", "/sys", "/dev", "/tmp", "/run", "/usr",
             "/usr/bin", "/usr/sbin", "/usr/lib", "/var", "/var/log", "/root")


class TreeError(Exception):
    """A placement the image cannot take (conflict, escape, unsupported file type)."""


def _under(path: str, dirs: tuple[str, ...]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in dirs)


def is_library_path(dest: str) -> bool:
    name = PurePosixPath(dest).name
    if not (name.endswith(".so") or ".so." in name):
        return False
    # /usr/local/lib* covers lib, lib64, lib32 and the like.
    return _under(dest, LIB_DIRS) or dest.startswith("/usr/local/lib")


def file_mode(dest: str, source_mode: int) -> int:
    """0755 for executables (by destination, by any x bit on the source) and shared
    libraries; 0644 for everything else. Fixed values keep builds independent of the
    build host's umask and file modes."""
    if _under(dest, EXEC_DIRS) or source_mode & 0o111 or is_library_path(dest):
        return 0o755
    return 0o644


class ImageTree:
    def __init__(self) -> None:
        self.entries: dict[str, cpio.Entry] = {}
        self.origins: dict[str, str] = {}

    def __contains__(self, path: str) -> bool:
        return path in self.entries

    def kind(self, path: str) -> int | None:
        e = self.entries.get(path)
        return stat.S_IFMT(e.mode) if e else None

    def _parents(self, path: str, origin: str) -> None:
        for parent in reversed(PurePosixPath(path).parents):
            p = str(parent)
            if p == "/":
                continue
            existing = self.entries.get(p)
            if existing is None:
                self.entries[p] = cpio.directory(p)
                self.origins[p] = origin
            elif not stat.S_ISDIR(existing.mode):
                what = "a symlink" if stat.S_ISLNK(existing.mode) else "a file"
                raise TreeError(f"cannot place {path}: {p} is {what} in the image "
                                f"(from {self.origins[p]})")

    def _place(self, entry: cpio.Entry, origin: str, replace: frozenset[str]) -> None:
        path = str(entry.path)
        if path == "/":
            if not stat.S_ISDIR(entry.mode):
                raise TreeError("cannot place a file at / in the image")
            return
        self._parents(path, origin)
        existing = self.entries.get(path)
        if existing is not None:
            both_dirs = stat.S_ISDIR(existing.mode) and stat.S_ISDIR(entry.mode)
            if both_dirs:
                return
            if stat.S_ISDIR(existing.mode) or self.origins[path] not in replace:
                raise TreeError(f"{path} is already in the image (from {self.origins[path]})")
        self.entries[path] = entry
        self.origins[path] = origin

    def mkdir(self, path: str, *, origin: str = "fledge") -> None:
        self._place(cpio.directory(path), origin, frozenset())

    def add_file(self, dest: str, *, perm: int, source: Path | None = None,
                 data: bytes | None = None, origin: str,
                 replace: frozenset[str] = frozenset()) -> None:
        self._place(cpio.regular(dest, perm, source=source, data=data), origin, replace)

    def add_symlink(self, dest: str, target: str, *, origin: str,
                    replace: frozenset[str] = frozenset()) -> None:
        self._place(cpio.symlink(dest, target), origin, replace)

    def add_host_file(self, source: Path, dest: str, *, origin: str,
                      replace: frozenset[str] = frozenset()) -> int:
        """Copy one host file (symlinks followed: the user named it) to *dest*."""
        st = source.stat()
        if not stat.S_ISREG(st.st_mode):
            raise TreeError(f"{source} is not a regular file")
        perm = file_mode(dest, st.st_mode)
        self.add_file(dest, perm=perm, source=source.resolve(), origin=origin, replace=replace)
        return perm

    def add_host_dir(self, source: Path, dest: str, *, origin: str,
                     replace: frozenset[str] = frozenset(),
                     allow_absolute_links: bool = False) -> int:
        """Copy a host directory recursively; returns the number of entries placed.

        Symlinks are copied as symlinks and never followed; hard links become copies."""
        count = 0
        if dest != "/":
            self._place(cpio.directory(dest), origin, replace)
            count += 1
        for rel, kind, path in _walk(source):
            target_path = str(PurePosixPath(dest) / rel)
            if kind == "dir":
                self._place(cpio.directory(target_path), origin, replace)
            elif kind == "link":
                link = os.readlink(path)
                _check_link(link, rel, source, allow_absolute=allow_absolute_links)
                self.add_symlink(target_path, link, origin=origin, replace=replace)
            else:
                perm = file_mode(target_path, path.lstat().st_mode)
                self.add_file(target_path, perm=perm, source=path, origin=origin,
                              replace=replace)
            count += 1
        return count

    def sorted_entries(self) -> list[cpio.Entry]:
        return sorted(self.entries.values(), key=cpio.sort_key)

    def regular_files(self) -> Iterator[tuple[str, cpio.Entry]]:
        for path, e in self.entries.items():
            if stat.S_ISREG(e.mode):
                yield path, e

    def materialize(self, root: Path, *, elf_only: bool = True) -> None:
        """Write a shadow of the tree under *root* (an empty directory) for the ELF
        closure check: directories, symlinks, and ELF files (hard-linked or copied);
        other files are created empty since only their existence matters there."""
        for e in self.sorted_entries():
            target = root / e.archive_name
            if stat.S_ISDIR(e.mode):
                target.mkdir(exist_ok=True)
            elif stat.S_ISLNK(e.mode):
                target.symlink_to((e.data or b"").decode("utf-8", "surrogateescape"))
            elif e.source is not None:
                if elf_only and not _is_elf_file(e.source):
                    target.touch()
                    continue
                try:
                    os.link(e.source, target)
                except OSError:
                    shutil.copyfile(e.source, target)
            else:
                target.write_bytes(e.data or b"")


def _is_elf_file(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == ELF_MAGIC


def _walk(top: Path) -> Iterator[tuple[str, str, Path]]:
    """(relative path, dir|link|file, path) under *top*, never following symlinks."""
    stack = [(top, "")]
    while stack:
        directory, rel = stack.pop()
        with os.scandir(directory) as it:
            items = sorted(it, key=lambda d: d.name)
        for item in items:
            sub = f"{rel}/{item.name}" if rel else item.name
            path = Path(item.path)
            if item.is_symlink():
                yield sub, "link", path
            elif item.is_dir(follow_symlinks=False):
                yield sub, "dir", path
                stack.append((path, sub))
            elif item.is_file(follow_symlinks=False):
                yield sub, "file", path
            else:
                raise TreeError(f"{path}: special files (devices, fifos, sockets) are not "
                                "supported in mappings")


def _check_link(link: str, rel: str, source: Path, *, allow_absolute: bool) -> None:
    if link.startswith("/"):
        if allow_absolute:
            return
        raise TreeError(f"{source / rel} is an absolute symlink ({link}); fledge only copies "
                        "relative symlinks that stay inside the mapped directory")
    resolved = os.path.normpath(os.path.join(os.path.dirname(rel), link))
    if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
        raise TreeError(f"{source / rel} -> {link} points outside the mapped directory")
