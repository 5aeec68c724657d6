"""Spawning the workload with the hygiene PID 1 owes it.

posix_spawn (vfork + exec in glibc: no copy of the agent's memory), its own
process group, default signal dispositions (Python ignores SIGPIPE and
SIGXFSZ: restored), an empty signal mask (kestrel blocks signals until its
handlers exist), stdin /dev/null, stdout/stderr to pipes, and no other fd:
everything kestrel opens is close-on-exec (PEP 446), and inherited fds are
marked so at start (``seal_inherited_fds``).
"""

from __future__ import annotations

import os

# Every signal a process can catch: 1..31 less KILL and STOP, plus the
# real-time range, so setsigdef resets whatever the agent changed.
_CATCHABLE = tuple(s for s in range(1, 65) if s not in (9, 19, 32, 33))

# Shell conventions (POSIX 2.8.2): 127 not found, 126 found but not runnable.
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126


class SpawnError(Exception):
    """The entrypoint could not be started; carries the shell-style status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def oom_kills() -> int:
    """The kernel's count of OOM kills so far (/proc/vmstat oom_kill), -1 if unknown."""
    try:
        with open("/proc/vmstat", "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


class Child:
    __slots__ = ("oom_kills_before", "pgid", "pid", "stderr_fd", "stdout_fd")

    def __init__(self, pid: int, stdout_fd: int, stderr_fd: int, oom_kills_before: int) -> None:
        self.pid = pid
        self.pgid = pid  # setpgroup=0: the child leads a new group
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        # Read at spawn: a workload can be OOM-killed before the agent is up.
        self.oom_kills_before = oom_kills_before


def seal_inherited_fds() -> None:
    """Mark every inherited fd above 2 close-on-exec (the workload gets 0-2 only)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the fd listdir itself used, already closed


def resolve(argv0: str, path_env: str) -> str:
    """Find argv[0] like execvp, so a bare name works with the manifest's PATH."""
    if "/" in argv0:
        return argv0
    for d in path_env.split(":"):
        candidate = os.path.join(d or ".", argv0)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return argv0


def spawn(argv: list[str] | tuple[str, ...], env: dict[str, str], workdir: str) -> Child:
    """Start the workload; raise SpawnError(127|126, message) if it cannot start."""
    path = resolve(argv[0], env.get("PATH", "/usr/bin:/bin"))
    if "/" not in path:
        raise SpawnError(EXIT_NOT_FOUND, f"entrypoint {argv[0]!r}: not found in PATH")
    oom_before = oom_kills()
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    # posix_spawn has no chdir action in Python 3.11: the agent is single-
    # threaded here, so it steps into the workdir and back.
    try:
        os.chdir(workdir)
    except OSError as exc:
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        raise SpawnError(EXIT_NOT_FOUND, f"workdir {workdir}: {exc.strerror}") from None
    try:
        pid = os.posix_spawn(
            path,
            list(argv),
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
            ],
            setpgroup=0,
            setsigmask=(),
            setsigdef=_CATCHABLE,
        )
    except OSError as exc:
        for fd in (out_r, err_r):
            os.close(fd)
        status = EXIT_NOT_FOUND if exc.errno == 2 else EXIT_NOT_EXECUTABLE
        raise SpawnError(status, f"entrypoint {path}: {exc.strerror}") from None
    finally:
        os.chdir("/")
        os.close(out_w)
        os.close(err_w)
    return Child(pid, out_r, err_r, oom_before)


def workload_env(base: dict[str, str], *layers: dict[str, str]) -> dict[str, str]:
    """The agent's environment, then volant.env, then the manifest's; PATH ensured."""
    env = dict(base)
    for layer in layers:
        env.update(layer)
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.setdefault("HOME", "/")
    return env
