"""One device's ring loop: fetch commands, run them, complete them in batches.

Threading model.  Each device has one *ring thread* that owns the :class:`Ring` (the ring is not
thread-safe) and a small pool of *workers* that execute SCSI commands.  The ring thread waits in
``poll`` on two file descriptors: the UIO device (the kernel queued something) and an eventfd
(a worker finished something).  On every wake-up it fetches the whole batch of new entries, hands
them to the workers, then writes every finished response into the ring and notifies the kernel
**once** for the batch — the notify makes the kernel reap completions and is by far the most
expensive call per command, so it must not be per command.

Handing a command to a worker costs more than a small ``pwritev`` (a lock, a queue, a wake-up
and a GIL switch each way: ~3x the CPU of the command itself on the host, far more under the
lab's emulated CPU).  So a job that says it is ``inline`` — a small plain READ/WRITE whose range
no earlier command holds, without FUA — runs on the ring thread right after admission; the rest
(large transfers, flushes, commands that must wait for a range, everything unusual) go to the
pool, so a slow command never stalls the ring and post-split commands still run while pre-split
ones do.  With ``workers=0`` every command runs inline.

Shutdown (SIGTERM) stops fetching, waits for the commands already fetched, writes their
responses, notifies, and only then releases the mapping — a response is never lost and no view
into the data area outlives the mapping.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from targetmirror.errors import DeviceError, TargetMirrorError
from targetmirror.scsi import constants as C
from targetmirror.scsi.sense import build_fixed_sense
from targetmirror.tcmu.ring import BadEntry, Command, Ring, Tmr

log = logging.getLogger("targetmirror.device")

SAM_STAT_CHECK_CONDITION = 0x02
SAM_STAT_TASK_ABORTED = 0x40
SAM_STAT_BUSY = 0x08
_POLL_TIMEOUT_MS = 1000


class Result(Protocol):
    """What an executor returns (``targetmirror.scsi.handler.ScsiResult`` fits)."""

    @property
    def status(self) -> int: ...
    @property
    def sense(self) -> bytes | None: ...
    @property
    def read_len(self) -> int | None: ...


class Job(Protocol):
    """A command made ready to run by admission.

    Exactly one of the two is called: ``job()`` runs the command (and gives back what admission
    took when done), ``job.cancel()`` gives it back without running (a TMR abort, or shutdown
    before a worker picked the job up).
    """

    inline: bool
    """True if the job is cheap and cannot block (a small I/O whose range is free): the ring
    thread runs it itself instead of handing it to a worker."""

    def __call__(self) -> Result: ...
    def cancel(self) -> None: ...


class PlainJob:
    """A job that took nothing at admission: cancelling it is a no-op."""

    __slots__ = ("_fn",)
    inline = False

    def __init__(self, fn: Callable[[], Result]) -> None:
        self._fn = fn

    def __call__(self) -> Result:
        return self._fn()

    def cancel(self) -> None:
        pass

Admit = Callable[[bytes, list[memoryview], int], Job]
"""Called on the ring thread, in ring order, with (cdb, iov, tag); cheap and non-blocking."""

Express = Callable[[Ring, int, int], tuple[int, bool]]
"""``express(ring, uio_fd, wake_fd) -> (served, notify_needed)``: the express lane's turn
(``MirrorCommands.express``)."""


class UioLike(Protocol):
    """The part of ``targetmirror.tcmu.uio.UioDevice`` the runner needs (a test double fits)."""

    def fileno(self) -> int: ...
    def wait(self, timeout: float | None = None) -> bool: ...
    def ack(self) -> bool: ...
    def notify(self) -> None: ...


class DeviceRunner:
    """Serve one TCMU device until :meth:`stop` or until the device disappears."""

    def __init__(self, name: str, uio: UioLike, ring: Ring, admit: Admit, *,
                 workers: int = 2, tag: int = 0,
                 before_dispatch: Callable[[], None] | None = None,
                 express: Express | None = None) -> None:
        self.name = name
        self.uio = uio
        self.ring = ring
        self.admit = admit
        self.before_dispatch = before_dispatch
        """Called once per admitted batch, before any of it runs (outside the ring lock): the
        mirror makes the batch's write-intent bits durable with one sync there."""
        self.express = express
        """Offered the ring (under :attr:`lock`) before each fetch while nothing of this device
        is in flight and no split boundary is pending: it answers what it can of the queued
        commands in place -- and, given the UIO fd, keeps waiting for and answering the next
        ones in its own loop -- and returns how many, and whether the kernel still has to be
        notified of some (``targetmirror/express``).  It returns promptly when the wake fd
        is kicked (:meth:`stop`, a worker)."""
        self.workers = workers
        self.tag = tag
        """Given to each command at admission; switched at a split boundary."""
        self.lock = threading.Lock()
        """Held while fetching/admitting and while writing completions.  A split takes it (for
        every member of a group at once) to read the ring heads: no command can be fetched or
        acknowledged meanwhile, which is what makes the heads one instant."""
        self._boundary: tuple[int, int, Callable[[], None]] | None = None
        self._pool = (ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-io")
                      if workers > 0 else None)
        self._done: deque[tuple[int, int, bytes | None, int | None]] = deque()
        self._futures: dict[int, Future[None]] = {}
        self._jobs: dict[int, Job] = {}
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.inflight: dict[int, tuple[float, Job]] = {}
        """cmd_id -> (monotonic time fetched, job) of every command not yet answered; read
        (never locked) by the stuck-command watchdog (``daemon/watchdog.py``)."""
        self._uio_fd = -1
        self.error: BaseException | None = None
        self.commands = 0
        self.batches = 0

    # -- control ---------------------------------------------------------------------------
    def start(self) -> None:
        """Run the ring loop on its own thread."""
        self._thread = threading.Thread(target=self.run, name=f"ring-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the loop to finish in-flight commands and return."""
        self._stopping.set()
        self._kick()

    def _kick(self) -> None:
        with self._wake_lock:
            if self._wake >= 0:
                os.eventfd_write(self._wake, 1)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the ring thread to end."""
        if self._thread is not None:
            self._thread.join(timeout)

    def set_boundary(self, head: int, new_tag: int, on_passed: Callable[[], None]) -> None:
        """With :attr:`lock` held: commands queued before ring position ``head`` keep the
        current tag, those at or after it get ``new_tag``; ``on_passed`` runs once every
        command before ``head`` has been admitted."""
        assert self.lock.locked()
        self._boundary = (head, new_tag, on_passed)

    def kick(self) -> None:
        """Wake the ring thread (after :meth:`set_boundary`, once the locks are released: a
        syscall under the locks would let other threads take the GIL and stretch the window)."""
        self._kick()

    def head(self) -> int:
        """The ring's current ``cmd_head`` (call with :attr:`lock` held for a split)."""
        return self.ring.head()

    @property
    def alive(self) -> bool:
        """True while the ring thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- loop ------------------------------------------------------------------------------
    def run(self) -> None:
        """The ring loop; returns on stop or when the device goes away.

        With ``TARGETMIRROR_PROFILE_DIR`` set, the loop runs under cProfile (which profiles
        only the thread that enables it) and writes ``ring-<device>.prof`` there at exit: the
        way to see where a ring thread's time goes inside the lab guest, where no sampling
        profiler is installed.
        """
        prof_dir = os.environ.get("TARGETMIRROR_PROFILE_DIR")
        if not prof_dir:
            self._loop()
            return
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
        try:
            self._loop()
        finally:
            prof.disable()
            prof.dump_stats(os.path.join(prof_dir, f"ring-{self.name}.prof"))

    def _loop(self) -> None:
        poller = select.poll()
        uio_fd = self.uio.fileno()
        # the express lane's wait loop speaks the uio protocol itself (4-byte event read and
        # notify); a test double without it gets one drain per wake-up
        lane_fd = getattr(self.uio, "lane_fd", None)
        self._uio_fd = lane_fd() if lane_fd is not None else -1
        poller.register(uio_fd, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        try:
            while True:
                for fd, events in poller.poll(_POLL_TIMEOUT_MS):
                    if fd == uio_fd:
                        if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                            raise DeviceError(f"device {self.name} went away")
                        self.uio.ack()  # consume the event count (poll said it is there)
                    else:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wake)
                if not self._stopping.is_set():
                    self._fetch_and_dispatch()
                self._complete_done()
                if self._stopping.is_set() and not self._futures:
                    self._complete_done()
                    return
        except DeviceError as exc:
            log.info("device closed: %s", exc, extra={"device": self.name})
            self.error = exc
        except BaseException as exc:
            log.exception("ring loop failed", extra={"device": self.name})
            self.error = exc
        finally:
            self._drain_on_exit()

    def _fetch_and_dispatch(self) -> None:
        jobs: list[tuple[int, Job]] = []
        handed = [0]
        try:
            self._fetch_admit_run(jobs, handed)
        except BaseException:
            # Whatever was admitted and not handed to a worker must give back what admission
            # took (range tickets, in-flight counts, busy regions: a leak would stall every
            # overlapping write and any split drain for good) and be answered -- BUSY, which
            # initiators retry, since it never ran (issue 15, defect 6).
            for cmd_id, job in jobs[handed[0]:]:
                self.inflight.pop(cmd_id, None)
                try:
                    job.cancel()
                except BaseException:
                    log.exception("cancelling command %d failed", cmd_id,
                                  extra={"device": self.name})
                self._done.append((cmd_id, SAM_STAT_BUSY, None, None))
            raise

    def _fetch_admit_run(self, jobs: list[tuple[int, Job]], handed: list[int]) -> None:
        """Fetch, admit (into ``jobs``) and run or dispatch one wake-up's commands, counting
        in ``handed[0]`` how many of ``jobs`` were handed on (run inline or to a worker)."""
        served = 0
        with self.lock:
            boundary = self._boundary
            if (boundary is None and self.express is not None and not self._futures
                    and not self._done):
                served, pending = self.express(self.ring, self._uio_fd, self._wake)
                if served:
                    self.commands += served
                    if not self.ring.has_entries():  # the lane answered the whole wake-up
                        self.batches += 1
                        if pending:
                            self.uio.notify()
                        return
                if not pending:
                    served = 0  # nothing for the notify below to report
            if boundary is None:
                self._admit_all(self.ring.fetch(), jobs)
            else:
                head, new_tag, on_passed = boundary
                self._admit_all(self.ring.fetch(until=head), jobs)
                self._boundary = None
                self.tag = new_tag
                on_passed()
                self._admit_all(self.ring.fetch(), jobs)
        if served and not (jobs and all(job.inline for _, job in jobs)):
            # The lane's answers are in the ring; tell the kernel now unless inline jobs are
            # about to finish and notify for everything at once.
            self.uio.notify()
        if not jobs:
            return
        if self.before_dispatch is not None:
            try:
                self.before_dispatch()
            except BaseException:
                # Not fatal here: each write's own marking waits for (and fails on) the sync
                # again, and answers its command with the error.
                log.exception("batch preparation failed", extra={"device": self.name})
        self.batches += 1
        pool = self._pool
        self.commands += len(jobs)
        # the whole batch is registered before any of it runs (the watchdog's view is whole)
        now = time.monotonic()
        self.inflight.update((cmd_id, (now, job)) for cmd_id, job in jobs)
        for cmd_id, job in jobs:
            if pool is None or job.inline:
                handed[0] += 1
                self._run(cmd_id, job)  # answers every outcome itself
            else:
                fut = pool.submit(self._run, cmd_id, job)
                handed[0] += 1
                self._futures[cmd_id] = fut
                self._jobs[cmd_id] = job
                fut.add_done_callback(self._wake_up)

    def _admit_all(self, entries: list[Command | Tmr | BadEntry],
                   jobs: list[tuple[int, Job]]) -> None:
        """Admit commands in ring order (under the lock) into ``jobs``; answer bad entries
        and TMRs."""
        saw_tmr = False
        tag = self.tag
        for entry in entries:
            if isinstance(entry, Command):
                try:
                    jobs.append((entry.cmd_id, self.admit(entry.cdb, entry.iov, tag)))
                except BaseException:
                    log.exception("admitting command %d failed", entry.cmd_id,
                                  extra={"device": self.name})
                    sense = build_fixed_sense(C.SenseKey.HARDWARE_ERROR,
                                              *C.INTERNAL_TARGET_FAILURE)
                    self._done.append((entry.cmd_id, SAM_STAT_CHECK_CONDITION, sense, None))
            elif isinstance(entry, BadEntry):
                log.warning("refusing malformed ring entry %d: %s", entry.cmd_id, entry.reason,
                            extra={"device": self.name})
                sense = build_fixed_sense(C.SenseKey.ILLEGAL_REQUEST, *C.INVALID_FIELD_IN_CDB)
                self._done.append((entry.cmd_id, SAM_STAT_CHECK_CONDITION, sense, None))
            else:
                saw_tmr = True
                self._handle_tmr(entry)
        if saw_tmr:
            # fetch() moved cmd_tail past the TMR entries; only a notify lets the kernel
            # reuse that ring space when no command completion follows.
            self.uio.notify()

    def _handle_tmr(self, tmr: Tmr) -> None:
        """An abort or reset: commands not started yet are answered TASK ABORTED, never run."""
        log.info("task management %d for commands %s", tmr.tmr_type, list(tmr.cmd_ids),
                 extra={"device": self.name})
        for cmd_id in tmr.cmd_ids:
            fut = self._futures.get(cmd_id)
            if fut is not None and fut.cancel():
                self._cancelled(cmd_id)

    def _cancelled(self, cmd_id: int) -> None:
        """A job that will never run: give back what admission took, answer TASK ABORTED."""
        job = self._jobs.pop(cmd_id, None)
        if job is not None:
            try:
                job.cancel()
            except BaseException:
                log.exception("cancelling command %d failed", cmd_id, extra={"device": self.name})
        self._done.append((cmd_id, SAM_STAT_TASK_ABORTED, None, None))

    def _run(self, cmd_id: int, job: Job) -> None:
        try:
            res = job()
            self._done.append((cmd_id, res.status, res.sense, res.read_len))
        except BaseException:
            # The SCSI layer answers every error itself; reaching here is a bug.  The command
            # must still be answered, or the initiator waits for the kernel's timeout.
            log.exception("command %d crashed", cmd_id, extra={"device": self.name})
            sense = build_fixed_sense(C.SenseKey.HARDWARE_ERROR, *C.INTERNAL_TARGET_FAILURE)
            self._done.append((cmd_id, SAM_STAT_CHECK_CONDITION, sense, None))

    def _wake_up(self, _fut: Future[None]) -> None:
        self._kick()

    def _complete_done(self) -> None:
        done = self._done
        if not done:
            return
        ring = self.ring
        futures = self._futures
        inflight = self.inflight
        with self.lock:
            while done:
                cmd_id, status, sense, read_len = done.popleft()
                futures.pop(cmd_id, None)
                inflight.pop(cmd_id, None)
                self._jobs.pop(cmd_id, None)
                ring.complete(cmd_id, status, sense, read_len)
            self.uio.notify()

    def _drain_on_exit(self) -> None:
        """Wait for workers, answer what they finished, release the ring's views."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for cmd_id, fut in list(self._futures.items()):
            if fut.cancelled():
                self._cancelled(cmd_id)
        try:
            self._complete_done()
        except (TargetMirrorError, OSError) as exc:
            log.warning("could not answer the last commands: %s", exc,
                        extra={"device": self.name})
        self._futures.clear()
        self.inflight.clear()
        self.ring.release()
        with self._wake_lock:
            os.close(self._wake)
            self._wake = -1
