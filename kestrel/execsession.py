"""Exec sessions in the guest: processes the host started, next to the workload.

Each session is a process in its own session (setsid) and process group,
with a controlling terminal (a pty) when asked, else three pipes. It is
never the workload: the supervisor waits only for the workload's pid, and
the reaper (still the one owner of wait) hands each session its own status.
Sessions belong to the host connection that opened them: when it ends they
get SIGHUP (and SIGCONT, so a stopped one sees it) and SIGKILL after a grace.

Nothing here is imported before the workload is spawned (agent.py imports
it), and sessions start with fork + exec rather than posix_spawn, which has
no setuid, setgid or controlling-terminal step.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import termios

import trio

from kestrel.console import console
from kestrel.execproto import (
    EXEC_WINDOW,
    MAX_EXEC_CHUNK,
    ExecAbort,
    ExecClose,
    ExecCredit,
    ExecData,
    ExecExit,
    ExecOpen,
    ExecResize,
    ExecSignal,
    ExecStarted,
    ReceiveWindow,
    SendWindow,
    check_open,
)
from kestrel.outbox import Outbox
from kestrel.protocol import Message
from kestrel.reaper import Reaper
from kestrel.spawn import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, resolve

HANGUP_GRACE_S = 5.0
COALESCE_BELOW = 16 * 1024
COALESCE_S = 0.005
DRAIN_S = 2.0  # a background child holding the output must not hold the exit status
_ERR = struct.Struct("=ii")  # (stage, errno) from the child when exec fails
_STAGES = ("exec", "cwd", "credentials", "terminal")


class StartError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Session:
    def __init__(self, sid: int, pid: int, tty: bool,
                 outputs: list[tuple[str, trio.lowlevel.FdStream]],
                 stdin: trio.lowlevel.FdStream | None) -> None:
        self.id, self.pid, self.tty = sid, pid, tty
        self.outputs = outputs
        self.stdin = stdin
        self.send = SendWindow()
        self.credit_came = trio.Event()
        self.received = ReceiveWindow()
        self.pending = bytearray()  # stdin not yet written to the process
        self.stdin_eof = False
        self.stdin_came = trio.Event()
        self.hung_up = False

    def kill(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)  # setsid: the pid is the group
        except ProcessLookupError:
            pass


def _child(msg: ExecOpen, path: str, env: dict[str, str], fds: tuple[int, int, int],
           err_w: int) -> None:
    """In the forked child: never returns (exec or _exit)."""
    stage = 3
    try:
        os.setsid()
        if msg.tty:
            fcntl.ioctl(fds[0], termios.TIOCSCTTY, 0)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        stage = 2
        if msg.uid or msg.gid:
            os.setgroups([msg.gid])
            os.setgid(msg.gid)
            os.setuid(msg.uid)
        stage = 1
        os.chdir(msg.cwd)
        stage = 0
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        for s in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; exec keeps that
            signal.signal(s, signal.SIG_DFL)
        os.execve(path, msg.argv, env)
    except OSError as exc:
        os.write(err_w, _ERR.pack(stage, exc.errno or 0))
    except BaseException:
        os.write(err_w, _ERR.pack(stage, errno.EINVAL))
    finally:
        os._exit(EXIT_NOT_EXECUTABLE)


def start(msg: ExecOpen, base_env: dict[str, str]) -> tuple[int, list[int]]:
    """Fork and exec; return the pid and kestrel's fds: [stdin, stdout, stderr] or [pty]."""
    env = dict(base_env)
    env.update(dict(e.split("=", 1) for e in msg.env))
    if msg.tty:
        env.setdefault("TERM", "xterm")
    path = resolve(msg.argv[0], env.get("PATH", "/usr/bin:/bin"))
    if "/" not in path:
        raise StartError(EXIT_NOT_FOUND, f"{msg.argv[0]}: not found in PATH")
    if msg.tty:
        master, slave = os.openpty()
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", msg.rows, msg.cols, 0, 0))
        parent, child = [master], [slave]
        fds = (slave, slave, slave)
    else:
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        parent, child = [in_w, out_r, err_r], [in_r, out_w, err_w]
        fds = (in_r, out_w, err_w)
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        _child(msg, path, env, fds, report_w)
    os.close(report_w)
    for fd in child:
        os.close(fd)
    try:
        # EOF when exec succeeded (the pipe is close-on-exec); a report when not.
        report = os.read(report_r, _ERR.size)
    finally:
        os.close(report_r)
    if report:
        for fd in parent:
            os.close(fd)
        stage, err = _ERR.unpack(report)
        what = {0: path, 1: f"cwd {msg.cwd}", 2: f"uid/gid {msg.uid}/{msg.gid}",
                3: "controlling terminal"}[stage]
        status = EXIT_NOT_FOUND if stage == 0 and err == errno.ENOENT else EXIT_NOT_EXECUTABLE
        raise StartError(status, f"{what}: {os.strerror(err)}")
    return pid, parent


