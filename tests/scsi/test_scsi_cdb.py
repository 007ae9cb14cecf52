"""Table-driven tests of the CDB parser: good CDBs and their fields, bad CDBs and their sense."""

from __future__ import annotations

import pytest

from targetmirror.scsi.cdb import (
    COMMANDS,
    CompareAndWriteCdb,
    InquiryCdb,
    ModeSelectCdb,
    ModeSenseCdb,
    ParsedCdb,
    ReadCapacity16Cdb,
    ReadCdb,
    ReportOpcodesCdb,
    SyncCacheCdb,
    UnmapCdb,
    VerifyCdb,
    WriteCdb,
    WriteSameCdb,
    WriteVerifyCdb,
    find_command,
    parse_cdb,
)
from targetmirror.scsi.sense import FieldPointer, SenseError

from .scsi_util import (
    INVALID_FIELD,
    INVALID_OPCODE,
    SAVING,
    caw,
    cdb6,
    cdb10,
    cdb12,
    cdb16,
    inquiry,
    mode_select6,
    mode_select10,
    mode_sense6,
    mode_sense10,
    read_capacity16,
    rsoc,
    unmap_cdb,
)

GOOD_CDBS: list[tuple[str, bytes, ParsedCdb]] = [
    ("read6", cdb6(0x08, 0x1ABCDE, 7), ReadCdb(0x1ABCDE, 7, False, False, 4)),
    ("read6 len 0 is 256", cdb6(0x08, 5, 0), ReadCdb(5, 256, False, False, 4)),
    ("write6 len 0 is 256", cdb6(0x0A, 0, 0), WriteCdb(0, 256, False, False, 4)),
    ("read10", cdb10(0x28, 0xDEADBEEF, 0x1234), ReadCdb(0xDEADBEEF, 0x1234, False, False, 7)),
    ("read10 fua dpo", cdb10(0x28, 1, 2, b1=0x18), ReadCdb(1, 2, True, True, 7)),
    ("read10 fua_nv group", cdb10(0x28, 1, 2, b1=0x02, b6=0x1F), ReadCdb(1, 2, False, False, 7)),
    ("read10 len 0", cdb10(0x28, 3, 0), ReadCdb(3, 0, False, False, 7)),
    ("write10 fua", cdb10(0x2A, 9, 1, b1=0x08), WriteCdb(9, 1, True, False, 7)),
    ("read12", cdb12(0xA8, 7, 0x10000), ReadCdb(7, 0x10000, False, False, 6)),
    ("write12 dpo", cdb12(0xAA, 7, 1, b1=0x10), WriteCdb(7, 1, False, True, 6)),
    ("read16", cdb16(0x88, 1 << 40, 5), ReadCdb(1 << 40, 5, False, False, 10)),
    ("write16 fua", cdb16(0x8A, 2, 3, b1=0x08), WriteCdb(2, 3, True, False, 10)),
    ("write verify10", cdb10(0x2E, 4, 2, b1=0x02), WriteVerifyCdb(4, 2, True, False, 7)),
    ("write verify16", cdb16(0x8E, 4, 2), WriteVerifyCdb(4, 2, False, False, 10)),
    ("verify10 bytchk0", cdb10(0x2F, 1, 8), VerifyCdb(1, 8, 0, False, 7)),
    ("verify10 bytchk1", cdb10(0x2F, 1, 8, b1=0x02), VerifyCdb(1, 8, 1, False, 7)),
    ("verify16 bytchk3", cdb16(0x8F, 1, 8, b1=0x06), VerifyCdb(1, 8, 3, False, 10)),
    ("sync10 immed", cdb10(0x35, 0, 0, b1=0x02), SyncCacheCdb(0, 0, True)),
    ("sync16", cdb16(0x91, 5, 6), SyncCacheCdb(5, 6, False)),
    ("ws10 unmap", cdb10(0x41, 3, 4, b1=0x08), WriteSameCdb(3, 4, True, False, 7)),
    ("ws16 ndob", cdb16(0x93, 3, 4, b1=0x01), WriteSameCdb(3, 4, False, True, 10)),
    ("unmap", unmap_cdb(24), UnmapCdb(24)),
    ("caw", caw(10, 1, b1=0x08), CompareAndWriteCdb(10, 1, True, False)),
    ("caw 0", caw(10, 0), CompareAndWriteCdb(10, 0, False, False)),
    ("inquiry std", inquiry(alloc=0x1234), InquiryCdb(False, 0, 0x1234)),
    ("inquiry vpd", inquiry(1, 0x83, 64), InquiryCdb(True, 0x83, 64)),
    (
        "mode sense6",
        mode_sense6(0x08, pc=1, dbd=True),
        ModeSenseCdb(False, True, False, 1, 8, 0, 255),
    ),
    (
        "mode sense10",
        mode_sense10(0x3F, llbaa=True, alloc=512, sub=0xFF),
        ModeSenseCdb(True, False, True, 0, 0x3F, 0xFF, 512),
    ),
    ("mode select6", mode_select6(28), ModeSelectCdb(False, 28)),
    ("mode select10", mode_select10(300), ModeSelectCdb(True, 300)),
    ("mode select pf=0 empty", mode_select6(0, pf=False), ModeSelectCdb(False, 0)),
    ("read capacity16", read_capacity16(12), ReadCapacity16Cdb(12)),
    ("rsoc all", rsoc(0, alloc=100), ReportOpcodesCdb(False, 0, 0, 0, 100)),
    ("rsoc one", rsoc(2, 0x9E, 0x10, rctd=True), ReportOpcodesCdb(True, 2, 0x9E, 0x10, 8192)),
    ("long cdb is fine", cdb10(0x28, 1, 1) + bytes(6), ReadCdb(1, 1, False, False, 7)),
]


