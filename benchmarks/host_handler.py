"""Host benchmark: the handler's own cost per command, without the kernel double's.

``host_ring.py`` measures a closed loop in which the in-process producer (Python, standing in
for the kernel) shares the CPU with the handler.  Here the producer fills the ring with a batch
of commands (a queue depth's worth) *before* the clock starts, then the handler drains it: the
wall time and the process CPU of the drain are the handler's alone (the kernel double's reaping
on notify is replaced by a counter).  That is the number issue 8's "mirrored 4 KiB writes/s on
one core" target is about.

Backends: ``files`` (two sparse files in the page cache, as in the lab) and ``null`` (both legs
on /dev/zero: writes are discarded and reads return zeros, so only the Python path and the
syscalls remain).

    python3 benchmarks/host_handler.py [--batch 128] [--rounds 100] [--workers 0,2]
        [--profile]   # cProfile of one inline write round, top 25 by own time
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import os
import pstats
import random
import resource
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from targetmirror import express
from targetmirror.daemon.device import MirrorCommands
from targetmirror.daemon.runner import DeviceRunner
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import StateStore
from targetmirror.scsi.identity import DeviceIdentity
from targetmirror.store.image import Image
from targetmirror.tcmu.ring import Ring
from tests.tcmu.producer import Producer

SIZE = 1 << 30
BS = 4096


class CountingUio:
    """The UIO fd as the handler sees it; notify only counts and wakes the waiter."""

    def __init__(self, producer: Producer, expected: int) -> None:
        self.producer = producer
        self.efd = os.eventfd(0, os.EFD_NONBLOCK)
        self.notifies = 0
        self.expected = expected
        self.done = threading.Event()

    def fileno(self) -> int:
        return self.efd

    def wait(self, timeout: float | None = None) -> bool:
        try:
            os.eventfd_read(self.efd)
            return True
        except BlockingIOError:
            return False

    def ack(self) -> bool:
        return self.wait(0)

    def notify(self) -> None:
        self.notifies += 1
        # completed entries: cmd_tail caught up with cmd_head
        if self.producer.cmd_tail == self.producer.head:  # every command answered
            self.done.set()


class NullImage(Image):
    """An image whose data calls do nothing: what is left is the handler's Python and ring."""

    def readv(self, offset: int, iov: Sequence[memoryview]) -> None:
        pass

    def writev(self, offset: int, iov: Sequence[memoryview]) -> None:
        pass


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def drain_rounds(mirror: Mirror, workers: int, op: str, batch: int, rounds: int,
                 profile: cProfile.Profile | None = None, express_on: bool = False
                 ) -> tuple[float, float, int, float, int]:
    """Prefill ``batch`` commands, let the handler drain them; ``rounds`` times.

    Returns (wall s, process cpu s, notifies, ring-thread cpu s, commands the express lane
    served) summed over the drains only:
    queueing and reaping (the kernel double's work) happen while the handler is idle and are
    not counted.
    """
    producer = Producer(cmdr_size=batch * 256, data_size=batch * BS)
    rng = random.Random(rounds * 7919 + batch)
    payload = os.urandom(BS)
    blocks = mirror.size // BS
    per = BS // mirror.block_size  # 512-byte logical blocks, as LIO's default in the lab
    uio = CountingUio(producer, batch)
    cmds = MirrorCommands(mirror, lambda: DeviceIdentity(serial="bench",
                                                         max_transfer_blocks=2048))
    runner = DeviceRunner("bench", uio, Ring(producer.buf), cmds.admit, workers=workers,
                          before_dispatch=cmds.commit,
                          express=cmds.express if express_on and cmds.lane else None)
    ring_cpu = [0.0]
    target = runner.run

    def run() -> None:
        # CPU of the ring thread alone: steadier than wall time on a shared machine
        t0 = time.thread_time()
        if profile is not None:
            profile.enable()
        try:
            target()
        finally:
            if profile is not None:
                profile.disable()
            ring_cpu[0] = time.thread_time() - t0
    runner.run = run  # type: ignore[method-assign]
    runner.start()
    wall = cpu = 0.0
    for _ in range(rounds):
        for _ in range(batch):
            lba = rng.randrange(blocks) * per
            if op == "write":
                producer.queue(struct.pack(">BBIBHB", 0x2A, 0, lba, 0, per, 0), payload)
            else:
                producer.queue(struct.pack(">BBIBHB", 0x28, 0, lba, 0, per, 0),
                               data_in_len=BS)
        uio.done.clear()
        c0 = _cpu()
        t0 = time.perf_counter()
        os.eventfd_write(uio.efd, 1)
        if not uio.done.wait(60):
            raise SystemExit("handler did not complete the batch")
        wall += time.perf_counter() - t0
        cpu += _cpu() - c0
        producer.reap()
    runner.stop()
    runner.join(10)
    producer.buf.close()
    os.close(uio.efd)
    return wall, cpu, uio.notifies, ring_cpu[0], cmds.lane.served if cmds.lane else 0


