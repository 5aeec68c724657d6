"""Session fixtures for VM tests: the Debian kernel, QEMU, short run directories.

Every test here boots the real kernel under QEMU (TCG); anything this machine
lacks (apt's kernel package, qemu-system-x86_64, a static busybox) turns the
test into a skip that names it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import fledge_build

from host.kernel import KernelError, KernelInfo, fetch_kernel

BUSYBOX = Path("/bin/busybox")


@pytest.fixture(scope="session")
def kernel() -> KernelInfo:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip(reason="qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    try:
        return fetch_kernel(quiet=True)
    except KernelError as exc:
        pytest.skip(reason=f"no guest kernel: {exc}")


@pytest.fixture(scope="session")
def busybox() -> Path:
    if not BUSYBOX.is_file():
        pytest.skip(reason=f"{BUSYBOX} missing (apt-get install busybox-static)")
    return BUSYBOX


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.stash[_FAILED] = report.failed


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def run_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A short private directory (unix socket paths must stay under 108 bytes).

    Kept when the test fails, so the console log and QEMU command survive.
    """
    path = Path(tempfile.mkdtemp(prefix="kvt-"))
    yield path
    if request.node.stash.get(_FAILED, True):
        print(f"kept run directory {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


GENERIC_TOML = """\
version = "1"
strategy = "initramfs"

[agent]
source_strategy = "release"
version = "latest"

[mappings]
"www" = "/www"
"""


@pytest.fixture(scope="session")
def kestrel_image(kernel: KernelInfo, busybox: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fledge's default mode: shim, frozen kestrel, busybox, virtio modules, a /www page.

    One image for every manifest: kestrel reads the manifest from the command line.
    """
    base = tmp_path_factory.mktemp("kestrel-image")
    (base / "www").mkdir()
    (base / "www" / "index.html").write_text("hello from kestrel's workload\n")
    (base / "fledge.toml").write_text(GENERIC_TOML)
    return fledge_build(base / "fledge.toml", base / "image.cpio.gz")


def _no_vsock_here() -> None:
    """The test host's AF_VSOCK guard (tests/vsockguard.py), installed for vm-tests too."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.vsockguard import install

    install()


_no_vsock_here()