@pytest.mark.parametrize(("name", "cdb", "expected"), GOOD_CDBS, ids=[g[0] for g in GOOD_CDBS])
def test_good_cdbs_parse(name: str, cdb: bytes, expected: ParsedCdb) -> None:
    _, parsed = parse_cdb(cdb)
    assert parsed == expected


BAD_CDBS: list[tuple[str, bytes, tuple[int, int, int], FieldPointer | None]] = [
    ("empty", b"", INVALID_OPCODE, FieldPointer(0, 7)),
    ("unknown opcode", bytes([0xC0]) + bytes(9), INVALID_OPCODE, FieldPointer(0, 7)),
    ("report luns is the kernel's", bytes([0xA0]) + bytes(11), INVALID_OPCODE, FieldPointer(0, 7)),
    ("short read10", cdb10(0x28, 1, 1)[:9], INVALID_FIELD, None),
    ("opcode only", b"\x2a", INVALID_FIELD, None),
    ("sai without sa byte", b"\x9e", INVALID_FIELD, None),
    ("sai unknown sa", bytes([0x9E, 0x12]) + bytes(14), INVALID_FIELD, FieldPointer(1, 4)),
    ("maint in unknown sa", bytes([0xA3, 0x0A]) + bytes(10), INVALID_FIELD, FieldPointer(1, 4)),
    ("read10 rdprotect", cdb10(0x28, 1, 1, b1=0x20), INVALID_FIELD, FieldPointer(1, 5)),
    ("write16 wrprotect", cdb16(0x8A, 1, 1, b1=0xE0), INVALID_FIELD, FieldPointer(1, 7)),
    ("read10 reserved bit2", cdb10(0x28, 1, 1, b1=0x04), INVALID_FIELD, FieldPointer(1, 2)),
    ("read10 group bit 5", cdb10(0x28, 1, 1, b6=0x20), INVALID_FIELD, FieldPointer(6, 5)),
    ("read10 naca", cdb10(0x28, 1, 1)[:9] + b"\x04", INVALID_FIELD, FieldPointer(9, 2)),
    ("read6 reserved lun bits", cdb6(0x08, 0, 1, b1=0x20), INVALID_FIELD, FieldPointer(1, 5)),
    ("tur reserved", bytes([0, 0, 1, 0, 0, 0]), INVALID_FIELD, FieldPointer(2, 0)),
    ("tur link", bytes([0, 0, 0, 0, 0, 1]), INVALID_FIELD, FieldPointer(5, 0)),
    ("inquiry cmddt", inquiry(b1=0x02), INVALID_FIELD, FieldPointer(1, 1)),
    ("inquiry evpd=0 page", inquiry(0, 0x80), INVALID_FIELD, FieldPointer(2, None)),
    ("request sense desc", bytes([0x03, 1, 0, 0, 18, 0]), INVALID_FIELD, FieldPointer(1, 0)),
    ("mode sense saved", mode_sense6(0x08, pc=3), SAVING, FieldPointer(2, 7)),
    ("mode sense10 saved", mode_sense10(0x3F, pc=3), SAVING, FieldPointer(2, 7)),
    ("mode sense6 llbaa bit", bytes([0x1A, 0x10, 8, 0, 255, 0]), INVALID_FIELD, FieldPointer(1, 4)),
    ("mode select sp", mode_select6(28, sp=True), INVALID_FIELD, FieldPointer(1, 0)),
    ("mode select pf=0", mode_select10(28, pf=False), INVALID_FIELD, FieldPointer(1, 4)),
    ("verify bytchk 2", cdb10(0x2F, 1, 1, b1=0x04), INVALID_FIELD, FieldPointer(1, 2)),
    ("write verify bytchk 2", cdb10(0x2E, 1, 1, b1=0x04), INVALID_FIELD, FieldPointer(1, 2)),
    ("verify vrprotect", cdb16(0x8F, 1, 1, b1=0x20), INVALID_FIELD, FieldPointer(1, 5)),
    ("ws10 anchor", cdb10(0x41, 1, 1, b1=0x10), INVALID_FIELD, FieldPointer(1, 4)),
    ("ws10 ndob not in 10", cdb10(0x41, 1, 1, b1=0x01), INVALID_FIELD, FieldPointer(1, 0)),
    ("ws16 lbdata", cdb16(0x93, 1, 1, b1=0x02), INVALID_FIELD, FieldPointer(1, 1)),
    ("ws16 pbdata", cdb16(0x93, 1, 1, b1=0x04), INVALID_FIELD, FieldPointer(1, 2)),
    ("ws10 zero blocks (WSNZ)", cdb10(0x41, 1, 0), INVALID_FIELD, FieldPointer(7, None)),
    ("ws16 zero blocks (WSNZ)", cdb16(0x93, 1, 0), INVALID_FIELD, FieldPointer(10, None)),
    ("unmap anchor", bytes([0x42, 1]) + bytes(8), INVALID_FIELD, FieldPointer(1, 0)),
    (
        "caw reserved byte 12",
        caw(1, 1)[:12] + b"\x01" + caw(1, 1)[13:],
        INVALID_FIELD,
        FieldPointer(12, 0),
    ),
    (
        "read capacity10 lba without pmi",
        bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]),
        INVALID_FIELD,
        FieldPointer(2, None),
    ),
    ("read capacity10 reladr", bytes([0x25, 1]) + bytes(8), INVALID_FIELD, FieldPointer(1, 0)),
    (
        "read capacity16 lba without pmi",
        bytes([0x9E, 0x10]) + (5).to_bytes(8, "big") + bytes(6),
        INVALID_FIELD,
        FieldPointer(2, None),
    ),
    ("rsoc option 3", rsoc(3), INVALID_FIELD, FieldPointer(2, 2)),
    ("rsoc reserved bits", rsoc(0)[:2] + b"\x08" + rsoc(0)[3:], INVALID_FIELD, FieldPointer(2, 3)),
    ("start stop reserved", bytes([0x1B, 0, 0, 0, 0x08, 0]), INVALID_FIELD, FieldPointer(4, 3)),
    ("prevent reserved", bytes([0x1E, 0, 0, 0, 0x04, 0]), INVALID_FIELD, FieldPointer(4, 2)),
    ("sync10 reserved", cdb10(0x35, 0, 0, b1=0x01), INVALID_FIELD, FieldPointer(1, 0)),
]


