"""The per-VM monitor: ``python -m host.monitor <state-dir> <vm-name>``.

Like podman's conmon, one detached process per VM owns the VMM process and
the agent channel: it starts the VMM through a driver, speaks kestrel's
protocol (attach, ack, stop), writes every record into the store and the
VM's final status when the VMM exits. ``volar vms stop`` reaches it through
a 0600 unix socket in the VM's run directory, served by host/monitorctl.py (or SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
import uuid
from pathlib import Path

import trio

from host import snapshot
from host.agentlink import AgentLink
from host.launch import (
    AdoptionFailed,
    adopt_vmm,
    console_tail,
    launch_spec,
    make_driver,
    own_vm,
)
from host.lifecycle import MONITOR_LOCK
from host.monitorctl import serve_control
from host.outcome import final_status
from host.serialconsole import SerialConsole
from host.state import Store, proc_start_time
from host.vmcontrol import CONTROL_SOCKET
from host.vmm import (
    Helper,
    LaunchSpec,
    Running,
    SerialConsoleDriver,
    VmmDriver,
    VmmError,
    terminate,
)
from kestrel.cmdline import CmdlineError

# Time on top of the guest's own grace for kestrel to power off and the VMM
# to exit (TCG guests are slow to sync and power down).
STOP_MARGIN_S = 10.0
# A helper and its VMM that end within this of each other ended together
# (a power-off closes the backend's socket); only a helper that dies alone
# under a running VMM is the VM's crash.
HELPER_GRACE_S = 1.0
# How long an adopted VM's kestrel has to come back: it drops its silent
# connection after KEEPALIVE_MISSES x KEEPALIVE_S (16 s), then reconnects.
ADOPT_RECONNECT_S = 60.0


class Monitor:
    def __init__(self, store: Store, name: str, *, boot_timeout: float,
                 adopt: bool = False) -> None:
        self.store = store
        self.name = name
        self.boot_timeout = boot_timeout
        self.adopting = adopt  # take over a running VMM instead of launching one
        self._lock_fd = -1
        self.vm = store.vm(name)
        # A VM with a manifest of its own (the containerd shim's) needs no plugin row.
        self.plugin = None if self.vm.manifest_json else store.plugin(self.vm.plugin)
        self.manifest_json = self.plugin.manifest_json if self.plugin else self.vm.manifest_json
        self.run_dir = Path(self.vm.run_dir)
        self.driver: VmmDriver | None = None
        self.spec: LaunchSpec | None = None
        self.running: Running | None = None
        self.link = AgentLink(store, name, last_seq=self.vm.last_seq, adopted=adopt)
        self.exited = trio.Event()
        self.exit_code: int | None = None
        self.stop_requested = False
        self.stop_forced = ""
        self.helper_failed = ""  # a helper (the vsock backend) died under a live VMM
        self.agent = self.vm.agent  # "none": no hello to wait for, ever
        self.console: SerialConsole | None = None
        # A snapshot swaps the vsock backend under this lock (_watch_helpers waits on it).
        self.snapshot_lock = trio.Lock()
        if self.vm.snapshot and not adopt:
            # Restored: every attach tells kestrel so, with this VM's identity.
            # (An adopted VM was restored long ago: kestrel acted on it then.)
            self.link.session.restore_id = f"{name}-{uuid.uuid4().hex[:12]}"
            self.link.session.hostname = name

    async def run(self) -> None:
        store, name = self.store, self.name
        self._lock_fd = own_vm(self.run_dir / MONITOR_LOCK)
        if self._lock_fd < 0:
            print(f"monitor: another monitor owns {name}; leaving it alone", flush=True)
            return
        store.update_vm(name, monitor_pid=os.getpid(), monitor_start=proc_start_time(os.getpid()))
        try:
            self.driver = make_driver(self.vm.vmm, channel=self.vm.channel,
                                      guest_cid=self.vm.guest_cid, machine=self.vm.machine)
            self.spec = spec = launch_spec(self.vm, self.manifest_json, self.driver)
            command = shlex.join(self.driver.command(spec))
        except (VmmError, CmdlineError, OSError) as exc:
            if self.adopting:
                self._give_up(f"cannot rebuild its launch spec: {exc}")
                return
            store.set_status(name, "failed", f"cannot launch: {exc}", fatal=str(exc))
            return
        launched = 0.0
        if self.adopting:
            adopted = await self._adopt(self.driver, spec)
            if adopted is None:
                return
            self.running = running = adopted
        else:
            store.update_vm(name, cmdline=spec.cmdline, vmm_command=command)
            print(f"monitor: {command}", flush=True)
            store.set_status(name, "starting", f"launching {self.driver.name}")
            launched = time.time()
            try:
                if self.vm.snapshot:
                    self.running = running = await snapshot.restore(self.driver, spec,
                                                                    Path(self.vm.snapshot))
                else:
                    self.running = running = await self.driver.start(spec)
            except (VmmError, OSError) as exc:
                log = spec.run_dir / "console.log"
                tail = console_tail(log)
                store.set_status(
                    name, "failed", f"{self.driver.name} did not start: {exc}",
                    fatal=str(exc) + (f"\n{tail}" if tail else ""),
                )
                return
            pid = running.process.pid
            backend = running.helpers[0].process.pid if running.helpers else 0
            store.update_vm(
                name,
                vmm_pid=pid,
                vmm_start=proc_start_time(pid),
                backend_pid=backend,
                backend_start=proc_start_time(backend) if backend else 0,
                address=running.address,
                console_log=str(running.console_log),
            )
        self.link.launched_at = launched
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._wait_vmm, nursery.cancel_scope)
            nursery.start_soon(self._watch_helpers, running)
            if spec.console_socket is not None:
                self.console = SerialConsole(self.run_dir, running.console_log)
                nursery.start_soon(self._serve_console, spec, running)
            if self.agent == "none":
                # Nothing inside will ever say hello: the VMM being up is all there is.
                self.link.drained.set()
                store.set_status(name, "running", f"{self.driver.name} up; agent: none "
                                 "(the image has no kestrel)")
            else:
                nursery.start_soon(self.link.run, self.driver, spec, running, self.exited)
                if self.vm.status in ("pending", "starting"):
                    nursery.start_soon(self._boot_deadline)
                elif self.adopting:
                    nursery.start_soon(self._reconnect_watch)
            nursery.start_soon(serve_control, self)
            nursery.start_soon(self._signals, nursery)
            if self.adopting and self.vm.status == "stopping":
                # The stop the dead monitor was carrying out goes on.
                nursery.start_soon(self.stop, float(self.vm.stop_grace))
        with trio.CancelScope(shield=True):
            await running.release()
        self._finish()

    # --- adoption ---------------------------------------------------------

    async def _adopt(self, driver: VmmDriver, spec: LaunchSpec) -> Running | None:
        """Take over the VMM a dead monitor left running; None when it cannot be."""
        try:
            running = await adopt_vmm(self.vm, driver, spec)
        except AdoptionFailed as exc:
            self._give_up(str(exc))
            return None
        self.store.add_event(self.name, "monitor", "adopted", f"monitor {os.getpid()} adopted "
                             f"{driver.name} pid {running.process.pid}")
        return running

    async def _reconnect_watch(self) -> None:
        with trio.move_on_after(ADOPT_RECONNECT_S):
            await self.link.hello_seen.wait()
            return
        self.store.add_event(self.name, "agent", "absent", "kestrel has not come back within "
                             f"{ADOPT_RECONNECT_S:g} s of the adoption")

    def _give_up(self, why: str) -> None:
        """Adoption failed: the VM is crashed, and the reason names what was missing."""
        self.store.set_status(self.name, "crashed", f"its monitor died and {why}",
                              vmm_pid=0, backend_pid=0)

    async def _watch_helpers(self, running: Running) -> None:
        """A helper that dies under a live VMM crashes the VM: kestrel's channel is gone.

        One a snapshot replaced (its frontend was unplugged) is not a crash:
        the snapshot holds the lock while it swaps, and the new one is watched.
        """
        while running.helpers:
            helper = running.helpers[0]
            await helper.process.wait()
            async with self.snapshot_lock:
                if helper not in running.helpers:
                    continue
            await self._helper_died(helper)
            return

    async def _helper_died(self, helper: Helper) -> None:
        if self.exited.is_set() or self.stop_requested:
            return
        self.helper_failed = helper.failure()
        with trio.move_on_after(HELPER_GRACE_S):
            await self.exited.wait()  # ended together: _finish decides from the VMM's exit
            return
        self.store.add_event(self.name, "helper", helper.name, self.helper_failed)
        await self._kill_vmm()

    async def _wait_vmm(self, scope: trio.CancelScope) -> None:
        assert self.running is not None
        code = await self.running.process.wait()
        # An adopted VMM is not our child: its status is not ours to read.
        self.exit_code = code if getattr(self.running.process, "status_known", True) else None
        self.exited.set()
        # Give the agent link and the console a moment to drain what the guest wrote last.
        with trio.move_on_after(2.0):
            await self.link.drained.wait()
            if self.console is not None:
                await self.console.done.wait()
        scope.cancel()

    async def _serve_console(self, spec: LaunchSpec, running: Running) -> None:
        assert self.console is not None and isinstance(self.driver, SerialConsoleDriver)
        driver = self.driver
        try:
            await self.console.run(lambda: driver.open_console_stream(spec, running))
        except (VmmError, OSError) as exc:
            # The VM runs on without an interactive console; say so once.
            print(f"monitor: serial console: {exc}", flush=True)
            self.store.add_event(self.name, "console", "unavailable", str(exc))

    async def _boot_deadline(self) -> None:
        with trio.move_on_after(self.boot_timeout):
            await self.link.hello_seen.wait()
            return
        if self.exited.is_set() or self.stop_requested:
            return
        self.stop_forced = f"no hello from kestrel within {self.boot_timeout:g} s"
        self.store.add_event(self.name, "timeout", "boot", self.stop_forced)
        await self._kill_vmm()

    # --- stop ---------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        if self.stop_requested or self.exited.is_set():
            await self.exited.wait()
            return
        self.stop_requested = True
        self.store.set_status(self.name, "stopping", f"stop requested (grace {grace:g} s)")
        if self.adopting and self.agent != "none" and not self.link.hello_seen.is_set():
            # Right after an adoption kestrel is still finding its way back:
            # a stop it can carry out loses nothing, a kill would.
            with trio.move_on_after(ADOPT_RECONNECT_S):
                await self.link.hello_seen.wait()
        if self.agent == "none":
            await self._power_button(grace)
        elif await self.link.send_stop(grace):
            with trio.move_on_after(grace + STOP_MARGIN_S):
                await self.exited.wait()
                return
            self.stop_forced = f"guest did not power off within {grace + STOP_MARGIN_S:g} s"
        await self._kill_vmm()

    async def _power_button(self, grace: float) -> None:
        """No agent to ask: press the ACPI power button and give the guest the grace.

        Only a guest that handles the button powers off (the kernel's button
        driver plus an init that reacts); any other is killed after the grace.
        """
        assert self.driver is not None and self.spec is not None and self.running is not None
        if not isinstance(self.driver, SerialConsoleDriver):
            self.stop_forced = f"{self.driver.name} has no power button"
            return
        try:
            await self.driver.powerdown(self.spec, self.running)
        except (VmmError, OSError) as exc:
            self.stop_forced = f"power button failed ({exc})"
            return
        with trio.move_on_after(grace):
            await self.exited.wait()
            return
        self.stop_forced = (f"the guest did not power off within {grace:g} s of the ACPI "
                            "power button; killed it")

    async def _kill_vmm(self) -> None:
        """The VMM's own shutdown, then SIGTERM, then SIGKILL."""
        assert self.driver is not None and self.spec is not None and self.running is not None
        try:
            with trio.move_on_after(10):
                await self.driver.shutdown(self.spec, self.running, timeout=5.0)
        except (VmmError, OSError) as exc:
            print(f"monitor: {self.driver.name} shutdown: {exc}", flush=True)
        if not self.exited.is_set():
            try:
                await terminate(self.running.process, grace=5.0, what=self.driver.name)
            except VmmError as exc:
                print(f"monitor: {exc}", flush=True)

    async def _signals(self, nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.start_soon(self.stop, float(self.vm.stop_grace))

    # --- the end ------------------------------------------------------------

    def _finish(self) -> None:
        (self.run_dir / CONTROL_SOCKET).unlink(missing_ok=True)
        link = self.link
        status, detail = final_status(
            code=self.exit_code, poweroff=link.poweroff, exit_seen=link.exit_seen,
            fatal=link.fatal, helper_failed=self.helper_failed,
            stop_requested=self.stop_requested, stop_forced=self.stop_forced, agent=self.agent,
            console_log=self.running.console_log if self.running is not None else None)
        self.store.set_status(self.name, status, detail, vmm_pid=0, backend_pid=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m host.monitor")
    p.add_argument("state_dir", type=Path)
    p.add_argument("name")
    p.add_argument("--boot-timeout", type=float, default=300.0)
    p.add_argument("--adopt", action="store_true",
                   help="take over the running VMM of a monitor that died")
    args = p.parse_args(argv)
    store = Store(args.state_dir)
    monitor = Monitor(store, args.name, boot_timeout=args.boot_timeout, adopt=args.adopt)
    try:
        trio.run(monitor.run)
    except BaseException as exc:
        # A monitor bug must still leave a truthful status behind.
        store.set_status(args.name, "crashed", f"monitor error: {type(exc).__name__}: {exc}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
