"""Write-intent while mirrored: the region is durable in the bitmap before any leg is written,
bits are cleared lazily (never with a write in flight), and an unclean stop resyncs exactly the
marked regions B -> A before A is trusted again."""

from __future__ import annotations

import threading

from targetmirror.mirror.bitmap import Bitmap
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
        self.wi_extent = RS  # exact write-intent bits: these tests count regions
        self.wi_ahead = 0    # ... and no marking ahead of a stream (its own tests below)

    def mirror(self, image_cls=Image) -> Mirror:
        return Mirror("m", image_cls(self.pa), image_cls(self.pb), size=SIZE, block_size=BS,
                      store=StateStore(self.dir), region_size=RS, wi_interval=None,
                      leg_timeout=None, wi_extent=self.wi_extent, wi_ahead=self.wi_ahead)


def crash(m: Mirror) -> None:
    """Abandon a mirror as a kill -9 would: no flush, no clean-close record."""
    m._abandon(close_files=True)


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


# -- write-intent extents (WI_EXTENT; 4 regions here, 64 in the product) ----------------------
EXT = 4 * RS


def extent_rig(tmp_path) -> Rig:
    rig = Rig(tmp_path)
    rig.wi_extent = EXT
    return rig


def test_a_mirrored_write_marks_its_whole_extent_once(tmp_path):
    m = extent_rig(tmp_path).mirror()
    bm = m.bitmap
    assert bm is not None
    m.write(9 * RS, [memoryview(b"a" * BS)], False)   # region 9: extent 8..11
    assert {r for r in range(bm.regions) if bm.test(r)} == {8, 9, 10, 11}
    syncs = bm.syncs
    for r in (8, 10, 11):                              # the rest of the extent is free
        m.write(r * RS, [memoryview(b"b" * BS)], False)
    assert bm.syncs == syncs
    m.write(11 * RS + RS - BS, [memoryview(b"c" * (2 * BS))], False)  # straddles into 12..15
    assert bm.count == 8 and bm.syncs == syncs + 1
    m.close()


def test_the_clear_pass_keeps_a_hot_extent_whole_and_clears_idle_ones(tmp_path):
    rig = extent_rig(tmp_path)
    m = rig.mirror()
    bm = m.bitmap
    assert bm is not None
    m.write(1 * RS, [memoryview(b"x" * BS)], False)    # extent 0..3
    m.write(21 * RS, [memoryview(b"x" * BS)], False)   # extent 20..23
    assert m.clear_write_intent() == 0                 # both touched this interval
    m.write(22 * RS, [memoryview(b"y" * BS)], False)   # a different region of the same extent
    assert m.clear_write_intent() == 4                 # 0..3 idle: cleared; 20..23 hot: all kept
    assert bitmap_file_bits(StateStore(rig.dir)) == {20, 21, 22, 23}
    m.close()


def test_split_drops_pre_split_intent_and_rejoin_copies_only_post_split_regions(tmp_path):
    from tests.mirror.test_rejoin import split
    rig = extent_rig(tmp_path)
    m = rig.mirror()
    bm = m.bitmap
    assert bm is not None
    for r in (0, 5, 40, 41, 90):                      # mirrored: extents 0, 4, 40, 88 are hot
        m.write(r * RS, [memoryview(bytes([r + 1]) * RS)], False)
    assert bm.count == 16
    split(m)
    assert m.split_complete.wait(10)
    # the drain made both legs durable, so the mirrored era's extents are gone from the bitmap
    assert bm.count == 0 and bitmap_file_bits(StateStore(rig.dir)) == set()
    io = m.admit(m.epoch, (41 * RS, 41 * RS + BS))     # a post-split write: B only, exact
    io.write(41 * RS, [memoryview(b"P" * BS)], False)
    io.finish()
    assert bitmap_file_bits(StateStore(rig.dir)) == {41}
    m.rejoin()
    assert m.rejoin_complete.wait(10)
    assert m.st.last_rejoin is not None and m.st.last_rejoin["regions"] == 1
    assert read_file(rig.pa) == read_file(rig.pb)
    m.close()


