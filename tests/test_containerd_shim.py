"""The containerd shim's pure parts: config.json, the rootfs lookup, names, flags, RPC errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from host.containerd import ttrpc
from host.containerd.config import ShimConfig, vm_name
from host.containerd.events import Publisher
from host.containerd.proto import shim_pb2
from host.containerd.rootfs import MountSpec, snapshot_key
from host.containerd.server import serve_connection
from host.containerd.shim import UsageError, parse_args
from host.containerd.spec import SpecError, find_in_rootfs, parse_config
from host.containerd.task import SERVICE, TaskService


def _config(**process: Any) -> dict[str, Any]:
    proc = {"args": ["/bin/sh", "-c", "true"], "env": ["PATH=/bin", "A=b=c"], "cwd": "/",
            "user": {"uid": 0, "gid": 0, "additionalGids": [0]}, **process}
    return {"ociVersion": "1.0.2", "process": proc, "hostname": "box"}


def test_config_json_gives_the_process_and_limits() -> None:
    doc = _config()
    doc["linux"] = {"resources": {"memory": {"limit": 300 * 2**20 + 1},
                                  "cpu": {"quota": 150000, "period": 100000}}}
    spec = parse_config(doc)
    assert spec.process.args == ("/bin/sh", "-c", "true")
    assert spec.process.env == {"PATH": "/bin", "A": "b=c"}
    assert (spec.hostname, spec.memory_mb, spec.cpus) == ("box", 301, 2)


def test_a_user_and_a_terminal_are_the_processs() -> None:
    spec = parse_config(_config(user={"uid": 1000, "gid": 1000, "additionalGids": [1000]},
                                terminal=True))
    assert (spec.process.uid, spec.process.gid, spec.process.terminal) == (1000, 1000, True)


def test_an_idle_vm_runs_kestrels_own_busybox_not_the_process() -> None:
    import json

    from host.containerd.vm import IDLE, manifest_for

    spec = parse_config(_config())
    doc = json.loads(manifest_for(spec, initramfs=Path("/i.cpio"), image=Path("/r.ext4"),
                                  idle=True))
    assert doc["workload"]["entrypoint"] == list(IDLE)
    doc = json.loads(manifest_for(spec, initramfs=Path("/i.cpio"), image=Path("/r.ext4")))
    assert doc["workload"]["entrypoint"] == ["/bin/sh", "-c", "true"]


def test_no_limits_leave_the_defaults() -> None:
    spec = parse_config(_config())
    assert (spec.memory_mb, spec.cpus) == (None, None)


@pytest.mark.parametrize(("process", "linux", "named"), [
    ({"user": {"uid": 1000, "gid": 1000, "additionalGids": [1000, 27]}}, {},
     "process.user.additionalGids"),
    ({"user": {"uid": -1}}, {}, "process.user: uid -1"),
    ({"args": []}, {}, "process.args"),
    ({"cwd": "relative"}, {}, "process.cwd"),
    ({"env": ["NOEQUALS"]}, {}, "process.env"),
    ({}, {"namespaces": [{"type": "network", "path": "/proc/1/ns/net"}]}, "linux.namespaces"),
])
def test_what_a_vm_cannot_honour_is_refused_by_name(
        process: dict[str, Any], linux: dict[str, Any], named: str) -> None:
    doc = _config(**process)
    doc["linux"] = linux
    with pytest.raises(SpecError, match=named.replace(".", r"\.")):
        parse_config(doc)


def test_the_program_is_found_through_path_and_symlinks_inside_the_rootfs(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    busybox = tmp_path / "bin" / "busybox"
    busybox.write_bytes(b"\x7fELF")
    busybox.chmod(0o755)
    (tmp_path / "bin" / "sh").symlink_to("busybox")
    (tmp_path / "usr").mkdir()
    (tmp_path / "usr" / "bin").symlink_to("/bin")  # absolute: inside the root, not the host's
    (tmp_path / "bin" / "notexec").write_text("")
    assert find_in_rootfs(tmp_path, "sh", "/usr/bin:/bin") == "/usr/bin/sh"
    assert find_in_rootfs(tmp_path, "/bin/sh", "") == "/bin/sh"
    assert find_in_rootfs(tmp_path, "notexec", "/bin") is None
    assert find_in_rootfs(tmp_path, "python3", "/usr/bin:/bin") is None  # the host has it


def test_a_symlink_loop_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    assert find_in_rootfs(tmp_path, "/a", "") is None


def test_vm_names_are_valid_and_distinct() -> None:
    assert vm_name("default", "c1") == "default.c1"
    odd = vm_name("k8s.io", "A" * 64)
    assert len(odd) <= 63 and odd != vm_name("k8s.io", "a" * 64)


def test_committed_layers_are_cached_and_a_written_layer_is_not(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    overlay = MountSpec("overlay", "overlay", ("index=off", f"workdir={tmp_path}/w",
                                               f"upperdir={upper}", "lowerdir=/l2:/l1"))
    key = snapshot_key([overlay])
    (tmp_path / "x").mkdir()
    other = MountSpec("overlay", "overlay", (f"upperdir={tmp_path}/x", "index=off",
                                             "lowerdir=/l2:/l1"))
    assert key is not None and key == snapshot_key([other])
    (upper / "written").write_text("")
    assert snapshot_key([overlay]) is None
    assert snapshot_key([MountSpec("bind", "/snap/7/fs", ("rbind", "rw"))]) is None
    assert snapshot_key([]) is None


def test_flags_as_containerd_passes_them() -> None:
    args = parse_args(["-namespace", "k8s.io", "-address", "/run/c.sock", "-publish-binary",
                       "/usr/bin/containerd", "-id", "c1", "-debug", "start"])
    assert (args.namespace, args.id, args.action, args.debug) == ("k8s.io", "c1", "start", True)
    args = parse_args(["--namespace=x", "-id=y", "-bundle", "/b", "delete"])
    assert (args.namespace, args.bundle, args.action) == ("x", "/b", "delete")
    with pytest.raises(UsageError, match="unknown action"):
        parse_args(["-namespace", "x", "-id", "y", "stop"])
    with pytest.raises(UsageError, match="-id"):
        parse_args(["-namespace", "x", "start"])


async def test_update_and_unknown_methods_answer_with_clear_errors(tmp_path: Path) -> None:
    initramfs = tmp_path / "initramfs"
    initramfs.write_bytes(b"")
    service = TaskService(
        cfg=ShimConfig(initramfs=initramfs, state_dir=tmp_path / "state"), namespace="ns",
        container_id="c1", bundle=tmp_path, publisher=Publisher(
            binary="", address="", namespace="ns", say=print),
        say=print, shutdown=trio.Event())
    ours, theirs = trio.testing.memory_stream_pair()
    client = ttrpc.Connection(client=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_connection(ours, service.methods(), say=print))
        replies: list[ttrpc.Event] = []
        for method in ("Update", "Frobnicate", "Wait"):
            body = shim_pb2.WaitRequest(id="c1").SerializeToString()
            await theirs.send_all(client.request(SERVICE, method, body)[1])
        while len(replies) < 3:
            replies += client.receive(bytes(await theirs.receive_some()))
        nursery.cancel_scope.cancel()
    by_id = {r.stream_id: r for r in replies if isinstance(r, ttrpc.Reply)}
    assert by_id[1].code == ttrpc.UNIMPLEMENTED and "update is not supported" in by_id[1].message
    assert by_id[3].code == ttrpc.UNIMPLEMENTED and "Frobnicate" in by_id[3].message
    assert by_id[5].code == ttrpc.NOT_FOUND and "not created" in by_id[5].message
