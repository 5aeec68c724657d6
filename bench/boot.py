"""P4: QEMU launch -> first HTTP 200, Caddy plugin vs shell /init; kestrel's boot timeline.

Both images carry the same kernel modules, the same static caddy and
Caddyfile, and the same gzip; the baseline's /init is a busybox script
(mount, insmod, ifconfig, exec caddy). Runs are interleaved so a busy host
slows both alike. Usage: python -m bench.boot [--runs 5] [--timeline-runs 10]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "caddy"
WORK = ROOT / ".cache" / "bench-boot"
sys.path.insert(0, str(ROOT / "vm-tests"))
sys.path.insert(0, str(EXAMPLE))

from fetch_caddy import fetch_caddy  # noqa: E402
from harness import Vm, boot, busybox_image, fledge_build  # noqa: E402

from host.kernel import KernelInfo, fetch_kernel  # noqa: E402
from host.qemu import QemuDriver  # noqa: E402
from kestrel.cmdline import build_cmdline  # noqa: E402
from kestrel.layout import DEFAULT_MODULES  # noqa: E402
from kestrel.protocol import Health, Timeline  # noqa: E402

GUEST_PORT = 80
DEADLINE_S = 240.0

SHELL_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for m in $(/bin/busybox cat /etc/modules.list); do /bin/busybox insmod $m; done
/bin/busybox ifconfig lo 127.0.0.1 up
/bin/busybox ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up
/bin/busybox route add default gw 10.0.2.2
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
cd /
exec /usr/bin/caddy run --config /etc/caddy/Caddyfile
"""


def _images(kernel: KernelInfo) -> tuple[Path, Path]:
    """(the fledge-built Caddy plugin, the shell-init baseline), built once per call."""
    WORK.mkdir(parents=True, exist_ok=True)
    caddy = fetch_caddy(quiet=True)
    plugin = fledge_build(EXAMPLE / "fledge.toml", WORK / "caddy-plugin.cpio.gz")
    raw = busybox_image(
        WORK / "shell-init.cpio", modules_dir=kernel.modules, modules=DEFAULT_MODULES,
        init=SHELL_INIT,
        files={"usr/bin/caddy": caddy.read_bytes(),
               "etc/caddy/Caddyfile": (EXAMPLE / "payload" / "Caddyfile").read_bytes()},
    )
    baseline = WORK / "shell-init.cpio.gz"
    baseline.write_bytes(gzip.compress(raw.read_bytes(), compresslevel=6, mtime=0))
    return plugin, baseline


async def _probe(host: str, port: int, request: bytes) -> bool:
    try:
        stream = await trio.open_tcp_stream(host.encode(), port)
        async with stream:
            await stream.send_all(request)
            head = await stream.receive_some(64)
            return head.startswith(b"HTTP/1.1 200")
    except (OSError, trio.BrokenResourceError):
        return False


async def first_200(vm: Vm, *, deadline: float, every: float = 0.05,
                    patience: float = 3.0) -> float:
    """The monotonic time of the first HTTP 200 through the port forward.

    A probe starts every ``every`` seconds and may take ``patience``: user
    networking accepts on the host side at once, and while the guest has no
    address the attempt just hangs, so serial probes with a long timeout
    would add up to that timeout to the figure, and short ones could cut off
    a slow first answer.
    """
    address = vm.address
    host, _, port_text = address.partition(":")
    port = int(port_text)
    request = f"GET / HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode()
    won: list[float] = []

    async def attempt(cancel: trio.CancelScope) -> None:
        with trio.move_on_after(patience):
            if await _probe(host, port, request):
                won.append(time.monotonic())
                cancel.cancel()

    async with trio.open_nursery() as nursery:
        while time.monotonic() < deadline and not won:
            if vm.exit_code is not None:
                raise RuntimeError(f"QEMU exited ({vm.exit_code}) before an HTTP 200\n{vm.tail()}")
            nursery.start_soon(attempt, nursery.cancel_scope)
            await trio.sleep(every)
        if not won:
            nursery.cancel_scope.cancel()
    if not won:
        raise TimeoutError(f"no HTTP 200 from {address} within the deadline")
    return won[0]


async def _one(kernel: KernelInfo, image: Path, *, kestrel: bool, cmdline: str,
               run_dir: Path) -> tuple[float, Vm]:
    async with boot(kernel=kernel.vmlinux, initramfs=image, run_dir=run_dir, cmdline=cmdline,
                    guest_port=GUEST_PORT, protocol=kestrel, name="bench",
                    timeout=DEADLINE_S + 30) as vm:
        t = await first_200(vm, deadline=vm.spawned_at + DEADLINE_S)
        if kestrel:
            try:
                await vm.message(Health, timeout=60, where=lambda h: h.status == "healthy")
            except AssertionError as exc:  # reported as a missing health figure
                print(f"no health event: {exc}")
    return t - vm.spawned_at, vm


def _healthy_at(vm: Vm) -> float | None:
    return next((t for t, m in vm.messages if isinstance(m, Health) and m.status == "healthy"),
                None)


def _quiet_boot(fn: Any) -> Any:
    """Run with the harness's per-line console echo sent to a log file."""
    log = WORK / "last-run.log"

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        WORK.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f, contextlib.redirect_stdout(f):
            return fn(*args, **kwargs)

    return wrapped


