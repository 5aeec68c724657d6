"""host.vsock.private_listener: a listening unix socket nobody else can reach."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import trio

from host.vsock import private_listener


async def test_private_socket_is_0600_from_birth_and_replaces_a_stale_one(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket file left by a dead process
    stale.close()
    before = os.umask(0o022)
    try:
        listener = await private_listener(path, backlog=1)
        assert os.umask(0o022) == 0o022  # the caller's umask is back
    finally:
        os.umask(before)
    async with listener:
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        client = await trio.open_unix_socket(str(path))
        server = await listener.accept()
        await client.send_all(b"hi")
        assert await server.receive_some(2) == b"hi"
        await client.aclose()
        await server.aclose()
