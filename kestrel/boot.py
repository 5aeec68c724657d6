"""Early boot: mounts, loopback, hostname, eth0, and the switch into a rootfs.

Everything here runs before the workload is spawned (except eth0, which the
agent configures once the device appears), so it uses only C-backed modules
and skips whatever the shim or the kernel already did.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kestrel.cmdline import IpConfig

# <sys/mount.h>
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8

# (target, fstype, source, flags, data, mode, required): the mounts a
# workload expects, the same table as shim/init.c's (tests/test_shim_table.py
# holds them equal). Flags follow Volant's stage 2 and systemd's defaults.
# A mode of 0: the directory lives on sysfs, never created. Not required: a
# failure is only reported (a kernel without cgroup2 still runs workloads).
MOUNTS = (
    ("/proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "", 0o555, True),
    ("/sys", "sysfs", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "", 0o555, True),
    ("/dev", "devtmpfs", "devtmpfs", MS_NOSUID, "mode=0755", 0o755, True),
    # newinstance: a private pty namespace; gid 5 is "tty" in Debian and
    # busybox images; ptmxmode lets non-root workloads open /dev/pts/ptmx.
    ("/dev/pts", "devpts", "devpts", MS_NOSUID | MS_NOEXEC,
     "mode=0620,gid=5,ptmxmode=0666,newinstance", 0o755, True),
    ("/dev/shm", "tmpfs", "shm", MS_NOSUID | MS_NODEV, "mode=1777", 0o1777, True),
    ("/run", "tmpfs", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", 0o755, True),
    ("/tmp", "tmpfs", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", 0o1777, True),
    ("/sys/fs/cgroup", "cgroup2", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, "", 0, False),
)

# The tops of that table: anything an image puts beneath them is hidden at
# boot (fledge refuses such mappings).
BOOT_MOUNTED = tuple(t for t, *_ in MOUNTS if not any(t.startswith(o + "/") for o, *_ in MOUNTS))


def mounted() -> dict[str, str]:
    """Mount point -> filesystem type, from /proc/self/mountinfo (last one wins)."""
    table: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            data = f.read()
    except OSError:
        return table
    for line in data.decode("utf-8", "replace").splitlines():
        # 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw
        left, _, right = line.partition(" - ")
        parts = left.split()
        if len(parts) >= 5 and right:
            table[parts[4].replace("\\040", " ")] = right.split()[0]
    return table


def ensure_mounts() -> list[str]:
    """Mount what is missing; return what was mounted (for the boot log)."""
    have = mounted()
    done: list[str] = []
    for target, fstype, source, flags, data, mode, required in MOUNTS:
        if have.get(target) == fstype:
            continue  # e.g. the shim's, or a test's bind mount over /proc/cmdline
        from kestrel import sysapi

        if not required:
            try:
                sysapi.mount(source, target, fstype, flags, data)
                done.append(target)
            except OSError as exc:
                done.append(f"{target} (failed: {exc.strerror or exc})")
            continue
        if mode:
            os.makedirs(target, mode=mode, exist_ok=True)
        # /run and /tmp start empty on every boot, as under systemd: files an
        # image ships there (stale pid files, sockets) are hidden, not reused.
        # fledge refuses such mappings; a rootfs may still have some: say so.
        try:
            hidden = len(os.listdir(target)) if fstype == "tmpfs" else 0
        except OSError:
            hidden = 0
        sysapi.mount(source, target, fstype, flags, data)
        done.append(f"{target} (over {hidden} entries of the image's)" if hidden else target)
        if target == "/proc":
            have = mounted()
    return done


# <linux/sockios.h>, <net/if.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFADDR = 0x8915
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCADDRT = 0x890B
IFF_UP = 0x1
RTF_UP = 0x1
RTF_GATEWAY = 0x2


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    # struct ifreq: 16-byte name, then a 24-byte union.
    return name.encode()[:15].ljust(16, b"\0") + payload.ljust(24, b"\0")


def _sockaddr_in(addr: str) -> bytes:
    import _socket

    return (2).to_bytes(2, "little") + b"\0\0" + _socket.inet_aton(addr) + b"\0" * 8


def link_up(name: str) -> None:
    """Set IFF_UP on an interface (loopback before the workload binds to it)."""
    import _socket
    import fcntl

    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        flags = int.from_bytes(fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, _ifreq(name))[16:18], "little")
        if not flags & IFF_UP:
            up = (flags | IFF_UP).to_bytes(2, "little")
            fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, _ifreq(name, up))
    finally:
        s.close()


def has_ipv4(name: str) -> bool:
    import _socket
    import fcntl

    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        fcntl.ioctl(s.fileno(), SIOCGIFADDR, _ifreq(name))
        return True
    except OSError:
        return False
    finally:
        s.close()


def configure_ipv4(name: str, address: str, netmask: str, gateway: str) -> None:
    """What the kernel's ip= autoconfiguration does (Debian builds without it)."""
    import _socket
    import fcntl
    import struct

    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        fd = s.fileno()
        fcntl.ioctl(fd, SIOCSIFADDR, _ifreq(name, _sockaddr_in(address)))
        fcntl.ioctl(fd, SIOCSIFNETMASK, _ifreq(name, _sockaddr_in(netmask)))
        link_up(name)
        if gateway:
            # struct rtentry (x86_64): pad, dst, gateway, genmask, flags, ...
            rt = struct.pack(
                "L16s16s16sH",
                0,
                _sockaddr_in("0.0.0.0"),
                _sockaddr_in(gateway),
                _sockaddr_in("0.0.0.0"),
                RTF_UP | RTF_GATEWAY,
            ).ljust(120, b"\0")
            try:
                fcntl.ioctl(fd, SIOCADDRT, rt)
            except FileExistsError:
                pass
    finally:
        s.close()


