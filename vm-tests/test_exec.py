"""`volar vms exec` and `volar vms shell` on the seeds' Caddy image, as a user runs them.

One fledge build of examples/caddy, then VMs created with volar (private
state directory) and driven only through volar's commands: exit statuses,
stdin, 10 MiB byte for byte while the workload logs, concurrency, a missing
program, a terminal's size, a shell typed into through a real PTY, exec
during restart backoff, and the bad inputs that must end in one line.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, fledge_build

from host.kernel import KernelInfo
from kestrel.cmdline import decode_manifest, parse_cmdline

EXAMPLE = REPO / "examples" / "caddy"
# Caddy, with a log line every 0.2 s beside it: the workload's logs must keep flowing.
TICKER = ("while :; do echo tick; sleep 0.2; done & "
          "exec /usr/bin/caddy run --config /etc/caddy/Caddyfile")
TEN_MIB_LINES = 10 * 1024 * 1024 // 8  # "%07d\n": 8 bytes a line
sys.path.insert(0, str(EXAMPLE))


@dataclass
class Volar:
    state: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "VOLAR_STATE_DIR": str(self.state)}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "host.cli", *args]

    def run(self, *args: str, input: bytes | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        cmd = self.argv(*args)
        print("$ volar " + " ".join(args), flush=True)
        done = subprocess.run(cmd, env=self.env(), cwd=REPO, input=input, capture_output=True,
                              timeout=timeout, check=False)
        print(f"  -> {done.returncode} {done.stdout[:300]!r} {done.stderr[:300]!r}", flush=True)
        return done

    def install(self, image: Path, name: str, **workload: Any) -> None:
        m = json.loads((EXAMPLE / "manifest" / "caddy.json").read_text())
        m["name"] = name
        m["initramfs"] = {"url": str(image)}
        m["workload"].update(workload)
        path = self.state.parent / f"{name}.json"
        path.write_text(json.dumps(m))
        assert self.run("plugins", "install", "--manifest", str(path)).returncode == 0

    def create(self, vm: str, plugin: str) -> None:
        done = self.run("vms", "create", vm, "--plugin", plugin, "--memory", "384",
                        timeout=400)
        assert done.returncode == 0, done.stderr.decode()

    def logs(self, vm: str) -> bytes:
        return self.run("vms", "logs", vm).stdout


@pytest.fixture(scope="module")
def image(kernel: KernelInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fetch_caddy import FetchError, fetch_caddy

    try:
        fetch_caddy(quiet=True)
    except FetchError as exc:
        pytest.skip(reason=f"no static caddy for the example: {exc}")
    out = tmp_path_factory.mktemp("caddy-image") / "plugin.cpio.gz"
    return fledge_build(EXAMPLE / "fledge.toml", out)


@pytest.fixture(scope="module")
def volar(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Volar]:
    base = tmp_path_factory.mktemp("volar")
    v = Volar(base / "state")
    v.install(image, "caddy-ticker", entrypoint=["/bin/sh", "-c", TICKER])
    v.install(image, "caddy-failing", entrypoint=["/bin/sh", "-c", "echo failing; exit 3"],
              restart={"policy": "on-failure", "initial_backoff_ms": 600_000})
    yield v
    listed = json.loads(v.run("vms", "list", "--json").stdout or b"[]")
    for row in listed:
        v.run("vms", "delete", row["name"], timeout=120)


@pytest.fixture(scope="module")
def vm(volar: Volar) -> str:
    volar.create("exec-caddy", "caddy-ticker")
    return "exec-caddy"


def exec_(volar: Volar, vm: str, *argv: str, opts: tuple[str, ...] = (),
          input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return volar.run("vms", "exec", *opts, vm, "--", *argv, input=input)


# --- plain sessions ---------------------------------------------------------------


def test_cat_proc_cmdline_prints_the_manifest_argument(volar: Volar, vm: str) -> None:
    done = exec_(volar, vm, "cat", "/proc/cmdline")
    assert done.returncode == 0
    params = parse_cmdline(done.stdout.decode())
    manifest = json.loads(decode_manifest(params["volant.manifest"]))
    assert manifest["name"] == "caddy-ticker"
    assert manifest["workload"]["entrypoint"] == ["/bin/sh", "-c", TICKER]


def test_exit_status_is_volars_exit_status(volar: Volar, vm: str) -> None:
    assert exec_(volar, vm, "sh", "-c", "exit 7").returncode == 7
    assert exec_(volar, vm, "sh", "-c", "kill -9 $$").returncode == 137


def test_stdin_with_i(volar: Volar, vm: str) -> None:
    done = exec_(volar, vm, "cat", opts=("-i",), input=b"hi\n")
    assert (done.returncode, done.stdout) == (0, b"hi\n")


def test_missing_program_is_127_naming_it(volar: Volar, vm: str) -> None:
    done = exec_(volar, vm, "no-such-program")
    assert done.returncode == 127
    (line,) = done.stderr.decode().splitlines()
    assert "no-such-program" in line and line.startswith("volar: ")


def test_ten_mib_arrive_byte_for_byte_while_the_workload_logs(volar: Volar, vm: str) -> None:
    ticks_before = volar.logs(vm).count(b"tick")
    awk = f'BEGIN {{ for (i = 0; i < {TEN_MIB_LINES}; i++) printf "%07d\\n", i }}'
    # Written to a file first: the figure under test is the channel, not awk under TCG.
    done = exec_(volar, vm, "sh", "-c", f"awk '{awk}' > /tmp/blob && cat /tmp/blob")
    ticks_after = volar.logs(vm).count(b"tick")
    expected = b"".join(b"%07d\n" % i for i in range(TEN_MIB_LINES))
    assert done.returncode == 0
    assert len(done.stdout) == len(expected) == 10 * 1024 * 1024
    assert done.stdout == expected
    assert ticks_after > ticks_before  # the workload's logs kept arriving meanwhile


def test_ten_concurrent_execs_all_succeed(volar: Volar, vm: str) -> None:
    procs = [subprocess.Popen(volar.argv("vms", "exec", vm, "--", "sh", "-c",
                                         f"echo session-{i}; exit {i}"),
                              env=volar.env(), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
             for i in range(10)]
    outputs = [p.communicate(timeout=120) for p in procs]
    results = [(p.returncode, out) for p, (out, _err) in zip(procs, outputs, strict=True)]
    assert results == [(i, f"session-{i}\n".encode()) for i in range(10)], outputs


# --- terminals -----------------------------------------------------------------------


class Terminal:
    """volar on a real PTY: the test holds both ends, so it can read the slave's modes."""

    def __init__(self, volar: Volar, *args: str, rows: int = 24, cols: int = 80) -> None:
        self.master, self.slave = os.openpty()
        termios_size = struct.pack("HHHH", rows, cols, 0, 0)
        import fcntl

        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, termios_size)
        self.modes = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(volar.argv(*args), env=volar.env(), cwd=REPO,
                                     stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                     start_new_session=True)
        self.output = b""

    def read_until(self, text: bytes, timeout: float = 60) -> bytes:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} on the terminal; got {self.output!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 1))
            if ready:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:
                    break
        return self.output

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        while select.select([self.master], [], [], 0.1)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.output += chunk
        return code

    def restored(self) -> bool:
        return termios.tcgetattr(self.slave) == self.modes

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def test_tty_stty_size_is_the_size_sent(volar: Volar, vm: str) -> None:
    term = Terminal(volar, "vms", "exec", "-t", vm, "--", "busybox", "stty", "size",
                    rows=37, cols=101)
    try:
        assert term.wait() == 0
        assert b"37 101" in term.output
        assert term.restored()
    finally:
        term.close()


