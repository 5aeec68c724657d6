"""P3 base image size and P5 fledge build time, each against a same-run baseline.

P3: `fledge build` of a default-mode fledge.toml with no mappings (shim,
busybox, frozen kestrel, kernel modules), gzip and zstd (goal <= 8 MB).
P5: warm `fledge build` against `find . | sort | cpio -o -H newc | gzip -9 -n`
over the very tree fledge packed (extracted from its image), goal <= 1.0x.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import REPO, Unavailable, work_dir
from bench.table import Figure, Spread

FLEDGE_TOML = 'version = "1"\nstrategy = "initramfs"\n\n[agent]\nsource_strategy = "release"\n'
FLEDGE = [sys.executable, "-c", "import sys; from builder.cli import main; sys.exit(main())"]
BASELINE = "find . | sort | cpio -o -H newc --quiet | gzip -9 -n"


def _fledge(work: Path, out: Path, compression: str) -> float:
    t0 = time.monotonic()
    res = subprocess.run(
        [*FLEDGE, "build", "-q", "-c", str(work / "fledge.toml"), "-o", str(out),
         "--compression", compression],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    elapsed = time.monotonic() - t0
    if res.returncode != 0:
        last = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:]
        raise Unavailable(f"fledge build failed: {' '.join(last)[:300]}")
    return elapsed


def _baseline(tree: Path, out: Path) -> float:
    t0 = time.monotonic()
    with out.open("wb") as f:
        subprocess.run(["sh", "-c", BASELINE], cwd=tree, stdout=f, check=True)
    return time.monotonic() - t0


def _extract(image: Path, tree: Path) -> None:
    tree.mkdir()
    with image.open("rb") as f:
        gz = subprocess.Popen(["gzip", "-dc"], stdin=f, stdout=subprocess.PIPE)
        subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], cwd=tree,
                       stdin=gz.stdout, check=True)
        gz.wait()


def measure(runs: int = 5) -> list[Figure]:
    gz = Figure("P3 base image size (gzip)", id="P3", unit="MB", goal="value <= 8",
                baseline_label="same tree, cpio|gzip -9")
    zst = Figure("P3 base image size (zstd)", id="P3-zstd", unit="MB", goal="value <= 8",
                 baseline_label="fledge gzip image")
    build = Figure("P5 fledge build (warm) vs cpio|gzip -9", id="P5", unit="s",
                   goal="ratio <= 1.0",
                   baseline_label=BASELINE.split(" | ", 1)[0] + " | ...")
    figs = [gz, zst, build]
    missing = [t for t in ("cpio", "gzip", "zstd", "find", "sort") if shutil.which(t) is None]
    if missing:
        for f in figs:
            f.na = f"{', '.join(missing)} not found"
        return figs
    try:
        work = work_dir()
        (work / "fledge.toml").write_text(FLEDGE_TOML)
        image_gz, image_zst = work / "base.cpio.gz", work / "base.cpio.zst"
        _fledge(work, image_gz, "gzip")  # cold: freezes kestrel, fetches, fills caches
        _fledge(work, image_zst, "zstd")
        tree = work / "tree"
        _extract(image_gz, tree)
        base_out = work / "baseline.cpio.gz"
        fledge_s, base_s = [], []
        for _ in range(runs):
            fledge_s.append(_fledge(work, image_gz, "gzip"))
            base_s.append(_baseline(tree, base_out))
    except (Unavailable, subprocess.CalledProcessError, OSError) as exc:
        for f in figs:
            f.na = str(exc)
        return figs
    mb = 1e6
    gz.value = Spread.of([image_gz.stat().st_size / mb])
    gz.baseline = Spread.of([base_out.stat().st_size / mb])
    zst.value = Spread.of([image_zst.stat().st_size / mb])
    zst.baseline = gz.value
    gz.note = "default init mode, no mappings: shim, busybox, frozen kestrel, kernel modules"
    build.value, build.baseline = Spread.of(fledge_s), Spread.of(base_s)
    build.note = (f"{runs} interleaved runs; fledge wall time includes its Python start; "
                  "baseline packs the tree extracted from fledge's own image")
    build.extra = {"fledge_s": fledge_s, "baseline_s": base_s}
    return figs


if __name__ == "__main__":
    from bench.table import render

    print(render(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 5)))
