"""Kernel modules: dependencies from .modinfo decide the load order the shim follows."""

from __future__ import annotations

import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.build import BuildOptions, Progress, build
from builder.errors import BuildError
from builder.kmod import modinfo, plan_modules
from kestrel import layout
from tests.fledge_helpers import fake_ko, members, need_busybox, offline_busybox, write_project

RELEASE = "6.1.0-test-amd64"
# A small copy of Debian's virtio graph (depends= as in 6.1.0-*-amd64).
GRAPH = {
    "kernel/drivers/virtio/virtio_ring.ko": "",
    "kernel/drivers/virtio/virtio.ko": "virtio_ring",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko": "",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko": "",
    "kernel/drivers/virtio/virtio_pci.ko.xz": "virtio_pci_modern_dev,virtio_ring,virtio,"
                                              "virtio_pci_legacy_dev",
    "kernel/drivers/char/virtio_console.ko": "virtio,virtio_ring",
    "kernel/net/core/failover.ko": "",
    "kernel/drivers/net/net_failover.ko": "failover",
    "kernel/drivers/net/virtio_net.ko.zst": "net_failover,virtio,virtio_ring",
    "kernel/drivers/char/hw_random/virtio-rng.ko": "virtio,virtio_ring",
}


def make_tree(root: Path) -> Path:
    tree = root / "lib" / "modules" / RELEASE
    for rel, deps in GRAPH.items():
        plain = rel.removesuffix(".xz").removesuffix(".zst")
        name = Path(plain).name.removesuffix(".ko").replace("-", "_")
        path = fake_ko(tree / plain, name=name, depends=deps, vermagic=f"{RELEASE} SMP mod_unload")
        if rel.endswith(".xz"):
            (tree / rel).write_bytes(lzma.compress(path.read_bytes(), format=lzma.FORMAT_XZ))
            path.unlink()
        elif rel.endswith(".zst"):
            if shutil.which("zstd") is None:
                pytest.skip(reason="needs the zstd program (apt-get install zstd)")
            subprocess.run(["zstd", "-q", "--rm", str(path), "-o", str(tree / rel)], check=True)
    (tree / "modules.builtin").write_text("kernel/drivers/virtio/virtio_balloon.ko\n")
    return tree


def assert_dependencies_first(order: list[str], tree: Path) -> None:
    seen: set[str] = set()
    for rel in order:
        info = modinfo((tree / rel).read_bytes()) if (tree / rel).exists() else None
        name = Path(rel).name.removesuffix(".ko").replace("-", "_")
        deps = [d for d in (info or {}).get("depends", [""])[0].split(",") if d]
        assert set(deps) <= seen, f"{name} loads before {set(deps) - seen}"
        seen.add(name)


