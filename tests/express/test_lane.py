"""The express lane against the in-process kernel double: bytes on the images, responses in the
ring, where it stops, and that it answers exactly what the Python path would.

The lab proves it against the real kernel (tests/lab/test_lab_express.py); here every stop
reason and every safety rule is driven on purpose.
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from targetmirror import express
from targetmirror.daemon.device import MirrorCommands
from targetmirror.daemon.runner import DeviceRunner
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import SplitRecord, State, StateStore
from targetmirror.scsi.identity import DeviceIdentity
from targetmirror.store.image import Image
from targetmirror.tcmu import layout as L
from targetmirror.tcmu.ring import Ring
from tests.daemon.test_runner import FakeUio
from tests.tcmu.producer import Completion, Producer

pytestmark = pytest.mark.skipif(not express.available(),
                                reason=f"express lane unavailable: {express.WHY_NOT}")

BS = 512
SIZE = 16 << 20
RS = 64 * 1024


def w10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, flags, lba, 0, blocks, 0)


def r10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def w16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


TUR = bytes(6)


@dataclass
class Rig:
    mirror: Mirror
    commands: MirrorCommands
    producer: Producer
    uio: FakeUio
    runner: DeviceRunner
    paths: tuple[str, str]

    def run(self) -> dict[int, Completion]:
        """One wake-up of the ring thread, done synchronously (workers=0: all inline)."""
        self.runner._fetch_and_dispatch()
        self.runner._complete_done()
        got = dict(self.uio.completions)
        self.uio.completions.clear()
        return got

    def image(self, leg: int) -> bytes:
        with open(self.paths[leg], "rb") as f:
            return f.read()

    @property
    def lane(self):
        return self.commands.lane

    def close(self) -> None:
        self.runner.ring.release()
        self.mirror.close()


def make_rig(directory: str, *, express_on: bool = True, store: bool = True,
             b_readonly: bool = False, write_intent: bool = True) -> Rig:
    paths = []
    for leg in ("a", "b"):
        p = os.path.join(directory, f"{leg}.img")
        with open(p, "wb") as f:
            f.truncate(SIZE)
        paths.append(p)
    a = Image(paths[0])
    b = Image(paths[1], readonly=b_readonly)
    mirror = Mirror("x", a, b, size=SIZE, block_size=BS, region_size=RS,
                    store=StateStore(os.path.join(directory, "state")) if store else None,
                    write_intent=write_intent, wi_interval=None)
    commands = MirrorCommands(mirror, lambda: DeviceIdentity(serial="x0001",
                                                             max_transfer_blocks=4096))
    producer = Producer(cmdr_size=256 * 1024 - 128, data_size=16 << 20)
    uio = FakeUio(producer)
    runner = DeviceRunner("x", uio, Ring(producer.buf), commands.admit,
                          before_dispatch=commands.commit, workers=0,
                          express=commands.express if express_on else None)
    rig = Rig(mirror, commands, producer, uio, runner, (paths[0], paths[1]))
    # The first command builds the SCSI device (the lane waits for it, see MirrorCommands).
    warm = producer.queue(TUR)
    assert rig.run()[warm].status == 0
    return rig


@pytest.fixture
def rig(tmp_path) -> Iterator[Rig]:
    r = make_rig(str(tmp_path))
    yield r
    r.close()


def test_constants_match_the_layout_module() -> None:
    from targetmirror.express import _lane  # type: ignore[attr-defined]

    assert _lane.MB_CMD_HEAD_OFF == L.MB_CMD_HEAD_OFF
    assert _lane.MB_CMD_TAIL_OFF == L.MB_CMD_TAIL_OFF
    assert _lane.REQ_IOV_OFF == L.REQ_IOV_OFF
    assert _lane.CMD_ENTRY_SIZE == L.CMD_ENTRY_SIZE
    assert _lane.HDR_ID_FLAGS_OFF == L.HDR_ID_FLAGS_OFF


def test_marked_writes_go_express_to_both_legs_and_reads_come_back(rig: Rig) -> None:
    rng = random.Random(1)
    first = rng.randbytes(8 * BS)
    c0 = rig.producer.queue(w10(0, 8), first)
    done = rig.run()
    assert done[c0].status == 0 and rig.lane.stops[express.STOP_GATE] == 1
    far = (8 << 20) // BS  # another write-intent extent, never marked
    c1 = rig.producer.queue(w10(far, 1), b"\1" * BS)
    done = rig.run()
    # the first touch of an extent needs a mark: admission's job, so Python served it
    assert done[c1].status == 0 and rig.lane.served == 0
    assert rig.lane.stops[express.STOP_GATE] == 2
    assert rig.image(0)[far * BS:(far + 1) * BS] == b"\1" * BS
    writes = {}
    ids = []
    for i in range(20):  # same write-intent extent: the bits are set and synced now
        lba = 16 + 8 * i
        data = rng.randbytes(8 * BS)
        writes[lba] = data
        ids.append(rig.producer.queue(w10(lba, 8) if i % 2 else w16(lba, 8), data))
    done = rig.run()
    assert all(done[i].status == 0 for i in ids)
    assert rig.lane.served == 20
    a, b = rig.image(0), rig.image(1)
    assert a[:8 * BS] == b[:8 * BS] == first
    for lba, data in writes.items():
        assert a[lba * BS:(lba + 8) * BS] == data and b[lba * BS:(lba + 8) * BS] == data
    rid = rig.producer.queue(r10(16, 8), data_in_len=8 * BS)
    done = rig.run()
    assert done[rid].status == 0 and done[rid].data_in == writes[16]
    assert rig.lane.served == 21 and rig.lane.stops[express.STOP_HEAD] == 2
    # the regions written count as touched: the clear pass spares them
    assert 0 in rig.mirror.flight.touched
    # metrics: the lane's shard is summed with the others
    totals = rig.commands.stats.totals()
    assert rig.commands.stats.commands(totals, 1) == 22  # 2 Python writes + 20 express
    assert rig.producer.cmd_tail == rig.producer.head


def test_stops_at_the_first_entry_python_must_answer(rig: Rig) -> None:
    rig.mirror.bitmap.sync(rig.mirror.bitmap.mark_all())
    ids = [rig.producer.queue(w10(0, 1), b"\1" * BS),
           rig.producer.queue(TUR),
           rig.producer.queue(w10(1, 1, flags=0x08), b"\2" * BS),  # FUA: Python flushes
           rig.producer.queue(w10(2, 1, flags=0x04), b"\3" * BS),  # reserved bit
           rig.producer.queue(r10(SIZE // BS, 1), data_in_len=BS),  # past the end
           rig.producer.queue(w10(3, 1), b"\4" * BS)]
    done = rig.run()
    assert rig.lane.served == 1 and rig.lane.stops[express.STOP_ENTRY] == 1
    assert [done[i].status for i in ids] == [0, 0, 0, 2, 2, 0]
    assert done[ids[3]].sense[2] & 0xF == 5 and done[ids[4]].sense[12] == 0x21
    b = rig.image(1)
    assert b[:BS] == b"\1" * BS and b[BS:2 * BS] == b"\2" * BS
    assert b[2 * BS:3 * BS] == bytes(BS) and b[3 * BS:4 * BS] == b"\4" * BS
    # the next wake-up starts with the ring empty of in-flight commands: the lane again
    i = rig.producer.queue(w10(4, 1), b"\5" * BS)
    assert rig.run()[i].status == 0 and rig.lane.served == 2


def test_an_iovec_outside_the_data_area_is_never_touched(rig: Rig) -> None:
    rig.mirror.bitmap.sync(rig.mirror.bitmap.mark_all())
    cid = rig.producer.queue(r10(0, 1), data_in_len=BS)
    off = rig.producer.entry_offset(cid)
    struct.pack_into("<Q", rig.producer.buf, off + L.REQ_IOV_OFF, 0)  # base 0: the mailbox
    before = bytes(rig.producer.buf[:rig.producer.data_off])
    done = rig.run()
    assert rig.lane.served == 0
    assert done[cid].status == 2 and done[cid].sense[2] & 0xF == 5
    after = bytes(rig.producer.buf[:rig.producer.data_off])
    # only the response slot and cmd_tail changed; no data was read into the mailbox
    assert after[:L.MB_CMD_TAIL_OFF] == before[:L.MB_CMD_TAIL_OFF]
    assert after[L.MB_CMD_TAIL_OFF + 4:128] == before[L.MB_CMD_TAIL_OFF + 4:128]


def test_a_failing_leg_is_left_to_python_which_degrades_the_mirror(tmp_path) -> None:
    rig = make_rig(str(tmp_path), b_readonly=True, store=False)
    try:
        cid = rig.producer.queue(w10(8, 2), b"\7" * 2 * BS)
        done = rig.run()
        assert rig.lane.stops[express.STOP_IO] == 1 and rig.lane.served == 0
        assert done[cid].status == 0  # A took it; B failed and is marked so
        assert rig.image(0)[8 * BS:10 * BS] == b"\7" * 2 * BS
        assert rig.mirror.health == "degraded"
        cid = rig.producer.queue(w10(8, 2), b"\10" * 2 * BS)
        assert rig.run()[cid].status == 0 and rig.lane.runs == 1  # not quiet: no lane
    finally:
        rig.close()


def set_state(m, state: State) -> None:
    """Put the mirror's state document in ``state`` (without a store: nothing is saved)."""
    st = dataclasses.replace(m.st, state=state)
    if state in (State.SPLITTING, State.ONE_WAY):
        st.split = SplitRecord(epoch=st.epoch + 1, requested_wall=0.0,
                               one_way=state == State.ONE_WAY)
    m.records.replace(st)
    m.refresh_view()


