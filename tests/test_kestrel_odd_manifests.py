"""Odd but valid manifests, run by kestrel as PID 1: none is an internal error.

Each manifest here passes validation, so kestrel must run it (and power off
cleanly when told) rather than end in ``KESTREL PANIC: internal error``.
The HTTP cases serve the health endpoint from inside the namespace and check
the request the health checker really sent.
"""

from __future__ import annotations

import json
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kestrel.cmdline import COMMAND_LINE_SIZE, encode_manifest
from kestrel.manifest import parse_manifest
from kestrel.protocol import Stop
from tests.pid1 import PYTHON, Kestrel, Run, manifest, run_kestrel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")

PY = PYTHON


def no_internal_error(run: Run) -> None:
    assert "internal error" not in run.console, run.console
    assert "Traceback" not in run.console, run.console
    assert run.powered_off, run.console


def http_server(bind: str, port: int) -> list[str]:
    """A workload answering 200 and logging each request line to stdout."""
    family = "socket.AF_INET6" if ":" in bind else "socket.AF_INET"
    code = textwrap.dedent(f"""
        import http.server, socket, sys
        class S(http.server.HTTPServer):
            address_family = {family}
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                print("GOT", self.path, self.headers["Host"], flush=True)
                self.send_response(200); self.end_headers()
            def log_message(self, *a): pass
        S(({bind!r}, {port}), H).serve_forever()
    """)
    return [PY, "-c", code]


async def stop_when_healthy(k: Kestrel) -> None:
    await k.wait_for(lambda r: "healthy" in r.health and b"GOT" in r.logs())
    await k.send(Stop(grace_s=1))


@pytest.mark.parametrize(
    ("base_url", "bind", "port", "request_line"),
    [
        # No port: the default 80 (this one used to panic PID 1 with ValueError).
        ("http://[::1]", "::1", 80, "GOT /healthz [::1]:80"),
        ("http://[::1]:8081", "::1", 8081, "GOT /healthz [::1]:8081"),
        ("http://127.0.0.1:8082/api/v1/", "127.0.0.1", 8082, "GOT /api/v1/healthz 127.0.0.1:8082"),
        ("http://localhost:8083/api?token=abc&x=%20#frag", "127.0.0.1", 8083,
         "GOT /api/healthz?token=abc&x=%20 localhost:8083"),
    ],
)
async def test_odd_base_urls_are_probed_where_they_point(
    base_url: str, bind: str, port: int, request_line: str
) -> None:
    doc = manifest(http_server(bind, port), type="http", base_url=base_url)
    doc["health_check"] = {"endpoint": "/healthz", "interval_ms": 100}
    run = await run_kestrel(doc, scenario=stop_when_healthy, timeout=30)
    no_internal_error(run)
    assert run.health[0] == "healthy"
    assert request_line in run.logs().decode()


async def test_empty_env_runs() -> None:
    run = await run_kestrel(manifest(["/bin/sh", "-c", "echo ok"], env={}))
    no_internal_error(run)
    assert run.logs("stdout") == b"ok\n"


async def test_unicode_args_reach_the_workload_intact() -> None:
    args = ["héllo", "日本語", "emoji 🦅", "ü\u200bz", "' \" $HOME ;"]
    run = await run_kestrel(manifest([PY, "-c", "import sys; print(sys.argv[1:])", *args]))
    no_internal_error(run)
    assert run.logs("stdout").decode() == f"{args}\n"
    assert [e.status for e in run.exits] == [0]


async def test_a_100_argument_entrypoint_runs() -> None:
    entrypoint = ["/bin/sh", "-c", 'echo "$#" "$@"', "sh", *(f"a{i}" for i in range(96))]
    assert len(entrypoint) == 100
    run = await run_kestrel(manifest(entrypoint))
    no_internal_error(run)
    assert run.logs("stdout").decode().split() == ["96", *entrypoint[4:]]


def largest_manifest(budget: int) -> dict[str, Any]:
    """A manifest whose volant.manifest word is as long as ``budget`` allows."""
    def doc(n: int) -> dict[str, Any]:
        # Incompressible filler (a fixed LCG), so gzip cannot shrink it.
        x, chars = 1, []
        for _ in range(n):
            x = (x * 1103515245 + 12345) % 2**31
            chars.append("abcdefghijklmnopqrstuvwxyz0123456789"[(x >> 16) % 36])
        return manifest(["/bin/sh", "-c", "echo ${#1}", "sh", "".join(chars)])

    def size(n: int) -> int:
        return len("volant.manifest=" + encode_manifest(json.dumps(doc(n)).encode()))

    lo, hi = 0, budget
    while lo < hi:  # the largest filler whose encoding still fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid - 1)
    return doc(lo)


async def test_the_largest_manifest_that_fits_the_command_line_runs() -> None:
    # Everything but the manifest word, with the harness's longest socket path.
    rest = ("console=ttyS0 kestrel.channel=unix:/var/tmp/kestrel-xxxxxxxx/agent.sock "
            "kestrel.hostname=kt")
    budget = COMMAND_LINE_SIZE - 1 - len(rest) - 1
    doc = largest_manifest(budget)
    word = "volant.manifest=" + encode_manifest(json.dumps(doc).encode())
    assert budget - 16 <= len(word) <= budget
    parse_manifest(doc)
    filler = doc["workload"]["entrypoint"][-1]
    run = await run_kestrel(doc)
    no_internal_error(run)
    assert run.logs("stdout") == f"{len(filler)}\n".encode()


async def test_files_the_image_has_in_tmp_are_hidden_and_the_boot_log_says_so() -> None:
    # The namespace shares this machine's /tmp, as a rootfs image with files
    # there would: kestrel mounts a fresh tmpfs over it and names what it hid.
    marker = Path(tempfile.mkdtemp(prefix="kestrel-image-file-", dir="/tmp"))
    try:
        script = f"test -e {marker}; echo $?; ls -A /tmp"
        run = await run_kestrel(manifest(["/bin/sh", "-c", script]))
    finally:
        marker.rmdir()
    no_internal_error(run)
    assert run.logs("stdout") == b"1\n"  # not there, and /tmp is empty
    assert "/tmp (over " in run.console and "entries of the image's)" in run.console
