"""The one output path of the host-side CLIs (fledge and volar); never the guest's.

Steps, per-file detail, warnings, JSON and progress bars all go through an
``Output``: ``-q`` keeps errors and the data a command was asked for (tables,
JSON), ``-v`` adds detail and the ``logging`` records of the modules below.
Progress bars draw only on a terminal. Plain stdlib, not rich: importing
rich costs ~45 ms and ~6 MB, which would double `volar vms list`'s start.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

QUIET, NORMAL, VERBOSE = 0, 1, 2
QUIET_FLAGS = ("-q", "--quiet")
VERBOSE_FLAGS = ("-v", "--verbose")


class VerbosityError(ValueError):
    """-q and -v given together."""


def split_verbosity(argv: Sequence[str]) -> tuple[int, list[str]]:
    """Take -q/--quiet and -v/--verbose from anywhere before ``--``: fledge and
    volar accept them in the same places, whatever the subcommand."""
    rest: list[str] = []
    quiet = verbose = False
    for i, arg in enumerate(argv):
        if arg == "--":
            rest += argv[i:]
            break
        if arg in QUIET_FLAGS:
            quiet = True
        elif arg in VERBOSE_FLAGS:
            verbose = True
        else:
            rest.append(arg)
    if quiet and verbose:
        raise VerbosityError("-q and -v cannot be combined")
    return (QUIET if quiet else VERBOSE if verbose else NORMAL), rest


class Output:
    """Where a CLI's lines go; ``verbosity`` is QUIET, NORMAL or VERBOSE."""

    def __init__(self, *, verbosity: int = NORMAL, out: Callable[[str], None] | None = None,
                 stream: TextIO | None = None, err: TextIO | None = None) -> None:
        self.verbosity = verbosity
        self.stream = stream if stream is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.out = out or self._print

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def step(self, text: str) -> None:
        """A step of the command ("Compiling C init...", "VM web running")."""
        if self.verbosity >= NORMAL:
            self.out(text)

    def item(self, text: str) -> None:
        if self.verbosity >= NORMAL:
            self.out(f"  {text}")

    def detail(self, text: str) -> None:
        if self.verbosity >= VERBOSE:
            self.out(f"    {text}")

    def data(self, text: str) -> None:
        """What the command was asked for (a table, a report): printed even with -q."""
        self.out(text)

    def json(self, obj: Any) -> None:
        self.data(json.dumps(obj, indent=2, sort_keys=True, default=str))

    def warn(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    @contextmanager
    def progress(self, label: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """A callable to feed byte counts; a bar on a terminal, one line otherwise."""
        bar = _Bar(label, total, self.stream) if (
            self.verbosity >= NORMAL and self.out == self._print and _isatty(self.stream)
        ) else None
        if bar is None:
            self.step(label + (f" ({_mb(total)})" if total else ""))
        try:
            yield bar.advance if bar is not None else _ignore
        finally:
            if bar is not None:
                bar.close()

    def route_logging(self) -> None:
        """``logging`` records (builder/ logs; host/ says everything through Output):
        INFO as detail, WARNING and above as warnings. Imported here: logging costs
        volar's quick commands ~5 ms they do not need."""
        import logging

        class _Handler(logging.Handler):
            def emit(inner, record: logging.LogRecord) -> None:
                text = record.getMessage()
                if record.levelno >= logging.WARNING:
                    self.warn(f"warning: {text}")
                else:
                    self.detail(text)

        handler = _Handler()
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO if self.verbosity >= VERBOSE else logging.WARNING)


def _ignore(n: int) -> None:
    del n


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _mb(n: float | None) -> str:
    return f"{(n or 0) / 1e6:.1f} MB"


class _Bar:
    WIDTH = 30
    EVERY_S = 0.1  # redraw at most this often: a terminal is slow next to a download

    def __init__(self, label: str, total: int | None, stream: TextIO) -> None:
        self.label, self.total, self.stream = label, total, stream
        self.done = 0
        self.drawn = 0.0
        self._draw()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.drawn >= self.EVERY_S:
            self.drawn = now
            self._draw()

    def _draw(self) -> None:
        if self.total:
            filled = min(self.WIDTH, self.WIDTH * self.done // self.total)
            text = (f"{self.label} [{'#' * filled}{' ' * (self.WIDTH - filled)}] "
                    f"{_mb(self.done)} / {_mb(self.total)}")
        else:
            text = f"{self.label} {_mb(self.done)}"
        self.stream.write("\r" + text)
        self.stream.flush()

    def close(self) -> None:
        self._draw()
        self.stream.write("\n")
        self.stream.flush()
