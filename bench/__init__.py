"""kestrel's benchmarks: `python -m bench` runs every figure and prints one table.

This module holds what the host-side figures share: a tiny static C workload
(compiled at bench time), kestrel run as PID 1 of fresh PID/mount/UTS/net
namespaces with its command line bind-mounted over /proc/cmdline (CAP_SYS_MODULE
dropped), and a receiver that serves kestrel's unix socket with volar's session loop.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from host.session import SessionLoop
from host.vsock import private_listener
from kestrel.cmdline import encode_manifest
from kestrel.protocol import Dropped, Exit, Log, Message

REPO = Path(__file__).resolve().parent.parent
# Outside /tmp and /run: kestrel mounts tmpfs over those inside its namespace.
SCRATCH = Path(os.environ.get("KESTREL_BENCH_SCRATCH", "/var/tmp"))
CACHE = REPO / ".cache" / "bench"

# One static program for every workload role; static so it runs in a chroot
# that holds nothing but the frozen kestrel.
WL_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void stamp(const char *path, long long t) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror(path); exit(111); }
    dprintf(fd, "%lld\n", t);
    close(fd);
}

int main(int argc, char **argv) {
    long long t = now_ns();  /* first thing: the workload's start */
    if (argc >= 3 && strcmp(argv[1], "stamp") == 0) {
        stamp(argv[2], t);
        return 0;
    }
    if (argc >= 3 && strcmp(argv[1], "flood") == 0) {
        static char buf[65536];
        for (size_t i = 0; i < sizeof buf; i++) buf[i] = (i % 64 == 63) ? '\n' : 'a' + i % 26;
        long long left = atoll(argv[2]);
        while (left > 0) {
            ssize_t n = write(1, buf, left < (long long)sizeof buf ? (size_t)left : sizeof buf);
            if (n <= 0) { perror("write"); return 1; }
            left -= n;
        }
        if (argc >= 4) sleep(atoi(argv[3]));
        return 0;
    }
    if (argc >= 3 && strcmp(argv[1], "sleep") == 0) {
        sleep(atoi(argv[2]));
        return 0;
    }
    /* launch ROOT|- STAMP|- PROG ARGS...: chroot, record the time, exec. */
    if (argc >= 5 && strcmp(argv[1], "launch") == 0) {
        if (strcmp(argv[2], "-") != 0 && (chroot(argv[2]) != 0 || chdir("/") != 0)) {
            perror("chroot");
            return 111;
        }
        if (strcmp(argv[3], "-") != 0) stamp(argv[3], now_ns());
        execv(argv[4], &argv[4]);
        perror(argv[4]);
        return 127;
    }
    fputs("usage: wl stamp FILE | flood BYTES [SLEEP] | sleep S | launch ROOT STAMP PROG...\n",
          stderr);
    return 2;
}
"""


class Unavailable(Exception):
    """A figure's prerequisite is missing; the message says which."""


def require_namespaces() -> None:
    if os.geteuid() != 0:
        raise Unavailable("needs root for unshare -pfmun, mount and chroot")
    for tool in ("unshare", "setpriv", "mount", "gcc"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} not found")


def require_kestrel_runtime() -> None:
    if not (REPO / "kestrel" / "main.py").is_file():
        raise Unavailable("kestrel/main.py (the kestrel runtime) is not there yet")


def workload_binary() -> Path:
    """Compile the static workload once per source version."""
    require_namespaces()
    import hashlib

    digest = hashlib.sha256(WL_C.encode()).hexdigest()[:12]
    out = CACHE / f"wl-{digest}"
    if out.is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    src = CACHE / f"wl-{digest}.c"
    src.write_text(WL_C)
    res = subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(src)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise Unavailable(f"gcc -static failed (libc6-dev static libs?): {res.stderr[-300:]}")
    return out


def frozen_root(work: Path, wl: Path) -> Path:
    """A chroot-able copy of the frozen kestrel tree with the workload at /wl."""
    from builder.freeze import freeze_kestrel

    try:
        frozen = freeze_kestrel(cache_dir=CACHE)
    except Exception as exc:  # FreezeError and whatever a missing tool raises
        raise Unavailable(f"freeze_kestrel failed: {exc}") from None
    root = work / "root"
    shutil.copytree(frozen.root, root, symlinks=True)
    for d in ("proc", "sys", "dev", "tmp", "run", "var"):
        (root / d).mkdir(exist_ok=True)
    shutil.copy2(wl, root / "wl")
    return root


