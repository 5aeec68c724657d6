"""Fuzz the command line parser: any /proc/cmdline text gives a BootConfig or a typed error.

kestrel reads its whole configuration from the kernel command line; a value
it cannot use must end as CmdlineError (naming the key) or ManifestError
(naming the field), which kestrel prints before powering off.
"""

from __future__ import annotations

import base64
import json

from hypothesis import given
from hypothesis import strategies as st

from kestrel.cmdline import BootConfig, CmdlineError, boot_config, build_cmdline, parse_channel
from kestrel.manifest import ManifestError, load_manifest
from tests.test_cmdline import CADDY_JSON, CADDY_VECTOR, VOLANT_BASE
from tests.test_fuzz_manifest import mutated_text

KEYS = [
    "volant.manifest", "volant.boot", "volant.rootfs_device", "volant.rootfs_fstype",
    "volant.env", "kestrel.channel", "ip", "kestrel.grace",
    "kestrel.hostname", "volant.runtime", "console", "quiet",
]
# Values without whitespace (the parser splits on it), biased toward each key's syntax.
values = st.one_of(
    st.text(st.characters(blacklist_categories=["Zs", "Cc"]), max_size=40),
    st.sampled_from(["vsock:", "unix:/", "serial:", "auto", "rootfs", "initramfs", "/dev/",
                     "1.2.3.4::5.6.7.8:255.255.255.0:h:eth0:off", "H4sI", "{", "nan", "2"]),
    st.builds(lambda a, b: a + b, st.sampled_from(["vsock:", "unix:", "serial:", "ip:"]),
              st.text(st.characters(blacklist_categories=["Zs", "Cc"]), max_size=20)),
    st.builds(lambda d: base64.b64encode(d).decode(), st.binary(max_size=200)),
    st.builds(lambda v: base64.b64encode(json.dumps(v).encode()).decode(),
              st.dictionaries(st.text(max_size=5), st.text(max_size=5) | st.integers(),
                              max_size=3)),
)
words = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), values),
    st.sampled_from(KEYS),
    st.text(max_size=20),
)


def boot(text: str) -> BootConfig | None:
    try:
        cfg = boot_config(text)
    except CmdlineError as exc:
        assert exc.key and exc.message
        return None
    assert isinstance(cfg, BootConfig)
    if cfg.manifest_json is not None:
        try:
            load_manifest(cfg.manifest_json)
        except ManifestError:
            pass
    return cfg


@given(st.text(max_size=3000))
def test_fuzz_cmdline_arbitrary_text(text: str) -> None:
    boot(text)


@given(st.lists(words, max_size=12))
def test_fuzz_cmdline_key_value_words(ws: list[str]) -> None:
    boot(" ".join(ws))


@given(mutated_text(f"{VOLANT_BASE} volant.manifest={CADDY_VECTOR} kestrel.channel=unix:/r/k"))
def test_fuzz_cmdline_mutated_volant_line(text: str) -> None:
    boot(text)


@given(st.text(max_size=60))
def test_fuzz_cmdline_channel(value: str) -> None:
    try:
        ch = parse_channel(value)
    except CmdlineError as exc:
        assert exc.key == "kestrel.channel"
        return
    assert parse_channel(str(ch)) == ch


@given(st.dictionaries(st.sampled_from(KEYS[1:]), values, max_size=4))
def test_fuzz_cmdline_build_then_boot(extra: dict[str, str]) -> None:
    try:
        line = build_cmdline(
            manifest_json=CADDY_JSON.encode(), channel=parse_channel("unix:/run/k"), extra=extra
        )
    except CmdlineError:
        return
    cfg = boot(line)
    if cfg is not None:
        assert cfg.manifest_json == CADDY_JSON.encode()
