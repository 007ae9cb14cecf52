"""Who runs what: the mirror's background threads, and its one lifecycle operation at a time.

* :class:`Tasks` owns every thread a mirror starts (split completion, copies, housekeeping):
  :meth:`Tasks.close` stops new ones and joins the rest, so ``Mirror.close`` never closes a
  descriptor under a thread that still uses it (issue 15, defect 3).
* :class:`OpSlot` admits one lifecycle operation per mirror (split, rejoin, sync, repair,
  verify, recovery): a second one is refused with :class:`MirrorBusy` naming the one running,
  the way ``lvconvert`` refuses while a conversion runs.  A background operation (a copy, a
  split's drain) holds the slot until it ends, fails or is stopped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from targetmirror.errors import MirrorBusy, MirrorError

log = logging.getLogger("targetmirror.mirror")


class Tasks:
    """The threads of one mirror."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._mu = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._closing = False

    def spawn(self, what: str, fn: Callable[[], None]) -> bool:
        """Run ``fn`` on a thread named after ``what``; False (nothing started) once closing.
        One thread per ``what`` at a time: a previous one must have ended."""
        with self._mu:
            if self._closing:
                return False
            old = self._threads.get(what)
            if old is not None and old.is_alive() and old is not threading.current_thread():
                raise MirrorError(f"mirror {self.name}: a {what} thread is still running")
            t = threading.Thread(target=self._run, args=(what, fn),
                                 name=f"{self.name}-{what}", daemon=True)
            self._threads[what] = t
            t.start()
            return True

    def _run(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException:
            log.exception("%s: %s thread failed", self.name, what)

    def alive(self, what: str) -> bool:
        t = self._threads.get(what)
        return t is not None and t.is_alive()

    def join(self, what: str) -> None:
        t = self._threads.get(what)
        if t is not None and t is not threading.current_thread():
            t.join()

    def close(self) -> None:
        """No new thread from now on; wait for every one started."""
        with self._mu:
            self._closing = True
            threads = list(self._threads.values())
        for t in threads:
            if t is not threading.current_thread():
                t.join()


class OpSlot:
    """One lifecycle operation at a time; see the module docstring."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._mu = threading.Lock()
        self.running: str | None = None
        self.detail: Callable[[], str] = lambda: ""
        """What to add to a busy message (the running copy's progress)."""
        self._closing = False

    def begin(self, op: str) -> None:
        """Take the slot for ``op``; raise :class:`MirrorBusy` if another one has it."""
        with self._mu:
            self._check_locked()
            self.running = op

    def check(self) -> None:
        """Raise :class:`MirrorBusy` if an operation runs (without taking the slot)."""
        with self._mu:
            self._check_locked()

    def _check_locked(self) -> None:
        if self._closing:
            raise MirrorError(f"mirror {self.name} is closing")
        if self.running is not None:
            extra = self.detail()
            raise MirrorBusy(f"mirror {self.name} is busy: {self.running} is running"
                             f"{f' ({extra})' if extra else ''}; try again when it is done")

    def end(self, op: str) -> None:
        with self._mu:
            if self.running == op:
                self.running = None

    def close(self) -> None:
        with self._mu:
            self._closing = True
