"""Image files whose page cache is a real memfd, on the power-cut model of ``powerloss.py``.

``powerloss.SimImage`` keeps its bytes in a Python bytearray, so it has no file descriptor and
the express lane (which ``pwritev``s descriptors itself, in C) can never run over it.  Here each
image file is a ``memfd``: the *volatile* copy (the page cache) is the memfd's contents, which
any descriptor -- Python's ``Image`` methods or the compiled lane -- reads and writes for real;
the *durable* copy is a bytearray that ``fdatasync`` updates.  A crash keeps the durable copy
plus a random subset of the dirty pages, exactly as ``powerloss.SimFile`` does, so a
:class:`MemFile` can live in ``SimFS.files`` beside the bitmap's ``SimFile`` and one
``SimFS.reboot()`` cuts the power for all of them.

Dirty pages are found by comparing the two copies (a lane write leaves no trace in Python), so
a page rewritten with its durable contents counts as clean; that changes nothing a crash could
show.  Every Python-path operation is a crash point (``SimFS.tick``); a lane run is not (it is
one call that finishes before the power can go).

Faults: :class:`MemImage` is a :class:`FaultyImage` (``targetmirror/store/faulty.py``), so a
``FaultPlan`` makes reads, writes, flushes and zeroing fail, stall or transfer short.  Two
choices make the faults behave like Linux rather than like the plan's generic ``Image``:

* a failing ``fdatasync`` (EIO/ENOSPC) marks the dirty pages clean *without* writing them
  ("fsyncgate"): the page cache still serves the new data, but a later successful fdatasync does
  not write those pages and a power cut loses them;
* a slow ``fdatasync`` (``delay``) writes the pages first and then stalls (the device's cache
  flush is the slow part), so a write that lands during the stall is *not* covered by it.

A closed image answers every later call with EBADF (a real closed descriptor may be reused by
another file; the model makes the closed case deterministic), and gates (:meth:`MemImage.gate`)
hold one call at a chosen point until the test releases it.
"""

from __future__ import annotations

import errno as errno_mod
import json
import os
import random
import threading
from collections.abc import Sequence

from targetmirror.errors import StoreError
from targetmirror.mirror.state import MirrorState, StateStore
from targetmirror.store.faulty import FaultPlan, FaultyImage, _first_bytes
from targetmirror.store.image import Image
from tests.mirror.powerloss import SimFS, SimStateStore

PAGE = 4096
GATE_TIMEOUT = 30.0


