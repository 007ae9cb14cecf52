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


class RangeLock:
    """Exclusive locks on half-open byte ranges ``[start, end)``."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        # (ticket, start, end) of every range granted or waiting, in arrival order.
        self._queue: list[tuple[int, int, int]] = []
        self._tickets = itertools.count()

    def acquire(self, start: int, end: int) -> int:
        """Block until no earlier-queued range overlaps ``[start, end)``; return a token."""
        ticket = self.enqueue(start, end)
        self.wait(ticket, start, end)
        return ticket

    def enqueue(self, start: int, end: int) -> int:
        """Take a place in line for ``[start, end)`` without waiting; return the token.

        The order of ``enqueue`` calls is the order in which overlapping ranges are granted, so
        calling it on the ring thread in ring order makes overlapping commands run in ring
        order even though workers pick them up concurrently.  Every token must be released.
        """
        with self._cond:
            ticket = next(self._tickets)
            self._queue.append((ticket, start, end))
            return ticket

    def wait(self, ticket: int, start: int, end: int) -> None:
        """Block until ``ticket`` (enqueued for ``[start, end)``) is granted."""
        with self._cond:
            while self._blocked(ticket, start, end):
                self._cond.wait()

    def release(self, token: int) -> None:
        """Release the range granted under ``token``."""
        with self._cond:
            for i, (ticket, _, _) in enumerate(self._queue):
                if ticket == token:
                    del self._queue[i]
                    break
            else:
                raise RuntimeError(f"range lock token {token} is not held")
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
        for other, s, e in self._queue:
            if other == ticket:
                return False
            if s < end and start < e:
                return True
        return False

    def held(self) -> int:
        """How many ranges are granted or waiting (for status and tests)."""
        with self._cond:
            return len(self._queue)
