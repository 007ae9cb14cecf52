"""A write-protected unit (an exported split copy): reads work, nothing can change the medium."""

from __future__ import annotations

import pytest

from targetmirror.scsi.handler import ScsiDevice
from targetmirror.scsi.identity import DeviceIdentity
from targetmirror.scsi.sense import parse_fixed_sense

from .memory_backend import MemoryBackend
from .scsi_util import SERIAL, caw, cdb10, cdb16, mode_sense6

DATA_PROTECT = 0x7


def device():
    backend = MemoryBackend(64, 512, True)
    backend.fill(0, b"\x5a" * 512)
    dev = ScsiDevice(backend, DeviceIdentity(serial=SERIAL), write_protected=True)
    return dev, backend


def unmap_list(lba: int, blocks: int) -> bytes:
    return (bytes([0, 22, 0, 16]) + bytes(4) + lba.to_bytes(8, "big")
            + blocks.to_bytes(4, "big") + bytes(4))


@pytest.mark.parametrize("cdb, data", [
    (cdb10(0x2A, 0, 1), bytes(512)),                        # WRITE(10)
    (cdb16(0x8A, 0, 1), bytes(512)),                        # WRITE(16)
    (cdb10(0x2E, 0, 1), bytes(512)),                        # WRITE AND VERIFY(10)
    (cdb10(0x41, 0, 1, b1=0x08), bytes(512)),               # WRITE SAME(10) with UNMAP
    (bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), unmap_list(0, 1)),  # UNMAP
    (caw(0, 1), b"\x5a" * 512 + bytes(512)),                # COMPARE AND WRITE
])
def test_modifying_commands_get_data_protect(cdb, data):
    dev, backend = device()
    before = backend.block(0)
    res = dev.execute(cdb, [memoryview(bytearray(data))])
    assert res.status == 0x02
    info = parse_fixed_sense(res.sense)
    assert (info.key, info.asc, info.ascq) == (DATA_PROTECT, 0x27, 0x00)
    assert backend.block(0) == before
    assert not [op for op in backend.ops() if op[0] not in ("read",)]


def test_reads_work_and_mode_sense_reports_wp():
    dev, _ = device()
    buf = bytearray(512)
    assert dev.execute(cdb10(0x28, 0, 1), [memoryview(buf)]).status == 0
    assert buf == b"\x5a" * 512
    out = bytearray(255)
    res = dev.execute(mode_sense6(0x08), [memoryview(out)])
    assert res.status == 0
    assert out[2] & 0x80  # WP
    assert dev.execute(bytes([0x35]) + bytes(9), []).status == 0  # SYNCHRONIZE CACHE is fine
