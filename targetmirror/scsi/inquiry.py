"""INQUIRY replies: standard data and the VPD pages we support.

Pure builders: they return the whole reply as bytes; the handler truncates it to the allocation
length and the data-in buffer.  What we claim here is what the handler does:

* 0xB0 Block Limits advertises exactly the limits :class:`DeviceIdentity` makes the handler
  enforce, with WSNZ=1 (WRITE SAME with 0 blocks is rejected).
* 0xB2 and READ CAPACITY(16) claim thin provisioning with LBPRZ=1, because the backend contract
  says unmapped ranges read back as zeros.
* No protection information, no ALUA (TPGS=0: the kernel owns port groups), no 3PC.
"""

from __future__ import annotations

from targetmirror.scsi.cdb import InquiryCdb
from targetmirror.scsi.constants import (
    PERIPHERAL_DIRECT_ACCESS,
    RESPONSE_DATA_FORMAT,
    VERSION_SPC4,
    VPD_BLOCK_DEVICE_CHARACTERISTICS,
    VPD_BLOCK_LIMITS,
    VPD_DEVICE_IDENTIFICATION,
    VPD_LOGICAL_BLOCK_PROVISIONING,
    VPD_SUPPORTED_PAGES,
    VPD_UNIT_SERIAL,
)
from targetmirror.scsi.identity import DeviceIdentity, naa_designator
from targetmirror.scsi.sense import invalid_cdb_field

SUPPORTED_VPD_PAGES: tuple[int, ...] = (
    VPD_SUPPORTED_PAGES,
    VPD_UNIT_SERIAL,
    VPD_DEVICE_IDENTIFICATION,
    VPD_BLOCK_LIMITS,
    VPD_BLOCK_DEVICE_CHARACTERISTICS,
    VPD_LOGICAL_BLOCK_PROVISIONING,
)

#: Standard INQUIRY data through the last version descriptor's reserved tail (SPC-4 6.4.2):
#: 96 bytes, ADDITIONAL LENGTH 91, as LIO's own backstores report.
_STANDARD_LEN = 96
_CMDQUE = 0x02
#: VERSION DESCRIPTOR fields (bytes 58..73): the standards this logical unit follows.  An
#: initiator (libiscsi's conformance suite, for one) reads SBC-3 support from here and skips
#: or misjudges SBC-3 behaviour (the 3Ch-long Block Limits page, WRITE SAME, UNMAP) without it.
VERSION_DESCRIPTORS: tuple[int, ...] = (
    0x00A0,  # SAM-5 (no version claimed)
    0x0460,  # SPC-4 (no version claimed)
    0x04C0,  # SBC-3 (no version claimed)
)
_VERSION_DESCRIPTORS_AT = 58

# Designation descriptor header bits (SPC-4 7.8.6.1).
_CODE_SET_BINARY = 0x1
_CODE_SET_ASCII = 0x2
_ASSOC_LU = 0x00
_DESIG_T10_VENDOR = 0x1
_DESIG_NAA = 0x3

# Logical Block Provisioning VPD, byte 5.
_LBPU = 0x80
_LBPWS = 0x40
_LBPWS10 = 0x20
_LBPRZ = 0x04  # SBC-3 bit; in SBC-4 it is the low bit of the 3-bit LBPRZ field (001b)
_PROVISIONING_THIN = 0x02

# Files and block devices underneath have at least 4 KiB allocation units; a smaller discard
# only zero-fills, so we tell initiators that 4 KiB (in blocks) is the granularity worth sending.
_UNMAP_GRANULARITY_BYTES = 4096


def _pad(text: str, width: int) -> bytes:
    return text.encode("ascii").ljust(width, b" ")


