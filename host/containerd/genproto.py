"""Regenerate host/containerd/proto/ from Debian's .proto files: ``make shim-proto``.

Debian's golang-github-containerd-containerd-dev ships the shim API's .proto
files under /usr/share/gocode/src. They import each other by Go paths
(``github.com/...``) that are no Python package names, and carry gogoproto
options that only matter to Go's code generator, so this copies the few we
need flat into a scratch tree, drops the gogo options (the wire format does
not change: they only rename Go fields and pick Go types), rewrites the
imports, and runs protoc (protobuf-compiler 3.21.12, the version pinned in
pyproject.toml) with mypy-protobuf for the typed stubs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GOCODE = Path("/usr/share/gocode/src/github.com/containerd/containerd")
OUT = "host/containerd/proto"
# Debian path under GOCODE -> flat name in OUT.
SOURCES = {
    "api/types/mount.proto": "mount.proto",
    "api/types/task/task.proto": "types_task.proto",
    "runtime/v2/task/shim.proto": "shim.proto",
    "api/events/task.proto": "events_task.proto",
}
GOGO_FIELD_OPTIONS = re.compile(r"\s*\[\((?:gogoproto|containerd\.plugin)\.[^\]]*\]")
GOGO_LINE = re.compile(r"^\s*(option \((?:gogoproto|containerd\.plugin)\.|import weak ).*\n",
                       re.MULTILINE)
GO_PACKAGE = re.compile(r'^option go_package = .*\n', re.MULTILINE)


def rewrite(text: str) -> str:
    text = GOGO_LINE.sub("", text)
    text = GOGO_FIELD_OPTIONS.sub("", text)
    text = GO_PACKAGE.sub("", text)
    for src, flat in SOURCES.items():
        text = text.replace(f'"github.com/containerd/containerd/{src}"', f'"{OUT}/{flat}"')
    return text


def main() -> int:
    repo = Path(__file__).resolve().parent.parent.parent
    if not GOCODE.is_dir():
        print(f"genproto: {GOCODE} is missing "
              "(apt-get install golang-github-containerd-containerd-dev)", file=sys.stderr)
        return 1
    plugin = Path(sys.executable).parent / "protoc-gen-mypy"
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / OUT
        scratch.mkdir(parents=True)
        for src, flat in SOURCES.items():
            (scratch / flat).write_text(rewrite((GOCODE / src).read_text()))
        shutil.copy(repo / OUT / "ttrpc.proto", scratch / "ttrpc.proto")
        protos = [f"{OUT}/{flat}" for flat in [*SOURCES.values(), "ttrpc.proto"]]
        for old in (repo / OUT).glob("*_pb2.py*"):
            old.unlink()
        subprocess.run(
            ["protoc", f"-I{tmp}", "-I/usr/include", f"--python_out={repo}",
             f"--plugin=protoc-gen-mypy={plugin}", f"--mypy_out={repo}", *protos],
            check=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
