"""shim/init.c and kestrel agree: the same mounts, the same paths.

The shim mounts first in a VM; kestrel mounts whatever is still missing (in
the test namespaces, everything). Two tables that drift apart give a
workload a different machine depending on who booted it.
"""

from __future__ import annotations

import re
from pathlib import Path

from kestrel import boot, layout

REPO = Path(__file__).resolve().parent.parent
INIT_C = (REPO / "shim" / "init.c").read_text()
FLAGS = {"MS_NOSUID": boot.MS_NOSUID, "MS_NODEV": boot.MS_NODEV, "MS_NOEXEC": boot.MS_NOEXEC}


def _flags(text: str) -> int:
    return sum(FLAGS[f.strip()] for f in text.split("|")) if text.strip() != "0" else 0


def _c_string(text: str) -> str:
    # Adjacent literals concatenate; NULL is no data.
    return "".join(re.findall(r'"([^"]*)"', text)) if text.strip() != "NULL" else ""


def shim_mounts() -> list[tuple[str, str, str, int, str, int, bool]]:
    table = re.search(r"mounts\[\] = \{(.*?)\n\};", INIT_C, re.S)
    assert table is not None
    body = re.sub(r"/\*.*?\*/", "", table.group(1), flags=re.S)
    rows = []
    for entry in re.findall(r"\{(.*?)\}", body, re.S):
        source, target, fstype, flags, data, mode, required = (
            p.strip() for p in re.split(r",(?![^\"]*\"\s*[,}])", entry) if p.strip())
        rows.append((_c_string(target), _c_string(fstype), _c_string(source), _flags(flags),
                     _c_string(data), int(mode, 8), required == "1"))
    # /dev is mounted on its own first (the console needs it before the table).
    dev = re.search(r'mount\("devtmpfs", "/dev", "devtmpfs", (\w+), "([^"]*)"\)', INIT_C)
    assert dev is not None
    make_dir = re.search(r'make_dir\("/dev", (0\d+)\)', INIT_C)
    assert make_dir is not None
    rows.insert(2, ("/dev", "devtmpfs", "devtmpfs", _flags(dev.group(1)), dev.group(2),
                    int(make_dir.group(1), 8), True))
    return rows


def test_shim_and_kestrel_mount_the_same_table() -> None:
    assert shim_mounts() == list(boot.MOUNTS)


def test_shim_paths_are_kestrels() -> None:
    defines = dict(re.findall(r'#define (\w+) "([^"]*)"', INIT_C))
    assert defines["AGENT_PATH"] == layout.AGENT_PATH
    assert defines["MODULES_LOAD_LIST"] == layout.MODULES_LOAD_LIST


def test_fledge_ships_the_shim_source_of_this_checkout() -> None:
    assert (REPO / "builder" / "data" / "init.c").read_text() == INIT_C
