"""host.vmm.terminate: the last resort for every VMM driver and the monitor."""

from __future__ import annotations

import signal
import subprocess
import sys

import trio

from host.vmm import terminate


async def test_a_term_ignoring_process_is_killed_and_reaped() -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
           "print('ready', flush=True); time.sleep(60)"
    proc = await trio.lowlevel.open_process([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert b"ready" in await proc.stdout.receive_some(16)
    await terminate(proc, grace=0.2)
    assert proc.returncode == -signal.SIGKILL


async def test_a_process_that_obeys_term_is_not_killed() -> None:
    proc = await trio.lowlevel.open_process(["sleep", "60"])
    await terminate(proc, grace=10)
    assert proc.returncode == -signal.SIGTERM
    await terminate(proc)  # already gone: nothing to do
