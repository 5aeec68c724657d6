"""Hybrid vsock: a VM's vsock device seen from the host as unix sockets.

cloud-hypervisor, Firecracker and rust-vmm's vhost-device-vsock (the
backend QEMU uses here) all map a guest's vsock to one unix socket
``<uds>``: a guest connection to (CID 2, port P) arrives at the host's
listener ``<uds>_<P>``, and a host connection to ``<uds>`` sends
``CONNECT <P>\\n`` and reads ``OK <n>\\n``. Every driver uses this module
for both directions, so the agent link is one code path for every VMM.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

import trio

from host.vmm import Helper, Proc, VmmError
from kestrel.layout import VSOCK_PORT

# The hybrid socket's name inside a VM's run directory, for every driver.
SOCKET_NAME = "vsock.sock"
# The vhost-user control socket QEMU connects to (QEMU driver only).
BACKEND_SOCKET = "vhost-vsock.sock"
BACKEND_LOG = "vhost-device-vsock.log"
BACKEND_BINARY = "vhost-device-vsock"
# Where `make vhost-device-vsock` installs it (cargo install --root).
CACHE_BINARY = (Path(__file__).resolve().parent.parent / ".cache" / "vhost-device-vsock"
                / "bin" / BACKEND_BINARY)
CONNECT_OK_TIMEOUT_S = 1.0
CONNECT_RETRY_S = 0.1
BACKEND_READY_S = 10.0
INSTALL_HINT = ("`make vhost-device-vsock` installs it (cargo install --locked "
                "vhost-device-vsock --version 0.3.0), or set KESTREL_VHOST_VSOCK=PATH")


class BackendMissing(VmmError):
    """vhost-device-vsock is not where volar looks, or is not runnable."""


def hybrid_socket(run_dir: Path) -> Path:
    return run_dir / SOCKET_NAME


def listen_path(uds: Path, port: int) -> Path:
    """The host listener a guest connection to (CID 2, ``port``) arrives at."""
    return Path(f"{uds}_{port}")


async def private_listener(path: Path, *, backlog: int = 4) -> trio.SocketListener:
    """A unix listener created 0600 (under a umask: no window before a chmod).

    The bind is the stdlib's, synchronous: trio's ``await sock.bind`` runs in
    a worker thread, and other tasks would create their files under the
    borrowed umask meanwhile."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


class AgentListener:
    """kestrel's way in: the listener on ``<uds>_<port>``, made before the VMM starts.

    A guest that connects before anyone listens gets a reset, so every driver
    calls ``open()`` first and ``accept()`` for each (re)connection.
    """

    def __init__(self, uds: Path, port: int = VSOCK_PORT) -> None:
        self.path = listen_path(uds, port)
        self.port = port
        self._listener: trio.SocketListener | None = None

    @classmethod
    async def open(cls, uds: Path, port: int = VSOCK_PORT) -> AgentListener:
        self = cls(uds, port)
        self._listener = await private_listener(self.path, backlog=2)
        return self

    async def accept(self, process: Proc, *, timeout: float, what: str
                     ) -> trio.abc.Stream:
        """The guest's next connection; a VmmError once the VMM is gone or ``timeout`` passes."""
        listener = self._listener
        if listener is None:
            raise VmmError(f"{what}: no vsock listener on {self.path}")
        got: list[trio.abc.Stream] = []
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:

                async def accept() -> None:
                    got.append(await listener.accept())
                    nursery.cancel_scope.cancel()

                nursery.start_soon(accept)
                await process.wait()
                nursery.cancel_scope.cancel()
            if got:
                return got[0]
            status = process.returncode if getattr(process, "status_known", True) else "unknown"
            raise VmmError(f"{what}: the VMM exited (status {status}) "
                           "before kestrel connected over vsock")
        raise VmmError(f"{what}: kestrel did not connect over vsock port {self.port} "
                       f"within {timeout:g} s")

    async def aclose(self) -> None:
        if self._listener is not None:
            await self._listener.aclose()
            self._listener = None
        self.path.unlink(missing_ok=True)


class HybridError(VmmError):
    """A host -> guest connection through the hybrid socket failed; says which step."""


class NotListening(HybridError):
    """The VMM closed the connection without OK: nothing listens on that guest port."""


class NoBackend(HybridError):
    """Nobody accepts on the hybrid socket: no VMM or backend behind it."""


async def handshake(stream: trio.abc.Stream, request: bytes, *, what: str,
                    ok_timeout_s: float = CONNECT_OK_TIMEOUT_S) -> bytes:
    """Send ``request`` (``CONNECT <port>\n``), read the ``OK <n>\n`` line.

    Returns the bytes that came after the OK line (the guest's, they belong
    to the session). Raises NotListening when the VMM closes without OK and
    HybridError when no line comes within ``ok_timeout_s`` or it is not OK.
    """
    try:
        await stream.send_all(request)
        buf = b""
        with trio.move_on_after(ok_timeout_s):
            while b"\n" not in buf and len(buf) < 64:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    raise NotListening(f"{what}: the VMM closed the connection without OK "
                                       "(nothing listens on that port in the guest, or the "
                                       "VMM refused the CONNECT line)")
                buf += chunk
    except (trio.BrokenResourceError, OSError) as exc:
        raise NotListening(f"{what}: the VMM reset the connection without OK ({exc}): "
                           "nothing listens on that port in the guest") from None
    line, sep, rest = buf.partition(b"\n")
    if sep and line.split()[:1] == [b"OK"]:
        return rest
    if not buf:
        raise HybridError(f"{what}: no answer to CONNECT within {ok_timeout_s:g} s "
                          "(the VMM or its vsock backend is not answering)")
    raise HybridError(f"{what}: the VMM answered {line[:40]!r}, not OK")


