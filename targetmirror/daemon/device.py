"""Turn one discovered TCMU device into something that serves: images, mirror, SCSI, ring loop.

The kernel tells us the device's shape through configfs (size, block size, largest command,
unit serial) and its backing through the cfgstring in the UIO name.  A device whose cfgstring is
bad or whose images cannot be opened is still served — every command gets CHECK CONDITION
NOT READY, MANUAL INTERVENTION REQUIRED — so the initiator sees a clear state instead of
commands hanging until the kernel's timeout, and the reason is logged for the admin.
"""

from __future__ import annotations

import logging
import os
import threading
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Protocol

from targetmirror import __version__, express
from targetmirror.config import deadlines as dl
from targetmirror.config.cfgstring import (
    MirrorSpec,
    SnapshotSpec,
    VolumeSpec,
    parse,
    parse_any,
)
from targetmirror.daemon.runner import Admit, DeviceRunner, Job, PlainJob
from targetmirror.daemon.stats import OTHER, READ, WRITE, CommandStats
from targetmirror.errors import ConfigError, DeviceError, MirrorError, TargetMirrorError
from targetmirror.mirror.bitmap import DEFAULT_REGION
from targetmirror.mirror.mirror import LEG_A, WI_EXTENT, Mirror, MirrorIO, QuietPlan
from targetmirror.mirror.snapshot import SnapshotVolume, owning_split_mirror
from targetmirror.mirror.state import StateStore
from targetmirror.scsi import constants as C
from targetmirror.scsi.cdb import InquiryCdb, ParsedCdb, ReadCdb, parse_cdb
from targetmirror.scsi.extent import classify
from targetmirror.scsi.fastpath import decode_rw
from targetmirror.scsi.handler import ScsiDevice, ScsiResult
from targetmirror.scsi.identity import DeviceIdentity
from targetmirror.scsi.inquiry import inquiry
from targetmirror.scsi.iov import copy_out, iov_len
from targetmirror.scsi.sense import SenseError, build_fixed_sense
from targetmirror.store.image import open_image
from targetmirror.store.rbd import is_rbd, parse_name
from targetmirror.tcmu.ring import Ring
from targetmirror.tcmu.uio import ConfigfsDevice, UioDevice, UioInfo

log = logging.getLogger("targetmirror.device")

INLINE_MAX = 64 * 1024
"""Plain reads and writes up to this size run on the ring thread when they need not wait."""
EXPRESS_MAX = 1 << 20
"""Largest transfer the express lane serves itself (it writes the legs one after the other on
the ring thread); larger ones go to the workers, which write both legs in parallel."""
TOUCHED_MAX = 4096
"""Regions one lane run may report as written before it stops and lets the ring go on."""
LEASE_WAIT_MS = 1000
LEASE_BUDGET_NS = 1_000_000_000
"""With the mirror's lane lease (``Mirror.lane_lease``): how long the lane's wait loop may wait
for the next command, and stay in C in all, before the ring thread's Python loop runs again
(its stop check, the stuck-command watchdog's view).  A transition does not wait for either:
it writes the lease's stop_fd and the loop returns at once."""
QUIET_WAIT_MS = 20
QUIET_BUDGET_NS = 50_000_000
"""Without a lease (a mirror that only offers ``Mirror.quiet``, which holds the mirror's lock
and the range lock's guard across the call): the wait loop runs inside ``quiet``, so every
other user of those locks waits for it; these keep that wait short."""

# LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED (04/03)
_NOT_READY = ScsiResult(C.Status.CHECK_CONDITION,
                        build_fixed_sense(C.SenseKey.NOT_READY, 0x04, 0x03))


