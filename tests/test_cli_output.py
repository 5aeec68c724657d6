"""One output path for fledge and volar (kestrel/cliout.py): the same -q/-v,
steps that -q silences, data that it does not, progress only on a terminal."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from host.kernel import current_kernel
from kestrel.cliout import NORMAL, QUIET, VERBOSE, Output, VerbosityError, split_verbosity


def test_verbosity_flags_are_taken_from_anywhere_before_double_dash() -> None:
    assert split_verbosity(["vms", "list", "-q"]) == (QUIET, ["vms", "list"])
    assert split_verbosity(["-v", "build", "-c", "x.toml"]) == (VERBOSE, ["build", "-c", "x.toml"])
    assert split_verbosity(["build", "--", "-q"]) == (NORMAL, ["build", "--", "-q"])
    with pytest.raises(VerbosityError):
        split_verbosity(["-q", "--verbose"])


def test_quiet_keeps_data_and_warnings_only() -> None:
    out, err = io.StringIO(), io.StringIO()
    o = Output(verbosity=QUIET, stream=out, err=err)
    o.step("step")
    o.detail("detail")
    o.json({"a": 1})
    o.warn("careful")
    with o.progress("Downloading x", 10) as advance:
        advance(10)
    assert json.loads(out.getvalue()) == {"a": 1}
    assert err.getvalue() == "careful\n"


def test_progress_off_a_terminal_is_one_line_and_logging_shows_with_v() -> None:
    out, err = io.StringIO(), io.StringIO()
    o = Output(verbosity=VERBOSE, stream=out, err=err)
    with o.progress("Downloading x", 2_000_000) as advance:
        advance(1_000_000)
        advance(1_000_000)
    o.route_logging()
    try:
        logging.getLogger("builder.freeze").info("Freezing kestrel")
        logging.getLogger("host.kernel").warning("odd")
    finally:
        logging.getLogger().handlers.clear()
    assert out.getvalue() == "Downloading x (2.0 MB)\n    Freezing kestrel\n"
    assert err.getvalue() == "warning: odd\n"


def _volar(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host.cli", "--state-dir", str(state), *args],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)


def test_volar_and_fledge_take_q_and_v_the_same_way(tmp_path: Path) -> None:
    for args in (["-q", "vms", "list"], ["vms", "list", "-v"], ["vms", "-q", "list", "--json"]):
        proc = _volar(*args, state=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert json.loads(_volar("vms", "list", "--json", "-q", state=tmp_path).stdout) == []
    both = _volar("-q", "vms", "list", "-v", state=tmp_path)
    assert both.returncode == 2 and both.stderr == "volar: -q and -v cannot be combined\n"
    fledge = subprocess.run([sys.executable, "-m", "builder.cli", "-q", "-v", "build"],
                            capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parent.parent)
    assert fledge.returncode == 2 and fledge.stderr == "fledge: -q and -v cannot be combined\n"


@pytest.mark.skipif(current_kernel() is None, reason="no kernel fetched (make kernel)")
def test_kernel_show_has_json(tmp_path: Path) -> None:
    proc = _volar("kernel", "show", "--json", state=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) == {"release", "package", "version", "vmlinux", "modules"}