# What volar boots with (host/monitor.py): under TCG every console byte is an
# emulated UART write, so both sides get the same quiet kernel.
BASE = "console=ttyS0 panic=-1 quiet loglevel=1"


def _cmdlines() -> tuple[str, str]:
    manifest = (EXAMPLE / "manifest" / "caddy.json").read_bytes()
    channel = QemuDriver().agent_channel()
    return build_cmdline(manifest_json=manifest, channel=channel, base=BASE), BASE


@_quiet_boot
def measure_p4(runs: int = 5) -> dict[str, Any]:
    """Median launch -> first HTTP 200, kestrel Caddy plugin vs shell /init; ratio goal <= 1.15."""
    kernel = fetch_kernel(quiet=True)
    plugin, baseline = _images(kernel)
    kestrel_cmd, shell_cmd = _cmdlines()
    out: dict[str, list[float]] = {"kestrel_s": [], "shell_s": [], "kestrel_health_event_s": [],
                                   "health_after_200_s": []}

    async def main() -> None:
        for i in range(runs):
            t, vm = await _one(kernel, plugin, kestrel=True, cmdline=kestrel_cmd,
                               run_dir=WORK / f"k{i}")
            out["kestrel_s"].append(t)
            healthy = _healthy_at(vm)
            if healthy is not None:
                out["kestrel_health_event_s"].append(healthy)
                out["health_after_200_s"].append(healthy - t)
            t, _ = await _one(kernel, baseline, kestrel=False, cmdline=shell_cmd,
                              run_dir=WORK / f"s{i}")
            out["shell_s"].append(t)

    trio.run(main)
    k, s = statistics.median(out["kestrel_s"]), statistics.median(out["shell_s"])
    return {
        "runs": runs, **out, "kestrel_median_s": k, "shell_median_s": s,
        "ratio": k / s, "goal": 1.15, "machine": QemuDriver().machine,
        "channel": QemuDriver().agent_channel().kind,
        "plugin_image_bytes": plugin.stat().st_size, "shell_image_bytes": baseline.stat().st_size,
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if len(values) == 1:
        return {"p10": values[0], "p50": values[0], "p90": values[0]}
    q = statistics.quantiles(values, n=10, method="inclusive")
    return {"p10": q[0], "p50": statistics.median(values), "p90": q[-1]}


@_quiet_boot
def boot_timeline(runs: int = 10) -> dict[str, Any]:
    """Percentiles of kestrel's boot marks (guest uptime) and host-side milestones."""
    kernel = fetch_kernel(quiet=True)
    plugin, _ = _images(kernel)
    kestrel_cmd, _ = _cmdlines()
    guest: dict[str, list[float]] = {}
    host: dict[str, list[float]] = {"first_http_200": [], "health_event": []}

    async def main() -> None:
        for i in range(runs):
            t, vm = await _one(kernel, plugin, kestrel=True, cmdline=kestrel_cmd,
                               run_dir=WORK / f"t{i}")
            marks = dict(vm.hello.timeline) if vm.hello else {}
            marks.update({m.mark: m.uptime for m in vm.of(Timeline)})
            for mark, uptime in marks.items():
                guest.setdefault(mark, []).append(uptime)
            host["first_http_200"].append(t)
            healthy = _healthy_at(vm)
            if healthy is not None:
                host["health_event"].append(healthy)

    trio.run(main)
    order = sorted(guest, key=lambda m: statistics.median(guest[m]))
    return {
        "runs": runs,
        "guest_uptime_s": {m: _percentiles(guest[m]) for m in order},
        "host_since_launch_s": {k: _percentiles(v) for k, v in host.items() if v},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--timeline-runs", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    p4 = measure_p4(args.runs)
    timeline = boot_timeline(args.timeline_runs) if args.timeline_runs else {}
    if args.json:
        print(json.dumps({"p4": p4, "timeline": timeline}, indent=2))
        return 0
    print(f"P4 launch -> first HTTP 200 ({p4['machine']}, TCG, median of {p4['runs']}, "
          f"interleaved)")
    print(f"  kestrel Caddy plugin : {p4['kestrel_median_s']:6.2f} s  "
          f"{[round(x, 2) for x in p4['kestrel_s']]}")
    print(f"  shell /init baseline : {p4['shell_median_s']:6.2f} s  "
          f"{[round(x, 2) for x in p4['shell_s']]}")
    print(f"  ratio                : {p4['ratio']:6.3f}  (goal <= {p4['goal']})")
    if p4["kestrel_health_event_s"]:
        print(f"  kestrel health event : {statistics.median(p4['kestrel_health_event_s']):6.2f} s")
    if timeline:
        print(f"Boot timeline over {timeline['runs']} boots (p10 / p50 / p90):")
        for mark, p in timeline["guest_uptime_s"].items():
            print(f"  guest {mark:22} {p['p10']:6.2f} {p['p50']:6.2f} {p['p90']:6.2f}  (uptime s)")
        for mark, p in timeline["host_since_launch_s"].items():
            print(f"  host  {mark:22} {p['p10']:6.2f} {p['p50']:6.2f} {p['p90']:6.2f}"
                  "  (s since launch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