@dataclass
class ServedDevice:
    """Everything that belongs to one served device, closed together."""

    info: UioInfo
    uio: UioDevice
    runner: DeviceRunner
    mirror: Mirror | None
    reason: str | None = None
    snapshot: SnapshotVolume | None = None
    volume: int = 1
    """2 for a second LUN of a mirror served by another device (one-way cut-over): it shares
    that device's Mirror and never closes it."""
    stats: CommandStats | None = None
    """Per-command counters for the metrics endpoint (mirrors only)."""
    lane: _Lane | None = None
    """The express lane's counters (volume 1 of a mirror, when the lane is built)."""
    commands: MirrorCommands | None = None
    reason_code: str | None = None
    """The error code of ``reason`` (``config``, ``store``, ...): what kind of refusal."""

    def close(self) -> None:
        """Stop the ring loop (finishing in-flight commands), then close ring and images."""
        self.runner.stop()
        self.runner.join()
        self.uio.close()
        if self.commands is not None:
            self.commands.close()
        if self.mirror is not None and self.volume == 1:
            self.mirror.close()
        if self.snapshot is not None:
            self.snapshot.close()


def _revision() -> str:
    digits = "".join(ch for ch in __version__ if ch.isdigit())
    return (digits or "0")[:4].rjust(4, "0")


def build_snapshot(info: UioInfo, cfs: ConfigfsDevice, spec: SnapshotSpec,
                   store: StateStore | None) -> SnapshotVolume:
    """Open a split mirror's A read-only for a snapshot LUN."""
    if store is None:
        raise MirrorError("snapshot LUNs need the daemon's state store")
    if is_rbd(spec.image):
        # an RBD snapshot never changes, whatever its mirror does since: no split needed
        name = parse_name(spec.image)
        owner = next((st.name for st in store.all() if st.image_a == str(name.at(""))),
                     str(name.at("")))
    else:
        owner = owning_split_mirror(store, spec.image)
    image = open_image(spec.image, spec.ceph, readonly=True)
    try:
        return SnapshotVolume(image, cfs.size(), cfs.hw_block_size(), owner)
    except BaseException:
        image.close()
        raise


def build_mirror(info: UioInfo, cfs: ConfigfsDevice, store: StateStore | None,
                 wi_extent: int = WI_EXTENT,
                 deadlines: Mapping[str, float | int | None] | None = None) -> Mirror:
    """Open the images named by the cfgstring and shape the mirror like the kernel's device.
    ``deadlines``: the keys of :class:`~targetmirror.mirror.legs.Deadlines` the admin set
    (targetmirror/config/deadlines.py); the others keep the mirror's defaults."""
    spec = parse(info.cfgstring)
    limits = dl.build(deadlines or {})  # before any image is opened: a bad value opens none
    size = cfs.size()
    block_size = cfs.hw_block_size()
    a = open_image(spec.image_a, spec.access("a"), direct=spec.direct)
    try:
        b = open_image(spec.image_b, spec.access("b"), direct=spec.direct)
    except BaseException:
        a.close()
        raise
    try:
        mirror = Mirror(info.dev_name, a, b, size=size, block_size=block_size,
                        write_cache=True, store=store, wi_extent=wi_extent,
                        region_size=(DEFAULT_REGION if spec.region_size is None
                                     else spec.region_size), deadlines=limits)
    except BaseException:
        a.close()
        b.close()
        raise
    return mirror


def read_identity(info: UioInfo, cfs: ConfigfsDevice) -> DeviceIdentity:
    """What INQUIRY reports: LIO's unit serial and the kernel's largest command."""
    try:
        serial = cfs.unit_serial()
    except (TargetMirrorError, OSError):
        serial = ""
    return DeviceIdentity(serial=serial or info.dev_name, revision=_revision(),
                          max_transfer_blocks=cfs.hw_max_sectors())


