"""How a VM ended: its final status and detail, from what its monitor saw.

host/monitor.py gathers the facts (the VMM's exit code, what kestrel
reported, who asked for the stop, which helper died) and records the answer.
"""

from __future__ import annotations

from pathlib import Path

from host.launch import console_tail


def final_status(*, code: int | None, poweroff: bool, exit_seen: bool, fatal: str,
                 helper_failed: str, stop_requested: bool, stop_forced: str, agent: str,
                 console_log: Path | None) -> tuple[str, str]:
    """(status, detail). ``code`` None: an adopted VMM, whose exit status is unknown;
    ``console_log`` None: the VMM never ran."""
    clean_poweroff = code in (0, None) and (poweroff or exit_seen)
    if helper_failed and not stop_requested and not clean_poweroff:
        status, detail = "crashed", helper_failed
    elif fatal:
        status, detail = "failed", f"kestrel: {fatal}"
    elif stop_forced and not stop_requested:
        status, detail = "failed", stop_forced
    elif stop_requested:
        status = "stopped"
        detail = f"stopped on request ({stop_forced})" if stop_forced else (
            "stopped on request")
    elif clean_poweroff:
        status, detail = "stopped", "guest powered off"
    elif code in (0, None) and agent == "none" and console_log is not None and (
            "Kernel panic" not in console_tail(console_log)):
        status, detail = "stopped", "guest powered off (agent: none)"
    else:
        status = "crashed"
        how = (f"with code {code}" if code is not None
               else "(adopted, so its exit status is unknown)")
        detail = f"VMM exited {how} without a power-off report from kestrel"
    if status in ("failed", "crashed") and console_log is not None and (
            detail != helper_failed):
        tail = console_tail(console_log, lines=8)
        if tail and not fatal:
            detail += "; console tail:\n" + tail
    return status, detail
