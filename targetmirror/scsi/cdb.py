"""CDB parsing: one table of supported commands, and a parser per command into a frozen dataclass.

The table :data:`COMMANDS` is the single source of truth for what we support.  Dispatch looks the
opcode (and service action) up in it, REPORT SUPPORTED OPERATION CODES reports it, and its
``usage`` bytes -- the CDB USAGE DATA that SPC-4 asks us to report -- double as the mask of bits
we accept: any bit set outside them is reserved, obsolete or unsupported (e.g. RDPROTECT/WRPROTECT,
since we do not do protection information; NACA/LINK in the control byte), and yields ILLEGAL
REQUEST / INVALID FIELD IN CDB with a field pointer.  So the report and the behaviour cannot
disagree.

Parsers are pure: they see only the CDB bytes.  Checks that need the device (capacity, transfer
limits, which VPD or mode pages exist) happen in the handler and in ``inquiry``/``mode``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from targetmirror.scsi.constants import PC_SAVED, Opcode, ServiceAction
from targetmirror.scsi.sense import (
    SenseError,
    invalid_cdb_field,
    invalid_opcode,
    saving_not_supported,
)

# ---------------------------------------------------------------------------------------------
# Parsed commands


@dataclass(frozen=True, slots=True)
class TestUnitReadyCdb:
    """TEST UNIT READY: no fields."""

    __test__ = False  # not a pytest test class, despite the name


@dataclass(frozen=True, slots=True)
class RequestSenseCdb:
    """REQUEST SENSE: allocation length (DESC=1 is rejected while parsing)."""

    alloc_len: int


@dataclass(frozen=True, slots=True)
class InquiryCdb:
    """INQUIRY: standard data (evpd False) or one VPD page."""

    evpd: bool
    page_code: int
    alloc_len: int


@dataclass(frozen=True, slots=True)
class ModeSenseCdb:
    """MODE SENSE(6) or (10); ``pc`` is the page control field (saved is rejected here)."""

    ten: bool
    dbd: bool
    llbaa: bool
    pc: int
    page: int
    subpage: int
    alloc_len: int


@dataclass(frozen=True, slots=True)
class ModeSelectCdb:
    """MODE SELECT(6) or (10)."""

    ten: bool
    param_len: int


@dataclass(frozen=True, slots=True)
class StartStopUnitCdb:
    """START STOP UNIT; we accept every combination and only act on START=0 (flush)."""

    immed: bool
    power_condition: int
    no_flush: bool
    loej: bool
    start: bool


@dataclass(frozen=True, slots=True)
class PreventAllowCdb:
    """PREVENT ALLOW MEDIUM REMOVAL; our medium is not removable, so this is a no-op."""

    prevent: int


@dataclass(frozen=True, slots=True)
class ReadCapacity10Cdb:
    """READ CAPACITY(10)."""


@dataclass(frozen=True, slots=True)
class ReadCapacity16Cdb:
    """SERVICE ACTION IN(16) / READ CAPACITY(16)."""

    alloc_len: int


@dataclass(frozen=True, slots=True)
class ReadCdb:
    """READ(6/10/12/16).  ``len_byte`` locates the transfer length field for field pointers."""

    lba: int
    blocks: int
    fua: bool
    dpo: bool
    len_byte: int


@dataclass(frozen=True, slots=True)
class WriteCdb:
    """WRITE(6/10/12/16)."""

    lba: int
    blocks: int
    fua: bool
    dpo: bool
    len_byte: int


@dataclass(frozen=True, slots=True)
class WriteVerifyCdb:
    """WRITE AND VERIFY(10/16); ``bytchk`` asks for a read-back comparison after the write."""

    lba: int
    blocks: int
    bytchk: bool
    dpo: bool
    len_byte: int


@dataclass(frozen=True, slots=True)
class VerifyCdb:
    """VERIFY(10/16).  ``bytchk``: 0 medium check only, 1 compare with data-out, 3 compare every
    block with the single block of data-out (2 is reserved and rejected while parsing)."""

    lba: int
    blocks: int
    bytchk: int
    dpo: bool
    len_byte: int


@dataclass(frozen=True, slots=True)
class SyncCacheCdb:
    """SYNCHRONIZE CACHE(10/16); ``blocks`` 0 means "to the end of the medium"."""

    lba: int
    blocks: int
    immed: bool


@dataclass(frozen=True, slots=True)
class WriteSameCdb:
    """WRITE SAME(10/16).  ``ndob`` (16 only): no data-out, the block is all zeros."""

    lba: int
    blocks: int
    unmap: bool
    ndob: bool
    len_byte: int


@dataclass(frozen=True, slots=True)
class UnmapCdb:
    """UNMAP; the descriptors come in the parameter list."""

    param_len: int


@dataclass(frozen=True, slots=True)
class CompareAndWriteCdb:
    """COMPARE AND WRITE: data-out holds ``blocks`` blocks to verify, then ``blocks`` to write."""

    lba: int
    blocks: int
    fua: bool
    dpo: bool


@dataclass(frozen=True, slots=True)
class ReportOpcodesCdb:
    """MAINTENANCE IN / REPORT SUPPORTED OPERATION CODES."""

    rctd: bool
    options: int
    opcode: int
    service_action: int
    alloc_len: int


ParsedCdb = (
    TestUnitReadyCdb
    | RequestSenseCdb
    | InquiryCdb
    | ModeSenseCdb
    | ModeSelectCdb
    | StartStopUnitCdb
    | PreventAllowCdb
    | ReadCapacity10Cdb
    | ReadCapacity16Cdb
    | ReadCdb
    | WriteCdb
    | WriteVerifyCdb
    | VerifyCdb
    | SyncCacheCdb
    | WriteSameCdb
    | UnmapCdb
    | CompareAndWriteCdb
    | ReportOpcodesCdb
)

# ---------------------------------------------------------------------------------------------
# Field helpers


def _u(cdb: bytes, start: int, size: int) -> int:
    return int.from_bytes(cdb[start : start + size], "big")


def _bit(cdb: bytes, byte: int, bit: int) -> bool:
    return bool(cdb[byte] >> bit & 1)


# ---------------------------------------------------------------------------------------------
# Parsers (the reserved-bit check has already run when these are called)


def _tur(cdb: bytes) -> TestUnitReadyCdb:
    return TestUnitReadyCdb()


def _request_sense(cdb: bytes) -> RequestSenseCdb:
    if _bit(cdb, 1, 0):  # DESC: we only produce fixed-format sense
        raise invalid_cdb_field(1, 0)
    return RequestSenseCdb(alloc_len=cdb[4])


def _inquiry(cdb: bytes) -> InquiryCdb:
    evpd = _bit(cdb, 1, 0)
    if not evpd and cdb[2] != 0:
        raise invalid_cdb_field(2)
    return InquiryCdb(evpd=evpd, page_code=cdb[2], alloc_len=_u(cdb, 3, 2))


def _mode_sense(cdb: bytes) -> ModeSenseCdb:
    ten = cdb[0] == Opcode.MODE_SENSE_10
    pc = cdb[2] >> 6
    if pc == PC_SAVED:
        raise saving_not_supported(2, 7)
    return ModeSenseCdb(
        ten=ten,
        dbd=_bit(cdb, 1, 3),
        llbaa=ten and _bit(cdb, 1, 4),
        pc=pc,
        page=cdb[2] & 0x3F,
        subpage=cdb[3],
        alloc_len=_u(cdb, 7, 2) if ten else cdb[4],
    )


def _mode_select(cdb: bytes) -> ModeSelectCdb:
    ten = cdb[0] == Opcode.MODE_SELECT_10
    param_len = _u(cdb, 7, 2) if ten else cdb[4]
    if _bit(cdb, 1, 0):  # SP: we keep no saved pages
        raise invalid_cdb_field(1, 0)
    if param_len and not _bit(cdb, 1, 4):  # PF=0: vendor-specific page format, which we lack
        raise invalid_cdb_field(1, 4)
    return ModeSelectCdb(ten=ten, param_len=param_len)


def _start_stop(cdb: bytes) -> StartStopUnitCdb:
    return StartStopUnitCdb(
        immed=_bit(cdb, 1, 0),
        power_condition=cdb[4] >> 4,
        no_flush=_bit(cdb, 4, 2),
        loej=_bit(cdb, 4, 1),
        start=_bit(cdb, 4, 0),
    )


def _prevent_allow(cdb: bytes) -> PreventAllowCdb:
    return PreventAllowCdb(prevent=cdb[4] & 0x03)


def _read_capacity_10(cdb: bytes) -> ReadCapacity10Cdb:
    if not _bit(cdb, 8, 0) and _u(cdb, 2, 4) != 0:  # PMI=0 requires LBA=0 (SBC-3)
        raise invalid_cdb_field(2)
    return ReadCapacity10Cdb()


def _read_capacity_16(cdb: bytes) -> ReadCapacity16Cdb:
    if not _bit(cdb, 14, 0) and _u(cdb, 2, 8) != 0:
        raise invalid_cdb_field(2)
    return ReadCapacity16Cdb(alloc_len=_u(cdb, 10, 4))


def _rw_fields(cdb: bytes) -> tuple[int, int, int]:
    """(lba, blocks, len_byte) of any READ/WRITE-shaped CDB, by its length group."""
    op = cdb[0]
    if op in (Opcode.READ_6, Opcode.WRITE_6):
        blocks = cdb[4] or 256  # SBC-3: a transfer length of 0 means 256 blocks
        return _u(cdb, 1, 3) & 0x1F_FFFF, blocks, 4
    if op in (Opcode.READ_12, Opcode.WRITE_12):
        return _u(cdb, 2, 4), _u(cdb, 6, 4), 6
    if op >= 0x80:  # 16-byte group
        return _u(cdb, 2, 8), _u(cdb, 10, 4), 10
    return _u(cdb, 2, 4), _u(cdb, 7, 2), 7


def _fua_dpo(cdb: bytes) -> tuple[bool, bool]:
    """FUA and DPO of a READ/WRITE; the 6-byte forms have neither (byte 1 holds LBA bits)."""
    if cdb[0] in (Opcode.READ_6, Opcode.WRITE_6):
        return False, False
    return _bit(cdb, 1, 3), _bit(cdb, 1, 4)


def _read(cdb: bytes) -> ReadCdb:
    lba, blocks, len_byte = _rw_fields(cdb)
    return ReadCdb(lba, blocks, *_fua_dpo(cdb), len_byte)


def _write(cdb: bytes) -> WriteCdb:
    lba, blocks, len_byte = _rw_fields(cdb)
    return WriteCdb(lba, blocks, *_fua_dpo(cdb), len_byte)


def _write_verify(cdb: bytes) -> WriteVerifyCdb:
    lba, blocks, len_byte = _rw_fields(cdb)
    return WriteVerifyCdb(lba, blocks, _bit(cdb, 1, 1), _bit(cdb, 1, 4), len_byte)


def _verify(cdb: bytes) -> VerifyCdb:
    lba, blocks, len_byte = _rw_fields(cdb)
    bytchk = cdb[1] >> 1 & 0x03
    if bytchk == 2:  # reserved value
        raise invalid_cdb_field(1, 2)
    return VerifyCdb(lba, blocks, bytchk, _bit(cdb, 1, 4), len_byte)


def _sync_cache(cdb: bytes) -> SyncCacheCdb:
    lba, blocks, _ = _rw_fields(cdb)
    return SyncCacheCdb(lba, blocks, _bit(cdb, 1, 1))


def _write_same(cdb: bytes) -> WriteSameCdb:
    lba, blocks, len_byte = _rw_fields(cdb)
    if blocks == 0:
        # We advertise WSNZ=1 in the Block Limits VPD page: "0 = to the end of the medium" is
        # not supported, because it would exceed MAXIMUM WRITE SAME LENGTH on any real disk.
        raise invalid_cdb_field(len_byte)
    ndob = cdb[0] == Opcode.WRITE_SAME_16 and _bit(cdb, 1, 0)
    return WriteSameCdb(lba, blocks, _bit(cdb, 1, 3), ndob, len_byte)


def _unmap(cdb: bytes) -> UnmapCdb:
    return UnmapCdb(param_len=_u(cdb, 7, 2))


def _compare_and_write(cdb: bytes) -> CompareAndWriteCdb:
    return CompareAndWriteCdb(_u(cdb, 2, 8), cdb[13], _bit(cdb, 1, 3), _bit(cdb, 1, 4))


def _report_opcodes(cdb: bytes) -> ReportOpcodesCdb:
    options = cdb[2] & 0x07
    if options > 2:  # 3 (SPC-4 "either") and up are not implemented
        raise invalid_cdb_field(2, 2)
    return ReportOpcodesCdb(
        rctd=_bit(cdb, 2, 7),
        options=options,
        opcode=cdb[3],
        service_action=_u(cdb, 4, 2),
        alloc_len=_u(cdb, 6, 4),
    )


# ---------------------------------------------------------------------------------------------
# The command table


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One supported command: how to find it, how long its CDB is, which bits it uses.

    ``usage`` is exactly the CDB USAGE DATA of SPC-4 REPORT SUPPORTED OPERATION CODES: byte 0 is
    the opcode, the service action (if any) sits in its field, every other 1 bit is a bit we
    evaluate.  Control bytes are 00h: NACA and LINK are not supported.
    """

    name: str
    opcode: int
    service_action: int | None
    usage: bytes
    parse: Callable[[bytes], ParsedCdb]

    @property
    def length(self) -> int:
        """The CDB length of this command (its group's length)."""
        return len(self.usage)

    def check_reserved(self, cdb: bytes) -> None:
        """Raise INVALID FIELD IN CDB (with a field pointer) for any bit we do not evaluate."""
        for i in range(1, len(self.usage)):
            allowed = self.usage[i]
            if i == 1 and self.service_action is not None:
                allowed |= 0x1F
            bad = cdb[i] & ~allowed
            if bad:
                raise invalid_cdb_field(i, bad.bit_length() - 1)


