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

from targetmirror.errors import FrozenImageError, MirrorBusy, StoreError
from targetmirror.mirror.policy import BOTH, LEG_A, LEG_B, LEG_NAMES
from targetmirror.store.image import Image

T = TypeVar("T")
log = logging.getLogger("targetmirror.mirror")

LEG_TIMEOUT = 20.0
"""A leg call older than this fails the leg (below LIO's default 30 s cmd_time_out)."""


class LegsClosed(StoreError):
    """The mirror is closing: the call was not made (and no leg is failed for it)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"mirror {name} is closing", kind="closed")


@dataclass(frozen=True)
class Deadlines:
    """How long a leg call may take before the leg is failed (seconds; None: never)."""

    io: float | None = LEG_TIMEOUT
    """A data read or write, and a flush."""

    def for_call(self, what: str, nbytes: int) -> float | None:
        """The deadline of one call (the same for every kind today)."""
        del what, nbytes
        return self.io


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
        del calls[key]
        if self._waiters and not calls:
            with self._idle:
                self._idle.notify_all()

    def call(self, leg: int, what: str, fn: Callable[..., T], *args: Any,
             nbytes: int = 0) -> T:
        """Run ``fn(image, *args)`` on ``leg``; on failure fail the leg and raise.

        Raises :class:`StoreError` if the leg is failed already (nothing is run)."""
        entered = self._enter(leg, what, nbytes)
        if entered is None:
            raise StoreError(f"mirror {self.name}: leg {LEG_NAMES[leg].upper()} is failed",
                             kind="failed")
        key, image = entered
        try:
            return fn(image, *args)
        except StoreError as exc:
            if not isinstance(exc, (FrozenImageError, LegsClosed)):
                self.fail(leg, exc)
            raise
        except OSError as exc:
            err = StoreError(f"{what} on {image.path} failed: {exc}", kind=what,
                             path=image.path, errno=exc.errno)
            self.fail(leg, err)
            raise err from exc
        finally:
            self._leave(leg, key)

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
        err: StoreError | None = None
        done = 0
        if legs == BOTH and parallel:
            fut: Future[None] = self._pool.submit(self.call, LEG_A, what, op, nbytes=nbytes)
            try:
                self.call(LEG_B, what, op, nbytes=nbytes)
                done |= LEG_B
            except StoreError as exc:
                err = exc
            try:
                fut.result()
                done |= LEG_A
            except StoreError as exc:
                err = exc
            return done, err
        for leg in (LEG_A, LEG_B):
            if legs & leg:
                try:
                    self.call(leg, what, op, nbytes=nbytes)
                    done |= leg
                except StoreError as exc:
                    err = exc
        return done, err

    def writer(self, offset: int, iov: Sequence[memoryview], durable: bool,
               done: Callable[[int], None] | None = None) -> Callable[[Image], None]:
        """The per-leg operation of a data write (``done(leg)`` when it reached a leg)."""
        a = self.images[LEG_A]

        def op(image: Image) -> None:
            image.writev(offset, iov)
            if durable:
                image.flush()
            if done is not None:
                done(LEG_A if image is a else LEG_B)
        return op

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
        with self._mu:
            return len(self._calls[leg])

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