def make_mirror(kind: str, d: str, store: StateStore | None = None) -> Mirror:
    paths = [os.path.join(d, n) for n in ("a.img", "b.img")]
    for p in paths:
        with open(p, "wb") as f:
            f.truncate(SIZE)
    cls = NullImage if kind == "null" else Image
    return Mirror("bench", cls(paths[0]), cls(paths[1]), size=SIZE, store=store)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128, help="commands per drain (queue depth)")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--backends", default="files,null")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--profile", action="store_true")
    why = "" if express.available() else f": {express.WHY_NOT}"
    ap.add_argument("--express", default="0,1" if express.available() else "0",
                    help="without (0) and with (1) the compiled express lane "
                    f"(default %(default)s{why})")
    ap.add_argument("--state", action="store_true",
                    help="give the mirror a state directory: bitmap and write-intent on, as in "
                    "the daemon")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        if args.profile:
            mirror = make_mirror(args.backends.split(",")[0], d,
                                 StateStore(os.path.join(d, "state")) if args.state else None)
            prof = cProfile.Profile()
            drain_rounds(mirror, 0, "write", args.batch, args.rounds, prof,
                         express_on=args.express.split(",")[-1] == "1")
            mirror.close()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            return
        for kind in args.backends.split(","):
            mirror = make_mirror(kind, d,
                                 StateStore(os.path.join(d, f"state-{kind}")) if args.state
                                 else None)
            try:
                for op, w, ex in itertools.product(
                        ("write", "read"), (int(x) for x in args.workers.split(",")),
                        (x == "1" for x in args.express.split(","))):
                    if ex and kind == "null":
                        continue  # the lane writes real fds; a null leg has none
                    wall, cpu, notifies, ring_cpu, served = drain_rounds(
                        mirror, w, op, args.batch, args.rounds, express_on=ex)
                    total = args.batch * args.rounds
                    rate = total / wall
                    row = {"backend": kind, "op": op, "workers": w, "express": ex,
                           "cmds_per_s": rate, "cpu_us_per_cmd": cpu / total * 1e6,
                           "ring_thread_cpu_us_per_cmd": ring_cpu / total * 1e6,
                           "cmds_per_notify": total / max(notifies, 1),
                           "express_share": served / total}
                    results.append(row)
                    print(f"{kind:5} 4k {op:5} workers={w} express={int(ex)}: {rate:9.0f} "
                          f"cmds/s  CPU {row['cpu_us_per_cmd']:6.1f} us/cmd "
                          f"(ring thread {row['ring_thread_cpu_us_per_cmd']:5.1f})  "
                          f"{row['cmds_per_notify']:6.1f} cmds/notify  "
                          f"lane {served / total:4.0%}", flush=True)
            finally:
                mirror.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
