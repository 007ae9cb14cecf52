"""The split: request, instant, drain, completion (claims 1 and 3; claim 4's one-way form).

1. :meth:`SplitCycle.prepare` durably records the intent *before* the instant (a restart then
   knows post-split writes may have reached B only); a failed save changes nothing.
2. :meth:`SplitCycle.begin` is the instant, called with the ring loop's lock held
   (microseconds, no syscall): commands queued from now on get the new tag.
3. :meth:`SplitCycle.boundary_passed`: the ring loop admitted every command queued before the
   instant.  From then on the last pre-split write to finish starts the completion.
4. The completion (an owned thread: ``Mirror.close`` joins it) flushes A, freezes it (not for a
   one-way split), drops the write-intent bits the mirrored era left (see
   :meth:`SplitCycle._clear_pre_split_intent`) and records the split as done.  A record that
   cannot be saved is retried by the housekeeping thread; until it lands the mirror says
   ``splitting`` (on disk and in memory) and the operation slot stays taken.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from targetmirror.errors import MirrorError, StoreError
from targetmirror.mirror.policy import LEG_A, LEG_B, Event, Op
from targetmirror.mirror.state import MirrorState, SplitRecord, State

if TYPE_CHECKING:
    from targetmirror.mirror.mirror import Mirror

log = logging.getLogger("targetmirror.mirror")


class SplitCycle:
    """The split of one mirror; see the module docstring."""

    def __init__(self, m: Mirror) -> None:
        self._m = m
        self.boundary_passed_flag = False
        self.completing = False
        self.instant_mono = 0.0
        self.instant_wall: float | None = None
        self.pre_at_boundary = 0
        self.complete = threading.Event()
        """Set when the split is complete (drained and recorded)."""
        self._prev_last_split: object = None
        self.pending: Callable[[], None] | None = None
        """A split record that could not be saved yet (retried by housekeeping)."""
        self.pending_error: str | None = None

    # -- request ---------------------------------------------------------------------------
    def check(self) -> None:
        """Raise unless a split may be requested now."""
        m = self._m
        why = m.refusal(Op.SPLIT)
        if why:
            raise MirrorError(f"mirror {m.name} {why}")
        m.ops.check()

    def prepare(self, group: list[str], one_way: bool = False) -> None:
        m = self._m
        m._begin(Op.SPLIT)
        try:
            with m.lane.blocked():
                cur = m.records.current
                epoch = cur.epoch + 1
                rec = SplitRecord(epoch=epoch, requested_wall=time.time(), group=list(group),
                                  one_way=one_way)

                def change(new: MirrorState) -> None:
                    new.epoch = epoch
                    new.split = rec

                def apply(new: MirrorState) -> None:
                    m.flight.post_split = set()
                    self.boundary_passed_flag = False
                    self.completing = False
                    self.instant_wall = None
                    self.complete.clear()
                    m.refresh_view_locked()

                self._prev_last_split = cur.last_split
                m.records.transition(Event.PREPARE_SPLIT, change, apply)
        except BaseException:
            m.ops.end(Op.SPLIT)
            raise

    def abort(self) -> None:
        """Undo :meth:`prepare` when the instant was never taken (a group peer failed)."""
        m = self._m
        prev = self._prev_last_split

        def change(new: MirrorState) -> None:
            new.epoch -= 1
            new.last_split = prev  # type: ignore[assignment]

        def apply(new: MirrorState) -> None:
            m.flight.post_split = None
            m.refresh_view_locked()

        def record() -> None:
            m.records.transition(Event.ABORT_SPLIT, change, apply)
            m.ops.end(Op.SPLIT)

        self._record(record, "the cancelled split")

    # -- instant ---------------------------------------------------------------------------
    def begin(self) -> int:
        """The instant (ring locks held): return the tag for commands queued from now on."""
        split = self._m.records.current.split
        assert split is not None and self._m.state == State.SPLITTING
        self.instant_wall = time.time()
        self.instant_mono = time.monotonic()
        return split.epoch

    def record_instant(self) -> None:
        """Persist the instant's wall time (after the ring locks are released).  A failed save
        is only logged: the completion's record carries the instant again."""
        m = self._m
        wall = self.instant_wall

        def change(new: MirrorState) -> None:
            if new.state == State.SPLITTING and new.split is not None:
                new.split.instant_wall = wall

        try:
            m.records.commit(change)
        except (OSError, MirrorError) as exc:
            log.error("%s: could not record the split instant: %s", m.name, exc)

    def boundary_passed(self) -> None:
        """The ring loop has admitted every command queued before the instant."""
        m = self._m
        with m.mu:
            self.boundary_passed_flag = True
            self.pre_at_boundary = m.flight.pre_split(m.cached_view.split_epoch)
            self.maybe_complete_locked()

    def maybe_complete_locked(self) -> None:
        m = self._m
        view = m.cached_view
        if (view.state != State.SPLITTING or not self.boundary_passed_flag or self.completing
                or m.flight.pre_split(view.split_epoch)):
            return
        self.completing = True
        if not m.tasks.spawn("split", self._complete):
            log.warning("%s: closing before the split drained; it completes at the next start "
                        "(A crash-consistent)", m.name)

    # -- completion ------------------------------------------------------------------------
    def _complete(self) -> None:
        """Last pre-split write done: make A durable, freeze it, record the split."""
        m = self._m
        rec = m.records.current.split
        assert rec is not None
        one_way = rec.one_way
        with m.mu:
            window = m.flight.watch()
        try:
            if m.legs.failed & LEG_A:
                failed = m.records.current.failed.get("a", {})
                a_status = f"lost: {failed.get('reason', 'A failed')}"
            else:
                try:
                    m.legs.call(LEG_A, "flush", _flush)
                    a_status = "one-way" if one_way else "consistent"
                except StoreError as exc:
                    a_status = f"lost: {exc}"
            if a_status.startswith("lost"):
                log.error("%s: A failed while the split drained (%s): the point-in-time copy "
                          "is LOST", m.name, a_status)
            if not one_way:
                m.legs.a.freeze()
            cleared = self._clear_pre_split_intent(window, a_status)
        finally:
            with m.mu:
                m.flight.unwatch(window)
        drain = time.monotonic() - self.instant_mono
        pre = self.pre_at_boundary
        wall = self.instant_wall

        def change(new: MirrorState) -> None:
            assert new.split is not None
            new.split.completed_wall = time.time()
            new.split.drain_seconds = drain
            new.split.pre_split_drained = pre
            if new.split.instant_wall is None:
                new.split.instant_wall = wall
            if not new.split.a_status.startswith("lost"):
                new.split.a_status = a_status

        def apply(new: MirrorState) -> None:
            m.flight.post_split = None
            m.refresh_view_locked()

        def record() -> None:
            new = m.records.transition(Event.DRAINED_ONE_WAY if one_way else Event.DRAINED,
                                       change, apply)
            assert new.split is not None
            log.info("%s: split complete: epoch %d, %d pre-split write(s) drained in %.6f s, "
                     "A %s; %d write-intent region(s) cleared", m.name, new.split.epoch, pre,
                     drain, new.split.a_status, cleared,
                     extra={"device": m.name, "epoch": new.split.epoch})
            self.complete.set()
            m.ops.end(Op.SPLIT)

        self._record(record, "the completed split")

    def _record(self, record: Callable[[], None], what: str) -> None:
        try:
            record()
            self.pending = None
            self.pending_error = None
        except (OSError, MirrorError) as exc:
            self.pending = record
            self.pending_error = f"could not record {what}: {exc}"
            log.error("%s: %s; retrying (the mirror stays splitting until it is recorded)",
                      self._m.name, self.pending_error)

    def retry_pending(self) -> None:
        """Housekeeping: try again to save a split record that failed."""
        record = self.pending
        if record is not None:
            self._record(record, "the split")

    def _clear_pre_split_intent(self, window: set[int], a_status: str) -> int:
        """After the drain, drop the write-intent bits the mirrored era left behind, so the
        rejoin copies only what B changed since the instant.

        ``window`` was opened before A's flush: every write that finished before it is durable
        on A, and B is flushed here.  A region is cleared unless a post-split B-only write
        touched it (recorded at admission, so a write that found its bit set keeps it), or a
        write is in flight to it or finished inside the window (a one-way split's volume 1
        still writes both legs: issue 15, defect 4).  With a failed leg nothing is cleared
        (the bits track what it missed); a failure here only means a rejoin copies more."""
        m = self._m
        bm = m.bitmap
        if bm is None or a_status.startswith("lost") or m.legs.failed:
            return 0
        try:
            m.legs.call(LEG_B, "flush", _flush)
        except StoreError:
            return 0
        with m.mu:
            if m.legs.failed:
                return 0
            keep = set(m.flight.post_split or ()) | window | m.flight.busy_regions()
            victims = [r for r in bm.dirty_regions() if r not in keep]
            gen = bm.clear(victims)
        try:
            bm.sync(gen)
        except OSError as exc:  # the file keeps more bits than memory: safe
            log.error("%s: could not save the bitmap after the split: %s", m.name, exc)
        return len(victims)


def _flush(image: object) -> None:
    image.flush()  # type: ignore[attr-defined]


__all__ = ["LEG_B", "SplitCycle"]
