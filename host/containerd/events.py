"""Task events to containerd through the publish binary it named.

containerd starts a shim with ``-publish-binary`` (itself) and ``-address``;
``BINARY --address ADDR publish --topic T --namespace NS`` reads one
protobuf ``Any`` on stdin and publishes it. One task sends them in order,
so an exit never overtakes its create.
"""

from __future__ import annotations

from collections.abc import Callable

import trio
from google.protobuf import any_pb2
from google.protobuf.message import Message

# containerd's runtime/events.go topics.
TASK_CREATE = "/tasks/create"
TASK_START = "/tasks/start"
TASK_EXIT = "/tasks/exit"
TASK_DELETE = "/tasks/delete"
TASK_EXEC_ADDED = "/tasks/exec-added"
TASK_EXEC_STARTED = "/tasks/exec-started"
TASK_OOM = "/tasks/oom"
TASK_PAUSED = "/tasks/paused"
TASK_RESUMED = "/tasks/resumed"
PUBLISH_TIMEOUT_S = 10.0


def as_any(msg: Message) -> bytes:
    # typeurl names a registered event by its full protobuf name.
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name,
                       value=msg.SerializeToString()).SerializeToString()


class Publisher:
    def __init__(self, *, binary: str, address: str, namespace: str,
                 say: Callable[[str], None]) -> None:
        self.binary, self.address, self.namespace, self.say = binary, address, namespace, say
        self._send, self._receive = trio.open_memory_channel[tuple[str, bytes]](256)

    def publish(self, topic: str, msg: Message) -> None:
        try:
            self._send.send_nowait((topic, as_any(msg)))
        except trio.WouldBlock:
            self.say(f"events: queue full, dropped {topic}")

    async def run(self) -> None:
        async for topic, payload in self._receive:
            if not self.binary:
                continue
            argv = [self.binary, "--address", self.address, "publish", "--topic", topic,
                    "--namespace", self.namespace]
            with trio.move_on_after(PUBLISH_TIMEOUT_S) as scope:
                try:
                    proc = await trio.run_process(argv, stdin=payload, capture_stdout=True,
                                                  capture_stderr=True, check=False)
                except OSError as exc:
                    self.say(f"events: {topic}: {exc}")
                    continue
                if proc.returncode != 0:
                    self.say(f"events: {topic}: publish exited {proc.returncode}: "
                             f"{proc.stderr.decode(errors='replace').strip()}")
            if scope.cancelled_caught:
                self.say(f"events: {topic}: publish took over {PUBLISH_TIMEOUT_S:g} s")

    async def drain(self) -> None:
        """Close the queue; run() ends after sending what is in it."""
        await self._send.aclose()
