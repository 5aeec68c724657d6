"""Fuzz the manifest codec: volant.manifest text -> JSON bytes -> Manifest.

Whatever a command line carries, kestrel must end with a Manifest or a typed
error it can print (CmdlineError naming volant.manifest, ManifestError naming
the field): never another exception, which would be a PID 1 traceback.
Examples per property come from the hypothesis profile (tests/conftest.py).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from kestrel.cmdline import CmdlineError, decode_manifest
from kestrel.manifest import Manifest, ManifestError, load_manifest
from tests.test_cmdline import CADDY_JSON, CADDY_VECTOR, go_gzip

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@st.composite
def mutated_bytes(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with a few byte flips, insertions, deletions and a possible cut."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@st.composite
def mutated_text(draw: st.DrawFn, seed: str, alphabet: str | None = None) -> str:
    chars = list(seed)
    letters = st.sampled_from(alphabet) if alphabet else st.characters()
    for _ in range(draw(st.integers(0, 6))):
        pos = draw(st.integers(0, max(0, len(chars) - 1)))
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        if op == "set" and chars:
            chars[pos] = draw(letters)
        elif op == "insert":
            chars.insert(pos, draw(letters))
        elif op == "delete" and chars:
            del chars[pos]
    if draw(st.booleans()):
        chars = chars[: draw(st.integers(0, len(chars)))]
    return "".join(chars)


def decode_then_load(value: str, *, cmdline_len: int = 0) -> Manifest | None:
    """The boot path: a Manifest, or None after a typed error; anything else fails."""
    try:
        data = decode_manifest(value, cmdline_len=cmdline_len)
    except CmdlineError as exc:
        assert exc.key == "volant.manifest"
        return None
    assert isinstance(data, bytes)
    try:
        return load_manifest(data)
    except ManifestError as exc:
        assert isinstance(exc.field, str) and exc.message
        return None


@given(st.text(), st.integers(0, 4096))
def test_fuzz_manifest_arbitrary_text(value: str, cmdline_len: int) -> None:
    decode_then_load(value, cmdline_len=cmdline_len)


@given(st.text(alphabet=B64URL + "=", max_size=600))
def test_fuzz_manifest_arbitrary_base64url(value: str) -> None:
    decode_then_load(value)


@given(mutated_text(CADDY_VECTOR, B64URL))
def test_fuzz_manifest_mutated_encoding(value: str) -> None:
    decode_then_load(value)


@given(mutated_bytes(go_gzip(CADDY_JSON.encode())))
def test_fuzz_manifest_mutated_gzip(gz: bytes) -> None:
    decode_then_load(base64.urlsafe_b64encode(gz).decode().rstrip("="))


@given(mutated_bytes(CADDY_JSON.encode()))
def test_fuzz_manifest_mutated_json(data: bytes) -> None:
    decode_then_load(base64.urlsafe_b64encode(go_gzip(data)).decode().rstrip("="))
    decode_then_load(data.decode("utf-8", "replace"))  # the legacy raw form


@given(st.binary(max_size=2000))
def test_fuzz_manifest_arbitrary_bytes_as_json(data: bytes) -> None:
    try:
        load_manifest(data)
    except ManifestError:
        pass


def test_fuzz_manifest_in_a_fresh_interpreter() -> None:
    # kestrel parses JSON without importing json (kestrel.jsonlite), and the
    # C scanner reports errors differently when json was never imported: run
    # a batch of broken documents where json is not loaded beforehand.
    cases = [CADDY_JSON[:n] for n in range(0, len(CADDY_JSON), 7)]
    cases += ['{"a":1,}', "[1 2]", '"\\x"', "tru", "-", "[" * 5000, '{"a":NaN}', "1e999999"]
    code = (
        "import sys\n"
        "from kestrel.manifest import load_manifest, ManifestError\n"
        "cases = sys.stdin.read().split('\\0')\n"
        "assert 'json' not in sys.modules, 'json imported before the first parse'\n"
        "bad = []\n"
        "for c in cases:\n"
        "    try: load_manifest(c)\n"
        "    except ManifestError: pass\n"
        "    except BaseException as e: bad.append(f'{c[:30]!r}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
    )
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(
        [sys.executable, "-S", "-c", code], input="\0".join(cases), capture_output=True,
        text=True, cwd=root, env={"PYTHONPATH": str(root)}, timeout=60, check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=25,
))
def test_fuzz_manifest_caddy_with_a_value_swapped_anywhere(value: object) -> None:
    doc = json.loads(CADDY_JSON)
    for key in ("workload", "health_check", "initramfs", "resources"):
        patched = json.loads(CADDY_JSON)
        patched[key] = value
        try:
            load_manifest(json.dumps(patched))
        except ManifestError:
            pass
    assert load_manifest(json.dumps(doc)).name == "caddy"