def test_a_write_admitted_after_the_instant_keeps_its_bit_through_the_split(tmp_path):
    """A post-split write to a region the mirrored era had already marked finds its bit set
    (no sync); the split's clearing must not take that bit away."""
    rig = extent_rig(tmp_path)
    m = rig.mirror()
    m.write(17 * RS, [memoryview(b"m" * BS)], False)    # extent 16..19 marked
    pre = m.admit(m.epoch, (2 * RS, 2 * RS + BS))       # a pre-split write still in flight
    m.prepare_split(["m"])
    tag = m.begin_split()
    post = m.admit(tag, (18 * RS, 18 * RS + BS))         # post-split, inside the hot extent
    post.write(18 * RS, [memoryview(b"n" * BS)], False)
    m.boundary_passed()
    assert not m.split_complete.is_set()
    pre.write(2 * RS, [memoryview(b"o" * BS)], False)
    pre.finish()
    assert m.split_complete.wait(10)
    post.finish()
    assert bitmap_file_bits(StateStore(rig.dir)) == {18}
    m.close()


# -- marking ahead of a forward stream (WI_AHEAD) ------------------------------------------------

def ahead_mirror(tmp_path) -> tuple[Rig, Mirror, Bitmap]:
    """A mirror with 4-region write-intent extents that marks 3 extents ahead."""
    rig = extent_rig(tmp_path)
    rig.wi_ahead = 3
    m = rig.mirror()
    assert m.bitmap is not None
    return rig, m, m.bitmap


def marked(m: Mirror) -> set[int]:
    bm = m.bitmap
    assert bm is not None
    return {r for r in range(bm.regions) if bm.test(r)}


def test_a_sequential_stream_pays_one_sync_per_run_of_extents(tmp_path):
    """1 MiB sequential writes left the express lane at every new extent (a durable mark
    first); a stream now marks 3 extents ahead with the same sync."""
    rig, m, bm = ahead_mirror(tmp_path)
    m.write(0, [memoryview(b"s" * RS)], False)          # extent 0; nothing before it
    assert marked(m) == set(range(4))
    syncs = bm.syncs
    for r in range(4, 80):                               # extents 1..19, region by region
        m.write(r * RS, [memoryview(b"s" * RS)], False)
    # extent 1 marks 1..4, extent 5 marks 5..8, ... : 19 extents in 5 syncs, not 19
    assert bm.syncs - syncs == 5
    assert marked(m) == set(range(4 * 21))               # 0..20: at most 3 extents ahead (17..20)
    assert read_file(rig.pa) == read_file(rig.pb)
    m.close()


def test_marking_ahead_adds_no_sync_and_random_writes_do_not_mark_ahead(tmp_path):
    _rig, m, bm = ahead_mirror(tmp_path)
    m.write(41 * RS, [memoryview(b"r" * BS)], False)     # extent 40..43, extent 36 not marked
    m.write(9 * RS, [memoryview(b"r" * BS)], False)      # extent 8..11, extent 4 not marked
    assert marked(m) == set(range(40, 44)) | set(range(8, 12))
    syncs = bm.syncs
    m.write(43 * RS, [memoryview(b"r" * BS)], False)     # its extent is marked: no sync, ...
    assert bm.syncs == syncs                             # ... so nothing is marked ahead
    assert marked(m) == set(range(40, 44)) | set(range(8, 12))
    # next to a marked extent but not at its start: a random writer, not a stream (a lab
    # repair after a leg failure copied 28 MiB for 16 MiB of random writes before this rule)
    m.write(13 * RS + BS, [memoryview(b"r" * BS)], False)
    m.write(46 * RS, [memoryview(b"r" * BS)], False)
    assert marked(m) == set(range(40, 48)) | set(range(8, 16))
    m.close()


def test_marking_ahead_stops_at_the_end_and_idle_extents_are_cleared(tmp_path):
    rig, m, bm = ahead_mirror(tmp_path)
    last = bm.regions - 1
    m.write((last - 7) * RS, [memoryview(b"e" * BS)], False)   # the second-to-last extent
    m.write((last - 3) * RS, [memoryview(b"e" * BS)], False)   # the last: ahead is clipped
    assert marked(m) == set(range(last - 7, last + 1))
    m.write(0, [memoryview(b"e" * BS)], False)
    m.write(4 * RS, [memoryview(b"e" * BS)], False)            # 4..7 and 8..19 ahead
    assert marked(m) >= set(range(0, 20))
    # a pass spares the extents written since the last one, not marks no write has used
    assert m.clear_write_intent() == 12
    assert marked(m) == set(range(0, 8)) | set(range(last - 7, last + 1))
    m.write(5 * RS, [memoryview(b"f" * BS)], False)            # extent 4..7 stays hot
    m.clear_write_intent()
    assert marked(m) == set(range(4, 8))
    m.close()
    assert state_doc(StateStore(rig.dir))["clean"] is True