def test_shell_through_a_real_terminal(volar: Volar, vm: str) -> None:
    term = Terminal(volar, "vms", "shell", vm)
    try:
        term.read_until(b"# ")
        term.type(b"echo $((6*7))\r")
        out = term.read_until(b"42\r\n")
        assert b"\r\n42\r\n" in out
        term.type(b"\x04")  # Ctrl-D: the shell ends, and so does volar
        assert term.wait() == 0
        assert term.restored()
    finally:
        term.close()


# --- bad input: one line, never a hung terminal ------------------------------------------


def test_shell_that_the_image_lacks_is_one_line(volar: Volar, vm: str) -> None:
    term = Terminal(volar, "vms", "shell", vm, "--shell", "/bin/no-such-shell")
    try:
        assert term.wait() == 127
        assert term.restored()
        lines = term.output.decode().strip().splitlines()
        assert len(lines) == 1 and "has no shell at /bin/no-such-shell" in lines[0], lines
    finally:
        term.close()


def test_sigterm_to_volar_mid_session_restores_the_terminal(volar: Volar, vm: str) -> None:
    term = Terminal(volar, "vms", "exec", "-t", vm, "--", "sh", "-c", "echo ready; sleep 1000")
    try:
        term.read_until(b"ready")
        assert not term.restored()  # raw while the session runs
        term.proc.send_signal(signal.SIGTERM)
        assert term.wait() == 125
        assert term.restored()
        assert b"SIGTERM" in term.output
    finally:
        term.close()


def test_tty_without_a_terminal_is_one_line(volar: Volar, vm: str) -> None:
    done = exec_(volar, vm, "true", opts=("-t",), input=b"")
    assert done.returncode == 125
    (line,) = done.stderr.decode().splitlines()
    assert "-t needs a terminal" in line


def test_exec_during_restart_backoff_then_into_the_stopped_vm(volar: Volar) -> None:
    volar.create("exec-backoff", "caddy-failing")
    deadline = time.monotonic() + 120
    while b"restarting" not in volar.run("vms", "show", "exec-backoff").stdout:
        assert time.monotonic() < deadline, "the workload never went into restart backoff"
        time.sleep(1)
    done = exec_(volar, "exec-backoff", "sh", "-c", "echo alive; exit 5")
    assert (done.returncode, done.stdout) == (5, b"alive\n")

    volar.run("vms", "stop", "exec-backoff", timeout=120)
    done = exec_(volar, "exec-backoff", "true")
    assert done.returncode != 0
    (line,) = done.stderr.decode().splitlines()
    assert "exec-backoff" in line and "running VM" in line


def test_monitor_lost_mid_session_is_one_line(volar: Volar, vm: str) -> None:
    """Last: it kills the module's VM's monitor on purpose."""
    argv = volar.argv("vms", "exec", vm, "--", "sh", "-c", "echo open; sleep 1000")
    hold = subprocess.Popen(argv, env=volar.env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert hold.stdout is not None
    assert hold.stdout.readline() == b"open\n"  # the session is up
    info = json.loads(volar.run("vms", "show", vm, "--json").stdout)
    os.kill(info["monitor_pid"], signal.SIGKILL)
    _, err = hold.communicate(timeout=60)
    assert hold.returncode == 125
    (line,) = err.decode().splitlines()
    assert "monitor" in line
    # The session is gone, the VM is not: the next command adopts the running
    # VMM under a fresh monitor (host/adopt.py) instead of killing it.
    after = json.loads(volar.run("vms", "show", vm, "--json").stdout)
    assert after["status"] != "crashed"
    assert after["vmm_pid"] == info["vmm_pid"]
    assert after["monitor_pid"] != info["monitor_pid"]
