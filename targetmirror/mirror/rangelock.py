"""A lock over byte ranges: writers to overlapping ranges take turns, others never wait.

The mirror needs this for two reasons.  COMPARE AND WRITE must be atomic with respect to every
other write to its blocks, and (with splits, claims 6-7 of US 7,111,137) a post-split write must
not reach B before an overlapping pre-split write has.  A single mirror-wide lock would serialise
all I/O; this one only orders commands whose ranges intersect.

Waiters are served first come, first served per overlap: a range that is queued behind an
overlapping holder is also honoured by later arrivals, so a stream of small writes cannot starve a
large one.  The number of held ranges is bounded by the ring's queue depth (128 by default), so a
list scan is cheaper than a tree here.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

GRAIN_SHIFT = 16
"""Grain of the overlap index: 64 KiB."""
MAX_GRAINS = 32
"""Ranges over more grains than this (2 MiB) are "wide": kept out of the index."""


class RangeLock:
    """Exclusive locks on half-open byte ranges ``[start, end)``.

    The common case — a range that overlaps nothing queued — is decided at :meth:`take` and
    costs one short critical section; only a range that has to wait touches the condition.
    """

    def __init__(self) -> None:
        # The fast paths take the bare lock (a C-level context manager); only waiting goes
        # through the Condition, whose own __enter__/__exit__ are Python code.
        self._guard = threading.Lock()
        self._cond = threading.Condition(self._guard)
        # ticket -> (start, end) of every range granted or waiting; dicts keep insertion order,
        # which is arrival order, and delete by key in O(1).
        self._queue: dict[int, tuple[int, int]] = {}
        # An index that makes "overlaps nothing" cheap whatever the queue length: how many
        # queued narrow ranges touch each grain, and how many wide ranges are queued.  Only a
        # hit (a shared grain, or any wide range) costs the exact scan of the queue.
        self._grains: dict[int, int] = {}
        self._wide = 0
        self._tickets = itertools.count()
        self._waiters = 0

    def acquire(self, start: int, end: int) -> int:
        """Block until no earlier-queued range overlaps ``[start, end)``; return a token."""
        ticket, granted = self.take(start, end)
        if not granted:
            self.wait(ticket, start, end)
        return ticket

    def enqueue(self, start: int, end: int) -> int:
        """Take a place in line for ``[start, end)`` without waiting; return the token.

        The order of ``enqueue`` calls is the order in which overlapping ranges are granted, so
        calling it on the ring thread in ring order makes overlapping commands run in ring
        order even though workers pick them up concurrently.  Every token must be released.
        """
        return self.take(start, end)[0]

    def take(self, start: int, end: int) -> tuple[int, bool]:
        """:meth:`enqueue`, also saying whether the range is granted already (nothing queued
        before it overlaps), in which case the holder need not call :meth:`wait`."""
        g0 = start >> GRAIN_SHIFT
        g1 = max(end - 1, start) >> GRAIN_SHIFT
        narrow = g1 - g0 < MAX_GRAINS
        with self._guard:
            ticket = next(self._tickets)
            grains = self._grains
            if self._wide or not narrow:
                suspect = bool(self._queue)
            elif g0 == g1:
                suspect = g0 in grains
            else:
                suspect = any(g in grains for g in range(g0, g1 + 1))
            granted = True
            if suspect:
                for s, e in self._queue.values():
                    if s < end and start < e:
                        granted = False
                        break
            self._queue[ticket] = (start, end)
            if narrow:
                for g in range(g0, g1 + 1):
                    grains[g] = grains.get(g, 0) + 1
            else:
                self._wide += 1
            return ticket, granted

    def wait(self, ticket: int, start: int, end: int) -> None:
        """Block until ``ticket`` (enqueued for ``[start, end)``) is granted."""
        with self._cond:
            if not self._blocked(ticket, start, end):
                return
            self._waiters += 1
            try:
                while self._blocked(ticket, start, end):
                    self._cond.wait()
            finally:
                self._waiters -= 1

    def release(self, token: int) -> None:
        """Release the range granted under ``token``."""
        with self._guard:
            rng = self._queue.pop(token, None)
            if rng is None:
                raise RuntimeError(f"range lock token {token} is not held")
            start, end = rng
            g0 = start >> GRAIN_SHIFT
            g1 = max(end - 1, start) >> GRAIN_SHIFT
            if g1 - g0 < MAX_GRAINS:
                grains = self._grains
                for g in range(g0, g1 + 1):
                    n = grains[g] - 1
                    if n:
                        grains[g] = n
                    else:
                        del grains[g]
            else:
                self._wide -= 1
            if self._waiters:
                self._cond.notify_all()

    @contextmanager
    def locked(self, start: int, end: int) -> Iterator[None]:
        """``with lock.locked(a, b):`` — hold ``[a, b)`` for the block."""
        token = self.acquire(start, end)
        try:
            yield
        finally:
            self.release(token)

    def _blocked(self, ticket: int, start: int, end: int) -> bool:
        for other, (s, e) in self._queue.items():
            if other == ticket:
                return False
            if s < end and start < e:
                return True
        return False

    @property
    def guard(self) -> threading.Lock:
        """The lock every take, wait and release goes through.  Held by a caller that writes
        without taking ranges (the express lane), it keeps every new range out meanwhile;
        check :meth:`idle_locked` under it.  Never block on anything else while holding it."""
        return self._guard

    def idle_locked(self) -> bool:
        """With :attr:`guard` held: True if no range is granted or queued."""
        return not self._queue

    def held(self) -> int:
        """How many ranges are granted or waiting (for status and tests)."""
        with self._guard:
            return len(self._queue)
