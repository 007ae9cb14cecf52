"""The one place the model-based test and the issue-15 defect tests touch the Mirror API.

Issue 15 turns ``Mirror`` into a facade over policy/legs/admission/splitcycle/copier/
writeintent/recovery modules.  The tests call only what this module exports, so a rename in that
refactor changes this file and nothing else.  Everything here is one of the public names the
facade keeps (``Mirror(...)``, ``admit``/``MirrorIO``, ``commit_marks``, ``epoch``, ``state``,
the split steps, ``rejoin``, ``initial_sync``, ``verify``, ``repair``, ``clear_write_intent``,
``quiet``, ``status``, ``close``, the completion events, ``stop_resync``) -- except the few
*peeks* at the bottom, which read private attributes because no public call says the same
thing today.  Each says which seam it wishes for; they are the only lines to touch if those
attributes move.

The ring side (:class:`RingRig`) drives a mirror the way ``targetmirrord`` does: commands are
queued into an in-process TCMU ring (tests/tcmu/producer.py), the real ``DeviceRunner`` fetches
and admits them through the real SCSI layer (``MirrorCommands``) and, when switched on, offers
the ring to the real compiled express lane first (``targetmirror/express/_lane.c``).  One call of
:meth:`RingRig.run` is one wake-up of the ring thread, done synchronously (workers=0), as
tests/express/test_lane.py does.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from targetmirror import express as express_mod
from targetmirror.daemon.device import MirrorCommands
from targetmirror.daemon.runner import DeviceRunner
from targetmirror.errors import MirrorError
from targetmirror.mirror.mirror import Mirror, MirrorIO, QuietPlan
from targetmirror.mirror.state import StateStore
from targetmirror.scsi.identity import DeviceIdentity
from targetmirror.store.image import Image
from targetmirror.tcmu.ring import Ring
from tests.daemon.test_runner import FakeUio
from tests.tcmu.producer import Completion, Producer

T = TypeVar("T")

__all__ = ["Completion", "Mirror", "MirrorError", "MirrorIO", "QuietPlan", "RingRig"]


# -- the mirror --------------------------------------------------------------------------------

def open_mirror(name: str, a: Image, b: Image, *, size: int, block_size: int = 512,
                store: StateStore | None = None, region_size: int = 64 * 1024,
                write_intent: bool = True, wi_interval: float | None = None,
                wi_extent: int = 4 << 20, leg_timeout: float | None = None) -> Mirror:
    """Open (or reopen) a mirror; a background copy it was doing is *not* resumed yet."""
    return Mirror(name, a, b, size=size, block_size=block_size, store=store,
                  region_size=region_size, write_intent=write_intent, wi_interval=wi_interval,
                  wi_extent=wi_extent, leg_timeout=leg_timeout)


def resume(m: Mirror) -> None:
    """What the daemon does right after opening: resume a rejoin/sync/recovery."""
    m.resume()


def state(m: Mirror) -> str:
    return str(m.state)


def epoch(m: Mirror) -> int:
    return m.epoch


def status(m: Mirror) -> dict[str, Any]:
    return m.status()


def health(m: Mirror) -> str:
    return str(m.status()["health"])


def failed_legs(m: Mirror) -> set[str]:
    return set(m.status()["failed_legs"])


def leg_path(m: Mirror, leg: str) -> str:
    """The image the mirror uses for leg "a"/"b" now (a repair --replace changes it)."""
    return str(m.status()["image_a" if leg == "a" else "image_b"])


def split_record(m: Mirror) -> dict[str, Any] | None:
    return m.status()["split"]


def close(m: Mirror) -> None:
    m.close()


def kill(m: Mirror) -> None:
    """What the process's death does to a mirror's threads, for a mirror whose machine lost
    power: they stop (housekeeping, copier, idle leg workers), nothing is flushed, cleared or
    saved, and nothing here waits (a thread blocked on the dead machine stays blocked).
    Without it every power cut of a long model run left a housekeeping thread ticking."""
    m._closed = True
    m.copier.stop.set()
    m._hk_stop.set()
    m.legs._pool.shutdown(wait=False, cancel_futures=True)


def stop_resync(m: Mirror) -> None:
    m.stop_resync()


# -- commands ----------------------------------------------------------------------------------

def admit(m: Mirror, tag: int, extent: tuple[int, int] | None, volume: int = 1) -> MirrorIO:
    """Admit one command on "the ring thread" (the caller), in ring order."""
    return m.admit(tag, extent, volume) if volume != 1 else m.admit(tag, extent)


def commit_marks(m: Mirror) -> None:
    m.commit_marks()


def io_write(io: MirrorIO, offset: int, data: bytes, fua: bool = False) -> None:
    io.write(offset, [memoryview(data)], fua)


def io_read(io: MirrorIO, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    io.read(offset, [memoryview(buf)])
    return bytes(buf)


def io_flush(io: MirrorIO) -> None:
    io.flush()


def io_unmap(io: MirrorIO, offset: int, length: int) -> None:
    io.unmap(offset, length)


def io_write_zeroes(io: MirrorIO, offset: int, length: int) -> None:
    io.write_zeroes(offset, length)


def io_compare_and_write(io: MirrorIO, offset: int, verify: bytes, data: bytes) -> int | None:
    return io.compare_and_write(offset, memoryview(verify), memoryview(data))


def io_finish(io: MirrorIO) -> None:
    """Finish (or, for a command that never ran, cancel: a TMR abort) one command."""
    io.finish()


def write(m: Mirror, tag: int, offset: int, data: bytes, fua: bool = False,
          volume: int = 1) -> None:
    """One whole write command: admit, commit the batch's marks, run, finish."""
    io = admit(m, tag, (offset, offset + len(data)), volume)
    try:
        commit_marks(m)
        io_write(io, offset, data, fua)
    finally:
        io_finish(io)


