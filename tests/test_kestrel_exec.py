"""Exec sessions with kestrel as PID 1: statuses, terminals, stdin, concurrency, hang-up.

kestrel runs in fresh namespaces (tests/pid1.py); the host end is the
monitor's own exec hub (host.exechub) and the library volar uses
(host.execclient), over a unix socket as in a VM's run directory.
"""

from __future__ import annotations

import os
import signal
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from host.execclient import ExecError, ExecStatus, open_exec
from kestrel.execproto import ExecData, ExecSignal
from kestrel.protocol import Hello, Log, Stop
from tests.pid1 import Kestrel, manifest, run_kestrel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")

# A workload that stays up until the test says stop (http: it never ends the VM by itself).
IDLE = manifest(["/bin/sh", "-c", "echo up; while :; do sleep 0.1; done"], type="http",
                base_url="http://127.0.0.1:1")


async def attached(k: Kestrel, connection: int = 1) -> None:
    """Until kestrel said hello on its ``connection``-th connection, which is still up."""
    await k.wait_for(lambda r: len(r.of(Hello)) >= connection and r.loop.stream is not None)


async def run_exec(k: Kestrel, argv: Sequence[str], *, stdin: bytes | None = b"",
                   **kw: Any) -> tuple[ExecStatus, bytes, bytes]:
    """One session to the end: (status, stdout, stderr); stdin b"" means closed at once."""
    out, err = bytearray(), bytearray()
    async with open_exec(k.control, argv, **kw) as s:
        if stdin is not None:
            await s.write(stdin)
            if not kw.get("tty"):
                await s.close_stdin()
        async for stream, data in s:
            (err if stream == "stderr" else out).extend(data)
        return await s.wait(), bytes(out), bytes(err)


async def test_exec_statuses_in_both_forms_and_127_126_naming_the_program() -> None:
    got: dict[str, Any] = {}

    async def scenario(k: Kestrel) -> None:
        await attached(k)
        got["7"] = await run_exec(k, ["sh", "-c", "echo out; echo err >&2; exit 7"])
        got["kill"] = await run_exec(k, ["sh", "-c", "kill -9 $$"])
        got["missing"] = await run_exec(k, ["/no/such/program"])
        got["bare"] = await run_exec(k, ["no-such-command"])
        got["noexec"] = await run_exec(k, ["/etc/hostname"])
        got["cwd"] = await run_exec(k, ["pwd"], cwd="/no/such/dir")
        got["env"] = await run_exec(k, ["sh", "-c", 'echo "$A $B"; pwd'], env=["A=1", "B=x y"],
                                    cwd="/proc")
        await k.send(Stop(grace_s=1))

    run = await run_kestrel(IDLE, scenario=scenario)
    status, out, err = got["7"]
    assert (status.status, status.code, status.signal, out, err) == (7, 7, None, b"out\n",
                                                                      b"err\n")
    assert status.message == "exited 7" and status.started and status.pid > 1
    status = got["kill"][0]
    assert (status.status, status.code, status.signal) == (137, None, signal.SIGKILL)
    assert "SIGKILL" in status.message
    for key, status_code, name in (("missing", 127, "/no/such/program"),
                                   ("bare", 127, "no-such-command"),
                                   ("noexec", 126, "/etc/hostname"),
                                   ("cwd", 126, "/no/such/dir")):
        status = got[key][0]
        assert (status.status, status.started) == (status_code, False), (key, status)
        assert name in status.message
    assert got["env"][1] == b"1 x y\n/proc\n"
    # The sessions were never the workload: one exit, the workload's, at the stop.
    (exit,) = run.exits
    assert exit.status == 128 + signal.SIGTERM
    assert run.powered_off


async def test_tty_session_has_a_controlling_terminal_of_the_size_sent() -> None:
    got: dict[str, Any] = {}
    script = textwrap.dedent("""
        stty size
        tty
        set -- $(cat /proc/$$/stat)
        [ "$6" = "$$" ] && echo session-leader
        [ "$7" != 0 ] && echo has-ctty
    """)

    async def scenario(k: Kestrel) -> None:
        await attached(k)
        got["tty"] = await run_exec(k, ["sh", "-c", script], tty=True, rows=33, cols=111)
        got["pipes"] = await run_exec(k, ["sh", "-c", 'set -- $(cat /proc/$$/stat); '
                                          '[ "$6" = "$$" ] && echo session-leader; tty'])
        await k.send(Stop(grace_s=1))

    await run_kestrel(IDLE, scenario=scenario)
    status, out, _ = got["tty"]
    lines = out.decode().replace("\r", "").split("\n")
    assert status.status == 0
    assert lines[0] == "33 111"
    assert lines[1].startswith("/dev/pts/")
    assert "session-leader" in lines and "has-ctty" in lines
    status, out, _ = got["pipes"]
    assert out.startswith(b"session-leader\nnot a tty")


