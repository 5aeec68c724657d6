"""Exec sessions on kestrel's channel, sans I/O: the frames and the credit window.

A host opens a session with ``exec_open`` (an id it chose, argv, env, cwd,
uid/gid, and a terminal or pipes). Then ``exec_data`` frames carry stdin
(host -> guest) and stdout/stderr, or the one PTY stream as ``stdout``
(guest -> host); empty data is end of file. ``exec_resize``, ``exec_signal``
and ``exec_close`` (the host's user is gone: hang up) steer it. The guest
says ``exec_started`` with the pid once the program runs, and ends the
session with ``exec_exit`` (the status in both forms) or ``exec_abort`` (no
process, no status: a bad request).

Sessions are live traffic: not sequenced, never replayed. They are bound to
one connection; kestrel hangs them up when it ends.

Flow control is a credit window per session and direction: a sender may
have at most ``window`` bytes of data out that the receiver has not handed
back with ``exec_credit``. The receiver returns credit once it has
*consumed* the bytes (written them to the process, or to the user), so a
100 MB output holds at most one window in kestrel and in the monitor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from kestrel.protocol import Message, register

EXEC_WINDOW = 512 * 1024  # measured: 256 KiB / 64 KiB chunks gave half the throughput
MAX_EXEC_CHUNK = 128 * 1024
STREAMS = ("stdin", "stdout", "stderr")


@dataclass(slots=True)
class ExecOpen(Message):
    """Start ``argv``; ``env`` is ``K=V`` strings on top of the workload's environment."""

    TYPE: ClassVar[str] = "exec_open"
    COMMAND: ClassVar[bool] = True
    id: int = 0
    argv: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    tty: bool = False
    rows: int = 24
    cols: int = 80


@dataclass(slots=True)
class ExecData(Message):
    TYPE: ClassVar[str] = "exec_data"
    COMMAND: ClassVar[bool] = True
    id: int = 0
    stream: str = "stdout"
    data: bytes = b""


@dataclass(slots=True)
class ExecCredit(Message):
    """The receiver consumed ``bytes`` more of the session's data: send that much more."""

    TYPE: ClassVar[str] = "exec_credit"
    COMMAND: ClassVar[bool] = True
    id: int = 0
    bytes: int = 0


@dataclass(slots=True)
class ExecResize(Message):
    TYPE: ClassVar[str] = "exec_resize"
    COMMAND: ClassVar[bool] = True
    id: int = 0
    rows: int = 24
    cols: int = 80


@dataclass(slots=True)
class ExecSignal(Message):
    """Signal the session's process group."""

    TYPE: ClassVar[str] = "exec_signal"
    COMMAND: ClassVar[bool] = True
    id: int = 0
    signum: int = 15


@dataclass(slots=True)
class ExecClose(Message):
    """The host's end of the session is gone: SIGHUP now, KILL after a grace."""

    TYPE: ClassVar[str] = "exec_close"
    COMMAND: ClassVar[bool] = True
    id: int = 0


@dataclass(slots=True)
class ExecStarted(Message):
    """The program runs (exec succeeded) as ``pid``, in the guest's PID namespace."""

    TYPE: ClassVar[str] = "exec_started"
    id: int = 0
    pid: int = 0


@dataclass(slots=True)
class ExecExit(Message):
    """The end: raw form (code or signal) and shell form; pid 0 if it never started."""

    TYPE: ClassVar[str] = "exec_exit"
    id: int = 0
    pid: int = 0
    code: int | None = None
    signal: int | None = None
    status: int = 0
    message: str = ""


@dataclass(slots=True)
class ExecAbort(Message):
    """The session ended without a status (a bad request, a lost connection)."""

    TYPE: ClassVar[str] = "exec_abort"
    id: int = 0
    message: str = ""


EXEC_MESSAGES: tuple[type[Message], ...] = (
    ExecOpen, ExecData, ExecCredit, ExecResize, ExecSignal, ExecClose, ExecStarted, ExecExit,
    ExecAbort,
)
register(*EXEC_MESSAGES)


def check_open(msg: ExecOpen) -> str:
    """What is wrong with an open request ("" if nothing): the guest answers exec_abort."""
    if msg.id <= 0:
        return f"session id {msg.id}: must be positive"
    if not msg.argv or not msg.argv[0]:
        return "argv is empty"
    if any("\0" in a for a in (*msg.argv, *msg.env, msg.cwd)):
        return "a NUL byte in argv, env or cwd"
    if bad := [e for e in msg.env if "=" not in e or e.startswith("=")]:
        return f"env entry {bad[0]!r}: expected K=V"
    if not 0 <= msg.uid < 2**32 or not 0 <= msg.gid < 2**32:
        return f"uid/gid {msg.uid}/{msg.gid}: out of range"
    if not (0 < msg.rows < 2**16 and 0 < msg.cols < 2**16):
        return f"terminal size {msg.rows}x{msg.cols}: out of range"
    return ""


class SendWindow:
    """The sender's side: how much may go out now."""

    def __init__(self, window: int = EXEC_WINDOW) -> None:
        self.window = window
        self.available = window

    def take(self, wanted: int) -> int:
        """Bytes that may be sent now, at most ``wanted`` (and at most a chunk)."""
        n = max(0, min(wanted, self.available, MAX_EXEC_CHUNK))
        self.available -= n
        return n

    def grant(self, n: int) -> None:
        """Credit came back. More than was ever sent is the peer's bug: capped, not trusted."""
        if n > 0:
            self.available = min(self.window, self.available + n)


class ReceiveWindow:
    """The receiver's side: count consumed bytes, hand credit back in batches."""

    def __init__(self, window: int = EXEC_WINDOW) -> None:
        self.window = window
        self._consumed = 0

    def consumed(self, n: int) -> int:
        """Record ``n`` consumed bytes; return credit to send now (0: not yet worth a frame)."""
        self._consumed += n
        if self._consumed * 4 < self.window:
            return 0
        credit, self._consumed = self._consumed, 0
        return credit

    def flush(self) -> int:
        credit, self._consumed = self._consumed, 0
        return credit
