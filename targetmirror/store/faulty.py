"""Fault injection: an :class:`Image` that fails, stalls or transfers short on chosen calls.

For tests and demonstrations of the mirror's leg-failure handling, in process.  (The lab uses
device-mapper ``error``/``flakey`` targets under a real leg instead.)  It lives in the package,
not in tests/, so benchmarks and the crash-point script can use it too; nothing in the daemon
constructs one.

A :class:`Fault` says *which* calls fail -- by operation, by the call's ordinal for that
operation, by an offset range, with a probability drawn from the plan's seeded RNG, so a run is
reproducible from its seed -- and *how*:

* ``eio`` / ``enospc``: the call raises :class:`StoreError` with that errno and transfers
  nothing;
* ``short``: half the bytes are transferred, then the call raises EIO, as a device that stops
  mid-request does (``Image`` itself finishes benign short transfers in a loop; a short
  transfer that *ends in an error* is what reaches the mirror);
* ``delay``: the call is held ``seconds`` (or until :meth:`FaultPlan.release`), then done;
* ``vanish``: this and every later call fails with ENODEV, like a device that went away.
"""

from __future__ import annotations

import errno as errno_mod
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from targetmirror.errors import ConfigError, StoreError
from targetmirror.store.image import Image

OPS = ("read", "write", "flush", "zero")
KINDS = ("eio", "enospc", "short", "delay", "vanish")


@dataclass
class Fault:
    """One injected fault; see the module docstring."""

    op: str
    kind: str
    nth: int | None = None
    """Fail the nth call of ``op`` (1-based) and, with ``count``, the following ones."""
    count: int = 1
    """How many matching calls fail (``nth`` onwards, or by probability); -1: all of them."""
    offset: tuple[int, int] | None = None
    """Only calls touching ``[start, end)`` match."""
    probability: float = 1.0
    seconds: float = 0.0
    """For ``delay``."""
    fired: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigError(f"fault op {self.op!r}: expected one of {', '.join(OPS)}")
        if self.kind not in KINDS:
            raise ConfigError(f"fault kind {self.kind!r}: expected one of {', '.join(KINDS)}")


class FaultPlan:
    """The faults for one image, deterministic for a given seed."""

    def __init__(self, faults: Sequence[Fault] = (), seed: int = 0) -> None:
        self.faults = list(faults)
        # reproducible faults, not secrets
        self.rng = random.Random(seed)  # noqa: S311  # nosec B311
        self.calls = dict.fromkeys(OPS, 0)
        self.vanished = False
        self.injected: list[tuple[str, str, int]] = []
        """(op, kind, offset) of every fault that fired, in order."""
        self._mu = threading.Lock()
        self._release = threading.Event()

    def add(self, fault: Fault) -> Fault:
        with self._mu:
            self.faults.append(fault)
        return fault

    def release(self) -> None:
        """End every current and future ``delay`` early."""
        self._release.set()

    def pick(self, op: str, offset: int, length: int) -> Fault | None:
        """The fault for this call, if any (counts the call)."""
        with self._mu:
            self.calls[op] += 1
            n = self.calls[op]
            if self.vanished:
                return Fault(op, "vanish")
            for f in self.faults:
                if f.op != op or (f.count >= 0 and f.fired >= f.count):
                    continue
                if f.nth is not None and n < f.nth:
                    continue
                if f.offset is not None and not (offset < f.offset[1]
                                                 and f.offset[0] < offset + max(length, 1)):
                    continue
                if f.probability < 1.0 and self.rng.random() >= f.probability:
                    continue
                f.fired += 1
                if f.kind == "vanish":
                    self.vanished = True
                self.injected.append((op, f.kind, offset))
                return f
            return None


class FaultyImage(Image):
    """An :class:`Image` that consults a :class:`FaultPlan` before every call."""

    def __init__(self, path: str, plan: FaultPlan | None = None, **kw: bool) -> None:
        super().__init__(path, **kw)
        self.plan = plan or FaultPlan()

    def _fail(self, f: Fault, what: str, offset: int, length: int) -> StoreError:
        code = {"enospc": errno_mod.ENOSPC, "vanish": errno_mod.ENODEV}.get(f.kind,
                                                                            errno_mod.EIO)
        kind = "read" if what == "read" else ("flush" if what == "flush" else "write")
        return StoreError(f"{what} of {length} bytes at {offset} on {self.path} failed: "
                          f"{errno_mod.errorcode[code]} (injected {f.kind})", kind=kind,
                          path=self.path, errno=code)

    def _before(self, op: str, offset: int, length: int) -> Fault | None:
        f = self.plan.pick(op, offset, length)
        if f is None:
            return None
        if f.kind == "delay":
            self.plan._release.wait(f.seconds)  # the injected stall itself
            return None
        if f.kind == "short":
            return f
        raise self._fail(f, op, offset, length)

    def readv(self, offset: int, iov: Sequence[memoryview]) -> None:
        length = sum(len(v) for v in iov)
        f = self._before("read", offset, length)
        if f is not None:
            half = _first_bytes(iov, length // 2)
            super().readv(offset, half)
            raise self._fail(f, "read", offset, length)
        super().readv(offset, iov)

    def writev(self, offset: int, iov: Sequence[memoryview]) -> None:
        length = sum(len(v) for v in iov)
        f = self._before("write", offset, length)
        if f is not None:
            super().writev(offset, _first_bytes(iov, length // 2))
            raise self._fail(f, "write", offset, length)
        super().writev(offset, iov)

    def flush(self) -> None:
        if self._before("flush", 0, 0) is not None:
            raise self._fail(Fault("flush", "eio"), "flush", 0, 0)
        super().flush()

    def write_zeroes(self, offset: int, length: int) -> None:
        f = self._before("zero", offset, length)
        if f is not None:
            raise self._fail(f, "zero", offset, length)
        super().write_zeroes(offset, length)


def _first_bytes(iov: Sequence[memoryview], n: int) -> list[memoryview]:
    out: list[memoryview] = []
    for v in iov:
        if n <= 0:
            break
        out.append(v[:n])
        n -= len(v[:n])
    return out