def test_dependencies_load_first(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    plan = plan_modules(tree, ["virtio_console", "virtio_pci", "virtio_net"], file="f.toml")
    order = [m.name for m in plan.modules]
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_console")
    assert order.index("failover") < order.index("net_failover") < order.index("virtio_net")
    assert order.index("virtio_pci_modern_dev") < order.index("virtio_pci")
    assert len(order) == len(set(order)) == 9
    assert plan.release == RELEASE  # from vermagic: there is no release file here
    assert plan.load_list().splitlines()[0] == "kernel/drivers/virtio/virtio_ring.ko"


def test_compressed_modules_are_decompressed(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    plan = plan_modules(tree, ["virtio_pci", "virtio_net"], file="f.toml")
    by_name = {m.name: m for m in plan.modules}
    for name in ("virtio_pci", "virtio_net"):
        assert by_name[name].data[:4] == b"\x7fELF"
        assert by_name[name].rel.endswith(f"{name}.ko")


def test_dash_and_underscore_are_the_same_module(tmp_path: Path) -> None:
    plan = plan_modules(make_tree(tmp_path), ["virtio_rng"], file="f.toml")
    assert plan.modules[-1].rel == "kernel/drivers/char/hw_random/virtio-rng.ko"


def test_missing_module_names_it_and_the_tree(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    with pytest.raises(BuildError) as err:
        plan_modules(tree, ["virtio_gpu"], file="f.toml")
    assert err.value.key == "kernel.modules"
    assert "'virtio_gpu'" in err.value.message and str(tree) in err.value.message


def test_missing_dependency_names_who_needs_it(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    (tree / "kernel/drivers/virtio/virtio_ring.ko").unlink()
    with pytest.raises(BuildError) as err:
        plan_modules(tree, ["virtio_console"], file="f.toml")
    assert "'virtio_ring' (needed by virtio)" in err.value.message


def test_builtin_modules_are_skipped(tmp_path: Path) -> None:
    plan = plan_modules(make_tree(tmp_path), ["virtio_balloon", "virtio"], file="f.toml")
    assert plan.builtin == ("virtio_balloon",)
    assert [m.name for m in plan.modules] == ["virtio_ring", "virtio"]


def test_modules_dep_is_the_fallback(tmp_path: Path) -> None:
    tree = tmp_path / RELEASE
    fake_ko(tree / "kernel/a.ko", name="a", with_modinfo=False)
    fake_ko(tree / "kernel/b.ko", name="b", with_modinfo=False)
    (tree / "modules.dep").write_text("kernel/a.ko: kernel/b.ko\nkernel/b.ko:\n")
    plan = plan_modules(tree, ["a"], file="f.toml")
    assert [m.name for m in plan.modules] == ["b", "a"]
    assert plan.release == RELEASE  # the tree's own name as the last resort


def test_cycles_are_reported(tmp_path: Path) -> None:
    tree = tmp_path / RELEASE
    fake_ko(tree / "a.ko", name="a", depends="b")
    fake_ko(tree / "b.ko", name="b", depends="a")
    with pytest.raises(BuildError, match="cycle"):
        plan_modules(tree, ["a"], file="f.toml")


def test_build_puts_modules_and_the_load_list_in_the_image(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    bb = need_busybox()
    tree = make_tree(tmp_path / "k")
    (tree.parent / "release").write_text(RELEASE + "\n")
    monkeypatch.setenv("FLEDGE_CACHE", str(tmp_path / "cache"))
    toml = offline_busybox(
        'version = "1"\nstrategy = "initramfs"\n[agent]\nsource_strategy = "local"\n'
        f'path = "agent"\n[source]\nbusybox_url = "x"\n[kernel]\nmodules_dir = "{tree}"\n'
        'modules = ["virtio_console", "virtio_net"]\n')
    cfg = write_project(tmp_path / "p", toml, {"agent": bb})
    out = tmp_path / "p" / "img.cpio"
    build(BuildOptions(config_path=cfg, output=out, compression="none",
                       cache_dir=tmp_path / "cache"), progress=Progress(verbosity=0))
    image = members(out)
    load = image[layout.MODULES_LOAD_LIST].data.decode().splitlines()
    assert load[:2] == ["kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko"]
    for rel in load:
        m = image[f"/lib/modules/{RELEASE}/{rel}"]
        assert m.perm == 0o644 and m.data[:4] == b"\x7fELF"
    assert_dependencies_first(load, tree)
    assert "kernel/drivers/net/virtio_net.ko" in load


def test_real_debian_tree_orders_virtio_console_after_its_dependencies() -> None:
    modules = layout.kernel_dir() / "current" / "modules"
    if not modules.is_dir():
        pytest.skip(reason=f"no kernel at {modules} (run `volar kernel fetch`)")
    plan = plan_modules(modules, list(layout.DEFAULT_MODULES), file="fledge.toml")
    order = [m.name for m in plan.modules]
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_console")
    for m in plan.modules:
        assert set(m.depends) <= set(order[: order.index(m.name)]) | set(plan.builtin), m.name
        assert m.data[:4] == b"\x7fELF"


def test_custom_init_gets_modules_only_when_kernel_is_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bb = need_busybox()
    tree = make_tree(tmp_path / "k")
    monkeypatch.setenv("KESTREL_KERNEL_DIR", str(tmp_path / "no-kernel"))
    base = offline_busybox('version = "1"\nstrategy = "initramfs"\n[init]\npath = "init"\n'
                           '[source]\nbusybox_url = "x"\n')
    out = tmp_path / "p" / "img.cpio"
    for toml, expected in ((base, False), (base + f'[kernel]\nmodules_dir = "{tree}"\n'
                                           'modules = ["virtio"]\n', True)):
        cfg = write_project(tmp_path / "p", toml, {"init": bb})
        build(BuildOptions(config_path=cfg, output=out, compression="none",
                           cache_dir=tmp_path / "cache"), progress=Progress(verbosity=0))
        image = members(out)
        assert (layout.MODULES_LOAD_LIST in image) is expected
    assert image[layout.MODULES_LOAD_LIST].data == (
        b"kernel/drivers/virtio/virtio_ring.ko\nkernel/drivers/virtio/virtio.ko\n")
