"""cloud-hypervisor driver: command line, REST API, hybrid vsock, tap in a netns.

No cloud-hypervisor binary here: the API is exercised against a real
HTTP/1.1 server (h11) on a unix socket answering as CH's micro_http does,
and the hybrid vsock code is tested in test_host_vsock.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from host.bridge import create_tap, delete_tap, ensure_bridge
from host.chapi import ChApiError, CloudHypervisorApi
from host.cloud_hypervisor import CloudHypervisorDriver, retarget
from host.vmm import LaunchSpec, Running, VmmError
from kestrel.layout import VSOCK_PORT


def _spec(tmp_path: Path, **extra: str) -> LaunchSpec:
    return LaunchSpec(
        name="caddy-demo", run_dir=tmp_path, kernel=Path("/k/vmlinux"),
        initramfs=Path("/i/plugin.cpio.gz"), cmdline="console=ttyS0 volant.manifest=H4sI",
        cpus=2, memory_mb=256, guest_port=80, extra=dict(extra),
    )


def test_command_line_matches_volant_order_with_vsock_socket(tmp_path: Path) -> None:
    spec = _spec(tmp_path, tap="vttap-caddy-demo", mac="02:aa:bb:cc:dd:ee", ip="192.168.127.2")
    cmd = CloudHypervisorDriver().command(spec)
    assert cmd == [
        "cloud-hypervisor",
        "--api-socket", f"path={tmp_path}/caddy-demo.sock",
        "--cpus", "boot=2",
        "--memory", "size=256M",
        "--kernel", "/k/vmlinux",
        "--serial", f"file={tmp_path}/console.log",
        "--console", "off",
        "--net", "tap=vttap-caddy-demo,mac=02:aa:bb:cc:dd:ee",
        # Volant passed cid= alone, which CH rejects: socket= is required.
        "--vsock", f"cid=3,socket={tmp_path}/vsock.sock",
        "--initramfs", "/i/plugin.cpio.gz",
        "--cmdline", "console=ttyS0 volant.manifest=H4sI",
    ]
    assert CloudHypervisorDriver().agent_channel().port == VSOCK_PORT


def test_command_line_without_network(tmp_path: Path) -> None:
    assert "--net" not in CloudHypervisorDriver().command(_spec(tmp_path))


async def test_missing_binary_is_a_clear_error(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(VmmError, match="cloud-hypervisor not found"):
        await CloudHypervisorDriver().start(_spec(tmp_path))


# --- REST API ------------------------------------------------------------------

# What CH answers (docs/api.md, cloud-hypervisor.yaml): 200 + JSON for GETs,
# 204 No Content for the actions.
ROUTES: dict[tuple[bytes, bytes], tuple[int, bytes]] = {
    (b"GET", b"/api/v1/vmm.ping"): (200, json.dumps(
        {"build_version": "v41.0", "version": "41.0.0", "pid": 1234,
         "features": ["kvm"]}).encode()),
    (b"GET", b"/api/v1/vm.info"): (200, json.dumps(
        {"config": {"cpus": {"boot_vcpus": 1}}, "state": "Running",
         "memory_actual_size": 536870912}).encode()),
    (b"PUT", b"/api/v1/vm.shutdown"): (204, b""),
    (b"PUT", b"/api/v1/vm.power-button"): (204, b""),
    (b"PUT", b"/api/v1/vmm.shutdown"): (204, b""),
    (b"PUT", b"/api/v1/vm.pause"): (204, b""),
    (b"PUT", b"/api/v1/vm.resume"): (204, b""),
    (b"PUT", b"/api/v1/vm.snapshot"): (204, b""),
}


class FakeChApi:
    """A real HTTP/1.1 server on a unix socket that records each request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        req: dict[str, Any] = {"body": b""}
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                req.update(method=event.method, target=event.target,
                           headers={k.lower(): v for k, v in event.headers})
            elif isinstance(event, h11.Data):
                req["body"] += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        self.requests.append(req)
        status, body = ROUTES.get((req["method"], req["target"]), (404, b"not found"))
        headers = [("Content-Length", str(len(body)))]
        if body:
            headers.append(("Content-Type", "application/json"))
        out = conn.send(h11.Response(status_code=status, headers=headers))
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        await stream.send_all(out)
        await stream.aclose()


async def _serve_unix(path: Path, handler: Any, nursery: trio.Nursery) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(str(path))
    sock.listen(8)
    nursery.start_soon(trio.serve_listeners, handler, [trio.SocketListener(sock)])


