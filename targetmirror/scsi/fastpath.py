"""The fast path: plain READ/WRITE(10/16) decoded in a few operations.

Almost every command an initiator sends under load is a READ or WRITE(10) or (16) with nothing
unusual in it.  The general path (:func:`targetmirror.scsi.cdb.parse_cdb` into a dataclass,
reserved-bit checks against the usage table, dispatch by pattern matching, range and buffer
checks) costs tens of Python operations per command, which under the lab's emulated CPU is most
of a 4 KiB command's cost.  :func:`decode_rw` recognises the *plain* case — only the DPO and FUA
flag bits set, group number and CONTROL zero, a non-zero transfer inside the capacity and the
transfer limit, a data buffer of exactly the transfer's size with no empty segment — and returns
what to do.

Anything else returns ``None`` and takes the general path, which answers it (an error included)
exactly as before; the fast path never answers a command the general path would refuse, and it
does what the general path would do for the commands it accepts.  ``tests/scsi/test_fastpath``
checks that equivalence on random CDBs.
"""

from __future__ import annotations

from collections.abc import Sequence

_READ_10, _WRITE_10, _READ_16, _WRITE_16 = 0x28, 0x2A, 0x88, 0x8A
_FLAGS_OK = 0x18  # DPO (bit 4) and FUA (bit 3) of byte 1; every other bit sends us the slow way
_FUA = 0x08


def decode_rw(cdb: bytes, iov: Sequence[memoryview], num_blocks: int, block_size: int,
              max_blocks: int) -> tuple[bool, int, int, bool] | None:
    """``(is_write, byte offset, byte length, fua)`` for a plain READ/WRITE, else None."""
    n = len(cdb)
    if not n:  # no opcode at all: the general path answers it
        return None
    op = cdb[0]
    if op in (_WRITE_10, _READ_10):
        if n != 10 or cdb[1] & ~_FLAGS_OK or cdb[6] or cdb[9]:
            return None
        lba = int.from_bytes(cdb[2:6], "big")
        blocks = (cdb[7] << 8) | cdb[8]
    elif op in (_WRITE_16, _READ_16):
        if n != 16 or cdb[1] & ~_FLAGS_OK or cdb[14] or cdb[15]:
            return None
        lba = int.from_bytes(cdb[2:10], "big")
        blocks = int.from_bytes(cdb[10:14], "big")
    else:
        return None
    if not 0 < blocks <= max_blocks or lba + blocks > num_blocks:
        return None
    length = blocks * block_size
    if len(iov) == 1:
        if len(iov[0]) != length:
            return None
    else:
        # An empty segment goes the general way too, whose slice_iov drops it: the backend
        # contract is that it never sees a zero-length iovec.
        total = 0
        for v in iov:
            n = len(v)
            if not n:
                return None
            total += n
        if total != length:
            return None
    return op & 0x02 == 0x02, lba * block_size, length, bool(cdb[1] & _FUA)
