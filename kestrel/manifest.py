"""The Volant plugin manifest: parsing and validation, and the names callers
import (the value classes themselves are in kestrel/manifestmodel.py).

Shared by the guest (kestrel reads it from the command line), the builder
(fledge writes initramfs.url/checksum) and the host (volar installs it).
Every error names the field, e.g. ``workload.entrypoint: must be a
non-empty list of strings``. kestrel's own extensions live under
``workload.restart``, ``workload.stop_grace_ms`` and ``health_check.*``.
"""

from __future__ import annotations

from kestrel.digest import SHA256_RULE, parse_sha256
from kestrel.manifestmodel import (
    AGENT_KINDS,
    RESTART_POLICIES,
    WORKLOAD_TYPES,
    Artifact,
    BaseUrl,
    HealthCheck,
    Manifest,
    ManifestError,
    Resources,
    RestartPolicy,
    Workload,
)

# `typing` costs ~5 ms to import; annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "AGENT_KINDS", "INT_MAX", "RESTART_POLICIES", "WORKLOAD_TYPES", "Artifact", "BaseUrl",
    "HealthCheck", "Manifest", "ManifestError", "Resources", "RestartPolicy", "Workload",
    "load_manifest", "normalize_checksum", "parse_base_url", "parse_manifest",
]


# --- field readers: each names its path in the error -----------------------


def _obj(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(path, f"must be an object, not {type(value).__name__}")
    return value


def _str(d: dict[str, Any], key: str, path: str, *, required: bool = False) -> str | None:
    v = d.get(key)
    if v is None:
        if required:
            raise ManifestError(f"{path}{key}", "is required")
        return None
    if not isinstance(v, str):
        raise ManifestError(f"{path}{key}", f"must be a string, not {type(v).__name__}")
    if required and not v.strip():
        raise ManifestError(f"{path}{key}", "must not be empty")
    return v.strip() if required else v


# JSON's exact-integer limit: a bigger count of milliseconds overflows the
# float seconds a timer is given (OverflowError in PID 1), and means nothing.
INT_MAX = 2**53


def _int(d: dict[str, Any], key: str, path: str, default: int, *, minimum: int = 1) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ManifestError(f"{path}{key}", f"must be an integer, not {type(v).__name__}")
    if v < minimum:
        raise ManifestError(f"{path}{key}", f"must be >= {minimum}, got {v}")
    if v > INT_MAX:
        raise ManifestError(f"{path}{key}", f"must be <= {INT_MAX}, got {v}")
    return v


# What an HTTP request target may hold (RFC 9112 request-target, as h11
# checks it: visible ASCII). Anything else must arrive percent-encoded.
_TARGET_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")


def parse_base_url(text: str, *, field: str = "workload.base_url") -> BaseUrl:
    """``http://host[:port][/prefix][?query]`` -> BaseUrl, or a ManifestError.

    Hand-written, not urllib.parse: this runs on kestrel's boot path, where
    ``re`` is not imported. Hosts are ASCII names or IP literals (IPv6 in
    brackets); a name the guest cannot resolve is a failed probe, not an error.
    """
    def bad(why: str) -> ManifestError:
        return ManifestError(field, f"{text!r}: {why}")

    if not text.startswith("http://"):
        raise bad("only http:// is supported")
    rest = text[len("http://"):].partition("#")[0]  # a fragment never goes on the wire
    rest, qmark, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    prefix = ("/" + path).rstrip("/") if slash else ""
    query = qmark + query if query else ""
    if any(c not in _TARGET_CHARS for c in prefix + query):
        raise bad("path and query must be visible ASCII (percent-encode the rest)")
    if "@" in authority:
        raise bad("credentials in the URL are not supported")
    if authority.startswith("["):
        host, bracket, port_text = authority[1:].partition("]")
        if not bracket or not host or any(c not in _IPV6_CHARS for c in host) \
                or host.count(":") < 2:
            raise bad("an IPv6 host is [hex:digits:and:colons]")
        if port_text and not port_text.startswith(":"):
            raise bad("expected ':port' after the IPv6 address")
        port_text = port_text[1:]
    else:
        host, _, port_text = authority.partition(":")
        if not host:
            raise bad("no host")
        if ":" in port_text:
            raise bad("an IPv6 host must be in brackets: http://[::1]:8080")
        if len(host) > 253 or any(c not in _HOST_CHARS for c in host) \
                or any(not label or len(label) > 63 for label in host.removesuffix(".").split(".")):
            raise bad("the host must be an ASCII name or IP address")
    port = 80
    if port_text:
        if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
                and 0 < int(port_text) < 65536):
            raise bad(f"port {port_text!r} is not a number from 1 to 65535")
        port = int(port_text)
    return BaseUrl(host, port, prefix, query)


def normalize_checksum(checksum: str, *, field: str = "checksum") -> str:
    """Return the lowercase hex of ``sha256:<hex>`` or bare hex (kestrel.digest's rule)."""
    value = parse_sha256(checksum)
    if value is None:
        raise ManifestError(field, f"{checksum!r} is not a sha256 ({SHA256_RULE})")
    return value


def _artifact(value: Any, path: str) -> Artifact:
    d = _obj(value, path)
    url = _str(d, "url", f"{path}.", required=True)
    assert url is not None
    checksum = _str(d, "checksum", f"{path}.")
    if checksum:
        normalize_checksum(checksum, field=f"{path}.checksum")
    fmt = _str(d, "format", f"{path}.") or "raw"
    return Artifact(url=url, checksum=checksum or None, format=fmt)


