"""Helpers for volar's tests: a plugin folder, a CLI runner, a fake kernel."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from host.cli import main

FAKE_VMM = "tests.host_fakevmm:FakeDriver"


@dataclass
class Result:
    code: int
    out: str
    err: str


class Volar:
    """Runs ``volar --state-dir <dir> ...`` in-process and captures its output."""

    def __init__(self, state: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.state = state
        self.capsys = capsys

    def __call__(self, *args: str) -> Result:
        self.capsys.readouterr()
        code = main(["--state-dir", str(self.state), *args])
        out, err = self.capsys.readouterr()
        return Result(code, out, err)

    def ok(self, *args: str) -> str:
        r = self(*args)
        assert r.code == 0, f"volar {' '.join(args)} -> {r.code}: {r.err}"
        return r.out

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))


def write_plugin(
    folder: Path,
    *,
    name: str = "caddy",
    entrypoint: list[str] | None = None,
    env: dict[str, str] | None = None,
    checksum: str | None = "auto",
    url: str = "../plugin.cpio.gz",
    payload: bytes = b"\x1f\x8b fake initramfs " * 64,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A manifest and its initramfs in ``folder``; returns the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plugin.cpio.gz").write_bytes(payload)
    manifest: dict[str, Any] = {
        "$schema": "https://example.invalid/schema.json",
        "schema_version": "1.0",
        "name": name,
        "version": "0.1.0",
        "runtime": name,
        "initramfs": {"url": url},
        "resources": {"cpu_cores": 1, "memory_mb": 512},
        "workload": {
            "type": "http",
            "entrypoint": entrypoint or ["/bin/sh", "-c", "echo hello; sleep 600"],
            "base_url": "http://127.0.0.1:80",
            "workdir": "/",
            "env": {"PATH": "/usr/bin:/bin", **(env or {})},
        },
        "health_check": {"endpoint": "/", "timeout_ms": 10000},
    }
    if checksum == "auto":
        manifest["initramfs"]["checksum"] = hashlib.sha256(payload).hexdigest()
    elif checksum is not None:
        manifest["initramfs"]["checksum"] = checksum
    manifest.update(extra or {})
    path = folder / "manifest" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2))
    return path


@pytest.fixture
def volar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Volar:
    return Volar(tmp_path / "state", capsys)


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF not really a kernel")
    return path
