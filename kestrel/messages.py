"""kestrel's wire messages: one dataclass per message type, and the schema the
codec in kestrel/protocol.py checks each decoded field against.

Pure data: no framing, no sessions, nothing that touches a socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

PROTOCOL_VERSION = 1


@dataclass(slots=True)
class Message:
    TYPE: ClassVar[str] = ""
    SEQUENCED: ClassVar[bool] = False
    COMMAND: ClassVar[bool] = False  # the guest hands it to kestrel to act on


# --- host -> guest ----------------------------------------------------------


@dataclass(slots=True)
class Attach(Message):
    """First frame of every connection: the host holds records up to last_seq.

    A VM restored from a snapshot is told so here (the kernel has no vmgenid
    to tell it): ``restore_id`` names this restore, and with it come the
    VM's own ``hostname``, the host's wall clock (``wall_ns``, CLOCK_REALTIME
    when the frame was made) and fresh ``entropy`` for the kernel's RNG.
    kestrel acts once per restore_id; a cold-booted VM's host sends none.
    ``keepalive_s`` > 0 promises a frame (an ack, a command or a ping) at
    least that often; 0 (an older host) promises nothing.
    """

    TYPE: ClassVar[str] = "attach"
    last_seq: int = 0
    proto: int = PROTOCOL_VERSION
    restore_id: str = ""
    hostname: str = ""
    wall_ns: int = 0
    entropy: bytes = b""
    keepalive_s: float = 0.0


@dataclass(slots=True)
class Ack(Message):
    TYPE: ClassVar[str] = "ack"
    seq: int = 0


@dataclass(slots=True)
class Stop(Message):
    """Stop the workload (TERM, grace, KILL) and power the VM off."""

    TYPE: ClassVar[str] = "stop"
    COMMAND: ClassVar[bool] = True
    grace_s: float = 10.0


@dataclass(slots=True)
class Signal(Message):
    TYPE: ClassVar[str] = "signal"
    COMMAND: ClassVar[bool] = True
    signum: int = 15


@dataclass(slots=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    id: int = 0


# --- guest -> host, telemetry (not sequenced) --------------------------------


@dataclass(slots=True)
class Hello(Message):
    """Answer to attach. ``timeline`` maps marks to kernel uptime seconds."""

    TYPE: ClassVar[str] = "hello"
    agent: str = ""
    boot_id: str = ""
    timeline: dict[str, float] = field(default_factory=dict)
    next_seq: int = 1
    proto: int = PROTOCOL_VERSION


@dataclass(slots=True)
class Metrics(Message):
    TYPE: ClassVar[str] = "metrics"
    uptime: float = 0.0
    workload_rss: int = 0
    workload_cpu_s: float = 0.0
    agent_rss: int = 0
    mem_total: int = 0
    mem_available: int = 0
    reaped: int = 0


@dataclass(slots=True)
class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"
    uptime: float = 0.0
    state: str = ""
    health: str = ""


@dataclass(slots=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    id: int = 0


# --- guest -> host, records (sequenced, replayed until acked) ---------------


@dataclass(slots=True)
class Log(Message):
    TYPE: ClassVar[str] = "log"
    SEQUENCED: ClassVar[bool] = True
    stream: str = "stdout"
    data: bytes = b""
    seq: int = 0


@dataclass(slots=True)
class State(Message):
    """Workload lifecycle: starting, running, exited, restarting, stopping, poweroff."""

    TYPE: ClassVar[str] = "state"
    SEQUENCED: ClassVar[bool] = True
    state: str = ""
    detail: str = ""
    seq: int = 0


@dataclass(slots=True)
class Health(Message):
    """A health transition: starting -> healthy -> unhealthy -> healthy."""

    TYPE: ClassVar[str] = "health"
    SEQUENCED: ClassVar[bool] = True
    status: str = ""
    detail: str = ""
    seq: int = 0


@dataclass(slots=True)
class Exit(Message):
    """The workload ended: raw form (code or signal) and shell form (status)."""

    TYPE: ClassVar[str] = "exit"
    SEQUENCED: ClassVar[bool] = True
    pid: int = 0
    code: int | None = None
    signal: int | None = None
    status: int = 0
    message: str = ""
    seq: int = 0


@dataclass(slots=True)
class Oom(Message):
    TYPE: ClassVar[str] = "oom"
    SEQUENCED: ClassVar[bool] = True
    pid: int = 0
    detail: str = ""
    seq: int = 0


@dataclass(slots=True)
class Timeline(Message):
    """A boot milestone: kernel uptime in seconds when ``mark`` happened."""

    TYPE: ClassVar[str] = "timeline"
    SEQUENCED: ClassVar[bool] = True
    mark: str = ""
    uptime: float = 0.0
    seq: int = 0


@dataclass(slots=True)
class Dropped(Message):
    """Records first_seq..last_seq were lost to the replay bound.

    Sent right after ``hello``, before the replay; its seq is last_seq, the
    last record it stands for.
    """

    TYPE: ClassVar[str] = "dropped"
    SEQUENCED: ClassVar[bool] = True
    count: int = 0
    first_seq: int = 0
    last_seq: int = 0
    seq: int = 0


@dataclass(slots=True)
class Fatal(Message):
    """kestrel cannot go on (bad manifest, internal error); power-off follows."""

    TYPE: ClassVar[str] = "fatal"
    SEQUENCED: ClassVar[bool] = True
    message: str = ""
    seq: int = 0


@dataclass(slots=True)
class Unknown(Message):
    """A message type this side does not know (a newer peer); skipped, not fatal."""

    TYPE: ClassVar[str] = "?"
    type: str = ""
    body: dict[str, Any] = field(default_factory=dict)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Attach, Ack, Stop, Signal, Ping, Hello, Metrics, Heartbeat, Pong,
        Log, State, Health, Exit, Oom, Timeline, Dropped, Fatal,
    )
}

# Field name -> accepted Python types, derived once from the dataclasses.
_TYPE_NAMES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (float, int), "str": (str,), "bytes": (bytes,),
    "int | None": (int, type(None)), "dict[str, float]": (dict,), "bool": (bool,),
    "list[str]": (list,),
}
SCHEMA: dict[type[Message], dict[str, tuple[type, ...]]] = {}


def register(*classes: type[Message]) -> None:
    """Make ``classes`` known to the codec (kestrel.execproto adds its messages)."""
    for cls in classes:
        MESSAGE_TYPES[cls.TYPE] = cls
        SCHEMA[cls] = {f.name: _TYPE_NAMES[str(f.type)] for f in fields(cls)}


register(*MESSAGE_TYPES.values())
