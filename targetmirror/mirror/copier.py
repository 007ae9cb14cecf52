"""One copy loop for every background copy and for verify, with one throttle and one progress.

Kinds (``Progress.kind``):

* ``sync`` (claim 2): B is filled from A in order below a persisted cursor (regions marked
  below the cursor -- torn by a crash, or missed by a failed B -- are copied again first);
* ``rejoin``, ``repair``, ``recovery``: every region marked when the copy starts is copied
  from the complete leg to the other;
* ``verify``: A and B are compared region by region (and B copied over A where they differ,
  with ``repair``).

Every region is handled under its range lock, so a copy never races a write to the same
blocks.  Per batch the copy makes its work durable -- the destination (sync) or both legs
(resync: a mirrored write that finished after the copy must be durable on both before the
bit may go) -- and only then records progress (the cursor, or cleared bits).  A read, write or
flush that fails stops the copy, keeps its bits and cursor, and reports the failure: a copy
never reports success it did not have (issue 15, defect 2).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from targetmirror.errors import StoreError
from targetmirror.mirror.bitmap import DEFAULT_REGION
from targetmirror.mirror.policy import BOTH, LEG_A, LEG_B, LEG_NAMES

if TYPE_CHECKING:
    from targetmirror.mirror.mirror import Mirror

log = logging.getLogger("targetmirror.mirror")

BATCH_REGIONS = 64
"""Regions per durable batch of a resync (flush both legs, then clear their bits)."""
SYNC_CHUNK_REGIONS = 16
SYNC_BATCH_CHUNKS = 4


@dataclass
class Progress:
    """What a copy (or verify) has done; ``to_json`` is the status API's ``resync``."""

    kind: str
    source: str
    """The leg read from ("a" or "b")."""
    bytes_total: int | None = None
    regions_total: int | None = None
    bytes_copied: int = 0
    regions_done: int = 0
    cursor: int | None = None
    start_cursor: int = 0
    """Where a sync started (it resumes at the persisted cursor)."""
    rate_limit: float | None = None
    resumed: bool = False
    started_wall: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    eta_seconds: float | None = None
    error: str | None = None
    running: bool = True

    @property
    def percent(self) -> float | None:
        if self.regions_total:
            return 100.0 * self.regions_done / self.regions_total
        if self.bytes_total:
            done = self.cursor if self.cursor is not None else self.bytes_copied
            return 100.0 * done / self.bytes_total
        return None if self.running else 100.0

    def update_eta(self) -> None:
        elapsed = time.monotonic() - self.started_mono
        pct = self.percent
        if pct and elapsed > 0:
            self.eta_seconds = max(0.0, elapsed * (100.0 - pct) / pct)

    def describe(self) -> str:
        pct = self.percent
        return f"{self.kind} {pct:.1f}% done" if pct is not None else self.kind

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "from": self.source, "bytes_total": self.bytes_total,
                "regions_total": self.regions_total, "bytes_copied": self.bytes_copied,
                "regions_done": self.regions_done, "cursor": self.cursor,
                "rate_limit": self.rate_limit, "resumed": self.resumed,
                "started_wall": self.started_wall, "eta_seconds": self.eta_seconds,
                "percent": self.percent, "error": self.error, "running": self.running}


def _readv(image: Any, offset: int, iov: list[memoryview]) -> None:
    image.readv(offset, iov)


def _writev(image: Any, offset: int, iov: list[memoryview]) -> None:
    image.writev(offset, iov)


def _flush(image: Any) -> None:
    image.flush()


