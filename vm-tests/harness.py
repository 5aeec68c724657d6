"""Boot a real kernel under QEMU for a test and watch everything it says.

``boot()`` starts QEMU through host.qemu.QemuDriver inside an outer timeout,
copies the serial console line by line with host timestamps, runs volar's
own session loop (host.session) on the agent channel - vsock by default -
collecting every message, and always ends with QEMU and its vsock backend
gone. On failure it prints the QEMU command line, the run
directory it keeps and the console tail, so the boot can be reproduced.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from host.qemu import QemuDriver
from host.session import SessionLoop
from host.vmm import LaunchSpec, Running, VmmError
from kestrel.protocol import Hello, HostSession, Log, Message, ProtocolError, Signal, Stop

REPO = Path(__file__).resolve().parents[1]
M = TypeVar("M", bound=Message)


@dataclass
class ConsoleLine:
    t: float  # seconds since QEMU was spawned (host clock)
    text: str


@dataclass
class Vm:
    spec: LaunchSpec
    driver: QemuDriver
    running: Running
    spawned_at: float
    console: list[ConsoleLine] = field(default_factory=list)
    messages: list[tuple[float, Message]] = field(default_factory=list)
    exit_code: int | None = None
    exited_at: float | None = None
    console_done: bool = False
    agent_done: bool = False
    _changed: trio.Event = field(default_factory=trio.Event)
    loop: SessionLoop = field(init=False)

    def __post_init__(self) -> None:
        self.loop = SessionLoop(self, say=lambda line: print(f"[host] agent: {line}", flush=True))

    # --- the session loop's sink -------------------------------------------------

    def record(self, messages: list[Message]) -> None:
        now = time.monotonic() - self.spawned_at
        for msg in messages:
            self.messages.append((now, msg))
            if isinstance(msg, Log) and len(msg.data) > 400:
                # repr() of a 256 KiB record is a megabyte of text to cut to 400
                # characters: host CPU that a flood under TCG cannot spare.
                text = f"Log(stream={msg.stream!r}, seq={msg.seq}, {len(msg.data)} bytes)"
            else:
                text = repr(msg)[:400]
            print(f"[agent {now:7.3f}] {text}", flush=True)
        self._notify()

    # --- what happened ------------------------------------------------------

    @property
    def address(self) -> str:
        return self.running.address

    @property
    def session(self) -> HostSession:
        return self.loop.session

    @property
    def connections(self) -> int:
        return self.loop.connections

    @property
    def hello(self) -> Hello | None:
        return self.session.hello

    def console_text(self) -> str:
        return "\n".join(line.text for line in self.console)

    def of(self, kind: type[M]) -> list[M]:
        return [m for _t, m in self.messages if isinstance(m, kind)]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, check: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Wait until ``check()`` holds; fail naming ``what`` (with the console tail)."""
        with trio.move_on_after(timeout):
            while not check():
                # Only once QEMU is gone and its console and socket are read to
                # the end is "not yet" the same as "never".
                if self.exit_code is not None and self.console_done and self.agent_done:
                    raise AssertionError(f"QEMU exited ({self.exit_code}) before {what}\n"
                                         + self.tail())
                await self._changed.wait()
            return
        raise AssertionError(f"no {what} within {timeout:.0f} s\n" + self.tail())

    async def message(self, kind: type[M], *, timeout: float,
                      where: Callable[[M], bool] = lambda m: True) -> M:
        found: list[M] = []

        def check() -> bool:
            found[:] = [m for m in self.of(kind) if where(m)]
            return bool(found)

        await self.until(check, timeout=timeout, what=f"{kind.__name__} message")
        return found[0]

    async def console_line(self, text: str, *, timeout: float) -> ConsoleLine:
        await self.until(lambda: any(text in c.text for c in self.console),
                         timeout=timeout, what=f"console line containing {text!r}")
        return next(c for c in self.console if text in c.text)

    async def wait_exit(self, *, timeout: float) -> int:
        """QEMU's exit status, once its console and agent socket are read to the end."""
        await self.until(lambda: self.exit_code is not None and self.console_done
                         and self.agent_done, timeout=timeout, what="QEMU exit")
        assert self.exit_code is not None
        return self.exit_code

    async def send(self, msg: Stop | Signal) -> None:
        """Through the loop's lock: a re-attach in flight cannot interleave with it."""
        await self.until(lambda: self.loop.stream is not None and self.hello is not None,
                         timeout=60, what="an attached agent")
        assert await self.loop.command(msg), f"the agent connection dropped before {msg!r}"

    def tail(self, lines: int = 40) -> str:
        return "console tail:\n" + "\n".join(
            f"  [{c.t:7.3f}] {c.text}" for c in self.console[-lines:]
        )

    # --- background tasks -----------------------------------------------------

    async def _tail_console(self) -> None:
        pending = b""
        with open(self.running.console_log, "rb") as f:
            while True:
                chunk = f.read(65536)
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    now = time.monotonic() - self.spawned_at
                    for raw in lines:
                        text = raw.decode(errors="replace").rstrip("\r")
                        self.console.append(ConsoleLine(now, text))
                        print(f"[console {now:7.3f}] {text}", flush=True)
                    self._notify()
                elif self.exit_code is not None:
                    if pending:
                        self.console.append(ConsoleLine(time.monotonic() - self.spawned_at,
                                                        pending.decode(errors="replace")))
                    self.console_done = True
                    self._notify()
                    return
                else:
                    await trio.sleep(0.02)

    async def _wait_process(self) -> None:
        self.exit_code = await self.running.process.wait()
        self.exited_at = time.monotonic() - self.spawned_at
        print(f"[host {self.exited_at:7.3f}] QEMU exited {self.exit_code}", flush=True)
        self._notify()

    async def _agent(self) -> None:
        """Attach, collect, ack; reconnect after EOF while QEMU lives."""

        async def connect() -> trio.abc.Stream:
            return await self.driver.open_agent_stream(self.spec, self.running)

        def protocol_error(exc: ProtocolError) -> None:
            print(f"[host] agent stream ended: {exc!r}", flush=True)

        try:
            await self.loop.run(connect, lambda: self.exit_code is None,
                                on_protocol_error=protocol_error, connect_errors=(VmmError,))
        finally:
            self.agent_done = True
            self._notify()


