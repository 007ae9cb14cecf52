"""The mirror: two legs, A and B, presented to the SCSI layer as one block device.

Policy, not mechanism: which leg a read comes from and which legs a write goes to.  Until a split
every write goes to both legs and is acknowledged only when both have it; reads come from B, the
leg that stays live after a split, so a later split changes nothing a reader can see.

The legs are written in parallel for large transfers (``os.pwritev`` releases the GIL, so the two
copies really overlap); small writes go to the legs one after the other in the calling worker,
because handing a 4 KiB write to another thread costs more than the second ``pwritev`` itself
(measured by ``benchmarks/host_mirror.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from targetmirror.errors import MirrorError
from targetmirror.mirror.rangelock import RangeLock
from targetmirror.store.image import Image

T = TypeVar("T")

PARALLEL_THRESHOLD = 64 * 1024


class Mirror:
    """Two images kept identical; implements :class:`targetmirror.scsi.backend.BlockBackend`."""

    def __init__(self, name: str, a: Image, b: Image, *, size: int, block_size: int = 512,
                 write_cache: bool = True,
                 parallel_threshold: int = PARALLEL_THRESHOLD) -> None:
        if size <= 0 or size % block_size:
            raise MirrorError(f"mirror {name}: size {size} is not a positive multiple of the "
                              f"block size {block_size}")
        for leg, image in (("A", a), ("B", b)):
            if image.size < size:
                raise MirrorError(f"mirror {name}: image {leg} ({image.path}) has {image.size} "
                                  f"bytes, the LUN needs {size}")
        self.name = name
        self.a = a
        self.b = b
        self.size = size
        self.block_size = block_size
        self.num_blocks = size // block_size
        self.write_cache = write_cache
        self.parallel_threshold = parallel_threshold
        self.locks = RangeLock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"{name}-leg")
        self._closed = False
        self._close_lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------------
    def _both(self, fn_a: Callable[[], T], fn_b: Callable[[], T], parallel: bool) -> None:
        """Run one operation on each leg, in parallel if asked; raise the first failure."""
        if not parallel:
            fn_a()
            fn_b()
            return
        fut: Future[T] = self._pool.submit(fn_a)
        err: BaseException | None = None
        try:
            fn_b()
        except BaseException as exc:
            err = exc
        fut.result()  # A's error wins: it is raised here
        if err is not None:
            raise err

    # -- BlockBackend ----------------------------------------------------------------------
    def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        """Reads come from B: the leg that stays live after a split."""
        self.b.readv(offset, iov)

    def write(self, offset: int, iov: Sequence[memoryview], fua: bool) -> None:
        """Write to both legs; return when both have it (durably, with FUA or write-through)."""
        length = sum(len(v) for v in iov)
        durable = fua or not self.write_cache
        parallel = length >= self.parallel_threshold or durable
        with self.locks.locked(offset, offset + length):
            def leg_a() -> None:
                self.a.writev(offset, iov)
                if durable:
                    self.a.flush()

            def leg_b() -> None:
                self.b.writev(offset, iov)
                if durable:
                    self.b.flush()

            self._both(leg_a, leg_b, parallel)

    def flush(self) -> None:
        """SYNCHRONIZE CACHE: both legs durable."""
        self._both(self.a.flush, self.b.flush, parallel=True)

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate on both legs; the range reads back as zeros."""
        with self.locks.locked(offset, offset + length):
            self._both(lambda: self.a.discard(offset, length),
                       lambda: self.b.discard(offset, length), parallel=True)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range on both legs."""
        with self.locks.locked(offset, offset + length):
            self._both(lambda: self.a.write_zeroes(offset, length),
                       lambda: self.b.write_zeroes(offset, length), parallel=True)

    def compare_and_write(self, offset: int, verify: memoryview,
                          data: memoryview) -> int | None:
        """Atomically compare ``verify`` with the blocks at ``offset`` and write ``data`` if equal.

        The range lock makes it atomic with respect to every other write through this mirror.
        Returns the byte offset (within the range) of the first difference, or None on success.
        """
        length = len(verify)
        with self.locks.locked(offset, offset + length):
            current = bytearray(length)
            self.b.readv(offset, [memoryview(current)])
            if current != verify:
                for i in range(length):
                    if current[i] != verify[i]:
                        return i
            durable = not self.write_cache

            def leg(image: Image) -> Callable[[], None]:
                def run() -> None:
                    image.writev(offset, [data])
                    if durable:
                        image.flush()
                return run

            self._both(leg(self.a), leg(self.b), parallel=False)
            return None

    def close(self) -> None:
        """Close both legs (after in-flight commands are done)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._pool.shutdown(wait=True)
            self.a.close()
            self.b.close()
