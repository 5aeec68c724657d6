"""The restart policy as a pure function: no process, no clock, no trio."""

from __future__ import annotations

from kestrel.manifest import RestartPolicy
from kestrel.supervisor import Decision, decide


def test_on_failure_restarts_a_failure_with_doubling_backoff() -> None:
    p = RestartPolicy("on-failure", initial_backoff_ms=100, max_backoff_ms=350)
    delays = []
    attempt = 0
    for _ in range(4):
        d = decide(p, status=1, ran_ms=5, attempt=attempt)
        assert d.restart
        attempt = d.attempt
        delays.append(d.delay_ms)
    assert delays == [100, 200, 350, 350]


def test_on_failure_ends_on_success_and_never_restarts_ends() -> None:
    assert decide(RestartPolicy("on-failure"), status=0, ran_ms=5, attempt=3) == Decision(
        restart=False, attempt=3)
    assert not decide(RestartPolicy("never"), status=1, ran_ms=5, attempt=0).restart


def test_always_restarts_a_clean_exit() -> None:
    assert decide(RestartPolicy("always"), status=0, ran_ms=5, attempt=0).restart


def test_max_restarts_is_the_number_of_restarts() -> None:
    p = RestartPolicy("always", max_restarts=2)
    assert decide(p, status=0, ran_ms=5, attempt=1).restart
    assert not decide(p, status=0, ran_ms=5, attempt=2).restart


def test_a_long_run_resets_the_backoff_and_the_restart_budget() -> None:
    p = RestartPolicy("on-failure", initial_backoff_ms=10, max_restarts=3, reset_after_ms=1000)
    d = decide(p, status=1, ran_ms=1000, attempt=3)
    assert d == Decision(restart=True, attempt=1, delay_ms=10)
    assert not decide(p, status=1, ran_ms=999, attempt=3).restart
