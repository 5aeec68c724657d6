"""HTTP health checks of the workload, with h11 over a trio TCP stream.

Policy: poll fast (every 100 ms) until the first 2xx (starting -> healthy),
then every ``interval_ms``; ``failure_threshold`` consecutive failures make a
healthy workload unhealthy, one success makes it healthy again. A workload
that has not answered within ``timeout_ms`` of starting is reported
unhealthy (Volant waited 2 minutes at least; we don't). Each request is
bounded by a cancel scope, so a hanging endpoint costs this task time and
nothing else: signals, reaping and stop run in other tasks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import h11
import trio

from kestrel.manifest import BaseUrl, HealthCheck

STARTUP_POLL_S = 0.1


async def probe(url: BaseUrl, target: str, *, timeout_s: float) -> tuple[bool, str]:
    """One GET; (ok, detail) where ok means a 2xx status arrived in time."""
    with trio.move_on_after(timeout_s) as scope:
        try:
            stream = await trio.open_tcp_stream(url.host, url.port)
        except OSError as exc:
            return False, f"connect: {exc.strerror or exc}"
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(
                method="GET",
                target=target,
                headers=[("Host", url.authority), ("User-Agent", "kestrel"),
                         ("Connection", "close")],
            )
            try:
                await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Response):
                        return 200 <= event.status_code < 300, f"HTTP {event.status_code}"
                    if isinstance(event, h11.ConnectionClosed):
                        return False, "connection closed before a response"
            except (OSError, trio.BrokenResourceError, h11.RemoteProtocolError) as exc:
                return False, f"{type(exc).__name__}: {exc}"
    assert scope.cancelled_caught
    return False, f"no response within {timeout_s:g} s"


async def watch(
    url: BaseUrl,
    check: HealthCheck,
    report: Callable[[str, str], Awaitable[None]],
) -> None:
    """Poll until cancelled; ``report(status, detail)`` on each state change."""
    target = url.target(check.endpoint)
    request_timeout = min(check.timeout_ms, 1000 + check.interval_ms) / 1000
    started = trio.current_time()
    status = "starting"
    failures = 0
    while True:
        ok, detail = await probe(url, target, timeout_s=request_timeout)
        if ok:
            failures = 0
            if status != "healthy":
                status = "healthy"
                await report(status, detail)
        else:
            failures += 1
            late = trio.current_time() - started > check.timeout_ms / 1000
            if (status == "healthy" and failures >= check.failure_threshold) or (
                status == "starting" and late
            ):
                status = "unhealthy"
                await report(status, detail)
        await trio.sleep(STARTUP_POLL_S if status == "starting" else check.interval_ms / 1000)
