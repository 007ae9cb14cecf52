"""Soak: mixed fio load with verify over iSCSI on a ``user:mirror`` LUN while the mirror is split
and rejoined again and again; the daemon's memory is sampled from /proc all along.

Proves, against the real kernel: fio sees no I/O error and no verify mismatch across every split
and rejoin; every split reports A consistent and every rejoin ends mirrored; the stuck-command
watchdog (30 s, its default) never fires; the daemon's RSS stays within a bound after
warm-up; at the end ``verify`` finds 0 mismatches and A equals B byte for byte.

Short mode (CI, the default): 90 s of load, a split every 15 s.  Long mode for manual runs:
``TARGETMIRROR_GUEST_SOAK_SECONDS=600`` (period 30 s unless ``TARGETMIRROR_GUEST_SOAK_PERIOD``),
e.g. ``TARGETMIRROR_GUEST_SOAK_SECONDS=600 flock /tmp/targetmirror-lab.lock
.venv/bin/python -m pytest -m lab tests/lab/test_lab_soak.py -v -rA -s``; the RSS series and the
counts are printed either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from targetmirror.client import Client
from tests.lab import guest
from tests.lab.mirrord import Mirrord, cli

pytestmark = pytest.mark.lab

MiB = guest.MiB
SIZE = 64 * MiB
SECONDS = int(os.environ.get("TARGETMIRROR_GUEST_SOAK_SECONDS", "90"))
PERIOD = float(os.environ.get("TARGETMIRROR_GUEST_SOAK_PERIOD",
                              "30" if SECONDS >= 300 else "15"))
#: The daemon's own default threshold (what an operator would be alerted at).
STUCK_AFTER = 30.0
#: RSS may grow by at most this much from the end of the first split/rejoin cycle (warm-up:
#: thread pools, buffers and caches exist by then) to the end of the run.
RSS_GROWTH_BOUND = 32 * MiB
NAME = "soak"


def _rss(pid: int) -> int:
    """VmRSS of ``pid`` in bytes, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise guest.GuestError(f"no VmRSS for pid {pid}")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


