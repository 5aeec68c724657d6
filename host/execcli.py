"""``volar vms exec`` and ``volar vms shell``: a process in a running VM, docker exec style.

The session goes through the VM's monitor (its 0600 control socket in the
run directory, never a network port) and kestrel's channel. volar exits
with the command's status. With ``-t`` the local terminal is raw for the
session and restored on every way out (the end, an error, SIGTERM/SIGHUP,
Ctrl-C before raw mode); window changes are sent to the guest.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from host.execclient import ExecError, ExecSession, ExecStatus, open_exec
from host.state import Store
from host.vmcontrol import CONTROL_SOCKET

RUNNING = ("running", "healthy", "unhealthy")
# Signals that end volar; the terminal is restored and the session hung up first.
ENDING = (signal.SIGTERM, signal.SIGHUP)


def cmd_exec(store: Store, args: argparse.Namespace) -> int:
    argv = list(args.command)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise ExecError(f"vms exec {args.name}: no command given (volar vms exec NAME -- CMD)")
    return _run(store, args.name, argv, interactive=args.interactive, tty_wanted=args.tty,
                env=_env(args.env), cwd=args.workdir, user=args.user)


def cmd_shell(store: Store, args: argparse.Namespace) -> int:
    return _run(store, args.name, [args.shell], interactive=True, tty_wanted=True, env=[],
                cwd="/", user="", shell=True)


def _env(items: list[str] | None) -> list[str]:
    out = []
    for item in items or []:
        if "=" in item:
            out.append(item)
        elif item in os.environ:  # docker's -e NAME: take the local value
            out.append(f"{item}={os.environ[item]}")
    return out


def _user(text: str) -> tuple[int, int]:
    if not text:
        return 0, 0
    uid, _, gid = text.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError:
        raise ExecError(f"--user {text!r}: expected UID or UID:GID (numbers)") from None


def _socket(store: Store, name: str, what: str) -> Path:
    vm = store.vm(name)
    if vm.status not in RUNNING:
        hint = "; try again once it is running" if vm.status in ("pending", "starting") else ""
        raise ExecError(f"vms {what} {name}: the VM is {vm.status}, exec needs a running VM{hint}")
    return Path(vm.run_dir) / CONTROL_SOCKET


def _run(store: Store, name: str, argv: list[str], *, interactive: bool, tty_wanted: bool,
         env: list[str], cwd: str, user: str, shell: bool = False) -> int:
    uid, gid = _user(user)
    what = "shell" if shell else "exec"
    path = _socket(store, name, what)
    if tty_wanted and not os.isatty(0):
        raise ExecError(f"vms {what} {name}: -t needs a terminal on stdin, and this stdin "
                        "is not one (drop -t, or run it in a terminal)")
    rows, cols = _size() if tty_wanted else (24, 80)
    try:
        with _raw(tty_wanted):
            status = trio.run(_session, path, argv, interactive, tty_wanted, env, cwd, uid,
                              gid, rows, cols)
    except ExecError as exc:
        raise ExecError(f"vms {what} {name}: {exc}") from None
    if status.started:
        return status.status
    if shell and status.status == 127:
        print(f"volar: vms shell {name}: the image has no shell at {argv[0]} "
              f"({status.message}); run a program with volar vms exec {name} -- PROGRAM",
              file=sys.stderr)
    else:
        print(f"volar: vms exec {name}: {status.message}", file=sys.stderr)
    return status.status


def _size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(0)
    except OSError:
        return 24, 80
    return size.lines or 24, size.columns or 80


@contextmanager
def _raw(wanted: bool) -> Iterator[None]:
    if not wanted:
        yield
        return
    saved = termios.tcgetattr(0)
    try:
        tty.setraw(0, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


async def _session(path: Path, argv: list[str], interactive: bool, tty_wanted: bool,
                   env: list[str], cwd: str, uid: int, gid: int, rows: int,
                   cols: int) -> ExecStatus:
    try:
        async with open_exec(path, argv, env=env, cwd=cwd, uid=uid, gid=gid, tty=tty_wanted,
                             rows=rows, cols=cols) as s, trio.open_nursery() as nursery:
            nursery.start_soon(_signals, s, tty_wanted)
            if interactive:
                nursery.start_soon(_stdin, s, tty_wanted)
            elif not tty_wanted:
                await s.close_stdin()
            async for stream, data in s:
                await trio.to_thread.run_sync(_write_all, 2 if stream == "stderr" else 1, data)
            status = await s.wait()
            nursery.cancel_scope.cancel()
    # The nursery groups what its tasks raise; the CLI wants the one line.
    except* ExecError as group:
        raise group.exceptions[0] from None
    return status


async def _stdin(s: ExecSession, tty_wanted: bool) -> None:
    while True:
        # A thread, not a non-blocking fd: O_NONBLOCK would be set on the
        # terminal's open file, which the shell that started volar shares.
        data = await trio.to_thread.run_sync(_read, abandon_on_cancel=True)
        if not data:
            break
        await s.write(data)
    if not tty_wanted:
        await s.close_stdin()


def _read() -> bytes:
    try:
        return os.read(0, 65536)
    except OSError:
        return b""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def _signals(s: ExecSession, tty_wanted: bool) -> None:
    with trio.open_signal_receiver(signal.SIGWINCH, *ENDING) as signals:
        async for signum in signals:
            if signum == signal.SIGWINCH:
                if tty_wanted:
                    await s.resize(*_size())
            else:
                # volar is going away: the session goes with it (the monitor
                # sees the socket close and hangs the process up).
                raise ExecError(f"{signal.Signals(signum).name} received; session hung up")
