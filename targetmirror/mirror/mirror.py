"""The mirror: two legs, A and B, presented to the SCSI layer as one block device, and split.

``Mirror`` is a facade.  What it does is decided in one place and done by small parts:

Its parts, one concern each:

* ``policy.py`` -- the state table: transitions, the records each state owns, leg rules, which
  operation each state allows, when the lane may run (pure code, no I/O);
* ``state.py`` -- the durable state document, and ``Records``: check, save, then apply;
* ``legs.py`` -- leg I/O, failure, deadlines, the image swap of a repair;
* ``admission.py`` -- ``MirrorIO``, admission in ring order, what is in flight, the lane lease;
* ``splitcycle.py`` -- split request, instant, drain and completion;
* ``copier.py`` -- the one copy loop: sync, rejoin, repair, recovery, verify;
* ``writeintent.py`` -- the lazy write-intent clear pass and the clean close;
* ``recovery.py`` -- opening from any on-disk state;
* ``tasks.py`` -- owned threads; one lifecycle operation at a time.

**Transitions** follow one discipline (``Records``): check under the lock, save the new record
durably, and only then apply it in memory; a failed save changes nothing and says why.  One
lifecycle operation runs at a time (a second is refused with ``busy`` naming the first); every
thread is owned and joined by :meth:`Mirror.close`; no lock that admission, the control API or
leg failover needs is held across disk I/O -- the express lane runs on a lease that every
transition revokes and waits for.

**Split** (claims 1, 3, 4).  Every command is admitted on the ring thread, in ring order, with
the tag the ring loop gave it (the epoch current when the kernel queued it).  While a split
drains, a command tagged before the split epoch writes A and B, a later one B only; both kinds
run at once.  When the instant's ring position has been passed and the last pre-split write has
finished, A is fdatasync'ed, frozen and the split recorded: A is then exactly what a power cut at
the split instant would have left.  Reads come from B, the leg that stays live.

**One bitmap, one rule** (``docs/lifecycle.md``): every write marks its regions durably before
it is issued to any leg; a bit is cleared only when the region is known equal and durable on
both legs with no write to it in flight.  The same bits are the split's change tracking, md's
write-intent log, and what a failed leg missed.

**Leg failure.**  An I/O error, ENOSPC, short transfer, vanished device or timeout on one leg
marks that leg failed (persisted before the command that met it is answered) and the command
completes on the other when that one holds a complete copy for the state; when no complete leg
is left the error goes up and the SCSI layer answers MEDIUM ERROR.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from targetmirror.errors import FrozenImageError, MirrorError, StoreError
from targetmirror.mirror import policy, recovery
from targetmirror.mirror.admission import (
    PREMARK_MAX,
    Admission,
    Flight,
    LaneGate,
    LaneLease,
    MirrorIO,
    QuietPlan,
)
from targetmirror.mirror.bitmap import DEFAULT_REGION, Bitmap
from targetmirror.mirror.copier import Copier, Progress
from targetmirror.mirror.legs import LEG_TIMEOUT, Deadlines, Legs
from targetmirror.mirror.policy import BOTH, LEG_A, LEG_B, LEG_BITS, LEG_NAMES, Event, Op, View
from targetmirror.mirror.rangelock import RangeLock
from targetmirror.mirror.splitcycle import SplitCycle
from targetmirror.mirror.state import MirrorState, Records, State, StateStore
from targetmirror.mirror.tasks import OpSlot, Tasks
from targetmirror.mirror.writeintent import (
    WI_AHEAD,
    WI_EXTENT,
    WI_INTERVAL,
    WriteIntent,
    wi_mark,
)
from targetmirror.store.image import Image

log = logging.getLogger("targetmirror.mirror")

PARALLEL_THRESHOLD = 64 * 1024
"""Writes this large go to both legs in parallel; smaller ones one after the other in the
calling worker, because handing 4 KiB to another thread costs more than the second
``pwritev`` (``benchmarks/host_mirror.py``: 41k vs 5k mirrored 4 KiB writes/s)."""

__all__ = ["BOTH", "LEG_A", "LEG_B", "LEG_TIMEOUT", "PARALLEL_THRESHOLD", "PREMARK_MAX",
           "WI_EXTENT", "WI_INTERVAL", "LaneLease", "Mirror", "MirrorIO", "QuietPlan"]


def _readv(image: Image, offset: int, iov: Sequence[memoryview]) -> None:
    image.readv(offset, iov)


class Mirror:
    """Two images kept identical until a split; see the module docstring."""

    def __init__(self, name: str, a: Image, b: Image, *, size: int, block_size: int = 512,
                 write_cache: bool = True, parallel_threshold: int = PARALLEL_THRESHOLD,
                 store: StateStore | None = None, region_size: int = DEFAULT_REGION,
                 write_intent: bool = True, wi_interval: float | None = WI_INTERVAL,
                 wi_extent: int = WI_EXTENT, leg_timeout: float | None = LEG_TIMEOUT,
                 deadlines: Deadlines | None = None, wi_ahead: int = WI_AHEAD) -> None:
        if size <= 0 or size % block_size:
            raise MirrorError(f"mirror {name}: size {size} is not a positive multiple of the "
                              f"block size {block_size}")
        for leg, image in (("A", a), ("B", b)):
            if image.size < size:
                raise MirrorError(f"mirror {name}: image {leg} ({image.path}) has {image.size} "
                                  f"bytes, the LUN needs {size}")
        if wi_extent < 4096 or wi_extent & (wi_extent - 1):
            raise MirrorError(f"mirror {name}: write-intent extent {wi_extent}: expected a "
                              "power of two >= 4096")
        self.name = name
        self.size = size
        self.block_size = block_size
        self.num_blocks = size // block_size
        self.write_cache = write_cache
        self.parallel_threshold = parallel_threshold
        self.region_size = region_size
        self.write_intent = write_intent
        """Mark mirrored writes too (md's write-intent log); off only to measure its cost."""
        self.wi_interval = wi_interval
        self.wi_extent = wi_extent
        self.wi_ahead = wi_ahead
        """Extents a forward stream marks beyond its own (``writeintent.WI_AHEAD``)."""
        self.deadlines = deadlines if deadlines is not None else Deadlines.with_timeout(
            leg_timeout)
        """When a leg call fails its leg (``legs.Deadlines``); ``leg_timeout`` is the data
        calls' deadline, kept as a shorthand."""
        self.leg_timeout = self.deadlines.write
        self.unclean_start = False
        """The previous daemon did not close this mirror cleanly (crash, kill -9, power)."""
        self.a_readers: Callable[[], list[str]] = lambda: []
        """Who reads A outside the mirror (the daemon's snapshot LUNs of it): A must not
        change under them, so a rejoin, a repair of A or a sync is refused meanwhile."""

        self.mu = threading.Lock()
        """The admission lock: admission, the swap of a new state record, what is in
        flight.  Never held across disk I/O."""
        self.cv = threading.Condition(self.mu)
        self.locks = RangeLock()
        self.legs = Legs(name, a, b, deadlines=self.deadlines, on_fail=self._leg_failed)
        self.tasks = Tasks(name)
        self.ops = OpSlot(name)
        self.flight = Flight()
        self.admission = Admission(self)
        self.lane = LaneGate(self)
        self.splits = SplitCycle(self)
        self.copier = Copier(self)
        self.wi = WriteIntent(self)
        self.ops.detail = self._op_detail
        self.rejoin_complete = threading.Event()
        self.sync_complete = threading.Event()
        self._hk_stop = threading.Event()
        self._closed = False
        self._unrecorded: dict[int, StoreError] = {}
        """Leg failures not yet saved: writes are refused until they are (see run_legs)."""
        self.cached_view = View(State.MIRRORED)
        self.reads_from_a = False
        self.cached_complete = BOTH
        """The complete legs of the current state, before failures (cached per state)."""
        self.fixed_write_legs: int | None = BOTH
        """The legs every write goes to in this state, or None when tags/volumes matter."""
        self.bitmap: Bitmap | None = None
        self.records = Records(store, MirrorState(name), self.mu)
        try:
            if store is not None:
                saved = store.load(name)
                rs = saved.region_size if saved is not None else region_size
                self.bitmap = store.open_bitmap(name, size, rs)
                self.region_size = rs
            self.records.replace(recovery.load(self))
            for leg_name in self.records.current.failed:
                self.legs.failed |= LEG_BITS[leg_name]
            self.refresh_view()
            recovery.settle(self)
            self.refresh_view()
        except BaseException:
            self.lane.close()
            if self.bitmap is not None:
                self.bitmap.close()
            self.legs.close(wait=0)
            raise
        d = self.deadlines
        if store is not None and (wi_interval or d.read or d.write or d.flush):
            self.tasks.spawn("hk", self._housekeeping)

    # -- the view of the state table ---------------------------------------------------------
    @property
    def st(self) -> MirrorState:
        """The current state document (read-only: it changes through ``records``)."""
        return self.records.current

    @property
    def state(self) -> State:
        return self.records.current.state

    @property
    def epoch(self) -> int:
        """The tag the ring loop gives newly queued commands."""
        return self.records.current.epoch

    @property
    def a(self) -> Image:
        return self.legs.a

    @property
    def b(self) -> Image:
        return self.legs.b

    @property
    def store(self) -> StateStore | None:
        return self.records.store

    @property
    def split_complete(self) -> threading.Event:
        return self.splits.complete

    def refresh_view_locked(self) -> None:
        """Recompute the cached view after the state document changed (admission lock)."""
        st = self.records.current
        split = st.split
        self.cached_view = View(
            st.state, 0, bool(split and split.one_way),
            split.epoch if split is not None and st.state == State.SPLITTING else None,
            st.resync_from, st.resync_kind)
        self.reads_from_a = st.state != State.MIRRORED and policy.read_legs(
            self.cached_view) == [LEG_A]
        self.cached_complete = policy.complete_legs(self.cached_view)
        # the legs every write goes to when the state does not look at tags or volumes (all
        # states but a split in progress and one-way): admission skips the table call then
        v = self.cached_view
        fixed = {policy.write_legs(v, tag, vol) for tag in (-1, 1 << 62) for vol in (1, 2)}
        self.fixed_write_legs = fixed.pop() if len(fixed) == 1 else None

    def refresh_view(self) -> None:
        with self.mu:
            self.refresh_view_locked()

    def view(self) -> View:
        """The state table's view of this mirror, live failures included."""
        v = self.cached_view
        return View(v.state, self.legs.failed, v.one_way, v.split_epoch, v.resync_from,
                    v.resync_kind)

    def read_legs(self) -> list[int]:
        return policy.read_legs(self.view())

    def _read_leg(self) -> Image:
        """The first leg reads come from (tools and tests)."""
        legs = self.read_legs()
        if not legs:
            raise StoreError(f"mirror {self.name}: no complete leg is left", kind="read")
        return self.legs.image(legs[0])

    @property
    def health(self) -> str:
        """"ok", "degraded" (a leg failed, a complete one serves) or "failed" (none left)."""
        return policy.health(self.view())

    def refusal(self, op: Op, **kw: Any) -> str | None:
        """Why ``op`` cannot start now (the table's answer plus what only the mirror knows)."""
        if op in (Op.REJOIN, Op.REPAIR) and self.bitmap is None:
            return "has no bitmap (no state directory)"
        why = policy.refusal(self.view(), op, **kw)
        if why:
            return why
        leg = kw.get("leg") or self._failed_leg()
        touches_a = op in (Op.REJOIN, Op.SYNC) or (op == Op.REPAIR and leg == "a")
        readers = self.a_readers() if touches_a else []
        if readers:
            return (f"has its A exported read-only as {', '.join(readers)}; A would change "
                    "under it: remove that export first")
        return None

    def _failed_leg(self) -> str | None:
        """The leg a ``repair`` without ``--leg`` means: the first one failed *live*, as the
        state table judged it -- not the saved record, which lacks a failure whose save
        failed (that leg is failed all the same and must be repairable)."""
        failed = self.legs.failed
        return next((LEG_NAMES[b] for b in (LEG_A, LEG_B) if failed & b), None)

    def _refuse(self, op: Op, **kw: Any) -> None:
        why = self.refusal(op, **kw)
        if why:
            raise MirrorError(f"mirror {self.name} {why}")

    def _begin(self, op: Op, **kw: Any) -> None:
        """Take the operation slot for ``op``: refused by the state table first (the reason
        that outlasts the running operation), then as busy while another one runs."""
        self._refuse(op, **kw)
        self.ops.begin(op)
        try:
            self._refuse(op, **kw)  # the state may have moved while the slot was taken
        except BaseException:
            self.ops.end(op)
            raise

    def _op_detail(self) -> str:
        p = self.copier.progress
        if p is not None and p.running:
            return p.describe()
        return ""

    # -- admission -------------------------------------------------------------------------------
    def admit(self, tag: int, extent: tuple[int, int] | None, volume: int = 1) -> MirrorIO:
        """Admit one command on the ring thread, in ring order (``admission.py``)."""
        return self.admission.admit(tag, extent, volume)

    def commit_marks(self) -> None:
        """One bitmap sync for the bits a ring batch's admission marked."""
        self.admission.commit_marks()

    def wi_mark(self, bm: Bitmap, offset: int, length: int) -> int:
        """Mark a mirrored write's write-intent extents, ahead of a forward stream
        (``writeintent.wi_mark``)."""
        return wi_mark(bm, self.wi_extent, self.size, offset, length, self.wi_ahead)

    def lane_lease(self, volume: int) -> LaneLease | None:
        """A lease for the express lane if the mirror is quiet (``admission.LaneGate``)."""
        return self.lane.lease(volume)

    def quiet(self, volume: int, serve: Callable[[QuietPlan], tuple[int, Sequence[int]]]
              ) -> int:
        """Call ``serve(plan)`` under a lane lease if the mirror is quiet; return how many
        commands it served (0: not quiet, ``serve`` not called).  Never blocks."""
        lease = self.lane.lease(volume)
        if lease is None:
            return 0
        served: int = 0
        touched: Sequence[int] = ()
        try:
            served, touched = serve(lease.plan)
        finally:
            lease.release(served, touched)
        return served

    def quiet_plan_locked(self) -> QuietPlan | None:
        """With the admission lock held: what the lane may do now, or None if it may not run
        (the table says no, or something is in flight, or bits await a sync)."""
        view = self.view()
        if (not policy.lane_allowed(view) or self.flight.busy or self.flight.inflight
                or self.admission.pending_mark or self.ops.running is not None
                or self.tasks.alive("copy") or self.locks.held()):
            return None
        bm = self.bitmap
        if bm is not None and not bm.settled:
            return None
        b = self.legs.b.express_fd()
        if b is None:
            return None
        writable = self.write_cache  # write-through means a flush per write: Python's job
        if policy.lane_writes(view) == BOTH:
            a = self.legs.a.express_fd()
            if a is None:
                return None
            gate = bm if bm is not None and self.write_intent else None
            return QuietPlan(a if writable else -1, b if writable else -1, b, LEG_B, gate)
        return QuietPlan(-1, b if writable else -1, b, LEG_B, bm)

    # -- legs ------------------------------------------------------------------------------------
    def _leg_failed(self, leg: int, exc: StoreError) -> bool:
        """A leg failed: stop the lane, persist the failure, say so loudly.  True if the
        failure is durable."""
        name = LEG_NAMES[leg]
        with self.mu:
            self.lane.revoke_locked()
            first = leg not in self._unrecorded and name not in self.records.current.failed
            if first:
                self._unrecorded[leg] = exc
        if not first:
            return self._record_failures()
        durable = self._record_failures()
        view = self.view()
        lost = leg == LEG_A and view.state in (State.SPLITTING, State.SPLIT)
        if not policy.complete_legs(view):
            log.error("%s: leg %s FAILED (%s) and no complete leg is left: I/O now fails "
                      "with MEDIUM ERROR", self.name, name.upper(), _reason(exc),
                      extra={"device": self.name})
        else:
            log.error("%s: leg %s FAILED (%s); DEGRADED, serving from %s; its changes are "
                      "tracked for 'targetmirror repair'%s", self.name, name.upper(),
                      _reason(exc), "B" if leg == LEG_A else "A",
                      "; the split copy (A) is LOST" if lost else "",
                      extra={"device": self.name})
        return durable

    def _record_failures(self) -> bool:
        """Save every leg failure not saved yet; True when none is left unsaved."""
        with self.mu:
            pending = dict(self._unrecorded)
        if not pending:
            return True

        def change(new: MirrorState) -> None:
            for leg, exc in pending.items():
                name = LEG_NAMES[leg]
                if name in new.failed:
                    continue
                new.failed[name] = {"reason": _reason(exc), "kind": exc.kind,
                                    "errno": exc.errno, "wall": time.time(),
                                    "state": str(new.state)}
                if (leg == LEG_A and new.split is not None
                        and new.state in (State.SPLITTING, State.SPLIT)):
                    new.split.a_status = f"lost: {_reason(exc)}"

        def apply(new: MirrorState) -> None:
            for leg in pending:
                self._unrecorded.pop(leg, None)

        try:
            self.records.commit(change, apply)
            return True
        except (OSError, MirrorError) as exc:
            log.error("%s: could not persist the failure of leg(s) %s: %s; writes fail "
                      "until it is saved", self.name,
                      ", ".join(LEG_NAMES[x].upper() for x in pending), exc)
            return False

    def run_legs(self, legs: int, what: str, op: Callable[[Image], None], *, parallel: bool,
                 need: int | None = None, nbytes: int = 0) -> None:
        """Run ``op`` on each leg in ``legs``; succeed if a leg holding a complete copy for
        the state did it (``need``: the legs that count; 0: any outcome is fine).

        A write is never acknowledged while a leg failure is not yet durable: after a power
        cut the mirror would not know which leg is stale and could copy the stale one over
        the acknowledged data."""
        done, err = self.legs.run(legs, what, op, parallel=parallel, nbytes=nbytes)
        self._settle(what, done, err, need)

    def discard_legs(self, legs: int, offset: int, length: int, zeroing: bool) -> None:
        """Discard (UNMAP) or zero (WRITE SAME) a range on ``legs``, in bounded pieces; a
        piece that fails becomes a zero write, and only that failing fails a leg
        (``Legs.discard``)."""
        done, err = self.legs.run_each(
            legs, lambda leg: self.legs.discard(leg, offset, length, zeroing))
        self._settle("zeroing" if zeroing else "discard", done, err, None)

    def _settle(self, what: str, done: int, err: StoreError | None, need: int | None) -> None:
        """After a call on the legs: succeed if a leg that counts did it; see run_legs."""
        if isinstance(err, FrozenImageError):
            raise err  # a bug guard (a write to the split copy), never a leg failure
        if need == 0:
            return
        if done & (self.cached_complete & ~self.legs.failed if need is None else need):
            if self._unrecorded and what != "read" and not self._record_failures():
                raise StoreError(f"mirror {self.name}: {what}: a leg failed and its failure "
                                 "cannot be recorded", kind="write")
            return
        if err is None:
            reasons = "; ".join(f"{k.upper()}: {v.get('reason')}"
                                for k, v in sorted(self.st.failed.items()))
            err = StoreError(f"mirror {self.name}: {what}: no complete leg is left ({reasons})",
                             kind="read" if what == "read" else "write")
        raise err

    def write_legs(self, legs: int, offset: int, iov: Sequence[memoryview], durable: bool,
                   length: int, io: MirrorIO | None = None) -> None:
        reached = None if io is None else io.reached
        if durable:  # write and flush, each leg at once, each call under its own deadline
            done, err = self.legs.run_each(
                legs, lambda leg: self.legs.write_through(leg, offset, iov, length, reached))
        else:
            done, err = self.legs.run(legs, "write", self.legs.writer(offset, iov, reached),
                                      parallel=length >= self.parallel_threshold,
                                      nbytes=length)
        self._settle("write", done, err, None)

    # -- split (splitcycle.py) ---------------------------------------------------------------
    def check_can_split(self) -> None:
        """Raise MirrorError unless a split may start now."""
        self.splits.check()

    def prepare_split(self, group: list[str], one_way: bool = False) -> None:
        """Durably record the intent to split, *before* the instant."""
        self.splits.prepare(group, one_way)

    def abort_split(self) -> None:
        """Undo :meth:`prepare_split` when the instant was never taken."""
        self.splits.abort()

    def begin_split(self) -> int:
        """The instant (ring locks held): the tag for commands queued from now on."""
        return self.splits.begin()

    def record_instant(self) -> None:
        self.splits.record_instant()

    def boundary_passed(self) -> None:
        self.splits.boundary_passed()

    # -- copies (copier.py) ------------------------------------------------------------------
    @property
    def resync(self) -> dict[str, Any] | None:
        """Progress of a copy that runs, or of the last one that did not finish."""
        p = self.copier.progress
        return None if p is None else p.to_json()

    def _start_copy(self, op: Op, kind: str, source: str, rate: float | None,
                    resumed: bool) -> None:
        """Start the copy thread; it owns the operation slot from here on."""
        p = Progress(kind, source, rate_limit=rate, resumed=resumed)
        self.copier.stop.clear()
        self.copier.progress = p
        done_event = self.sync_complete if kind == "sync" else self.rejoin_complete

        def run() -> None:
            try:
                ok = self.copier.sync(p) if kind == "sync" else self.copier.resync(p)
                if ok:
                    self._copy_done(kind, p)
                    self.copier.progress = None
                    done_event.set()
                else:
                    log.info("%s: %s stopped; it resumes at the next start", self.name, kind)
            except (StoreError, OSError, MirrorError) as exc:
                p.error = str(exc)
                log.error("%s: %s failed: %s; the mirror stays %s and can be repaired or "
                          "retried", self.name, kind, exc, self.state)
            finally:
                p.running = False
                self.ops.end(op)

        if not self.tasks.spawn("copy", run):
            p.running = False
            self.ops.end(op)

    def _copy_done(self, kind: str, p: Progress) -> None:
        dst = LEG_B if p.source == "a" else LEG_A
        if self.legs.failed & dst:
            # a write that failed the destination after the copy's last flush: the copy is
            # not a success (its bits are marked again; repair resumes from them)
            raise MirrorError(f"the {kind} stopped: its destination leg "
                              f"{LEG_NAMES[dst].upper()} failed during the copy")
        record: dict[str, Any] = {"completed_wall": time.time(),
                  "seconds": time.monotonic() - p.started_mono,
                  "bytes_copied": p.bytes_copied, "resumed": p.resumed}
        if kind == "sync":
            record["resumed_at"] = p.start_cursor

            def synced(new: MirrorState) -> None:
                new.last_sync = record
            self.records.transition(Event.SYNC_DONE, synced, lambda _n: self.refresh_view_locked())
            log.info("%s: initial sync complete: %d bytes in %.3f s", self.name,
                     p.bytes_copied, record["seconds"], extra={"device": self.name})
            return
        record.update(regions=p.regions_done, image_size=self.size, **{"from": p.source})

        def copied(new: MirrorState) -> None:
            if kind == "rejoin":
                new.epoch += 1
                new.last_rejoin = record
            elif kind == "repair":
                new.last_repair = record
            else:
                new.last_recovery = record
        new = self.records.transition(Event.COPY_DONE, copied,
                                      lambda _n: self.refresh_view_locked())
        log.info("%s: %s complete: %d regions, %d bytes copied in %.3f s; mirrored again "
                 "(epoch %d)", self.name, kind, p.regions_done, p.bytes_copied,
                 record["seconds"], new.epoch, extra={"device": self.name, "epoch": new.epoch})

    def rejoin(self, *, full: bool = False, rate: float | None = None) -> None:
        """Start copying the regions B changed since the split back to A, online.

        From the moment this returns every new write goes to both legs; the copier copies each
        marked region under its range lock, fdatasyncs both legs per batch and only then
        clears the batch's bits.  ``full`` marks every region first (A was replaced, or the
        bitmap is not trusted).  ``rate`` limits the copy to that many bytes per second.  On a
        mirror whose rejoin stopped or failed, this resumes it."""
        self._begin(Op.REJOIN)
        try:
            bm = self.bitmap
            assert bm is not None
            with self.lane.blocked():
                if full:
                    # durable before the state says rejoining: a crash in between must not
                    # resume as a partial rejoin
                    bm.sync(bm.mark_all())
                resumed = self.state == State.REJOINING
                if not resumed:
                    def change(new: MirrorState) -> None:
                        new.resync_from = "b"
                        new.resync_kind = "rejoin"

                    def apply(_new: MirrorState) -> None:
                        self.legs.a.thaw()
                        self.refresh_view_locked()
                        self.rejoin_complete.clear()
                        self.splits.complete.clear()
                    self.records.transition(Event.START_REJOIN, change, apply)
            self._start_copy(Op.REJOIN, "rejoin", "b", rate, resumed)
        except BaseException:
            self.ops.end(Op.REJOIN)
            raise

    def initial_sync(self, *, rate: float | None = None) -> None:
        """Fill B from A online (claim 2); on a mirror whose sync stopped, resume it.

        Until it finishes, reads come from A (the only complete leg) and writes go to both;
        the copier copies every region A -> B under its range lock, in order, and persists its
        cursor after each fdatasync'ed batch, so a restart resumes where it was."""
        self._begin(Op.SYNC)
        try:
            resumed = self.state == State.SYNCING
            if not resumed:
                with self.lane.blocked():
                    def apply(_new: MirrorState) -> None:
                        self.refresh_view_locked()
                        self.sync_complete.clear()
                    self.records.transition(Event.START_SYNC, None, apply)
            self._start_copy(Op.SYNC, "sync", "a", rate, resumed)
        except BaseException:
            self.ops.end(Op.SYNC)
            raise

    def repair(self, *, leg: str | None = None, replace: str | None = None,
               rate: float | None = None, timeout: float = 30.0) -> None:
        """Bring a failed leg back online: reopen it (or open ``replace``, a new image) and
        copy to it, online, the regions marked since it failed (every region for a new
        image).  While the copy runs reads come from the surviving leg and writes go to both.
        A healthy leg may be replaced (``leg`` and ``replace``): it is failed first."""
        self._begin(Op.REPAIR, leg=leg, replace=replace is not None)
        try:
            self._repair(leg, replace, rate, timeout)
        except BaseException:
            self.ops.end(Op.REPAIR)
            raise

    def _repair(self, leg: str | None, replace: str | None, rate: float | None,
                timeout: float) -> None:
        if leg is None:
            leg = self._failed_leg()
            if leg is None:  # (revived between the refusal check and here)
                raise MirrorError(f"mirror {self.name} has no failed leg")
        bit = LEG_BITS[leg]
        bm = self.bitmap
        assert bm is not None
        old_path = self.legs.image(bit).path
        path = replace or old_path
        new = self.legs.image(bit).reopen(path)
        try:
            if new.size < self.size:
                raise MirrorError(f"image {path} has {new.size} bytes, the LUN needs "
                                  f"{self.size}")
            if not self.legs.failed & bit:
                self._retire(bit, path)
            with self.lane.blocked():
                old = self.legs.swap(bit, new, timeout)
                try:
                    self._record_repair(leg, bit, path, old.path, replace is not None)
                except BaseException:
                    self.legs.swap(bit, old, timeout)
                    raise
        except BaseException:
            new.close()
            raise
        try:
            old.close()
        except OSError as exc:
            log.warning("%s: closing the old image of leg %s: %s", self.name, leg.upper(), exc)
        syncing = self.state == State.SYNCING
        log.warning("%s: repairing leg %s (%s): copying %d marked region(s) from %s", self.name,
                    leg.upper(), path, bm.count, "A" if leg == "b" else "B",
                    extra={"device": self.name})
        if syncing:
            self._start_copy(Op.REPAIR, "sync", "a", rate, True)
        else:
            self._start_copy(Op.REPAIR, "repair", "a" if leg == "b" else "b", rate, False)

    def _retire(self, bit: int, path: str) -> None:
        """A healthy leg about to be replaced is failed: durably first, then in memory (a
        failed save leaves it healthy and serving).  If the repair fails after this, the leg
        stays failed -- as after any failure -- and the repair can be run again."""
        name = LEG_NAMES[bit]
        reason = f"replaced by repair --replace {path}"

        def change(new: MirrorState) -> None:
            new.failed[name] = {"reason": reason, "kind": "replace", "errno": None,
                                "wall": time.time(), "state": str(new.state)}
            if (bit == LEG_A and new.split is not None
                    and new.state in (State.SPLITTING, State.SPLIT)):
                new.split.a_status = f"lost: {reason}"

        def apply(_new: MirrorState) -> None:
            self.lane.revoke_locked()
            self.legs.mark_failed(bit)
            self.refresh_view_locked()

        self.records.commit(change, apply)
        log.warning("%s: leg %s retired for replacement by %s; writes go to %s alone and are "
                    "tracked until the copy to the new image is done", self.name,
                    name.upper(), path, "B" if bit == LEG_A else "A",
                    extra={"device": self.name})

    def _record_repair(self, leg: str, bit: int, path: str, old_path: str,
                       replaced: bool) -> None:
        bm = self.bitmap
        assert bm is not None
        state = self.state
        if replaced or state == State.SPLIT:
            # a new image, or the split copy given up: everything is copied
            bm.sync(bm.mark_all())

        def change(new: MirrorState) -> None:
            if path != old_path:
                configured = next((k for k, v in new.replaced.items() if v == old_path),
                                  old_path)
                new.replaced[configured] = path
                if bit == LEG_A:
                    new.image_a = path
                else:
                    new.image_b = path
            new.failed.pop(leg, None)
            if new.state != State.SYNCING:
                new.resync_from = "a" if leg == "b" else "b"
                new.resync_kind = "repair"

        def apply(_new: MirrorState) -> None:
            self.legs.revive(bit)
            self._unrecorded.pop(bit, None)
            if bit == LEG_A:
                self.legs.a.thaw()
            self.refresh_view_locked()
            self.rejoin_complete.clear()
            self.sync_complete.clear()

        last_split = self.st.split
        if state == State.SPLIT and last_split is not None:
            keep = last_split.a_status

            def change2(new: MirrorState) -> None:
                change(new)
                if new.last_split is not None and not keep.startswith("lost"):
                    new.last_split.a_status = "discarded by repair"
            self.records.transition(Event.START_REPAIR, change2, apply)
        else:
            self.records.transition(Event.START_REPAIR, change, apply)

    def stop_resync(self) -> None:
        """Stop a running copy (daemon shutdown); it resumes at the next start."""
        self.copier.stop.set()
        self.tasks.join("copy")

    def resume(self) -> None:
        """After start-up: finish a rejoin, recovery, repair or initial sync the daemon was
        doing when it stopped."""
        st = self.st
        if st.state not in (State.SYNCING, State.REJOINING):
            return
        if self.legs.failed:
            log.error("%s: a leg is failed while %s; repair it to resume the copy", self.name,
                      "syncing" if st.state == State.SYNCING else st.resync_kind)
            return
        op = Op.SYNC if st.state == State.SYNCING else (
            Op.RECOVERY if st.resync_kind == "recovery" else Op.REJOIN
            if st.resync_kind == "rejoin" else Op.REPAIR)
        try:
            self.ops.begin(op)
        except MirrorError as exc:
            log.error("%s: cannot resume: %s", self.name, exc)
            return
        if st.state == State.SYNCING:
            log.warning("%s: resuming the initial sync at byte %d of %d", self.name,
                        st.sync_cursor, self.size)
            self._start_copy(op, "sync", "a", None, True)
        else:
            log.warning("%s: resuming the %s that was running when the daemon stopped "
                        "(%d regions left)", self.name, st.resync_kind,
                        self.bitmap.count if self.bitmap else 0)
            self._start_copy(op, st.resync_kind, st.resync_from, None, True)

    # -- verify ----------------------------------------------------------------------------------
    def verify(self, *, repair: bool = False, offset: int = 0, length: int | None = None,
               rate: float | None = None, max_report: int = 16) -> dict[str, Any]:
        """Compare A and B region by region, online, under each region's range lock.

        While mirrored every region must match.  While split, regions the bitmap marks are
        expected to differ and are skipped (counted); an unmarked region that differs means a
        change was not tracked -- reported as a mismatch like any other.  ``repair`` copies B
        over A for mismatching regions (only while mirrored: a split copy is never modified).
        """
        self._begin(Op.VERIFY, repair=repair)
        try:
            state = self.state
            end = self.size if length is None else min(self.size, offset + length)
            p = Progress("verify", "a", rate_limit=rate)
            self.copier.stop.clear()
            self.copier.progress = p
            with self.lane.blocked():
                counts = self.copier.verify(p, offset=offset, end=end, repair=repair,
                                            split=state in (State.SPLIT, State.ONE_WAY),
                                            max_report=max_report)
            p.running = False
            self.copier.progress = None
        except StoreError as exc:
            if self.copier.progress is not None:
                self.copier.progress.error = str(exc)
                self.copier.progress.running = False
            raise
        finally:
            self.ops.end(Op.VERIFY)
        return {"name": self.name, "state": str(state),
                "regions_checked": counts["checked"],
                "regions_skipped_changed": counts["skipped"],
                "mismatches": counts["mismatches"], "first_mismatch_lbas": counts["first"],
                "repaired": counts["repaired"], "bytes_compared": counts["compared"],
                "seconds": time.monotonic() - p.started_mono}

    # -- write-intent and housekeeping ---------------------------------------------------------
    def clear_write_intent(self) -> int:
        """One lazy clear pass (``writeintent.py``); how many bits were cleared."""
        return self.wi.clear_pass()

    @property
    def wi_clears(self) -> int:
        return self.wi.clears

    @property
    def wi_cleared(self) -> int:
        return self.wi.cleared

    def _housekeeping(self) -> None:
        """Periodic: leg deadlines, records that failed to save, the write-intent clear
        pass."""
        d = self.deadlines
        shortest = min((x for x in (d.read, d.write, d.flush) if x), default=None)
        step = min(x for x in (self.wi_interval, (shortest or 0) / 4 or None, 1.0) if x)
        next_clear = time.monotonic() + (self.wi_interval or 0)
        while not self._hk_stop.wait(step):
            try:
                for leg, err in self.legs.overdue():
                    self.legs.fail(leg, err)
                self.splits.retry_pending()
                if self._unrecorded:
                    self._record_failures()
                if self.wi_interval and time.monotonic() >= next_clear:
                    next_clear = time.monotonic() + self.wi_interval
                    self.clear_write_intent()
            except (StoreError, OSError, MirrorError) as exc:
                log.error("%s: housekeeping failed: %s", self.name, exc)

    # -- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for the control API."""
        st = self.records.current
        view = self.view()
        bm = self.bitmap
        with self.mu:
            in_flight = sum(self.flight.inflight.values())
            pre = self.flight.pre_split(view.split_epoch)
            unrecorded = dict(self._unrecorded)
        failed_legs = {k: dict(v) for k, v in st.failed.items()}
        for bit, exc in unrecorded.items():
            # failed in memory, the save of that failure not done yet (writes are refused
            # until it is): still a failed leg to the admin
            failed_legs.setdefault(LEG_NAMES[bit], {
                "reason": _reason(exc), "kind": exc.kind, "errno": exc.errno,
                "state": str(st.state), "recorded": False})
        legs = {}
        for bit, name in LEG_NAMES.items():
            failed = failed_legs.get(name)
            legs[name] = {"image": self.legs.image(bit).path,
                          "role": policy.leg_role(view, bit),
                          "health": policy.leg_health(view, bit),
                          "reason": None if failed is None else failed.get("reason"),
                          **self.legs.health_of(bit)}
        split = st.to_json()["split"]
        if split is not None and self.splits.pending_error:
            split["record_error"] = self.splits.pending_error
        return {
            "name": self.name,
            "state": str(st.state),
            "epoch": st.epoch,
            "size": self.size,
            "image_a": self.legs.a.path,
            "image_b": self.legs.b.path,
            "legs": legs,
            "operation": self.ops.running,
            "writes_in_flight": in_flight,
            "pre_split_in_flight": pre,
            "split": split,
            "last_split": st.to_json()["last_split"],
            "bitmap": None if bm is None else {
                "region_size": bm.region_size, "regions": bm.regions, "marked": bm.count,
                "syncs": bm.syncs},
            "resync": self.resync,
            "last_rejoin": st.last_rejoin,
            "last_sync": st.last_sync,
            "health": policy.health(view),
            "failed_legs": failed_legs,
            "unclean_start": self.unclean_start,
            "write_intent": {"enabled": self.write_intent and bm is not None,
                             "clear_passes": self.wi.clears, "cleared": self.wi.cleared,
                             "interval": self.wi_interval, "extent": self.wi_extent},
            "leg_timeout": self.leg_timeout,
            "deadlines": dataclasses.asdict(self.deadlines),
            "last_repair": st.last_repair,
            "last_recovery": st.last_recovery,
        }

    # -- BlockBackend on the mirror itself (tools and tests; the daemon uses admit) -----------
    def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        """Read from the preferred complete leg; on its failure (marked) from the next one."""
        legs = self.read_legs()
        for leg in legs:
            try:
                self.legs.call(leg, "read", _readv, offset, iov)
                return
            except StoreError as exc:
                if leg == legs[-1] or exc.kind == "closed":
                    raise
                log.warning("%s: read of %d bytes at %d failed on %s (%s); retrying from %s",
                            self.name, sum(len(v) for v in iov), offset, LEG_NAMES[leg],
                            exc, LEG_NAMES[legs[-1]])
        self.run_legs(0, "read", lambda img: None, parallel=False)  # raises: no leg left

    def _io(self) -> MirrorIO:
        return self.admit(self.epoch, None)

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

    # -- close -------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the mirror: stop its copy, join every thread it started, close cleanly.

        The commands already admitted must be finished first (the daemon stops the ring
        loops before).  A clean close fdatasyncs both legs, clears the write-intent bits while
        mirrored and healthy, and saves ``clean: true``; a close at any phase leaves a state
        the next open resumes, never a failed leg that did not fail."""
        if self._closed:
            return
        self._closed = True
        self.ops.close()
        self.copier.stop.set()
        self._hk_stop.set()
        self.tasks.close()
        self.lane.close()
        try:
            self.wi.close_clean()
        except (StoreError, OSError, MirrorError) as exc:
            log.error("%s: could not close cleanly (%s); the next start resyncs the marked "
                      "regions", self.name, exc)
        if self.bitmap is not None:
            self.bitmap.close()
        self.legs.close()


    def _abandon(self, *, close_files: bool = False) -> None:
        """Stop as a kill -9 would: nothing flushed, cleared or recorded (the crash tests).
        Threads are told to stop and the leg pool is drained; with ``close_files`` the
        bitmap and images are closed (a new open needs the files, not this process)."""
        self._closed = True
        self.ops.close()
        self.copier.stop.set()
        self._hk_stop.set()
        self.legs._pool.shutdown(wait=True)
        if close_files:
            self.tasks.close()
            if self.bitmap is not None:
                self.bitmap.close()
            for image in self.legs.images.values():
                image.close()


def _reason(exc: StoreError) -> str:
    reason = str(exc)
    if exc.errno is not None:
        import errno as errno_mod
        reason = f"{errno_mod.errorcode.get(exc.errno, exc.errno)}: {reason}"
    return reason
