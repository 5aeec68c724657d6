"""fledge.toml: parse and validate into a frozen `Config`, or raise ConfigError(key, file).

Volant's format (version "1", strategy "initramfs", [agent], [init], [source],
[mappings] or inline `mappings = {...}`, also accepted inside [init] where the docs'
examples put it) plus three kestrel additions:
  [kernel]    modules_dir = "<lib/modules/<release> tree>" (default: the kernel dir's
              current/modules), modules = ["virtio_net", ...] (default
              layout.DEFAULT_MODULES; [] for none)
  [libraries] copy_from_host = true   copy missing shared libraries from the build host
  [output]    compression = "gzip" | "zstd" | "none"
Also: busybox_url may be omitted (the host's static /bin/busybox is used), it and the
http agent url take http(s)://, file:// or a path; a destination ending in "/" places
a file into that directory.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import kestrel
from builder.errors import ConfigError
from kestrel.boot import BOOT_MOUNTED
from kestrel.digest import SHA256_RULE, parse_sha256

STRATEGIES = ("release", "local", "http")
COMPRESSIONS = ("gzip", "zstd", "none")

TOP_KEYS = {"version", "strategy", "agent", "init", "source", "mappings", "kernel",
            "libraries", "output"}
AGENT_KEYS = {"release": {"version"}, "local": {"path"}, "http": {"url", "checksum"}}


@dataclass(frozen=True)
class AgentConfig:
    strategy: str  # release | local | http
    version: str = "latest"  # release
    path: Path | None = None  # local
    url: str | None = None  # http
    checksum: str | None = None  # http: bare lowercase hex


@dataclass(frozen=True)
class Mapping:
    source: Path  # absolute host path
    dest: str  # normalized absolute image path
    key: str  # the source as written, for messages


@dataclass(frozen=True)
class KernelConfig:
    modules_dir: Path | None  # None: layout.kernel_dir()/current/modules
    modules: tuple[str, ...]
    explicit: bool  # a [kernel] section was written


@dataclass(frozen=True)
class Config:
    file: str  # as the user named it, for messages
    base: Path  # the toml's folder: relative paths start here
    init_mode: str  # default | custom | none
    init_path: Path | None
    agent: AgentConfig | None
    busybox_url: str | None
    busybox_sha256: str | None
    mappings: tuple[Mapping, ...]
    kernel: KernelConfig
    copy_host_libs: bool
    compression: str


def load_config(path: Path) -> Config:
    file = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("", file, "not found (run fledge in the folder of your fledge.toml "
                          "or pass -c FILE)") from None
    except OSError as e:
        raise ConfigError("", file, f"cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("", file, f"invalid TOML: {e}") from None
    return parse_config(data, file=file, base=path.resolve().parent)


class _Reader:
    def __init__(self, file: str, base: Path) -> None:
        self.file = file
        self.base = base

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(key, self.file, message)

    def table(self, data: dict[str, Any], key: str) -> dict[str, Any] | None:
        value = data.get(key.rsplit(".", 1)[-1])
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, not {_kind(value)}")
        return value

    def unknown(self, table: dict[str, Any], allowed: set[str], prefix: str) -> None:
        for k in table:
            if k not in allowed:
                where = f"{prefix}.{k}" if prefix else k
                raise self.fail(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def string(self, table: dict[str, Any], key: str, where: str) -> str | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(where, f"must be a string, not {_kind(value)}")
        if not value.strip():
            raise self.fail(where, "must not be empty")
        return value

    def boolean(self, table: dict[str, Any], key: str, where: str) -> bool | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self.fail(where, f"must be true or false, not {_kind(value)}")
        return value

    def host_path(self, text: str, where: str, *, want: str = "any") -> Path:
        try:
            p = Path(text).expanduser()
        except RuntimeError:  # "~nosuchuser/...": no home directory to expand to
            raise self.fail(where, f"{text}: cannot expand ~ (no such user)") from None
        p = p if p.is_absolute() else self.base / p
        try:
            p.stat()
        except FileNotFoundError:
            raise self.fail(where, f"{text}: no such file or directory (relative to "
                            f"{self.base})") from None
        except (OSError, ValueError) as e:  # ENAMETOOLONG, ELOOP, EACCES, NUL bytes
            reason = getattr(e, "strerror", None) or str(e)
            raise self.fail(where, f"{text[:80]}: {reason}") from None
        if want == "file" and not p.is_file():
            raise self.fail(where, f"{text}: must be a file")
        if want == "dir" and not p.is_dir():
            raise self.fail(where, f"{text}: must be a directory")
        return p


def _kind(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def normalize_sha256(value: str, *, where: str, r: _Reader) -> str:
    hexpart = parse_sha256(value)
    if hexpart is None:
        raise r.fail(where, f"{value!r} is not a sha256 ({SHA256_RULE})")
    return hexpart


def image_dest(text: str, *, where: str, r: _Reader) -> str:
    if "\0" in text:
        raise r.fail(where, "destination contains a NUL byte")
    if not text.startswith("/"):
        raise r.fail(where, f"destination {text!r} must be an absolute path in the image")
    if ".." in PurePosixPath(text).parts:
        raise r.fail(where, f"destination {text!r} must not contain '..'")
    return str(PurePosixPath(text))


def parse_config(data: dict[str, Any], *, file: str, base: Path) -> Config:
    r = _Reader(file, base)
    r.unknown(data, TOP_KEYS, "")
    version = data.get("version")
    if version is None:
        raise r.fail("version", 'required: add version = "1"')
    if version != "1":
        raise r.fail("version", f'must be the string "1", not {version!r}')
    strategy = data.get("strategy")
    if strategy is None:
        raise r.fail("strategy", 'required: add strategy = "initramfs"')
    if strategy == "oci_rootfs":
        raise r.fail("strategy", 'oci_rootfs is not supported yet; use strategy = "initramfs"')
    if strategy != "initramfs":
        raise r.fail("strategy", f'must be "initramfs", not {strategy!r}')

    init = r.table(data, "init") or {}
    r.unknown(init, {"path", "none", "mappings"}, "init")
    init_text = r.string(init, "path", "init.path")
    none = r.boolean(init, "none", "init.none")
    if init_text is not None and none:
        raise r.fail("init", "path and none = true are mutually exclusive")
    init_mode = "custom" if init_text is not None else "none" if none else "default"
    init_path = r.host_path(init_text, "init.path", want="file") if init_text else None

    agent = _agent(r, data, init_mode)
    source = r.table(data, "source") or {}
    r.unknown(source, {"busybox_url", "busybox_sha256"}, "source")
    busybox_url = r.string(source, "busybox_url", "source.busybox_url")
    sha_text = r.string(source, "busybox_sha256", "source.busybox_sha256")
    busybox_sha = (
        normalize_sha256(sha_text, where="source.busybox_sha256", r=r) if sha_text else None
    )

    mappings = _mappings(r, data, init)
    dests = {m.dest: m for m in mappings}
    if init_mode == "none" and "/init" not in dests and not _dir_provides_init(mappings):
        raise r.fail("mappings", "[init] none = true needs a mapping to /init (your PID 1)")
    if init_mode == "custom" and "/init" in dests and init_path is not None \
            and dests["/init"].source.resolve() != init_path.resolve():
        raise r.fail(f'mappings."{dests["/init"].key}"',
                     "maps a different file to /init than [init] path")
    if init_mode == "default":
        for reserved in ("/init", "/bin/kestrel"):
            if reserved in dests:
                raise r.fail(f'mappings."{dests[reserved].key}"',
                             f"{reserved} is fledge's in default init mode; use [init] path/none "
                             'or [agent] source_strategy = "local"')

    return Config(
        file=file, base=base, init_mode=init_mode, init_path=init_path, agent=agent,
        busybox_url=busybox_url, busybox_sha256=busybox_sha, mappings=mappings,
        kernel=_kernel(r, data), copy_host_libs=_libraries(r, data),
        compression=_compression(r, data),
    )


def _agent(r: _Reader, data: dict[str, Any], init_mode: str) -> AgentConfig | None:
    table = r.table(data, "agent")
    if init_mode != "default":
        if table is not None:
            what = "[init] path (custom init)" if init_mode == "custom" else "[init] none = true"
            raise r.fail("agent", f"not allowed with {what}: there is no kestrel in this mode")
        return None
    if table is None:
        return AgentConfig(strategy="release")
    strategy = r.string(table, "source_strategy", "agent.source_strategy") or "release"
    if strategy not in STRATEGIES:
        raise r.fail("agent.source_strategy", f"must be one of {', '.join(STRATEGIES)}, "
                     f"not {strategy!r}")
    r.unknown(table, {"source_strategy"} | AGENT_KEYS[strategy], "agent")
    if strategy == "release":
        version = r.string(table, "version", "agent.version") or "latest"
        ours = kestrel.__version__
        if version != "latest" and version.removeprefix("v") != ours:
            raise r.fail("agent.version", f'this fledge carries kestrel {ours}: use "latest" or '
                         f'"{ours}", not {version!r}')
        return AgentConfig(strategy="release", version=version)
    if strategy == "local":
        text = r.string(table, "path", "agent.path")
        if text is None:
            raise r.fail("agent.path", 'required with source_strategy = "local"')
        return AgentConfig(strategy="local", path=r.host_path(text, "agent.path", want="file"))
    url = r.string(table, "url", "agent.url")
    if url is None:
        raise r.fail("agent.url", 'required with source_strategy = "http"')
    check = r.string(table, "checksum", "agent.checksum")
    checksum = normalize_sha256(check, where="agent.checksum", r=r) if check else None
    return AgentConfig(strategy="http", url=url, checksum=checksum)


def _mappings(r: _Reader, data: dict[str, Any], init: dict[str, Any]) -> tuple[Mapping, ...]:
    tables: list[tuple[str, dict[str, Any]]] = []
    top = r.table(data, "mappings")
    if top is not None:
        tables.append(("mappings", top))
    # The docs write `mappings = {...}` after [init], which TOML puts inside [init].
    nested = r.table(init, "init.mappings")
    if nested is not None:
        tables.append(("init.mappings", nested))
    result: list[Mapping] = []
    seen: dict[str, str] = {}
    for prefix, table in tables:
        for src, dest in table.items():
            where = f'{prefix}."{src}"'
            if not isinstance(dest, str):
                raise r.fail(where, f"destination must be a string, not {_kind(dest)}")
            if not src.strip():
                raise r.fail(where, "source must not be empty")
            norm = image_dest(dest, where=where, r=r)
            source = r.host_path(src, where)
            if dest.endswith("/") and norm != "/" and source.is_file():
                # "app" = "/usr/bin/" means into that directory, as cp would do.
                norm = f"{norm}/{source.name}"
            _refuse_boot_mounted(r, where, source, norm)
            if norm in seen:
                raise r.fail(where, f"{norm} is already the destination of {seen[norm]!r}")
            seen[norm] = src
            result.append(Mapping(source=source, dest=norm, key=src))
    return tuple(result)


def _refuse_boot_mounted(r: _Reader, where: str, source: Path, dest: str) -> None:
    """A file under a place the shim or kestrel mounts over at boot would be
    hidden in the running VM: refuse it at build time, naming the mapping."""
    for top in BOOT_MOUNTED:
        if dest == top or dest.startswith(top + "/"):
            raise r.fail(where, f"{dest} is under {top}, which is mounted over at boot "
                                "(its files would be hidden); map it elsewhere")
        below = PurePosixPath(top).relative_to(dest) if _is_under(top, dest) else None
        if below is not None and source.is_dir() and (source / below).is_dir() \
                and any((source / below).iterdir()):
            raise r.fail(where, f"{source / below} would land in {top}, which is mounted "
                                "over at boot (its files would be hidden); leave it empty")


def _is_under(path: str, parent: str) -> bool:
    return parent == "/" or path.startswith(parent + "/")


def _dir_provides_init(mappings: tuple[Mapping, ...]) -> bool:
    return any(m.dest == "/" and (m.source / "init").exists() for m in mappings)


def _kernel(r: _Reader, data: dict[str, Any]) -> KernelConfig:
    from kestrel.layout import DEFAULT_MODULES

    table = r.table(data, "kernel")
    if table is None:
        return KernelConfig(modules_dir=None, modules=tuple(DEFAULT_MODULES), explicit=False)
    r.unknown(table, {"modules_dir", "modules"}, "kernel")
    text = r.string(table, "modules_dir", "kernel.modules_dir")
    modules_dir = r.host_path(text, "kernel.modules_dir", want="dir") if text else None
    modules = table.get("modules", list(DEFAULT_MODULES))
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        raise r.fail("kernel.modules", "must be an array of module names")
    return KernelConfig(modules_dir=modules_dir, modules=tuple(modules), explicit=True)


def _libraries(r: _Reader, data: dict[str, Any]) -> bool:
    table = r.table(data, "libraries") or {}
    r.unknown(table, {"copy_from_host"}, "libraries")
    return bool(r.boolean(table, "copy_from_host", "libraries.copy_from_host"))


def _compression(r: _Reader, data: dict[str, Any]) -> str:
    table = r.table(data, "output") or {}
    r.unknown(table, {"compression"}, "output")
    value = r.string(table, "compression", "output.compression") or "gzip"
    if value not in COMPRESSIONS:
        raise r.fail("output.compression", f"must be one of {', '.join(COMPRESSIONS)}, "
                     f"not {value!r}")
    return value
