"""A mirror whose leg A is an RBD image, against the real kernel and a real initiator.

The Ceph cluster (one monitor, one memstore OSD, no cephx) runs *inside the guest* on 127.0.0.1:
the guest has no network, and a cluster on the host would make the test depend on a second
machine's state.  Leg B is a local file on guest tmpfs.

Proves, in one boot: ext4 on the LUN under fio write+verify; the filesystem frozen, the LUN's
bytes hashed, split, thawed; ``backup --rbd-snapshot`` snapshots A in the cluster and records
it; writes after the split reach B only; an online rejoin copies only the changed regions and
``verify`` finds 0 mismatches; the snapshot exported read-only as a LUN holds exactly the bytes
hashed at the split instant and fscks clean; then, under fio again, the OSD is SIGKILLed: leg A
fails into DEGRADED with ETIMEDOUT and fio completes with no error at the initiator.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests import cephcluster
from tests.lab import guest
from tests.lab.mirrord import Mirrord, cli

pytestmark = pytest.mark.lab

MiB = guest.MiB
SIZE = 64 * MiB
TIMEOUT = 5
"""The RBD leg's operation timeout (a_timeout): well under LIO's 30 s command timeout."""


_T0 = time.monotonic()


def _step(what: str) -> None:
    """Note progress with the time since the test began, where the host can read it during
    the run (the lab's output folder) and in the test's output."""
    line = f"{time.monotonic() - _T0:7.1f} s  {what}"
    print(line)
    out = os.environ.get("TARGETMIRROR_LAB_OUT")
    if out and os.path.isdir(out):
        with contextlib.suppress(OSError), open(os.path.join(out, "test_lab_rbd.steps"),
                                                "a") as f:
            f.write(line + "\n")


def _sha_dev(dev: str, size: int = SIZE) -> str:
    """SHA-256 of a block device's first ``size`` bytes, read with O_DIRECT (no page cache)."""
    out = guest.run(["sh", "-c", f"dd if={dev} bs=1M count={size // MiB} iflag=direct "
                     "status=none | sha256sum"], timeout=300).stdout
    return out.split()[0]


def _sha_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fio(args: list[str], out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["fio", "--ioengine=libaio", "--direct=1", "--bs=4k",
                             "--iodepth=8", "--verify=crc32c", "--verify_fatal=1",
                             f"--output={out}", *args])


def _fio_ok(proc: subprocess.Popen[bytes], out: Path) -> str:
    rc = proc.wait(timeout=600)
    report = out.read_text()
    assert rc == 0 and "err= 0" in report, report[-3000:]
    return report


def test_rbd_leg_split_snapshot_rejoin_and_osd_loss(mirrord: Mirrord, tmp_path: Path) -> None:
    why = cephcluster.missing()
    assert why is None, why  # the lab image installs Ceph: a skip here would hide a regression
    # a short directory: its ceph.conf path goes into the 255-byte cfgstring
    ceph = cephcluster.CephCluster(Path(tempfile.mkdtemp(prefix="tmceph", dir="/tmp")))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    name, iqn = "r_rbd", f"{guest.IQN_PREFIX}:r-rbd"
    snap_iqn = f"{guest.IQN_PREFIX}:r-rbd-snap"
    mounted = False
    try:
        global _T0
        _T0 = time.monotonic()
        ceph.start()
        _step("cluster started")
        ceph.create_image("lab-a", SIZE)
        b = tmp_path / "r-b.img"
        with b.open("wb") as f:
            f.truncate(SIZE)
        cli("create", name, "--size", str(SIZE), "--image-a", ceph.spec("lab-a"),
            "--image-b", str(b), "--ceph-conf", str(ceph.conf),
            "--ceph-timeout", str(TIMEOUT), "--iqn", iqn,
            "--initiator", guest.initiator_name())
        mirrord.wait_serving(name)
        st = mirrord.ctl_json("status", name)["mirrors"][0]
        assert st["image_a"] == "rbd/rbd/lab-a" and st["state"] == "mirrored", st
        guest.iscsi_login(iqn)
        dev = guest.find_scsi_disk(iqn)
        _step("mirror served, initiator logged in")

        # ext4 under fio write + verify
        guest.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                   dev])
        guest.run(["mount", dev, str(mnt)])
        mounted = True
        _fio_ok(_fio(["--name=pre", f"--directory={mnt}", "--size=8M", "--rw=randwrite"],
                     tmp_path / "fio-pre.txt"), tmp_path / "fio-pre.txt")
        pre_file = _sha_file(mnt / "pre.0.0")
        _step("ext4 + fio verify done")

        # the split instant: filesystem frozen, its bytes hashed through the initiator
        guest.run(["sync"])
        guest.run(["fsfreeze", "-f", str(mnt)])
        try:
            at_split = _sha_dev(dev)
            res = mirrord.ctl_json("split", name)
        finally:
            guest.run(["fsfreeze", "-u", str(mnt)])
        assert res["split"][0]["state"] == "split", res
        _step("split")

        # a snapshot of A in the cluster, recorded there
        bk = mirrord.ctl_json("backup", name, "--rbd-snapshot", "--keep", "3")
        snap = bk["rbd_snapshot"]
        assert snap.startswith(f"tm-{name}-e1-"), bk
        listed = mirrord.ctl_json("rbd-snapshots", name)["snapshots"]
        assert [s["snapshot"] for s in listed] == [snap] and listed[0]["epoch"] == 1
        _step(f"RBD snapshot {snap} taken and listed")

        # after the split: B only; then an online rejoin copies only what changed
        _fio_ok(_fio(["--name=post", f"--directory={mnt}", "--size=4M", "--rw=randwrite"],
                     tmp_path / "fio-post.txt"), tmp_path / "fio-post.txt")
        guest.run(["sync"])
        st = mirrord.ctl_json("status", name)["mirrors"][0]
        marked, region = st["bitmap"]["marked"], st["bitmap"]["region_size"]
        assert marked > 0
        mirrord.ctl("rejoin", name)
        st = mirrord.ctl_json("status", name)["mirrors"][0]
        assert st["state"] == "mirrored" and st["health"] == "ok", st
        copied = st["last_rejoin"]["bytes_copied"]
        print(f"rejoin: {copied} bytes copied of {SIZE} ({marked} regions of {region} marked)")
        assert 0 < copied <= marked * region and copied < SIZE // 2
        ver = mirrord.ctl_json("verify", name)
        assert ver["mismatches"] == 0 and ver["bytes_compared"] == SIZE, ver
        _step(f"rejoined ({copied} bytes copied), verify 0 mismatches")

        # the snapshot as a read-only LUN: exactly the split instant's bytes, fsck clean
        mirrord.ctl("export-snapshot", name, "--rbd-snapshot", snap, "--iqn", snap_iqn,
                    "--initiator", guest.initiator_name())
        mirrord.wait_serving(f"{name}_snap")
        guest.iscsi_login(snap_iqn)
        sdev = guest.find_scsi_disk(snap_iqn)
        assert _sha_dev(sdev) == at_split, "the RBD snapshot differs from the split instant"
        fsck = guest.run(["e2fsck", "-fn", sdev], check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        smnt = tmp_path / "snap"
        smnt.mkdir()
        guest.run(["mount", "-o", "ro,noload", sdev, str(smnt)])
        try:
            assert _sha_file(smnt / "pre.0.0") == pre_file
            assert not (smnt / "post.0.0").exists()
        finally:
            guest.run(["umount", str(smnt)])
        with pytest.raises(guest.GuestError):
            guest.dd_write(sdev, 0, os.urandom(4096))
        guest.iscsi_logout(snap_iqn)
        cli("delete", f"{name}_snap", "--iqn", snap_iqn)
        _step("snapshot LUN checked")

        # the cluster goes away under load: A fails, the initiator sees nothing
        stat = Path("/sys/block", Path(dev).name, "stat")
        before = int(stat.read_text().split()[4])
        out = tmp_path / "fio-kill.txt"
        fio = _fio(["--name=kill", f"--directory={mnt}", "--size=8M", "--rw=randwrite",
                    "--fsync=16", "--verify_backlog=64", "--time_based", "--runtime=25"], out)
        try:
            guest.wait_for(lambda: int(stat.read_text().split()[4]) > before + 200,
                           timeout=120, what="fio to be writing")
            ceph.kill_osd()
            _step("OSD killed under fio")
            guest.wait_for(lambda: mirrord.ctl_json("status", name)["mirrors"][0]["health"]
                           == "degraded", timeout=120, interval=0.5,
                           what="leg A to fail after the OSD died")
        finally:
            report = _fio_ok(fio, out)
        st = mirrord.ctl_json("status", name)["mirrors"][0]
        assert set(st["failed_legs"]) == {"a"}, st
        reason = st["failed_legs"]["a"]["reason"]
        assert "ETIMEDOUT" in reason or "no answer" in reason, reason
        assert "DEGRADED" in mirrord.ctl("status", name).stdout
        print(f"OSD killed: leg A failed ({reason}); fio: "
              + next((ln.strip() for ln in report.splitlines() if "WRITE:" in ln), "?"))
        guest.run(["umount", str(mnt)])
        mounted = False
        fsck = guest.run(["e2fsck", "-fn", str(b)], check=False)  # B alone holds the LUN
        guest.iscsi_logout(iqn)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        cli("delete", name, "--iqn", iqn)
        _step("degraded, fio clean, B fscks clean")
    finally:
        if mounted:
            guest.run(["umount", "-l", str(mnt)], check=False)
        guest.iscsi_logout_all()
        ceph.wipe()
