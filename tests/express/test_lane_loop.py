"""The express lane's wait loop (``_lane.loop``) and batched submission against the kernel
double: it stays in C across many commands, notifies per batch, returns promptly when the
mirror revokes its lease or the ring thread is woken, hands Python exactly the entries it must
answer, and gives the same answers, bytes and bitmap as the Python path -- with io_uring
batches (both legs and whole runs in one call) and with one call per leg.

The lab proves the loop with the real kernel (tests/lab/test_lab_express.py).
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from targetmirror import express
from targetmirror.daemon import device as device_mod
from targetmirror.daemon.device import MirrorCommands
from targetmirror.daemon.runner import DeviceRunner
from targetmirror.errors import DeviceError
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import StateStore
from targetmirror.scsi.identity import DeviceIdentity
from targetmirror.store.image import Image
from targetmirror.tcmu.ring import Ring
from tests.express.kernel import SocketUio, StandInLease
from tests.express.test_lane import BS, RS, SIZE, TUR, r10, w10, w16
from tests.tcmu.producer import Producer

pytestmark = pytest.mark.skipif(not express.available(),
                                reason=f"express lane unavailable: {express.WHY_NOT}")

URING_MODES = ["uring", "mixed", "calls"] if express.HAVE_URING else ["calls"]
"""uring: every command through io_uring; mixed: only those of URING_MIN bytes or more (the
default); calls: one pwritev/preadv per leg."""


@dataclass
class LoopRig:
    mirror: Mirror
    commands: MirrorCommands
    uio: SocketUio
    runner: DeviceRunner
    lease: StandInLease | None
    paths: tuple[str, str]

    @property
    def lane(self):
        return self.commands.lane

    def settle(self) -> None:
        """Make the lane return (its counters are updated when the C call ends)."""
        assert self.lease is not None
        self.lease.revoke()
        self.lease.allow()

    def image(self, leg: int) -> bytes:
        with open(self.paths[leg], "rb") as f:
            return f.read()

    def close(self) -> None:
        if self.lease is not None:
            self.lease.revoke()
        self.runner.stop()
        self.runner.join(30)
        assert not self.runner.alive
        self.uio.close()
        self.mirror.close()
        if self.lease is not None:
            self.lease.close()


def make_loop_rig(directory: str, *, lane: bool = True, store: bool = True,
                  uring: str | bool = True, leased: bool = True, b_readonly: bool = False
                  ) -> LoopRig:
    paths = []
    for leg in ("a", "b"):
        p = os.path.join(directory, f"{leg}.img")
        with open(p, "wb") as f:
            f.truncate(SIZE)
        paths.append(p)
    mirror = Mirror("x", Image(paths[0]), Image(paths[1], readonly=b_readonly), size=SIZE,
                    block_size=BS,
                    region_size=RS,
                    store=StateStore(os.path.join(directory, "state")) if store else None,
                    wi_interval=None)
    lease = StandInLease(mirror) if leased else None
    if lease is not None:
        mirror.lane_lease = lease.lease  # type: ignore[attr-defined]
    commands = MirrorCommands(mirror, lambda: DeviceIdentity(serial="x0001",
                                                             max_transfer_blocks=4096))
    if commands.lane is not None and (not uring or uring == "calls"):
        commands.lane.uring_why_not = "off for this test"
    elif commands.lane is not None and uring != "mixed":
        commands.lane.uring_min = 0
    producer = Producer(cmdr_size=256 * 1024 - 128, data_size=16 << 20)
    uio = SocketUio(producer)
    runner = DeviceRunner("x", uio, Ring(producer.buf), commands.admit,
                          before_dispatch=commands.commit, workers=0,
                          express=commands.express if lane else None)
    runner.start()
    rig = LoopRig(mirror, commands, uio, runner, lease, (paths[0], paths[1]))
    warm = uio.queue(TUR)  # the first command builds the SCSI device
    assert uio.wait_for([warm])[warm].status == 0
    return rig


@pytest.fixture(params=URING_MODES)
def rig(request, tmp_path) -> Iterator[LoopRig]:
    r = make_loop_rig(str(tmp_path), uring=request.param)
    yield r
    r.close()


def test_qd1_writes_stay_in_the_loop(rig: LoopRig) -> None:
    rig.mirror.bitmap.sync(rig.mirror.bitmap.mark_all())
    rng = random.Random(3)
    n = 60
    expect = {}
    for slot in rng.sample(range(SIZE // BS // 8), n):  # one at a time: a wake-up each
        lba = slot * 8
        data = rng.randbytes(8 * BS)
        cid = rig.uio.queue(w10(lba, 8), data)
        assert rig.uio.wait_for([cid])[cid].status == 0
        expect[lba] = data
    rig.settle()
    a, b = rig.image(0), rig.image(1)
    for lba, data in expect.items():
        assert a[lba * BS:(lba + 8) * BS] == data == b[lba * BS:(lba + 8) * BS]
    assert a == b
    # the lane waited in C for the next command instead of returning to Python each time
    assert rig.lane.served >= n
    assert rig.lane.runs < n // 4, (rig.lane.runs, rig.lane.stops)
    assert rig.lane.notifies >= n - 1  # one notify per batch
    assert rig.lease is not None and bytes(rig.lease.io_clock) == bytes(16)  # idle


def test_a_revoked_lease_returns_at_once(rig: LoopRig, monkeypatch) -> None:
    monkeypatch.setattr(device_mod, "LEASE_WAIT_MS", 60_000)
    monkeypatch.setattr(device_mod, "LEASE_BUDGET_NS", 600 * 10**9)
    rig.mirror.bitmap.sync(rig.mirror.bitmap.mark_all())
    cid = rig.uio.queue(w10(0, 1), b"\1" * BS)
    assert rig.uio.wait_for([cid])[cid].status == 0
    assert rig.lease is not None
    deadline = time.monotonic() + 10
    while not rig.lease._out and time.monotonic() < deadline:  # the lane is waiting in C
        time.sleep(0.01)
    t0 = time.monotonic()
    rig.lease.revoke()
    assert time.monotonic() - t0 < 10  # not the 60 s wait
    assert rig.lane.stops[express.STOP_REVOKED] >= 1
    served, touched = rig.lease.released[-1]
    assert served >= 1 and 0 in touched  # the region written is handed back
    # while revoked, the Python path serves
    served_before = rig.lane.served
    cid = rig.uio.queue(w10(1, 1), b"\2" * BS)
    assert rig.uio.wait_for([cid])[cid].status == 0
    assert rig.lane.served == served_before
    assert rig.image(0)[BS:2 * BS] == rig.image(1)[BS:2 * BS] == b"\2" * BS
    rig.lease.allow()


def test_stop_wakes_the_loop(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(device_mod, "LEASE_WAIT_MS", 60_000)
    monkeypatch.setattr(device_mod, "LEASE_BUDGET_NS", 600 * 10**9)
    rig = make_loop_rig(str(tmp_path))
    rig.mirror.bitmap.sync(rig.mirror.bitmap.mark_all())
    cid = rig.uio.queue(r10(0, 1), data_in_len=BS)
    assert rig.uio.wait_for([cid])[cid].status == 0
    t0 = time.monotonic()
    rig.runner.stop()
    rig.runner.join(10)
    assert not rig.runner.alive and time.monotonic() - t0 < 10
    assert rig.lane.stops[express.STOP_WAKE] >= 1
    assert rig.lease is not None and not rig.lease._out
    rig.uio.close()
    rig.mirror.close()
    rig.lease.close()


def test_entries_python_must_answer_mid_batch(rig: LoopRig) -> None:
    rig.mirror.bitmap.sync(rig.mirror.bitmap.mark_all())
    ids = rig.uio.queue_many([(w10(0, 1), b"\1" * BS, 0), (TUR, b"", 0),
                              (w10(1, 1, flags=0x04), b"\3" * BS, 0),  # reserved bit
                              (r10(SIZE // BS, 1), b"", BS),  # past the end
                              (w10(1, 1, flags=0x08), b"\2" * BS, 0),  # FUA
                              (w10(3, 1), b"\4" * BS, 0), (r10(0, 1), b"", BS)])
    done = rig.uio.wait_for(ids)
    assert [done[i].status for i in ids] == [0, 0, 2, 2, 0, 0, 0]
    assert done[ids[2]].sense[2] & 0xF == 5 and done[ids[3]].sense[12] == 0x21
    assert done[ids[6]].data_in == b"\1" * BS
    rig.settle()
    for leg in (0, 1):
        img = rig.image(leg)
        assert img[:2 * BS] == b"\1" * BS + b"\2" * BS and img[3 * BS:4 * BS] == b"\4" * BS
    assert rig.lane.stops[express.STOP_ENTRY] >= 1


def test_first_touches_go_through_admission(rig: LoopRig) -> None:
    far = (8 << 20) // BS  # a write-intent extent never marked
    cid = rig.uio.queue(w10(far, 1), b"\5" * BS)
    assert rig.uio.wait_for([cid])[cid].status == 0
    rig.settle()
    assert rig.lane.stops[express.STOP_GATE] >= 1
    assert rig.image(0)[far * BS:(far + 1) * BS] == b"\5" * BS == \
        rig.image(1)[far * BS:(far + 1) * BS]


def test_big_writes_reach_both_legs(rig: LoopRig) -> None:
    rig.mirror.bitmap.sync(rig.mirror.bitmap.mark_all())
    rng = random.Random(5)
    blocks = (1 << 20) // BS  # 1 MiB: the largest the lane serves
    data = [rng.randbytes(blocks * BS) for _ in range(4)]
    ids = rig.uio.queue_many([(w16(i * blocks, blocks), d, 0) for i, d in enumerate(data)])
    done = rig.uio.wait_for(ids)
    assert all(done[i].status == 0 for i in ids)
    whole = b"".join(data)
    rig.settle()
    assert (rig.lane.uring_why_not is None) == (rig.lane._uring is not None)
    assert rig.image(0)[:len(whole)] == whole == rig.image(1)[:len(whole)]


@pytest.mark.parametrize("mode", URING_MODES)
def test_a_failing_leg_is_left_to_python_which_degrades_the_mirror(tmp_path, mode) -> None:
    rig = make_loop_rig(str(tmp_path), b_readonly=True, store=False, uring=mode)
    try:
        ids = rig.uio.queue_many([(w10(8, 2), b"\7" * 2 * BS, 0), (r10(0, 1), b"", BS)])
        done = rig.uio.wait_for(ids)
        assert done[ids[0]].status == 0  # A took it; B failed and is marked so
        assert rig.image(0)[8 * BS:10 * BS] == b"\7" * 2 * BS
        assert rig.mirror.health == "degraded"
        rig.settle()
        assert (rig.lane.uring_why_not is None) == (mode != "calls")
        assert rig.lane.stops[express.STOP_IO] == 1 and rig.lane.errno != 0
        runs = rig.lane.runs
        cid = rig.uio.queue(w10(8, 2), b"\10" * 2 * BS)
        assert rig.uio.wait_for([cid])[cid].status == 0
        rig.settle()
        assert rig.lane.runs == runs  # not quiet: no lease, no lane
    finally:
        rig.close()


# -- the loop answers exactly what the Python path answers ----------------------------------

_cmd = st.one_of(
    st.tuples(st.just("w"), st.integers(0, 64), st.sampled_from([1, 2, 8, 128, 2048]),
              st.sampled_from([0, 0, 0, 0x08, 0x10, 0x02])),
    st.tuples(st.just("r"), st.integers(0, 64), st.sampled_from([1, 8, 128]), st.just(0)),
    st.tuples(st.just("tur"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("w16"), st.integers(0, 64), st.sampled_from([1, 16]), st.just(0)),
    st.tuples(st.just("past"), st.just(0), st.just(1), st.just(0)),
    # overlapping the previous command's blocks: a batch must keep ring order per leg
    st.tuples(st.just("wsame"), st.just(0), st.sampled_from([1, 4]), st.just(0)),
)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(_cmd, min_size=1, max_size=16), min_size=1, max_size=5),
       seed=st.integers(0, 2**32 - 1), store=st.booleans())
def test_loop_gives_the_same_answers_and_bytes_as_the_python_path(tmp_path_factory, batches,
                                                                  seed, store) -> None:
    modes = [("python", False, "calls")] + [(m, True, m) for m in URING_MODES]
    rigs = [make_loop_rig(str(tmp_path_factory.mktemp("loop")), lane=on, store=store,
                          uring=ur) for _name, on, ur in modes]
    try:
        for rig in rigs[1:]:
            if not store:
                continue
            rig.mirror.bitmap.sync(rig.mirror.bitmap.mark_all())
        if store:
            rigs[0].mirror.bitmap.sync(rigs[0].mirror.bitmap.mark_all())
        answers: list[list[tuple[int, bytes, bytes]]] = [[] for _ in rigs]
        for batch in batches:
            for k, rig in enumerate(rigs):
                rng = random.Random(seed)  # the same payloads for every rig
                cmds = []
                last = 0
                for kind, slot, blocks, flags in batch:
                    lba = slot * 64 * 1024 // BS
                    if kind == "w":
                        cmds.append((w10(lba, blocks, flags), rng.randbytes(blocks * BS), 0))
                        last = lba
                    elif kind == "wsame":
                        cmds.append((w10(last, blocks), rng.randbytes(blocks * BS), 0))
                    elif kind == "w16":
                        cmds.append((w16(lba, blocks), rng.randbytes(blocks * BS), 0))
                        last = lba
                    elif kind == "r":
                        cmds.append((r10(lba, blocks), b"", blocks * BS))
                    elif kind == "tur":
                        cmds.append((TUR, b"", 0))
                    else:
                        cmds.append((r10(SIZE // BS, 1), b"", BS))
                ids = rig.uio.queue_many(cmds)
                done = rig.uio.wait_for(ids)
                answers[k].extend((done[i].status, done[i].sense, done[i].data_in) for i in ids)
        for rig in rigs:
            rig.settle()
        assert rigs[0].lane is None or rigs[0].lane.runs == 0
        for k in range(1, len(rigs)):
            assert answers[k] == answers[0], modes[k][0]
        images = [rig.image(leg) for rig in rigs for leg in (0, 1)]
        assert all(img == images[0] for img in images)
        if store:
            assert all(rig.mirror.bitmap.bits == rigs[0].mirror.bitmap.bits for rig in rigs)
        if batches[0][0][0] == "r":  # the lanes really took part here
            assert all(rig.lane.served >= 1 for rig in rigs[1:])
    finally:
        for rig in rigs:
            rig.close()


def test_a_vanished_device_ends_the_ring_loop(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(device_mod, "LEASE_WAIT_MS", 60_000)
    monkeypatch.setattr(device_mod, "LEASE_BUDGET_NS", 600 * 10**9)
    rig = make_loop_rig(str(tmp_path))
    try:
        rig.mirror.bitmap.sync(rig.mirror.bitmap.mark_all())
        cid = rig.uio.queue(r10(0, 1), data_in_len=BS)
        assert rig.uio.wait_for([cid])[cid].status == 0
        rig.uio.kernel.shutdown(socket.SHUT_RDWR)  # the lane is waiting in poll: a hang-up
        rig.runner.join(10)
        assert not rig.runner.alive
        assert isinstance(rig.runner.error, DeviceError)
        assert rig.lane.stops[express.STOP_DEVICE] == 1
        assert rig.lease is not None and not rig.lease._out  # released on the way out
    finally:
        rig.uio.kernel.close()
        rig.uio.user.close()
        rig.mirror.close()
        if rig.lease is not None:
            rig.lease.close()
