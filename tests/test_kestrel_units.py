"""Pure pieces of kestrel's runtime: boot-mode decisions, exit forms, URLs, JSON."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kestrel import jsonlite
from kestrel.boot import rootfs_device
from kestrel.manifest import BaseUrl, parse_base_url
from kestrel.reaper import ExitStatus


@pytest.mark.parametrize(
    ("boot", "device", "has_rootfs", "expected"),
    [
        ("auto", "", False, None),  # initramfs plugin: stay, even if a data disk exists
        ("auto", "vdb", False, "/dev/vdb"),  # the host named it
        ("auto", "", True, "/dev/vda"),  # a rootfs plugin
        ("initramfs", "vda", True, None),  # explicitly stay
        ("rootfs", "", False, "/dev/vda"),
    ],
)
def test_only_a_named_rootfs_is_pivoted_into(
    boot: str, device: str, has_rootfs: bool, expected: str | None
) -> None:
    assert rootfs_device(boot=boot, cmdline_device=device, manifest_has_rootfs=has_rootfs) == (
        expected
    )


@pytest.mark.parametrize(
    ("status", "code", "sig", "shell", "text"),
    [
        (0, 0, None, 0, "exited 0"),
        (3 << 8, 3, None, 3, "exited 3"),
        (255 << 8, 255, None, 255, "exited 255"),
        (15, None, 15, 143, "killed by SIGTERM (status 143)"),
        (9 | 0x80, None, 9, 137, "killed by SIGKILL (status 137)"),  # with core flag
    ],
)
def test_exit_status_has_raw_and_shell_forms(
    status: int, code: int | None, sig: int | None, shell: int, text: str
) -> None:
    e = ExitStatus.from_wait(status)
    assert (e.code, e.signal, e.shell, e.describe()) == (code, sig, shell, text)


def test_base_url_is_parsed_into_host_port_and_prefix() -> None:
    assert parse_base_url("http://127.0.0.1:80") == BaseUrl("127.0.0.1", 80, "")
    assert parse_base_url("http://localhost") == BaseUrl("localhost", 80, "")
    assert parse_base_url("http://[::1]:8080/api") == BaseUrl("::1", 8080, "/api")
    assert parse_base_url("http://[::1]") == BaseUrl("::1", 80, "")
    assert parse_base_url("http://[::1]/") == BaseUrl("::1", 80, "")
    assert parse_base_url("http://h:8080/a/b/?x=1&y#frag") == BaseUrl("h", 8080, "/a/b", "?x=1&y")
    assert parse_base_url("http://[::1]").authority == "[::1]:80"
    assert parse_base_url("http://h/api?v=2").target("/healthz") == "/api/healthz?v=2"
    assert parse_base_url("http://h/api?v=2").target("/hz?deep=1") == "/api/hz?deep=1&v=2"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
)


@given(json_values)
def test_fuzz_jsonlite_agrees_with_json(value: object) -> None:
    text = json.dumps(value)
    assert jsonlite.loads(text) == json.loads(text)


@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_fuzz_jsonlite_rejects_what_json_rejects(text: str) -> None:
    try:
        expected = json.loads(text)
    except (ValueError, RecursionError):
        with pytest.raises(ValueError):
            jsonlite.loads(text)
    else:
        if not any(c in text for c in ("NaN", "Infinity")):
            assert jsonlite.loads(text) == expected


def test_boot_path_imports_nothing_heavy() -> None:
    # Everything main.py runs before spawning the workload, on a real manifest:
    # none of these may be imported by then (each costs ms of boot time).
    import subprocess
    import sys

    code = textwrap.dedent("""
        import sys
        from kestrel import boot, spawn
        from kestrel.cmdline import boot_config, encode_manifest, parse_cmdline
        from kestrel.manifest import load_manifest
        doc = (b'{"name":"c","version":"1","initramfs":{"url":"/x"},"workload":'
               b'{"type":"http","entrypoint":["/bin/true"],"base_url":"http://127.0.0.1:80",'
               b'"env":{"A":"b"}},"health_check":{"endpoint":"/","timeout_ms":100}}')
        cfg = boot_config("volant.manifest=" + encode_manifest(doc) + " kestrel.channel=unix:/x "
                          "volant.env=eyJBIjogIjEifQ "
                          "ip=10.0.2.15::10.0.2.2:255.255.255.0:h:eth0:off")
        m = load_manifest(cfg.manifest_json)
        spawn.workload_env({}, cfg.env, m.workload.env)
        boot.rootfs_device(boot=cfg.boot, cmdline_device="", manifest_has_rootfs=False)
        heavy = {"typing", "re", "json", "dataclasses", "enum", "inspect", "trio", "ctypes",
                 "signal", "socket", "contextlib", "msgpack", "kestrel.execproto",
                 "kestrel.execsession", "kestrel.outbox", "kestrel.supervisor", "termios"}
        print(sorted(heavy & set(sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), check=True).stdout
    assert out.strip() == "[]"


def test_proc_stat_parsing_survives_odd_process_names() -> None:
    from kestrel import metrics

    # comm may hold spaces and ')' (a process can name itself anything).
    line = "42 (we ird) name) S 1 42 42 0 -1 0 0 0 0 0 300 100 0 0 20 0 1 0 5 1000 250 0"
    pgrp, cpu, rss = metrics.parse_stat(line)
    assert pgrp == 42
    assert cpu == 400 / metrics.CLK_TCK
    assert rss == 250 * metrics.PAGE_SIZE
    total, available = metrics.parse_meminfo("MemTotal: 1000 kB\nMemFree: 5 kB\n"
                                             "MemAvailable: 600 kB\n")
    assert (total, available) == (1000 * 1024, 600 * 1024)