def standard_inquiry(identity: DeviceIdentity) -> bytes:
    """The standard INQUIRY data: a direct-access SPC-4 device with command queuing that claims
    SAM-5, SPC-4 and SBC-3 in its version descriptors."""
    buf = bytearray(_STANDARD_LEN)
    buf[0] = PERIPHERAL_DIRECT_ACCESS  # qualifier 000b: connected
    buf[2] = VERSION_SPC4
    buf[3] = RESPONSE_DATA_FORMAT
    buf[4] = _STANDARD_LEN - 5
    buf[7] = _CMDQUE
    buf[8:16] = _pad(identity.vendor, 8)
    buf[16:32] = _pad(identity.product, 16)
    buf[32:36] = _pad(identity.revision, 4)
    for i, code in enumerate(VERSION_DESCRIPTORS):
        at = _VERSION_DESCRIPTORS_AT + 2 * i
        buf[at:at + 2] = code.to_bytes(2, "big")
    return bytes(buf)


def _vpd(page: int, payload: bytes) -> bytes:
    return bytes([PERIPHERAL_DIRECT_ACCESS, page]) + len(payload).to_bytes(2, "big") + payload


def _designator(code_set: int, desig_type: int, value: bytes) -> bytes:
    return bytes([code_set, _ASSOC_LU | desig_type, 0, len(value)]) + value


def _device_identification(identity: DeviceIdentity) -> bytes:
    # Only logical-unit designators: target port designators depend on the fabric and the kernel
    # does not tell a user backstore which port a command arrived on.
    naa = _designator(_CODE_SET_BINARY, _DESIG_NAA, naa_designator(identity.serial))
    t10 = _designator(
        _CODE_SET_ASCII,
        _DESIG_T10_VENDOR,
        _pad(identity.vendor, 8) + identity.serial.encode("ascii"),
    )
    return naa + t10


def _block_limits(identity: DeviceIdentity, block_size: int) -> bytes:
    body = bytearray(0x3C)  # page length 3Ch (SBC-3); offsets below are page offsets minus 4
    body[0] = 0x01  # WSNZ: WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 is not supported
    body[1] = identity.max_compare_and_write_blocks
    body[4:8] = identity.max_transfer_blocks.to_bytes(4, "big")
    body[8:12] = identity.max_transfer_blocks.to_bytes(4, "big")  # optimal = maximum
    body[16:20] = identity.max_unmap_blocks.to_bytes(4, "big")
    body[20:24] = identity.max_unmap_descriptors.to_bytes(4, "big")
    granularity = max(1, _UNMAP_GRANULARITY_BYTES // block_size)
    body[24:28] = granularity.to_bytes(4, "big")
    body[32:40] = identity.max_write_same_blocks.to_bytes(8, "big")
    return bytes(body)


def _block_device_characteristics() -> bytes:
    body = bytearray(0x3C)
    body[0:2] = (1).to_bytes(2, "big")  # MEDIUM ROTATION RATE 0001h: non-rotating medium
    return bytes(body)


def _logical_block_provisioning() -> bytes:
    return bytes([0, _LBPU | _LBPWS | _LBPWS10 | _LBPRZ, _PROVISIONING_THIN, 0])


def vpd_page(page_code: int, identity: DeviceIdentity, block_size: int) -> bytes:
    """The full VPD page ``page_code``; an unsupported page is INVALID FIELD IN CDB (byte 2)."""
    if page_code == VPD_SUPPORTED_PAGES:
        return _vpd(page_code, bytes(SUPPORTED_VPD_PAGES))
    if page_code == VPD_UNIT_SERIAL:
        return _vpd(page_code, identity.serial.encode("ascii"))
    if page_code == VPD_DEVICE_IDENTIFICATION:
        return _vpd(page_code, _device_identification(identity))
    if page_code == VPD_BLOCK_LIMITS:
        return _vpd(page_code, _block_limits(identity, block_size))
    if page_code == VPD_BLOCK_DEVICE_CHARACTERISTICS:
        return _vpd(page_code, _block_device_characteristics())
    if page_code == VPD_LOGICAL_BLOCK_PROVISIONING:
        return _vpd(page_code, _logical_block_provisioning())
    raise invalid_cdb_field(2)


def inquiry(cdb: InquiryCdb, identity: DeviceIdentity, block_size: int) -> bytes:
    """The untruncated reply to an INQUIRY command (EVPD=0 with a page code was rejected when
    the CDB was parsed)."""
    if cdb.evpd:
        return vpd_page(cdb.page_code, identity, block_size)
    return standard_inquiry(identity)