async def test_stdin_reaches_the_process_past_many_windows() -> None:
    got: dict[str, Any] = {}
    big = os.urandom(3 * 1000 * 1000)

    async def scenario(k: Kestrel) -> None:
        await attached(k)
        got["hi"] = await run_exec(k, ["cat"], stdin=b"hi\n")
        got["big"] = await run_exec(k, ["wc", "-c"], stdin=big)
        got["closed"] = await run_exec(k, ["cat"])
        await k.send(Stop(grace_s=1))

    await run_kestrel(IDLE, scenario=scenario)
    assert got["hi"][1] == b"hi\n"
    assert got["big"][1].strip() == str(len(big)).encode()
    assert got["closed"][0].status == 0 and got["closed"][1] == b""


async def test_ten_concurrent_sessions_each_get_their_own_status_and_output() -> None:
    results: dict[int, tuple[ExecStatus, bytes, bytes]] = {}

    async def one(k: Kestrel, n: int) -> None:
        results[n] = await run_exec(k, ["sh", "-c", f"sleep 0.2; echo session-{n}; exit {n}"])

    async def scenario(k: Kestrel) -> None:
        await attached(k)
        async with trio.open_nursery() as nursery:
            for n in range(10):
                nursery.start_soon(one, k, n)
        await k.send(Stop(grace_s=1))

    await run_kestrel(IDLE, scenario=scenario)
    assert sorted(results) == list(range(10))
    for n, (status, out, _) in results.items():
        assert (status.status, out) == (n, f"session-{n}\n".encode())


async def test_a_session_exit_never_ends_a_batch_workload() -> None:
    got: dict[str, Any] = {}
    trigger = Path("/var/tmp") / f"kestrel-go-{os.getpid()}"
    trigger.unlink(missing_ok=True)

    async def scenario(k: Kestrel) -> None:
        await attached(k)
        got["first"] = await run_exec(k, ["sh", "-c", "exit 9"])
        got["killed"] = await run_exec(k, ["sh", "-c", "kill -TERM $$"])
        got["exits_before"] = list(k.run.exits)
        await run_exec(k, ["touch", str(trigger)])

    # A batch workload: it ends when the trigger file appears, with its own status.
    script = f'while [ ! -e {trigger} ]; do sleep 0.05; done; exit 4'
    try:
        run = await run_kestrel(manifest(["/bin/sh", "-c", script]), scenario=scenario)
    finally:
        trigger.unlink(missing_ok=True)
    assert got["first"][0].status == 9 and got["killed"][0].status == 128 + signal.SIGTERM
    assert got["exits_before"] == []
    (exit,) = run.exits
    assert exit.status == 4
    assert run.powered_off


async def test_lost_host_connection_hangs_up_sessions_and_leaves_no_zombie() -> None:
    got: dict[str, Any] = {}
    mark = Path("/var/tmp") / f"kestrel-hup-{os.getpid()}"
    mark.unlink(missing_ok=True)
    loop = "echo ready; while :; do sleep 0.05; done"
    polite = f': hupcase; trap "echo hup > {mark}; exit 0" HUP; {loop}'
    stubborn = f': hupcase; trap "" HUP; {loop}'

    async def hold(k: Kestrel, name: str, script: str, ready: trio.Event) -> None:
        try:
            async with open_exec(k.control, ["sh", "-c", script]) as s:
                await s.close_stdin()
                async for _stream, data in s:
                    if b"ready" in data:
                        ready.set()
                await s.wait()
        except ExecError as exc:
            got[name] = str(exc)

    async def scenario(k: Kestrel) -> None:
        await attached(k)
        async with trio.open_nursery() as nursery:
            events = [trio.Event(), trio.Event()]
            nursery.start_soon(hold, k, "polite", polite, events[0])
            nursery.start_soon(hold, k, "stubborn", stubborn, events[1])
            for e in events:
                await e.wait()
            await k.disconnect()
        await attached(k, connection=2)  # kestrel reconnects
        # Until the stubborn one is gone too (KILL after the hang-up grace), then zombies.
        count = textwrap.dedent("""
            for i in $(seq 300); do
              left=0
              for c in /proc/[0-9]*/cmdline; do
                case "$(tr '\\0' ' ' < "$c" 2>/dev/null)" in *"hup""case"*) left=$((left+1));; esac
              done
              [ $left = 0 ] && break
              sleep 0.1
            done
            z=0
            for s in /proc/[0-9]*/stat; do
              case "$(cut -d' ' -f3 "$s" 2>/dev/null)" in Z) z=$((z+1));; esac
            done
            echo "zombies=$z left=$left"
        """)
        got["count"] = await run_exec(k, ["sh", "-c", count])
        await k.send(Stop(grace_s=1))

    try:
        await run_kestrel(IDLE, scenario=scenario)
        assert mark.read_text() == "hup\n"
    finally:
        mark.unlink(missing_ok=True)
    assert "connection to kestrel lost" in got["polite"]
    assert "connection to kestrel lost" in got["stubborn"]
    assert got["count"][1] == b"zombies=0 left=0\n", got["count"]


