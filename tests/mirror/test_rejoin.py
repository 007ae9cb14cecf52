"""Rejoin and verify at the mirror level: real image files, a real StateStore, a real bitmap file.

The ring loop is simulated as in tests/mirror/test_split_state.py: the split steps are called in
the order the daemon calls them, and post-split writes are admitted with the post-split tag.
Ordering is controlled with gates (a leg write that waits for an Event) and observed through
events and durable files; nothing sleeps to make things happen in order.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time

import pytest

from targetmirror.errors import MirrorError
from targetmirror.mirror.bitmap import HEADER_SIZE
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.rangelock import RangeLock
from targetmirror.mirror.state import State, StateStore
from targetmirror.store.image import Image
from tests.daemon.splitrig import JitterImage

BS = 512
RS = 4096                      # small regions: many of them in a small image
NREG = 300                     # 299 whole regions and a partial last one
SIZE = (NREG - 1) * RS + 1024
LAST = NREG - 1
TIMEOUT = 20.0


def region_bytes(r: int) -> int:
    return min(RS, SIZE - r * RS)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(SIZE)


def poke(path: str, offset: int, data: bytes) -> None:
    """Change an image file behind the mirror's back."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def state_doc(store: StateStore) -> dict:
    with open(os.path.join(store.directory, "m.json"), encoding="utf-8") as f:
        return json.load(f)


def bitmap_file_bits(store: StateStore) -> set[int]:
    with open(store.bitmap_path("m"), "rb") as f:
        f.seek(HEADER_SIZE)
        data = f.read()
    return {i * 8 + b for i, v in enumerate(data) for b in range(8) if v >> b & 1}


