"""The two legs of a mirror: their images, which of them failed, and every call in progress.

Every read, write, flush or discard of a leg goes through :meth:`Legs.call`, which

* checks that the leg is not failed and registers the call **in one step** under the legs'
  lock, so a repair that swaps a failed leg's image waits until no call is left and no new call
  can slip in between a failed-check and its registration (a late call on a swapped-out image
  would write a closed, or worse a reused, file descriptor);
* runs the call in the calling thread (a hand-off per 4 KiB write costs more than the write:
  see ``benchmarks/host_mirror.py``);
* on an I/O error hands the leg to the mirror's failure handler, which persists the failure.

**Deadlines.**  The call table holds when each call started and what it is.  The mirror's
housekeeping thread asks :meth:`Legs.overdue` for legs whose oldest call is older than its
deadline (:class:`Deadlines`) and fails them: no new command is sent to such a leg and every
command completes on the survivor.  The calls already inside a hung syscall cannot be taken
back (a blocking ``pwritev`` in uninterruptible sleep cannot be abandoned, and answering a read
before its ``preadv`` returns would let a late transfer land in a data area the kernel has
reused); they finish when the syscall returns.  The express lane's calls are covered too: while
a lane lease is out the lane stores each call's start time in :attr:`Legs.lane_clock`.

Once :meth:`Legs.close` has begun, a call raises :class:`LegsClosed` and never fails a leg:
a shutdown is not a medium error (issue 15, defect 3).
"""

from __future__ import annotations

import bisect
import errno as errno_mod
import itertools
import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from targetmirror.errors import FrozenImageError, MirrorBusy, MirrorError, StoreError
from targetmirror.mirror.policy import BOTH, LEG_A, LEG_B, LEG_NAMES
from targetmirror.store.image import Image

T = TypeVar("T")
log = logging.getLogger("targetmirror.mirror")

LEG_TIMEOUT = 20.0
"""A data read or write unanswered this long fails its leg (below LIO's default 30 s
cmd_time_out, so the survivor answers new commands before initiators give up on them)."""
FLUSH_TIMEOUT = 60.0
DISCARD_TIMEOUT = 30.0
DISCARD_PIECE = 64 << 20
SLOW = 1.0
_MIB = 1 << 20


class LegsClosed(StoreError):
    """The mirror is closing: the call was not made (and no leg is failed for it)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"mirror {name} is closing", kind="closed")


ADVISORY = frozenset({"discard", "zeroing"})
"""Kinds of call that never fail a leg, by error or by time: a discard is a hint the
initiator may not rely on, and its failure is made good by writing zeros (see
``Legs.discard``)."""


@dataclass(frozen=True)
class Deadlines:
    """How long a leg call may go unanswered before the leg is failed (seconds; None: never).

    md and DRBD never fail a member for being slow, only for failing; the SCSI layer's own
    command timeout decides when an initiator gives up.  So only a leg that *stops answering*
    is failed: a data call gets ``read``/``write`` seconds (plus ``per_mib`` per MiB beyond the
    first: a large transfer on a busy device is not a dead device), a flush ``flush`` seconds
    (thin pools, SAN LUNs and busy RBD pools routinely take seconds to flush).  Discards and
    zeroing are cut into ``piece``-byte calls; a piece slower than ``discard`` is logged and
    counted, never failed.  A call older than ``slow`` makes the leg "slow" in status."""

    read: float | None = LEG_TIMEOUT
    write: float | None = LEG_TIMEOUT
    per_mib: float = 1.0
    flush: float | None = FLUSH_TIMEOUT
    discard: float | None = DISCARD_TIMEOUT
    piece: int = DISCARD_PIECE
    slow: float = SLOW

    def __post_init__(self) -> None:
        for name in ("read", "write", "flush", "discard"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise MirrorError(f"deadline {name}={v}: expected a positive number of "
                                  "seconds (or none)")
        if self.piece < 4096 or self.piece % 4096:
            raise MirrorError(f"discard piece {self.piece}: expected a multiple of 4096")
        if self.per_mib < 0 or self.slow <= 0:
            raise MirrorError(f"deadlines per_mib={self.per_mib} slow={self.slow}: expected "
                              "per_mib >= 0 and slow > 0")

    @classmethod
    def with_timeout(cls, timeout: float | None) -> Deadlines:
        """The defaults with data calls failing after ``timeout`` (``leg_timeout``); None
        turns every deadline off (tests)."""
        if timeout is None:
            return cls(read=None, write=None, flush=None, discard=None)
        return cls(read=timeout, write=timeout, flush=max(timeout, FLUSH_TIMEOUT))

    def for_call(self, what: str, nbytes: int) -> float | None:
        """The failure deadline of one call (for an advisory kind: its slow deadline)."""
        if what in ADVISORY:
            return self.discard
        if what == "flush":
            return self.flush
        base = self.read if what == "read" else self.write
        if base is None:
            return None
        return base + self.per_mib * max(0, nbytes - _MIB) / _MIB


LAT_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
              0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the per-leg latency buckets; one more bucket is +Inf."""


