"""The stuck-command watchdog: report every command that has waited longer than a threshold.

tcmu-runner users repeatedly meet commands that hang silently until the kernel's
``cmd_time_out`` fails them, with nothing in the logs to say which command, which block, or
which backing device was to blame.  Here each ring loop keeps a registry of the commands it has
fetched and not yet answered (``DeviceRunner.inflight``: cmd_id -> (time fetched, job)), which
costs one dict store and one pop per command on the hot path.  This thread scans the registries
every few seconds -- it never takes a ring lock and never touches the ring -- and logs each
command older than the threshold **once**: its age, cmd_id, opcode, LBA and what it waits for
(the range lock behind an earlier overlapping write, or leg A and/or B).  When a reported
command is finally answered, that is logged too, with how long it took at least.

Reading another thread's dict without a lock is safe in CPython as long as the reader copies it
in one C-level call (``list(d.items())``); a concurrent resize can still raise RuntimeError, in
which case the scan simply tries again next time.

The same thread keeps systemd's watchdog (``WatchdogSec=`` in the unit) fed: after every pass
it sends ``WATCHDOG=1`` if every ring loop is *healthy* -- its lock can be taken within a few
seconds (the ring thread holds it only to fetch, admit and complete a batch, so a lock held for
seconds means a wedged ring loop), and a ring loop that ended is released by the main loop
within :data:`REAP_WITHIN` seconds (a main loop that no longer rescans does not).  A wedged
registry lock blocks the scan itself, so that withholds the ping too.  A *slow* command is not
unhealthy: it is reported above, and restarting the daemon would not make a leg faster.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from targetmirror.daemon import sdnotify

log = logging.getLogger("targetmirror.watchdog")

DEFAULT_THRESHOLD = 30.0
LOCK_TIMEOUT = 2.0
"""Seconds a ring loop's lock may stay taken before the loop counts as wedged."""
REAP_WITHIN = 30.0
"""Seconds a ring loop that ended may stay registered (the main loop reaps it every rescan)."""


class HasInflight(Protocol):
    """What the watchdog reads from a ring loop (``DeviceRunner`` fits)."""

    @property
    def inflight(self) -> dict[int, tuple[float, Any]]: ...

    # Also read when present (``DeviceRunner`` has both): ``lock`` (a ``threading.Lock`` the
    # ring thread holds per batch) and ``alive`` (whether the ring thread still runs).


@dataclass(frozen=True)
class StuckCommand:
    """One report."""

    device: str
    cmd_id: int
    age: float
    opcode: int | None
    lba: int | None
    waiting_on: str

    def message(self) -> str:
        op = "unknown opcode" if self.opcode is None else f"opcode {self.opcode:#04x}"
        at = "" if self.lba is None else f" at LBA {self.lba}"
        return (f"{self.device}: command {self.cmd_id} ({op}{at}) has been running for "
                f"{self.age:.1f} s, waiting on {self.waiting_on}")


def describe(job: Any) -> tuple[int | None, int | None, str]:
    """(opcode, lba, what it waits on) of a job, as far as the job can tell."""
    fn = getattr(job, "describe", None)
    if callable(fn):
        opcode, lba, waiting = fn()
        return opcode, lba, waiting
    return None, None, "its executor"


class Watchdog:
    """Scans ``devices()`` every ``interval`` seconds; see the module docstring.

    ``keepalive`` is how often systemd wants ``WATCHDOG=1`` (``"env"``: from
    ``$WATCHDOG_USEC``, see :func:`sdnotify.watchdog_interval`; None: never sent).
    """

    def __init__(self, devices: Callable[[], Iterable[tuple[str, HasInflight]]], *,
                 threshold: float = DEFAULT_THRESHOLD, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 keepalive: float | Literal["env"] | None = "env",
                 notify: Callable[[str], bool] = sdnotify.notify,
                 lock_timeout: float = LOCK_TIMEOUT) -> None:
        if threshold <= 0:
            raise ValueError(f"stuck-command threshold must be positive, not {threshold}")
        self.devices = devices
        self.threshold = threshold
        self.interval = interval if interval is not None else min(5.0, threshold / 3)
        self.keepalive = sdnotify.watchdog_interval() if keepalive == "env" else keepalive
        if self.keepalive is not None:
            self.interval = min(self.interval, self.keepalive)
        self.notify = notify
        self.lock_timeout = lock_timeout
        self.clock = clock
        self._dead_since: dict[int, float] = {}
        self._withheld = False
        self._notify_failed = False
        self._reported: dict[tuple[str, int, float], StuckCommand] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scan(self) -> list[StuckCommand]:
        """One pass: log and return the commands that became stuck since the last pass."""
        now = self.clock()
        seen: set[tuple[str, int, float]] = set()
        new: list[StuckCommand] = []
        for name, runner in self.devices():
            try:
                entries = list(runner.inflight.items())
            except RuntimeError:  # resized while copied: next pass
                continue
            for cmd_id, (started, job) in entries:
                key = (name, cmd_id, started)
                seen.add(key)
                age = now - started
                if age < self.threshold or key in self._reported:
                    continue
                opcode, lba, waiting = describe(job)
                stuck = StuckCommand(name, cmd_id, age, opcode, lba, waiting)
                self._reported[key] = stuck
                new.append(stuck)
                log.warning("%s", stuck.message(), extra={"device": name})
        for key in [k for k in self._reported if k not in seen]:
            gone = self._reported.pop(key)
            log.warning("%s: stuck command %d was answered after at least %.1f s", gone.device,
                        gone.cmd_id, now - key[2], extra={"device": gone.device})
        return new

    def stuck(self, device: str) -> int:
        """How many of ``device``'s commands are reported stuck now (for status)."""
        return sum(1 for k in list(self._reported) if k[0] == device)

    def health(self) -> str | None:
        """None when every ring loop is healthy (see the module docstring), else why not."""
        now = self.clock()
        dead: set[int] = set()
        for name, runner in self.devices():
            lock = getattr(runner, "lock", None)
            if lock is not None:
                if not lock.acquire(timeout=self.lock_timeout):
                    return (f"{name}: its ring loop has held its lock for more than "
                            f"{self.lock_timeout:g} s")
                lock.release()
            if getattr(runner, "alive", True) is False:
                dead.add(id(runner))
                since = self._dead_since.setdefault(id(runner), now)
                if now - since > REAP_WITHIN:
                    return (f"{name}: its ring loop ended {now - since:.0f} s ago and the "
                            "main loop has not released the device")
        # forget loops that were released (a pass cut short above keeps every timer)
        self._dead_since = {k: v for k, v in self._dead_since.items() if k in dead}
        return None

    def keep_alive(self) -> bool:
        """Send ``WATCHDOG=1`` if healthy; True if it was sent."""
        why = self.health()
        if why is not None:
            if not self._withheld:
                log.error("withholding systemd's watchdog keep-alive: %s (systemd restarts the "
                          "daemon if this lasts WatchdogSec)", why)
                self._withheld = True
            return False
        if self._withheld:
            log.warning("ring loops healthy again; watchdog keep-alive resumed")
            self._withheld = False
        try:
            return self.notify("WATCHDOG=1")
        except OSError as exc:
            if not self._notify_failed:
                log.error("cannot send WATCHDOG=1 to systemd: %s", exc)
                self._notify_failed = True
            return False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.scan()
            except Exception:  # the watchdog must never take the daemon down
                log.exception("stuck-command scan failed")
            if self.keepalive is not None:
                try:
                    self.keep_alive()
                except Exception:
                    log.exception("watchdog health check failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
