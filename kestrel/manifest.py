"""The Volant plugin manifest: dataclasses and validation.

Shared by the guest (kestrel reads it from the command line), the builder
(fledge writes initramfs.url/checksum) and the host (volar installs it).
Every error names the field, e.g. ``workload.entrypoint: must be a
non-empty list of strings``. kestrel's own extensions live under
``workload.restart``, ``workload.stop_grace_ms`` and ``health_check.*``.
"""

from __future__ import annotations

from kestrel.digest import SHA256_RULE, parse_sha256
from kestrel.record import Record

# `typing` costs ~5 ms to import; annotations are strings here anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

WORKLOAD_TYPES = ("http", "exec", "grpc")
# kestrel extension ``agent``: what answers on the agent channel. "none" is an
# image without kestrel (fledge's custom and none init modes): the host then
# waits for no hello and stops the VM through the VMM (ACPI, then a kill).
AGENT_KINDS = ("kestrel", "none")
RESTART_POLICIES = ("never", "on-failure", "always")


class ManifestError(ValueError):
    """An invalid manifest; ``field`` is the dotted path of the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"manifest: {field}: {message}" if field else f"manifest: {message}")
        self.field = field
        self.message = message


# Value classes are plain slotted Records, not dataclasses: kestrel validates
# the manifest before it spawns the workload, where every import is boot time.


class Artifact(Record):
    __slots__ = ("url", "checksum", "format")
    url: str
    checksum: str | None
    format: str

    def __init__(self, url: str, checksum: str | None = None, format: str = "raw") -> None:
        self.url, self.checksum, self.format = url, checksum, format


class Resources(Record):
    __slots__ = ("cpu_cores", "memory_mb")
    cpu_cores: int
    memory_mb: int

    def __init__(self, cpu_cores: int = 1, memory_mb: int = 512) -> None:
        self.cpu_cores, self.memory_mb = cpu_cores, memory_mb


class RestartPolicy(Record):
    """kestrel extension ``workload.restart``: when to respawn, with backoff."""

    __slots__ = ("policy", "initial_backoff_ms", "max_backoff_ms", "max_restarts", "reset_after_ms")
    policy: str
    initial_backoff_ms: int
    max_backoff_ms: int
    max_restarts: int | None
    reset_after_ms: int  # a run this long counts as a success: backoff starts over

    def __init__(
        self,
        policy: str = "on-failure",
        initial_backoff_ms: int = 500,
        max_backoff_ms: int = 30_000,
        max_restarts: int | None = None,
        reset_after_ms: int = 10_000,
    ) -> None:
        self.policy, self.initial_backoff_ms, self.max_backoff_ms = (
            policy, initial_backoff_ms, max_backoff_ms,
        )
        self.max_restarts, self.reset_after_ms = max_restarts, reset_after_ms

    def backoff_ms(self, attempt: int) -> int:
        """Delay before restart number ``attempt`` (1-based): doubling, capped."""
        if attempt > 64:
            return self.max_backoff_ms
        delay: int = self.initial_backoff_ms * 2 ** max(0, attempt - 1)
        return min(self.max_backoff_ms, delay)


class BaseUrl(Record):
    """``workload.base_url`` parsed once, at validation: what the health
    checker connects to and what the host forwards (``port``)."""

    __slots__ = ("host", "port", "prefix", "query")
    host: str  # a DNS name or IP literal, IPv6 without brackets
    port: int
    prefix: str  # "" or "/path" without a trailing slash
    query: str  # "" or "?a=b": kept on every probe's request target

    def __init__(self, host: str, port: int = 80, prefix: str = "", query: str = "") -> None:
        self.host, self.port, self.prefix, self.query = host, port, prefix, query

    @property
    def authority(self) -> str:
        """host:port as an HTTP Host header writes it (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def target(self, endpoint: str) -> str:
        """The request target of a probe of ``endpoint`` under this base."""
        if self.query and "?" in endpoint:  # both carry a query: one '?', joined by '&'
            return self.prefix + endpoint + "&" + self.query[1:]
        return self.prefix + endpoint + self.query


class Workload(Record):
    __slots__ = ("type", "entrypoint", "base_url", "url", "workdir", "env", "restart",
                 "stop_grace_ms")
    type: str
    entrypoint: tuple[str, ...]
    base_url: str | None  # as written (without a trailing slash)
    url: BaseUrl | None  # the same, parsed: nothing downstream re-parses the string
    workdir: str
    env: dict[str, str]
    restart: RestartPolicy
    stop_grace_ms: int

    def __init__(
        self,
        *,
        type: str,
        entrypoint: tuple[str, ...],
        base_url: str | None = None,
        url: BaseUrl | None = None,
        workdir: str = "/",
        env: dict[str, str] | None = None,
        restart: RestartPolicy | None = None,
        stop_grace_ms: int = 10_000,
    ) -> None:
        self.type, self.entrypoint = type, entrypoint
        self.base_url, self.workdir = base_url, workdir
        if url is None and base_url is not None:
            url = parse_base_url(base_url)
        self.url = url
        self.env = env or {}
        self.restart = restart or RestartPolicy()
        self.stop_grace_ms = stop_grace_ms


class HealthCheck(Record):
    __slots__ = ("endpoint", "timeout_ms", "interval_ms", "failure_threshold")
    endpoint: str
    timeout_ms: int
    interval_ms: int
    failure_threshold: int  # consecutive failures before healthy -> unhealthy

    def __init__(
        self,
        *,
        endpoint: str = "/",
        timeout_ms: int = 10_000,
        interval_ms: int = 1_000,
        failure_threshold: int = 3,
    ) -> None:
        self.endpoint, self.timeout_ms = endpoint, timeout_ms
        self.interval_ms, self.failure_threshold = interval_ms, failure_threshold


class Manifest(Record):
    __slots__ = (
        "name", "version", "runtime", "enabled", "initramfs", "rootfs", "resources",
        "workload", "health_check", "agent", "raw",
    )
    name: str
    version: str
    runtime: str
    enabled: bool
    initramfs: Artifact | None
    rootfs: Artifact | None
    resources: Resources
    workload: Workload | None
    health_check: HealthCheck | None
    agent: str  # one of AGENT_KINDS
    raw: dict[str, Any]  # the document as given, for the host to store and re-encode

    def __init__(
        self,
        *,
        name: str,
        version: str,
        runtime: str,
        enabled: bool = True,
        initramfs: Artifact | None = None,
        rootfs: Artifact | None = None,
        resources: Resources | None = None,
        workload: Workload | None = None,
        health_check: HealthCheck | None = None,
        agent: str = "kestrel",
        raw: dict[str, Any] | None = None,
    ) -> None:
        self.name, self.version, self.runtime, self.enabled = name, version, runtime, enabled
        self.initramfs, self.rootfs = initramfs, rootfs
        self.resources = resources or Resources()
        self.workload, self.health_check = workload, health_check
        self.agent = agent
        self.raw = raw if raw is not None else {}

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, n) for n in self.__slots__ if n != "raw")


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
