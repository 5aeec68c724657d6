"""kestrel.cmdline: the kernel command line as Volant's host writes it.

The manifest vectors are built the way Volant's Go host builds them
(compress/gzip default writer: header 1f8b 08 00 00000000 00 ff, then base64url
without '=' padding), plus one literal vector of the quick start's caddy.json.
"""

from __future__ import annotations

import base64
import json
import random
import struct
import zlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kestrel.cmdline import (
    COMMAND_LINE_SIZE,
    Channel,
    CmdlineError,
    boot_config,
    build_cmdline,
    decode_env,
    decode_manifest,
    encode_manifest,
    parse_channel,
    parse_cmdline,
    parse_ip,
)
from kestrel.manifest import load_manifest

# The quick start's manifest/caddy.json, byte for byte as the guide shows it.
CADDY_JSON = """{
  "$schema": "https://raw.githubusercontent.com/volantvm/volant/main/docs/schemas/plugin-manifest-v1.json",
  "schema_version": "1.0",
  "name": "caddy",
  "version": "0.1.0",
  "runtime": "caddy",
  "enabled": true,
  "initramfs": {
    "url": "/root/caddy-plugin/plugin.cpio.gz",
    "checksum": "cef98fd5798ce875631aa0c98613fe48005a892aac8fb6ee81535945ebb0aa09"
  },
  "resources": {
    "cpu_cores": 1,
    "memory_mb": 512
  },
  "workload": {
    "type": "http",
    "entrypoint": ["/usr/bin/caddy", "run", "--config", "/etc/caddy/Caddyfile"],
    "base_url": "http://127.0.0.1:80",
    "workdir": "/",
    "env": {
      "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    }
  },
  "health_check": {
    "endpoint": "/",
    "timeout_ms": 10000
  }
}
"""

# CADDY_JSON through a Go-style gzip writer (OS byte 0xff, no name, mtime 0)
# and unpadded base64url: what `volar vms create` puts on the command line.
CADDY_VECTOR = (
    "H4sIAAAAAAAA_2VSy26jMBTd5ysiNMsBQ1ISyK7qpssuZjeqkDGX4Cm2kR9UmSr_3mvzilSQbN9zX8fn"
    "-mu330e_DOtA0OiyjzprB3MhRNPP5Mpt52pnQDMlLUibMCXIqHoq7bgciKBckkYxQ6Yqhgy9u3IZCyp5"
    "C8bGY5b8M0pGv32vKagaQRuOGLbMknRySSrAA4w2zW2CHsLSZA3UTlr-IxYkrXtoELXaQYC45FZT0RoE"
    "vxBAyOne5xGtlCUhO574zrQTNnCVXP-HmhiPdNmHcSI0g7Ys2iY_lwWD4pyfjhmlKSuLU3Zs4alI05wW"
    "5YFSVrT1CaDI8mNePuVQ1ykGlhGWvE83AKOcZvBAjA2uYkoHKJubCxBK3ypRI5ZnhzX9U-mPXtFmy7a3"
    "AZb5LdRxYvo2KC4tev5GxBlNarzorFnQ0W9xjPNt-dWfCVg2BZAXv7a8h-h9LlhTA9UsoG-E7yQ7nJMU"
    "_-xSpEtfz67hOsi8cRlXsmi-Pf95DX7PqVeM9sQgtcuDvZqbIxwmE5coFLuvonRAe9tVYWCbMCCbRYKN"
    "jX89ytlKBLFT_HyV3X33DW9AJ8QPAwAA"
)

VOLANT_BASE = (
    "console=ttyS0 reboot=k panic=1 quiet loglevel=1 i8042.noaux i8042.nokbd "
    "pci=lastbus=0 ip=192.168.127.100::192.168.127.1:255.255.255.0:caddy-demo:eth0:off"
)


def go_gzip(data: bytes, *, level: int = 6) -> bytes:
    """Bytes equivalent to Go's gzip.NewWriter: fixed 10-byte header, deflate, trailer."""
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    body = c.compress(data) + c.flush()
    header = bytes.fromhex("1f8b08000000000000ff")
    return header + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def go_encode(data: bytes) -> str:
    """Volant's host encoding: gzip, base64url, '=' stripped."""
    return base64.urlsafe_b64encode(go_gzip(data)).decode().rstrip("=")


def assert_manifest_error(value: str, *, contains: str = "", cmdline_len: int = 0) -> CmdlineError:
    with pytest.raises(CmdlineError) as info:
        decode_manifest(value, cmdline_len=cmdline_len)
    assert info.value.key == "volant.manifest"
    assert "volant.manifest" in str(info.value)
    assert contains in str(info.value)
    return info.value


# --- parse rules ------------------------------------------------------------


