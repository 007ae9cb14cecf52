"""Split against the real kernel: split a live LUN over iSCSI, back up A, restart the daemon.

The exhaustive proof that A holds exactly the pre-split writes is in
tests/lab/test_lab_split_proof.py (sequence-numbered writers) and, in-process, in
tests/daemon/test_split_checker.py; this test covers the admin's path end to end.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.lab import guest
from tests.lab.mirrord import Mirrord, cli
from tests.lab.test_lab_mirror import Lun

pytestmark = pytest.mark.lab

MiB = guest.MiB


def _read(path: Path, offset: int, n: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(n)


def test_split_backup_and_restart(mirrord: Mirrord, tmp_path: Path) -> None:
    lun = Lun("s_basic", tmp_path, 64 * MiB, mirrord)
    before = os.urandom(MiB)
    guest.dd_write(lun.dev, 0, before)
    assert mirrord.ctl_json("status", "s_basic")["mirrors"][0]["state"] == "mirrored"

    res = mirrord.ctl_json("split", "s_basic")["split"][0]
    assert res["state"] == "split"
    assert res["epoch"] == 1
    assert res["split"]["a_status"] == "consistent"
    assert res["split"]["instant_wall"] is not None

    after = os.urandom(MiB)
    guest.dd_write(lun.dev, 0, after)              # post-split: B only
    assert guest.dd_read(lun.dev, 0, MiB) == after  # reads come from B
    assert _read(lun.a, 0, MiB) == before
    assert _read(lun.b, 0, MiB) == after

    again = mirrord.ctl("split", "s_basic", check=False)
    assert again.returncode == 1 and "not mirrored" in again.stderr

    # backup copies A (the pre-split data), leaves the mirror split
    dest = tmp_path / "backup.img"
    out = mirrord.ctl_json("backup", "s_basic", "--to", str(dest))
    assert out["epoch"] == 1
    assert _read(dest, 0, MiB) == before
    assert dest.stat().st_size == lun.size
    ran = mirrord.ctl_json("backup", "s_basic", "--exec", "sh", "-c",
                           f'cmp "$TARGETMIRROR_IMAGE" {dest} && test "$TARGETMIRROR_EPOCH" = 1')
    assert ran["exec_status"] == 0

    # the split copy exported read-only over iSCSI (claim 5): reads give A, writes are refused
    snap_iqn = f"{guest.IQN_PREFIX}:s-basic-snap"
    mirrord.ctl("export-snapshot", "s_basic", "--iqn", snap_iqn, "--initiator",
                guest.initiator_name())
    mirrord.wait_serving("s_basic_snap")
    assert mirrord.ctl_json("status", "s_basic_snap")["mirrors"][0]["state"] == "snapshot"
    guest.iscsi_login(snap_iqn)
    snap_dev = guest.find_scsi_disk(snap_iqn)
    assert guest.dd_read(snap_dev, 0, MiB) == before
    with pytest.raises(guest.GuestError):
        guest.dd_write(snap_dev, 0, os.urandom(4096))
    guest.iscsi_logout(snap_iqn)
    cli("delete", "s_basic_snap", "--iqn", snap_iqn)
    assert _read(lun.a, 0, MiB) == before

    # restart: the split survives, A stays frozen, writes still go to B only
    lun.logout()
    assert mirrord.stop() == 0
    mirrord.start()
    mirrord.wait_serving("s_basic")
    st = mirrord.ctl_json("status", "s_basic")["mirrors"][0]
    assert st["state"] == "split" and st["epoch"] == 1
    lun.login()
    third = os.urandom(MiB)
    guest.dd_write(lun.dev, 4 * MiB, third)
    lun.logout()
    assert _read(lun.a, 4 * MiB, MiB) != third
    assert _read(lun.b, 4 * MiB, MiB) == third
    assert _read(lun.a, 0, MiB) == before
    lun.delete()


def test_split_at_a_scheduled_time(mirrord: Mirrord, tmp_path: Path) -> None:
    lun = Lun("s_sched", tmp_path, 32 * MiB, mirrord)
    out = mirrord.ctl_json("split", "s_sched", "--at", "+2")
    assert out["scheduled"]["names"] == ["s_sched"]
    guest.wait_for(
        lambda: mirrord.ctl_json("status", "s_sched")["mirrors"][0]["state"] == "split",
        timeout=60, what="the scheduled split")
    st = mirrord.ctl_json("status", "s_sched")["mirrors"][0]
    assert st["split"]["instant_wall"] >= out["scheduled"]["at"]
    lun.logout()
    lun.delete()
