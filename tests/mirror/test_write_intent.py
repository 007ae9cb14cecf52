"""Write-intent while mirrored: the region is durable in the bitmap before any leg is written,
bits are cleared lazily (never with a write in flight), and an unclean stop resyncs exactly the
marked regions B -> A before A is trusted again."""

from __future__ import annotations

import threading

from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import State, StateStore
from targetmirror.store.image import Image
from tests.daemon.splitrig import JitterImage
from tests.mirror.test_rejoin import RS, SIZE, bitmap_file_bits, poke, read_file, state_doc

BS = 512


class Rig:
    def __init__(self, tmp_path) -> None:
        self.pa, self.pb = str(tmp_path / "a.img"), str(tmp_path / "b.img")
        for p in (self.pa, self.pb):
            with open(p, "wb") as f:
                f.truncate(SIZE)
        self.dir = str(tmp_path / "state")

    def mirror(self, image_cls=Image) -> Mirror:
        return Mirror("m", image_cls(self.pa), image_cls(self.pb), size=SIZE, block_size=BS,
                      store=StateStore(self.dir), region_size=RS, wi_interval=None,
                      leg_timeout=None)


def crash(m: Mirror) -> None:
    """Abandon a mirror as a kill -9 would: no flush, no clean-close record."""
    m._closed = True
    m._pool.shutdown(wait=True)
    assert m.bitmap is not None
    m.bitmap.close()
    m.a.close()
    m.b.close()


def test_the_bit_is_durable_before_either_leg_is_written(tmp_path):
    rig = Rig(tmp_path)
    m = rig.mirror(JitterImage)
    entered, release = m.b.gate(7 * RS)  # type: ignore[attr-defined]
    seen: list[set[int]] = []

    def writer() -> None:
        m.write(7 * RS, [memoryview(b"w" * BS)], False)

    t = threading.Thread(target=writer)
    t.start()
    assert entered.wait(10)
    seen.append(bitmap_file_bits(StateStore(rig.dir)))
    release.set()
    t.join()
    assert seen == [{7}]
    syncs = m.bitmap.syncs  # type: ignore[union-attr]
    m.write(7 * RS + BS, [memoryview(b"v" * BS)], False)  # same region: no new sync
    assert m.bitmap.syncs == syncs  # type: ignore[union-attr]
    m.close()


def test_clear_pass_spares_hot_and_in_flight_regions(tmp_path):
    rig = Rig(tmp_path)
    m = rig.mirror(JitterImage)
    bm = m.bitmap
    assert bm is not None
    for r in (1, 2, 3):
        m.write(r * RS, [memoryview(b"x" * BS)], False)
    assert bm.count == 3
    assert m.clear_write_intent() == 0  # touched during this interval: spared once
    m.write(2 * RS, [memoryview(b"y" * BS)], False)  # 2 stays hot
    io = m.admit(m.epoch, (3 * RS, 3 * RS + BS))  # 3 has a write admitted, not finished
    assert m.clear_write_intent() == 1
    assert bitmap_file_bits(StateStore(rig.dir)) == {2, 3}
    io.finish()
    m.clear_write_intent()
    assert m.clear_write_intent() >= 1 and bm.count == 0
    m.close()
    assert state_doc(StateStore(rig.dir))["clean"] is True


def test_unclean_stop_resyncs_only_the_marked_regions_from_b(tmp_path):
    rig = Rig(tmp_path)
    m = rig.mirror()
    for r in (4, 9, 30):
        m.write(r * RS, [memoryview(bytes([r]) * RS)], False)
    crash(m)
    # a torn write: B got the new data, A did not (the crash hit between the two pwritevs)
    poke(rig.pa, 9 * RS, b"\0" * RS)
    poke(rig.pb, 9 * RS, b"N" * RS)
    m2 = rig.mirror()
    assert m2.unclean_start and m2.state == State.REJOINING
    assert state_doc(StateStore(rig.dir))["resync_kind"] == "recovery"
    buf = bytearray(RS)
    m2.read(9 * RS, [memoryview(buf)])
    assert bytes(buf) == b"N" * RS  # reads come from B until A has the region again
    m2.resume()
    assert m2.rejoin_complete.wait(20)
    assert read_file(rig.pa) == read_file(rig.pb)
    rec = m2.st.last_recovery
    assert rec is not None and rec["bytes_copied"] == 3 * RS and rec["image_size"] == SIZE
    assert m2.state == State.MIRRORED and m2.verify()["mismatches"] == 0
    m2.close()
    m3 = rig.mirror()  # clean this time: nothing to resync
    assert not m3.unclean_start and m3.state == State.MIRRORED
    assert m3.bitmap is not None and m3.bitmap.count == 0
    m3.close()


def test_write_intent_off_marks_nothing_while_mirrored(tmp_path):
    rig = Rig(tmp_path)
    m = Mirror("m", Image(rig.pa), Image(rig.pb), size=SIZE, block_size=BS,
               store=StateStore(rig.dir), region_size=RS, write_intent=False,
               wi_interval=None, leg_timeout=None)
    m.write(0, [memoryview(b"x" * BS)], False)
    assert m.bitmap is not None and m.bitmap.count == 0
    m.close()


def test_a_ring_batch_of_first_writes_costs_one_bitmap_sync(tmp_path):
    """Admission marks each write's regions in memory; commit_marks makes the whole batch
    durable with one sync before any of it runs, and the writes then need no sync of their
    own.  A write that runs before the commit waits for the pending sync itself."""
    rig = Rig(tmp_path)
    store = StateStore(rig.dir)
    m = rig.mirror()
    try:
        bm = m.bitmap
        assert bm is not None
        before = bm.syncs
        ios = [m.admit(m.epoch, (r * RS, r * RS + 4096)) for r in range(1, 9)]
        assert bm.syncs == before and all(bm.test(r) for r in range(1, 9))
        assert bitmap_file_bits(store) == set(), "nothing durable before the commit"
        m.commit_marks()
        assert bm.syncs == before + 1
        assert bitmap_file_bits(store) >= set(range(1, 9))
        payload = memoryview(bytearray(b"w" * 4096))
        for io in ios:
            io.write(io._extent[0], [payload], False)
            io.finish()
        assert bm.syncs == before + 1, "each write found its bit durable already"
        # without a commit (a tool's direct write, a second ring): the write waits for the sync
        late = m.admit(m.epoch, (12 * RS, 12 * RS + 4096))
        late.write(12 * RS, [payload], False)
        late.finish()
        assert bm.syncs == before + 2 and 12 in bitmap_file_bits(store)
    finally:
        m.close()
