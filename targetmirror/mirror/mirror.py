"""The mirror: two legs, A and B, presented to the SCSI layer as one block device, and split.

Policy, not mechanism: which legs a command's writes go to, and when a split is complete.

* Every command is *admitted* on the ring thread, in ring order, with the *tag* the ring loop
  gave it: the mirror epoch current when the kernel queued it (the ring loop switches tags at the
  split instant's ring position).  Admission takes the command's range-lock ticket, so
  overlapping writes are granted in ring order however the workers race (claims 6-7: a
  post-split write never reaches B before an overlapping pre-split one).
* A command tagged before the split epoch is *pre-split*: its writes go to A and B.  A command
  tagged at or after it is *post-split*: B only.  Both kinds run at the same time (claim 1).
* When the split instant's ring position has been passed and the last pre-split write has
  finished, A is fdatasync'ed, frozen (writes to it raise from then on) and the split is
  recorded durably: A is then exactly what a power cut at the split instant would have left.

Reads come from B, the leg that stays live, so a split changes nothing a reader can see.
Small writes go to the legs one after the other in the calling worker; large ones in parallel,
because handing 4 KiB to another thread costs more than the second ``pwritev`` (measured by
``benchmarks/host_mirror.py``: 41k vs 5k mirrored 4 KiB writes/s on this machine's page cache).

**One bitmap, one rule** (see ``docs/lifecycle.md``).  Every write marks its regions in the
persistent bitmap, durably, before it is issued to any leg; a bit is cleared only when the
region is known equal *and durable* on both legs with no write to it in flight.  That one rule
is the split's change tracking (B-only writes), md's write-intent log while mirrored (a crash
can tear a mirrored write between the legs; after an unclean stop the marked regions are copied
B -> A), and the tracking of a failed leg (writes to the survivor only).  While mirrored, a
marked region costs nothing more until a lazy clear pass (every ``wi_interval`` seconds: both
legs fdatasync'ed, then the bits of regions idle since the previous pass are cleared), so hot
regions pay one bitmap sync, not one per write.

**Leg failure.**  An I/O error, ENOSPC, short transfer, vanished device or timeout on one leg
marks that leg failed (persisted with reason and time) and the command completes on the other
when that one holds a complete copy for the mirror's state; when no complete leg is left the
error goes up and the SCSI layer answers MEDIUM ERROR.  See :meth:`Mirror._leg_io` for how
timeouts are enforced without a thread hand-off per write.
"""

from __future__ import annotations

import errno as errno_mod
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any, NamedTuple, TypeVar

from targetmirror.errors import MirrorError, StoreError
from targetmirror.mirror.bitmap import DEFAULT_REGION, Bitmap
from targetmirror.mirror.rangelock import RangeLock
from targetmirror.mirror.state import MirrorState, SplitRecord, State, StateStore
from targetmirror.store.image import Image

T = TypeVar("T")
log = logging.getLogger("targetmirror.mirror")

PARALLEL_THRESHOLD = 64 * 1024
PREMARK_MAX = 1 << 20
"""Writes up to this size are marked at admission and synced once per ring batch; larger
extents (an UNMAP's hull may span the device) are marked exactly by the command itself."""
LEG_A, LEG_B, BOTH = 1, 2, 3
_LEG_NAMES = {LEG_A: "a", LEG_B: "b"}
WI_INTERVAL = 5.0
"""Seconds between write-intent clear passes (md's bitmap daemon uses a few seconds too)."""
WI_EXTENT = 4 << 20
"""While mirrored (state MIRRORED, both legs healthy), a write marks the whole write-intent
extent around it (DRBD's activity-log extents are 4 MiB too): a random writer over a working
set pays one bitmap sync per extent, not per 64 KiB region, and after a crash at most the
extents in use are copied.  Writes that go to one leg only (after a split, with a failed leg)
or arrive while a copy runs mark their regions exactly, so a rejoin or repair copies only what
changed."""
LEG_TIMEOUT = 20.0
"""A leg call older than this fails the leg (below LIO's default 30 s cmd_time_out)."""


class QuietPlan(NamedTuple):
    """What the express lane may do while :meth:`Mirror.quiet` holds the mirror still."""

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


