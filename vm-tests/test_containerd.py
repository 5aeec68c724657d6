"""containerd-shim-kestrel-v1 under a real containerd: one container, one microVM.

Debian's containerd runs privately (its own root, state, sockets, config);
the image is built here from static busybox and imported with ctr. Each
test ends with containerd knowing no task and no container, and with no
QEMU, monitor or shim left behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from containerd_env import IMAGE, RUNTIME, Containerd, oci_archive, processes_mentioning

from host.kernel import KernelInfo

RUN = ("run", "--runtime", RUNTIME)
# The same busybox, with the image config's User set: ctr 1.6 has no --user.
USER_IMAGE = "docker.io/kestrel/busybox-user:test"
WAIT_S = 180


@pytest.fixture(scope="module")
def shim_root(kestrel_image: Path, kernel: KernelInfo,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    import shutil
    import tempfile

    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.skip(reason="containerd is not installed (apt-get install containerd)")
    # Short: the VMs' unix sockets live under it.
    base = Path(tempfile.mkdtemp(prefix="kcd-"))
    (base / "shim.json").write_text(json.dumps({
        "initramfs": str(kestrel_image), "state_dir": str(base / "shim")}))
    oci_archive(Path("/bin/busybox"), base / "busybox-oci.tar")
    oci_archive(Path("/bin/busybox"), base / "busybox-user-oci.tar", name=USER_IMAGE,
                user="1000:1000")
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def containerd(shim_root: Path) -> Iterator[Containerd]:
    c = Containerd(shim_root, shim_config=shim_root / "shim.json")
    c.start()
    try:
        c.ctr("image", "import", str(shim_root / "busybox-oci.tar"))
        c.ctr("image", "import", str(shim_root / "busybox-user-oci.tar"))
        yield c
    finally:
        c.stop()


@pytest.fixture
def ctrd(containerd: Containerd, shim_root: Path) -> Iterator[Containerd]:
    """The module's containerd, checked clean after the test (and cleaned if not)."""
    yield containerd
    leftovers = []
    tasks = containerd.ctr("task", "ls", "-q", quiet=True).stdout.split()
    containers = containerd.ctr("container", "ls", "-q", quiet=True).stdout.split()
    for task in tasks:
        containerd.ctr("task", "kill", "-s", "9", task, check=False, quiet=True)
        containerd.ctr("task", "rm", "-f", task, check=False, quiet=True)
    for c in containers:
        containerd.ctr("container", "rm", c, check=False, quiet=True)
    if tasks or containers:
        leftovers.append(f"tasks {tasks}, containers {containers}")
    deadline = time.monotonic() + 30
    # QEMU and monitors name the shims' state dir; shim daemons, containerd's socket.
    while (procs := processes_mentioning(str(shim_root / "shim"))
           + processes_mentioning(f"-address {containerd.socket}")) and (
            time.monotonic() < deadline):
        time.sleep(0.2)
    if procs:
        leftovers.append(f"processes {procs}")
    assert not leftovers, f"left behind: {leftovers}\n{containerd.log_tail()}"


