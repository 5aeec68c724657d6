"""The seed quick start, end to end: build the Caddy appliance, boot it, curl it, remove it.

Runs the documented commands (fledge build, volar plugins install, volar vms
create/list/stop/delete) with a private VOLAR_STATE_DIR under .cache/, so it
never touches anyone's VMs. Usage: python examples/caddy/demo.py [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORK = ROOT / ".cache" / "caddy-demo"
VM = "caddy-demo"
EXPECTED = "Hello from Caddy in a Volant microVM!"

sys.path.insert(0, str(HERE))
from fetch_caddy import FetchError, fetch_caddy  # noqa: E402


class DemoError(RuntimeError):
    pass


def tool(name: str, module: str) -> list[str]:
    """The installed console script next to this Python, else ``python -m``."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def run(cmd: list[str], *, env: dict[str, str], capture: bool = False) -> str:
    shown = " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd))
    print(f"$ {shown}", flush=True)
    done = subprocess.run(cmd, env=env, cwd=ROOT, text=True, check=False,
                          stdout=subprocess.PIPE if capture else None)
    if done.returncode != 0:
        raise DemoError(f"{shown} failed with status {done.returncode}")
    return done.stdout or ""


def get_until_ok(url: str, *, deadline: float, alive: Callable[[], None] = lambda: None) -> str:
    """GET ``url`` until it answers 200; the workload may still be starting.

    ``alive()`` raises when the VM is gone, so a crash fails fast.
    """
    last = "no attempt"
    while time.monotonic() < deadline:
        alive()
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body: bytes = r.read()
                if r.status == 200:
                    return body.decode(errors="replace")
                last = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.25)
    raise DemoError(f"{url} did not answer 200 in time (last: {last})")


def demo(*, work: Path = WORK, keep: bool = False, timeout: float = 240.0) -> str:
    """Run the walkthrough in ``work`` (state, manifest copy, image); return Caddy's answer."""
    env = dict(os.environ)
    env["VOLAR_STATE_DIR"] = str(work / "state")
    env.setdefault("KESTREL_KERNEL_DIR", str(ROOT / ".cache" / "kernel"))
    volar = tool("volar", "host.cli")
    fledge = tool("fledge", "builder.cli")

    print("== 1. payload: upstream's static caddy", flush=True)
    fetch_caddy()
    # The manifest is copied so the build's checksum lands in .cache, not in git;
    # its relative initramfs url (../plugin.cpio.gz) still points at the build.
    manifest = work / "manifest" / "caddy.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "manifest" / "caddy.json", manifest)

    print("== 2. fledge build", flush=True)
    run([*fledge, "build", "-c", str(HERE / "fledge.toml"), "-o", str(work / "plugin.cpio.gz"),
         "--update-manifest", str(manifest), "--url", "../plugin.cpio.gz"], env=env)
    checksum = json.loads(manifest.read_text())["initramfs"].get("checksum", "")
    print(f"   manifest checksum: {checksum}")

    print("== 3. install the plugin", flush=True)
    run([*volar, "plugins", "install", "--manifest", str(manifest), "--force"], env=env)
    run([*volar, "plugins", "list"], env=env)

    print("== 4. create the microVM", flush=True)
    subprocess.run([*volar, "vms", "delete", VM], env=env, cwd=ROOT, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # a previous run's
    started = time.monotonic()
    try:
        run([*volar, "vms", "create", VM, "--plugin", "caddy", "--cpu", "1", "--memory", "512"],
            env=env)
        run([*volar, "vms", "list"], env=env)
        info = json.loads(run([*volar, "vms", "show", VM, "--json"], env=env, capture=True))
        address = info.get("address") or ""
        if not address:
            raise DemoError(f"volar reports no address for {VM} (status {info.get('status')})")

        print(f"== 5. curl http://{address}/", flush=True)
        def alive() -> None:
            out = subprocess.run([*volar, "vms", "show", VM, "--json"], env=env, cwd=ROOT,
                                 capture_output=True, text=True, check=False).stdout
            info = json.loads(out) if out.strip() else {}
            if info.get("status") in ("stopped", "crashed", "failed"):
                raise DemoError(f"{VM} is {info.get('status')}: {info.get('detail') or ''}"
                                f"{info.get('fatal') or ''} (see volar vms console {VM})")

        answer = get_until_ok(f"http://{address}/", deadline=started + timeout, alive=alive)
        print(answer.strip())
        print(f"   (first answer {time.monotonic() - started:.1f} s after vms create)")
        if EXPECTED not in answer:
            raise DemoError(f"unexpected answer {answer!r}")
        return answer
    finally:
        if not keep:
            print("== 6. stop and delete", flush=True)
            for verb in ("stop", "delete"):
                subprocess.run([*volar, "vms", verb, VM], env=env, cwd=ROOT, check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="leave the VM running")
    args = ap.parse_args()
    try:
        demo(keep=args.keep)
    except (DemoError, FetchError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
