"""Hypothesis over the fuzz target for the ring reader (tests/fuzz/harness.py: run_ring).

Each example lays out a whole map (mailbox, ring with commands, PADs, TMRs, unknown opcodes and
malformed entries, data area), then fetches, executes and completes in a random order.  The
target asserts: only RingError escapes, every view lies in the data area (checked by address),
nothing outside command buffers, responses and cmd_tail changes, every slot answered once with
the status and sense given.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import run_ring


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=768))
def test_ring_reader_invariants(data: bytes) -> None:
    run_ring(data)
