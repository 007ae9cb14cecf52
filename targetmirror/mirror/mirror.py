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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from targetmirror.errors import MirrorError, StoreError
from targetmirror.mirror.bitmap import DEFAULT_REGION, Bitmap
from targetmirror.mirror.rangelock import RangeLock
from targetmirror.mirror.state import MirrorState, SplitRecord, State, StateStore
from targetmirror.store.image import Image

T = TypeVar("T")
log = logging.getLogger("targetmirror.mirror")

PARALLEL_THRESHOLD = 64 * 1024


class MirrorIO:
    """One command's view of the mirror (a ``BlockBackend``): its legs and its lock ticket.

    Created by :meth:`Mirror.admit` on the ring thread; used by one worker; :meth:`finish`
    must be called exactly once when the command is done, whatever happened.
    """

    __slots__ = ("_extent", "_granted", "_m", "_ticket", "a_done", "b_done", "both", "tag")

    def __init__(self, m: Mirror, tag: int, both: bool, extent: tuple[int, int] | None,
                 ticket: int | None, granted: bool = False) -> None:
        self._m = m
        self.tag = tag
        self.both = both
        self._extent = extent
        self._ticket = ticket
        self._granted = granted
        self.a_done = False
        """Set when this command's write reached leg A (for the stuck-command watchdog)."""
        self.b_done = False

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
        self._m.b.readv(offset, iov)

    def _mark(self, offset: int, length: int) -> None:
        """A B-only change: its regions are durably marked *before* B is written, so a crash
        can never leave B changed in a region the bitmap calls clean."""
        bm = self._m.bitmap
        if bm is not None and not self.both:
            bm.sync(bm.mark(offset, length))

    def write(self, offset: int, iov: Sequence[memoryview], fua: bool) -> None:
        length = sum(len(v) for v in iov)
        with self._range(offset, offset + length):
            self._mark(offset, length)
            self._m._write_legs(self.both, offset, iov, fua or not self._m.write_cache, length,
                                self)

    def flush(self) -> None:
        m = self._m
        if self.both and not m.a.frozen:
            m._both(m.a.flush, m.b.flush, parallel=True)
        else:
            m.b.flush()

    def unmap(self, offset: int, length: int) -> None:
        with self._range(offset, offset + length):
            self._mark(offset, length)
            self._m._legs_call(self.both, lambda img: img.discard(offset, length))

    def write_zeroes(self, offset: int, length: int) -> None:
        with self._range(offset, offset + length):
            self._mark(offset, length)
            self._m._legs_call(self.both, lambda img: img.write_zeroes(offset, length))

    def compare_and_write(self, offset: int, verify: memoryview, data: memoryview) -> int | None:
        length = len(verify)
        with self._range(offset, offset + length):
            current = bytearray(length)
            self._m._read_leg().readv(offset, [memoryview(current)])
            if current != verify:
                for i in range(length):
                    if current[i] != verify[i]:
                        return i
            self._mark(offset, len(data))
            self._m._write_legs(self.both, offset, [data], not self._m.write_cache, len(data))
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
            self._m._finished(self.tag, self.both)


