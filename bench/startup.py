"""P1: exec of kestrel -> exec of the workload, host side, against plain python.

Both run as PID 1 of fresh namespaces. A launcher records CLOCK_MONOTONIC
just before it execs kestrel (frozen, chrooted) or the baseline (`python3 -S
-I` doing only the same posix_spawn); the static workload records the clock
first thing. Runs are interleaved so a busy machine slows both alike.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench import (
    KestrelRun,
    Unavailable,
    describe_exit,
    kestrel_runner,
    run_pid1,
    work_dir,
)
from bench.table import Figure, Spread, pair_ratios

DEBIAN_PYTHON = Path("/usr/bin/python3.11")  # the interpreter the frozen kestrel carries
SPAWN_ONLY = (
    "import os, sys\n"
    "pid = os.posix_spawn(sys.argv[1], [sys.argv[1], 'stamp', sys.argv[2]], {})\n"
    "os.waitpid(pid, 0)\n"
)


def _read_stamp(path: Path) -> float | None:
    try:
        value = int(path.read_text()) / 1e9
    except (OSError, ValueError):
        return None
    path.unlink()
    return value


def _kestrel_once(runner: KestrelRun, work: Path) -> float:
    if runner.frozen is not None:
        ns, _, t0 = runner.run(["stamp", "/t1"], timeout=60)
        t1 = _read_stamp(runner.frozen / "t1")
    else:
        ns, _, t0 = runner.run(["stamp", str(work / "t1")], timeout=60)
        t1 = _read_stamp(work / "t1")
    if t0 is None or t1 is None:
        raise Unavailable(f"kestrel did not start the workload ({describe_exit(ns)})")
    return (t1 - t0) * 1000


def _baseline_once(python: Path, wl: Path, work: Path) -> float:
    t0f, t1f = work / "b0", work / "b1"
    ns = run_pid1('exec "$0" launch - "$1" "$2" -S -I -c "$3" "$0" "$4"',
                  [str(wl), str(t0f), str(python), SPAWN_ONLY, str(t1f)], timeout=60)
    t0, t1 = _read_stamp(t0f), _read_stamp(t1f)
    if t0 is None or t1 is None:
        raise Unavailable(f"baseline did not spawn ({describe_exit(ns)})")
    return (t1 - t0) * 1000


def measure(runs: int = 15) -> Figure:
    fig = Figure("P1 exec kestrel -> exec workload (host)", id="P1", unit="ms",
                 goal="ratio <= 1.5", baseline_label="python3 -S -I posix_spawn")
    try:
        work = work_dir()
        runner, label = kestrel_runner(work)
        python = DEBIAN_PYTHON if DEBIAN_PYTHON.is_file() else Path(sys.executable)
        kestrel_ms: list[float] = []
        base_ms: list[float] = []
        _kestrel_once(runner, work)  # warm the page cache for both
        _baseline_once(python, runner.wl, work)
        for _ in range(runs):
            kestrel_ms.append(_kestrel_once(runner, work))
            base_ms.append(_baseline_once(python, runner.wl, work))
    except Unavailable as exc:
        fig.na = str(exc)
        return fig
    fig.value, fig.baseline = Spread.of(kestrel_ms), Spread.of(base_ms)
    fig.note = (f"{label} kestrel vs {python} as PID 1 of fresh namespaces, "
                f"{runs} interleaved runs")
    fig.extra = {"kestrel_ms": kestrel_ms, "baseline_ms": base_ms, "kestrel": label}
    pairs = pair_ratios(kestrel_ms, base_ms)
    if pairs is not None:
        fig.extra["pair_ratios"] = [v / b for v, b in zip(kestrel_ms, base_ms, strict=False)]
        fig.note += f"; per-run ratios {pairs.median:.2f}x [{pairs.low:.2f}-{pairs.high:.2f}]"
    return fig


if __name__ == "__main__":
    from bench.table import render

    print(render([measure(int(sys.argv[1]) if len(sys.argv) > 1 else 15)]))
