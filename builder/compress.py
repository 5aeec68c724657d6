"""Reproducible compression of the cpio stream, and transparent decompression for reading.

gzip is done in-process by zlib: no file name, mtime 0, level 6. Measured on this
machine on caddy + busybox (38 MB): level 6 takes 2.2 s for 13.86 MB, level 9 6.0 s for
13.77 MB (`gzip -9 -n` 6.6 s): level 9 buys 0.7 % for 3x the time. zstd uses the `zstd`
program (Debian package zstd), level 9, one thread: its output depends only on the
input, the level and the zstd version.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

GZIP_LEVEL = 6
ZSTD_LEVEL = 9
COMPRESSIONS = ("gzip", "zstd", "none")
SUFFIXES = {"gzip": ".gz", "zstd": ".zst", "none": ""}
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # RFC 8878 section 3.1.1


class CompressionError(Exception):
    pass


def zstd_program() -> str:
    prog = shutil.which("zstd")
    if prog is None:
        raise CompressionError("zstd compression needs the zstd program (apt-get install zstd)")
    return prog


@contextmanager
def compressor(out: BinaryIO, kind: str) -> Iterator[BinaryIO]:
    """A writable stream whose bytes reach *out* compressed with *kind*."""
    if kind == "none":
        yield out
    elif kind == "gzip":
        # filename="" keeps gzip from recording out.name; mtime=0 keeps the header fixed.
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=GZIP_LEVEL,
                           mtime=0) as gz:
            yield gz  # type: ignore[misc]
    elif kind == "zstd":
        proc = subprocess.Popen(
            [zstd_program(), "-q", "-c", f"-{ZSTD_LEVEL}", "-T1", "--no-progress"],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin is not None
        try:
            yield proc.stdin  # type: ignore[misc]
        finally:
            proc.stdin.close()
            err = proc.stderr.read() if proc.stderr else b""
            if proc.wait() != 0:
                raise CompressionError(f"zstd failed: {err.decode(errors='replace').strip()}")
    else:
        raise CompressionError(f"unknown compression {kind!r} (use gzip, zstd or none)")


def detect(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


@contextmanager
def open_image(path: Path) -> Iterator[BinaryIO]:
    """Open an initramfs image for reading its raw cpio bytes, whatever the compression."""
    with path.open("rb") as f:
        kind = detect(f.read(4))
        f.seek(0)
        if kind == "none":
            yield f
        elif kind == "gzip":
            with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                yield gz  # type: ignore[misc]
        else:
            # The file itself is zstd's stdin; rewind the descriptor, not just the buffer.
            os.lseek(f.fileno(), 0, os.SEEK_SET)
            proc = subprocess.Popen(
                [zstd_program(), "-q", "-d", "-c"], stdin=f,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )
            assert proc.stdout is not None
            try:
                yield proc.stdout  # type: ignore[misc]
            finally:
                proc.stdout.close()
                proc.wait()
