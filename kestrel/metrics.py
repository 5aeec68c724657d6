"""Workload and guest metrics read straight from /proc.

Not psutil: the three files kestrel needs take a few lines to parse, and
psutil's import costs ~0.9 MB of the agent's 20 MB budget (measured in the
frozen bundle). The parsers are pure; ``sample`` is the thin I/O edge.
"""

from __future__ import annotations

import os

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_stat(text: str) -> tuple[int, float, int]:
    """/proc/PID/stat -> (process group, user+system CPU seconds, RSS bytes)."""
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): pgrp is field 5, utime 14, stime 15, rss 24.
    pgrp = int(rest[2])
    cpu = (int(rest[11]) + int(rest[12])) / CLK_TCK
    rss = int(rest[21]) * PAGE_SIZE
    return pgrp, cpu, rss


def parse_meminfo(text: str) -> tuple[int, int]:
    """/proc/meminfo -> (MemTotal, MemAvailable) in bytes."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            values[key] = int(rest.split()[0]) * 1024
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def group_usage(pgid: int) -> tuple[int, float]:
    """RSS bytes and CPU seconds summed over every live process of group ``pgid``."""
    rss = 0
    cpu = 0.0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            pgrp, c, r = parse_stat(_read(f"/proc/{name}/stat"))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or a kernel thread's odd line
        if pgrp == pgid:
            rss += r
            cpu += c
    return rss, cpu


def own_rss() -> int:
    return parse_stat(_read("/proc/self/stat"))[2]


def memory() -> tuple[int, int]:
    return parse_meminfo(_read("/proc/meminfo"))
