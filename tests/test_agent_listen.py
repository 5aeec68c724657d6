"""`volar agent listen`: kestrel outside a VM, every record as a JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pid1 import REPO, manifest, run_kestrel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")


async def test_agent_listen_prints_every_record_as_json_and_acks(tmp_path: Path) -> None:
    sock = Path("/var/tmp") / f"kestrel-listen-{os.getpid()}.sock"
    listener = subprocess.Popen(
        [sys.executable, "-m", "host.cli", "--state-dir", str(tmp_path), "agent", "listen",
         str(sock)], cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        doc = manifest(["/bin/sh", "-c", "echo one; echo two >&2; exit 4"])
        from kestrel.cmdline import encode_manifest

        line = (f"volant.manifest={encode_manifest(json.dumps(doc).encode())} "
                f"kestrel.channel=unix:{sock}")
        run = await run_kestrel(None, cmdline=line, serve=False)
        assert run.powered_off
    finally:
        listener.terminate()
        out, _ = listener.communicate(timeout=10)
        sock.unlink(missing_ok=True)
    records = [json.loads(x) for x in out.splitlines()]
    kinds = [r["t"] for r in records]
    assert kinds[0] == "hello" and "exit" in kinds
    logs = {r["stream"]: r["data"] for r in records if r["t"] == "log"}
    assert logs == {"stdout": "one\n", "stderr": "two\n"}
    (exit_record,) = [r for r in records if r["t"] == "exit"]
    assert exit_record["status"] == 4
    seqs = [r["seq"] for r in records if "seq" in r]
    assert seqs == list(range(1, len(seqs) + 1))
