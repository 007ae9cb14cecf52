"""Test doubles for the express lane's wait loop, which speaks to the UIO fd itself (in C).

* :class:`SocketUio`: the UIO fd as a ``SOCK_SEQPACKET`` pair.  The test side plays the kernel:
  :meth:`SocketUio.queue` writes a command into the :class:`Producer`'s ring and sends a 4-byte
  event (what makes ``poll`` on ``/dev/uioN`` readable); a thread receives every 4-byte notify
  -- from Python's :meth:`SocketUio.notify` or from the lane's own ``write`` -- and reaps the
  completions, as the kernel does.
* :class:`StandInLease`: the mirror-side contract the lane codes against
  (``mirror.lane_lease(volume)``, see targetmirror/daemon/device.py), built from today's
  :class:`Mirror` internals until the mirror's state machine provides it: a plan computed
  under the mirror's lock and released before the lane runs, a ``stop_fd`` eventfd that
  :meth:`StandInLease.revoke` writes, an ``io_clock``, and ``release(served, touched)``.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterable

from targetmirror.mirror.mirror import Mirror, QuietPlan
from tests.tcmu.producer import Completion, Producer


class SocketUio:
    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.user, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.user.setblocking(False)
        self.lock = threading.Condition()
        self.completions: dict[int, Completion] = {}
        self.notifies = 0
        self._thread = threading.Thread(target=self._reaper, name="kernel", daemon=True)
        self._thread.start()

    # -- the handler's side (UioLike) ------------------------------------------------------
    def fileno(self) -> int:
        return self.user.fileno()

    def lane_fd(self) -> int:
        return self.user.fileno()

    def ack(self) -> bool:
        try:
            return len(self.user.recv(4)) == 4
        except BlockingIOError:
            return False

    def wait(self, timeout: float | None = None) -> bool:
        ms = None if timeout is None else int(timeout * 1000)
        if not select.select([self.user], [], [], None if ms is None else ms / 1000)[0]:
            return False
        return self.ack()

    def notify(self) -> None:
        self.user.send(bytes(4))

    # -- the kernel's side -----------------------------------------------------------------
    def _reaper(self) -> None:
        while True:
            try:
                msg = self.kernel.recv(4)
            except OSError:
                return
            if not msg:
                return
            with self.lock:
                self.notifies += 1
                self.completions.update(self.producer.reap())
                self.lock.notify_all()

    def queue(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> int:
        return self.queue_many([(cdb, data_out, data_in_len)])[0]

    def queue_many(self, cmds: Iterable[tuple[bytes, bytes, int]]) -> list[int]:
        """Queue every command, then raise one event: the handler sees them as one batch."""
        with self.lock:
            ids = [self.producer.queue(cdb, data, n) for cdb, data, n in cmds]
        self.kernel.send(bytes(4))
        return ids

    def wait_for(self, ids: list[int], timeout: float = 30.0) -> dict[int, Completion]:
        with self.lock:
            ok = self.lock.wait_for(lambda: all(i in self.completions for i in ids), timeout)
            assert ok, f"missing completions: {[i for i in ids if i not in self.completions]}"
            return {i: self.completions.pop(i) for i in ids}

    def close(self) -> None:
        self.kernel.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self.kernel.close()
        self.user.close()


class StandInLease:
    """The mirror's own lane lease (``Mirror.lane_lease``), wrapped so a test can count the
    leases, see what each release reported, and hold the lane off.

    :meth:`revoke` stops further leases, writes the real lease's ``stop_fd`` (through the
    mirror's gate, as a transition would) and waits for :meth:`release`; :meth:`allow` lets
    the lane lease again.
    """

    def __init__(self, mirror: Mirror) -> None:
        self.mirror = mirror
        self.stop_fd = -1
        self.io_clock: bytearray | None = None
        self.plan: QuietPlan | None = None
        self._real: object | None = None
        self._cv = threading.Condition()
        self._out = False
        self._allowed = True
        self.leases = 0
        self.released: list[tuple[int, tuple[int, ...]]] = []

    def lease(self, volume: int) -> StandInLease | None:
        m = self.mirror
        with self._cv:
            if not self._allowed or self._out:
                return None
            real = m.lane.lease(volume)
            if real is None:
                return None
            self._real = real
            self.plan, self.stop_fd, self.io_clock = real.plan, real.stop_fd, real.io_clock
            self._out = True
            self.leases += 1
            return self

    def release(self, served: int, touched: Iterable[int]) -> None:
        touched = tuple(touched)
        real = self._real
        assert real is not None, "release without a lease"
        real.release(served, touched)  # type: ignore[attr-defined]
        with self._cv:
            assert self._out, "release without a lease"
            self._out = False
            self._real = None
            self.released.append((served, touched))
            self._cv.notify_all()

    def revoke(self, timeout: float = 30.0) -> None:
        """Stop leasing, make the lane return, wait until it released."""
        m = self.mirror
        with self._cv:
            self._allowed = False
            if self._out:
                with m.mu:
                    m.lane.revoke_locked()
            assert self._cv.wait_for(lambda: not self._out, timeout), "the lane did not return"

    def allow(self) -> None:
        with self._cv:
            self._allowed = True

    def close(self) -> None:
        """Nothing to free: the mirror owns the lease's stop_fd and closes it."""
