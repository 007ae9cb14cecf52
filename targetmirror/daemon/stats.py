"""Per-command counters of a served device, written lock-free by the workers.

Kept apart from the metrics endpoint (:mod:`targetmirror.daemon.metrics`, which sums them at
scrape time) so the device layer that records them does not import the exporter, which reads
the devices: no import circle.
"""

from __future__ import annotations

import threading
from array import array
from bisect import bisect_left

READ, WRITE, OTHER = 0, 1, 2
DIRECTIONS = ("read", "write", "other")
LEGS = ("a", "b")

#: Upper bounds of the latency buckets, in nanoseconds (``le`` in seconds on the wire).  Fixed:
#: a command's latency is counted with one bisect, never a float conversion.
LATENCY_BOUNDS_NS: tuple[int, ...] = (
    25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
    25_000_000, 50_000_000, 100_000_000, 250_000_000, 1_000_000_000, 5_000_000_000)

_NBUCKETS = len(LATENCY_BOUNDS_NS) + 1          # the last one is +Inf
_STRIDE = 2 + _NBUCKETS                          # count, sum_ns, buckets...
_BYTES = len(DIRECTIONS) * _STRIDE               # then bytes[direction][leg]
_SHARD_LEN = _BYTES + len(DIRECTIONS) * len(LEGS)


class CommandStats:
    """Per-device command counters, written lock-free by the workers (see the module doc).

    Each thread gets its own shard (a ``list`` of ints) the first time it records; dict
    ``setdefault`` is atomic under the GIL, so two threads never share a shard and every ``+=``
    is made by the shard's only writer.  A reader sums the shards; it may see one command's
    count before its bytes, which a scrape tolerates (the next scrape is exact).
    """

    __slots__ = ("_arrays", "_shards")

    def __init__(self) -> None:
        self._shards: dict[int, list[int]] = {}
        self._arrays: list[array[int]] = []

    def array_shard(self) -> array[int]:
        """A shard as a flat int64 array, for a writer in C (the express lane, which adds
        into it with the layout below: ``layout()``).  Owned by one thread, like the others."""
        shard = array("q", bytes(8 * _SHARD_LEN))
        self._arrays.append(shard)
        return shard

    @staticmethod
    def layout() -> tuple[array[int], int, int]:
        """``(latency bounds in ns, stride per direction, offset of the byte counters)``."""
        return array("q", LATENCY_BOUNDS_NS), _STRIDE, _BYTES

    def record(self, direction: int, elapsed_ns: int, a_bytes: int = 0, b_bytes: int = 0
               ) -> None:
        """Count one finished command (called by a worker; plain integer additions only)."""
        s = self._shards.get(threading.get_ident())
        if s is None:
            s = self._shards.setdefault(threading.get_ident(), [0] * _SHARD_LEN)
        base = direction * _STRIDE
        s[base] += 1
        s[base + 1] += elapsed_ns
        s[base + 2 + bisect_left(LATENCY_BOUNDS_NS, elapsed_ns)] += 1
        if a_bytes:
            s[_BYTES + direction * 2] += a_bytes
        if b_bytes:
            s[_BYTES + direction * 2 + 1] += b_bytes

    def totals(self) -> list[int]:
        """The shards summed (scrape time)."""
        out = [0] * _SHARD_LEN
        for shard in [*self._shards.values(), *self._arrays]:
            for i, v in enumerate(shard):
                out[i] += v
        return out

    def commands(self, totals: list[int], direction: int) -> int:
        return totals[direction * _STRIDE]

    def latency_sum_seconds(self, totals: list[int], direction: int) -> float:
        return totals[direction * _STRIDE + 1] / 1e9

    def buckets(self, totals: list[int], direction: int) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs as Prometheus wants them."""
        base = direction * _STRIDE + 2
        out: list[tuple[str, int]] = []
        acc = 0
        for i in range(_NBUCKETS):
            acc += totals[base + i]
            le = "+Inf" if i == len(LATENCY_BOUNDS_NS) else repr(LATENCY_BOUNDS_NS[i] / 1e9)
            out.append((le, acc))
        return out

    def bytes(self, totals: list[int], direction: int, leg: int) -> int:
        return totals[_BYTES + direction * 2 + leg]
