"""A VM restored from a snapshot takes its own identity.

Every VM restored from one snapshot wakes with the same kernel RNG state,
a wall clock stopped at the snapshot, and the same hostname. Debian's kernel
has no vmgenid to notice, so the host says so on attach (Attach.restore_id,
with its clock, fresh entropy and the new hostname). ``plan`` decides what
to do (pure); ``apply`` makes the syscalls. Imported only on a restore.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass

from kestrel.protocol import Attach

# <linux/random.h>: RNDADDENTROPY = _IOW('R', 0x03, int[2]) takes a
# struct rand_pool_info {int entropy_count (bits); int buf_size; u32 buf[]};
# RNDRESEEDCRNG = _IO('R', 0x07) makes the CRNG take the new key now,
# instead of at its next scheduled reseed (up to 60 s away).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
URANDOM = "/dev/urandom"
# Less than a CRNG key's worth of host randomness cannot make two restored
# VMs' streams independent.
MIN_ENTROPY = 32
# Smaller corrections than this are the attach frame's own transit time
# under TCG (tens to hundreds of ms), not a clock stopped at a snapshot.
STEP_MIN_NS = 500_000_000
# A restored clock lags (it stood still in the snapshot); one ahead by less
# than this is the frame being late, and stepping it back would only make
# time run backwards for the workload.
STEP_BACK_MIN_NS = 60_000_000_000


class RestoreError(Exception):
    """The restored VM cannot be made unique; kestrel refuses to run on as a copy."""


@dataclass(frozen=True)
class RestorePlan:
    restore_id: str
    hostname: str
    entropy: bytes
    clock_step_ns: int  # 0: the clock is close enough already


def plan(attach: Attach, *, handled: str, now_ns: int) -> RestorePlan | None:
    """What this attach asks of a restored guest; None for a cold boot or a reconnect."""
    if not attach.restore_id or attach.restore_id == handled:
        return None
    if len(attach.entropy) < MIN_ENTROPY:
        raise RestoreError(
            f"restore {attach.restore_id}: the host sent {len(attach.entropy)} bytes of "
            f"entropy, at least {MIN_ENTROPY} are needed to keep restored VMs' random "
            "streams apart")
    step = attach.wall_ns - now_ns if attach.wall_ns else 0
    return RestorePlan(
        restore_id=attach.restore_id,
        hostname=attach.hostname,
        entropy=attach.entropy,
        clock_step_ns=step if step >= STEP_MIN_NS or -step >= STEP_BACK_MIN_NS else 0,
    )


def reseed(entropy: bytes, path: str = URANDOM) -> None:
    """Mix ``entropy`` into the kernel's pool, credited, and reseed the CRNG now."""
    import fcntl

    info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def apply(p: RestorePlan) -> list[str]:
    """Reseed, step the clock, take the hostname; console lines saying what was done.

    The RNG is the one thing that must not fail: two VMs sharing a random
    stream would share keys and nonces, so that is a RestoreError.
    """
    try:
        reseed(p.entropy)
    except OSError as exc:
        raise RestoreError(f"restore {p.restore_id}: cannot reseed the kernel RNG "
                           f"({exc.strerror or exc}); this VM would share its random stream "
                           "with every other VM restored from the same snapshot") from None
    done = [f"restored ({p.restore_id}): kernel RNG reseeded with "
            f"{len(p.entropy)} bytes from the host"]
    if p.clock_step_ns:
        try:
            now = time.clock_gettime_ns(time.CLOCK_REALTIME)
            time.clock_settime_ns(time.CLOCK_REALTIME, now + p.clock_step_ns)
            done.append(f"wall clock stepped by {p.clock_step_ns / 1e9:+.3f} s to the host's")
        except OSError as exc:
            done.append(f"wall clock: cannot step by {p.clock_step_ns / 1e9:+.3f} s ({exc})")
    if p.hostname and p.hostname != socket.gethostname():
        try:
            socket.sethostname(p.hostname)
            done.append(f"hostname {p.hostname!r}")
        except OSError as exc:
            raise RestoreError(f"restore {p.restore_id}: cannot take the hostname "
                               f"{p.hostname!r} ({exc.strerror or exc})") from None
    return done
