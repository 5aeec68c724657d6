"""The kernel command line: kestrel's only source of configuration.

Parses /proc/cmdline the way Volant does (split on whitespace, key=value at
the first '=', last occurrence wins), decodes ``volant.manifest`` (JSON ->
gzip -> unpadded base64url, raw JSON accepted as the legacy form) and builds
command lines for the host. Pure: no I/O, and only C-backed imports, because
this module sits on kestrel's boot path before the workload is spawned.
"""

from __future__ import annotations

import binascii
import zlib

from kestrel.record import Record

# x86 COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h): the kernel silently
# truncates anything longer, so a long manifest arrives cut short.
COMMAND_LINE_SIZE = 2048

GZIP_MAGIC = b"\x1f\x8b"
DEFAULT_VSOCK_PORT = 9000


class CmdlineError(ValueError):
    """A kernel command line value kestrel cannot use; names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def parse_cmdline(text: str) -> dict[str, str]:
    """Split a command line into key -> value; the last occurrence wins.

    Words without '=' map to "" so flags such as ``quiet`` are visible.
    """
    params: dict[str, str] = {}
    for word in text.split():
        key, _, value = word.partition("=")
        params[key] = value
    return params


def _b64url_decode(key: str, value: str) -> bytes:
    # Volant strips the '=' padding; binascii wants it back, and wants the
    # standard alphabet.
    std = value.replace("-", "+").replace("_", "/")
    std += "=" * (-len(std) % 4)
    try:
        return binascii.a2b_base64(std.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise CmdlineError(key, f"not valid base64url ({exc})") from None


def decode_manifest(value: str, *, cmdline_len: int = 0) -> bytes:
    """Return the manifest JSON bytes carried by ``volant.manifest``.

    ``cmdline_len`` is the length of the whole command line; when it is at
    the kernel's limit, a decoding failure is reported as truncation, which
    is what it almost always is.
    """
    key = "volant.manifest"
    if not value:
        raise CmdlineError(key, "empty value")
    truncated = cmdline_len >= COMMAND_LINE_SIZE - 1
    hint = (
        f" (the command line is {cmdline_len} bytes, the kernel keeps at most "
        f"{COMMAND_LINE_SIZE - 1}: the manifest was probably truncated)"
        if truncated
        else ""
    )
    if value.lstrip().startswith("{"):
        return value.encode()  # legacy raw JSON
    try:
        raw = _b64url_decode(key, value)
    except CmdlineError as exc:
        raise CmdlineError(key, exc.message + hint) from None
    if not raw.startswith(GZIP_MAGIC):
        return raw  # legacy: base64 of raw JSON
    try:
        # wbits 16+MAX_WBITS: gzip header and trailer, checked CRC.
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = d.decompress(raw)
        if not d.eof:
            raise CmdlineError(key, "gzip stream ends early: truncated" + hint)
        return out
    except zlib.error as exc:
        raise CmdlineError(key, f"not valid gzip ({exc}){hint}") from None


def encode_manifest(manifest_json: bytes) -> str:
    """Encode manifest JSON the way Volant's host does: gzip, base64url, no '='.

    The gzip header carries mtime 0 and no name so equal manifests give equal
    command lines.
    """
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    gz = c.compress(manifest_json) + c.flush()
    b64 = binascii.b2a_base64(gz, newline=False).decode("ascii")
    return b64.replace("+", "-").replace("/", "_").rstrip("=")


def decode_env(value: str) -> dict[str, str]:
    """Decode ``volant.env``: standard base64 of a JSON object of strings."""
    key = "volant.env"
    try:
        raw = binascii.a2b_base64(value.encode("ascii") + b"=" * (-len(value) % 4))
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise CmdlineError(key, f"not valid base64 ({exc})") from None
    from kestrel.jsonlite import loads

    try:
        obj = loads(raw)
    except ValueError as exc:
        raise CmdlineError(key, f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in obj.items()
    ):
        raise CmdlineError(key, "must be a JSON object of string values")
    return obj


class Channel(Record):
    """Where kestrel streams to the host: vsock port, virtio-serial name or unix path."""

    __slots__ = ("kind", "port", "name", "path")
    kind: str  # "vsock" | "serial" | "unix" | "none" (no host: console only)
    port: int
    name: str
    path: str

    def __init__(self, kind: str, *, port: int = 0, name: str = "", path: str = "") -> None:
        self.kind, self.port, self.name, self.path = kind, port, name, path

    def __str__(self) -> str:
        if self.kind == "vsock":
            return f"vsock:{self.port}"
        if self.kind == "serial":
            return f"serial:{self.name}"
        if self.kind == "none":
            return "none"
        return f"unix:{self.path}"


def parse_channel(value: str) -> Channel:
    key = "kestrel.channel"
    kind, sep, arg = value.partition(":")
    if not sep or not arg:
        raise CmdlineError(key, f"{value!r}: expected vsock:PORT, serial:NAME or unix:PATH")
    if kind == "vsock":
        if not (arg.isascii() and arg.isdigit()) or not 0 < int(arg) < 2**32:
            raise CmdlineError(key, f"{value!r}: vsock port must be 1..4294967295")
        return Channel("vsock", port=int(arg))
    if kind == "serial":
        return Channel("serial", name=arg)
    if kind == "unix":
        if not arg.startswith("/"):
            raise CmdlineError(key, f"{value!r}: unix socket path must be absolute")
        return Channel("unix", path=arg)
    raise CmdlineError(key, f"{value!r}: unknown channel kind {kind!r}")


class IpConfig(Record):
    """The kernel's ``ip=<client>::<gw>:<netmask>:<hostname>:<dev>:<autoconf>`` form."""

    __slots__ = ("address", "gateway", "netmask", "hostname", "device")
    address: str
    gateway: str
    netmask: str
    hostname: str
    device: str

    def __init__(
        self, address: str, gateway: str, netmask: str, hostname: str, device: str
    ) -> None:
        self.address, self.gateway, self.netmask = address, gateway, netmask
        self.hostname, self.device = hostname, device


