"""A restored VM is told so on attach and takes its own identity (kestrel.restore).

The protocol half is driven without sockets; ``plan`` is pure. ``apply``'s
syscalls (the RNG ioctls, clock_settime, sethostname) act on the machine, so
they run only inside a VM: vm-tests/test_snapshot.py shows their effects.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from host.snapshot import (
    SnapshotError,
    SnapshotMeta,
    check_restorable,
    kernel_digest,
    load,
    save,
    stamp,
)
from kestrel.digest import sha256_file
from kestrel.protocol import (
    Attach,
    FrameDecoder,
    GuestSession,
    Hello,
    HostSession,
    Timeline,
)
from kestrel.restore import MIN_ENTROPY, STEP_BACK_MIN_NS, STEP_MIN_NS, RestoreError, plan
from tests.pid1 import Kestrel, manifest, run_kestrel

SECOND = 1_000_000_000


def _decode(data: bytes) -> list[object]:
    d = FrameDecoder()
    d.feed(data)
    return list(d)


def test_a_cold_booted_vm_is_attached_without_restore_facts() -> None:
    (attach,) = _decode(HostSession(last_seq=4).attach(wall_ns=123, entropy=b"x" * 32))
    assert attach == Attach(last_seq=4)


def test_a_restored_vm_is_told_its_restore_id_hostname_clock_and_entropy() -> None:
    host = HostSession(last_seq=7, restore_id="r-1", hostname="web-2")
    (attach,) = _decode(host.attach(wall_ns=5 * SECOND, entropy=b"e" * 32))
    assert attach == Attach(last_seq=7, restore_id="r-1", hostname="web-2",
                            wall_ns=5 * SECOND, entropy=b"e" * 32)
    # A re-sent attach (no hello yet) says the same, with the clock of its own moment.
    (again,) = _decode(host.reattach(wall_ns=6 * SECOND, entropy=b"f" * 32))
    assert isinstance(again, Attach) and again.restore_id == "r-1"
    assert again.wall_ns == 6 * SECOND


def test_the_guest_answers_a_restore_attach_with_hello_and_hands_it_to_kestrel() -> None:
    guest = GuestSession(agent="t", boot_id="b")
    host = HostSession(restore_id="r-1", hostname="web-2")
    commands, out = guest.receive(host.attach(wall_ns=1, entropy=b"e" * 32))
    assert [type(c) for c in commands] == [Attach]
    assert isinstance(commands[0], Attach) and commands[0].hostname == "web-2"
    assert any(isinstance(m, Hello) for m in host.receive(out))


def test_plan_takes_identity_entropy_and_the_clock_step() -> None:
    attach = Attach(restore_id="r-1", hostname="web-2", wall_ns=100 * SECOND,
                    entropy=b"e" * MIN_ENTROPY)
    p = plan(attach, handled="", now_ns=40 * SECOND)
    assert p is not None
    assert (p.restore_id, p.hostname, p.entropy) == ("r-1", "web-2", b"e" * MIN_ENTROPY)
    assert p.clock_step_ns == 60 * SECOND


def test_a_clock_within_transit_time_is_left_alone() -> None:
    attach = Attach(restore_id="r-1", wall_ns=100 * SECOND, entropy=b"e" * 32)
    p = plan(attach, handled="", now_ns=100 * SECOND - STEP_MIN_NS + 1)
    assert p is not None and p.clock_step_ns == 0
    # A late frame makes the host's clock look behind: never a step back for that.
    late = plan(attach, handled="", now_ns=110 * SECOND)
    assert late is not None and late.clock_step_ns == 0
    ahead = plan(attach, handled="", now_ns=100 * SECOND + STEP_BACK_MIN_NS)
    assert ahead is not None and ahead.clock_step_ns == -STEP_BACK_MIN_NS


def test_each_restore_is_acted_on_once_and_a_cold_attach_never() -> None:
    attach = Attach(restore_id="r-1", entropy=b"e" * 32)
    assert plan(attach, handled="r-1", now_ns=0) is None  # a reconnect of the same restore
    assert plan(Attach(last_seq=3), handled="", now_ns=0) is None
    assert plan(Attach(restore_id="r-2", entropy=b"e" * 32), handled="r-1", now_ns=0)


def test_too_little_entropy_is_refused_naming_the_restore() -> None:
    with pytest.raises(RestoreError, match=r"restore r-9: the host sent 8 bytes of entropy"):
        plan(Attach(restore_id="r-9", entropy=b"e" * 8), handled="", now_ns=0)


async def test_kestrel_told_of_a_restore_takes_the_hostname_and_marks_restored() -> None:
    """As PID 1 (fresh UTS namespace): the host re-attaches saying "restored as kt-2".

    The host's clock in the attach is this machine's own, so kestrel has no
    reason to step it (and must not: CLOCK_REALTIME is not namespaced).
    """
    wait_rename = 'while [ "$(hostname)" = kt ]; do sleep 0.05; done; echo now=$(hostname)'

    async def restore(k: Kestrel) -> None:
        await k.wait_for(lambda r: r.session.hello is not None)
        k.run.session.restore_id, k.run.session.hostname = "r-1", "kt-2"
        await k.disconnect()  # kestrel reconnects; the next attach says "restored"
        await k.wait_for(lambda r: bool(r.exits))

    run = await run_kestrel(manifest(["/bin/sh", "-c", wait_rename]), scenario=restore)
    assert run.powered_off
    assert "now=kt-2" in run.logs("stdout").decode()
    assert [m.mark for m in run.of(Timeline) if m.mark == "restored"] == ["restored"]
    assert "kernel RNG reseeded with 32 bytes" in run.console
    assert "wall clock stepped" not in run.console
    assert run.exits[0].status == 0


# --- volar's side: a snapshot directory is checked before anything starts -------


def _meta(tmp_path: Path, **change: object) -> SnapshotMeta:
    (tmp_path / "state").write_bytes(b"x" * 100)
    base = SnapshotMeta(format=1, vm="src", taken_at=0.0, plugin="caddy", plugin_sha256="a" * 64,
                        kernel="/k", kernel_sha256="b" * 64, vmm="qemu", vmm_version="QEMU 7.2",
                        machine="q35", cpus=1, memory_mb=384, channel="vsock", guest_port=80,
                        last_seq=9, state_bytes=100)
    return replace(base, **change)  # type: ignore[arg-type]


def _check(tmp_path: Path, meta: SnapshotMeta, **given: Any) -> None:
    facts: dict[str, Any] = {"plugin_sha256": "a" * 64, "kernel_sha256": "b" * 64,
                             "vmm_version": "QEMU 7.2", **given}
    check_restorable(meta, tmp_path, **facts)


def test_a_snapshot_round_trips_and_matches_its_host(tmp_path: Path) -> None:
    meta = _meta(tmp_path)
    save(tmp_path, meta)
    assert load(tmp_path) == meta
    _check(tmp_path, meta)


@pytest.mark.parametrize(("given", "state_bytes", "expect"), [
    ({}, 200, "is 100 bytes, the snapshot recorded 200: truncated or altered"),
    ({"plugin_sha256": None}, 100, "plugin 'caddy' is not installed"),
    ({"plugin_sha256": "c" * 64}, 100, "plugin 'caddy' changed since the snapshot"),
    ({"kernel_sha256": "d" * 64}, 100, "the kernel changed since the snapshot"),
    ({"vmm_version": "QEMU 10.0"}, 100, "taken with 'QEMU 7.2', this host runs 'QEMU 10.0'"),
])
def test_restores_against_anything_else_are_refused_in_one_line(
        tmp_path: Path, given: dict[str, Any], state_bytes: int, expect: str) -> None:
    with pytest.raises(SnapshotError, match=re.escape(expect)) as err:
        _check(tmp_path, _meta(tmp_path, state_bytes=state_bytes), **given)
    assert "\n" not in str(err.value)


def test_missing_and_unreadable_snapshots_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match=r"snapshot\.json does not exist"):
        load(tmp_path)
    (tmp_path / "snapshot.json").write_text("{not json")
    with pytest.raises(SnapshotError, match="unreadable"):
        load(tmp_path)
    meta = _meta(tmp_path)
    (tmp_path / "state").unlink()
    with pytest.raises(SnapshotError, match=r"its saved state .* is missing"):
        _check(tmp_path, meta)


def test_the_kernel_is_rehashed_only_when_its_file_changed(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel one")
    meta = _meta(tmp_path, kernel=str(kernel), kernel_sha256=sha256_file(kernel),
                 kernel_stamp=stamp(kernel))
    assert kernel_digest(kernel, meta) == meta.kernel_sha256
    kernel.write_bytes(b"kernel two, rebuilt")
    with pytest.raises(SnapshotError, match="the kernel changed since the snapshot"):
        _check(tmp_path, meta, kernel_sha256=kernel_digest(kernel, meta))
