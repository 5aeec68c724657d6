"""The monitor's control socket: one line in (``stop``, ``signal``, ``ping``,
``snapshot``, or ``exec`` and then host.exechub's frames), one line out.

host/monitor.py serves it for its VM; host/vmcontrol.py and host/execcli.py
are the CLI's clients, host/containerd the shim's.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from host import snapshot
from host.errors import VolarError
from host.exechub import read_line
from host.state import proc_start_time
from host.vmcontrol import CONTROL_SOCKET
from host.vmm import VmmError
from host.vsock import private_listener
from kestrel.protocol import Signal

if TYPE_CHECKING:
    from host.monitor import Monitor


async def serve_control(monitor: Monitor) -> None:
    """Serve the VM's control socket until the monitor's nursery is cancelled."""
    # Ten concurrent execs must not find the backlog full.
    listener = await private_listener(monitor.run_dir / CONTROL_SOCKET, backlog=64)
    await trio.serve_listeners(functools.partial(_client, monitor), [listener])


async def _client(monitor: Monitor, stream: trio.abc.Stream) -> None:
    """Line protocol: ``stop <grace>`` -> ``ok`` when the VMM is gone; ``signal <n>``
    -> ``ok`` once sent to the workload; ``exec`` then exec frames (host.exechub)."""
    async with stream:
        line, rest = await read_line(stream)
        words = line.split()
        if words == ["exec"]:
            await monitor.link.exec.serve_client(stream, rest)
        elif words[:1] == ["stop"]:
            try:
                grace = float(words[1]) if len(words) > 1 else monitor.vm.stop_grace
            except ValueError:
                await stream.send_all(b"error bad grace\n")
                return
            await monitor.stop(grace)
            await monitor.exited.wait()
            await stream.send_all(b"ok\n")
        elif words[:1] == ["signal"] and len(words) == 2 and words[1].isdigit():
            # The containerd shim's Kill: to the workload, through kestrel.
            sent = await monitor.link.loop.command(Signal(signum=int(words[1])))
            await stream.send_all(b"ok\n" if sent else b"error kestrel is not attached\n")
        elif words[:1] == ["ping"]:
            await stream.send_all(b"ok\n")
        elif words[:1] == ["snapshot"] and len(words) >= 2:
            await stream.send_all(await _snapshot(monitor, Path(line.split(" ", 1)[1].strip())))
        else:
            await stream.send_all(b"error unknown command\n")


async def _snapshot(monitor: Monitor, directory: Path) -> bytes:
    """``ok <bytes> <seconds>``, or ``error <one line>``; the VM runs on either way."""
    assert monitor.driver is not None and monitor.spec is not None and monitor.running is not None
    if monitor.plugin is None:
        return (f"error VM {monitor.name} carries its own manifest (a containerd "
                "container): only a plugin's VM can be snapshotted\n").encode()
    async with monitor.snapshot_lock:
        status = monitor.store.vm(monitor.name).status
        if status not in ("running", "healthy") or monitor.stop_requested:
            return (f"error VM {monitor.name} is {status}: only a running VM can be "
                    "snapshotted\n").encode()
        try:
            meta, took = await snapshot.take(
                monitor.driver, monitor.spec, monitor.running, directory=directory,
                vm=monitor.store.vm(monitor.name), plugin=monitor.plugin,
                last_seq=lambda: monitor.link.session.last_seq)
        except (VmmError, VolarError, OSError) as exc:
            line = " ".join(str(exc).split())
            monitor.store.add_event(monitor.name, "snapshot", "failed", line)
            return f"error {line}\n".encode()
        backend = monitor.running.helpers[0].process.pid if monitor.running.helpers else 0
        monitor.store.update_vm(monitor.name, backend_pid=backend,
                                backend_start=proc_start_time(backend) if backend else 0)
    monitor.store.add_event(monitor.name, "snapshot", str(directory),
                            f"{meta.state_bytes} bytes in {took:.2f} s")
    return f"ok {meta.state_bytes} {took:.3f}\n".encode()
