"""Turn one discovered TCMU device into something that serves: images, mirror, SCSI, ring loop.

The kernel tells us the device's shape through configfs (size, block size, largest command,
unit serial) and its backing through the cfgstring in the UIO name.  A device whose cfgstring is
bad or whose images cannot be opened is still served — every command gets CHECK CONDITION
NOT READY, MANUAL INTERVENTION REQUIRED — so the initiator sees a clear state instead of
commands hanging until the kernel's timeout, and the reason is logged for the admin.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter_ns

from targetmirror import __version__
from targetmirror.config.cfgstring import SnapshotSpec, parse, parse_any
from targetmirror.daemon.metrics import OTHER, READ, WRITE, CommandStats
from targetmirror.daemon.runner import Admit, DeviceRunner, Job, PlainJob
from targetmirror.errors import MirrorError, TargetMirrorError
from targetmirror.mirror.mirror import Mirror, MirrorIO
from targetmirror.mirror.snapshot import SnapshotVolume, owning_split_mirror
from targetmirror.mirror.state import State, StateStore
from targetmirror.scsi import constants as C
from targetmirror.scsi.cdb import ParsedCdb, ReadCdb
from targetmirror.scsi.extent import classify
from targetmirror.scsi.handler import ScsiDevice, ScsiResult
from targetmirror.scsi.identity import DeviceIdentity
from targetmirror.scsi.sense import SenseError, build_fixed_sense
from targetmirror.store.image import Image
from targetmirror.tcmu.uio import ConfigfsDevice, UioDevice, UioInfo

log = logging.getLogger("targetmirror.device")

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
    stats: CommandStats | None = None
    """Per-command counters for the metrics endpoint (mirrors only)."""

    def close(self) -> None:
        """Stop the ring loop (finishing in-flight commands), then close ring and images."""
        self.runner.stop()
        self.runner.join()
        self.uio.close()
        if self.mirror is not None:
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
    owner = owning_split_mirror(store, spec.image)
    image = Image(spec.image, readonly=True)
    try:
        return SnapshotVolume(image, cfs.size(), cfs.hw_block_size(), owner)
    except BaseException:
        image.close()
        raise


def build_mirror(info: UioInfo, cfs: ConfigfsDevice, store: StateStore | None) -> Mirror:
    """Open the images named by the cfgstring and shape the mirror like the kernel's device."""
    spec = parse(info.cfgstring)
    size = cfs.size()
    block_size = cfs.hw_block_size()
    a = Image(spec.image_a, direct=spec.direct)
    try:
        b = Image(spec.image_b, direct=spec.direct)
    except BaseException:
        a.close()
        raise
    try:
        mirror = Mirror(info.dev_name, a, b, size=size, block_size=block_size,
                        write_cache=True, store=store)
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

    def __init__(self, mirror: Mirror, identity: Callable[[], DeviceIdentity]) -> None:
        self._identity = identity
        self._mirror = mirror
        self._scsi: ScsiDevice | None = None
        self._lock = threading.Lock()
        self.stats = CommandStats()

    def _device(self) -> ScsiDevice:
        scsi = self._scsi
        if scsi is None:
            with self._lock:
                if self._scsi is None:
                    self._scsi = ScsiDevice(self._mirror, self._identity())
                scsi = self._scsi
        return scsi

    def admit(self, cdb: bytes, iov: list[memoryview], tag: int) -> Job:
        mirror = self._mirror
        parsed, extent = classify(cdb, iov, mirror.block_size)
        return _MirrorJob(self._device(), cdb, iov, mirror.admit(tag, extent), parsed, extent,
                          self.stats)


class _MirrorJob:
    """One admitted command: run it through SCSI on its mirror view, then release the view."""

    __slots__ = ("cdb", "extent", "io", "iov", "parsed", "scsi", "stats")

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
        """Metrics: integer additions into this thread's shard (see daemon/metrics.py)."""
        ext = self.extent
        ok = res.status == C.Status.GOOD
        if ext is not None:
            n = ext[1] - ext[0] if ok else 0
            self.stats.record(WRITE, elapsed_ns, n if self.io.both else 0, n)
        elif type(self.parsed) is ReadCdb:
            n = self.parsed.blocks * self.io.block_size if ok else 0
            if self.io._m.st.state == State.SYNCING:  # reads come from A while B fills
                self.stats.record(READ, elapsed_ns, n, 0)
            else:
                self.stats.record(READ, elapsed_ns, 0, n)
        else:
            self.stats.record(OTHER, elapsed_ns)

    def cancel(self) -> None:
        self.io.finish()


def serve(info: UioInfo, *, workers: int, store: StateStore | None,
          configfs_root: str = "/sys/kernel/config") -> ServedDevice:
    """Open the UIO device, build its mirror and start its ring loop."""
    cfs = ConfigfsDevice.for_device(info, configfs_root)
    mirror: Mirror | None = None
    snapshot: SnapshotVolume | None = None
    reason: str | None = None
    stats: CommandStats | None = None
    admit: Admit
    try:
        spec = parse_any(info.cfgstring)
        if isinstance(spec, SnapshotSpec):
            snapshot = build_snapshot(info, cfs, spec, store)
            admit = snapshot_admit(snapshot, lambda: read_identity(info, cfs))
        else:
            mirror = build_mirror(info, cfs, store)
            commands = MirrorCommands(mirror, lambda: read_identity(info, cfs))
            admit = commands.admit
            stats = commands.stats
    except (TargetMirrorError, OSError) as exc:
        reason = str(exc)
        log.error("cannot serve %s: %s; answering NOT READY until it is fixed", info.dev_name,
                  reason, extra={"device": info.dev_name})

        def admit(cdb: bytes, iov: list[memoryview], tag: int) -> Job:
            return PlainJob(lambda: _NOT_READY)

    try:
        uio = UioDevice.open(info)
    except BaseException:
        if mirror is not None:
            mirror.close()
        if snapshot is not None:
            snapshot.close()
        raise
    runner = DeviceRunner(info.dev_name, uio, uio.ring, admit, workers=workers,
                          tag=mirror.epoch if mirror is not None else 0)
    runner.start()
    if mirror is not None:
        log.info("serving %s: %d bytes, block %d, a=%s b=%s", info.dev_name, mirror.size,
                 mirror.block_size, mirror.a.path, mirror.b.path,
                 extra={"device": info.dev_name})
    if snapshot is not None:
        log.info("serving %s: read-only snapshot of %s (%s)", info.dev_name, snapshot.mirror,
                 snapshot.image.path, extra={"device": info.dev_name})
    return ServedDevice(info, uio, runner, mirror, reason, snapshot, stats)


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
