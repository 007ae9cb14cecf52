"""Lab micro-benchmark: what a clock read and a 4 KiB page-cache write cost in the guest, and
whether io_uring is a cheaper way to write two legs than one ``pwritev`` per leg.

Why: under TCG a syscall costs tens of microseconds and the guest's clocksource is the HPET
(the TSC is marked unstable), so ``clock_gettime`` is a syscall too, not a vDSO read.  The
express lane's choices (how many clock reads per command, io_uring or ``pwritev``) are taken
from these numbers, measured in the same boot as docs/performance.md says.

    python3 -m lab run --out lab-out/iocost --env TARGETMIRROR_IN_GUEST=1 -- \\
        python3 benchmarks/lab_iocost.py --out /out/iocost.json

Prints CPU microseconds per operation (fio: usr+sys of the fio process per I/O).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def clock_cost(n: int = 20000) -> dict[str, float]:
    out = {}
    for name, fn in (("monotonic_ns", time.monotonic_ns), ("perf_counter_ns",
                                                            time.perf_counter_ns)):
        c0 = time.process_time()
        for _ in range(n):
            fn()
        out[f"{name}_us"] = (time.process_time() - c0) / n * 1e6
    c0 = time.process_time()
    for _ in range(n):
        pass
    out["empty_loop_us"] = (time.process_time() - c0) / n * 1e6
    out["clocksource"] = Path(
        "/sys/devices/system/clocksource/clocksource0/current_clocksource").read_text().strip()
    return out


def fio_cost(path: str, engine: str, qd: int, seconds: int, extra: list[str]) -> dict[str, float]:
    proc = subprocess.run(["fio", "--output-format=json", "--name=c", f"--filename={path}",
                           f"--ioengine={engine}", "--rw=randwrite", "--bs=4k",
                           f"--iodepth={qd}", "--size=64M", "--time_based",
                           f"--runtime={seconds}", *extra],
                          capture_output=True, text=True, timeout=seconds + 120, check=True)
    j = json.loads(proc.stdout)["jobs"][0]
    ios = j["write"]["total_ios"] or 1
    cpu_s = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1000
    return {"iops": j["write"]["iops"], "cpu_us_per_io": cpu_s / ios * 1e6,
            "ctx_per_io": j["ctx"] / ios}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res: dict[str, object] = {"clock": clock_cost()}
    print(res["clock"], flush=True)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.img")
        with open(path, "wb") as f:
            f.truncate(64 << 20)
        subprocess.run(["fio", "--name=fill", f"--filename={path}", "--rw=write", "--bs=1M",
                        "--size=64M"], capture_output=True, check=True)
        cases = {
            "psync qd1 (one pwrite per I/O)": ("psync", 1, []),
            "io_uring qd1": ("io_uring", 1, []),
            "io_uring qd16, batches of 16": ("io_uring", 16, ["--iodepth_batch_submit=16",
                                                              "--iodepth_batch_complete_min=16"]),
            "libaio qd16, batches of 16 (buffered: runs inline)": (
                "libaio", 16, ["--iodepth_batch_submit=16", "--iodepth_batch_complete_min=16"]),
        }
        for name, (engine, qd, extra) in cases.items():
            r = fio_cost(path, engine, qd, args.seconds, extra)
            res[name] = r
            print(f"{name:52} {r['iops']:9.0f} IOPS {r['cpu_us_per_io']:7.1f} us CPU/IO "
                  f"{r['ctx_per_io']:5.2f} ctx/IO", flush=True)
    res["date"] = time.strftime("%F %T")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
