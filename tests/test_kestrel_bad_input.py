"""Malformed configuration: a clear console line and a fatal record, then power-off.

Never a traceback as the only output, never PID 1 dying (a kernel panic in
a VM): every case must end in reboot(2), which a PID namespace turns into
SIGINT for its init.
"""

from __future__ import annotations

import base64
import gzip
import json
import os

import pytest

from kestrel.cmdline import COMMAND_LINE_SIZE, encode_manifest
from kestrel.protocol import Fatal
from tests.pid1 import manifest, run_kestrel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


BAD_GZIP = _b64url(b"\x1f\x8b" + b"garbage" * 10)
BAD_JSON = _b64url(gzip.compress(b'{"name": '))
INVALID = encode_manifest(json.dumps({
    "name": "x", "version": "1", "initramfs": {"url": "/a"},
    "workload": {"type": "http", "entrypoint": []},
}).encode())

CASES = {
    "bad base64": ("volant.manifest=H4sI!!!not*base64", "not valid base64url"),
    "bad gzip": (f"volant.manifest={BAD_GZIP}", "not valid gzip"),
    "bad json": (f"volant.manifest={BAD_JSON}", "not valid JSON"),
    "invalid manifest": (f"volant.manifest={INVALID}", "workload.entrypoint"),
    "no manifest": ("", "no volant.manifest"),
    "bad boot mode": (f"volant.boot=floppy volant.manifest={encode_manifest(b'{}')}",
                      "volant.boot"),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_input_powers_off_with_a_message_naming_the_problem(case: str) -> None:
    words, needle = CASES[case]
    run = await run_kestrel(None, extra=words)
    assert run.powered_off, run.console
    panic = [ln for ln in run.console.splitlines() if ln.startswith("KESTREL PANIC:")]
    assert panic and needle in panic[0], run.console
    assert "Traceback" not in run.console
    (fatal,) = run.of(Fatal)  # the host is told too, before the power-off
    assert needle in fatal.message
    assert run.states[-2:] == ["failed", "poweroff"]


async def test_truncated_command_line_is_reported_as_truncation() -> None:
    # A manifest too big for the kernel's 2048 bytes arrives cut at 2047.
    doc = manifest(["/bin/true"], env={f"K{i}": os.urandom(24).hex() for i in range(80)})
    enc = encode_manifest(json.dumps(doc).encode())
    head = "console=ttyS0 kestrel.channel=unix:/nonexistent volant.manifest="
    line = (head + enc)[: COMMAND_LINE_SIZE - 1]
    run = await run_kestrel(None, cmdline=line, serve=False)
    assert run.powered_off
    assert "truncated" in run.console and "2047" in run.console
    assert "Traceback" not in run.console


async def test_missing_serial_channel_device_powers_off_with_a_message() -> None:
    doc = manifest(["/bin/sh", "-c", "sleep 30"], type="http", base_url="http://127.0.0.1:1")
    enc = encode_manifest(json.dumps(doc).encode())
    run = await run_kestrel(
        None, cmdline=f"volant.manifest={enc} kestrel.channel=serial:org.nowhere.0",
        serve=False, timeout=40,
    )
    assert run.powered_off
    assert "no virtio-serial port named 'org.nowhere.0'" in run.console


async def test_bad_channel_spec_is_named() -> None:
    enc = encode_manifest(json.dumps(manifest(["/bin/true"])).encode())
    run = await run_kestrel(None, cmdline=f"volant.manifest={enc} kestrel.channel=pigeon:7",
                            serve=False, timeout=20)
    assert run.powered_off
    assert "kestrel.channel" in run.console and "pigeon" in run.console

