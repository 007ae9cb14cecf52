"""Lab benchmark: fio over iSCSI against user:mirror, tcmu-runner user:file, kernel fileio and
the plain handler (benchmarks/plain_handler.py, ``user:plain``: the simplest single-thread
mirroring handler, our yardstick).

Runs *inside* the lab guest (one boot), all four LUNs on guest tmpfs, same fio jobs, two rounds
in opposite order to even out drift; then, unless ``--no-python-pass``, targetmirrord is
restarted other ways and the jobs run again on the same LUN (``--variants``: ``tm-drain``, the
lane without its wait loop and io_uring, as before issue 17; ``targetmirror-python``, no lane
at all: what each part is worth, measured in the same boot).  Prints a table with
IOPS, MB/s and p50/p99 latency, the handler's CPU per I/O and its syscalls and wake-ups per
I/O (from /proc: ``syscr``/``syscw`` of ``/proc/PID/io``, context switches of every thread),
the ratios targetmirror/tcmu-runner, targetmirror/fileio and targetmirror/plain, and writes
JSON to --out.  With ``--strace-seconds N`` (default 4; 0: off) a last short pass runs the
4 KiB jobs once more on each user backstore under ``strace -c -f`` and reports every syscall
per command.  With ``--py-spy PATH`` the 4k randwrite QD1 job runs once more with py-spy
sampling targetmirrord (collapsed stacks to ``<out dir>/pyspy-*.txt``).

From the host (boots the guest):

    python3 -m lab run --out lab-out/bench -- python3 benchmarks/lab_fio.py --out /out/fio.json

TCMU settings used for both user: backstores: hw_max_sectors=2048 (1 MiB commands), default
data area (1 GiB) and ring (8 MiB), queue depth 128, nl_reply_supported=-1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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


VARIANTS: dict[str, tuple[str, dict[str, str], list[str]]] = {
    "drain": ("tm-drain", {"TARGETMIRROR_EXPRESS_LOOP": "0", "TARGETMIRROR_URING": "0"}, []),
    "calls": ("tm-calls", {"TARGETMIRROR_URING": "0"}, []),
    "python": ("targetmirror-python", {}, ["--no-express"]),
    "noahead": ("tm-noahead", {"TARGETMIRROR_WI_AHEAD": "0"}, []),
}
"""name in the table, environment, targetmirrord arguments.  drain: the lane as it was
before its wait loop (one drain per ring wake-up, one pwritev per leg); calls: the wait loop
without io_uring (one call per leg); python: no lane at all; noahead: a write-intent mark
covers the write's own extent only (no marking ahead of a sequential stream)."""


def restart(daemon: Mirrord, env: dict[str, str], extra: list[str]) -> None:
    """Restart targetmirrord with ``env`` added to its environment and ``extra`` arguments."""
    daemon.stop()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    daemon.extra_args = ["--rescan-interval", "5", *extra]
    try:
        daemon.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    daemon.wait_serving("b_mirror")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_counters(pid: int) -> tuple[int, int, int]:
    """(read-like syscalls, write-like syscalls, context switches of all threads) of a process.

    ``syscr``/``syscw`` count read/pread/readv/preadv and write/pwrite/writev/pwritev calls
    (the notify and the event-count read included, poll not); a voluntary context switch is a
    sleep, i.e. one wake-up of a thread that waited.
    """
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue  # a thread that ended meanwhile
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                switches += int(line.split()[1])
    return int(io["syscr"]), int(io["syscw"]), switches


def lane_counters(daemon: Mirrord, name: str = "b_mirror") -> dict[str, float]:
    """The mirror's command counters from targetmirrord's status: every command it answered,
    the ones the express lane served, and why lane runs stopped (``gate``: a write to a
    region whose write-intent bit was not set yet, which Python marks durably first)."""
    st = next(m for m in daemon.ctl_json("status")["mirrors"] if m["name"] == name)
    ex = st.get("express") or {}
    stops = ex.get("stops") or {}
    return {"commands": st.get("commands", 0), "lane": ex.get("commands", 0),
            "gate": stops.get("gate", 0), "entry": stops.get("entry", 0)}


