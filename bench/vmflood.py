"""P6-vsock and P6-serial: log throughput kestrel -> host in a real guest under TCG.

A fledge-built image (shim, frozen kestrel, busybox) boots under QEMU with a
batch workload that writes FLOOD_MB with dd; the host end is volar's session
loop (host.session, through vm-tests/harness.py, as every vm-test runs it).
The agent channel is real vsock (vhost-user-vsock served by
vhost-device-vsock, hybrid unix socket) or virtio-serial; runs alternate
between the two so a busy host slows both alike. MB/s is the host's clock
from the first to the last log record; lost = HostSession.lost + sequence
gaps + dropped. Usage: python -m bench.vmflood [runs] [--flood-mb N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".cache" / "bench-vmflood"
sys.path.insert(0, str(ROOT / "vm-tests"))

from harness import Vm, boot, fledge_build  # noqa: E402

from bench.table import Figure, Spread  # noqa: E402
from host.kernel import KernelInfo, fetch_kernel  # noqa: E402
from host.qemu import QemuDriver  # noqa: E402
from host.vmm import VmmError  # noqa: E402
from host.vsock import require_backend  # noqa: E402
from kestrel.cmdline import build_cmdline  # noqa: E402
from kestrel.protocol import Dropped, Exit, Log  # noqa: E402

FLOOD_MB = 100
CHANNELS = ("vsock", "serial")
DEADLINE_S = 300.0
# What volar boots with (host/monitor.py): a quiet kernel on the emulated UART.
BASE = "console=ttyS0 panic=-1 quiet loglevel=1"
TOML = """\
version = "1"
strategy = "initramfs"

[agent]
source_strategy = "release"
version = "latest"
"""


@dataclass
class FloodRun:
    channel: str
    mb_s: float
    lost: int
    records: int
    log_bytes: int
    extra: dict[str, float] = field(default_factory=dict)


def image() -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "fledge.toml").write_text(TOML)
    return fledge_build(WORK / "fledge.toml", WORK / "image.cpio.gz")


def flood_cmdline(flood_mb: int, channel: str) -> str:
    # dd's 1 MiB writes fill kestrel's 1 MiB pipe in one go: the writer is never
    # what the host waits for (dd alone into /dev/null runs at several 100 MB/s
    # under TCG here).
    doc = {
        "schema_version": "1.0", "name": "flood", "version": "0.1.0",
        "initramfs": {"url": "/unused.cpio.gz"},
        "workload": {"type": "exec", "entrypoint": [
            "/bin/sh", "-c", f"exec dd if=/dev/zero bs=1048576 count={flood_mb} 2>/dev/null"]},
    }
    return build_cmdline(manifest_json=json.dumps(doc).encode(),
                         channel=QemuDriver(channel=channel).agent_channel(), base=BASE)


def _lost(vm: Vm) -> int:
    """HostSession's count plus our own walk of the sequence numbers."""
    expect, gaps = 1, 0
    for _t, msg in vm.messages:
        if isinstance(msg, Dropped):
            gaps += msg.first_seq != expect
            expect = msg.last_seq + 1
        elif msg.SEQUENCED:
            seq: int = msg.seq  # type: ignore[attr-defined]
            gaps += seq != expect
            expect = seq + 1
    return vm.session.lost + vm.session.dropped + gaps


async def one_run(kernel: KernelInfo, initramfs: Path, *, channel: str, flood_mb: int,
                  run_dir: Path) -> FloodRun:
    nbytes = flood_mb * 1024 * 1024
    async with boot(kernel=kernel.vmlinux, initramfs=initramfs, run_dir=run_dir,
                    cmdline=flood_cmdline(flood_mb, channel), name=f"flood-{channel}",
                    driver=QemuDriver(channel=channel), timeout=DEADLINE_S + 30) as vm:
        await vm.message(Exit, timeout=DEADLINE_S)
        await vm.wait_exit(timeout=60)
    logs = [(t, m) for t, m in vm.messages if isinstance(m, Log) and m.stream == "stdout"]
    got = sum(len(m.data) for _t, m in logs)
    if got != nbytes:
        raise RuntimeError(f"{channel}: host received {got} of {nbytes} bytes\n{vm.tail()}")
    # Records arrive in batches stamped per read: the span from the first batch
    # to the last misses the first batch's own transfer, so count its bytes out.
    first_t = logs[0][0]
    first_batch = sum(len(m.data) for t, m in logs if t == first_t)
    span = logs[-1][0] - first_t
    if span <= 0:
        raise RuntimeError(f"{channel}: every record arrived in one read: raise the flood size")
    return FloodRun(channel=channel, mb_s=(nbytes - first_batch) / span / 1e6, lost=_lost(vm),
                    records=len(logs), log_bytes=got,
                    extra={"span_s": span, "mean_record_kib": got / len(logs) / 1024})


def measure_runs(runs: int, flood_mb: int = FLOOD_MB) -> dict[str, list[FloodRun]]:
    kernel = fetch_kernel(quiet=True)
    initramfs = image()
    out: dict[str, list[FloodRun]] = {c: [] for c in CHANNELS}

    async def main() -> None:
        for i in range(runs):
            for channel in CHANNELS:
                out[channel].append(await one_run(kernel, initramfs, channel=channel,
                                                  flood_mb=flood_mb,
                                                  run_dir=WORK / f"{channel}{i}"))

    log = WORK / "last-run.log"
    with open(log, "w") as f, contextlib.redirect_stdout(f):  # the harness echoes every line
        trio.run(main)
    return out


def measure(runs: int = 3, flood_mb: int = FLOOD_MB) -> list[Figure]:
    vsock = Figure(f"P6 log throughput kestrel -> host, vsock in a TCG guest ({flood_mb} MiB)",
                   id="P6-vsock", unit="MB/s", goal="value >= 50",
                   baseline_label="virtio-serial, same run")
    serial = Figure(f"P6 log throughput kestrel -> host, virtio-serial in a TCG guest "
                    f"({flood_mb} MiB)", id="P6-serial", unit="MB/s")
    lost = Figure("P6 records lost in a TCG guest (vsock and serial)", id="P6-vm-lost",
                  unit="records", goal="value <= 0")
    try:
        require_backend()
        got = measure_runs(runs, flood_mb)
    except (VmmError, RuntimeError, AssertionError, OSError) as exc:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        vsock.na = serial.na = lost.na = why
        return [vsock, serial, lost]
    v, s = got["vsock"], got["serial"]
    vsock.value, vsock.baseline = Spread.of([r.mb_s for r in v]), Spread.of([r.mb_s for r in s])
    serial.value = Spread.of([r.mb_s for r in s])
    lost.value = Spread.of([float(r.lost) for r in v + s])
    for fig, rs in ((vsock, v), (serial, s)):
        fig.note = (f"{len(rs)} runs alternating vsock/serial, QEMU {QemuDriver().machine} TCG, "
                    f"dd 1 MiB writes; ~{statistics.median(r.records for r in rs):.0f} records "
                    f"of ~{statistics.median(r.extra['mean_record_kib'] for r in rs):.0f} KiB")
        fig.extra = {"mb_s": [r.mb_s for r in rs], "lost": [r.lost for r in rs],
                     "records": [r.records for r in rs]}
    lost.note = "HostSession.lost + dropped + sequence gaps, every run of both channels"
    return [vsock, serial, lost]


def main() -> int:
    from bench.table import render

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=int, nargs="?", default=3)
    ap.add_argument("--flood-mb", type=int, default=FLOOD_MB)
    args = ap.parse_args()
    t0 = time.monotonic()
    print(render(measure(args.runs, args.flood_mb)))
    print(f"({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