def setup_ipv4(ip: IpConfig) -> str:
    """Apply ``ip=`` once its device exists; a line for the console, "" if nothing to do.

    Called right after the spawn (the shim has usually loaded virtio_net by
    then) and again by the agent, which waits for a late device.
    """
    if not os.path.exists(f"/sys/class/net/{ip.device}") or has_ipv4(ip.device):
        return ""
    try:
        configure_ipv4(ip.device, ip.address, ip.netmask, ip.gateway)
    except OSError as exc:
        return f"network: {ip.device}: {exc}"
    return f"{ip.device} {ip.address}/{ip.netmask} via {ip.gateway or '-'}"


def set_hostname(name: str) -> None:
    import _socket

    _socket.sethostname(name)


def rootfs_device(*, boot: str, cmdline_device: str, manifest_has_rootfs: bool) -> str | None:
    """The device to pivot into, or None to stay in the initramfs.

    Only a rootfs that the command line or the manifest names counts: a
    data or cloud-init disk at /dev/vda is not a root disk (Volant's bug).
    """
    if boot == "initramfs":
        return None
    if cmdline_device:
        return "/dev/" + cmdline_device
    if manifest_has_rootfs or boot == "rootfs":
        return "/dev/vda"
    return None


# Where the rootfs is mounted before the switch, and where the initramfs stays
# reachable afterwards: the frozen kestrel (and its libc) live there, and the
# rootfs's own libc may be anything.
NEWROOT = "/sysroot"
INITRAMFS_KEPT = "/run/kestrel/initramfs"
ROOTFS_WAIT_S = 10.0
STAGE_ENV = "KESTREL_STAGE"


# What kestrel needs from the initramfs after the switch: the frozen runtime,
# its libc and loader, and the /bin/kestrel script.
KEPT_DIRS = ("/opt/kestrel", "/lib", "/lib64", "/usr/lib", "/bin")
LOADER = "/lib64/ld-linux-x86-64.so.2"


def switch_root(device: str, fstype: str, argv: list[str]) -> None:
    """Mount ``device``, make it /, and exec kestrel again there (stage 2).

    Like switch_root(8), except kestrel's own files stay reachable under
    /run/kestrel/initramfs (bind mounts of the directories it needs) and it
    is started through the initramfs's own dynamic loader, so nothing of the
    rootfs's libc is used. Never returns.
    """
    import time

    from kestrel import sysapi

    deadline = time.monotonic() + ROOTFS_WAIT_S
    while not os.path.exists(device):
        if time.monotonic() > deadline:
            raise OSError(2, f"rootfs device {device} did not appear within {ROOTFS_WAIT_S:g} s")
        time.sleep(0.02)
    # Resolved in the initramfs, before the switch: absolute symlinks would
    # point into the rootfs afterwards.
    real_argv = [os.path.realpath(a) if a.startswith("/") and os.path.exists(a) else a
                 for a in argv]
    new_argv = [INITRAMFS_KEPT + a if a.startswith("/") and os.path.exists(a) else a
                for a in real_argv]
    loader = os.path.realpath(LOADER) if os.path.exists(LOADER) else ""
    kept = [d for d in KEPT_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    libdirs = ":".join(INITRAMFS_KEPT + d for d in (
        "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib", "/usr/lib"))
    os.makedirs(NEWROOT, exist_ok=True)
    sysapi.mount(device, NEWROOT, fstype)
    for m in ("/dev", "/proc", "/sys", "/run"):
        os.makedirs(NEWROOT + m, exist_ok=True)
        sysapi.mount(m, NEWROOT + m, "", sysapi.MS_MOVE)
    for d in kept:
        target = NEWROOT + INITRAMFS_KEPT + d
        os.makedirs(target, exist_ok=True)
        sysapi.mount(d, target, "", sysapi.MS_BIND)
    os.chdir(NEWROOT)
    sysapi.mount(".", "/", "", sysapi.MS_MOVE)
    os.chroot(".")
    os.chdir("/")
    env = dict(os.environ)
    env[STAGE_ENV] = "2"
    if loader:
        os.execve(INITRAMFS_KEPT + loader,
                  [loader, "--library-path", libdirs, *new_argv], env)
    os.execve(new_argv[0], new_argv, env)