def lane_text(r: dict[str, float]) -> str:
    """The lane columns of a result line (targetmirrord only)."""
    if "lane_share" not in r:
        return ""
    return (f" lane {100 * r['lane_share']:5.1f}% python {r['python_per_io']:.3f}/io "
            f"gate {r['gate_per_io']:.3f}/io")


def fio(dev: str, job: str, args: list[str], seconds: int,
        pid: int | None = None,
        probe: Callable[[], dict[str, float]] | None = None) -> dict[str, float]:
    """One fio job; with ``pid`` the handler's CPU and syscalls per I/O, with ``probe`` (a
    targetmirrord) the share of commands its lane served and the Python takeovers per I/O.
    The probe (a control call, ~2 s under TCG) runs outside the counted window."""
    p0 = probe() if probe else None
    c0 = cpu_seconds(pid) if pid else 0.0
    k0 = proc_counters(pid) if pid else (0, 0, 0)
    proc = guest.run(["fio", "--output-format=json", "--name=" + job, f"--filename={dev}",
                      "--direct=1", "--ioengine=libaio", "--time_based",
                      f"--runtime={seconds}", "--size=256M", *args], timeout=seconds + 120)
    j = json.loads(proc.stdout)["jobs"][0]
    side = j["write"] if "write" in job else j["read"]
    pct = side["clat_ns"].get("percentile", {})
    cpu = cpu_seconds(pid) - c0 if pid else 0.0
    k1 = proc_counters(pid) if pid else (0, 0, 0)
    # the counters run from before fio starts to after it ends: its start-up and tear-down
    # (a few commands) are counted too, which is negligible against thousands of I/Os
    ios = side["total_ios"] or 1
    lane: dict[str, float] = {}
    if probe and p0 is not None:
        p1 = probe()
        cmds = max(p1["commands"] - p0["commands"], 1)
        lane = {"lane_share": (p1["lane"] - p0["lane"]) / cmds,
                "python_per_io": (cmds - (p1["lane"] - p0["lane"])) / ios,
                "gate_per_io": (p1["gate"] - p0["gate"]) / ios,
                "entry_per_io": (p1["entry"] - p0["entry"]) / ios}
    return {**lane, "iops": side["iops"], "mbps": side["bw_bytes"] / 1e6,
            "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000,
            "cpu_us_per_io": cpu / ios * 1e6 if pid else 0.0,
            "syscr_per_io": (k1[0] - k0[0]) / ios, "syscw_per_io": (k1[1] - k0[1]) / ios,
            "cs_per_io": (k1[2] - k0[2]) / ios, "ios": side["total_ios"]}