class Copier:
    """Runs one copy of one mirror at a time; see the module docstring."""

    def __init__(self, m: Mirror) -> None:
        self._m = m
        self.stop = threading.Event()
        self.progress: Progress | None = None

    # -- the loop --------------------------------------------------------------------------
    def _loop(self, items: Iterator[tuple[int, int]], step: Callable[[int, int], None],
              commit: Callable[[], None], batch: int, p: Progress) -> bool:
        """Run ``step(offset, length)`` for each item under its range lock, ``commit()``
        every ``batch`` items and at the end; False if stopped."""
        m = self._m
        pending = 0
        done_bytes = 0
        for off, n in items:
            if self.stop.is_set():
                break
            with m.locks.locked(off, off + n):
                step(off, n)
            done_bytes += n
            pending += 1
            if p.rate_limit:
                ahead = done_bytes / p.rate_limit - (time.monotonic() - p.started_mono)
                if ahead > 0:
                    self.stop.wait(ahead)  # throttle, not synchronisation
            if pending >= batch:
                commit()
                pending = 0
                p.update_eta()
        if pending:
            commit()
            p.update_eta()
        return not self.stop.is_set()

    def _copy_step(self, src: int, dst: int, view: memoryview, p: Progress
                   ) -> Callable[[int, int], None]:
        legs = self._m.legs

        def step(off: int, n: int) -> None:
            legs.call(src, "read", _readv, off, [view[:n]], nbytes=n)
            legs.call(dst, "write", _writev, off, [view[:n]], nbytes=n)
            p.bytes_copied += n
        return step

    # -- sync ------------------------------------------------------------------------------
    def sync(self, p: Progress) -> bool:
        """Fill B from A from the persisted cursor on; True when B is complete."""
        m = self._m
        bm = m.bitmap
        rs = bm.region_size if bm is not None else DEFAULT_REGION
        start = m.records.current.sync_cursor
        p.cursor = p.start_cursor = start
        p.bytes_total = m.size
        buf = memoryview(bytearray(rs * SYNC_CHUNK_REGIONS))
        copy = self._copy_step(LEG_A, LEG_B, buf, p)
        if bm is not None and bm.count and start:
            # regions below the cursor marked by writes that may have been torn (unclean
            # stop) or that B missed (B failed and was repaired): copy them again first
            m.admission.wait_b_only()
            below = [r for r in bm.dirty_regions() if (r << bm.shift) < start]
            items = ((r << bm.shift, min(rs, m.size - (r << bm.shift))) for r in below)
            if not self._loop(items, copy, lambda: self._flush_legs(LEG_B), BATCH_REGIONS, p):
                return False
            if below:
                log.info("%s: re-copied %d marked region(s) below the sync cursor", m.name,
                         len(below))
        chunk = len(buf)
        cursor = [start]

        def chunks() -> Iterator[tuple[int, int]]:
            pos = start
            while pos < m.size:
                n = min(chunk, m.size - pos)
                yield pos, n
                pos += n

        def step(off: int, n: int) -> None:
            copy(off, n)
            cursor[0] = off + n  # the cursor never passes a chunk not copied

        def commit() -> None:
            self._flush_legs(LEG_B)
            pos = cursor[0]

            def change(new: Any) -> None:
                new.sync_cursor = pos
            m.records.commit(change)
            p.cursor = pos

        return self._loop(chunks(), step, commit, SYNC_BATCH_CHUNKS, p)

    # -- resync (rejoin, repair, recovery) -------------------------------------------------
    def resync(self, p: Progress) -> bool:
        """Copy every marked region from the complete leg to the other; True when done.

        Writes admitted to one leg only before the copy began (B-only after a split, or the
        survivor only while a leg was failed) must land -- they mark their regions -- before
        the scan, so none is missed; every write admitted from then on goes to both legs."""
        m = self._m
        bm = m.bitmap
        assert bm is not None
        src = LEG_A if p.source == "a" else LEG_B
        dst = BOTH & ~src
        m.admission.wait_b_only()
        todo = list(bm.dirty_regions())
        p.regions_total = len(todo)
        p.bytes_total = sum(min(bm.region_size, m.size - (r << bm.shift)) for r in todo)
        view = memoryview(bytearray(bm.region_size))
        copy = self._copy_step(src, dst, view, p)
        batch: list[int] = []
        items = ((r << bm.shift, min(bm.region_size, m.size - (r << bm.shift))) for r in todo)

        def step(off: int, n: int) -> None:
            copy(off, n)
            batch.append(off >> bm.shift)  # only a region actually copied may be cleared

        def commit() -> None:
            self._clear_batch(batch)
            p.regions_done += len(batch)
            batch.clear()

        if not self._loop(items, step, commit, BATCH_REGIONS, p):
            return False
        self._flush_legs(dst)
        return True

    def _clear_batch(self, batch: list[int]) -> None:
        """Both legs are durable for the batch; only now may its bits go -- not those of a
        region with a write in flight or one that finished while the legs were flushed."""
        m = self._m
        bm = m.bitmap
        assert bm is not None
        with m.mu:
            window = m.flight.watch()
        try:
            self._flush_legs(BOTH)
        finally:
            with m.mu:
                m.flight.unwatch(window)
        with m.mu:
            busy = m.flight.busy_regions() | window
            gen = bm.clear([r for r in batch if r not in busy])
        bm.sync(gen)

    def _flush_legs(self, legs: int) -> None:
        """fdatasync ``legs``; a failure fails the leg and raises (the copy stops)."""
        m = self._m
        for leg in (LEG_A, LEG_B):
            if legs & leg:
                m.legs.call(leg, "flush", _flush)

    # -- verify ----------------------------------------------------------------------------
    def verify(self, p: Progress, *, offset: int, end: int, repair: bool, split: bool,
               max_report: int) -> dict[str, Any]:
        """Compare A and B over ``[offset, end)``; see ``Mirror.verify``."""
        m = self._m
        bm = m.bitmap
        rs = bm.region_size if bm is not None else DEFAULT_REGION
        a_buf, b_buf = bytearray(rs), bytearray(rs)
        av, bv = memoryview(a_buf), memoryview(b_buf)
        counts = {"checked": 0, "skipped": 0, "mismatches": 0, "repaired": 0, "compared": 0}
        first: list[int] = []
        start = offset - offset % rs
        p.bytes_total = end - start

        def items() -> Iterator[tuple[int, int]]:
            pos = start
            while pos < end:
                n = min(rs, m.size - pos)
                yield pos, n
                pos += n

        def step(pos: int, n: int) -> None:
            # the bit is read under the region's lock: a write that marks it cannot be
            # half done here
            if split and bm is not None and bm.test(pos // rs):
                counts["skipped"] += 1
                p.bytes_copied += n
                return
            m.legs.call(LEG_A, "read", _readv, pos, [av[:n]], nbytes=n)
            m.legs.call(LEG_B, "read", _readv, pos, [bv[:n]], nbytes=n)
            counts["checked"] += 1
            counts["compared"] += n
            p.bytes_copied += n
            if av[:n] != bv[:n]:
                counts["mismatches"] += 1
                if len(first) < max_report:
                    i = next(i for i in range(n) if a_buf[i] != b_buf[i])
                    first.append((pos + i) // m.block_size)
                if repair:
                    m.legs.call(LEG_A, "write", _writev, pos, [bv[:n]], nbytes=n)
                    counts["repaired"] += 1

        self._loop(items(), step, lambda: None, BATCH_REGIONS, p)
        if counts["repaired"]:
            self._flush_legs(LEG_A)
        return counts | {"first": first}

    @staticmethod
    def source_name(leg: int) -> str:
        return LEG_NAMES[leg]


__all__ = ["Copier", "Progress", "StoreError"]
