"""kestrel's entry point: the boot path up to the workload's exec, then the agent.

Budget: the workload must not wait for trio. Until ``spawn`` returns this
module and its helpers import only C-backed modules (os, time, _signal,
binascii, zlib, _json) and kestrel's boot-path modules. PID 1 never returns:
every path, an unexpected exception included, ends in a console line, sync
and reboot(RB_POWER_OFF): an init that exits panics the kernel.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kestrel.cmdline import Channel

# Blocked from the start so none is lost before the agent's handlers exist
# (PID 1 silently drops signals it has no handler for); the workload gets an
# empty mask from posix_spawn. Numbers from signal(7), x86_64.
_BLOCKED = (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 14, 15, 16, 17, 18, 20, 21, 22, 23, 24, 25,
            26, 27, 28, 29, 30, 31)
_SIG_BLOCK = 0


def _console(line: str) -> None:
    try:
        os.write(2, (line + "\n").encode(errors="replace"))
    except OSError:
        pass


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip().decode()
    except OSError:
        return ""


def main() -> None:
    t0 = time.clock_gettime(time.CLOCK_BOOTTIME)
    _single_read_zipimport()
    if os.getpid() != 1:
        _console("kestrel: refusing to start: not PID 1 (kestrel powers the machine off "
                 "when its workload ends; run it as a VM's init or in a PID namespace)")
        raise SystemExit(2)
    status = 0
    try:
        status = _main(t0)
    except BaseException as exc:  # PID 1 must outlive every bug: report, then power off
        _console(f"KESTREL PANIC: internal error: {type(exc).__name__}: {exc}")
        try:
            import traceback

            traceback.print_exc()
        except BaseException:
            pass
        status = 1
    finally:
        _poweroff(status)


def _single_read_zipimport() -> None:
    """Make the frozen bundle's zip importer read and unmarshal each module once.

    CPython 3.11's zipimporter answers get_filename() (asked while building
    every module's spec) by loading the module's code, then loads it again to
    run it: every import from python311.zip costs two reads and two unmarshals.
    The file name is the TOC entry's path; the TOC needs no code.
    (-15% import time for the agent, measured on the frozen bundle.)
    """
    import zipimport

    if not isinstance(globals().get("__loader__"), zipimport.zipimporter):
        return  # not frozen: modules come from files, nothing to fix
    search = getattr(zipimport, "_zip_searchorder", None)
    if not search:
        return  # another CPython: leave its importer alone

    def get_filename(self: zipimport.zipimporter, fullname: str) -> str:
        path = self.prefix + fullname.rpartition(".")[2]
        files = self._files  # type: ignore[attr-defined]
        for suffix, _bytecode, _package in search:
            entry = files.get(path + suffix)
            if entry is not None:
                return str(entry[0])
        raise zipimport.ZipImportError(f"can't find module {fullname!r}", name=fullname)

    zipimport.zipimporter.get_filename = get_filename  # type: ignore[method-assign]


def _main(t0: float) -> int:
    import _signal  # type: ignore[import-not-found]  # C module: `signal` imports enum

    _signal.pthread_sigmask(_SIG_BLOCK, _BLOCKED)
    from kestrel import boot, spawn
    from kestrel.cmdline import BootConfig, Channel, CmdlineError, boot_config, parse_cmdline
    from kestrel.manifest import ManifestError, load_manifest

    spawn.seal_inherited_fds()
    fatal: str | None = None
    # Until the command line is understood there is no channel: a fatal
    # report goes only where the command line explicitly says (never to the
    # vsock default, which on a machine that is not our VM reaches a stranger).
    cfg = BootConfig(None, channel=Channel("none"))
    manifest = None
    mounted = boot.ensure_mounts()
    with open("/proc/cmdline", "rb") as f:
        text = f.read().decode("utf-8", "replace")
    try:
        cfg = boot_config(text)
        if cfg.manifest_json is None:
            fatal = "no volant.manifest on the kernel command line"
        else:
            manifest = load_manifest(cfg.manifest_json)
            if manifest.workload is None:
                fatal = "manifest: workload: is required for kestrel to start anything"
    except CmdlineError as exc:
        fatal = str(exc)
        cfg = BootConfig(None, channel=_explicit_channel(parse_cmdline(text)))
    except ManifestError as exc:
        fatal = str(exc)
    if fatal is None and manifest is not None and os.environ.get(boot.STAGE_ENV) != "2":
        device = boot.rootfs_device(boot=cfg.boot, cmdline_device=cfg.rootfs_device,
                                    manifest_has_rootfs=manifest.rootfs is not None)
        if device is not None:
            import sys

            _console(f"kestrel: switching root to {device} ({cfg.rootfs_fstype})")
            try:
                boot.switch_root(device, cfg.rootfs_fstype, list(sys.orig_argv))
            except OSError as exc:
                fatal = f"rootfs: {exc}"
    try:
        boot.link_up("lo")
    except OSError as exc:
        _console(f"kestrel: lo: {exc}")
    if cfg.hostname:
        try:
            boot.set_hostname(cfg.hostname)
        except OSError as exc:
            _console(f"kestrel: hostname {cfg.hostname!r}: {exc}")
    child = error = None
    env: dict[str, str] = {}
    if fatal is None and manifest is not None and manifest.workload is not None:
        w = manifest.workload
        env = spawn.workload_env(dict(os.environ), cfg.env, w.env)
        try:
            child = spawn.spawn(w.entrypoint, env, w.workdir)
        except spawn.SpawnError as exc:
            error = exc
    t_exec = time.clock_gettime(time.CLOCK_BOOTTIME)
    if cfg.ip is not None and child is not None:
        # Before trio: the workload is reachable from the host only once eth0
        # has its address, and importing the agent takes seconds under TCG.
        line = boot.setup_ipv4(cfg.ip)
        if line:
            _console(f"kestrel: {line}")
    # The workload runs: from here on imports cost the agent, not the workload,
    # and the workload gets the CPU first while they run (kestrel/courtesy.py).
    from kestrel import __version__
    from kestrel.courtesy import (
        DEFERRED,
        HEALTH_CHECK_ONLY,
        NICE,
        Courtesy,
        address,
        defer_imports,
    )

    courtesy = Courtesy(address(manifest.workload.url)
                        if child is not None and manifest and manifest.workload else None)
    if child is not None:
        courtesy.start()

    _console(
        f"kestrel {__version__}: PID 1 up at {t0:.3f} s"
        + (f", mounted {' '.join(mounted)}" if mounted else "")
        + (f", workload pid {child.pid} started in {(t_exec - t0) * 1000:.1f} ms" if child else "")
    )
    if fatal is not None:
        _console(f"KESTREL PANIC: {fatal}")
    # The agent's imports (trio, attrs, h11) create ~100k objects; collecting
    # during them is wasted work (-15% import time measured), and freezing
    # them afterwards keeps every later collection from re-scanning them.
    import gc

    gc.disable()
    try:
        checked = bool(manifest and manifest.health_check and manifest.workload
                       and manifest.workload.url)
        defer_imports(DEFERRED if checked else DEFERRED + HEALTH_CHECK_ONLY)
        import trio

        if not checked:
            # trio's import leaves ~0.6 MB of garbage cycles (attrs replaces each
            # slotted class it makes); collected here, the agent's imports reuse
            # that memory instead of new arenas (-0.6 MB RSS, bench P2), and
            # gc.freeze below does not keep it for good. Only when no health
            # event waits on the agent (~7 ms native, far more under TCG); with
            # a health check Agent.heartbeat_loop frees it once startup is over.
            gc.collect()
        from kestrel import agent as agent_mod
    finally:
        courtesy.stop("imports done")  # a failed import must not leave PID 1 at nice 19
    gc.freeze()
    gc.enable()
    t_imported = time.clock_gettime(time.CLOCK_BOOTTIME)
    if courtesy.ended_by:
        _console(f"kestrel: nice {NICE} while importing the agent, until {courtesy.ended_by} "
                 f"({courtesy.ended_at - t_exec:.2f} s after the spawn)")

    timeline = {"kestrel_start": t0}
    if child is not None:
        timeline["workload_exec"] = t_exec
    if courtesy.ended_at:
        timeline["courtesy_end"] = courtesy.ended_at
    timeline["agent_imported"] = t_imported
    a = agent_mod.Agent(cfg, manifest, timeline=timeline, boot_id=_boot_id(), workload_env=env)
    return trio.run(agent_mod.run, a, child, error, fatal)


def _explicit_channel(params: dict[str, str]) -> Channel:
    from kestrel.cmdline import Channel, CmdlineError, parse_channel

    try:
        return parse_channel(params["kestrel.channel"])
    except (KeyError, CmdlineError):
        return Channel("none")


def _poweroff(status: int) -> None:
    _console(f"kestrel: powering off (status {status})")
    try:
        os.sync()
        from kestrel import sysapi

        sysapi.reboot(sysapi.RB_POWER_OFF)
    except BaseException as exc:
        _console(f"KESTREL PANIC: power-off failed: {exc}")
    # Still here (reboot refused): PID 1 must not exit, or the kernel panics.
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
