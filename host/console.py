"""`volar vms console NAME`: attach to a VM's serial console, or print its log.

On a terminal it attaches: the terminal goes raw, keystrokes go to the
guest's serial line and its output comes back, through the monitor's
console socket (0600, in the VM's run directory; nothing on a network).
Ctrl-] detaches. It needs nothing from inside the guest, so it also works
when kestrel is dead or absent. With ``--log``, or when stdin or stdout is
not a terminal, it prints the console log (``-f`` follows it).
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import time
from pathlib import Path

from host.adopt import reconcile
from host.errors import VolarError
from host.rows import Vm
from host.serialconsole import CONSOLE_SOCKET
from host.state import TERMINAL, Store
from host.terminal import TerminalSignal, raw_terminal

ESCAPE = b"\x1d"  # Ctrl-], as telnet and virsh console
READ_SIZE = 65536


def run(store: Store, args: argparse.Namespace) -> int:
    vm = store.vm(args.name)
    if args.log or not (os.isatty(0) and os.isatty(1)):
        print_log(store, vm, follow=args.follow)
        return 0
    return attach(vm)


def print_log(store: Store, vm: Vm, *, follow: bool) -> None:
    path = Path(vm.console_log or Path(vm.run_dir) / "console.log")
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise VolarError(f"no console log for {vm.name} at {path}: {exc.strerror}") from None
    with f:
        while True:
            data = f.read(READ_SIZE)
            if data:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
                continue
            if not follow:
                return
            reconcile(store, [vm.name])
            if store.vm(vm.name).status in TERMINAL:
                return
            time.sleep(0.2)


def connect(vm: Vm) -> socket.socket:
    """The monitor's console socket, or one line saying why there is none."""
    if vm.status in TERMINAL:
        raise VolarError(f"VM {vm.name} is {vm.status}: no console to attach to "
                         f"(`volar vms console {vm.name} --log` prints what it wrote)")
    path = Path(vm.run_dir) / CONSOLE_SOCKET
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise VolarError(f"VM {vm.name} ({vm.status}): its console socket {path} does not "
                         f"answer: {exc.strerror}") from None
    return sock


def attach(vm: Vm, *, stdin: int = 0, stdout: int = 1) -> int:
    sock = connect(vm)
    print(f"Connected to the serial console of {vm.name}; Ctrl-] detaches.",
          file=sys.stderr, flush=True)
    try:
        with sock, raw_terminal(stdin):
            ended = pump(sock, stdin, stdout)
    except TerminalSignal as exc:
        print(f"\nvolar: console of {vm.name}: {exc}, terminal restored", file=sys.stderr)
        return 128 + exc.signum
    if ended == "detached":
        print(f"\nDetached from the console of {vm.name}.", file=sys.stderr)
    else:
        print(f"\nThe console of {vm.name} closed ({ended}).", file=sys.stderr)
    return 0


def pump(sock: socket.socket, stdin: int, stdout: int) -> str:
    """Copy both ways until Ctrl-], end of input or the VM's end; say which."""
    poller = select.poll()
    poller.register(stdin, select.POLLIN)
    poller.register(sock, select.POLLIN)
    while True:
        for fd, _events in poller.poll():
            if fd == stdin:
                data = os.read(stdin, READ_SIZE)
                if not data:
                    return "end of input"
                head, escape, _ = data.partition(ESCAPE)
                if head:
                    sock.sendall(head)
                if escape:
                    return "detached"
            else:
                try:
                    data = sock.recv(READ_SIZE)
                except ConnectionResetError:
                    data = b""
                if not data:
                    return "the VM stopped or its monitor hung up"
                view = memoryview(data)
                while view:
                    view = view[os.write(stdout, view):]
