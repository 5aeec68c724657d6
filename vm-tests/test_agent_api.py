"""Volant's agent API from the host into the guest: hybrid vsock ``CONNECT 8080``.

One VM of the seeds' Caddy image (static caddy, fledge) booted with volar,
over real vsock (QEMU, vhost-device-vsock). Caddy is the workload; its
Caddyfile sends /cgi-bin/ on to busybox httpd, whose CGI echo (``cat``)
gives back any body. Through ``volar vms http`` as a user runs it, and
through host.vsock.connect + host.httpcli.exchange for 20 connections at
once and for the bad inputs: a port where nothing listens, a CONNECT line
that never ends, a workload that is down, a VM that is stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from harness import REPO, fledge_build, volar_json

from host.httpcli import Response, exchange
from host.kernel import KernelInfo
from host.vsock import HybridError, NotListening, connect, find_backend, handshake, in_ci
from kestrel.layout import AGENT_API_PORT

EXAMPLE = REPO / "examples" / "caddy"
VM = "api-vm"
MIB = 1024 * 1024
HELLO = b"Hello from Caddy in a Volant microVM!"
CADDYFILE = """\
{
    admin off
}

:80 {
    handle /cgi-bin/* {
        reverse_proxy 127.0.0.1:8081
    }
    handle {
        respond "Hello from Caddy in a Volant microVM! "
    }
}
"""
ECHO_CGI = '#!/bin/sh\nprintf "Content-Type: application/octet-stream\\r\\n\\r\\n"\nexec cat\n'
# What the workload saw of -X and -H.
METHOD_CGI = ('#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\n'
              'echo "$REQUEST_METHOD $HTTP_X_TEST"\n')
TOML = """\
version = "1"
strategy = "initramfs"

[agent]
source_strategy = "release"
version = "latest"

[source]
busybox_url = "/bin/busybox"

[mappings]
"{caddy}" = "/usr/bin/caddy"
"Caddyfile" = "/etc/caddy/Caddyfile"
"www" = "/www"
"""
# busybox httpd daemonizes; caddy is the workload kestrel watches.
ENTRYPOINT = ("httpd -p 127.0.0.1:8081 -h /www && "
              "exec /usr/bin/caddy run --config /etc/caddy/Caddyfile")
sys.path.insert(0, str(EXAMPLE))


def volar(state: Path, *args: str, input: bytes | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """``volar ARGS`` with bytes out (bodies are binary)."""
    print("$ volar " + " ".join(args), flush=True)
    done = subprocess.run([sys.executable, "-m", "host.cli", *args], cwd=REPO, input=input,
                          capture_output=True, timeout=timeout, check=False,
                          env={**os.environ, "VOLAR_STATE_DIR": str(state)})
    print(f"  -> {done.returncode} {done.stdout[:200]!r} {done.stderr[:300]!r}", flush=True)
    return done


@pytest.fixture(scope="module")
def image(kernel: KernelInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fetch_caddy import DEST, FetchError, fetch_caddy

    if find_backend() is None:
        if in_ci():
            pytest.fail("CI=true: vhost-device-vsock must be installed (make vhost-device-vsock)")
        pytest.skip(reason="vhost-device-vsock not found ($KESTREL_VHOST_VSOCK, PATH, .cache)")
    try:
        fetch_caddy(quiet=True)
    except FetchError as exc:
        pytest.skip(reason=f"no static caddy for the example: {exc}")
    base = tmp_path_factory.mktemp("api-image")
    (base / "Caddyfile").write_text(CADDYFILE)
    (base / "www" / "cgi-bin").mkdir(parents=True)
    (base / "www" / "index.html").write_text("busybox httpd\n")
    for name, script in (("echo", ECHO_CGI), ("method", METHOD_CGI)):
        (base / "www" / "cgi-bin" / name).write_text(script)
        (base / "www" / "cgi-bin" / name).chmod(0o755)
    (base / "fledge.toml").write_text(TOML.replace("{caddy}", str(DEST)))
    return fledge_build(base / "fledge.toml", base / "plugin.cpio.gz")


@pytest.fixture(scope="module")
def state(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A running, healthy VM of the image; stopped and deleted at the end."""
    base = tmp_path_factory.mktemp("volar")
    state = base / "state"
    m = json.loads((EXAMPLE / "manifest" / "caddy.json").read_text())
    m["name"] = "agentapi"
    m["initramfs"] = {"url": str(image)}
    m["workload"]["entrypoint"] = ["/bin/sh", "-c", ENTRYPOINT]
    # A killed caddy waits 10 minutes before its restart: "down" long enough to see.
    m["workload"]["restart"] = {"policy": "always", "initial_backoff_ms": 600_000}
    m["health_check"] = {"endpoint": "/", "timeout_ms": 120_000}
    (base / "agentapi.json").write_text(json.dumps(m))
    assert volar(state, "plugins", "install", "--manifest",
                 str(base / "agentapi.json")).returncode == 0
    try:
        done = volar(state, "vms", "create", VM, "--plugin", "agentapi", "--memory", "384",
                     timeout=400)
        assert done.returncode == 0, done.stderr.decode()
        deadline = time.monotonic() + 180
        while volar_json(state, "vms", "show", VM)["health"] != "healthy":
            assert time.monotonic() < deadline, "caddy never became healthy"
            time.sleep(1)
        yield state
    finally:
        volar(state, "vms", "stop", VM, timeout=120)
        volar(state, "vms", "delete", VM, timeout=120)


def hybrid_socket(state: Path) -> Path:
    info = volar_json(state, "vms", "show", VM)
    assert info["channel"] == "vsock"
    return Path(info["vsock_socket"])


async def call(uds: Path, method: str, target: str, body: bytes = b"") -> tuple[Response, bytes]:
    """host -> guest: CONNECT 8080, one request, the whole answer."""
    got: list[bytes] = []

    async def keep(data: bytes) -> None:
        got.append(data)

    stream, rest = await connect(uds, AGENT_API_PORT)
    async with stream:
        response = await exchange(stream, method=method, target=target, headers=[], body=body,
                                  sink=keep, received=rest)
    return response, b"".join(got)


def one_line(err: bytes) -> str:
    text = err.decode()
    assert text.count("\n") == 1 and text.endswith("\n"), text
    return text


def test_connect_8080_answers_healthz_and_v1_reaches_caddy(state: Path) -> None:
    uds = hybrid_socket(state)

    async def main() -> None:
        with trio.fail_after(60):
            response, body = await call(uds, "GET", "/healthz")
            assert (response.status, json.loads(body)) == (200, {"status": "ok"})
            response, body = await call(uds, "GET", "/v1/")
            assert response.status == 200 and HELLO in body
            assert ("server", "Caddy") in response.headers  # h11 lowercases names

    trio.run(main)
    done = volar(state, "vms", "http", VM, "/healthz")
    assert (done.returncode, json.loads(done.stdout)) == (0, {"status": "ok"})
    done = volar(state, "vms", "http", VM, "-i", "/v1/")
    assert done.returncode == 0 and done.stderr == b""
    assert done.stdout.startswith(b"HTTP/1.1 200 OK\r\n") and HELLO in done.stdout
    assert b"\r\nserver: Caddy\r\n" in done.stdout


def test_volar_vms_http_posts_a_file_and_prints_the_echo(state: Path, tmp_path: Path) -> None:
    payload = os.urandom(MIB)
    (tmp_path / "body").write_bytes(payload)
    done = volar(state, "vms", "http", VM, "-d", f"@{tmp_path / 'body'}", "/v1/cgi-bin/echo")
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(done.stdout).hexdigest() == hashlib.sha256(payload).hexdigest()
    done = volar(state, "vms", "http", VM, "-X", "DELETE", "-H", "X-Test: yes",
                 "/v1/cgi-bin/method")
    assert (done.returncode, done.stdout) == (0, b"DELETE yes\n")


def test_an_http_error_prints_the_body_and_exits_22(state: Path) -> None:
    done = volar(state, "vms", "http", VM, "/v1/cgi-bin/missing")
    assert done.returncode == 22
    assert "HTTP 404" in one_line(done.stderr)
    done = volar(state, "vms", "http", VM, "/nope")
    assert done.returncode == 22 and "/healthz and /v1" in json.loads(done.stdout)["error"]


def test_twenty_concurrent_connections_each_echo_one_mib_intact(state: Path) -> None:
    uds = hybrid_socket(state)
    payloads = [os.urandom(MIB) for _ in range(20)]
    results: dict[int, tuple[int, str]] = {}

    async def one(i: int) -> None:
        response, body = await call(uds, "POST", "/v1/cgi-bin/echo", payloads[i])
        results[i] = (response.status, hashlib.sha256(body).hexdigest())

    async def main() -> float:
        start = trio.current_time()
        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(one, i)
        return trio.current_time() - start

    seconds = trio.run(main)
    assert results == {i: (200, hashlib.sha256(p).hexdigest()) for i, p in enumerate(payloads)}
    print(f"[measure] 20 x 1 MiB echoed at once through vsock and the agent API (TCG): "
          f"{seconds:.1f} s", flush=True)


def test_connect_to_a_port_where_nothing_listens_is_one_clear_error(state: Path) -> None:
    uds = hybrid_socket(state)

    async def main() -> None:
        with trio.fail_after(30):
            with pytest.raises(NotListening) as caught:
                await connect(uds, 8099)
            assert str(caught.value) == (
                f"vsock port 8099 through {uds}: the VMM closed the connection without OK "
                "(nothing listens on that port in the guest, or the VMM refused the CONNECT "
                "line)")
            response, _ = await call(uds, "GET", "/healthz")
            assert response.status == 200

    trio.run(main)


@pytest.mark.parametrize("line", [b"CONNECT 8080", b"CONNECT 8080" + b" garbage" * 8192],
                         ids=["short", "64KiB"])
def test_a_connect_line_that_never_ends_is_a_clear_error_and_harms_nothing(
        state: Path, line: bytes) -> None:
    uds = hybrid_socket(state)

    async def main() -> None:
        with trio.fail_after(30):
            stream = await trio.open_unix_socket(str(uds))
            async with stream:
                with pytest.raises(HybridError) as caught:
                    await handshake(stream, line, what="a line without end")
            # vhost-device-vsock waits for the rest of a short line (volar's OK
            # deadline ends it) and drops a long one (the connection closes).
            assert str(caught.value) in (
                "a line without end: no answer to CONNECT within 1 s (the VMM or its "
                "vsock backend is not answering)",
                "a line without end: the VMM closed the connection without OK (nothing "
                "listens on that port in the guest, or the VMM refused the CONNECT line)")
            response, body = await call(uds, "GET", "/v1/")  # the backend still serves
            assert response.status == 200 and HELLO in body

    trio.run(main)


def test_a_workload_that_is_down_is_a_clear_error_and_healthz_stays_up(state: Path) -> None:
    killed = volar(state, "vms", "exec", VM, "--", "/bin/busybox", "killall", "caddy")
    assert killed.returncode == 0, killed.stderr
    deadline = time.monotonic() + 60
    while True:  # until kestrel has seen caddy exit: a refused connect (502) before that
        done = volar(state, "vms", "http", VM, "/v1/")
        assert done.returncode == 22, done.stdout
        error = json.loads(done.stdout)["error"]
        if "restarting" in error or time.monotonic() > deadline:
            break
        assert error == "workload at 127.0.0.1:80: Connection refused"
    assert error == "the workload is restarting: nothing answers at 127.0.0.1:80"
    assert "HTTP 503 Service Unavailable" in one_line(done.stderr)
    done = volar(state, "vms", "http", VM, "/healthz")
    assert (done.returncode, json.loads(done.stdout)) == (0, {"status": "ok"})


def test_vms_http_to_a_stopped_vm_is_one_line(state: Path) -> None:
    assert volar(state, "vms", "stop", VM, timeout=120).returncode == 0
    done = volar(state, "vms", "http", VM, "/healthz")
    assert done.returncode == 1
    assert "the VM is stopped" in one_line(done.stderr)
