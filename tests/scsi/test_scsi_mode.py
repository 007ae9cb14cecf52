"""MODE SENSE layouts and MODE SELECT validation (pure functions)."""

from __future__ import annotations

import pytest

from targetmirror.scsi.cdb import ModeSelectCdb, ModeSenseCdb
from targetmirror.scsi.mode import mode_page, mode_select, mode_sense
from targetmirror.scsi.sense import FieldPointer, SenseError

from .scsi_util import INVALID_FIELD, INVALID_PARAM, PARAM_LEN

BS = 512
NB = 1000


def sense6(page: int, pc: int = 0, dbd: bool = False, sub: int = 0) -> ModeSenseCdb:
    return ModeSenseCdb(False, dbd, False, pc, page, sub, 255)


def sense10(page: int, pc: int = 0, dbd: bool = False, llbaa: bool = False) -> ModeSenseCdb:
    return ModeSenseCdb(True, dbd, llbaa, pc, page, 0, 1024)


def ms(cdb: ModeSenseCdb, wc: bool = True, default: bool = True, nb: int = NB) -> bytes:
    return mode_sense(
        cdb, block_size=BS, num_blocks=nb, write_cache=wc, default_write_cache=default
    )


def test_mode_sense6_caching_with_descriptor() -> None:
    data = ms(sense6(0x08))
    assert data[0] == len(data) - 1
    assert data[1] == 0  # medium type
    assert data[2] == 0x10  # DPOFUA, not write protected
    assert data[3] == 8
    assert data[4:8] == NB.to_bytes(4, "big")
    assert data[8] == 0
    assert data[9:12] == BS.to_bytes(3, "big")
    page = data[12:]
    assert page[0] == 0x08 and page[1] == 0x12 and len(page) == 20
    assert page[2] & 0x04  # WCE


def test_mode_sense_reflects_wce_per_page_control() -> None:
    assert not ms(sense6(0x08, dbd=True), wc=False)[4 + 2] & 0x04
    assert ms(sense6(0x08, pc=1, dbd=True), wc=False)[4 + 2] == 0x04  # changeable: WCE only
    assert ms(sense6(0x08, pc=2, dbd=True), wc=False, default=True)[4 + 2] & 0x04


def test_mode_sense10_long_lba() -> None:
    data = ms(sense10(0x0A, llbaa=True), nb=1 << 33)
    assert int.from_bytes(data[0:2], "big") == len(data) - 2
    assert data[3] == 0x10
    assert data[4] & 0x01  # LONGLBA
    assert int.from_bytes(data[6:8], "big") == 16
    assert int.from_bytes(data[8:16], "big") == 1 << 33
    assert int.from_bytes(data[20:24], "big") == BS
    assert data[24] == 0x0A and data[25] == 0x0A


def test_short_descriptor_saturates() -> None:
    data = ms(sense10(0x01), nb=1 << 33)
    assert data[8:12] == b"\xff\xff\xff\xff"


def test_all_pages_in_order_and_dbd() -> None:
    data = ms(sense6(0x3F, dbd=True))
    assert data[3] == 0
    pos, codes = 4, []
    while pos < len(data):
        codes.append(data[pos] & 0x3F)
        pos += 2 + data[pos + 1]
    assert pos == len(data)
    assert codes == [0x01, 0x08, 0x0A]
    assert ms(sense6(0x3F, dbd=True, sub=0xFF)) == data


@pytest.mark.parametrize(
    ("cdb", "field"),
    [
        (sense6(0x02), FieldPointer(2, 5)),
        (sense6(0x1C), FieldPointer(2, 5)),
        (sense6(0x08, sub=1), FieldPointer(3)),
        (sense6(0x3F, sub=2), FieldPointer(3)),
    ],
)
def test_mode_sense_unsupported_page(cdb: ModeSenseCdb, field: FieldPointer) -> None:
    with pytest.raises(SenseError) as info:
        ms(cdb)
    assert (info.value.key, info.value.asc, info.value.ascq) == INVALID_FIELD
    assert info.value.field == field


def caching(wce: bool, extra: int = 0) -> bytes:
    page = bytearray(mode_page(0x08, 0, write_cache=wce, default_write_cache=wce))
    page[2] |= extra
    return bytes(page)


