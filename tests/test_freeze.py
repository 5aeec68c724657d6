"""The frozen kestrel runs as PID 1 in a root that holds nothing else, and builds reproducibly.

Each run chroots into a temporary root containing only the frozen tree and a static
busybox (the workload), as PID 1 of fresh PID/mount/UTS/net namespaces with
CAP_SYS_MODULE dropped: if the bundle needed any file from the build host, it would fail.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.freeze import (
    PREFIX,
    PY_TAG,
    FreezeError,
    FrozenAgent,
    Source,
    _cache_key,
    freeze_kestrel,
)
from kestrel.digest import sha256_file

BUSYBOX = Path("/bin/busybox")
PYTHON = f"{PREFIX}/bin/{PY_TAG}"


@pytest.fixture(scope="module")
def frozen(tmp_path_factory: pytest.TempPathFactory) -> FrozenAgent:
    if not Path("/usr/bin/python3.11").is_file():
        pytest.skip(reason="needs Debian's /usr/bin/python3.11 (apt python3)")
    try:
        return freeze_kestrel(cache_dir=tmp_path_factory.mktemp("cache"))
    except FreezeError as exc:
        pytest.skip(reason=f"cannot freeze here: {exc}")


def tree_digest(root: Path) -> str:
    """A digest of a tree's names, modes, link targets and bytes (for reproducibility)."""
    h = hashlib.sha256()
    for path in _walk(root):
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        h.update(f"{rel}\0{st.st_mode:o}\0".encode())
        if path.is_symlink():
            h.update(os.readlink(path).encode())
        elif path.is_file():
            h.update(sha256_file(path).encode())
    return h.hexdigest()


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            yield Path(dirpath) / name


