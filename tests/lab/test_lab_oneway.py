"""One-way cut-over (claim 4) against the real kernel: one mirror exported as two iSCSI LUNs.

Volume 1 is the mirror's own backstore, volume 2 a second ``user:mirror`` backstore whose
cfgstring names the mirror (``targetmirror create-volume2``).  After ``split --one-way`` the
bytes on the images show where each volume's writes went.
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
REGION = 64 * 1024


def _at(path: Path, offset: int, length: int = REGION) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def test_one_way_split_routes_each_volume(mirrord: Mirrord, tmp_path: Path) -> None:
    lun = Lun("l_ow", tmp_path, 64 * MiB, mirrord)
    iqn2 = f"{guest.IQN_PREFIX}:l-ow2"
    cli("create-volume2", "l_ow2", "--of", "l_ow", "--iqn", iqn2, "--initiator",
        guest.initiator_name())
    mirrord.wait_serving("l_ow2")
    guest.iscsi_login(iqn2)
    dev2 = guest.find_scsi_disk(iqn2)
    st = mirrord.ctl_json("status", "l_ow")["mirrors"][0]
    assert st["volume2"] == ["l_ow2"], st

    # mirrored: volume 2 writes both legs, and volume 1 reads it
    d0 = os.urandom(REGION)
    guest.dd_write(dev2, 0, d0)
    assert guest.dd_read(lun.dev, 0, REGION) == d0
    split = mirrord.ctl_json("split", "l_ow", "--one-way")["split"][0]
    assert split["state"] == "one-way", split
    d1, d2 = os.urandom(REGION), os.urandom(REGION)
    guest.dd_write(lun.dev, 10 * REGION, d1)   # volume 1 (old path)
    guest.dd_write(dev2, 20 * REGION, d2)      # volume 2 (new path)
    # B holds everything, so both volumes read the same data
    assert guest.dd_read(lun.dev, 20 * REGION, REGION) == d2
    assert guest.dd_read(dev2, 10 * REGION, REGION) == d1
    assert _at(lun.a, 0) == _at(lun.b, 0) == d0
    assert _at(lun.a, 10 * REGION) == _at(lun.b, 10 * REGION) == d1, "volume 1 missed a leg"
    assert _at(lun.b, 20 * REGION) == d2
    assert _at(lun.a, 20 * REGION) == bytes(REGION), "a volume 2 write reached A"
    st = mirrord.ctl_json("status", "l_ow")["mirrors"][0]
    # marked: volume 2's change (region 20) and the write-intent bits of volume 1's write
    # (region 10) and, unless a clear pass ran before the split, of the mirrored write to
    # region 0 -- write-intent bits are cleared only while mirrored, so a rejoin copies them too
    marked = st["bitmap"]["marked"]
    assert st["state"] == "one-way" and marked in (2, 3), st
    ver = mirrord.ctl_json("verify", "l_ow")
    assert ver["mismatches"] == 0 and ver["regions_skipped_changed"] == marked, ver
    print(f"one-way split: {split['split']}; verify {ver}")

    # calling the cut-over off: rejoin copies volume 2's change to A
    rejoin = mirrord.ctl_json("rejoin", "l_ow")["rejoin"][0]
    assert rejoin["state"] == "mirrored" and rejoin["last_rejoin"]["regions"] == marked, rejoin
    guest.iscsi_logout(iqn2)
    lun.logout()
    assert lun.images_identical()
    cli("delete", "l_ow2", "--iqn", iqn2)
    lun.delete()
