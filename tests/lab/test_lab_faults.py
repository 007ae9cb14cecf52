"""A failing leg against the real kernel: leg A on a device-mapper device that is switched to
the ``error`` target while fio writes with verify through the iSCSI initiator.

Proves: the initiator sees no I/O error (fio's verify passes), ``status`` says DEGRADED with the
reason, and after the dm table is restored ``targetmirror repair`` resyncs A online, ``verify``
finds 0 mismatches and A equals B byte for byte.  Then both legs of a second mirror fail, and
the initiator gets an I/O error, not success.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.lab import guest
from tests.lab.mirrord import Mirrord, cli

pytestmark = pytest.mark.lab

MiB = guest.MiB
SIZE = 64 * MiB
SECTORS = SIZE // 512
LOAD = 16 * MiB
"""fio writes the first quarter only, so the repair is visibly incremental."""


def _block_modules() -> None:
    """loop (a block device over a file) and device-mapper; devtmpfs makes the nodes."""
    guest.run(["modprobe", "-a", "loop", "dm_mod"], check=False)
    if not os.path.exists("/dev/loop-control"):
        raise guest.GuestError("no /dev/loop-control after modprobe loop")


class DmLeg:
    """A loop device over a file, under a dm ``linear`` device whose table can be switched."""

    def __init__(self, name: str, backing: Path) -> None:
        self.name = name
        with backing.open("wb") as f:
            f.truncate(SIZE)
        self.loop = guest.run(["losetup", "-f", "--show", str(backing)]).stdout.strip()
        self.linear = f"0 {SECTORS} linear {self.loop} 0"
        guest.run(["dmsetup", "create", "--noudevsync", name, "--table", self.linear])
        guest.run(["dmsetup", "mknodes", name])
        self.path = f"/dev/mapper/{name}"
        assert os.path.exists(self.path)

    def switch(self, table: str) -> None:
        guest.run(["dmsetup", "reload", "--noudevsync", self.name, "--table", table])
        guest.run(["dmsetup", "resume", "--noudevsync", self.name])

    def fail(self) -> None:
        self.switch(f"0 {SECTORS} error")

    def restore(self) -> None:
        self.switch(self.linear)

    def remove(self) -> None:
        guest.run(["dmsetup", "remove", "--noudevsync", self.name], check=False)
        guest.run(["losetup", "-d", self.loop], check=False)


def _sha(path: str, size: int = SIZE) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        left = size
        while left:
            chunk = os.read(fd, min(4 * MiB, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _create(name: str, a: str, b: str) -> str:
    iqn = f"{guest.IQN_PREFIX}:{name.replace('_', '-')}"
    cli("create", name, "--size", str(SIZE), "--image-a", a, "--image-b", b, "--iqn", iqn,
        "--initiator", guest.initiator_name())
    return iqn


def test_leg_a_fails_under_fio_then_repair(mirrord: Mirrord, tmp_path: Path) -> None:
    _block_modules()
    leg = DmLeg("tm_faults_a", tmp_path / "a-backing.img")
    b = tmp_path / "f_dm-b.img"
    with b.open("wb") as f:
        f.truncate(SIZE)
    name = "f_dm"
    iqn = _create(name, leg.path, str(b))
    try:
        mirrord.wait_serving(name)
        guest.iscsi_login(iqn)
        dev = guest.find_scsi_disk(iqn)
        stat = Path("/sys/block", Path(dev).name, "stat")
        before = int(stat.read_text().split()[4])
        out = tmp_path / "fio.txt"
        # fsync every 16 writes: SYNCHRONIZE CACHE reaches the legs, as a filesystem's would
        fio = subprocess.Popen(
            ["fio", "--name=load", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
             "--rw=randwrite", "--bs=4k", "--iodepth=8", f"--size={LOAD}",
             "--fsync=16", "--verify=crc32c", "--verify_backlog=64", "--verify_fatal=1",
             "--time_based", "--runtime=40", f"--output={out}"])
        try:
            guest.wait_for(lambda: int(stat.read_text().split()[4]) > before + 300,
                           timeout=120, what="fio to be writing")
            leg.fail()
            guest.wait_for(lambda: mirrord.ctl_json("status", name)["mirrors"][0]["health"]
                           == "degraded", timeout=120, interval=0.5,
                           what="the mirror to notice that A fails")
        finally:
            rc = fio.wait(timeout=600)
        report = out.read_text()
        assert rc == 0, report[-3000:]
        assert "err= 0" in report, report[-3000:]
        st = mirrord.ctl_json("status", name)["mirrors"][0]
        assert st["health"] == "degraded" and set(st["failed_legs"]) == {"a"}, st
        reason = st["failed_legs"]["a"]["reason"]
        assert "EIO" in reason or "Input/output" in reason, reason
        text = mirrord.ctl("status", name).stdout
        assert "DEGRADED" in text and "leg A failed" in text, text
        assert "leg A FAILED" in mirrord.log_text()
        marked = st["bitmap"]["marked"]
        print(f"degraded: {reason}; {marked} regions marked of {st['bitmap']['regions']}")
        # verify is refused while degraded (A is known stale)
        assert mirrord.ctl("verify", name, check=False).returncode == 1

        # the admin fixes the device; repair copies what A missed, online
        leg.restore()
        started = mirrord.ctl_json("repair", name, "--no-wait")
        assert started["health"] == "ok" and started["state"] in ("rejoining", "mirrored")
        guest.wait_for(lambda: mirrord.ctl_json("status", name)["mirrors"][0]["state"]
                       == "mirrored", timeout=900, interval=1, what="the repair to finish")
        rep = mirrord.ctl_json("status", name)["mirrors"][0]
        assert rep["health"] == "ok" and rep["last_repair"] is not None, rep
        copied = rep["last_repair"]["bytes_copied"]
        print(f"repair: {copied} bytes copied of {SIZE} "
              f"({rep['last_repair']['regions']} regions) in "
              f"{rep['last_repair']['seconds']:.2f} s")
        assert 0 < copied <= marked * st["bitmap"]["region_size"]
        assert copied <= LOAD, "the repair copied more than the degraded writes touched"
        ver = mirrord.ctl_json("verify", name)
        assert ver["mismatches"] == 0, ver
        guest.iscsi_logout(iqn)
        guest.drop_caches()
        assert _sha(leg.path) == _sha(str(b)), "A and B differ after the repair"
        cli("delete", name, "--iqn", iqn)
    finally:
        guest.iscsi_logout_all()
        leg.remove()


def test_both_legs_failing_is_an_io_error_at_the_initiator(mirrord: Mirrord,
                                                           tmp_path: Path) -> None:
    _block_modules()
    la = DmLeg("tm_faults_2a", tmp_path / "2a.img")
    lb = DmLeg("tm_faults_2b", tmp_path / "2b.img")
    name = "f_both"
    iqn = _create(name, la.path, lb.path)
    try:
        mirrord.wait_serving(name)
        guest.iscsi_login(iqn)
        dev = guest.find_scsi_disk(iqn)
        guest.dd_write(dev, 0, os.urandom(MiB))
        la.fail()
        lb.fail()
        # the write lands in the legs' page caches; the SYNCHRONIZE CACHE that conv=fsync
        # sends reaches both failed devices: the initiator must hear about it
        proc = guest.run(["dd", "if=/dev/urandom", f"of={dev}", "bs=4k", "count=16",
                          "seek=1000", "oflag=direct", "conv=fsync,notrunc", "status=none"],
                         check=False)
        assert proc.returncode != 0, "a write to a mirror with no working leg succeeded"
        st = mirrord.ctl_json("status", name)["mirrors"][0]
        assert st["health"] == "failed" and set(st["failed_legs"]) == {"a", "b"}, st
        rd = guest.run(["dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=4", "skip=2000",
                        "iflag=direct", "status=none"], check=False)
        assert rd.returncode != 0, "a read from a mirror with no working leg succeeded"
        print(f"both legs failed: write rc={proc.returncode} ({proc.stderr.strip()[:120]}), "
              f"read rc={rd.returncode}")
        guest.iscsi_logout(iqn)
        cli("delete", name, "--iqn", iqn)
    finally:
        guest.iscsi_logout_all()
        la.remove()
        lb.remove()