async def connect(uds: Path | str, port: int, *,
                  ok_timeout_s: float = CONNECT_OK_TIMEOUT_S) -> tuple[trio.SocketStream, bytes]:
    """Host -> guest, one attempt: ``CONNECT <port>\n``, wait for ``OK <n>\n``.

    Returns the stream and any bytes the guest sent after the OK line.
    """
    what = f"vsock port {port} through {uds}"
    try:
        stream = await trio.open_unix_socket(str(uds))
    except OSError as exc:
        raise NoBackend(f"{what}: {exc.strerror or exc} (is the VM running?)") from None
    try:
        rest = await handshake(stream, f"CONNECT {port}\n".encode(), what=what,
                               ok_timeout_s=ok_timeout_s)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, rest


async def hybrid_connect(
    uds: Path | str, port: int, *, deadline_s: float = 10.0
) -> tuple[trio.SocketStream, bytes]:
    """``connect``, retried every ~100 ms until ``deadline_s``: the VMM closes the
    socket without OK while nothing listens in the guest yet (it is booting).
    At the deadline the last attempt's error is raised, saying how long it tried."""
    last: HybridError = NoBackend(f"vsock port {port} through {uds}: no attempt")
    with trio.move_on_after(deadline_s):
        while True:
            try:
                return await connect(uds, port)
            except HybridError as exc:
                last = exc
            await trio.sleep(CONNECT_RETRY_S)
    raise type(last)(f"{last}; still so after {deadline_s:g} s")


# --- the vhost-user backend (QEMU) ------------------------------------------------

def in_ci(env: Mapping[str, str] = os.environ) -> bool:
    return env.get("CI", "").lower() == "true"


def find_backend(env: Mapping[str, str] = os.environ, *,
                 cache: Path = CACHE_BINARY) -> Path | None:
    """$KESTREL_VHOST_VSOCK, else PATH, else the Makefile's .cache; None when absent.

    An explicit $KESTREL_VHOST_VSOCK that is not runnable is an error, not a
    fallback: the user asked for that binary.
    """
    explicit = env.get("KESTREL_VHOST_VSOCK", "")
    if explicit:
        path = Path(explicit)
        if not path.is_file() or not os.access(path, os.X_OK):
            raise BackendMissing(f"KESTREL_VHOST_VSOCK={explicit}: no executable file there")
        return path
    found = shutil.which(BACKEND_BINARY, path=env.get("PATH", os.defpath))
    if found:
        return Path(found)
    if cache.is_file() and os.access(cache, os.X_OK):
        return cache
    return None


def require_backend(env: Mapping[str, str] = os.environ, *,
                    cache: Path = CACHE_BINARY) -> Path:
    backend = find_backend(env, cache=cache)
    if backend is None:
        raise BackendMissing(f"{BACKEND_BINARY} not found ($KESTREL_VHOST_VSOCK, PATH, "
                             f"{cache}): {INSTALL_HINT}")
    return backend


def default_channel(env: Mapping[str, str] = os.environ, *,
                    cache: Path = CACHE_BINARY) -> tuple[str, str]:
    """("vsock", "") when the backend is there, else ("serial", why) - an error in CI."""
    if find_backend(env, cache=cache) is not None:
        return "vsock", ""
    if in_ci(env):
        require_backend(env, cache=cache)  # raises: CI must run the production data path
    return "serial", (f"{BACKEND_BINARY} not found, so this VM uses virtio-serial "
                      f"instead of vsock ({INSTALL_HINT})")


def backend_command(binary: Path, *, cid: int, run_dir: Path) -> list[str]:
    """The backend in hybrid mode: uds-path only, never forward-cid (that opens AF_VSOCK)."""
    return [str(binary), "--vm",
            f"guest-cid={cid},socket={run_dir / BACKEND_SOCKET},"
            f"uds-path={hybrid_socket(run_dir)}"]


async def start_backend(binary: Path, *, cid: int, run_dir: Path,
                        ready_s: float = BACKEND_READY_S) -> Helper:
    """Start vhost-device-vsock and wait for its sockets; fail with its log tail.

    Its own session: the backend is part of the VM, not of the process that
    launched it, so it outlives a monitor that dies.
    """
    control, uds = run_dir / BACKEND_SOCKET, hybrid_socket(run_dir)
    for stale in (control, uds):  # left by a VM that crashed: the backend would refuse them
        stale.unlink(missing_ok=True)
    log = run_dir / BACKEND_LOG
    cmd = backend_command(binary, cid=cid, run_dir=run_dir)
    with open(log, "wb") as out:
        try:
            process = await trio.lowlevel.open_process(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, umask=0o177,  # its sockets are born 0600
            )
        except OSError as exc:
            raise BackendMissing(f"{binary}: cannot run ({exc.strerror or exc})") from None
    helper = Helper(name=BACKEND_BINARY, process=process, log=log)
    with trio.move_on_after(ready_s):
        while process.returncode is None:
            if control.is_socket() and uds.is_socket():
                return helper
            await trio.sleep(0.02)
        raise VmmError(f"{binary} exited with status {process.returncode} before creating "
                       f"{control.name}: {helper.log_tail() or '(no output)'}")
    await helper.stop()
    raise VmmError(f"{binary} did not create {control} within {ready_s:g} s: "
                   f"{helper.log_tail() or '(no output)'}")
