"""An RBD leg's late write cannot land after its repair (issue 19, item 6), in the lab guest.

librados gives up on a timed-out operation on the client side only: a write whose message has
already left can still be applied by an OSD afterwards.  Here that is made to happen on
purpose: the guest's loopback holds every packet from leg A's client to the OSD for
:data:`LATE` seconds (``tc netem`` on that one TCP flow, found with ``ss``), so a write to A
reaches the OSD long after the leg failed (ETIMEDOUT after the cluster timeout) -- an OSD
applying a write late, as one that was paused or partitioned would.  Meanwhile the initiator
writes the same block again (B only: A is failed), and ``targetmirror repair`` copies it to A
over a new client.  When the held write finally reaches the OSD:

* a **control** pair of plain clients on a second image, treated the same way without a fence,
  shows the hazard is real: the late write lands after the newer one and wins;
* the mirror's repair **fenced** the old client (blocklisted it and waited for that OSD map
  before opening the image), so the OSD refuses the late write: A == B afterwards.

A paused OSD (SIGSTOP) cannot show this with one OSD: the repair needs that OSD too, and when it
resumes it reads the held write before anything the repair sends.  Both images are created
without exclusive-lock: with it, librbd orders the old client's unlock behind its late write,
which closes this window for such images by itself (at the price of a repair that waits).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from targetmirror.errors import StoreError
from targetmirror.store.rbd import CephAccess, RbdImage
from tests import cephcluster
from tests.lab import guest
from tests.lab.mirrord import Mirrord, cli

pytestmark = pytest.mark.lab

MiB = guest.MiB
SIZE = 16 * MiB
LATE = 60
"""Seconds the old client's packets to the OSD are held: longer than the leg's failure, the
newer write and the repair together under TCG."""
TIMEOUT = 5
"""The RBD legs' cluster timeout (a_timeout): the held write fails the leg after this."""
LAYERING = 1
"""librbd feature bits: layering only (no exclusive-lock, see the module docstring)."""
BLOCK = 4096
OFFSET = 3 * MiB + 8 * BLOCK
_T0 = time.monotonic()


def _note(what: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {what}", flush=True)


PRIOMAP = ("1", "2", "2", "2", "1", "2", "0", "0", "1", "1", "1", "1", "1", "1", "1", "1")
"""The kernel's default priomap: ordinary traffic keeps using bands 0-2."""


class HeldFlows:
    """``tc`` on lo: a 4-band prio qdisc whose last band (reached only through our filters)
    holds packets ``seconds`` long (netem)."""

    def __init__(self, seconds: int) -> None:
        guest.run(["modprobe", "-a", "sch_prio", "sch_netem", "cls_u32"])
        guest.run(["tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "prio", "bands",
                   "4", "priomap", *PRIOMAP])
        guest.run(["tc", "qdisc", "add", "dev", "lo", "parent", "1:4", "handle", "40:",
                   "netem", "delay", f"{seconds}s", "limit", "100000"])

    def hold(self, sport: int, dport: int) -> None:
        guest.run(["tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip",
                   "prio", "1", "u32", "match", "ip", "sport", str(sport), "0xffff", "match",
                   "ip", "dport", str(dport), "0xffff", "flowid", "1:4"])

    def backlog(self) -> int:
        """Packets held right now."""
        out = guest.run(["tc", "-s", "qdisc", "show", "dev", "lo"]).stdout
        m = re.search(r"qdisc netem 40:.*?backlog \S+ (\d+)p", out, re.S)
        assert m, out
        return int(m.group(1))

    def remove(self) -> None:
        guest.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False)


def _osd_ports(ceph: cephcluster.CephCluster) -> set[int]:
    dump = json.loads(ceph.ceph("osd", "dump", "--format", "json", timeout=60))
    return {int(a["addr"].rsplit(":", 1)[1]) for o in dump["osds"]
            for a in o["public_addrs"]["addrvec"]}


def _flows_to(pid: int, ports: set[int]) -> list[tuple[int, int]]:
    """(local port, OSD port) of process ``pid``'s TCP connections to the OSD."""
    out = guest.run(["ss", "-tnpH", "state", "established"]).stdout
    flows = []
    for line in out.splitlines():
        if f"pid={pid}," not in line:
            continue
        local, peer = line.split()[2:4]
        lport, pport = int(local.rsplit(":", 1)[1]), int(peer.rsplit(":", 1)[1])
        if pport in ports:
            flows.append((lport, pport))
    return flows


