"""Security properties a user relies on: no shell, no escape, private state.

(Image-side escapes are in test_fledge_security.py; checksum refusals in
test_host_plugins.py.)
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from host.errors import VolarError
from host.plugins import install
from host.state import Store
from kestrel.manifest import ManifestError
from tests.pid1 import manifest, run_kestrel

HOSTILE = "$(touch /var/tmp/kestrel-pwned); `id`; rm -rf / && echo 'x' | sh"


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")
async def test_manifest_strings_never_reach_a_shell() -> None:
    marker = Path("/var/tmp/kestrel-pwned")
    marker.unlink(missing_ok=True)
    doc = manifest(["/bin/echo", HOSTILE], env={"EVIL": HOSTILE})
    doc["workload"]["workdir"] = "/"
    run = await run_kestrel(doc)
    assert run.logs("stdout") == (HOSTILE + "\n").encode()  # one literal argument
    assert not marker.exists()


def test_state_dir_and_database_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Store(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "state.db").stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["../evil", "a b", "x/y", "UPPER", "-flag", "a;id", ""])
def test_plugin_names_that_could_escape_or_inject_are_refused(tmp_path: Path, name: str) -> None:
    image = tmp_path / "img.cpio.gz"
    image.write_bytes(b"not really an image")
    doc = {"name": name, "version": "1", "initramfs": {"url": str(image)}}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(doc))
    store = Store(tmp_path / "state")
    with pytest.raises((ManifestError, VolarError)) as err:
        install(store, str(path))
    assert "name" in str(err.value)
    assert store.db.execute("SELECT COUNT(*) FROM plugins").fetchone()[0] == 0
