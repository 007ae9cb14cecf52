"""An in-memory BlockBackend for the SCSI tests: a bytearray plus a log of calls.

It checks the contract from the backend's side (every request is inside the device, iovecs are
non-empty) with assertions, so a SCSI-layer bug that would send a bad request to the real mirror
fails the test that triggered it.  Failures can be injected per operation.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from targetmirror.errors import StoreError


class MemoryBackend:
    """A BlockBackend over a bytearray; ``calls`` records (operation, offset, length, extra)."""

    def __init__(self, num_blocks: int = 64, block_size: int = 512, write_cache: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.write_cache = write_cache
        self.data = bytearray(num_blocks * block_size)
        self.calls: list[tuple[object, ...]] = []
        self.fail: dict[str, StoreError] = {}
        self._lock = threading.Lock()

    # helpers for tests -----------------------------------------------------------------------
    def block(self, lba: int, count: int = 1) -> bytes:
        return bytes(self.data[lba * self.block_size : (lba + count) * self.block_size])

    def fill(self, lba: int, payload: bytes) -> None:
        start = lba * self.block_size
        self.data[start : start + len(payload)] = payload

    def ops(self) -> list[object]:
        return [c[0] for c in self.calls]

    def _check(self, op: str, offset: int, length: int) -> None:
        assert offset >= 0 and length >= 0, (op, offset, length)
        assert offset + length <= len(self.data), (op, offset, length, len(self.data))
        err = self.fail.get(op)
        if err is not None:
            raise err

    # BlockBackend ----------------------------------------------------------------------------
    def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        length = sum(v.nbytes for v in iov)
        assert all(v.nbytes for v in iov)
        self._check("read", offset, length)
        with self._lock:
            self.calls.append(("read", offset, length))
            pos = offset
            for v in iov:
                v.cast("B")[:] = self.data[pos : pos + v.nbytes]
                pos += v.nbytes

    def write(self, offset: int, iov: Sequence[memoryview], fua: bool) -> None:
        length = sum(v.nbytes for v in iov)
        assert all(v.nbytes for v in iov)
        self._check("write", offset, length)
        with self._lock:
            self.calls.append(("write", offset, length, fua))
            pos = offset
            for v in iov:
                self.data[pos : pos + v.nbytes] = v.cast("B")
                pos += v.nbytes

    def flush(self) -> None:
        self._check("flush", 0, 0)
        with self._lock:
            self.calls.append(("flush",))

    def unmap(self, offset: int, length: int) -> None:
        self._check("unmap", offset, length)
        with self._lock:
            self.calls.append(("unmap", offset, length))
            self.data[offset : offset + length] = bytes(length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check("write_zeroes", offset, length)
        with self._lock:
            self.calls.append(("write_zeroes", offset, length))
            self.data[offset : offset + length] = bytes(length)

    def compare_and_write(self, offset: int, verify: memoryview, data: memoryview) -> int | None:
        assert verify.nbytes == data.nbytes
        self._check("compare_and_write", offset, verify.nbytes)
        with self._lock:
            self.calls.append(("compare_and_write", offset, verify.nbytes))
            current = self.data[offset : offset + verify.nbytes]
            expected = verify.tobytes()
            if current != expected:
                return next(
                    i for i, (a, b) in enumerate(zip(current, expected, strict=True)) if a != b
                )
            self.data[offset : offset + data.nbytes] = data
            return None
