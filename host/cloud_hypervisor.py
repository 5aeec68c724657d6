"""The cloud-hypervisor driver: command line, hybrid vsock, API stop; its tap and
bridge come from host/bridge.py, as QEMU's do.

kestrel reaches the host over CH's hybrid vsock (host/vsock.py, the same
code as QEMU's vhost-user backend): the guest connects to (CID 2, port P)
and CH connects to ``<vsock socket>_<P>``, which we listen on before boot.
Stop goes through the REST API (power button, then vmm.shutdown), then signals. Volant launched
``--vsock cid=N`` without ``socket=`` (rejected by CH); we always pass both.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from host.bridge import attach_tap, release_tap
from host.chapi import ChApiError, CloudHypervisorApi
from host.state import FIRST_GUEST_CID
from host.vmm import LaunchSpec, Running, VmmError, prepare_launch, terminate
from host.vsock import AgentListener, hybrid_socket
from kestrel.cmdline import Channel
from kestrel.layout import VSOCK_PORT


def _paths(spec: LaunchSpec) -> tuple[Path, Path, Path]:
    run = spec.run_dir
    return run / f"{spec.name}.sock", hybrid_socket(run), run / "console.log"


@dataclass
class CloudHypervisorDriver:
    name: str = "cloud-hypervisor"
    binary: str = "cloud-hypervisor"
    api_timeout: float = 10.0
    accept_timeout: float = 60.0

    def agent_channel(self) -> Channel:
        return Channel("vsock", port=VSOCK_PORT)

    def command(self, spec: LaunchSpec) -> list[str]:
        api, vsock, console = _paths(spec)
        cmd = [
            self.binary,
            "--api-socket", f"path={api}",
            "--cpus", f"boot={spec.cpus}",
            "--memory", f"size={spec.memory_mb}M",
            "--kernel", str(spec.kernel),
            # A file never fills up, so the guest never blocks on its console. A
            # socket is CH's to serve; CH drops the output while nobody is connected.
            "--serial", (f"socket={spec.console_socket}" if spec.console_socket
                         else f"file={console}"),
            "--console", "off",
        ]
        if spec.extra.get("tap"):
            cmd += ["--net", f"tap={spec.extra['tap']},mac={spec.extra['mac']}"]
        cmd += ["--vsock", f"cid={spec.extra.get('cid', FIRST_GUEST_CID)},socket={vsock}"]
        cmd += ["--initramfs", str(spec.initramfs)]
        # CH has no snapshot mode: scratch disks are read-only here too.
        for disk in (*spec.disks, *spec.scratch_disks):
            cmd += ["--disk", f"path={disk},readonly=on"]
        cmd += ["--cmdline", spec.cmdline]
        return cmd

    def restore_command(self, spec: LaunchSpec, snapshot: Path) -> list[str]:
        """CH rebuilds the VM from the snapshot's config.json (retarget() made it ours)."""
        api, _, _ = _paths(spec)
        return [self.binary, "--api-socket", f"path={api}",
                "--restore", f"source_url=file://{snapshot}"]

    async def start(self, spec: LaunchSpec, *, restore_from: Path | None = None) -> Running:
        """CH, its API up; ``restore_from``: a retargeted snapshot (the VM stays paused)."""
        prepare_launch(spec, binary=self.binary, install_hint="install cloud-hypervisor")
        api, vsock, console = _paths(spec)
        for stale in (api, vsock, console, spec.console_socket):
            if stale is not None:
                stale.unlink(missing_ok=True)
        console.touch(mode=0o600)
        if spec.extra.get("tap"):
            attach_tap(spec.extra["tap"])
        try:
            listener = await AgentListener.open(vsock, VSOCK_PORT)
        except BaseException:
            release_tap(spec.extra.get("tap", ""))
            raise
        try:
            with open(spec.run_dir / "cloud-hypervisor.log", "wb") as log:
                process = await trio.lowlevel.open_process(
                    (self.restore_command(spec, restore_from) if restore_from
                     else self.command(spec)), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,  # outlives its monitor
                )
        except BaseException:
            await listener.aclose()
            release_tap(spec.extra.get("tap", ""))
            raise
        running = Running(process=process, console_log=console, agent_listener=listener,
                          tap=spec.extra.get("tap", ""))
        if spec.extra.get("ip") and spec.guest_port:
            running.address = f"{spec.extra['ip']}:{spec.guest_port}"
        api_client = CloudHypervisorApi(api, timeout=1.0)
        with trio.move_on_after(self.api_timeout):
            while process.returncode is None:
                try:
                    await api_client.ping()
                    return running
                except ChApiError:
                    await trio.sleep(0.05)
        try:
            tail = (spec.run_dir / "cloud-hypervisor.log").read_text(errors="replace")[-800:]
        except OSError:
            tail = ""
        hung = process.returncode is None
        if hung:
            process.kill()
            await process.wait()
        await running.release()  # the listener and the tap
        if hung:
            raise VmmError(f"{spec.name}: cloud-hypervisor API not up within "
                           f"{self.api_timeout:g} s: {tail.strip()}")
        raise VmmError(f"{spec.name}: cloud-hypervisor exited with {process.returncode}: "
                       f"{tail.strip()}")

    async def open_agent_stream(self, spec: LaunchSpec, running: Running) -> trio.abc.Stream:
        if running.agent_listener is None:
            raise VmmError(f"{spec.name}: no vsock listener (start() was not called)")
        return await running.agent_listener.accept(running.process, timeout=self.accept_timeout,
                                                   what=spec.name)

    async def open_console_stream(self, spec: LaunchSpec, running: Running) -> trio.abc.Stream:
        """Connect to CH's serial socket (``--serial socket=``), once CH has made it."""
        path = spec.console_socket
        if path is None:
            raise VmmError(f"{spec.name}: no console socket (spec.console_socket is unset)")
        with trio.move_on_after(self.accept_timeout):
            while running.process.returncode is None:
                try:
                    return await trio.open_unix_socket(str(path))
                except OSError:
                    await trio.sleep(0.05)  # CH makes the socket while it starts
        raise VmmError(f"{spec.name}: cloud-hypervisor's serial socket {path} not reachable")

    async def powerdown(self, spec: LaunchSpec, running: Running) -> None:
        """The ACPI power button through the API (vm.power-button)."""
        api, _, _ = _paths(spec)
        await CloudHypervisorApi(api, timeout=self.api_timeout).power_button()

    async def shutdown(self, spec: LaunchSpec, running: Running, *, timeout: float) -> None:
        """Power button (ACPI), then vmm.shutdown, then SIGTERM, SIGKILL."""
        api, _, _ = _paths(spec)
        client = CloudHypervisorApi(api, timeout=min(timeout, 2.0))
        process = running.process
        for step in (client.power_button, client.shutdown_vmm):
            if process.returncode is not None:
                break
            try:
                await step()
            except ChApiError:
                pass  # gone already, or wedged: the next step or the signals follow
            with trio.move_on_after(timeout / 2):
                await process.wait()
        await terminate(process, grace=3.0, what="cloud-hypervisor")
        await running.release()  # the tap too

    # --- snapshots (docs/snapshot_restore.md: pause, vm.snapshot, resume) ------------

    def check_snapshot(self, name: str) -> None:
        """CH snapshots any VM it runs; what a copy cannot change is refused at restore."""

    async def snapshot(self, spec: LaunchSpec, running: Running, state: Path, *,
                       paused: Callable[[], None] = lambda: None) -> None:
        """vm.pause, vm.snapshot into ``state`` (a new directory), vm.resume whatever happened."""
        api = CloudHypervisorApi(_paths(spec)[0], timeout=self.api_timeout)
        state.mkdir(mode=0o700, parents=True)
        await api.pause()
        try:
            paused()
            await api.snapshot(state)
        finally:
            with trio.CancelScope(shield=True):
                await api.resume()

    async def restore(self, spec: LaunchSpec, state: Path) -> Running:
        """A private copy of the snapshot pointed at this VM's sockets, CH --restore, resume."""
        api, vsock, _ = _paths(spec)
        local = spec.run_dir / "snapshot"
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(mode=0o700, parents=True)
        for item in state.iterdir():
            if item.name != "config.json":
                (local / item.name).symlink_to(item)  # memory ranges: read, never written
        config = json.loads((state / "config.json").read_text())
        doc = retarget(config, vsock=vsock, cid=int(spec.extra.get("cid", FIRST_GUEST_CID)),
                       serial=spec.console_socket)
        (local / "config.json").write_text(json.dumps(doc))
        running = await self.start(spec, restore_from=local)
        try:
            await CloudHypervisorApi(api, timeout=self.api_timeout).resume()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.shutdown(spec, running, timeout=2.0)
            raise
        return running


def retarget(config: dict[str, Any], *, vsock: Path, cid: int,
             serial: Path | None) -> dict[str, Any]:
    """CH's saved VmConfig with this VM's vsock socket, CID and console socket.

    CH restores devices exactly as saved, so the source's sockets would be
    reused by the copy. A network device cannot be retargeted: its MAC (and
    the guest's address) are in the saved state, and two copies on the
    shared bridge would collide, so that is refused.
    """
    doc = copy.deepcopy(config)
    nets = doc.get("net") or []
    if nets:
        macs = ", ".join(str(n.get("mac", "?")) for n in nets)
        raise VmmError(f"the snapshot's VM has a network device (MAC {macs}) on the shared "
                       "bridge; a restored copy would reuse its MAC and address: refused")
    vs = doc.get("vsock")
    if not isinstance(vs, dict):
        raise VmmError("the snapshot's VM has no vsock device: kestrel could not reach the host")
    vs.update(socket=str(vsock), cid=cid)
    if serial is not None and isinstance(doc.get("serial"), dict):
        doc["serial"].update(mode="Socket", socket=str(serial), file=None)
    return doc
