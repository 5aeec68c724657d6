"""A host end for kestrel's protocol on a unix socket, acking like the real host.

``python -m host.receiver PATH`` (also ``volar agent listen PATH``) prints
every message as one JSON object per line: a debugging aid for agents run
outside a VM (kestrel.channel=unix:PATH). ``serve`` is the same loop for
tests and benchmarks: it keeps one HostSession across reconnects, so
replays are deduplicated and gaps counted exactly as the monitor does.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import trio

from kestrel.protocol import HostSession, Message, Unknown


def to_json(msg: Message) -> dict[str, Any]:
    """A JSON-able dict: bytes as text when UTF-8, else base64 under ``data_b64``."""
    if isinstance(msg, Unknown):
        return {"t": msg.type, **msg.body}
    out: dict[str, Any] = {"t": msg.TYPE}
    for f in fields(msg):
        name = f.name
        value = getattr(msg, name)
        if isinstance(value, bytes):
            try:
                out[name] = value.decode("utf-8")
            except UnicodeDecodeError:
                out[name + "_b64"] = base64.b64encode(value).decode("ascii")
        else:
            out[name] = value
    return out


async def serve(
    path: str,
    on_message: Callable[[Message], None],
    *,
    session: HostSession | None = None,
    task_status: trio.TaskStatus[trio.SocketListener] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept kestrel connections on ``path`` one at a time, forever."""
    session = session or HostSession()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(4)
    listener = trio.SocketListener(sock)
    task_status.started(listener)
    async with listener:
        while True:
            stream = await listener.accept()
            async with stream:
                try:
                    await stream.send_all(session.attach())
                    while data := await stream.receive_some(1 << 20):
                        for msg in session.receive(data):
                            on_message(msg)
                        ack = session.ack()
                        if ack:
                            await stream.send_all(ack)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m host.receiver SOCKET_PATH", file=sys.stderr)
        return 2

    def show(msg: Message) -> None:
        sys.stdout.write(json.dumps(to_json(msg)) + "\n")
        sys.stdout.flush()

    try:
        trio.run(serve, args[0], show)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"volar: {args[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
