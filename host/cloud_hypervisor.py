"""The cloud-hypervisor driver: command line, tap networking, hybrid vsock, API stop.

kestrel reaches the host over CH's hybrid vsock: the guest connects to
(CID 2, port P) and CH connects to the unix socket ``<vsock socket>_<P>``,
which we listen on before the VM boots. Stop goes through the REST API
(power button, then vmm.shutdown), then signals. Volant launched
``--vsock cid=N`` without ``socket=`` (rejected by CH); we always pass both.
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import trio

from host.chapi import ChApiError, CloudHypervisorApi
from host.ipam import BRIDGE, GATEWAY, SUBNET
from host.vmm import LaunchSpec, Running, VmmError, prepare_launch
from kestrel.cmdline import Channel
from kestrel.layout import VSOCK_PORT

# The guest CID; with hybrid vsock it only names the guest inside its own
# VMM, so every VM may use the same one (2 is the host, 0/1 are reserved).
GUEST_CID = 3
CONNECT_OK_TIMEOUT_S = 1.0
CONNECT_RETRY_S = 0.1


def _paths(spec: LaunchSpec) -> tuple[Path, Path, Path]:
    run = spec.run_dir
    return run / f"{spec.name}.sock", run / f"{spec.name}.vsock", run / "console.log"


def vsock_listen_path(vsock_socket: Path, port: int) -> Path:
    return Path(f"{vsock_socket}_{port}")


async def hybrid_vsock_connect(
    socket_path: Path | str, port: int, *, deadline_s: float = 10.0
) -> tuple[trio.SocketStream, bytes]:
    """Host -> guest over hybrid vsock: ``CONNECT <port>\\n``, wait for ``OK <n>\\n``.

    The VMM closes the socket without OK while nothing listens in the guest:
    retry every ~100 ms until ``deadline_s``. Returns the stream and any
    bytes the guest sent after the OK line (they belong to the session).
    """
    last = "no attempt"
    with trio.move_on_after(deadline_s):
        while True:
            try:
                stream = await trio.open_unix_socket(str(socket_path))
            except OSError as exc:
                last = f"{socket_path}: {exc.strerror or exc}"
                await trio.sleep(CONNECT_RETRY_S)
                continue
            try:
                await stream.send_all(f"CONNECT {port}\n".encode())
                buf = b""
                with trio.move_on_after(CONNECT_OK_TIMEOUT_S):
                    while b"\n" not in buf and len(buf) < 64:
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            break
                        buf += chunk
                line, sep, rest = buf.partition(b"\n")
                if sep and line.split()[:1] == [b"OK"]:
                    return stream, rest
                last = f"answer {line[:40]!r}" if buf else "closed without OK"
            except (trio.BrokenResourceError, OSError) as exc:
                last = str(exc)
            await stream.aclose()
            await trio.sleep(CONNECT_RETRY_S)
    raise VmmError(f"hybrid vsock {socket_path} port {port}: no OK within {deadline_s:g} s "
                   f"(last: {last})")


def _ip(netns: str | None, *args: str) -> None:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise VmmError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}")


def _link_exists(name: str, netns: str | None) -> bool:
    cmd = ["ip", *(["-n", netns] if netns else []), "link", "show", "dev", name]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def ensure_bridge(*, netns: str | None = None, bridge: str = BRIDGE) -> None:
    """The bridge with the gateway address (Volant's `volar setup`), if missing."""
    if _link_exists(bridge, netns):
        return
    _ip(netns, "link", "add", bridge, "type", "bridge")
    _ip(netns, "addr", "add", f"{GATEWAY}/{SUBNET.prefixlen}", "dev", bridge)
    _ip(netns, "link", "set", bridge, "up")


def create_tap(tap: str, *, netns: str | None = None, bridge: str = BRIDGE) -> None:
    """A persistent tap on the bridge, up; CH opens it by name."""
    if not _link_exists(tap, netns):
        _ip(netns, "tuntap", "add", "dev", tap, "mode", "tap")
    _ip(netns, "link", "set", tap, "master", bridge)
    _ip(netns, "link", "set", tap, "up")


def delete_tap(tap: str, *, netns: str | None = None) -> None:
    if _link_exists(tap, netns):
        _ip(netns, "link", "del", tap)


@dataclass
class CloudHypervisorDriver:
    name: str = "cloud-hypervisor"
    binary: str = "cloud-hypervisor"
    api_timeout: float = 10.0
    accept_timeout: float = 60.0
    _listeners: dict[str, trio.SocketListener] = field(default_factory=dict)

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
            # A file never fills up, so the guest never blocks on its console.
            "--serial", f"file={console}",
            "--console", "off",
        ]
        if spec.extra.get("tap"):
            cmd += ["--net", f"tap={spec.extra['tap']},mac={spec.extra['mac']}"]
        cmd += ["--vsock", f"cid={spec.extra.get('cid', GUEST_CID)},socket={vsock}"]
        cmd += ["--initramfs", str(spec.initramfs)]
        for disk in spec.disks:
            cmd += ["--disk", f"path={disk},readonly=on"]
        cmd += ["--cmdline", spec.cmdline]
        return cmd

    async def _listen(self, spec: LaunchSpec) -> None:
        """Listen on ``<vsock>_<port>`` before boot: a guest that connects early
        would otherwise get a reset."""
        _, vsock, _ = _paths(spec)
        path = vsock_listen_path(vsock, VSOCK_PORT)
        path.unlink(missing_ok=True)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(path))
        path.chmod(0o600)
        sock.listen(2)
        self._listeners[spec.name] = trio.SocketListener(sock)

    async def start(self, spec: LaunchSpec) -> Running:
        prepare_launch(spec, binary=self.binary, install_hint="install cloud-hypervisor")
        api, vsock, console = _paths(spec)
        for stale in (api, vsock, vsock_listen_path(vsock, VSOCK_PORT), console):
            stale.unlink(missing_ok=True)
        console.touch(mode=0o600)
        if spec.extra.get("tap"):
            ensure_bridge()
            create_tap(spec.extra["tap"])
        await self._listen(spec)
        with open(spec.run_dir / "cloud-hypervisor.log", "wb") as log:
            process = await trio.lowlevel.open_process(
                self.command(spec), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
            )
        running = Running(process=process, console_log=console)
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
        if process.returncode is None:
            process.kill()
            await process.wait()
            raise VmmError(f"{spec.name}: cloud-hypervisor API not up within "
                           f"{self.api_timeout:g} s: {tail.strip()}")
        raise VmmError(f"{spec.name}: cloud-hypervisor exited with {process.returncode}: "
                       f"{tail.strip()}")

    async def open_agent_stream(self, spec: LaunchSpec, running: Running) -> trio.abc.Stream:
        listener = self._listeners.get(spec.name)
        if listener is None:
            raise VmmError(f"{spec.name}: no vsock listener (start() was not called)")
        with trio.move_on_after(self.accept_timeout):
            return await listener.accept()
        raise VmmError(f"{spec.name}: kestrel did not connect over vsock port {VSOCK_PORT} "
                       f"within {self.accept_timeout:g} s")

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
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if process.returncode is not None:
                break
            process.send_signal(sig)
            with trio.move_on_after(3.0):
                await process.wait()
        listener = self._listeners.pop(spec.name, None)
        if listener is not None:
            await listener.aclose()
        if spec.extra.get("tap"):
            delete_tap(spec.extra["tap"])
