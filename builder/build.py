"""`fledge build`: one function per step, from a validated Config to a finished image.

Agent, busybox, init, kernel modules, mappings go into an in-memory ImageTree; the ELF
closure is checked on a shadow of it; the cpio stream is compressed into a temporary
file next to the output, fsynced, and renamed: a failed build leaves no output file.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from builder import compress, cpio, elf, kmod, sources
from builder.config import Config, load_config
from builder.errors import BuildError, ConfigError
from builder.tree import BASE_DIRS, ImageTree, TreeError
from kestrel import layout
from kestrel.cliout import Output
from kestrel.digest import sha256_file

# Volant's list, switch_root, and the tools people reach for on a console.
APPLETS = (
    "sh", "ash", "ls", "cat", "cp", "mv", "rm", "mkdir", "rmdir", "ln", "chmod", "chown", "ps",
    "kill", "mount", "umount", "grep", "sed", "awk", "find", "test", "echo", "printf", "true",
    "false", "sleep", "pwd", "cd", "env", "which", "tar", "gzip", "gunzip", "wget", "vi", "ip",
    "ifconfig", "route", "hostname", "mknod", "chroot", "top", "free", "dmesg", "nc", "df", "du",
    "head", "tail", "wc", "sort", "uniq", "cut", "tr", "xargs", "tee", "date", "uname", "id",
    "touch", "stat", "less",
)
SBIN_APPLETS = ("switch_root",)
VERSION_FILE = "/etc/kestrel/version"  # the agent version, for `fledge inspect`
# Files every image gets unless a mapping provides its own. Without /etc/hosts, Go and
# glibc programs resolve "localhost" through DNS and fail (seen with Debian's caddy:
# "lookup localhost on [::1]:53: connection refused").
DEFAULT_FILES = {
    "/etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "/etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "/etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "/etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
}
# What user mappings may overwrite.
REPLACEABLE = frozenset({"busybox applet", "fledge default"})


@dataclass(frozen=True)
class BuildOptions:
    config_path: Path = Path("fledge.toml")
    output: Path | None = None  # default: plugin.cpio.gz (.zst, or none) in the cwd
    compression: str | None = None  # overrides [output] compression
    copy_host_libs: bool = False
    source_date_epoch: int = cpio.DEFAULT_MTIME
    cache_dir: Path | None = None


@dataclass(frozen=True)
class BuildResult:
    output: Path
    size: int
    sha256: str
    entries: int
    seconds: float
    init_mode: str = "default"


# fledge's steps go through the CLIs' one output path.
Progress = Output


def default_output(compression: str) -> Path:
    return Path("plugin.cpio" + compress.SUFFIXES[compression])


def source_date_epoch(env: dict[str, str] | None = None) -> int:
    text = (env if env is not None else os.environ).get("SOURCE_DATE_EPOCH")
    if text is None or text == "":
        return cpio.DEFAULT_MTIME
    if not text.isdigit() or int(text) >= 1 << 32:
        raise ConfigError("SOURCE_DATE_EPOCH", "environment",
                          f"must be seconds since 1970 (0..4294967295), not {text!r}")
    return int(text)


def build(options: BuildOptions, *, progress: Progress | None = None) -> BuildResult:
    started = time.perf_counter()
    p = progress or Progress()
    config = load_config(options.config_path)
    compression = options.compression or config.compression
    output = options.output or default_output(compression)
    cache = options.cache_dir or sources.cache_dir()
    tree = ImageTree()
    try:
        for d in BASE_DIRS:
            tree.mkdir(d)
        for path, text in DEFAULT_FILES.items():
            tree.add_file(path, perm=0o644, data=text.encode(), origin="fledge default")
        agent_lib_dirs = add_agent(tree, config, cache=cache, progress=p)
        add_busybox(tree, config, progress=p)
        add_init(tree, config, cache=cache, progress=p)
        add_modules(tree, config, progress=p)
        add_mappings(tree, config, progress=p)
        check_libraries(tree, config, copy=options.copy_host_libs or config.copy_host_libs,
                        extra_search=agent_lib_dirs, progress=p)
    except TreeError as e:
        raise BuildError("mappings", config.file, str(e)) from None
    except OSError as e:  # an unreadable source, a full /tmp: one line, not a traceback
        raise BuildError("", config.file, f"{e.filename or ''}: {e.strerror or e}") from None
    p.step("Building initramfs...")
    size, digest = write_image(tree, output, compression=compression,
                               mtime=options.source_date_epoch, file=config.file)
    p.step(f"Initramfs complete: {output} ({size / (1024 * 1024):.1f} MB)")
    return BuildResult(output=output, size=size, sha256=digest, entries=len(tree.entries),
                       seconds=time.perf_counter() - started, init_mode=config.init_mode)


def add_agent(tree: ImageTree, config: Config, *, cache: Path, progress: Progress) -> list[Path]:
    """Place kestrel (default init mode only); returns extra library dirs of its bundle."""
    agent = config.agent
    if config.init_mode != "default" or agent is None:
        return []
    if agent.strategy == "release":
        progress.step(f"Freezing agent (kestrel {agent.version})...")
        from builder.freeze import freeze_kestrel

        try:
            frozen = freeze_kestrel(cache_dir=cache)
        except Exception as e:  # the freezer's own failure, reported in one line
            raise BuildError("agent", config.file, f"freezing kestrel failed: {e}") from None
        count = tree.add_host_dir(frozen.root, "/", origin="agent", allow_absolute_links=True)
        if tree.kind(layout.AGENT_PATH) is None:
            raise BuildError("agent", config.file, f"the frozen agent has no {layout.AGENT_PATH}")
        tree.add_file(VERSION_FILE, perm=0o644, data=f"{frozen.version}\n".encode(),
                      origin="agent")
        progress.item(f"kestrel {frozen.version}: {count} entries")
        return sorted({Path(os.path.dirname(p)) for p, e in tree.regular_files()
                       if tree.origins[p] == "agent" and ".so" in Path(p).name})
    if agent.strategy == "local":
        assert agent.path is not None
        progress.step(f"Using local agent {agent.path}...")
        path = agent.path
    else:
        assert agent.url is not None
        progress.step(f"Downloading agent {agent.url}...")
        path = sources.fetch(agent.url, sha256=agent.checksum, key="agent.url",
                             file=config.file, base=config.base, sha_key="agent.checksum",
                             output=progress)
    tree.add_file(layout.AGENT_PATH, perm=0o755, source=path.resolve(), origin="agent")
    return []


def add_busybox(tree: ImageTree, config: Config, *, progress: Progress) -> None:
    progress.step(f"Sourcing busybox ({config.busybox_url or sources.HOST_BUSYBOX})...")
    path = sources.busybox(url=config.busybox_url, sha256=config.busybox_sha256,
                           file=config.file, base=config.base, output=progress)
    tree.add_file("/bin/busybox", perm=0o755, source=path.resolve(), origin="busybox")
    for applet in APPLETS:
        tree.add_symlink(f"/bin/{applet}", "busybox", origin="busybox applet")
    for applet in SBIN_APPLETS:
        tree.add_symlink(f"/sbin/{applet}", "../bin/busybox", origin="busybox applet")
    progress.detail(f"{len(APPLETS) + len(SBIN_APPLETS)} applet links")


def add_init(tree: ImageTree, config: Config, *, cache: Path, progress: Progress) -> None:
    # Recorded in every image: volar must know without booting whether an agent answers.
    tree.add_file(layout.INIT_MODE_FILE, perm=0o644, data=f"{config.init_mode}\n".encode(),
                  origin="fledge")
    if config.init_mode == "custom":
        assert config.init_path is not None
        progress.step(f"Installing custom init {config.init_path.name} as /init...")
        tree.add_file(layout.INIT_PATH, perm=0o755, source=config.init_path.resolve(),
                      origin="[init] path")
        return
    if config.init_mode == "none":
        progress.step("Init mode none: your mapped /init is PID 1")
        return
    progress.step("Compiling C init...")
    from builder.shim import build_shim

    try:
        shim = build_shim(cache_dir=cache)
    except Exception as e:  # ShimBuildError and OSError, reported in one line
        raise BuildError("init", config.file, f"compiling the C init failed: {e}") from None
    tree.add_file(layout.INIT_PATH, perm=0o755, source=shim, origin="C init")
    tree.add_symlink("/sbin/init", "../init", origin="C init")


def modules_dir(config: Config) -> Path:
    if config.kernel.modules_dir is not None:
        return config.kernel.modules_dir
    default = layout.kernel_dir() / "current" / "modules"
    if not default.is_dir():
        raise BuildError("kernel", config.file,
                         f"no kernel modules at {default}: run `volar kernel fetch`, or set "
                         "[kernel] modules_dir, or [kernel] modules = [] for none")
    return default


def add_modules(tree: ImageTree, config: Config, *, progress: Progress) -> None:
    wanted = config.kernel.modules
    if not wanted or not (config.init_mode == "default" or config.kernel.explicit):
        return
    source = modules_dir(config)
    plan = kmod.plan_modules(source, wanted, file=config.file)
    progress.step(f"Adding kernel modules ({plan.release}): {len(plan.modules)} modules")
    base = f"/lib/modules/{plan.release}"
    for m in plan.modules:
        tree.add_file(f"{base}/{m.rel}", perm=0o644, data=m.data, origin="kernel modules")
        progress.detail(f"{m.name} <- {', '.join(m.depends) or '-'}")
    if plan.builtin:
        progress.detail(f"built into the kernel: {', '.join(plan.builtin)}")
    tree.add_file(layout.MODULES_LOAD_LIST, perm=0o644, data=plan.load_list().encode(),
                  origin="kernel modules")


def add_mappings(tree: ImageTree, config: Config, *, progress: Progress) -> None:
    if not config.mappings:
        return
    progress.step("Preparing file mappings...")
    for m in config.mappings:
        origin = f'mapping "{m.key}"'
        if config.init_mode == "custom" and m.dest == layout.INIT_PATH:
            progress.item(f"{m.key} -> {m.dest} (the custom init)")
            continue
        if m.source.is_dir():
            n = tree.add_host_dir(m.source, m.dest, origin=origin, replace=REPLACEABLE)
            progress.item(f"{m.key} -> {m.dest} (directory, {n} entries)")
        else:
            perm = tree.add_host_file(m.source, m.dest, origin=origin, replace=REPLACEABLE)
            progress.item(f"{m.key} -> {m.dest}" + (" (executable)" if perm & 0o111 else ""))


def check_libraries(tree: ImageTree, config: Config, *, copy: bool, extra_search: list[Path],
                    progress: Progress) -> None:
    """Every ELF finds its interpreter and libraries in the image, or the build fails
    naming them (or, with copy, they come from the build host)."""
    progress.step("Checking shared libraries...")
    closure = _closure(tree, extra_search)
    if closure.missing and copy:
        wanted = sorted({m.soname for m in closure.missing if m.host_path is not None})
        for dest, src in sorted(elf.host_library_closure(wanted).items()):
            if dest in tree:
                continue
            tree.add_file(dest, perm=0o755, source=src, origin="host library")
            progress.item(f"{src} -> {dest} (from the build host)")
        closure = _closure(tree, extra_search)
    if closure.missing:
        needers: dict[str, list[str]] = {}
        hosts: dict[str, Path | None] = {}
        for m in closure.missing:
            needers.setdefault(m.soname, []).append(m.needed_by)
            hosts[m.soname] = m.host_path
        parts = []
        for soname, users in needers.items():
            host = hosts[soname]
            where = f"host has {host}" if host else "not on this host either"
            parts.append(f"{soname} (needed by {', '.join(users)}; {where})")
        hint = ("" if copy else "; add them to [mappings], or set [libraries] copy_from_host "
                "= true (or --copy-host-libs)")
        raise BuildError("libraries", config.file,
                         f"missing shared libraries: {', '.join(parts)}{hint}")
    for path, info in sorted(closure.elves.items()):
        if not info.is_static and info.interpreter:
            progress.detail(f"{path}: dynamic, libraries present")


def _closure(tree: ImageTree, extra_search: list[Path]) -> elf.Closure:
    with tempfile.TemporaryDirectory(prefix="fledge-shadow-") as tmp:
        root = Path(tmp)
        tree.materialize(root)
        files = [Path(p) for p, _ in tree.regular_files()]
        return elf.resolve_closure(files, root=root, extra_search=extra_search)


def write_image(tree: ImageTree, output: Path, *, compression: str, mtime: int,
                file: str) -> tuple[int, str]:
    """Write the archive atomically; returns (size, sha256 hex)."""
    output = output.absolute()
    if output.is_dir():
        raise BuildError("output", file, f"{output} is a directory")
    if not output.parent.is_dir():
        raise BuildError("output", file, f"{output.parent}: no such directory")
    fd, tmp_name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            with compress.compressor(out, compression) as stream:
                cpio.write_archive(tree.sorted_entries(), stream, mtime=mtime)
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, output)
    except compress.CompressionError as e:
        raise BuildError("output.compression", file, str(e)) from None
    except (OSError, cpio.CpioError) as e:
        raise BuildError("output", file, f"writing {output}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return size, digest