def kestrel_cmdline(entrypoint: list[str], *, socket_path: str) -> str:
    doc = {
        "name": "bench", "version": "0.0.1", "initramfs": {"url": "/dev/null"},
        "workload": {"type": "exec", "entrypoint": entrypoint, "workdir": "/"},
    }
    enc = encode_manifest(json.dumps(doc).encode())
    return f"console=ttyS0 volant.manifest={enc} kestrel.channel=unix:{socket_path}\n"


@dataclass
class Received:
    """What the host saw on kestrel's channel."""

    log_bytes: int = 0
    log_records: int = 0
    seq_gaps: int = 0  # by our own check of Log/Dropped sequence numbers
    lost: int = 0  # HostSession.lost
    duplicates: int = 0
    dropped: int = 0
    connections: int = 0
    exit: Exit | None = None
    t_first_log: float = 0.0
    t_last_log: float = 0.0


class Receiver(threading.Thread):
    """volar's own session loop (host.session) on kestrel's unix socket, counting.

    Its own thread with its own trio run: the bench drives a subprocess and
    samples /proc with blocking calls while this drains the socket.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.got = Received()
        self.loop = SessionLoop(self, say=lambda line: None)
        self._expect = 1
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def record(self, messages: list[Message]) -> None:
        """The loop's sink: count, check sequence numbers (acked after this returns)."""
        got, session, now = self.got, self.loop.session, time.monotonic()
        for msg in messages:
            if isinstance(msg, Log):
                if not got.log_records:
                    got.t_first_log = now
                got.t_last_log = now
                got.log_bytes += len(msg.data)
                got.log_records += 1
            if isinstance(msg, Dropped):
                got.seq_gaps += msg.first_seq != self._expect
                self._expect = msg.last_seq + 1
            elif msg.SEQUENCED:
                got.seq_gaps += msg.seq != self._expect  # type: ignore[attr-defined]
                self._expect = msg.seq + 1  # type: ignore[attr-defined]
            if isinstance(msg, Exit):
                got.exit = msg
        got.lost, got.duplicates, got.dropped = session.lost, session.duplicates, session.dropped
        got.connections = self.loop.connections

    def start(self) -> None:
        super().start()
        self._ready.wait(10)  # the socket exists before kestrel starts
        if self._error is not None:
            raise self._error

    def run(self) -> None:
        trio.run(self._main)

    async def _main(self) -> None:
        try:
            listener = await private_listener(self.path)
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        with trio.CancelScope() as scope:
            self._scope, self._token = scope, trio.lowlevel.current_trio_token()
            self._ready.set()
            await self.loop.serve_listener(listener)

    def close(self) -> None:
        if self._token is not None and self._scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self.join(timeout=5)


@dataclass
class NsRun:
    returncode: int | None
    console: str
    elapsed_s: float
    host_pid: int
    rss_kb: list[tuple[float, int]] = field(default_factory=list)  # (t since start, VmRSS)


def _child_of(pid: int) -> int:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0
    return int(kids[0]) if kids else 0


def vm_rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_pid1(script: str, args: list[str], *, timeout: float = 120,
             sample_every: float | None = None) -> NsRun:
    """Run ``sh -c script args...`` as PID 1 of fresh namespaces; wait for its end.

    kestrel's power-off in a PID namespace kills the namespace init with
    SIGINT: returncode -2 is a clean power-off.
    """
    argv = ["setpriv", "--bounding-set", "-sys_module",
            "unshare", "-pfmun", "--mount-proc", "--kill-child", "sh", "-c", script, *args]
    with tempfile.TemporaryFile() as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        host_pid = 0
        samples: list[tuple[float, int]] = []
        try:
            deadline = t0 + timeout
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"namespace run did not end in {timeout} s")
                if not host_pid:
                    host_pid = _child_of(proc.pid)
                elif sample_every is not None:
                    rss = vm_rss_kb(host_pid)
                    if rss:
                        samples.append((time.monotonic() - t0, rss))
                time.sleep(sample_every or 0.005)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        elapsed = time.monotonic() - t0
        out.seek(0)
        console = out.read().decode(errors="replace")
    return NsRun(proc.returncode, console, elapsed, host_pid, samples)