_FF4 = b"\xff" * 4
_FF8 = b"\xff" * 8


def _spec(
    name: str,
    op: int,
    usage_tail: bytes,
    parse: Callable[[bytes], ParsedCdb],
    sa: int | None = None,
) -> CommandSpec:
    return CommandSpec(name, op, sa, bytes([op]) + usage_tail, parse)


COMMANDS: tuple[CommandSpec, ...] = (
    _spec("TEST UNIT READY", Opcode.TEST_UNIT_READY, b"\x00\x00\x00\x00\x00", _tur),
    _spec("REQUEST SENSE", Opcode.REQUEST_SENSE, b"\x01\x00\x00\xff\x00", _request_sense),
    _spec("READ(6)", Opcode.READ_6, b"\x1f\xff\xff\xff\x00", _read),
    _spec("WRITE(6)", Opcode.WRITE_6, b"\x1f\xff\xff\xff\x00", _write),
    _spec("INQUIRY", Opcode.INQUIRY, b"\x01\xff\xff\xff\x00", _inquiry),
    _spec("MODE SELECT(6)", Opcode.MODE_SELECT_6, b"\x11\x00\x00\xff\x00", _mode_select),
    _spec("MODE SENSE(6)", Opcode.MODE_SENSE_6, b"\x08\xff\xff\xff\x00", _mode_sense),
    _spec("START STOP UNIT", Opcode.START_STOP_UNIT, b"\x01\x00\x0f\xf7\x00", _start_stop),
    _spec(
        "PREVENT ALLOW MEDIUM REMOVAL",
        Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL,
        b"\x00\x00\x00\x03\x00",
        _prevent_allow,
    ),
    _spec(
        "READ CAPACITY(10)",
        Opcode.READ_CAPACITY_10,
        b"\x00" + _FF4 + b"\x00\x00\x01\x00",
        _read_capacity_10,
    ),
    _spec("READ(10)", Opcode.READ_10, b"\x1a" + _FF4 + b"\x1f\xff\xff\x00", _read),
    _spec("WRITE(10)", Opcode.WRITE_10, b"\x1a" + _FF4 + b"\x1f\xff\xff\x00", _write),
    _spec(
        "WRITE AND VERIFY(10)",
        Opcode.WRITE_AND_VERIFY_10,
        b"\x12" + _FF4 + b"\x1f\xff\xff\x00",
        _write_verify,
    ),
    _spec("VERIFY(10)", Opcode.VERIFY_10, b"\x16" + _FF4 + b"\x1f\xff\xff\x00", _verify),
    _spec(
        "SYNCHRONIZE CACHE(10)",
        Opcode.SYNCHRONIZE_CACHE_10,
        b"\x06" + _FF4 + b"\x1f\xff\xff\x00",
        _sync_cache,
    ),
    _spec(
        "WRITE SAME(10)", Opcode.WRITE_SAME_10, b"\x08" + _FF4 + b"\x1f\xff\xff\x00", _write_same
    ),
    _spec("UNMAP", Opcode.UNMAP, b"\x00\x00\x00\x00\x00\x1f\xff\xff\x00", _unmap),
    _spec(
        "MODE SELECT(10)",
        Opcode.MODE_SELECT_10,
        b"\x11\x00\x00\x00\x00\x00\xff\xff\x00",
        _mode_select,
    ),
    _spec(
        "MODE SENSE(10)",
        Opcode.MODE_SENSE_10,
        b"\x18\xff\xff\x00\x00\x00\xff\xff\x00",
        _mode_sense,
    ),
    _spec("READ(16)", Opcode.READ_16, b"\x1a" + _FF8 + _FF4 + b"\x1f\x00", _read),
    _spec(
        "COMPARE AND WRITE",
        Opcode.COMPARE_AND_WRITE,
        b"\x1a" + _FF8 + b"\x00\x00\x00\xff\x1f\x00",
        _compare_and_write,
    ),
    _spec("WRITE(16)", Opcode.WRITE_16, b"\x1a" + _FF8 + _FF4 + b"\x1f\x00", _write),
    _spec(
        "WRITE AND VERIFY(16)",
        Opcode.WRITE_AND_VERIFY_16,
        b"\x12" + _FF8 + _FF4 + b"\x1f\x00",
        _write_verify,
    ),
    _spec("VERIFY(16)", Opcode.VERIFY_16, b"\x16" + _FF8 + _FF4 + b"\x1f\x00", _verify),
    _spec(
        "SYNCHRONIZE CACHE(16)",
        Opcode.SYNCHRONIZE_CACHE_16,
        b"\x06" + _FF8 + _FF4 + b"\x1f\x00",
        _sync_cache,
    ),
    _spec("WRITE SAME(16)", Opcode.WRITE_SAME_16, b"\x09" + _FF8 + _FF4 + b"\x1f\x00", _write_same),
    _spec(
        "READ CAPACITY(16)",
        Opcode.SERVICE_ACTION_IN_16,
        bytes([ServiceAction.READ_CAPACITY_16]) + _FF8 + _FF4 + b"\x01\x00",
        _read_capacity_16,
        sa=ServiceAction.READ_CAPACITY_16,
    ),
    _spec(
        "REPORT SUPPORTED OPERATION CODES",
        Opcode.MAINTENANCE_IN,
        bytes([ServiceAction.REPORT_SUPPORTED_OPERATION_CODES, 0x87, 0xFF, 0xFF, 0xFF])
        + _FF4
        + b"\x00\x00",
        _report_opcodes,
        sa=ServiceAction.REPORT_SUPPORTED_OPERATION_CODES,
    ),
    _spec("READ(12)", Opcode.READ_12, b"\x1a" + _FF4 + _FF4 + b"\x1f\x00", _read),
    _spec("WRITE(12)", Opcode.WRITE_12, b"\x1a" + _FF4 + _FF4 + b"\x1f\x00", _write),
)