@asynccontextmanager
async def boot(
    *,
    kernel: Path,
    initramfs: Path,
    run_dir: Path,
    cmdline: str = "",
    name: str = "vmtest",
    guest_port: int | None = None,
    memory_mb: int = 512,
    cpus: int = 1,
    protocol: bool = True,
    timeout: float = 240.0,
    driver: QemuDriver | None = None,
    disks: tuple[Path, ...] = (),
) -> AsyncIterator[Vm]:
    """Boot, yield the Vm while the test drives it, then make sure QEMU is gone."""
    driver = driver or QemuDriver()
    spec = LaunchSpec(name=name, run_dir=run_dir, kernel=kernel, initramfs=initramfs,
                      cmdline=cmdline, cpus=cpus, memory_mb=memory_mb, guest_port=guest_port,
                      disks=disks)
    print("[host] " + " ".join(driver.command(spec)), flush=True)
    vm: Vm | None = None
    ok = False
    try:
        with trio.fail_after(timeout):
            spawned = time.monotonic()
            running = await driver.start(spec)
            vm = Vm(spec=spec, driver=driver, running=running, spawned_at=spawned)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(vm._wait_process)
                nursery.start_soon(vm._tail_console)
                if protocol:
                    nursery.start_soon(vm._agent)
                else:
                    vm.agent_done = True
                try:
                    yield vm
                finally:
                    with trio.CancelScope(shield=True):
                        if vm.exit_code is None:
                            await driver.shutdown(spec, running, timeout=5)
                        with trio.move_on_after(10):
                            await vm.wait_exit(timeout=10)
                        await running.release()  # the vsock backend outlives QEMU
                    nursery.cancel_scope.cancel()
        ok = True
    finally:
        if not ok:
            print(f"[host] FAILED; run directory kept: {run_dir}", file=sys.stderr, flush=True)
            print("[host] reproduce: " + " ".join(driver.command(spec)), file=sys.stderr)
            if vm is not None:
                print(vm.tail(), file=sys.stderr, flush=True)


