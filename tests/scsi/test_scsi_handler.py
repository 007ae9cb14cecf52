"""End-to-end tests of ScsiDevice.execute over the in-memory backend, command by command."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from targetmirror.errors import StoreError
from targetmirror.scsi.cdb import COMMANDS
from targetmirror.scsi.handler import (
    CHUNK_BYTES,
    DeviceIdentity,
    ScsiDevice,
    ScsiResult,
    internal_error_result,
)
from targetmirror.scsi.sense import FieldPointer, parse_fixed_sense

from .memory_backend import MemoryBackend
from .scsi_util import (
    INVALID_FIELD,
    INVALID_OPCODE,
    INVALID_PARAM,
    MISCOMPARE_SENSE,
    OUT_OF_RANGE,
    PARAM_LEN,
    READ_ERROR,
    SAVING,
    WRITE_ERROR,
    caw,
    cdb6,
    cdb10,
    cdb12,
    cdb16,
    expect_check,
    expect_good,
    inquiry,
    make_device,
    mode_select6,
    mode_select10,
    mode_sense6,
    mode_sense10,
    read_capacity16,
    rsoc,
    run,
    unmap_cdb,
    unmap_params,
)

BS = 512


def pattern(blocks: int, seed: int = 1, bs: int = BS) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(blocks * bs))


# ------------------------------------------------------------------------------------------------
# Simple commands


def test_test_unit_ready_and_prevent_allow() -> None:
    dev, backend = make_device()
    expect_good(run(dev, bytes(6)))
    expect_good(run(dev, bytes([0x1E, 0, 0, 0, 1, 0])))
    assert backend.calls == []


@pytest.mark.parametrize(
    ("byte4", "flushes"),
    [(0x01, False), (0x00, True), (0x04, False), (0x02, True), (0x03, False), (0x10, False)],
)
def test_start_stop_unit(byte4: int, flushes: bool) -> None:
    dev, backend = make_device()
    expect_good(run(dev, bytes([0x1B, 1, 0, 0, byte4, 0])))
    assert (backend.ops() == ["flush"]) is flushes


def test_request_sense_reports_no_sense() -> None:
    dev, _ = make_device()
    r = run(dev, bytes([0x03, 0, 0, 0, 252, 0]), data_in=252)
    expect_good(r)
    assert r.result.read_len == 18
    info = parse_fixed_sense(r.returned)
    assert (info.key, info.asc, info.ascq) == (0, 0, 0)
    short = run(dev, bytes([0x03, 0, 0, 0, 8, 0]), data_in=8)
    assert short.result.read_len is None and short.data_in == r.returned[:8]


@pytest.mark.parametrize(
    "cdb",
    [
        bytes([0xC0]) + bytes(9),
        bytes([0xA0]) + bytes(11),  # REPORT LUNS: answered by the kernel, never by us
        bytes([0x5E]) + bytes(9),  # PERSISTENT RESERVE IN
        bytes([0x04, 0, 0, 0, 0, 0]),  # FORMAT UNIT
        bytes([0x3C]) + bytes(9),  # READ BUFFER
        bytes([0x7F]) + bytes(9),
        bytes([0xFF]) * 16,
        b"",
    ],
)
def test_unknown_opcodes(cdb: bytes) -> None:
    dev, backend = make_device()
    expect_check(run(dev, cdb, data_in=64), INVALID_OPCODE)
    assert backend.calls == []


def test_dispatch_covers_the_whole_table() -> None:
    """Every command in the table reaches a handler: none answers INVALID OPERATION CODE."""
    dev, _ = make_device()
    for spec in COMMANDS:
        cdb = bytearray(spec.length)
        cdb[0] = spec.opcode
        if spec.service_action is not None:
            cdb[1] = spec.service_action
        r = run(dev, bytes(cdb), data_in=4096)
        assert r.status in (0, 2)
        if r.status == 2:
            assert r.triple != INVALID_OPCODE, spec.name


# ------------------------------------------------------------------------------------------------
# INQUIRY


def test_inquiry_standard_sets_read_len() -> None:
    dev, _ = make_device()
    r = run(dev, inquiry(alloc=255), data_in=255)
    expect_good(r)
    assert r.result.read_len == 96
    assert r.returned[8:16] == b"LIO-ORG "


@pytest.mark.parametrize(
    ("alloc", "buf", "read_len"),
    [(5, 5, None), (5, 96, 5), (0, 0, None), (0, 8, 0), (255, 20, None)],
)
def test_inquiry_truncation(alloc: int, buf: int, read_len: int | None) -> None:
    dev, _ = make_device()
    r = run(dev, inquiry(alloc=alloc), data_in=buf)
    expect_good(r)
    assert r.result.read_len == read_len
    full = run(dev, inquiry(alloc=255), data_in=255).returned
    assert r.returned == full[: min(alloc, buf)]


def test_inquiry_vpd_pages_through_execute() -> None:
    dev, _ = make_device()
    pages = run(dev, inquiry(1, 0x00, 255), data_in=255)
    expect_good(pages)
    for code in pages.returned[4:]:
        r = run(dev, inquiry(1, code, 255), data_in=255, segments=3)
        expect_good(r)
        assert r.returned[1] == code
    serial = run(dev, inquiry(1, 0x80, 255), data_in=255)
    assert serial.returned[4:] == dev.identity.serial.encode()


def test_inquiry_errors() -> None:
    dev, _ = make_device()
    r = run(dev, inquiry(1, 0x86), data_in=255)
    expect_check(r, INVALID_FIELD)
    assert r.sense.field == FieldPointer(2)
    expect_check(run(dev, inquiry(0, 0x83), data_in=255), INVALID_FIELD)


# ------------------------------------------------------------------------------------------------
# READ CAPACITY


@pytest.mark.parametrize(
    ("num_blocks", "expected"),
    [(64, 63), (0xFFFF_FFFF, 0xFFFF_FFFE), (0x1_0000_0000, 0xFFFF_FFFF), (1 << 40, 0xFFFF_FFFF)],
)
def test_read_capacity10(num_blocks: int, expected: int) -> None:
    backend = MemoryBackend(1, BS)
    backend.num_blocks = num_blocks  # only the reply is exercised, no I/O
    dev = ScsiDevice(backend, DeviceIdentity(serial="s"))
    r = run(dev, bytes([0x25]) + bytes(9), data_in=8)
    expect_good(r)
    assert int.from_bytes(r.returned[0:4], "big") == expected
    assert int.from_bytes(r.returned[4:8], "big") == BS


def test_read_capacity16() -> None:
    dev, backend = make_device(num_blocks=100, block_size=4096)
    r = run(dev, read_capacity16(32), data_in=32)
    expect_good(r)
    data = r.returned
    assert int.from_bytes(data[0:8], "big") == 99
    assert int.from_bytes(data[8:12], "big") == 4096
    assert data[12] == 0  # no protection
    assert data[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
    short = run(dev, read_capacity16(12), data_in=32)
    assert short.result.read_len == 12 and short.returned == data[:12]
    backend.num_blocks = 1 << 40
    big = run(dev, read_capacity16(32), data_in=32)
    assert int.from_bytes(big.returned[0:8], "big") == (1 << 40) - 1


# ------------------------------------------------------------------------------------------------
# MODE SENSE / MODE SELECT


def caching_wce(dev: ScsiDevice, pc: int = 0) -> bool:
    r = run(dev, mode_sense6(0x08, pc=pc, dbd=True), data_in=255)
    expect_good(r)
    return bool(r.returned[4 + 2] & 0x04)


@pytest.mark.parametrize("ten", [False, True])
def test_mode_select_toggles_wce_and_mode_sense_shows_it(ten: bool) -> None:
    dev, backend = make_device(write_cache=True)
    assert caching_wce(dev) is True
    page = run(dev, mode_sense10(0x08, dbd=True), data_in=1024).returned[8:]
    assert page[0] == 0x08
    new_page = bytes([page[0] & 0x3F, page[1], page[2] & ~0x04]) + page[3:]
    header = bytes(8) if ten else bytes(4)
    params = header + new_page
    cdb = mode_select10(len(params)) if ten else mode_select6(len(params))
    expect_good(run(dev, cdb, params, segments=3))
    assert backend.write_cache is False
    assert caching_wce(dev) is False
    assert caching_wce(dev, pc=2) is True  # default is what the device started with
    # With WCE=0 every write becomes FUA at the backend.
    expect_good(run(dev, cdb10(0x2A, 0, 1), pattern(1)))
    assert backend.calls[-1] == ("write", 0, BS, True)
    # And back on.
    params = header + new_page[:2] + bytes([new_page[2] | 0x04]) + new_page[3:]
    expect_good(run(dev, cdb, params))
    assert backend.write_cache is True and caching_wce(dev) is True
    expect_good(run(dev, cdb10(0x2A, 0, 1), pattern(1)))
    assert backend.calls[-1] == ("write", 0, BS, False)


def test_mode_sense_all_pages_and_truncation() -> None:
    dev, _ = make_device()
    full = run(dev, mode_sense6(0x3F), data_in=255)
    expect_good(full)
    assert full.returned[0] == len(full.returned) - 1
    assert full.returned[2] & 0x10  # DPOFUA
    short = run(dev, mode_sense6(0x3F, alloc=4), data_in=255)
    assert short.result.read_len == 4 and short.returned == full.returned[:4]
    ten = run(dev, mode_sense10(0x3F, llbaa=True), data_in=1024)
    expect_good(ten)
    assert int.from_bytes(ten.returned[6:8], "big") == 16


def test_mode_errors() -> None:
    dev, backend = make_device()
    expect_check(run(dev, mode_sense6(0x08, pc=3), data_in=255), SAVING)
    expect_check(run(dev, mode_sense6(0x1C), data_in=255), INVALID_FIELD)
    expect_check(run(dev, mode_select6(24, sp=True), bytes(24)), INVALID_FIELD)
    expect_check(run(dev, mode_select6(24), bytes(12)), INVALID_FIELD)  # data-out too short
    expect_check(run(dev, mode_select6(2), bytes(2)), PARAM_LEN)
    expect_check(run(dev, mode_select6(8), bytes(4) + b"\x1c\x02\x00\x00"), INVALID_PARAM)
    expect_good(run(dev, mode_select6(0), b""))
    assert backend.write_cache is True


# ------------------------------------------------------------------------------------------------
# READ / WRITE


RW_FORMS = [
    ("6", lambda op, lba, n, b1=0: cdb6(op, lba, n), 0x08, 0x0A),
    ("10", lambda op, lba, n, b1=0: cdb10(op, lba, n, b1=b1), 0x28, 0x2A),
    ("12", lambda op, lba, n, b1=0: cdb12(op, lba, n, b1=b1), 0xA8, 0xAA),
    ("16", lambda op, lba, n, b1=0: cdb16(op, lba, n, b1=b1), 0x88, 0x8A),
]


@pytest.mark.parametrize(("form", "make", "rop", "wop"), RW_FORMS, ids=[f[0] for f in RW_FORMS])
@pytest.mark.parametrize("segments", [1, 3])
def test_write_then_read_round_trip(form: str, make, rop: int, wop: int, segments: int) -> None:  # type: ignore[no-untyped-def]
    dev, backend = make_device()
    data = pattern(5)
    expect_good(run(dev, make(wop, 10, 5), data, segments=segments))
    assert backend.block(10, 5) == data
    assert backend.calls == [("write", 10 * BS, 5 * BS, False)]
    r = run(dev, make(rop, 10, 5), data_in=5 * BS, segments=segments)
    expect_good(r)
    assert r.data_in == data and r.result.read_len is None
    assert backend.calls[-1] == ("read", 10 * BS, 5 * BS)


@pytest.mark.parametrize(
    ("form", "make", "rop", "wop"), RW_FORMS[1:], ids=[f[0] for f in RW_FORMS[1:]]
)
def test_fua_reaches_backend(form: str, make, rop: int, wop: int) -> None:  # type: ignore[no-untyped-def]
    dev, backend = make_device()
    expect_good(run(dev, make(wop, 0, 1, 0x08), pattern(1)))
    assert backend.calls == [("write", 0, BS, True)]
    expect_good(run(dev, make(rop, 0, 1, 0x08), data_in=BS))  # FUA read: accepted, plain read
    assert backend.calls[-1] == ("read", 0, BS)


def test_read_into_larger_buffer_sets_read_len() -> None:
    dev, backend = make_device()
    backend.fill(3, pattern(2))
    r = run(dev, cdb10(0x28, 3, 2), data_in=4 * BS)
    expect_good(r)
    assert r.result.read_len == 2 * BS
    assert r.returned == pattern(2)


def test_read6_zero_means_256_blocks() -> None:
    dev, backend = make_device(num_blocks=300, max_transfer_blocks=256)
    backend.fill(10, pattern(256))
    r = run(dev, cdb6(0x08, 10, 0), data_in=256 * BS)
    expect_good(r)
    assert r.data_in == pattern(256)
    dev_small, _ = make_device(num_blocks=64, max_transfer_blocks=512)
    expect_check(run(dev_small, cdb6(0x08, 0, 0), data_in=256 * BS), OUT_OF_RANGE)


@pytest.mark.parametrize("op", [0x28, 0x2A])
def test_zero_length_transfers_are_noops(op: int) -> None:
    dev, backend = make_device()
    expect_good(run(dev, cdb10(op, 64, 0)))  # at the capacity boundary: still fine
    expect_good(run(dev, cdb16(op + 0x60, 5, 0)))
    assert backend.calls == []
    expect_check(run(dev, cdb10(op, 65, 0)), OUT_OF_RANGE)


@pytest.mark.parametrize(
    ("cdb", "buf"),
    [
        (cdb10(0x28, 63, 2), 2 * BS),
        (cdb10(0x28, 64, 1), BS),
        (cdb10(0x2A, 0xFFFF_FFFF, 1), BS),
        (cdb16(0x88, (1 << 64) - 1, 1), BS),
        (cdb16(0x8A, 1 << 63, 1), BS),
        (cdb12(0xAA, 60, 5), 5 * BS),
        (cdb6(0x0A, 0x1F_FFFF, 1), BS),
    ],
)
def test_out_of_range(cdb: bytes, buf: int) -> None:
    dev, backend = make_device()
    expect_check(run(dev, cdb, bytes(buf)), OUT_OF_RANGE)
    assert backend.calls == []


@pytest.mark.parametrize("op", [0x28, 0x2A, 0x2E, 0x2F])
def test_max_transfer_length(op: int) -> None:
    dev, _ = make_device(num_blocks=1024, max_transfer_blocks=16)
    r = run(dev, cdb10(op, 0, 17), bytes(17 * BS))
    expect_check(r, INVALID_FIELD)
    assert r.sense.field == FieldPointer(7)
    expect_good(run(dev, cdb10(op, 0, 16), bytes(16 * BS)))


@pytest.mark.parametrize(
    "cdb", [cdb10(0x2A, 0, 2), cdb10(0x28, 0, 2), cdb10(0x2E, 0, 2), cdb10(0x2F, 0, 2, b1=0x02)]
)
def test_short_buffer_is_invalid_field(cdb: bytes) -> None:
    dev, backend = make_device()
    r = run(dev, cdb, bytes(BS + 100), segments=2)
    expect_check(r, INVALID_FIELD)
    assert r.sense.field == FieldPointer(7)
    assert backend.calls == []


def test_reads_use_the_callers_memory() -> None:
    """No copies: the backend is handed views of the very buffers in the iovec."""
    seen: list[memoryview] = []

    class Spy(MemoryBackend):
        def read(self, offset: int, iov: Sequence[memoryview]) -> None:
            seen.extend(iov)
            super().read(offset, iov)

    backend = Spy()
    dev = ScsiDevice(backend, DeviceIdentity(serial="s"))
    buf = bytearray(2 * BS)
    dev.execute(cdb10(0x28, 0, 2), [memoryview(buf)[:BS], memoryview(buf)[BS:]])
    assert len(seen) == 2
    assert all(v.obj is buf for v in seen)


# ------------------------------------------------------------------------------------------------
# WRITE AND VERIFY / VERIFY


@pytest.mark.parametrize("cdb", [cdb10(0x2E, 4, 2), cdb16(0x8E, 4, 2), cdb10(0x2E, 4, 2, b1=0x02)])
def test_write_and_verify_is_a_fua_write(cdb: bytes) -> None:
    dev, backend = make_device()
    expect_good(run(dev, cdb, pattern(2), segments=2))
    assert backend.block(4, 2) == pattern(2)
    assert backend.calls[0] == ("write", 4 * BS, 2 * BS, True)
    if cdb[1] & 0x02:
        assert backend.calls[1] == ("read", 4 * BS, 2 * BS)


def test_write_and_verify_bytchk_detects_bad_medium() -> None:
    class Flaky(MemoryBackend):
        def write(self, offset: int, iov: Sequence[memoryview], fua: bool) -> None:
            super().write(offset, iov, fua)
            self.data[offset + 700] ^= 0xFF

    backend = Flaky()
    dev = ScsiDevice(backend, DeviceIdentity(serial="s"))
    r = run(dev, cdb10(0x2E, 4, 2, b1=0x02), pattern(2))
    expect_check(r, MISCOMPARE_SENSE)
    assert r.sense.information == 700


@pytest.mark.parametrize("make", [cdb10, cdb16])
def test_verify_bytchk0_checks_range_only(make) -> None:  # type: ignore[no-untyped-def]
    op = 0x2F if make is cdb10 else 0x8F
    dev, backend = make_device()
    expect_good(run(dev, make(op, 0, 64)))
    expect_good(run(dev, make(op, 64, 0)))
    assert backend.calls == []
    expect_check(run(dev, make(op, 60, 5)), OUT_OF_RANGE)


@pytest.mark.parametrize("segments", [1, 4])
def test_verify_bytchk1(segments: int) -> None:
    dev, backend = make_device()
    backend.fill(8, pattern(4))
    expect_good(run(dev, cdb10(0x2F, 8, 4, b1=0x02), pattern(4), segments=segments))
    bad = bytearray(pattern(4))
    bad[3 * BS + 17] ^= 1
    r = run(dev, cdb16(0x8F, 8, 4, b1=0x02), bytes(bad), segments=segments)
    expect_check(r, MISCOMPARE_SENSE)
    assert r.sense.information == 3 * BS + 17
    assert backend.block(8, 4) == pattern(4)  # verify never writes


def test_verify_bytchk3_compares_every_block_with_one() -> None:
    dev, backend = make_device()
    block = pattern(1, seed=9)
    for lba in range(20, 30):
        backend.fill(lba, block)
    expect_good(run(dev, cdb10(0x2F, 20, 10, b1=0x06), block))
    backend.data[27 * BS + 5] ^= 0x80
    r = run(dev, cdb10(0x2F, 20, 10, b1=0x06), block)
    expect_check(r, MISCOMPARE_SENSE)
    assert r.sense.information == 7 * BS + 5
    expect_check(run(dev, cdb10(0x2F, 20, 10, b1=0x06), block[:100]), INVALID_FIELD)


def test_verify_large_range_is_chunked() -> None:
    blocks = 3 * CHUNK_BYTES // BS + 3
    dev, backend = make_device(num_blocks=blocks, max_transfer_blocks=blocks)
    expect_good(run(dev, cdb16(0x8F, 0, blocks, b1=0x02), bytes(blocks * BS)))
    reads = [c for c in backend.calls if c[0] == "read"]
    assert len(reads) == 4
    assert all(int(str(c[2])) <= CHUNK_BYTES for c in reads)


# ------------------------------------------------------------------------------------------------
# SYNCHRONIZE CACHE


@pytest.mark.parametrize(
    "cdb", [cdb10(0x35, 0, 0), cdb10(0x35, 5, 10, b1=0x02), cdb16(0x91, 0, 64)]
)
def test_sync_cache_flushes(cdb: bytes) -> None:
    dev, backend = make_device()
    expect_good(run(dev, cdb))
    assert backend.ops() == ["flush"]


@pytest.mark.parametrize("cdb", [cdb10(0x35, 60, 5), cdb16(0x91, 65, 0)])
def test_sync_cache_out_of_range(cdb: bytes) -> None:
    dev, backend = make_device()
    expect_check(run(dev, cdb), OUT_OF_RANGE)
    assert backend.calls == []


# ------------------------------------------------------------------------------------------------
# UNMAP


def test_unmap_zeroes_ranges() -> None:
    dev, backend = make_device()
    backend.fill(0, pattern(64))
    params = unmap_params((2, 3), (10, 1), (20, 0), (63, 1))
    expect_good(run(dev, unmap_cdb(len(params)), params, segments=3))
    assert backend.calls == [
        ("unmap", 2 * BS, 3 * BS),
        ("unmap", 10 * BS, BS),
        ("unmap", 63 * BS, BS),
    ]
    assert backend.block(2, 3) == bytes(3 * BS)
    assert backend.block(5) == pattern(64)[5 * BS : 6 * BS]
    assert backend.block(63) == bytes(BS)


def test_unmap_param_len_zero_is_noop() -> None:
    dev, backend = make_device()
    expect_good(run(dev, unmap_cdb(0), b""))
    assert backend.calls == []


def test_unmap_ignores_incomplete_descriptor() -> None:
    dev, backend = make_device()
    params = unmap_params((2, 3), (4, 4))
    truncated = params[:-4]  # second descriptor cut short by the parameter list length
    expect_good(run(dev, unmap_cdb(len(truncated)), truncated))
    assert backend.calls == [("unmap", 2 * BS, 3 * BS)]


@pytest.mark.parametrize(
    ("params", "cdb_len", "triple"),
    [
        (bytes(4), 4, PARAM_LEN),
        (bytes(7), 7, PARAM_LEN),
        (unmap_params((0, 1), (63, 2)), None, OUT_OF_RANGE),
        (unmap_params((1 << 63, 1)), None, OUT_OF_RANGE),
        (unmap_params(*[(i, 1) for i in range(5)]), None, INVALID_PARAM),  # > 4 descriptors
        (unmap_params((0, 6), (10, 5)), None, INVALID_PARAM),  # > 10 blocks
        (unmap_params((0, 1)), 40, INVALID_FIELD),  # data-out shorter than the list length
    ],
)
def test_unmap_errors_change_nothing(
    params: bytes, cdb_len: int | None, triple: tuple[int, int, int]
) -> None:
    dev, backend = make_device(max_unmap_descriptors=4, max_unmap_blocks=10)
    backend.fill(0, pattern(64))
    expect_check(run(dev, unmap_cdb(cdb_len or len(params)), params), triple)
    assert backend.calls == []
    assert backend.block(0, 64) == pattern(64)


# ------------------------------------------------------------------------------------------------
# WRITE SAME


@pytest.mark.parametrize("make", [cdb10, cdb16])
def test_write_same_replicates_data(make) -> None:  # type: ignore[no-untyped-def]
    op = 0x41 if make is cdb10 else 0x93
    dev, backend = make_device()
    block = pattern(1, seed=3)
    expect_good(run(dev, make(op, 5, 7), block + b"junk beyond one block"))
    assert backend.block(5, 7) == block * 7
    assert backend.block(4) == bytes(BS) and backend.block(12) == bytes(BS)


@pytest.mark.parametrize(
    ("cdb", "data", "call"),
    [
        (cdb10(0x41, 2, 8, b1=0x08), bytes(BS), ("unmap", 2 * BS, 8 * BS)),
        (cdb16(0x93, 2, 8, b1=0x08), bytes(BS), ("unmap", 2 * BS, 8 * BS)),
        (cdb10(0x41, 2, 8), bytes(BS), ("write_zeroes", 2 * BS, 8 * BS)),
        (cdb16(0x93, 2, 8, b1=0x01), b"", ("write_zeroes", 2 * BS, 8 * BS)),  # NDOB
        (cdb16(0x93, 2, 8, b1=0x09), b"", ("unmap", 2 * BS, 8 * BS)),  # NDOB + UNMAP
    ],
)
def test_write_same_zero_block(cdb: bytes, data: bytes, call: tuple[object, ...]) -> None:
    dev, backend = make_device()
    backend.fill(0, pattern(64))
    expect_good(run(dev, cdb, data))
    assert backend.calls == [call]
    assert backend.block(2, 8) == bytes(8 * BS)


def test_write_same_unmap_with_nonzero_data_writes() -> None:
    dev, backend = make_device()
    block = pattern(1)
    expect_good(run(dev, cdb10(0x41, 0, 4, b1=0x08), block))
    assert backend.ops() == ["write"]
    assert backend.block(0, 4) == block * 4


def test_write_same_large_range_is_chunked() -> None:
    blocks = 5 * CHUNK_BYTES // BS + 1
    dev, backend = make_device(num_blocks=blocks + 1, max_write_same_blocks=blocks)
    block = pattern(1)
    expect_good(run(dev, cdb16(0x93, 1, blocks), block))
    writes = [c for c in backend.calls if c[0] == "write"]
    assert len(writes) == 6
    assert all(int(str(c[2])) <= CHUNK_BYTES for c in writes)
    assert backend.block(1, blocks) == block * blocks


def test_write_same_honours_wce_off() -> None:
    dev, backend = make_device(write_cache=False)
    expect_good(run(dev, cdb10(0x41, 0, 2), pattern(1)))
    assert backend.calls == [("write", 0, 2 * BS, True)]
    backend.calls.clear()
    expect_good(run(dev, cdb10(0x41, 0, 2), bytes(BS)))
    assert backend.ops() == ["write_zeroes", "flush"]


def test_write_same_errors() -> None:
    dev, backend = make_device(max_write_same_blocks=16)
    r = run(dev, cdb10(0x41, 0, 17), pattern(1))
    expect_check(r, INVALID_FIELD)
    assert r.sense.field == FieldPointer(7)
    expect_check(run(dev, cdb10(0x41, 60, 5), pattern(1)), OUT_OF_RANGE)
    expect_check(run(dev, cdb16(0x93, 0, 4), pattern(1)[:100]), INVALID_FIELD)
    expect_check(run(dev, cdb10(0x41, 0, 0), pattern(1)), INVALID_FIELD)
    assert backend.calls == []


# ------------------------------------------------------------------------------------------------
# COMPARE AND WRITE


def test_compare_and_write_success() -> None:
    dev, backend = make_device()
    old, new = pattern(1, 1), pattern(1, 2)
    backend.fill(7, old)
    expect_good(run(dev, caw(7, 1), old + new))
    assert backend.block(7) == new
    assert backend.ops() == ["compare_and_write"]


def test_compare_and_write_miscompare() -> None:
    dev, backend = make_device()
    old, new = pattern(1, 1), pattern(1, 2)
    backend.fill(7, old)
    wrong = bytearray(old)
    wrong[300] ^= 0x55
    r = run(dev, caw(7, 1), bytes(wrong) + new)
    expect_check(r, MISCOMPARE_SENSE)
    assert r.sense.information == 300
    assert backend.block(7) == old


def test_compare_and_write_fua_and_wce_flush() -> None:
    dev, backend = make_device()
    expect_good(run(dev, caw(0, 1, b1=0x08), bytes(BS) + pattern(1)))
    assert backend.ops() == ["compare_and_write", "flush"]
    dev, backend = make_device(write_cache=False)
    expect_good(run(dev, caw(0, 1), bytes(BS) + pattern(1)))
    assert backend.ops() == ["compare_and_write", "flush"]


def test_compare_and_write_multi_block_fragmented() -> None:
    dev, backend = make_device(max_compare_and_write_blocks=2)
    old, new = pattern(2, 1), pattern(2, 2)
    backend.fill(3, old)
    expect_good(run(dev, caw(3, 2), old + new, segments=5))
    assert backend.block(3, 2) == new


def test_compare_and_write_errors() -> None:
    dev, backend = make_device()
    expect_good(run(dev, caw(0, 0), b""))  # zero blocks: no-op
    r = run(dev, caw(0, 2), bytes(4 * BS))
    expect_check(r, INVALID_FIELD)
    assert r.sense.field == FieldPointer(13)
    expect_check(run(dev, caw(64, 1), bytes(2 * BS)), OUT_OF_RANGE)
    expect_check(run(dev, caw(0, 1), bytes(BS)), INVALID_FIELD)
    assert backend.calls == []


# ------------------------------------------------------------------------------------------------
# REPORT SUPPORTED OPERATION CODES


def test_rsoc_all_lists_the_table() -> None:
    dev, _ = make_device()
    r = run(dev, rsoc(0), data_in=8192)
    expect_good(r)
    data = r.returned
    assert int.from_bytes(data[0:4], "big") == len(data) - 4
    listed = set()
    for pos in range(4, len(data), 8):
        d = data[pos : pos + 8]
        sa = int.from_bytes(d[2:4], "big") if d[5] & 0x01 else None
        listed.add((d[0], sa, int.from_bytes(d[6:8], "big")))
    assert listed == {(c.opcode, c.service_action, c.length) for c in COMMANDS}


def test_rsoc_all_with_timeouts() -> None:
    dev, _ = make_device()
    data = run(dev, rsoc(0, rctd=True), data_in=8192).returned
    assert len(data) == 4 + 20 * len(COMMANDS)
    assert data[4 + 5] & 0x02  # CTDP
    assert data[4 + 8 : 4 + 10] == b"\x00\x0a"


def test_rsoc_one_command() -> None:
    dev, _ = make_device()
    r = run(dev, rsoc(1, 0x2A), data_in=512)
    expect_good(r)
    assert r.returned[1] & 0x07 == 0x3
    assert int.from_bytes(r.returned[2:4], "big") == 10
    assert r.returned[4:14] == bytes([0x2A, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x00])
    sa = run(dev, rsoc(2, 0x9E, 0x10, rctd=True), data_in=512)
    expect_good(sa)
    assert sa.returned[1] == 0x83
    assert sa.returned[4:6] == b"\x9e\x10"
    assert len(sa.returned) == 4 + 16 + 12
    for cdb in (rsoc(1, 0xC0), rsoc(2, 0x9E, 0x12), rsoc(2, 0xC1, 3)):
        r = run(dev, cdb, data_in=512)
        expect_good(r)
        assert r.returned == b"\x00\x01\x00\x00"


def test_rsoc_errors_and_truncation() -> None:
    dev, _ = make_device()
    expect_check(run(dev, rsoc(1, 0x9E), data_in=512), INVALID_FIELD)
    expect_check(run(dev, rsoc(2, 0x28, 0), data_in=512), INVALID_FIELD)
    r = run(dev, rsoc(0, alloc=10), data_in=512)
    expect_good(r)
    assert r.result.read_len == 10


# ------------------------------------------------------------------------------------------------
# Backend failures


def store_error(kind: str | None) -> StoreError:
    """A StoreError with ``kind``, or with no ``kind`` attribute at all (older errors.py)."""
    err = StoreError("boom")
    if kind is None:
        if hasattr(err, "kind"):
            delattr(err, "kind")
    else:
        err.kind = kind
    return err


@pytest.mark.parametrize(
    ("op", "kind", "cdb", "data", "triple"),
    [
        ("read", "read", cdb10(0x28, 0, 1), None, READ_ERROR),
        ("read", None, cdb10(0x28, 0, 1), None, READ_ERROR),
        ("write", "write", cdb10(0x2A, 0, 1), bytes(BS), WRITE_ERROR),
        ("write", None, cdb16(0x8A, 0, 1), bytes(BS), WRITE_ERROR),
        ("write", "read", cdb10(0x2A, 0, 1), bytes(BS), READ_ERROR),  # kind wins when present
        ("write", "bogus", cdb10(0x2A, 0, 1), bytes(BS), WRITE_ERROR),
        ("read", "io", cdb10(0x28, 0, 1), None, READ_ERROR),  # generic kind: by operation
        ("flush", "flush", cdb10(0x35, 0, 0), None, WRITE_ERROR),
        ("unmap", "discard", unmap_cdb(24), unmap_params((0, 1)), WRITE_ERROR),
        ("flush", None, cdb10(0x35, 0, 0), None, WRITE_ERROR),
        ("unmap", None, unmap_cdb(24), unmap_params((0, 1)), WRITE_ERROR),
        ("write_zeroes", None, cdb10(0x41, 0, 1), bytes(BS), WRITE_ERROR),
        ("compare_and_write", None, caw(0, 1), bytes(2 * BS), WRITE_ERROR),
        ("read", None, cdb10(0x2F, 0, 1, b1=0x02), bytes(BS), READ_ERROR),
    ],
)
def test_store_errors_become_medium_errors(
    op: str, kind: str | None, cdb: bytes, data: bytes | None, triple: tuple[int, int, int]
) -> None:
    dev, backend = make_device()
    backend.fail[op] = store_error(kind)
    r = run(dev, cdb, data, data_in=BS)
    expect_check(r, triple)


def test_internal_error_result() -> None:
    result = internal_error_result()
    assert isinstance(result, ScsiResult)
    assert result.status == 2
    assert result.sense is not None
    info = parse_fixed_sense(result.sense)
    assert (info.key, info.asc, info.ascq) == (0x4, 0x44, 0x00)


def test_result_is_frozen() -> None:
    result = ScsiResult(0)
    with pytest.raises(AttributeError):
        result.status = 2  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------
# Concurrency smoke test


def test_concurrent_mode_select_and_io() -> None:
    dev, backend = make_device(num_blocks=256)
    page = run(dev, mode_sense6(0x08, dbd=True), data_in=255).returned[4:]
    on = bytes(4) + page
    off = bytes(4) + page[:2] + bytes([page[2] & ~0x04]) + page[3:]
    errors: list[object] = []

    def toggler() -> None:
        for i in range(200):
            params = on if i % 2 else off
            r = run(dev, mode_select6(len(params)), params)
            if r.status != 0:
                errors.append(r.result)

    def writer(base: int) -> None:
        for i in range(200):
            lba = base + i % 32
            r = run(dev, cdb10(0x2A, lba, 1), pattern(1, seed=lba))
            if r.status != 0:
                errors.append(r.result)
            r = run(dev, cdb10(0x28, lba, 1), data_in=BS)
            if r.status != 0 or r.data_in != pattern(1, seed=lba):
                errors.append(("read", lba))

    threads = [threading.Thread(target=toggler)] + [
        threading.Thread(target=writer, args=(base,)) for base in (0, 64, 128, 192)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert backend.write_cache is True  # the last toggle (i = 199) turned it on
