"""Typed errors for volar: each carries the one line a user needs.

The CLI prints ``volar: <message>`` and exits non-zero for any VolarError;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class VolarError(Exception):
    """Base class: ``str(exc)`` is the whole user-facing message."""

    exit_code = 1


class NotFound(VolarError):
    """A named plugin or VM does not exist."""

    exit_code = 2


class AlreadyExists(VolarError):
    """A plugin or VM with that name is already recorded."""


class ChecksumMismatch(VolarError):
    def __init__(self, *, url: str, expected: str, actual: str) -> None:
        super().__init__(
            f"checksum mismatch for {url}: manifest says sha256:{expected}, "
            f"downloaded file is sha256:{actual}; nothing installed"
        )
        self.url = url
        self.expected = expected
        self.actual = actual


class FetchError(VolarError):
    """A URL or path could not be read; names it and why."""


class StateError(VolarError):
    """The state directory or database cannot be used."""


class MissingKernel(VolarError):
    pass


class BootFailed(VolarError):
    """The VM did not reach ``running``; the message carries the console tail."""
