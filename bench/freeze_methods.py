"""Compare ways of freezing kestrel: exec -> posix_spawn latency, RSS, gzip'd size.

Run from the repository root: ``python3 -m bench.freeze_methods [--runs 25]``.
Methods: (a) fledge's relocatable bundle (builder/freeze.py), (b) PyInstaller --onedir
(skipped when PyInstaller is missing), against plain Debian python3.11 -S -I doing the
same spawn in the same run. Also prints where the bundle's RSS goes and the size of a
base image (shim + busybox + frozen kestrel + modules) when a kernel is available.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path

from builder import elf
from builder.freeze import freeze_kestrel

DEBIAN_PYTHON = "/usr/bin/python3.11"
STAMP_C = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    printf("%lld\n", (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
    return 0;
}
"""

# One program for every method. "spawn": the boot path's shape (os only, then spawn);
# "rss": the agent's imports; "steps": RSS after each import, in order.
PROGRAM = """
import os, sys

def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

mode = sys.argv[1]
if mode == "spawn":
    pid = os.posix_spawn(sys.argv[2], [sys.argv[2]], {})
    os.waitpid(pid, 0)
elif mode == "rss":
    start = rss_kb()
    import trio, msgpack, h11
    mid = rss_kb()
    import psutil
    print(start, mid, rss_kb(), len(sys.modules))
elif mode == "steps":
    import importlib
    prev = rss_kb()
    print("start", prev, len(sys.modules))
    for name in sys.argv[2].split(","):
        n = len(sys.modules)
        importlib.import_module(name)
        now = rss_kb()
        print(name, now - prev, len(sys.modules) - n)
        prev = now
"""

PYI_EXCLUDES = ("numpy", "yaml", "cffi", "_cffi_backend", "readline", "curses", "tkinter",
                "pytest", "hypothesis", "mypy", "IPython", "setuptools", "pkg_resources")
STEPS = ("typing,enum,threading,socket,inspect,attr,sortedcontainers,idna,outcome,"
         "subprocess,pathlib,trio,msgpack,h11,psutil")


def run(cmd: list[str], **kw: object) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    out: str = proc.stdout
    return out


