"""volar: the host CLI (plugins, vms, kernel) over the state store.

Daemonless: each command opens the store, does its work and exits; running
VMs belong to their monitors. Errors print one line and exit non-zero.
Imports stay lean (no trio) so listing is quick.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from host import lifecycle
from host.adopt import reconcile
from host.errors import VolarError
from host.rows import Vm
from host.state import TERMINAL, Store, default_state_dir
from kestrel.cliout import Output, VerbosityError, split_verbosity
from kestrel.manifest import ManifestError


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def _when(t: float | None) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# --- plugins -----------------------------------------------------------------


def cmd_plugins(store: Store, args: argparse.Namespace) -> int:
    from host import plugins

    if args.action == "install":
        source = args.manifest or args.url
        if not source:
            raise VolarError("plugins install: pass --manifest FILE|URL (or --url URL)")
        row = plugins.install(store, source, force=args.force, output=args.output)
        args.output.step(f"Plugin {row.name} {row.version} installed "
                         f"({row.strategy}, sha256:{row.artifact_sha256[:16]}...)")
    elif args.action == "list":
        rows = store.plugins()
        if args.json:
            _print_json([plugins.describe(r) for r in rows])
        else:
            print(_table([(r.name, r.version, r.runtime,
                           "true" if r.enabled else "false", r.strategy) for r in rows],
                         ("NAME", "VERSION", "RUNTIME", "ENABLED", "STRATEGY")))
    elif args.action == "show":
        info = plugins.describe(store.plugin(args.name))
        if args.json:
            _print_json(info)
        else:
            for key in ("name", "version", "runtime", "enabled", "strategy", "source",
                        "artifact_path", "artifact_sha256"):
                print(f"{key + ':':17} {info[key]}")
            print(f"{'installed:':17} {_when(info['installed_at'])}")
            print("manifest:")
            print(json.dumps(info["manifest"], indent=2))
    elif args.action == "remove":
        plugins.remove(store, args.name, force=args.force)
        args.output.step(f"Plugin {args.name} removed")
    elif args.action in ("enable", "disable"):
        plugins.set_enabled(store, args.name, args.action == "enable")
        args.output.step(f"Plugin {args.name} {args.action}d")
    return 0


# --- vms ---------------------------------------------------------------------


def _vm_summary(vm: Vm) -> dict[str, Any]:
    return {
        "name": vm.name, "plugin": vm.plugin, "vmm": vm.vmm, "status": vm.status,
        "address": vm.address, "network": "bridge" if vm.tap else "user",
        "ip": vm.ip, "mac": vm.mac, "tap": vm.tap,
        "cpus": vm.cpus, "memory_mb": vm.memory_mb, "uptime_s": vm.uptime,
        "health": vm.health, "detail": vm.detail, "agent": vm.agent,
    }


def _vm_show(store: Store, vm: Vm) -> dict[str, Any]:
    out = _vm_summary(vm)
    out.update(
        kernel=vm.kernel, initramfs=vm.initramfs, run_dir=vm.run_dir,
        console_log=vm.console_log or str(Path(vm.run_dir) / "console.log"),
        monitor_log=str(Path(vm.run_dir) / lifecycle.MONITOR_LOG),
        cmdline=vm.cmdline, vmm_command=vm.vmm_command, monitor_pid=vm.monitor_pid,
        vmm_pid=vm.vmm_pid, created_at=vm.created_at, running_at=vm.running_at,
        ended_at=vm.ended_at, fatal=vm.fatal, channel=vm.channel, guest_cid=vm.guest_cid,
        vsock_socket=_vsock_socket(vm), backend_pid=vm.backend_pid,
        exit=json.loads(vm.exit_json) if vm.exit_json else None,
        boot=_boot_timeline(store, vm), metrics=vm.metrics,
        events=[{"time": e.time, "kind": e.kind, "value": e.value, "detail": e.detail}
                for e in store.events(vm.name)],
    )
    return out


def _vsock_socket(vm: Vm) -> str:
    if vm.channel != "vsock":
        return ""
    from host.vsock import hybrid_socket

    return str(hybrid_socket(Path(vm.run_dir)))


def _boot_timeline(store: Store, vm: Vm) -> dict[str, Any]:
    """Guest marks (kernel uptime) and host marks (seconds after VMM launch)."""
    boot = vm.boot
    launched = boot.get("launched_at") or 0.0
    host: dict[str, float] = {}
    if launched and boot.get("hello_at"):
        host["hello"] = boot["hello_at"] - launched
    if launched and boot.get("first_healthy_at"):
        host["first_healthy"] = boot["first_healthy_at"] - launched
    guest = dict(sorted(boot.get("timeline", {}).items(), key=lambda kv: kv[1]))
    return {"guest_uptime_s": guest, "host_since_launch_s": host,
            "agent": boot.get("agent", ""), "boot_id": boot.get("boot_id", "")}


def _print_show(info: dict[str, Any]) -> None:
    skip = {"events", "boot", "metrics", "exit", "cmdline", "fatal"}
    for key, value in info.items():
        if key in skip:
            continue
        if key.endswith("_at"):
            value = _when(value)
        elif key == "uptime_s":
            key, value = "uptime", _duration(value)
        print(f"{key + ':':13} {value}")
    if info["exit"]:
        print(f"{'exit:':13} {json.dumps(info['exit'])}")
    if info["fatal"]:
        print(f"{'fatal:':13} {info['fatal']}")
    print(f"{'cmdline:':13} {info['cmdline']}")
    _print_boot(info["boot"])
    print("history:")
    for e in info["events"]:
        detail = f"  {e['detail']}" if e["detail"] else ""
        print(f"  {_when(e['time'])}  {e['kind']:9} {e['value']}{detail}")


def _print_boot(boot: dict[str, Any]) -> None:
    print("boot timeline:")
    for mark, t in boot["guest_uptime_s"].items():
        print(f"  guest {mark:24} {t * 1000:9.1f} ms (kernel uptime)")
    for mark, t in boot["host_since_launch_s"].items():
        print(f"  host  {mark:24} {t * 1000:9.1f} ms after VMM launch")


def _parse_since(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(text[:-1]) * units[text[-1]]
    try:
        return float(text)
    except ValueError:
        pass
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise VolarError(f"--since {text!r}: expected 30s, 5m, 2h, 1d, a unix time "
                         "or an ISO timestamp") from None


def _logs(store: Store, args: argparse.Namespace) -> None:
    vm = store.vm(args.name)
    since = _parse_since(args.since) if args.since else 0.0
    last = 0
    out = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    while True:
        for seq, stream, data, _t in store.logs(vm.name, after_seq=last, since=since):
            target = out.get(stream, sys.stdout.buffer)
            target.write(data)
            target.flush()
            last = seq
        if not args.follow or vm.status in TERMINAL:
            return
        time.sleep(0.2)
        reconcile(store, [vm.name])
        vm = store.vm(args.name)  # a final status still gets one more drain


def _stats(store: Store, vm: Vm) -> dict[str, Any]:
    return {"name": vm.name, "status": vm.status, "health": vm.health,
            "uptime_s": vm.uptime, "boot": _boot_timeline(store, vm), "metrics": vm.metrics,
            "memory_mb": vm.memory_mb, "cpus": vm.cpus}


def _print_stats(s: dict[str, Any]) -> None:
    print(f"VM {s['name']}: {s['status']}, health {s['health'] or '-'}, "
          f"uptime {_duration(s['uptime_s'])}")
    _print_boot(s["boot"])
    m = s["metrics"]
    if not m:
        print("metrics: none received yet")
        return
    mib = 1024 * 1024
    print(f"workload RSS:  {m['workload_rss'] / mib:.1f} MiB")
    print(f"workload CPU:  {m['workload_cpu_s']:.2f} s")
    print(f"agent RSS:     {m['agent_rss'] / mib:.1f} MiB")
    used = m["mem_total"] - m["mem_available"]
    print(f"guest memory:  {used / mib:.1f} MiB used of {m['mem_total'] / mib:.1f} MiB "
          f"(VM size {s['memory_mb']} MiB)")
    print(f"reaped:        {m['reaped']}")
    print(f"as of:         {_when(m['at'])} (guest uptime {m['uptime']:.1f} s)")


# Commands that act on what is running settle VMs whose monitor died first.
RECONCILING = ("list", "show", "stats", "logs", "console", "exec", "shell", "stop", "delete")


def cmd_vms(store: Store, args: argparse.Namespace) -> int:
    a = args.action
    if a in RECONCILING:
        reconcile(store, None if a == "list" else [args.name])
    if a == "create":
        lifecycle.create(
            store, args.name, plugin=args.plugin, cpu=args.cpu, memory=args.memory,
            kernel=args.kernel, vmm=args.vmm, port=args.port, boot_timeout=args.timeout,
            say=args.output.step, channel=args.channel,
            debug_shell=args.debug_shell, network=args.network,
        )
    elif a == "list":
        vms = store.vms()
        if args.json:
            _print_json([_vm_summary(v) for v in vms])
        else:
            print(_table([(v.name, v.plugin, v.ip or v.address or "-", v.status, str(v.cpus),
                           f"{v.memory_mb}MB", _duration(v.uptime)) for v in vms],
                         ("NAME", "PLUGIN", "ADDRESS", "STATE", "CPU", "MEM", "UPTIME")))
    elif a == "show":
        info = _vm_show(store, store.vm(args.name))
        _print_json(info) if args.json else _print_show(info)
    elif a == "stats":
        s = _stats(store, store.vm(args.name))
        _print_json(s) if args.json else _print_stats(s)
    elif a == "logs":
        _logs(store, args)
    elif a == "console":
        from host import console

        return console.run(store, args)
    elif a in ("exec", "shell"):
        from host import execcli

        return (execcli.cmd_exec if a == "exec" else execcli.cmd_shell)(store, args)
    elif a == "stop":
        vm = lifecycle.stop(store, args.name, grace=args.grace)
        args.output.step(f"VM {vm.name} {vm.status}" + (f": {vm.detail}" if vm.detail else ""))
    elif a == "delete":
        lifecycle.delete(store, args.name)
        args.output.step(f"VM {args.name} deleted")
    return 0


def cmd_kernel(store: Store, args: argparse.Namespace) -> int:
    from host import kernel

    try:
        if args.action == "fetch":
            info = kernel.fetch_kernel(flavour=args.flavour, output=args.output)
        else:
            found = kernel.current_kernel()
            if found is None:
                raise VolarError("no kernel fetched yet: run `volar kernel fetch`")
            info = found
    except kernel.KernelError as exc:
        raise VolarError(f"kernel: {exc}") from None
    if getattr(args, "json", False):
        _print_json({"release": info.release, "package": info.package, "version": info.version,
                     "vmlinux": str(info.vmlinux), "modules": str(info.modules)})
    else:
        print(f"release:  {info.release}\npackage:  {info.package} {info.version}\n"
              f"vmlinux:  {info.vmlinux}\nmodules:  {info.modules}")
    return 0


def cmd_agent(store: Store, args: argparse.Namespace) -> int:
    """A host end for a kestrel run outside a VM (kestrel.channel=unix:PATH)."""
    del store
    from host import receiver

    return receiver.main([str(args.socket)])


GROUPS = {"plugins": "install and manage plugins", "vms": "create and manage microVMs",
          "kernel": "the guest kernel", "agent": "talk to a kestrel outside a VM"}


def _plugins_parser(pl: Any) -> None:
    inst = pl.add_parser("install", help="install a plugin from its manifest")
    inst.add_argument("--manifest", help="manifest file path or URL")
    inst.add_argument("--url", help="manifest URL")
    inst.add_argument("--force", action="store_true", help="replace an installed plugin")
    pl.add_parser("list").add_argument("--json", action="store_true")
    show = pl.add_parser("show")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    rm = pl.add_parser("remove")
    rm.add_argument("name")
    rm.add_argument("--force", action="store_true", help="even if VMs use it")
    for verb in ("enable", "disable"):
        pl.add_parser(verb).add_argument("name")


def _vms_parser(vm: Any) -> None:
    c = vm.add_parser("create", help="boot a VM from a plugin")
    c.add_argument("name")
    c.add_argument("--plugin", required=True)
    c.add_argument("--cpu", type=int)
    c.add_argument("--memory", type=int, help="MB")
    c.add_argument("--kernel")
    c.add_argument("--vmm", help="qemu (default) or cloud-hypervisor")
    c.add_argument("--port", type=int, default=0, help="host port for the workload (0: any)")
    c.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for kestrel")
    c.add_argument("--channel", choices=("vsock", "serial"),
                   help="how kestrel talks to volar: vsock (default) or virtio-serial (QEMU)")
    c.add_argument("--network", choices=("user", "bridge"),
                   help="user (QEMU's default: the workload's port on 127.0.0.1) or bridge "
                   "(as root: a tap on vbr0 and an address from 192.168.127.0/24)")
    c.add_argument("--debug-shell", action="store_true", help="kestrel runs an unauthenticated "
                   "root shell on the serial console (`vms console NAME`)")
    vm.add_parser("list").add_argument("--json", action="store_true")
    for verb in ("show", "stats"):
        sp = vm.add_parser(verb)
        sp.add_argument("name")
        sp.add_argument("--json", action="store_true")
    lg = vm.add_parser("logs", help="the workload's output")
    lg.add_argument("name")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("--since", help="30s, 5m, 2h, a unix time or an ISO timestamp")
    st = vm.add_parser("stop")
    st.add_argument("name")
    st.add_argument("--grace", type=float, default=10.0, help="seconds for the workload")
    vm.add_parser("delete").add_argument("name")
    ex = vm.add_parser("exec", help="run a command in a running VM (docker exec style)")
    ex.add_argument("-i", "--interactive", action="store_true", help="send stdin")
    ex.add_argument("-t", "--tty", action="store_true", help="a terminal for the command")
    ex.add_argument("-e", "--env", action="append", metavar="K=V")
    ex.add_argument("-w", "--workdir", default="/", metavar="DIR")
    ex.add_argument("-u", "--user", default="", metavar="UID[:GID]")
    ex.add_argument("name")
    ex.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG]...")
    sh = vm.add_parser("shell", help="an interactive /bin/sh in a running VM")
    sh.add_argument("name")
    sh.add_argument("--shell", default="/bin/sh", help="the shell's path in the image")
    co = vm.add_parser("console", help="attach to the serial console (Ctrl-] detaches); "
                       "prints its log with --log or when not on a terminal")
    co.add_argument("name")
    co.add_argument("--log", action="store_true", help="print the console log instead")
    co.add_argument("-f", "--follow", action="store_true", help="with the log: keep printing")


def _kernel_parser(k: Any) -> None:
    kf = k.add_parser("fetch", help="download Debian's kernel package")
    kf.add_argument("--flavour", default="cloud-amd64")
    k.add_parser("show").add_argument("--json", action="store_true")


def _agent_parser(a: Any) -> None:
    li = a.add_parser("listen", help="serve kestrel's protocol on a unix socket and print "
                      "every record as one JSON object per line, acking like the real host")
    li.add_argument("socket", type=Path)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; only the group named in ``argv`` gets its subcommands built.

    argparse spends ~1 ms per sub-parser (gettext lookups): building all of
    them tripled the cost of `volar vms list`. No group named: build all.
    """
    wanted = next((a for a in argv if a in GROUPS), None)
    p = argparse.ArgumentParser(prog="volar", description="Run kestrel microVMs.")
    p.add_argument("--state-dir", type=Path, help="default: $VOLAR_STATE_DIR, "
                   "/var/lib/volar as root, else ~/.local/share/volar")
    # Only for --help: kestrel.cliout.split_verbosity takes them out of argv first,
    # wherever they are, as fledge does.
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors and data")
    p.add_argument("-v", "--verbose", action="store_true", help="print every detail")
    groups = p.add_subparsers(dest="group", required=True)
    builders = {"plugins": _plugins_parser, "vms": _vms_parser, "kernel": _kernel_parser,
                "agent": _agent_parser}
    for name, help_text in GROUPS.items():
        sub = groups.add_parser(name, help=help_text)
        if wanted in (None, name):
            builders[name](sub.add_subparsers(dest="action", required=True))
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        verbosity, argv = split_verbosity(sys.argv[1:] if argv is None else argv)
    except VerbosityError as exc:
        print(f"volar: {exc}", file=sys.stderr)
        return 2
    args = build_parser(argv).parse_args(argv)
    args.output = Output(verbosity=verbosity)  # host/ modules say all through it
    try:
        store = Store(args.state_dir or default_state_dir())
        handler = {"plugins": cmd_plugins, "vms": cmd_vms, "kernel": cmd_kernel,
                   "agent": cmd_agent}[args.group]
        return handler(store, args)
    except (VolarError, ManifestError) as exc:
        print(f"volar: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
