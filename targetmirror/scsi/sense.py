"""Fixed-format sense data and the exception that carries it through the SCSI layer.

Every check deep inside the layer raises :class:`SenseError`; only the top of
:meth:`targetmirror.scsi.handler.ScsiDevice.execute` turns it into CHECK CONDITION.  That keeps the
parsers and emulators pure functions that either return a value or explain, in SCSI terms, why they
cannot.  We always answer in fixed format (response code 70h) because it is what every initiator
understands and what the control mode page advertises (D_SENSE=0); descriptor format would only be
needed for INFORMATION values above 32 bits, which we never produce.
"""

from __future__ import annotations

from dataclasses import dataclass

from targetmirror.errors import TargetMirrorError
from targetmirror.scsi.constants import (
    FIXED_SENSE_ADDITIONAL_LEN,
    FIXED_SENSE_LEN,
    INVALID_COMMAND_OPERATION_CODE,
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    LBA_OUT_OF_RANGE,
    MISCOMPARE_DURING_VERIFY,
    PARAMETER_LIST_LENGTH_ERROR,
    SAVING_PARAMETERS_NOT_SUPPORTED,
    SENSE_RESPONSE_CURRENT_FIXED,
    SENSE_VALID,
    UNRECOVERED_READ_ERROR,
    WRITE_ERROR,
    AdditionalSense,
    SenseKey,
)

_SKSV = 0x80
_CD = 0x40
_BPV = 0x08


@dataclass(frozen=True, slots=True)
class FieldPointer:
    """Where the offending field is: a byte (and optionally a bit) in the CDB or parameter list.

    Reported in the sense-key-specific bytes for ILLEGAL REQUEST so that sg_* tools and libiscsi
    can show which field we disliked; it costs nothing where the parser already knows the spot.
    """

    byte: int
    bit: int | None = None
    in_cdb: bool = True


def build_fixed_sense(
    key: int,
    asc: int,
    ascq: int,
    *,
    information: int | None = None,
    field: FieldPointer | None = None,
) -> bytes:
    """Return 18 bytes of current, fixed-format sense data.

    ``information`` sets the INFORMATION field and the VALID bit (used for the miscompare offset);
    a value that does not fit 32 bits leaves VALID clear as SPC-4 requires.  ``field`` fills the
    sense-key-specific field pointer (SKSV=1) and is only meaningful for ILLEGAL REQUEST.
    """
    buf = bytearray(FIXED_SENSE_LEN)
    buf[0] = SENSE_RESPONSE_CURRENT_FIXED
    buf[2] = key & 0x0F
    buf[7] = FIXED_SENSE_ADDITIONAL_LEN
    buf[12] = asc & 0xFF
    buf[13] = ascq & 0xFF
    if information is not None and 0 <= information <= 0xFFFF_FFFF:
        buf[0] |= SENSE_VALID
        buf[3:7] = information.to_bytes(4, "big")
    if field is not None and 0 <= field.byte <= 0xFFFF:
        sks = _SKSV
        if field.in_cdb:
            sks |= _CD
        if field.bit is not None:
            sks |= _BPV | (field.bit & 0x07)
        buf[15] = sks
        buf[16:18] = field.byte.to_bytes(2, "big")
    return bytes(buf)


@dataclass(frozen=True, slots=True)
class SenseInfo:
    """The fields of fixed-format sense data that callers (tests, logs) care about."""

    key: int
    asc: int
    ascq: int
    information: int | None
    field: FieldPointer | None


def parse_fixed_sense(sense: bytes) -> SenseInfo:
    """Decode fixed-format sense data; raises ValueError if it is not fixed format or too short.

    Used by the tests and by logging; the daemon never needs to look inside sense it passes on.
    """
    if len(sense) < FIXED_SENSE_LEN:
        raise ValueError(f"sense data too short: {len(sense)} bytes")
    if sense[0] & 0x7F not in (0x70, 0x71):
        raise ValueError(f"not fixed-format sense: response code {sense[0] & 0x7F:#x}")
    info = int.from_bytes(sense[3:7], "big") if sense[0] & SENSE_VALID else None
    field = None
    if sense[15] & _SKSV:
        field = FieldPointer(
            byte=int.from_bytes(sense[16:18], "big"),
            bit=sense[15] & 0x07 if sense[15] & _BPV else None,
            in_cdb=bool(sense[15] & _CD),
        )
    return SenseInfo(sense[2] & 0x0F, sense[12], sense[13], info, field)


class SenseError(TargetMirrorError):
    """A command cannot complete; the attributes say which sense data to return.

    Raised anywhere inside the SCSI layer and caught once at the top, where it becomes
    CHECK CONDITION plus :meth:`sense`.  It never escapes
    :class:`~targetmirror.scsi.handler.ScsiDevice`.
    """

    code = "scsi-sense"

    def __init__(
        self,
        key: int,
        additional: AdditionalSense,
        *,
        information: int | None = None,
        field: FieldPointer | None = None,
        message: str = "",
    ) -> None:
        self.key = key
        self.asc = additional.asc
        self.ascq = additional.ascq
        self.information = information
        self.field = field
        text = message or f"sense {key:#x}/{additional.asc:02x}/{additional.ascq:02x}"
        super().__init__(text)

    def sense(self) -> bytes:
        """The fixed-format sense bytes for this error."""
        return build_fixed_sense(
            self.key, self.asc, self.ascq, information=self.information, field=self.field
        )


def invalid_opcode() -> SenseError:
    """ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE: we do not implement this command."""
    return SenseError(
        SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE, field=FieldPointer(0, 7)
    )


def invalid_cdb_field(byte: int | None = None, bit: int | None = None) -> SenseError:
    """ILLEGAL REQUEST / INVALID FIELD IN CDB, pointing at ``byte``/``bit`` when known."""
    field = FieldPointer(byte, bit) if byte is not None else None
    return SenseError(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, field=field)


def invalid_param_field(byte: int | None = None, bit: int | None = None) -> SenseError:
    """ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST, pointing into the data-out buffer."""
    field = FieldPointer(byte, bit, in_cdb=False) if byte is not None else None
    return SenseError(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST, field=field)


def param_list_length_error() -> SenseError:
    """ILLEGAL REQUEST / PARAMETER LIST LENGTH ERROR: the list is shorter than its own header."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)


def lba_out_of_range() -> SenseError:
    """ILLEGAL REQUEST / LOGICAL BLOCK ADDRESS OUT OF RANGE."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)


def saving_not_supported(byte: int, bit: int) -> SenseError:
    """ILLEGAL REQUEST / SAVING PARAMETERS NOT SUPPORTED (we keep no saved mode pages)."""
    return SenseError(
        SenseKey.ILLEGAL_REQUEST, SAVING_PARAMETERS_NOT_SUPPORTED, field=FieldPointer(byte, bit)
    )


def miscompare(offset: int) -> SenseError:
    """MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION with INFORMATION = byte offset.

    The offset counts from the start of the data-out buffer, as SBC-3 defines it for COMPARE AND
    WRITE; we use the same convention for VERIFY and WRITE AND VERIFY so there is only one rule.
    """
    return SenseError(SenseKey.MISCOMPARE, MISCOMPARE_DURING_VERIFY, information=offset)


def medium_error(kind: str) -> SenseError:
    """MEDIUM ERROR: 11/00 UNRECOVERED READ ERROR for reads, 0C/00 WRITE ERROR for the rest."""
    additional = UNRECOVERED_READ_ERROR if kind == "read" else WRITE_ERROR
    return SenseError(SenseKey.MEDIUM_ERROR, additional)
