"""Host benchmark: what the change bitmap costs the write path, and what big bitmaps cost to open.

Random 4 KiB writes through ``Mirror.admit`` / ``MirrorIO.write`` (the daemon's path, minus the
ring), from one thread and from several:

* mirrored: both legs, no bitmap work;
* split, cold: B only, every first write to a 64 KiB region marks it and waits for an fdatasync
  of the bitmap (concurrent writers share them: group commit);
* split, warm: every region already marked, so the bitmap costs a bit test.

Then the time to create, open (load + count) and scan (``dirty_regions``) a bitmap for large
images, which is what a daemon start and a rejoin pay before copying anything.

    python3 benchmarks/bitmap_cost.py [--seconds 2] [--dir DIR] [--threads 4]
                                      [--size-gib 16] [--sizes-tib 1,4,16]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from targetmirror.mirror.bitmap import Bitmap
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import StateStore
from targetmirror.store.image import Image

SIZE = 16 << 30
"""Sparse image files: big enough that a few seconds of random writes mostly touch new regions."""
WRITE = 4096


def make(directory: str, tag: str) -> Mirror:
    paths = []
    for leg in ("a", "b"):
        p = os.path.join(directory, f"{tag}.{leg}.img")
        with open(p, "wb") as f:
            f.truncate(SIZE)
        paths.append(p)
    store = StateStore(os.path.join(directory, f"{tag}.state"))
    return Mirror("bench", Image(paths[0]), Image(paths[1]), size=SIZE, store=store)


def split(m: Mirror) -> None:
    m.prepare_split(["bench"])
    m.begin_split()
    m.boundary_passed()
    assert m.split_complete.wait(30)


def run(m: Mirror, seconds: float, threads: int, seed: int) -> tuple[int, float]:
    """Random 4 KiB writes for ``seconds`` from ``threads`` threads; (writes, elapsed)."""
    counts = [0] * threads
    stop = threading.Event()
    data = memoryview(os.urandom(WRITE))

    def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        blocks = SIZE // WRITE
        n = 0
        while not stop.is_set():
            for _ in range(32):
                off = rng.randrange(blocks) * WRITE
                io = m.admit(m.epoch, (off, off + WRITE))
                try:
                    io.write(off, [data], False)
                finally:
                    io.finish()
            n += 32
        counts[i] = n

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    stop.wait(seconds)  # the measurement window, not synchronisation
    stop.set()
    for t in ts:
        t.join()
    return sum(counts), time.perf_counter() - t0


def report(label: str, n: int, elapsed: float, m: Mirror, syncs0: int, marked0: int) -> None:
    bm = m.bitmap
    assert bm is not None
    syncs, marked = bm.syncs - syncs0, bm.count - marked0
    print(f"  {label:<28} {n / elapsed:>8.0f} writes/s {n:>7} writes {marked:>7} first touches "
          f"{syncs:>7} bitmap syncs ({syncs / max(marked, 1):.2f} per first touch)")


def write_path(directory: str, seconds: float, threads: int) -> None:
    for nthreads in sorted({1, threads}):
        print(f"random 4 KiB writes, {nthreads} thread(s), {SIZE / (1 << 30):g} GiB image, "
              "64 KiB regions:")
        m = make(directory, f"mir{nthreads}")
        try:
            bm = m.bitmap
            assert bm is not None
            n, el = run(m, seconds, nthreads, 1)
            report("mirrored", n, el, m, bm.syncs, bm.count)
            split(m)
            s0, c0 = bm.syncs, bm.count
            n, el = run(m, seconds, nthreads, 2)
            report("split, cold (first touches)", n, el, m, s0, c0)
            bm.sync(bm.mark_all())
            s0, c0 = bm.syncs, bm.count
            n, el = run(m, seconds, nthreads, 3)
            report("split, warm (all marked)", n, el, m, s0, c0)
        finally:
            m.close()


def big_bitmaps(directory: str, sizes_tib: list[float]) -> None:
    print("bitmap files for large images (64 KiB regions):")
    for tib in sizes_tib:
        size = int(tib * (1 << 40))
        path = os.path.join(directory, f"big{tib}.bitmap")
        t0 = time.perf_counter()
        b = Bitmap(path, size)
        created = time.perf_counter() - t0
        b.sync(b.mark(0, 1))
        b.sync(b.mark(size - 1, 1))
        b.close()
        t0 = time.perf_counter()
        b = Bitmap(path, size)
        opened = time.perf_counter() - t0
        t0 = time.perf_counter()
        found = list(b.dirty_regions())
        scanned = time.perf_counter() - t0
        b.close()
        os.unlink(path)
        assert len(found) == 2
        print(f"  {tib:>5g} TiB: {b.regions:>10} regions, {len(b.bits) >> 20:>3} MiB of bits: "
              f"create {created:6.2f} s, open {opened:6.2f} s, scan 2 marked {scanned:6.2f} s")


def main() -> None:
    global SIZE
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--size-gib", type=float, default=SIZE / (1 << 30),
                    help="image size (sparse files)")
    ap.add_argument("--dir", default=None, help="where the images go (default: a temp dir)")
    ap.add_argument("--sizes-tib", default="1,4,16",
                    help="bitmap sizes to time opening (TiB, comma-separated; '' to skip)")
    args = ap.parse_args()
    SIZE = int(args.size_gib * (1 << 30)) // 65536 * 65536
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        write_path(d, args.seconds, args.threads)
        sizes = [float(x) for x in args.sizes_tib.split(",") if x.strip()]
        if sizes:
            big_bitmaps(d, sizes)


if __name__ == "__main__":
    main()
