"""Scheduled splits (``targetmirror split NAME --at TIME``) that survive a daemon restart.

**Where they live.**  In the daemon's state directory, ``<state_dir>/schedules.json``, written
atomically (temporary file, fsync, rename, fsync of the directory; mode 0600) at every change,
and re-armed when the daemon starts.  Not systemd timers: a split is the daemon's operation on
the daemon's mirrors, so its schedule belongs with the mirrors' own state -- one owner, listed
by ``targetmirror status``, cancelled by ``targetmirror cancel ID``, backed up and moved with
the state directory, the same with or without systemd.  Recurring splits (every night at 02:00)
are what cron or a systemd timer running ``targetmirror split`` (or ``backup``) is for.

**Late is missed, never taken.**  A split is a point in time the admin chose, usually matched
to something else (the application's quiet hour, a backup job that reads A at 02:05), and
taking it makes A a frozen copy while new writes reach B alone.  A split taken hours late --
because the daemon was down or the host asleep when it was due -- would be a copy of the wrong
moment and would leave the mirror without its second copy when nobody expects it.  So a split
is taken only while it is at most :data:`GRACE` seconds overdue (so a restart across the
moment still takes it); a schedule found later than that, at start or after a suspend, is
marked ``missed``, logged as an error, shown by ``status`` and counted in the metrics
(``targetmirror_scheduled_splits_total{outcome="missed"}``; the shipped alert rules fire on
it) until the admin acknowledges it with ``targetmirror cancel ID``.  A scheduled split that
was tried and refused (a member not served, not mirrored) stays as ``failed``, likewise.

**Crash while taking one.**  The schedule is marked ``taking`` on disk before the split; a
daemon that dies before it has removed the entry finds it ``taking`` at its next start, and
reports it as ``missed`` with that reason: whether the split happened is in the mirror's own
state (its epoch and ``split.requested_wall``), which the admin is told to check.

The timer follows the wall clock (``time.time()``), re-read at least every
:data:`MAX_WAIT` seconds, so a clock step (NTP, an admin's ``date``) moves the split with it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from targetmirror.errors import MirrorError, TargetMirrorError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("targetmirror.schedule")

SCHEMA = 1
GRACE = 60.0
"""Seconds a scheduled split may be overdue and still be taken."""
MAX_WAIT = 30.0
"""The timer re-reads the wall clock at least this often."""
STATES = ("pending", "taking", "missed", "failed")
OUTCOMES = ("taken", "failed", "missed")


@dataclass
class Schedule:
    """One scheduled split."""

    id: int
    at: float
    """When, in seconds since the epoch."""
    names: list[str]
    created_wall: float
    state: str = "pending"
    """pending, taking (the split is being taken), missed or failed (kept until cancelled)."""
    note: str = ""
    """Why it was missed or failed."""
    done_wall: float | None = None
    """When it was found missed or tried and failed."""

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _File:
    next_id: int = 1
    schedules: list[Schedule] = field(default_factory=list)


class SplitScheduler:
    """The daemon's scheduled splits; see the module docstring.

    ``take(names)`` splits the named mirrors (or a group's members) at one instant and raises
    :class:`TargetMirrorError` when it cannot.  ``clock`` is the wall clock (a seam for tests).
    """

    def __init__(self, path: str, take: Callable[[list[str]], Any], *,
                 clock: Callable[[], float] = time.time, grace: float = GRACE) -> None:
        self.path = path
        self.take = take
        self.clock = clock
        self.grace = grace
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        """Since the daemon started: splits taken, tried and failed, found missed."""
        self._data = self._load()
        self._check_overdue(at_start=True)

    # -- the file ------------------------------------------------------------------------------
    def _load(self) -> _File:
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return _File()
        except (OSError, ValueError) as exc:
            return self._set_aside(f"cannot be read: {exc}")
        try:
            if raw.get("schema") != SCHEMA:
                raise ValueError(f"schema {raw.get('schema')!r}, expected {SCHEMA}")
            data = _File(next_id=int(raw["next_id"]), schedules=[
                Schedule(id=int(s["id"]), at=float(s["at"]),
                         names=[str(n) for n in s["names"]],
                         created_wall=float(s["created_wall"]), state=str(s["state"]),
                         note=str(s.get("note", "")), done_wall=s.get("done_wall"))
                for s in raw["schedules"]])
            bad = [s.state for s in data.schedules if s.state not in STATES]
            if bad:
                raise ValueError(f"unknown schedule state {bad[0]!r}")
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            return self._set_aside(f"is malformed: {exc}")
        return data

    def _set_aside(self, why: str) -> _File:
        """Keep an unreadable file for the admin (never overwrite it) and start empty."""
        aside = f"{self.path}.bad-{int(time.time())}"
        try:
            os.rename(self.path, aside)
        except OSError as exc:
            aside = f"(could not be moved aside: {exc})"
        log.error("scheduled splits: %s %s; no scheduled split is armed; the file is kept as "
                  "%s -- schedule them again", self.path, why, aside)
        return _File()

    def _save(self) -> None:
        data = {"schema": SCHEMA, "next_id": self._data.next_id,
                "schedules": [s.public() for s in self._data.schedules]}
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = f"{self.path}.tmp.{os.getpid()}.{time.monotonic_ns()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(data, indent=1, sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- operations ----------------------------------------------------------------------------
    def add(self, at: float, names: list[str]) -> Schedule:
        """Schedule a split of ``names`` at ``at``; durable when this returns."""
        now = self.clock()
        if at < now:
            raise MirrorError(f"the split time {time.ctime(at)} is in the past")
        with self._cv:
            s = Schedule(id=self._data.next_id, at=at, names=list(names), created_wall=now)
            self._data.next_id += 1
            self._data.schedules.append(s)
            try:
                self._save()
            except OSError as exc:
                self._data.schedules.remove(s)
                raise MirrorError(f"cannot record the scheduled split in {self.path}: "
                                  f"{exc.strerror or exc}") from exc
            self._cv.notify_all()
        log.info("split %d of %s scheduled at %s", s.id, ", ".join(names), time.ctime(at))
        return s

    def cancel(self, schedule_id: int) -> Schedule:
        """Remove a pending schedule, or acknowledge a missed or failed one."""
        with self._cv:
            s = next((s for s in self._data.schedules if s.id == schedule_id), None)
            if s is None:
                raise MirrorError(f"no scheduled split {schedule_id}")
            if s.state == "taking":
                raise MirrorError(f"scheduled split {schedule_id} is being taken now")
            self._data.schedules.remove(s)
            self._save()
            self._cv.notify_all()
        log.info("scheduled split %d of %s (%s) cancelled", s.id, ", ".join(s.names), s.state)
        return s

    def entries(self) -> list[dict[str, Any]]:
        """Every schedule, soonest first (for ``status``)."""
        with self._cv:
            return [s.public() for s in sorted(self._data.schedules, key=lambda s: s.at)]

    # -- the timer -----------------------------------------------------------------------------
    def start(self) -> None:
        """Arm the timer (after the daemon serves its devices)."""
        self._thread = threading.Thread(target=self._run, name="split-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _claim_due(self) -> Schedule | None:
        """The next due schedule, marked ``taking`` on disk (``_cv`` held), or None."""
        self._check_overdue(at_start=False)
        now = self.clock()
        due = [s for s in self._data.schedules if s.state == "pending" and s.at <= now]
        if not due:
            return None
        s = min(due, key=lambda s: (s.at, s.id))
        s.state = "taking"
        self._save_logged()
        return s

    def _run(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                s = self._claim_due()
                if s is None:
                    now = self.clock()
                    wait = min([p.at - now for p in self._data.schedules
                                if p.state == "pending"] + [MAX_WAIT])
                    self._cv.wait(max(wait, 0.0))  # a timer: woken early by add/cancel/stop
                    continue
            self._take(s)

    def run_due(self) -> None:
        """Take every due schedule now, on the calling thread (tests drive the timer so)."""
        while True:
            with self._cv:
                s = self._claim_due()
            if s is None:
                return
            self._take(s)

    def _take(self, s: Schedule) -> None:
        late = self.clock() - s.at
        try:
            self.take(s.names)
        except Exception as exc:  # a refusal, or a bug: either way the timer must go on
            if not isinstance(exc, TargetMirrorError):
                log.exception("scheduled split %d of %s failed unexpectedly", s.id,
                              ", ".join(s.names))
            log.error("scheduled split %d of %s failed: %s; it stays listed until 'targetmirror "
                      "cancel %d'", s.id, ", ".join(s.names), exc, s.id)
            with self._cv:
                s.state, s.note, s.done_wall = "failed", str(exc), self.clock()
                self.outcomes["failed"] += 1
                self._save_logged()
            return
        log.info("scheduled split %d of %s taken (due %s, late by %.3f s)", s.id,
                 ", ".join(s.names), time.ctime(s.at), late)
        with self._cv:
            self.outcomes["taken"] += 1
            if s in self._data.schedules:
                self._data.schedules.remove(s)
            self._save_logged()

    def _check_overdue(self, *, at_start: bool) -> None:
        """Mark every pending schedule more than ``grace`` overdue missed (``_cv`` held, or
        at construction); a ``taking`` one found at start was interrupted by a stop."""
        now = self.clock()
        changed = False
        for s in self._data.schedules:
            if s.state == "pending" and now - s.at > self.grace:
                why = ("the daemon was not running" if at_start else
                       "the daemon could not take it in time (host suspended or clock set "
                       "forward?)")
                s.note = (f"due {time.ctime(s.at)}, found {now - s.at:.0f} s late: {why}; "
                          "not taken late")
            elif s.state == "taking" and at_start:
                s.note = ("the daemon stopped while taking it; check the mirrors' split "
                          "epoch and time in 'targetmirror status'")
            else:
                continue
            s.state, s.done_wall = "missed", now
            self.outcomes["missed"] += 1
            changed = True
            log.error("scheduled split %d of %s MISSED: %s; it stays listed until "
                      "'targetmirror cancel %d'", s.id, ", ".join(s.names), s.note, s.id)
        if changed:
            self._save_logged()

    def _save_logged(self) -> None:
        try:
            self._save()
        except OSError as exc:
            log.error("scheduled splits: cannot write %s: %s", self.path, exc)

    # -- metrics -------------------------------------------------------------------------------
    def metrics(self) -> Iterator[Metric]:
        """``targetmirror_scheduled_split_timestamp_seconds`` and ``..._splits_total``."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        g = GaugeMetricFamily("targetmirror_scheduled_split_timestamp_seconds",
                              "when a scheduled split is due; state pending, taking, missed "
                              "or failed (the last two stay until 'targetmirror cancel ID')",
                              labels=["schedule", "mirrors", "state"])
        for s in self.entries():
            g.add_metric([str(s["id"]), ",".join(s["names"]), s["state"]], s["at"])
        c = CounterMetricFamily("targetmirror_scheduled_splits",
                                "scheduled splits since the daemon started, by outcome",
                                labels=["outcome"])
        for outcome, n in self.outcomes.items():
            c.add_metric([outcome], n)
        yield g
        yield c
