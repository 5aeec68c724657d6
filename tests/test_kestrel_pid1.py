"""kestrel as PID 1: exit codes, signals, reaping, stop, hygiene, health, logs.

Each test boots kestrel in fresh namespaces (tests/pid1.py) and asserts on
what the host receives over the real protocol, as a user of volar would.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from host.vsock import private_listener
from kestrel.protocol import Exit, Log, Signal, State, Stop, Timeline
from tests.pid1 import PYTHON, Kestrel, Run, frozen_kestrel, manifest, run_kestrel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")

PY = PYTHON


def always(n: int, **extra: object) -> dict[str, object]:
    """Restart every run, ``n`` restarts, 1 ms backoff: many runs in one boot."""
    return {"policy": "always", "max_restarts": n, "initial_backoff_ms": 1,
            "max_backoff_ms": 1, **extra}


async def test_batch_exit_status_is_reported_and_vm_powers_off() -> None:
    run = await run_kestrel(manifest(["/bin/sh", "-c", "echo hello; exit 7"]))
    assert run.powered_off
    assert [(e.code, e.signal, e.status) for e in run.exits] == [(7, None, 7)]
    assert run.logs("stdout") == b"hello\n"
    assert run.states[-1] == "poweroff"
    assert "exited 7" in run.console


async def test_every_exit_code_0_to_255_is_reported(tmp_path: Path) -> None:
    # One boot, 256 runs: the workload exits with the count of earlier runs.
    counter = Path("/var/tmp") / f"kestrel-counter-{os.getpid()}"
    counter.write_text("0")
    script = f'n=$(cat {counter}); echo $((n+1)) > {counter}; exit $n'
    try:
        run = await run_kestrel(
            manifest(["/bin/sh", "-c", script], restart=always(255)), timeout=120
        )
    finally:
        counter.unlink()
    assert [e.code for e in run.exits] == list(range(256))
    assert [e.status for e in run.exits] == list(range(256))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGKILL])
async def test_death_by_signal_reports_both_forms(sig: int) -> None:
    run = await run_kestrel(manifest(["/bin/sh", "-c", f"kill -{int(sig)} $$"]))
    (exit,) = run.exits
    assert (exit.code, exit.signal, exit.status) == (None, sig, 128 + sig)
    assert signal.Signals(sig).name in exit.message


async def test_missing_entrypoint_is_127_with_the_path() -> None:
    run = await run_kestrel(manifest(["/no/such/binary"]))
    (exit,) = run.exits
    assert exit.status == 127 and "/no/such/binary" in exit.message
    assert run.powered_off


async def test_entrypoint_not_executable_is_126() -> None:
    run = await run_kestrel(manifest(["/etc/hostname"]))
    (exit,) = run.exits
    assert exit.status == 126 and "/etc/hostname" in exit.message


async def test_orphans_are_reaped_and_no_zombie_remains() -> None:
    # 100 orphans (double fork: their parent exits at once), then count zombies.
    script = textwrap.dedent("""
        for i in $(seq 100); do (sleep 0.2 &) ; done
        sleep 1.5
        z=0
        for s in /proc/[0-9]*/stat; do
          case "$(cut -d' ' -f3 "$s" 2>/dev/null)" in Z) z=$((z+1));; esac
        done
        echo "zombies=$z"
    """)
    run = await run_kestrel(manifest(["/bin/sh", "-c", script]))
    assert b"zombies=0" in run.logs("stdout"), run.logs()
    assert run.exits[-1].status == 0


async def test_exit_status_race_1000_runs_always_report_3() -> None:
    # Orphans die while the main process exits: the single reaper must still
    # hand the main status to the supervisor every time.
    run = await run_kestrel(
        manifest(["/bin/sh", "-c", "(sleep 0.001 &); (true &); exit 3"], restart=always(999)),
        timeout=300,
    )
    assert len(run.exits) == 1000
    assert {e.status for e in run.exits} == {3}


async def test_term_to_pid1_stops_the_workload_group_then_powers_off() -> None:
    trap = 'trap "echo got-$1; exit 0" TERM; while :; do sleep 0.05; done'
    script = (
        f"for i in 1 2 3 4 5 6; do sh -c '{trap}' sh $i & done; "
        "echo started; wait"
    )

    async def scenario(k: Kestrel) -> None:
        await k.wait_for(lambda r: b"started" in r.logs())
        await trio.sleep(0.3)
        k.signal(signal.SIGTERM)

    run = await run_kestrel(manifest(["/bin/sh", "-c", script], type="http",
                                     base_url="http://127.0.0.1:1"), scenario=scenario)
    out = run.logs("stdout")
    for i in range(1, 7):
        assert f"got-{i}".encode() in out
    assert "stopping" in run.states and run.states[-1] == "poweroff"
    assert run.powered_off


async def test_stop_kills_a_term_ignoring_workload_after_the_grace() -> None:
    async def scenario(k: Kestrel) -> None:
        await k.wait_for(lambda r: b"ready" in r.logs())
        await k.send(Stop(grace_s=0.5))

    run = await run_kestrel(
        manifest(["/bin/sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"],
                 type="http", base_url="http://127.0.0.1:1"),
        scenario=scenario,
    )
    (exit,) = run.exits
    assert exit.signal == signal.SIGKILL and exit.status == 137
    assert run.powered_off


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGUSR1, 138), (signal.SIGUSR2, 140)])
async def test_usr_signals_to_pid1_reach_a_default_handler_workload(sig: int, status: int) -> None:
    async def scenario(k: Kestrel) -> None:
        await k.wait_for(lambda r: b"ready" in r.logs())
        k.signal(sig)

    run = await run_kestrel(manifest(["/bin/sh", "-c", "echo ready; exec sleep 30"]),
                            scenario=scenario)
    assert [e.status for e in run.exits] == [status]


CATCHABLE = [s for s in range(1, 32) if s not in (
    signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGPIPE,
    signal.SIGTERM, signal.SIGINT)]


async def test_each_catchable_signal_to_pid1_reaches_the_workload() -> None:
    # SIGPIPE is not forwarded (kestrel's own broken-pipe writes would raise it);
    # TERM and INT start the stop phase (tested above) and end this test.
    prog = textwrap.dedent(f"""
        import signal, sys, os, time
        def h(s, f):
            os.write(1, f"sig={{s}}\\n".encode())
        for s in {CATCHABLE!r}:
            signal.signal(s, h)
        print("ready", flush=True)
        while True:
            time.sleep(1)
    """)

    async def scenario(k: Kestrel) -> None:
        await k.wait_for(lambda r: b"ready" in r.logs())
        for s in CATCHABLE:
            k.signal(s)
            await k.wait_for(_logged(f"sig={s}\n".encode()))
        k.signal(signal.SIGTERM)

    run = await run_kestrel(manifest([PY, "-c", prog], type="http",
                                     base_url="http://127.0.0.1:1"), scenario=scenario)
    got = {int(line[4:]) for line in run.logs().decode().split() if line.startswith("sig=")}
    assert got == set(CATCHABLE)
    assert run.powered_off


async def test_tstp_ttin_ttou_never_stop_pid1() -> None:
    states: list[str] = []

    async def scenario(k: Kestrel) -> None:
        await k.wait_for(lambda r: b"ready" in r.logs())
        for s in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
            k.signal(s)
        await trio.sleep(0.3)
        # Field 3 of /proc/PID/stat: "T" would mean PID 1 itself was stopped.
        states.append(Path(f"/proc/{k.run.host_pid}/stat").read_text().split()[2])
        await k.send(Stop(grace_s=0.5))

    run = await run_kestrel(
        manifest(["/bin/sh", "-c", "echo ready; exec sleep 30"], type="http",
                 base_url="http://127.0.0.1:1"),
        scenario=scenario,
    )
    assert states and states[0] != "T"
    assert "stopping" in run.states and run.powered_off


async def test_background_child_gets_term_then_kill_after_main_exits() -> None:
    script = ("sh -c 'trap \"\" TERM; echo bg-ignoring; sleep 30' & "
              "sh -c 'trap \"echo bg-got-term; exit 0\" TERM; while :; do sleep 0.05; done' & "
              "sleep 0.3; echo main-done; exit 0")
    run = await run_kestrel(manifest(["/bin/sh", "-c", script]),
                            extra="kestrel.grace=0.5")
    assert run.exits[-1].status == 0
    assert b"bg-got-term" in run.logs()
    assert run.powered_off  # the TERM-ignoring one was KILLed; nothing hung


async def test_spawn_hygiene_mask_dispositions_fds_group_cwd() -> None:
    # The workload is the shell (dash), which changes no disposition when not
    # interactive; `ls` and `pwd` are builtins or exec'd after the checks. The
    # mask is read by the shell itself: dash blocks every signal around a fork,
    # so a child reading /proc/$$/status could catch the parent mid-fork.
    script = ("while read -r k v; do case $k in SigBlk:|SigIgn:) echo \"$k $v\";; esac; "
              "done < /proc/$$/status; "
              "echo fds-begin; ls /proc/$$/fd; echo fds-end; "
              "echo pgid $(cut -d' ' -f5 /proc/$$/stat) pid $$; echo cwd $(pwd); "
              "echo stdin $(readlink /proc/$$/fd/0)")
    run = await run_kestrel(manifest(["/bin/sh", "-c", script], workdir="/usr"))
    out = run.logs("stdout").decode()
    fds = out.split("fds-begin\n")[1].split("fds-end\n")[0].split()
    out = out.replace("\n".join(["fds-begin", *fds, "fds-end"]), "")
    fields = dict(line.split(None, 1) for line in out.splitlines() if line)
    assert int(fields["SigBlk:"], 16) == 0
    # Signals 1..31: none ignored. (glibc's posix_spawn marks its own internal
    # RT signals 32/33 SIG_IGN when the parent handles them; glibc refuses to
    # let anyone else name them, and the workload's libc resets them.)
    assert int(fields["SigIgn:"], 16) & 0x7FFFFFFF == 0
    assert fds == ["0", "1", "2"]  # ls runs in a child: the shell's own fds
    pgid, _, pid = fields["pgid"].partition(" pid ")
    assert pgid == pid  # its own process group
    assert fields["cwd"] == "/usr"
    assert fields["stdin"] == "/dev/null"


async def test_mounts_hostname_and_cmdline_bind_mount_survive() -> None:
    script = "cat /proc/self/mountinfo; echo host=$(hostname); echo cmdline=$(cat /proc/cmdline)"
    run = await run_kestrel(manifest(["/bin/sh", "-c", script]))
    out = run.logs("stdout").decode()
    mounts = {(ln.split(" - ")[0].split()[4], ln.split(" - ")[1].split()[0])
              for ln in out.splitlines() if " - " in ln}
    for want in [("/proc", "proc"), ("/sys", "sysfs"), ("/dev", "devtmpfs"),
                 ("/dev/pts", "devpts"), ("/dev/shm", "tmpfs"), ("/run", "tmpfs"),
                 ("/tmp", "tmpfs")]:
        assert want in mounts
    assert "host=kt\n" in out
    assert "kestrel.channel=unix:" in out  # our bind mount was not mounted over
    assert socket.gethostname() != "kt"  # the UTS change stayed inside


async def test_every_log_byte_arrives_and_exit_follows_the_last_log() -> None:
    blob = Path("/var/tmp") / f"kestrel-blob-{os.getpid()}"
    blob.write_bytes(os.urandom(1 << 20))
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    try:
        run = await run_kestrel(
            manifest(["/bin/sh", "-c", f"cat {blob} >&2; exit 0"], restart=always(99)),
            timeout=300,
        )
    finally:
        blob.unlink()
    # Between exits, exactly one copy of the file, in order, on stderr.
    runs: list[bytes] = []
    current = b""
    for m in run.messages:
        if isinstance(m, Log):
            current += m.data
        elif isinstance(m, Exit):
            runs.append(current)
            current = b""
    assert len(runs) == 100
    assert all(hashlib.sha256(r).hexdigest() == digest for r in runs)
    assert run.session.lost == 0


async def test_background_holder_of_the_pipe_does_not_hold_the_exit_report() -> None:
    run = await run_kestrel(manifest(["/bin/sh", "-c", "sleep 1000 & echo done; exit 0"]),
                            extra="kestrel.grace=0.5")
    assert [e.status for e in run.exits] == [0]
    assert b"done" in run.logs()


async def test_reconnect_resumes_without_loss() -> None:
    prog = "import sys\nfor i in range(40000):\n    print(f'line {i}', flush=i % 100 == 0)\n"

    async def scenario(k: Kestrel) -> None:
        await k.wait_for(lambda r: len(r.logs()) > 20000)
        await k.disconnect()  # the host goes away mid-flood; kestrel reconnects

    run = await run_kestrel(manifest([PY, "-c", prog]), scenario=scenario)
    lines = run.logs("stdout").decode().splitlines()
    assert lines == [f"line {i}" for i in range(40000)]
    assert run.session.lost == 0
    seqs = [m.seq for m in run.messages if hasattr(m, "seq") and m.SEQUENCED]
    assert seqs == sorted(set(seqs))  # each record once, in order


async def test_a_host_that_goes_quiet_without_closing_is_dropped_and_nothing_is_lost() -> None:
    # What a vsock backend does when the monitor dies with unread bytes: the
    # guest's connection stays open and nothing arrives on it any more.
    prog = ("import time\nfor i in range(4000):\n    print(f'line {i}', flush=True)\n"
            "    time.sleep(0.001)\n")

    async def scenario(k: Kestrel) -> None:
        listener = await private_listener(k.run.dir / "agent.sock")
        session = k.run.session
        session.keepalive_s = 0.25  # kestrel gives up after KEEPALIVE_MISSES of these
        quiet = await listener.accept()
        await quiet.send_all(session.attach())
        while b"line 500" not in k.run.logs():
            k.run.collector.record(session.receive(bytes(await quiet.receive_some(65536))))
        session.ack()  # never sent: this host is gone from kestrel's point of view
        with trio.fail_after(30):
            again = await listener.accept()  # kestrel noticed the silence and came back
        await k.run.loop._serve_one(again)  # until kestrel powers off
        await quiet.aclose()
        await listener.aclose()

    run = await run_kestrel(manifest([PY, "-c", prog]), scenario=scenario, serve=False)
    lines = run.logs("stdout").decode().splitlines()
    assert lines == [f"line {i}" for i in range(4000)]
    assert run.session.lost == 0 and run.loop.connections == 1
    seqs = [m.seq for m in run.messages if hasattr(m, "seq") and m.SEQUENCED]
    assert seqs == sorted(set(seqs))  # each record once, in order
    assert "host silent for 2 s: reconnecting" in run.console


async def test_host_signal_command_reaches_the_group() -> None:
    async def scenario(k: Kestrel) -> None:
        await k.wait_for(lambda r: b"ready" in r.logs())
        await k.send(Signal(signum=signal.SIGUSR1))

    run = await run_kestrel(
        manifest(["/bin/sh", "-c", "trap 'echo usr1; exit 5' USR1; echo ready; "
                                   "while :; do sleep 0.05; done"]),
        scenario=scenario,
    )
    assert b"usr1" in run.logs() and run.exits[-1].status == 5


def test_refuses_to_run_when_not_pid1() -> None:
    proc = subprocess.run(frozen_kestrel(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "not PID 1" in proc.stderr


async def test_restart_backoff_grows_and_is_capped() -> None:
    policy = {"policy": "on-failure", "initial_backoff_ms": 10, "max_backoff_ms": 40,
              "max_restarts": 5}
    run = await run_kestrel(manifest(["/bin/sh", "-c", "exit 1"], restart=policy))
    delays = [m.detail for m in run.of(State) if m.state == "restarting"]
    assert delays == [f"attempt {i} in {d} ms" for i, d in
                      zip(range(1, 6), [10, 20, 40, 40, 40], strict=True)]
    assert len(run.exits) == 6 and run.powered_off


async def test_http_workload_health_transitions() -> None:
    flag = Path("/var/tmp") / f"kestrel-healthy-{os.getpid()}"
    flag.touch()
    port = _free_port()
    server = textwrap.dedent(f"""
        import http.server, os
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                ok = os.path.exists({str(flag)!r})
                self.send_response(200 if ok else 500); self.end_headers()
            def log_message(self, *a): pass
        http.server.HTTPServer(("127.0.0.1", {port}), H).serve_forever()
    """)

    async def scenario(k: Kestrel) -> None:
        await k.wait_for(lambda r: r.health == ["healthy"])
        flag.unlink()
        await k.wait_for(lambda r: r.health == ["healthy", "unhealthy"])
        flag.touch()
        await k.wait_for(lambda r: r.health == ["healthy", "unhealthy", "healthy"])
        await k.send(Stop(grace_s=2))

    doc = manifest([PY, "-c", server], type="http", base_url=f"http://127.0.0.1:{port}")
    doc["health_check"] = {"endpoint": "/health", "timeout_ms": 5000, "interval_ms": 50,
                           "failure_threshold": 2}
    try:
        run = await run_kestrel(doc, scenario=scenario)
    finally:
        flag.unlink(missing_ok=True)
    assert run.health == ["healthy", "unhealthy", "healthy"]
    assert [m.mark for m in run.messages if isinstance(m, Timeline)].count("first_healthy") == 1
    assert run.powered_off


async def test_hanging_health_endpoint_never_delays_stop() -> None:
    port = _free_port()
    # Accepts connections and never answers.
    server = ("import socket,time; s=socket.socket(); "
              "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
              f"s.bind(('127.0.0.1',{port})); s.listen(); print('ready', flush=True); "
              "c=[]\nwhile True: c.append(s.accept())")

    async def scenario(k: Kestrel) -> None:
        await k.wait_for(lambda r: b"ready" in r.logs())
        await trio.sleep(0.5)
        await k.send(Stop(grace_s=0.5))

    doc = manifest([PY, "-c", server], type="http", base_url=f"http://127.0.0.1:{port}")
    doc["health_check"] = {"endpoint": "/", "timeout_ms": 60000}
    run = await run_kestrel(doc, scenario=scenario, timeout=20)
    assert run.exits and run.powered_off
    assert "healthy" not in run.health


def _logged(marker: bytes) -> Callable[[Run], bool]:
    return lambda r: marker in r.logs()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



async def test_metrics_report_the_workload_groups_memory_and_the_guest() -> None:
    from kestrel.protocol import Heartbeat, Metrics

    async def scenario(k: Kestrel) -> None:
        await k.wait_for(lambda r: bool(r.of(Metrics)), timeout=20)
        await k.send(Stop(grace_s=1))

    # A group of two: the shell and a child holding 20 MB of its own.
    hog = f"{PY} -c 'b = bytearray(20_000_000); import time; time.sleep(30)'"
    run = await run_kestrel(manifest(["/bin/sh", "-c", f"{hog} & wait"], type="http",
                                     base_url="http://127.0.0.1:1"), scenario=scenario)
    (m, *_) = run.of(Metrics)
    assert m.workload_rss > 20_000_000  # the whole group, not just its leader
    assert 0 < m.mem_available <= m.mem_total
    assert 0 < m.agent_rss < 200 * 1024 * 1024
    assert run.of(Heartbeat)


async def test_killed_subshell_with_a_background_child_never_hangs_1000_runs() -> None:
    # tini's regression case: the inner bash kills itself while its child
    # lives on as an orphan; the outer bash must still be reaped and reported.
    script = "bash -c 'sleep 0.01 & kill -9 $BASHPID'; sleep 0.0087"
    run = await run_kestrel(
        manifest(["/bin/bash", "-c", script], restart=always(999)), timeout=300
    )
    assert len(run.exits) == 1000
    assert {e.status for e in run.exits} == {0}
