"""Slow legs against the real kernel and a real initiator (issue 19): leg A on a dm-delay device.

Leg A is a loop device over a file on guest tmpfs under a device-mapper ``delay`` target; its
table is reloaded (``dmsetup reload`` + ``resume``) to change the delay while I/O runs.  The
mirrors here open their images with O_DIRECT (``direct=1``: leg B, on tmpfs, falls back to the
page cache), so every write to A pays A's delay, as on a real slow block device.

* mkfs.ext4 on a 1 GiB LUN whose A has 0 ms added delay: mkfs first discards the whole LUN (two
  UNMAPs of 512 MiB, our MAXIMUM UNMAP LBA COUNT), which before issue 19 failed leg A:
  the daemon made each one BLKZEROOUT of 512 MiB, which did not return within the 20 s leg
  deadline.  dm-delay offers no write-zeroes, so the kernel zeroes by writing zero pages; how
  fast that goes under TCG depends on the host's load (7 s to over 20 s per 512 MiB), so the
  test makes it deterministic: targetmirrord's writes to A are limited to 22 MiB/s by the
  cgroup io controller (``io.max``), as on a device that zeroes by writing at that rate.
  Then fio with verify, an fstrim and a change of A's write delay to 200 ms while fio runs:
  no leg is failed, and A == B byte for byte at the end.  Before that, fio's completion
  latency (clat p50/p99) with a 0 ms and a 200 ms leg is printed: what a slow leg costs the
  initiator.
* A split while A's writes take 600 ms each, so the drain of the pre-split writes takes seconds;
  ``kill -9`` of targetmirrord inside that drain; restart.  A sequence-numbered writer
  (tests/lab/seqwriter.py) proves A holds a crash-consistent set: every write acknowledged
  before the split instant, no write issued after it, each dependent-write chain a prefix.
  The same for a two-LUN consistency group, and with SIGTERM instead of kill -9 inside the drain
  (issue 15's defect 3): afterwards the split is complete and no leg is failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from targetmirror.client import Client
from tests.lab import guest
from tests.lab.mirrord import Mirrord
from tests.lab.seqwriter import BLOCK, SeqWriter, Write
from tests.lab.test_lab_split_proof import Clock, _check_chains, _check_times, _match

pytestmark = pytest.mark.lab

MiB = guest.MiB
GiB = 1024 * MiB
_T0 = time.monotonic()


def _note(what: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f} s] {what}", flush=True)


class DelayLeg:
    """A loop device over a sparse file, under a dm ``delay`` device (reads and writes delayed
    separately; flushes and discards count as writes)."""

    def __init__(self, name: str, backing: Path, size: int) -> None:
        guest.run(["modprobe", "-a", "loop", "dm_mod", "dm_delay"])
        self.name = name
        self.backing = backing
        self.sectors = size // 512
        with backing.open("wb") as f:
            f.truncate(size)
        self.loop = guest.run(["losetup", "-f", "--show", str(backing)]).stdout.strip()
        self.write_ms = 0
        guest.run(["dmsetup", "create", "--noudevsync", name, "--table", self._table(0)])
        guest.run(["dmsetup", "mknodes", name])
        self.path = f"/dev/mapper/{name}"
        assert os.path.exists(self.path)

    def _table(self, write_ms: int) -> str:
        return (f"0 {self.sectors} delay {self.loop} 0 0 {self.loop} 0 {write_ms}")

    def delay(self, write_ms: int) -> None:
        """Change A's write delay now, under whatever I/O runs (a suspend flushes the bios
        the old table holds, then the new table takes the next ones)."""
        guest.run(["dmsetup", "reload", "--noudevsync", self.name, "--table",
                   self._table(write_ms)])
        guest.run(["dmsetup", "resume", "--noudevsync", self.name])
        self.write_ms = write_ms
        _note(f"{self.name}: write delay now {write_ms} ms")

    def remove(self) -> None:
        guest.run(["dmsetup", "remove", "--noudevsync", self.name], check=False)
        guest.run(["losetup", "-d", self.loop], check=False)
        self.backing.unlink(missing_ok=True)


@dataclass
class SlowLun:
    """A mirror whose A is a :class:`DelayLeg`, exported over iSCSI and logged in."""

    name: str
    leg: DelayLeg
    a: str
    b: Path
    size: int
    iqn: str = ""
    dev: str = ""

    @classmethod
    def create(cls, name: str, tmp_path: Path, size: int, daemon: Mirrord) -> SlowLun:
        # On the scratch disk, not tmp_path: guest tmpfs is half the guest's RAM (1.5 GiB),
        # shared with every earlier test of the boot, and zeroing through dm-delay writes
        # real zero pages (CI ran out of it here: ENOSPC on leg A, mkfs EIO).
        del tmp_path
        base = guest.scratch_dir()
        leg = DelayLeg(f"tm_{name}_a", base / f"{name}-a.backing", size)
        b = base / f"{name}-b.img"
        with b.open("wb") as f:
            f.truncate(size)
        so = guest.create_user_backstore(name, "mirror", f"a={leg.path};b={b};direct=1", size)
        export = guest.export_iscsi(so)
        lun = cls(name, leg, leg.path, b, size, export.iqn)
        daemon.wait_serving(name)
        lun.login()
        return lun

    def login(self) -> None:
        guest.iscsi_login(self.iqn)
        self.dev = guest.find_scsi_disk(self.iqn)

    def logout(self) -> None:
        guest.iscsi_logout(self.iqn)

    def identical(self) -> bool:
        """A == B over the LUN (cmp, in C: a 1 GiB compare in Python is slow under TCG)."""
        res = guest.run(["cmp", "-n", str(self.size), self.a, str(self.b)], check=False,
                        timeout=600)
        return res.returncode == 0

    def remove(self) -> None:
        self.leg.remove()
        self.b.unlink(missing_ok=True)


ZEROING_RATE = 22 << 20
"""Bytes per second targetmirrord may write to leg A in the mkfs test: zeroing one 512 MiB
UNMAP takes ~23 s (mkfs sends them one after the other), more than the old 20 s deadline for
it as one call, less than LIO's 30 s command timeout for the UNMAP cut into pieces."""


