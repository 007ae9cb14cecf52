"""The RBD leg against a real (disposable, loopback) Ceph cluster: bytes, flush, zeroing,
snapshots, an unreachable cluster, and a mirror with A on RBD and B a file doing
split / rejoin / verify.  Skipped only where Ceph or librbd's binding is not installed."""

from __future__ import annotations

import errno
import random
import threading

import pytest

from targetmirror.errors import StoreError
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import State, StateStore
from targetmirror.store.image import Image
from targetmirror.store.rbd import PIECE, CephAccess, RbdImage, open_image
from tests import cephcluster
from tests.mirror.test_rejoin import post_write, split

MiB = 1 << 20
BS = 512
RS = 64 * 1024


def access(cluster: cephcluster.CephCluster, timeout: int = 10) -> CephAccess:
    return CephAccess(conf=str(cluster.conf), timeout=timeout)


def read(img: Image, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    img.readv(offset, [memoryview(buf)])
    return bytes(buf)


@pytest.fixture
def img(ceph_cluster, rbd_image):
    image = RbdImage(rbd_image(16 * MiB), access(ceph_cluster))
    yield image
    image.close()


def test_bytes_round_trip_across_pieces_and_iovecs(img, ceph_cluster):
    rng = random.Random(7)
    data = rng.randbytes(2 * PIECE + 3 * BS)      # three librbd requests in flight
    views = [memoryview(data)[:1000], memoryview(data)[1000:PIECE + 7],
             memoryview(data)[PIECE + 7:]]
    img.writev(3 * BS, views)
    out = [bytearray(len(v)) for v in reversed(views)]  # other iovec boundaries on the way back
    img.readv(3 * BS, [memoryview(b) for b in out])
    assert b"".join(out) == data
    assert read(img, 0, 3 * BS) == bytes(3 * BS)   # nothing before it was touched
    img.flush()
    # a second client (its own connection) sees what the first flushed
    other = RbdImage(img.path, access(ceph_cluster))
    try:
        assert read(other, 3 * BS, len(data)) == data
        assert other.size == 16 * MiB and not other.fast
    finally:
        other.close()


def test_write_zeroes_and_discard_read_back_zeros_and_spare_neighbours(img):
    img.writev(0, [memoryview(b"\xaa" * (5 * MiB))])
    img.write_zeroes(BS, 4 * MiB)                   # crosses an object boundary
    assert read(img, 0, BS) == b"\xaa" * BS
    assert read(img, BS, 4 * MiB) == bytes(4 * MiB)
    assert read(img, BS + 4 * MiB, BS) == b"\xaa" * BS
    img.discard(3 * MiB, 1000 * BS)                 # UNMAP: LBPRZ, reads back zeros
    assert read(img, 4 * MiB + BS, MiB - BS) == b"\xaa" * (MiB - BS)
    img.writev(3 * MiB, [memoryview(b"\x55" * BS)])
    assert read(img, 3 * MiB, BS) == b"\x55" * BS


def test_frozen_image_refuses_writes_and_zeroing(img):
    img.writev(0, [memoryview(b"x" * BS)])
    img.freeze()
    with pytest.raises(StoreError, match="frozen"):
        img.writev(0, [memoryview(b"y" * BS)])
    with pytest.raises(StoreError, match="frozen"):
        img.write_zeroes(0, BS)
    img.thaw()
    img.writev(0, [memoryview(b"z" * BS)])
    assert read(img, 0, BS) == b"z" * BS


def test_snapshot_holds_the_data_of_its_instant_and_is_read_only(img, ceph_cluster):
    img.writev(0, [memoryview(b"1" * MiB)])
    img.create_snapshot("s1")
    img.writev(0, [memoryview(b"2" * MiB)])
    assert [s["name"] for s in img.snapshots()] == ["s1"]
    snap = open_image(img.path + "@s1", access(ceph_cluster), readonly=True)
    try:
        assert isinstance(snap, RbdImage) and snap.readonly
        assert read(snap, 0, MiB) == b"1" * MiB
        with pytest.raises(StoreError):
            snap.writev(0, [memoryview(b"3" * BS)])
    finally:
        snap.close()
    assert read(img, 0, MiB) == b"2" * MiB
    img.remove_snapshot("s1")
    assert img.snapshots() == []


def test_opening_a_missing_image_is_a_store_error(ceph_cluster):
    with pytest.raises(StoreError, match="cannot open RBD image rbd/rbd/nope") as exc:
        RbdImage("rbd/rbd/nope", access(ceph_cluster))
    assert exc.value.kind == "open" and exc.value.errno == errno.ENOENT


def _bounded(fn, limit: float = 90.0):
    """Run ``fn`` in a thread; fail the test (instead of hanging it) if it never returns."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"{fn} still blocked after {limit} s: the timeout did not work"
    return box


@pytest.fixture
def own_cluster(ceph_cluster, tmp_path):
    """A second cluster just for a test that kills its OSD (the session one stays intact)."""
    c = cephcluster.CephCluster(tmp_path / "ceph2")
    try:
        c.start()
        yield c
    finally:
        c.wipe()


def test_unreachable_cluster_fails_the_call_and_the_mirror_degrades(own_cluster, tmp_path):
    own_cluster.create_image("a", 4 * MiB)
    a = RbdImage("rbd/rbd/a", access(own_cluster, timeout=2))
    pb = tmp_path / "b.img"
    pb.write_bytes(bytes(4 * MiB))
    m = Mirror("m", a, Image(str(pb)), size=4 * MiB, block_size=BS,
               store=StateStore(str(tmp_path / "state")), region_size=RS,
               wi_extent=RS)  # exact write-intent bits: the test counts regions
    try:
        m.write(0, [memoryview(b"before" * 512)], True)
        assert read(a, 0, 3072) == b"before" * 512
        own_cluster.kill_osd()
        # the leg call itself answers ETIMEDOUT instead of blocking
        box = _bounded(lambda: a.readv(0, [memoryview(bytearray(BS))]))
        err = box.get("error")
        assert isinstance(err, StoreError) and err.errno == errno.ETIMEDOUT, box
        # through the mirror: the write succeeds on B, A is failed, the mirror degraded
        box = _bounded(lambda: m.write(RS, [memoryview(b"after!" * 512)], True))
        assert "error" not in box, box
        assert m.health == "degraded" and set(m.st.failed) == {"a"}
        assert "ETIMEDOUT" in m.st.failed["a"]["reason"]
        assert pb.read_bytes()[RS:RS + 3072] == b"after!" * 512
        out = bytearray(3072)
        m.read(RS, [memoryview(out)])                # served from B, A is not asked
        assert bytes(out) == b"after!" * 512
    finally:
        _bounded(m.close)


def test_paused_cluster_degrades_then_repair_copies_only_what_a_missed(own_cluster, tmp_path):
    size = 4 * MiB
    own_cluster.create_image("a", size)
    a = RbdImage("rbd/rbd/a", access(own_cluster, timeout=2))
    pb = tmp_path / "b.img"
    pb.write_bytes(bytes(size))
    m = Mirror("m", a, Image(str(pb)), size=size, block_size=BS,
               store=StateStore(str(tmp_path / "state")), region_size=RS,
               wi_extent=RS)  # exact write-intent bits: the test counts regions
    probe = None
    try:
        m.write(0, [memoryview(b"1" * size)], True)
        m.clear_write_intent()
        m.clear_write_intent()
        own_cluster.pause_osd()
        box = _bounded(lambda: m.write(3 * RS, [memoryview(b"2" * RS)], True))
        assert "error" not in box, box
        for r in (7, 20):                            # A is failed: these go to B at once
            m.write(r * RS, [memoryview(b"3" * BS)], False)
        assert m.health == "degraded" and m.bitmap is not None and m.bitmap.count == 3
        own_cluster.resume_osd()
        # the admin checks the cluster answers again (the leg itself has a 2 s timeout, which a
        # just-resumed OSD on a loaded machine may miss) before asking for the repair
        probe = RbdImage("rbd/rbd/a", access(own_cluster))
        read(probe, 0, BS)
        m.repair()
        assert m.rejoin_complete.wait(60)
        assert m.health == "ok" and m.st.last_repair is not None
        assert m.st.last_repair["bytes_copied"] == 3 * RS
        assert read(probe, 0, size) == pb.read_bytes()
        assert m.verify()["mismatches"] == 0
    finally:
        own_cluster.resume_osd()
        if probe is not None:
            probe.close()
        _bounded(m.close)


def test_mirror_a_on_rbd_b_file_split_rejoin_verify(ceph_cluster, rbd_image, tmp_path):
    size = 8 * MiB
    rng = random.Random(3)
    initial = rng.randbytes(size)
    spec = rbd_image(size)
    a = RbdImage(spec, access(ceph_cluster))
    a.writev(0, [memoryview(initial)])
    pb = tmp_path / "b.img"
    pb.write_bytes(initial)
    m = Mirror("m", a, Image(str(pb)), size=size, block_size=BS,
               store=StateStore(str(tmp_path / "state")), region_size=RS,
               wi_extent=RS)  # exact write-intent bits: the test counts regions
    probe = RbdImage(spec, access(ceph_cluster))
    try:
        model = bytearray(initial)
        m.write(5 * BS, [memoryview(b"M" * 4096)], False)      # mirrored: both legs
        model[5 * BS:5 * BS + 4096] = b"M" * 4096
        assert read(probe, 0, size) == bytes(model)
        m.clear_write_intent()
        m.clear_write_intent()                  # idle for a pass: region 0's bit is cleared
        assert m.bitmap is not None and m.bitmap.count == 0
        split(m)
        assert m.state == State.SPLIT and m.a.frozen
        at_split = bytes(model)
        regions = sorted(rng.sample(range(size // RS), 12))
        for r in regions:
            off = r * RS + rng.randrange(RS // BS) * BS
            data = rng.randbytes(BS * rng.randint(1, 8))
            data = data[:min(len(data), (r + 1) * RS - off)]
            post_write(m, off, data)
            model[off:off + len(data)] = data
        assert read(probe, 0, size) == at_split, "A (RBD) changed after the split"
        assert pb.read_bytes() == bytes(model)
        res = m.verify()
        assert res["mismatches"] == 0
        m.rejoin()
        assert m.rejoin_complete.wait(60)
        assert m.st.last_rejoin is not None
        assert m.st.last_rejoin["bytes_copied"] == len(regions) * RS < size
        assert read(probe, 0, size) == bytes(model) == pb.read_bytes()
        res = m.verify()
        assert res["mismatches"] == 0 and res["bytes_compared"] == size
        assert m.state == State.MIRRORED and not m.a.frozen
    finally:
        probe.close()
        m.close()


def _blocklist(cluster: cephcluster.CephCluster) -> str:
    return cluster.ceph("osd", "blocklist", "ls", timeout=60)


def test_reopen_fences_the_old_client(ceph_cluster, rbd_image):
    """A repair's handle blocklists the old handle's client before it opens the image: the
    old client can write nothing more (an OSD refuses it however late its messages come),
    the new one reads and writes."""
    spec = rbd_image(4 * MiB)
    old = RbdImage(spec, access(ceph_cluster, timeout=5))
    new = None
    try:
        old.writev(0, [memoryview(b"o" * BS)])
        addr = old.client_address()
        assert addr not in _blocklist(ceph_cluster)
        new = old.reopen()
        assert isinstance(new, RbdImage) and new.fenced == addr
        assert addr in _blocklist(ceph_cluster)
        box = _bounded(lambda: old.writev(BS, [memoryview(b"x" * BS)]), 60)
        err = box.get("error")
        assert isinstance(err, StoreError), box
        assert err.errno == errno.ESHUTDOWN, err   # EBLOCKLISTED, at once
        new.writev(BS, [memoryview(b"n" * BS)])
        assert read(new, 0, 2 * BS) == b"o" * BS + b"n" * BS
        # a read-only handle (a snapshot LUN's) and another image are not fenced
        other = old.reopen(rbd_image(MiB))
        try:
            assert isinstance(other, RbdImage) and other.fenced is None
        finally:
            other.close()
    finally:
        _bounded(old.close)
        if new is not None:
            new.close()


def test_a_fence_that_cannot_be_put_up_opens_nothing(ceph_cluster, rbd_image):
    spec = rbd_image(MiB)
    with pytest.raises(StoreError, match="cannot fence the earlier client not-an-address"):
        RbdImage(spec, access(ceph_cluster), fence="not-an-address")
