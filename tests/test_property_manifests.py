"""Every manifest that validates runs, or fails with a typed error; none is a
PID 1 internal error.

Generated manifests (hypothesis) go through what kestrel does with a valid
one before and around the spawn, in process: the host's command line
encoding and kestrel's decoding of it, the workload environment, the health
checker's HTTP request, every timer the agent derives from the manifest. A
small sample of them is then booted by kestrel as PID 1 (tests/pid1.py),
whose console must never say ``internal error``.
"""

from __future__ import annotations

import json
import os
import string
from typing import Any

import h11
import pytest
import trio
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from kestrel import spawn
from kestrel.cmdline import Channel, CmdlineError, boot_config, build_cmdline
from kestrel.manifest import INT_MAX, Manifest, ManifestError, parse_manifest
from kestrel.protocol import Stop
from tests.pid1 import Kestrel, run_kestrel

VISIBLE = "".join(chr(c) for c in range(0x21, 0x7F))



def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten: most generated manifests should validate."""
    return st.integers(0, 9).flatmap(lambda i: bad if i == 0 else good)


ints = mostly(st.one_of(st.integers(1, 3000), st.just(INT_MAX)),
              st.one_of(st.integers(-2, 0), st.integers(INT_MAX, 2 * INT_MAX)))


@st.composite
def base_urls(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 19)) == 0:
        return draw(st.text(max_size=40))  # anything at all
    host = draw(mostly(
        st.sampled_from(["127.0.0.1", "localhost", "[::1]", "[::ffff:127.0.0.1]", "[::]",
                         "0.0.0.0", "h", "a.b.c.", "[1:2:3:4:5:6:7:8]"]),
        st.one_of(st.sampled_from(["::1", "[fe80::1%lo]", "bücher.de", "", "[::1"]),
                  st.text(string.ascii_letters + string.digits + ".-_[]:", max_size=70)),
    ))
    port = draw(mostly(st.one_of(st.just(""), st.just(":"),
                                 st.integers(1, 65535).map(lambda p: f":{p}")),
                       st.one_of(st.integers(0, 70000).map(lambda p: f":{p}"),
                                 st.text(string.digits + "x:", max_size=7).map(
                                     lambda p: ":" + p))))
    path = draw(st.one_of(st.just(""), mostly(st.text(VISIBLE, max_size=20),
                                              st.text(VISIBLE + " é", max_size=20)).map(
        lambda p: "/" + p)))
    return f"http://{host}{port}{path}"


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    text = st.text(max_size=12)
    wtype = draw(st.sampled_from(["http", "exec", "grpc"]))
    args = draw(st.lists(st.text(max_size=20), max_size=100))
    program = draw(mostly(st.sampled_from(["/bin/sh", "/no/such", "/bin/true", "/bin/echo"]),
                          st.sampled_from([" ", "a\0b"])))
    workload: dict[str, Any] = {
        "type": wtype,
        "entrypoint": [program, *args],
        "workdir": draw(mostly(st.sampled_from(["/", "/tmp", "/no/such/dir"]), st.just("rel"))),
        "env": draw(st.dictionaries(mostly(st.text(string.ascii_letters + "_", min_size=1),
                                           text), text, max_size=4)),
        "stop_grace_ms": draw(ints),
    }
    if draw(st.booleans()):
        workload["base_url"] = draw(base_urls())
    if draw(st.booleans()):
        workload["restart"] = {
            "policy": draw(mostly(st.sampled_from(["never", "on-failure", "always"]),
                                  st.just("sometimes"))),
            "initial_backoff_ms": draw(ints), "max_backoff_ms": draw(ints),
            "max_restarts": draw(st.one_of(st.none(), ints)), "reset_after_ms": draw(ints),
        }
    doc: dict[str, Any] = {
        "name": draw(mostly(st.text(string.ascii_letters, min_size=1, max_size=12), text)),
        "version": draw(mostly(st.text(min_size=1, max_size=12).filter(str.strip), text)),
        "initramfs": {"url": "/dev/null"},
        "workload": workload,
    }
    if draw(st.booleans()):
        doc["health_check"] = {
            "endpoint": "/" + draw(mostly(st.text(VISIBLE, max_size=20),
                                          st.text(VISIBLE + " é", max_size=20))),
            "timeout_ms": draw(ints), "interval_ms": draw(ints),
            "failure_threshold": draw(ints),
        }
    return doc


def what_kestrel_does_with(m: Manifest) -> None:
    """The pure steps the agent takes with a valid manifest; none may raise."""
    w = m.workload
    assert w is not None
    spawn.workload_env({"PATH": "/bin"}, {}, w.env)
    float(w.stop_grace_ms) / 1000
    for attempt in (1, 2, 63, 64, 65, 1000):
        trio.current_time() + w.restart.backoff_ms(attempt) / 1000
    trio.current_time() + w.restart.reset_after_ms / 1000
    check = m.health_check
    if w.url is not None and check is not None:
        # Exactly the request the health checker sends, through h11's checks.
        request = h11.Request(method="GET", target=w.url.target(check.endpoint),
                              headers=[("Host", w.url.authority), ("User-Agent", "kestrel"),
                                       ("Connection", "close")])
        h11.Connection(h11.CLIENT).send(request)
        assert 0 < w.url.port < 65536
        min(check.timeout_ms, 1000 + check.interval_ms) / 1000
        trio.current_time() + check.interval_ms / 1000


@given(manifests())
@settings(suppress_health_check=[HealthCheck.too_slow])
async def test_every_valid_manifest_runs_or_fails_typed(doc: dict[str, Any]) -> None:
    try:
        m = parse_manifest(doc)
    except ManifestError as exc:
        assert exc.field and exc.message
        event("invalid")
        return
    event("valid")
    what_kestrel_does_with(m)
    # The host's encoding, and kestrel's decoding of what the guest receives.
    try:
        line = build_cmdline(manifest_json=json.dumps(doc).encode(),
                             channel=Channel("serial", name="kestrel"))
    except CmdlineError as exc:
        assert exc.key == "volant.manifest"
        return
    cfg = boot_config(line)
    assert cfg.manifest_json is not None
    assert parse_manifest(json.loads(cfg.manifest_json)) == m


# A few of the generated manifests, booted for real. Kept small: each boot
# is a process tree and a second or more.
@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")
@given(manifests())
@settings(max_examples=int(os.environ.get("KESTREL_PID1_SAMPLES", "8")),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
          database=None)
async def test_valid_manifests_never_make_pid1_an_internal_error(doc: dict[str, Any]) -> None:
    try:
        m = parse_manifest(doc)
    except ManifestError:
        assume(False)  # only the valid ones are worth a boot
        return
    assert m.workload is not None

    async def scenario(k: Kestrel) -> None:
        # Whatever the policy: a moment to run (and probe), then a stop.
        await trio.sleep(1.5)
        try:
            await k.send(Stop(grace_s=0.5))
        except AssertionError:
            pass  # nothing attached: an exec workload has powered kestrel off already

    run = await run_kestrel(doc, scenario=scenario, timeout=30)
    # (Not "Traceback": the console mirrors the workload, which may print anything.)
    assert "KESTREL PANIC: internal error" not in run.console, run.console