def _limit_writes(pid: int, dev: str, wbps: int) -> None:
    """Put process ``pid`` in a cgroup whose writes to block device ``dev`` are limited to
    ``wbps`` bytes per second (cgroup v2 ``io.max``; blk-throttle counts every bio the
    process submits, the kernel's zero pages for BLKZEROOUT included)."""
    root = Path("/sys/fs/cgroup")
    if not (root / "cgroup.controllers").exists():
        root.mkdir(parents=True, exist_ok=True)
        guest.run(["mount", "-t", "cgroup2", "none", str(root)])
    (root / "cgroup.subtree_control").write_text("+io\n")
    group = root / "tm-slowleg"
    group.mkdir(exist_ok=True)
    rdev = os.stat(dev).st_rdev
    (group / "io.max").write_text(f"{os.major(rdev)}:{os.minor(rdev)} wbps={wbps}\n")
    (group / "cgroup.procs").write_text(f"{pid}\n")
    _note(f"targetmirrord's writes to {dev} limited to {wbps >> 20} MiB/s")


def _status(daemon: Mirrord, name: str) -> dict[str, Any]:
    st: dict[str, Any] = Client(daemon.socket).status([name])["mirrors"][0]
    return st


def _legs_summary(st: dict[str, Any]) -> dict[str, Any]:
    keys = ("health", "slow", "inflight", "oldest_call_seconds", "latency", "slow_calls",
            "discard_fallbacks", "discards_slow")
    return {leg: {k: v.get(k) for k in keys} for leg, v in st["legs"].items()}


def _assert_no_leg_failed(daemon: Mirrord, name: str) -> dict[str, Any]:
    st = _status(daemon, name)
    assert st["health"] == "ok" and not st["failed_legs"], (st["failed_legs"], st["legs"])
    assert "FAILED" not in daemon.log_text(), daemon.log_text()[-4000:]
    return st


