"""Admission: every command's legs, range-lock ticket and write-intent marks, decided in ring
order on the ring thread; the bookkeeping of what is in flight; the express lane's lease.

* :meth:`Admission.admit` asks the state table (``policy.write_legs``) which legs a command
  writes, under the admission lock that every lifecycle transition's swap also takes, so a
  command is never sent to one leg only once a copy has started.  It takes the command's
  range-lock ticket (claims 6-7: a post-split write never reaches B before an overlapping
  pre-split one) and marks its regions in memory; the ring thread makes the whole batch's
  bits durable with one sync (``commit_marks``) before any of it runs.
* :class:`Flight` is what is in flight, all under the admission lock: admitted commands per
  tag (a split drains when no pre-split tag is left), the regions of unfinished writes (never
  cleared from the bitmap), regions finished since a point in time (for every clear pass), and
  writes that go to B only (a copy waits for them before it scans the bitmap).
* :class:`LaneGate` lends the express lane the mirror while it is quiet.  The lane runs with no
  Python lock held: a lease is granted under the admission lock when the table allows it and
  nothing is in flight, and anything that must not overlap a lane run -- a transition, a copy,
  a verify, a clear pass, another ring's admission -- *blocks* the gate: it revokes the lease
  (an eventfd the lane polls) and waits until the lane has handed it back.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

from targetmirror.mirror import policy
from targetmirror.mirror.bitmap import Bitmap
from targetmirror.mirror.policy import BOTH, LEG_A, LEG_B
from targetmirror.mirror.state import State

if TYPE_CHECKING:
    from targetmirror.mirror.mirror import Mirror

log = logging.getLogger("targetmirror.mirror")

PREMARK_MAX = 1 << 20
"""Writes up to this size are marked at admission and synced once per ring batch; larger
extents (an UNMAP's hull may span the device) are marked exactly by the command itself."""


class Flight:
    """What is in flight (all fields under the admission lock; see the module docstring)."""

    __slots__ = ("b_only", "busy", "inflight", "keys", "post_split", "touched", "watchers")

    def __init__(self) -> None:
        self.inflight: dict[int, int] = {}
        """Admitted commands with an extent, by ring tag."""
        self.keys = itertools.count(1)
        self.busy: dict[int, tuple[int, int]] = {}
        """Admitted writes not yet finished: key -> (first region, last region)."""
        self.touched: set[int] = set()
        """Regions whose writes finished since the last write-intent clear pass."""
        self.watchers: list[set[int]] = []
        """Open windows (:meth:`watch`): each collects the regions finished while it is open."""
        self.b_only = 0
        """Admitted writes that go to B only and have not finished."""
        self.post_split: set[int] | None = None
        """Regions written to B alone since the split instant, until the split completes."""

    def pre_split(self, split_epoch: int | None) -> int:
        """Commands admitted with a tag before ``split_epoch`` and not finished."""
        if split_epoch is None:
            return 0
        return sum(n for t, n in self.inflight.items() if t < split_epoch)

    def busy_regions(self) -> set[int]:
        out: set[int] = set()
        for r0, r1 in self.busy.values():
            if r0 == r1:
                out.add(r0)
            else:
                out.update(range(r0, r1 + 1))
        return out

    def finished_regions(self, regions: Iterable[int]) -> None:
        """Regions some write finished with (admitted, or the lane's)."""
        regions = list(regions)
        self.touched.update(regions)
        for w in self.watchers:
            w.update(regions)

    def watch(self) -> set[int]:
        """Open a window: the returned set collects every region a write finishes with from
        now until :meth:`unwatch`.  A clear pass opens one *before* it flushes the legs: a
        write that finished before the flush is durable on both, any later one is in the
        window (the fix of issue 15's defect 4)."""
        w: set[int] = set()
        self.watchers.append(w)
        return w

    def unwatch(self, w: set[int]) -> set[int]:
        with contextlib.suppress(ValueError):
            self.watchers.remove(w)
        return w


class QuietPlan(NamedTuple):
    """What the express lane may do while it holds a lease."""

    write_a: int
    """fd to write leg A through, or -1: writes do not go to A."""
    write_b: int
    """fd to write leg B through, or -1 (with ``write_a`` -1 too: no write may run)."""
    read_fd: int
    """fd of the leg reads come from (a complete copy)."""
    read_leg: int
    """LEG_A or LEG_B: the leg ``read_fd`` belongs to (metrics)."""
    gate: Bitmap | None
    """A write may run only if every bit of its regions is set here; None: no bitmap to
    keep (no bitmap, or write-intent off while mirrored)."""


class LaneLease:
    """The express lane's permission to serve without admission, until released.

    ``stop_fd`` becomes readable when the mirror wants the mirror back (the lane polls it and
    returns promptly); ``io_clock`` is where the lane stores the start time of its call on
    each leg (two little-endian int64, CLOCK_MONOTONIC ns, 0 = idle) so the leg deadline
    covers lane I/O.  :meth:`release` must be called exactly once."""

    __slots__ = ("_gate", "io_clock", "plan", "stop_fd")

    def __init__(self, gate: LaneGate, plan: QuietPlan, stop_fd: int,
                 io_clock: bytearray) -> None:
        self._gate = gate
        self.plan = plan
        self.stop_fd = stop_fd
        self.io_clock = io_clock

    @property
    def revoked(self) -> bool:
        return self._gate.revoked

    def release(self, served: int, touched: Iterable[int] = ()) -> None:
        """Hand the mirror back: ``touched`` are the regions the lane wrote."""
        del served
        self._gate.release(self, touched)


class LaneGate:
    """Grants, revokes and waits for the express lane's lease; see the module docstring."""

    def __init__(self, m: Mirror) -> None:
        self._m = m
        self.active: LaneLease | None = None
        self.blockers = 0
        self.revoked = False
        self.stop_fd = -1
        """An eventfd, made at the first lease (most mirrors in tests never lend)."""
        self._closed = False
        self.others = 0
        """Other volumes (one-way cut-over LUNs) attached: while any is, the lane is never
        lent, so their admission never waits behind a lane run stalled in a leg's syscall."""

    def lease(self, volume: int) -> LaneLease | None:
        """A lease if the mirror is quiet enough for the lane right now, else None.  Never
        blocks: a contended admission lock means "not now"."""
        m = self._m
        if volume != 1 or not m.mu.acquire(blocking=False):
            return None
        try:
            if self.active is not None or self.blockers or self._closed or self.others:
                return None
            plan = m.quiet_plan_locked()
            if plan is None:
                return None
            if self.stop_fd < 0:
                self.stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            if self.revoked:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.stop_fd)
                self.revoked = False
            lease = LaneLease(self, plan, self.stop_fd, m.legs.lane_clock)
            self.active = lease
            return lease
        finally:
            m.mu.release()

    def release(self, lease: LaneLease, touched: Iterable[int]) -> None:
        m = self._m
        with m.mu:
            if self.active is not lease:
                raise RuntimeError("a lane lease was released twice")
            m.flight.finished_regions(touched)
            self.active = None
            m.cv.notify_all()

    def attach_other(self) -> None:
        """A second volume now reaches this mirror: no lease from here on; a run already
        active is asked to stop (never waited for: this is called off the ring threads)."""
        with self._m.mu:
            self.others += 1
            self.revoke_locked()

    def detach_other(self) -> None:
        with self._m.mu:
            self.others = max(0, self.others - 1)

    def revoke_locked(self) -> None:
        """With the admission lock held: ask an active lane to stop (no waiting)."""
        if self.active is not None and not self.revoked:
            self.revoked = True
            os.eventfd_write(self.stop_fd, 1)

    def wait_locked(self) -> None:
        """With the admission lock held (a Condition wait releases it): revoke the lease and
        wait until the lane has handed it back."""
        if self.active is not None:
            self.revoke_locked()
            self._m.cv.wait_for(lambda: self.active is None)

    @contextmanager
    def blocked(self) -> Iterator[None]:
        """No lane run overlaps the block (and none starts during it)."""
        m = self._m
        with m.mu:
            self.blockers += 1
            self.wait_locked()
        try:
            yield
        finally:
            with m.mu:
                self.blockers -= 1

    def close(self) -> None:
        with self._m.mu:
            self._closed = True
            self.wait_locked()
        if self.stop_fd >= 0:
            os.close(self.stop_fd)
            self.stop_fd = -1