class MirrorIO:
    """One command's view of the mirror (a ``BlockBackend``): its legs and its lock ticket.

    Created by :meth:`Mirror.admit` on the ring thread; used by one worker; :meth:`finish`
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
        """Reads come from A while an initial sync fills B (metrics attribute bytes by leg)."""
        return self._m.st.state == State.SYNCING

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
            if self.legs == BOTH and m.st.state == State.MIRRORED:
                offset, length = m._wi_span(offset, length)
            gen = bm.mark(offset, length)
            if gen:
                bm.sync(gen)

    def write(self, offset: int, iov: Sequence[memoryview], fua: bool) -> None:
        length = sum(len(v) for v in iov)
        with self._range(offset, offset + length):
            self._mark(offset, length)
            self._m._write_legs(self.legs, offset, iov, fua or not self._m.write_cache, length,
                                self)

    def flush(self) -> None:
        m = self._m
        legs = self.legs if not m.a.frozen else LEG_B
        m._on_legs(legs, "flush", lambda img: img.flush(), parallel=True)

    def unmap(self, offset: int, length: int) -> None:
        with self._range(offset, offset + length):
            self._mark(offset, length)
            self._m._on_legs(self.legs, "discard", lambda img: img.discard(offset, length),
                             parallel=True)

    def write_zeroes(self, offset: int, length: int) -> None:
        with self._range(offset, offset + length):
            self._mark(offset, length)
            self._m._on_legs(self.legs, "zeroing",
                             lambda img: img.write_zeroes(offset, length), parallel=True)

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
            self._m._write_legs(self.legs, offset, [data], not self._m.write_cache, len(data))
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

    def finish(self) -> None:
        """Release the ticket and count the command out (possibly completing a split)."""
        if self._ticket is not None:
            self._m.locks.release(self._ticket)
            self._ticket = None
        if self._extent is not None:
            self._extent = None
            self._m._finished(self.tag, self.both, self._key)


class Mirror:
    """Two images kept identical until a split; see the module docstring."""

    def __init__(self, name: str, a: Image, b: Image, *, size: int, block_size: int = 512,
                 write_cache: bool = True, parallel_threshold: int = PARALLEL_THRESHOLD,
                 store: StateStore | None = None, region_size: int = DEFAULT_REGION,
                 write_intent: bool = True, wi_interval: float | None = WI_INTERVAL,
                 wi_extent: int = WI_EXTENT, leg_timeout: float | None = LEG_TIMEOUT) -> None:
        if size <= 0 or size % block_size:
            raise MirrorError(f"mirror {name}: size {size} is not a positive multiple of the "
                              f"block size {block_size}")
        for leg, image in (("A", a), ("B", b)):
            if image.size < size:
                raise MirrorError(f"mirror {name}: image {leg} ({image.path}) has {image.size} "
                                  f"bytes, the LUN needs {size}")
        self.name = name
        self.a = a
        self.b = b
        self.size = size
        self.block_size = block_size
        self.num_blocks = size // block_size
        self.write_cache = write_cache
        self.parallel_threshold = parallel_threshold
        self.locks = RangeLock()
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"{name}-leg")
        self._closed = False
        self._mu = threading.Lock()
        self._cv = threading.Condition(self._mu)
        self._inflight: dict[int, int] = {}
        self._b_only = 0
        self.resync: dict[str, Any] | None = None
        """Progress of a running rejoin (for status)."""
        self._resync_thread: threading.Thread | None = None
        self._resync_stop = threading.Event()
        self._boundary_passed = False
        self._completing = False
        self._instant_mono = 0.0
        self._pre_at_boundary = 0
        self.split_complete = threading.Event()
        self.rejoin_complete = threading.Event()
        self.sync_complete = threading.Event()
        self.write_intent = write_intent
        """Mark mirrored writes too (md's write-intent log); off only to measure its cost."""
        self.wi_interval = wi_interval
        if wi_extent < 4096 or wi_extent & (wi_extent - 1):
            raise MirrorError(f"mirror {name}: write-intent extent {wi_extent}: expected a "
                              "power of two >= 4096")
        self.wi_extent = wi_extent
        self._post_split: set[int] | None = None
        """Regions written to B alone since the split's instant, until the split completes."""
        self.leg_timeout = leg_timeout
        # write-intent bookkeeping, all under self._mu (taken per command anyway)
        self._wi_keys = itertools.count(1)
        self._busy: dict[int, tuple[int, int]] = {}
        """Admitted writes not yet finished: key -> (first region, last region)."""
        self._pending_mark = 0
        """Bitmap generation marked at admission and not yet committed (commit_marks)."""
        self._touched: set[int] = set()
        """Regions whose writes finished since the last clear pass."""
        self._commit_touched: set[int] | None = None
        """While a copier commits a batch: regions whose writes finished meanwhile."""
        self._wi_lock = threading.Lock()
        self.wi_clears = 0
        self.wi_cleared = 0
        # per-leg calls in progress (for timeouts, and so repair can wait for late calls)
        self._calls: dict[int, dict[int, tuple[float, str]]] = {LEG_A: {}, LEG_B: {}}
        self._call_keys = itertools.count(1)
        self._failed_mask = 0
        self._hk_stop = threading.Event()
        self._hk_thread: threading.Thread | None = None
        self.unclean_start = False
        """The previous daemon did not close this mirror cleanly (crash, kill -9, power)."""
        self.bitmap: Bitmap | None = None
        if store is not None:
            saved = store.load(name)
            rs = saved.region_size if saved is not None else region_size
            self.bitmap = store.open_bitmap(name, size, rs)
        self.st = self._load_state()
        self.st.region_size = self.bitmap.region_size if self.bitmap else region_size
        for bit, leg_name in _LEG_NAMES.items():
            if leg_name in self.st.failed:
                self._failed_mask |= bit
        if (self.bitmap is not None and self.bitmap.created
                and self.st.state in (State.SPLIT, State.ONE_WAY, State.REJOINING)):
            # B may differ from A anywhere: without its bitmap a rejoin must copy everything.
            log.warning("%s: the change bitmap is missing or damaged while %s; marking every "
                        "region, so the rejoin will copy the whole image", self.name,
                        self.st.state)
            self.bitmap.sync(self.bitmap.mark_all())
        self._open_recovery()
        if store is not None and (wi_interval or leg_timeout):
            self._hk_thread = threading.Thread(target=self._housekeeping,
                                               name=f"{name}-hk", daemon=True)
            self._hk_thread.start()

    # -- state ---------------------------------------------------------------------------------
    def _load_state(self) -> MirrorState:
        st = self.store.load(self.name) if self.store else None
        if st is None:
            st = MirrorState(self.name, image_a=self.a.path, image_b=self.b.path,
                             region_size=self.bitmap.region_size if self.bitmap else
                             DEFAULT_REGION)
            if self.store:
                self.store.save(st)
            return st
        for leg in ("a", "b"):
            img = self.a if leg == "a" else self.b
            saved_path = st.image_a if leg == "a" else st.image_b
            if img.path != saved_path and st.replaced.get(img.path) == saved_path:
                # repair --replace put another image in this leg's place: open that one
                new = img.reopen(saved_path)
                img.close()
                if leg == "a":
                    self.a = new
                else:
                    self.b = new
        if (st.image_a, st.image_b) != (self.a.path, self.b.path):
            raise MirrorError(f"mirror {self.name}: its saved state is for images "
                              f"a={st.image_a} b={st.image_b}, not a={self.a.path} "
                              f"b={self.b.path}; refusing to guess which copy is which")
        if st.state == State.SPLITTING and st.split is not None and st.split.one_way:
            # a one-way split never freezes A; volume 1 still writes both legs
            st.state = State.ONE_WAY
            st.split.a_status = "one-way"
            if self.store:
                self.store.save(st)
        if st.state == State.SPLITTING:
            # The daemon stopped while pre-split writes drained.  Nothing after the instant was
            # ever written to A, and every write acknowledged before it reached A (acknowledged
            # writes reached both legs), so A is crash-consistent as of the instant.
            rec = st.split or SplitRecord(st.epoch, time.time())
            self.a.flush()
            rec.a_status = "crash-consistent"
            rec.completed_wall = time.time()
            st.split = rec
            st.state = State.SPLIT
            if self.store:
                self.store.save(st)
            log.warning("%s: split of epoch %d was still draining when the daemon stopped; A "
                        "is crash-consistent as of the instant%s", self.name, rec.epoch,
                        "" if rec.instant_wall else " (instant not recorded: between the "
                        "request and the stop)")
        if st.state == State.SPLIT:
            self.a.freeze()
            self.split_complete.set()
        return st

    def _open_recovery(self) -> None:
        """Note an unclean stop and make the bitmap safe to serve from; persist clean=False.

        After an unclean stop a mirrored write may be torn between the legs; its region is
        marked (the bit was durable before the write was issued).  A mirrored mirror with marked
        regions becomes ``rejoining`` from B (kind "recovery") *before* anything is served, so
        reads come from B and a split is refused until A has the marked regions again.
        """
        if self.store is None or self.bitmap is None:
            return
        st = self.st
        self.unclean_start = not st.clean
        bm = self.bitmap
        if self.unclean_start:
            log.warning("%s: the last stop was unclean (crash or kill); %d region(s) marked",
                        self.name, bm.count)
            if bm.created and st.state in (State.MIRRORED, State.SYNCING) and self.write_intent:
                log.warning("%s: the write-intent bitmap is missing after an unclean stop: "
                            "every region will be resynced", self.name)
                bm.sync(bm.mark_all())
        if (st.state == State.MIRRORED and bm.count and not self._failed_mask):
            st.state = State.REJOINING
            st.resync_from = "b"
            st.resync_kind = "recovery"
            self.rejoin_complete.clear()
            log.warning("%s: resyncing %d marked region(s) B -> A before A is trusted again",
                        self.name, bm.count)
        st.clean = False
        self.store.save(st)

    def _read_legs(self) -> list[int]:
        """The legs a read may come from, preferred first: complete copies only."""
        s = self.st.state
        if s == State.MIRRORED:
            order = [LEG_B, LEG_A]
        elif s == State.SYNCING:
            order = [LEG_A]
        elif s == State.REJOINING:
            order = [LEG_A if self.st.resync_from == "a" else LEG_B]
        else:
            order = [LEG_B]
        return [leg for leg in order if not self._failed_mask & leg]

    def _complete_mask(self) -> int:
        """Legs holding a complete copy of the LUN in this state (and not failed)."""
        s = self.st.state
        if s == State.MIRRORED:
            mask = BOTH
        elif s == State.SYNCING:
            mask = LEG_A
        elif s == State.REJOINING:
            mask = LEG_A if self.st.resync_from == "a" else LEG_B
        else:
            mask = LEG_B
        return mask & ~self._failed_mask

    def _read_leg(self) -> Image:
        """The first leg reads come from (tools and tests)."""
        legs = self._read_legs()
        if not legs:
            raise StoreError(f"mirror {self.name}: no complete leg is left", kind="read")
        return self._img(legs[0])

    def _img(self, leg: int) -> Image:
        return self.a if leg == LEG_A else self.b

    def resume(self) -> None:
        """After start-up: finish a rejoin or initial sync the daemon was doing when it
        stopped."""
        if self.st.state == State.SYNCING and self._failed_mask:
            log.error("%s: %s failed during the initial sync; repair it to resume", self.name,
                      "B" if self._failed_mask & LEG_B else "A")
            return
        if self.st.state == State.REJOINING and self._failed_mask:
            log.error("%s: a leg is failed while %s; repair it to resume the copy", self.name,
                      self.st.resync_kind)
            return
        if self.st.state == State.SYNCING:
            log.warning("%s: resuming the initial sync at byte %d of %d", self.name,
                        self.st.sync_cursor, self.size)
            self._start_copier(self._sync_run, None, True)
            return
        if self.st.state == State.REJOINING:
            log.warning("%s: resuming the %s that was running when the daemon stopped "
                        "(%d regions left)", self.name, self.st.resync_kind,
                        self.bitmap.count if self.bitmap else 0)
            self._start_rejoin(resumed=True, rate=None)

    @property
    def state(self) -> State:
        return self.st.state

    @property
    def epoch(self) -> int:
        """The tag the ring loop gives newly queued commands."""
        return self.st.epoch

    def _split_epoch(self) -> int | None:
        if self.st.state == State.MIRRORED or self.st.split is None:
            return None
        return self.st.split.epoch

    # -- admission -------------------------------------------------------------------------------
    def admit(self, tag: int, extent: tuple[int, int] | None, volume: int = 1) -> MirrorIO:
        """Admit one command on the ring thread, in ring order; see the module docstring.

        ``volume`` is the LUN it came through: after a one-way split, volume 1's writes still
        go to both legs and only volume 2's post-split writes go to B alone (claim 4).
        """
        ticket = None
        key = 0
        with self._mu:
            # decided under the lock that rejoin() and repair() take, so a command is never
            # sent to one leg only once a copy has started (it would be missed by the copy)
            split_epoch = self._split_epoch()
            both = (split_epoch is None or tag < split_epoch
                    or self.st.state == State.REJOINING
                    or (volume == 1 and self.st.split is not None and self.st.split.one_way))
            legs = (BOTH if both else LEG_B) & ~self._failed_mask
            wide = legs == BOTH and self.st.state == State.MIRRORED
            if extent is not None:
                self._inflight[tag] = self._inflight.get(tag, 0) + 1
                bm = self.bitmap
                if bm is not None:
                    key = next(self._wi_keys)
                    r0 = extent[0] >> bm.shift
                    r1 = (max(extent[1], extent[0] + 1) - 1) >> bm.shift
                    self._busy[key] = (r0, r1)
                    if legs != BOTH and self._post_split is not None:
                        self._post_split.update(range(r0, r1 + 1))
                if legs != BOTH:
                    self._b_only += 1
        granted = False
        premark = -1
        if extent is not None:
            ticket, granted = self.locks.take(extent[0], extent[1])
            bm = self.bitmap
            if (bm is not None and extent[1] - extent[0] <= PREMARK_MAX
                    and (self.write_intent or legs != BOTH)):
                # Mark now, in memory; the ring thread makes the whole batch's bits durable
                # with one sync (commit_marks) before any of its commands runs.
                if wide:
                    gen = bm.mark(*self._wi_span(extent[0], extent[1] - extent[0]))
                else:
                    gen = bm.mark(extent[0], extent[1] - extent[0])
                if gen > self._pending_mark:
                    self._pending_mark = gen
                premark = gen
        return MirrorIO(self, tag, legs, extent, ticket, key, granted, premark)

    def quiet(self, volume: int, serve: Callable[[QuietPlan], tuple[int, Sequence[int]]]
              ) -> int:
        """Call ``serve(plan)`` if the mirror is quiet enough for writes that skip admission.

        The express lane (``targetmirror/express``) writes and reads the legs' file descriptors
        itself, without tickets or marks.  That is only the same as admitting each command when
        nothing could tell the difference, so ``serve`` runs only if: the mirror is mirrored,
        or split with the drain finished (not one-way); no leg is failed; no command, copy or
        verify holds or waits for a range; the bitmap's file holds every bit memory has.  For
        the whole call the admission lock and the range lock are held, so no split, rejoin,
        clear pass, repair or range can start half-way (a split instant waits for the ring
        lock the caller holds anyway).  A write may run only if its region bits are already
        set (``plan.gate``; a write that needs a new mark is left to admission).  ``serve``
        returns how many commands it served and the regions it wrote, which count as touched
        for the clear pass exactly as an admitted write's regions do.

        Returns the number served (0 when not quiet: ``serve`` was not called).  Never blocks:
        a contended lock means "not now".
        """
        if volume != 1 or not self._mu.acquire(blocking=False):
            return 0
        try:
            plan = self._quiet_plan_locked()
            if plan is None:
                return 0
            locks = self.locks
            with locks.guard:  # a C-level lock: no generator on this per-batch path
                if not locks.idle_locked():
                    return 0
                served, touched = serve(plan)
            if touched:
                self._touched.update(touched)
            return served
        finally:
            self._mu.release()

    def _quiet_plan_locked(self) -> QuietPlan | None:
        state = self.st.state
        if (self._failed_mask or self._busy or self._inflight or self._pending_mark
                or self._copier_running()):
            return None
        bm = self.bitmap
        if bm is not None and not bm.settled:
            return None
        writable = self.write_cache  # write-through means a flush per write: Python's job
        b = self.b.express_fd()
        if b is None:
            return None
        if state == State.MIRRORED:
            a = self.a.express_fd()
            if a is None:
                return None
            gate = bm if bm is not None and self.write_intent else None
            return QuietPlan(a if writable else -1, b if writable else -1, b, LEG_B, gate)
        if (state == State.SPLIT and self.st.split is not None and not self.st.split.one_way
                and self._post_split is None):
            return QuietPlan(-1, b if writable else -1, b, LEG_B, bm)
        return None

    def _copier_running(self) -> bool:
        t = self._resync_thread
        return t is not None and t.is_alive()

    def _wi_span(self, offset: int, length: int) -> tuple[int, int]:
        """The write-intent extents around a mirrored write (see ``WI_EXTENT``)."""
        mask = self.wi_extent - 1
        start = offset & ~mask
        return start, ((offset + max(length, 1) + mask) & ~mask) - start

    def commit_marks(self) -> None:
        """Make the bits marked at admission durable: one bitmap sync per ring batch.

        Called by the ring thread after admitting a batch and before running any of it.  Each
        command's own :meth:`MirrorIO._mark` then finds its bits set and durable and costs a
        bit test; were a sync still pending (a second ring on this mirror, a failed sync), it
        waits for it there, so no leg is written before its bit is on disk either way.
        """
        gen = self._pending_mark
        if gen and self.bitmap is not None:
            self._pending_mark = 0
            self.bitmap.sync(gen)

    def _finished(self, tag: int, both: bool = True, key: int = 0) -> None:
        with self._mu:
            n = self._inflight[tag] - 1
            if n:
                self._inflight[tag] = n
            else:
                del self._inflight[tag]
            if key:
                r0, r1 = self._busy.pop(key)
                if r0 == r1:
                    self._touched.add(r0)
                else:
                    self._touched.update(range(r0, r1 + 1))
                if self._commit_touched is not None:
                    self._commit_touched.update(range(r0, r1 + 1))
            if not both:
                self._b_only -= 1
                if not self._b_only:
                    self._cv.notify_all()
            self._maybe_complete_locked()

    def _pre_split_inflight_locked(self) -> int:
        split_epoch = self._split_epoch()
        if split_epoch is None:
            return 0
        return sum(n for t, n in self._inflight.items() if t < split_epoch)

    # -- split ---------------------------------------------------------------------------------
    def check_can_split(self) -> None:
        """Raise MirrorError unless a split may start now."""
        if self.st.state == State.SYNCING:
            raise MirrorError(f"mirror {self.name} is still in its initial sync: B is not a "
                              "full copy yet, so a split would not give a usable A")
        if self.st.state != State.MIRRORED:
            raise MirrorError(f"mirror {self.name} is {self.st.state}, not mirrored; "
                              "rejoin it before splitting again")

    def prepare_split(self, group: list[str], one_way: bool = False) -> None:
        """Durably record the intent to split, *before* the instant.

        If the daemon dies after this, a restart knows post-split writes may have reached B
        only, and never treats A and B as identical again without a resync.
        """
        self.check_can_split()
        epoch = self.st.epoch + 1
        self.st.split = SplitRecord(epoch=epoch, requested_wall=time.time(), group=group,
                                    one_way=one_way)
        self.st.state = State.SPLITTING
        self.st.epoch = epoch
        self._boundary_passed = False
        self._completing = False
        self.split_complete.clear()
        with self._mu:
            self._post_split = set()
        if self.store:
            self.store.save(self.st)

    def abort_split(self) -> None:
        """Undo :meth:`prepare_split` when the instant was never taken (a group peer failed)."""
        assert self.st.split is not None
        self.st.epoch -= 1
        self.st.split = None
        self.st.state = State.MIRRORED
        with self._mu:
            self._post_split = None
        if self.store:
            self.store.save(self.st)

    def begin_split(self) -> int:
        """The instant (called with the ring loop's lock held, microseconds): return the tag
        for commands queued from now on."""
        assert self.st.split is not None and self.st.state == State.SPLITTING
        self.st.split.instant_wall = time.time()
        self._instant_mono = time.monotonic()
        return self.st.epoch

    def record_instant(self) -> None:
        """Persist the instant's wall time (after the locks are released)."""
        if self.store:
            with self._mu:
                self.store.save(self.st)

    def boundary_passed(self) -> None:
        """The ring loop has admitted every command queued before the instant."""
        with self._mu:
            self._boundary_passed = True
            self._pre_at_boundary = self._pre_split_inflight_locked()
            self._maybe_complete_locked()

    def _maybe_complete_locked(self) -> None:
        if (self.st.state != State.SPLITTING or not self._boundary_passed or self._completing
                or self._pre_split_inflight_locked()):
            return
        self._completing = True
        threading.Thread(target=self._complete_split, name=f"{self.name}-split",
                         daemon=True).start()

    def _complete_split(self) -> None:
        """Last pre-split write done: make A durable, freeze it, record the split."""
        rec = self.st.split
        assert rec is not None
        try:
            if self._failed_mask & LEG_A:
                raise StoreError(self.st.failed.get("a", {}).get("reason", "A failed"))
            self._leg_io(LEG_A, "flush", self.a.flush)
            rec.a_status = "one-way" if rec.one_way else "consistent"
        except StoreError as exc:
            rec.a_status = f"lost: {exc}"
            log.error("%s: A failed while the split drained (%s): the point-in-time copy is "
                      "LOST", self.name, exc)
        if not rec.one_way:
            self.a.freeze()
        cleared = self._clear_pre_split_intent(rec)
        with self._mu:
            rec.completed_wall = time.time()
            rec.drain_seconds = time.monotonic() - self._instant_mono
            rec.pre_split_drained = self._pre_at_boundary
            self.st.state = State.ONE_WAY if rec.one_way else State.SPLIT
            if self.store:
                self.store.save(self.st)
        log.info("%s: split complete: epoch %d, %d pre-split write(s) drained in %.6f s, A %s; "
                 "%d write-intent region(s) cleared", self.name, rec.epoch,
                 rec.pre_split_drained, rec.drain_seconds, rec.a_status, cleared,
                 extra={"device": self.name, "epoch": rec.epoch})
        self.split_complete.set()

    def _clear_pre_split_intent(self, rec: SplitRecord) -> int:
        """After the drain, drop the write-intent bits the mirrored era left behind, so the
        rejoin copies only what B changed since the instant (not the extents that happened to
        be hot before it).

        Every pre-split write is finished and A was just made durable; B is made durable
        here.  A region is cleared unless a post-split B-only write touched it (recorded at
        admission, so a write that found its bit already set keeps it), or -- after a one-way
        split, where volume 1 still writes both legs -- a write is in flight to it or finished
        during the flush.  With a failed leg nothing is cleared (the bits track what it
        missed); a failure here only means a rejoin copies more.
        """
        bm = self.bitmap
        with self._mu:
            if bm is None or rec.a_status.startswith("lost") or self._failed_mask:
                self._post_split = None
                return 0
            self._touched = set()
        try:
            self._leg_io(LEG_B, "flush", self.b.flush)
            flushed = True
        except StoreError:
            flushed = False
        with self._mu:
            keep, self._post_split = self._post_split, None
            if keep is None or self._failed_mask or not flushed:
                return 0
            keep |= self._touched | self._busy_regions_locked()
            victims = [r for r in bm.dirty_regions() if r not in keep]
            gen = bm.clear(victims)
        bm.sync(gen)
        return len(victims)

    # -- rejoin --------------------------------------------------------------------------------
    def rejoin(self, *, full: bool = False, rate: float | None = None) -> None:
        """Start copying the regions B changed since the split back to A, online.

        From the moment this returns every new write goes to both legs; the copier copies each
        marked region under its range lock (so it never races a write to the same blocks),
        fdatasyncs A per batch and only then clears the batch's bits.  ``full`` marks every
        region first (A was replaced, or the bitmap is not trusted).  ``rate`` limits the copy
        to that many bytes per second so foreground I/O keeps its share.
        """
        if self.bitmap is None:
            raise MirrorError(f"mirror {self.name} has no bitmap (no state directory)")
        if self.st.state not in (State.SPLIT, State.ONE_WAY):
            raise MirrorError(f"mirror {self.name} is {self.st.state}; only a split mirror "
                              "can be rejoined")
        if self._failed_mask:
            raise MirrorError(f"mirror {self.name} has a failed leg "
                              f"({', '.join(sorted(self.st.failed))}); use repair")
        if full:
            # durable before the state says rejoining: a crash in between must not resume as
            # a partial rejoin
            self.bitmap.sync(self.bitmap.mark_all())
        with self._mu:
            if self.st.state not in (State.SPLIT, State.ONE_WAY):
                raise MirrorError(f"mirror {self.name} is {self.st.state}; only a split mirror "
                                  "can be rejoined")
            self.a.thaw()
            self.st.state = State.REJOINING
            self.st.resync_from = "b"
            self.st.resync_kind = "rejoin"
            self.rejoin_complete.clear()
            if self.store:
                self.store.save(self.st)
        self._start_rejoin(resumed=False, rate=rate)

    def _start_rejoin(self, *, resumed: bool, rate: float | None) -> None:
        self.a.thaw()
        self._start_copier(self._rejoin_run, rate, resumed)

    def _start_copier(self, target: Callable[[float | None, bool], None], rate: float | None,
                      resumed: bool) -> None:
        self._resync_stop.clear()
        self._resync_thread = threading.Thread(target=target, args=(rate, resumed),
                                               name=f"{self.name}-resync", daemon=True)
        self._resync_thread.start()

    # -- initial sync (claim 2) --------------------------------------------------------------
    def initial_sync(self, *, rate: float | None = None) -> None:
        """Fill B from A online: for a mirror made from an existing image A and a new B.

        Until it finishes, reads come from A (the only complete leg) and writes go to both;
        the copier copies every region A -> B under its range lock, in order, and persists its
        cursor after each fdatasync'ed batch, so a restart resumes where it was.
        """
        with self._mu:
            if self.st.state != State.MIRRORED:
                raise MirrorError(f"mirror {self.name} is {self.st.state}; an initial sync "
                                  "starts from a freshly created (mirrored) mirror")
            self.st.state = State.SYNCING
            self.st.sync_cursor = 0
            self.sync_complete.clear()
            if self.store:
                self.store.save(self.st)
        self._start_copier(self._sync_run, rate, False)

    def _sync_run(self, rate: float | None, resumed: bool) -> None:
        rs = self.bitmap.region_size if self.bitmap else DEFAULT_REGION
        t0 = time.monotonic()
        start = self.st.sync_cursor
        progress: dict[str, Any] = {"kind": "sync", "bytes_total": self.size,
                                    "cursor": start, "bytes_copied": 0, "rate_limit": rate,
                                    "resumed": resumed, "eta_seconds": None}
        self.resync = progress
        buf = bytearray(rs * 16)
        view = memoryview(buf)
        copied = 0
        pos = start
        try:
            bm = self.bitmap
            if bm is not None and bm.count and start:
                # regions below the cursor marked by writes that may have been torn (unclean
                # stop) or that B missed (B failed and was repaired): copy them again first
                with self._cv:
                    self._cv.wait_for(lambda: self._b_only == 0)
                below = [r for r in bm.dirty_regions() if (r << bm.shift) < start]
                for r in below:
                    off = r << bm.shift
                    n = min(rs, self.size - off)
                    with self.locks.locked(off, off + n):
                        self._leg_io(LEG_A, "read", self.a.readv, off, [view[:n]])
                        self._leg_io(LEG_B, "write", self.b.writev, off, [view[:n]])
                    copied += n
                if below:
                    self._leg_io(LEG_B, "flush", self.b.flush)
                    log.info("%s: re-copied %d marked region(s) below the sync cursor",
                             self.name, len(below))
            while pos < self.size and not self._resync_stop.is_set():
                n = min(len(buf), self.size - pos)
                with self.locks.locked(pos, pos + n):
                    self._leg_io(LEG_A, "read", self.a.readv, pos, [view[:n]])
                    self._leg_io(LEG_B, "write", self.b.writev, pos, [view[:n]])
                pos += n
                copied += n
                if rate:
                    ahead = copied / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        self._resync_stop.wait(ahead)  # throttle, not synchronisation
                if copied % (4 * len(buf)) == 0 or pos >= self.size:
                    self._leg_io(LEG_B, "flush", self.b.flush)
                    with self._mu:
                        self.st.sync_cursor = pos
                        if self.store:
                            self.store.save(self.st)
                progress.update(cursor=pos, bytes_copied=copied)
                elapsed = time.monotonic() - t0
                if elapsed > 0 and copied:
                    progress["eta_seconds"] = (self.size - pos) * elapsed / copied
            if self._resync_stop.is_set():
                self._leg_io(LEG_B, "flush", self.b.flush)
                with self._mu:
                    self.st.sync_cursor = pos
                    if self.store:
                        self.store.save(self.st)
                log.info("%s: initial sync stopped at byte %d; it resumes at the next start",
                         self.name, pos)
                return
            with self._mu:
                self.st.state = State.MIRRORED
                self.st.last_sync = {"completed_wall": time.time(),
                                     "seconds": time.monotonic() - t0,
                                     "bytes_copied": copied, "resumed_at": start}
                if self.store:
                    self.store.save(self.st)
            log.info("%s: initial sync complete: %d bytes in %.3f s", self.name, copied,
                     time.monotonic() - t0, extra={"device": self.name})
            self.sync_complete.set()
        except (StoreError, OSError) as exc:
            progress["error"] = str(exc)
            log.error("%s: initial sync failed at byte %d: %s; it can be resumed", self.name,
                      pos, exc)
        finally:
            self.resync = None if self.sync_complete.is_set() else progress

    def _rejoin_run(self, rate: float | None, resumed: bool) -> None:
        """Copy every marked region from the complete leg to the other, online.

        Used by a rejoin (B -> A), a repair (from the surviving leg to the repaired one) and the
        recovery after an unclean stop (B -> A).  Each region is copied under its range lock;
        per batch *both* legs are fdatasync'ed (a mirrored write that finished after the copy
        must be durable on both before its bit may go) and only regions with no write in
        flight are cleared.  A region copied but busy at clear time keeps its bit as an
        ordinary write-intent bit: it is equal on both legs but for writes in flight, which
        the lazy clear pass handles once mirrored.
        """
        bm = self.bitmap
        assert bm is not None
        kind = self.st.resync_kind
        src_leg = LEG_A if self.st.resync_from == "a" else LEG_B
        dst_leg = BOTH & ~src_leg
        src, dst = self._img(src_leg), self._img(dst_leg)
        t0 = time.monotonic()
        progress: dict[str, Any] = {"kind": kind, "from": self.st.resync_from,
                                    "regions_total": None, "regions_done": 0,
                                    "bytes_copied": 0, "rate_limit": rate, "resumed": resumed,
                                    "started_wall": time.time(), "eta_seconds": None}
        self.resync = progress
        try:
            # Writes admitted to one leg only before the copy began (B-only after a split, or
            # the survivor only while a leg was failed) must land -- they mark their regions
            # -- before copying, so none is missed.
            with self._cv:
                self._cv.wait_for(lambda: self._b_only == 0)
            # The regions to copy are those marked now.  Every write admitted from here on
            # goes to both legs: a bit it sets is write-intent only, for the clear pass.
            todo = list(bm.dirty_regions())
            total = len(todo)
            progress["regions_total"] = total
            buf = bytearray(bm.region_size)
            view = memoryview(buf)
            copied = 0
            regions = 0
            batch: list[int] = []
            for region in todo:
                if self._resync_stop.is_set():
                    break
                off = region << bm.shift
                n = min(bm.region_size, self.size - off)
                with self.locks.locked(off, off + n):
                    self._leg_io(src_leg, "read", src.readv, off, [view[:n]])
                    self._leg_io(dst_leg, "write", dst.writev, off, [view[:n]])
                batch.append(region)
                copied += n
                regions += 1
                progress["bytes_copied"] = copied
                if rate:
                    ahead = copied / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        self._resync_stop.wait(ahead)  # throttle, not synchronisation
                if len(batch) >= 64:
                    self._commit_batch(batch, progress, t0, total)
                    batch = []
            if batch:
                self._commit_batch(batch, progress, t0, total)
            if self._resync_stop.is_set():
                log.info("%s: %s stopped with %d regions left; it resumes at the next start",
                         self.name, kind, bm.count)
                return
            self._leg_io(dst_leg, "flush", dst.flush)
            with self._mu:
                self.st.state = State.MIRRORED
                record = {"completed_wall": time.time(), "seconds": time.monotonic() - t0,
                          "bytes_copied": copied, "regions": regions, "resumed": resumed,
                          "image_size": self.size, "from": self.st.resync_from}
                if kind == "rejoin":
                    self.st.epoch += 1
                    self.st.last_rejoin = record
                elif kind == "repair":
                    self.st.last_repair = record
                else:
                    self.st.last_recovery = record
                self.st.resync_from = "b"
                self.st.resync_kind = "rejoin"
                if self.store:
                    self.store.save(self.st)
            log.info("%s: %s complete: %d regions, %d bytes copied in %.3f s; mirrored "
                     "again (epoch %d)", self.name, kind, regions, copied,
                     time.monotonic() - t0, self.st.epoch,
                     extra={"device": self.name, "epoch": self.st.epoch})
            self.rejoin_complete.set()
        except (StoreError, OSError) as exc:
            progress["error"] = str(exc)
            log.error("%s: %s failed: %s; the mirror stays %s and can be repaired or retried",
                      self.name, kind, exc, self.st.state)
        finally:
            self.resync = None if self.rejoin_complete.is_set() else progress

    def _commit_batch(self, batch: list[int], progress: dict[str, Any], t0: float,
                      total: int) -> None:
        """Both legs are durable for the batch; only now may its bits go (not those of a
        region with a write in flight: they stay, as write-intent bits)."""
        bm = self.bitmap
        assert bm is not None
        with self._mu:
            # a write that finishes after the fdatasyncs began may be on one leg's disk only
            self._commit_touched = set()
        try:
            self._both_flush()
        finally:
            with self._mu:
                late, self._commit_touched = self._commit_touched, None
        with self._mu:
            busy = self._busy_regions_locked() | late
            gen = bm.clear([r for r in batch if r not in busy])
        bm.sync(gen)
        done = progress["regions_done"] = progress["regions_done"] + len(batch)
        elapsed = time.monotonic() - t0
        if done and elapsed > 0:
            progress["eta_seconds"] = max(0, total - done) * elapsed / done

    def _both_flush(self) -> None:
        """fdatasync every live leg (in parallel); a failing leg is marked failed."""
        self._on_legs(BOTH & ~self._failed_mask, "flush", lambda img: img.flush(),
                      parallel=True, need=0)

    def _busy_regions_locked(self) -> set[int]:
        busy: set[int] = set()
        for r0, r1 in self._busy.values():
            if r0 == r1:
                busy.add(r0)
            else:
                busy.update(range(r0, r1 + 1))
        return busy

    # -- write-intent ---------------------------------------------------------------------------
    def clear_write_intent(self) -> int:
        """One lazy clear pass (md's bitmap daemon): return how many bits were cleared.

        Only while mirrored with both legs healthy.  The regions touched since the previous
        pass are remembered and spared (hot regions keep their bit, so they pay no new bitmap
        sync), then both legs are fdatasync'ed, then -- under the admission lock, so no write
        can be admitted half-way -- every marked region that has no write in flight and was
        not touched since the previous pass (nor during this one) is cleared.  A write that
        finished before the fdatasyncs is durable on both legs; any other write to the region
        is in flight or was touched, so its bit stays.
        """
        bm = self.bitmap
        if bm is None or not self.write_intent:
            return 0
        with self._wi_lock:
            with self._mu:
                if self.st.state != State.MIRRORED or self._failed_mask or not bm.count:
                    self._touched = set()
                    return 0
                spared = self._touched
                self._touched = set()
                gen0 = self.st.epoch
            self._both_flush()
            with self._mu:
                if (self.st.state != State.MIRRORED or self._failed_mask
                        or self.st.epoch != gen0):
                    return 0
                # a hot extent keeps all its bits: clearing part of it would cost its next
                # write a sync for nothing
                k = max((self.wi_extent >> bm.shift).bit_length() - 1, 0)
                hot = {r >> k for r in spared | self._touched | self._busy_regions_locked()}
                victims = [r for r in bm.dirty_regions() if r >> k not in hot]
                gen = bm.clear(victims)
            bm.sync(gen)
            self.wi_clears += 1
            self.wi_cleared += len(victims)
            return len(victims)

    def _housekeeping(self) -> None:
        """Periodic: the write-intent clear pass, and the per-leg call deadlines."""
        step = min(x for x in (self.wi_interval, (self.leg_timeout or 0) / 4 or None, 1.0)
                   if x)
        next_clear = time.monotonic() + (self.wi_interval or 0)
        while not self._hk_stop.wait(step):
            try:
                if self.leg_timeout:
                    self._check_deadlines()
                if self.wi_interval and time.monotonic() >= next_clear:
                    next_clear = time.monotonic() + self.wi_interval
                    self.clear_write_intent()
            except (StoreError, OSError) as exc:
                log.error("%s: housekeeping failed: %s", self.name, exc)

    def _check_deadlines(self) -> None:
        assert self.leg_timeout is not None
        now = time.monotonic()
        for leg, calls in self._calls.items():
            if self._failed_mask & leg:
                continue
            oldest = min(calls.values(), default=None)
            if oldest is not None and now - oldest[0] > self.leg_timeout:
                self._fail_leg(leg, StoreError(
                    f"{oldest[1]} on {self._img(leg).path} has not returned after "
                    f"{now - oldest[0]:.1f} s (leg timeout {self.leg_timeout:g} s)",
                    kind="timeout", path=self._img(leg).path, errno=errno_mod.ETIMEDOUT))

    # -- leg failure ----------------------------------------------------------------------------
    def _leg_io(self, leg: int, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run one call on one leg; on failure mark the leg failed and re-raise.

        Timeouts: the call runs in the calling thread (a hand-off to a per-leg thread would
        cost more than the 4 KiB ``pwritev`` itself, see the module docstring), and is entered
        in the leg's table of calls in progress (two dict operations).  The housekeeping
        thread fails a leg whose oldest call is older than ``leg_timeout``: from that moment no
        command is admitted to that leg and every new command completes on the survivor
        within microseconds.  The commands already inside the hung syscall cannot be taken
        back (a blocking ``pwritev``/``preadv`` in uninterruptible sleep cannot be abandoned,
        and answering a read before its ``preadv`` returns would let a late transfer land in a
        data area the kernel has reused); they complete when the call returns, or are aborted
        by the kernel's own cmd_time_out and retried by the initiator onto the survivor.
        ``repair`` waits until no call to the failed leg is left in progress.
        """
        calls = self._calls[leg]
        key = next(self._call_keys)
        calls[key] = (time.monotonic(), what)
        try:
            return fn(*args)
        except StoreError as exc:
            if not self._img(leg).frozen:
                self._fail_leg(leg, exc)
            raise
        except OSError as exc:
            err = StoreError(f"{what} on {self._img(leg).path} failed: {exc}", kind=what,
                             path=self._img(leg).path, errno=exc.errno)
            self._fail_leg(leg, err)
            raise err from exc
        finally:
            del calls[key]

    def _fail_leg(self, leg: int, exc: StoreError) -> None:
        """Mark ``leg`` failed, durably, once; say so loudly."""
        name = _LEG_NAMES[leg]
        with self._mu:
            if self._failed_mask & leg:
                return
            self._failed_mask |= leg
            reason = str(exc)
            if exc.errno is not None:
                reason = f"{errno_mod.errorcode.get(exc.errno, exc.errno)}: {reason}"
            self.st.failed[name] = {"reason": reason, "kind": exc.kind, "errno": exc.errno,
                                    "wall": time.time(), "state": str(self.st.state)}
            lost = (leg == LEG_A and self.st.state in (State.SPLITTING, State.SPLIT)
                    and self.st.split is not None)
            if lost and self.st.split is not None:
                self.st.split.a_status = f"lost: {reason}"
            dead = not self._complete_mask()
            if self.store:
                try:
                    self.store.save(self.st)
                except (OSError, MirrorError) as save_exc:
                    log.error("%s: could not persist the failure of leg %s: %s", self.name,
                              name.upper(), save_exc)
        if dead:
            log.error("%s: leg %s FAILED (%s) and no complete leg is left: I/O now fails "
                      "with MEDIUM ERROR", self.name, name.upper(), reason,
                      extra={"device": self.name})
        else:
            log.error("%s: leg %s FAILED (%s); DEGRADED, serving from %s; its changes are "
                      "tracked for 'targetmirror repair'%s", self.name, name.upper(), reason,
                      "B" if leg == LEG_A else "A",
                      "; the split copy (A) is LOST" if lost else "",
                      extra={"device": self.name})

    @property
    def health(self) -> str:
        """"ok", "degraded" (a leg failed, a complete one serves) or "failed" (none left)."""
        if not self._failed_mask:
            return "ok"
        return "degraded" if self._complete_mask() else "failed"

    def repair(self, *, leg: str | None = None, replace: str | None = None,
               rate: float | None = None, timeout: float = 30.0) -> None:
        """Bring a failed leg back online: reopen it (or open ``replace``, a new image) and
        copy to it, online, the regions marked since it failed (every region for a new
        image).  While the copy runs reads come from the surviving leg and writes go to both.
        """
        if self.bitmap is None:
            raise MirrorError(f"mirror {self.name} has no bitmap (no state directory)")
        if leg is None:
            failed = sorted(self.st.failed)
            if not failed:
                raise MirrorError(f"mirror {self.name}: no leg is failed (name one with --leg "
                                  "to replace a healthy leg's image)")
            if len(failed) > 1:
                raise MirrorError(f"mirror {self.name}: both legs are failed; no complete "
                                  "copy is left to repair from")
            leg = failed[0]
        if leg not in ("a", "b"):
            raise MirrorError(f"leg {leg!r}: expected 'a' or 'b'")
        bit = LEG_A if leg == "a" else LEG_B
        state = self.st.state
        if not self._failed_mask & bit and replace is None:
            raise MirrorError(f"mirror {self.name}: leg {leg.upper()} is not failed")
        if self._failed_mask & ~bit & BOTH:
            raise MirrorError(f"mirror {self.name}: the other leg is failed too; no complete "
                              "copy to repair from")
        if state in (State.SPLITTING,):
            raise MirrorError(f"mirror {self.name} is splitting; repair when the split is done")
        if leg == "b" and state in (State.SPLIT, State.REJOINING) and \
                self.st.resync_from != "a":
            raise MirrorError(f"mirror {self.name}: B failed while {state}; B held the only "
                              "complete copy of the live data, so there is nothing to repair "
                              "it from")
        if leg == "a" and state == State.SYNCING:
            raise MirrorError(f"mirror {self.name}: A failed during the initial sync; A held "
                              "the only complete copy")
        if self._resync_thread is not None and self._resync_thread.is_alive():
            raise MirrorError(f"mirror {self.name}: a copy is still running")
        # late calls to the failed leg must be over before it is copied to
        deadline = time.monotonic() + timeout
        while self._calls[bit] and time.monotonic() < deadline:
            time.sleep(0.05)  # polling a table of calls in progress; not synchronisation
        if self._calls[bit]:
            raise MirrorError(f"mirror {self.name}: {len(self._calls[bit])} call(s) to leg "
                              f"{leg.upper()} have still not returned; try again later")
        old = self._img(bit)
        path = replace or old.path
        new = old.reopen(path)
        if new.size < self.size:
            new.close()
            raise MirrorError(f"image {path} has {new.size} bytes, the LUN needs {self.size}")
        full = replace is not None or state == State.SPLIT
        if full:
            self.bitmap.sync(self.bitmap.mark_all())
        with self._mu:
            if path != old.path:
                configured = next((k for k, v in self.st.replaced.items() if v == old.path),
                                  old.path)
                self.st.replaced[configured] = path
            if bit == LEG_A:
                self.a = new
                self.st.image_a = path
            else:
                self.b = new
                self.st.image_b = path
            self._failed_mask &= ~bit
            self.st.failed.pop(leg, None)
            if state == State.SYNCING:
                kind = None
            else:
                if state == State.SPLIT and self.st.split is not None:
                    self.st.split.a_status = self.st.split.a_status if \
                        self.st.split.a_status.startswith("lost") else "discarded by repair"
                self.st.state = State.REJOINING
                self.st.resync_from = "a" if leg == "b" else "b"
                self.st.resync_kind = "repair"
                self.rejoin_complete.clear()
                kind = "repair"
            if self.store:
                self.store.save(self.st)
        with suppress(OSError):
            old.close()
        log.warning("%s: repairing leg %s (%s): copying %d marked region(s) from %s", self.name,
                    leg.upper(), path, self.bitmap.count, "A" if leg == "b" else "B",
                    extra={"device": self.name})
        if kind is None:
            self.sync_complete.clear()
            self._start_copier(self._sync_run, rate, True)
        else:
            self._start_copier(self._rejoin_run, rate, False)

    def stop_resync(self) -> None:
        """Stop a running rejoin (daemon shutdown); it resumes at the next start."""
        self._resync_stop.set()
        if self._resync_thread is not None:
            self._resync_thread.join()

    # -- verify ----------------------------------------------------------------------------------
    def verify(self, *, repair: bool = False, offset: int = 0, length: int | None = None,
               rate: float | None = None, max_report: int = 16) -> dict[str, Any]:
        """Compare A and B region by region, online, under each region's range lock.

        While mirrored every region must match.  While split, regions the bitmap marks are
        expected to differ and are skipped (counted); an unmarked region that differs means a
        change was not tracked — reported as a mismatch like any other.  ``repair`` copies B
        over A for mismatching regions (only while mirrored: a split copy is never modified).
        """
        state = self.st.state
        if repair and state != State.MIRRORED:
            raise MirrorError(f"mirror {self.name} is {state}: repair needs a mirrored mirror "
                              "(a split copy is never modified)")
        if state in (State.SPLITTING, State.REJOINING):
            raise MirrorError(f"mirror {self.name} is {state}; verify when it is mirrored or "
                              "split")
        if self._failed_mask:
            raise MirrorError(f"mirror {self.name} is DEGRADED (leg "
                              f"{', '.join(sorted(self.st.failed)).upper()} failed); repair it "
                              "first")
        rs = self.bitmap.region_size if self.bitmap else DEFAULT_REGION
        end = self.size if length is None else min(self.size, offset + length)
        a_buf, b_buf = bytearray(rs), bytearray(rs)
        av, bv = memoryview(a_buf), memoryview(b_buf)
        t0 = time.monotonic()
        checked = skipped = mismatches = repaired = compared = 0
        first: list[int] = []
        pos = offset - offset % rs
        while pos < end:
            n = min(rs, self.size - pos)
            region = pos // rs
            with self.locks.locked(pos, pos + n):
                # the bit is read under the region's lock: a write that marks it cannot be
                # half done here
                changed = (state in (State.SPLIT, State.ONE_WAY) and self.bitmap is not None
                           and self.bitmap.test(region))
                if not changed:
                    self.a.readv(pos, [av[:n]])
                    self.b.readv(pos, [bv[:n]])
                    if av[:n] != bv[:n]:
                        mismatches += 1
                        if len(first) < max_report:
                            i = next(i for i in range(n) if a_buf[i] != b_buf[i])
                            first.append((pos + i) // self.block_size)
                        if repair:
                            self.a.writev(pos, [bv[:n]])
                            repaired += 1
            if changed:
                skipped += 1
            else:
                checked += 1
                compared += n
                if rate:
                    ahead = compared / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)  # throttle, not synchronisation
            pos += n
        if repaired:
            self.a.flush()
        return {"name": self.name, "state": str(state), "regions_checked": checked,
                "regions_skipped_changed": skipped, "mismatches": mismatches,
                "first_mismatch_lbas": first, "repaired": repaired, "bytes_compared": compared,
                "seconds": time.monotonic() - t0}

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for the control API."""
        with self._mu:
            return {
                "name": self.name,
                "state": str(self.st.state),
                "epoch": self.st.epoch,
                "size": self.size,
                "image_a": self.a.path,
                "image_b": self.b.path,
                "writes_in_flight": sum(self._inflight.values()),
                "pre_split_in_flight": self._pre_split_inflight_locked(),
                "split": None if self.st.split is None else self.st.to_json()["split"],
                "bitmap": None if self.bitmap is None else {
                    "region_size": self.bitmap.region_size, "regions": self.bitmap.regions,
                    "marked": self.bitmap.count, "syncs": self.bitmap.syncs},
                "resync": self.resync,
                "last_rejoin": self.st.last_rejoin,
                "last_sync": self.st.last_sync,
                "health": self.health,
                "failed_legs": {k: dict(v) for k, v in self.st.failed.items()},
                "unclean_start": self.unclean_start,
                "write_intent": {"enabled": self.write_intent and self.bitmap is not None,
                                 "clear_passes": self.wi_clears, "cleared": self.wi_cleared,
                                 "interval": self.wi_interval, "extent": self.wi_extent},
                "leg_timeout": self.leg_timeout,
                "last_repair": self.st.last_repair,
                "last_recovery": self.st.last_recovery,
            }

    # -- leg helpers -------------------------------------------------------------------------
    def _on_legs(self, legs: int, what: str, op: Callable[[Image], None], *, parallel: bool,
                 need: int | None = None) -> None:
        """Run ``op`` on each leg in ``legs`` (in parallel if asked).

        A leg that fails is marked failed (:meth:`_leg_io`) and the call still succeeds if a
        leg holding a complete copy for the mirror's state did it (``need``: the legs that
        count, default the complete ones; 0 means "any outcome is fine").  Otherwise the last
        error is raised, and the SCSI layer answers MEDIUM ERROR: never silent success.
        """
        legs &= ~self._failed_mask
        err: StoreError | None = None
        done = 0
        if legs == BOTH and parallel:
            fut: Future[None] = self._pool.submit(self._leg_io, LEG_A, what, op, self.a)
            try:
                self._leg_io(LEG_B, what, op, self.b)
                done |= LEG_B
            except StoreError as exc:
                err = exc
            try:
                fut.result()
                done |= LEG_A
            except StoreError as exc:
                err = exc
        else:
            for leg in (LEG_A, LEG_B):
                if legs & leg and not self._failed_mask & leg:
                    try:
                        self._leg_io(leg, what, op, self._img(leg))
                        done |= leg
                    except StoreError as exc:
                        err = exc
        if err is not None and self._img(LEG_A).frozen and "frozen" in str(err):
            raise err  # a bug guard (a write to the split copy), never a leg failure
        if need == 0 or done & (self._complete_mask() if need is None else need):
            return
        if err is None:
            reasons = "; ".join(f"{k.upper()}: {v.get('reason')}"
                                for k, v in sorted(self.st.failed.items()))
            err = StoreError(f"mirror {self.name}: {what}: no complete leg is left ({reasons})",
                             kind="read" if what == "read" else "write")
        raise err

    def _write_legs(self, legs: int, offset: int, iov: Sequence[memoryview], durable: bool,
                    length: int, io: MirrorIO | None = None) -> None:
        a = self.a

        def op(image: Image) -> None:
            image.writev(offset, iov)
            if durable:
                image.flush()
            if io is not None:  # what a stuck command still waits on (watchdog)
                if image is a:
                    io.a_done = True
                else:
                    io.b_done = True

        self._on_legs(legs, "write", op,
                      parallel=length >= self.parallel_threshold or durable)

    # -- BlockBackend on the mirror itself (tools and tests; the daemon uses admit) -----------
    def _io(self) -> MirrorIO:
        return self.admit(self.epoch, None)

    def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        """Read from the preferred complete leg; on its failure (marked) from the next one."""
        legs = self._read_legs()
        for leg in legs:
            try:
                self._leg_io(leg, "read", self._img(leg).readv, offset, iov)
                return
            except StoreError as exc:
                if leg == legs[-1]:
                    raise
                log.warning("%s: read of %d bytes at %d failed on %s (%s); retrying from %s",
                            self.name, sum(len(v) for v in iov), offset, _LEG_NAMES[leg],
                            exc, _LEG_NAMES[legs[-1]])
        self._on_legs(0, "read", lambda img: None, parallel=False)  # raises: no leg left

    @contextmanager
    def _admitted(self, offset: int, length: int) -> Iterator[MirrorIO]:
        io = self.admit(self.epoch, (offset, offset + max(length, 1)))
        try:
            yield io
        finally:
            io.finish()

    def write(self, offset: int, iov: Sequence[memoryview], fua: bool) -> None:
        with self._admitted(offset, sum(len(v) for v in iov)) as io:
            io.write(offset, iov, fua)

    def flush(self) -> None:
        self._io().flush()

    def unmap(self, offset: int, length: int) -> None:
        with self._admitted(offset, length) as io:
            io.unmap(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        with self._admitted(offset, length) as io:
            io.write_zeroes(offset, length)

    def compare_and_write(self, offset: int, verify: memoryview,
                          data: memoryview) -> int | None:
        with self._admitted(offset, len(verify)) as io:
            return io.compare_and_write(offset, verify, data)

    def close(self) -> None:
        """Close both legs (after in-flight commands are done).

        A clean close: both live legs fdatasync'ed; while mirrored and healthy every
        write-intent bit is cleared (nothing is in flight); then the state says clean, so the
        next open resyncs nothing.
        """
        if self._closed:
            return
        self._closed = True
        self.stop_resync()
        self._hk_stop.set()
        if self._hk_thread is not None:
            self._hk_thread.join()
        try:
            self._shutdown_clean()
        except (StoreError, OSError, MirrorError) as exc:
            log.error("%s: could not close cleanly (%s); the next start resyncs the marked "
                      "regions", self.name, exc)
        self._pool.shutdown(wait=True)
        if self.bitmap is not None:
            self.bitmap.close()
        self.a.close()
        self.b.close()

    def _shutdown_clean(self) -> None:
        if self.store is None:
            return
        self._both_flush()
        bm = self.bitmap
        with self._mu:
            if (bm is not None and self.st.state == State.MIRRORED and not self._failed_mask
                    and not self._busy and self.write_intent):
                gen = bm.clear(list(bm.dirty_regions()))
            else:
                gen = 0
        if bm is not None:
            bm.sync(gen)
        with self._mu:
            self.st.clean = True
            self.store.save(self.st)