def run_in_empty_root(
    frozen: FrozenAgent, base: Path, program: str, *, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run *program* with the bundle's python as PID 1 in a root holding only the frozen
    tree, /bin/busybox and the program."""
    if os.geteuid() != 0:
        pytest.skip(reason="needs root for unshare -pfmun, mount and chroot")
    for tool in ("unshare", "setpriv", "chroot", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(reason=f"needs {tool}")
    if not BUSYBOX.is_file():
        pytest.skip(reason="needs busybox-static at /bin/busybox")
    root = base / "root"
    shutil.copytree(frozen.root, root, symlinks=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    (root / "proc").mkdir()
    (root / "check.py").write_text(textwrap.dedent(program))
    script = base / "run.sh"
    script.write_text(
        "set -e\n"
        f"{shutil.which('mount')} -t proc proc {root}/proc\n"
        f"exec {shutil.which('chroot')} {root} {PYTHON} -IOO /check.py\n"
    )
    return subprocess.run(
        [str(shutil.which("setpriv")), "--bounding-set", "-sys_module",
         str(shutil.which("unshare")), "-pfmun", "--mount-proc", "/bin/sh", str(script)],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_bundle_runs_trio_msgpack_h11_and_kestrel_metrics_as_pid_1_in_an_empty_root(
    frozen: FrozenAgent, tmp_path: Path
) -> None:
    proc = run_in_empty_root(frozen, tmp_path, """
        import os, sys
        import h11, msgpack, trio
        from kestrel import metrics
        from msgpack import _cmsgpack  # the C extension, not the pure-Python fallback

        assert os.getpid() == 1
        assert msgpack.unpackb(msgpack.packb({"k": [1, 2]})) == {"k": [1, 2]}
        conn = h11.Connection(h11.CLIENT)
        assert conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))

        async def main():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep, 0)
            a, b = trio.socket.socketpair()
            with a, b:
                await a.send(b"from-trio")
                return (await b.recv(64)).decode()

        assert trio.run(main) == "from-trio"
        pid = os.posix_spawn("/bin/busybox", ["busybox", "true"], {})
        assert os.waitpid(pid, 0)[1] == 0
        assert metrics.own_rss() > 0 and metrics.memory()[0] > 0
        # _socket encodes every str host with the idna codec, numeric ones included.
        import socket
        assert socket.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)
        for codec in ("ascii", "latin-1", "utf-8-sig", "utf-16", "utf-32", "idna"):
            "x".encode(codec)
        outside = sorted(
            name for name, m in sys.modules.items()
            if getattr(getattr(m, "__spec__", None), "origin", None) not in
            (None, "built-in", "frozen")
            and not m.__spec__.origin.startswith("/opt/kestrel/")
        )
        assert not outside, outside
        print("BUNDLE-OK", sys.path)
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BUNDLE-OK ['/opt/kestrel/lib/python311.zip'" in proc.stdout


def test_kestrel_runtime_imports_inside_the_bundle(frozen: FrozenAgent, tmp_path: Path) -> None:
    import kestrel

    names = sorted(p.stem for p in Path(kestrel.__file__).parent.glob("*.py")
                   if p.stem not in ("__init__", "__main__"))
    proc = run_in_empty_root(frozen, tmp_path, f"""
        import importlib, kestrel
        for name in {names!r}:
            importlib.import_module("kestrel." + name)
        print("KESTREL-OK", kestrel.__version__)
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"KESTREL-OK {frozen.version}" in proc.stdout


def test_using_tls_fails_with_a_clear_error(frozen: FrozenAgent, tmp_path: Path) -> None:
    proc = run_in_empty_root(frozen, tmp_path, """
        import ssl, trio
        assert not hasattr(ssl, "SSLContext")
        try:
            ssl.create_default_context()
        except AttributeError as exc:
            print("ERROR:", exc)
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("ERROR: ssl.create_default_context: TLS is not available in kestrel's frozen agent"
            in proc.stdout)


def test_parts_of_trio_kestrel_never_calls_fail_with_a_clear_error(
    frozen: FrozenAgent, tmp_path: Path
) -> None:
    # Stubbed at freeze time (builder/freeze_edits.STUBBED) to keep PID 1 small.
    proc = run_in_empty_root(frozen, tmp_path, """
        import datetime, trio
        assert datetime.datetime(1970, 1, 2, tzinfo=datetime.timezone.utc).timestamp() == 86400
        for use in (lambda: trio.run_process(["true"]), lambda: trio.Path("/"),
                    lambda: trio.DTLSEndpoint(None), lambda: trio.wrap_file(None),
                    lambda: trio.open_memory_channel(1), lambda: trio.open_tcp_listeners(80),
                    lambda: trio.serve_listeners(None, [])):
            try:
                use()
            except RuntimeError as exc:
                print("ERROR:", exc)
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("trio._subprocess.run_process", "trio._path.Path", "trio._dtls.DTLSEndpoint",
                 "trio._file_io.wrap_file", "trio._channel.open_memory_channel",
                 "trio._highlevel_open_tcp_listeners.open_tcp_listeners",
                 "trio._highlevel_serve_listeners.serve_listeners"):
        assert f"ERROR: {name} is not available in kestrel's frozen agent" in proc.stdout


def test_the_boot_path_reads_only_the_boot_zip(frozen: FrozenAgent, tmp_path: Path) -> None:
    # What kestrel imports before the spawn (and _json, its one extension) must not
    # parse agent.zip's directory or import __future__ (the freeze compiles the
    # annotations feature in): each costs bench P1 time on every boot.
    proc = run_in_empty_root(frozen, tmp_path, """
        import sys
        import _json
        from kestrel import boot, cmdline, jsonlite, main, manifest, spawn
        print("FUTURE", "__future__" in sys.modules)
        print("AGENT_ZIP", sorted(p for p in sys.path_importer_cache if "agent.zip" in p))
        print("ANNOTATIONS", manifest.parse_manifest.__annotations__["return"])
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FUTURE False" in proc.stdout
    assert "AGENT_ZIP []" in proc.stdout
    assert "ANNOTATIONS Manifest" in proc.stdout  # still postponed: a string


def test_a_locale_the_image_lacks_falls_back_to_utf8(
    frozen: FrozenAgent, tmp_path: Path
) -> None:
    # The image has no /usr/lib/locale: whatever LANG the kernel passes, the agent must
    # start (Nuitka aborts here) and speak UTF-8.
    proc = run_in_empty_root(frozen, tmp_path, """
        import sys
        print("UTF8", sys.flags.utf8_mode, sys.stdout.encoding, "\u00e9")
    """, env={"LANG": "de_DE.UTF-8", "LC_ALL": "en_US.UTF-8"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "UTF8 1 utf-8 \u00e9" in proc.stdout


def test_agent_entry_point_is_a_script_for_the_bundled_python(frozen: FrozenAgent) -> None:
    agent = frozen.root / "bin" / "kestrel"
    first, *rest = agent.read_text().splitlines()
    interpreter, flags = first.removeprefix("#!").split(" ")
    assert interpreter == PYTHON and flags == "-IOO"  # Linux passes one shebang argument
    assert (frozen.root / interpreter.lstrip("/")).is_file()
    assert "from kestrel.main import main" in rest
    assert os.access(agent, os.X_OK)
    assert (frozen.root / "opt/kestrel/VERSION").read_text().strip() == frozen.version


def test_glibc_sits_at_debian_paths(frozen: FrozenAgent) -> None:
    interp = frozen.root / "lib64" / "ld-linux-x86-64.so.2"
    assert interp.is_symlink()
    assert os.readlink(interp) == "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    libs = {p.name for p in (frozen.root / "lib" / "x86_64-linux-gnu").iterdir()}
    assert {"libc.so.6", "libm.so.6", "libz.so.1", "ld-linux-x86-64.so.2"} <= libs
    # The stub replaces OpenSSL; nothing may bring it back.
    assert not any(name.startswith(("libssl", "libcrypto")) for name in libs)


def test_two_freezes_are_byte_identical(frozen: FrozenAgent, tmp_path: Path) -> None:
    again = freeze_kestrel(cache_dir=tmp_path)
    assert again.root != frozen.root
    assert tree_digest(again.root) == tree_digest(frozen.root)


def test_second_freeze_with_the_same_inputs_is_a_cache_hit(frozen: FrozenAgent) -> None:
    stamp = frozen.root.stat().st_mtime_ns
    again = freeze_kestrel(cache_dir=frozen.root.parents[2])
    assert again.root == frozen.root
    assert frozen.root.stat().st_mtime_ns == stamp


def test_cache_key_follows_kestrel_sources(tmp_path: Path) -> None:
    src = tmp_path / "main.py"
    src.write_text("x = 1\n")
    python = Path("/bin/sh")  # any file: the key hashes the interpreter's bytes
    before = _cache_key(python, [Source(src, "kestrel/main.py")], {})
    src.write_text("x = 2\n")
    assert _cache_key(python, [Source(src, "kestrel/main.py")], {}) != before


def test_a_dependency_edit_that_no_longer_applies_fails_the_freeze(tmp_path: Path) -> None:
    from builder.freeze_edits import PATCHED
    from builder.freeze_select import FreezeError, Source, edited_source

    rel = next(iter(PATCHED))
    changed = tmp_path / "changed.py"
    changed.write_text("# a release where the edited lines moved\n")
    with pytest.raises(FreezeError, match=f"{rel}: the freeze's source edit no longer applies"):
        edited_source(Source(changed, rel), tmp_path)