def _fio(args: list[str], out: Path, timeout: float = 600) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["fio", *args, "--output-format=json", f"--output={out}"])


def _clat_ms(out: Path) -> dict[str, float]:
    """fio's write completion latency: p50, p99 and mean (ms), IOPS."""
    job = json.loads(out.read_text())["jobs"][0]["write"]
    pct = job["clat_ns"]["percentile"]
    return {"p50_ms": pct["50.000000"] / 1e6, "p99_ms": pct["99.000000"] / 1e6,
            "mean_ms": job["clat_ns"]["mean"] / 1e6, "iops": job["iops"]}


def _latency_run(dev: str, out: Path, seconds: int, depth: int) -> dict[str, float]:
    """4 KiB random writes, ``depth`` in flight, straight to the LUN: the initiator's view."""
    fio = _fio(["--name=lat", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
                "--rw=randwrite", "--bs=4k", f"--iodepth={depth}", "--offset=768M",
                "--size=128M", "--time_based", f"--runtime={seconds}"], out)
    assert fio.wait(timeout=seconds + 300) == 0, out.read_text()[-3000:]
    return _clat_ms(out)


def _latency(dev: str, tmp_path: Path, label: str) -> dict[str, dict[str, float]]:
    return {f"qd{d}": _latency_run(dev, tmp_path / f"lat-{label}-qd{d}.json", s, d)
            for d, s in ((1, 10), (4, 15))}


def test_mkfs_and_fio_verify_on_a_slow_leg_leave_the_mirror_mirrored(
        mirrord: Mirrord, tmp_path: Path) -> None:
    lun = SlowLun.create("s_mkfs", tmp_path, GiB, mirrord)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        # what a slow leg costs the initiator: the same fio run with A at 0 ms, then 200 ms
        fast = _latency(lun.dev, tmp_path, "0ms")
        lun.leg.delay(200)
        slow = _latency(lun.dev, tmp_path, "200ms")
        print("SLOW-LEG-LATENCY", json.dumps({"leg_a_0ms": fast, "leg_a_200ms": slow}))
        # the delay took effect (a sanity check, not a speed target: the numbers are printed)
        assert slow["qd1"]["p50_ms"] >= 200 > fast["qd1"]["p50_ms"], (fast, slow)
        _assert_no_leg_failed(mirrord, lun.name)

        lun.leg.delay(0)
        assert mirrord.proc is not None
        _limit_writes(mirrord.proc.pid, lun.leg.path, ZEROING_RATE)
        t = time.monotonic()
        mkfs = guest.run(["mkfs.ext4", "-F", lun.dev], timeout=900)  # discards it all first
        _note(" ".join(line.strip() for line in mkfs.stdout.splitlines()
                       if "iscard" in line))
        mkfs_s = time.monotonic() - t
        st = _assert_no_leg_failed(mirrord, lun.name)
        _note(f"mkfs.ext4 with A at 0 ms: {mkfs_s:.1f} s, no leg failed; "
              f"legs {json.dumps(_legs_summary(st))}")

        # ext4 under fio with verify; A's delay changed while it runs; an fstrim on the slow leg
        guest.run(["mount", lun.dev, str(mnt)])
        out = tmp_path / "fio-verify.json"
        fio = _fio(["--name=verify", f"--directory={mnt}", "--size=64M", "--direct=1",
                    "--ioengine=libaio", "--rw=randwrite", "--bs=4k", "--iodepth=4",
                    "--fsync=32", "--verify=crc32c", "--verify_backlog=64",
                    "--verify_fatal=1", "--verify_state_save=0", "--time_based",
                    "--runtime=120"], out)
        try:
            stat = Path("/sys/block", Path(lun.dev).name, "stat")

            def fio_writes(n: int, what: str) -> None:
                base = int(stat.read_text().split()[4])
                guest.wait_for(lambda: int(stat.read_text().split()[4]) > base + n
                               or fio.poll() is not None, timeout=180, what=what)
                assert fio.poll() is None, f"fio ended early: {out.read_text()[-3000:]}"

            fio_writes(300, "fio to be writing")
            lun.leg.delay(200)
            trim = subprocess.Popen(["fstrim", "-v", str(mnt)], stdout=subprocess.PIPE,
                                    text=True)      # discards of the free space, under fio
            fio_writes(50, "fio to write through the 200 ms leg")
            trimmed, _ = trim.communicate(timeout=600)
            assert trim.returncode == 0, trimmed
            _note(f"fstrim on the 200 ms leg, under fio: {trimmed.strip()}")
            lun.leg.delay(0)
        finally:
            rc = fio.wait(timeout=900)
        report = json.loads(out.read_text())
        assert rc == 0 and report["jobs"][0]["error"] == 0, out.read_text()[-3000:]
        guest.run(["umount", str(mnt)])
        guest.run(["fsck.ext4", "-fn", lun.dev], timeout=600)
        st = _assert_no_leg_failed(mirrord, lun.name)
        assert st["state"] == "mirrored", st
        _note(f"after fio, fstrim and the delay changes: legs {json.dumps(_legs_summary(st))}")
        lun.logout()
        assert lun.identical(), "A and B differ after mkfs and fio on a slow leg"
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        guest.iscsi_logout_all()
        lun.remove()