def test_words_split_on_any_whitespace_and_value_starts_after_first_equals() -> None:
    p = parse_cmdline("a=1\tb=x=y\n  pci=lastbus=0   c=\n")
    assert p == {"a": "1", "b": "x=y", "pci": "lastbus=0", "c": ""}


def test_last_occurrence_of_a_key_wins() -> None:
    assert parse_cmdline("volant.boot=rootfs volant.boot=initramfs")["volant.boot"] == "initramfs"


def test_bare_words_are_visible_as_empty_values() -> None:
    p = parse_cmdline("quiet i8042.noaux console=ttyS0")
    assert p["quiet"] == "" and p["i8042.noaux"] == "" and p["console"] == "ttyS0"


def test_volant_host_command_line_parses_to_its_keys() -> None:
    line = f"{VOLANT_BASE} volant.manifest={CADDY_VECTOR} volant.runtime=caddy"
    p = parse_cmdline(line)
    assert p["reboot"] == "k" and p["volant.runtime"] == "caddy"
    assert p["volant.manifest"] == CADDY_VECTOR


# --- volant.manifest decoding ------------------------------------------------


def test_literal_caddy_vector_decodes_to_the_quick_start_manifest() -> None:
    assert CADDY_VECTOR.startswith("H4sI")
    assert decode_manifest(CADDY_VECTOR) == CADDY_JSON.encode()
    m = load_manifest(decode_manifest(CADDY_VECTOR))
    assert m.name == "caddy" and m.workload is not None
    assert m.workload.entrypoint[0] == "/usr/bin/caddy"


def test_go_writer_header_is_what_the_vector_carries() -> None:
    raw = base64.urlsafe_b64decode(CADDY_VECTOR + "=" * (-len(CADDY_VECTOR) % 4))
    assert raw[:10] == bytes.fromhex("1f8b08000000000000ff")
    assert go_encode(CADDY_JSON.encode()) == CADDY_VECTOR


@pytest.mark.parametrize("level", [1, 6, 9])
def test_go_style_gzip_at_every_level_decodes(level: int) -> None:
    data = CADDY_JSON.encode()
    value = base64.urlsafe_b64encode(go_gzip(data, level=level)).decode().rstrip("=")
    assert decode_manifest(value) == data


def test_padding_is_restored_for_every_length_mod_4() -> None:
    seen: set[int] = set()
    for extra in range(24):
        data = json.dumps({"name": "".join(chr(97 + i * 7 % 26) for i in range(extra))}).encode()
        value = go_encode(data)
        assert "=" not in value
        seen.add(len(value) % 4)
        assert decode_manifest(value) == data
        # The same value with its padding left on is accepted too.
        assert decode_manifest(value + "=" * (-len(value) % 4)) == data
    assert seen == {0, 2, 3}  # 1 cannot come out of an encoder


def test_a_length_of_1_mod_4_is_a_base64_error() -> None:
    value = go_encode(CADDY_JSON.encode())
    value = value[: 4 * (len(value) // 4 - 1) + 1]
    assert_manifest_error(value, contains="base64")


def test_raw_json_legacy_form_is_taken_as_is() -> None:
    value = '{"name":"caddy","version":"1"}'
    assert decode_manifest(value) == value.encode()


@pytest.mark.parametrize("padded", [True, False])
def test_base64url_of_raw_json_is_the_other_legacy_form(padded: bool) -> None:
    data = CADDY_JSON.encode()
    value = base64.urlsafe_b64encode(data).decode()
    if not padded:
        value = value.rstrip("=")
    assert decode_manifest(value) == data


@pytest.mark.parametrize("value", ["H4sI$$$$", "H4sI AAAA", "H4s!", "Zm9v\x00", "hé110"])
def test_bad_base64_characters_name_the_key(value: str) -> None:
    assert_manifest_error(value, contains="base64")


def test_gzip_magic_with_garbage_body_is_a_gzip_error() -> None:
    bad = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 40
    value = base64.urlsafe_b64encode(bad).decode().rstrip("=")
    assert_manifest_error(value, contains="gzip")


def test_corrupted_crc_is_a_gzip_error() -> None:
    gz = bytearray(go_gzip(CADDY_JSON.encode()))
    gz[-8] ^= 0xFF
    assert_manifest_error(base64.urlsafe_b64encode(bytes(gz)).decode().rstrip("="), contains="gzip")


def test_every_truncation_of_a_valid_encoding_is_a_cmdline_error() -> None:
    full = go_encode(CADDY_JSON.encode())
    # From 3 characters on the prefix holds the gzip magic (2 characters
    # decode to one byte, which is not gzip and is passed on as legacy data).
    for cut in range(3, len(full)):
        err = assert_manifest_error(full[:cut])
        assert err.message


def test_truncation_at_the_kernel_limit_says_so() -> None:
    rng = random.Random(7)  # incompressible labels, so the encoding stays long
    manifest = json.dumps(
        {"name": "big", "version": "1", "initramfs": {"url": "/i"},
         "labels": {f"k{i}": rng.randbytes(24).hex() for i in range(60)}}
    ).encode()
    value = go_encode(manifest)
    line = f"{VOLANT_BASE} volant.manifest={value}"
    assert len(line) > COMMAND_LINE_SIZE
    kept = line[: COMMAND_LINE_SIZE - 1]  # what the kernel hands to init
    with pytest.raises(CmdlineError) as info:
        boot_config(kept + "\n")
    assert info.value.key == "volant.manifest"
    assert "truncated" in info.value.message
    assert str(COMMAND_LINE_SIZE - 1) in info.value.message


def test_short_line_with_broken_gzip_does_not_blame_truncation() -> None:
    gz = go_gzip(CADDY_JSON.encode())[:-20]
    err = assert_manifest_error(base64.urlsafe_b64encode(gz).decode().rstrip("="))
    assert "kernel keeps" not in err.message


def test_empty_manifest_value_is_an_error() -> None:
    assert_manifest_error("", contains="empty")
    with pytest.raises(CmdlineError, match=r"volant\.manifest"):
        boot_config("quiet volant.manifest= console=ttyS0")


def test_no_manifest_key_gives_none() -> None:
    assert boot_config("console=ttyS0 quiet").manifest_json is None


# --- other keys ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("vsock:9000", Channel("vsock", port=9000)),
        ("vsock:4294967295", Channel("vsock", port=2**32 - 1)),
        ("serial:kestrel.0", Channel("serial", name="kestrel.0")),
        ("unix:/run/kestrel.sock", Channel("unix", path="/run/kestrel.sock")),
    ],
)
def test_channel_forms_parse_and_print_back(value: str, expected: Channel) -> None:
    ch = parse_channel(value)
    assert ch == expected
    assert str(ch) == value
    assert boot_config(f"kestrel.channel={value}").channel == expected


