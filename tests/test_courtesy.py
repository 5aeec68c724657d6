"""kestrel/courtesy.py: nice 19 while the agent imports, back to 0 when the workload listens.

Each case runs in a child interpreter: the courtesy changes the calling
thread's nice value and SIGALRM disposition, which must not leak into pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kestrel.courtesy import address
from kestrel.manifest import parse_base_url

REPO = Path(__file__).resolve().parent.parent


def run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-I", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_address_takes_numeric_ipv4_base_urls_only() -> None:
    assert address(parse_base_url("http://127.0.0.1:8080/prefix")) == ("127.0.0.1", 8080)
    assert address(parse_base_url("http://10.0.2.15")) == ("10.0.2.15", 80)
    assert address(parse_base_url("http://localhost:80")) is None  # a name needs a resolver
    assert address(parse_base_url("http://[::1]:80")) is None
    assert address(None) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="returning to nice 0 needs root (kestrel is PID 1)")
def test_the_workload_listening_ends_the_courtesy_and_restores_nice_0() -> None:
    out = run("""
        import os, socket, sys, time
        sys.path.insert(0, ".")
        from kestrel.courtesy import Courtesy
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        c = Courtesy(("127.0.0.1", srv.getsockname()[1]), max_s=30)
        c.start()
        print("during", os.getpriority(os.PRIO_PROCESS, 0), c.active)
        t = time.monotonic()
        while time.monotonic() - t < 0.3:  # busy, like an import: not listening yet
            pass
        print("still", c.active)
        srv.listen()
        while c.active and time.monotonic() - t < 20:
            sum(range(1000))
        print("after", os.getpriority(os.PRIO_PROCESS, 0), c.ended_by)
    """)
    assert out.splitlines() == ["during 19 True", "still True", "after 0 workload listening"]


@pytest.mark.skipif(os.geteuid() != 0, reason="returning to nice 0 needs root (kestrel is PID 1)")
def test_the_time_cap_ends_the_courtesy_in_the_middle_of_a_busy_loop() -> None:
    out = run("""
        import os, sys, time
        sys.path.insert(0, ".")
        from kestrel.courtesy import Courtesy
        c = Courtesy(None, max_s=0.3)
        c.start()
        t = time.monotonic()
        while c.active and time.monotonic() - t < 20:
            pass  # never imports anything: only the timer can end it
        print(c.ended_by, os.getpriority(os.PRIO_PROCESS, 0), c.active)
    """)
    assert out.split() == ["time", "cap", "0", "False"]


def test_stop_consumes_a_pending_tick() -> None:
    # After stop, SIGALRM is blocked and nothing is pending: the agent would
    # otherwise forward a stray SIGALRM to the workload.
    out = run("""
        import signal, sys, time
        sys.path.insert(0, ".")
        from kestrel.courtesy import Courtesy
        c = Courtesy(None, max_s=30)
        c.start()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(0.2)  # ticks pile up, blocked
        c.stop("imports done")
        print(sorted(signal.sigpending()), signal.getsignal(signal.SIGALRM) == signal.SIG_DFL)
    """)
    assert out.split() == ["[]", "True"]


def test_a_deferred_module_loads_on_first_use_and_keeps_its_submodules(tmp_path: Path) -> None:
    pkg = tmp_path / "heavy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("print('heavy loaded')\nVALUE = 42\n")
    (pkg / "sub.py").write_text("def f():\n    return 'sub'\n")
    out = run(f"""
        import sys
        sys.path[:0] = [".", {str(tmp_path)!r}]
        from kestrel.courtesy import defer_imports
        defer_imports(("heavy", "not_there_at_all"))
        import heavy, heavy.sub  # neither statement loads the package itself
        print("imported")
        print(heavy.sub.f())
        print(heavy.VALUE)  # first real use
        import heavy.sub
        print(heavy.sub.f(), sys.modules["heavy"].sub.f())
        try:
            import not_there_at_all
        except ImportError:
            print("missing stays missing")
    """)
    assert out.splitlines() == ["imported", "sub", "heavy loaded", "42", "sub sub",
                                "missing stays missing"]