# -- a crash inside a slow drain ------------------------------------------------------------

SPLIT_SIZE = 64 * MiB
NUM_BLOCKS = SPLIT_SIZE // BLOCK
DRAIN_DELAY_MS = 600


def _split_inside_a_slow_drain(daemon: Mirrord, luns: list[SlowLun], writer: SeqWriter,
                               names: list[str], group: str | None
                               ) -> tuple[Clock, Clock, dict[str, Any]]:
    """Slow A down under the writer, split (without waiting for the drain) and check that the
    drain is still running: pre-split writes in flight, the mirrors splitting."""
    for lun in luns:
        lun.leg.delay(DRAIN_DELAY_MS)
    writer.wait_acked(writer.acked + 12, timeout=120)  # writes now queue behind the 600 ms
    client = Client(daemon.socket)
    t_issue = Clock()
    res = client.split(names if group is None else [], group=group, wait=False)
    t_return = Clock()
    status = client.status(names)["mirrors"]
    for st in status:
        assert st["state"] == "splitting" and st["pre_split_in_flight"] > 0, \
            f"the drain is not running any more: {st['state']} {st['pre_split_in_flight']}"
    _note("split instant taken; draining: " + ", ".join(
        f"{st['name']} {st['pre_split_in_flight']} pre-split write(s) in flight"
        for st in status))
    return t_issue, t_return, res


def _prove(writer: SeqWriter, writes: list[Write], luns: list[SlowLun], t_issue: Clock,
           t_return: Clock, status: list[dict[str, Any]]) -> dict[str, Any]:
    """A holds exactly a crash-consistent set; B holds every acknowledged write."""
    assert not writer.errors, writer.errors
    assert all(w.acked for w in writes), [w for w in writes if not w.acked][:3]
    found = _match(luns, writes)  # type: ignore[arg-type]  # name, a, b: what it reads
    in_a = set().union(*(found[f"{lun.name}.A"] for lun in luns))
    in_b = set().union(*(found[f"{lun.name}.B"] for lun in luns))
    assert in_b == {w.seq for w in writes}, "B lacks acknowledged writes"
    by_name = {st["name"]: st for st in status}
    stats: dict[str, Any] = {}
    for target, lun in enumerate(luns):
        mine = [w for w in writes if w.target == target]
        stats[lun.name] = _check_times(lun.name, mine, found[f"{lun.name}.A"], t_issue,
                                       t_return, by_name[lun.name]["split"]["instant_wall"])
        assert stats[lun.name]["in_A"] > 0
    stats.update(_check_chains(writer, in_a))
    assert sum(w.issue_mono >= t_return.mono for w in writes) > 0
    return stats