class Sampler(threading.Thread):
    """Samples the daemon's RSS and open fds every second until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int, int]] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.samples.append((time.monotonic() - self.t0, _rss(self.pid), _fds(self.pid)))
            self.stop_event.wait(1.0)

    def at(self, t: float) -> int:
        """The first RSS sample taken at or after ``t`` seconds (the last one if none)."""
        for ts, rss, _ in self.samples:
            if ts >= t:
                return rss
        return self.samples[-1][1]


def _fio_cmd(dev: str, runtime: int, out: Path) -> list[str]:
    """Three jobs: 4k random writes with fsync, 64k sequential writes (both verified as they
    go), and 16k random reads over the whole LUN."""
    common = ["--direct=1", "--ioengine=libaio", "--time_based", f"--runtime={runtime}",
              f"--filename={dev}"]
    verify = ["--verify=crc32c", "--verify_fatal=1", "--verify_dump=1"]
    return ["fio", "--output-format=json", f"--output={out}", *common,
            "--name=rand4k", "--rw=randwrite", "--bs=4k", "--iodepth=8", "--offset=0",
            "--size=16M", "--fsync=32", "--verify_backlog=256", *verify,
            "--name=seq64k", "--rw=write", "--bs=64k", "--iodepth=4", "--offset=24M",
            "--size=16M", "--verify_backlog=32", *verify,
            "--name=read16k", "--rw=randread", "--bs=16k", "--iodepth=4", "--offset=0",
            f"--size={SIZE}"]


def test_soak_split_rejoin_under_fio(lio: object, tmp_path: Path) -> None:
    daemon = Mirrord(tmp_path / "targetmirrord.log")
    daemon.extra_args = ["--stuck-after", str(STUCK_AFTER)]
    daemon.start()
    iqn = f"{guest.IQN_PREFIX}:soak"
    a, b = tmp_path / "soak-a.img", tmp_path / "soak-b.img"
    try:
        cli("create", NAME, "--size", str(SIZE), "--image-a", str(a), "--image-b", str(b),
            "--create-images", "--iqn", iqn, "--initiator", guest.initiator_name())
        daemon.wait_serving(NAME)
        guest.iscsi_login(iqn)
        dev = guest.find_scsi_disk(iqn)
        assert daemon.proc is not None
        sampler = Sampler(daemon.proc.pid)
        sampler.start()
        client = Client(daemon.socket)
        out = tmp_path / "fio.json"
        fio = subprocess.Popen(_fio_cmd(dev, SECONDS, out), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        t_start = time.monotonic()
        splits: list[dict[str, float]] = []
        pacing = threading.Event()  # never set: wait() paces the schedule, it syncs nothing
        warm_at: float | None = None
        try:
            # leave the last half period for the final rejoin while fio still runs
            while time.monotonic() - t_start + PERIOD <= SECONDS and fio.poll() is None:
                pacing.wait(max(0.0, t_start + len(splits) * PERIOD + 2.0 - time.monotonic()))
                t0 = time.monotonic()
                res = client.split([NAME], timeout=120)["split"][0]
                t_split = time.monotonic() - t0
                assert res["state"] == "split", res
                assert res["split"]["a_status"] == "consistent", res
                pacing.wait(max(0.0, t0 + PERIOD / 2 - time.monotonic()))
                t1 = time.monotonic()
                rj = client.rejoin([NAME], timeout=600)["rejoin"][0]
                t_rejoin = time.monotonic() - t1
                assert rj["state"] == "mirrored", rj
                splits.append({"at": t0 - t_start, "split_s": t_split, "rejoin_s": t_rejoin,
                               "epoch": res["epoch"]})
                if warm_at is None:
                    warm_at = sampler.samples[-1][0]
                print(f"cycle {len(splits)}: split at {t0 - t_start:6.1f} s "
                      f"(took {t_split:.2f} s, epoch {res['epoch']}), rejoin took "
                      f"{t_rejoin:.2f} s", flush=True)
        finally:
            _, err = fio.communicate(timeout=SECONDS + 600)
        report = json.loads(out.read_text())
        jobs = {j["jobname"]: j for j in report["jobs"]}
        errors = {n: j["error"] for n, j in jobs.items()}
        # IOs over the job's own run time (fio's per-direction iops is misleading for write
        # jobs with verify: their verify reads are counted over the short verify phase)
        iops = {n: (j["write"]["total_ios"] + j["read"]["total_ios"])
                / max(j.get("job_runtime", SECONDS * 1000) / 1000, 1e-3)
                for n, j in jobs.items()}
        ios = {n: (j["write"]["total_ios"], j["read"]["total_ios"]) for n, j in jobs.items()}
        assert fio.returncode == 0, err.decode(errors="replace")[-3000:]
        assert all(e == 0 for e in errors.values()), errors

        st = client.mirror(NAME)
        assert st["state"] == "mirrored", st
        assert st.get("stuck_commands", 0) == 0, st
        log = daemon.log_text()
        assert "has been running for" not in log, "the stuck-command watchdog fired"
        ver = client.verify(NAME, timeout=600)
        assert ver["mismatches"] == 0, ver
        sampler.stop_event.set()
        sampler.join()

        guest.iscsi_logout(iqn)
        cli("delete", NAME, "--iqn", iqn)
        assert _sha(a) == _sha(b), "A and B differ at the end of the soak"

        rss = [s[1] for s in sampler.samples]
        warm = sampler.at(warm_at if warm_at is not None else 0.0)
        print(f"soak {SECONDS} s, period {PERIOD:.0f} s: {len(splits)} splits, "
              f"{len(splits)} rejoins, fio errors {errors}")
        print("fio IOPS (writes + reads, verify reads included): " + ", ".join(
            f"{n} {v:.0f} ({ios[n][0]} w, {ios[n][1]} r)" for n, v in iops.items()))
        print(f"RSS MiB: start {rss[0] / MiB:.1f}, after first cycle {warm / MiB:.1f}, "
              f"end {rss[-1] / MiB:.1f}, max {max(rss) / MiB:.1f}; fds start "
              f"{sampler.samples[0][2]} end {sampler.samples[-1][2]}")
        print("RSS series (s, MiB): " + " ".join(
            f"{t:.0f}:{r / MiB:.1f}" for t, r, _ in sampler.samples[::5]))
        print("split/rejoin seconds: " + " ".join(
            f"{c['split_s']:.2f}/{c['rejoin_s']:.2f}" for c in splits))
        assert len(splits) >= max(2, int(SECONDS // PERIOD) // 2), splits
        assert rss[-1] - warm <= RSS_GROWTH_BOUND, (rss[-1], warm)
        assert sampler.samples[-1][2] <= sampler.samples[0][2] + 8, "file descriptors leak"
    finally:
        guest.iscsi_logout_all()
        status = daemon.stop()
        text = daemon.log_text()
        print(f"--- targetmirrord log (exit status {status}) ---\n{text[-4000:]}")
        assert status == 0, "targetmirrord did not shut down cleanly on SIGTERM"
        assert "Traceback" not in text, "targetmirrord logged a traceback"
