"""Host benchmark: mirrored 4 KiB writes per second on one core against a C ceiling.

The issue-17 target: on one core, targetmirror's handler (bitmap and write-intent on, the
express lane) mirrors at least 50% as many 4 KiB random writes per second as fio writes the
same pattern to two files with its io_uring engine (each mirrored write = one write to each
file), measured in the same minute on the same core.  Both runs are pinned to one CPU with
``sched_setaffinity``; the handler's number is ``benchmarks/host_handler.py``'s (a ring
prefilled with a batch of commands, drained by the ring thread, the kernel double's reaping
not counted), alternated with fio twice so drift hits both.

    python3 benchmarks/host_ceiling.py [--cpu 1] [--seconds 5] [--batch 128]

Needs fio (Debian ``fio``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_spec = importlib.util.spec_from_file_location("host_handler", ROOT / "benchmarks" /
                                               "host_handler.py")
assert _spec is not None and _spec.loader is not None
hh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hh)


def fio_two_files(d: str, cpu: int, seconds: int, engine: str, qd: int
                  ) -> tuple[float, float]:
    """Mirrored writes/s equivalent (fio's writes to two files per second, halved) and fio's
    CPU microseconds per mirrored write (usr + sys of its threads)."""
    args = ["fio", "--output-format=json", f"--ioengine={engine}", "--rw=randwrite",
            "--bs=4k", f"--iodepth={qd}", "--size=1G", "--time_based",
            f"--runtime={seconds}", f"--cpus_allowed={cpu}", "--thread"]
    if engine == "io_uring":
        args += [f"--iodepth_batch_submit={qd}", "--iodepth_batch_complete_min=1"]
    for i in (0, 1):
        args += [f"--name=leg{i}", f"--filename={os.path.join(d, f'fio{i}.img')}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    jobs = json.loads(out)["jobs"]
    cpu_s = sum((j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1000 for j in jobs)
    ios = sum(j["write"]["total_ios"] for j in jobs) or 1
    return sum(j["write"]["iops"] for j in jobs) / 2, cpu_s / (ios / 2) * 1e6


def handler(d: str, cpu: int, batch: int, rounds: int) -> tuple[float, float]:
    os.sched_setaffinity(0, {cpu})
    try:
        store = hh.StateStore(os.path.join(d, "state"))
        mirror = hh.make_mirror("files", d, store)
        try:
            wall, _cpu, _notifies, ring_cpu, served = hh.drain_rounds(
                mirror, 0, "write", batch, rounds, express_on=hh.express.available())
        finally:
            mirror.close()
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    total = batch * rounds
    if hh.express.available() and served < total * 0.9:
        print(f"note: the lane served only {served} of {total} commands", flush=True)
    return total / wall, ring_cpu / total * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", type=int, default=1)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    if shutil.which("fio") is None:
        print("fio is not installed (apt-get install fio)", file=sys.stderr)
        return 1
    print(f"express lane: {'on' if hh.express.available() else hh.express.WHY_NOT}; "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for _ in range(2):
            ur, ur_us = fio_two_files(d, args.cpu, args.seconds, "io_uring", 32)
            ps, ps_us = fio_two_files(d, args.cpu, args.seconds, "psync", 1)
            rate, ring_us = handler(d, args.cpu, args.batch, args.rounds)
            rows.append((ur, ps, rate, ring_us, ur_us))
            print(f"fio io_uring two files {ur:9.0f}/s ({ur_us:.1f} us CPU each)  fio psync "
                  f"two files {ps:9.0f}/s ({ps_us:.1f} us)  handler {rate:9.0f} mirrored "
                  f"writes/s ({ring_us:.1f} us ring-thread CPU each): {rate / ur:.0%} of the "
                  f"io_uring ceiling by wall rate, {ur_us / ring_us:.0%} by CPU", flush=True)
    ur = sum(r[0] for r in rows) / len(rows)
    rate = sum(r[2] for r in rows) / len(rows)
    ur_us = sum(r[4] for r in rows) / len(rows)
    ring_us = sum(r[3] for r in rows) / len(rows)
    print(f"mean: handler {rate:.0f}/s = {rate / ur:.0%} of fio io_uring ({ur:.0f}/s) by wall "
          f"rate; by CPU per mirrored write {ring_us:.1f} us against fio's {ur_us:.1f} us = "
          f"{ur_us / ring_us:.0%}; target 50%; load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
