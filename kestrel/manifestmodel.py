"""The Volant plugin manifest's model: value classes, their defaults, and
ManifestError. Parsing and validation, and the public face, are kestrel/manifest.py.
"""

from __future__ import annotations

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
            from kestrel.manifest import parse_base_url  # the validator imports this module

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
