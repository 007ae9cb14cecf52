"""Host benchmark: mirrored writes through :class:`Mirror` vs a raw two-file pwritev loop.

Prints writes/s and MB/s for 4 KiB and 1 MiB writes, with the legs written one after the other
and in parallel, next to the ceiling of a bare ``os.pwritev`` loop to the same two files and,
when fio is installed, fio's ``psync`` engine writing each file in turn (C with no Python at
all: the ceiling of any handler on this machine).  Files live in a temporary directory (page
cache; use --dir for a real disk).

    python3 benchmarks/host_mirror.py [--seconds 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import tempfile
import time

from targetmirror.mirror.mirror import Mirror
from targetmirror.store.image import Image

SIZE = 256 << 20


def bench(fn, seconds: float) -> tuple[int, float]:
    os.sync()  # start every run with no dirty page cache left by the previous one
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(64):
            fn()
        n += 64
        now = time.perf_counter()
        if now >= deadline:
            return n, now - start


def fio_psync(paths: list[str], bs: int, seconds: float) -> float | None:
    """Writes/s of fio's psync engine, one job per file run one after the other, as the
    mirrored rate it implies (a mirrored write is one write to each file)."""
    if shutil.which("fio") is None:
        return None
    secs = []
    for p in paths:
        os.sync()
        out = subprocess.run(
            ["fio", "--output-format=json", "--name=psync", f"--filename={p}",
             "--ioengine=psync", "--rw=randwrite", f"--bs={bs}", f"--size={SIZE}",
             "--time_based", f"--runtime={max(1, int(seconds))}"],
            check=True, capture_output=True, text=True).stdout
        iops = json.loads(out)["jobs"][0]["write"]["iops"]
        secs.append(1.0 / iops)
    return 1.0 / sum(secs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        paths = [os.path.join(d, n) for n in ("a.img", "b.img")]
        for p in paths:
            with open(p, "wb") as f:
                f.truncate(SIZE)
        rng = random.Random(1)
        for bs in (4096, 1 << 20):
            buf = memoryview(bytearray(os.urandom(bs)))
            rate = fio_psync(paths, bs, args.seconds)
            if rate is not None:
                print(f"fio psync, each file   bs={bs:>7}: {rate:>10.0f} writes/s "
                      f"{rate * bs / 1e6:8.1f} MB/s")
            else:
                print("fio psync: fio is not installed (apt-get install fio)")
            blocks = SIZE // bs
            fds = [os.open(p, os.O_RDWR) for p in paths]

            def raw() -> None:
                off = rng.randrange(blocks) * bs
                os.pwritev(fds[0], [buf], off)
                os.pwritev(fds[1], [buf], off)

            n, t = bench(raw, args.seconds)
            print(f"raw two-file pwritev   bs={bs:>7}: {n / t:>10.0f} writes/s "
                  f"{n * bs / t / 1e6:8.1f} MB/s")
            for fd in fds:
                os.close(fd)
            for label, threshold in (("serial legs", 1 << 62), ("parallel legs", 0)):
                m = Mirror("bench", Image(paths[0]), Image(paths[1]), size=SIZE,
                           parallel_threshold=threshold)

                def mirrored(m: Mirror = m) -> None:
                    m.write(rng.randrange(blocks) * bs, [buf], False)

                n, t = bench(mirrored, args.seconds)
                print(f"Mirror.write {label:13} bs={bs:>7}: {n / t:>10.0f} writes/s "
                      f"{n * bs / t / 1e6:8.1f} MB/s")
                m.close()


if __name__ == "__main__":
    main()
