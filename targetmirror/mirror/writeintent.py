"""The write-intent side of the one bitmap: md's bitmap daemon, and the clean close.

**One bitmap, one rule** (see ``docs/lifecycle.md``): every write marks its regions in the
persistent bitmap, durably, before it is issued to any leg; a bit is cleared only when the
region is known equal *and durable* on both legs with no write to it in flight.  While
mirrored, a write marks its whole write-intent extent (``WI_EXTENT``, DRBD's activity-log
extent size), and a lazy clear pass every ``wi_interval`` seconds clears idle extents, so hot
regions pay one bitmap sync, not one per write.

Every clear here follows the same three steps: open a window on finished writes
(``Flight.watch``), fdatasync both legs, then -- under the admission lock -- clear only marked
regions with no write in flight that did not finish inside the window.  A write that finished
before the window opened is durable on both legs; any later one keeps its bit.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from targetmirror.errors import StoreError
from targetmirror.mirror.policy import BOTH, LEG_A, LEG_B
from targetmirror.mirror.state import State

if TYPE_CHECKING:
    from targetmirror.mirror.bitmap import Bitmap
    from targetmirror.mirror.mirror import Mirror

log = logging.getLogger("targetmirror.mirror")

WI_INTERVAL = 5.0
"""Seconds between write-intent clear passes (md's bitmap daemon uses a few seconds too)."""
WI_EXTENT = 4 << 20
"""While mirrored (both legs healthy), a write marks the whole write-intent extent around it
(DRBD's activity-log extents are 4 MiB too): a random writer over a working set pays one bitmap
sync per extent, not per 64 KiB region, and after a crash at most the extents in use are
copied.  Writes that go to one leg only (after a split, with a failed leg) or arrive while a
copy runs mark their regions exactly, so a rejoin or repair copies only what changed."""


def _env_ahead(default: int = 3) -> int:
    raw = os.environ.get("TARGETMIRROR_WI_AHEAD", "")
    try:
        return max(0, int(raw)) if raw else default
    except ValueError:
        log.warning("TARGETMIRROR_WI_AHEAD=%r: expected a count of extents (e.g. 0 or 3); "
                    "using %d", raw, default)
        return default


WI_AHEAD = _env_ahead()
"""A mirrored write that must mark its extent, enters it at its start (or crosses into it)
and finds the extent before it marked is most likely part of a stream moving forward: it
marks this many extents beyond its own in the same bitmap sync, so a sequential writer pays
one sync per 1 + WI_AHEAD extents instead of one per extent (in the lab, 1 MiB sequential
writes left the express lane for Python at every fourth command, each such stop taking the
rest of its batch along).  The cost is at most WI_AHEAD extents more to copy after a crash,
until the next clear pass spares them no more.  The environment variable is the benchmark's
A/B switch (0: off)."""


def wi_span(extent: int, offset: int, length: int) -> tuple[int, int]:
    """The write-intent extents (of ``extent`` bytes) around a mirrored write."""
    mask = extent - 1
    start = offset & ~mask
    return start, ((offset + max(length, 1) + mask) & ~mask) - start


def wi_mark(bm: Bitmap, extent: int, size: int, offset: int, length: int,
            ahead: int = WI_AHEAD) -> int:
    """Mark the write-intent extents around a mirrored write (``Bitmap.mark``'s answer: a
    generation to sync to, or 0).  When the write has to mark (or wait for a sync), enters
    its extent at the extent's start (or crosses into it) and the extent before it is marked,
    ``ahead`` extents after it are marked too (see WI_AHEAD); never when its own bits are set
    and durable, so marking ahead adds no sync of its own."""
    start, span = wi_span(extent, offset, length)
    gen = bm.mark(start, span)
    within = offset & (extent - 1)
    # a stream enters an extent at its first byte, or with a write that crosses into it; a
    # random writer almost never does (a 4 KiB one in 1 of 1,024 writes), so it does not
    # mark ahead: its repair after a leg failure copies what it touched, not 12 MiB more
    entering = within == 0 or within + length > extent
    if (gen and ahead > 0 and entering and start > 0
            and bm.test((start - 1) >> bm.shift)):
        end = min(start + span + ahead * extent, size)
        if end > start + span:
            gen = max(gen, bm.mark(start + span, end - start - span))
    return gen


def _flush(image: object) -> None:
    image.flush()  # type: ignore[attr-defined]


class WriteIntent:
    """The lazy clear pass and the clean close of one mirror."""

    def __init__(self, m: Mirror) -> None:
        self._m = m
        self._lock = threading.Lock()
        self.clears = 0
        self.cleared = 0

    def flush_both(self) -> bool:
        """fdatasync both live legs; False if either failed (its leg is then failed)."""
        m = self._m
        ok = True
        for leg in (LEG_A, LEG_B):
            if not m.legs.failed & leg:
                try:
                    m.legs.call(leg, "flush", _flush)
                except StoreError:
                    ok = False
        return ok

    def clear_pass(self) -> int:
        """One clear pass (md's bitmap daemon): return how many bits were cleared.

        Only while mirrored with both legs healthy.  The regions touched since the previous
        pass are remembered and spared (a hot extent keeps all its bits: clearing part of it
        would cost its next write a sync for nothing).  The express lane is kept out for the
        pass: it writes without marking, trusting bits that are set."""
        m = self._m
        bm = m.bitmap
        if bm is None or not m.write_intent:
            return 0
        with self._lock, m.lane.blocked():
            with m.mu:
                if (m.cached_view.state != State.MIRRORED or m.legs.failed or not bm.count):
                    m.flight.touched = set()
                    return 0
                spared = m.flight.touched
                m.flight.touched = set()
                epoch = m.records.current.epoch
                window = m.flight.watch()
            try:
                ok = self.flush_both()
            finally:
                with m.mu:
                    m.flight.unwatch(window)
            with m.mu:
                if (not ok or m.cached_view.state != State.MIRRORED or m.legs.failed
                        or m.records.current.epoch != epoch):
                    return 0
                k = max((m.wi_extent >> bm.shift).bit_length() - 1, 0)
                hot = {r >> k for r in spared | window | m.flight.busy_regions()}
                victims = [r for r in bm.dirty_regions() if r >> k not in hot]
                gen = bm.clear(victims)
            bm.sync(gen)
            self.clears += 1
            self.cleared += len(victims)
            return len(victims)

    def close_clean(self) -> None:
        """A clean close: both live legs fdatasync'ed; while mirrored and healthy every
        write-intent bit is cleared (nothing is in flight); then the state says clean, so the
        next open resyncs nothing.  A failure leaves ``clean: false``: the next start resyncs
        the marked regions, which is safe."""
        m = self._m
        if m.records.store is None:
            return
        with m.mu:
            window = m.flight.watch()
        try:
            ok = self.flush_both()
        finally:
            with m.mu:
                m.flight.unwatch(window)
        bm = m.bitmap
        gen = 0
        with m.mu:
            if (ok and bm is not None and m.cached_view.state == State.MIRRORED
                    and not m.legs.failed and not m.flight.busy and not window
                    and m.write_intent):
                gen = bm.clear(list(bm.dirty_regions()))
        if bm is not None:
            bm.sync(gen)
        if not ok:
            raise StoreError(f"mirror {m.name}: a leg could not be flushed at close",
                             kind="flush")

        def change(new: object) -> None:
            new.clean = True  # type: ignore[attr-defined]
        m.records.commit(change)


__all__ = ["BOTH", "WI_AHEAD", "WI_EXTENT", "WI_INTERVAL", "WriteIntent", "wi_mark", "wi_span"]