class MemFile:
    """One file: a memfd (the page cache) and its durable bytes."""

    def __init__(self, data: bytes) -> None:
        self.fd = os.memfd_create("tm-model", os.MFD_CLOEXEC)
        if data:
            os.pwrite(self.fd, data, 0)
        self.durable = bytearray(data)
        self.dropped: dict[int, bytes] = {}
        """Pages a failed fdatasync marked clean without writing: page -> the contents it
        dropped.  While the page still holds exactly that, no fdatasync writes it."""
        self._mu = threading.Lock()

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def cur(self) -> bytes:
        """What a read returns now (the page cache)."""
        return os.pread(self.fd, self.size, 0)

    def _dirty(self, cur: bytes) -> list[int]:
        n = max(len(cur), len(self.durable))
        return [p for p in range((n + PAGE - 1) // PAGE)
                if cur[p * PAGE:(p + 1) * PAGE] != self.durable[p * PAGE:(p + 1) * PAGE]]

    def sync(self) -> None:
        """fdatasync: every dirty page (but the dropped ones) becomes durable."""
        with self._mu:
            cur = self.cur()
            if len(self.durable) < len(cur):
                self.durable.extend(bytes(len(cur) - len(self.durable)))
            del self.durable[len(cur):]
            for p in self._dirty(cur):
                page = cur[p * PAGE:(p + 1) * PAGE]
                if self.dropped.get(p) == page:
                    continue
                self.dropped.pop(p, None)
                self.durable[p * PAGE:(p + 1) * PAGE] = page

    def written(self, offset: int, length: int) -> None:
        """A write through Python touched these pages: they are dirty again even if it put
        back the very bytes a failed fdatasync dropped (the diff would not show that).
        (The lane's writes are seen only by the diff.)"""
        if self.dropped and length > 0:
            with self._mu:
                for p in range(offset // PAGE, (offset + length - 1) // PAGE + 1):
                    self.dropped.pop(p, None)

    def drop_dirty(self) -> None:
        """A writeback error: the dirty pages are marked clean, their data never written."""
        with self._mu:
            cur = self.cur()
            for p in self._dirty(cur):
                self.dropped[p] = cur[p * PAGE:(p + 1) * PAGE]

    def after_crash(self, rng: random.Random) -> MemFile:
        """What the disk holds after the power came back (``SimFS.reboot`` calls this)."""
        with self._mu:
            cur = self.cur()
            data = bytearray(self.durable)
            for p in self._dirty(cur):
                page = cur[p * PAGE:(p + 1) * PAGE]
                if self.dropped.get(p) == page:
                    continue  # marked clean by a failed fdatasync: never written back
                if rng.random() < 0.5:  # this page happened to be written back
                    data[p * PAGE:p * PAGE + len(page)] = page[: max(0, len(data) - p * PAGE)]
            return MemFile(bytes(data))

    def close(self) -> None:
        """Close the memfd (idempotent: its number may be reused at once)."""
        with self._mu:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class _Gate:
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def hold(self, what: str) -> None:
        self.entered.set()
        if not self.release.wait(GATE_TIMEOUT):
            raise AssertionError(f"gate at {what} was never released")


class MemImage(FaultyImage):
    """An image on a :class:`MemFile` of a :class:`SimFS`; see the module docstring."""

    def __init__(self, fs: SimFS, path: str, size: int, plan: FaultPlan | None = None,
                 *, data: bytes | None = None) -> None:  # no Image.__init__: no path to open
        self.fs = fs
        self.path = path
        self.readonly = False
        self.direct = False
        self.is_block_device = False
        if path not in fs.files:
            fs.files[path] = MemFile(data if data is not None else bytes(size))
        self.file: MemFile = fs.files[path]  # type: ignore[assignment]
        self.fd = os.dup(self.file.fd)
        self.size = size
        self._closed = False
        self._close_lock = threading.Lock()
        self.frozen = False
        self.fast = True
        self.plan = plan if plan is not None else FaultPlan()
        self.lane_ok = True
        """False: never offer the descriptor to the express lane."""
        self._gates: dict[str, _Gate] = {}

    # -- test controls ---------------------------------------------------------------------
    def gate(self, point: str, offset: int | None = None) -> _Gate:
        """Hold the next call at ``point`` (at ``offset``, if given) until ``gate.release`` is
        set; ``gate.entered`` says it is held.  Points: "read", "write", "zero", "flush"
        (before anything is written), "flushed" (after the pages are durable, before the call
        returns)."""
        g = _Gate()
        self._gates[f"{point}@{offset}"] = g
        return g

    def _hold(self, point: str, offset: int | None = None) -> None:
        if not self._gates:
            return
        g = self._gates.pop(f"{point}@{offset}", None) if offset is not None else None
        if g is None:
            g = self._gates.pop(f"{point}@None", None)
        if g is not None:
            g.hold(f"{point} of {self.path}")

    def faults_pending(self) -> bool:
        """A fault of the plan may still fire (the lane must not run past it)."""
        return any(f.count < 0 or f.fired < f.count for f in self.plan.faults)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise StoreError(f"{what} on {self.path} failed: [Errno {errno_mod.EBADF}] closed "
                             "descriptor", kind="flush" if what == "flush" else what,
                             path=self.path, errno=errno_mod.EBADF)

    # -- Image -------------------------------------------------------------------------------
    def express_fd(self, write: bool = True) -> int | None:
        """Offered to the lane on purpose.  Faults and gates are Python-path only: the lane's
        I/O is not counted by the fault plan (a fault armed for the n-th call fires on the
        n-th call Python makes), and a pending gate keeps the lane away."""
        if (self._closed or not self.fast or not self.lane_ok or (write and self.frozen)
                or self._gates):
            return None
        return self.fd

    # Each call: gate, then the fault plan (which may stall), then the crash point, then the
    # I/O itself -- a thread that passes the crash point does its I/O at once, so no thread of
    # a machine that lost power touches a descriptor after the power went.
    def readv(self, offset: int, iov: Sequence[memoryview]) -> None:
        self._check_open("read")
        self._hold("read", offset)
        length = sum(len(v) for v in iov)
        f = self._before("read", offset, length)
        self.fs.tick()
        if f is not None:  # short: half, then the error
            Image.readv(self, offset, _first_bytes(iov, length // 2))
            raise self._fail(f, "read", offset, length)
        Image.readv(self, offset, iov)

    def writev(self, offset: int, iov: Sequence[memoryview]) -> None:
        if self.frozen:
            self._check_writable("write")
        self._check_open("write")
        self._hold("write", offset)
        length = sum(len(v) for v in iov)
        f = self._before("write", offset, length)
        self.fs.tick()
        if f is not None:
            Image.writev(self, offset, _first_bytes(iov, length // 2))
            self.file.written(offset, length // 2)
            raise self._fail(f, "write", offset, length)
        Image.writev(self, offset, iov)
        self.file.written(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        self._check_writable("zeroing")
        self._check_open("write")
        self._hold("zero", offset)
        f = self._before("zero", offset, length)
        if f is not None:
            raise self._fail(f, "zero", offset, length)
        self.fs.tick()
        Image.write_zeroes(self, offset, length)
        self.file.written(offset, length)

    def flush(self) -> None:
        self._check_open("flush")
        self._hold("flush")
        f = self.plan.pick("flush", 0, 0)
        self.fs.tick()
        if f is not None and f.kind != "delay":
            self.file.drop_dirty()
            raise self._fail(f, "flush", 0, 0)
        Image.flush(self)  # the real fdatasync of the descriptor (EBADF if it was closed)
        self.file.sync()
        if f is not None:  # slow: the pages are written, the device's flush stalls
            self.plan._release.wait(f.seconds)
        self._hold("flushed")

    def reopen(self, path: str | None = None) -> Image:
        return MemImage(self.fs, path or self.path, self.size, self.plan)

    def bytes(self) -> bytes:
        """The page cache's view of the file (what any reader sees now)."""
        return self.file.cur()[: self.size]


class FailingSaves:
    """Mixin state for a StateStore whose next saves fail with ENOSPC, or wait at a gate."""

    def __init__(self) -> None:
        self.fail_next = 0
        self.failed_saves = 0
        self.saves = 0
        self.save_gate: _Gate | None = None

    def before_save(self) -> None:
        g, self.save_gate = self.save_gate, None
        if g is not None:
            g.hold("a state save")
        if self.fail_next > 0:
            self.fail_next -= 1
            self.failed_saves += 1
            raise OSError(errno_mod.ENOSPC, "No space left on device (injected)")
        self.saves += 1

    def gate_save(self) -> _Gate:
        self.save_gate = _Gate()
        return self.save_gate


class AlwaysLose(random.Random):
    """An RNG for ``SimFS`` under which a power cut writes back no dirty page at all."""

    def random(self) -> float:
        return 0.99


class FlakySimStore(SimStateStore):
    """``SimStateStore`` whose saves can be made to fail (ENOSPC) or wait (``ctl``)."""

    def __init__(self, fs: SimFS, ctl: FailingSaves | None = None) -> None:
        super().__init__(fs)
        self.ctl = ctl if ctl is not None else FailingSaves()

    def save(self, st: MirrorState) -> None:
        self.ctl.before_save()
        super().save(st)

    def doc(self, name: str) -> dict | None:
        """The durable state document of ``name`` (what a restart would load)."""
        raw = self.fs.docs.get(name)
        return None if raw is None else json.loads(raw)


class FlakyStore(StateStore):
    """The real ``StateStore`` (files, fsync, rename) with the same controls."""

    def __init__(self, directory: str, ctl: FailingSaves | None = None) -> None:
        super().__init__(directory)
        self.ctl = ctl if ctl is not None else FailingSaves()

    def save(self, st: MirrorState) -> None:
        self.ctl.before_save()
        super().save(st)

    def doc(self, name: str) -> dict | None:
        try:
            with open(self._path(name), encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
