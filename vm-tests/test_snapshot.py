"""Warm starts: snapshot a healthy Caddy VM, restore copies of it, and the refusals.

Driven only through volar's commands (private state directory), on the
seeds' Caddy image with a log line every 0.2 s beside Caddy. A snapshot is
QEMU's migration stream of a q35 VM whose vsock device was unplugged for
it; each copy gets a new vsock backend, and kestrel, told on attach that it
was restored, reseeds the kernel RNG, steps the clock, takes the copy's
hostname and reports `restored`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, fledge_build

from host.kernel import KernelInfo

EXAMPLE = REPO / "examples" / "caddy"
EXPECTED = "Hello from Caddy in a Volant microVM!"
TICKER = ("while :; do echo tick; sleep 0.2; done & "
          "exec /usr/bin/caddy run --config /etc/caddy/Caddyfile")
sys.path.insert(0, str(EXAMPLE))


@dataclass
class Volar:
    state: Path

    def run(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        print("$ volar " + " ".join(args), flush=True)
        done = subprocess.run([sys.executable, "-m", "host.cli", *args], cwd=REPO,
                              env={**os.environ, "VOLAR_STATE_DIR": str(self.state)},
                              capture_output=True, text=True, timeout=timeout, check=False)
        keep = 6000 if args[:2] in (("vms", "console"), ("vms", "show")) else 600
        print(f"  -> {done.returncode} {done.stdout[-keep:]!r} {done.stderr[-600:]!r}",
              flush=True)
        return done

    def ok(self, *args: str) -> str:
        done = self.run(*args)
        if done.returncode != 0 and args[:2] == ("vms", "create"):
            # What the guest said, before the fixture deletes the VM and its run directory.
            self.run("vms", "console", args[2], "--log")
            self.run("vms", "show", args[2])
        assert done.returncode == 0, done.stderr
        return done.stdout

    def show(self, vm: str) -> dict[str, Any]:
        return dict(json.loads(self.ok("vms", "show", vm, "--json")))

    def install(self, image: Path, name: str) -> None:
        m = json.loads((EXAMPLE / "manifest" / "caddy.json").read_text())
        m["name"] = name
        m["initramfs"] = {"url": str(image)}
        m["workload"]["entrypoint"] = ["/bin/sh", "-c", TICKER]
        path = self.state.parent / f"{name}.json"
        path.write_text(json.dumps(m))
        self.ok("plugins", "install", "--manifest", str(path))

    def wait(self, vm: str, status: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (info := self.show(vm))["status"] != status:
            assert time.monotonic() < deadline, f"{vm} is {info['status']}, not {status}"
            time.sleep(0.5)
        return info

    def names(self) -> list[str]:
        return [row["name"] for row in json.loads(self.ok("vms", "list", "--json"))]


def get(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/", timeout=20) as r:
        return bytes(r.read()).decode()


def guest(volar: Volar, vm: str, *argv: str) -> str:
    return volar.ok("vms", "exec", vm, "--", *argv)


def random_bytes(volar: Volar, vm: str) -> bytes:
    """64 bytes of the guest's /dev/urandom, raw (the image's busybox has no od)."""
    done = subprocess.run([sys.executable, "-m", "host.cli", "vms", "exec", vm, "--", "head",
                           "-c", "64", "/dev/urandom"], cwd=REPO, capture_output=True,
                          env={**os.environ, "VOLAR_STATE_DIR": str(volar.state)},
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def processes_naming(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (a VM's run directory)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd:
            found.append(cmd)
    return found


@pytest.fixture(scope="module")
def image(kernel: KernelInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fetch_caddy import FetchError, fetch_caddy

    try:
        fetch_caddy(quiet=True)
    except FetchError as exc:
        pytest.skip(reason=f"no static caddy for the example: {exc}")
    return fledge_build(EXAMPLE / "fledge.toml",
                        tmp_path_factory.mktemp("caddy-image") / "plugin.cpio.gz")


@pytest.fixture(scope="module")
def volar(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Volar]:
    v = Volar(tmp_path_factory.mktemp("volar") / "state")
    v.install(image, "caddy-ticker")
    yield v
    for name in v.names():
        v.run("vms", "delete", name, timeout=120)


@pytest.fixture(scope="module")
def snapshot(volar: Volar) -> Path:
    """A snapshot of a healthy Caddy VM (q35: its vsock device can be unplugged)."""
    volar.ok("vms", "create", "snap-src", "--plugin", "caddy-ticker", "--memory", "384",
             "--machine", "q35")
    volar.wait("snap-src", "healthy")
    out = volar.state.parent / "snap"
    said = volar.ok("vms", "snapshot", "snap-src", "--out", str(out))
    assert f"Snapshot of snap-src in {out}" in said
    assert (out / "snapshot.json").is_file() and (out / "state").is_file()
    return out


def test_two_restored_copies_serve_with_their_own_identity(volar: Volar,
                                                             snapshot: Path) -> None:
    # The source runs on after its snapshot, with a new vsock backend.
    assert EXPECTED in get(volar.show("snap-src")["address"])
    assert EXPECTED in volar.ok("vms", "http", "snap-src", "/v1/")
    assert guest(volar, "snap-src", "hostname").strip() == "snap-src"
    for copy in ("copy-a", "copy-b"):
        said = volar.ok("vms", "create", copy, "--from-snapshot", str(snapshot))
        assert f"VM {copy} created with address 127.0.0.1:" in said
    infos = {copy: volar.wait(copy, "healthy") for copy in ("copy-a", "copy-b")}
    for copy, info in infos.items():
        assert EXPECTED in get(info["address"])
        # The agent API's vsock listener inside works through the copy's new device.
        assert EXPECTED in volar.ok("vms", "http", copy, "/v1/")
        assert guest(volar, copy, "hostname").strip() == copy
        # The clock stood still in the snapshot; kestrel stepped it to the host's.
        assert abs(int(guest(volar, copy, "date", "+%s")) - time.time()) < 5
        marks = [e["value"] for e in info["events"] if e["kind"] == "timeline"]
        assert "restored" in marks
    streams = {copy: random_bytes(volar, copy) for copy in infos}
    assert len(streams["copy-a"]) == 64 and streams["copy-a"] != streams["copy-b"]
    # Their logs reach their own hosts: the ticker's lines after the restore.
    deadline = time.monotonic() + 60
    for copy in infos:
        while volar.ok("vms", "logs", copy).count("tick") < 5:
            assert time.monotonic() < deadline, f"no ticks from {copy}"
            time.sleep(0.5)
    console = Path(volar.show("copy-a")["console_log"]).read_text(errors="replace")
    assert "kernel RNG reseeded with 32 bytes from the host" in console


def _refused(volar: Volar, name: str, snapshot: Path, expect: str) -> None:
    done = volar.run("vms", "create", name, "--from-snapshot", str(snapshot))
    assert done.returncode != 0
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("volar: ") and expect in line, line
    assert name not in volar.names()
    assert not processes_naming(str(volar.state / "vms" / name))


def test_refusals_are_one_line_and_leave_nothing_running(volar: Volar, snapshot: Path,
                                                         image: Path) -> None:
    _refused(volar, "r-missing", volar.state.parent / "no-such-snapshot",
             "snapshot.json does not exist")
    truncated = volar.state.parent / "truncated"
    shutil.copytree(snapshot, truncated)
    with open(truncated / "state", "r+b") as f:
        f.truncate((truncated / "state").stat().st_size // 2)
    _refused(volar, "r-truncated", truncated, "truncated or altered")
    (truncated / "state").unlink()
    _refused(volar, "r-nostate", truncated, "is missing")
    # The plugin changes under the same name: its initramfs is another file now.
    changed = volar.state.parent / "changed.cpio.gz"
    changed.write_bytes(image.read_bytes() + b"\0" * 512)
    volar.ok("plugins", "remove", "caddy-ticker", "--force")
    volar.install(changed, "caddy-ticker")
    _refused(volar, "r-changed", snapshot, "plugin 'caddy-ticker' changed since the snapshot")
