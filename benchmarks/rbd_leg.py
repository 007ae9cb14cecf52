"""Host benchmark: an RBD leg next to a local leg, measured in the same run.

Starts a disposable one-node Ceph cluster on 127.0.0.1 (tests/cephcluster.py; memstore OSD by
default, ``--objectstore bluestore`` for a sparse-file bluestore), then measures, through the
store interface the mirror uses (``readv``/``writev``/``flush``):

* 4 KiB random writes and reads, one call at a time, from 1 and from 4 threads (the mirror's
  leg pool runs up to 4 calls at once);
* 1 MiB sequential writes and reads (each RBD call is one request; ``--piece`` smaller than
  1 MiB shows several requests in flight per call);
* a :class:`Mirror` with A on RBD and B a file vs both legs files: 4 KiB and 1 MiB writes.

The local leg is a file in ``--dir`` (default: a temporary directory, i.e. usually tmpfs or the
page cache: a ceiling, not a disk).  Every figure is printed; nothing is asserted.

    .venv/bin/python benchmarks/rbd_leg.py [--seconds 3] [--dir /var/tmp] [--objectstore memstore]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from targetmirror.mirror.mirror import Mirror
from targetmirror.store import rbd as rbd_store
from targetmirror.store.image import Image
from targetmirror.store.rbd import CephAccess, RbdImage
from tests.cephcluster import CephCluster, missing

SIZE = 256 << 20
KiB4 = 4096
MiB = 1 << 20


def rate(fn: Callable[[random.Random], None], seconds: float, threads: int = 1) -> float:
    """Calls per second of ``fn`` run back to back in ``threads`` threads for ``seconds``."""
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        rng = random.Random(i)
        n = 0
        while time.perf_counter() < stop:
            fn(rng)
            n += 1
        counts[i] = n
    start = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def leg_figures(img: Image, seconds: float) -> dict[str, float]:
    small = memoryview(os.urandom(KiB4))
    big = memoryview(os.urandom(MiB))
    out: dict[str, float] = {}
    blocks = SIZE // KiB4
    img.writev(0, [memoryview(bytes(SIZE // 4))])  # allocate the region reads come from

    def w4(rng: random.Random) -> None:
        img.writev(rng.randrange(blocks) * KiB4, [small])

    def r4(rng: random.Random) -> None:
        img.readv(rng.randrange(blocks // 4) * KiB4, [memoryview(bytearray(KiB4))])

    pos = [0]

    def w1m(rng: random.Random) -> None:
        p = pos[0] = (pos[0] + MiB) % SIZE
        img.writev(p, [big])

    def r1m(rng: random.Random) -> None:
        p = pos[0] = (pos[0] + MiB) % (SIZE // 4)
        img.readv(p, [memoryview(bytearray(MiB))])

    out["4k write IOPS, 1 thread"] = rate(w4, seconds)
    out["4k write IOPS, 4 threads"] = rate(w4, seconds, 4)
    out["4k read IOPS, 1 thread"] = rate(r4, seconds)
    out["4k read IOPS, 4 threads"] = rate(r4, seconds, 4)
    out["1M write MB/s"] = rate(w1m, seconds) * MiB / 1e6
    out["1M read MB/s"] = rate(r1m, seconds) * MiB / 1e6
    t = time.perf_counter()
    for _ in range(20):
        img.writev(0, [small])
        img.flush()
    out["4k write+flush ms"] = (time.perf_counter() - t) / 20 * 1000
    return out


def mirror_figures(a: Image, b: Image, seconds: float) -> dict[str, float]:
    m = Mirror("bench", a, b, size=SIZE, block_size=512, region_size=64 * 1024)
    small = memoryview(os.urandom(KiB4))
    big = memoryview(os.urandom(MiB))
    blocks = SIZE // KiB4
    try:
        return {
            "mirror 4k write IOPS": rate(lambda rng: m.write(rng.randrange(blocks) * KiB4,
                                                             [small], False), seconds),
            "mirror 1M write MB/s": rate(lambda rng: m.write(rng.randrange(SIZE // MiB) * MiB,
                                                             [big], False), seconds) * MiB / 1e6,
        }
    finally:
        m.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--dir", default=None, help="where the local leg's files go")
    ap.add_argument("--objectstore", choices=("memstore", "bluestore"), default="memstore")
    ap.add_argument("--piece", type=int, default=rbd_store.PIECE,
                    help="largest librbd request per call (bytes)")
    args = ap.parse_args()
    why = missing()
    if why:
        sys.exit(f"rbd_leg.py: {why}")
    rbd_store.PIECE = args.piece
    with tempfile.TemporaryDirectory(prefix="tm-rbd-bench-") as tmp:
        local_dir = args.dir or tmp
        cluster = CephCluster(Path(tmp) / "ceph", objectstore=args.objectstore)
        t = time.perf_counter()
        cluster.start()
        print(f"cluster up in {time.perf_counter() - t:.2f} s ({args.objectstore}, "
              f"piece {args.piece} B)")
        try:
            acc = CephAccess(conf=str(cluster.conf))
            for n in ("a", "b2"):
                cluster.create_image(n, SIZE)
            files = []
            for n in ("local-a", "local-b", "local-b2"):
                p = os.path.join(local_dir, f"tm-rbd-bench-{os.getpid()}-{n}.img")
                with open(p, "wb") as f:
                    f.truncate(SIZE)
                files.append(p)
            rows: dict[str, dict[str, float]] = {}
            img = RbdImage("rbd/rbd/a", acc)
            rows["rbd"] = leg_figures(img, args.seconds)
            img.close()
            loc = Image(files[0])
            rows["local"] = leg_figures(loc, args.seconds)
            loc.close()
            rows["rbd"].update(mirror_figures(RbdImage("rbd/rbd/a", acc), Image(files[1]),
                                              args.seconds))
            rows["local"].update(mirror_figures(Image(files[0]), Image(files[2]),
                                                args.seconds))
            print(f"{'':28} {'RBD leg':>12} {'local leg':>12}")
            for key in rows["rbd"]:
                print(f"{key:28} {rows['rbd'][key]:12.1f} {rows['local'][key]:12.1f}")
            print("(mirror rows: A on RBD + B local file, vs A and B local files)")
            for p in files:
                os.unlink(p)
        finally:
            cluster.wipe()


if __name__ == "__main__":
    main()
