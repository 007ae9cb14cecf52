"""Host benchmark: the whole data path (ring -> admission -> SCSI -> mirror -> two files) driven
by the in-process kernel double, at queue depth 16.

Prints mirrored commands/s and the handler's CPU per command for 4 KiB random writes and reads,
with commands run inline on the ring thread (--workers 0) and on a worker pool, next to the raw
two-file ``os.pwritev`` ceiling printed by ``benchmarks/host_mirror.py``.

    python3 benchmarks/host_ring.py [--seconds 3] [--workers 0,2,4]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from targetmirror.daemon.device import MirrorCommands
from targetmirror.daemon.runner import DeviceRunner
from targetmirror.mirror.mirror import Mirror
from targetmirror.scsi.identity import DeviceIdentity
from targetmirror.store.image import Image
from targetmirror.tcmu.ring import Ring
from tests.daemon.test_runner import FakeUio
from tests.tcmu.producer import Producer

SIZE = 256 << 20
QD = 16


def run(workers: int, op: str, seconds: float, d: str) -> tuple[float, float]:
    paths = [os.path.join(d, n) for n in ("a.img", "b.img")]
    for p in paths:
        with open(p, "wb") as f:
            f.truncate(SIZE)
    mirror = Mirror("bench", Image(paths[0]), Image(paths[1]), size=SIZE)
    cmds = MirrorCommands(mirror, lambda: DeviceIdentity(serial="bench", max_transfer_blocks=2048))
    producer = Producer(cmdr_size=(1 << 20) - 128, data_size=QD * 4096 * 2)
    uio = FakeUio(producer)  # the same kernel-side double the runner tests use
    runner = DeviceRunner("bench", uio, Ring(producer.buf), cmds.admit, workers=workers)
    runner.start()
    rng = random.Random(1)
    payload = os.urandom(4096)
    blocks = SIZE // 4096
    n = 0
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        with uio.lock:
            ids = []
            for _ in range(QD):
                lba = rng.randrange(blocks) * 8
                if op == "write":
                    cdb = struct.pack(">BBIBHB", 0x2A, 0, lba, 0, 8, 0)
                    ids.append(producer.queue(cdb, payload))
                else:
                    cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, 8, 0)
                    ids.append(producer.queue(cdb, data_in_len=4096))
        os.eventfd_write(uio.efd, 1)
        uio.wait_for(ids)
        n += QD
    elapsed = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    runner.stop()
    runner.join(10)
    mirror.close()
    producer.buf.close()
    return n / elapsed, cpu / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--workers", default="0,2,4")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for op in ("write", "read"):
            for w in (int(x) for x in args.workers.split(",")):
                rate, cpu = run(w, op, args.seconds, d)
                print(f"4k rand{op:5} QD{QD} workers={w}: {rate:9.0f} cmds/s "
                      f"{rate * 4096 / 1e6:7.1f} MB/s  CPU {cpu:6.1f} us/cmd (incl. producer)")


if __name__ == "__main__":
    main()
