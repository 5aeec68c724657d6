"""volar's `vms` commands: what they do with the store and how they show a VM.

The parser for them is in host/cli.py; exec, shell, console and http live in
host/execcli.py, host/console.py and host/httpcli.py, imported only when run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from host import lifecycle, vmcontrol
from host.adopt import reconcile, recover
from host.clifmt import duration, print_json, table, when
from host.errors import VolarError
from host.rows import Vm
from host.state import TERMINAL, Store


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
            value = when(value)
        elif key == "uptime_s":
            key, value = "uptime", duration(value)
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
        print(f"  {when(e['time'])}  {e['kind']:9} {e['value']}{detail}")


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
          f"uptime {duration(s['uptime_s'])}")
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
    print(f"as of:         {when(m['at'])} (guest uptime {m['uptime']:.1f} s)")


# Commands that act on what is running settle VMs whose monitor died first.
RECONCILING = ("list", "show", "stats", "logs", "console", "exec", "shell", "http", "stop",
               "delete")


def cmd_vms(store: Store, args: argparse.Namespace) -> int:
    a = args.action
    if a in RECONCILING:
        reconcile(store, None if a == "list" else [args.name])
    if a == "create":
        lifecycle.create(
            store, args.name, plugin=args.plugin or "", cpu=args.cpu, memory=args.memory,
            kernel=args.kernel, vmm=args.vmm, port=args.port, boot_timeout=args.timeout,
            say=args.output.step, channel=args.channel,
            debug_shell=args.debug_shell, network=args.network, machine=args.machine,
            from_snapshot=args.from_snapshot,
        )
    elif a == "snapshot":
        where, size, seconds = vmcontrol.take_snapshot(store, args.name, out=args.out)
        args.output.step(f"Snapshot of {args.name} in {where}: {size / 1e6:.1f} MB, "
                         f"{seconds:.2f} s paused (the VM runs on)")
    elif a == "list":
        vms = store.vms()
        if args.json:
            print_json([_vm_summary(v) for v in vms])
        else:
            print(table([(v.name, v.plugin, v.ip or v.address or "-", v.status, str(v.cpus),
                           f"{v.memory_mb}MB", duration(v.uptime)) for v in vms],
                         ("NAME", "PLUGIN", "ADDRESS", "STATE", "CPU", "MEM", "UPTIME")))
    elif a == "show":
        info = _vm_show(store, store.vm(args.name))
        print_json(info) if args.json else _print_show(info)
    elif a == "stats":
        s = _stats(store, store.vm(args.name))
        print_json(s) if args.json else _print_stats(s)
    elif a == "logs":
        _logs(store, args)
    elif a == "console":
        from host import console

        return console.run(store, args)
    elif a == "http":
        from host import httpcli

        return httpcli.cmd_http(store, args)
    elif a in ("exec", "shell"):
        from host import execcli

        return (execcli.cmd_exec if a == "exec" else execcli.cmd_shell)(store, args)
    elif a == "stop":
        vm = vmcontrol.stop(store, args.name, grace=args.grace)
        args.output.step(f"VM {vm.name} {vm.status}" + (f": {vm.detail}" if vm.detail else ""))
    elif a == "delete":
        vmcontrol.delete(store, args.name)
        args.output.step(f"VM {args.name} deleted")
    elif a == "recover":
        args.output.step(recover(store, args.name))
    return 0
