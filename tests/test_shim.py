"""The C init: builds reproducibly, mounts what kestrel needs, hands off, powers off on error.

The shim runs here as PID 1 of fresh PID/mount/UTS/net namespaces, chrooted into a
temporary root, with CAP_SYS_MODULE dropped from the bounding set (no module is ever
loaded into this machine's kernel). /dev is a tmpfs whose "console" is a bind-mounted
log file, so the shim skips devtmpfs and never writes to the host's real console.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.shim import ShimBuildError, build_shim, find_compiler

BUSYBOX = Path("/bin/busybox")


def _need_namespaces() -> None:
    if os.geteuid() != 0:
        pytest.skip(reason="needs root for unshare -pfmun and mounts")
    for tool in ("unshare", "setpriv", "chroot"):
        if shutil.which(tool) is None:
            pytest.skip(reason=f"needs {tool} (util-linux / coreutils)")
    if not BUSYBOX.is_file():
        pytest.skip(reason="needs busybox-static at /bin/busybox")


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_shim(cache_dir=tmp_path_factory.mktemp("cache"))
    except ShimBuildError as exc:
        pytest.skip(reason=f"no working C compiler: {exc}")


@dataclass
class Boot:
    returncode: int
    console: str


class Image:
    """A temporary root holding the shim at /init and a busybox-script /bin/kestrel."""

    def __init__(self, base: Path, shim: Path) -> None:
        self.base = base
        self.root = base / "root"
        for d in ("bin", "dev", "etc/kestrel"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shim, self.root / "init")
        shutil.copy2(BUSYBOX, self.root / "bin" / "busybox")
        self.modules = self.root / "lib" / "modules" / os.uname().release

    def agent(self, script: str) -> None:
        path = self.root / "bin" / "kestrel"
        path.write_text("#!/bin/busybox sh\n" + script)
        path.chmod(0o755)

    def boot(self, *, env: dict[str, str] | None = None, premount: str = "") -> Boot:
        console = self.base / "console.log"
        console.write_bytes(b"")
        script = self.base / "boot.sh"
        # Absolute tool paths: the environment is the shim's, PATH may point into the image.
        mount, chroot = shutil.which("mount"), shutil.which("chroot")
        script.write_text(
            "set -e\n"
            f"{mount} -t tmpfs -o mode=0755 tmpfs {self.root}/dev\n"
            f": > {self.root}/dev/console\n"
            f"{mount} --bind {console} {self.root}/dev/console\n"
            f"{premount}\n"
            f"exec {chroot} {self.root} /init\n"
        )
        cmd = [str(shutil.which("setpriv")), "--bounding-set", "-sys_module",
               str(shutil.which("unshare")), "-pfmun", "--mount-proc", "/bin/sh", str(script)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60,
            env=env if env is not None else {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        return Boot(returncode=proc.returncode, console=console.read_text() + proc.stderr)


@pytest.fixture
def image(tmp_path: Path, shim: Path) -> Image:
    _need_namespaces()
    return Image(tmp_path, shim)


def test_shim_is_static_and_small(shim: Path) -> None:
    out = subprocess.run(["file", "-b", str(shim)], capture_output=True, text=True)
    if out.returncode == 0:
        assert "statically linked" in out.stdout or "static-pie" in out.stdout
    assert shim.stat().st_size < 1_000_000


def test_rebuild_is_byte_identical(tmp_path: Path, shim: Path) -> None:
    again = build_shim(cache_dir=tmp_path / "other-cache")
    assert again != shim
    assert again.read_bytes() == shim.read_bytes()


def test_build_is_cached(shim: Path) -> None:
    before = shim.stat().st_mtime_ns
    assert build_shim(cache_dir=shim.parents[2]) == shim
    assert shim.stat().st_mtime_ns == before


def test_cache_key_depends_on_compiler(tmp_path: Path) -> None:
    from builder.shim import Compiler, cache_key

    cc = find_compiler()
    other = Compiler(path=cc.path, version=cc.version + " (patched)")
    assert cache_key(b"int main(){}", cc) != cache_key(b"int main(){}", other)


def test_refuses_to_run_unless_pid_1(shim: Path) -> None:
    proc = subprocess.run([str(shim)], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2
    assert "not PID 1" in proc.stderr


def test_mounts_everything_then_hands_off_to_kestrel(image: Image) -> None:
    image.agent('echo "agent pid=$$ argv0=$0 TERM=$TERM"\n'
                "/bin/busybox cat /proc/self/mountinfo\nexit 7\n")
    boot = image.boot(env={"PATH": "/bin", "TERM": "linux"})
    assert boot.returncode == 7, boot.console
    assert "kestrel-shim: modules loaded (0) in " in boot.console
    assert "ms, exec /bin/kestrel" in boot.console
    # exec'd, not forked: kestrel is PID 1 and inherits the kernel's environment.
    assert "agent pid=1 argv0=/bin/kestrel TERM=linux" in boot.console
    mounts = {}
    for line in boot.console.splitlines():
        fields = line.split()
        if " - " in line and len(fields) > 4:
            mounts[fields[4]] = line.split(" - ")[1].split()[0]
    assert mounts["/proc"] == "proc"
    assert mounts["/sys"] == "sysfs"
    assert mounts["/dev/pts"] == "devpts"
    assert mounts["/dev/shm"] == "tmpfs"
    assert mounts["/run"] == "tmpfs"
    assert mounts["/tmp"] == "tmpfs"
    # The pre-mounted /dev is kept, not shadowed by a second instance.
    assert mounts["/dev"] == "tmpfs"
    assert list(mounts).count("/dev") == 1
    assert "INIT PANIC" not in boot.console


def test_already_mounted_targets_are_left_alone(image: Image) -> None:
    # Mounting again would stack an empty instance on top and hide what is there.
    (image.root / "run").mkdir()
    image.agent("/bin/busybox cat /run/marker\n"
                "/bin/busybox grep -c ' /run ' /proc/self/mountinfo\n")
    boot = image.boot(premount=(
        f"{shutil.which('mount')} -t tmpfs tmpfs {image.root}/run && "
        f"echo premounted > {image.root}/run/marker"
    ))
    assert boot.returncode == 0, boot.console
    assert "premounted\n1\n" in boot.console


def test_devpts_is_a_private_instance_with_tty_group(image: Image) -> None:
    image.agent("/bin/busybox grep ' /dev/pts ' /proc/self/mountinfo\n")
    boot = image.boot()
    assert boot.returncode == 0, boot.console
    assert "gid=5" in boot.console and "ptmxmode=666" in boot.console


def test_missing_agent_panics_and_powers_off(image: Image) -> None:
    boot = image.boot()
    assert "INIT PANIC: exec /bin/kestrel: No such file or directory" in boot.console
    # reboot(RB_POWER_OFF) in a PID namespace kills its init with SIGINT; unshare
    # passes the signal on, so the shim's power-off shows as death by SIGINT.
    assert boot.returncode in (-signal.SIGINT, 128 + signal.SIGINT), boot.console


def test_agent_with_a_missing_interpreter_panics_naming_it(image: Image) -> None:
    path = image.root / "bin" / "kestrel"
    path.write_text("#!/opt/kestrel/bin/python3.11 -IOO\n")
    path.chmod(0o755)
    boot = image.boot()
    assert ("INIT PANIC: exec /bin/kestrel (its interpreter is missing): "
            "No such file or directory") in boot.console
    assert boot.returncode in (-signal.SIGINT, 128 + signal.SIGINT), boot.console


def test_agent_that_is_not_executable_panics(image: Image) -> None:
    image.agent("echo never\n")
    (image.root / "bin" / "kestrel").chmod(0o644)
    boot = image.boot()
    assert "INIT PANIC: exec /bin/kestrel: Permission denied" in boot.console
    assert "never" not in boot.console


def test_failing_module_is_reported_and_boot_continues(image: Image) -> None:
    image.modules.joinpath("kernel").mkdir(parents=True)
    # Not a module at all: even a kernel that somehow allowed loading rejects it.
    image.modules.joinpath("kernel", "fake.ko").write_bytes(b"not a module\n")
    (image.root / "etc/kestrel/modules.load").write_text(
        "# load order matters\n\n  kernel/fake.ko  \nkernel/absent.ko\n"
    )
    image.agent("echo agent-started\n")
    boot = image.boot()
    assert boot.returncode == 0, boot.console
    # EPERM: CAP_SYS_MODULE was dropped; ENOSYS: a kernel built without modules.
    assert re.search(
        r"^INIT: module kernel/fake\.ko: (Operation not permitted|Function not implemented)$",
        boot.console, re.M,
    ), boot.console
    assert "INIT: module kernel/absent.ko: No such file or directory" in boot.console
    assert "modules loaded (0)" in boot.console
    assert "agent-started" in boot.console
