"""P6: log throughput from the workload through kestrel to the host, and the codec alone.

kestrel runs as PID 1 of fresh namespaces with a workload that writes N MB to
stdout; a HostSession receiver on the unix socket counts bytes, records and
sequence gaps (goal >= 100 MB/s, 0 lost). Baseline of the same run: the same
workload's stdout read straight from a pipe. A second row times the protocol
codec in-process (encode + FrameDecoder) against bare msgpack, so a regression
can be placed on the wire format or on the agent.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import msgpack

from bench import KestrelRun, Unavailable, describe_exit, kestrel_runner, work_dir
from bench.table import Figure, Spread
from kestrel.protocol import FrameDecoder, Log, encode

FLOOD_MB = 200
CHUNK = 64 * 1024  # what a pipe read returns under load


def _through_kestrel(runner: KestrelRun, nbytes: int) -> tuple[float, int, int]:
    """MB/s between the first and the last log record; records lost; records."""
    ns, got, _ = runner.run(["flood", str(nbytes)], timeout=300)
    if got.log_bytes != nbytes:
        raise Unavailable(f"host received {got.log_bytes} of {nbytes} bytes ({describe_exit(ns)})")
    span = got.t_last_log - got.t_first_log
    if span <= 0:
        raise Unavailable("all records arrived in one read: raise the flood size")
    lost = got.lost + got.seq_gaps + got.dropped
    return nbytes / span / 1e6, lost, got.log_records


def _through_pipe(wl: str, nbytes: int) -> float:
    proc = subprocess.Popen([wl, "flood", str(nbytes)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    total, t0 = 0, 0.0
    fd = proc.stdout.fileno()
    while chunk := os.read(fd, 1 << 20):
        if not total:
            t0 = time.monotonic()
        total += len(chunk)
    t1 = time.monotonic()
    proc.wait()
    return total / (t1 - t0) / 1e6


def codec_mb_s(total_mb: int = 256) -> tuple[float, float]:
    """(kestrel codec, bare msgpack) MB/s for 64 KiB log records, encode + decode."""
    payload = bytes(range(256)) * (CHUNK // 256)
    n = total_mb * (1 << 20) // CHUNK
    dec = FrameDecoder()
    t0 = time.perf_counter()
    got = 0
    for seq in range(1, n + 1):
        dec.feed(encode(Log(stream="stdout", data=payload, seq=seq)))
        for msg in dec:
            got += len(msg.data)  # type: ignore[attr-defined]
    codec = got / (time.perf_counter() - t0) / 1e6
    t0 = time.perf_counter()
    got = 0
    for seq in range(1, n + 1):
        body = msgpack.unpackb(msgpack.packb({"t": "log", "data": payload, "seq": seq}))
        got += len(body["data"])
    bare = got / (time.perf_counter() - t0) / 1e6
    return codec, bare


def measure(runs: int = 3, flood_mb: int = FLOOD_MB) -> list[Figure]:
    rate = Figure(f"P6 log throughput kestrel -> host ({flood_mb} MB)", id="P6", unit="MB/s",
                  goal="value >= 100", baseline_label="same writer into a pipe")
    lost_fig = Figure("P6 records lost (seq checked)", id="P6-lost", unit="records",
                      goal="value <= 0")
    codec = Figure("P6 protocol codec alone (encode+decode)", id="P6-codec", unit="MB/s",
                   goal="value >= 100", baseline_label="bare msgpack")
    codec_runs = [codec_mb_s() for _ in range(runs)]
    codec.value = Spread.of([c for c, _ in codec_runs])
    codec.baseline = Spread.of([b for _, b in codec_runs])
    codec.note = f"64 KiB records, 256 MiB per run, {runs} runs, in-process"
    try:
        work = work_dir()
        runner, label = kestrel_runner(work)
        nbytes = flood_mb * 1_000_000
        rates, pipes, losts, records = [], [], [], []
        for _ in range(runs):
            r, lost, recs = _through_kestrel(runner, nbytes)
            rates.append(r)
            losts.append(float(lost))
            records.append(recs)
            pipes.append(_through_pipe(str(runner.wl), nbytes))
    except Unavailable as exc:
        rate.na = lost_fig.na = str(exc)
        return [rate, lost_fig, codec]
    rate.value, rate.baseline = Spread.of(rates), Spread.of(pipes)
    rate.note = (f"{label} kestrel, unix socket, HostSession receiver, {runs} runs, "
                 f"~{int(statistics.median(records))} records per run")
    lost_fig.value = Spread.of(losts)
    lost_fig.note = "HostSession.lost + seq gaps + dropped, summed per run"
    rate.extra = {"mb_s": rates, "pipe_mb_s": pipes, "records": records, "kestrel": label}
    return [rate, lost_fig, codec]


if __name__ == "__main__":
    from bench.table import render

    print(render(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
