"""The opt-in debug shell on the serial console (``kestrel.debug_shell=1``).

An unauthenticated root shell, so it runs only when the command line asks.
The shell leads its own session with the console as its controlling
terminal (job control works, Ctrl-C reaches the shell and never kestrel),
is respawned when it exits, and is never the workload: the reaper reaps it
like any child and nothing else waits for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

from kestrel.reaper import Reaper
from kestrel.spawn import _CATCHABLE

SHELL = "/bin/sh"
# A shell that dies at once (a broken /bin/sh, a console that hangs up) must
# not turn into a respawn loop that floods the console.
RESPAWN_MIN_S = 1.0
# Documentation/ABI/testing/sysfs-tty: the consoles from console=, "the last
# entry in the file is the active device connected to /dev/console".
ACTIVE_CONSOLES = "/sys/class/tty/console/active"
FALLBACK_TTY = "/dev/ttyS0"


def console_tty() -> str:
    """The serial console's own device: /dev/console itself cannot be a
    controlling terminal (the tty layer refuses it), so no job control there."""
    try:
        with open(ACTIVE_CONSOLES) as f:
            names = f.read().split()
    except OSError:
        names = []
    for name in reversed(names):
        if os.path.exists(f"/dev/{name}"):
            return f"/dev/{name}"
    return FALLBACK_TTY


def spawn_shell(tty: str, env: dict[str, str]) -> int:
    """/bin/sh on ``tty`` in a new session; opening the tty after setsid makes it
    the session's controlling terminal (glibc runs setsid before file actions)."""
    return os.posix_spawn(
        SHELL,
        [SHELL],
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, tty, os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ],
        setsid=True,
        setsigmask=(),
        setsigdef=_CATCHABLE,
    )


async def run(reaper: Reaper, env: dict[str, str], say: Callable[[str], None]) -> None:
    """Keep a shell on the console until kestrel powers off."""
    tty = console_tty()
    while True:
        started = trio.current_time()
        try:
            pid = spawn_shell(tty, env)
        except OSError as exc:
            say(f"debug shell: cannot start {SHELL} on {tty}: {exc.strerror}; giving up")
            return
        reaper.watch(pid)  # before any await: the reaper must keep its status
        say(f"debug shell on {tty} (pid {pid}): unauthenticated root, "
            "enabled by kestrel.debug_shell=1")
        status = await reaper.wait(pid)
        say(f"debug shell {status.describe()}; starting a new one")
        await trio.sleep(max(0.0, RESPAWN_MIN_S - (trio.current_time() - started)))