def _until(check: object, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not callable(check) or not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _task_status(c: Containerd, name: str) -> str:
    for line in c.ctr("task", "ls", quiet=True).stdout.splitlines()[1:]:
        words = line.split()
        if words and words[0] == name:
            return words[-1]
    return ""


def test_run_prints_the_workloads_output(ctrd: Containerd) -> None:
    done = ctrd.ctr(*RUN, "--rm", IMAGE, "c1", "echo", "hello")
    assert done.stdout == "hello\n"


def test_the_exit_status_is_ctrs(ctrd: Containerd) -> None:
    done = ctrd.ctr(*RUN, "--rm", IMAGE, "c1", "sh", "-c", "echo bye >&2; exit 3", check=False)
    assert done.returncode == 3, done.stderr
    assert "bye" in done.stderr


def test_task_kill_ends_a_sleeping_task_with_143_and_ps_lists_it(ctrd: Containerd) -> None:
    run = ctrd.ctr_popen(*RUN, "--rm", IMAGE, "c1", "sleep", "1000")
    try:
        _until(lambda: _task_status(ctrd, "c1") == "RUNNING", "c1 running")
        ps = ctrd.ctr("task", "ps", "c1").stdout.splitlines()
        assert ps[0].split()[0] == "PID" and len(ps) == 2, ps
        pid = int(ps[1].split()[0])
        assert "qemu-system" in Path(f"/proc/{pid}/cmdline").read_text()
        ctrd.ctr("task", "kill", "c1")
        _out, err = run.communicate(timeout=WAIT_S)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 143, err


def test_a_detached_tasks_output_reaches_its_log_file(ctrd: Containerd, tmp_path: Path) -> None:
    log = tmp_path / "c1.log"
    ctrd.ctr(*RUN, "-d", "--log-uri", f"file://{log}", IMAGE, "c1",
             "sh", "-c", "echo to-stdout; echo to-stderr >&2")
    _until(lambda: _task_status(ctrd, "c1") == "STOPPED", "c1 stopped")
    ctrd.ctr("task", "rm", "c1")
    ctrd.ctr("container", "rm", "c1")
    text = log.read_text()
    assert "to-stdout\n" in text and "to-stderr\n" in text


def test_two_containers_run_at_once(ctrd: Containerd) -> None:
    runs = {name: ctrd.ctr_popen(*RUN, "--rm", IMAGE, name, "sh", "-c",
                                 "echo up $(hostname); sleep 1000")
            for name in ("c1", "c2")}
    try:
        _until(lambda: all(_task_status(ctrd, n) == "RUNNING" for n in runs), "both running")
        for name in runs:
            ctrd.ctr("task", "kill", name)
        outs = {name: run.communicate(timeout=WAIT_S) for name, run in runs.items()}
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()
    for name, run in runs.items():
        assert run.returncode == 143, outs[name]
        assert outs[name][0] == f"up {name}\n"


def _ctr_on_a_pty(c: Containerd, *args: str, timeout: float = WAIT_S,
                  size: tuple[int, int] | None = None) -> tuple[int, str]:
    """ctr with a terminal of its own (ctr -t needs one), ``size`` rows x columns:
    its status and what it printed."""
    import fcntl
    import os
    import struct
    import subprocess
    import termios

    master, slave = os.openpty()
    if size is not None:
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    cmd = ["ctr", "--address", str(c.socket), "--namespace", "kestrel-test", *args]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer of the pty is gone
                break
            if not chunk:
                break
            out += chunk
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out.decode(errors="replace")


def test_exec_runs_beside_the_workload_with_stdin_status_and_a_terminal(
        ctrd: Containerd) -> None:
    ctrd.ctr(*RUN, "-d", IMAGE, "c1", "sleep", "1000")
    try:
        done = ctrd.ctr("task", "exec", "--exec-id", "e1", "c1", "cat", "/etc/hostname")
        assert done.stdout == "kestrel-image\n"
        done = ctrd.ctr("task", "exec", "--exec-id", "e2", "c1", "sh", "-c",
                        "read x; echo got $x; echo err >&2", input=b"hi\n")
        assert done.stdout == "got hi\n" and "err" in done.stderr
        done = ctrd.ctr("task", "exec", "--exec-id", "e3", "c1", "sh", "-c", "exit 5",
                        check=False)
        assert done.returncode == 5
        status, out = _ctr_on_a_pty(ctrd, "task", "exec", "-t", "--exec-id", "e4", "c1",
                                    "sh", "-c", "tty; stty size")
        assert status == 0, out
        assert "/dev/pts/" in out
        done = ctrd.ctr("task", "exec", "--exec-id", "e5", "c1", "/bin/nosuch", check=False)
        assert done.returncode != 0 and "nosuch" in done.stderr
    finally:
        ctrd.ctr("task", "kill", "c1", check=False)
        _until(lambda: _task_status(ctrd, "c1") == "STOPPED", "c1 stopped")
        ctrd.ctr("task", "rm", "c1")
        ctrd.ctr("container", "rm", "c1")


# --- the container's own process with stdin, a terminal, a user (an exec session) ----

def test_stdin_reaches_the_containers_process(ctrd: Containerd) -> None:
    done = ctrd.ctr(*RUN, "--rm", IMAGE, "c1", "sh", "-c", "cat; echo done",
                    input=b"hi\nthere\n")
    assert done.stdout == "hi\nthere\ndone\n", done.stderr


def test_run_t_gives_the_process_a_terminal_of_ctrs_size(ctrd: Containerd) -> None:
    # ctr sends its terminal's size (ResizePty) just after Start: wait for it to land.
    script = ('for i in $(seq 300); do [ "$(stty size)" = "33 77" ] && break; sleep 0.1; done; '
              "tty; stty size; exit 4")
    status, out = _ctr_on_a_pty(ctrd, *RUN, "--rm", "-t", IMAGE, "c1", "sh", "-c", script,
                                size=(33, 77))
    assert status == 4, out
    assert "/dev/pts/" in out and "33 77" in out, out


def test_the_images_user_runs_the_process_and_kill_still_ends_it(ctrd: Containerd) -> None:
    done = ctrd.ctr(*RUN, "--rm", USER_IMAGE, "c1", "sh", "-c", "id -u; id -g")
    assert done.stdout == "1000\n1000\n", done.stderr
    run = ctrd.ctr_popen(*RUN, "--rm", USER_IMAGE, "c2", "sleep", "1000")
    try:
        _until(lambda: _task_status(ctrd, "c2") == "RUNNING", "c2 running")
        ctrd.ctr("task", "kill", "c2")
        _out, err = run.communicate(timeout=WAIT_S)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 143, err


# --- bad input and failures: one clear line, nothing left behind ---------------------

def _no_vm_left(c: Containerd, shim_root: Path, name: str = "c1") -> None:
    from host.containerd.config import socket_path

    sock = socket_path(str(c.socket), "kestrel-test", name)
    _until(lambda: not sock.exists(), f"the shim socket {sock} removed", timeout=60)
    _until(lambda: not processes_mentioning(f"{shim_root}/shim/vms/kestrel-test.{name}"),
           f"{name}'s QEMU and monitor gone", timeout=60)
    assert not list((shim_root / "shim" / "images").glob("container-*")), "uncached image left"
    assert str(shim_root) not in Path("/proc/self/mountinfo").read_text(), "rootfs left mounted"


def test_a_program_missing_from_the_rootfs_is_named(ctrd: Containerd, shim_root: Path) -> None:
    done = ctrd.ctr(*RUN, "--rm", IMAGE, "c1", "/bin/nosuch", "arg", check=False)
    assert done.returncode != 0
    assert "'/bin/nosuch': no such executable in the container's rootfs" in done.stderr
    _no_vm_left(ctrd, shim_root)


def test_a_config_a_vm_cannot_honour_is_refused_by_key(ctrd: Containerd,
                                                       shim_root: Path) -> None:
    done = ctrd.ctr(*RUN, "--rm", "--with-ns", "network:/proc/1/ns/net", IMAGE, "c1",
                    "echo", "x", check=False)
    assert done.returncode != 0
    assert "linux.namespaces: joining the network namespace at /proc/1/ns/net" in done.stderr
    _no_vm_left(ctrd, shim_root)


def test_a_task_survives_containerd_being_killed_and_is_reported_after_restart(
        ctrd: Containerd, shim_root: Path) -> None:
    import signal

    ctrd.ctr(*RUN, "-d", IMAGE, "c1", "sh", "-c", "echo started; sleep 1000")
    ctrd.stop(signal.SIGKILL)
    ctrd.start()
    assert _task_status(ctrd, "c1") == "RUNNING"
    ctrd.ctr("task", "exec", "--exec-id", "e1", "c1", "true")  # the shim still answers
    ctrd.ctr("task", "kill", "c1")
    _until(lambda: _task_status(ctrd, "c1") == "STOPPED", "c1 stopped")
    ctrd.ctr("task", "rm", "c1")
    ctrd.ctr("container", "rm", "c1")
    _no_vm_left(ctrd, shim_root)


def test_a_shim_killed_with_sigkill_takes_its_vm_with_it(ctrd: Containerd,
                                                        shim_root: Path) -> None:
    import os
    import signal

    ctrd.ctr(*RUN, "-d", IMAGE, "c1", "sleep", "1000")
    shims = [pid for pid, cmd in processes_mentioning("host.containerd.shim")
             if str(ctrd.socket) in cmd and " -id c1 " in f"{cmd} "]
    assert len(shims) == 1, shims
    os.kill(shims[0], signal.SIGKILL)
    # containerd runs `containerd-shim-kestrel-v1 delete`, which stops the VM.
    _no_vm_left(ctrd, shim_root)
    _until(lambda: _task_status(ctrd, "c1") in ("", "STOPPED"), "c1 no longer running")
    ctrd.ctr("task", "rm", "c1", check=False, quiet=True)
    ctrd.ctr("container", "rm", "c1")


def test_the_rootfs_image_is_built_once_and_limits_size_the_vm(ctrd: Containerd,
                                                              shim_root: Path) -> None:
    images = shim_root / "shim" / "images"
    ctrd.ctr(*RUN, "--rm", IMAGE, "c1", "true")
    (cached,) = images.glob("*.ext4")
    built = cached.stat().st_mtime_ns
    done = ctrd.ctr(*RUN, "--rm", "--memory-limit", str(300 << 20), IMAGE, "c1",
                    "sh", "-c", "cat /proc/meminfo")
    assert [p.name for p in images.glob("*.ext4")] == [cached.name]
    assert cached.stat().st_mtime_ns == built  # the second start did not rebuild it
    total_kb = int(next(line.split()[1] for line in done.stdout.splitlines()
                        if line.startswith("MemTotal:")))
    assert 256 << 10 < total_kb <= 300 << 10, done.stdout  # the limit, not the 256 MB default
