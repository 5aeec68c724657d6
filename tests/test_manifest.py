"""kestrel.manifest: the plugin manifest a user writes, and the errors they see."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kestrel.manifest import (
    Manifest,
    ManifestError,
    RestartPolicy,
    load_manifest,
    normalize_checksum,
    parse_manifest,
)
from tests.test_cmdline import CADDY_JSON

HEX = "cef98fd5798ce875631aa0c98613fe48005a892aac8fb6ee81535945ebb0aa09"


def caddy() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(CADDY_JSON)
    return doc


def error_field(doc: Any) -> str:
    with pytest.raises(ManifestError) as info:
        parse_manifest(doc)
    assert info.value.field in str(info.value)
    return info.value.field


def test_seed_caddy_manifest_loads() -> None:
    m = load_manifest(CADDY_JSON)
    assert (m.name, m.version, m.runtime, m.enabled) == ("caddy", "0.1.0", "caddy", True)
    assert m.initramfs is not None and m.initramfs.checksum == HEX
    assert m.rootfs is None
    assert (m.resources.cpu_cores, m.resources.memory_mb) == (1, 512)
    w = m.workload
    assert w is not None
    assert w.type == "http"
    assert w.entrypoint == ("/usr/bin/caddy", "run", "--config", "/etc/caddy/Caddyfile")
    assert w.base_url == "http://127.0.0.1:80" and w.workdir == "/"
    assert w.env["PATH"].startswith("/usr/local/sbin")
    assert m.health_check is not None
    assert (m.health_check.endpoint, m.health_check.timeout_ms) == ("/", 10000)
    assert m.raw["$schema"].startswith("https://")
    assert load_manifest(CADDY_JSON.encode()) == m


def test_runtime_defaults_to_name_and_enabled_to_true() -> None:
    doc = caddy()
    del doc["runtime"], doc["enabled"]
    m = parse_manifest(doc)
    assert m.runtime == "caddy" and m.enabled is True


def test_agent_defaults_to_kestrel_and_none_is_explicit() -> None:
    assert parse_manifest(caddy()).agent == "kestrel"
    doc = caddy()
    doc["agent"] = "none"
    del doc["workload"], doc["health_check"]  # a custom init needs neither
    assert parse_manifest(doc).agent == "none"
    doc["agent"] = "systemd"
    assert error_field(doc) == "agent"


def test_rootfs_alone_is_enough() -> None:
    doc = caddy()
    del doc["initramfs"]
    doc["rootfs"] = {"url": "https://example.invalid/r.qcow2", "format": "qcow2"}
    m = parse_manifest(doc)
    assert m.rootfs is not None and m.rootfs.format == "qcow2" and m.initramfs is None


def mutate(path: str, value: Any) -> dict[str, Any]:
    """The seed manifest with ``path`` (dotted) set to ``value``; ... deletes it."""
    doc = copy.deepcopy(caddy())
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("name", ..., "name"),
        ("name", "   ", "name"),
        ("name", 7, "name"),
        ("version", ..., "version"),
        ("version", "", "version"),
        ("enabled", "yes", "enabled"),
        ("initramfs", ..., "initramfs"),
        ("initramfs", "plugin.cpio.gz", "initramfs"),
        ("initramfs.url", ..., "initramfs.url"),
        ("initramfs.checksum", "md5:abcd", "initramfs.checksum"),
        ("initramfs.checksum", "sha256:" + "g" * 64, "initramfs.checksum"),
        ("initramfs.checksum", "abc123", "initramfs.checksum"),
        ("initramfs.checksum", 12, "initramfs.checksum"),
        ("workload.entrypoint", [], "workload.entrypoint"),
        ("workload.entrypoint", "/usr/bin/caddy", "workload.entrypoint"),
        ("workload.entrypoint", ["/bin/x", 3], "workload.entrypoint"),
        ("workload.entrypoint", [" "], "workload.entrypoint"),
        ("workload.entrypoint", ["/bin/x\0y"], "workload.entrypoint"),
        ("workload.entrypoint", ..., "workload.entrypoint"),
        ("workload.type", "lambda", "workload.type"),
        ("workload.type", 1, "workload.type"),
        ("workload.base_url", ..., "workload.base_url"),
        ("workload.base_url", "https://127.0.0.1", "workload.base_url"),
        ("workload.base_url", "http://", "workload.base_url"),
        ("workload.base_url", "http://::1", "workload.base_url"),
        ("workload.base_url", "http://::1:8080", "workload.base_url"),
        ("workload.base_url", "http://[::1", "workload.base_url"),
        ("workload.base_url", "http://[::1]x", "workload.base_url"),
        ("workload.base_url", "http://[]:80", "workload.base_url"),
        ("workload.base_url", "http://h:0", "workload.base_url"),
        ("workload.base_url", "http://h:65536", "workload.base_url"),
        ("workload.base_url", "http://h:" + "9" * 5000, "workload.base_url"),
        ("workload.base_url", "http://h:8o", "workload.base_url"),
        ("workload.base_url", "http://h:\u0661", "workload.base_url"),
        ("workload.base_url", "http://user:pw@h", "workload.base_url"),
        ("workload.base_url", "http://b\u00fccher.de", "workload.base_url"),
        ("workload.base_url", "http://" + "a" * 64 + ".de", "workload.base_url"),
        ("workload.base_url", "http://h/\u00e4", "workload.base_url"),
        ("workload.base_url", "http://h/a b", "workload.base_url"),
        ("workload.workdir", "srv", "workload.workdir"),
        ("workload.env", {"A": 1}, "workload.env.A"),
        ("workload.env", {"A=B": "c"}, "workload.env.A=B"),
        ("workload.env", {"": "c"}, "workload.env."),
        ("workload.env", ["A=b"], "workload.env"),
        ("workload.stop_grace_ms", -1, "workload.stop_grace_ms"),
        ("workload", [], "workload"),
        ("health_check.endpoint", "healthz", "health_check.endpoint"),
        ("health_check.endpoint", "/a b", "health_check.endpoint"),
        ("health_check.endpoint", "/a\x01", "health_check.endpoint"),
        ("health_check.endpoint", "/\u00e9", "health_check.endpoint"),
        ("health_check.timeout_ms", 10**400, "health_check.timeout_ms"),
        ("health_check.interval_ms", 2**53 + 1, "health_check.interval_ms"),
        ("workload.stop_grace_ms", 10**30, "workload.stop_grace_ms"),
        ("health_check.timeout_ms", 0, "health_check.timeout_ms"),
        ("health_check.timeout_ms", "10s", "health_check.timeout_ms"),
        ("health_check.timeout_ms", 1.5, "health_check.timeout_ms"),
        ("health_check.interval_ms", True, "health_check.interval_ms"),
        ("resources.cpu_cores", 0, "resources.cpu_cores"),
        ("resources.cpu_cores", "1", "resources.cpu_cores"),
        ("resources.memory_mb", True, "resources.memory_mb"),
        ("resources.memory_mb", -512, "resources.memory_mb"),
        ("resources", "big", "resources"),
    ],
)
def test_each_invalid_field_is_named(path: str, value: Any, field: str) -> None:
    assert error_field(mutate(path, value)) == field


def test_workload_type_exec_does_not_need_base_url() -> None:
    doc = mutate("workload.type", "exec")
    del doc["workload"]["base_url"]
    m = parse_manifest(doc)
    assert m.workload is not None and m.workload.base_url is None
    assert m.workload.restart.policy == "never"  # exec runs once by default


def test_http_workload_restarts_on_failure_by_default() -> None:
    m = parse_manifest(caddy())
    assert m.workload is not None and m.workload.restart.policy == "on-failure"


def test_base_url_trailing_slash_is_dropped() -> None:
    m = parse_manifest(mutate("workload.base_url", "http://127.0.0.1:80/"))
    assert m.workload is not None and m.workload.base_url == "http://127.0.0.1:80"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (HEX, HEX),
        ("sha256:" + HEX.upper(), HEX),
        (" SHA256:" + HEX + " ", HEX),
    ],
)
def test_checksums_normalize_to_lowercase_hex(value: str, expected: str) -> None:
    assert normalize_checksum(value) == expected


@pytest.mark.parametrize("value", ["a" * 32, "a" * 63, "a" * 65, "sha256:" + "a" * 40,
                                   "sha512:" + "a" * 64, "sha256:sha256:" + "a" * 64, ""])
def test_a_sha256_is_exactly_64_hex_digits(value: str) -> None:
    with pytest.raises(ManifestError, match="64 hex digits"):
        normalize_checksum(value, field="initramfs.checksum")


def test_top_level_must_be_an_object() -> None:
    assert error_field([1]) == "(top level)"
    with pytest.raises(ManifestError) as info:
        load_manifest("[1]")
    assert info.value.field == "(top level)"


@pytest.mark.parametrize(
    "text", ["", "{", '{"name": "x",}', "{} {}", "NaN", '{"a": Infinity}', "\xff", b"\xff\xfe"]
)
def test_bad_json_is_a_manifest_error(text: str | bytes) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(text)
    assert "JSON" in info.value.message or "UTF-8" in info.value.message


def test_deep_nesting_is_a_manifest_error_not_a_crash() -> None:
    with pytest.raises(ManifestError):
        load_manifest("[" * 100_000)


# --- restart policy extension --------------------------------------------------


def test_restart_policy_string_and_object_forms() -> None:
    m = parse_manifest(mutate("workload.restart", "always"))
    assert m.workload is not None and m.workload.restart.policy == "always"
    m = parse_manifest(
        mutate(
            "workload.restart",
            {"policy": "on-failure", "initial_backoff_ms": 100, "max_backoff_ms": 1000,
             "max_restarts": 0, "reset_after_ms": 5000},
        )
    )
    assert m.workload is not None
    assert m.workload.restart == RestartPolicy("on-failure", 100, 1000, 0, 5000)


@pytest.mark.parametrize(
    ("restart", "field"),
    [
        ("sometimes", "workload.restart.policy"),
        ({"policy": 1}, "workload.restart.policy"),
        ({"initial_backoff_ms": 0}, "workload.restart.initial_backoff_ms"),
        ({"initial_backoff_ms": 1000, "max_backoff_ms": 10}, "workload.restart.max_backoff_ms"),
        ({"max_restarts": -1}, "workload.restart.max_restarts"),
        ({"max_restarts": "3"}, "workload.restart.max_restarts"),
        ({"reset_after_ms": 0}, "workload.restart.reset_after_ms"),
        ([1], "workload.restart"),
    ],
)
def test_bad_restart_policy_names_the_field(restart: Any, field: str) -> None:
    assert error_field(mutate("workload.restart", restart)) == field


def test_backoff_doubles_from_the_initial_delay_and_caps() -> None:
    p = RestartPolicy("always", 100, 1000)
    assert [p.backoff_ms(n) for n in range(1, 7)] == [100, 200, 400, 800, 1000, 1000]
    assert p.backoff_ms(0) == 100
    assert p.backoff_ms(10**9) == 1000  # never computes 2**huge


def test_max_backoff_defaults_to_at_least_the_initial_delay() -> None:
    m = parse_manifest(mutate("workload.restart", {"initial_backoff_ms": 60_000}))
    assert m.workload is not None and m.workload.restart.max_backoff_ms == 60_000


# --- property: any JSON value is a Manifest or a ManifestError -----------------

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(
        st.sampled_from(
            ["name", "version", "initramfs", "rootfs", "url", "checksum", "workload", "type",
             "entrypoint", "base_url", "workdir", "env", "restart", "policy", "health_check",
             "endpoint", "timeout_ms", "resources", "cpu_cores", "memory_mb", "enabled",
             "max_restarts", "initial_backoff_ms", "max_backoff_ms"]
        )
        | st.text(max_size=6),
        kids,
        max_size=6,
    ),
    max_leaves=40,
)


def check_manifest_or_error(value: Any) -> None:
    try:
        m = parse_manifest(value)
    except ManifestError as exc:
        assert isinstance(exc.field, str)
        return
    assert isinstance(m, Manifest) and m.name and m.version
    assert m.initramfs is not None or m.rootfs is not None


@given(json_values)
def test_arbitrary_json_is_a_manifest_or_a_manifest_error(value: Any) -> None:
    check_manifest_or_error(value)
    check_manifest_or_error(value if isinstance(value, dict) else {"x": value})


@given(st.sampled_from(
    ["name", "version", "initramfs", "workload", "health_check", "resources", "enabled"]
), json_values)
def test_seed_with_one_field_replaced_is_a_manifest_or_a_manifest_error(
    key: str, value: Any
) -> None:
    doc = caddy()
    doc[key] = value
    check_manifest_or_error(doc)