_BY_KEY: dict[tuple[int, int | None], CommandSpec] = {
    (c.opcode, c.service_action): c for c in COMMANDS
}
SERVICE_ACTION_OPCODES: frozenset[int] = frozenset(
    c.opcode for c in COMMANDS if c.service_action is not None
)


def find_command(opcode: int, service_action: int | None = None) -> CommandSpec | None:
    """The table entry for ``opcode`` (and ``service_action`` for multiplexed opcodes)."""
    return _BY_KEY.get((opcode, service_action))


def lookup(cdb: bytes) -> CommandSpec:
    """Find the table entry for ``cdb`` or raise the sense the standard asks for.

    Unknown opcode: INVALID COMMAND OPERATION CODE.  Known opcode but unknown service action:
    INVALID FIELD IN CDB pointing at the service action field (SPC-4).  An empty CDB has no
    opcode at all, which we treat like an unknown one.
    """
    if not cdb:
        raise invalid_opcode()
    opcode = cdb[0]
    if opcode in SERVICE_ACTION_OPCODES:
        if len(cdb) < 2:
            raise invalid_cdb_field()
        spec = _BY_KEY.get((opcode, cdb[1] & 0x1F))
        if spec is None:
            raise invalid_cdb_field(1, 4)
        return spec
    spec = _BY_KEY.get((opcode, None))
    if spec is None:
        raise invalid_opcode()
    return spec


