"""A persistent region bitmap: which regions of a mirror may differ between A and B.

One bit per region (64 KiB by default: a 4 TiB image needs 8 MiB of bitmap).  The bitmap lives
in memory and in a file beside the mirror's state.  The rule that makes it trustworthy after a
crash: **a bit is durable before the write that needs it is issued to a leg** (md's write-intent
rule).  Setting a bit that is already set costs nothing, so only the first write to a region
after a split pays for a bitmap sync, and concurrent writers share one sync (group commit): a
caller waits for a sync that started after its bits were set, never for more.

Bits are cleared only when the region is equal and durable on both legs with no write to it in
flight: by a resync after fdatasyncs of both legs, or by the mirror's lazy write-intent clear
pass (see ``targetmirror.mirror.mirror``), so a crash at any point forgets nothing.  The file
primitives are small methods so the crash-point test can put the file on a simulated page
cache.

The file is a small header (magic, version, region size, region count) followed by the bits;
it is rewritten in place per dirty 4 KiB page and fdatasync'ed.
"""

from __future__ import annotations

import os
import re
import struct
import threading
from collections.abc import Iterator

from targetmirror.errors import MirrorError

MAGIC = b"TMBITMP1"
HEADER = struct.Struct("<8sIIQ")  # magic, version, region_size, regions
HEADER_SIZE = 4096
VERSION = 1
PAGE = 4096
DEFAULT_REGION = 64 * 1024
_NONZERO = re.compile(b"[^\x00]")
_FF = b"\xff" * (1 << 16)  # "every bit set", sliced (longer spans build their own)


