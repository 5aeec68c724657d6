"""The workload first: kestrel yields the CPU while it imports its agent.

After the spawn, kestrel imports trio and its agent (seconds of TCG time on a
one-vCPU guest) while the workload is starting on the same vCPU. During those
imports kestrel runs at nice 19, so the workload wins every contest for the
CPU, and kestrel returns to nice 0 as soon as one of these happens:
- the workload accepts connections on its base_url (it is up: the first
  health check must not wait for kestrel's imports any longer);
- COURTESY_MAX_S have passed (a CPU-bound workload cannot hold kestrel's
  reaping, signals or stop back for longer than that);
- the imports are done.
A SIGALRM interval timer drives the checks: its handler runs between two
bytecodes of whatever module is being imported, so the time cap holds even
in the middle of a long module body. No thread: a second thread would need
the GIL from a starved main thread.

``defer_imports`` makes the agent's imports smaller still: a module trio
imports but kestrel never uses is loaded on first use instead.

Boot path: C-backed modules only (os, time, _signal, _socket).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # C module: `signal` imports enum
import _socket
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType

    from kestrel.manifest import BaseUrl

NICE = 19
COURTESY_MAX_S = 3.0
TICK_S = 0.05
PROBE_TIMEOUT_S = 0.1
_SIGALRM = 14
_SIG_BLOCK, _SIG_UNBLOCK = 0, 1


def address(url: BaseUrl | None) -> tuple[str, int] | None:
    """The workload's (host, port) when its host is a numeric IPv4 address, else None."""
    if url is None:
        return None
    parts = url.host.split(".")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        return None  # a name would need a resolver: the time cap alone applies
    return url.host, url.port


def listening(addr: tuple[str, int]) -> bool:
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        # Not non-blocking: even on loopback that answers EINPROGRESS whether
        # or not anyone listens. The guest's own address answers at once.
        s.settimeout(PROBE_TIMEOUT_S)
        return bool(s.connect_ex(addr) == 0)
    finally:
        s.close()


class Courtesy:
    """Nice 19 from start() until stop(), the workload listening, or the time cap."""

    def __init__(self, addr: tuple[str, int] | None, *, max_s: float = COURTESY_MAX_S) -> None:
        self.addr = addr
        self.max_s = max_s
        self.deadline = 0.0
        self.active = False
        self.ended_by = ""
        self.ended_at = 0.0  # CLOCK_BOOTTIME, like the boot timeline
        self._busy = False

    def start(self) -> None:
        if self.max_s <= 0:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, 0, NICE)
        except OSError:
            return
        self.active = True
        self.deadline = time.monotonic() + self.max_s
        _signal.signal(_SIGALRM, self._tick)
        _signal.setitimer(_signal.ITIMER_REAL, TICK_S, TICK_S)
        _signal.pthread_sigmask(_SIG_UNBLOCK, (_SIGALRM,))

    def _tick(self, _signum: int, _frame: FrameType | None) -> None:
        # Runs inside whatever import is in progress: it must never raise. A
        # tick arriving during the probe's connect would re-enter: skipped.
        if self._busy or not self.active:
            return
        self._busy = True
        try:
            if time.monotonic() >= self.deadline:
                self.stop("time cap")
            elif self.addr is not None and listening(self.addr):
                self.stop("workload listening")
        except Exception as exc:
            self.stop(f"check failed: {exc}")
        finally:
            self._busy = False

    def stop(self, why: str) -> None:
        if not self.active:
            return
        self.active = False
        self.ended_by = why
        self.ended_at = time.clock_gettime(time.CLOCK_BOOTTIME)
        # Blocked again first, then disarmed; a tick already pending is
        # consumed here, so the agent never forwards it to the workload.
        _signal.pthread_sigmask(_SIG_BLOCK, (_SIGALRM,))
        _signal.setitimer(_signal.ITIMER_REAL, 0, 0)
        _signal.sigtimedwait((_SIGALRM,), 0)
        _signal.signal(_SIGALRM, _signal.SIG_DFL)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except OSError:
            pass


# Imported at module level but used only inside functions kestrel's paths
# never call: idna (trio: non-ASCII host names; health checks use a numeric
# base_url), inspect (trio's error paths; attrs's annotation lookups, which
# the frozen bundle skips for plain functions: builder/freeze_edits.PATCHED).
# ctypes: trio imports ctypes.util to name its threads, and the bundle's
# ctypes.util finds no library (an image has no ldconfig), so ctypes itself,
# _ctypes and libffi are needed only by kestrel's own mount/reboot calls.
# Loaded on first attribute access instead; inspect brings ast, dis and
# tokenize: together ~1.2 MB of PID 1's RSS and ~10% of the agent's import.
# traceback, tokenize, selectors: error paths and socket.sendfile.
DEFERRED = ("idna", "inspect", "ctypes", "traceback", "tokenize", "selectors")
# Deferred too when the manifest has no HTTP health check: an http workload's
# first probe runs right after the imports, and importing h11 then would
# delay its first health event (~0.1 s of TCG time).
HEALTH_CHECK_ONLY = ("h11",)


def defer_imports(names: tuple[str, ...]) -> None:
    """Put a placeholder for each module in sys.modules that imports the real
    one on the first attribute it lacks (importlib.util.LazyLoader does not do:
    the import statement itself reads ``__spec__``, which loads it)."""
    import sys

    class Deferred(type(sys)):  # type: ignore[misc]
        def __getattr__(self, attr: str) -> object:
            name: str = self.__dict__["__name__"]
            if sys.modules.get(name) is self:
                del sys.modules[name]
                __import__(name)
                real = sys.modules[name]
                # Submodules imported through the placeholder stay attributes.
                for key, value in list(self.__dict__.items()):
                    if getattr(value, "__name__", None) == f"{name}.{key}":
                        setattr(real, key, value)
            real = sys.modules[name]
            # Whoever imported the placeholder now reads the real names directly.
            self.__dict__.update(real.__dict__)
            return getattr(real, attr)

    import _frozen_importlib_external as external

    for name in names:
        if name in sys.modules:
            continue
        spec = external.PathFinder.find_spec(name)
        if spec is None:
            continue  # not there at all: let the real import fail as usual
        module = Deferred(name)
        module.__spec__ = spec
        if spec.submodule_search_locations is not None:
            # A package: `import pkg.sub` finds sub through this, without
            # loading the package itself.
            module.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = module
