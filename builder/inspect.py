"""`fledge inspect IMAGE`: what an initramfs holds, read back with fledge's cpio reader.

Entries with modes and sizes, each ELF file as static or dynamic and whether its
interpreter and libraries are in the image, the kestrel version inside, and the
kernel module load list.
"""

from __future__ import annotations

import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from builder import compress, cpio, elf
from builder.errors import BuildError
from kestrel import layout

VERSION_FILES = ("/etc/kestrel/version", "/opt/kestrel/VERSION", "/opt/kestrel/version")


@dataclass(frozen=True)
class ElfStatus:
    path: str
    static: bool
    missing: tuple[str, ...]


@dataclass
class ImageReport:
    path: Path
    compression: str
    size: int
    members: list[cpio.Member] = field(default_factory=list)
    elves: list[ElfStatus] = field(default_factory=list)
    kestrel_version: str = "unknown"
    modules: list[str] = field(default_factory=list)

    @property
    def unpacked(self) -> int:
        return sum(m.size for m in self.members)

    def member(self, path: str) -> cpio.Member | None:
        return next((m for m in self.members if m.path == path), None)

    @property
    def recorded_init_mode(self) -> str | None:
        """The mode fledge wrote into the image; None for images from before it did."""
        m = self.member(layout.INIT_MODE_FILE)
        mode = m.data.decode(errors="replace").strip() if m is not None and m.is_file else ""
        return mode if mode in layout.INIT_MODES else None

    @property
    def agent(self) -> str:
        """What the manifest's ``agent`` must say for this image."""
        mode = self.recorded_init_mode
        if mode is None:  # an older image: kestrel's presence tells
            mode = "default" if self.member(layout.AGENT_PATH) is not None else "custom"
        return layout.agent_of_init_mode(mode)

    @property
    def init_mode(self) -> str:
        recorded = self.recorded_init_mode
        if recorded in ("custom", "none"):
            return f"{recorded} mode: /init is your program, no kestrel"
        init = self.member(layout.INIT_PATH)
        if init is None:
            return "no /init"
        if self.member(layout.AGENT_PATH) is not None:
            return f"/init runs {layout.AGENT_PATH} (kestrel)"
        return "/init is your program (custom or none mode)"


def read_members(path: Path) -> list[cpio.Member]:
    try:
        with compress.open_image(path) as stream:
            return list(cpio.read_archive(stream))
    except (OSError, EOFError, cpio.CpioError, compress.CompressionError) as e:
        raise BuildError("", str(path), f"not a readable initramfs: {e}") from None


def inspect_image(path: Path) -> ImageReport:
    if not path.is_file():
        raise BuildError("", str(path), "no such file")
    with path.open("rb") as f:
        kind = compress.detect(f.read(4))
    report = ImageReport(path=path, compression=kind, size=path.stat().st_size,
                         members=read_members(path))
    for vf in VERSION_FILES:
        m = report.member(vf)
        if m is not None and m.is_file and m.data.strip():
            report.kestrel_version = m.data.decode(errors="replace").strip()
            break
    load = report.member(layout.MODULES_LOAD_LIST)
    if load is not None:
        report.modules = [ln.strip() for ln in load.data.decode(errors="replace").splitlines()
                          if ln.strip()]
    with tempfile.TemporaryDirectory(prefix="fledge-inspect-") as tmp:
        root = Path(tmp)
        try:
            cpio.extract(report.members, root)
        except (OSError, cpio.CpioError) as e:
            raise BuildError("", str(path), f"cannot unpack for inspection: {e}") from None
        files = [Path(m.path) for m in report.members
                 if m.is_file and m.data[:4] == elf.ELF_MAGIC]
        closure = elf.resolve_closure(files, root=root)
        for image_path, info in sorted(closure.elves.items()):
            if not any(str(f) == image_path for f in files):
                continue
            missing = tuple(x.soname for x in closure.missing if x.needed_by == image_path)
            report.elves.append(ElfStatus(image_path, info.is_static, missing))
    return report


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def format_report(report: ImageReport, *, entries: bool = True) -> str:
    lines = [
        f"Image: {report.path} ({report.compression}, {_mb(report.size)}; "
        f"{_mb(report.unpacked)} unpacked, {len(report.members)} entries)",
        f"Init: {report.init_mode}",
        f"Kestrel: {report.kestrel_version}",
        "Modules: " + (", ".join(Path(m).name.removesuffix(".ko") for m in report.modules)
                       if report.modules else "none"),
        "ELF files:",
    ]
    width = max((len(e.path) for e in report.elves), default=0)
    for e in report.elves:
        if e.path.endswith(".ko"):
            state = "kernel module"
        elif e.static:
            # A shared object without DT_NEEDED is self-contained, not "static".
            state = "no dependencies" if ".so" in Path(e.path).name else "static"
        elif e.missing:
            state = "dynamic, MISSING " + ", ".join(e.missing)
        else:
            state = "dynamic, libraries present"
        lines.append(f"  {e.path:<{width}}  {state}")
    if entries:
        lines.append("Entries:")
        for m in report.members:
            text = f"  {stat.filemode(m.mode)} {m.size:>10}  {m.path}"
            if m.is_symlink:
                text += f" -> {m.data.decode(errors='replace')}"
            lines.append(text)
    return "\n".join(lines)