@pytest.mark.parametrize("state", [State.SYNCING, State.REJOINING, State.SPLITTING,
                                   State.ONE_WAY])
def test_only_a_quiet_mirror_lets_the_lane_run(tmp_path, state: State) -> None:
    rig = make_rig(str(tmp_path), store=False)
    try:
        set_state(rig.mirror, state)
        cid = rig.producer.queue(r10(0, 1), data_in_len=BS)
        rig.run()
        assert rig.lane.runs == 0
        set_state(rig.mirror, State.MIRRORED)
        rig.producer.queue(r10(0, 1), data_in_len=BS)
        assert cid is not None
        rig.run()
        assert rig.lane.runs == 1 and rig.lane.served == 1
        with rig.mirror.locks.locked(0, BS):  # a range held: a verify, a copy, a command
            rig.producer.queue(r10(0, 1), data_in_len=BS)
            rig.run()
        assert rig.lane.runs == 1
    finally:
        rig.close()


# -- the lane answers exactly what the Python path answers ---------------------------------------

_cmd = st.one_of(
    st.tuples(st.just("w"), st.integers(0, 64), st.sampled_from([1, 2, 8, 128, 2048]),
              st.sampled_from([0, 0, 0, 0x08, 0x10, 0x02])),
    st.tuples(st.just("r"), st.integers(0, 64), st.sampled_from([1, 8, 128]), st.just(0)),
    st.tuples(st.just("tur"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("w16"), st.integers(0, 64), st.sampled_from([1, 16]), st.just(0)),
    st.tuples(st.just("past"), st.just(0), st.just(1), st.just(0)),
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(_cmd, min_size=1, max_size=12), min_size=1, max_size=6),
       seed=st.integers(0, 2**32 - 1), store=st.booleans())
