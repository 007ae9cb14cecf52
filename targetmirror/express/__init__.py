"""The express lane: runs of plain READ/WRITE commands served by a small compiled core.

Why: on the lab's emulated CPU, and on real hosts under load, a mirrored 4 KiB write costs the
Python path about 125 interpreter calls (ring parse, decode, admission, range lock, bitmap test,
two ``pwritev``, metrics, completion).  The profile says that, not the disk, is the wall
(docs/performance.md).  ``_lane.c`` does the same work in C, for one wake-up's run of commands,
with the GIL released.

When it may run is decided in Python, every time, by the layer that owns each rule:

* the ring (:meth:`targetmirror.tcmu.ring.Ring.express`): nothing of this device is in flight,
  so the lane answers every command in place, in ring order, and moves ``cmd_tail`` with it;
* the mirror (:meth:`targetmirror.mirror.mirror.Mirror.quiet`): mirrored or fully split, both
  legs healthy, no copy or verify running, no range held, the bitmap fully synced; it holds the
  admission lock across the call, so no split, rejoin or clear pass can start half-way; a
  write runs only if its bitmap bits are already set (the gate), and the regions it wrote are
  counted as touched, exactly as admission would;
* the device (:class:`targetmirror.daemon.device.MirrorCommands`): both legs are plain files or
  block devices in the page cache, the LUN is writable and its write cache on (FUA stays in
  Python).

The lane stops at the first entry it does not fully understand, or whose write would need a new
bitmap mark, or whose I/O fails; Python continues from exactly that entry, so every unusual
command, every error and every sense code still comes from the one general path.

**The wait loop** (:data:`loop`).  Given the UIO fd, the lane does not return after one drain:
it notifies the kernel once per batch and waits in ``poll`` for the next commands, in C, until
an entry needs Python, the mirror revokes its lane lease (``stop_fd``), the ring thread is
woken, or it times out.  Commands of :data:`URING_MIN` bytes or more go through io_uring when
built with liburing (both legs of a run of them in one ``io_uring_enter``).
``TARGETMIRROR_EXPRESS_LOOP=0`` keeps one drain per wake-up (the lane before the loop), and
``TARGETMIRROR_URING=0`` one call per leg, to compare.

**Fallback.**  The pure-Python path is complete on its own.  If the extension was not built (no
compiler when the package was installed) or ``TARGETMIRROR_EXPRESS=0`` is set, :data:`drain` is
None and nothing changes but speed; :data:`WHY_NOT` says why.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

drain: Callable[..., tuple[int, int, int, int, int]] | None
loop: Callable[..., tuple[int, int, int, int, int, int, int]] | None = None
uring: Callable[[], object] | None = None
HAVE_URING = False
"""True if the lane was built with liburing (batched submission, both legs in parallel)."""
URING_MIN = int(os.environ.get("TARGETMIRROR_URING_MIN", str(256 * 1024)))
"""Commands of at least this many bytes go through io_uring (both legs in parallel, a run of
them in one call); smaller ones make one ``pwritev``/``preadv`` per leg.  Measured in the lab
(benchmarks/lab_iocost.py): a page-cache write that io_uring cannot do without blocking is
handed to a kernel worker thread, which costs a 4 KiB write 2-8x the CPU of a ``pwrite``."""
WHY_NOT: str | None = None
STOP_HEAD = STOP_ENTRY = STOP_GATE = STOP_IO = STOP_FULL = STOP_CORRUPT = -1
STOP_IDLE = STOP_REVOKED = STOP_WAKE = STOP_DEVICE = -1

if os.environ.get("TARGETMIRROR_EXPRESS", "1") == "0":
    drain = None
    WHY_NOT = "disabled by TARGETMIRROR_EXPRESS=0"
else:
    try:
        from targetmirror.express import _lane  # type: ignore[attr-defined]
    except ImportError as exc:  # not built: the Python path serves everything
        drain = None
        WHY_NOT = f"the compiled lane is not built ({exc})"
    else:
        _mod: Any = _lane
        _src = os.path.join(os.path.dirname(__file__), "_lane.c")
        with contextlib.suppress(OSError):  # an installed wheel carries no source
            if os.stat(_src).st_mtime > os.stat(_mod.__file__).st_mtime:
                WHY_NOT = "the compiled lane is older than _lane.c (run: pip install -e .)"
    if WHY_NOT is not None:
        drain = None
    else:
        drain = _mod.drain
        # TARGETMIRROR_EXPRESS_LOOP=0: one drain per ring wake-up, no wait loop (to compare)
        loop = _mod.loop if os.environ.get("TARGETMIRROR_EXPRESS_LOOP", "1") != "0" else None
        uring = _mod.uring
        HAVE_URING = bool(_mod.HAVE_URING)
        STOP_HEAD, STOP_ENTRY, STOP_GATE = _mod.STOP_HEAD, _mod.STOP_ENTRY, _mod.STOP_GATE
        STOP_IO, STOP_FULL, STOP_CORRUPT = _mod.STOP_IO, _mod.STOP_FULL, _mod.STOP_CORRUPT
        STOP_IDLE, STOP_REVOKED = _mod.STOP_IDLE, _mod.STOP_REVOKED
        STOP_WAKE, STOP_DEVICE = _mod.STOP_WAKE, _mod.STOP_DEVICE

STOP_NAMES = {STOP_HEAD: "head", STOP_ENTRY: "entry", STOP_GATE: "gate", STOP_IO: "io",
              STOP_FULL: "full", STOP_CORRUPT: "corrupt", STOP_IDLE: "idle",
              STOP_REVOKED: "revoked", STOP_WAKE: "wake", STOP_DEVICE: "device"}
"""Why a run stopped, by code (for counters and tests)."""


def disable(reason: str) -> None:
    """Turn the lane off for devices served from now on (``targetmirrord --no-express``)."""
    global drain, loop, WHY_NOT
    drain = None
    loop = None
    WHY_NOT = f"disabled by {reason}"


def new_uring() -> tuple[object | None, str | None]:
    """A batched-submission handle for one lane, or (None, why not): the lane then makes one
    ``pwritev``/``preadv`` per leg.  ``TARGETMIRROR_URING=0`` turns it off at run time."""
    if uring is None or not HAVE_URING:
        return None, "the lane was built without liburing"
    if os.environ.get("TARGETMIRROR_URING", "1") == "0":
        return None, "disabled by TARGETMIRROR_URING=0"
    try:
        return uring(), None
    except OSError as exc:  # a kernel without io_uring, a seccomp filter, a sysctl
        return None, f"io_uring refused: {exc}"


def available() -> bool:
    """True if the compiled lane is loaded and enabled."""
    return drain is not None
