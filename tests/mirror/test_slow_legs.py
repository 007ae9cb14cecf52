"""A slow leg is not a failed leg (issue 19): deadlines per kind of call, discards in bounded
pieces that never fail a leg, and slowness reported, on real files with injected faults."""

from __future__ import annotations

import threading
import time

import pytest

from targetmirror.errors import MirrorError
from targetmirror.mirror.legs import Deadlines
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import StateStore
from targetmirror.store.faulty import Fault, FaultPlan, FaultyImage

BS = 512
RS = 64 * 1024
SIZE = 64 * RS
PIECE = 4 * RS


class Rig:
    def __init__(self, tmp, deadlines: Deadlines, store: bool = True) -> None:
        self.paths = []
        for leg in ("a", "b"):
            p = tmp / f"{leg}.img"
            p.write_bytes(b"\xee" * SIZE)  # old data: a discard must make it read as zeros
            self.paths.append(str(p))
        self.plans = (FaultPlan(), FaultPlan())
        self.m = Mirror("m", FaultyImage(self.paths[0], self.plans[0]),
                        FaultyImage(self.paths[1], self.plans[1]), size=SIZE, block_size=BS,
                        store=StateStore(str(tmp / "state")) if store else None,
                        region_size=RS, wi_interval=None, deadlines=deadlines)

    def image(self, leg: int) -> bytes:
        with open(self.paths[leg], "rb") as f:
            return f.read()

    def close(self) -> None:
        for p in self.plans:
            p.release()
        self.m.close()


@pytest.fixture
def rig(tmp_path):
    made: list[Rig] = []

    def make(**kw) -> Rig:
        d = Deadlines(**{"read": 5.0, "write": 5.0, "flush": 5.0, "discard": 0.3,
                         "piece": PIECE, "slow": 0.2, **kw})
        r = Rig(tmp_path, d)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_a_failed_discard_is_made_good_with_zeros_and_fails_no_leg(rig):
    r = rig()
    r.plans[0].add(Fault("zero", "eio", count=-1))  # A cannot punch holes at all
    r.m.unmap(RS, 10 * RS)
    assert r.m.health == "ok" and not r.m.st.failed
    for leg in (0, 1):
        img = r.image(leg)
        assert img[RS:11 * RS] == bytes(10 * RS), f"leg {leg}: the discarded range is not zero"
        assert img[:RS] == b"\xee" * RS and img[11 * RS:] == b"\xee" * (SIZE - 11 * RS)
    st = r.m.status()["legs"]
    # 10 regions in pieces of 4: three pieces, each fell back to writing zeros on A
    assert st["a"]["discard_fallbacks"] == 3 and st["b"]["discard_fallbacks"] == 0
    assert r.m.verify()["mismatches"] == 0


def test_only_a_failing_zero_write_after_a_failed_discard_fails_the_leg(rig):
    r = rig()
    r.plans[0].add(Fault("zero", "eio", count=-1))
    r.plans[0].add(Fault("write", "eio", count=-1))
    r.m.unmap(0, RS)  # completes on B
    assert r.m.health == "degraded" and set(r.m.st.failed) == {"a"}
    assert r.image(1)[:RS] == bytes(RS)


def test_discards_go_to_the_legs_in_bounded_pieces(rig):
    r = rig()
    r.m.write_zeroes(0, 10 * RS + 4096)
    # WRITE SAME's zeroing in pieces of PIECE bytes: 3 full pieces' worth and a tail
    assert r.plans[0].calls["zero"] == r.plans[1].calls["zero"] == 3
    assert r.image(0)[:10 * RS + 4096] == bytes(10 * RS + 4096) == r.image(1)[:10 * RS + 4096]


def test_a_slow_discard_is_reported_slow_not_failed(rig):
    r = rig()
    r.plans[0].add(Fault("zero", "delay", seconds=1.5))  # far past the discard deadline
    seen: dict = {}

    def watch() -> None:
        while "slow" not in seen:
            a = r.m.status()["legs"]["a"]
            if a["slow"]:
                seen["slow"] = a
            time.sleep(0.02)  # sampling status while the stalled call runs; bounded below

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    r.m.unmap(0, RS)
    t.join(5)
    assert seen.get("slow") is not None, "status never showed the stalled leg as slow"
    assert seen["slow"]["inflight"] >= 1 and seen["slow"]["oldest_call_seconds"] > 0.2
    legs = r.m.status()["legs"]
    assert r.m.health == "ok" and not r.m.st.failed
    assert legs["a"]["discards_slow"] == 1 and legs["a"]["slow_calls"] >= 1
    assert legs["a"]["latency"]["max"] >= 1.5 and not legs["a"]["slow"]


def test_a_flush_past_the_data_deadline_but_within_its_own_fails_nothing(rig):
    r = rig(write=0.3, flush=3.0)
    r.plans[0].add(Fault("flush", "delay", seconds=1.0))
    r.m.write(0, [memoryview(b"x" * BS)], True)  # FUA: write + flush on each leg
    assert r.m.health == "ok"
    # ... while a write that stops answering for its deadline does fail its leg
    r.plans[0].add(Fault("write", "delay", seconds=30))
    done = threading.Event()
    threading.Thread(target=lambda: (r.m.write(RS, [memoryview(b"y" * BS)], False),
                                     done.set()), daemon=True).start()
    deadline = time.monotonic() + 10
    while "a" not in r.m.st.failed and time.monotonic() < deadline:
        time.sleep(0.02)  # the housekeeping thread under test fails it; bounded
    assert r.m.st.failed["a"]["kind"] == "timeout"
    r.plans[0].release()
    assert done.wait(10)


def test_the_deadline_of_a_data_call_grows_with_its_size():
    d = Deadlines(read=20.0, write=10.0, per_mib=2.0)
    assert d.for_call("write", 4096) == 10.0
    assert d.for_call("write", 9 << 20) == 10.0 + 2.0 * 8
    assert d.for_call("read", 1 << 20) == 20.0
    assert d.for_call("flush", 0) == d.flush
    assert d.for_call("discard", 1 << 30) == d.discard


@pytest.mark.parametrize("kw", [{"read": 0}, {"flush": -1.0}, {"piece": 1000},
                                {"slow": 0}, {"per_mib": -1}])
def test_bad_deadlines_are_refused_with_what_was_expected(kw):
    with pytest.raises(MirrorError, match="expected"):
        Deadlines(**kw)


def test_latency_quantiles_come_from_the_calls():
    from targetmirror.mirror.legs import LegStats

    st = LegStats()
    for _ in range(98):
        st.record(0.0008, slow=1.0)
    st.record(0.3, slow=1.0)
    st.record(2.0, slow=1.0)
    assert st.quantile(0.5) == 0.001 and st.quantile(0.99) == 0.5 and st.max == 2.0
    assert st.slow_calls == 1 and st.calls == 100
