"""Time `fledge build` against the classic shell pipeline on the same tree (for bench/).

The baseline stages the tree fledge built (its cpio unpacked into a directory) and runs
`find . | sort | cpio -o -H newc | gzip -9 -n`, the usual hand-made initramfs. Both
run as subprocesses, so both pay their start-up; the figures are medians of *runs*.
Run: python -m builder.measure path/to/fledge.toml [runs] [fledge build options...]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from builder import compress, cpio

BASELINE = "find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9 -n"


@dataclass(frozen=True)
class Comparison:
    fledge_seconds: float
    baseline_seconds: float
    fledge_bytes: int
    baseline_bytes: int
    unpacked_bytes: int
    runs: int

    @property
    def ratio(self) -> float:
        return self.fledge_seconds / self.baseline_seconds

    def report(self) -> str:
        mb = 1024 * 1024
        return (f"fledge build: {self.fledge_seconds:.2f} s, {self.fledge_bytes / mb:.1f} MB\n"
                f"baseline ({BASELINE}): {self.baseline_seconds:.2f} s, "
                f"{self.baseline_bytes / mb:.1f} MB\n"
                f"tree {self.unpacked_bytes / mb:.1f} MB; fledge/baseline time "
                f"{self.ratio:.2f}x, size {self.fledge_bytes / self.baseline_bytes:.3f}x "
                f"(median of {self.runs})")


def _timed(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def compare(config: Path, *, runs: int = 3, extra_args: tuple[str, ...] = ()) -> Comparison:
    """Build *config* with fledge *runs* times (after one warm-up that fills the shim and
    agent caches), then time the baseline on the same staged tree."""
    config = config.resolve()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with tempfile.TemporaryDirectory(prefix="fledge-measure-") as tmp:
        work = Path(tmp)
        image = work / "plugin.cpio.gz"
        cmd = [sys.executable, "-m", "builder.cli", "build", "-q", "-c", str(config),
               "-o", str(image), "--compression", "gzip", *extra_args]
        _timed(cmd, cwd=config.parent, env=env)  # warm-up: caches, page cache
        fledge = [_timed(cmd, cwd=config.parent, env=env) for _ in range(runs)]
        tree = work / "tree"
        tree.mkdir()
        with compress.open_image(image) as stream:
            members = list(cpio.read_archive(stream))
        cpio.extract(members, tree)
        baseline_out = work / "baseline.cpio.gz"
        shell = ["bash", "-o", "pipefail", "-c", f"{BASELINE} > {baseline_out}"]
        baseline = [_timed(shell, cwd=tree) for _ in range(runs)]
        return Comparison(
            fledge_seconds=statistics.median(fledge),
            baseline_seconds=statistics.median(baseline),
            fledge_bytes=image.stat().st_size,
            baseline_bytes=baseline_out.stat().st_size,
            unpacked_bytes=sum(m.size for m in members),
            runs=runs,
        )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    runs = int(args[1]) if len(args) > 1 and args[1].isdigit() else 3
    extra = tuple(args[2:] if len(args) > 1 and args[1].isdigit() else args[1:])
    print(compare(Path(args[0]), runs=runs, extra_args=extra).report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