@pytest.mark.parametrize(
    "value",
    ["vsock", "vsock:", "vsock:0", "vsock:-1", "vsock:4294967296", "vsock:abc", "vsock:²",
     "vsock:٣", "unix:relative.sock", "tcp:127.0.0.1:1", "serial:", ":x"],
)
def test_bad_channels_are_cmdline_errors_naming_the_key(value: str) -> None:
    with pytest.raises(CmdlineError) as info:
        parse_channel(value)
    assert info.value.key == "kestrel.channel"


def test_default_channel_is_vsock_9000() -> None:
    assert boot_config("quiet").channel == Channel("vsock", port=9000)


def test_volant_static_ip_form_parses() -> None:
    ip = parse_ip("192.168.127.100::192.168.127.1:255.255.255.0:caddy-demo:eth0:off")
    assert ip is not None
    assert (ip.address, ip.gateway, ip.netmask, ip.hostname, ip.device) == (
        "192.168.127.100", "192.168.127.1", "255.255.255.0", "caddy-demo", "eth0")
    cfg = boot_config(VOLANT_BASE)
    assert cfg.ip == ip and cfg.hostname == "caddy-demo"


def test_short_ip_form_gets_defaults() -> None:
    ip = parse_ip("10.0.2.15::10.0.2.2:")
    assert ip is not None and ip.netmask == "255.255.255.0" and ip.device == "eth0"


@pytest.mark.parametrize("value", ["dhcp", "off", "on", "::::", ":::::eth0:dhcp"])
def test_dynamic_ip_forms_are_left_to_the_kernel(value: str) -> None:
    assert parse_ip(value) is None


@pytest.mark.parametrize(
    "value",
    ["300.1.1.1::1.1.1.1:255.255.255.0", "1.2.3::1.1.1.1:", "1.2.3.4::gw:",
     "1.2.3.4::1.1.1.1:255.255.255.x", "1.2.3.²::1.1.1.1:", "1.2.3.4::1.1.1.١:"],
)
def test_bad_ip_addresses_name_the_ip_key(value: str) -> None:
    with pytest.raises(CmdlineError) as info:
        parse_ip(value)
    assert info.value.key == "ip"


def test_volant_env_is_std_base64_json_of_strings() -> None:
    env = {"GREETING": "hi there", "PATH": "/bin"}
    value = base64.b64encode(json.dumps(env).encode()).decode()
    assert decode_env(value) == env
    assert decode_env(value.rstrip("=")) == env
    assert boot_config(f"volant.env={value}").env == env


@pytest.mark.parametrize(
    "payload", [b"[1,2]", b'{"A": 1}', b"not json", b"\xff\xfe", b"[" * 1500, b'{"A": {"B": "c"}}']
)
def test_bad_volant_env_is_a_cmdline_error(payload: bytes) -> None:
    value = base64.b64encode(payload).decode()
    with pytest.raises(CmdlineError) as info:
        boot_config(f"volant.env={value}")
    assert info.value.key == "volant.env"