def _restart(value: Any, wtype: str) -> RestartPolicy:
    default = "never" if wtype == "exec" else "on-failure"
    if value is None:
        return RestartPolicy(policy=default)
    path = "workload.restart"
    if isinstance(value, str):
        value = {"policy": value}
    d = _obj(value, path)
    policy = _str(d, "policy", f"{path}.") or default
    if policy not in RESTART_POLICIES:
        raise ManifestError(f"{path}.policy", f"{policy!r}: expected one of {RESTART_POLICIES}")
    initial = _int(d, "initial_backoff_ms", f"{path}.", 500)
    maximum = _int(d, "max_backoff_ms", f"{path}.", max(30_000, initial))
    if maximum < initial:
        raise ManifestError(f"{path}.max_backoff_ms", "must be >= initial_backoff_ms")
    max_restarts = d.get("max_restarts")
    if max_restarts is not None:
        max_restarts = _int(d, "max_restarts", f"{path}.", 0, minimum=0)
    reset = _int(d, "reset_after_ms", f"{path}.", 10_000)
    return RestartPolicy(policy, initial, maximum, max_restarts, reset)


def _workload(value: Any) -> Workload:
    d = _obj(value, "workload")
    wtype = _str(d, "type", "workload.") or "http"
    if wtype not in WORKLOAD_TYPES:
        raise ManifestError("workload.type", f"{wtype!r}: expected one of {WORKLOAD_TYPES}")
    ep = d.get("entrypoint")
    if (
        not isinstance(ep, list)
        or not ep
        or not all(isinstance(a, str) for a in ep)
        or not ep[0].strip()
    ):
        raise ManifestError("workload.entrypoint", "must be a non-empty list of strings")
    if any("\0" in a for a in ep):
        raise ManifestError("workload.entrypoint", "must not contain NUL bytes")
    base_url = _str(d, "base_url", "workload.")
    if wtype == "http" and not base_url:
        raise ManifestError("workload.base_url", "is required for an http workload")
    url = parse_base_url(base_url) if base_url else None
    workdir = _str(d, "workdir", "workload.") or "/"
    if not workdir.startswith("/"):
        raise ManifestError("workload.workdir", f"{workdir!r} must be an absolute path")
    env_raw = d.get("env") or {}
    env = _obj(env_raw, "workload.env")
    for k, v in env.items():
        if not isinstance(v, str):
            raise ManifestError(f"workload.env.{k}", "must be a string")
        if not k or "=" in k or "\0" in k + v:
            raise ManifestError(f"workload.env.{k}", "is not a valid environment variable")
    grace = _int(d, "stop_grace_ms", "workload.", 10_000, minimum=0)
    return Workload(
        type=wtype,
        entrypoint=tuple(ep),
        base_url=base_url.rstrip("/") if base_url else None,
        url=url,
        workdir=workdir,
        env=dict(env),
        restart=_restart(d.get("restart"), wtype),
        stop_grace_ms=grace,
    )


def _health(value: Any) -> HealthCheck:
    d = _obj(value, "health_check")
    endpoint = _str(d, "endpoint", "health_check.") or "/"
    if not endpoint.startswith("/"):
        raise ManifestError("health_check.endpoint", f"{endpoint!r} must start with '/'")
    if any(c not in _TARGET_CHARS for c in endpoint):
        raise ManifestError("health_check.endpoint",
                            "must be visible ASCII, no whitespace (percent-encode the rest)")
    return HealthCheck(
        endpoint=endpoint,
        timeout_ms=_int(d, "timeout_ms", "health_check.", 10_000),
        interval_ms=_int(d, "interval_ms", "health_check.", 1_000),
        failure_threshold=_int(d, "failure_threshold", "health_check.", 3),
    )


def parse_manifest(obj: Any) -> Manifest:
    """Validate a decoded JSON document and return the Manifest."""
    d = _obj(obj, "(top level)")
    name = _str(d, "name", "", required=True)
    version = _str(d, "version", "", required=True)
    assert name is not None and version is not None
    runtime = _str(d, "runtime", "") or name
    enabled = d.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ManifestError("enabled", "must be true or false")
    initramfs = _artifact(d["initramfs"], "initramfs") if d.get("initramfs") is not None else None
    rootfs = _artifact(d["rootfs"], "rootfs") if d.get("rootfs") is not None else None
    if initramfs is None and rootfs is None:
        raise ManifestError("initramfs", "one of initramfs or rootfs is required")
    res = _obj(d.get("resources") or {}, "resources")
    resources = Resources(
        cpu_cores=_int(res, "cpu_cores", "resources.", 1),
        memory_mb=_int(res, "memory_mb", "resources.", 512),
    )
    workload = _workload(d["workload"]) if d.get("workload") is not None else None
    health = _health(d["health_check"]) if d.get("health_check") is not None else None
    agent = _str(d, "agent", "") or "kestrel"
    if agent not in AGENT_KINDS:
        raise ManifestError("agent", f"{agent!r}: expected one of {', '.join(AGENT_KINDS)}")
    return Manifest(
        name=name,
        version=version,
        runtime=runtime,
        enabled=enabled,
        initramfs=initramfs,
        rootfs=rootfs,
        resources=resources,
        workload=workload,
        health_check=health,
        agent=agent,
        raw=d,
    )


def load_manifest(data: bytes | str) -> Manifest:
    """Parse manifest JSON text; bad JSON is a ManifestError naming the position."""
    from kestrel.jsonlite import loads

    try:
        obj = loads(data)
    except (ValueError, RecursionError) as exc:
        raise ManifestError("", f"not valid JSON ({exc})") from None
    return parse_manifest(obj)
