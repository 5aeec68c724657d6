"""A host end for kestrel's protocol on a unix socket, acking like the real host.

``python -m host.receiver PATH`` (also ``volar agent listen PATH``) prints
every message as one JSON object per line: a debugging aid for agents run
outside a VM (kestrel.channel=unix:PATH). ``serve`` runs volar's one session
loop (host/session.py) on a unix listener: tests and benchmarks use it too,
so replays are deduplicated and gaps counted exactly as the monitor does.
"""

from __future__ import annotations

import base64
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, TextIO

import trio

from host.session import SessionLoop, Sink
from host.vsock import private_listener
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


class JsonLines:
    """A sink that prints each record as one JSON object per line."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def record(self, messages: list[Message]) -> None:
        for msg in messages:
            self.out.write(json.dumps(to_json(msg)) + "\n")
        self.out.flush()  # printed before acked, like the store's commit


async def serve(
    path: str,
    sink: Sink,
    *,
    session: HostSession | None = None,
    task_status: trio.TaskStatus[SessionLoop] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept kestrel connections on ``path`` (created 0600) one at a time, forever."""
    loop = SessionLoop(sink, session=session, say=lambda line: None)
    listener = await private_listener(Path(path))
    task_status.started(loop)
    await loop.serve_listener(listener)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m host.receiver SOCKET_PATH", file=sys.stderr)
        return 2

    try:
        trio.run(serve, args[0], JsonLines(sys.stdout))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"volar: {args[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
