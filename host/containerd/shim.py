"""containerd-shim-kestrel-v1: containerd's runtime v2 shim for kestrel microVMs.

containerd runs it three ways (runtime/v2/binary.go, shim/util.go), always
with ``-namespace NS -address ADDR -publish-binary BIN`` and ``-id ID``:

* ``start`` (cwd: the bundle): bind the task socket, start the daemon with
  it as an inherited fd, write the address to bundle/address and print it.
  containerd reads stdout until it closes, so the daemon gets none of ours.
* no subcommand: the daemon (``-listen-fd N``): serve the task service.
* ``delete`` (after a shim died): stop and forget its VM, print a
  DeleteResponse (protobuf) on stdout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from host.containerd.config import (
    RECORD,
    SOCKET_DIR,
    ConfigError,
    load_config,
    socket_path,
    vm_name,
)

VALUE_FLAGS = ("namespace", "address", "publish-binary", "id", "bundle", "listen-fd")
BOOL_FLAGS = ("debug", "v")
SIGKILL_STATUS = 128 + 9


class UsageError(ValueError):
    pass


@dataclass
class Args:
    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    listen_fd: int = -1
    debug: bool = False
    action: str = ""


def parse_args(argv: list[str]) -> Args:
    """Go's flag syntax: -name value, --name value, -name=value; then the action."""
    args = Args()
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-"):
            if args.action:
                raise UsageError(f"unexpected argument {word!r}")
            args.action = word
            i += 1
            continue
        name, eq, value = word.lstrip("-").partition("=")
        if name in BOOL_FLAGS:
            args.debug = args.debug or name == "debug"
        elif name in VALUE_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError(f"-{name} needs a value")
                i += 1
                value = argv[i]
            if name == "listen-fd":
                args.listen_fd = int(value)
            else:
                setattr(args, name.replace("-", "_"), value)
        else:
            raise UsageError(f"unknown flag -{name}")
        i += 1
    if args.action not in ("", "start", "delete"):
        raise UsageError(f"unknown action {args.action!r} (start, delete)")
    if not args.namespace or not args.id:
        raise UsageError("-namespace and -id are required")
    return args


def _package_root() -> str:
    root = str(Path(__file__).resolve().parent.parent.parent)
    old = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{old}" if old else root


def start(args: Args) -> int:
    load_config()  # a broken setting fails `start`, where containerd shows it
    bundle = Path.cwd()
    path = socket_path(args.address, args.namespace, args.id)
    address = f"unix://{path}"
    if _answers(path):
        print(address)  # already running (containerd retried its start)
        return 0
    SOCKET_DIR.mkdir(mode=0o711, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    log = _open_log(bundle)
    argv = [sys.executable, "-m", "host.containerd.shim", "-namespace", args.namespace,
            "-address", args.address, "-publish-binary", args.publish_binary, "-id", args.id,
            "-listen-fd", str(listener.fileno())]
    try:
        subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=bundle,
            pass_fds=(listener.fileno(),), start_new_session=True,
            env={**os.environ, "PYTHONPATH": _package_root()},
        )
    except OSError:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(log)
        listener.close()
    (bundle / "address").write_text(address)
    print(address)
    return 0


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _open_log(bundle: Path) -> int:
    """containerd's shim log FIFO (bundle/log, already open at its end), else /dev/null."""
    try:
        return os.open(bundle / "log", os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return os.open(os.devnull, os.O_WRONLY)


def delete(args: Args) -> int:
    """Clean up after a shim that is gone: its VM, socket, image, rootfs mount."""
    from host.containerd.process import now_ts
    from host.containerd.proto import shim_pb2
    from host.containerd.vm import cleanup_vm
    from host.state import Store

    bundle = Path(args.bundle) if args.bundle else Path.cwd()
    try:
        record = json.loads((bundle / RECORD).read_text())
    except (OSError, ValueError):
        record = {}  # Create never got that far
    state_dir = Path(record["state_dir"]) if record.get("state_dir") else load_config().state_dir
    name = record.get("vm") or vm_name(args.namespace, args.id)
    status, pid = SIGKILL_STATUS, 0
    store = Store(state_dir)
    try:
        row = store.db.execute("SELECT exit_json, vmm_pid FROM vms WHERE name = ?",
                               (name,)).fetchone()
    finally:
        store.close()
    if row is not None:
        pid = int(row[1] or 0)
        if row[0]:
            status = int(json.loads(row[0])["status"])
    image = Path(record["image"]) if record.get("image") and not record.get("cached") else None
    cleanup_vm(state_dir, name, image)
    if os.path.ismount(bundle / "rootfs"):
        subprocess.run(["umount", str(bundle / "rootfs")], check=False)
    socket_path(args.address, args.namespace, args.id).unlink(missing_ok=True)
    reply = shim_pb2.DeleteResponse(pid=pid, exit_status=status, exited_at=now_ts())
    sys.stdout.buffer.write(reply.SerializeToString())
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.action == "start":
            return start(args)
        if args.action == "delete":
            return delete(args)
        if args.listen_fd < 0:
            raise UsageError("the daemon needs -listen-fd (containerd runs `start`)")
        from host.containerd.daemon import serve

        return serve(args.namespace, args.id, address=args.address,
                     publish_binary=args.publish_binary, listen_fd=args.listen_fd,
                     socket=socket_path(args.address, args.namespace, args.id))
    except (UsageError, ConfigError, OSError) as exc:
        print(f"containerd-shim-kestrel-v1: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