class Rig:
    def __init__(self, tmp_path, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.initial = self.rng.randbytes(SIZE)
        self.pa, self.pb = str(tmp_path / "a.img"), str(tmp_path / "b.img")
        for p in (self.pa, self.pb):
            with open(p, "wb") as f:
                f.write(self.initial)
        self.store = StateStore(str(tmp_path / "state"))
        self.made: list[Mirror] = []

    def mirror(self, image_cls=Image, **kw) -> Mirror:
        kw.setdefault("region_size", RS)
        kw.setdefault("wi_extent", RS)  # exact write-intent bits: these tests count regions
        m = Mirror("m", image_cls(self.pa), image_cls(self.pb), size=SIZE, block_size=BS,
                   store=StateStore(self.store.directory), **kw)
        self.made.append(m)
        return m

    def close(self) -> None:
        for m in self.made:
            m.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def split(m: Mirror) -> None:
    m.prepare_split(["m"])
    m.begin_split()
    m.record_instant()
    m.boundary_passed()
    assert m.split_complete.wait(TIMEOUT)
    assert m.state == State.SPLIT and m.a.frozen


def post_write(m: Mirror, offset: int, data: bytes) -> None:
    """One command queued after the instant: admitted with the current (post-split) tag."""
    io = m.admit(m.epoch, (offset, offset + len(data)))
    try:
        io.write(offset, [memoryview(data)], False)
    finally:
        io.finish()


def scatter(m: Mirror, rng: random.Random, regions: list[int], model: bytearray) -> set[int]:
    """A write of random blocks inside each of ``regions``; return the regions touched."""
    touched = set()
    for r in regions:
        base = r * RS
        nblk = region_bytes(r) // BS
        first = rng.randrange(nblk)
        count = rng.randint(1, nblk - first)
        data = rng.randbytes(count * BS)
        post_write(m, base + first * BS, data)
        model[base + first * BS: base + (first + count) * BS] = data
        touched.add(r)
    return touched


def expected_copy(regions) -> int:
    return sum(region_bytes(r) for r in regions)


# -- rejoin ------------------------------------------------------------------------------------

def test_rejoin_copies_only_the_marked_regions(rig):
    m = rig.mirror(JitterImage)
    split(m)
    model = bytearray(rig.initial)
    regions = sorted({0, 1, 7, 8, 63, 64, 150, LAST - 1, LAST, *rig.rng.sample(range(NREG), 20)})
    touched = scatter(m, rig.rng, regions, model)
    # one write straddling two regions
    post_write(m, 200 * RS - BS, b"S" * 2 * BS)
    model[200 * RS - BS: 200 * RS + BS] = b"S" * 2 * BS
    touched |= {199, 200}
    assert m.bitmap is not None and m.bitmap.count == len(touched)
    assert bitmap_file_bits(rig.store) == touched, "bits must be on disk before the B write"
    assert read_file(rig.pa) == rig.initial, "A changed after the split"
    assert read_file(rig.pb) == model

    m.a.writes.clear()
    epoch = m.epoch
    m.rejoin()
    assert state_doc(rig.store)["state"] == "rejoining"
    assert m.rejoin_complete.wait(TIMEOUT)
    assert read_file(rig.pa) == read_file(rig.pb) == model
    doc = state_doc(rig.store)
    assert doc["state"] == "mirrored" and doc["epoch"] == epoch + 1
    lr = doc["last_rejoin"]
    assert lr["bytes_copied"] == expected_copy(touched) < SIZE
    assert lr["regions"] == len(touched) and lr["resumed"] is False
    # A was written in exactly the marked regions, once each, nowhere else
    assert sorted(m.a.writes) == [(r * RS, region_bytes(r)) for r in sorted(touched)]
    assert m.bitmap.count == 0 and bitmap_file_bits(rig.store) == set()
    assert m.status()["resync"] is None and not m.a.frozen
    res = m.verify()
    assert res["mismatches"] == 0 and res["regions_checked"] == NREG
    assert res["bytes_compared"] == SIZE
    # mirrored again: a write reaches both legs and marks its region only as write-intent,
    # which the lazy clear pass removes once the region has been idle for a pass
    m.write(5 * RS, [memoryview(b"M" * BS)], False)
    assert read_file(rig.pa)[5 * RS: 5 * RS + BS] == b"M" * BS == read_file(rig.pb)[5 * RS:
                                                                                    5 * RS + BS]
    assert m.bitmap.count == 1 and bitmap_file_bits(rig.store) == {5}
    m.clear_write_intent()
    m.clear_write_intent()
    assert m.bitmap.count == 0 and bitmap_file_bits(rig.store) == set()
    # and it can be split again
    split(m)
    assert m.epoch == epoch + 2


def test_rejoin_with_nothing_changed_copies_nothing(rig):
    m = rig.mirror()
    split(m)
    m.rejoin()
    assert m.rejoin_complete.wait(TIMEOUT)
    assert m.st.last_rejoin is not None and m.st.last_rejoin["bytes_copied"] == 0
    assert m.state == State.MIRRORED and read_file(rig.pa) == rig.initial


def test_rejoin_refused_unless_split(rig, tmp_path):
    m = rig.mirror()
    with pytest.raises(MirrorError, match="only a split mirror"):
        m.rejoin()
    assert state_doc(rig.store)["state"] == "mirrored"
    pre = m.admit(m.epoch, (0, BS))            # a pre-split write keeps the split draining
    m.prepare_split(["m"])
    m.begin_split()
    m.boundary_passed()
    with pytest.raises(MirrorError, match="only a split mirror"):
        m.rejoin()
    assert state_doc(rig.store)["state"] == "splitting"
    pre.write(0, [memoryview(b"p" * BS)], False)
    pre.finish()
    assert m.split_complete.wait(TIMEOUT)
    post_write(m, 3 * RS, b"q" * BS)
    m.rejoin(rate=RS)                          # slow: still running for the next call
    with pytest.raises(MirrorError, match="busy: rejoin is running") as busy:
        m.rejoin()
    assert busy.value.code == "busy"
    m.stop_resync()
    # no state directory: no bitmap, no rejoin
    pa, pb = tmp_path / "x.a", tmp_path / "x.b"
    for p in (pa, pb):
        p.write_bytes(bytes(SIZE))
    bare = Mirror("x", Image(str(pa)), Image(str(pb)), size=SIZE)
    try:
        with pytest.raises(MirrorError, match="no bitmap"):
            bare.rejoin()
    finally:
        bare.close()


def test_full_rejoin_copies_everything(rig):
    m = rig.mirror()
    split(m)
    post_write(m, 2 * RS, b"x" * BS)
    poke(rig.pa, 9 * RS + 100, b"garbage")     # A replaced / damaged where nothing was marked
    m.rejoin(full=True)
    assert m.rejoin_complete.wait(TIMEOUT)
    assert read_file(rig.pa) == read_file(rig.pb)
    assert m.st.last_rejoin is not None
    assert m.st.last_rejoin["bytes_copied"] == SIZE and m.st.last_rejoin["regions"] == NREG
    assert m.verify()["mismatches"] == 0


def test_rate_limit_is_a_lower_bound_on_time(rig):
    m = rig.mirror()
    split(m)
    touched = scatter(m, rig.rng, list(range(0, 64, 2)), bytearray(rig.initial))
    nbytes = expected_copy(touched)
    rate = nbytes / 0.4                         # should take at least 0.4 s
    t0 = time.monotonic()
    m.rejoin(rate=rate)
    assert m.rejoin_complete.wait(TIMEOUT)
    elapsed = time.monotonic() - t0
    assert m.st.last_rejoin is not None and m.st.last_rejoin["bytes_copied"] == nbytes
    assert elapsed >= nbytes / rate, f"{nbytes} bytes at {rate:.0f} B/s took {elapsed:.3f} s"
    assert m.st.last_rejoin["seconds"] >= nbytes / rate * 0.99
    assert read_file(rig.pa) == read_file(rig.pb)


def test_stopped_rejoin_resumes_after_a_restart(rig):
    m = rig.mirror(JitterImage)
    split(m)
    model = bytearray(rig.initial)
    regions = sorted([*rig.rng.sample(range(NREG - 1), 199), LAST])
    touched = scatter(m, rig.rng, regions, model)
    assert m.bitmap is not None and m.bitmap.count == 200
    # hold the copier on its 101st region: by then the first batch of 64 is committed
    entered, release = m.a.gate(regions[100] * RS)
    m.rejoin()
    assert entered.wait(TIMEOUT)
    assert m.bitmap.count == 200 - 64
    assert bitmap_file_bits(rig.store) == set(regions[64:])
    stopper = threading.Thread(target=m.stop_resync)
    stopper.start()
    assert m.copier.stop.wait(TIMEOUT)
    release.set()
    stopper.join(TIMEOUT)
    assert not stopper.is_alive() and not m.rejoin_complete.is_set()
    assert state_doc(rig.store)["state"] == "rejoining"
    left = bitmap_file_bits(rig.store)
    assert set(regions[64:]) >= left >= set(regions[101:])
    m.close()

    m2 = rig.mirror()                           # the next daemon start
    assert m2.state == State.REJOINING and not m2.a.frozen
    assert m2.bitmap is not None and m2.bitmap.count == len(left)
    # while rejoining every write goes to both legs, marked region or not
    post_write(m2, regions[150] * RS, b"R" * BS)
    model[regions[150] * RS: regions[150] * RS + BS] = b"R" * BS
    m2.resume()
    assert m2.rejoin_complete.wait(TIMEOUT)
    assert read_file(rig.pa) == read_file(rig.pb) == model
    lr = state_doc(rig.store)["last_rejoin"]
    assert lr["resumed"] is True and lr["bytes_copied"] == expected_copy(left)
    assert state_doc(rig.store)["state"] == "mirrored"
    assert m2.verify()["mismatches"] == 0
    assert touched == set(regions)


def test_bits_survive_a_daemon_restart_and_are_on_disk_before_b(rig):
    m = rig.mirror(JitterImage)
    split(m)
    entered, release = m.b.gate(17 * RS)
    seen: dict[str, set[int]] = {}

    def w() -> None:
        post_write(m, 17 * RS, b"b" * BS)

    t = threading.Thread(target=w)
    t.start()
    assert entered.wait(TIMEOUT)               # the B write has been issued...
    seen["at_b_write"] = bitmap_file_bits(rig.store)
    release.set()
    t.join(TIMEOUT)
    assert 17 in seen["at_b_write"], "B was written before its bit was durable"
    model = bytearray(rig.initial)
    model[17 * RS: 17 * RS + BS] = b"b" * BS
    touched = {17} | scatter(m, rig.rng, [3, 90, LAST], model)
    # the daemon dies (nothing closed, nothing flushed); a new one opens the same files
    m2 = rig.mirror()
    assert m2.state == State.SPLIT and m2.a.frozen
    assert m2.bitmap is not None and m2.bitmap.count == len(touched)
    assert set(m2.bitmap.dirty_regions()) == touched
    m2.rejoin()
    assert m2.rejoin_complete.wait(TIMEOUT)
    assert read_file(rig.pa) == read_file(rig.pb) == model


def test_bits_are_cleared_only_after_a_is_durable(rig):
    m = rig.mirror()
    split(m)
    scatter(m, rig.rng, sorted(rig.rng.sample(range(NREG), 150)), bytearray(rig.initial))
    events: list[tuple] = []
    a, bm = m.a, m.bitmap
    assert bm is not None
    real_write, real_flush, real_clear = a.writev, a.flush, bm.clear

    def writev(offset, iov):
        real_write(offset, iov)
        events.append(("write", offset // RS))

    def flush():
        real_flush()
        events.append(("flush",))

    def clear(regions):
        events.append(("clear", tuple(regions)))
        return real_clear(regions)

    a.writev, a.flush, bm.clear = writev, flush, clear
    m.rejoin()
    assert m.rejoin_complete.wait(TIMEOUT)
    durable: set[int] = set()
    pending: set[int] = set()
    clears = 0
    for ev in events:
        if ev[0] == "write":
            pending.add(ev[1])
        elif ev[0] == "flush":
            durable |= pending
            pending.clear()
        else:
            clears += 1
            assert set(ev[1]) <= durable, f"bits {set(ev[1]) - durable} cleared before A flush"
    assert clears >= 3                             # 150 regions: batches of 64


# -- verify ------------------------------------------------------------------------------------

def test_verify_mirrored_and_repair(rig):
    m = rig.mirror()
    res = m.verify()
    assert res["mismatches"] == 0 and res["regions_checked"] == NREG
    assert res["first_mismatch_lbas"] == [] and res["state"] == "mirrored"
    off = 41 * RS + 1234
    poke(rig.pa, off, b"\xff\x00\xee")
    res = m.verify()
    assert res["mismatches"] == 1 and res["first_mismatch_lbas"] == [off // BS]
    assert res["repaired"] == 0
    assert read_file(rig.pa) != read_file(rig.pb)
    poke(rig.pa, SIZE - 1, b"\x01" if rig.initial[-1] != 1 else b"\x02")  # the partial region
    res = m.verify(repair=True)
    assert res["mismatches"] == 2 and res["repaired"] == 2
    assert res["first_mismatch_lbas"] == [off // BS, (SIZE - 1) // BS]
    assert read_file(rig.pa) == read_file(rig.pb) == rig.initial
    assert m.verify()["mismatches"] == 0
    # a window of the image
    poke(rig.pa, 100 * RS, b"!")
    part = m.verify(offset=99 * RS + 512, length=RS)
    assert part["regions_checked"] == 2 and part["mismatches"] == 1
    assert part["first_mismatch_lbas"] == [100 * RS // BS]
    assert m.verify(offset=101 * RS)["mismatches"] == 0


def test_verify_while_split_skips_marked_regions(rig):
    m = rig.mirror()
    split(m)
    touched = scatter(m, rig.rng, [4, 5, 6, 200, LAST], bytearray(rig.initial))
    res = m.verify()
    assert res["state"] == "split"
    assert res["regions_skipped_changed"] == len(touched)
    assert res["regions_checked"] == NREG - len(touched) and res["mismatches"] == 0
    off = 123 * RS + 7 * BS                         # an unmarked region: A damaged
    poke(rig.pa, off, b"\x5a" if rig.initial[off] != 0x5A else b"\xa5")
    res = m.verify()
    assert res["mismatches"] == 1 and res["first_mismatch_lbas"] == [off // BS]
    before = read_file(rig.pa)
    with pytest.raises(MirrorError, match="repair needs a mirrored"):
        m.verify(repair=True)
    assert read_file(rig.pa) == before, "a split copy must never be modified"


def test_verify_refused_while_rejoining(rig):
    m = rig.mirror()
    split(m)
    post_write(m, 0, b"z" * BS)
    post_write(m, RS, b"z" * BS)
    m.rejoin(rate=RS / 10)                          # very slow: stays rejoining
    with pytest.raises(MirrorError, match="rejoining"):
        m.verify()
    m.stop_resync()


# -- regression tests for bugs these tests found (all fixed) ----------------------------------

def test_non_default_region_size_survives_a_restart_before_any_split(rig):
    m = rig.mirror(region_size=RS)
    assert m.bitmap is not None and m.bitmap.region_size == RS
    m.close()
    m2 = rig.mirror(region_size=RS)              # MirrorError: bitmap is for 300 regions of 4096
    assert m2.bitmap is not None and m2.bitmap.region_size == RS


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_lost_bitmap_of_a_split_mirror_is_not_trusted(rig, damage):
    m = rig.mirror()
    split(m)
    model = bytearray(rig.initial)
    scatter(m, rig.rng, [2, 150, LAST], model)
    m.close()
    path = rig.store.bitmap_path("m")
    if damage == "deleted":
        os.unlink(path)
    else:
        os.truncate(path, HEADER_SIZE + 1)       # header intact, bits of regions >= 8 gone
    try:
        m2 = rig.mirror()
        m2.rejoin()
        assert m2.rejoin_complete.wait(TIMEOUT)
    except MirrorError:
        return                                    # refusing is an acceptable fix
    assert read_file(rig.pa) == read_file(rig.pb) == model, \
        f"rejoin declared the mirror {m2.state} but copied {m2.st.last_rejoin}"


class Crash(BaseException):
    """The daemon dies here."""


def test_full_rejoin_interrupted_before_marking_is_still_full(rig):
    """A crash while marking every region for a full rejoin leaves the mirror split (the
    marking is durable before the state says rejoining); asking again copies everything."""
    m = rig.mirror()
    split(m)
    post_write(m, 2 * RS, b"x" * BS)
    poke(rig.pa, 9 * RS, b"replaced A")          # why a full rejoin was asked for
    assert m.bitmap is not None
    real_mark_all = m.bitmap.mark_all

    def crash() -> int:
        raise Crash

    m.bitmap.mark_all = crash
    with pytest.raises(Crash):
        m.rejoin(full=True)
    assert state_doc(rig.store)["state"] == "split"
    m.bitmap.mark_all = real_mark_all
    m.close()
    m2 = rig.mirror()                             # the next daemon start
    m2.resume()
    assert m2.state == State.SPLIT
    m2.rejoin(full=True)
    assert m2.rejoin_complete.wait(TIMEOUT)
    assert m2.state == State.MIRRORED
    res = m2.verify()
    assert res["mismatches"] == 0, f"mirrored but A != B: {res}"


class WatchedRangeLock(RangeLock):
    """Reports which ranges started waiting for their ticket."""

    def __init__(self) -> None:
        super().__init__()
        self.entered: dict[tuple[int, int], threading.Event] = {}
        self._mu = threading.Lock()

    def event(self, start: int, end: int) -> threading.Event:
        with self._mu:
            return self.entered.setdefault((start, end), threading.Event())

    def wait(self, ticket: int, start: int, end: int) -> None:
        self.event(start, end).set()
        super().wait(ticket, start, end)


def test_verify_while_split_does_not_report_a_concurrently_tracked_write(rig):
    m = rig.mirror()
    split(m)
    m.locks = locks = WatchedRangeLock()
    w = m.admit(m.epoch, (5 * RS, 5 * RS + BS))  # admitted (ticket taken), not yet run
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(m.verify()))
    t.start()
    assert locks.event(5 * RS, 6 * RS).wait(TIMEOUT)  # verify waits for region 5
    w.write(5 * RS, [memoryview(b"w" * BS)], False)
    w.finish()
    t.join(TIMEOUT)
    assert m.bitmap is not None and m.bitmap.test(5)
    assert out["mismatches"] == 0, f"tracked change reported as a mismatch: {out}"


def test_admission_racing_a_rejoin_never_writes_b_only_once_mirrored(rig):
    """An admission in progress when rejoin() is called: the rejoin waits for it; if it was
    decided B-only, the copier waits for that write and copies its region."""
    m = rig.mirror()
    split(m)
    in_admit, go_on = threading.Event(), threading.Event()
    admitter = "admitter"

    class Inflight(dict):
        """Admission counts the command in under the admission lock: hold it right there."""

        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            if threading.current_thread().name == admitter and not in_admit.is_set():
                in_admit.set()
                assert go_on.wait(TIMEOUT)

    m.flight.inflight = Inflight(m.flight.inflight)
    got: list = []
    t = threading.Thread(target=lambda: got.append(m.admit(m.epoch, (8 * RS, 8 * RS + BS))),
                         name=admitter)
    t.start()                                    # the ring thread, mid-admission
    assert in_admit.wait(TIMEOUT)
    rejoiner = threading.Thread(target=m.rejoin)  # the control thread
    rejoiner.start()
    go_on.set()
    t.join(TIMEOUT)
    rejoiner.join(TIMEOUT)
    (io,) = got
    io.write(8 * RS, [memoryview(b"L" * BS)], False)
    io.finish()
    assert m.rejoin_complete.wait(TIMEOUT)
    assert m.state == State.MIRRORED
    assert read_file(rig.pa) == read_file(rig.pb), "mirrored, yet a write reached B only"


def test_rejoin_accounts_for_regions_marked_by_b_only_writes_in_flight(rig):
    m = rig.mirror()
    split(m)
    post_write(m, 1 * RS, b"a" * BS)
    straggler = m.admit(m.epoch, (50 * RS, 50 * RS + BS))   # admitted B-only, not yet run
    m.rejoin()
    deadline = time.monotonic() + TIMEOUT
    while m.resync is None:                    # the copier has started (no event for this)
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert not m.rejoin_complete.is_set()      # it waits for the straggler
    straggler.write(50 * RS, [memoryview(b"s" * BS)], False)
    straggler.finish()
    assert m.rejoin_complete.wait(TIMEOUT)
    assert read_file(rig.pa) == read_file(rig.pb)
    lr = m.st.last_rejoin
    assert lr is not None and lr["bytes_copied"] == 2 * RS
    assert lr["regions"] == 2, f"copied 2 regions, reported {lr['regions']}"