class MirrorCommands:
    """Admission of a device's commands: SCSI semantics over the mirror, in ring order.

    On the ring thread, :meth:`admit` computes the bytes a command may write (a pure CDB
    parse) and admits it to the mirror with its tag, which takes its range-lock ticket in ring
    order; the returned job runs on a worker.

    The :class:`ScsiDevice` is built when the first command arrives: rtslib enables a device
    (which is when we learn of it) *before* it writes the unit serial, so reading the identity
    at attach time races with the creator; the first command only comes after the LUN is
    exported and an initiator logged in.
    """

    def __init__(self, mirror: Mirror, identity: Callable[[], DeviceIdentity],
                 volume: int = 1) -> None:
        self._identity = identity
        self._mirror = mirror
        self._volume = volume
        self._scsi: ScsiDevice | None = None
        self._max_blocks = 0
        self._lock = threading.Lock()
        self.stats = CommandStats()

        self.lane = _Lane(self.stats) if express.available() and volume == 1 else None
        """The express lane of this device (None: not built, disabled, or not volume 1)."""
        if volume != 1:
            # The lane bypasses admission; a second LUN's commands must never wait behind it.
            mirror.lane.attach_other()

    def close(self) -> None:
        """The device stops being served (after its ring loop has stopped)."""
        if self._volume != 1:
            self._mirror.lane.detach_other()

    def commit(self) -> None:
        """Once per ring batch, before it runs: one sync for the bits admission marked."""
        self._mirror.commit_marks()

    def express(self, ring: Ring, uio_fd: int = -1, wake_fd: int = -1) -> tuple[int, bool]:
        """Before a batch is fetched: let the compiled lane serve what it can, straight from
        the ring; return how many commands it answered and whether the kernel still has to
        be notified of some of them (see ``targetmirror/express``).

        With ``uio_fd`` the lane's wait loop keeps serving, notifying once per batch and
        waiting for the next commands in C, until an entry needs Python, the mirror revokes
        the lane, ``wake_fd`` (the ring thread's own) is kicked, or it times out.  The mirror's
        lane lease (``Mirror.lane_lease``: no lock held while it is out, revoked by every
        transition) says what it may do; a mirror without one lends its plan through
        ``Mirror.quiet`` for a short wait (``QUIET_BUDGET_NS``).

        Called once per ring wake-up, so it is kept to a few operations: the lane's fixed
        parameters are set once, when the first command has built the SCSI device."""
        lane = self.lane
        if lane is None or self._scsi is None:  # the first command builds the SCSI device
            return 0, False
        m = self._mirror
        if lane.ring is not ring:
            lane.write_protected = self._scsi.write_protected
            lane.max_bytes = min(EXPRESS_MAX, self._max_blocks * m.block_size)
            lane.geometry = (m.block_size, m.num_blocks)
            lane.ring = ring
        lease_of = getattr(m, "lane_lease", None)
        if lease_of is None or uio_fd < 0 or express.loop is None:
            if uio_fd < 0 or express.loop is None:
                served = m.quiet(1, lane.serve)
                return served, served > 0
            lane.wait = (uio_fd, -1, wake_fd, QUIET_WAIT_MS, QUIET_BUDGET_NS, None)
            try:
                served = m.quiet(1, lane.serve)
            finally:
                lane.wait = None
            return served, lane.unnotified
        lease = lease_of(1)
        if lease is None:
            return 0, False
        served = 0
        touched: Sequence[int] = ()
        try:
            lane.wait = (uio_fd, lease.stop_fd, wake_fd, LEASE_WAIT_MS, LEASE_BUDGET_NS,
                         lease.io_clock)
            served, touched = lane.serve(lease.plan)
        finally:
            lane.wait = None
            lease.release(served, touched)
        return served, lane.unnotified

    def _device(self) -> ScsiDevice:
        scsi = self._scsi
        if scsi is None:
            with self._lock:
                if self._scsi is None:
                    self._scsi = ScsiDevice(self._mirror, self._identity())
                    self._max_blocks = self._scsi.identity.max_transfer_blocks
                scsi = self._scsi
        return scsi

    def admit(self, cdb: bytes, iov: list[memoryview], tag: int) -> Job:
        mirror = self._mirror
        scsi = self._device()  # before admission: if this raises, nothing was taken
        bs = mirror.block_size
        volume = self._volume
        plain = decode_rw(cdb, iov, mirror.num_blocks, bs, self._max_blocks)
        if plain is not None:  # the common case, see targetmirror/scsi/fastpath.py
            write, offset, length, fua = plain
            extent = (offset, offset + length) if write else None
            io = (mirror.admit(tag, extent) if volume == 1
                  else mirror.admit(tag, extent, volume))
            # Small, no flush, not waiting for a range, legs in the page cache: cheaper to run
            # on the ring thread than to hand to a worker (see DeviceRunner).  Its bitmap bits
            # were marked at admission and are made durable once for the whole batch.
            inline = (length <= INLINE_MAX and not fua and io.ready
                      and mirror.a.fast and mirror.b.fast)
            return _PlainJob(scsi, cdb, write, offset, length, iov, fua, io, inline,
                             self.stats)
        parsed, extent = classify(cdb, iov, bs)
        io = (mirror.admit(tag, extent) if volume == 1
              else mirror.admit(tag, extent, volume))
        return _MirrorJob(scsi, cdb, iov, io, parsed, extent, self.stats)


