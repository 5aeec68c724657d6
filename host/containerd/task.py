"""The shim's task service: one container, one kestrel microVM.

Create checks config.json and the rootfs and builds (or finds) the rootfs
image; Start boots the VM through volar's own lifecycle (its store, its
per-VM monitor, its VMM drivers) and relays the workload's log records to
containerd's stdio; the exit kestrel reports ends Wait. Kill and Exec go
through the monitor's control socket, so kestrel does the signalling and
the exec sessions. Pause/Resume stop and continue the vCPUs over QMP.

A container whose process needs a terminal, stdin or a non-root user runs
it as a kestrel exec session instead (kestrel's workload spawn has none of
these; its exec sessions have all, with resize, signals and exit status):
the VM's workload is an idle placeholder, the session IS the container's
process (its exit is Wait's, Kill signals it), and its end stops the VM.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from google.protobuf import empty_pb2

from host.adopt import reconcile
from host.containerd import events, ttrpc
from host.containerd.config import RECORD, ShimConfig, vm_name
from host.containerd.process import Exec, Process
from host.containerd.proto import events_task_pb2 as ev
from host.containerd.proto import mount_pb2
from host.containerd.proto import shim_pb2 as pb
from host.containerd.proto import types_task_pb2 as types
from host.containerd.rootfs import (
    MountSpec,
    RootfsError,
)
from host.containerd.server import RpcError
from host.containerd.spec import (
    ContainerSpec,
    SpecError,
    parse_config,
    parse_process,
)
from host.containerd.stdio import Sink, StdioError, open_writer
from host.containerd.vm import cleanup_vm, control, manifest_for, prepare_rootfs, reap
from host.errors import VolarError
from host.lifecycle import launch_with_manifest
from host.state import TERMINAL, Store
from host.vmcontrol import CONTROL_SOCKET, UP
from kestrel.manifest import ManifestError

SERVICE = "containerd.task.v2.Task"
POLL_S = 0.05
VERSION = "kestrel-shim 0.1"
# kestrel's exit status for "the VM ended without reporting one".
LOST_STATUS = 255
# How long the VM's end waits for the session's own exit report (session mode).
SESSION_GRACE_S = 5.0


class TaskService:
    def __init__(self, *, cfg: ShimConfig, namespace: str, container_id: str, bundle: Path,
                 publisher: events.Publisher, say: Callable[[str], None],
                 shutdown: trio.Event) -> None:
        self.cfg, self.ns, self.id, self.bundle = cfg, namespace, container_id, bundle
        self.events, self.say, self.shutdown_event = publisher, say, shutdown
        self.vm = vm_name(namespace, container_id)
        self.store = Store(cfg.state_dir)
        self.init: Process | None = None
        self.execs: dict[str, Exec] = {}
        self.spec: ContainerSpec | None = None
        self.image: Path | None = None
        self.cached = False
        self.exit_published = False
        self.nursery: trio.Nursery | None = None  # set by run(): owns the watchers

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # --- ttRPC plumbing -------------------------------------------------------

    def methods(self) -> dict[str, Callable[[bytes], Any]]:
        table: dict[str, tuple[Any, Callable[[Any], Any]]] = {
            "State": (pb.StateRequest, self.state),
            "Create": (pb.CreateTaskRequest, self.create),
            "Start": (pb.StartRequest, self.start),
            "Delete": (pb.DeleteRequest, self.delete),
            "Pids": (pb.PidsRequest, self.pids),
            "Pause": (pb.PauseRequest, self.pause),
            "Resume": (pb.ResumeRequest, self.resume),
            "Checkpoint": (pb.CheckpointTaskRequest, self.checkpoint),
            "Kill": (pb.KillRequest, self.kill),
            "Exec": (pb.ExecProcessRequest, self.exec),
            "ResizePty": (pb.ResizePtyRequest, self.resize_pty),
            "CloseIO": (pb.CloseIORequest, self.close_io),
            "Update": (pb.UpdateTaskRequest, self.update),
            "Wait": (pb.WaitRequest, self.wait),
            "Stats": (pb.StatsRequest, self.stats),
            "Connect": (pb.ConnectRequest, self.connect),
            "Shutdown": (pb.ShutdownRequest, self.shutdown),
        }

        def bind(request_type: Any, handler: Callable[[Any], Any]) -> Callable[[bytes], Any]:
            async def method(payload: bytes) -> bytes:
                reply = await handler(request_type.FromString(payload))
                return bytes(reply.SerializeToString())
            return method

        return {f"{SERVICE}/{name}": bind(t, h) for name, (t, h) in table.items()}

    def _process(self, exec_id: str) -> Process:
        if exec_id:
            if exec_id not in self.execs:
                raise RpcError(ttrpc.NOT_FOUND, f"exec {exec_id} of {self.id}: no such process")
            return self.execs[exec_id]
        if self.init is None:
            raise RpcError(ttrpc.NOT_FOUND, f"task {self.id}: not created")
        return self.init

    # --- create / start -------------------------------------------------------

    async def create(self, req: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
        if self.init is not None:
            raise RpcError(ttrpc.ALREADY_EXISTS, f"task {self.id} already exists")
        try:
            spec = parse_config(json.loads((self.bundle / "config.json").read_text()))
        except (OSError, ValueError) as exc:  # SpecError is a ValueError
            code = ttrpc.INVALID_ARGUMENT if isinstance(exc, SpecError) else ttrpc.NOT_FOUND
            raise RpcError(code, f"kestrel: {self.bundle / 'config.json'}: {exc}") from None
        mounts = [MountSpec(m.type, m.source, tuple(m.options)) for m in req.rootfs]
        try:
            self.image, self.cached = await prepare_rootfs(
                bundle=self.bundle, images=self.cfg.images, vm=self.vm, spec=spec,
                mounts=mounts, say=self.say)
        except (RootfsError, SpecError, OSError) as exc:
            raise RpcError(ttrpc.FAILED_PRECONDITION, f"kestrel: {exc}") from None
        self.spec = spec
        terminal = req.terminal or spec.process.terminal
        if terminal or req.stdin or spec.process.uid or spec.process.gid:
            self.init = Exec(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                             terminal=terminal, spec=spec.process)
        else:
            self.init = Process(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr)
        (self.bundle / RECORD).write_text(json.dumps({
            "vm": self.vm, "state_dir": str(self.cfg.state_dir),
            "image": str(self.image), "cached": self.cached}))
        self.events.publish(events.TASK_CREATE, ev.TaskCreate(
            container_id=self.id, bundle=str(self.bundle),
            rootfs=[mount_pb2.Mount(type=m.type, source=m.source, options=m.options)
                    for m in mounts],
            io=ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr),
            checkpoint=req.checkpoint, pid=0))
        return pb.CreateTaskResponse(pid=0)

    async def start(self, req: pb.StartRequest) -> pb.StartResponse:
        proc = self._process(req.exec_id)
        if proc.status != types.CREATED:
            raise RpcError(ttrpc.FAILED_PRECONDITION, f"task {self.id} was already started")
        if req.exec_id:
            assert isinstance(proc, Exec)
            return await self._start_exec(req.exec_id, proc)
        assert self.spec is not None and self.image is not None and self.nursery is not None
        spec = self.spec
        session = isinstance(proc, Exec)
        try:
            manifest = manifest_for(spec, initramfs=self.cfg.initramfs, image=self.image,
                                    idle=session)
            # In session mode the session writes the stdio; the idle VM has no output.
            out = Sink(None if session else await open_writer(proc.stdout))
            err = Sink(None if session else await open_writer(proc.stderr))
            monitor = launch_with_manifest(
                self.store, self.vm, manifest_json=manifest, initramfs=self.cfg.initramfs,
                cpus=spec.cpus or self.cfg.cpus, memory_mb=spec.memory_mb or self.cfg.memory_mb,
                scratch_disks=(self.image,),
                cmdline_extra={"volant.rootfs_device": "vda", "volant.rootfs_fstype": "ext4",
                               "kestrel.hostname": spec.hostname or self.id},
                boot_timeout=self.cfg.boot_timeout)
        except (ManifestError, StdioError, VolarError, OSError) as exc:
            raise RpcError(ttrpc.FAILED_PRECONDITION, f"kestrel: {exc}") from None
        self.nursery.start_soon(reap, monitor)
        self.nursery.start_soon(out.run)
        self.nursery.start_soon(err.run)
        booted = trio.Event()
        self.nursery.start_soon(self._watch, proc, out, err, booted)
        await booted.wait()
        vmm_pid = self.store.vm(self.vm).vmm_pid or monitor.pid
        if isinstance(proc, Exec) and self.store.vm(self.vm).status in UP:
            started = trio.Event()
            self.nursery.start_soon(self._run_init_session, proc, started)
            await started.wait()
            if proc.error:
                await self._stop_idle()
                raise RpcError(ttrpc.FAILED_PRECONDITION, f"kestrel: {self.id}: {proc.error}")
        proc.pid = vmm_pid  # the task's pid is the VM's, session or not
        if not proc.exited.is_set():
            proc.status = types.RUNNING
        self.events.publish(events.TASK_START, ev.TaskStart(container_id=self.id, pid=proc.pid))
        return pb.StartResponse(pid=proc.pid)

    async def _watch(self, proc: Process, out: Sink, err: Sink, booted: trio.Event) -> None:
        """Relay log records to stdio until the VM ends; then the exit, after the last byte."""
        seq, oom_seen = 0, 0
        deadline = trio.current_time() + self.cfg.boot_timeout + 15
        while True:
            seq = self._relay(seq, out, err)
            reconcile(self.store, [self.vm])  # a monitor that died leaves no final status
            vm = self.store.vm(self.vm)
            if not booted.is_set() and (vm.status in UP or vm.status in TERMINAL
                                        or trio.current_time() > deadline):
                if vm.vmm_pid:
                    proc.pid = vm.vmm_pid
                booted.set()
            ooms = [e for e in self.store.events(self.vm) if e.kind == "oom"]
            for _ in ooms[oom_seen:]:
                self.events.publish(events.TASK_OOM, ev.TaskOOM(container_id=self.id))
            oom_seen = len(ooms)
            if vm.status in TERMINAL:
                break
            await trio.sleep(POLL_S)
        self._relay(seq, out, err)
        if isinstance(proc, Exec):
            # The idle workload's status is not the container's: the session's is.
            with trio.move_on_after(SESSION_GRACE_S):
                await proc.exited.wait()
            booted.set()
            if proc.finish(LOST_STATUS):
                self.say(f"VM {self.vm} {vm.status} before its session reported an exit: "
                         f"{vm.fatal or vm.detail or vm.status}")
                self._publish_exit(proc)
            return
        if vm.exit_json:
            status = int(json.loads(vm.exit_json)["status"])
        else:
            status = LOST_STATUS
            why = (vm.fatal or vm.detail or vm.status).replace("\n", "\n  ")
            err.write(f"kestrel: VM {self.vm} {vm.status}: {why}\n".encode())
            self.say(f"VM {self.vm} {vm.status} without an exit report: {why}")
        out.close()
        err.close()
        await out.done.wait()
        await err.done.wait()
        proc.finish(status)
        booted.set()
        self._publish_exit(proc)

    def _publish_exit(self, proc: Process) -> None:
        if not self.exit_published:
            self.exit_published = True
            self.events.publish(events.TASK_EXIT, ev.TaskExit(
                container_id=self.id, id=self.id, pid=proc.pid, exit_status=proc.exit_status,
                exited_at=proc.exited_at))

    async def _run_init_session(self, proc: Exec, started: trio.Event) -> None:
        """The container's process as an exec session; its end ends the VM."""
        await proc.run(Path(self.store.vm(self.vm).run_dir) / CONTROL_SOCKET, started, self.say)
        proc.pid = self.store.vm(self.vm).vmm_pid or proc.pid
        self._publish_exit(proc)
        await self._stop_idle()

    async def _stop_idle(self) -> None:
        """End the idle workload, so kestrel powers the VM off (as a batch run's end does)."""
        reply = await control(Path(self.store.vm(self.vm).run_dir), "signal 9")
        if reply != "ok":
            self.say(f"VM {self.vm}: stopping the idle workload: {reply}")

    def _relay(self, seq: int, out: Sink, err: Sink) -> int:
        """Log records after ``seq`` to stdout/stderr; the last seq relayed."""
        last = seq
        for last, stream, data, _ in list(self.store.logs(self.vm, after_seq=seq)):  # noqa: B007
            (err if stream == "stderr" else out).write(data)
        return last

    # --- signals, waits, state --------------------------------------------------

    async def kill(self, req: pb.KillRequest) -> empty_pb2.Empty:
        proc = self._process(req.exec_id)
        if proc.exited.is_set():
            raise RpcError(ttrpc.NOT_FOUND, f"task {self.id}: process already finished")
        if isinstance(proc, Exec) and (req.exec_id or proc.session is not None):
            if proc.session is None:
                raise RpcError(ttrpc.FAILED_PRECONDITION, f"exec {req.exec_id} is not running")
            await proc.session.signal(req.signal)
            return empty_pb2.Empty()
        if proc.status == types.CREATED:
            proc.finish(128 + req.signal)  # never started: it ends here, as runc's would
            self.events.publish(events.TASK_EXIT, ev.TaskExit(
                container_id=self.id, id=self.id, pid=0, exit_status=proc.exit_status,
                exited_at=proc.exited_at))
            return empty_pb2.Empty()
        reply = await control(Path(self.store.vm(self.vm).run_dir), f"signal {req.signal}")
        if reply != "ok":
            if proc.exited.is_set():
                raise RpcError(ttrpc.NOT_FOUND, f"task {self.id}: process already finished")
            raise RpcError(ttrpc.UNAVAILABLE, f"kestrel: signal {req.signal} to {self.id}: "
                           f"{reply.removeprefix('error ')}")
        return empty_pb2.Empty()

    async def wait(self, req: pb.WaitRequest) -> pb.WaitResponse:
        proc = self._process(req.exec_id)
        await proc.exited.wait()
        return pb.WaitResponse(exit_status=proc.exit_status, exited_at=proc.exited_at)

    async def state(self, req: pb.StateRequest) -> pb.StateResponse:
        proc = self._process(req.exec_id)
        return pb.StateResponse(
            id=self.id, bundle=str(self.bundle), pid=proc.pid, status=proc.status,  # type: ignore[arg-type]
            stdin=proc.stdin, stdout=proc.stdout, stderr=proc.stderr, terminal=proc.terminal,
            exit_status=proc.exit_status, exited_at=proc.exited_at, exec_id=req.exec_id)

    async def pids(self, req: pb.PidsRequest) -> pb.PidsResponse:
        proc = self._process("")
        if proc.status in (types.CREATED, types.STOPPED):
            return pb.PidsResponse()
        return pb.PidsResponse(processes=[types.ProcessInfo(pid=proc.pid)])

    async def connect(self, req: pb.ConnectRequest) -> pb.ConnectResponse:
        pid = self.init.pid if self.init else 0
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=pid, version=VERSION)

    # --- the end ------------------------------------------------------------------

    async def delete(self, req: pb.DeleteRequest) -> pb.DeleteResponse:
        proc = self._process(req.exec_id)
        if proc.status in (types.RUNNING, types.PAUSED) and not proc.exited.is_set():
            raise RpcError(ttrpc.FAILED_PRECONDITION,
                           f"task {self.id} is still running; kill it first")
        if req.exec_id:
            del self.execs[req.exec_id]
            return pb.DeleteResponse(pid=proc.pid, exit_status=proc.exit_status,
                                     exited_at=proc.exited_at)
        await self.cleanup()
        self.events.publish(events.TASK_DELETE, ev.TaskDelete(
            container_id=self.id, pid=proc.pid, exit_status=proc.exit_status,
            exited_at=proc.exited_at, id=self.id))
        return pb.DeleteResponse(pid=proc.pid, exit_status=proc.exit_status,
                                 exited_at=proc.exited_at)

    async def cleanup(self) -> None:
        """The VM (stopped if need be), its row and run directory, an uncached image."""
        await trio.to_thread.run_sync(cleanup_vm, self.cfg.state_dir, self.vm,
                                      self.image if not self.cached else None)

    async def shutdown(self, req: pb.ShutdownRequest) -> empty_pb2.Empty:
        if self.init is not None and self.init.status in (types.RUNNING, types.PAUSED) and (
                not self.init.exited.is_set()) and not req.now:
            return empty_pb2.Empty()  # still running: containerd asks again after Delete
        self.shutdown_event.set()
        return empty_pb2.Empty()

    # --- the rest ---------------------------------------------------------------

    async def pause(self, req: pb.PauseRequest) -> empty_pb2.Empty:
        await self._qmp("stop", types.PAUSED, events.TASK_PAUSED,
                        ev.TaskPaused(container_id=self.id))
        return empty_pb2.Empty()

    async def resume(self, req: pb.ResumeRequest) -> empty_pb2.Empty:
        await self._qmp("cont", types.RUNNING, events.TASK_RESUMED,
                        ev.TaskResumed(container_id=self.id))
        return empty_pb2.Empty()

    async def _qmp(self, command: str, status: int, topic: str, event: Any) -> None:
        from host.qmp import QmpClient, QmpError

        proc = self._process("")
        if proc.exited.is_set() or proc.status == types.CREATED:
            raise RpcError(ttrpc.FAILED_PRECONDITION, f"task {self.id} is not running")
        path = Path(self.store.vm(self.vm).run_dir) / "qmp.sock"
        try:
            async with await QmpClient.connect(path, timeout=5.0) as qmp:
                await qmp.execute(command)
        except (QmpError, OSError) as exc:
            raise RpcError(ttrpc.UNAVAILABLE, f"kestrel: QMP {command}: {exc}") from None
        proc.status = status
        self.events.publish(topic, event)

    async def checkpoint(self, req: pb.CheckpointTaskRequest) -> empty_pb2.Empty:
        raise RpcError(ttrpc.UNIMPLEMENTED, "kestrel: checkpoint is not supported")

    async def update(self, req: pb.UpdateTaskRequest) -> empty_pb2.Empty:
        raise RpcError(ttrpc.UNIMPLEMENTED,
                       "kestrel: update is not supported: a VM's memory and CPUs are fixed at "
                       "start (recreate the container with new limits)")

    async def stats(self, req: pb.StatsRequest) -> pb.StatsResponse:
        raise RpcError(ttrpc.UNIMPLEMENTED, "kestrel: stats are not supported yet")

    # --- exec: kestrel's exec sessions through the monitor ------------------------

    async def exec(self, req: pb.ExecProcessRequest) -> empty_pb2.Empty:
        init = self._process("")
        if init.status != types.RUNNING or init.exited.is_set():
            raise RpcError(ttrpc.FAILED_PRECONDITION, f"task {self.id} is not running")
        if req.exec_id in self.execs:
            raise RpcError(ttrpc.ALREADY_EXISTS, f"exec {req.exec_id} already exists")
        try:
            spec = parse_process(json.loads(req.spec.value), where="exec process")
        except ValueError as exc:  # SpecError, JSONDecodeError
            raise RpcError(ttrpc.INVALID_ARGUMENT, f"kestrel: {exc}") from None
        self.execs[req.exec_id] = Exec(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                                       terminal=req.terminal, spec=spec)
        self.events.publish(events.TASK_EXEC_ADDED, ev.TaskExecAdded(
            container_id=self.id, exec_id=req.exec_id))
        return empty_pb2.Empty()

    async def _start_exec(self, exec_id: str, proc: Exec) -> pb.StartResponse:
        assert self.nursery is not None
        started = trio.Event()
        self.nursery.start_soon(self._run_exec, exec_id, proc, started)
        await started.wait()
        if proc.error:
            raise RpcError(ttrpc.FAILED_PRECONDITION, f"kestrel: exec {exec_id}: {proc.error}")
        self.events.publish(events.TASK_EXEC_STARTED, ev.TaskExecStarted(
            container_id=self.id, exec_id=exec_id, pid=proc.pid))
        return pb.StartResponse(pid=proc.pid)

    async def _run_exec(self, exec_id: str, proc: Exec, started: trio.Event) -> None:
        await proc.run(Path(self.store.vm(self.vm).run_dir) / CONTROL_SOCKET, started, self.say)
        self.events.publish(events.TASK_EXIT, ev.TaskExit(
            container_id=self.id, id=exec_id, pid=proc.pid, exit_status=proc.exit_status,
            exited_at=proc.exited_at))

    async def resize_pty(self, req: pb.ResizePtyRequest) -> empty_pb2.Empty:
        proc = self._process(req.exec_id)
        if isinstance(proc, Exec) and proc.session is not None and proc.terminal:
            await proc.session.resize(req.height, req.width)
        return empty_pb2.Empty()  # no terminal: nothing to size

    async def close_io(self, req: pb.CloseIORequest) -> empty_pb2.Empty:
        # A session's stdin ends when containerd closes the FIFO (it does, then calls
        # this); a container's process without stdin reads /dev/null in the guest.
        self._process(req.exec_id)
        return empty_pb2.Empty()