async def test_unknown_session_ids_are_ignored_with_a_line() -> None:
    got: dict[str, Any] = {}

    async def scenario(k: Kestrel) -> None:
        await attached(k)
        await k.send(ExecData(id=4242, stream="stdin", data=b"x"))
        await k.send(ExecSignal(id=-1, signum=9))
        got["after"] = await run_exec(k, ["echo", "still here"])
        await k.send(Stop(grace_s=1))

    run = await run_kestrel(IDLE, scenario=scenario)
    assert got["after"][1] == b"still here\n"
    assert "exec_data for unknown session 4242 ignored" in run.console
    assert run.powered_off and "PANIC" not in run.console


async def test_100_mb_of_output_is_flow_controlled_and_the_workload_keeps_logging() -> None:
    got: dict[str, Any] = {}
    total = 100 * 1000 * 1000
    ticker = manifest(["/bin/sh", "-c", "i=0; while :; do echo tick $i; i=$((i+1)); "
                       "sleep 0.02; done"], type="http", base_url="http://127.0.0.1:1")

    def ticks(k: Kestrel) -> int:
        return sum(m.data.count(b"tick") for m in k.run.of(Log))

    def rss_kb(pid: int) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    async def scenario(k: Kestrel) -> None:
        await attached(k)
        await k.wait_for(lambda r: ticks(k) > 0)
        before = rss_kb(k.run.host_pid)
        n = 0
        async with open_exec(k.control, ["head", "-c", str(total), "/dev/zero"]) as s:
            await s.close_stdin()
            first = await s.read()
            assert first is not None
            n += len(first[1])
            # The reader pauses: the guest must stop at one window, and the
            # workload's logs must keep coming meanwhile.
            start = ticks(k)
            await k.wait_for(lambda r: ticks(k) >= start + 20)
            got["paused_rss_kb"] = rss_kb(k.run.host_pid) - before
            ticks_before = ticks(k)
            async for _stream, data in s:
                n += len(data)
            got["status"] = await s.wait()
            got["ticks_during"] = ticks(k) - ticks_before
        got["bytes"] = n
        await k.send(Stop(grace_s=1))

    await run_kestrel(ticker, scenario=scenario, timeout=300)
    assert got["bytes"] == total and got["status"].status == 0
    assert got["paused_rss_kb"] < 8 * 1024, got
    assert got["ticks_during"] > 0


async def test_a_guest_that_never_answers_an_open_is_one_error_not_a_hang(tmp_path: Path
                                                                          ) -> None:
    # A control socket whose far side reads and says nothing (a kestrel without exec).
    path = tmp_path / "control.sock"
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(1)

    async def silent(stream: trio.SocketStream) -> None:
        while await stream.receive_some(65536):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, silent, [trio.SocketListener(sock)])
        with pytest.raises(ExecError, match="no answer from kestrel"):
            async with open_exec(path, ["true"], open_timeout=0.5):
                raise AssertionError("opened without an answer")
        nursery.cancel_scope.cancel()


async def test_user_signal_and_resize_reach_the_session() -> None:
    got: dict[str, Any] = {}

    async def scenario(k: Kestrel) -> None:
        await attached(k)
        got["user"] = await run_exec(k, ["sh", "-c", "id -u; id -g; pwd"], uid=1000, gid=1001)
        async with open_exec(k.control, ["sh", "-c", "echo ready; exec sleep 1000"]) as s:
            await s.close_stdin()
            assert await s.read() == ("stdout", b"ready\n")
            await s.signal(signal.SIGTERM)
            got["signalled"] = await s.wait()
        async with open_exec(k.control, ["sh", "-c", "stty size; read x; stty size"],
                             tty=True, rows=20, cols=70) as s:
            out = b""
            while b"20 70" not in out:
                item = await s.read()
                assert item is not None
                out += item[1]
            await s.resize(50, 132)
            await s.write(b"go\r")
            async for _stream, data in s:
                out += data
            got["resized"] = (await s.wait(), out)
        await k.send(Stop(grace_s=1))

    await run_kestrel(IDLE, scenario=scenario)
    assert got["user"][1] == b"1000\n1001\n/\n"
    assert got["signalled"].signal == signal.SIGTERM and got["signalled"].status == 143
    status, out = got["resized"]
    assert status.status == 0 and b"50 132" in out


async def test_a_session_over_before_the_client_speaks_still_gives_its_status() -> None:
    # The guest answers a missing program at once, and the monitor hangs up
    # while the client may still be sending stdin's end: never an error.
    statuses: list[int] = []

    async def scenario(k: Kestrel) -> None:
        await attached(k)
        for _ in range(50):
            status, _, _ = await run_exec(k, ["/no/such/program"], stdin=b"input")
            statuses.append(status.status)
        await k.send(Stop(grace_s=1))

    await run_kestrel(IDLE, scenario=scenario)
    assert statuses == [127] * 50
