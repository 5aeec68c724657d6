"""P7: warm starts. Restore -> first HTTP 200 against a cold launch -> first 200, and snapshots.

Everything goes through volar as a user runs it (a private state directory,
the seeds' Caddy plugin): ``vms create`` cold (the default machine, microvm:
the fastest cold boot, so the strictest baseline) and ``vms create
--from-snapshot`` of a healthy q35 VM, interleaved so a busy host slows both
alike. Each figure's clock starts when the volar command is spawned and stops
at the first HTTP 200 through the published port. Usage: python -m bench.warm
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from bench import REPO, work_dir

sys.path.insert(0, str(REPO / "vm-tests"))
from harness import fledge_build

EXAMPLE = REPO / "examples" / "caddy"
DEADLINE_S = 240.0
# "Snapshot of src in DIR: 164.5 MB, 0.53 s paused (the VM runs on)"
SAID = re.compile(r": (?P<mb>[\d.]+) MB, (?P<s>[\d.]+) s paused")


class Volar:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.env = {**os.environ, "VOLAR_STATE_DIR": str(state)}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "host.cli", *args]

    def run(self, *args: str) -> str:
        done = subprocess.run(self.argv(*args), cwd=REPO, env=self.env, capture_output=True,
                              text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"volar {' '.join(args)}: {done.stderr.strip()[-300:]}")
        return done.stdout

    def address(self, vm: str) -> str:
        """The published address once the monitor recorded it ('' before)."""
        from host.errors import NotFound
        from host.state import Store

        store = Store(self.state)
        try:
            return store.vm(vm).address
        except NotFound:
            return ""
        finally:
            store.close()


async def _probe(address: str) -> bool:
    host, _, port = address.partition(":")
    request = f"GET / HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode()
    try:
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(request)
            return (await stream.receive_some(64)).startswith(b"HTTP/1.1 200")
    except (OSError, trio.BrokenResourceError):
        return False


async def _launch_to_200(volar: Volar, vm: str, *args: str) -> float:
    """Seconds from spawning ``volar vms create vm ARGS`` to the first HTTP 200.

    Probes start every 50 ms and may each take 3 s (user networking accepts
    at once and a guest without its address yet just hangs), as bench.boot's.
    """
    t0 = time.monotonic()
    proc = await trio.lowlevel.open_process(volar.argv("vms", "create", vm, *args), cwd=REPO,
                                            env=volar.env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE)
    won: list[float] = []
    try:
        with trio.fail_after(DEADLINE_S):
            address = ""
            while not address:
                if proc.returncode is not None:
                    raise RuntimeError(f"volar vms create {vm} exited {proc.returncode}")
                address = await trio.to_thread.run_sync(volar.address, vm)
                await trio.sleep(0.02)

            async def attempt(cancel: trio.CancelScope) -> None:
                with trio.move_on_after(3.0):
                    if await _probe(address):
                        won.append(time.monotonic())
                        cancel.cancel()

            async with trio.open_nursery() as nursery:
                while not won:
                    nursery.start_soon(attempt, nursery.cancel_scope)
                    await trio.sleep(0.05)
            await proc.wait()  # volar returns once kestrel said hello
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return won[0] - t0


def measure(runs: int = 3) -> dict[str, Any]:
    """P7 figures: cold and restored launch -> 200 per run, snapshot seconds and sizes."""
    base = work_dir()
    volar = Volar(base / "state")
    image = fledge_build(EXAMPLE / "fledge.toml", base / "caddy.cpio.gz")
    m = json.loads((EXAMPLE / "manifest" / "caddy.json").read_text())
    m["initramfs"] = {"url": str(image)}
    (base / "caddy.json").write_text(json.dumps(m))
    volar.run("plugins", "install", "--manifest", str(base / "caddy.json"))
    result: dict[str, Any] = {"cold_s": [], "restore_s": [], "snapshot_s": [],
                              "snapshot_mb": [], "runs": runs}
    try:
        volar.run("vms", "create", "src", "--plugin", "caddy", "--machine", "q35")
        deadline = time.monotonic() + 120
        while json.loads(volar.run("vms", "show", "src", "--json"))["status"] != "healthy":
            if time.monotonic() > deadline:
                raise RuntimeError("the source VM did not become healthy")
            time.sleep(0.2)
        for i in range(runs):
            said = volar.run("vms", "snapshot", "src", "--out", str(base / f"snap{i}"))
            match = SAID.search(said)
            if match is None:
                raise RuntimeError(f"vms snapshot said {said!r}")
            result["snapshot_s"].append(float(match["s"]))
            result["snapshot_mb"].append(float(match["mb"]))
            if i:
                shutil.rmtree(base / f"snap{i}")
        for i in range(runs):
            # Alternate which goes first: neither always meets a host still busy
            # with the other's teardown.
            order = [("cold", ("--plugin", "caddy")),
                     ("restore", ("--from-snapshot", str(base / "snap0")))]
            for kind, args in (order if i % 2 == 0 else order[::-1]):
                name = f"{kind}{i}"
                result[f"{kind}_s"].append(trio.run(_launch_to_200, volar, name, *args))
                volar.run("vms", "delete", name)
    finally:
        for row in json.loads(volar.run("vms", "list", "--json") or "[]"):
            subprocess.run(volar.argv("vms", "delete", row["name"]), cwd=REPO, env=volar.env,
                           capture_output=True, timeout=120, check=False)
    return result


def main() -> None:
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 3), indent=2))


if __name__ == "__main__":
    main()
