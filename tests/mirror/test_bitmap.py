"""The persistent region bitmap: region math, persistence, header checks and group commit.

Durability rule these tests pin down: a bit is guaranteed to be in the file only once a
``sync(gen)`` for a generation at or after the one ``mark`` returned has returned.  ``mark``
alone changes memory only; a reopen after it without a sync may lose the bit (it may also keep
it, if another caller's sync wrote the same 4 KiB page in the meantime: syncs write whole pages).
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import threading

import pytest

from targetmirror.errors import MirrorError
from targetmirror.mirror import bitmap as bitmap_mod
from targetmirror.mirror.bitmap import DEFAULT_REGION, HEADER, HEADER_SIZE, MAGIC, Bitmap

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
RS = DEFAULT_REGION  # 64 KiB


@pytest.fixture
def opened():
    made: list[Bitmap] = []

    def bm(path, size: int, region_size: int = RS) -> Bitmap:
        b = Bitmap(str(path), size, region_size)
        made.append(b)
        return b

    yield bm
    for b in made:
        with contextlib.suppress(OSError):  # closed by the test
            b.close()


def file_bit(path, region: int) -> bool:
    """Read one bit straight from the file (no Bitmap: the on-disk truth)."""
    with open(path, "rb") as f:
        f.seek(HEADER_SIZE + region // 8)
        byte = f.read(1)
    return bool(byte and byte[0] & (1 << (region % 8)))


# -- region math ------------------------------------------------------------------------------

def test_16_tib_bitmap_is_32_mib_sparse_with_exact_region_math(tmp_path, opened):
    size = 16 * TiB
    path = tmp_path / "big.bitmap"
    b = opened(path, size)
    regions = size // RS
    assert b.regions == regions == 1 << 28
    assert len(b.bits) == 32 * MiB
    st = os.stat(path)
    assert st.st_size == HEADER_SIZE + 32 * MiB
    assert st.st_blocks * 512 < 1 * MiB, "the new bitmap file should be sparse"
    with open(path, "rb") as f:
        magic, version, region_size, n = HEADER.unpack(f.read(HEADER.size))
    assert (magic, version, region_size, n) == (MAGIC, 1, RS, regions)

    # span at region edges, with 64-bit offsets
    last = regions - 1
    assert b.span(0, 1) == range(0, 1)
    assert b.span(RS - 1, 1) == range(0, 1)
    assert b.span(RS - 1, 2) == range(0, 2)
    assert b.span(RS, RS) == range(1, 2)
    assert b.span(RS, RS + 1) == range(1, 3)
    assert b.span(0, size) == range(0, regions)
    assert b.span(size - 512, 512) == range(last, last + 1)
    assert b.span(size - RS - 512, 1024) == range(last - 1, last + 1)
    assert b.span(8 * TiB, 4096) == range(1 << 27, (1 << 27) + 1)
    assert b.span(123, 0) == range(0) and b.span(123, -1) == range(0)

    # mark / clear counts, including the last region and ranges across regions
    gens = []
    gens.append(b.mark(0, 512))
    gens.append(b.mark(size - 512, 512))
    gens.append(b.mark(8 * TiB - 512, 1024))      # straddles regions 2^27-1 and 2^27
    assert all(g > 0 for g in gens) and gens == sorted(gens)
    assert b.count == 4
    # already set but not durable yet: the pending generation, to wait for its sync
    assert b.mark(100, 4096) == gens[-1]
    b.sync(gens[-1])
    assert b.mark(100, 4096) == 0                 # set and durable: nothing to wait for
    assert b.count == 4
    for r in (0, last, (1 << 27) - 1, 1 << 27):
        assert b.test(r)
    assert not b.test(1) and not b.test(last - 1)
    b.sync(gens[-1])
    assert b.syncs == 1
    for r in (0, last, (1 << 27) - 1, 1 << 27):
        assert file_bit(path, r), f"region {r} not in the file after sync"
    assert not file_bit(path, 1) and not file_bit(path, last - 1)
    assert os.stat(path).st_blocks * 512 < 1 * MiB, "a few bits must not fill the file"

    g = b.clear([0, 1, last])                     # 1 was never set: not counted
    assert g > 0 and b.count == 2
    assert b.clear([0, 1]) == 0                   # nothing changed
    b.sync(g)
    assert not file_bit(path, 0) and not file_bit(path, last)
    assert file_bit(path, 1 << 27)


@pytest.mark.parametrize("size", [
    5 * RS,                 # whole regions
    5 * RS + 512,           # last region holds one block
    9 * RS - 512,           # last region one block short; 9 regions span two bytes
    17 * RS + 4096,         # three bytes of bits, the last one nearly empty
])
def test_last_partial_region(tmp_path, opened, size):
    b = opened(tmp_path / "b.bitmap", size)
    regions = -(-size // RS)
    assert b.regions == regions and len(b.bits) == -(-regions // 8)
    assert b.span(size - 512, 512) == range(regions - 1, regions)
    assert b.span(0, size) == range(regions)
    b.sync(b.mark_all())
    assert b.count == regions
    assert list(b.dirty_regions()) == list(range(regions)), "no phantom regions past the end"
    b.sync(b.clear(list(range(regions))))
    assert b.count == 0 and list(b.dirty_regions()) == []


def test_dirty_regions_ascending_across_bytes_and_to_the_last_region(tmp_path, opened):
    size = 64 * GiB + 512                          # 2^20 whole regions and a 512-byte one
    b = opened(tmp_path / "b.bitmap", size)
    last = b.regions - 1
    assert last == 1 << 20
    rng = random.Random(7)
    want = {0, 1, 7, 8, 9, 15, 16, 63, 64, 65, 4095, 4096, 8 * 4096 * 8 - 1, 8 * 4096 * 8,
            last - 8, last - 1, last}
    want |= {rng.randrange(b.regions) for _ in range(200)}
    order = list(want)
    rng.shuffle(order)
    for r in order:
        b.mark(r * RS, 1)
    assert b.count == len(want)
    assert list(b.dirty_regions()) == sorted(want)
    # start inside a byte and on byte edges
    for start in (0, 5, 8, 9, 65, 4096, last - 1, last, last + 1):
        assert list(b.dirty_regions(start)) == sorted(r for r in want if r >= start), start


def test_dirty_regions_is_a_live_view(tmp_path, opened):
    b = opened(tmp_path / "b.bitmap", 64 * RS)
    for r in (3, 20, 40):
        b.mark(r * RS, 1)
    it = b.dirty_regions()
    assert next(it) == 3
    b.mark(50 * RS, 1)                             # ahead of the cursor: seen
    b.mark(1 * RS, 1)                              # behind it: not seen in this pass
    b.clear([40])                                  # ahead and cleared: not seen
    assert list(it) == [20, 50]
    assert list(b.dirty_regions()) == [1, 3, 20, 50]


# -- persistence -------------------------------------------------------------------------------

def test_marked_and_synced_bits_survive_a_reopen(tmp_path, opened):
    path = tmp_path / "b.bitmap"
    size = 256 * GiB + 3 * 512
    b = opened(path, size)
    regions = sorted({0, 9, 12345, 1 << 20, b.regions - 1})
    gen = 0
    for r in regions:
        gen = b.mark(r * RS, 512) or gen
    b.sync(gen)
    b.close()
    b2 = opened(path, size)
    assert b2.count == len(regions)
    assert list(b2.dirty_regions(min(regions))) == regions
    # clearing is persistent too
    b2.sync(b2.clear(regions[:2]))
    b2.close()
    b3 = opened(path, size)
    assert b3.count == len(regions) - 2 and not b3.test(0) and b3.test(regions[2])


def test_a_mark_without_sync_is_not_durable(tmp_path, opened):
    """The rule: only bits covered by a returned sync() are guaranteed in the file."""
    path = tmp_path / "b.bitmap"
    size = 64 * GiB
    b = opened(path, size)
    b.sync(b.mark(0, 1))
    far = 40000                                     # another 4 KiB page of bits than region 0
    assert far // 8 // 4096 != 0
    assert b.mark(far * RS, 1) > 0                  # in memory only
    assert b.test(far) and b.count == 2
    b.close()
    b2 = opened(path, size)
    assert b2.test(0)
    assert not b2.test(far) and b2.count == 1, "an unsynced mark was expected to be lost"


def test_sync_of_generation_zero_is_free(tmp_path, opened):
    b = opened(tmp_path / "b.bitmap", 16 * RS)
    b.sync(b.mark(0, 1))
    assert b.syncs == 1
    b.sync(b.mark(0, 1))                            # already set: gen 0, no fdatasync
    b.sync(0)
    assert b.syncs == 1


def test_failed_sync_does_not_pretend_bits_are_durable(tmp_path, opened, monkeypatch):
    """A sync that fails (EIO from fdatasync) must not let a later sync report the same bits
    durable without writing them again."""
    path = tmp_path / "b.bitmap"
    size = 64 * RS
    b = opened(path, size)
    gen = b.mark(5 * RS, 1)
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def failing_pwrite(fd, data, off):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(5, "Input/output error")
        return real_pwrite(fd, data, off)

    monkeypatch.setattr(bitmap_mod.os, "pwrite", failing_pwrite)
    with pytest.raises(OSError):
        b.sync(gen)
    monkeypatch.setattr(bitmap_mod.os, "pwrite", real_pwrite)
    b.sync(gen)                                      # the retry (the next writer's sync)
    b.close()
    assert file_bit(path, 5), ("BUG bitmap.py sync(): the failed sync cleared _dirty_pages, so "
                               "the retry fdatasync'ed nothing and reported region 5 durable")


# -- header checks ------------------------------------------------------------------------------

def test_other_region_size_or_count_refused(tmp_path, opened):
    path = tmp_path / "b.bitmap"
    size = 100 * RS
    b = opened(path, size)
    b.sync(b.mark(3 * RS, 1))
    b.close()
    before = path.read_bytes()
    with pytest.raises(MirrorError, match="refusing"):
        Bitmap(str(path), size, 2 * RS)             # other region size
    with pytest.raises(MirrorError, match="refusing"):
        Bitmap(str(path), size + RS, RS)            # one more region
    with pytest.raises(MirrorError, match="refusing"):
        Bitmap(str(path), size - RS, RS)            # one fewer
    assert path.read_bytes() == before, "a refused bitmap must be left as it was"
    # same region count (the size changed within the last region): accepted, bits kept
    b2 = opened(path, size - 512)
    assert b2.regions == 100 and b2.test(3)


def test_foreign_file_refused(tmp_path):
    path = tmp_path / "b.bitmap"
    path.write_bytes(b"NOTABMAP" + bytes(HEADER_SIZE))
    with pytest.raises(MirrorError, match="not a targetmirror bitmap"):
        Bitmap(str(path), 16 * RS)
    path.write_bytes(HEADER.pack(MAGIC, 99, RS, 16).ljust(HEADER_SIZE + 2, b"\0"))
    with pytest.raises(MirrorError, match="unknown version"):
        Bitmap(str(path), 16 * RS)
    assert struct.unpack_from("<I", path.read_bytes(), 8)[0] == 99  # untouched


@pytest.mark.parametrize("region_size", [0, -4096, 512, 2048, 3 * 4096, 65537, 100000])
def test_bad_region_size_refused(tmp_path, region_size):
    path = tmp_path / "b.bitmap"
    with pytest.raises(MirrorError, match="power of two"):
        Bitmap(str(path), 1 * GiB, region_size)
    assert not path.exists(), "a refused bitmap must not leave a file behind"


@pytest.mark.parametrize("region_size", [4096, 64 * KiB, 1 * MiB])
def test_good_region_sizes(tmp_path, opened, region_size):
    b = opened(tmp_path / "b.bitmap", 1 * GiB, region_size)
    assert b.regions == GiB // region_size
    assert b.span(region_size - 1, 2) == range(0, 2)


# -- group commit -------------------------------------------------------------------------------

def test_group_commit_shares_syncs_and_every_bit_is_durable(tmp_path, opened):
    """Real timing: 64 writers marking distinct regions at once share fdatasyncs."""
    path = tmp_path / "b.bitmap"
    size = 64 * GiB
    b = opened(path, size)
    n = 64
    regions = [i * 4099 for i in range(n)]          # spread over several pages of bits
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def writer(r: int) -> None:
        try:
            barrier.wait(10)
            b.sync(b.mark(r * RS, 4096))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(r,)) for r in regions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert b.count == n
    print(f"{n} callers, {b.syncs} fdatasyncs")
    assert 1 <= b.syncs < n  # exact grouping: test_group_commit_exact
    b.close()
    assert all(file_bit(path, r) for r in regions)
    b2 = opened(path, size)
    assert b2.count == n and list(b2.dirty_regions()) == regions


def test_group_commit_exact(tmp_path, opened, monkeypatch):
    """Deterministic: while the first fdatasync is held, every other caller marks and waits;
    they all share exactly one more fdatasync, and each returns only once its bit is on disk."""
    path = tmp_path / "b.bitmap"
    b = opened(path, 64 * GiB)
    n = 32
    marked = threading.Semaphore(0)
    real = os.fdatasync
    first = threading.Event()
    count = {"n": 0}

    def fdatasync(fd):
        count["n"] += 1
        if count["n"] == 1:
            first.set()
            for _ in range(n - 1):                   # every other caller has marked
                assert marked.acquire(timeout=10)
        real(fd)

    monkeypatch.setattr(bitmap_mod.os, "fdatasync", fdatasync)
    done: list[int] = []
    lost: list[int] = []

    def caller(i: int) -> None:
        if i:
            assert first.wait(10)
        gen = b.mark(i * 5000 * RS, 1)
        if i:
            marked.release()
        b.sync(gen)
        if not file_bit(path, i * 5000):
            lost.append(i)
        done.append(i)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(done) == list(range(n))
    assert not lost, f"sync() returned before these bits were in the file: {lost}"
    assert b.syncs == count["n"] == 2