def read(m: Mirror, tag: int, offset: int, length: int, volume: int = 1) -> bytes:
    io = admit(m, tag, None, volume)
    try:
        return io_read(io, offset, length)
    finally:
        io_finish(io)


def flush(m: Mirror, tag: int, volume: int = 1) -> None:
    io = admit(m, tag, None, volume)
    try:
        io_flush(io)
    finally:
        io_finish(io)


# -- lifecycle ---------------------------------------------------------------------------------

def check_can_split(m: Mirror) -> None:
    m.check_can_split()


def prepare_split(m: Mirror, group: list[str], one_way: bool = False) -> None:
    m.prepare_split(group, one_way=one_way)


def abort_split(m: Mirror) -> None:
    m.abort_split()


def begin_split(m: Mirror) -> int:
    """The instant: returns the tag for commands queued from now on."""
    return m.begin_split()


def record_instant(m: Mirror) -> None:
    m.record_instant()


def boundary_passed(m: Mirror) -> None:
    m.boundary_passed()


def take_instant(mirrors: Sequence[Mirror], one_way: bool = False) -> list[int]:
    """What ``daemon/split.py`` does up to (not including) the boundary, for one mirror or a
    group: check all, prepare all (abort the prepared ones if one fails), take the instant.
    Returns each mirror's new tag.  Raises what the refusing mirror raised."""
    names = sorted(m.name for m in mirrors)
    for m in mirrors:
        check_can_split(m)
    prepared: list[Mirror] = []
    try:
        for m in mirrors:
            prepare_split(m, names, one_way)
            prepared.append(m)
    except BaseException:
        for m in prepared:
            abort_split(m)
        raise
    tags = [begin_split(m) for m in mirrors]
    for m in mirrors:
        record_instant(m)
    return tags


def split(m: Mirror, one_way: bool = False, timeout: float = 20.0) -> int:
    """A whole split with nothing in flight; returns the new tag."""
    (tag,) = take_instant([m], one_way)
    boundary_passed(m)
    if not split_complete(m).wait(timeout):
        raise AssertionError(f"split of {m.name} did not complete: {m.status()}")
    return tag


def split_complete(m: Mirror) -> threading.Event:
    return m.split_complete


def rejoin_complete(m: Mirror) -> threading.Event:
    return m.rejoin_complete


def sync_complete(m: Mirror) -> threading.Event:
    return m.sync_complete


def rejoin(m: Mirror, full: bool = False, rate: float | None = None) -> None:
    m.rejoin(full=full, rate=rate)


def initial_sync(m: Mirror, rate: float | None = None) -> None:
    m.initial_sync(rate=rate)


def repair(m: Mirror, leg: str | None = None, replace: str | None = None,
           rate: float | None = None) -> None:
    m.repair(leg=leg, replace=replace, rate=rate)


def verify(m: Mirror, repair: bool = False) -> dict[str, Any]:
    return m.verify(repair=repair)


def clear_write_intent(m: Mirror) -> int:
    return m.clear_write_intent()


def quiet(m: Mirror, volume: int, serve: Callable[[QuietPlan], tuple[int, Sequence[int]]]
          ) -> int:
    """The express lane's entry: ``serve(plan)`` runs only if the mirror is quiet."""
    return m.quiet(volume, serve)


# -- peeks: private today; each names the public seam it wishes for ---------------------------

