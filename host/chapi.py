"""cloud-hypervisor's REST API over its --api-socket: h11 on a trio unix stream.

Endpoints from cloud-hypervisor's docs/api.md and its OpenAPI document
(vmm/src/api/openapi/cloud-hypervisor.yaml), all under /api/v1:
GET vmm.ping -> 200 VmmPingResponse, GET vm.info -> 200 VmInfo, and PUT
vm.shutdown, vm.power-button, vmm.shutdown, vm.pause, vm.resume -> 204, PUT
vm.snapshot with a VmSnapshotConfig {"destination_url": "file:///dir"} ->
204 (docs/snapshot_restore.md: the VM must be paused first; a restore is
``--restore source_url=file:///dir`` and leaves the VM paused). One request
per connection, as curl --unix-socket does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h11
import trio

from host.vmm import VmmError

API_PREFIX = "/api/v1/"


class ChApiError(VmmError):
    def __init__(self, endpoint: str, message: str, *, status: int = 0) -> None:
        super().__init__(f"cloud-hypervisor API {endpoint}: {message}")
        self.endpoint = endpoint
        self.status = status


async def request(
    socket_path: Path | str,
    method: str,
    endpoint: str,
    *,
    body: Any = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One HTTP/1.1 request; returns (status, body). Raises ChApiError on I/O trouble."""
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", "localhost"), ("Accept", "application/json")]
    payload = b""
    if body is not None:
        payload = json.dumps(body).encode()
        # micro_http (CH's server) reads bodies by Content-Length; never chunked.
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    out = conn.send(h11.Request(method=method, target=API_PREFIX + endpoint, headers=headers))
    if payload:
        out += conn.send(h11.Data(data=payload))
    out += conn.send(h11.EndOfMessage())
    status = 0
    chunks: list[bytes] = []
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(str(socket_path))
            async with stream:
                await stream.send_all(out)
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
    except trio.TooSlowError:
        raise ChApiError(endpoint, f"no answer within {timeout:g} s") from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise ChApiError(endpoint, f"{socket_path}: {exc}") from None
    except h11.RemoteProtocolError as exc:
        raise ChApiError(endpoint, f"bad HTTP from the VMM: {exc}") from None
    return status, b"".join(chunks)


class CloudHypervisorApi:
    def __init__(self, socket_path: Path | str, *, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    async def _call(self, method: str, endpoint: str, *, expect: tuple[int, ...],
                    body: Any = None, timeout: float | None = None) -> bytes:
        status, answer = await request(self.socket_path, method, endpoint, body=body,
                                       timeout=timeout or self.timeout)
        if status not in expect:
            text = answer.decode("utf-8", "replace").strip()[:300]
            raise ChApiError(endpoint, f"HTTP {status}" + (f": {text}" if text else ""),
                             status=status)
        return answer

    async def _json(self, endpoint: str) -> dict[str, Any]:
        body = await self._call("GET", endpoint, expect=(200,))
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise ChApiError(endpoint, f"not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ChApiError(endpoint, "expected a JSON object")
        return obj

    async def ping(self) -> dict[str, Any]:
        """VmmPingResponse: version (required), build_version, pid, features."""
        return await self._json("vmm.ping")

    async def info(self) -> dict[str, Any]:
        """VmInfo: config, state (Created|Running|Shutdown|Paused), memory_actual_size."""
        return await self._json("vm.info")

    async def shutdown_vm(self) -> None:
        await self._call("PUT", "vm.shutdown", expect=(200, 204))

    async def power_button(self) -> None:
        await self._call("PUT", "vm.power-button", expect=(200, 204))

    async def shutdown_vmm(self) -> None:
        await self._call("PUT", "vmm.shutdown", expect=(200, 204))

    async def pause(self) -> None:
        await self._call("PUT", "vm.pause", expect=(200, 204))

    async def resume(self) -> None:
        await self._call("PUT", "vm.resume", expect=(200, 204))

    async def snapshot(self, destination: Path, *, timeout: float = 300.0) -> None:
        """Save the paused VM into ``destination`` (an existing directory)."""
        await self._call("PUT", "vm.snapshot", expect=(200, 204), timeout=timeout,
                         body={"destination_url": f"file://{destination}"})
