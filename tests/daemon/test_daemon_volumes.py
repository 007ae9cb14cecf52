"""The daemon's device set with volume-2 LUNs: a mirror is attached before its volume 2, a volume
2 whose mirror is not served waits for a later rescan, and detaching a mirror detaches its
volume 2s first (they share its Mirror).  ``serve`` is replaced by a recorder: the ring side is
covered by tests/daemon/test_one_way.py and the lab."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from targetmirror.daemon import registry
from targetmirror.daemon.device import ServedDevice
from targetmirror.daemon.main import Daemon
from targetmirror.errors import MirrorError
from targetmirror.tcmu.uio import UioInfo


class _Runner:
    alive = True
    commands = 0


class _Mirror:
    state = "mirrored"
    epoch = 0

    def __init__(self, name: str) -> None:
        self.name = name

    def resume(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state}


def _info(minor: int, dev: str, cfg: str) -> UioInfo:
    return UioInfo(name=f"tcm-user/{minor}/{dev}/mirror/{cfg}", minor=minor, hba=minor,
                   dev_name=dev, subtype="mirror", cfgstring=cfg, map_size=4096,
                   dev_path=f"/dev/uio{minor}")


MIRROR = _info(1, "db", "a=/x/a.img;b=/x/b.img")
VOLUME2 = _info(0, "db2", "mirror=db;volume=2")


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Daemon, list[str]]:
    events: list[str] = []

    def serve(info: UioInfo, *, mirrors: Any, **_kw: Any) -> ServedDevice:
        events.append(f"serve {info.dev_name}")
        owner = registry.volume_of(info)
        if owner is None:
            m = _Mirror(info.dev_name)
            dev = ServedDevice(info, None, _Runner(), m)  # type: ignore[arg-type]
        else:
            m = mirrors(owner)
            assert m is not None, "volume 2 served before its mirror"
            dev = ServedDevice(info, None, _Runner(), m, volume=2)  # type: ignore[arg-type]

        def close() -> None:
            events.append(f"close {info.dev_name}")
        dev.close = close  # type: ignore[method-assign]
        return dev

    monkeypatch.setattr(registry, "serve", serve)
    return Daemon(state_dir=str(tmp_path / "state"), stuck_after=0), events


def test_a_mirror_is_attached_before_its_volume_2(daemon, monkeypatch) -> None:
    d, events = daemon
    # the volume 2 has the lower minor, so discovery lists it first
    monkeypatch.setattr(registry, "find_devices", lambda *a: [VOLUME2, MIRROR])
    d.rescan()
    assert events == ["serve db", "serve db2"]
    assert d.devices[VOLUME2.name].mirror is d.devices[MIRROR.name].mirror
    st = d.ops.status()["mirrors"]
    assert {m["name"]: m.get("volume2", m.get("mirror")) for m in st} == {
        "db": ["db2"], "db2": "db"}


def test_volume_2_waits_for_its_mirror(daemon, monkeypatch, caplog) -> None:
    d, events = daemon
    monkeypatch.setattr(registry, "find_devices", lambda *a: [VOLUME2])
    with caplog.at_level(logging.WARNING, "targetmirror.daemon"):
        d.rescan()
    assert events == [] and not d.devices
    assert "volume 2 of mirror db, which is not served" in caplog.text
    monkeypatch.setattr(registry, "find_devices", lambda *a: [VOLUME2, MIRROR])
    d.rescan()
    assert events == ["serve db", "serve db2"]


def test_detaching_a_mirror_detaches_its_volume_2_first(daemon, monkeypatch) -> None:
    d, events = daemon
    monkeypatch.setattr(registry, "find_devices", lambda *a: [VOLUME2, MIRROR])
    d.rescan()
    events.clear()
    d.detach(MIRROR.name)
    assert events == ["close db2", "close db"] and not d.devices


def test_a_volume_2_cannot_be_split_by_its_own_name(daemon, monkeypatch) -> None:
    d, _events = daemon
    monkeypatch.setattr(registry, "find_devices", lambda *a: [VOLUME2, MIRROR])
    d.rescan()
    with pytest.raises(MirrorError, match="volume 2 of mirror db; split the mirror"):
        d.ops.split(["db2"], one_way=True)


def test_reconfig_that_restates_the_device_is_accepted_and_a_change_refused(daemon) -> None:
    """targetcli restoreconfig writes dev_config/dev_size/emulate_write_cache back after it
    enables a backstore; once tcmu-runner has run, the kernel waits for our answer to each."""
    from targetmirror.tcmu import layout as L
    from targetmirror.tcmu.netlink import NetlinkEvent

    d, _events = daemon
    d.attach(MIRROR)
    d.devices[MIRROR.name].mirror.size = 1 << 20  # type: ignore[union-attr]

    def ev(**kw: Any) -> NetlinkEvent:
        return NetlinkEvent(L.CMD_RECONFIG_DEVICE, MIRROR.name, 1, 7, **kw)

    assert d._reconfig(ev(dev_cfg="mirror/" + MIRROR.cfgstring)) == 0
    assert d._reconfig(ev(dev_cfg=MIRROR.cfgstring)) == 0
    assert d._reconfig(ev(dev_size=1 << 20)) == 0
    assert d._reconfig(ev(writecache=False)) == 0
    assert d._reconfig(ev(dev_cfg="mirror/a=/x/other.img;b=/x/b.img")) == -95
    assert d._reconfig(ev(dev_size=2 << 20)) == -95
    unknown = NetlinkEvent(L.CMD_RECONFIG_DEVICE, "tcm-user/9/zz/mirror/a=/q;b=/r", 9, 9,
                           dev_size=1 << 20)
    assert d._reconfig(unknown) == -95
