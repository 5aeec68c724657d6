"""``logging`` inside kestrel's frozen bundle.

Only trio imports it, for three module-level loggers it writes to when an
async generator, an instrument or a listener fails. kestrel configures no
logging, so the standard module would print those records through its
last-resort handler: the message (and traceback) on stderr, WARNING and up.
This stand-in does the same without the standard module (~200 KB of PID 1's
heap). Any other use fails with a message naming it.
"""

from __future__ import annotations

import sys

__kestrel_stub__ = True

CRITICAL, ERROR, WARNING, INFO, DEBUG, NOTSET = 50, 40, 30, 20, 10, 0


class Logger:
    def __init__(self, name: str) -> None:
        self.name = name
        self.level = NOTSET

    def isEnabledFor(self, level: int) -> bool:
        return level >= WARNING

    def log(self, level: int, msg: object, *args: object, exc_info: object = None,
            **_kwargs: object) -> None:
        if level < WARNING:
            return
        text = str(msg) % args if args else str(msg)
        if exc_info:
            import traceback

            exc = sys.exc_info() if exc_info is True else exc_info
            if isinstance(exc, BaseException):
                exc = (type(exc), exc, exc.__traceback__)
            if isinstance(exc, tuple) and exc[0] is not None:
                text += "\n" + "".join(traceback.format_exception(*exc)).rstrip("\n")
        try:
            sys.stderr.write(text + "\n")
        except (OSError, ValueError):
            pass

    def debug(self, msg: object, *args: object, **kwargs: object) -> None:
        self.log(DEBUG, msg, *args, **kwargs)

    def info(self, msg: object, *args: object, **kwargs: object) -> None:
        self.log(INFO, msg, *args, **kwargs)

    def warning(self, msg: object, *args: object, **kwargs: object) -> None:
        self.log(WARNING, msg, *args, **kwargs)

    def error(self, msg: object, *args: object, **kwargs: object) -> None:
        self.log(ERROR, msg, *args, **kwargs)

    def critical(self, msg: object, *args: object, **kwargs: object) -> None:
        self.log(CRITICAL, msg, *args, **kwargs)

    def exception(self, msg: object, *args: object, exc_info: object = True,
                  **kwargs: object) -> None:
        self.log(ERROR, msg, *args, exc_info=exc_info, **kwargs)


_loggers: dict[str, Logger] = {}


def getLogger(name: str | None = None) -> Logger:
    key = name or "root"
    if key not in _loggers:
        _loggers[key] = Logger(key)
    return _loggers[key]


def __getattr__(name: str) -> object:
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    raise AttributeError(f"logging.{name} is not available in kestrel's frozen agent (its bundle "
                         "ships a stub logging module; kestrel itself never uses it)")
