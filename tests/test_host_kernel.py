"""volar kernel: the PVH vmlinux comes out of Debian's bzImage, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from host.kernel import KernelError, current_kernel, extract_vmlinux, has_pvh_note

KERNEL = current_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no kernel fetched (make kernel)")


@needs_kernel
def test_vmlinux_is_the_bzimage_payload_and_boots_pvh() -> None:
    assert KERNEL is not None
    vmlinux = extract_vmlinux(KERNEL.vmlinuz.read_bytes())
    assert vmlinux == KERNEL.vmlinux.read_bytes()
    assert has_pvh_note(vmlinux)


@needs_kernel
def test_an_lz4_kernel_without_the_lz4_command_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert KERNEL is not None
    bzimage = KERNEL.vmlinuz.read_bytes()
    if b"\x02\x21\x4c\x18" not in bzimage:
        pytest.skip(reason="this kernel is not LZ4-compressed")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KernelError, match="apt-get install lz4"):
        extract_vmlinux(bzimage)


def test_no_pvh_note_in_other_files() -> None:
    assert not has_pvh_note(Path("/bin/true").read_bytes())
    assert not has_pvh_note(b"\x7fELF" + b"\0" * 60)
    with pytest.raises(KernelError, match="no xz- or LZ4"):
        extract_vmlinux(b"\0" * 4096)