class MirrorIO:
    """One command's view of the mirror (a ``BlockBackend``): its legs and its lock ticket.

    Created by :meth:`Admission.admit` on the ring thread; used by one worker; :meth:`finish`
    must be called exactly once when the command is done, whatever happened.
    """

    __slots__ = ("_extent", "_granted", "_key", "_m", "_premark", "_ticket", "a_done", "b_done",
                 "both", "legs", "tag")

    def __init__(self, m: Mirror, tag: int, legs: int, extent: tuple[int, int] | None,
                 ticket: int | None, key: int = 0, granted: bool = False,
                 premark: int = -1) -> None:
        self._m = m
        self._premark = premark
        """The bitmap generation admission marked this command's whole extent at (0: already
        durable then), or -1 when admission did not mark it."""
        self.tag = tag
        self.legs = legs
        """The legs this command may write (LEG_A | LEG_B), decided at admission."""
        self.both = legs == BOTH
        self._extent = extent
        self._ticket = ticket
        self._granted = granted
        self._key = key
        self.a_done = False
        """Set when this command's write reached leg A (for the stuck-command watchdog)."""
        self.b_done = False

    @property
    def reads_from_a(self) -> bool:
        """Reads come from A (metrics attribute bytes by leg)."""
        return self._m.reads_from_a

    @property
    def ready(self) -> bool:
        """True if nothing this command may touch is locked by an earlier one: it can run at
        once without waiting (the ring thread may then run it itself)."""
        return self._granted or self._ticket is None

    # geometry and cache mode are the device's, shared by every command
    @property
    def block_size(self) -> int:
        return self._m.block_size

    @property
    def num_blocks(self) -> int:
        return self._m.num_blocks

    @property
    def write_cache(self) -> bool:
        return self._m.write_cache

    @write_cache.setter
    def write_cache(self, value: bool) -> None:
        self._m.write_cache = value

    @contextmanager
    def _range(self, start: int, end: int) -> Iterator[None]:
        """Hold the byte range for a write: the admitted ticket, or a fresh lock if none."""
        ext = self._extent
        if self._ticket is not None and ext is not None:
            if not self._granted:
                self._m.locks.wait(self._ticket, ext[0], ext[1])
                self._granted = True
            if not (ext[0] <= start and end <= ext[1]):
                log.warning("%s: write [%d, %d) outside the admitted extent %s",
                            self._m.name, start, end, ext)
            yield  # held until finish(): a command's writes are ordered as one unit
            return
        with self._m.locks.locked(start, end):
            yield

    def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        self._m.read(offset, iov)

    def _mark(self, offset: int, length: int) -> None:
        """Every write's regions are durably marked *before* any leg is written, so a crash
        can never leave the legs different in a region the bitmap calls clean (a B-only write
        after a split, a write torn between the legs, a write a failed leg missed).  A region
        already marked costs a bit test; concurrent first touches share one sync."""
        m = self._m
        bm = m.bitmap
        pm = self._premark
        if pm >= 0 and bm is not None:
            # Marked at admission (the extent covers every byte this command writes), and
            # its bits cannot be cleared while it is admitted (every clear skips busy
            # regions): only durability may still be pending -- usually the batch commit
            # already made it so, and this costs an integer compare.
            if pm and bm._synced_gen < pm:
                bm.sync(pm)
            return
        if bm is not None and (m.write_intent or self.legs != BOTH):
            if policy.exact_marks(m.cached_view, self.legs):
                gen = bm.mark(offset, length)
            else:
                gen = m.wi_mark(bm, offset, length)
            if gen:
                bm.sync(gen)

    def write(self, offset: int, iov: Sequence[memoryview], fua: bool) -> None:
        length = len(iov[0]) if len(iov) == 1 else sum(len(v) for v in iov)
        with self._range(offset, offset + length):
            self._mark(offset, length)
            self._m.write_legs(self.legs, offset, iov, fua or not self._m.write_cache, length,
                               self)

    def flush(self) -> None:
        m = self._m
        m.run_legs(self.legs if not m.legs.a.frozen else LEG_B, "flush",
                   lambda img: img.flush(), parallel=True)

    def unmap(self, offset: int, length: int) -> None:
        with self._range(offset, offset + length):
            self._mark(offset, length)
            self._m.discard_legs(self.legs, offset, length, zeroing=False)

    def write_zeroes(self, offset: int, length: int) -> None:
        with self._range(offset, offset + length):
            self._mark(offset, length)
            self._m.discard_legs(self.legs, offset, length, zeroing=True)

    def compare_and_write(self, offset: int, verify: memoryview, data: memoryview) -> int | None:
        length = len(verify)
        with self._range(offset, offset + length):
            current = bytearray(length)
            self._m.read(offset, [memoryview(current)])
            if current != verify:
                for i in range(length):
                    if current[i] != verify[i]:
                        return i
            self._mark(offset, len(data))
            self._m.write_legs(self.legs, offset, [data], not self._m.write_cache, len(data))
            return None

    def waiting_on(self) -> str:
        """What a command that has not finished is waiting for (stuck-command reports)."""
        if self._extent is None:
            return "a read or flush of its legs"
        if self._ticket is not None and not self._granted:
            return "the range lock (an earlier overlapping write is not done)"
        legs = [leg for leg, sent, done in (("A", self.both, self.a_done),
                                            ("B", True, self.b_done)) if sent and not done]
        return "leg " + " and ".join(legs) if legs else "its completion"

    def reached(self, leg: int) -> None:
        """The write reached ``leg`` (for :meth:`waiting_on`)."""
        if leg == LEG_A:
            self.a_done = True
        else:
            self.b_done = True

    def finish(self) -> None:
        """Release the ticket and count the command out (possibly completing a split)."""
        if self._ticket is not None:
            self._m.locks.release(self._ticket)
            self._ticket = None
        if self._extent is not None:
            self._extent = None
            self._m.admission.finished(self.tag, self.both, self._key)