class _Lane:
    """One device's express lane: preallocated buffers and the call into ``_lane.drain``.

    :meth:`serve` is what :meth:`Mirror.quiet` calls with the mirror held still; it offers the
    ring to the lane (:meth:`Ring.express`, which checks nothing is in flight) and hands back
    the regions written.  Counters say how often it ran and why it stopped.
    """

    __slots__ = ("_bounds", "_bytes_off", "_drain", "_loop", "_ntouched", "_plan", "_shard",
                 "_stride", "_touched", "_uring",
                 "errno", "geometry", "max_bytes", "notifies", "ring", "runs", "served", "stops",
                 "unnotified", "uring_min", "uring_why_not", "wait", "write_protected")

    def __init__(self, stats: CommandStats) -> None:
        drain = express.drain
        assert drain is not None, "a lane is only built when the extension is available"
        self._drain = drain
        self._loop = express.loop
        self._uring: object | None = None
        self.uring_min = express.URING_MIN
        self.uring_why_not: str | None = "not tried yet"
        """Why the lane makes one call per leg instead of batched io_uring submission (None:
        it batches)."""
        self.wait: tuple[int, int, int, int, int, object | None] | None = None
        """(uio_fd, stop_fd, wake_fd, timeout_ms, budget_ns, io_clock) for the next
        :meth:`serve`: the wait loop; None: one drain of what is queued."""
        self.unnotified = False
        """The last run left answers in the ring the kernel was not told of."""
        self.notifies = 0
        self.errno = 0
        self._shard = stats.array_shard()
        self._bounds, self._stride, self._bytes_off = stats.layout()
        self._touched = array("Q", bytes(8 * TOUCHED_MAX))
        self._plan: QuietPlan | None = None
        self.ring: Ring | None = None
        self.write_protected = False
        self.max_bytes = 0
        self.geometry = (512, 0)
        self.runs = 0
        self.served = 0
        self.stops = [0] * len(express.STOP_NAMES)
        """How many runs stopped for each reason (``express.STOP_NAMES`` by code)."""

    def serve(self, plan: QuietPlan) -> tuple[int, Sequence[int]]:
        ring = self.ring
        assert ring is not None
        self._plan = plan
        self._ntouched = 0
        served = ring.express(self)
        n = self._ntouched
        return served, self._touched[:n] if n else ()

    def __call__(self, mv: memoryview, cmdr_off: int, cmdr_size: int, rp: int
                 ) -> tuple[int, int]:
        plan = self._plan
        assert plan is not None
        wa, wb = (-1, -1) if self.write_protected else (plan.write_a, plan.write_b)
        gate = plan.gate
        bs, nblocks = self.geometry
        wait = self.wait
        if wait is None or self._loop is None:
            rp, served, self._ntouched, stop, self.errno = self._drain(
                mv, cmdr_off, cmdr_size, rp, wa, wb, plan.read_fd, 0 if plan.read_leg == LEG_A
                else 1, bs, nblocks, self.max_bytes, None if gate is None else gate.bits,
                0 if gate is None else gate.shift, 0 if gate is None else gate.regions,
                self._touched, self._shard, self._bounds, self._stride, self._bytes_off)
            self.unnotified = served > 0
        else:
            if self.uring_why_not == "not tried yet":
                self._uring, self.uring_why_not = express.new_uring()
            uio_fd, stop_fd, wake_fd, timeout_ms, budget_ns, clock = wait
            rp, served, self._ntouched, stop, self.errno, notifies, unnotified = self._loop(
                mv, cmdr_off, cmdr_size, rp, wa, wb, plan.read_fd, 0 if plan.read_leg == LEG_A
                else 1, bs, nblocks, self.max_bytes, None if gate is None else gate.bits,
                0 if gate is None else gate.shift, 0 if gate is None else gate.regions,
                self._touched, self._shard, self._bounds, self._stride, self._bytes_off,
                uio_fd, stop_fd, wake_fd, timeout_ms, budget_ns, clock, self._uring,
                not self.write_protected, self.uring_min)
            self.notifies += notifies
            self.unnotified = bool(unnotified)
            if stop == express.STOP_DEVICE:
                self.runs += 1
                self.served += served
                self.stops[stop] += 1
                raise DeviceError(f"the express lane's uio fd failed: "
                                  f"{os.strerror(self.errno) if self.errno else 'hang-up'}")
        self.runs += 1
        self.served += served
        self.stops[stop] += 1
        return rp, served