def marked_regions(m: Mirror) -> set[int]:
    """The regions the bitmap marks (in memory).  Wished: ``Mirror.marked_regions()`` (status
    only gives the count)."""
    bm = m.bitmap
    return set() if bm is None else set(bm.dirty_regions())


def _copy_thread(m: Mirror) -> threading.Thread | None:
    tasks = getattr(m, "tasks", None)
    if tasks is not None:  # the facade of issue 15: mirror/tasks.py owns the threads
        return tasks._threads.get("copy")  # type: ignore[no-any-return]
    return m._resync_thread  # type: ignore[no-any-return]


def copier_alive(m: Mirror) -> bool:
    """A rejoin/sync/repair/recovery copy is running.  Wished: ``status()["copy"]`` with
    ``running``/``error``/``kind`` (before issue 15, ``resync`` was progress that stayed after
    a failure and was None after success, so "running" could not be told from it)."""
    t = _copy_thread(m)
    return t is not None and t.is_alive()


def wait_copier(m: Mirror, timeout: float) -> bool:
    """Wait until no copy runs; False if one still runs after ``timeout``."""
    t = _copy_thread(m)
    if t is not None:
        t.join(timeout)
        return not t.is_alive()
    return True


def reads_from(m: Mirror) -> str | None:
    """The leg reads come from now ("a"/"b"; None: no complete leg).  Wished:
    ``status()["reads_from"]`` (the state table of issue 15 has it)."""
    legs = m.read_legs() if hasattr(m, "read_legs") else m._read_legs()
    return None if not legs else ("a" if legs[0] == 1 else "b")


def copy_progress(m: Mirror) -> dict[str, Any] | None:
    """The running or last failed copy's progress (``status()["resync"]``)."""
    return m.status()["resync"]


def closed(m: Mirror) -> bool:
    """Wished: ``status()["closed"]`` or a public ``closed`` property."""
    return bool(m._closed)


def occupy_leg_pool(m: Mirror, n: int = 4) -> threading.Event:
    """Make the mirror's leg-I/O pool busy with ``n`` tasks that wait for the returned event:
    a parallel leg call submitted meanwhile waits in the queue, *not yet registered* as a call
    in progress.  Wished: nothing public (the window is the point); used by one reasoned-case
    test of issue 15."""
    release = threading.Event()
    started = [threading.Event() for _ in range(n)]

    def blocker(ev: threading.Event) -> None:
        ev.set()
        release.wait(30)

    legs = getattr(m, "legs", None)
    pool = legs._pool if legs is not None and hasattr(legs, "_pool") else m._pool
    for ev in started:
        pool.submit(blocker, ev)
    for ev in started:
        if not ev.wait(10):
            raise AssertionError("the leg pool did not start the blockers")
    return release


# -- the ring side (the daemon's ring loop, SCSI layer and express lane) -----------------------

class RingRig:
    """One TCMU device serving ``mirror`` through the real runner/SCSI/lane; see the module
    docstring.  ``express`` switches the compiled lane on (if it is built)."""

    def __init__(self, mirror: Mirror, *, volume: int = 1, express: bool = True) -> None:
        self.mirror = mirror
        self.producer = Producer(cmdr_size=64 * 1024, data_size=4 << 20)
        self.uio = FakeUio(self.producer)
        self.commands = MirrorCommands(
            mirror, lambda: DeviceIdentity(serial=f"{mirror.name}0001"[:16],
                                           max_transfer_blocks=4096), volume=volume)
        self.runner = DeviceRunner(f"{mirror.name}-v{volume}", self.uio, Ring(self.producer.buf),
                                   self.commands.admit, before_dispatch=self.commands.commit,
                                   workers=0, tag=mirror.epoch)
        self.express_on = False
        self.set_express(express)

    @property
    def lane_available(self) -> bool:
        return self.commands.lane is not None

    def set_express(self, on: bool) -> None:
        self.express_on = on and self.commands.lane is not None
        self.runner.express = self.commands.express if self.express_on else None

    @property
    def lane_served(self) -> int:
        lane = self.commands.lane
        return 0 if lane is None else lane.served

    def queue(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> int:
        return self.producer.queue(cdb, data_out, data_in_len)

    def run(self, tag: int) -> dict[int, Completion]:
        """One wake-up of the ring thread with ``tag`` for the commands it admits; every
        command queued so far is answered when this returns (workers=0)."""
        self.runner.tag = tag
        self.runner._fetch_and_dispatch()
        self.runner._complete_done()
        got = dict(self.uio.completions)
        self.uio.completions.clear()
        return got

    def close(self) -> None:
        self.runner.ring.release()
        self.producer.close()
        os.close(self.uio.efd)


def lane_built() -> bool:
    return express_mod.available()