class Bitmap:
    """Region bits in memory, persisted to ``path`` with group-committed syncs."""

    def __init__(self, path: str, size: int, region_size: int = DEFAULT_REGION) -> None:
        if region_size <= 0 or region_size & (region_size - 1) or region_size < 4096:
            raise MirrorError(f"region size {region_size}: expected a power of two >= 4096")
        self.path = path
        self.size = size
        self.region_size = region_size
        self.shift = region_size.bit_length() - 1
        self.regions = (size + region_size - 1) >> self.shift
        self.bits = bytearray((self.regions + 7) // 8)
        self._count = 0
        self._mu = threading.Lock()
        self._cond = threading.Condition(self._mu)
        self._dirty_pages: set[int] = set()
        self._gen = 0          # bumped each time bits change
        self._synced_gen = 0   # the generation the file is known to hold
        self._syncing = False
        self.syncs = 0         # how many fdatasyncs (for status and benchmarks)
        self.created = False
        """True when no usable bitmap was found and an empty one was made: the caller must not
        trust it for a mirror that is already split (see ``Mirror``)."""
        exists = self._open()
        try:
            if exists and self._file_size() >= HEADER_SIZE + len(self.bits):
                self._load()
            elif exists and self._file_size() >= HEADER_SIZE:
                self._load()  # checks the header; a short body is not trusted
                self.created = True
                self._init_file()
            else:
                self.created = True
                self._init_file()
        except BaseException:
            self.close()
            raise

    # -- file primitives (overridden by the crash-point test's simulated page cache) -----------
    def _open(self) -> bool:
        """Open (creating) the file; True if it existed."""
        exists = os.path.exists(self.path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return exists

    def _file_size(self) -> int:
        return os.fstat(self.fd).st_size

    def _pread(self, n: int, offset: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def _pwrite(self, data: bytes, offset: int) -> None:
        os.pwrite(self.fd, data, offset)

    def _truncate(self, n: int) -> None:
        os.ftruncate(self.fd, n)

    def _fdatasync(self) -> None:
        os.fdatasync(self.fd)

    # -- file ------------------------------------------------------------------------------------
    def _init_file(self) -> None:
        header = HEADER.pack(MAGIC, VERSION, self.region_size, self.regions)
        self._truncate(0)
        self._pwrite(header.ljust(HEADER_SIZE, b"\0"), 0)
        self._truncate(HEADER_SIZE + len(self.bits))
        self._fdatasync()

    def _load(self) -> None:
        magic, version, region, regions = HEADER.unpack(self._pread(HEADER.size, 0))
        if magic != MAGIC or version != VERSION:
            raise MirrorError(f"{self.path}: not a targetmirror bitmap (or an unknown version)")
        if region != self.region_size or regions != self.regions:
            raise MirrorError(f"{self.path}: bitmap is for {regions} regions of {region} bytes, "
                              f"the mirror has {self.regions} of {self.region_size}; refusing "
                              "to guess (use a full rejoin)")
        data = self._pread(len(self.bits), HEADER_SIZE)
        self.bits[: len(data)] = data
        extra = self.regions & 7
        if extra and self.bits:
            self.bits[-1] &= (1 << extra) - 1  # no bits past the last region
        self._count = int.from_bytes(self.bits, "little").bit_count()

    # -- bits ------------------------------------------------------------------------------------
    def span(self, offset: int, length: int) -> range:
        """The regions that bytes ``[offset, offset+length)`` touch."""
        if length <= 0 or offset >= self.size:
            return range(0)
        last = min((offset + length - 1) >> self.shift, self.regions - 1)
        return range(max(offset, 0) >> self.shift, last + 1)

    def test(self, region: int) -> bool:
        return bool(self.bits[region >> 3] & (1 << (region & 7)))

    @property
    def settled(self) -> bool:
        """True if the file holds every bit as memory has it now (no change awaits a sync):
        a set bit may then be trusted as durable by a writer that checks it without marking."""
        return self._synced_gen >= self._gen

    @property
    def count(self) -> int:
        """Regions marked."""
        return self._count

    def mark(self, offset: int, length: int) -> int:
        """Set the bits for a byte range in memory; return a generation to :meth:`sync` to, or
        0 when every bit was already set *and durable* (nothing to wait for).

        A bit another thread (or the ring thread's batch marking) set but has not synced yet
        is not durable: the caller gets the pending generation and waits for that sync, so
        no leg is ever written before its bit is on disk.

        The cost does not grow with the span: the edge bytes are masked and the whole bytes
        between them are tested and set as one slice, so a 4 MiB write-intent extent (64
        regions) costs what one region does."""
        if length <= 0 or offset >= self.size:
            return 0
        r0 = max(offset, 0) >> self.shift
        r1 = min((offset + length - 1) >> self.shift, self.regions - 1)
        b0, b1 = r0 >> 3, r1 >> 3
        bits = self.bits
        with self._mu:
            if b0 == b1:
                mask = ((1 << ((r1 & 7) + 1)) - 1) & ~((1 << (r0 & 7)) - 1)
                old = bits[b0]
                if old & mask == mask:
                    return self._gen if self._synced_gen < self._gen else 0
                bits[b0] = old | mask
                self._count += (mask & ~old).bit_count()
                self._dirty_pages.add(b0 // PAGE)
            else:
                first = 0xFF & ~((1 << (r0 & 7)) - 1)
                last = (1 << ((r1 & 7) + 1)) - 1
                o0, o1 = bits[b0], bits[b1]
                mid = bits[b0 + 1:b1]
                full = len(mid)
                ff = _FF[:full] if full <= len(_FF) else b"\xff" * full
                if o0 & first == first and o1 & last == last and mid == ff:
                    return self._gen if self._synced_gen < self._gen else 0
                added = (first & ~o0).bit_count() + (last & ~o1).bit_count()
                if full:
                    added += full * 8 - int.from_bytes(mid, "little").bit_count()
                    bits[b0 + 1:b1] = ff
                bits[b0] = o0 | first
                bits[b1] = o1 | last
                self._count += added
                self._dirty_pages.update(range(b0 // PAGE, b1 // PAGE + 1))
            self._gen += 1
            return self._gen

    def mark_all(self) -> int:
        """Every region (a full resync); fills the bytes directly."""
        with self._mu:
            n = len(self.bits)
            self.bits[:] = b"\xff" * n
            extra = self.regions & 7
            if extra and n:
                self.bits[-1] = (1 << extra) - 1
            self._count = self.regions
            self._dirty_pages.update(range((n + PAGE - 1) // PAGE))
            self._gen += 1
            return self._gen

    def clear(self, regions: list[int]) -> int:
        """Clear bits (after the regions were made equal and A is durable)."""
        with self._mu:
            bits = self.bits
            changed = False
            for r in regions:
                byte, bit = r >> 3, 1 << (r & 7)
                if bits[byte] & bit:
                    bits[byte] &= ~bit
                    self._count -= 1
                    self._dirty_pages.add(byte // PAGE)
                    changed = True
            if not changed:
                return 0
            self._gen += 1
            return self._gen

    def sync(self, gen: int) -> None:
        """Return once the file holds generation ``gen`` (or later): group commit."""
        if gen == 0:
            return
        with self._cond:
            while self._synced_gen < gen:
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                target = self._gen
                pages = sorted(self._dirty_pages)
                self._dirty_pages.clear()
                snapshot = [(p, bytes(self.bits[p * PAGE:(p + 1) * PAGE])) for p in pages]
                self._mu.release()
                ok = False
                try:
                    for p, data in snapshot:
                        self._pwrite(data, HEADER_SIZE + p * PAGE)
                    self._fdatasync()
                    ok = True
                finally:
                    self._mu.acquire()
                    self._syncing = False
                    if not ok:
                        # nothing is known durable: the next sync must write these pages again
                        self._dirty_pages.update(pages)
                        self._cond.notify_all()
                self.syncs += 1
                self._synced_gen = max(self._synced_gen, target)
                self._cond.notify_all()

    def dirty_regions(self, start: int = 0) -> Iterator[int]:
        """Marked regions in ascending order (a live view: bits may change while iterating)."""
        bits = self.bits
        n = len(bits)
        byte = start >> 3
        while byte < n:
            m = _NONZERO.search(bits, byte)  # skip empty bytes in C, not Python
            if m is None:
                return
            nxt = m.start()
            v = bits[nxt]
            for b in range(8):
                r = nxt * 8 + b
                if v & (1 << b) and r >= start and r < self.regions:
                    yield r
            byte = nxt + 1

    def close(self) -> None:
        os.close(self.fd)

    def remove(self) -> None:
        """Delete the file (the mirror is gone or whole and the bitmap is no longer wanted)."""
        self.close()
        os.unlink(self.path)