def _record_io(stats: CommandStats, io: MirrorIO, kind: int, n: int, elapsed_ns: int) -> None:
    """Metrics for one finished read or write of ``n`` bytes (0 if it failed): integer
    additions into this thread's shard (see daemon/metrics.py), bytes per leg touched."""
    if kind == WRITE:
        stats.record(WRITE, elapsed_ns, n if io.both else 0, n)
    elif io.reads_from_a:
        stats.record(READ, elapsed_ns, n, 0)
    else:
        stats.record(READ, elapsed_ns, 0, n)


class _MirrorJob:
    """One admitted command: run it through SCSI on its mirror view, then release the view."""

    __slots__ = ("cdb", "extent", "io", "iov", "parsed", "scsi", "stats")
    inline = False

    def __init__(self, scsi: ScsiDevice, cdb: bytes, iov: list[memoryview], io: MirrorIO,
                 parsed: ParsedCdb | SenseError, extent: tuple[int, int] | None,
                 stats: CommandStats) -> None:
        self.scsi = scsi
        self.cdb = cdb
        self.iov = iov
        self.io = io
        self.parsed = parsed
        self.extent = extent
        self.stats = stats

    def __call__(self) -> ScsiResult:
        t0 = perf_counter_ns()
        try:
            res = self.scsi.execute(self.cdb, self.iov, self.io, self.parsed)
        finally:
            self.io.finish()
        self._count(res, perf_counter_ns() - t0)
        return res

    def _count(self, res: ScsiResult, elapsed_ns: int) -> None:
        ext = self.extent
        ok = res.status == C.Status.GOOD
        if ext is not None:
            _record_io(self.stats, self.io, WRITE, ext[1] - ext[0] if ok else 0, elapsed_ns)
        elif type(self.parsed) is ReadCdb:
            n = self.parsed.blocks * self.io.block_size if ok else 0
            _record_io(self.stats, self.io, READ, n, elapsed_ns)
        else:
            self.stats.record(OTHER, elapsed_ns)

    def cancel(self) -> None:
        self.io.finish()

    def describe(self) -> tuple[int | None, int | None, str]:
        """(opcode, LBA, what it waits on) for the stuck-command watchdog."""
        lba = getattr(self.parsed, "lba", None)
        return (self.cdb[0] if self.cdb else None, lba if isinstance(lba, int) else None,
                self.io.waiting_on())


