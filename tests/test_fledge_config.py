"""Every malformed fledge.toml is one line naming the key and the file, a non-zero exit,
and no output file; the CLI never shows a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from builder.build import BuildOptions, Progress, build
from builder.config import load_config
from builder.errors import BuildError, ConfigError, FledgeError
from tests.fledge_helpers import need_busybox, run_fledge, sha256, write_project

HEAD = 'version = "1"\nstrategy = "initramfs"\n'
LOCAL_AGENT = '[agent]\nsource_strategy = "local"\npath = "agent"\n'
NO_MODULES = '[kernel]\nmodules = []\n'
OK = HEAD + LOCAL_AGENT + NO_MODULES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# (id, toml, expected key, words the message must contain, exit status)
CASES = [
    ("missing version", 'strategy = "initramfs"\n' + LOCAL_AGENT, "version", "required", 2),
    ("wrong version", 'version = "2"\nstrategy = "initramfs"\n', "version", '"1"', 2),
    ("version as integer", 'version = 1\nstrategy = "initramfs"\n', "version", '"1"', 2),
    ("missing strategy", 'version = "1"\n', "strategy", "required", 2),
    ("wrong strategy", 'version = "1"\nstrategy = "squashfs"\n', "strategy", "initramfs", 2),
    ("oci_rootfs", 'version = "1"\nstrategy = "oci_rootfs"\n', "strategy", "not supported yet",
     2),
    ("agent with custom init", HEAD + LOCAL_AGENT + '[init]\npath = "app"\n', "agent",
     "not allowed", 2),
    ("agent with none", HEAD + LOCAL_AGENT + '[init]\nnone = true\n[mappings]\n"app" = "/init"\n',
     "agent", "not allowed", 2),
    ("path and none", HEAD + '[init]\npath = "app"\nnone = true\n', "init", "mutually exclusive",
     2),
    ("relative destination", OK + '[mappings]\n"app" = "usr/bin/app"\n', 'mappings."app"',
     "absolute", 2),
    ("dotdot destination", OK + '[mappings]\n"app" = "/usr/../../etc/passwd"\n',
     'mappings."app"', "'..'", 2),
    ("missing source", OK + '[mappings]\n"nope" = "/usr/bin/nope"\n', 'mappings."nope"',
     "no such file", 2),
    ("malformed checksum", OK + '[source]\nbusybox_sha256 = "abc123"\n',
     "source.busybox_sha256", "not a sha256", 2),
    ("checksum mismatch", OK + '[source]\nbusybox_url = "agent"\nbusybox_sha256 = "' + "0" * 64
     + '"\n', "source.busybox_sha256", "checksum mismatch", 1),
    ("unknown key", HEAD + 'compresion = "zstd"\n' + LOCAL_AGENT + NO_MODULES, "compresion",
     "unknown key", 2),
    ("unknown agent key", HEAD + LOCAL_AGENT + 'url = "http://x"\n' + NO_MODULES, "agent.url",
     "unknown key", 2),
    ("wrong type mapping", OK + '[mappings]\n"app" = 5\n', 'mappings."app"', "string", 2),
    ("wrong type none", HEAD + '[init]\nnone = "yes"\n', "init.none", "true or false", 2),
    ("wrong type modules", HEAD + LOCAL_AGENT + '[kernel]\nmodules = "virtio_net"\n',
     "kernel.modules", "array", 2),
    ("wrong type agent", HEAD + 'agent = "release"\n', "agent", "table", 2),
    ("unreachable url", OK + '[source]\nbusybox_url = "http://127.0.0.1:PORT/busybox"\n',
     "source.busybox_url", "cannot download", 1),
    ("none without /init", HEAD + '[init]\nnone = true\n[mappings]\n"app" = "/usr/bin/app"\n',
     "mappings", "/init", 2),
    ("release version", HEAD + '[agent]\nsource_strategy = "release"\nversion = "v9.9.9"\n',
     "agent.version", "latest", 2),
    ("local agent missing", HEAD + '[agent]\nsource_strategy = "local"\npath = "gone"\n',
     "agent.path", "no such file", 2),
    ("http agent without url", HEAD + '[agent]\nsource_strategy = "http"\n', "agent.url",
     "required", 2),
    ("bad strategy name", HEAD + '[agent]\nsource_strategy = "git"\n', "agent.source_strategy",
     "release", 2),
    ("custom init different /init", HEAD + '[init]\npath = "app"\n[mappings]\n"agent" = "/init"\n',
     'mappings."agent"', "different file", 2),
    ("default mode maps /init", OK + '[mappings]\n"app" = "/init"\n', 'mappings."app"',
     "default init mode", 2),
    ("duplicate destination", OK + '[mappings]\n"app" = "/usr/bin/x"\n"agent" = "/usr/bin/x"\n',
     'mappings."agent"', "already", 2),
    ("mapping into /tmp", OK + '[mappings]\n"app" = "/tmp/app"\n', 'mappings."app"',
     "/tmp/app is under /tmp, which is mounted over at boot", 2),
    ("mapping onto /run", OK + '[mappings]\n"app" = "/run"\n', 'mappings."app"',
     "/run is under /run, which is mounted over at boot", 2),
    ("mapping into /proc", OK + '[mappings]\n"app" = "/proc/"\n', 'mappings."app"',
     "under /proc", 2),
    ("mapping into /dev", OK + '[mappings]\n"app" = "/dev/app"\n', 'mappings."app"',
     "under /dev", 2),
    ("directory with files for /tmp", OK + '[mappings]\n"rootdir" = "/"\n', 'mappings."rootdir"',
     "rootdir/tmp would land in /tmp, which is mounted over at boot", 2),
    ("bad compression", OK + '[output]\ncompression = "xz"\n', "output.compression", "gzip", 2),
    ("invalid toml", 'version = "1\n', "", "invalid TOML", 2),
]


def _project(tmp_path: Path, toml: str) -> Path:
    bb = need_busybox()
    toml = toml.replace("PORT", str(_free_port()))
    return write_project(tmp_path, toml, {"agent": bb, "app": bb,
                                          "rootdir/tmp/leftover": b"x", "rootdir/etc/ok": b"x"})


def _error(cfg: Path, cache: Path) -> FledgeError:
    with pytest.raises(FledgeError) as err:
        build(BuildOptions(config_path=cfg, output=cfg.parent / "out.cpio.gz", cache_dir=cache,
                           compression="none"), progress=Progress(verbosity=0))
    return err.value


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_config_is_one_error_naming_key_and_file(
    tmp_path: Path, case: tuple[str, str, str, str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, toml, key, words, status = case
    monkeypatch.setenv("FLEDGE_CACHE", str(tmp_path / "cache"))
    cfg = _project(tmp_path, toml)
    err = _error(cfg, tmp_path / "cache")
    assert err.key == key
    assert err.file == str(cfg)
    assert words in err.message
    assert err.exit_code == status
    assert isinstance(err, ConfigError if status == 2 else BuildError)
    assert "\n" not in err.line()
    assert not (tmp_path / "out.cpio.gz").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


CLI_CASES = ["oci_rootfs", "dotdot destination", "checksum mismatch", "unreachable url",
             "none without /init", "unknown key"]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_prints_one_line_and_leaves_no_output(tmp_path: Path, name: str) -> None:
    _, toml, key, words, status = next(c for c in CASES if c[0] == name)
    _project(tmp_path, toml)
    proc = run_fledge(["build"], cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == status
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"fledge: fledge.toml: {key}: ")
    assert words in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "plugin.cpio.gz").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".plugin")]


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    proc = run_fledge(["build"], cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("fledge: fledge.toml: not found (run fledge in the folder of "
                                   "your fledge.toml or pass -c FILE)")


def test_bad_command_line_is_one_line(tmp_path: Path) -> None:
    proc = run_fledge(["build", "--compression", "xz"], cwd=tmp_path, cache=tmp_path / "c")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_kernel_dir_tells_how_to_get_one(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KESTREL_KERNEL_DIR", str(tmp_path / "no-kernel"))
    cfg = _project(tmp_path, HEAD + LOCAL_AGENT)
    err = _error(cfg, tmp_path / "cache")
    assert err.key == "kernel"
    assert "volar kernel fetch" in err.message and "modules = []" in err.message


def test_valid_config_reads_back(tmp_path: Path) -> None:
    bb = need_busybox()
    cfg = write_project(tmp_path, OK + '[source]\nbusybox_url = "file://' + str(bb)
                        + '"\nbusybox_sha256 = "sha256:' + sha256(bb).upper() + '"\n'
                        '[libraries]\ncopy_from_host = true\n[output]\ncompression = "zstd"\n'
                        '[mappings]\n"app" = "/usr/bin/"\n', {"agent": bb, "app": bb})
    config = load_config(cfg)
    assert config.init_mode == "default"
    assert config.agent is not None and config.agent.path == tmp_path / "agent"
    assert config.busybox_sha256 == sha256(bb)
    assert config.mappings[0].dest == "/usr/bin/app"  # a trailing / means "into"
    assert config.copy_host_libs and config.compression == "zstd"
    assert config.kernel.modules == () and config.kernel.explicit


def test_missing_agent_section_means_release_latest(tmp_path: Path) -> None:
    cfg = write_project(tmp_path, HEAD)
    config = load_config(cfg)
    assert config.agent is not None
    assert (config.agent.strategy, config.agent.version) == ("release", "latest")
    assert not config.kernel.explicit and "virtio_net" in config.kernel.modules
