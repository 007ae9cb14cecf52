"""CDB builders and result checks shared by the SCSI tests."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from targetmirror.scsi.handler import DeviceIdentity, ScsiDevice, ScsiResult
from targetmirror.scsi.sense import SenseInfo, parse_fixed_sense

from .memory_backend import MemoryBackend

GOOD = 0x00
CHECK = 0x02

ILLEGAL = 0x5
MEDIUM = 0x3
MISCOMPARE = 0xE

INVALID_OPCODE = (ILLEGAL, 0x20, 0x00)
INVALID_FIELD = (ILLEGAL, 0x24, 0x00)
INVALID_PARAM = (ILLEGAL, 0x26, 0x00)
PARAM_LEN = (ILLEGAL, 0x1A, 0x00)
OUT_OF_RANGE = (ILLEGAL, 0x21, 0x00)
SAVING = (ILLEGAL, 0x39, 0x00)
MISCOMPARE_SENSE = (MISCOMPARE, 0x1D, 0x00)
READ_ERROR = (MEDIUM, 0x11, 0x00)
WRITE_ERROR = (MEDIUM, 0x0C, 0x00)

SERIAL = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"


def make_device(
    num_blocks: int = 64, block_size: int = 512, write_cache: bool = True, **identity: int
) -> tuple[ScsiDevice, MemoryBackend]:
    backend = MemoryBackend(num_blocks, block_size, write_cache)
    ident = DeviceIdentity(serial=SERIAL, revision="0.1", **identity)  # type: ignore[arg-type]
    return ScsiDevice(backend, ident), backend


def be(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


def cdb6(op: int, lba: int = 0, length: int = 0, b1: int = 0) -> bytes:
    return bytes([op, b1 | (lba >> 16 & 0x1F)]) + be(lba & 0xFFFF, 2) + bytes([length, 0])


def cdb10(op: int, lba: int = 0, length: int = 0, b1: int = 0, b6: int = 0) -> bytes:
    return bytes([op, b1]) + be(lba, 4) + bytes([b6]) + be(length, 2) + b"\x00"


def cdb12(op: int, lba: int = 0, length: int = 0, b1: int = 0) -> bytes:
    return bytes([op, b1]) + be(lba, 4) + be(length, 4) + b"\x00\x00"


def cdb16(op: int, lba: int = 0, length: int = 0, b1: int = 0, b14: int = 0) -> bytes:
    return bytes([op, b1]) + be(lba, 8) + be(length, 4) + bytes([b14, 0])


def caw(lba: int, blocks: int, b1: int = 0) -> bytes:
    return bytes([0x89, b1]) + be(lba, 8) + b"\x00\x00\x00" + bytes([blocks, 0, 0])


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255, b1: int = 0) -> bytes:
    return bytes([0x12, evpd | b1, page]) + be(alloc, 2) + b"\x00"


def mode_sense6(page: int, pc: int = 0, dbd: bool = False, alloc: int = 255, sub: int = 0) -> bytes:
    return bytes([0x1A, 0x08 if dbd else 0, pc << 6 | page, sub, alloc, 0])


def mode_sense10(
    page: int, pc: int = 0, dbd: bool = False, llbaa: bool = False, alloc: int = 1024, sub: int = 0
) -> bytes:
    b1 = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return bytes([0x5A, b1, pc << 6 | page, sub, 0, 0, 0]) + be(alloc, 2) + b"\x00"


def mode_select6(length: int, pf: bool = True, sp: bool = False) -> bytes:
    return bytes([0x15, (0x10 if pf else 0) | (1 if sp else 0), 0, 0, length, 0])


def mode_select10(length: int, pf: bool = True, sp: bool = False) -> bytes:
    return (
        bytes([0x55, (0x10 if pf else 0) | (1 if sp else 0), 0, 0, 0, 0, 0])
        + be(length, 2)
        + b"\x00"
    )


def read_capacity16(alloc: int = 32) -> bytes:
    return bytes([0x9E, 0x10]) + bytes(8) + be(alloc, 4) + b"\x00\x00"


def rsoc(
    options: int = 0, opcode: int = 0, sa: int = 0, alloc: int = 8192, rctd: bool = False
) -> bytes:
    b2 = options | (0x80 if rctd else 0)
    return bytes([0xA3, 0x0C, b2, opcode]) + be(sa, 2) + be(alloc, 4) + b"\x00\x00"


def unmap_cdb(param_len: int) -> bytes:
    return bytes([0x42, 0, 0, 0, 0, 0, 0]) + be(param_len, 2) + b"\x00"


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    descs = b"".join(be(lba, 8) + be(n, 4) + bytes(4) for lba, n in ranges)
    return be(len(descs) + 6, 2) + be(len(descs), 2) + bytes(4) + descs


@dataclass
class Run:
    result: ScsiResult
    data_in: bytes

    @property
    def status(self) -> int:
        return self.result.status

    @property
    def sense(self) -> SenseInfo:
        assert self.result.sense is not None
        return parse_fixed_sense(self.result.sense)

    @property
    def triple(self) -> tuple[int, int, int]:
        s = self.sense
        return (s.key, s.asc, s.ascq)

    @property
    def returned(self) -> bytes:
        """The bytes of data-in the command actually delivered (read_len or the whole buffer)."""
        n = self.result.read_len
        return self.data_in if n is None else self.data_in[:n]


def run(
    dev: ScsiDevice, cdb: bytes, data_out: bytes | None = None, data_in: int = 0, segments: int = 1
) -> Run:
    """Execute ``cdb`` with a data-out payload or a data-in buffer of ``data_in`` bytes,
    optionally split into ``segments`` iovecs to exercise scatter-gather."""
    buf = bytearray(data_out if data_out is not None else bytes(data_in))
    view = memoryview(buf)
    if segments <= 1 or not buf:
        iov = [view]
    else:
        step = max(1, len(buf) // segments)
        cuts = [*range(0, len(buf), step), len(buf)]
        iov = [view[a:b] for a, b in itertools.pairwise(cuts) if b > a]
    result = dev.execute(cdb, iov)
    return Run(result, bytes(buf))


def expect_check(r: Run, triple: tuple[int, int, int]) -> None:
    assert r.status == CHECK, r.result
    assert r.triple == triple, (r.triple, triple)


def expect_good(r: Run) -> None:
    assert r.status == GOOD, (r.result, r.sense if r.result.sense else None)
    assert r.result.sense is None
