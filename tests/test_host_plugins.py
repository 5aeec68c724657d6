"""volar plugins: install from a path, file://, a relative URL or http; verify sums."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import host_helpers
from tests.host_helpers import Volar, write_plugin

volar = host_helpers.volar  # fixture


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real HTTP server on 127.0.0.1 serving a folder."""
    root = tmp_path / "www"
    root.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_install_from_path_lists_like_the_quick_start(volar: Volar, tmp_path: Path) -> None:
    manifest = write_plugin(tmp_path / "caddy-plugin")
    out = volar.ok("plugins", "install", "--manifest", str(manifest))
    assert "caddy 0.1.0 installed" in out
    lines = volar.ok("plugins", "list").splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "RUNTIME", "ENABLED", "STRATEGY"]
    assert lines[1].split() == ["caddy", "0.1.0", "caddy", "true", "initramfs"]


def test_relative_initramfs_url_resolves_against_the_manifest_folder(
    volar: Volar, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The manifest sits in manifest/, the image one level up.
    manifest = write_plugin(tmp_path / "p", url="../plugin.cpio.gz")
    monkeypatch.chdir(tmp_path)  # a relative --manifest path, too
    volar.ok("plugins", "install", "--manifest", str(manifest.relative_to(tmp_path)))
    info = volar.json("plugins", "show", "caddy")
    payload = (tmp_path / "p" / "plugin.cpio.gz").read_bytes()
    assert Path(info["artifact_path"]).read_bytes() == payload
    assert info["artifact_sha256"] == hashlib.sha256(payload).hexdigest()


def test_file_urls_work_for_manifest_and_image(volar: Volar, tmp_path: Path) -> None:
    # Volant validated file:// and then failed to open it.
    image_url = f"file://{tmp_path / 'p' / 'plugin.cpio.gz'}"
    manifest = write_plugin(tmp_path / "p", url=image_url)
    volar.ok("plugins", "install", "--manifest", f"file://{manifest}")
    assert volar.json("plugins", "show", "caddy")["strategy"] == "initramfs"


def test_absolute_image_path_and_sha256_prefix_any_case(volar: Volar, tmp_path: Path) -> None:
    payload = b"image bytes" * 100
    digest = "sha256:" + hashlib.sha256(payload).hexdigest().upper()
    manifest = write_plugin(tmp_path / "p", payload=payload, checksum=digest,
                            url=str(tmp_path / "p" / "plugin.cpio.gz"))
    volar.ok("plugins", "install", "--manifest", str(manifest))


def test_install_over_http_with_relative_image(
    volar: Volar, tmp_path: Path, http_root: tuple[Path, str]
) -> None:
    root, base = http_root
    write_plugin(root, url="../plugin.cpio.gz")
    volar.ok("plugins", "install", "--url", f"{base}/manifest/caddy.json")
    info = volar.json("plugins", "show", "caddy")
    assert Path(info["artifact_path"]).read_bytes() == (root / "plugin.cpio.gz").read_bytes()
    assert info["source"] == f"{base}/manifest/caddy.json"


def test_http_404_names_the_url(volar: Volar, http_root: tuple[Path, str]) -> None:
    _, base = http_root
    r = volar("plugins", "install", "--manifest", f"{base}/nope.json")
    assert r.code != 0
    assert f"{base}/nope.json: HTTP 404" in r.err


def test_checksum_mismatch_shows_both_sums_and_installs_nothing(
    volar: Volar, tmp_path: Path
) -> None:
    wrong = "ab" * 32
    manifest = write_plugin(tmp_path / "p", checksum=wrong)
    actual = hashlib.sha256((tmp_path / "p" / "plugin.cpio.gz").read_bytes()).hexdigest()
    r = volar("plugins", "install", "--manifest", str(manifest))
    assert r.code != 0
    assert wrong in r.err and actual in r.err
    assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1
    assert volar.json("plugins", "list") == []
    assert list((volar.state / "artifacts").iterdir()) == []


def test_missing_enabled_means_enabled_and_disable_enable(volar: Volar, tmp_path: Path) -> None:
    volar.ok("plugins", "install", "--manifest", str(write_plugin(tmp_path / "p")))
    assert volar.json("plugins", "show", "caddy")["manifest"]["enabled"] is True
    volar.ok("plugins", "disable", "caddy")
    assert volar.json("plugins", "list")[0]["enabled"] is False
    volar.ok("plugins", "enable", "caddy")
    assert volar.json("plugins", "list")[0]["enabled"] is True


def test_bad_manifest_names_the_field(volar: Volar, tmp_path: Path) -> None:
    manifest = write_plugin(tmp_path / "p", extra={"resources": {"cpu_cores": 0}})
    r = volar("plugins", "install", "--manifest", str(manifest))
    assert r.code != 0
    assert "resources.cpu_cores" in r.err


def test_missing_manifest_file_is_one_line(volar: Volar, tmp_path: Path) -> None:
    r = volar("plugins", "install", "--manifest", str(tmp_path / "absent.json"))
    assert r.code != 0
    assert str(tmp_path / "absent.json") in r.err and "Traceback" not in r.err


def test_reinstall_needs_force(volar: Volar, tmp_path: Path) -> None:
    manifest = write_plugin(tmp_path / "p")
    volar.ok("plugins", "install", "--manifest", str(manifest))
    r = volar("plugins", "install", "--manifest", str(manifest))
    assert r.code != 0 and "already installed" in r.err
    volar.ok("plugins", "install", "--manifest", str(manifest), "--force")


def test_remove_deletes_row_and_image(volar: Volar, tmp_path: Path) -> None:
    volar.ok("plugins", "install", "--manifest", str(write_plugin(tmp_path / "p")))
    artifact = Path(volar.json("plugins", "show", "caddy")["artifact_path"])
    volar.ok("plugins", "remove", "caddy")
    assert not artifact.exists()
    r = volar("plugins", "show", "caddy")
    assert r.code != 0 and "unknown plugin 'caddy'" in r.err