def tree_gz(paths: dict[str, Path]) -> int:
    """gzip -9 size of a deterministic tar of {archive name: file or dir}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, path in sorted(paths.items()):
            tar.add(path, arcname=name, filter=_zero_meta)
    gz = subprocess.run(["gzip", "-9n"], input=buf.getvalue(), capture_output=True, check=True)
    return len(gz.stdout)


def _zero_meta(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def build_pyinstaller(program: Path, work: Path) -> Path | None:
    if importlib.util.find_spec("PyInstaller") is None:
        print("PyInstaller not installed: method (b) skipped")
        return None
    dist = work / "dist"
    exe = dist / "prog" / "prog"
    if not exe.exists():
        # --strip and the excludes keep the comparison fair: this machine's pyenv has an
        # unstripped libpython (23 MB), and PyInstaller's hooks otherwise drag in numpy,
        # yaml and cffi found in the same site-packages.
        excludes = [a for m in PYI_EXCLUDES for a in ("--exclude-module", m)]
        run([sys.executable, "-m", "PyInstaller", "--onedir", "--noconfirm", "--strip",
             "--log-level", "WARN", "--distpath", str(dist), "--workpath",
             str(work / "build"), "--specpath", str(work), *excludes, str(program)])
    return exe


def exec_to_spawn(methods: dict[str, list[str]], stamp: Path, runs: int) -> dict[str, float]:
    """Median ms from just before exec of the method to the spawned child's first clock
    read, interleaving methods so machine noise hits all alike."""
    samples: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(runs):
        for name, cmd in methods.items():
            t0 = time.monotonic_ns()
            out = run([*cmd, "spawn", str(stamp)])
            samples[name].append((int(out.split()[0]) - t0) / 1e6)
    return {m: statistics.median(v) for m, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=25)
    parser.add_argument("--work", type=Path, default=Path(".cache/bench-freeze"))
    args = parser.parse_args()
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    program = work / "prog.py"
    program.write_text(textwrap.dedent(PROGRAM))
    stamp = work / "stamp"
    (work / "stamp.c").write_text(STAMP_C)
    run(["gcc", "-O2", "-static", "-o", str(stamp), str(work / "stamp.c")])

    t = time.perf_counter()
    frozen = freeze_kestrel(cache_dir=work / "cache")
    print(f"frozen bundle: {frozen.root} ({time.perf_counter() - t:.1f} s)")
    bundle_py = str(frozen.root / "opt/kestrel/bin/python3.11")
    methods: dict[str, list[str]] = {
        "python3.11 -S -I (baseline)": [DEBIAN_PYTHON, "-S", "-I", str(program)],
        "(a) fledge bundle": [bundle_py, "-IOO", str(program)],
    }
    sizes: dict[str, int] = {"(a) fledge bundle": tree_gz({".": frozen.root})}
    t = time.perf_counter()
    pyi = build_pyinstaller(program, work / "pyinstaller")
    if pyi is not None:
        print(f"PyInstaller onedir: {pyi.parent} ({time.perf_counter() - t:.1f} s)")
        methods["(b) PyInstaller onedir"] = [str(pyi)]
        elves = [p for p in pyi.parent.rglob("*") if p.is_file() and elf.is_elf(p)]
        libs = elf.host_library_closure(elves)
        sizes["(b) PyInstaller onedir"] = tree_gz(
            {"opt/prog": pyi.parent, **{d.lstrip("/"): p for d, p in libs.items()}})

    latency = exec_to_spawn(methods, stamp, args.runs)
    base = latency["python3.11 -S -I (baseline)"]
    rss = {}
    for name, cmd in methods.items():
        if "baseline" in name:
            # The baseline imports the builder's own packages (real ssl included).
            import trio

            site = str(Path(trio.__file__).parent.parent)
            cmd = [DEBIAN_PYTHON, "-S", "-I", "-c",
                   f"import sys; sys.path.append({site!r}); sys.argv[1:] = ['rss'];"
                   f"exec(open({str(program)!r}).read())"]
            rss[name] = run(cmd).split()
        else:
            rss[name] = run([*cmd, "rss"]).split()

    print(f"\nexec -> posix_spawn: median of {args.runs} runs; RSS in MB: at start / after "
          "trio+msgpack+h11 / +psutil; size: tar | gzip -9 of the tree + glibc closure")
    print(f"{'method':30} {'spawn ms':>9} {'x base':>7} {'RSS start':>10} {'trio..h11':>10} "
          f"{'+psutil':>8} {'modules':>8} {'gz MB':>7}")
    for name in methods:
        r = [int(x) for x in rss[name]]
        size = f"{sizes[name] / 1e6:7.2f}" if name in sizes else f"{'-':>7}"
        print(f"{name:30} {latency[name]:9.1f} {latency[name] / base:7.2f} "
              f"{r[0] / 1024:10.1f} {r[1] / 1024:10.1f} {r[2] / 1024:8.1f} {r[3]:8d} {size}")

    print("\nwhere the bundle's RSS goes (kB added by each import, in order; modules added):")
    print(textwrap.indent(run([bundle_py, "-IOO", str(program), "steps", STEPS]), "  "))
    heap_by_package(frozen.root)
    image_size(frozen.root, work)


HEAP = """
import sys
lib = sys.argv[1] + "/opt/kestrel/lib/"
sys.path[:0] = [lib + "python311.zip", lib + "site-packages", lib + "lib-dynload"]
import collections, tracemalloc
tracemalloc.start()
import trio, msgpack, h11, psutil
by = collections.Counter()
for stat in tracemalloc.take_snapshot().statistics("filename"):
    f = stat.traceback[0].filename
    key = f.split(".zip/")[1].split("/")[0] if ".zip/" in f else f
    by[key.split("site-packages/")[-1].split("/")[0].removesuffix(".py")] += stat.size
print(f"  Python heap (tracemalloc) after trio+msgpack+h11+psutil: {sum(by.values()) >> 10} kB")
for key, size in by.most_common(8):
    print(f"  {size >> 10:6} kB allocated by {key}")
"""


def heap_by_package(frozen_root: Path) -> None:
    """Which code allocated the Python heap: Debian's python3.11 (same bytecode, plus its
    own tracemalloc) importing from the bundle. "<frozen zipimport>" is the unmarshalled
    code objects of every module; attr is the classes attrs generates for trio."""
    print(run([DEBIAN_PYTHON, "-S", "-I", "-c", HEAP, str(frozen_root)]), end="")


def image_size(frozen_root: Path, work: Path) -> None:
    """Build the default base image with fledge when a kernel (modules) is available."""
    kernel = Path(os.environ.get("KESTREL_KERNEL_DIR", ".cache/kernel"))
    if not (kernel / "current" / "modules").is_dir():
        print(f"base image: skipped (no kernel modules under {kernel}: volar kernel fetch)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        toml = Path(tmp) / "fledge.toml"
        toml.write_text('version = "1"\nstrategy = "initramfs"\n'
                        '[agent]\nsource_strategy = "release"\n')
        out = Path(tmp) / "base.cpio.gz"
        env = {**os.environ, "KESTREL_KERNEL_DIR": str(kernel.resolve())}
        run([sys.executable, "-m", "builder.cli", "build", "-q", "-c", str(toml), "-o",
             str(out)], env=env)
        print(f"base image (shim + busybox + frozen kestrel + modules): "
              f"{out.stat().st_size / 1e6:.2f} MB gzip (goal <= 8 MB); frozen tree alone "
              f"{tree_gz({'.': frozen_root}) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
