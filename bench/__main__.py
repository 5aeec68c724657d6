"""`python -m bench` (`make bench`): every figure, one table, and bench/results.json.

Each figure is the median of repeated runs with its spread and a baseline
measured in the same run; the ratio decides. A figure whose prerequisite is
missing prints n/a with the reason. `--only P1,P6` runs a subset; `--quick`
cuts the repetitions (for a smoke run, not for numbers).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import REPO, work_dir
from bench.table import Figure, Spread, pair_ratios, render, write_json

RESULTS = Path(__file__).resolve().parent / "results.json"


def _boot_module() -> Any:
    import bench.boot as boot

    return boot


def p1(runs: int) -> list[Figure]:
    from bench import startup

    return [startup.measure(runs)]


def p1_guest(runs: int) -> list[Figure]:
    """kestrel's boot marks under QEMU (guest uptime), from bench.boot."""
    fig = Figure("P1 guest boot timeline", id="P1-guest", unit="s")
    try:
        timeline = _boot_module().boot_timeline(runs)
    except Exception as exc:  # another helper's module: any failure is a missing figure
        fig.na = f"bench.boot.boot_timeline: {type(exc).__name__}: {exc}"
        return [fig]
    figs = []
    for mark, p in timeline.get("guest_uptime_s", {}).items():
        figs.append(Figure(f"P1 guest uptime at {mark}", id=f"P1-guest-{mark}", unit="s",
                           value=Spread(p["p50"], p["p10"], p["p90"], timeline["runs"])))
    for mark, p in timeline.get("host_since_launch_s", {}).items():
        figs.append(Figure(f"P1 host: launch -> {mark}", id=f"P1-host-{mark}", unit="s",
                           value=Spread(p["p50"], p["p10"], p["p90"], timeline["runs"])))
    if not figs:
        fig.na = "bench.boot.boot_timeline returned no marks"
        return [fig]
    marks = timeline.get("guest_uptime_s", {})
    if "kestrel_start" in marks and "workload_exec" in marks:
        gap = marks["workload_exec"]["p50"] - marks["kestrel_start"]["p50"]
        figs.insert(0, Figure("P1 guest kestrel_start -> workload_exec", id="P1-guest",
                              unit="s",
                              value=Spread(gap, gap, gap, 1),
                              note="difference of the two marks' medians (guest uptime)"))
    qemu = f"QEMU (TCG) boots of the Caddy plugin, {timeline['runs']} runs"
    figs[0].note = f"{figs[0].note}; {qemu}" if figs[0].note else qemu
    return figs