# --- hand-made busybox images (no fledge, no kestrel) ---------------------------

def _modinfo_depends(ko: Path) -> list[str]:
    from elftools.elf.elffile import ELFFile

    with open(ko, "rb") as f:
        section = ELFFile(f).get_section_by_name(".modinfo")
        data = section.data() if section is not None else b""
    for item in data.split(b"\0"):
        if item.startswith(b"depends="):
            return [d for d in item[8:].decode().split(",") if d]
    return []


def module_closure(modules_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Module paths (relative to modules_dir) for ``names`` and their deps, deps first."""
    index = {p.name.split(".ko")[0].replace("-", "_"): p for p in modules_dir.rglob("*.ko")}
    order: list[str] = []

    def visit(name: str) -> None:
        path = index.get(name.replace("-", "_"))
        if path is None:
            raise FileNotFoundError(f"module {name} not in {modules_dir}")
        rel = str(path.relative_to(modules_dir))
        if rel in order:
            return
        for dep in _modinfo_depends(path):
            visit(dep)
        if rel not in order:
            order.append(rel)

    for n in names:
        visit(n)
    return order


def busybox_image(
    out: Path,
    *,
    modules_dir: Path,
    modules: tuple[str, ...],
    init: str,
    files: dict[str, bytes] | None = None,
    busybox: Path = Path("/bin/busybox"),
) -> Path:
    """An initramfs of busybox, ``modules`` (with deps, listed in /etc/modules.list
    in load order) and a shell /init; written with fledge's cpio writer."""
    from builder import cpio

    rel = module_closure(modules_dir, modules)
    entries: dict[str, cpio.Entry] = {}

    def add_dirs(path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            entries.setdefault(d, cpio.directory(d))

    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "etc", "tmp", "run"):
        add_dirs(d + "/x")
    entries["bin/busybox"] = cpio.regular("bin/busybox", 0o755, source=busybox)
    entries["init"] = cpio.regular("init", 0o755, data=init.encode())
    listing = "".join(f"/lib/modules/{r}\n" for r in rel)
    entries["etc/modules.list"] = cpio.regular("etc/modules.list", 0o644, data=listing.encode())
    for r in rel:
        name = f"lib/modules/{r}"
        add_dirs(name)
        entries[name] = cpio.regular(name, 0o644, source=modules_dir / r)
    for name, data in (files or {}).items():
        name = name.lstrip("/")
        add_dirs(name)
        entries[name] = cpio.regular(name, 0o755, data=data)
    with open(out, "wb") as f:
        cpio.write_archive(sorted(entries.values(), key=cpio.sort_key), f)
    return out


# --- fledge ---------------------------------------------------------------------

def fledge(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the fledge CLI from this checkout."""
    cmd = [sys.executable, "-m", "builder.cli", *args]
    print("$ fledge " + " ".join(args), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    print(done.stdout + done.stderr, flush=True)
    return done


def fledge_build(toml: Path, out: Path, *extra: str) -> Path:
    done = fledge("build", "-c", str(toml), "-o", str(out), *extra)
    assert done.returncode == 0, f"fledge build -c {toml} failed:\n{done.stderr}"
    return out


# --- volar, as a user runs it ------------------------------------------------------

def volar(state: Path, *args: str, timeout: float = 300,
          env: dict[str, str] | None = None,
          wrap: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``volar ARGS`` with a private state directory; never waits past ``timeout``.

    ``wrap`` goes before the command, e.g. ``("ip", "netns", "exec", NS)``.
    """
    import os

    cmd = [*wrap, sys.executable, "-m", "host.cli", *args]
    print("$ volar " + " ".join(args), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO,
                          timeout=timeout, env={**os.environ, "VOLAR_STATE_DIR": str(state),
                                                **(env or {})})
    print(done.stdout + done.stderr, flush=True)
    return done


def volar_json(state: Path, *args: str) -> Any:
    import json

    done = volar(state, *args, "--json")
    assert done.returncode == 0, f"volar {' '.join(args)}: {done.stderr}"
    return json.loads(done.stdout)
