"""Build inputs from file://, plain paths and http:// (a local server only): verified,
cached by sha256, and available offline once cached."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.build import BuildOptions, Progress, build
from builder.errors import BuildError
from builder.sources import busybox, fetch
from tests.fledge_helpers import members, need_busybox, sha256, write_project


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path, list[str]]]:
    """An http.server on 127.0.0.1 serving tmp_path/www; yields (base url, dir, paths hit)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)  # 127.0.0.1 must be reached directly
    www = tmp_path / "www"
    www.mkdir()
    hits: list[str] = []

    class Handler(_Quiet):
        def __init__(self, *args: object, **kw: object) -> None:
            super().__init__(*args, directory=str(www), **kw)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            hits.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", www, hits
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_http_download_is_verified_and_cached(tmp_path: Path, server: tuple[str, Path, list[str]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    bb = need_busybox()
    url, www, hits = server
    (www / "busybox").write_bytes(bb.read_bytes())
    monkeypatch.setenv("FLEDGE_CACHE", str(tmp_path / "cache"))
    digest = sha256(bb)
    first = fetch(f"{url}/busybox", sha256=digest, key="k", file="f", base=tmp_path)
    assert first == tmp_path / "cache" / "sha256" / digest
    assert first.read_bytes() == bb.read_bytes()
    (www / "busybox").unlink()  # "offline" from here on: the cache must answer
    again = fetch(f"{url}/busybox", sha256=digest, key="k", file="f", base=tmp_path)
    assert again == first and hits == ["/busybox"]


def test_http_checksum_mismatch_keeps_nothing(tmp_path: Path,
                                              server: tuple[str, Path, list[str]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    url, www, _ = server
    (www / "blob").write_bytes(b"not busybox")
    monkeypatch.setenv("FLEDGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BuildError) as err:
        fetch(f"{url}/blob", sha256="0" * 64, key="source.busybox_url", file="f", base=tmp_path,
              sha_key="source.busybox_sha256")
    assert err.value.key == "source.busybox_sha256"
    assert "checksum mismatch" in err.value.message
    assert list((tmp_path / "cache" / "sha256").iterdir()) == []


def test_http_404_names_the_url(tmp_path: Path, server: tuple[str, Path, list[str]],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    url, _, _ = server
    monkeypatch.setenv("FLEDGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BuildError, match="HTTP 404"):
        fetch(f"{url}/missing", sha256=None, key="agent.url", file="f", base=tmp_path)


def test_file_url_and_relative_path_resolve_against_the_toml(tmp_path: Path) -> None:
    target = tmp_path / "dl" / "bb"
    target.parent.mkdir()
    target.write_bytes(b"x")
    assert fetch(f"file://{target}", sha256=None, key="k", file="f", base=tmp_path) == target
    assert fetch("dl/bb", sha256=None, key="k", file="f", base=tmp_path) == tmp_path / "dl/bb"
    with pytest.raises(BuildError, match="unsupported URL scheme"):
        fetch("ftp://host/bb", sha256=None, key="k", file="f", base=tmp_path)


def test_dynamic_busybox_is_refused(tmp_path: Path) -> None:
    caddy = Path("/usr/bin/caddy")
    if not caddy.is_file():
        pytest.skip(reason="needs a dynamic binary: Debian's caddy (apt-get install caddy)")
    with pytest.raises(BuildError, match="dynamically linked"):
        busybox(url=str(caddy), sha256=None, file="f", base=tmp_path)


def test_http_agent_build_works_offline_after_the_first(
    tmp_path: Path, server: tuple[str, Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    bb = need_busybox()
    url, www, _ = server
    (www / "kestrel").write_bytes(bb.read_bytes())
    monkeypatch.setenv("FLEDGE_CACHE", str(tmp_path / "cache"))
    toml = (f'version = "1"\nstrategy = "initramfs"\n[agent]\nsource_strategy = "http"\n'
            f'url = "{url}/kestrel"\nchecksum = "sha256:{sha256(bb)}"\n'
            f'[source]\nbusybox_url = "{url}/kestrel"\nbusybox_sha256 = "{sha256(bb)}"\n'
            '[kernel]\nmodules = []\n')
    cfg = write_project(tmp_path / "p", toml)
    opts = BuildOptions(config_path=cfg, output=tmp_path / "p" / "a.cpio", compression="none",
                        cache_dir=tmp_path / "cache")
    build(opts, progress=Progress(verbosity=0))
    (www / "kestrel").unlink()
    build(opts, progress=Progress(verbosity=0))
    assert members(tmp_path / "p" / "a.cpio")["/bin/kestrel"].data == bb.read_bytes()
