"""``volar vms http``: one HTTP request to a VM's agent API, through its vsock.

The request goes through the VM's hybrid vsock socket (``CONNECT 8080``,
host/vsock.py) to kestrel's agent API: ``/healthz`` is kestrel's, ``/v1/...``
reaches the workload's base_url, so a workload with no network at all is
reachable. The body is streamed to stdout as it arrives. Like
``curl --fail-with-body``: the body is printed whatever the status, and an
HTTP status >= 400 adds one line on stderr and exit status 22.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import h11
import trio

from host.errors import VolarError
from host.state import Store
from host.vmm import VmmError
from host.vsock import hybrid_connect, hybrid_socket
from kestrel.layout import AGENT_API_PORT

RUNNING = ("running", "healthy", "unhealthy")
# kestrel starts its API right after it attaches (when the VM turns running):
# a connection in that gap finds nothing listening; retry that long.
API_WAIT_S = 3.0
HTTP_ERROR_EXIT = 22  # curl's exit status for -f / --fail-with-body
CHUNK = 65536

Sink = Callable[[bytes], Awaitable[None]]


class HttpError(VolarError):
    """The request could not be made or its answer was not HTTP; says which VM and why."""


class Response:
    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        self.status, self.reason, self.headers = status, reason, headers


async def exchange(stream: trio.abc.Stream, *, method: str, target: str,
                   headers: list[tuple[str, str]], body: bytes, sink: Sink,
                   head: Callable[[Response], Awaitable[None]] | None = None,
                   received: bytes = b"") -> Response:
    """One request on ``stream``; the response body goes to ``sink`` as it arrives.

    ``received``: bytes already read from the stream (after the OK line).
    Raises HttpError when the answer is cut short or is not HTTP.
    """
    conn = h11.Connection(h11.CLIENT)
    names = {name.lower() for name, _ in headers}
    all_headers = [("Host", "kestrel")] if "host" not in names else []
    all_headers += headers
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        all_headers.append(("Content-Length", str(len(body))))
    all_headers.append(("Connection", "close"))
    try:
        request = h11.Request(method=method, target=target, headers=all_headers)
    except h11.LocalProtocolError as exc:
        raise HttpError(f"{method} {target}: not a valid request ({exc})") from None
    out = conn.send(request) or b""
    if body:
        out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    if received:
        conn.receive_data(received)
    response: Response | None = None
    try:
        async with trio.open_nursery() as nursery:
            # Sent while the answer is read: an echo answers before the upload ends.
            nursery.start_soon(_send, stream, out)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(CHUNK)))
                elif isinstance(event, h11.Response):
                    response = Response(event.status_code, event.reason.decode("latin-1"),
                                        [(n.decode("latin-1"), v.decode("latin-1"))
                                         for n, v in event.headers])
                    if head is not None:
                        await head(response)
                elif isinstance(event, h11.Data):
                    await sink(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    nursery.cancel_scope.cancel()
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise HttpError("the connection closed before a complete response"
                                    + ("" if response else " (no status line)"))
    except* HttpError as group:  # raised inside the nursery: one, wrapped by trio
        raise group.exceptions[0] from None
    except* (trio.BrokenResourceError, OSError) as group:
        raise HttpError(f"connection lost: {group.exceptions[0]}") from None
    except* h11.RemoteProtocolError as group:
        what = "a truncated or malformed response" if response else "not an HTTP answer"
        raise HttpError(f"{what}: {group.exceptions[0]}") from None
    assert response is not None
    return response


async def _send(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except trio.BrokenResourceError:
        pass  # the server answered and closed before reading it all: its answer counts


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or name != name.strip():
        raise HttpError(f"-H {text!r}: expected 'Name: value'")
    return name, value.strip()


def read_body(data: str | None) -> bytes:
    """-d BODY as given; ``@FILE`` reads a file and ``@-`` stdin, as is (curl's
    --data-binary: no newline stripped)."""
    if data is None:
        return b""
    if data == "@-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        try:
            return Path(data[1:]).read_bytes()
        except OSError as exc:
            raise HttpError(f"-d {data}: {exc.strerror or exc}") from None
    return data.encode()


def agent_socket(store: Store, name: str) -> Path:
    """The VM's hybrid vsock socket; one line when the VM cannot be reached that way."""
    vm = store.vm(name)
    if vm.status not in RUNNING:
        raise HttpError(f"vms http {name}: the VM is {vm.status}; the agent API needs a "
                        "running VM")
    if vm.channel != "vsock":
        channel = vm.channel or "its driver's own"
        raise HttpError(f"vms http {name}: the VM's channel is {channel}, not vsock: no way "
                        "into the guest (create it with --channel vsock)")
    return hybrid_socket(Path(vm.run_dir))


def cmd_http(store: Store, args: argparse.Namespace) -> int:
    target = args.path
    if not target.startswith("/"):
        raise HttpError(f"vms http {args.name}: PATH must start with / (/healthz, /v1/...), "
                        f"not {target!r}")
    headers = [parse_header(h) for h in args.header or []]
    body = read_body(args.data)
    method = (args.request or ("POST" if args.data is not None else "GET")).upper()
    uds = agent_socket(store, args.name)
    out = sys.stdout.buffer

    async def sink(data: bytes) -> None:
        out.write(data)
        out.flush()  # streamed: each piece as it arrives

    async def head(response: Response) -> None:
        if args.include:
            lines = [f"HTTP/1.1 {response.status} {response.reason}"]
            lines += [f"{n}: {v}" for n, v in response.headers]
            out.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def main() -> Response:
        try:
            stream, rest = await hybrid_connect(uds, AGENT_API_PORT, deadline_s=API_WAIT_S)
        except VmmError as exc:
            raise HttpError(f"vms http {args.name}: {exc}") from None
        async with stream:
            try:
                return await exchange(stream, method=method, target=target, headers=headers,
                                      body=body, sink=sink, head=head, received=rest)
            except HttpError as exc:
                raise HttpError(f"vms http {args.name} {method} {target}: {exc}") from None

    response = trio.run(main)
    if response.status >= 400:
        print(f"volar: vms http {args.name} {method} {target}: HTTP {response.status} "
              f"{response.reason}".rstrip(), file=sys.stderr)
        return HTTP_ERROR_EXIT
    return 0