def select(data: bytes, ten: bool = False, wc: bool = True) -> bool:
    return mode_select(
        ModeSelectCdb(ten, len(data)), data, block_size=BS, num_blocks=NB, write_cache=wc
    )


H6 = b"\x00\x00\x00\x00"
H10 = bytes(8)
BD = NB.to_bytes(4, "big") + b"\x00" + BS.to_bytes(3, "big")


@pytest.mark.parametrize(
    ("data", "ten", "wc", "expected"),
    [
        (H6 + caching(False), False, True, False),
        (H6 + caching(True), False, False, True),
        (b"\x00\x00\x00\x08" + BD + caching(False), False, True, False),
        (
            H6[:3] + b"\x08" + bytes(4) + b"\x00" + BS.to_bytes(3, "big") + caching(False),
            False,
            True,
            False,
        ),
        (H10 + caching(False), True, True, False),
        (H6, False, True, True),  # header only: nothing changes
        (H6 + mode_page(0x0A, 0, write_cache=True, default_write_cache=True), False, False, False),
        (H6 + bytes([0x88]) + caching(False)[1:], False, True, False),  # PS bit ignored
        (b"\x17\x00\x10\x00" + caching(False), False, True, False),  # echoed header ignored
        (H6 + caching(False) + caching(True), False, False, True),  # last one wins
    ],
)
def test_mode_select_good(data: bytes, ten: bool, wc: bool, expected: bool) -> None:
    assert select(data, ten, wc) is expected


LONG_HDR = bytes([0, 0, 0, 0, 1, 0, 0, 16])
LONG_BD = NB.to_bytes(8, "big") + bytes(4) + BS.to_bytes(4, "big")


@pytest.mark.parametrize(
    ("name", "data", "ten", "triple", "field"),
    [
        ("short header 6", b"\x00\x00", False, PARAM_LEN, None),
        ("short header 10", bytes(6), True, PARAM_LEN, None),
        (
            "bd len 4",
            b"\x00\x00\x00\x04" + bytes(4),
            False,
            INVALID_PARAM,
            FieldPointer(3, None, False),
        ),
        ("bd truncated", b"\x00\x00\x00\x08" + bytes(4), False, PARAM_LEN, None),
        (
            "bd other block size",
            H6[:3] + b"\x08" + bytes(5) + (4096).to_bytes(3, "big"),
            False,
            INVALID_PARAM,
            FieldPointer(9, None, False),
        ),
        (
            "bd other capacity",
            H6[:3] + b"\x08" + (5).to_bytes(4, "big") + b"\x00" + BS.to_bytes(3, "big"),
            False,
            INVALID_PARAM,
            FieldPointer(4, None, False),
        ),
        ("long bd ok", LONG_HDR + LONG_BD, True, None, None),
        (
            "long bd wrong block size",
            LONG_HDR + LONG_BD[:12] + (4096).to_bytes(4, "big"),
            True,
            INVALID_PARAM,
            FieldPointer(20, None, False),
        ),
        (
            "unknown page",
            H6 + b"\x1c\x0a" + bytes(10),
            False,
            INVALID_PARAM,
            FieldPointer(4, 5, False),
        ),
        ("spf", H6 + b"\x48\x12" + bytes(18), False, INVALID_PARAM, FieldPointer(4, 6, False)),
        (
            "wrong page length",
            H6 + b"\x08\x10" + bytes(16),
            False,
            INVALID_PARAM,
            FieldPointer(5, None, False),
        ),
        ("page truncated", H6 + caching(False)[:10], False, PARAM_LEN, None),
        ("page header truncated", H6 + b"\x08", False, PARAM_LEN, None),
        (
            "rcd is not changeable",
            H6 + caching(True, extra=0x01),
            False,
            INVALID_PARAM,
            FieldPointer(6, 0, False),
        ),
        (
            "control page change",
            H6 + bytes([0x0A, 0x0A, 0x04]) + bytes(9),
            False,
            INVALID_PARAM,
            FieldPointer(6, 2, False),
        ),
    ],
)
def test_mode_select_bad(
    name: str,
    data: bytes,
    ten: bool,
    triple: tuple[int, int, int] | None,
    field: FieldPointer | None,
) -> None:
    if triple is None:
        assert select(data, ten) is True
        return
    with pytest.raises(SenseError) as info:
        select(data, ten)
    assert (info.value.key, info.value.asc, info.value.ascq) == triple
    assert info.value.field == field
