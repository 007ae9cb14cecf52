"""What the SCSI layer needs from below: a byte-addressed block store.

The SCSI layer translates LBAs and block counts into byte offsets and lengths before calling the
backend, so a backend never needs to know SCSI.  ``targetmirror.mirror.Mirror`` implements this;
``tests/scsi/memory_backend.py`` is the in-memory reference used by the tests.

Contract details the SCSI layer relies on:

* ``read``/``write`` move exactly ``sum(len(v) for v in iov)`` bytes starting at ``offset``; the
  memoryviews are the caller's buffers (the TCMU data area) and must not be retained.
* ``write_cache`` is read on every write and assigned by MODE SELECT (the caching page's WCE bit).
  When it is False the SCSI layer passes ``fua=True`` on every write, so the backend does not have
  to implement write-through itself.
* ``unmap`` discards a range; reads of it then return zeros (we advertise LBPRZ=1).
* ``compare_and_write`` is atomic with respect to every other write to the overlapping range.
* Failures raise :class:`targetmirror.errors.StoreError`, ideally with ``kind`` "read" or "write".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class BlockBackend(Protocol):
    """A block device seen as bytes: the one interface between ``scsi/`` and ``mirror/``."""

    @property
    def block_size(self) -> int:
        """Logical block size in bytes."""

    @property
    def num_blocks(self) -> int:
        """Capacity in logical blocks."""

    write_cache: bool
    """WCE: when False every write must be durable before it completes (MODE SELECT sets it)."""

    def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        """Fill ``iov`` with the bytes starting at ``offset``."""

    def write(self, offset: int, iov: Sequence[memoryview], fua: bool) -> None:
        """Store ``iov`` at ``offset``; with ``fua`` it is durable when this returns."""

    def flush(self) -> None:
        """Make every completed write durable."""

    def unmap(self, offset: int, length: int) -> None:
        """Discard ``length`` bytes at ``offset``; they read back as zeros afterwards."""

    def write_zeroes(self, offset: int, length: int) -> None:
        """Store ``length`` zero bytes at ``offset`` (without the caller allocating them)."""

    def compare_and_write(self, offset: int, verify: memoryview, data: memoryview) -> int | None:
        """Atomically: if the medium at ``offset`` equals ``verify``, store ``data`` there.

        Returns None on success, else the byte offset (from ``offset``) of the first difference.
        """