def _read(img: RbdImage, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    img.readv(offset, [memoryview(buf)])
    return bytes(buf)


def _status(daemon: Mirrord, name: str) -> dict[str, Any]:
    st: dict[str, Any] = daemon.ctl_json("status", name)["mirrors"][0]
    return st


def test_a_late_write_of_a_failed_rbd_leg_cannot_land_after_its_repair(
        mirrord: Mirrord, tmp_path: Path) -> None:
    global _T0
    why = cephcluster.missing()
    assert why is None, why
    ceph = cephcluster.CephCluster(Path(tempfile.mkdtemp(prefix="tmfence", dir="/tmp")))
    held: HeldFlows | None = None
    name, iqn = "f_rbd", f"{guest.IQN_PREFIX}:f-rbd"
    opened: list[RbdImage] = []
    try:
        ceph.start()
        ceph.create_image("fa", SIZE, features=LAYERING)
        ceph.create_image("ctl", SIZE, features=LAYERING)
        acc = CephAccess(conf=str(ceph.conf), timeout=TIMEOUT)
        b = tmp_path / "f-b.img"
        with b.open("wb") as f:
            f.truncate(SIZE)
        cli("create", name, "--size", str(SIZE), "--image-a", ceph.spec("fa"),
            "--image-b", str(b), "--ceph-conf", str(ceph.conf), "--ceph-timeout",
            str(TIMEOUT), "--iqn", iqn, "--initiator", guest.initiator_name())
        mirrord.wait_serving(name)
        guest.iscsi_login(iqn)
        dev = guest.find_scsi_disk(iqn)
        old_data, new_data = b"\x11" * BLOCK, b"\x22" * BLOCK
        guest.dd_write(dev, OFFSET, b"\x00" * BLOCK)  # A's client has talked to the OSD
        ctl_old = RbdImage(ceph.spec("ctl"), acc)
        opened.append(ctl_old)
        ctl_old.writev(0, [memoryview(b"\x00" * BLOCK)])

        # hold every packet of both old clients to the OSD
        ports = _osd_ports(ceph)
        assert mirrord.proc is not None
        daemon_flows = _flows_to(mirrord.proc.pid, ports)
        own_flows = _flows_to(os.getpid(), ports)
        assert daemon_flows and own_flows, (daemon_flows, own_flows)
        held = HeldFlows(LATE)
        for sport, dport in daemon_flows + own_flows:
            held.hold(sport, dport)
        _T0 = time.monotonic()
        _note(f"holding {daemon_flows} (targetmirrord's leg A) and {own_flows} (control) "
              f"for {LATE} s")

        # the old writes: both time out on the client side; their messages stay on the way
        box: dict[str, BaseException] = {}

        def control_old_write() -> None:
            try:
                ctl_old.writev(OFFSET, [memoryview(old_data)])
            except StoreError as exc:
                box["error"] = exc
        t = threading.Thread(target=control_old_write)
        t.start()
        guest.dd_write(dev, OFFSET, old_data)       # answered from B once A fails
        t.join(120)
        assert isinstance(box.get("error"), StoreError), box
        st = _status(mirrord, name)
        assert set(st["failed_legs"]) == {"a"}, st
        _note(f"leg A failed: {st['failed_legs']['a']['reason']}; control: {box['error']}")
        assert held.backlog() > 0, "nothing is held: the late writes would not be late"

        # the newer write of the same block, then the repair (new clients: not held)
        guest.dd_write(dev, OFFSET, new_data)        # B only
        ctl_new = RbdImage(ceph.spec("ctl"), acc)    # a plain reopen: no fence
        opened.append(ctl_new)
        ctl_new.writev(OFFSET, [memoryview(new_data)])
        mirrord.ctl("repair", name)
        st = _status(mirrord, name)
        assert st["state"] == "mirrored" and st["health"] == "ok", st
        probe = RbdImage(ceph.spec("fa"), acc)
        opened.append(probe)
        assert _read(probe, OFFSET, BLOCK) == new_data, "the repair did not copy the block"
        assert _read(ctl_new, OFFSET, BLOCK) == new_data
        took = time.monotonic() - _T0
        assert took < LATE - 5, f"the repair ended {took:.0f} s in: too close to the release"
        fenced = re.findall(r"fenced the earlier client (\S+)", mirrord.log_text())
        assert fenced, mirrord.log_text()[-3000:]
        assert fenced[-1] in ceph.ceph("osd", "blocklist", "ls", timeout=60)
        _note(f"repaired in {took:.1f} s; targetmirrord fenced {fenced[-1]}")

        # the held packets arrive: the control's late write wins, the mirror's is refused
        guest.wait_for(lambda: _read(ctl_new, OFFSET, BLOCK) == old_data, timeout=LATE + 120,
                       interval=0.5, what="the control's late write to land")
        landed = time.monotonic() - _T0
        _note(f"control: the late write landed {landed:.1f} s in, over the newer data")
        # targetmirrord's held write left at the same moment as the control's (netem holds
        # every packet exactly LATE s; the old clients keep sending, so the queue never
        # empties): give it the same time and some more, then A must still hold the new data
        guest.wait_for(lambda: time.monotonic() - _T0 > landed + 10, timeout=60,
                       what="the mirror's late write to have arrived too")
        assert _read(probe, OFFSET, BLOCK) == new_data, "a late write landed on repaired A"
        ver = mirrord.ctl_json("verify", name)
        assert ver["mismatches"] == 0, ver
        guest.iscsi_logout(iqn)
        assert _read(probe, 0, SIZE) == b.read_bytes(), "A and B differ after the repair"
        print("FENCE", json.dumps({"late_seconds": LATE, "repair_done_s": round(took, 1),
                                   "control_late_write_landed_s": round(landed, 1),
                                   "fenced": fenced[-1]}))
        cli("delete", name, "--iqn", iqn)
    finally:
        if held is not None:
            held.remove()
        for img in opened:
            img.close()
        guest.iscsi_logout_all()
        ceph.wipe()