def _restart_and_check(daemon: Mirrord, luns: list[SlowLun], writer: SeqWriter,
                       what: str) -> list[dict[str, Any]]:
    """Start targetmirrord again; every split is recorded as crash-consistent (or complete),
    no leg is failed, and the initiator's writes go on."""
    t0 = time.monotonic()
    daemon.start()
    for lun in luns:
        daemon.wait_serving(lun.name)
    _note(f"after {what}: serving again in {time.monotonic() - t0:.1f} s")
    at = writer.acked
    writer.wait_acked(at + 40, timeout=180)
    status = Client(daemon.socket).status([lun.name for lun in luns])["mirrors"]
    for st in status:
        assert st["state"] == "split", st
        assert st["split"]["a_status"] in ("consistent", "crash-consistent"), st["split"]
        assert not st["failed_legs"] and st["health"] == "ok", st["failed_legs"]
    return status


@pytest.mark.parametrize("how", ["kill9", "sigterm"])
def test_a_stop_inside_a_slow_split_drain_leaves_a_crash_consistent_a(
        mirrord: Mirrord, tmp_path: Path, how: str) -> None:
    lun = SlowLun.create(f"s_{how}", tmp_path, SPLIT_SIZE, mirrord)
    writer = SeqWriter([lun.dev], threads=16, num_blocks=NUM_BLOCKS,
                       log_path=tmp_path / "writes.jsonl")
    writer.start()
    try:
        writer.wait_acked(200, timeout=180)
        t_issue, t_return, _res = _split_inside_a_slow_drain(mirrord, [lun], writer,
                                                             [lun.name], None)
        if how == "kill9":
            assert mirrord.kill9() == -9
            assert f"{lun.name}: split complete" not in mirrord.log_text(), \
                "the drain ended before the kill"
        else:
            t = time.monotonic()
            assert mirrord.stop(timeout=120) == 0, "SIGTERM inside the drain: not a clean exit"
            log = mirrord.log_text()
            _note(f"SIGTERM: exited 0 in {time.monotonic() - t:.1f} s")
            assert "FAILED" not in log and "Traceback" not in log, log[-4000:]
        lun.leg.delay(0)
        status = _restart_and_check(mirrord, [lun], writer, how)
    finally:
        writes = writer.stop()
    lun.logout()
    stats = _prove(writer, writes, [lun], t_issue, t_return, status)
    sp = status[0]["split"]
    print("SLOW-DRAIN-PROOF", json.dumps({"test": how, **stats, "a_status": sp["a_status"],
                                          "drain_seconds": sp.get("drain_seconds")}))
    assert "FAILED" not in mirrord.log_text()
    lun.remove()


def test_group_killed_inside_a_slow_split_drain_keeps_chains_across_luns(
        mirrord: Mirrord, tmp_path: Path) -> None:
    luns = [SlowLun.create(n, tmp_path, SPLIT_SIZE, mirrord) for n in ("s_grp1", "s_grp2")]
    names = [lun.name for lun in luns]
    mirrord.ctl("group", "create", "sgrp", *names)
    # 8 chains: write on LUN1, wait for the ack, write on LUN2, wait, LUN1 again, ...
    writer = SeqWriter([lun.dev for lun in luns], threads=8, num_blocks=NUM_BLOCKS,
                       log_path=tmp_path / "group-writes.jsonl")
    writer.start()
    try:
        writer.wait_acked(200, timeout=180)
        t_issue, t_return, _res = _split_inside_a_slow_drain(mirrord, luns, writer, names,
                                                             "sgrp")
        assert mirrord.kill9() == -9
        for lun in luns:
            lun.leg.delay(0)
        status = _restart_and_check(mirrord, luns, writer, "kill -9 of the group's drain")
    finally:
        writes = writer.stop()
    for lun in luns:
        lun.logout()
    for st in status:
        assert st["split"]["group"] == sorted(names), st["split"]
    instants = [st["split"]["instant_wall"] for st in status]
    assert max(instants) - min(instants) < 0.5, f"group members split apart: {instants}"
    stats = _prove(writer, writes, luns, t_issue, t_return, status)
    print("SLOW-DRAIN-PROOF", json.dumps({"test": "group-kill9", **stats,
                                          "a_status": [st["split"]["a_status"]
                                                       for st in status]}))
    for lun in luns:
        lun.remove()
