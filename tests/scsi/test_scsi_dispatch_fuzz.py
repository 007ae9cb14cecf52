"""Hypothesis over the fuzz target for the SCSI dispatch (tests/fuzz/harness.py: run_cdb).

Each example is a device of random geometry and a few commands with random buffers, run the
way the daemon runs them (fast path first, else classify + execute).  The target asserts: a
valid status with well-formed sense, no exception, every medium change inside the command's
write extent and none on a write-protected unit, and the fast path equal to the general path.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import run_cdb


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=512))
def test_dispatch_invariants(data: bytes) -> None:
    run_cdb(data)
