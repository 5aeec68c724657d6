"""volar: the host CLI's parser and dispatch, and the small plugins, kernel and
agent commands; the vms commands are in host/clivms.py.

Daemonless: each command opens the store, does its work and exits; running
VMs belong to their monitors. Errors print one line and exit non-zero.
Imports stay lean (no trio) so listing is quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from host.clifmt import print_json, table, when
from host.clivms import cmd_vms
from host.errors import VolarError
from host.state import Store, default_state_dir
from kestrel.cliout import Output, VerbosityError, split_verbosity
from kestrel.manifest import ManifestError

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
            print_json([plugins.describe(r) for r in rows])
        else:
            print(table([(r.name, r.version, r.runtime,
                           "true" if r.enabled else "false", r.strategy) for r in rows],
                         ("NAME", "VERSION", "RUNTIME", "ENABLED", "STRATEGY")))
    elif args.action == "show":
        info = plugins.describe(store.plugin(args.name))
        if args.json:
            print_json(info)
        else:
            for key in ("name", "version", "runtime", "enabled", "strategy", "source",
                        "artifact_path", "artifact_sha256"):
                print(f"{key + ':':17} {info[key]}")
            print(f"{'installed:':17} {when(info['installed_at'])}")
            print("manifest:")
            print(json.dumps(info["manifest"], indent=2))
    elif args.action == "remove":
        plugins.remove(store, args.name, force=args.force)
        args.output.step(f"Plugin {args.name} removed")
    elif args.action in ("enable", "disable"):
        plugins.set_enabled(store, args.name, args.action == "enable")
        args.output.step(f"Plugin {args.name} {args.action}d")
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
        print_json({"release": info.release, "package": info.package, "version": info.version,
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
    c.add_argument("--plugin", help="the plugin to boot (or --from-snapshot)")
    c.add_argument("--from-snapshot", metavar="DIR", help="restore a `vms snapshot` instead "
                   "of booting (its plugin, kernel and VMM must be unchanged)")
    c.add_argument("--machine", choices=("microvm", "q35"),
                   help="QEMU machine (microvm by default; q35 can be snapshotted)")
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
    sn = vm.add_parser("snapshot", help="pause a running VM, save it, let it run on")
    sn.add_argument("name")
    sn.add_argument("--out", metavar="DIR", help="default: STATE_DIR/snapshots/NAME")
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
    vm.add_parser("recover", help="give a VM whose monitor died a new one (any command that "
                  "finds it does the same)").add_argument("name")
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
    ht = vm.add_parser("http", help="an HTTP request to the VM's agent API over vsock "
                       "(/healthz; /v1/... reaches the workload); body to stdout")
    ht.add_argument("-X", "--request", metavar="METHOD", help="default GET, POST with -d")
    ht.add_argument("-d", "--data", metavar="BODY", help="request body; @FILE, @- for stdin")
    ht.add_argument("-H", "--header", action="append", metavar="'NAME: VALUE'")
    ht.add_argument("-i", "--include", action="store_true", help="print the response head")
    ht.add_argument("name")
    ht.add_argument("path", metavar="PATH", help="/healthz or /v1/<path on the workload>")
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
