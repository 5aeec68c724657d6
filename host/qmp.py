"""A small trio client for QEMU's machine protocol (QMP) over a unix socket.

QMP is newline-delimited JSON: QEMU greets, the client sends
``qmp_capabilities``, then each command gets a reply carrying the same
``id``; asynchronous events can arrive in between and are set aside.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from pathlib import Path
from typing import Any

import trio

# Migration to a local file: no reason to pace it (QEMU's default cap is 128 MiB/s).
MAX_BANDWIDTH = 1 << 40
MIGRATE_POLL_S = 0.02


class QmpError(RuntimeError):
    """QEMU refused a command, closed the socket or could not be reached."""


class QmpClient:
    """One QMP connection. Use ``async with await QmpClient.connect(path)``."""

    def __init__(self, stream: trio.SocketStream, *, path: Path) -> None:
        self._stream = stream
        self._path = path
        self._buf = bytearray()
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: Path, *, timeout: float = 10.0) -> QmpClient:
        """Connect (retrying while QEMU creates the socket) and negotiate."""
        stream: trio.SocketStream | None = None
        with trio.move_on_after(timeout):
            while stream is None:
                try:
                    stream = await trio.open_unix_socket(str(path))
                except OSError:
                    await trio.sleep(0.02)
        if stream is None:
            raise QmpError(f"QMP socket {path} did not accept within {timeout:.0f} s")
        client = cls(stream, path=path)
        try:
            with trio.fail_after(timeout):
                greeting = await client._read()
                if "QMP" not in greeting:
                    raise QmpError(f"{path}: expected the QMP greeting, got {greeting!r}")
                await client.execute("qmp_capabilities")
        except BaseException:
            await stream.aclose()
            raise
        return client

    async def __aenter__(self) -> QmpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise QmpError(f"QMP socket {self._path}: {exc}") from None
            if not data:
                raise QmpError(f"QEMU closed the QMP socket {self._path}")
            self._buf += data
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        try:
            msg = json.loads(line)
        except ValueError:
            raise QmpError(f"QMP sent a line that is not JSON: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise QmpError(f"QMP sent a non-object: {line[:200]!r}")
        return msg

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its ``return`` value; QmpError on ``error``."""
        ident = f"k{next(self._ids)}"
        request: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = arguments
        try:
            await self._stream.send_all(json.dumps(request).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise QmpError(f"QMP {command}: QEMU went away ({exc})") from None
        while True:
            msg = await self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != ident:
                continue  # a reply to a command whose caller gave up
            if "error" in msg:
                err = msg["error"]
                raise QmpError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
            return msg.get("return")

    async def status(self) -> str:
        """The run state: "running", "paused", "shutdown", ..."""
        reply = await self.execute("query-status")
        return str(reply.get("status", "")) if isinstance(reply, dict) else ""

    async def quit(self) -> None:
        """Ask QEMU to exit now; the socket closing before the reply counts as done."""
        with contextlib.suppress(QmpError):
            await self.execute("quit")

    async def powerdown(self) -> None:
        """The ACPI power button (the guest must handle it)."""
        await self.execute("system_powerdown")

    async def human(self, command_line: str) -> str:
        reply = await self.execute("human-monitor-command", {"command-line": command_line})
        return str(reply)

    async def wait_event(self, name: str, *, timeout: float, device: str | None = None
                         ) -> dict[str, Any]:
        """The next ``name`` event (one that came during a command counts too)."""
        with trio.move_on_after(timeout):
            while True:
                for event in self.events:
                    data = event.get("data") or {}
                    if event.get("event") == name and device in (None, data.get("device")):
                        self.events.remove(event)
                        return event
                msg = await self._read()
                if "event" in msg:
                    self.events.append(msg)
        raise QmpError(f"no {name} event within {timeout:g} s")

    async def device_del(self, ident: str, *, timeout: float) -> None:
        """Unplug a device and wait until the guest has let it go (DEVICE_DELETED)."""
        await self.execute("device_del", {"id": ident})
        # The device's own event (its virtio-backend child sends one without an id).
        await self.wait_event("DEVICE_DELETED", timeout=timeout, device=ident)

    async def _migration(self) -> dict[str, Any]:
        """Poll query-migrate until it ends; QmpError with QEMU's reason on failure."""
        while True:
            info = await self.execute("query-migrate")
            status = info.get("status", "") if isinstance(info, dict) else ""
            if status == "completed":
                return dict(info)
            if status in ("failed", "cancelled"):
                raise QmpError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
            await trio.sleep(MIGRATE_POLL_S)

    async def migrate_to(self, uri: str) -> dict[str, Any]:
        """Save the (paused) machine to ``uri``; returns query-migrate's final answer."""
        await self.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
        await self.execute("migrate", {"uri": uri})
        return await self._migration()

    async def wait_loaded(self) -> None:
        """Wait until a machine started with ``-incoming`` has loaded its state.

        It stays paused: the source was stopped before its state was saved.
        A state QEMU cannot load ends QEMU itself (the caller reports its log).
        """
        while await self.status() == "inmigrate":
            await trio.sleep(MIGRATE_POLL_S)
        status = await self.status()
        if status not in ("paused", "postmigrate", "prelaunch"):
            raise QmpError(f"migration load ended in state {status!r}")

    async def forwarded_port(self, guest_port: int) -> int | None:
        """The host port QEMU bound for ``hostfwd=tcp:...-:guest_port`` (port 0 picks one)."""
        return parse_usernet(await self.human("info usernet"), guest_port)


# "  TCP[HOST_FORWARD]  13   127.0.0.1 34567   10.0.2.15    80     0     0"
_FORWARD = re.compile(
    r"TCP\[HOST_FORWARD\]\s+\d+\s+(?P<src>\S+)\s+(?P<sport>\d+)\s+(?P<dst>\S+)\s+(?P<dport>\d+)"
)


def parse_usernet(text: str, guest_port: int) -> int | None:
    for m in _FORWARD.finditer(text):
        if int(m.group("dport")) == guest_port:
            return int(m.group("sport"))
    return None
