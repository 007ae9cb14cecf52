"""Who the logical unit says it is: INQUIRY strings, serial, and the limits it advertises.

Kept apart from ``handler`` so that the pure reply builders (``inquiry``) can use it without an
import cycle; ``targetmirror.scsi.handler`` re-exports :class:`DeviceIdentity`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from targetmirror.errors import ConfigError
from targetmirror.scsi.constants import LIO_OUI

_NAA_IEEE_REGISTERED_EXTENDED = 0x6
_NAA_NIBBLES = 25  # 128 bits - 4 (NAA) - 24 (OUI) = 100 bits of vendor-specific identifier


def _check_ascii(name: str, value: str, max_len: int, *, allow_empty: bool = False) -> None:
    if not value and not allow_empty:
        raise ConfigError(f"{name} must not be empty")
    if len(value) > max_len:
        raise ConfigError(f"{name} {value!r} is longer than {max_len} characters")
    if any(not 0x20 <= ord(c) <= 0x7E for c in value):
        raise ConfigError(f"{name} {value!r} must be printable ASCII")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceIdentity:
    """The identity and limits of one logical unit; immutable for the life of a ScsiDevice.

    The limits are what we advertise in the Block Limits VPD page *and* enforce, so an initiator
    that honours the page never sees a rejection.  ``max_transfer_blocks`` should be the kernel's
    ``hw_max_sectors`` for the backstore (the default, 128, is LIO's default for user backstores):
    advertising more than the kernel accepts would make LIO reject commands before we see them.
    """

    serial: str
    vendor: str = "LIO-ORG"
    product: str = "targetmirror"
    revision: str = "0001"
    max_transfer_blocks: int = 128
    #: 1 Mi blocks per UNMAP (512 MiB at 512-byte blocks). SBC-3 allows any value, but
    #: initiators and conformance suites (libiscsi's Inquiry.BlockLimits) treat an explicit
    #: limit above 1 Mi as bogus; Linux splits discards at this limit either way.
    max_unmap_blocks: int = 0x10_0000
    max_unmap_descriptors: int = 256
    max_write_same_blocks: int = 0xFFFF
    max_compare_and_write_blocks: int = 1

    def __post_init__(self) -> None:
        _check_ascii("vendor", self.vendor, 8)
        _check_ascii("product", self.product, 16)
        _check_ascii("revision", self.revision, 4, allow_empty=True)
        # 251 keeps the serial VPD page within one byte of page length, as SPC-4 lays it out.
        _check_ascii("serial", self.serial, 251)
        for name, value, upper in (
            ("max_transfer_blocks", self.max_transfer_blocks, 0xFFFF_FFFF),
            ("max_unmap_blocks", self.max_unmap_blocks, 0xFFFF_FFFF),
            ("max_unmap_descriptors", self.max_unmap_descriptors, 0xFFFF_FFFF),
            ("max_write_same_blocks", self.max_write_same_blocks, 0xFFFF_FFFF),
            ("max_compare_and_write_blocks", self.max_compare_and_write_blocks, 0xFF),
        ):
            if not 1 <= value <= upper:
                raise ConfigError(f"{name} must be in 1..{upper}, not {value}")


def naa_designator(serial: str) -> bytes:
    """The 16-byte NAA IEEE Registered Extended (type 6) designator for ``serial``.

    Layout: NAA nibble 6h, LIO's OUI 00-14-05, then 25 nibbles of vendor-specific identifier.
    Those nibbles are the hexadecimal digits of the serial in order (other characters skipped),
    the first 25 of them -- so a UUID serial, as LIO tools generate, gives the same style of
    identifier LIO's own backstores show.  A serial with fewer than 25 hex digits would have to be
    padded, and padding makes "1" and "10" collide, so such serials use the hex digits of
    SHA-256(serial) instead.  Either way the designator is a pure function of the serial: stable
    across restarts, which multipath and udev's /dev/disk/by-id depend on.
    """
    digits = [c for c in serial.lower() if c in "0123456789abcdef"]
    if len(digits) < _NAA_NIBBLES:
        digits = list(hashlib.sha256(serial.encode("ascii")).hexdigest())
    value = _NAA_IEEE_REGISTERED_EXTENDED
    value = value << 24 | LIO_OUI
    for digit in digits[:_NAA_NIBBLES]:
        value = value << 4 | int(digit, 16)
    return value.to_bytes(16, "big")
