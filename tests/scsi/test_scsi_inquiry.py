"""INQUIRY builders and DeviceIdentity (pure, without a device)."""

from __future__ import annotations

import pytest

from targetmirror.errors import ConfigError
from targetmirror.scsi.cdb import InquiryCdb
from targetmirror.scsi.identity import DeviceIdentity, naa_designator
from targetmirror.scsi.inquiry import SUPPORTED_VPD_PAGES, inquiry, standard_inquiry, vpd_page
from targetmirror.scsi.sense import SenseError

IDENT = DeviceIdentity(serial="0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0", revision="1.2")


def test_standard_inquiry() -> None:
    data = standard_inquiry(IDENT)
    assert len(data) == 96
    assert data[0] == 0x00  # connected direct-access block device
    assert data[1] == 0x00  # not removable
    assert data[2] == 0x06  # SPC-4
    assert data[3] & 0x0F == 0x02
    assert data[4] == 91  # ADDITIONAL LENGTH: everything after byte 4
    assert data[7] & 0x02  # CmdQue
    assert data[8:16] == b"LIO-ORG "
    assert data[16:32] == b"targetmirror    "
    assert data[32:36] == b"1.2 "


def test_standard_inquiry_claims_sam5_spc4_sbc3() -> None:
    """SPC-4 6.4.2: version descriptors at bytes 58..73; libiscsi reads SBC-3 (04C0h) there."""
    data = standard_inquiry(IDENT)
    codes = [int.from_bytes(data[i:i + 2], "big") for i in range(58, 74, 2)]
    assert codes[:3] == [0x00A0, 0x0460, 0x04C0]
    assert codes[3:] == [0] * 5
    assert data[36:58] == bytes(22) and data[74:] == bytes(22)


def test_supported_pages_lists_every_page_it_serves() -> None:
    page = vpd_page(0x00, IDENT, 512)
    assert page[1] == 0x00
    listed = list(page[4 : 4 + int.from_bytes(page[2:4], "big")])
    assert listed == sorted(listed) == list(SUPPORTED_VPD_PAGES)
    for code in listed:
        body = vpd_page(code, IDENT, 512)
        assert body[1] == code
        assert len(body) == 4 + int.from_bytes(body[2:4], "big")


def test_unit_serial() -> None:
    page = vpd_page(0x80, IDENT, 512)
    assert page[4:] == IDENT.serial.encode()


def test_device_identification() -> None:
    page = vpd_page(0x83, IDENT, 512)
    descriptors = []
    pos = 4
    while pos < len(page):
        length = page[pos + 3]
        descriptors.append((page[pos], page[pos + 1], page[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    assert pos == len(page)
    (cs1, t1, naa), (cs2, t2, t10) = descriptors
    assert (cs1 & 0x0F, t1) == (0x1, 0x03)  # binary, LU association, NAA
    assert naa == naa_designator(IDENT.serial)
    assert (cs2 & 0x0F, t2) == (0x2, 0x01)  # ASCII, LU association, T10 vendor id
    assert t10 == b"LIO-ORG " + IDENT.serial.encode()


def test_naa_from_uuid_serial() -> None:
    naa = naa_designator("0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0")
    assert len(naa) == 16
    # 6h, OUI 001405h, then the first 25 hex digits of the serial.
    assert naa.hex() == "6001405" + "0b1c2d3e4f5061728394a5b6c"


def test_naa_is_stable_and_distinct_for_short_serials() -> None:
    a, b = naa_designator("1"), naa_designator("10")
    assert a != b
    assert a == naa_designator("1")
    for value in (a, b, naa_designator("no hex here!")):
        assert value.hex().startswith("6001405")


def test_block_limits() -> None:
    ident = DeviceIdentity(
        serial="x" * 30,
        max_transfer_blocks=2048,
        max_unmap_blocks=1000,
        max_unmap_descriptors=7,
        max_write_same_blocks=4096,
        max_compare_and_write_blocks=2,
    )
    page = vpd_page(0xB0, ident, 512)
    assert len(page) == 64
    assert page[4] & 0x01  # WSNZ
    assert page[5] == 2
    assert int.from_bytes(page[8:12], "big") == 2048
    assert int.from_bytes(page[12:16], "big") == 2048
    assert int.from_bytes(page[20:24], "big") == 1000
    assert int.from_bytes(page[24:28], "big") == 7
    assert int.from_bytes(page[28:32], "big") == 8  # 4 KiB in 512-byte blocks
    assert int.from_bytes(page[36:44], "big") == 4096
    assert int.from_bytes(vpd_page(0xB0, ident, 4096)[28:32], "big") == 1


def test_block_device_characteristics_non_rotating() -> None:
    page = vpd_page(0xB1, IDENT, 512)
    assert len(page) == 64
    assert page[4:6] == b"\x00\x01"


def test_logical_block_provisioning() -> None:
    page = vpd_page(0xB2, IDENT, 512)
    assert page[5] & 0x80 and page[5] & 0x40 and page[5] & 0x20  # LBPU LBPWS LBPWS10
    assert page[5] >> 2 & 0x07 == 0x01  # LBPRZ: unmapped blocks read zeros
    assert page[6] & 0x07 == 0x02  # thin provisioned


@pytest.mark.parametrize("code", [0x01, 0x81, 0x86, 0xB3, 0xFF])
def test_unsupported_vpd(code: int) -> None:
    with pytest.raises(SenseError) as info:
        vpd_page(code, IDENT, 512)
    assert (info.value.asc, info.value.field and info.value.field.byte) == (0x24, 2)


def test_inquiry_dispatches_on_evpd() -> None:
    assert inquiry(InquiryCdb(False, 0, 36), IDENT, 512) == standard_inquiry(IDENT)
    assert inquiry(InquiryCdb(True, 0x80, 36), IDENT, 512) == vpd_page(0x80, IDENT, 512)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"serial": ""},
        {"serial": "caf\u00e9"},
        {"serial": "a\nb"},
        {"serial": "x" * 252},
        {"serial": "s", "vendor": "NINECHARS"},
        {"serial": "s", "vendor": ""},
        {"serial": "s", "product": "x" * 17},
        {"serial": "s", "revision": "12345"},
        {"serial": "s", "max_transfer_blocks": 0},
        {"serial": "s", "max_compare_and_write_blocks": 256},
        {"serial": "s", "max_unmap_descriptors": -1},
    ],
)
def test_identity_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        DeviceIdentity(**kwargs)  # type: ignore[arg-type]


def test_identity_defaults() -> None:
    ident = DeviceIdentity(serial="abc")
    assert (ident.vendor, ident.product) == ("LIO-ORG", "targetmirror")
    assert ident.max_compare_and_write_blocks == 1


def test_default_unmap_limit_is_one_mebiblock() -> None:
    """Block Limits advertises (and the handler enforces) at most 1 Mi blocks per UNMAP: above
    that libiscsi's Inquiry.BlockLimits calls an explicit limit insane (docs/conformance.md)."""
    page = vpd_page(0xB0, IDENT, 512)
    assert int.from_bytes(page[20:24], "big") == 1024 * 1024
    assert int.from_bytes(page[24:28], "big") == 256  # descriptors: also within 1 Mi
