"""containerd-run: ``ctr run --rm --runtime io.containerd.kestrel.v1 IMG ID echo hi``
against the same VM launched through volar's lifecycle directly, same run.

The baseline is what the shim itself does once containerd has asked: a
process that calls host.lifecycle.launch_with_manifest with the same
manifest, kernel, initramfs and (cached) rootfs image, waits for the exit
and prints the output. The difference is the shim's cost: containerd, ctr,
the shim's start/daemon, ttRPC, the rootfs check, events. The image cache is
warmed by one run first. Interleaved, so a busy host slows both alike.
Usage: python -m bench.containerd (under the VM lock).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import REPO
from bench.table import Figure, Spread

sys.path.insert(0, str(REPO / "vm-tests"))
from containerd_env import IMAGE, RUNTIME, Containerd, oci_archive
from harness import fledge_build

TOML = 'version = "1"\nstrategy = "initramfs"\n\n[agent]\nsource_strategy = "release"\n' \
       'version = "latest"\n'


def direct(state: str, initramfs: str, image: str, name: str) -> int:
    """The baseline's child: one VM through volar's lifecycle, `echo hi`, its output."""
    from host.containerd.spec import parse_config
    from host.containerd.vm import cleanup_vm, manifest_for
    from host.lifecycle import launch_with_manifest
    from host.state import TERMINAL, Store

    spec = parse_config({"process": {"args": ["echo", "hi"], "env": [], "cwd": "/"}})
    store = Store(Path(state))
    monitor = launch_with_manifest(
        store, name, manifest_json=manifest_for(spec, initramfs=Path(initramfs),
                                                image=Path(image)),
        initramfs=Path(initramfs), cpus=1, memory_mb=256, scratch_disks=(Path(image),),
        cmdline_extra={"volant.rootfs_device": "vda", "volant.rootfs_fstype": "ext4",
                       "kestrel.hostname": name}, boot_timeout=120)
    while store.vm(name).status not in TERMINAL:
        time.sleep(0.05)
    sys.stdout.buffer.write(b"".join(data for _, _, data, _ in store.logs(name)))
    monitor.wait()
    cleanup_vm(Path(state), name, None)
    return 0


def measure(runs: int) -> list[Figure]:
    run = Figure("containerd: ctr run --rm ... echo hi", id="containerd-run", unit="s",
                 baseline_label="volar's lifecycle directly, same VM")
    over = Figure("containerd: the shim's overhead per run", id="containerd-overhead",
                  unit="s", goal="value <= 0.3")
    if shutil.which("containerd") is None:
        run.na = over.na = "containerd is not installed (apt-get install containerd)"
        return [run, over]
    base = Path(tempfile.mkdtemp(prefix="kcb-"))
    try:
        return _measure(base, runs, run, over)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _measure(base: Path, runs: int, run: Figure, over: Figure) -> list[Figure]:
    (base / "img").mkdir()
    (base / "img" / "fledge.toml").write_text(TOML)
    initramfs = fledge_build(base / "img" / "fledge.toml", base / "img" / "kestrel.cpio.gz")
    state = base / "shim"
    (base / "shim.json").write_text(json.dumps({"initramfs": str(initramfs),
                                                "state_dir": str(state)}))
    c = Containerd(base, shim_config=base / "shim.json")
    c.start()
    try:
        c.ctr("image", "import", str(oci_archive(Path("/bin/busybox"), base / "oci.tar")),
              quiet=True)
        _ctr_run(c, "warm")  # builds the cached rootfs image
        (image,) = (state / "images").glob("*.ext4")
        shim_s, direct_s = [], []
        for i in range(runs):
            shim_s.append(_ctr_run(c, f"b{i}"))
            t0 = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "bench.containerd", "direct", str(state),
                 str(initramfs), str(image), f"direct-{i}"],
                cwd=REPO, capture_output=True, timeout=300, check=False)
            direct_s.append(time.monotonic() - t0)
            if done.stdout != b"hi\n":
                raise RuntimeError(f"direct run printed {done.stdout!r}: {done.stderr[-300:]!r}")
    finally:
        c.stop()
    run.value, run.baseline = Spread.of(shim_s), Spread.of(direct_s)
    run.note = f"{runs} interleaved runs, TCG, rootfs image cached"
    run.extra = {"ctr_s": shim_s, "direct_s": direct_s}
    over.value = Spread.of([a - b for a, b in zip(shim_s, direct_s, strict=True)])
    over.note = "per run: ctr run --rm minus the direct launch of the same VM"
    return [run, over]


def _ctr_run(c: Containerd, name: str) -> float:
    t0 = time.monotonic()
    done = c.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, name, "echo", "hi", quiet=True)
    took = time.monotonic() - t0
    if done.stdout != "hi\n":
        raise RuntimeError(f"ctr run printed {done.stdout!r}: {done.stderr[-300:]}")
    return took


def main(argv: list[str]) -> int:
    if argv[:1] == ["direct"]:
        return direct(*argv[1:5])
    from bench.table import render

    figs: list[Any] = measure(int(argv[0]) if argv else 5)
    print(render(figs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