class Admission:
    """Admits commands to one mirror; see the module docstring."""

    def __init__(self, m: Mirror) -> None:
        self._m = m
        self.pending_mark = 0
        """Bitmap generation marked at admission and not yet committed (commit_marks)."""

    def admit(self, tag: int, extent: tuple[int, int] | None, volume: int = 1) -> MirrorIO:
        """Admit one command on the ring thread, in ring order.

        ``volume`` is the LUN it came through: after a one-way split, volume 1's writes still
        go to both legs and only volume 2's post-split writes go to B alone (claim 4)."""
        m = self._m
        flight = m.flight
        ticket = None
        key = 0
        with m.mu:
            if m.lane.active is not None:
                # another ring's lane holds the mirror: wait until it hands it back
                m.lane.wait_locked()
            view = m.cached_view
            fixed = m.fixed_write_legs
            legs = (fixed if fixed is not None else policy.write_legs(view, tag, volume)
                    ) & ~m.legs.failed
            wide = legs == BOTH and view.state == State.MIRRORED
            if extent is not None:
                flight.inflight[tag] = flight.inflight.get(tag, 0) + 1
                bm = m.bitmap
                if bm is not None:
                    key = next(flight.keys)
                    r0 = extent[0] >> bm.shift
                    r1 = (max(extent[1], extent[0] + 1) - 1) >> bm.shift
                    flight.busy[key] = (r0, r1)
                    if legs != BOTH and flight.post_split is not None:
                        flight.post_split.update(range(r0, r1 + 1))
                if legs != BOTH:
                    flight.b_only += 1
        granted = False
        premark = -1
        if extent is not None:
            ticket, granted = m.locks.take(extent[0], extent[1])
            bm = m.bitmap
            if (bm is not None and extent[1] - extent[0] <= PREMARK_MAX
                    and (m.write_intent or legs != BOTH)):
                # Mark now, in memory; the ring thread makes the whole batch's bits durable
                # with one sync (commit_marks) before any of its commands runs.
                if wide:
                    gen = m.wi_mark(bm, extent[0], extent[1] - extent[0])
                else:
                    gen = bm.mark(extent[0], extent[1] - extent[0])
                if gen > self.pending_mark:
                    self.pending_mark = gen
                premark = gen
        return MirrorIO(m, tag, legs, extent, ticket, key, granted, premark)

    def commit_marks(self) -> None:
        """Make the bits marked at admission durable: one bitmap sync per ring batch.

        Called by the ring thread after admitting a batch and before running any of it.  Each
        command's own ``MirrorIO._mark`` then finds its bits set and durable and costs a
        bit test; were a sync still pending (a second ring on this mirror, a failed sync), it
        waits for it there, so no leg is written before its bit is on disk either way.
        """
        gen = self.pending_mark
        bm = self._m.bitmap
        if gen and bm is not None:
            self.pending_mark = 0
            bm.sync(gen)

    def finished(self, tag: int, both: bool = True, key: int = 0) -> None:
        m = self._m
        flight = m.flight
        with m.mu:
            n = flight.inflight[tag] - 1
            if n:
                flight.inflight[tag] = n
            else:
                del flight.inflight[tag]
            if key:
                r0, r1 = flight.busy.pop(key)
                flight.finished_regions(range(r0, r1 + 1) if r0 != r1 else (r0,))
            if not both:
                flight.b_only -= 1
                if not flight.b_only:
                    m.cv.notify_all()
            m.splits.maybe_complete_locked()

    def wait_b_only(self) -> None:
        """Wait until no write admitted to B alone is in flight (a copy starts after them:
        each marks its regions before it lands, so the copy's scan then sees them all)."""
        m = self._m
        with m.mu:
            m.cv.wait_for(lambda: m.flight.b_only == 0)


ServeFn = Callable[[QuietPlan], tuple[int, Sequence[int]]]
__all__ = ["LEG_A", "LEG_B", "Admission", "Flight", "LaneGate", "LaneLease", "MirrorIO",
           "QuietPlan", "ServeFn"]