def _valid_ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(p.isascii() and p.isdigit() and int(p) < 256 for p in parts)


def parse_ip(value: str) -> IpConfig | None:
    """Parse a static ``ip=`` value; None for dhcp/off forms kestrel leaves alone."""
    fields = value.split(":")
    if len(fields) < 4 or not fields[0]:
        return None
    fields += [""] * (7 - len(fields))
    addr, _server, gw, mask, host, dev = fields[:6]
    for what, v in (("address", addr), ("gateway", gw), ("netmask", mask)):
        if v and not _valid_ipv4(v):
            raise CmdlineError("ip", f"{what} {v!r} is not an IPv4 address")
    return IpConfig(addr, gw, mask or "255.255.255.0", host, dev or "eth0")


BOOT_MODES = ("auto", "initramfs", "rootfs")


class BootConfig(Record):
    """Everything kestrel takes from the command line, decoded and checked.

    The manifest stays as JSON bytes here; turning it into a Manifest is
    kestrel.manifest's job.
    """

    __slots__ = (
        "manifest_json", "boot", "rootfs_device", "rootfs_fstype", "env", "channel",
        "ip", "hostname", "stop_grace_s", "debug_shell",
    )
    manifest_json: bytes | None
    boot: str
    rootfs_device: str
    rootfs_fstype: str
    env: dict[str, str]
    channel: Channel
    ip: IpConfig | None
    hostname: str
    stop_grace_s: float | None
    debug_shell: bool  # kestrel.debug_shell=1: a root shell on the serial console

    def __init__(
        self,
        manifest_json: bytes | None,
        *,
        boot: str = "auto",
        rootfs_device: str = "",
        rootfs_fstype: str = "ext4",
        env: dict[str, str] | None = None,
        channel: Channel | None = None,
        ip: IpConfig | None = None,
        hostname: str = "",
        stop_grace_s: float | None = None,
        debug_shell: bool = False,
    ) -> None:
        self.manifest_json = manifest_json
        self.boot, self.rootfs_device, self.rootfs_fstype = boot, rootfs_device, rootfs_fstype
        self.env = env or {}
        self.channel = channel or Channel("vsock", port=DEFAULT_VSOCK_PORT)
        self.ip, self.hostname, self.stop_grace_s = ip, hostname, stop_grace_s
        self.debug_shell = debug_shell


def boot_config(text: str) -> BootConfig:
    """Decode kestrel's configuration from the text of /proc/cmdline."""
    p = parse_cmdline(text)
    manifest = None
    if "volant.manifest" in p:
        manifest = decode_manifest(p["volant.manifest"], cmdline_len=len(text.rstrip("\n")))
    boot = p.get("volant.boot", "auto") or "auto"
    if boot not in BOOT_MODES:
        raise CmdlineError("volant.boot", f"{boot!r}: expected one of {', '.join(BOOT_MODES)}")
    device = p.get("volant.rootfs_device", "")
    if device.startswith("/dev/"):
        device = device[5:]
    if device and ("/" in device or device in (".", "..")):
        raise CmdlineError("volant.rootfs_device", f"{device!r} is not a device name")
    env = decode_env(p["volant.env"]) if p.get("volant.env") else {}
    channel = (
        parse_channel(p["kestrel.channel"])
        if "kestrel.channel" in p
        else Channel("vsock", port=DEFAULT_VSOCK_PORT)
    )
    ip = parse_ip(p["ip"]) if p.get("ip") else None
    grace = None
    if "kestrel.grace" in p:
        try:
            grace = float(p["kestrel.grace"])
        except ValueError:
            grace = -1.0
        if not 0 <= grace <= 3600:
            raise CmdlineError("kestrel.grace", f"{p['kestrel.grace']!r}: seconds 0..3600")
    hostname = p.get("kestrel.hostname", "") or (ip.hostname if ip else "")
    shell = p.get("kestrel.debug_shell", "0")
    if shell not in ("0", "1"):
        # Strict on purpose: an unauthenticated root shell is never switched
        # on by a typo's guess.
        raise CmdlineError("kestrel.debug_shell", f"{shell!r}: expected 1 (on) or 0 (off)")
    return BootConfig(
        manifest_json=manifest,
        boot=boot,
        rootfs_device=device,
        rootfs_fstype=p.get("volant.rootfs_fstype", "") or "ext4",
        env=env,
        channel=channel,
        ip=ip,
        hostname=hostname,
        stop_grace_s=grace,
        debug_shell=shell == "1",
    )


def build_cmdline(
    *,
    manifest_json: bytes,
    channel: Channel,
    base: str = "console=ttyS0 panic=-1",
    extra: dict[str, str] | None = None,
) -> str:
    """Build a guest command line; refuse one the kernel would truncate."""
    words = [
        base,
        f"volant.manifest={encode_manifest(manifest_json)}",
        f"kestrel.channel={channel}",
    ]
    for k, v in (extra or {}).items():
        if any(c.isspace() for c in k + v):
            raise CmdlineError(k, "command line values cannot contain whitespace")
        words.append(f"{k}={v}" if v != "" else k)
    line = " ".join(w for w in words if w)
    if len(line) > COMMAND_LINE_SIZE - 1:
        raise CmdlineError(
            "volant.manifest",
            f"command line would be {len(line)} bytes; the kernel keeps "
            f"{COMMAND_LINE_SIZE - 1} (shrink the manifest)",
        )
    return line
