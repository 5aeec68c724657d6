"""Typed fledge errors: each names the file and the key a user must look at.

The CLI prints one line, `fledge: <file>: <key>: <problem>`, and exits 2 for a bad
configuration or command line, 1 for a build that failed; never a traceback.
"""

from __future__ import annotations


class FledgeError(Exception):
    """Something the user must fix; *key* is a dotted config key (or "" when none)."""

    exit_code = 2

    def __init__(self, key: str, file: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.file = file
        self.message = message

    def line(self) -> str:
        parts = ["fledge", self.file, self.key, self.message]
        return ": ".join(p for p in parts if p)


class ConfigError(FledgeError):
    """fledge.toml (or the command line) says something fledge cannot accept."""


class BuildError(FledgeError):
    """A valid configuration whose build failed (download, checksum, library, module)."""

    exit_code = 1
