"""Named numbers of the SCSI standards the SCSI layer speaks (SPC-4, SBC-3).

Every magic number the layer puts on the wire or compares against lives here, under the name the
standards give it, so that a reader can grep a sense code from a trace back to the place that
produced it.  Nothing in this module has behaviour.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final, NamedTuple


class Opcode(IntEnum):
    """Operation codes (byte 0 of a CDB) that targetmirror recognises."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SELECT_10 = 0x55
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    MAINTENANCE_IN = 0xA3
    READ_12 = 0xA8
    WRITE_12 = 0xAA


class ServiceAction(IntEnum):
    """Service actions (byte 1, bits 4-0) of the opcodes that multiplex several commands."""

    READ_CAPACITY_16 = 0x10  # under SERVICE ACTION IN(16)
    REPORT_SUPPORTED_OPERATION_CODES = 0x0C  # under MAINTENANCE IN


class Status(IntEnum):
    """SAM status codes; the SCSI layer itself only ever produces GOOD and CHECK CONDITION."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class SenseKey(IntEnum):
    """Sense keys (fixed-format sense byte 2, bits 3-0)."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


class AdditionalSense(NamedTuple):
    """An ADDITIONAL SENSE CODE / ADDITIONAL SENSE CODE QUALIFIER pair (sense bytes 12 and 13)."""

    asc: int
    ascq: int


NO_ADDITIONAL_SENSE: Final = AdditionalSense(0x00, 0x00)
LOGICAL_UNIT_NOT_READY: Final = AdditionalSense(0x04, 0x00)
WRITE_ERROR: Final = AdditionalSense(0x0C, 0x00)
UNRECOVERED_READ_ERROR: Final = AdditionalSense(0x11, 0x00)
PARAMETER_LIST_LENGTH_ERROR: Final = AdditionalSense(0x1A, 0x00)
MISCOMPARE_DURING_VERIFY: Final = AdditionalSense(0x1D, 0x00)
INVALID_COMMAND_OPERATION_CODE: Final = AdditionalSense(0x20, 0x00)
LBA_OUT_OF_RANGE: Final = AdditionalSense(0x21, 0x00)
INVALID_FIELD_IN_CDB: Final = AdditionalSense(0x24, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST: Final = AdditionalSense(0x26, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED: Final = AdditionalSense(0x39, 0x00)
INTERNAL_TARGET_FAILURE: Final = AdditionalSense(0x44, 0x00)
WRITE_PROTECTED: Final = AdditionalSense(0x27, 0x00)

# Fixed-format sense data (SPC-4 4.5.3).
SENSE_RESPONSE_CURRENT_FIXED: Final = 0x70
SENSE_VALID: Final = 0x80
FIXED_SENSE_LEN: Final = 18
FIXED_SENSE_ADDITIONAL_LEN: Final = FIXED_SENSE_LEN - 8

# INQUIRY / VPD.
PERIPHERAL_DIRECT_ACCESS: Final = 0x00
VERSION_SPC4: Final = 0x06
RESPONSE_DATA_FORMAT: Final = 0x02
VPD_SUPPORTED_PAGES: Final = 0x00
VPD_UNIT_SERIAL: Final = 0x80
VPD_DEVICE_IDENTIFICATION: Final = 0x83
VPD_BLOCK_LIMITS: Final = 0xB0
VPD_BLOCK_DEVICE_CHARACTERISTICS: Final = 0xB1
VPD_LOGICAL_BLOCK_PROVISIONING: Final = 0xB2
LIO_OUI: Final = 0x001405  # the IEEE company id LIO uses in its NAA designators

# MODE SENSE / MODE SELECT.
MODE_PAGE_RW_ERROR_RECOVERY: Final = 0x01
MODE_PAGE_CACHING: Final = 0x08
MODE_PAGE_CONTROL: Final = 0x0A
MODE_PAGE_ALL: Final = 0x3F
MODE_SUBPAGE_ALL: Final = 0xFF
PC_CURRENT: Final = 0
PC_CHANGEABLE: Final = 1
PC_DEFAULT: Final = 2
PC_SAVED: Final = 3
DEVICE_SPECIFIC_DPOFUA: Final = 0x10
DEVICE_SPECIFIC_WP: Final = 0x80
CACHING_WCE: Final = 0x04