def parse_cdb(cdb: bytes) -> tuple[CommandSpec, ParsedCdb]:
    """Look ``cdb`` up, check its length and reserved bits, and parse it.

    A CDB shorter than its group's length is INVALID FIELD IN CDB without a field pointer (the
    missing field does not exist to point at).  Extra trailing bytes are ignored, so a caller may
    hand us a fixed-size CDB buffer.  Raises :class:`SenseError`; never anything else.
    """
    spec = lookup(cdb)
    if len(cdb) < spec.length:
        raise invalid_cdb_field()
    cdb = bytes(cdb[: spec.length])
    spec.check_reserved(cdb)
    return spec, spec.parse(cdb)


__all__ = [
    "COMMANDS",
    "CommandSpec",
    "CompareAndWriteCdb",
    "InquiryCdb",
    "ModeSelectCdb",
    "ModeSenseCdb",
    "ParsedCdb",
    "PreventAllowCdb",
    "ReadCapacity10Cdb",
    "ReadCapacity16Cdb",
    "ReadCdb",
    "ReportOpcodesCdb",
    "RequestSenseCdb",
    "SenseError",
    "StartStopUnitCdb",
    "SyncCacheCdb",
    "TestUnitReadyCdb",
    "UnmapCdb",
    "VerifyCdb",
    "WriteCdb",
    "WriteSameCdb",
    "WriteVerifyCdb",
    "find_command",
    "lookup",
    "parse_cdb",
]
