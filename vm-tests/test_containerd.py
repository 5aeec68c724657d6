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
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def containerd(shim_root: Path) -> Iterator[Containerd]:
    c = Containerd(shim_root, shim_config=shim_root / "shim.json")
    c.start()
    try:
        c.ctr("image", "import", str(shim_root / "busybox-oci.tar"))
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
    while (procs := processes_mentioning(str(shim_root / "shim"))) and (
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
