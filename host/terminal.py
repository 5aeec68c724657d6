"""The local terminal in raw mode, given back on every exit path.

``raw_terminal(fd)`` saves the terminal's settings, makes it raw and
restores it when the block ends: normally, on an exception, and on SIGTERM,
SIGHUP or SIGQUIT, which it turns into ``TerminalSignal`` so the restore
runs instead of the process dying with the terminal still raw. In raw mode
Ctrl-C and Ctrl-Z are plain bytes for the remote side, not signals.
"""

from __future__ import annotations

import signal
import termios
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

RESTORING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class TerminalSignal(Exception):
    """A signal arrived while the terminal was raw; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


def _raise(signum: int, _frame: FrameType | None) -> None:
    raise TerminalSignal(signum)


@contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    handlers = {s: signal.signal(s, _raise) for s in RESTORING_SIGNALS}
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        # TCSADRAIN: what was written in raw mode is shown as raw, not re-cooked.
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        for s, old in handlers.items():
            signal.signal(s, old)