def p2(runs: int) -> list[Figure]:
    from bench import rss

    return rss.measure(max(1, runs // 3))


def p3_p5(runs: int) -> list[Figure]:
    from bench import image

    return image.measure(max(2, runs // 3))


def p4(runs: int) -> list[Figure]:
    fig = Figure("P4 launch -> first HTTP 200 (Caddy, QEMU)", id="P4", unit="s",
                 goal="ratio <= 1.15",
                 baseline_label="shell /init")
    try:
        r = _boot_module().measure_p4(max(1, runs // 3))
    except Exception as exc:
        fig.na = f"bench.boot.measure_p4: {type(exc).__name__}: {exc}"
        return [fig]
    fig.value, fig.baseline = Spread.of(r["kestrel_s"]), Spread.of(r["shell_s"])
    fig.goal = f"ratio <= {r.get('goal', 1.15)}"
    fig.note = (f"{r.get('machine', '?')} machine, TCG, {r['runs']} interleaved runs, "
                f"agent channel {r.get('channel', '?')}")
    fig.extra = {k: r[k] for k in ("kestrel_s", "shell_s", "kestrel_health_event_s", "channel")
                 if k in r}
    pairs = pair_ratios(r["kestrel_s"], r["shell_s"])
    if pairs is not None:
        fig.note += f"; per-run ratios {pairs.median:.2f}x [{pairs.low:.2f}-{pairs.high:.2f}]"
    # The limit P4 must hold: kestrel yielding the CPU must not delay the host's
    # news that the workload is healthy.
    health = Figure("P4 first health event after the first HTTP 200", id="P4-health", unit="s",
                    goal="value <= 1.0")
    if r.get("health_after_200_s"):
        health.value = Spread.of(r["health_after_200_s"])
        health.note = "host clock: the health event's arrival minus the first 200 seen, per run"
    else:
        health.na = "no health event arrived in any run"
    return [fig, health]


def p6(runs: int) -> list[Figure]:
    from bench import throughput

    return throughput.measure(max(1, runs // 3))


def p6_vm(runs: int) -> list[Figure]:
    """P6 in a real guest under TCG: vsock beside virtio-serial, interleaved."""
    from bench import vmflood

    return vmflood.measure(max(1, runs // 5))


def p7(runs: int) -> list[Figure]:
    """Warm starts (bench.warm): restore vs cold launch -> first 200, and the snapshot."""
    restore = Figure("P7 restore -> first HTTP 200 (Caddy, volar)", id="P7-restore", unit="s",
                     goal="ratio <= 0.25", baseline_label="cold launch (microvm)")
    snap = Figure("P7 snapshot of a healthy Caddy VM: paused", id="P7-snapshot", unit="s")
    try:
        from bench import warm

        r = warm.measure(max(1, runs // 3))
    except Exception as exc:
        restore.na = snap.na = f"bench.warm.measure: {type(exc).__name__}: {exc}"
        return [restore, snap]
    restore.value, restore.baseline = Spread.of(r["restore_s"]), Spread.of(r["cold_s"])
    restore.note = (f"{r['runs']} interleaved runs from spawning `volar vms create`; restore "
                    "of a q35 snapshot, cold boot on the default microvm")
    pairs = pair_ratios(r["restore_s"], r["cold_s"])
    if pairs is not None:
        restore.note += f"; per-run ratios {pairs.median:.2f}x [{pairs.low:.2f}-{pairs.high:.2f}]"
    restore.extra = {k: r[k] for k in ("restore_s", "cold_s")}
    snap.value = Spread.of(r["snapshot_s"])
    size = Spread.of(r["snapshot_mb"])
    snap.note = (f"volar's pause to run-on (vsock unplug, migration to a file, re-plug); "
                 f"state file {size.median:.1f} MB (512 MB VM)")
    snap.extra = {"snapshot_s": r["snapshot_s"], "size_mb": r["snapshot_mb"]}
    return [restore, snap]


def containerd(runs: int) -> list[Figure]:
    """containerd-run / containerd-overhead: the shim against volar directly (bench.containerd)."""
    from bench import containerd as ctrd

    return ctrd.measure(max(1, runs // 3))


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB, VmHWM polled until exit) of one child process.

    Not wait4's ru_maxrss: exec inherits the high-water mark of the forking
    (or vforking) parent's memory, so every child would report the bench's.
    """
    import subprocess

    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hwm = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = max(hwm, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.001)
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise RuntimeError(f"{argv[-2:]} exited {proc.returncode}: {err.strip()[-200:]}")
    return elapsed, hwm / 1024


def volar_list(runs: int) -> list[Figure]:
    """`volar vms list` over 100 stopped VMs in a scratch state dir, vs sqlite3 alone."""
    wall = Figure("volar vms list, 100 rows", id="volar-list", unit="s",
                  baseline_label="python3 + sqlite3 rows")
    mem = Figure("volar vms list, 100 rows: peak RSS", id="volar-list-rss", unit="MB",
                 baseline_label="python3 + sqlite3 rows")
    from host.state import Store

    state = work_dir() / "volar"
    store = Store(state)
    with store.transaction():
        for i in range(100):
            store.db.execute(
                "INSERT INTO vms (name, plugin, vmm, status, cpus, memory_mb, kernel, initramfs,"
                " run_dir, created_at) VALUES (?, 'caddy', 'qemu', 'stopped', 1, 512, '/k', '/i',"
                " ?, ?)", (f"vm{i:03d}", str(state / f"vm{i:03d}"), time.time()))
    store.close()
    env = {**os.environ, "VOLAR_STATE_DIR": str(state)}
    volar = [sys.executable, "-c", "import sys; from host.cli import main; sys.exit(main())",
             "vms", "list"]
    plain = [sys.executable, "-c", "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
             "print(*db.execute('SELECT * FROM vms ORDER BY name').fetchall(), sep='\\n')",
             str(state / "state.db")]
    try:
        pairs = [(_timed(volar, env), _timed(plain, env)) for _ in range(runs)]
    except (RuntimeError, OSError) as exc:
        wall.na = mem.na = str(exc)
        return [wall, mem]
    wall.value = Spread.of([v[0] for v, _ in pairs])
    wall.baseline = Spread.of([b[0] for _, b in pairs])
    mem.value = Spread.of([v[1] for v, _ in pairs])
    mem.baseline = Spread.of([b[1] for _, b in pairs])
    wall.note = f"{runs} interleaved runs, 100 stopped VMs in a scratch VOLAR_STATE_DIR"
    mem.note = "VmHWM polled every ms until exit (a short process: a lower bound)"
    return [wall, mem]


# Runner key -> the function measuring its rows. A new figure (P7-restore,
# P7-snapshot, a containerd row) is one more entry; its rows carry their own ids.
FIGURES: dict[str, Callable[[int], list[Figure]]] = {
    "P1": p1, "P2": p2, "P3": p3_p5, "P4": p4, "P6": p6, "P6vm": p6_vm, "P1guest": p1_guest,
    "volar": volar_list, "P7": p7, "containerd": containerd,
}
# Row ids that another runner produces (for --only).
ALIASES = {"P2-flood": "P2", "P3-zstd": "P3", "P5": "P3", "P4-health": "P4",
           "P6-lost": "P6", "P6-codec": "P6", "P7-restore": "P7", "P7-snapshot": "P7",
           "containerd-run": "containerd", "containerd-overhead": "containerd",
           "P6-vsock": "P6vm", "P6-serial": "P6vm", "P6-vm-lost": "P6vm"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15, help="repetitions for the fast figures "
                    "(slower figures use a third)")
    ap.add_argument("--quick", action="store_true", help="3 repetitions: a smoke run")
    ap.add_argument("--only", default="", help=f"comma list of {', '.join(FIGURES)} "
                    "(P3 also gives P5)")
    ap.add_argument("--json", type=Path, default=RESULTS, help="where to write the JSON table")
    ap.add_argument("--update", action="store_true", help="keep the rows of figures not run "
                    "this time in the JSON table (re-measure one figure)")
    args = ap.parse_args(argv)
    runs = 3 if args.quick else args.runs
    # `make bench` exports it; a bare `python -m bench` uses the same kernel.
    if (REPO / ".cache" / "kernel").is_dir():
        os.environ.setdefault("KESTREL_KERNEL_DIR", str(REPO / ".cache" / "kernel"))
    asked = [k.strip() for k in args.only.split(",") if k.strip()] or list(FIGURES)
    chosen = list(dict.fromkeys(ALIASES.get(k, k) for k in asked))
    unknown = [k for k in chosen if k not in FIGURES]
    if unknown:
        print(f"bench: unknown figure {', '.join(unknown)} (choose from {', '.join(FIGURES)})",
              file=sys.stderr)
        return 2
    figures: list[Figure] = []
    t0 = time.monotonic()
    for key in chosen:
        print(f"bench: {key} ...", file=sys.stderr, flush=True)
        try:
            figures += FIGURES[key](runs)
        except Exception as exc:  # a broken figure must not hide the others
            traceback.print_exc()
            figures.append(Figure(f"{key}", id=key,
                                  na=f"bench error: {type(exc).__name__}: {exc}"))
    print(render(figures))
    meta = {"runs": runs, "seconds": round(time.monotonic() - t0, 1), "host": platform.node(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(figures, args.json, meta=meta, update=args.update)
    print(f"\n(written to {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
