"""fledge build end to end: the seeds' fledge.toml examples build offline and the images
hold what the docs say; builds are byte-for-byte reproducible; dynamic payloads need
their libraries."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import pytest

from builder.build import APPLETS, BuildOptions, Progress, build
from builder.errors import BuildError
from tests.fledge_helpers import DATA, members, need_busybox, offline_busybox, write_project

SEEDS = DATA / "seeds"
NO_MODULES = "\n[kernel]\nmodules = []\n"
SCRIPT = b"#!/bin/sh\necho hello\n"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One cache for the module: the shim and the frozen agent are built once.
    return tmp_path_factory.mktemp("fledge-cache")


@pytest.fixture(autouse=True)
def _cache_env(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEDGE_CACHE", str(cache))
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


def seed(name: str, *, modules: bool = False) -> str:
    text = offline_busybox((SEEDS / name).read_text())
    return text if modules else text + NO_MODULES


def run_build(cfg: Path, cache: Path, **kw: object) -> Path:
    # Uncompressed unless a test is about compression: gzip only costs time here.
    kw.setdefault("compression", "none")
    out = cfg.parent / "plugin.cpio.gz"
    opts = BuildOptions(config_path=cfg, output=out, cache_dir=cache, **kw)  # type: ignore[arg-type]
    build(opts, progress=Progress(verbosity=0))
    return out


def test_quickstart_seed_builds_the_caddy_layout(tmp_path: Path, cache: Path) -> None:
    bb = need_busybox()
    cfg = write_project(tmp_path, seed("quickstart.toml"), {
        "payload/caddy": bb,  # a static stand-in for the release caddy
        "payload/Caddyfile": b":80 {\n\trespond \"Hello\"\n}\n",
    })
    image = members(run_build(cfg, cache))
    assert image["/usr/bin/caddy"].perm == 0o755
    assert image["/etc/caddy/Caddyfile"].perm == 0o644
    assert image["/etc/caddy/Caddyfile"].data.startswith(b":80")
    assert image["/init"].perm == 0o755 and image["/init"].data[:4] == b"\x7fELF"
    assert image["/sbin/init"].is_symlink and image["/sbin/init"].data == b"../init"
    assert "/bin/kestrel" in image  # the frozen agent's entry point
    assert image["/etc/kestrel/version"].data.strip() != b""
    for d in ("/bin", "/sbin", "/etc", "/proc", "/sys", "/dev", "/tmp", "/run", "/usr/bin",
              "/usr/sbin", "/usr/lib", "/var/log"):
        assert image[d].is_dir and image[d].perm == 0o755, d
    for applet in [*APPLETS]:
        assert image[f"/bin/{applet}"].data == b"busybox", applet
    assert image["/sbin/switch_root"].data == b"../bin/busybox"
    assert image["/bin/busybox"].data == bb.read_bytes()


@pytest.mark.parametrize("name", ["minimal.toml", "default_minimal_004.toml"])
def test_minimal_seeds_build(tmp_path: Path, cache: Path, name: str) -> None:
    need_busybox()
    cfg = write_project(tmp_path, seed(name))
    image = members(run_build(cfg, cache))
    assert "/init" in image and "/bin/kestrel" in image and "/bin/sh" in image


def test_multiple_file_mappings_get_fhs_permissions(tmp_path: Path, cache: Path) -> None:
    bb = need_busybox()
    cfg = write_project(tmp_path, seed("multiple_files.toml"), {
        "build/myapp": bb,
        "configs/app.yaml": b"port: 8080\n",
        "scripts/healthcheck.sh": SCRIPT,
        "static/logo.png": b"\x89PNG\r\n",
    })
    (tmp_path / "scripts/healthcheck.sh").chmod(0o644)  # no x bit: the dest dir decides
    image = members(run_build(cfg, cache))
    assert image["/usr/bin/myapp"].perm == 0o755
    assert image["/etc/myapp/config.yaml"].perm == 0o644
    assert image["/usr/local/bin/healthcheck"].perm == 0o755
    assert image["/var/www/static/logo.png"].perm == 0o644
    assert image["/var/www/static"].is_dir and image["/var/www"].is_dir


def test_directory_mappings_copy_recursively(tmp_path: Path, cache: Path) -> None:
    bb = need_busybox()
    cfg = write_project(tmp_path, seed("directories.toml"), {
        "kestrel": bb,
        "configs/app.yaml": b"a: 1\n",
        "configs/conf.d/extra.yaml": b"b: 2\n",
        "static/css/site.css": b"body{}\n",
        "scripts/run.sh": SCRIPT,
    })
    (tmp_path / "configs/current.yaml").symlink_to("app.yaml")
    os.link(tmp_path / "static/css/site.css", tmp_path / "static/site.css")
    image = members(run_build(cfg, cache))
    assert image["/etc/myapp/conf.d/extra.yaml"].data == b"b: 2\n"
    assert image["/etc/myapp/current.yaml"].is_symlink
    assert image["/etc/myapp/current.yaml"].data == b"app.yaml"
    # Hard links become independent copies; the archive never uses nlink > 1 for files.
    assert image["/var/www/static/site.css"].data == b"body{}\n"
    assert image["/var/www/static/site.css"].nlink == 1
    assert image["/usr/local/bin/run.sh"].perm == 0o755
    assert image["/bin/kestrel"].data == bb.read_bytes()
    assert image["/bin/kestrel"].perm == 0o755


@pytest.mark.parametrize("name,init_name", [("custom_init.toml", "my-init"),
                                            ("custom_inline.toml", "init.sh")])
def test_custom_init_seeds_put_the_program_at_init_without_kestrel(
    tmp_path: Path, cache: Path, name: str, init_name: str
) -> None:
    bb = need_busybox()
    cfg = write_project(tmp_path, seed(name, modules=True),
                        {init_name: SCRIPT, "myapp": bb})
    (tmp_path / init_name).chmod(0o644)
    image = members(run_build(cfg, cache))
    assert image["/init"].data == SCRIPT and image["/init"].perm == 0o755
    assert "/bin/kestrel" not in image and "/sbin/init" not in image
    assert "/etc/kestrel/modules.load" not in image
    assert image["/etc/kestrel/init-mode"].data == b"custom\n"  # volar: no agent to wait for
    if name == "custom_init.toml":
        assert image["/usr/bin/myapp"].perm == 0o755


@pytest.mark.parametrize("name,binary", [("none_init.toml", "my-supervisor"),
                                         ("none_inline.toml", "mybin")])
def test_none_mode_seeds_make_the_mapped_program_pid1(
    tmp_path: Path, cache: Path, name: str, binary: str
) -> None:
    bb = need_busybox()
    cfg = write_project(tmp_path, seed(name, modules=True), {binary: bb})
    image = members(run_build(cfg, cache))
    assert image["/init"].data == bb.read_bytes()
    assert image["/init"].perm == 0o755
    assert "/bin/kestrel" not in image
    assert image["/etc/kestrel/init-mode"].data == b"none\n"


def _local_project(tmp_path: Path) -> Path:
    bb = need_busybox()
    toml = offline_busybox(
        'version = "1"\nstrategy = "initramfs"\n[agent]\nsource_strategy = "local"\n'
        'path = "agent"\n[source]\nbusybox_url = "x"\n[mappings]\n"app" = "/usr/bin/app"\n'
        '"etc" = "/etc/app"\n'
    ) + NO_MODULES
    return write_project(tmp_path, toml, {"agent": bb, "app": bb, "etc/a.conf": b"x=1\n",
                                          "etc/sub/b.conf": b"y=2\n"})


def test_two_builds_are_byte_identical(tmp_path: Path, cache: Path) -> None:
    cfg = _local_project(tmp_path)
    first = run_build(cfg, cache, compression="gzip").read_bytes()
    # Touching sources (new mtimes) and a different umask change nothing.
    os.utime(tmp_path / "app", (1, 1))
    old = os.umask(0o077)
    try:
        second = run_build(cfg, cache, compression="gzip").read_bytes()
    finally:
        os.umask(old)
    assert first == second
    assert first[:4] == b"\x1f\x8b\x08\x00"  # gzip, no FNAME flag
    assert first[4:8] == b"\0\0\0\0"  # gzip mtime 0


def test_source_date_epoch_changes_only_timestamps(tmp_path: Path, cache: Path) -> None:
    cfg = _local_project(tmp_path)
    default = members(run_build(cfg, cache))
    other = members(run_build(cfg, cache, source_date_epoch=1_800_000_000))
    assert {m.mtime for m in default.values()} == {1704067200}
    assert {m.mtime for m in other.values()} == {1_800_000_000}
    assert list(default) == list(other)
    for path, m in default.items():
        o = other[path]
        assert (m.ino, m.mode, m.uid, m.gid, m.nlink, m.data) == (
            o.ino, o.mode, o.uid, o.gid, o.nlink, o.data), path


def test_archive_fields_are_normalized(tmp_path: Path, cache: Path) -> None:
    image = members(run_build(_local_project(tmp_path), cache))
    paths = list(image)
    assert paths == sorted(paths, key=lambda p: p.split("/"))
    assert [m.ino for m in image.values()] == list(range(1, len(image) + 1))
    for m in image.values():
        assert (m.uid, m.gid, m.devmajor, m.devminor) == (0, 0, 0, 0)
        assert m.nlink == (2 if m.is_dir else 1)
        if m.is_symlink:
            assert stat.S_IMODE(m.mode) == 0o777


@pytest.mark.parametrize("compression,magic", [("none", b"070701"),
                                               ("zstd", b"\x28\xb5\x2f\xfd")])
def test_other_compressions_are_reproducible(tmp_path: Path, cache: Path, compression: str,
                                             magic: bytes) -> None:
    cfg = _local_project(tmp_path)
    a = run_build(cfg, cache, compression=compression).read_bytes()
    b = run_build(cfg, cache, compression=compression).read_bytes()
    assert a == b and a.startswith(magic)
    other = members(cfg.parent / "plugin.cpio.gz")
    assert other.keys() == members(run_build(cfg, cache, compression="gzip")).keys()


def test_dynamic_payload_without_libraries_fails_naming_them(tmp_path: Path,
                                                            cache: Path) -> None:
    caddy = Path("/usr/bin/caddy")
    if not caddy.is_file():
        pytest.skip(reason="needs Debian's dynamic caddy (apt-get install caddy)")
    cfg = _local_project(tmp_path)
    cfg.write_text(cfg.read_text().replace('"app" = ', f'"{caddy}" = "/usr/bin/caddy"\n"app" = '))
    with pytest.raises(BuildError) as err:
        run_build(cfg, cache)
    line = err.value.line()
    for soname in ("libzstd.so.1", "libc.so.6", "/lib64/ld-linux-x86-64.so.2"):
        assert soname in line
    assert "needed by /usr/bin/caddy" in line and "host has /usr/lib/x86_64-linux-gnu/" in line
    assert not (tmp_path / "plugin.cpio.gz").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".plugin")]

    image = members(run_build(cfg, cache, copy_host_libs=True))
    assert image["/lib64/ld-linux-x86-64.so.2"].data[:4] == b"\x7fELF"
    assert image["/lib/x86_64-linux-gnu/libzstd.so.1"].perm == 0o755
    assert "/lib/x86_64-linux-gnu/libc.so.6" in image


def test_copy_from_host_in_config_is_the_same_opt_in(tmp_path: Path, cache: Path) -> None:
    caddy = Path("/usr/bin/caddy")
    if not caddy.is_file():
        pytest.skip(reason="needs Debian's dynamic caddy (apt-get install caddy)")
    cfg = _local_project(tmp_path)
    cfg.write_text(cfg.read_text().replace('"app" = ', f'"{caddy}" = "/usr/bin/caddy"\n"app" = ')
                   + "[libraries]\ncopy_from_host = true\n")
    image = members(run_build(cfg, cache))
    assert "/lib/x86_64-linux-gnu/libzstd.so.1" in image


def test_image_is_a_valid_gzip_member(tmp_path: Path, cache: Path) -> None:
    image = run_build(_local_project(tmp_path), cache, compression="gzip")
    raw = gzip.decompress(image.read_bytes())
    assert raw.startswith(b"070701") and b"TRAILER!!!" in raw[-512:]
    assert len(raw) % 4 == 0


def test_images_resolve_localhost_and_mappings_may_replace_defaults(tmp_path: Path,
                                                                   cache: Path) -> None:
    cfg = _local_project(tmp_path)
    image = members(run_build(cfg, cache))
    assert b"127.0.0.1\tlocalhost" in image["/etc/hosts"].data
    assert image["/etc/passwd"].data.startswith(b"root:x:0:0:")
    (tmp_path / "hosts").write_bytes(b"10.0.0.1 db\n")
    cfg.write_text(cfg.read_text().replace("[mappings]\n", '[mappings]\n"hosts" = "/etc/hosts"\n'))
    assert members(run_build(cfg, cache))["/etc/hosts"].data == b"10.0.0.1 db\n"
