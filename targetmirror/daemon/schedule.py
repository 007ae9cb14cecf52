"""Splits asked for at a later time (``split --at``): one timer each, cancellable by id.

Kept in memory only: a restart forgets them (docs/operations.md says so); issue 16 item 7
makes them survive.  The scheduler knows nothing about mirrors: ``take`` is what runs at the
instant (the control operations give it the real split).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from targetmirror.errors import MirrorError, TargetMirrorError

log = logging.getLogger("targetmirror.daemon")


class SplitScheduler:
    """Timers that split a list of mirrors at a wall-clock time."""

    def __init__(self, take: Callable[[list[str]], Any]) -> None:
        self._take = take
        self._timers: dict[int, tuple[float, list[str], threading.Timer]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def schedule(self, at: float, names: list[str]) -> dict[str, Any]:
        """Split ``names`` at ``at`` (seconds since the epoch); returns the entry."""
        delay = at - time.time()
        if delay < 0:
            raise MirrorError(f"the split time {time.ctime(at)} is in the past")
        timer_id = next(self._ids)

        def fire() -> None:
            with self._lock:
                self._timers.pop(timer_id, None)
            try:
                self._take(names)
                log.info("scheduled split %d of %s taken (requested for %.3f, late by %.3f s)",
                         timer_id, ", ".join(names), at, time.time() - at)
            except TargetMirrorError as exc:
                log.error("scheduled split %d of %s failed: %s", timer_id, ", ".join(names), exc)

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        with self._lock:
            self._timers[timer_id] = (at, names, timer)
        timer.start()
        return {"id": timer_id, "at": at, "names": names}

    def cancel(self, timer_id: int) -> None:
        with self._lock:
            entry = self._timers.pop(timer_id, None)
        if entry is None:
            raise MirrorError(f"no scheduled split {timer_id}")
        entry[2].cancel()

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"id": i, "at": at, "names": n} for i, (at, n, _) in self._timers.items()]

    def close(self) -> None:
        with self._lock:
            timers = [t for _, _, t in self._timers.values()]
            self._timers.clear()
        for t in timers:
            t.cancel()
