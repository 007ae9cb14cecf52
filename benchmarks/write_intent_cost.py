"""Host benchmark: what the write-intent log costs mirrored 4 KiB random writes.

Random 4 KiB writes through ``Mirror.admit`` / ``MirrorIO.write`` (the daemon's path, minus the
ring and SCSI) on a mirrored mirror, with write-intent off (``write_intent=False``: nothing
marked while mirrored, the behaviour before the faults work) and on (every write marks its
write-intent extent durably before the legs; the periodic clear pass runs every ``--interval``
s), from 1 and 4 threads, for extents of one 64 KiB region (exact) and of 4 MiB (the default,
``WI_EXTENT``), on a small working set (touched once before measuring: a bit test per write),
a 256 MiB one (the lab fio span, cold) and a 16 GiB one (cold: most writes touch an extent
whose bits were never set: one group-committed bitmap fdatasync each).

    python3 benchmarks/write_intent_cost.py [--seconds 3] [--dir DIR] [--rounds 2]
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

from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import StateStore
from targetmirror.store.image import Image

WRITE = 4096
SIZE = 16 << 30


def make(directory: str, tag: str, wi: bool, interval: float, extent: int) -> Mirror:
    paths = []
    for leg in ("a", "b"):
        p = os.path.join(directory, f"{tag}.{leg}.img")
        with open(p, "wb") as f:
            f.truncate(SIZE)
        paths.append(p)
    store = StateStore(os.path.join(directory, f"{tag}.state"))
    return Mirror("bench", Image(paths[0]), Image(paths[1]), size=SIZE, store=store,
                  write_intent=wi, wi_interval=interval, leg_timeout=None, wi_extent=extent)


def warm(m: Mirror, working_set: int) -> None:
    """Touch every region of the working set once (steady state: hot regions stay marked)."""
    assert m.bitmap is not None
    data = memoryview(bytes(WRITE))
    for off in range(0, working_set, m.wi_extent):
        m.write(off, [data], False)


def run(m: Mirror, seconds: float, threads: int, working_set: int, seed: int) -> float:
    counts = [0] * threads
    stop = threading.Event()
    data = memoryview(os.urandom(WRITE))
    blocks = working_set // WRITE

    def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
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
    stop.wait(seconds)  # the measurement window
    stop.set()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2, help="alternating off/on rounds; best kept")
    ap.add_argument("--interval", type=float, default=5.0, help="clear pass interval (s)")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--extents", default="65536,4194304",
                    help="write-intent extent sizes in bytes, comma-separated")
    args = ap.parse_args()
    sets = {"64 MiB (hot)": 64 << 20, "256 MiB (cold)": 256 << 20, "16 GiB (cold)": SIZE}
    print(f"mirrored 4 KiB random writes, {args.seconds:g} s per run, best of {args.rounds}, "
          f"clear pass every {args.interval:g} s; the hot set is touched once before measuring")
    print(f"  {'extent':>7} {'working set':<15} {'threads':>7} {'off w/s':>9} {'on w/s':>9} "
          f"{'cost':>7} {'bitmap syncs/s':>14}")
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for extent in (int(x) for x in args.extents.split(",")):
            for label, ws in sets.items():
                for threads in (1, 4):
                    best = {False: 0.0, True: 0.0}
                    syncs = 0.0
                    for rnd in range(args.rounds):
                        for wi in (False, True):
                            m = make(d, f"w{int(wi)}e{extent}", wi, args.interval, extent)
                            try:
                                bm = m.bitmap
                                assert bm is not None
                                if ws <= 64 << 20:
                                    warm(m, ws)
                                s0 = bm.syncs
                                rate = run(m, args.seconds, threads, ws, rnd)
                                if wi:
                                    syncs = (bm.syncs - s0) / args.seconds
                                best[wi] = max(best[wi], rate)
                            finally:
                                m.close()
                            for f in os.listdir(d):
                                p = os.path.join(d, f)
                                if os.path.isfile(p):
                                    os.unlink(p)
                    cost = 100.0 * (1 - best[True] / best[False]) if best[False] else 0.0
                    print(f"  {extent >> 10:>6}K {label:<15} {threads:>7} {best[False]:>9.0f} "
                          f"{best[True]:>9.0f} {cost:>6.1f}% {syncs:>14.0f}", flush=True)


if __name__ == "__main__":
    main()