async def test_api_requests_are_what_cloud_hypervisor_expects(tmp_path: Path) -> None:
    server = FakeChApi()
    path = tmp_path / "ch.sock"
    async with trio.open_nursery() as nursery:
        await _serve_unix(path, server.handle, nursery)
        api = CloudHypervisorApi(path)
        ping = await api.ping()
        info = await api.info()
        await api.power_button()
        await api.shutdown_vm()
        await api.shutdown_vmm()
        nursery.cancel_scope.cancel()
    assert ping["version"] == "41.0.0" and info["state"] == "Running"
    assert [(r["method"], r["target"]) for r in server.requests] == [
        (b"GET", b"/api/v1/vmm.ping"), (b"GET", b"/api/v1/vm.info"),
        (b"PUT", b"/api/v1/vm.power-button"), (b"PUT", b"/api/v1/vm.shutdown"),
        (b"PUT", b"/api/v1/vmm.shutdown"),
    ]
    for r in server.requests:
        assert r["headers"][b"host"] == b"localhost"
        assert b"transfer-encoding" not in r["headers"]  # micro_http has no chunked bodies
        assert r["body"] == b""


async def test_api_error_carries_status_and_body(tmp_path: Path) -> None:
    async def refuse(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
        body = b'"VM is not booted"'
        await stream.send_all(conn.send(h11.Response(
            status_code=500, headers=[("Content-Length", str(len(body)))])) +
            conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        await stream.aclose()

    path = tmp_path / "ch.sock"
    async with trio.open_nursery() as nursery:
        await _serve_unix(path, refuse, nursery)
        with pytest.raises(ChApiError, match=r"vm\.shutdown: HTTP 500.*not booted") as info:
            await CloudHypervisorApi(path).shutdown_vm()
        nursery.cancel_scope.cancel()
    assert info.value.status == 500


async def test_api_socket_missing_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ChApiError, match=str(tmp_path / "absent.sock")):
        await CloudHypervisorApi(tmp_path / "absent.sock").ping()


# --- snapshots: the CH edge of `volar vms snapshot` / `--from-snapshot` ------------


async def test_snapshot_pauses_saves_and_resumes_through_the_api(tmp_path: Path) -> None:
    """docs/snapshot_restore.md: vm.pause, vm.snapshot {destination_url}, vm.resume."""
    server = FakeChApi()
    spec = _spec(tmp_path)
    seen_paused: list[int] = []
    async with trio.open_nursery() as nursery:
        await _serve_unix(tmp_path / "caddy-demo.sock", server.handle, nursery)
        process = await trio.lowlevel.open_process(["sleep", "30"])
        running = Running(process=process, console_log=tmp_path / "console.log")
        await CloudHypervisorDriver().snapshot(
            spec, running, tmp_path / "snap" / "vmm",
            paused=lambda: seen_paused.append(len(server.requests)))
        process.kill()
        await process.wait()
        nursery.cancel_scope.cancel()
    assert [(r["method"], r["target"]) for r in server.requests] == [
        (b"PUT", b"/api/v1/vm.pause"), (b"PUT", b"/api/v1/vm.snapshot"),
        (b"PUT", b"/api/v1/vm.resume")]
    assert seen_paused == [1]  # the host's position is read while the guest is paused
    body = json.loads(server.requests[1]["body"])
    assert body == {"destination_url": f"file://{tmp_path / 'snap' / 'vmm'}"}
    assert server.requests[1]["headers"][b"content-type"] == b"application/json"


async def test_a_failed_snapshot_still_resumes_the_vm(tmp_path: Path) -> None:
    seen: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                seen.append(event.target)
        status = 500 if seen[-1].endswith(b"vm.snapshot") else 204
        body = b'"Failed to snapshot: No space left on device"' if status == 500 else b""
        await stream.send_all(conn.send(h11.Response(
            status_code=status, headers=[("Content-Length", str(len(body)))]))
            + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        await _serve_unix(tmp_path / "caddy-demo.sock", handler, nursery)
        process = await trio.lowlevel.open_process(["sleep", "30"])
        running = Running(process=process, console_log=tmp_path / "console.log")
        with pytest.raises(ChApiError, match=r"vm\.snapshot: HTTP 500.*No space left"):
            await CloudHypervisorDriver().snapshot(_spec(tmp_path), running, tmp_path / "s")
        process.kill()
        await process.wait()
        nursery.cancel_scope.cancel()
    assert seen == [b"/api/v1/vm.pause", b"/api/v1/vm.snapshot", b"/api/v1/vm.resume"]


SAVED_CONFIG: dict[str, Any] = {
    "cpus": {"boot_vcpus": 1}, "memory": {"size": 536870912},
    "serial": {"file": None, "mode": "Socket", "socket": "/run/src/serial.sock", "iommu": False},
    "vsock": {"cid": 3, "socket": "/run/src/vsock.sock", "iommu": False, "id": "_vsock0"},
    "net": None,
}


def test_restore_points_the_saved_config_at_the_copys_sockets(tmp_path: Path) -> None:
    doc = retarget(SAVED_CONFIG, vsock=tmp_path / "vsock.sock", cid=7,
                   serial=tmp_path / "serial.sock")
    assert doc["vsock"] == {"cid": 7, "socket": str(tmp_path / "vsock.sock"), "iommu": False,
                            "id": "_vsock0"}
    assert doc["serial"]["socket"] == str(tmp_path / "serial.sock")
    assert SAVED_CONFIG["vsock"]["socket"] == "/run/src/vsock.sock"  # the snapshot is untouched
    cmd = CloudHypervisorDriver().restore_command(_spec(tmp_path), tmp_path / "snapshot")
    assert cmd == ["cloud-hypervisor", "--api-socket", f"path={tmp_path / 'caddy-demo.sock'}",
                   "--restore", f"source_url=file://{tmp_path / 'snapshot'}"]


def test_restoring_a_vm_with_a_bridge_mac_is_refused(tmp_path: Path) -> None:
    saved = {**SAVED_CONFIG, "net": [{"tap": "vttap-src", "mac": "02:aa:bb:cc:dd:ee"}]}
    with pytest.raises(VmmError, match=r"MAC 02:aa:bb:cc:dd:ee.*a restored copy would reuse"):
        retarget(saved, vsock=tmp_path / "v", cid=7, serial=None)


# --- tap networking in a private network namespace ------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip(reason="needs root and iproute2 (`ip`) to create a network namespace")
    name = f"kestrel-test-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(reason=f"cannot create a network namespace: {done.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_tap_is_created_on_the_bridge_and_removed(netns: str) -> None:
    ensure_bridge(netns=netns)
    ensure_bridge(netns=netns)  # idempotent
    create_tap("vttap-web", netns=netns)
    link = subprocess.run(["ip", "-n", netns, "-j", "-d", "link", "show", "vttap-web"],
                          capture_output=True, text=True, check=True)
    info = json.loads(link.stdout)[0]
    assert info["master"] == "vbr0"
    assert info["linkinfo"]["info_kind"] == "tun"
    addr = subprocess.run(["ip", "-n", netns, "-j", "addr", "show", "vbr0"],
                          capture_output=True, text=True, check=True)
    assert "192.168.127.1" in addr.stdout
    delete_tap("vttap-web", netns=netns)
    gone = subprocess.run(["ip", "-n", netns, "link", "show", "vttap-web"], capture_output=True)
    assert gone.returncode != 0


# --- a real boot, where possible -------------------------------------------------


REPO = Path(__file__).resolve().parents[1]


def test_real_cloud_hypervisor_boot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """volar + CH + kestrel for real: create, GET the workload over the tap, stop, delete."""
    import hashlib
    import urllib.request

    from kestrel.layout import kernel_dir
    from tests.host_helpers import Volar, write_plugin

    if shutil.which("cloud-hypervisor") is None:
        pytest.skip(reason="needs the cloud-hypervisor binary (not installed here: not in "
                    "Debian 12 or on PyPI) and a /dev/kvm that boots normal kernels "
                    "(PVM-only here)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip(reason="needs a usable /dev/kvm for cloud-hypervisor")
    if os.geteuid() != 0:
        pytest.skip(reason="needs root for the vbr0 bridge and the tap device")
    vmlinux = kernel_dir() / "current" / "vmlinux"
    if not vmlinux.is_file():
        pytest.skip(reason=f"needs a guest kernel at {vmlinux} (`volar kernel fetch`)")
    image = Path(os.environ.get("KESTREL_CH_IMAGE",
                                REPO / ".cache" / "caddy-demo" / "plugin.cpio.gz"))
    if not image.is_file():
        pytest.skip(reason=f"needs a kestrel Caddy image at {image} "
                    "(make demo, or KESTREL_CH_IMAGE)")
    volar = Volar(tmp_path / "state", capsys)
    manifest = write_plugin(tmp_path / "p", payload=image.read_bytes(),
                            entrypoint=["/usr/bin/caddy", "run", "--config",
                                        "/etc/caddy/Caddyfile"])
    assert hashlib.sha256(image.read_bytes()).hexdigest() in manifest.read_text()
    volar.ok("plugins", "install", "--manifest", str(manifest))
    out = volar.ok("vms", "create", "ch-demo", "--plugin", "caddy", "--vmm",
                   "cloud-hypervisor", "--timeout", "60")
    try:
        assert "Allocating IP: 192.168.127.2" in out
        with urllib.request.urlopen("http://192.168.127.2:80/", timeout=10) as r:
            assert b"Hello from Caddy" in r.read()
        assert volar.ok("vms", "stop", "ch-demo", "--grace", "5").startswith(
            "VM ch-demo stopped")
    finally:
        volar("vms", "delete", "ch-demo")
