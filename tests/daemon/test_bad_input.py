"""Bad backstores end to end in the daemon: each is refused with a reason, changes nothing.

A ``user:mirror`` backstore can be made by hand (targetcli), bypassing the configuration
loader, so the daemon itself must refuse a cfgstring with ``..``, an image that resolves
outside its image directories (symlink), an image another served mirror already uses, images
too small for the LUN and a LUN size the block size does not divide.  Refused means: every
command on the LUN is answered CHECK CONDITION NOT READY (04/03) — the initiator sees a clear
state rather than a timeout — the reason is in ``status``, and no image, state file or other
mirror is touched.  The real ``serve`` runs; only the kernel's side (UIO, configfs) is the
in-process double.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from targetmirror.daemon import device, registry
from targetmirror.daemon.main import Daemon
from targetmirror.errors import ConfigError
from targetmirror.scsi.sense import parse_fixed_sense
from targetmirror.tcmu.ring import Ring
from targetmirror.tcmu.uio import UioInfo
from tests.daemon.test_runner import FakeUio
from tests.tcmu.producer import Producer

MiB = 1 << 20
BS = 512


@dataclass
class _Cfs:
    """The configfs attributes serve() reads, for one device."""

    lun_size: int = MiB
    block_size: int = BS

    def size(self) -> int:
        return self.lun_size

    def hw_block_size(self) -> int:
        return self.block_size

    def hw_max_sectors(self) -> int:
        return 128

    def unit_serial(self) -> str:
        return "serial"


class _Uio(FakeUio):
    def __init__(self) -> None:
        super().__init__(Producer(data_size=256 * 1024, block_size=4096))
        self.ring = Ring(self.producer.buf)

    def close(self) -> None:
        self.ring.release()


class Rig:
    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images = tmp / "images"
        self.outside = tmp / "outside"
        self.state = tmp / "state"
        for d in (self.images, self.outside):
            d.mkdir()
        for name in ("m1-a", "m1-b", "m2-a", "m2-b"):
            self.image(name, MiB)
        self.image("small", MiB // 2, self.images)
        self.image("evil", MiB, self.outside)
        (self.images / "link.img").symlink_to(self.outside / "evil.img")
        self.infos: list[UioInfo] = []
        self.cfs: dict[str, _Cfs] = {}
        self.uios: dict[str, _Uio] = {}
        monkeypatch.setattr(registry, "find_devices", lambda *a: list(self.infos))
        monkeypatch.setattr(device.ConfigfsDevice, "for_device",
                            classmethod(lambda cls, info, root: self.cfs[info.dev_name]))
        monkeypatch.setattr(device, "reset_stale_ring", lambda *a: "clean")

        def open_uio(info: UioInfo) -> _Uio:
            uio = self.uios[info.dev_name] = _Uio()
            return uio

        monkeypatch.setattr(device.UioDevice, "open", staticmethod(open_uio))
        self.daemon = Daemon(state_dir=str(self.state), stuck_after=0,
                             image_dirs=(str(self.images),))

    def image(self, name: str, size: int, where: Path | None = None) -> str:
        path = (where or self.images) / f"{name}.img"
        with open(path, "wb") as f:
            f.write(b"\x5a" * size)
        return str(path)

    def add(self, dev: str, cfgstring: str, cfs: _Cfs | None = None) -> None:
        minor = len(self.infos)
        self.infos.append(UioInfo(name=f"tcm-user/{minor}/{dev}/mirror/{cfgstring}",
                                  minor=minor, hba=minor, dev_name=dev, subtype="mirror",
                                  cfgstring=cfgstring, map_size=0, dev_path=f"/dev/uio{minor}"))
        self.cfs[dev] = cfs or _Cfs()

    def files(self) -> dict[str, bytes]:
        """Every image and state file, by path (what 'nothing changed' is measured on), but
        the state of the served m1, whose write-intent bits may be cleared at any time."""
        out = {}
        for root in (self.images, self.outside, self.state):
            for dirpath, _dirs, names in os.walk(root):
                for n in names:
                    p = os.path.join(dirpath, n)
                    if not os.path.islink(p) and not (root == self.state
                                                      and n.startswith("m1.")):
                        out[p] = Path(p).read_bytes()
        return out

    def write10(self, dev: str, lba: int) -> tuple[int, bytes | None]:
        """A one-block WRITE(10) through the ring: (status, sense)."""
        uio = self.uios[dev]
        cdb = struct.pack(">BBIBHB", 0x2A, 0, lba, 0, 1, 0)
        cmd_id = uio.queue(cdb, data_out=b"\xa5" * BS)
        done = uio.wait_for([cmd_id])[cmd_id]
        return done.status, done.sense

    def status(self, dev: str) -> dict[str, Any]:
        for m in self.daemon.ops.status()["mirrors"]:
            if m["name"] == dev:
                return m
        raise AssertionError(f"{dev} not in status")


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    r = Rig(tmp_path, monkeypatch)
    yield r
    for name in list(r.daemon.devices):
        r.daemon.detach(name)


def _bad_cases(r: Rig) -> list[tuple[str, str, _Cfs | None, str]]:
    i, o = r.images, r.outside
    return [
        ("traversal", f"a={i}/../outside/evil.img;b={i}/m2-b.img", None, "normalised"),
        ("symlink out", f"a={i}/link.img;b={i}/m2-b.img", None, "outside the image directories"),
        ("outside", f"a={o}/evil.img;b={i}/m2-b.img", None, "outside the image directories"),
        ("image of another mirror", f"a={i}/m2-a.img;b={i}/m1-b.img", None,
         "already used by m1"),
        ("too small", f"a={i}/m2-a.img;b={i}/small.img", None, "the LUN needs"),
        ("size not in blocks", f"a={i}/m2-a.img;b={i}/m2-b.img",
         _Cfs(lun_size=MiB + BS, block_size=4096), "not a positive multiple of the block size"),
    ]


CASES = ["traversal", "symlink out", "outside", "image of another mirror", "too small",
         "size not in blocks"]


@pytest.mark.parametrize("case", CASES)
def test_bad_backstore_is_refused_and_changes_nothing(rig: Rig, case: str) -> None:
    rig.add("m1", f"a={rig.images}/m1-a.img;b={rig.images}/m1-b.img")
    rig.daemon.rescan()
    assert rig.write10("m1", 0)[0] == 0
    before = rig.files()
    _name, cfg, cfs, reason = next(c for c in _bad_cases(rig) if c[0] == case)
    rig.add("bad", cfg, cfs)
    rig.daemon.rescan()
    st = rig.status("bad")
    assert st["state"] == "not-ready" and reason in st["reason"], st
    status, sense = rig.write10("bad", 0)
    assert status == 0x02 and sense is not None
    info = parse_fixed_sense(sense)
    assert (info.key, info.asc, info.ascq) == (0x2, 0x04, 0x03)
    # INQUIRY is still answered, so the initiator's scan keeps the LUN and the admin sees it
    uio = rig.uios["bad"]
    cmd_id = uio.queue(bytes([0x12, 0, 0, 0, 96, 0]), data_in_len=96)
    inq = uio.wait_for([cmd_id])[cmd_id]
    assert inq.status == 0 and inq.data_in[8:16].strip() != b"" and inq.data_in[0] == 0
    cmd_id = uio.queue(bytes([0x12, 0, 0x83, 0, 96, 0]), data_in_len=96)  # page, no EVPD
    bad_inq = uio.wait_for([cmd_id])[cmd_id]
    assert bad_inq.status == 0x02 and parse_fixed_sense(bad_inq.sense).key == 0x5
    assert rig.files() == before  # no image, no state file, nothing of m1 changed
    # the good mirror next to it still serves, on both legs
    assert rig.write10("m1", 1)[0] == 0
    after = rig.files()
    a, b = (after[f"{rig.images}/m1-{leg}.img"] for leg in "ab")
    assert a[BS : 2 * BS] == b[BS : 2 * BS] == b"\xa5" * BS


def test_a_repair_may_not_take_an_image_outside_or_in_use(rig: Rig) -> None:
    rig.add("m1", f"a={rig.images}/m1-a.img;b={rig.images}/m1-b.img")
    rig.add("m2", f"a={rig.images}/m2-a.img;b={rig.images}/m2-b.img")
    rig.daemon.rescan()
    before = rig.files()
    for replace, text in ((f"{rig.images}/link.img", "outside the image directories"),
                          (f"{rig.images}/m1-a.img", "already used by m1")):
        with pytest.raises(ConfigError, match=text) as err:
            rig.daemon.ops.repair("m2", leg="b", replace=replace)
        assert err.value.code == "config"
    assert rig.files() == before
    assert rig.status("m2")["state"] == "mirrored"


def test_without_image_dirs_only_the_one_image_one_mirror_rule_holds(rig: Rig) -> None:
    rig.daemon.image_dirs = None
    rig.add("m1", f"a={rig.images}/m1-a.img;b={rig.images}/m1-b.img")
    rig.add("ev", f"a={rig.outside}/evil.img;b={rig.images}/m2-b.img")
    rig.add("dup", f"a={rig.images}/m2-a.img;b={rig.images}/link.img")  # = evil.img
    rig.daemon.rescan()
    assert rig.status("ev")["state"] == "mirrored"
    st = rig.status("dup")
    assert st["state"] == "not-ready" and "already used by ev" in st["reason"]


def test_targetcli_create_is_refused_for_what_the_daemon_would_not_serve(rig: Rig) -> None:
    """D-Bus CheckConfig (what targetcli asks before it creates a user:mirror backstore)
    applies the same refusals, so the backstore is never made."""
    rig.add("m1", f"a={rig.images}/m1-a.img;b={rig.images}/m1-b.img")
    rig.daemon.rescan()
    i = rig.images
    assert rig.daemon.check_config(f"mirror/a={i}/m2-a.img;b={i}/m2-b.img") == (True, "ok")
    for cfg, reason in ((f"mirror/a={i}/link.img;b={i}/m2-b.img", "outside the image dir"),
                        (f"mirror/a={i}/../outside/evil.img;b={i}/m2-b.img", "normalised"),
                        (f"mirror/a={i}/m2-a.img;b={i}/m1-a.img", "already used by m1"),
                        (f"mirror/snapshot={rig.outside}/evil.img", "outside the image dir")):
        ok, message = rig.daemon.check_config(cfg)
        assert not ok and reason in message, (cfg, message)
