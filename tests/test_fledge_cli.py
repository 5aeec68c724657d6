"""The fledge command as users run it: build's progress lines, inspect, manifest update."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.fledge_helpers import (
    members,
    need_busybox,
    offline_busybox,
    run_fledge,
    sha256,
    write_project,
)

TOML = ('version = "1"\nstrategy = "initramfs"\n[agent]\nsource_strategy = "local"\n'
        'path = "payload/agent"\n[source]\nbusybox_url = "x"\n[kernel]\nmodules = []\n'
        '[mappings]\n"payload/app" = "/usr/bin/app"\n"payload/app.conf" = "/etc/app/app.conf"\n')
MANIFEST = {
    "$schema": "https://example.invalid/schema.json",
    "schema_version": "1.0",
    "name": "app",
    "version": "0.1.0",
    "initramfs": {"url": "https://old.invalid/plugin.cpio.gz", "checksum": "abc"},
    "workload": {"type": "http", "entrypoint": ["/usr/bin/app"],
                 "base_url": "http://127.0.0.1:80"},
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    bb = need_busybox()
    write_project(tmp_path, offline_busybox(TOML), {
        "payload/agent": bb, "payload/app": bb, "payload/app.conf": b"port=80\n"})
    (tmp_path / "manifest").mkdir()
    (tmp_path / "manifest/app.json").write_text(json.dumps(MANIFEST, indent=2) + "\n")
    return tmp_path


def test_build_without_arguments_writes_plugin_cpio_gz(project: Path) -> None:
    proc = run_fledge(["build"], cwd=project, cache=project / ".cache")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "Preparing file mappings..." in lines
    assert "  payload/app -> /usr/bin/app (executable)" in lines
    assert "  payload/app.conf -> /etc/app/app.conf" in lines
    assert re.fullmatch(r"Initramfs complete: plugin\.cpio\.gz \(\d+\.\d MB\)", lines[-2])
    image = project / "plugin.cpio.gz"
    assert lines[-1] == f"sha256:{sha256(image)}"
    assert members(image)["/etc/app/app.conf"].data == b"port=80\n"
    assert proc.stderr == ""


def test_quiet_prints_nothing_and_verbose_prints_more(project: Path) -> None:
    quiet = run_fledge(["build", "-q", "-o", "q.cpio.gz"], cwd=project, cache=project / ".c")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    verbose = run_fledge(["build", "-v", "-o", "v.cpio.gz"], cwd=project, cache=project / ".c")
    assert verbose.returncode == 0
    assert "applet links" in verbose.stdout
    assert (project / "q.cpio.gz").read_bytes() == (project / "v.cpio.gz").read_bytes()


def test_update_manifest_on_build_keeps_the_rest(project: Path) -> None:
    (project / "out").mkdir()
    proc = run_fledge(["build", "-q", "-c", "fledge.toml", "-o", "out/p.cpio.gz",
                       "--update-manifest", "manifest/app.json"], cwd=project,
                      cache=project / ".c")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((project / "manifest/app.json").read_text())
    assert list(data) == list(MANIFEST)
    image = project / "out/p.cpio.gz"
    assert data["initramfs"] == {"url": str(image), "checksum": f"sha256:{sha256(image)}"}
    assert data["workload"] == MANIFEST["workload"]


def test_manifest_update_command_with_url(project: Path) -> None:
    assert run_fledge(["build", "-q"], cwd=project, cache=project / ".c").returncode == 0
    proc = run_fledge(["manifest", "update", "manifest/app.json", "--image", "plugin.cpio.gz",
                       "--url", "https://example.invalid/v1/plugin.cpio.gz"], cwd=project,
                      cache=project / ".c")
    assert proc.returncode == 0, proc.stderr
    text = (project / "manifest/app.json").read_text()
    assert text.startswith('{\n  "$schema"')  # indentation kept
    data = json.loads(text)
    assert data["initramfs"]["url"] == "https://example.invalid/v1/plugin.cpio.gz"
    assert data["initramfs"]["checksum"] == f"sha256:{sha256(project / 'plugin.cpio.gz')}"


CUSTOM_TOML = ('version = "1"\nstrategy = "initramfs"\n[source]\nbusybox_url = "x"\n'
               '[init]\npath = "init.sh"\nmappings = { "init.sh" = "/init" }\n')


def test_an_image_without_kestrel_publishes_agent_none(project: Path) -> None:
    """volar must learn from the manifest that no hello will ever come."""
    custom = project / "custom"
    write_project(custom, offline_busybox(CUSTOM_TOML), {"init.sh": b"#!/bin/sh\nexec sh\n"})
    manifest = project / "manifest/app.json"
    proc = run_fledge(["build", "-q", "--update-manifest", str(manifest)], cwd=custom,
                      cache=project / ".c")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(manifest.read_text())["agent"] == "none"
    # The same answer from the image alone (manifest update reads its init-mode file).
    manifest.write_text(json.dumps(MANIFEST, indent=2) + "\n")
    proc = run_fledge(["manifest", "update", str(manifest), "--image", "plugin.cpio.gz"],
                      cwd=custom, cache=project / ".c")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(manifest.read_text())["agent"] == "none"
    # Rebuilt with kestrel, the manifest stops saying none.
    proc = run_fledge(["build", "-q", "--update-manifest", str(manifest)], cwd=project,
                      cache=project / ".c")
    assert proc.returncode == 0, proc.stderr
    assert "agent" not in json.loads(manifest.read_text())


def test_manifest_update_errors_are_one_line(project: Path) -> None:
    proc = run_fledge(["manifest", "update", "manifest/app.json", "--image", "gone.cpio.gz"],
                      cwd=project, cache=project / ".c")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "fledge: manifest/app.json: initramfs: image gone.cpio.gz does not exist"]
    (project / "bad.json").write_text("{")
    (project / "img").write_bytes(b"x")
    proc = run_fledge(["manifest", "update", "bad.json", "--image", "img"], cwd=project,
                      cache=project / ".c")
    assert proc.returncode == 2 and proc.stderr.startswith("fledge: bad.json: invalid JSON")


def test_inspect_shows_entries_elf_state_and_modules(project: Path) -> None:
    caddy = Path("/usr/bin/caddy")
    toml = (project / "fledge.toml").read_text()
    if caddy.is_file():
        toml += f'"{caddy}" = "/usr/bin/caddy"\n'
    (project / "fledge.toml").write_text(toml)
    args = ["build", "-q", "--copy-host-libs"]
    assert run_fledge(args, cwd=project, cache=project / ".c").returncode == 0
    proc = run_fledge(["inspect", "plugin.cpio.gz"], cwd=project, cache=project / ".c")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("Image: plugin.cpio.gz (gzip, ")
    assert "Init: /init runs /bin/kestrel (kestrel)" in out
    assert "Kestrel: unknown" in out  # a local agent carries no version file
    assert "Modules: none" in out
    assert re.search(r"/bin/busybox +static", out)
    if caddy.is_file():
        assert re.search(r"/usr/bin/caddy +dynamic, libraries present", out)
    assert re.search(r"-rw-r--r-- +8  /etc/app/app.conf", out)
    assert "lrwxrwxrwx          7  /bin/sh -> busybox" in out


def test_inspect_reports_missing_libraries_and_bad_files(project: Path) -> None:
    from builder import cpio

    caddy = Path("/usr/bin/caddy")
    if not caddy.is_file():
        pytest.skip(reason="needs Debian's dynamic caddy (apt-get install caddy)")
    raw = project / "raw.cpio"
    with raw.open("wb") as f:  # an image made by someone else, without caddy's libraries
        cpio.write_archive([cpio.directory("usr"), cpio.directory("usr/bin"),
                            cpio.regular("usr/bin/caddy", 0o755, source=caddy)], f)
    proc = run_fledge(["inspect", "--summary", "raw.cpio"], cwd=project, cache=project / ".c")
    assert "dynamic, MISSING /lib64/ld-linux-x86-64.so.2, libzstd.so.1, libc.so.6" in proc.stdout
    assert "Entries:" not in proc.stdout
    (project / "junk").write_bytes(b"hello")
    proc = run_fledge(["inspect", "junk"], cwd=project, cache=project / ".c")
    assert proc.returncode == 1
    assert proc.stderr.startswith("fledge: junk: not a readable initramfs")


def test_source_date_epoch_from_the_environment(project: Path) -> None:
    env = {"SOURCE_DATE_EPOCH": "1800000000"}
    proc = run_fledge(["build", "-q"], cwd=project, cache=project / ".c", env=env)
    assert proc.returncode == 0, proc.stderr
    assert {m.mtime for m in members(project / "plugin.cpio.gz").values()} == {1800000000}
    proc = run_fledge(["build", "-q"], cwd=project, cache=project / ".c",
                      env={"SOURCE_DATE_EPOCH": "yesterday"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("fledge: environment: SOURCE_DATE_EPOCH: must be seconds")


def test_same_inputs_in_another_folder_give_the_same_bytes(
    project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("elsewhere") / "deep" / "copy"
    shutil.copytree(project, other, symlinks=True)
    for where in (project, other):
        assert run_fledge(["build", "-q"], cwd=where, cache=where / ".c").returncode == 0
    assert (project / "plugin.cpio.gz").read_bytes() == (other / "plugin.cpio.gz").read_bytes()
