"""Lab benchmark: fio over iSCSI against user:mirror, tcmu-runner user:file and kernel fileio.

Runs *inside* the lab guest (one boot), all three LUNs on guest tmpfs, same fio jobs, two rounds
in opposite order to even out drift; then, unless ``--no-python-pass``, targetmirrord is
restarted with ``--no-express`` and the jobs run again on the same LUN (``targetmirror-python``:
what the compiled express lane is worth, measured in the same boot).  Prints a table with
IOPS, MB/s and p50/p99 latency, the ratios targetmirror/tcmu-runner and targetmirror/fileio,
and writes JSON to --out.

From the host (boots the guest):

    python3 -m lab run --out lab-out/bench -- python3 benchmarks/lab_fio.py --out /out/fio.json

TCMU settings used for both user: backstores: hw_max_sectors=2048 (1 MiB commands), default
data area (1 GiB) and ring (8 MiB), queue depth 128, nl_reply_supported=-1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lab import guest
from tests.lab.mirrord import Mirrord, cli

MiB = 1 << 20
SIZE = 512 * MiB
JOBS = {
    "4k-randwrite-qd1": ["--rw=randwrite", "--bs=4k", "--iodepth=1"],
    "4k-randwrite-qd16": ["--rw=randwrite", "--bs=4k", "--iodepth=16"],
    "4k-randread-qd1": ["--rw=randread", "--bs=4k", "--iodepth=1"],
    "4k-randread-qd16": ["--rw=randread", "--bs=4k", "--iodepth=16"],
    "1m-write-qd4": ["--rw=write", "--bs=1M", "--iodepth=4"],
    "1m-read-qd4": ["--rw=read", "--bs=1M", "--iodepth=4"],
}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio(dev: str, job: str, args: list[str], seconds: int,
        pid: int | None = None) -> dict[str, float]:
    c0 = cpu_seconds(pid) if pid else 0.0
    proc = guest.run(["fio", "--output-format=json", "--name=" + job, f"--filename={dev}",
                      "--direct=1", "--ioengine=libaio", "--time_based",
                      f"--runtime={seconds}", "--size=256M", *args], timeout=seconds + 120)
    j = json.loads(proc.stdout)["jobs"][0]
    side = j["write"] if "write" in job else j["read"]
    pct = side["clat_ns"].get("percentile", {})
    cpu = cpu_seconds(pid) - c0 if pid else 0.0
    ios = side["total_ios"] or 1
    return {"iops": side["iops"], "mbps": side["bw_bytes"] / 1e6,
            "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000,
            "cpu_us_per_io": cpu / ios * 1e6 if pid else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="targetmirrord --workers")
    ap.add_argument("--out", default=None)
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--no-python-pass", dest="python_pass", action="store_false",
                    help="skip the last pass, which restarts targetmirrord with --no-express "
                    "and runs the jobs again on the same LUN (column targetmirror-python)")
    args = ap.parse_args()
    guest.setup_kernel()
    guest.iscsi_logout_all()
    guest.clear_lio()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    runner = guest.TcmuRunner(work / "runner-log")
    runner.start()
    daemon = Mirrord(work / "mirrord.log", workers=args.workers)
    daemon.start()
    devs: dict[str, str] = {}
    try:
        so = guest.create_fileio("b_fileio", work / "fileio.img", SIZE)
        exp = guest.export_iscsi(so, iqn=f"{guest.IQN_PREFIX}:fileio")
        guest.iscsi_login(exp.iqn)
        devs["fileio"] = guest.find_scsi_disk(exp.iqn)
        so = guest.create_user_file("b_file", work / "file.img", SIZE)
        runner.wait_for_device(so.name)
        exp = guest.export_iscsi(so, iqn=f"{guest.IQN_PREFIX}:userfile")
        guest.iscsi_login(exp.iqn)
        devs["tcmu-runner"] = guest.find_scsi_disk(exp.iqn)
        iqn = f"{guest.IQN_PREFIX}:mirror"
        cli("create", "b_mirror", "--size", str(SIZE), "--image-a", str(work / "a.img"),
            "--image-b", str(work / "b.img"), "--create-images", "--iqn", iqn,
            "--initiator", guest.initiator_name())
        daemon.wait_serving("b_mirror")
        guest.iscsi_login(iqn)
        devs["targetmirror"] = guest.find_scsi_disk(iqn)
        # Fill every LUN once so reads hit allocated data on all three.
        for dev in devs.values():
            guest.run(["fio", "--name=fill", f"--filename={dev}", "--direct=1", "--rw=write",
                       "--bs=1M", "--iodepth=4", "--ioengine=libaio", "--size=256M"],
                      timeout=600)
        pids = {"tcmu-runner": runner.pid}
        if daemon.proc is not None:
            pids["targetmirror"] = daemon.proc.pid
        results: dict[str, dict[str, list[dict[str, float]]]] = {}
        order = list(devs)
        for rnd in range(args.rounds):
            for job in args.jobs.split(","):
                for name in (order if rnd % 2 == 0 else order[::-1]):
                    r = fio(devs[name], job, JOBS[job], args.seconds, pids.get(name))
                    results.setdefault(job, {}).setdefault(name, []).append(r)
                    print(f"round {rnd + 1} {job:18} {name:13} {r['iops']:9.0f} IOPS "
                          f"{r['mbps']:8.1f} MB/s p50 {r['p50_us']:8.0f} us "
                          f"p99 {r['p99_us']:8.0f} us cpu {r['cpu_us_per_io']:6.0f} us/io",
                          flush=True)
        if args.python_pass:
            # The same LUN, the same boot, the daemon restarted with the express lane off: what
            # the compiled lane is worth, free of the drift between boots.
            daemon.stop()
            daemon.extra_args = ["--no-express"]
            daemon.start()
            daemon.wait_serving("b_mirror")
            assert daemon.proc is not None
            for rnd in range(args.rounds):
                for job in args.jobs.split(","):
                    r = fio(devs["targetmirror"], job, JOBS[job], args.seconds, daemon.proc.pid)
                    results[job].setdefault("targetmirror-python", []).append(r)
                    print(f"round {rnd + 1} {job:18} {'tm-python':13} {r['iops']:9.0f} IOPS "
                          f"{r['mbps']:8.1f} MB/s cpu {r['cpu_us_per_io']:6.0f} us/io",
                          flush=True)
        print(f"\n{'job':18} {'backstore':13} {'IOPS':>9} {'MB/s':>8} {'p50 us':>8} "
              f"{'p99 us':>8} {'cpu us/io':>9}   tm/runner  tm/fileio")
        summary = {}
        for job, per in results.items():
            avg = {n: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]} for n, rs in per.items()}
            summary[job] = avg
            for name, r in avg.items():
                ratio = ""
                if name.startswith("targetmirror"):
                    ratio = (f"   {r['iops'] / avg['tcmu-runner']['iops']:9.2f} "
                             f"{r['iops'] / avg['fileio']['iops']:10.2f}")
                print(f"{job:18} {name:13} {r['iops']:9.0f} {r['mbps']:8.1f} "
                      f"{r['p50_us']:8.0f} {r['p99_us']:8.0f} {r['cpu_us_per_io']:9.0f}{ratio}")
        if args.out:
            Path(args.out).write_text(json.dumps({"date": time.strftime("%F %T"),
                                                  "seconds": args.seconds,
                                                  "workers": args.workers,
                                                  "rounds": results, "mean": summary},
                                                 indent=1))
    finally:
        guest.iscsi_logout_all()
        guest.clear_lio()
        status = daemon.stop()
        runner.stop()
        shutil.rmtree(work, ignore_errors=True)  # guest tmpfs: leave room for what runs next
        print(f"targetmirrord exit status {status}")
        tail = daemon.log_text()[-3000:]
        print(tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
