"""Lab benchmark: what a background copy costs the foreground, by rate limit.

Runs *inside* the lab guest.  For each case a fresh mirror (A filled with data, exported over
iSCSI), then fio 4 KiB random writes at iodepth 16 for ``--seconds`` while an initial sync
(A -> B, the same copier and throttle that rejoin and repair use) runs at the case's rate limit;
the "none" case runs no copy.  Prints IOPS and p50/p99 completion latency per case and how many
bytes the copy moved during the window, and writes JSON to --out.

From the host (boots the guest):

    python3 -m lab run --env TARGETMIRROR_IN_GUEST=1 --out lab-out/synclat -- \\
        python3 benchmarks/lab_sync_latency.py --out /out/sync.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lab import guest
from tests.lab.mirrord import Mirrord, cli

MiB = 1 << 20
SIZE = 256 * MiB  # two images on guest tmpfs (half the guest's RAM)


def fio_randwrite(dev: str, seconds: int) -> dict[str, float]:
    proc = guest.run(["fio", "--output-format=json", "--name=fg", f"--filename={dev}",
                      "--direct=1", "--ioengine=libaio", "--rw=randwrite", "--bs=4k",
                      "--iodepth=16", "--time_based", f"--runtime={seconds}",
                      f"--size={SIZE}"], timeout=seconds + 120)
    w = json.loads(proc.stdout)["jobs"][0]["write"]
    pct = w["clat_ns"].get("percentile", {})
    return {"iops": w["iops"], "p50_ms": pct.get("50.000000", 0) / 1e6,
            "p99_ms": pct.get("99.000000", 0) / 1e6}


def copied(daemon: Mirrord, name: str) -> int:
    st = daemon.ctl_json("status", name)["mirrors"][0]
    running = st.get("resync") or {}
    if running.get("bytes_copied"):
        return int(running["bytes_copied"])
    return int((st.get("last_sync") or {}).get("bytes_copied", 0))  # it finished in time


def one_case(daemon: Mirrord, work: Path, rate: float | None, seconds: int) -> dict[str, Any]:
    name = "sl"
    iqn = f"{guest.IQN_PREFIX}:synclat"
    a, b = work / "sl-a.img", work / "sl-b.img"
    cli("create", name, "--size", str(SIZE), "--image-a", str(a), "--image-b", str(b),
        "--create-images", "--iqn", iqn, "--initiator", guest.initiator_name())
    daemon.wait_serving(name)
    guest.iscsi_login(iqn)
    dev = guest.find_scsi_disk(iqn)
    try:
        guest.run(["fio", "--name=fill", f"--filename={dev}", "--direct=1", "--rw=write",
                   "--bs=1M", "--iodepth=4", "--ioengine=libaio", f"--size={SIZE}"],
                  timeout=900)
        if rate is not None:
            daemon.ctl("sync", name, "--no-wait", *(["--rate", str(rate)] if rate > 0 else []))
        t0 = time.monotonic()
        res: dict[str, Any] = fio_randwrite(dev, seconds)
        elapsed = time.monotonic() - t0
        res["copy_mb_s"] = copied(daemon, name) / 1e6 / elapsed if rate is not None else 0.0
        res["rate_limit"] = rate
        return res
    finally:
        guest.iscsi_logout(iqn)
        cli("delete", name, "--iqn", iqn)
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rates", default="none,4,16,0",
                    help="comma list: none (no copy), MB/s limits, 0 for unlimited")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    guest.setup_kernel()
    guest.iscsi_logout_all()
    guest.clear_lio()
    work = Path(tempfile.mkdtemp(prefix="synclat-"))
    daemon = Mirrord(work / "mirrord.log")
    daemon.start()
    results = []
    try:
        for r in args.rates.split(","):
            rate = None if r == "none" else float(r)
            res = one_case(daemon, work, rate, args.seconds)
            label = "no copy" if rate is None else ("unlimited" if rate == 0 else f"{rate:g} MB/s")
            res["case"] = label
            results.append(res)
            print(f"{label:10} fg 4k randwrite QD16: {res['iops']:7.0f} IOPS  p50 "
                  f"{res['p50_ms']:7.1f} ms  p99 {res['p99_ms']:7.1f} ms  copy "
                  f"{res['copy_mb_s']:6.1f} MB/s", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"date": time.strftime("%F %T"),
                                                  "seconds": args.seconds,
                                                  "results": results}, indent=1))
    finally:
        guest.iscsi_logout_all()
        guest.clear_lio()
        print(f"targetmirrord exit status {daemon.stop()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