class KestrelRun:
    """One kestrel boot in a namespace: frozen (chroot) or the source tree's python."""

    def __init__(self, work: Path, *, frozen: Path | None, wl: Path) -> None:
        self.work = work
        self.frozen = frozen
        self.wl = wl

    def run(self, workload: list[str], *, timeout: float = 120,
            sample_every: float | None = None) -> tuple[NsRun, Received, float | None]:
        """Boot kestrel with ``workload`` (argv after /wl); return run, channel, t0 stamp."""
        require_kestrel_runtime()
        tag = f"{time.monotonic_ns()}"
        if self.frozen is not None:
            root = self.frozen
            sock_host, sock_ns = root / "var" / f"agent-{tag}.sock", f"/var/agent-{tag}.sock"
            stamp_host, stamp_ns = root / f"t0-{tag}", f"/t0-{tag}"
            entry = ["/wl", *workload]
        else:
            sock_host = sock_ns_path = self.work / f"agent-{tag}.sock"
            sock_ns = str(sock_ns_path)
            stamp_host = self.work / f"t0-{tag}"
            stamp_ns = str(stamp_host)
            entry = [str(self.wl), *workload]
        cmdline = self.work / f"cmdline-{tag}"
        cmdline.write_text(kestrel_cmdline(entry, socket_path=sock_ns))
        receiver = Receiver(sock_host)
        receiver.start()
        try:
            if self.frozen is not None:
                # The state the shim leaves in a real image: every filesystem
                # kestrel wants is mounted (shim/init.c's table, cgroup2 best
                # effort like the shim's), so kestrel's boot path (like in a
                # VM) mounts nothing itself and never loads ctypes to do so.
                script = ('r="$1"; mkdir -p "$r/proc" "$r/sys" "$r/dev" "$r/run" "$r/tmp" && '
                          'mount -t proc proc "$r/proc" && mount --bind "$0" "$r/proc/cmdline" && '
                          'mount -t sysfs sys "$r/sys" && mount -t devtmpfs dev "$r/dev" && '
                          'mkdir -p "$r/dev/pts" "$r/dev/shm" && '
                          'mount -t devpts -o newinstance devpts "$r/dev/pts" && '
                          'mount -t tmpfs shm "$r/dev/shm" && mount -t tmpfs run "$r/run" && '
                          'mount -t tmpfs tmp "$r/tmp" && '
                          '{ mount -t cgroup2 cgroup2 "$r/sys/fs/cgroup" || true; } && '
                          'exec "$2" launch "$r" "$3" /bin/kestrel')
                args = [str(cmdline), str(self.frozen), str(self.wl), stamp_ns]
            else:
                boot = (f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                        "from kestrel.main import main; main()")
                script = ('mount --bind "$0" /proc/cmdline && '
                          'exec "$1" launch - "$2" "$3" -I -c "$4"')
                args = [str(cmdline), str(self.wl), stamp_ns, sys.executable, boot]
            ns = run_pid1(script, args, timeout=timeout, sample_every=sample_every)
            time.sleep(0.05)  # the last frames in flight
        finally:
            receiver.close()
            sock_host.unlink(missing_ok=True)
        t0 = None
        if stamp_host.is_file():
            t0 = int(stamp_host.read_text()) / 1e9
            stamp_host.unlink()
        return ns, receiver.got, t0


def kestrel_runner(work: Path, *, prefer_frozen: bool = True) -> tuple[KestrelRun, str]:
    """A runner and a label saying which kestrel it runs."""
    wl = workload_binary()
    if prefer_frozen:
        try:
            return KestrelRun(work, frozen=frozen_root(work, wl), wl=wl), "frozen"
        except Unavailable:
            pass
    return KestrelRun(work, frozen=None, wl=wl), f"source tree on {Path(sys.executable).name}"


def work_dir() -> Path:
    """A scratch directory (chroot copies, sockets, images), removed when the bench exits."""
    path = Path(tempfile.mkdtemp(prefix="kestrel-bench-", dir=SCRATCH))
    atexit.register(shutil.rmtree, path, True)
    return path


def describe_exit(ns: NsRun) -> str:
    tail = " | ".join(ns.console.strip().splitlines()[-3:])
    return f"exit {ns.returncode}, console: {tail[:300]}"


__all__ = [
    "CACHE", "REPO", "KestrelRun", "NsRun", "Received", "Receiver", "Unavailable",
    "describe_exit", "frozen_root", "kestrel_cmdline", "kestrel_runner", "require_namespaces",
    "run_pid1", "vm_rss_kb", "work_dir", "workload_binary",
]