@pytest.mark.parametrize(("name", "cdb", "triple", "field"), BAD_CDBS, ids=[b[0] for b in BAD_CDBS])
def test_bad_cdbs_raise_sense(
    name: str, cdb: bytes, triple: tuple[int, int, int], field: FieldPointer | None
) -> None:
    with pytest.raises(SenseError) as info:
        parse_cdb(cdb)
    err = info.value
    assert (err.key, err.asc, err.ascq) == triple
    assert err.field == field


def test_table_is_consistent() -> None:
    keys = [(c.opcode, c.service_action) for c in COMMANDS]
    assert len(keys) == len(set(keys))
    for spec in COMMANDS:
        assert spec.usage[0] == spec.opcode
        assert spec.length == {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}[spec.opcode >> 5]
        if spec.service_action is not None:
            assert spec.usage[1] & 0x1F == spec.service_action
        assert spec.usage[-1] == 0  # control byte: NACA/LINK not supported
        assert find_command(spec.opcode, spec.service_action) is spec


@pytest.mark.parametrize("spec", COMMANDS, ids=[c.name for c in COMMANDS])
def test_every_usage_bit_is_accepted_by_the_reserved_check(spec: object) -> None:
    from targetmirror.scsi.cdb import CommandSpec

    assert isinstance(spec, CommandSpec)
    spec.check_reserved(spec.usage)  # all used bits set at once: no reserved-bit complaint
    for i in range(1, spec.length):
        for bit in range(8):
            if spec.usage[i] >> bit & 1 or (i == 1 and spec.service_action is not None and bit < 5):
                continue
            cdb = bytearray(spec.length)
            cdb[0] = spec.opcode
            cdb[i] |= 1 << bit
            with pytest.raises(SenseError) as info:
                spec.check_reserved(bytes(cdb))
            assert info.value.field == FieldPointer(i, bit)
