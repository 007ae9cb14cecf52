"""Device discovery on a fake sysfs tree, UioDevice I/O on stand-ins, configfs parsing."""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

import pytest

from targetmirror.errors import DeviceError, RingError
from targetmirror.tcmu.ring import Command
from targetmirror.tcmu.uio import (
    ConfigfsDevice,
    UioDevice,
    UioInfo,
    find_device,
    find_devices,
    parse_info_size,
    parse_uio_name,
)

from .producer import Producer


def make_uio(root: Path, n: int, name: str, size: str = "0x40800000\n") -> None:
    d = root / "class" / "uio" / f"uio{n}"
    (d / "maps" / "map0").mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "maps" / "map0" / "size").write_text(size)


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("tcm-user/1/disk0/mirror/a.img|b.img", (1, "disk0", "mirror", "a.img|b.img")),
        ("tcm-user/12/d/mirror//srv/a|/srv/b", (12, "d", "mirror", "/srv/a|/srv/b")),
        ("tcm-user/0/d/mirror", (0, "d", "mirror", "")),
        ("tcm-user/0/d", (0, "d", "", "")),
        ("tcm-user/x/d/mirror/c", None),
        ("tcm-user/1//mirror/c", None),
        ("uio_pdrv_genirq", None),
        ("tcm-user", None),
    ],
)
def test_parse_uio_name(name: str, parsed: tuple[int, str, str, str] | None) -> None:
    assert parse_uio_name(name) == parsed


def test_find_devices_filters_by_subtype(tmp_path: Path) -> None:
    make_uio(tmp_path, 0, "tcm-user/1/other/file/x.img")
    make_uio(tmp_path, 2, "tcm-user/2/m2/mirror//a/b.img|/c/d.img", "1082130432")
    make_uio(tmp_path, 10, "tcm-user/3/m10/mirror/x|y")
    make_uio(tmp_path, 1, "some_other_uio_driver")
    (tmp_path / "class" / "uio" / "not-a-uio").mkdir()
    found = find_devices(sysfs_root=tmp_path, dev_root="/devx")
    assert [i.minor for i in found] == [2, 10]
    assert found[0] == UioInfo(
        name="tcm-user/2/m2/mirror//a/b.img|/c/d.img",
        minor=2,
        hba=2,
        dev_name="m2",
        subtype="mirror",
        cfgstring="/a/b.img|/c/d.img",
        map_size=1082130432,
        dev_path="/devx/uio2",
    )
    assert found[1].map_size == 0x40800000
    assert [i.minor for i in find_devices(None, sysfs_root=tmp_path)] == [0, 2, 10]
    assert [i.dev_name for i in find_devices("file", sysfs_root=tmp_path)] == ["other"]


def test_find_devices_without_uio_class(tmp_path: Path) -> None:
    assert find_devices(sysfs_root=tmp_path) == []


def test_device_vanishing_during_scan_is_skipped(tmp_path: Path) -> None:
    make_uio(tmp_path, 3, "tcm-user/1/gone/mirror/x")
    (tmp_path / "class" / "uio" / "uio3" / "maps" / "map0" / "size").unlink()
    assert find_devices(sysfs_root=tmp_path) == []


def test_garbage_map_size_is_a_device_error(tmp_path: Path) -> None:
    make_uio(tmp_path, 3, "tcm-user/1/d/mirror/x", "lots")
    with pytest.raises(DeviceError, match="map0 size"):
        find_devices(sysfs_root=tmp_path)


def test_find_device_by_minor(tmp_path: Path) -> None:
    make_uio(tmp_path, 7, "tcm-user/1/d/mirror/x")
    assert find_device(7, sysfs_root=tmp_path).dev_name == "d"
    with pytest.raises(DeviceError, match="uio8"):
        find_device(8, sysfs_root=tmp_path)


# -- UioDevice ------------------------------------------------------------------------------


def info_for(path: Path, size: int) -> UioInfo:
    return UioInfo("tcm-user/1/d/mirror/x", 0, 1, "d", "mirror", "x", size, str(path))


def test_open_maps_exactly_map_size_and_closes_idempotently(tmp_path: Path) -> None:
    p = Producer()
    cmd_id = p.queue(bytes(6))
    dev_file = tmp_path / "uio0"
    dev_file.write_bytes(bytes(p.buf) + bytes(4096))  # a bigger file: map only map_size
    dev = UioDevice.open(info_for(dev_file, p.map_size))
    fd = dev.fileno()
    assert dev.ring.map_size == p.map_size
    assert cmd_id is not None
    assert [e.cmd_id for e in dev.ring.fetch() if isinstance(e, Command)] == [cmd_id]
    dev.ring.complete(cmd_id, 0)
    dev.close()
    assert dev.closed
    dev.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
    assert int.from_bytes(dev_file.read_bytes()[64:68], "little") != 0  # MAP_SHARED: tail written


def test_open_missing_device(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="cannot open"):
        UioDevice.open(info_for(tmp_path / "nope", 4096))


def test_open_with_bad_mailbox_closes_everything(tmp_path: Path) -> None:
    dev_file = tmp_path / "uio0"
    dev_file.write_bytes(bytes(8192))
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(RingError, match="version 0"):
        UioDevice.open(info_for(dev_file, 8192))
    assert set(os.listdir("/proc/self/fd")) == before


