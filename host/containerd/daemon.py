"""The shim daemon: the task service on the socket ``start`` bound, until Shutdown.

Its stderr is containerd's shim log FIFO; containerd may go away (and come
back), so a line that cannot be written is dropped, never fatal.
"""

from __future__ import annotations

import os
import socket as stdsocket
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from host.containerd.config import ShimConfig, load_config
from host.containerd.events import Publisher
from host.containerd.server import serve as serve_ttrpc
from host.containerd.task import TaskService

DRAIN_S = 15.0  # events still queued at shutdown (an exit, a delete) get this long


def serve(namespace: str, container_id: str, *, address: str, publish_binary: str,
          listen_fd: int, socket: Path) -> int:
    def say(line: str) -> None:
        try:
            print(f"kestrel-shim {namespace}/{container_id}: {line}", file=sys.stderr,
                  flush=True)
        except OSError:
            pass  # containerd is not reading its log right now

    cfg = load_config()
    sock = stdsocket.socket(fileno=listen_fd)
    try:
        trio.run(_serve, cfg, namespace, container_id, address, publish_binary, sock, say)
    finally:
        socket.unlink(missing_ok=True)
    return 0


async def _serve(cfg: ShimConfig, namespace: str, container_id: str, address: str,
                 publish_binary: str, sock: stdsocket.socket, say: Callable[[str], None]) -> None:
    publisher = Publisher(binary=publish_binary, address=address, namespace=namespace, say=say)
    shutdown = trio.Event()
    service = TaskService(cfg=cfg, namespace=namespace, container_id=container_id,
                          bundle=Path(os.getcwd()), publisher=publisher, say=say,
                          shutdown=shutdown)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    async with trio.open_nursery() as outer:
        outer.start_soon(publisher.run)
        async with trio.open_nursery() as inner:
            await inner.start(service.run)
            inner.start_soon(serve_ttrpc, listener, service.methods(), say)
            await shutdown.wait()
            await trio.sleep(0.05)  # the Shutdown answer leaves first
            inner.cancel_scope.cancel()
        with trio.move_on_after(DRAIN_S):
            await publisher.drain()
        outer.cancel_scope.deadline = trio.current_time() + DRAIN_S
