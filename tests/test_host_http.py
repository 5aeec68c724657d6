"""volar vms http: what it refuses before any connection, in one line each.

The request itself (vsock CONNECT, kestrel's answers) is tested in
tests/test_agentapi.py and, over real vsock, vm-tests/test_agent_api.py.
"""

from __future__ import annotations

from pathlib import Path

from tests import host_helpers
from tests.host_helpers import FAKE_VMM, Volar, write_plugin

volar = host_helpers.volar  # fixtures
kernel = host_helpers.kernel


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err


def test_what_vms_http_refuses_is_one_line_each(volar: Volar, kernel: Path,
                                                tmp_path: Path) -> None:
    r = volar("vms", "http", "nosuchvm", "/healthz")
    assert r.code == 2 and "unknown VM 'nosuchvm'" in one_line(r.err)
    volar.ok("plugins", "install", "--manifest", str(write_plugin(tmp_path / "p")))
    volar.ok("vms", "create", "web", "--plugin", "caddy", "--kernel", str(kernel),
             "--vmm", FAKE_VMM, "--channel", "serial", "--timeout", "30")
    cases = [
        (("/healthz",), "vms http web: the VM's channel is serial, not vsock"),
        (("healthz",), "PATH must start with / (/healthz, /v1/...), not 'healthz'"),
        (("-H", "no colon", "/v1/"), "-H 'no colon': expected 'Name: value'"),
        (("-d", f"@{tmp_path / 'missing'}", "/v1/"), "No such file or directory"),
    ]
    try:
        for args, words in cases:
            *opts, path = args
            r = volar("vms", "http", *opts, "web", path)
            assert r.code == 1 and r.out == ""
            assert words in one_line(r.err), (args, r.err)
    finally:
        volar.ok("vms", "stop", "web")
    r = volar("vms", "http", "web", "/healthz")
    assert r.code == 1
    assert "vms http web: the VM is stopped; the agent API needs a running VM" in one_line(r.err)
