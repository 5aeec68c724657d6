"""Inside a VM through its serial console, as a user at a terminal gets there.

`volar vms console` attached from a real PTY (the seeds' troubleshooting
step), kestrel's opt-in debug shell, and the seeds' two init modes without
kestrel (custom and none) as first-class VMs: created without waiting for a
hello, listed as running with agent none, reachable on their console, and
stopped through the ACPI button with a kill after the grace.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, fledge_build

from host.kernel import KernelInfo

SEEDS = REPO / "tests" / "data" / "fledge" / "seeds"
CTRL_RBRACKET = b"\x1d"
# What a custom or none-mode /init has to do itself: the image has no
# /dev/console node, so stdio comes from devtmpfs's.
INIT = """#!/bin/sh
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "{marker}: up as PID $$"
while true; do sh; echo "{marker}: shell exited, a new one"; done
"""
HTTPD = {
    "name": "web", "version": "0.1.0",
    "workload": {"type": "http", "entrypoint": ["/bin/busybox", "httpd", "-f", "-p", "80",
                                                "-h", "/www"],
                 "base_url": "http://127.0.0.1:80"},
    "health_check": {"endpoint": "/", "timeout_ms": 5000},
}


class Volar:
    """The volar CLI as a subprocess with a private state directory."""

    def __init__(self, state: Path) -> None:
        self.env = {**os.environ, "VOLAR_STATE_DIR": str(state),
                    "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.argv = [sys.executable, "-m", "host.cli"]

    def __call__(self, *args: str, ok: bool = True, timeout: float = 300) -> str:
        print(f"$ volar {' '.join(args)}", flush=True)
        done = subprocess.run([*self.argv, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        print(done.stdout + done.stderr, flush=True)
        if ok:
            assert done.returncode == 0, f"volar {' '.join(args)}: {done.stderr}"
        return done.stdout + done.stderr

    def show(self, name: str) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(self("vms", "show", name, "--json"))
        return info

    def console_until(self, name: str, text: str, *, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            log = self("vms", "console", name, "--log")  # stdout is a pipe here: the log
            if text in log or time.monotonic() > deadline:
                assert text in log, f"{text!r} never reached the console log"
                return log
            time.sleep(1)


class Terminal:
    """A real terminal: a PTY whose child is a shell running ``script``."""

    def __init__(self, script: str, env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the PTY is its controlling terminal
            os.chdir(REPO)
            os.execve("/bin/sh", ["sh", "-c", script], env)
        self.seen = b""
        self.before = b""  # `stty -g` before the command under test ran

    def expect(self, text: bytes, *, timeout: float = 60) -> bytes:
        """Everything read until ``text`` (kept for the next expect after it)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} on the terminal; it shows {self.seen[-800:]!r}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # EIO: the child side closed
                    data = b""
                if not data:
                    raise AssertionError(f"terminal closed before {text!r}: {self.seen[-800:]!r}")
                self.seen += data
        head, _, self.seen = self.seen.partition(text)
        return head + text

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def close(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining: a child blocked on a full PTY never exits
                if select.select([self.fd], [], [], 0.2)[0]:
                    self.seen += os.read(self.fd, 65536)
            except OSError:
                time.sleep(0.1)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        raise AssertionError("the terminal's shell did not exit")


def attach(volar: Volar, name: str) -> Terminal:
    """`volar vms console NAME` in a terminal, between two snapshots of its settings."""
    cmd = shlex.join([*volar.argv, "vms", "console", name])
    script = f"stty -g; echo BEFORE-DONE; {cmd}; echo \"rc=$?\"; stty -g; echo AFTER-DONE"
    term = Terminal(script, volar.env)
    term.before = term.expect(b"BEFORE-DONE").split(b"BEFORE-DONE")[0].strip()
    term.expect(b"Ctrl-] detaches.")
    return term


def detach(term: Terminal) -> None:
    """Ctrl-] ends the attach with status 0 and the terminal as it was."""
    term.type(CTRL_RBRACKET)
    term.expect(b"Detached from the console")
    tail = term.expect(b"AFTER-DONE")
    assert b"rc=0" in tail, tail
    after = tail.split(b"rc=0")[1].replace(b"AFTER-DONE", b"").strip()
    assert after == term.before, (term.before, after)
    assert term.close() == 0


def shell_answers(term: Terminal) -> None:
    term.type(b"\r")  # a fresh prompt: the last one was printed before we attached
    term.type(b"echo $((6*7))\r")
    term.expect(b"42\r\n", timeout=60)


@pytest.fixture
def volar(kernel: KernelInfo, run_dir: Path) -> Iterator[Volar]:
    v = Volar(run_dir / "state")
    yield v
    # Whatever a test left running is stopped (every VM here is the test's own).
    out = v("vms", "list", "--json", ok=False)
    try:
        vms = json.loads(out)
    except ValueError:
        return
    for vm in vms:
        if vm["status"] not in ("stopped", "crashed", "failed"):
            v("vms", "stop", vm["name"], "--grace", "0", ok=False)


def seed_project(folder: Path, toml: str, files: dict[str, str]) -> Path:
    """A seed's fledge.toml, with this host's busybox instead of the download."""
    folder.mkdir(parents=True)
    text = (SEEDS / toml).read_text().replace(
        'busybox_url = "https://busybox.net/downloads/binaries/1.35.0-x86_64-linux-musl/busybox"',
        'busybox_url = "/bin/busybox"')
    (folder / "fledge.toml").write_text(text)
    for name, body in files.items():
        (folder / name).write_text(body)
        (folder / name).chmod(0o755)
    return folder / "fledge.toml"


def install(volar: Volar, folder: Path, manifest: dict[str, Any], image: Path) -> None:
    """The manifest a user writes by hand, completed by `fledge manifest update`."""
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    done = subprocess.run([sys.executable, "-m", "builder.cli", "manifest", "update",
                           str(path), "--image", str(image)], cwd=REPO, env=volar.env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    volar("plugins", "install", "--manifest", str(path))


def agentless_vm_lifecycle(volar: Volar, name: str, plugin: str, marker: str) -> None:
    out = volar("vms", "create", name, "--plugin", plugin, "--timeout", "600")
    assert "Agent: none" in out
    listed = volar("vms", "list")
    assert any(line.split()[:1] == [name] and "running" in line.split()
               for line in listed.splitlines()), listed
    info = volar.show(name)
    assert (info["status"], info["agent"]) == ("running", "none")
    volar.console_until(name, f"{marker}: up as PID 1")


def stop_cleanly(volar: Volar, name: str) -> None:
    out = volar("vms", "stop", name, "--grace", "3")
    assert f"VM {name} stopped" in out
    info = volar.show(name)
    assert info["status"] == "stopped"
    # The seeds' inits do not handle the ACPI button: the grace ends in a kill.
    assert "killed" in info["detail"] or "powered off" in info["detail"]
    volar("vms", "delete", name)


def test_custom_init_plugin_runs_and_stops_without_kestrel(volar: Volar, run_dir: Path) -> None:
    folder = run_dir / "custom"
    toml = seed_project(folder, "custom_init.toml",
                        {"my-init": INIT.format(marker="custom-init"),
                         "myapp": "#!/bin/sh\necho myapp\n"})
    image = fledge_build(toml, folder / "plugin.cpio.gz")
    install(volar, folder, {"name": "custom", "version": "0.1.0",
                            "initramfs": {"url": str(image)}}, image)
    agentless_vm_lifecycle(volar, "custom-vm", "custom", "custom-init")
    stop_cleanly(volar, "custom-vm")


def test_none_mode_plugin_console_is_interactive_for_two(volar: Volar, run_dir: Path) -> None:
    folder = run_dir / "none"
    toml = seed_project(folder, "none_init.toml",
                        {"my-supervisor": INIT.format(marker="none-mode")})
    image = fledge_build(toml, folder / "plugin.cpio.gz")
    install(volar, folder, {"name": "nonemode", "version": "0.1.0",
                            "initramfs": {"url": str(image)}}, image)
    agentless_vm_lifecycle(volar, "none-vm", "nonemode", "none-mode")
    first = attach(volar, "none-vm")
    second = attach(volar, "none-vm")
    shell_answers(first)
    second.expect(b"42\r\n")  # both attachers see the guest's output
    detach(second)
    first.type(b"echo still-$((1+1))\r")
    first.expect(b"still-2\r\n")
    detach(first)
    stop_cleanly(volar, "none-vm")


def test_debug_shell_on_the_console_of_a_kestrel_vm(volar: Volar, run_dir: Path,
                                                    kestrel_image: Path) -> None:
    folder = run_dir / "web"
    folder.mkdir()
    install(volar, folder, {**HTTPD, "initramfs": {"url": str(kestrel_image)}}, kestrel_image)
    out = volar("vms", "create", "web", "--plugin", "web", "--debug-shell", "--timeout", "600")
    assert "Debug shell" in out
    volar.console_until("web", "debug shell on /dev/ttyS0")
    term = attach(volar, "web")
    shell_answers(term)
    # The seeds' troubleshooting step: the manifest the VM was given.
    term.type(b"cat /proc/cmdline\r")
    line = term.expect(b"\r\n/ # ", timeout=60).decode(errors="replace")
    manifest_word = next(w for w in volar.show("web")["cmdline"].split()
                         if w.startswith("volant.manifest="))
    assert manifest_word in line.split()
    assert "kestrel.debug_shell=1" in line.split()
    # The shell is not the workload: exiting it changes nothing but the shell.
    term.type(b"exit\r")
    term.expect(b"starting a new one")
    term.expect(b"debug shell on /dev/ttyS0")
    shell_answers(term)
    detach(term)
    assert volar.show("web")["status"] in ("running", "healthy")
    out = volar("vms", "stop", "web", "--grace", "5")
    info = volar.show("web")
    assert info["status"] == "stopped" and "killed" not in info["detail"], info["detail"]
    volar("vms", "delete", "web")
