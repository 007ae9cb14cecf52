"""Lab: bad input against the real kernel is refused end to end and changes nothing.

One boot, one test (the CI budget is small):

* targetcli (over D-Bus, asking targetmirrord's CheckConfig) refuses to create a
  ``user:mirror`` backstore whose cfgstring has ``..`` or whose image is a symlink out of the
  daemon's ``--image-dir``; no backstore appears.
* The same symlink cfgstring made by hand through rtslib (as a restored saved config would be)
  reaches the daemon, which refuses to serve it: a real initiator's commands on that LUN get
  CHECK CONDITION, NOT READY / MANUAL INTERVENTION REQUIRED (04/03), and neither the file the
  symlink points to nor the other image changes, even after a WRITE.
* Malformed CDBs sent by a real initiator with ``sg_raw`` to a good LUN get the right CHECK
  CONDITION (an unknown opcode, a reserved bit, an INQUIRY page without EVPD, an LBA past the
  end), and the LUN keeps serving.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.lab import guest
from tests.lab.mirrord import Mirrord
from tests.lab.test_lab_face import start_system_bus, stop_system_bus, targetcli

pytestmark = pytest.mark.lab

MiB = guest.MiB
SIZE = 16 * MiB
IQN = f"{guest.IQN_PREFIX}:badinput"


def _image(path: Path, fill: int) -> Path:
    with path.open("wb") as f:
        f.write(bytes([fill]) * SIZE)
    return path


def sg_raw(dev: str, cdb: str, *, data_in: int = 0, data_out: Path | None = None
           ) -> tuple[int, str]:
    """Send one CDB (hex bytes) with sg_raw; (exit status, lower-cased output)."""
    cmd = ["sg_raw"]
    if data_in:
        cmd += ["-r", str(data_in)]
    if data_out is not None:
        cmd += ["-s", str(data_out.stat().st_size), "-i", str(data_out)]
    proc = subprocess.run([*cmd, dev, *cdb.split()], capture_output=True, text=True,
                          timeout=60, check=False)
    return proc.returncode, (proc.stdout + proc.stderr).lower()


def check_condition(out: str, key: str, additional: str) -> None:
    assert "check condition" in out, out
    assert re.search(rf"sense key: {key}", out), out
    assert additional in out, out


def _disk(lun: int) -> str:
    """/dev/sdX of LUN ``lun`` even when it reports no capacity (a NOT READY unit)."""
    name = guest.wait_for(lambda: (guest._session_disks(IQN, lun) or [None])[0],
                          timeout=60, what=f"LUN {lun} as a disk")
    return guest.ensure_dev_node(name)


def test_bad_input_is_refused_end_to_end(lio: object, tmp_path: Path) -> None:
    images = tmp_path / "images"
    outside = tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    good_a, good_b = _image(images / "good-a.img", 0), _image(images / "good-b.img", 0)
    evil = _image(outside / "evil.img", 0xEE)
    bad_b = _image(images / "bad-b.img", 0xBB)
    (images / "link.img").symlink_to(evil)
    traversal = f"a={images}/../outside/evil.img;b={bad_b}"
    symlink = f"a={images}/link.img;b={bad_b}"

    bus_pid = start_system_bus()
    daemon = Mirrord(tmp_path / "targetmirrord.log")
    daemon.extra_args = ["--image-dir", str(images)]
    daemon.start()
    try:
        # -- targetcli asks the daemon first and creates nothing ------------------------------
        for name, cfg, why in (("bi_dots", traversal, "normalised"),
                               ("bi_link", symlink, "outside the image directories")):
            proc = targetcli("/backstores/user:mirror", "create", f"name={name}", "size=16M",
                             f"cfgstring={cfg}", check=False)
            out = proc.stdout + proc.stderr
            assert "cfgstring invalid" in out and why in out, out
        listing = targetcli("ls", "/backstores").stdout
        assert "bi_dots" not in listing and "bi_link" not in listing, listing

        # -- made by hand anyway: served NOT READY, nothing touched -----------------------------
        good = guest.create_user_backstore("bi_good", "mirror", f"a={good_a};b={good_b}", SIZE)
        daemon.wait_serving("bi_good")
        bad = guest.create_user_backstore("bi_hand", "mirror", symlink, SIZE)
        guest.wait_for(lambda: "cannot serve bi_hand" in daemon.log_text(), timeout=60,
                       what="targetmirrord to refuse bi_hand")
        st = {m["name"]: m for m in daemon.ctl_json("status")["mirrors"]}
        assert st["bi_hand"]["state"] == "not-ready", st
        assert "outside the image directories" in st["bi_hand"]["reason"], st
        export = guest.export_iscsi(good, iqn=IQN, lun=0)
        from rtslib_fb import LUN, MappedLUN, NodeACL

        tpg = next(export.target.tpgs)
        MappedLUN(NodeACL(tpg, guest.initiator_name()), 1, LUN(tpg, lun=1, storage_object=bad))
        guest.iscsi_login(IQN)
        try:
            good_dev, bad_dev = _disk(0), _disk(1)
            payload = tmp_path / "payload"
            payload.write_bytes(b"\x42" * 512)
            for cdb, kw in (("00 00 00 00 00 00", {}),
                            ("28 00 00 00 00 00 00 00 01 00", {"data_in": 512}),
                            ("2a 00 00 00 00 00 00 00 01 00", {"data_out": payload})):
                rc, out = sg_raw(bad_dev, cdb, **kw)  # type: ignore[arg-type]
                assert rc != 0
                check_condition(out, "not ready", "manual intervention required")
            assert evil.read_bytes() == b"\xee" * SIZE
            assert bad_b.read_bytes() == b"\xbb" * SIZE

            # -- malformed CDBs from a real initiator on the good LUN -----------------------
            cases = (
                ("c5 00 00 00 00 00 00 00 00 00", "illegal request",
                 "invalid command operation code"),
                ("00 01 00 00 00 00", "illegal request", "invalid field in cdb"),
                ("12 00 83 00 60 00", "illegal request", "invalid field in cdb"),
                ("28 00 ff ff ff 00 00 00 01 00", "illegal request",
                 "logical block address out of range"),
            )
            for cdb, key, additional in cases:
                rc, out = sg_raw(good_dev, cdb, data_in=512 if cdb[:2] in ("12", "28") else 0)
                assert rc != 0, (cdb, out)
                check_condition(out, key, additional)
            rc, out = sg_raw(good_dev, "2a 00 00 00 00 08 00 00 01 00", data_out=payload)
            assert rc == 0, out
            rc, out = sg_raw(good_dev, "28 00 00 00 00 08 00 00 01 00", data_in=512)
            assert rc == 0, out
            with good_a.open("rb") as fa, good_b.open("rb") as fb:
                fa.seek(8 * 512)
                fb.seek(8 * 512)
                assert fa.read(512) == fb.read(512) == b"\x42" * 512
        finally:
            guest.iscsi_logout(IQN)
            export.delete()
    finally:
        status = daemon.stop()
        log = daemon.log_text()
        print(f"--- targetmirrord log (exit status {status}) ---\n{log[-6000:]}")
        stop_system_bus(bus_pid)
    assert status == 0, "targetmirrord did not shut down cleanly on SIGTERM"
    assert "Traceback" not in log, "targetmirrord logged a traceback"
