"""Mirror lifecycle against the real kernel: split under fio load, change known regions, rejoin
online while fio keeps running with verify, then verify the legs and count what was copied."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.lab import guest
from tests.lab.mirrord import Mirrord, cli
from tests.lab.test_lab_mirror import Lun
from tests.lab.test_lab_mirror import _sha256 as _sha

pytestmark = pytest.mark.lab

MiB = guest.MiB
REGION = 64 * 1024


def _fio_background(dev: str, out: Path, seconds: int) -> subprocess.Popen[bytes]:
    """4 KiB random writes with continuous verification on the upper half of the LUN."""
    return subprocess.Popen(
        ["fio", "--name=load", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
         "--rw=randwrite", "--bs=4k", "--iodepth=8", "--offset=64M", "--size=64M",
         "--verify=crc32c", "--verify_backlog=128", "--verify_fatal=1", "--time_based",
         f"--runtime={seconds}", f"--output={out}"])


def test_split_change_rejoin_under_load(mirrord: Mirrord, tmp_path: Path) -> None:
    lun = Lun("l_rejoin", tmp_path, 128 * MiB, mirrord)
    base = os.urandom(MiB)
    for i in range(0, 64, 8):
        guest.dd_write(lun.dev, i * MiB, base)
    stat = Path("/sys/block", Path(lun.dev).name, "stat")

    def writes_done() -> int:
        return int(stat.read_text().split()[4])

    before = writes_done()
    fio = _fio_background(lun.dev, tmp_path / "fio.txt", 90)
    try:
        guest.wait_for(lambda: writes_done() > before + 200, timeout=60,
                       what="fio to be writing")
        split = mirrord.ctl_json("split", "l_rejoin")["split"][0]
        assert split["state"] == "split"
        # a known set of regions in the lower half, which fio never touches
        known = {r: os.urandom(REGION) for r in (0, 5, 17, 100, 101, 511, 700, 1023)}
        for r, data in known.items():
            guest.dd_write(lun.dev, r * REGION, data)
        st = mirrord.ctl_json("status", "l_rejoin")["mirrors"][0]
        assert st["bitmap"]["marked"] >= len(known)
        rejoin = mirrord.ctl_json("rejoin", "l_rejoin")["rejoin"][0]
        assert rejoin["state"] == "mirrored"
        done = rejoin["last_rejoin"]
        # exactly the marked regions were copied: the known ones plus what fio changed in its
        # 64 MiB (1024 regions) since the split -- never the whole 128 MiB image
        assert len(known) <= done["regions"] <= len(known) + 1024
        assert done["bytes_copied"] == done["regions"] * REGION
        assert done["bytes_copied"] < lun.size
        print(f"rejoin under load: {done['regions']} regions, {done['bytes_copied']} bytes "
              f"copied of {lun.size} in {done['seconds']:.3f} s; "
              f"marked at status time {st['bitmap']['marked']}")
        # fio keeps running on the mirrored LUN; verify under load (regions with writes in
        # flight are compared under their range lock)
        ver = mirrord.ctl_json("verify", "l_rejoin")
        assert ver["mismatches"] == 0, ver
    finally:
        rc = fio.wait(timeout=300)
    assert rc == 0, (tmp_path / "fio.txt").read_text()[-2000:]
    lun.logout()
    assert lun.images_identical(), "A and B differ after a rejoin"
    with lun.a.open("rb") as f:
        for r, data in known.items():
            f.seek(r * REGION)
            assert f.read(REGION) == data, f"region {r} not copied to A"
    final = mirrord.ctl_json("verify", "l_rejoin")
    assert final["mismatches"] == 0 and final["regions_checked"] == lun.size // REGION
    # the admin's whole cycle in one command: split, copy A, rejoin
    dest = tmp_path / "cycle.img"
    cycle = mirrord.ctl_json("backup", "l_rejoin", "--to", str(dest), "--rejoin")
    assert cycle["epoch"] == 3 and cycle["rejoin"]["bytes_copied"] == 0
    assert mirrord.ctl_json("status", "l_rejoin")["mirrors"][0]["state"] == "mirrored"
    assert _sha(dest) == _sha(lun.a)
    lun.delete()


def test_initial_sync_of_an_image_with_data_under_writes(mirrord: Mirrord,
                                                         tmp_path: Path) -> None:
    """claim 2: a mirror made from an existing 1 GiB image A; B is filled online while fio
    writes (with verify) all through the copy.  Two 1 GiB images do not fit the guest's tmpfs
    (RAM), so they live on the lab's scratch disk."""
    size = 1024 * MiB
    name = "l_sync"
    iqn = f"{guest.IQN_PREFIX}:l-sync"
    scratch = guest.scratch_dir()
    a, b = scratch / f"{name}-a.img", scratch / f"{name}-b.img"
    for p in (a, b):
        p.unlink(missing_ok=True)
    guest.run(["dd", "if=/dev/urandom", f"of={a}", "bs=4M", f"count={size // (4 * MiB)}",
               "status=none"], timeout=900)
    with a.open("rb") as f:
        original_head = f.read(MiB)
    mirrord.ctl("create", name, "--size", str(size), "--image-a", str(a), "--image-b",
                str(b), "--create-images", "--initial-sync", "--sync-rate", "24", "--iqn", iqn,
                "--initiator", guest.initiator_name())
    assert mirrord.ctl_json("status", name)["mirrors"][0]["state"] == "syncing"
    guest.iscsi_login(iqn)
    dev = guest.find_scsi_disk(iqn)
    # the initiator sees A's data at once, although B is still being filled
    assert guest.dd_read(dev, 0, MiB) == original_head
    t0 = time.monotonic()
    fio = _fio_background(dev, tmp_path / "fio-sync.txt", 30)
    rc = fio.wait(timeout=300)
    assert rc == 0, (tmp_path / "fio-sync.txt").read_text()[-2000:]
    # fio ran inside the copy, not after it
    mid = mirrord.ctl_json("status", name)["mirrors"][0]
    print(f"after {time.monotonic() - t0:.0f} s of fio: {mid['state']}, {mid['resync']}")
    assert mid["state"] == "syncing", mid
    guest.wait_for(lambda: mirrord.ctl_json("status", name)["mirrors"][0]["state"]
                   == "mirrored", timeout=900, interval=1, what="the initial sync to finish")
    st = mirrord.ctl_json("status", name)["mirrors"][0]
    print(f"initial sync of {size} bytes: {st['last_sync']}")
    ver = mirrord.ctl_json("verify", name, timeout=900)
    assert ver["mismatches"] == 0, ver
    guest.iscsi_logout(iqn)
    assert _sha(a) == _sha(b)
    cli("delete", name, "--iqn", iqn)
    a.unlink()
    b.unlink()

