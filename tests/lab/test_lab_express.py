"""The express lane against the real kernel: fio with verify through iSCSI, mirrored and split.

Proves, with a real initiator and target_core_user:

* the compiled lane loads in the guest and serves most of a 4 KiB random read/write load
  (``status`` counts what it answered and why each run stopped);
* fio's own verification passes: every byte the lane acknowledged reads back;
* mirrored, the lane writes both legs (A == B byte for byte once the LUN is quiet);
* split, it writes B only: A's hash at the split is A's hash after a second verified fio run,
  the lane served part of that run, and the rejoin copies only marked regions back.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.lab import guest
from tests.lab.mirrord import Mirrord
from tests.lab.test_lab_mirror import Lun
from tests.lab.test_lab_mirror import _sha256 as _sha

pytestmark = pytest.mark.lab

MiB = guest.MiB


def _fio(dev: str, out: Path, rw: str, seconds: int) -> None:
    """4 KiB random I/O at queue depth 16 over the first 32 MiB, verified by fio itself."""
    rc = subprocess.run(
        ["fio", "--name=express", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
         f"--rw={rw}", "--rwmixwrite=70", "--bs=4k", "--iodepth=16", "--size=32M",
         "--verify=crc32c", "--verify_backlog=256", "--verify_fatal=1", "--time_based",
         f"--runtime={seconds}", f"--output={out}"], timeout=seconds + 300).returncode
    text = out.read_text()
    assert rc == 0 and "err= 0" in text, text[-2000:]


def _express(mirrord: Mirrord, name: str) -> tuple[dict, int]:
    st = mirrord.ctl_json("status", name)["mirrors"][0]
    assert "express" in st, ("the express lane is not running in the guest; see the "
                             f"daemon log:\n{mirrord.log_text()[-2000:]}")
    return st["express"], st["commands"]


def test_express_lane_mirrored_and_split(mirrord: Mirrord, tmp_path: Path) -> None:
    lun = Lun("l_ex", tmp_path, 64 * MiB, mirrord)
    _fio(lun.dev, tmp_path / "fio1.txt", "randrw", 25)
    ex1, cmds1 = _express(mirrord, "l_ex")
    print(f"mirrored: {ex1['commands']} of {cmds1} commands served by the lane; "
          f"runs {ex1['runs']}, stops {ex1['stops']}")
    assert ex1["commands"] > cmds1 // 2, (ex1, cmds1)
    assert mirrord.ctl_json("verify", "l_ex")["mismatches"] == 0

    split = mirrord.ctl_json("split", "l_ex")["split"][0]
    assert split["state"] == "split", split
    a_at_split = _sha(lun.a)
    _fio(lun.dev, tmp_path / "fio2.txt", "randwrite", 15)
    ex2, cmds2 = _express(mirrord, "l_ex")
    print(f"split: {ex2['commands'] - ex1['commands']} of {cmds2 - cmds1} commands served "
          f"by the lane; stops {ex2['stops']}")
    assert ex2["commands"] - ex1["commands"] > (cmds2 - cmds1) // 2, (ex1, ex2, cmds1, cmds2)
    assert _sha(lun.a) == a_at_split, "a write reached A after the split"
    assert _sha(lun.b) != a_at_split
    st = mirrord.ctl_json("status", "l_ex")["mirrors"][0]
    marked = st["bitmap"]["marked"]
    rejoin = mirrord.ctl_json("rejoin", "l_ex")["rejoin"][0]
    assert rejoin["state"] == "mirrored", rejoin
    # fio touched only the first 32 MiB: the rejoin copies at most those regions
    assert 0 < rejoin["last_rejoin"]["regions"] <= marked, (rejoin, marked)
    assert rejoin["last_rejoin"]["bytes_copied"] <= 32 * MiB
    lun.logout()
    assert lun.images_identical(), "A and B differ after the rejoin"
    lun.delete()
