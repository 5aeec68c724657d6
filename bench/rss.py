"""P2: kestrel's resident memory with an idle workload and under a log flood.

kestrel runs as PID 1 of fresh namespaces; its host pid is read from /proc and
VmRSS sampled. Idle: the workload sleeps, the figure is the settled RSS (goal
<= 16 MB), against a plain `python3 -S -I` that spawned the same workload.
Flood: the workload writes ~200 MB to stdout, drained by a HostSession
receiver; the figure is peak RSS minus the idle RSS of the same run (<= 8 MB).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from bench import KestrelRun, NsRun, Unavailable, describe_exit, kestrel_runner, run_pid1, work_dir
from bench.startup import DEBIAN_PYTHON
from bench.table import Figure, Spread

SLEEP_S = 6
SETTLED_AFTER_S = 3.0  # boot done, agent loop idle (heartbeats only)
FLOOD_BYTES = 200 * 1024 * 1024
SAMPLE_S = 0.02
SPAWN_AND_WAIT = (
    "import os, sys\n"
    "pid = os.posix_spawn(sys.argv[1], [sys.argv[1], 'sleep', sys.argv[2]], {})\n"
    "os.waitpid(pid, 0)\n"
)


def _settled_mb(ns: NsRun) -> float:
    late = [kb for t, kb in ns.rss_kb if t >= SETTLED_AFTER_S]
    if not late:
        raise Unavailable(f"no RSS samples after {SETTLED_AFTER_S} s ({describe_exit(ns)})")
    return statistics.median(late) / 1024


def _idle(runner: KestrelRun) -> float:
    ns, _, _ = runner.run(["sleep", str(SLEEP_S)], timeout=60, sample_every=0.05)
    return _settled_mb(ns)


def _flood(runner: KestrelRun) -> tuple[float, float, int]:
    """Peak RSS (MB) during the flood, settled RSS before it, bytes received."""
    ns, got, _ = runner.run(["flood", str(FLOOD_BYTES), "1"], timeout=300,
                            sample_every=SAMPLE_S)
    if not ns.rss_kb or got.log_bytes < FLOOD_BYTES:
        raise Unavailable(f"flood run incomplete: {got.log_bytes} of {FLOOD_BYTES} bytes "
                          f"({describe_exit(ns)})")
    return max(kb for _, kb in ns.rss_kb) / 1024, ns.rss_kb[0][1] / 1024, got.log_bytes


def _baseline(wl: Path) -> float:
    python = DEBIAN_PYTHON if DEBIAN_PYTHON.is_file() else Path(sys.executable)
    ns = run_pid1('exec "$0" -S -I -c "$1" "$2" "$3"',
                  [str(python), SPAWN_AND_WAIT, str(wl), str(SLEEP_S)], timeout=60,
                  sample_every=0.05)
    return _settled_mb(ns)


def measure(runs: int = 3) -> list[Figure]:
    idle = Figure("P2 kestrel RSS, idle workload", id="P2", unit="MB", goal="value <= 16",
                  baseline_label="python3 -S -I + spawn")
    flood = Figure("P2 kestrel RSS growth, 200 MB log flood", id="P2-flood", unit="MB",
                   goal="value <= 8",
                   baseline_label="idle RSS")
    try:
        work = work_dir()
        runner, label = kestrel_runner(work)
        idle_mb, base_mb, growth_mb, peak_mb = [], [], [], []
        for _ in range(runs):
            idle_mb.append(_idle(runner))
            base_mb.append(_baseline(runner.wl))
            peak, _, _ = _flood(runner)
            peak_mb.append(peak)
            growth_mb.append(peak - idle_mb[-1])
    except Unavailable as exc:
        idle.na = flood.na = str(exc)
        return [idle, flood]
    idle.value, idle.baseline = Spread.of(idle_mb), Spread.of(base_mb)
    idle.note = f"{label} kestrel, VmRSS median after {SETTLED_AFTER_S} s, {runs} runs"
    flood.value, flood.baseline = Spread.of(growth_mb), Spread.of(idle_mb)
    flood.note = (f"peak VmRSS {statistics.median(peak_mb):.1f} MB while the workload wrote "
                  f"{FLOOD_BYTES >> 20} MiB (sampled every {SAMPLE_S * 1000:.0f} ms)")
    idle.extra = {"idle_mb": idle_mb, "baseline_mb": base_mb, "kestrel": label}
    flood.extra = {"peak_mb": peak_mb, "growth_mb": growth_mb}
    return [idle, flood]


if __name__ == "__main__":
    from bench.table import render

    print(render(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