class Mirror:
    """Two images kept identical until a split; see the module docstring."""

    def __init__(self, name: str, a: Image, b: Image, *, size: int, block_size: int = 512,
                 write_cache: bool = True, parallel_threshold: int = PARALLEL_THRESHOLD,
                 store: StateStore | None = None, region_size: int = DEFAULT_REGION) -> None:
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
        self.bitmap: Bitmap | None = None
        if store is not None:
            saved = store.load(name)
            rs = saved.region_size if saved is not None else region_size
            self.bitmap = Bitmap(store.bitmap_path(name), size, rs)
        self.st = self._load_state()
        self.st.region_size = self.bitmap.region_size if self.bitmap else region_size
        if (self.bitmap is not None and self.bitmap.created
                and self.st.state in (State.SPLIT, State.ONE_WAY, State.REJOINING)):
            # B may differ from A anywhere: without its bitmap a rejoin must copy everything.
            log.warning("%s: the change bitmap is missing or damaged while %s; marking every "
                        "region, so the rejoin will copy the whole image", self.name,
                        self.st.state)
            self.bitmap.sync(self.bitmap.mark_all())

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

    def _read_leg(self) -> Image:
        """B, the live leg -- except during an initial sync, when only A is complete."""
        return self.a if self.st.state == State.SYNCING else self.b

    def resume(self) -> None:
        """After start-up: finish a rejoin or initial sync the daemon was doing when it
        stopped."""
        if self.st.state == State.SYNCING:
            log.warning("%s: resuming the initial sync at byte %d of %d", self.name,
                        self.st.sync_cursor, self.size)
            self._start_copier(self._sync_run, None, True)
            return
        if self.st.state == State.REJOINING:
            log.warning("%s: resuming the rejoin that was running when the daemon stopped "
                        "(%d regions left)", self.name, self.bitmap.count if self.bitmap else 0)
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
        with self._mu:
            # decided under the lock that rejoin() takes, so a command is never sent to B only
            # once a rejoin has started (it would be missed by the copy)
            split_epoch = self._split_epoch()
            both = (split_epoch is None or tag < split_epoch
                    or self.st.state == State.REJOINING
                    or (volume == 1 and self.st.split is not None and self.st.split.one_way))
            if extent is not None:
                self._inflight[tag] = self._inflight.get(tag, 0) + 1
                if not both:
                    self._b_only += 1
        granted = False
        if extent is not None:
            ticket, granted = self.locks.take(extent[0], extent[1])
        return MirrorIO(self, tag, both, extent, ticket, granted)

    def _finished(self, tag: int, both: bool = True) -> None:
        with self._mu:
            n = self._inflight[tag] - 1
            if n:
                self._inflight[tag] = n
            else:
                del self._inflight[tag]
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
        if self.store:
            self.store.save(self.st)

    def abort_split(self) -> None:
        """Undo :meth:`prepare_split` when the instant was never taken (a group peer failed)."""
        assert self.st.split is not None
        self.st.epoch -= 1
        self.st.split = None
        self.st.state = State.MIRRORED
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
            self.a.flush()
            rec.a_status = "one-way" if rec.one_way else "consistent"
        except StoreError as exc:
            rec.a_status = f"flush failed: {exc}"
            log.error("%s: fdatasync of A after the split failed: %s", self.name, exc)
        if not rec.one_way:
            self.a.freeze()
        with self._mu:
            rec.completed_wall = time.time()
            rec.drain_seconds = time.monotonic() - self._instant_mono
            rec.pre_split_drained = self._pre_at_boundary
            self.st.state = State.ONE_WAY if rec.one_way else State.SPLIT
            if self.store:
                self.store.save(self.st)
        log.info("%s: split complete: epoch %d, %d pre-split write(s) drained in %.6f s, A %s",
                 self.name, rec.epoch, rec.pre_split_drained, rec.drain_seconds, rec.a_status,
                 extra={"device": self.name, "epoch": rec.epoch})
        self.split_complete.set()

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
            while pos < self.size and not self._resync_stop.is_set():
                n = min(len(buf), self.size - pos)
                with self.locks.locked(pos, pos + n):
                    self.a.readv(pos, [view[:n]])
                    self.b.writev(pos, [view[:n]])
                pos += n
                copied += n
                if rate:
                    ahead = copied / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        self._resync_stop.wait(ahead)  # throttle, not synchronisation
                if copied % (4 * len(buf)) == 0 or pos >= self.size:
                    self.b.flush()
                    with self._mu:
                        self.st.sync_cursor = pos
                        if self.store:
                            self.store.save(self.st)
                progress.update(cursor=pos, bytes_copied=copied)
                elapsed = time.monotonic() - t0
                if elapsed > 0 and copied:
                    progress["eta_seconds"] = (self.size - pos) * elapsed / copied
            if self._resync_stop.is_set():
                self.b.flush()
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
        bm = self.bitmap
        assert bm is not None
        t0 = time.monotonic()
        progress: dict[str, Any] = {"kind": "rejoin", "regions_total": None, "regions_done": 0,
                                    "bytes_copied": 0, "rate_limit": rate, "resumed": resumed,
                                    "started_wall": time.time(), "eta_seconds": None}
        self.resync = progress
        try:
            # Writes admitted before the rejoin may still go to B only: let them land (they
            # mark their regions) before copying, so none is missed.
            with self._cv:
                self._cv.wait_for(lambda: self._b_only == 0)
            total = bm.count
            progress["regions_total"] = total
            buf = bytearray(bm.region_size)
            view = memoryview(buf)
            copied = 0
            while bm.count and not self._resync_stop.is_set():
                batch: list[int] = []
                for region in bm.dirty_regions():
                    if self._resync_stop.is_set():
                        break
                    off = region << bm.shift
                    n = min(bm.region_size, self.size - off)
                    with self.locks.locked(off, off + n):
                        self.b.readv(off, [view[:n]])
                        self.a.writev(off, [view[:n]])
                    batch.append(region)
                    copied += n
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
                log.info("%s: rejoin stopped with %d regions left; it resumes at the next start",
                         self.name, bm.count)
                return
            self.a.flush()
            with self._mu:
                self.st.state = State.MIRRORED
                self.st.epoch += 1
                self.st.last_rejoin = {
                    "completed_wall": time.time(), "seconds": time.monotonic() - t0,
                    "bytes_copied": copied, "regions": total, "resumed": resumed}
                if self.store:
                    self.store.save(self.st)
            log.info("%s: rejoin complete: %d regions, %d bytes copied in %.3f s; mirrored "
                     "again (epoch %d)", self.name, total, copied, time.monotonic() - t0,
                     self.st.epoch, extra={"device": self.name, "epoch": self.st.epoch})
            self.rejoin_complete.set()
        except (StoreError, OSError) as exc:
            progress["error"] = str(exc)
            log.error("%s: rejoin failed: %s; the mirror stays %s and can be retried",
                      self.name, exc, self.st.state)
        finally:
            self.resync = None if self.rejoin_complete.is_set() else progress

    def _commit_batch(self, batch: list[int], progress: dict[str, Any], t0: float,
                      total: int) -> None:
        """A is durable for the batch; only now may its bits go."""
        assert self.bitmap is not None
        self.a.flush()
        self.bitmap.sync(self.bitmap.clear(batch))
        done = total - self.bitmap.count
        progress["regions_done"] = done
        elapsed = time.monotonic() - t0
        if done and elapsed > 0:
            progress["eta_seconds"] = (total - done) * elapsed / done

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
            }

    # -- leg helpers -------------------------------------------------------------------------
    def _both(self, fn_a: Callable[[], T], fn_b: Callable[[], T], parallel: bool) -> None:
        """Run one operation on each leg, in parallel if asked; raise the first failure."""
        if not parallel:
            fn_a()
            fn_b()
            return
        fut: Future[T] = self._pool.submit(fn_a)
        err: BaseException | None = None
        try:
            fn_b()
        except BaseException as exc:
            err = exc
        fut.result()  # A's error wins: it is raised here
        if err is not None:
            raise err

    def _write_legs(self, both: bool, offset: int, iov: Sequence[memoryview], durable: bool,
                    length: int, io: MirrorIO | None = None) -> None:
        if not both:
            self.b.writev(offset, iov)
            if durable:
                self.b.flush()
            if io is not None:
                io.b_done = True
            return

        def leg(image: Image) -> Callable[[], None]:
            def run() -> None:
                image.writev(offset, iov)
                if durable:
                    image.flush()
                if io is not None:
                    if image is self.a:
                        io.a_done = True
                    else:
                        io.b_done = True
            return run

        self._both(leg(self.a), leg(self.b), length >= self.parallel_threshold or durable)

    def _legs_call(self, both: bool, op: Callable[[Image], None]) -> None:
        if both:
            self._both(lambda: op(self.a), lambda: op(self.b), parallel=True)
        else:
            op(self.b)

    # -- BlockBackend on the mirror itself (tools and tests; the daemon uses admit) -----------
    def _io(self) -> MirrorIO:
        return self.admit(self.epoch, None)

    def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        self._read_leg().readv(offset, iov)

    def write(self, offset: int, iov: Sequence[memoryview], fua: bool) -> None:
        self._io().write(offset, iov, fua)

    def flush(self) -> None:
        self._io().flush()

    def unmap(self, offset: int, length: int) -> None:
        self._io().unmap(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._io().write_zeroes(offset, length)

    def compare_and_write(self, offset: int, verify: memoryview,
                          data: memoryview) -> int | None:
        return self._io().compare_and_write(offset, verify, data)

    def close(self) -> None:
        """Close both legs (after in-flight commands are done)."""
        if self._closed:
            return
        self._closed = True
        self.stop_resync()
        self._pool.shutdown(wait=True)
        if self.bitmap is not None:
            self.bitmap.close()
        self.a.close()
        self.b.close()
