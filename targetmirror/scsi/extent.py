"""Which bytes a command may modify, decided before it runs.

The mirror orders writes that overlap by taking range-lock tickets in *ring order*, on the ring
thread, before commands are handed to workers (so a post-split write can never overtake an
overlapping pre-split one, claims 6-7).  That needs each command's extent up front, without
executing it; this is the pure function that says it.

A malformed CDB has no extent: the SCSI layer will reject it without touching the medium.  An
UNMAP's extent is the hull of its descriptors (read from its own data-out buffer), which is
conservative but never too small.
"""

from __future__ import annotations

from collections.abc import Sequence

from targetmirror.scsi.cdb import (
    CompareAndWriteCdb,
    ParsedCdb,
    UnmapCdb,
    WriteCdb,
    WriteSameCdb,
    WriteVerifyCdb,
    parse_cdb,
)
from targetmirror.scsi.iov import gather, iov_len
from targetmirror.scsi.sense import SenseError

_UNMAP_HEADER = 8
_UNMAP_DESCRIPTOR = 16
_MAX_DESCRIPTORS = 4096


def write_extent(
    cdb: bytes, iov: Sequence[memoryview], block_size: int
) -> tuple[int, int] | None:
    """Byte range ``[start, end)`` the command may write, or None if it writes nothing."""
    return classify(cdb, iov, block_size)[1]


def classify(
    cdb: bytes, iov: Sequence[memoryview], block_size: int
) -> tuple[ParsedCdb | SenseError, tuple[int, int] | None]:
    """Parse once for both uses: the parsed CDB (or the error it gets) and its write extent.

    The parsed form is handed to ``ScsiDevice.execute(parsed=...)`` so the hot path parses each
    CDB once, not twice.
    """
    try:
        _, c = parse_cdb(cdb)
    except SenseError as exc:
        return exc, None
    return c, _extent(c, iov, block_size)


def _extent(
    c: ParsedCdb, iov: Sequence[memoryview], block_size: int
) -> tuple[int, int] | None:
    match c:
        case WriteCdb() | WriteVerifyCdb() | WriteSameCdb() | CompareAndWriteCdb():
            if c.blocks <= 0:
                return None
            return c.lba * block_size, (c.lba + c.blocks) * block_size
        case UnmapCdb():
            return _unmap_extent(c, iov, block_size)
        case _:
            return None


def _unmap_extent(
    c: UnmapCdb, iov: Sequence[memoryview], block_size: int
) -> tuple[int, int] | None:
    n = min(c.param_len, iov_len(iov))
    if n < _UNMAP_HEADER:
        return None
    data = gather(iov, 0, n)
    count = min((n - _UNMAP_HEADER) // _UNMAP_DESCRIPTOR, _MAX_DESCRIPTORS)
    lo: int | None = None
    hi = 0
    for i in range(count):
        pos = _UNMAP_HEADER + i * _UNMAP_DESCRIPTOR
        lba = int.from_bytes(data[pos : pos + 8], "big")
        blocks = int.from_bytes(data[pos + 8 : pos + 12], "big")
        if blocks:
            lo = lba if lo is None else min(lo, lba)
            hi = max(hi, lba + blocks)
    if lo is None:
        return None
    return lo * block_size, hi * block_size