class RingControl(Protocol):
    """The configfs ``action/`` files of a TCMU device (``ConfigfsDevice``; tests: a double)."""

    def block(self, blocked: bool = True) -> None: ...
    def reset_ring(self, mode: int = 1) -> None: ...


def reset_stale_ring(name: str, ctl: RingControl, ring: Ring) -> str:
    """Before serving: make the kernel fail what a previous daemon left on the ring.

    A daemon that died (kill -9, crash) leaves commands between ``cmd_tail`` and ``cmd_head``
    that it fetched or never saw.  They cannot be *replayed*: with out-of-order completion a
    response is written over the oldest unanswered slot, so after a crash the slots no longer
    say which commands are still open -- replaying them answers some twice, and the kernel
    then marks the device broken.  The kernel knows exactly which commands are open, so it
    fails them itself:

    1. ``block_dev=1`` first.  Blocking reaps every response the dead daemon wrote but did not
       notify (those commands finished on both legs: the initiator gets their real status,
       not a retry), and from now on new commands are answered BUSY instead of being queued,
       so nothing lands on the ring while it is being reset.
    2. ``reset_ring=1``: every open command is failed with BUSY, which initiators retry (a
       retried write is applied again on both legs, so a write torn between the legs by the
       crash is made whole), commands the kernel had already timed out are just freed, and
       ``cmd_head = cmd_tail = 0``.
    3. :meth:`Ring.reset` moves our read pointer to the new ``cmd_tail`` (0).  This must come
       before step 4: once unblocked the kernel queues at offset 0, and a stale read pointer
       would skip or misparse those entries.
    4. ``block_dev=0`` (always, even if step 3 failed: a LUN left blocked answers BUSY forever).
    Only then does the ring thread start.

    Kernels without ``action/block_dev`` / ``reset_ring`` (before 4.19): if the ring is idle
    (``cmd_head == cmd_tail``: every slot was answered) nothing is stale; otherwise we start
    reading at ``cmd_head`` and leave the stale commands to the kernel's ``cmd_time_out``
    (the initiator sees them fail after it and retries), which is loudly logged.

    Returns what was done: ``"reset"``, ``"idle"`` or ``"skipped"``.
    """
    idle = ring.head() == ring.tail()
    try:
        ctl.block(True)
    except (TargetMirrorError, OSError) as exc:
        return _no_reset(name, ring, idle, exc)
    try:
        try:
            ctl.reset_ring(1)
        except (TargetMirrorError, OSError) as exc:
            return _no_reset(name, ring, idle, exc)
        ring.reset()
    finally:
        ctl.block(False)
    log.info("%s: ring reset before serving%s", name,
             "" if idle else " (commands a previous daemon left were failed with BUSY; "
             "initiators retry them)", extra={"device": name})
    return "reset"


def _no_reset(name: str, ring: Ring, idle: bool, exc: BaseException) -> str:
    if idle:
        log.info("%s: cannot reset the ring (%s); it is idle, so nothing is stale", name, exc,
                 extra={"device": name})
        return "idle"
    stale = (ring.head() - ring.tail()) % ring.cmdr_size
    ring.skip_to_head()
    log.warning("%s: cannot reset the ring (%s) and %d bytes of commands left by a previous "
                "daemon are on it; they are not replayed (that could answer one twice) and "
                "will fail at the kernel's cmd_time_out, so initiators retry them", name, exc,
                stale, extra={"device": name})
    return "skipped"


