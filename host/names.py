"""The one rule for the names of VMs and plugins.

A name becomes a directory, an SQL key and a word of the guest's command
line (kestrel.hostname), so it is short, lowercase and free of separators.
"""

from __future__ import annotations

import re

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
NAME_RULE = "lowercase letters, digits, '-', '_', '.', at most 63, starting with a letter or digit"


def valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None