class ExecSessions:
    """Every session of the current host connection, by id."""

    def __init__(self, outbox: Outbox, reaper: Reaper, env: dict[str, str]) -> None:
        self.outbox = outbox
        self.reaper = reaper
        self.env = env
        self.sessions: dict[int, Session] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # --- host commands --------------------------------------------------------

    def handle(self, cmd: Message) -> None:
        if isinstance(cmd, ExecOpen):
            self._open(cmd)
            return
        sid: int = getattr(cmd, "id", 0)
        s = self.sessions.get(sid)
        if s is None:
            console(f"exec: {cmd.TYPE} for unknown session {sid} ignored")
        elif isinstance(cmd, ExecData):
            self._stdin(s, cmd.data)
        elif isinstance(cmd, ExecCredit):
            s.send.grant(cmd.bytes)
            s.credit_came.set()
        elif isinstance(cmd, ExecResize):
            if s.tty and 0 < cmd.rows < 2**16 and 0 < cmd.cols < 2**16:
                size = struct.pack("HHHH", cmd.rows, cmd.cols, 0, 0)
                try:
                    fcntl.ioctl(s.outputs[0][1].fileno(), termios.TIOCSWINSZ, size)
                except (OSError, trio.ClosedResourceError):
                    pass
        elif isinstance(cmd, ExecSignal):
            if 0 < cmd.signum < signal.NSIG:
                s.kill(cmd.signum)
        elif isinstance(cmd, ExecClose):
            self._hangup(s)

    def hangup_all(self) -> None:
        """The host connection ended: every session of it is hung up."""
        for s in list(self.sessions.values()):
            self._hangup(s)

    def _hangup(self, s: Session) -> None:
        if s.hung_up or self._nursery is None:
            return
        s.hung_up = True
        s.kill(signal.SIGHUP)
        s.kill(signal.SIGCONT)
        self._nursery.start_soon(self._kill_later, s)

    async def _kill_later(self, s: Session) -> None:
        await trio.sleep(HANGUP_GRACE_S)
        if self.sessions.get(s.id) is s:
            s.kill(signal.SIGKILL)

    def _open(self, msg: ExecOpen) -> None:
        problem = check_open(msg)
        if not problem and msg.id in self.sessions:
            problem = f"session id {msg.id} is in use"
        if problem or self._nursery is None:
            console(f"exec: bad request: {problem}")
            self.outbox.emit(ExecAbort(id=msg.id, message=f"exec: {problem}"))
            return
        try:
            pid, parent = start(msg, self.env)
        except StartError as exc:
            self.outbox.emit(ExecExit(id=msg.id, code=exc.status, status=exc.status,
                                      message=exc.message))
            return
        except OSError as exc:  # no pty, no fds, no fork: the guest's trouble, said once
            self.outbox.emit(ExecAbort(id=msg.id, message=f"exec: cannot start: {exc}"))
            return
        self.reaper.watch(pid)  # before any checkpoint: the reaper may sweep next
        streams = [trio.lowlevel.FdStream(fd) for fd in parent]
        if msg.tty:
            s = Session(msg.id, pid, True, [("stdout", streams[0])], streams[0])
        else:
            s = Session(msg.id, pid, False, [("stdout", streams[1]), ("stderr", streams[2])],
                        streams[0])
        self.sessions[msg.id] = s
        self.outbox.emit(ExecStarted(id=msg.id, pid=pid))
        console(f"exec: session {msg.id} pid {pid}: {' '.join(msg.argv)[:200]}")
        self._nursery.start_soon(self._run, s)

    def _stdin(self, s: Session, data: bytes) -> None:
        if not data:
            s.stdin_eof = True
        elif len(s.pending) + len(data) > EXEC_WINDOW:
            console(f"exec: session {s.id}: host sent stdin past its window; dropped")
            return
        else:
            s.pending += data
        s.stdin_came.set()

    # --- one session ----------------------------------------------------------

    async def _run(self, s: Session) -> None:
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._feed, s)
                with trio.CancelScope() as drain:
                    async with trio.open_nursery() as pumps:
                        for name, stream in s.outputs:
                            pumps.start_soon(self._pump, s, name, stream)
                        status = await self.reaper.wait(s.pid)
                        drain.deadline = trio.current_time() + DRAIN_S
                outer.cancel_scope.cancel()
        finally:
            del self.sessions[s.id]
            for _name, stream in s.outputs:
                stream.close()
            if s.stdin is not None:
                s.stdin.close()
        self.outbox.emit(ExecExit(id=s.id, pid=s.pid, code=status.code, signal=status.signal,
                                  status=status.shell, message=status.describe()))
        console(f"exec: session {s.id} pid {s.pid} {status.describe()}")

    async def _pump(self, s: Session, name: str, stream: trio.lowlevel.FdStream) -> None:
        while True:
            while s.send.available <= 0:
                s.credit_came = trio.Event()
                await s.credit_came.wait()
            try:
                data = await stream.receive_some(min(s.send.available, MAX_EXEC_CHUNK))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # a pty's master reads EIO once the last slave fd is closed
            if not data:
                return
            s.send.take(len(data))
            self.outbox.emit(ExecData(id=s.id, stream=name, data=bytes(data)))
            if len(data) < COALESCE_BELOW:
                # A producer writing 4 KiB at a time would cost a frame (and,
                # under TCG, milliseconds of agent time) per write: let the
                # pipe fill a moment. Invisible at a terminal.
                await trio.sleep(COALESCE_S)

    async def _feed(self, s: Session) -> None:
        """Host stdin into the process; credit back for what it took."""
        broken = False
        while True:
            while not s.pending and not s.stdin_eof:
                s.stdin_came = trio.Event()
                await s.stdin_came.wait()
            if s.pending:
                data, s.pending = bytes(s.pending), bytearray()
                if not broken and s.stdin is not None:
                    try:
                        await s.stdin.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        broken = True  # the process closed its stdin: the rest is discarded
                credit = s.received.consumed(len(data))
                if credit:
                    self.outbox.emit(ExecCredit(id=s.id, bytes=credit))
                continue
            if not s.tty and s.stdin is not None:
                await s.stdin.aclose()  # EOF for the process; a pty has no half-close
            credit = s.received.flush()
            if credit:
                self.outbox.emit(ExecCredit(id=s.id, bytes=credit))
            return