class _PlainJob:
    """A plain READ/WRITE admitted by the fast path; same contract as :class:`_MirrorJob`."""

    __slots__ = ("cdb", "fua", "inline", "io", "iov", "length", "offset", "scsi", "stats",
                 "write")

    def __init__(self, scsi: ScsiDevice, cdb: bytes, write: bool, offset: int, length: int,
                 iov: list[memoryview], fua: bool, io: MirrorIO, inline: bool,
                 stats: CommandStats) -> None:
        self.scsi = scsi
        self.cdb = cdb
        self.write = write
        self.offset = offset
        self.length = length
        self.iov = iov
        self.fua = fua
        self.io = io
        self.inline = inline
        self.stats = stats

    def __call__(self) -> ScsiResult:
        t0 = perf_counter_ns()
        io = self.io
        try:
            res = self.scsi.execute_plain(self.write, self.offset, self.iov, self.fua, io)
        finally:
            io.finish()
        _record_io(self.stats, io, WRITE if self.write else READ,
               self.length if res.status == C.Status.GOOD else 0, perf_counter_ns() - t0)
        return res

    def cancel(self) -> None:
        self.io.finish()

    def describe(self) -> tuple[int | None, int | None, str]:
        """(opcode, LBA, what it waits on) for the stuck-command watchdog."""
        return self.cdb[0], self.offset // self.io.block_size, self.io.waiting_on()


def serve(info: UioInfo, *, workers: int, store: StateStore | None,
          configfs_root: str = "/sys/kernel/config",
          mirrors: Callable[[str], Mirror | None] = lambda name: None,
          wi_extent: int = WI_EXTENT,
          guard: Callable[[MirrorSpec | SnapshotSpec], None] | None = None,
          refused: str | None = None,
          deadlines: Mapping[str, float | int | None] | None = None) -> ServedDevice:
    """Open the UIO device, build its mirror and start its ring loop.

    ``mirrors`` finds an already served mirror by name, for a volume-2 device (whose caller
    must make sure the mirror is served first, see :func:`volume_of`).  ``guard`` sees the
    parsed cfgstring before any image is opened and raises to refuse it (the daemon's image
    confinement and "one image, one mirror" rule): the device is then answered NOT READY and
    nothing is opened, created or written.  ``refused`` (why the configuration file refuses
    this backstore) does the same before even the cfgstring is looked at: reason code
    ``config``.  ``deadlines``: the mirror's leg deadlines as the admin set them
    (:func:`build_mirror`).
    """
    cfs = ConfigfsDevice.for_device(info, configfs_root)
    mirror: Mirror | None = None
    snapshot: SnapshotVolume | None = None
    reason: str | None = None
    reason_code: str | None = None
    volume = 1
    stats: CommandStats | None = None
    before_dispatch: Callable[[], None] | None = None
    commands: MirrorCommands | None = None
    admit: Admit
    try:
        if refused is not None:
            raise ConfigError(f"the configuration file refuses it: {refused}")
        spec = parse_any(info.cfgstring)
        if guard is not None and not isinstance(spec, VolumeSpec):
            guard(spec)
        if isinstance(spec, VolumeSpec):
            mirror = mirrors(spec.mirror)
            if mirror is None:
                raise MirrorError(f"volume 2 of mirror {spec.mirror}, which is not served")
            if mirror.block_size != cfs.hw_block_size() or mirror.size != cfs.size():
                mirror = None
                raise MirrorError(f"volume 2 of mirror {spec.mirror} must have its size and "
                                  "block size")
            volume = 2
            commands = MirrorCommands(mirror, lambda: read_identity(info, cfs), volume=2)
            admit = commands.admit
            stats = commands.stats
            before_dispatch = commands.commit
        elif isinstance(spec, SnapshotSpec):
            snapshot = build_snapshot(info, cfs, spec, store)
            admit = snapshot_admit(snapshot, lambda: read_identity(info, cfs))
        else:
            mirror = build_mirror(info, cfs, store, wi_extent, deadlines)
            commands = MirrorCommands(mirror, lambda: read_identity(info, cfs))
            admit = commands.admit
            stats = commands.stats
            before_dispatch = commands.commit
    except (TargetMirrorError, OSError) as exc:
        reason = str(exc)
        reason_code = exc.code if isinstance(exc, TargetMirrorError) else "os"
        if commands is not None:
            commands.close()
        commands = None
        log.error("cannot serve %s: %s; answering NOT READY until it is fixed", info.dev_name,
                  reason, extra={"device": info.dev_name})

        admit = not_ready_admit(lambda: read_identity(info, cfs), cfs.hw_block_size)

    try:
        uio = UioDevice.open(info)
    except BaseException:
        if mirror is not None and volume == 1:
            mirror.close()
        if snapshot is not None:
            snapshot.close()
        raise
    try:
        reset_stale_ring(info.dev_name, cfs, uio.ring)
    except BaseException:
        uio.close()
        if mirror is not None and volume == 1:
            mirror.close()
        if snapshot is not None:
            snapshot.close()
        raise
    runner = DeviceRunner(info.dev_name, uio, uio.ring, admit, workers=workers,
                          tag=mirror.epoch if mirror is not None else 0,
                          before_dispatch=before_dispatch,
                          express=(commands.express if commands is not None
                                   and commands.lane is not None else None))
    runner.start()
    if mirror is not None and volume == 2:
        log.info("serving %s: volume 2 of mirror %s", info.dev_name, mirror.name,
                 extra={"device": info.dev_name})
    elif mirror is not None:
        log.info("serving %s: %d bytes, block %d, a=%s b=%s", info.dev_name, mirror.size,
                 mirror.block_size, mirror.a.path, mirror.b.path,
                 extra={"device": info.dev_name})
    if snapshot is not None:
        log.info("serving %s: read-only snapshot of %s (%s)", info.dev_name, snapshot.mirror,
                 snapshot.image.path, extra={"device": info.dev_name})
    return ServedDevice(info, uio, runner, mirror, reason, snapshot, volume, stats,
                        commands.lane if commands is not None else None, commands,
                        reason_code)


