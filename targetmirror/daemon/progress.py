"""Progress of ``verify``, which ``Mirror.verify`` does not report while it runs.

A rejoin, repair, recovery or initial sync runs on the mirror's copier thread and publishes its
progress in ``Mirror.resync``; a verify is a plain call that returns its result at the end,
which for a large mirror is an hour of nothing in ``status`` and in the metrics.  The daemon
therefore runs a verify as a series of calls over consecutive chunks of the range (each call
compares its chunk region by region under the range locks, as one call over the whole range
would) and records after each chunk how far it is.  The chunks are region-aligned, so no region
is compared twice or skipped; the results are summed.

The table also keeps, per mirror, the result of the latest verify since the daemon started
(mismatches and when), for the ``targetmirror_verify_last_*`` metrics.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from targetmirror.errors import MirrorError
from targetmirror.mirror.bitmap import DEFAULT_REGION
from targetmirror.mirror.mirror import Mirror

CHUNK_REGIONS = 256
"""Regions per call (16 MiB at the default 64 KiB regions): progress moves at least every
chunk, and the per-call cost (a state check, two region buffers) stays negligible."""


class VerifyTable:
    """``mirror name -> progress`` of verifies, read by the metrics at scrape time."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._rows: dict[str, dict[str, Any]] = {}

    def get(self, name: str) -> dict[str, Any] | None:
        """A copy of the row of ``name``: ``active``, ``bytes_done``, ``bytes_total``,
        ``regions_done``, ``regions_total``, ``eta_seconds``, ``started_wall``, ``error``,
        ``last`` (the latest completed verify: ``mismatches``, ``completed_wall``)."""
        with self._mu:
            row = self._rows.get(name)
            return None if row is None else dict(row)

    def _update(self, name: str, **values: Any) -> None:
        with self._mu:
            self._rows.setdefault(name, {}).update(values)

    def run(self, m: Mirror, *, repair: bool = False, offset: int = 0,
            length: int | None = None, rate: float | None = None,
            max_report: int = 16) -> dict[str, Any]:
        """``m.verify(...)`` chunk by chunk with progress; the same result as one call."""
        with self._mu:
            if (self._rows.get(m.name) or {}).get("active"):
                raise MirrorError(f"mirror {m.name}: a verify is already running")
            self._rows.setdefault(m.name, {})["active"] = True
        try:
            return self._run(m, repair, offset, length, rate, max_report)
        finally:
            self._update(m.name, active=False)

    def _run(self, m: Mirror, repair: bool, offset: int, length: int | None,
             rate: float | None, max_report: int) -> dict[str, Any]:
        rs = m.bitmap.region_size if m.bitmap is not None else DEFAULT_REGION
        if offset < 0 or (length is not None and length < 0):
            raise MirrorError(f"verify of {m.name}: offset and length must not be negative")
        end = m.size if length is None else min(m.size, offset + length)
        first = offset - offset % rs
        if end <= first:  # nothing to compare: one call, for its checks and its answer
            res = m.verify(repair=repair, offset=offset, length=length, rate=rate,
                           max_report=max_report)
            self._update(m.name, last={"mismatches": res["mismatches"],
                                       "completed_wall": time.time()})
            return res
        total = max(0, end - first)
        nregions = -(-total // rs)
        t0 = time.monotonic()
        self._update(m.name, bytes_done=0, bytes_total=total, regions_done=0,
                     regions_total=nregions, eta_seconds=None, started_wall=time.time(),
                     error=None)
        out: dict[str, Any] = {"name": m.name, "state": str(m.state), "regions_checked": 0,
                               "regions_skipped_changed": 0, "mismatches": 0,
                               "first_mismatch_lbas": [], "repaired": 0, "bytes_compared": 0}
        step = CHUNK_REGIONS * rs
        pos = first
        try:
            while pos < end:
                stop = min(end, pos + step)
                part = m.verify(repair=repair, offset=max(pos, offset), length=stop - max(
                    pos, offset), rate=rate, max_report=max_report - len(
                        out["first_mismatch_lbas"]))
                for key in ("regions_checked", "regions_skipped_changed", "mismatches",
                            "repaired", "bytes_compared"):
                    out[key] += part[key]
                out["first_mismatch_lbas"] += part["first_mismatch_lbas"]
                pos = stop
                done = pos - first
                elapsed = time.monotonic() - t0
                self._update(m.name, bytes_done=done,
                             regions_done=out["regions_checked"] + out[
                                 "regions_skipped_changed"],
                             eta_seconds=(total - done) * elapsed / done if done else None)
        except MirrorError as exc:
            self._update(m.name, error=str(exc))
            if pos == first:
                raise
            raise MirrorError(f"verify of {m.name} stopped at byte {pos}: {exc}") from exc
        out["seconds"] = time.monotonic() - t0
        self._update(m.name, last={"mismatches": out["mismatches"],
                                   "completed_wall": time.time()})
        return out