def test_same_answers_and_bytes_as_the_python_path(tmp_path_factory, batches, seed,
                                                   store) -> None:
    rigs = [make_rig(str(tmp_path_factory.mktemp("lane")), express_on=on, store=store)
            for on in (True, False)]
    try:
        answers: list[list[tuple[int, bytes, bytes]]] = [[], []]
        for batch in batches:
            for k, rig in enumerate(rigs):
                rng = random.Random(seed)  # the same payloads for both rigs
                ids = []
                for kind, slot, blocks, flags in batch:
                    lba = slot * 64 * 1024 // BS
                    if kind == "w":
                        ids.append(rig.producer.queue(w10(lba, blocks, flags),
                                                      rng.randbytes(blocks * BS)))
                    elif kind == "w16":
                        ids.append(rig.producer.queue(w16(lba, blocks),
                                                      rng.randbytes(blocks * BS)))
                    elif kind == "r":
                        ids.append(rig.producer.queue(r10(lba, blocks), data_in_len=blocks * BS))
                    elif kind == "tur":
                        ids.append(rig.producer.queue(TUR))
                    else:
                        ids.append(rig.producer.queue(r10(SIZE // BS, 1), data_in_len=BS))
                done = rig.run()
                answers[k].extend((done[i].status, done[i].sense, done[i].data_in) for i in ids)
        if not store and batches[0][0][0] == "r":  # the lane really took part here
            assert rigs[0].lane.served >= 1
        assert rigs[1].lane.runs == 0
        assert answers[0] == answers[1]
        assert rigs[0].image(0) == rigs[1].image(0) == rigs[0].image(1) == rigs[1].image(1)
        if store:
            assert rigs[0].mirror.bitmap.bits == rigs[1].mirror.bitmap.bits
    finally:
        for rig in rigs:
            rig.close()
