"""volar vms exec/shell refusals: one line naming the problem, never a hang.

The VMs here run on the fake VMM (tests/host_fakevmm.py) with the real
monitor, store and CLI; sessions themselves are covered with kestrel as
PID 1 (tests/test_kestrel_exec.py) and in a VM (vm-tests/test_exec.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests import host_helpers
from tests.host_helpers import FAKE_VMM, Volar, write_plugin

volar = host_helpers.volar  # fixtures
kernel = host_helpers.kernel


def _running(volar: Volar, kernel: Path, tmp_path: Path) -> str:
    volar.ok("plugins", "install", "--manifest", str(write_plugin(tmp_path / "p")))
    volar.ok("vms", "create", "box", "--plugin", "caddy", "--kernel", str(kernel),
             "--vmm", FAKE_VMM, "--timeout", "30")
    return "box"


def test_exec_into_a_vm_that_does_not_exist_is_one_line(volar: Volar) -> None:
    r = volar("vms", "exec", "nosuch", "--", "true")
    assert r.code == 2 and len(r.err.splitlines()) == 1 and "nosuch" in r.err


def test_exec_without_a_command_and_into_a_stopped_vm(volar: Volar, kernel: Path,
                                                       tmp_path: Path) -> None:
    name = _running(volar, kernel, tmp_path)
    try:
        r = volar("vms", "exec", name)
        assert r.code == 125 and "no command given" in r.err
        volar.ok("vms", "stop", name, "--grace", "1")
        for args in (("vms", "exec", name, "--", "true"), ("vms", "shell", name)):
            r = volar(*args)
            (line,) = r.err.splitlines()
            assert r.code == 125
            assert f"{name}: the VM is stopped, exec needs a running VM" in line
    finally:
        volar.ok("vms", "delete", name)


def test_tty_without_a_terminal_is_refused_before_anything_starts(volar: Volar, kernel: Path,
                                                                   tmp_path: Path) -> None:
    name = _running(volar, kernel, tmp_path)
    try:
        for args in (("exec", "-t", name, "--", "true"), ("shell", name)):
            done = subprocess.run(
                [sys.executable, "-m", "host.cli", "--state-dir", str(volar.state), "vms",
                 *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                env={**os.environ}, check=False)
            assert done.returncode == 125
            (line,) = done.stderr.splitlines()
            assert "-t needs a terminal" in line and name in line
    finally:
        volar.ok("vms", "delete", name)
