"""A private containerd for the shim's VM tests, and an OCI image made from busybox.

containerd (Debian's package) runs with its own root, state, sockets and
config under one temporary directory, with this checkout's
containerd-shim-kestrel-v1 first on its PATH; ``stop`` ends it (and only it).
The image is an OCI archive built here (one layer: static busybox and its
applets), imported with ``ctr image import`` as a user would.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

NAMESPACE = "kestrel-test"
IMAGE = "docker.io/kestrel/busybox:test"
RUNTIME = "io.containerd.kestrel.v1"
APPLETS = ("sh", "echo", "cat", "sleep", "ls", "id", "true", "false", "env", "hostname")
CONFIG = """\
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"""


def _blob(blobs: dict[str, bytes], data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def _layer(busybox: Path) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, *, kind: bytes = tarfile.DIRTYPE, data: bytes = b"",
                link: str = "", mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.linkname, info.size = kind, mode, link, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "run"):
            add(d)
        add("bin/busybox", kind=tarfile.REGTYPE, data=busybox.read_bytes())
        for applet in APPLETS:
            add(f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox")
        add("etc/hostname", kind=tarfile.REGTYPE, data=b"kestrel-image\n", mode=0o644)
    return raw.getvalue()


def oci_archive(busybox: Path, out: Path, *, name: str = IMAGE, user: str = "") -> Path:
    """An OCI image layout tarball: one gzip layer, a config, a manifest, an index.
    ``user``: the image config's User ("uid:gid"), which containerd puts in
    config.json's process.user."""
    blobs: dict[str, bytes] = {}
    layer_tar = _layer(busybox)
    layer = _blob(blobs, gzip.compress(layer_tar, mtime=0))
    config = _blob(blobs, json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/sh"], **({"User": user} if user else {})},
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]},
    }).encode())
    manifest = _blob(blobs, json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
    }).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
        "annotations": {"io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": "test"}}]}
    with tarfile.open(out, "w") as tar:
        files = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
                 "index.json": json.dumps(index).encode(),
                 **{f"blobs/sha256/{d[7:]}": b for d, b in blobs.items()}}
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


class Containerd:
    """One private containerd; ``ctr`` runs against it in the test namespace."""

    def __init__(self, base: Path, *, shim_config: Path) -> None:
        self.base = base
        self.socket = base / "containerd.sock"
        self.config = base / "config.toml"
        self.log = base / "containerd.log"
        self.shim_config = shim_config
        self.proc: subprocess.Popen[bytes] | None = None
        bindir = str(Path(sys.executable).parent)  # the venv's containerd-shim-kestrel-v1
        self.env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                    "KESTREL_SHIM_CONFIG": str(shim_config)}

    def start(self) -> None:
        self.config.write_text(CONFIG.format(d=self.base))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(self.config)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, env=self.env, start_new_session=True)
        deadline = time.monotonic() + 30
        while self.ctr("version", check=False, quiet=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def ctr(self, *args: str, check: bool = True, quiet: bool = False, timeout: float = 240,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        cmd = ["ctr", "--address", str(self.socket), "--namespace", NAMESPACE, *args]
        if not quiet:
            print("$ " + " ".join(cmd[5:] if cmd[0] == "ctr" else cmd), flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              input=input.decode() if input is not None else None, check=False)
        if not quiet:
            print(done.stdout + done.stderr, flush=True)
        if check and done.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} exited {done.returncode}: {done.stderr}"
                                 f"\n--- containerd log ---\n{self.log_tail()}")
        return done

    def ctr_popen(self, *args: str) -> subprocess.Popen[str]:
        cmd = ["ctr", "--address", str(self.socket), "--namespace", NAMESPACE, *args]
        print("$ ctr " + " ".join(args) + " &", flush=True)
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def processes_mentioning(needle: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains ``needle`` (QEMU, monitors, shims)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            found.append((int(entry.name), cmdline.strip()))
    return found


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