def test_close_with_a_view_still_alive_does_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = Producer()
    p.queue(bytes([0x2A]) + bytes(9), data_out=b"w" * 512)
    dev_file = tmp_path / "uio0"
    dev_file.write_bytes(bytes(p.buf))
    dev = UioDevice.open(info_for(dev_file, p.map_size))
    (cmd,) = dev.ring.fetch()
    assert isinstance(cmd, Command)
    kept = cmd.iov[0][:16]  # a caller's own slice: the ring cannot release it
    with caplog.at_level(logging.WARNING):
        dev.close()
    assert "still alive" in caplog.text
    assert bytes(kept) == b"w" * 16  # still mapped, so no crash
    kept.release()


@pytest.fixture
def paired() -> tuple[UioDevice, socket.socket]:
    kernel, ours = socket.socketpair()
    p = Producer()
    dev = UioDevice(info_for(Path("/dev/uio0"), p.map_size), ours.detach(), bytearray(p.buf))
    p.close()
    return dev, kernel


def test_wait_and_notify(paired: tuple[UioDevice, socket.socket]) -> None:
    dev, kernel = paired
    with kernel, dev:
        assert dev.wait(0) is False
        kernel.send((1).to_bytes(4, "little"))
        assert dev.wait(None) is True
        assert dev.wait(0.001) is False
        dev.notify()
        assert kernel.recv(16) == bytes(4)


def test_ack_consumes_the_event_the_callers_poll_saw(
        paired: tuple[UioDevice, socket.socket]) -> None:
    dev, kernel = paired
    with kernel, dev:
        kernel.send((3).to_bytes(4, "little"))
        dev.ack()
        assert dev.wait(0) is False  # consumed: nothing left to read
        kernel.send(b"\x01")
        with pytest.raises(DeviceError, match="short event read"):
            dev.ack()


def test_short_read_is_a_device_error(paired: tuple[UioDevice, socket.socket]) -> None:
    dev, kernel = paired
    with kernel, dev:
        kernel.send(b"\x01")
        with pytest.raises(DeviceError, match="short event read"):
            dev.wait(1)


@pytest.mark.parametrize(("call", "name"), [("wait", "read"), ("ack", "read"),
                                            ("notify", "write")])
def test_eio_means_device_removed(
    paired: tuple[UioDevice, socket.socket], monkeypatch: pytest.MonkeyPatch, call: str, name: str
) -> None:
    dev, kernel = paired

    def eio(*_args: object) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    with kernel, dev:
        kernel.send(bytes(4))
        monkeypatch.setattr(os, name, eio)
        with pytest.raises(DeviceError, match="removed"):
            getattr(dev, call)(*([1] if call == "wait" else []))
        monkeypatch.undo()


# -- configfs -------------------------------------------------------------------------------

INFO = (
    "Status: ACTIVATED  Max Queue Depth: 0  SectorSize: 512  HwMaxSectors: 2048\n"
    "        Config: mirror//a.img|/b.img Size: 1073741824 MaxDataAreaMB: 1024 "
    "DataPagesPerBlk: 1 CmdRingSizeMB: 8\n"
)


def test_parse_info_size_skips_sector_size() -> None:
    assert parse_info_size(INFO) == 1073741824
    with pytest.raises(DeviceError, match="Size"):
        parse_info_size("SectorSize: 512 HwMaxSectors: 128")


def make_configfs(root: Path) -> Path:
    d = root / "target" / "core" / "user_3" / "disk0"
    for sub in ("wwn", "attrib", "action"):
        (d / sub).mkdir(parents=True)
    (d / "info").write_text(INFO)
    (d / "wwn" / "vpd_unit_serial").write_text("T10 VPD Unit Serial Number: 6f1e-42ab\n")
    (d / "attrib" / "hw_max_sectors").write_text("2048\n")
    (d / "attrib" / "hw_block_size").write_text("512\n")
    (d / "attrib" / "emulate_write_cache").write_text("1\n")
    return d


def test_configfs_reads_and_actions(tmp_path: Path) -> None:
    d = make_configfs(tmp_path)
    info = UioInfo("tcm-user/3/disk0/mirror/x", 0, 3, "disk0", "mirror", "x", 1, "/dev/uio0")
    cfs = ConfigfsDevice.for_device(info, root=tmp_path)
    assert cfs.path == d
    assert cfs.unit_serial() == "6f1e-42ab"
    assert cfs.hw_max_sectors() == 2048
    assert cfs.hw_block_size() == 512
    assert cfs.write_cache() is True
    assert cfs.size() == 1073741824
    cfs.block()
    assert (d / "action" / "block_dev").read_text() == "1"
    cfs.reset_ring(2)
    assert (d / "action" / "reset_ring").read_text() == "2"
    cfs.block(False)
    assert (d / "action" / "block_dev").read_text() == "0"
    with pytest.raises(ValueError, match="mode"):
        cfs.reset_ring(3)


def test_configfs_missing_device(tmp_path: Path) -> None:
    cfs = ConfigfsDevice(9, "nope", root=tmp_path)
    with pytest.raises(DeviceError, match="cannot read"):
        cfs.hw_block_size()
    with pytest.raises(DeviceError, match="cannot write"):
        cfs.block()


def test_configfs_garbage_number(tmp_path: Path) -> None:
    d = make_configfs(tmp_path)
    (d / "attrib" / "hw_block_size").write_text("big\n")
    with pytest.raises(DeviceError, match="not a number"):
        ConfigfsDevice(3, "disk0", root=tmp_path).hw_block_size()