def test_volant_env_with_non_ascii_is_a_cmdline_error() -> None:
    with pytest.raises(CmdlineError, match=r"volant\.env"):
        decode_env("e30é")


def test_boot_keys() -> None:
    cfg = boot_config(
        "volant.boot=rootfs volant.rootfs_device=/dev/vda volant.rootfs_fstype=xfs "
        "kestrel.grace=2.5 kestrel.hostname=web"
    )
    assert (cfg.boot, cfg.rootfs_device, cfg.rootfs_fstype) == ("rootfs", "vda", "xfs")
    assert cfg.stop_grace_s == 2.5 and cfg.hostname == "web"
    defaults = boot_config("")
    assert (defaults.boot, defaults.rootfs_fstype) == ("auto", "ext4")
    assert defaults.stop_grace_s is None


def test_debug_shell_is_off_unless_asked_for() -> None:
    assert boot_config("").debug_shell is False
    assert boot_config("kestrel.debug_shell=0").debug_shell is False
    assert boot_config("kestrel.debug_shell=1").debug_shell is True
    line = build_cmdline(manifest_json=b'{"name":"x","version":"1","initramfs":{"url":"/x"}}',
                         channel=Channel("serial", name="p"),
                         extra={"kestrel.debug_shell": "1"})
    assert boot_config(line).debug_shell is True


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("volant.boot=disk", "volant.boot"),
        ("volant.rootfs_device=../sda", "volant.rootfs_device"),
        ("volant.rootfs_device=..", "volant.rootfs_device"),
        ("kestrel.grace=soon", "kestrel.grace"),
        ("kestrel.grace=-1", "kestrel.grace"),
        ("kestrel.grace=nan", "kestrel.grace"),
        ("kestrel.grace=inf", "kestrel.grace"),
        ("kestrel.debug_shell=yes", "kestrel.debug_shell"),
        ("kestrel.debug_shell", "kestrel.debug_shell"),
    ],
)
def test_bad_boot_keys_name_themselves(line: str, key: str) -> None:
    with pytest.raises(CmdlineError) as info:
        boot_config(line)
    assert info.value.key == key


# --- build_cmdline ------------------------------------------------------------


def test_build_cmdline_round_trips_through_boot_config() -> None:
    line = build_cmdline(
        manifest_json=CADDY_JSON.encode(),
        channel=Channel("unix", path="/run/k.sock"),
        base=VOLANT_BASE,
        extra={"volant.runtime": "caddy", "quiet": ""},
    )
    cfg = boot_config(line)
    assert cfg.manifest_json == CADDY_JSON.encode()
    assert cfg.channel == Channel("unix", path="/run/k.sock")
    assert "quiet" in parse_cmdline(line)


def test_build_cmdline_refuses_more_than_2047_bytes_and_accepts_2047() -> None:
    ch = Channel("vsock", port=9000)
    data = json.dumps({"pad": random.Random(1).randbytes(2000).hex()}).encode()
    with pytest.raises(CmdlineError) as info:
        build_cmdline(manifest_json=data, channel=ch)
    assert info.value.key == "volant.manifest"
    # Grow a base string until the line is exactly at the kernel's limit.
    small = json.dumps({"name": "n"}).encode()
    plain = build_cmdline(manifest_json=small, channel=ch, base="x")
    pad = COMMAND_LINE_SIZE - 1 - len(plain)
    line = build_cmdline(manifest_json=small, channel=ch, base="x" * (1 + pad))
    assert len(line) == COMMAND_LINE_SIZE - 1
    with pytest.raises(CmdlineError):
        build_cmdline(manifest_json=small, channel=ch, base="x" * (2 + pad))


def test_build_cmdline_refuses_whitespace_in_extra_values() -> None:
    with pytest.raises(CmdlineError) as info:
        build_cmdline(manifest_json=b"{}", channel=Channel("vsock", port=1),
                      extra={"volant.plugin": "two words"})
    assert info.value.key == "volant.plugin"


# --- properties -------------------------------------------------------------


@given(st.binary(max_size=4096))
def test_encode_decode_round_trips_arbitrary_bytes(data: bytes) -> None:
    value = encode_manifest(data)
    assert "=" not in value and not any(c.isspace() for c in value)
    assert value.startswith("H4sI")
    assert decode_manifest(value) == data


json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(), kids, max_size=5),
    max_leaves=30,
)


@given(json_values)
def test_encode_decode_round_trips_arbitrary_json(value: Any) -> None:
    data = json.dumps(value).encode()
    assert json.loads(decode_manifest(encode_manifest(data))) == value
    # Go's writer and ours are interchangeable.
    assert decode_manifest(go_encode(data)) == data
