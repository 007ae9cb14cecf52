"""Fixed-format sense layout: the bytes initiators decode."""

from __future__ import annotations

import pytest

from targetmirror.errors import TargetMirrorError
from targetmirror.scsi import sense as s
from targetmirror.scsi.sense import FieldPointer, SenseError, build_fixed_sense, parse_fixed_sense


def test_plain_sense_layout() -> None:
    data = build_fixed_sense(0x5, 0x24, 0x00)
    assert len(data) == 18
    assert data[0] == 0x70
    assert data[2] == 0x05
    assert data[7] == 0x0A
    assert (data[12], data[13]) == (0x24, 0x00)
    assert data[3:7] == bytes(4)
    assert data[15:18] == bytes(3)


def test_information_sets_valid() -> None:
    data = build_fixed_sense(0xE, 0x1D, 0x00, information=0x1234)
    assert data[0] == 0xF0
    assert data[3:7] == b"\x00\x00\x12\x34"


def test_information_too_big_leaves_valid_clear() -> None:
    data = build_fixed_sense(0xE, 0x1D, 0x00, information=1 << 32)
    assert data[0] == 0x70
    assert data[3:7] == bytes(4)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (FieldPointer(2), b"\xc0\x00\x02"),
        (FieldPointer(1, 5), b"\xcd\x00\x01"),
        (FieldPointer(0x123, 0, in_cdb=False), b"\x88\x01\x23"),
        (FieldPointer(7, None, in_cdb=False), b"\x80\x00\x07"),
    ],
)
def test_field_pointer(field: FieldPointer, expected: bytes) -> None:
    data = build_fixed_sense(0x5, 0x24, 0x00, field=field)
    assert data[15:18] == expected
    assert parse_fixed_sense(data).field == field


@pytest.mark.parametrize(
    ("error", "triple"),
    [
        (s.invalid_opcode(), (5, 0x20, 0)),
        (s.invalid_cdb_field(3), (5, 0x24, 0)),
        (s.invalid_param_field(3), (5, 0x26, 0)),
        (s.param_list_length_error(), (5, 0x1A, 0)),
        (s.lba_out_of_range(), (5, 0x21, 0)),
        (s.saving_not_supported(2, 7), (5, 0x39, 0)),
        (s.miscompare(17), (0xE, 0x1D, 0)),
        (s.medium_error("read"), (3, 0x11, 0)),
        (s.medium_error("write"), (3, 0x0C, 0)),
        (s.medium_error("flush"), (3, 0x0C, 0)),
    ],
)
def test_constructors(error: SenseError, triple: tuple[int, int, int]) -> None:
    assert isinstance(error, TargetMirrorError)
    assert error.code == "scsi-sense"
    info = parse_fixed_sense(error.sense())
    assert (info.key, info.asc, info.ascq) == triple


def test_miscompare_carries_offset() -> None:
    assert parse_fixed_sense(s.miscompare(513).sense()).information == 513


@pytest.mark.parametrize("bad", [b"", bytes(17), b"\x72" + bytes(17)])
def test_parse_rejects_non_fixed(bad: bytes) -> None:
    with pytest.raises(ValueError):
        parse_fixed_sense(bad)