def not_ready_admit(identity: Callable[[], DeviceIdentity],
                    block_size: Callable[[], int]) -> Admit:
    """Admission for a device we refuse to serve: NOT READY, MANUAL INTERVENTION REQUIRED.

    INQUIRY is still answered (SPC-4: a logical unit that is not ready processes INQUIRY):
    without it the initiator's SCSI scan drops the LUN and the admin never sees why; with it
    the disk appears, and every other command says the unit needs attention.
    """
    def answer(cdb: bytes, iov: list[memoryview]) -> ScsiResult:
        if cdb[:1] != bytes([C.Opcode.INQUIRY]):
            return _NOT_READY
        try:
            _, parsed = parse_cdb(cdb)
            if not isinstance(parsed, InquiryCdb):
                return _NOT_READY
            try:
                bs = block_size()
            except (TargetMirrorError, OSError):
                bs = 512
            data = inquiry(parsed, identity(), bs)[: parsed.alloc_len]
        except SenseError as exc:
            return ScsiResult(C.Status.CHECK_CONDITION, exc.sense())
        filled = copy_out(data, iov)
        return ScsiResult(C.Status.GOOD, read_len=None if filled == iov_len(iov) else filled)

    def admit(cdb: bytes, iov: list[memoryview], tag: int) -> Job:
        return PlainJob(lambda: answer(cdb, iov))

    return admit


def volume_of(info: UioInfo) -> str | None:
    """The mirror a volume-2 device belongs to (None for any other device or a bad cfgstring:
    those are served, and refused with a reason, in the ordinary way)."""
    try:
        spec = parse_any(info.cfgstring)
    except TargetMirrorError:
        return None
    return spec.mirror if isinstance(spec, VolumeSpec) else None


def snapshot_admit(volume: SnapshotVolume, identity: Callable[[], DeviceIdentity]) -> Admit:
    """Admission for a snapshot LUN: a write-protected SCSI unit, no ordering needed."""
    holder: list[ScsiDevice] = []
    lock = threading.Lock()

    def admit(cdb: bytes, iov: list[memoryview], tag: int) -> Job:
        if not holder:
            with lock:
                if not holder:
                    holder.append(ScsiDevice(volume, identity(), write_protected=True))
        scsi = holder[0]
        return PlainJob(lambda: scsi.execute(cdb, iov))

    return admit
