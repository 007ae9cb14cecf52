"""kill -9 of targetmirrord under fio with verify, twice, against the real kernel and initiator.

What recovery rests on (see ``reset_stale_ring`` in targetmirror/daemon/device.py): the iSCSI
session never drops (LIO is in the kernel; only the user-space handler dies), commands the dead
daemon left on the ring wait there, and the restarted daemon blocks the device, makes the
kernel fail them with BUSY (reset_ring=1), unblocks and serves.  The initiator's SCSI layer
retries BUSY, so fio never sees an error -- as long as the restart happens within the LUN's
``cmd_time_out`` (kernel default 30 s, kept: the restart takes a few seconds even under TCG;
a command older than that is failed by the kernel with CHECK CONDITION, which Linux does not
retry) and within the initiator's per-command timeout (sd default 30 s, kept).
open-iscsi's ``replacement_timeout`` (default 120 s) plays no part: the connection stays up.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.lab import guest
from tests.lab.mirrord import Mirrord
from tests.lab.test_lab_mirror import Lun

pytestmark = pytest.mark.lab

MiB = guest.MiB


def _fio(dev: str, out: Path, seconds: int) -> subprocess.Popen[bytes]:
    """4 KiB random writes, every block verified (crc32c) while running; fatal on mismatch."""
    return subprocess.Popen(
        ["fio", "--name=restart", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
         "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=96M", "--verify=crc32c",
         "--do_verify=1", "--verify_backlog=256", "--verify_fatal=1", "--time_based",
         f"--runtime={seconds}", f"--output={out}"])


def test_kill9_under_fio_then_restart_twice(mirrord: Mirrord, tmp_path: Path) -> None:
    lun = Lun("l_restart", tmp_path, 128 * MiB, mirrord)
    stat = Path("/sys/block", Path(lun.dev).name, "stat")
    timeout_s = Path("/sys/block", Path(lun.dev).name, "device", "timeout").read_text().strip()
    cfs = next(Path("/sys/kernel/config/target/core").glob("user_*/l_restart"))
    cmd_time_out = (cfs / "attrib" / "cmd_time_out").read_text().strip()
    print(f"LUN cmd_time_out {cmd_time_out} s; initiator sd timeout {timeout_s} s")

    def writes_done() -> int:
        return int(stat.read_text().split()[4])

    def wait_writing(what: str, n: int = 300) -> None:
        base = writes_done()
        guest.wait_for(lambda: writes_done() > base + n, timeout=120, what=what)

    fio = _fio(lun.dev, tmp_path / "fio.txt", 150)
    outages = []
    try:
        # 1: kill -9 during heavy writes
        wait_writing("fio to be writing")
        t0 = time.monotonic()
        assert mirrord.kill9() == -9
        mirrord.start()
        mirrord.wait_serving("l_restart")
        outages.append(time.monotonic() - t0)
        wait_writing("fio to write again after the first restart")
        assert "ring reset before serving" in mirrord.log_text()
        # an unclean stop makes the mirror copy its write-intent extents B -> A before it is
        # whole again (a split is refused until then: A is not a copy yet)
        recovering = mirrord.ctl_json("status", "l_restart")["mirrors"][0]
        print(f"after the first restart: {recovering['state']}, "
              f"{recovering['bitmap']['marked']} regions to recover")
        guest.wait_for(lambda: mirrord.ctl_json("status", "l_restart")["mirrors"][0]["state"]
                       == "mirrored", timeout=300, interval=0.5,
                       what="the recovery resync after kill -9 to finish")

        # 2: kill -9 right after a split under load (during its drain if it still runs)
        split = mirrord.ctl_json("split", "l_restart", "--no-wait")["split"][0]
        t0 = time.monotonic()
        assert mirrord.kill9() == -9
        mirrord.start()
        mirrord.wait_serving("l_restart")
        outages.append(time.monotonic() - t0)
        st = mirrord.ctl_json("status", "l_restart")["mirrors"][0]
        # a split is never lost nor left half done by a crash
        assert st["state"] == "split", st
        assert st["split"]["a_status"] in ("consistent", "crash-consistent"), st
        print(f"split at ring head {split.get('ring_head')}; after the restart A is "
              f"{st['split']['a_status']}")
        wait_writing("fio to write again after the second restart")
        rejoin = mirrord.ctl_json("rejoin", "l_restart")["rejoin"][0]
        assert rejoin["state"] == "mirrored", rejoin
    finally:
        rc = fio.wait(timeout=400)
    report = (tmp_path / "fio.txt").read_text()
    assert rc == 0, report[-3000:]
    assert "err= 0" in report, report[-3000:]
    print(f"outages (kill -9 to serving again): {[f'{s:.1f} s' for s in outages]}")
    ver = mirrord.ctl_json("verify", "l_restart")
    assert ver["mismatches"] == 0, ver
    lun.logout()
    assert lun.images_identical(), "A and B differ after two kill -9 restarts"
    lun.delete()