class LegStats:
    """What one leg's calls took (the daemon's life): counts and latency buckets.  Written by
    the calling threads with plain integer additions (a lost update under a race costs one
    sample, never correctness); read at status time."""

    __slots__ = ("buckets", "calls", "discard_fallbacks", "discards_slow", "max", "seconds",
                 "slow_calls")

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0
        self.max = 0.0
        self.buckets = [0] * (len(LAT_BOUNDS) + 1)
        self.slow_calls = 0
        self.discard_fallbacks = 0
        self.discards_slow = 0

    def record(self, dt: float, slow: float) -> None:
        self.calls += 1
        self.seconds += dt
        if dt > self.max:
            self.max = dt
        self.buckets[bisect.bisect_left(LAT_BOUNDS, dt)] += 1
        if dt > slow:
            self.slow_calls += 1

    def quantile(self, q: float) -> float:
        """An upper estimate of the ``q`` quantile (the bound of its bucket)."""
        if not self.calls:
            return 0.0
        want = q * self.calls
        acc = 0
        for i, n in enumerate(self.buckets):
            acc += n
            if acc >= want:
                return LAT_BOUNDS[i] if i < len(LAT_BOUNDS) else self.max
        return self.max


_CLOCK = struct.Struct("<qq")


class Legs:
    """Leg A and leg B of one mirror; see the module docstring."""

    def __init__(self, name: str, a: Image, b: Image, *, deadlines: Deadlines,
                 on_fail: Callable[[int, StoreError], bool]) -> None:
        self.name = name
        self.images = {LEG_A: a, LEG_B: b}
        self.deadlines = deadlines
        self._on_fail = on_fail
        self.failed = 0
        """Failed legs right now (LEG_A | LEG_B): set the moment a call fails, before the
        failure is persisted, so nothing more is sent to the leg."""
        self._mu = threading.Lock()
        self._idle = threading.Condition(self._mu)
        self._calls: dict[int, dict[int, tuple[float, str, int]]] = {LEG_A: {}, LEG_B: {}}
        self._keys = itertools.count(1)
        self._waiters = 0
        """Threads waiting in :meth:`swap` or :meth:`close` for a leg's calls to end."""
        self._closing = False
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"{name}-leg")
        self.lane_clock = bytearray(_CLOCK.size)
        """Start time (CLOCK_MONOTONIC ns, 0 = idle) of the express lane's call on A and B."""
        self.stats = {LEG_A: LegStats(), LEG_B: LegStats()}

    # -- images ----------------------------------------------------------------------------
    @property
    def a(self) -> Image:
        return self.images[LEG_A]

    @property
    def b(self) -> Image:
        return self.images[LEG_B]

    def image(self, leg: int) -> Image:
        return self.images[leg]

    # -- calls -----------------------------------------------------------------------------
    def _enter(self, leg: int, what: str, nbytes: int) -> tuple[int, Image] | None:
        # Lock-free on the hot path (four of these per mirrored write): register first, then
        # check.  A repair swaps a leg only once it is failed and no call is registered, so a
        # call that registered before the swap looked is waited for, and one that registered
        # after it sees the leg failed and withdraws.  (Dict updates and ``next`` on a count
        # are atomic under the GIL.)
        if self._closing:
            raise LegsClosed(self.name)
        key = next(self._keys)
        calls = self._calls[leg]
        calls[key] = (time.monotonic(), what, nbytes)
        if self.failed & leg or self._closing:
            self._leave(leg, key)
            if self._closing:
                raise LegsClosed(self.name)
            return None
        return key, self.images[leg]

    def _leave(self, leg: int, key: int) -> None:
        calls = self._calls[leg]
        start, what, _n = calls.pop(key)
        dt = time.monotonic() - start
        st = self.stats[leg]
        st.record(dt, self.deadlines.slow)
        if what in ADVISORY:
            limit = self.deadlines.discard
            if limit is not None and dt > limit:
                st.discards_slow += 1
                log.warning("%s: a %s on leg %s took %.1f s (more than %g s); the leg is slow, "
                            "not failed", self.name, what, LEG_NAMES[leg].upper(), dt, limit)
        if self._waiters and not calls:
            with self._idle:
                self._idle.notify_all()

    def call(self, leg: int, what: str, fn: Callable[..., T], *args: Any,
             nbytes: int = 0, advisory: bool = False) -> T:
        """Run ``fn(image, *args)`` on ``leg``; on failure fail the leg and raise (an
        ``advisory`` call only raises: see :meth:`discard`).

        Raises :class:`StoreError` if the leg is failed already (nothing is run)."""
        entered = self._enter(leg, what, nbytes)
        if entered is None:
            raise StoreError(f"mirror {self.name}: leg {LEG_NAMES[leg].upper()} is failed",
                             kind="failed")
        key, image = entered
        try:
            return fn(image, *args)
        except StoreError as exc:
            if not advisory and not isinstance(exc, (FrozenImageError, LegsClosed)):
                self.fail(leg, exc)
            raise
        except OSError as exc:
            err = StoreError(f"{what} on {image.path} failed: {exc}", kind=what,
                             path=image.path, errno=exc.errno)
            if not advisory:
                self.fail(leg, err)
            raise err from exc
        finally:
            self._leave(leg, key)

    def discard(self, leg: int, offset: int, length: int, zeroing: bool) -> None:
        """Discard (or zero) ``[offset, offset+length)`` of ``leg`` in pieces of at most
        ``deadlines.piece`` bytes.

        A piece is advisory: if it fails, the same bytes are written as zeros instead, so the
        range reads back as zeros on every leg (we report LBPRZ, and WRITE SAME promises the
        zeros); only a failure of that zero write fails the leg.  A piece that is merely slow
        is counted and logged (in :meth:`_leave`), never failed."""
        what = "zeroing" if zeroing else "discard"
        piece = self.deadlines.piece
        pos, end = offset, offset + length
        while pos < end:
            n = min(piece, end - pos)
            try:
                self.call(leg, what, _discard_fn(zeroing), pos, n, nbytes=n, advisory=True)
            except (FrozenImageError, LegsClosed):
                raise
            except StoreError as exc:
                if exc.kind == "failed":
                    raise
                self.stats[leg].discard_fallbacks += 1
                log.warning("%s: %s of %d bytes at %d on leg %s failed (%s); writing zeros "
                            "there instead", self.name, what, n, pos, LEG_NAMES[leg].upper(),
                            exc)
                self.call(leg, "write", _fill_zeroes, pos, n, nbytes=n)
            pos += n

    def mark_failed(self, leg: int) -> None:
        """Fail ``leg`` in memory only: its failure was saved already (a healthy leg retired
        by ``repair --replace``)."""
        with self._mu:
            self.failed |= leg

    def fail(self, leg: int, exc: StoreError) -> bool:
        """Mark ``leg`` failed now and have the mirror persist it; True if the failure is
        durable (or was already)."""
        with self._mu:
            self.failed |= leg
        return self._on_fail(leg, exc)

    def run(self, legs: int, what: str, op: Callable[[Image], None], *, parallel: bool,
            nbytes: int = 0) -> tuple[int, StoreError | None]:
        """Run ``op`` on each leg of ``legs`` that is not failed (both at once if
        ``parallel``); return the legs that did it and the last error."""
        legs &= ~self.failed
        if legs == BOTH and parallel:
            return self.run_each(legs, lambda leg: self.call(leg, what, op, nbytes=nbytes))
        err: StoreError | None = None
        done = 0
        for leg in (LEG_A, LEG_B):
            if legs & leg:
                try:
                    self.call(leg, what, op, nbytes=nbytes)
                    done |= leg
                except StoreError as exc:
                    err = exc
        return done, err

    def run_each(self, legs: int, fn: Callable[[int], None]) -> tuple[int, StoreError | None]:
        """``fn(leg)`` for each leg of ``legs`` that is not failed, both at once; return the
        legs that did it and the last error."""
        legs &= ~self.failed
        err: StoreError | None = None
        done = 0
        fut: Future[None] | None = None
        if legs == BOTH:
            fut = self._pool.submit(fn, LEG_A)
            legs = LEG_B
        for leg in (LEG_A, LEG_B):
            if legs & leg:
                try:
                    fn(leg)
                    done |= leg
                except StoreError as exc:
                    err = exc
        if fut is not None:
            try:
                fut.result()
                done |= LEG_A
            except StoreError as exc:
                err = exc
        return done, err

    def writer(self, offset: int, iov: Sequence[memoryview],
               done: Callable[[int], None] | None = None) -> Callable[[Image], None]:
        """The per-leg operation of a data write (``done(leg)`` when it reached a leg)."""
        a = self.images[LEG_A]

        def op(image: Image) -> None:
            image.writev(offset, iov)
            if done is not None:
                done(LEG_A if image is a else LEG_B)
        return op

    def write_through(self, leg: int, offset: int, iov: Sequence[memoryview], nbytes: int,
                      done: Callable[[int], None] | None = None) -> None:
        """A write that must be durable when it returns (FUA, write cache off): the write
        and the fdatasync are two calls, each under its own deadline."""
        self.call(leg, "write", _writev, offset, iov, nbytes=nbytes)
        self.call(leg, "flush", _flush)
        if done is not None:
            done(leg)

    # -- deadlines -------------------------------------------------------------------------
    def overdue(self, now: float | None = None) -> list[tuple[int, StoreError]]:
        """Healthy legs with a call older than its deadline, each with the error to fail it
        with (the housekeeping thread fails them)."""
        now = time.monotonic() if now is None else now
        lane = _CLOCK.unpack(self.lane_clock)
        out = []
        with self._mu:
            for leg, calls in self._calls.items():
                if self.failed & leg:
                    continue
                worst: tuple[float, str, int, float] | None = None
                for start, what, nbytes in list(calls.values()):  # atomic copy (C)
                    if what in ADVISORY:
                        continue  # slow, never failed (counted when it returns)
                    limit = self.deadlines.for_call(what, nbytes)
                    if limit is not None and now - start > limit and (
                            worst is None or now - start - limit > worst[3]):
                        worst = (start, what, nbytes, now - start - limit)
                started_ns = lane[0 if leg == LEG_A else 1]
                limit = self.deadlines.for_call("write", 0)
                if started_ns and limit is not None and now - started_ns / 1e9 > limit:
                    worst = (started_ns / 1e9, "express lane I/O", 0, 0.0)
                if worst is not None:
                    path = self.images[leg].path
                    age = now - worst[0]
                    limit = self.deadlines.for_call(worst[1], worst[2])
                    out.append((leg, StoreError(
                        f"{worst[1]} on {path} has not returned after {age:.1f} s (leg "
                        f"timeout {limit:g} s)", kind="timeout", path=path,
                        errno=errno_mod.ETIMEDOUT)))
        return out

    def calls(self, leg: int) -> int:
        """Calls to ``leg`` in progress."""
        return len(self._calls[leg])

    def health_of(self, leg: int, now: float | None = None) -> dict[str, Any]:
        """How ``leg`` is answering: slow or not, calls in flight and the oldest one's age,
        latency quantiles over the daemon's life (seconds), slow and discard counters."""
        now = time.monotonic() if now is None else now
        starts = [c[0] for c in list(self._calls[leg].values())]
        lane = _CLOCK.unpack(self.lane_clock)[0 if leg == LEG_A else 1]
        if lane:
            starts.append(lane / 1e9)
        oldest = max((now - t for t in starts), default=0.0)
        st = self.stats[leg]
        return {"slow": oldest > self.deadlines.slow, "inflight": len(starts),
                "oldest_call_seconds": oldest,
                "latency": {"calls": st.calls, "p50": st.quantile(0.5),
                            "p90": st.quantile(0.9), "p99": st.quantile(0.99), "max": st.max},
                "slow_calls": st.slow_calls, "discard_fallbacks": st.discard_fallbacks,
                "discards_slow": st.discards_slow}

    # -- repair ----------------------------------------------------------------------------
    def swap(self, leg: int, new: Image, timeout: float) -> Image:
        """Put ``new`` in place of failed ``leg`` once no call to it is left; return the old
        image (the caller closes it).  Raise :class:`StoreError` if calls are still in
        progress after ``timeout`` seconds.  The leg stays failed: :meth:`revive` brings it
        back once the mirror has recorded the repair."""
        with self._idle:
            assert self.failed & leg, "only a failed leg is swapped"
            self._waiters += 1
            try:
                idle = self._idle.wait_for(lambda: not self._calls[leg], timeout)
            finally:
                self._waiters -= 1
            if not idle:
                raise MirrorBusy(f"mirror {self.name}: {len(self._calls[leg])} call(s) to leg "
                                 f"{LEG_NAMES[leg].upper()} have still not returned; try "
                                 "again later")
            old = self.images[leg]
            self.images[leg] = new
            return old

    def revive(self, leg: int) -> None:
        with self._mu:
            self.failed &= ~leg

    # -- shutdown --------------------------------------------------------------------------
    def close(self, wait: float = 30.0) -> None:
        """Refuse new calls, let the calls in progress end (up to ``wait`` seconds), close
        both images.  An image with a call still inside a hung syscall is left open: closing
        it would let the kernel reuse its descriptor under that call."""
        with self._idle:
            self._closing = True
            self._waiters += 1
            try:
                self._idle.wait_for(lambda: not any(self._calls.values()), wait)
            finally:
                self._waiters -= 1
            busy = [leg for leg, calls in self._calls.items() if calls]
        self._pool.shutdown(wait=not busy)
        for leg, image in self.images.items():
            if leg in busy:
                log.error("%s: a call to leg %s has not returned; its image stays open",
                          self.name, LEG_NAMES[leg].upper())
                continue
            try:
                image.close()
            except OSError as exc:
                log.warning("%s: closing %s: %s", self.name, image.path, exc)


def _discard_fn(zeroing: bool) -> Callable[..., None]:
    return _zero if zeroing else _discard


def _discard(image: Image, offset: int, length: int) -> None:
    image.discard(offset, length)


def _zero(image: Image, offset: int, length: int) -> None:
    image.write_zeroes(offset, length)


def _fill_zeroes(image: Image, offset: int, length: int) -> None:
    image.fill_zeroes(offset, length)


def _writev(image: Image, offset: int, iov: Sequence[memoryview]) -> None:
    image.writev(offset, iov)


def _flush(image: Image) -> None:
    image.flush()