_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def strace_pass(dev: str, job: str, args: list[str], seconds: int, pid: int,
                out: Path) -> dict[str, float]:
    """One fio run with ``strace -c -f`` attached to every thread of ``pid``: syscalls per
    I/O by name.  strace makes every syscall dearer, so IOPS here are not comparable; the
    counts per command are what this pass is for."""
    summary = out.with_suffix(".strace")
    tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(summary)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attaching to every thread takes a moment under TCG
    try:
        r = fio(dev, job, args, seconds)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(60)
    ios = r["ios"] or 1
    calls: dict[str, float] = {}
    for line in summary.read_text().splitlines():
        m = _STRACE_ROW.match(line)
        if m and m.group(3) != "total":
            calls[m.group(3)] = int(m.group(1)) / ios
    calls["total"] = sum(calls.values())
    calls["iops_under_strace"] = r["iops"]
    return calls


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="targetmirrord --workers")
    ap.add_argument("--out", default=None)
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--no-plain", dest="plain", action="store_false",
                    help="leave out the fourth LUN served by benchmarks/plain_handler.py")
    ap.add_argument("--strace-seconds", type=int, default=4,
                    help="length of each fio run of the strace pass (0: no strace pass)")
    ap.add_argument("--py-spy", default=None,
                    help="py-spy binary: profile targetmirrord during one more 4k randwrite "
                    "QD1 run")
    ap.add_argument("--variants", default="drain,python",
                    help="passes after the main rounds, each restarting targetmirrord another "
                    "way on the same LUN: " + ", ".join(f"{k} ({v[0]})"
                                                        for k, v in VARIANTS.items()))
    ap.add_argument("--ab-rounds", type=int, default=0,
                    help="after the main rounds, alternate targetmirrord as it is and as "
                    "--ab says this many times on the 4k jobs (ab-default / ab-VARIANT)")
    ap.add_argument("--ab", default="drain", choices=sorted(VARIANTS))
    ap.add_argument("--ab-jobs", default="",
                    help="comma-separated jobs of the A/B rounds (default: the 4k ones of "
                    "--jobs)")
    ap.add_argument("--no-python-pass", dest="python_pass", action="store_false",
                    help="skip the last pass, which restarts targetmirrord with --no-express "
                    "and runs the jobs again on the same LUN (column targetmirror-python)")
    args = ap.parse_args()
    guest.setup_kernel()
    # six images of which 256 MiB each is filled (1.5 GiB) outgrow the default tmpfs (half
    # the guest's memory); dev/bench.sh boots the guest with 4 GiB
    guest.run(["mount", "-o", "remount,size=75%", tempfile.gettempdir()])
    guest.iscsi_logout_all()
    guest.clear_lio()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    runner = guest.TcmuRunner(work / "runner-log")
    runner.start()
    daemon = Mirrord(work / "mirrord.log", workers=args.workers)
    # the product's rescan interval, not the lab tests' 1 s (a rescan reads sysfs for every
    # uio device: CPU that would be counted against every I/O of a slow job)
    daemon.extra_args = ["--rescan-interval", "5"]
    daemon.start()
    devs: dict[str, str] = {}
    plain: subprocess.Popen[bytes] | None = None
    out_dir = Path(args.out).parent if args.out else work
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
        # before the mirror: this process's rtslib picks user_N indexes from what it made
        if args.plain:
            so = guest.create_user_backstore("b_plain", "plain", "bench", SIZE)
            plain = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("plain_handler.py")),
                 "--device", "b_plain", "--image-a", str(work / "pa.img"),
                 "--image-b", str(work / "pb.img")],
                stdout=(work / "plain.log").open("wb"), stderr=subprocess.STDOUT)
            guest.wait_for(lambda: "serving" in (work / "plain.log").read_text(), timeout=60,
                           what="the plain handler to open its device")
            exp = guest.export_iscsi(so, iqn=f"{guest.IQN_PREFIX}:plain")
            guest.iscsi_login(exp.iqn)
            devs["plain"] = guest.find_scsi_disk(exp.iqn)
        iqn = f"{guest.IQN_PREFIX}:mirror"
        cli("create", "b_mirror", "--size", str(SIZE), "--image-a", str(work / "a.img"),
            "--image-b", str(work / "b.img"), "--create-images", "--iqn", iqn,
            "--initiator", guest.initiator_name())
        daemon.wait_serving("b_mirror")
        guest.iscsi_login(iqn)
        devs["targetmirror"] = guest.find_scsi_disk(iqn)
        # Fill every LUN once so reads hit allocated data on all of them.
        for dev in devs.values():
            guest.run(["fio", "--name=fill", f"--filename={dev}", "--direct=1", "--rw=write",
                       "--bs=1M", "--iodepth=4", "--ioengine=libaio", "--size=256M"],
                      timeout=600)
        pids = {"tcmu-runner": runner.pid}
        if daemon.proc is not None:
            pids["targetmirror"] = daemon.proc.pid
        if plain is not None:
            pids["plain"] = plain.pid
        results: dict[str, dict[str, list[dict[str, float]]]] = {}

        def probe() -> dict[str, float]:
            return lane_counters(daemon)
        order = list(devs)
        for rnd in range(args.rounds):
            for job in args.jobs.split(","):
                for name in (order if rnd % 2 == 0 else order[::-1]):
                    r = fio(devs[name], job, JOBS[job], args.seconds, pids.get(name),
                            probe if name == "targetmirror" else None)
                    results.setdefault(job, {}).setdefault(name, []).append(r)
                    print(f"round {rnd + 1} {job:18} {name:13} {r['iops']:9.0f} IOPS "
                          f"{r['mbps']:8.1f} MB/s p50 {r['p50_us']:8.0f} us "
                          f"p99 {r['p99_us']:8.0f} us cpu {r['cpu_us_per_io']:6.0f} us/io "
                          f"rd+wr {r['syscr_per_io'] + r['syscw_per_io']:5.2f}/io "
                          f"cs {r['cs_per_io']:5.2f}/io{lane_text(r)}", flush=True)
        strace: dict[str, dict[str, dict[str, float]]] = {}
        if args.strace_seconds and shutil.which("strace"):
            for job in [j for j in args.jobs.split(",") if j.startswith("4k")]:
                for name, pid in pids.items():
                    calls = strace_pass(devs[name], job, JOBS[job], args.strace_seconds, pid,
                                        work / f"{job}-{name}")
                    strace.setdefault(job, {})[name] = calls
                    top = sorted(((v, k) for k, v in calls.items()
                                  if k not in ("total", "iops_under_strace")), reverse=True)
                    print(f"strace {job:18} {name:13} {calls['total']:6.2f} syscalls/io: "
                          + ", ".join(f"{k} {v:.2f}" for v, k in top[:6]), flush=True)
        elif args.strace_seconds:
            print("strace is not installed in this guest: no strace pass", flush=True)
        profiles: dict[str, str] = {}
        if args.py_spy and "targetmirror" in pids:
            job = "4k-randwrite-qd1"
            dest = out_dir / "pyspy-targetmirror-4k-randwrite-qd1.txt"
            spy = subprocess.Popen([args.py_spy, "record", "--pid", str(pids["targetmirror"]),
                                    "--format", "raw", "--rate", "200", "--threads",
                                    "--nonblocking", "--output", str(dest)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)
            r = fio(devs["targetmirror"], job, JOBS[job], args.seconds)
            spy.send_signal(signal.SIGINT)
            _out, err = spy.communicate(timeout=120)
            profiles[job] = str(dest)
            print(f"py-spy {job}: {r['iops']:.0f} IOPS while sampled; stacks in {dest} "
                  f"({err.decode(errors='replace').strip()[-200:]})", flush=True)
        if args.ab_rounds:
            # targetmirrord as built against one variant, alternated (ABBA...) on the same LUN,
            # so load that drifts during the run hits both alike: the fair before/after
            ab = VARIANTS[args.ab]
            ab_jobs = [j for j in (args.ab_jobs or args.jobs).split(",")
                       if args.ab_jobs or j.startswith("4k")]
            configs = [("ab-" + "default", {}, []), ("ab-" + args.ab, ab[1], ab[2])]
            for rnd in range(args.ab_rounds):
                for label, env, extra in (configs if rnd % 2 == 0 else configs[::-1]):
                    restart(daemon, env, extra)
                    assert daemon.proc is not None
                    for job in ab_jobs:
                        r = fio(devs["targetmirror"], job, JOBS[job], args.seconds,
                                daemon.proc.pid, probe)
                        results[job].setdefault(label, []).append(r)
                        print(f"ab {rnd + 1} {job:18} {label:13} {r['iops']:9.0f} IOPS "
                              f"cpu {r['cpu_us_per_io']:6.0f} us/io rd+wr "
                              f"{r['syscr_per_io'] + r['syscw_per_io']:5.2f}/io "
                              f"cs {r['cs_per_io']:5.2f}/io{lane_text(r)}", flush=True)
        variants = [v for v in args.variants.split(",") if v]
        if not args.python_pass and "python" in variants:
            variants.remove("python")
        for variant in variants:
            # The same LUN, the same boot, targetmirrord restarted another way: what each part
            # of the lane is worth, free of the drift between boots.
            name, env, extra = VARIANTS[variant]
            restart(daemon, env, extra)
            assert daemon.proc is not None
            for rnd in range(args.rounds):
                for job in args.jobs.split(","):
                    r = fio(devs["targetmirror"], job, JOBS[job], args.seconds, daemon.proc.pid,
                            probe)
                    results[job].setdefault(name, []).append(r)
                    print(f"round {rnd + 1} {job:18} {name:13} {r['iops']:9.0f} IOPS "
                          f"{r['mbps']:8.1f} MB/s cpu {r['cpu_us_per_io']:6.0f} us/io "
                          f"rd+wr {r['syscr_per_io'] + r['syscw_per_io']:5.2f}/io "
                          f"cs {r['cs_per_io']:5.2f}/io{lane_text(r)}", flush=True)
            if args.strace_seconds and shutil.which("strace") and variant != "python":
                for job in [j for j in args.jobs.split(",") if j.startswith("4k")]:
                    calls = strace_pass(devs["targetmirror"], job, JOBS[job],
                                        args.strace_seconds, daemon.proc.pid,
                                        work / f"{job}-{name}")
                    strace.setdefault(job, {})[name] = calls
                    print(f"strace {job:18} {name:13} {calls['total']:6.2f} syscalls/io",
                          flush=True)
        print(f"\n{'job':18} {'backstore':13} {'IOPS':>9} {'MB/s':>8} {'p50 us':>8} "
              f"{'p99 us':>8} {'cpu us/io':>9} {'rd+wr/io':>8} {'cs/io':>6}   tm/runner  "
              "tm/fileio  tm/plain")
        summary = {}
        for job, per in results.items():
            avg = {n: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]} for n, rs in per.items()}
            summary[job] = avg
            for name, r in avg.items():
                ratio = ""
                if name.startswith(("targetmirror", "tm-", "ab-")):
                    ratio = (f"   {r['iops'] / avg['tcmu-runner']['iops']:9.2f} "
                             f"{r['iops'] / avg['fileio']['iops']:10.2f}")
                    if "plain" in avg:
                        ratio += f" {r['iops'] / avg['plain']['iops']:9.2f}"
                print(f"{job:18} {name:13} {r['iops']:9.0f} {r['mbps']:8.1f} "
                      f"{r['p50_us']:8.0f} {r['p99_us']:8.0f} {r['cpu_us_per_io']:9.0f} "
                      f"{r['syscr_per_io'] + r['syscw_per_io']:8.2f} {r['cs_per_io']:6.2f}"
                      f"{ratio}{lane_text(r)}")
        if args.out:
            Path(args.out).write_text(json.dumps({"date": time.strftime("%F %T"),
                                                  "seconds": args.seconds,
                                                  "workers": args.workers,
                                                  "rounds": results, "mean": summary,
                                                  "strace": strace, "profiles": profiles,
                                                  "guest_loadavg": Path("/proc/loadavg")
                                                  .read_text().strip()},
                                                 indent=1))
    finally:
        guest.iscsi_logout_all()
        guest.clear_lio()
        status = daemon.stop()
        runner.stop()
        if plain is not None:
            plain.send_signal(signal.SIGTERM)
            plain.wait(30)
            print((work / "plain.log").read_text(errors="replace")[-500:])
        shutil.rmtree(work, ignore_errors=True)  # guest tmpfs: leave room for what runs next
        print(f"targetmirrord exit status {status}")
        tail = daemon.log_text()[-3000:]
        print(tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
