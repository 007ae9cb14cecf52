"""Lab benchmark: write latency around a split, one LUN and a 4-LUN consistency group.

Runs *inside* the lab guest.  fio does 4 KiB random writes (libaio, O_DIRECT, iodepth 16) on
``user:mirror`` LUNs over iSCSI with a per-I/O latency log stamped in Unix-epoch milliseconds;
half-way through, ``targetmirror split`` runs.  Every sample is put in a window by its
completion time:

* ``before``: before the split command was started (minus the ``control`` window);
* ``control``: during a ``targetmirror status`` call made earlier (same CLI start-up cost on the
  guest's two vCPUs, no split): separates "a python3 process started" from "the split";
* ``during``: from starting ``targetmirror split`` until it returned (it waits for completion);
* ``after``: after it returned.

Prints p50/p99/max latency and IOPS per window, and the split's own timings: CLI start to the
instant, to "split complete", the drain (instant -> A fdatasync'ed and frozen) and how many
pre-split writes were still in flight at the instant.  Then the same with four LUNs (one fio job
each) split as one consistency group.

From the host (boots the guest):

    python3 -m lab run --env TARGETMIRROR_IN_GUEST=1 --out lab-out/splitlat -- \\
        python3 benchmarks/lab_split_latency.py --out /out/split.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lab import guest
from tests.lab.mirrord import Mirrord, cli

MiB = 1 << 20
SIZE = 64 * MiB  # A and B live on guest tmpfs: keep 5 LUNs x 2 images well inside guest RAM


def make_lun(daemon: Mirrord, work: Path, name: str) -> tuple[str, str]:
    """Create, export and log in to a mirror; return (iqn, /dev/sdX)."""
    iqn = f"{guest.IQN_PREFIX}:{name.replace('_', '-')}"
    cli("create", name, "--size", str(SIZE), "--image-a", str(work / f"{name}-a.img"),
        "--image-b", str(work / f"{name}-b.img"), "--create-images", "--iqn", iqn,
        "--initiator", guest.initiator_name())
    daemon.wait_serving(name)
    guest.iscsi_login(iqn)
    return iqn, guest.find_scsi_disk(iqn)


def drop_lun(work: Path, name: str, iqn: str) -> None:
    guest.iscsi_logout(iqn)
    cli("delete", name, "--iqn", iqn)
    for leg in "ab":
        (work / f"{name}-{leg}.img").unlink(missing_ok=True)


def start_fio(devs: list[str], prefix: Path, seconds: int, iodepth: int) -> subprocess.Popen[str]:
    cmd = ["fio", "--output-format=json", f"--output={prefix}.json", "--direct=1",
           "--ioengine=libaio", "--rw=randwrite", "--bs=4k", f"--iodepth={iodepth}",
           f"--size={SIZE}", "--randrepeat=0", "--time_based", f"--runtime={seconds}",
           f"--write_lat_log={prefix}", "--log_unix_epoch=1"]
    for i, dev in enumerate(devs):
        cmd += [f"--name=lun{i}", f"--filename={dev}"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def read_samples(prefix: Path) -> list[tuple[float, float]]:
    """(completion time in epoch seconds, latency in seconds) of every write of every job.

    fio's log value unit is checked against the JSON report's mean total latency (ns)."""
    report = json.loads(Path(f"{prefix}.json").read_text())
    raw: list[tuple[float, float]] = []
    for log in sorted(prefix.parent.glob(f"{prefix.name}_lat.*.log")):
        for line in log.read_text().splitlines():
            cols = line.split(",")
            if len(cols) >= 3 and cols[2].strip() == "1":  # ddir 1 = write
                raw.append((int(cols[0]) / 1000.0, float(cols[1])))
    if not raw:
        raise SystemExit(f"no latency samples in {prefix}_lat.*.log")
    json_mean_ns = statistics.fmean(j["write"]["lat_ns"]["mean"] for j in report["jobs"])
    log_mean = statistics.fmean(v for _, v in raw)
    ratio = json_mean_ns / log_mean
    unit = min((1e-9, 1e-6, 1e-3), key=lambda u: abs(ratio * 1e-9 / u - 1))
    return [(t, v * unit) for t, v in raw]


def window_stats(samples: list[tuple[float, float]], start: float, end: float,
                 exclude: tuple[float, float] = (0.0, 0.0)) -> dict[str, float]:
    lat = sorted(v for t, v in samples if start <= t < end and not exclude[0] <= t < exclude[1])
    if not lat:
        return {"n": 0}

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000

    span = end - start - max(0.0, min(end, exclude[1]) - max(start, exclude[0]))
    return {"n": len(lat), "iops": len(lat) / max(span, 1e-9), "p50_ms": pct(50),
            "p99_ms": pct(99), "max_ms": lat[-1] * 1000}


def timed_ctl(daemon: Mirrord, *args: str) -> tuple[float, float, dict[str, Any]]:
    t0 = time.time()
    res = daemon.ctl_json(*args)
    return t0, time.time(), res


def socket_split(daemon: Mirrord, names: list[str], group: str | None
                 ) -> tuple[float, float, dict[str, Any]]:
    """Split through the control socket from this process (no CLI start-up): ``wait=False``
    returns at the instant with ``locks_held_seconds``; then poll status until complete."""
    from targetmirror.protocol import call

    t0 = time.time()
    res = call(daemon.socket, "split", names=[] if group else names, group=group, wait=False)
    while True:
        st = call(daemon.socket, "status", names=names)["mirrors"]
        if all(m["state"] == "split" for m in st):
            break
        time.sleep(0.005)
    t1 = time.time()
    held = {m["name"]: m.get("locks_held_seconds") for m in res["split"]}
    return t0, t1, {"split": st, "locks_held_seconds": held}


def run_case(daemon: Mirrord, work: Path, label: str, names: list[str], devs: list[str],
             group: str | None, seconds: int, iodepth: int, via: str) -> dict[str, Any]:
    prefix = work / f"lat-{label}"
    fio = start_fio(devs, prefix, seconds, iodepth)
    t_start = time.time()
    time.sleep(seconds * 0.25)
    c0, c1, _ = timed_ctl(daemon, "status")
    time.sleep(max(0.0, t_start + seconds * 0.5 - time.time()))
    if via == "cli":
        s0, s1, res = timed_ctl(daemon, "split", *(["--group", group] if group else names))
    else:
        s0, s1, res = socket_split(daemon, names, group)
    _, err = fio.communicate(timeout=seconds + 300)
    if fio.returncode != 0:
        raise SystemExit(f"fio failed ({fio.returncode}): {err}")
    samples = read_samples(prefix)
    first = min(t for t, _ in samples)
    last = max(t for t, _ in samples)
    windows = {
        "before": window_stats(samples, first, s0, exclude=(c0, c1)),
        "control": window_stats(samples, c0, c1),
        "during": window_stats(samples, s0, s1),
        "after": window_stats(samples, s1, last + 1e-3),
    }
    mirrors = res["split"]
    splits = {}
    for m in mirrors:
        sp = m["split"]
        splits[m["name"]] = {
            "state": m["state"], "a_status": sp["a_status"],
            "cli_to_instant_s": sp["instant_wall"] - s0,
            "cli_to_complete_s": sp["completed_wall"] - s0,
            "drain_s": sp["drain_seconds"], "pre_split_drained": sp["pre_split_drained"],
        }
    instants = [m["split"]["instant_wall"] for m in mirrors]
    out = {"via": via, "luns": names, "iodepth_per_lun": iodepth, "seconds": seconds,
           "samples": len(samples), "windows": windows, "split": splits,
           "split_cli_s": s1 - s0, "control_cli_s": c1 - c0,
           "instant_spread_s": max(instants) - min(instants),
           "locks_held_s": max((res.get("locks_held_seconds") or {"-": None}).values(),
                               key=lambda v: v or 0)}
    print_case(label, out)
    return out


def print_case(label: str, r: dict[str, Any]) -> None:
    print(f"\n== {label} (split via {r['via']}): {len(r['luns'])} LUN(s), 4k randwrite "
          f"iodepth {r['iodepth_per_lun']} per LUN, {r['seconds']} s, {r['samples']} writes")
    print(f"{'window':8} {'writes':>7} {'IOPS':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, w in r["windows"].items():
        if not w["n"]:
            print(f"{name:8} {0:7}")
            continue
        print(f"{name:8} {w['n']:7} {w['iops']:7.0f} {w['p50_ms']:8.2f} {w['p99_ms']:8.2f} "
              f"{w['max_ms']:8.2f}")
    held = r["locks_held_s"]
    print(f"split command {r['split_cli_s']:.3f} s (a status command: {r['control_cli_s']:.3f} s)"
          f"; instants spread {r['instant_spread_s'] * 1000:.3f} ms; ring locks held "
          + ("? (not returned when the CLI waits)" if held is None else f"{held * 1000:.3f} ms"))
    for name, s in r["split"].items():
        print(f"  {name}: {s['state']}, A {s['a_status']}: CLI start -> instant "
              f"{s['cli_to_instant_s']:.3f} s, -> complete {s['cli_to_complete_s']:.3f} s, "
              f"drain {s['drain_s'] * 1000:.1f} ms, {s['pre_split_drained']} pre-split "
              "write(s) in flight at the instant")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=30, help="fio run time per case")
    ap.add_argument("--iodepth", type=int, default=16)
    ap.add_argument("--group-luns", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2, help="targetmirrord --workers")
    ap.add_argument("--via", choices=["cli", "socket", "both"], default="both",
                    help="split with the targetmirror CLI (what an admin runs), through the "
                         "control socket from this process (no python3 start-up), or both")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    guest.setup_kernel()
    guest.iscsi_logout_all()
    guest.clear_lio()
    work = Path(tempfile.mkdtemp(prefix="splitlat-"))
    daemon = Mirrord(work / "mirrord.log", workers=args.workers)
    daemon.start()
    results: dict[str, Any] = {"date": time.strftime("%F %T"), "workers": args.workers}
    try:
        for via in (["cli", "socket"] if args.via == "both" else [args.via]):
            name = f"sl_one_{via}"
            iqn, dev = make_lun(daemon, work, name)
            results[f"single-{via}"] = run_case(daemon, work, f"single-{via}", [name], [dev],
                                                None, args.seconds, args.iodepth, via)
            drop_lun(work, name, iqn)
            names = [f"sl_g{i}_{via}" for i in range(args.group_luns)]
            luns = [make_lun(daemon, work, n) for n in names]
            daemon.ctl("group", "create", f"slgrp_{via}", *names)
            results[f"group-{via}"] = run_case(daemon, work, f"group-{via}", names,
                                               [d for _, d in luns], f"slgrp_{via}",
                                               args.seconds, args.iodepth, via)
            for n, (iqn, _) in zip(names, luns, strict=True):
                drop_lun(work, n, iqn)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    finally:
        guest.iscsi_logout_all()
        guest.clear_lio()
        status = daemon.stop()
        print(f"targetmirrord exit status {status}")
        print("\n".join(ln for ln in daemon.log_text().splitlines() if "split" in ln)[-3000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
