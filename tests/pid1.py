"""Run kestrel as PID 1 of fresh PID, mount, UTS and network namespaces.

A file bind-mounted over /proc/cmdline carries the configuration, the
channel is a unix socket served by volar's own session loop (host.session),
and reboot(2) in a PID namespace kills the namespace's init with SIGINT:
that is how a test sees a power-off. CAP_SYS_MODULE is dropped, so nothing
here can load a module into this machine's kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from host.exechub import read_line
from host.session import Collector, SessionLoop
from host.vsock import private_listener
from kestrel.cmdline import encode_manifest
from kestrel.protocol import Exit, Health, HostSession, Log, Message, State
from tests.vsockguard import GUARD

REPO = Path(__file__).resolve().parent.parent
# Outside /tmp and /run: kestrel mounts tmpfs over those inside its namespace.
SCRATCH = Path(os.environ.get("KESTREL_TEST_SCRATCH", "/var/tmp"))
POWEROFF_STATUS = -signal.SIGINT  # Popen-style returncode of the namespace init
# The interpreter for workloads and helpers: the real file, never a venv's
# symlink, which kestrel's tmpfs hides when the checkout lives under /tmp.
PYTHON = os.path.realpath(sys.executable)


def manifest(entrypoint: list[str], *, type: str = "exec", **workload: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "name": "test",
        "version": "0.0.1",
        "initramfs": {"url": "/dev/null"},
        "workload": {"type": type, "entrypoint": entrypoint, "workdir": "/", **workload},
    }
    return m


class Run:
    """What the host saw: messages in arrival order, the console, the exit."""

    def __init__(self) -> None:
        self.collector = Collector()
        self.messages: list[Message] = self.collector.messages
        self.console = ""
        self.returncode: int | None = None
        self.loop = SessionLoop(self.collector, say=lambda line: None)
        self.session: HostSession = self.loop.session
        self.dir = Path()
        self.host_pid = 0  # kestrel's pid as this machine sees it

    def of(self, kind: type[Message]) -> list[Any]:
        return [m for m in self.messages if isinstance(m, kind)]

    def logs(self, stream: str | None = None) -> bytes:
        return b"".join(m.data for m in self.of(Log) if stream in (None, m.stream))

    @property
    def exits(self) -> list[Exit]:
        return self.of(Exit)

    @property
    def states(self) -> list[str]:
        return [m.state for m in self.of(State)]

    @property
    def health(self) -> list[str]:
        return [m.status for m in self.of(Health)]

    @property
    def powered_off(self) -> bool:
        return self.returncode == POWEROFF_STATUS


Scenario = Callable[["Kestrel"], Awaitable[None]]


class Kestrel:
    """A running kestrel; scenarios use it to signal PID 1 and talk to it."""

    def __init__(self, run: Run) -> None:
        self.run = run
        # Exec sessions: host.execclient connects here, and the session
        # loop's own exec hub relays them, as the monitor's control socket does.
        self.control = run.dir / "control.sock"

    def signal(self, signum: int) -> None:
        os.kill(self.run.host_pid, signum)

    async def send(self, msg: Message) -> None:
        assert await self.run.loop.command(msg), f"no attached kestrel took {msg!r}"

    async def wait_for(self, pred: Callable[[Run], bool], timeout: float = 30) -> None:
        with trio.fail_after(timeout):
            await self.run.collector.wait_for(lambda: pred(self.run))

    async def disconnect(self) -> None:
        await self.run.loop.disconnect()


async def run_kestrel(
    doc: dict[str, Any] | None = None,
    *,
    cmdline: str | None = None,
    extra: str = "",
    scenario: Scenario | None = None,
    timeout: float = 60,
    serve: bool = True,
    prelude: str = "",
) -> Run:
    """Boot kestrel with ``doc`` as its manifest; return when it powers off.

    ``prelude``: Python statements the interpreter runs before kestrel's main
    (an audit hook, say)."""
    run = Run()
    tmp = Path(tempfile.mkdtemp(prefix="kestrel-", dir=SCRATCH))
    run.dir = tmp
    sock = tmp / "agent.sock"
    if cmdline is None:
        enc = f"volant.manifest={encode_manifest(json.dumps(doc).encode())}" if doc else ""
        cmdline = f"console=ttyS0 {enc} kestrel.channel=unix:{sock} kestrel.hostname=kt {extra}"
    # Safety: kestrel's default channel is vsock to CID 2, which on this
    # machine is a hypervisor that is not ours. Every test names its channel.
    if "kestrel.channel=" not in cmdline or "kestrel.channel=vsock" in cmdline:
        raise AssertionError("tests must give kestrel.channel=unix:... or serial:...")
    (tmp / "cmdline").write_text(cmdline.strip() + "\n")
    argv = [
        "setpriv", "--bounding-set", "-sys_module",
        "unshare", "-pfmun", "--mount-proc", "--kill-child",
        "sh", "-c",
        'mount --bind "$0" /proc/cmdline && exec "$@"',
        str(tmp / "cmdline"), *frozen_kestrel(prelude),
    ]
    k = Kestrel(run)
    try:
        async with trio.open_nursery() as nursery:
            if serve:
                listener = await private_listener(sock)
                nursery.start_soon(run.loop.serve_listener, listener)
                control = await private_listener(k.control, backlog=64)
                nursery.start_soon(trio.serve_listeners, _control_client(run.loop), [control])
            proc = await trio.lowlevel.open_process(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            nursery.start_soon(_drain, proc, run)
            with trio.fail_after(5):
                while not run.host_pid:
                    run.host_pid = _child_of(proc.pid)
                    await trio.sleep(0.005)
            try:
                with trio.fail_after(timeout):
                    if scenario is not None:
                        await scenario(k)
                    run.returncode = await proc.wait()
            finally:
                if proc.returncode is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
            await trio.sleep(0.05)  # the last frames in flight
            nursery.cancel_scope.cancel()
    finally:
        if run.returncode == POWEROFF_STATUS:
            shutil.rmtree(tmp, ignore_errors=True)
    return run


_frozen: Path | None = None


def frozen_python() -> Path:
    """The frozen kestrel's interpreter: every PID 1 test runs the kestrel an
    image carries (builder/freeze.py: -OO bytecode, stubs and source edits).
    Cached under SCRATCH, not in the checkout: kestrel's own tmpfs over /tmp
    would hide a checkout there, and zipimport reopens its zip for each module."""
    global _frozen
    if _frozen is None:
        import hashlib

        from builder.freeze import PREFIX, PY_TAG, freeze_kestrel

        # One cache per checkout: two checkouts never write the same tree at once.
        tag = hashlib.sha256(str(REPO).encode()).hexdigest()[:12]
        agent = freeze_kestrel(cache_dir=SCRATCH / f"kestrel-test-freeze-{tag}")
        _frozen = agent.root / str(PREFIX).lstrip("/") / "bin" / PY_TAG
    return _frozen


def frozen_kestrel(prelude: str = "") -> list[str]:
    """argv that starts the frozen kestrel, as /bin/kestrel does in an image."""
    code = f"{GUARD}\n{prelude}\nfrom kestrel.main import main; main()"
    return [str(frozen_python()), "-IOO", "-c", code]


def _control_client(loop: SessionLoop) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            line, rest = await read_line(stream)
            if line == "exec":
                await loop.exec.serve_client(stream, rest)

    return handle


def _child_of(pid: int) -> int:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0
    return int(kids[0]) if kids else 0


async def _drain(proc: trio.Process, run: Run) -> None:
    assert proc.stdout is not None
    chunks = []
    async for chunk in proc.stdout:
        chunks.append(chunk)
        run.console = b"".join(chunks).decode(errors="replace")
