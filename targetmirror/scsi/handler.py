"""ScsiDevice: executes one CDB against a BlockBackend and says how it went.

This is the top of the SCSI layer and the only place that catches :class:`SenseError` (turning it
into CHECK CONDITION) and :class:`StoreError` (turning it into MEDIUM ERROR).  It is sans-I/O in
the sense that matters for testing: it only calls the backend, never the OS.

Threading: ``execute`` is called concurrently from worker threads.  The device keeps no per-command
state; the one piece of shared mutable state, the write-cache (WCE) setting, is read and written
under a small lock by MODE SENSE/SELECT.  Ordering between overlapping writes is the initiator's
business (SAM allows reordering; we advertise unrestricted QAM) except for COMPARE AND WRITE, whose
atomicity the backend guarantees.

Choices the standards leave to us:

* A data-out buffer shorter than the CDB's transfer length, or a data-in buffer too short for a
  READ, is ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at the transfer length field -- what
  LIO itself answers to a WRITE whose expected length disagrees with its CDB.  Longer buffers are
  fine; for data-in we report the bytes actually filled as ``read_len``.
* FUA on reads is accepted and ignored: we keep no read cache of our own, so every read already
  comes from the images (through the page cache, which is coherent with the medium for us).
* With WCE=0 every write is passed to the backend with ``fua=True``, so the backend need not know
  about write-cache semantics.
* StoreError without a usable ``kind`` attribute is mapped by the operation that failed: reads
  (including the read half of VERIFY) give 11/00, everything else 0C/00.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import assert_never

from targetmirror.errors import StoreError
from targetmirror.scsi.backend import BlockBackend
from targetmirror.scsi.cdb import (
    CompareAndWriteCdb,
    InquiryCdb,
    ModeSelectCdb,
    ModeSenseCdb,
    ParsedCdb,
    PreventAllowCdb,
    ReadCapacity10Cdb,
    ReadCapacity16Cdb,
    ReadCdb,
    ReportOpcodesCdb,
    RequestSenseCdb,
    StartStopUnitCdb,
    SyncCacheCdb,
    TestUnitReadyCdb,
    UnmapCdb,
    VerifyCdb,
    WriteCdb,
    WriteSameCdb,
    WriteVerifyCdb,
    parse_cdb,
)
from targetmirror.scsi.constants import (
    INTERNAL_TARGET_FAILURE,
    WRITE_PROTECTED,
    SenseKey,
    Status,
)
from targetmirror.scsi.identity import DeviceIdentity
from targetmirror.scsi.inquiry import inquiry
from targetmirror.scsi.iov import copy_out, first_difference, gather, iov_len, slice_iov
from targetmirror.scsi.mode import mode_select, mode_sense
from targetmirror.scsi.report import report_supported_opcodes
from targetmirror.scsi.sense import (
    SenseError,
    build_fixed_sense,
    invalid_cdb_field,
    invalid_param_field,
    lba_out_of_range,
    medium_error,
    miscompare,
    param_list_length_error,
)

__all__ = ["DeviceIdentity", "ScsiDevice", "ScsiResult", "internal_error_result"]

_log = logging.getLogger(__name__)

# Upper bound on the memory one WRITE SAME or VERIFY allocates, whatever range it covers.
CHUNK_BYTES = 1 << 20

_UNMAP_HEADER = 8
_UNMAP_DESCRIPTOR = 16


@dataclass(frozen=True, slots=True)
class ScsiResult:
    """What to complete the command with: SAM status, sense data, bytes of data-in filled.

    ``read_len`` is None when the data-in buffer was filled completely (or there is none);
    otherwise it is the number of valid bytes, for TCMU's read_len / residual reporting.
    """

    status: int
    sense: bytes | None = None
    read_len: int | None = None


GOOD = ScsiResult(Status.GOOD)


def _store_error(exc: StoreError, default_kind: str, what: str) -> SenseError:
    kind = getattr(exc, "kind", None)
    if kind not in ("read", "write"):
        kind = default_kind
    _log.warning("%s failed (%s error): %s", what, kind, exc)
    return medium_error(kind)


_MODIFYING = (WriteCdb, WriteVerifyCdb, WriteSameCdb, UnmapCdb, CompareAndWriteCdb)
"""Commands that change the medium (refused on a write-protected unit)."""


class ScsiDevice:
    """One logical unit: SCSI semantics over a :class:`BlockBackend`."""

    def __init__(
        self, backend: BlockBackend, identity: DeviceIdentity, *, write_protected: bool = False
    ) -> None:
        self.backend = backend
        self.identity = identity
        self.write_protected = write_protected
        """A read-only unit (an exported split copy): every command that would change the
        medium gets DATA PROTECT / WRITE PROTECTED before the backend is touched."""
        self._mode_lock = threading.Lock()
        # The default value of WCE (MODE SENSE with PC=default) is what the device started with.
        self._default_write_cache = bool(backend.write_cache)

    # -----------------------------------------------------------------------------------------
    # Entry point

    def execute(
        self,
        cdb: bytes,
        iov: Sequence[memoryview],
        backend: BlockBackend | None = None,
        parsed: ParsedCdb | SenseError | None = None,
    ) -> ScsiResult:
        """Execute ``cdb``; data-in commands fill ``iov``, data-out commands read from it.

        Never raises for a malformed CDB or parameter list, nor for a backend StoreError: those
        become CHECK CONDITION with fixed-format sense.  Any other exception is a bug (in this
        layer or the backend) and propagates; the daemon should complete the command with
        HARDWARE ERROR / INTERNAL TARGET FAILURE (see :func:`internal_error_result`) and log it.
        """
        try:
            if parsed is None:
                _, parsed = parse_cdb(cdb)
            elif isinstance(parsed, SenseError):
                raise parsed
            return self._dispatch(parsed, iov, self.backend if backend is None else backend)
        except SenseError as exc:
            return ScsiResult(Status.CHECK_CONDITION, exc.sense())

    def execute_plain(self, write: bool, offset: int, iov: Sequence[memoryview], fua: bool,
                      backend: BlockBackend) -> ScsiResult:
        """Run a command that :func:`targetmirror.scsi.fastpath.decode_rw` accepted.

        Every check the general path makes has been made by the decoder, so what is left is
        the backend call and the mapping of a medium error, as in :meth:`_read`/:meth:`_write`.
        """
        try:
            if write:
                if self.write_protected:
                    raise SenseError(SenseKey.DATA_PROTECT, WRITE_PROTECTED)
                self._b_write(backend, offset, iov, fua or not self.backend.write_cache)
            else:
                self._b_read(backend, offset, iov)
        except SenseError as exc:
            return ScsiResult(Status.CHECK_CONDITION, exc.sense())
        return GOOD

    def _dispatch(self, c: ParsedCdb, iov: Sequence[memoryview], be: BlockBackend) -> ScsiResult:
        if self.write_protected and isinstance(c, _MODIFYING):
            raise SenseError(SenseKey.DATA_PROTECT, WRITE_PROTECTED)
        match c:
            case ReadCdb():
                return self._read(c, iov, be)
            case WriteCdb():
                return self._write(c, iov, be)
            case TestUnitReadyCdb() | PreventAllowCdb():
                return GOOD
            case RequestSenseCdb():
                sense = build_fixed_sense(SenseKey.NO_SENSE, 0, 0)
                return self._reply(sense, c.alloc_len, iov)
            case InquiryCdb():
                data = inquiry(c, self.identity, self.backend.block_size)
                return self._reply(data, c.alloc_len, iov)
            case ModeSenseCdb():
                return self._mode_sense(c, iov)
            case ModeSelectCdb():
                return self._mode_select(c, iov)
            case StartStopUnitCdb():
                return self._start_stop(c, be)
            case ReadCapacity10Cdb():
                return self._reply(self._capacity_10(), None, iov)
            case ReadCapacity16Cdb():
                return self._reply(self._capacity_16(), c.alloc_len, iov)
            case WriteVerifyCdb():
                return self._write_verify(c, iov, be)
            case VerifyCdb():
                return self._verify(c, iov, be)
            case SyncCacheCdb():
                return self._sync_cache(c, be)
            case WriteSameCdb():
                return self._write_same(c, iov, be)
            case UnmapCdb():
                return self._unmap(c, iov, be)
            case CompareAndWriteCdb():
                return self._compare_and_write(c, iov, be)
            case ReportOpcodesCdb():
                return self._reply(report_supported_opcodes(c), c.alloc_len, iov)
            case _:
                assert_never(c)

    # -----------------------------------------------------------------------------------------
    # Shared checks and replies

    def _reply(self, data: bytes, alloc_len: int | None, iov: Sequence[memoryview]) -> ScsiResult:
        """Copy an emulated reply into ``iov``, cut to the allocation length and the buffer."""
        if alloc_len is not None:
            data = data[:alloc_len]
        filled = copy_out(data, iov)
        return GOOD if filled == iov_len(iov) else ScsiResult(Status.GOOD, read_len=filled)

    def _check_range(self, lba: int, blocks: int) -> None:
        if lba + blocks > self.backend.num_blocks:
            raise lba_out_of_range()

    def _data_range(
        self, lba: int, blocks: int, len_byte: int, iov: Sequence[memoryview] | None
    ) -> int:
        """Validate a data command's range and buffer; return its length in bytes.

        Order: transfer limit (INVALID FIELD IN CDB), then capacity (LBA OUT OF RANGE), then the
        buffer (INVALID FIELD IN CDB); pass ``iov=None`` when no data is transferred.
        """
        if blocks > self.identity.max_transfer_blocks:
            raise invalid_cdb_field(len_byte)
        self._check_range(lba, blocks)
        nbytes = blocks * self.backend.block_size
        if iov is not None and iov_len(iov) < nbytes:
            raise invalid_cdb_field(len_byte)
        return nbytes

    def _fua(self, requested: bool) -> bool:
        return requested or not self.backend.write_cache

    # -----------------------------------------------------------------------------------------
    # Backend calls with StoreError mapping

    def _b_read(self, be: BlockBackend, offset: int, iov: Sequence[memoryview]) -> None:
        try:
            be.read(offset, iov)
        except StoreError as exc:
            raise _store_error(exc, "read", f"read at {offset}") from exc

    def _b_write(self, be: BlockBackend, offset: int, iov: Sequence[memoryview], fua: bool) -> None:
        try:
            be.write(offset, iov, fua)
        except StoreError as exc:
            raise _store_error(exc, "write", f"write at {offset}") from exc

    def _b_flush(self, be: BlockBackend) -> None:
        try:
            be.flush()
        except StoreError as exc:
            raise _store_error(exc, "write", "flush") from exc

    def _b_unmap(self, be: BlockBackend, offset: int, length: int) -> None:
        try:
            be.unmap(offset, length)
        except StoreError as exc:
            raise _store_error(exc, "write", f"unmap {length} at {offset}") from exc

    def _b_write_zeroes(self, be: BlockBackend, offset: int, length: int) -> None:
        try:
            be.write_zeroes(offset, length)
        except StoreError as exc:
            raise _store_error(exc, "write", f"write_zeroes {length} at {offset}") from exc

    def _b_compare_and_write(
        self, be: BlockBackend, offset: int, verify: memoryview, data: memoryview
    ) -> int | None:
        try:
            return be.compare_and_write(offset, verify, data)
        except StoreError as exc:
            raise _store_error(exc, "write", f"compare_and_write at {offset}") from exc

    # -----------------------------------------------------------------------------------------
    # Data commands

    def _read(self, c: ReadCdb, iov: Sequence[memoryview], be: BlockBackend) -> ScsiResult:
        nbytes = self._data_range(c.lba, c.blocks, c.len_byte, iov)
        if nbytes:
            self._b_read(be, c.lba * self.backend.block_size, slice_iov(iov, nbytes))
        return GOOD if nbytes == iov_len(iov) else ScsiResult(Status.GOOD, read_len=nbytes)

    def _write(self, c: WriteCdb, iov: Sequence[memoryview], be: BlockBackend) -> ScsiResult:
        nbytes = self._data_range(c.lba, c.blocks, c.len_byte, iov)
        if nbytes:
            offset = c.lba * self.backend.block_size
            self._b_write(be, offset, slice_iov(iov, nbytes), self._fua(c.fua))
        return GOOD

    def _write_verify(
        self, c: WriteVerifyCdb, iov: Sequence[memoryview], be: BlockBackend
    ) -> ScsiResult:
        """Write durably (the "verify" of a medium we trust is its FUA completion); with BYTCHK=1
        additionally read the blocks back and compare them with the data-out buffer."""
        nbytes = self._data_range(c.lba, c.blocks, c.len_byte, iov)
        if not nbytes:
            return GOOD
        offset = c.lba * self.backend.block_size
        self._b_write(be, offset, slice_iov(iov, nbytes), True)
        if c.bytchk:
            self._compare_medium(be, offset, nbytes, lambda pos, n: gather(iov, pos, n))
        return GOOD

    def _verify(self, c: VerifyCdb, iov: Sequence[memoryview], be: BlockBackend) -> ScsiResult:
        """BYTCHK=0: range check only (the backend reports unreadable media on real reads);
        1: compare the blocks with data-out; 3: compare every block with one data-out block."""
        bs = self.backend.block_size
        if c.bytchk == 0:
            self._data_range(c.lba, c.blocks, c.len_byte, None)
            return GOOD
        if c.bytchk == 1:
            nbytes = self._data_range(c.lba, c.blocks, c.len_byte, iov)
            if nbytes:
                self._compare_medium(be, c.lba * bs, nbytes, lambda pos, n: gather(iov, pos, n))
            return GOOD
        nbytes = self._data_range(c.lba, c.blocks, c.len_byte, None)
        if not nbytes:
            return GOOD
        if iov_len(iov) < bs:
            raise invalid_cdb_field(c.len_byte)
        pattern = gather(iov, 0, bs) * max(1, min(c.blocks, CHUNK_BYTES // bs))
        self._compare_medium(be, c.lba * bs, nbytes, lambda pos, n: pattern[:n])
        return GOOD

    def _compare_medium(
        self,
        be: BlockBackend,
        offset: int,
        length: int,
        expected: Callable[[int, int], bytes],
    ) -> None:
        """Read ``length`` bytes at ``offset`` in bounded chunks and compare each with
        ``expected(position, n)``; raise MISCOMPARE with the byte offset of the first difference
        (counted from the start of the data-out buffer, or of the range for BYTCHK=3)."""
        bs = self.backend.block_size
        chunk = max(bs, CHUNK_BYTES // bs * bs)
        scratch = bytearray(min(chunk, length))
        view = memoryview(scratch)
        pos = 0
        while pos < length:
            n = min(chunk, length - pos)
            self._b_read(be, offset + pos, [view[:n]])
            diff = first_difference(view[:n], expected(pos, n))
            if diff is not None:
                raise miscompare(pos + diff)
            pos += n

    def _sync_cache(self, c: SyncCacheCdb, be: BlockBackend) -> ScsiResult:
        """Range-checked, then a whole-device flush (the backend has no ranged flush).  IMMED is
        accepted: completing after the flush is always allowed."""
        self._check_range(c.lba, c.blocks)
        self._b_flush(be)
        return GOOD

    def _write_same(
        self, c: WriteSameCdb, iov: Sequence[memoryview], be: BlockBackend
    ) -> ScsiResult:
        """All-zero data becomes unmap (UNMAP=1; allowed because LBPRZ=1 makes unmapped blocks
        read as that same zero block) or write_zeroes; other data is replicated in chunks of at
        most CHUNK_BYTES, never the whole range at once."""
        if c.blocks > self.identity.max_write_same_blocks:
            raise invalid_cdb_field(c.len_byte)
        self._check_range(c.lba, c.blocks)
        bs = self.backend.block_size
        if c.ndob:
            block = b""
        else:
            if iov_len(iov) < bs:
                raise invalid_cdb_field(c.len_byte)
            block = gather(iov, 0, bs)
        offset = c.lba * bs
        length = c.blocks * bs
        fua = self._fua(False)
        if block.count(0) == len(block):
            if c.unmap:
                self._b_unmap(be, offset, length)
            else:
                self._b_write_zeroes(be, offset, length)
            if fua:
                self._b_flush(be)
            return GOOD
        per_chunk = max(1, CHUNK_BYTES // bs)
        pattern = memoryview(block * min(per_chunk, c.blocks))
        pos = 0
        while pos < length:
            n = min(len(pattern), length - pos)
            self._b_write(be, offset + pos, [pattern[:n]], fua)
            pos += n
        return GOOD

    def _unmap(self, c: UnmapCdb, iov: Sequence[memoryview], be: BlockBackend) -> ScsiResult:
        """Validate every descriptor before discarding anything, so a bad list changes nothing.

        A block descriptor data length that is not a multiple of 16, or that runs past the
        parameter list, leaves an incomplete last descriptor, which SBC-3 says to ignore.
        """
        if c.param_len == 0:
            return GOOD
        if c.param_len < _UNMAP_HEADER:
            raise param_list_length_error()
        if iov_len(iov) < c.param_len:
            raise invalid_cdb_field(7)
        data = gather(iov, 0, c.param_len)
        bd_len = int.from_bytes(data[2:4], "big")
        count = min(bd_len, c.param_len - _UNMAP_HEADER) // _UNMAP_DESCRIPTOR
        if count > self.identity.max_unmap_descriptors:
            raise invalid_param_field(2)
        ranges: list[tuple[int, int]] = []
        total = 0
        for i in range(count):
            pos = _UNMAP_HEADER + i * _UNMAP_DESCRIPTOR
            lba = int.from_bytes(data[pos : pos + 8], "big")
            blocks = int.from_bytes(data[pos + 8 : pos + 12], "big")
            self._check_range(lba, blocks)
            total += blocks
            if total > self.identity.max_unmap_blocks:
                raise invalid_param_field(pos + 8)
            if blocks:
                ranges.append((lba, blocks))
        bs = self.backend.block_size
        for lba, blocks in ranges:
            self._b_unmap(be, lba * bs, blocks * bs)
        return GOOD

    def _compare_and_write(
        self, c: CompareAndWriteCdb, iov: Sequence[memoryview], be: BlockBackend
    ) -> ScsiResult:
        """Verify-then-write done atomically by the backend.  The verify and write halves are
        handed over as views of the caller's buffer when it is one segment (always, for the
        one-block CAW initiators send); only a fragmented buffer is copied.  FUA, or WCE=0,
        is honoured with a flush afterwards since the backend call has no FUA flag."""
        if c.blocks == 0:
            return GOOD
        if c.blocks > self.identity.max_compare_and_write_blocks:
            raise invalid_cdb_field(13)
        self._check_range(c.lba, c.blocks)
        bs = self.backend.block_size
        half = c.blocks * bs
        if iov_len(iov) < 2 * half:
            raise invalid_cdb_field(13)
        segments = slice_iov(iov, 2 * half)
        whole = segments[0] if len(segments) == 1 else memoryview(gather(iov, 0, 2 * half))
        result = self._b_compare_and_write(be, c.lba * bs, whole[:half], whole[half:])
        if result is not None:
            raise miscompare(result)
        if self._fua(c.fua):
            self._b_flush(be)
        return GOOD

    # -----------------------------------------------------------------------------------------
    # Emulated commands

    def _capacity_10(self) -> bytes:
        last = max(self.backend.num_blocks - 1, 0)
        if last > 0xFFFF_FFFE:  # tells the initiator to use READ CAPACITY(16)
            last = 0xFFFF_FFFF
        return last.to_bytes(4, "big") + self.backend.block_size.to_bytes(4, "big")

    def _capacity_16(self) -> bytes:
        buf = bytearray(32)
        buf[0:8] = max(self.backend.num_blocks - 1, 0).to_bytes(8, "big")
        buf[8:12] = self.backend.block_size.to_bytes(4, "big")
        buf[14] = 0x80 | 0x40  # LBPME: UNMAP/WRITE SAME unmap supported; LBPRZ: reads zeros
        return bytes(buf)

    def _mode_sense(self, c: ModeSenseCdb, iov: Sequence[memoryview]) -> ScsiResult:
        with self._mode_lock:
            write_cache = bool(self.backend.write_cache)
        data = mode_sense(
            c,
            block_size=self.backend.block_size,
            num_blocks=self.backend.num_blocks,
            write_cache=write_cache,
            default_write_cache=self._default_write_cache,
            write_protect=self.write_protected,
        )
        return self._reply(data, c.alloc_len, iov)

    def _mode_select(self, c: ModeSelectCdb, iov: Sequence[memoryview]) -> ScsiResult:
        if c.param_len == 0:
            return GOOD
        if iov_len(iov) < c.param_len:
            raise invalid_cdb_field(7 if c.ten else 4)
        data = gather(iov, 0, c.param_len)
        with self._mode_lock:
            new = mode_select(
                c,
                data,
                block_size=self.backend.block_size,
                num_blocks=self.backend.num_blocks,
                write_cache=bool(self.backend.write_cache),
            )
            if new != self.backend.write_cache:
                _log.info("write cache %s by MODE SELECT", "enabled" if new else "disabled")
                self.backend.write_cache = new
        return GOOD

    def _start_stop(self, c: StartStopUnitCdb, be: BlockBackend) -> ScsiResult:
        """Accepted in every form; the unit never actually stops (the daemon owns its life) and
        LOEJ is ignored (nothing to eject).  Stopping without NO_FLUSH flushes, as SBC-3 asks."""
        if not c.start and not c.no_flush and c.power_condition == 0:
            self._b_flush(be)
        return GOOD


def internal_error_result() -> ScsiResult:
    """HARDWARE ERROR / INTERNAL TARGET FAILURE, for the daemon to use when ``execute`` raised
    something unexpected (a bug) and the command must still be completed."""
    return ScsiResult(
        Status.CHECK_CONDITION,
        build_fixed_sense(
            SenseKey.HARDWARE_ERROR, INTERNAL_TARGET_FAILURE.asc, INTERNAL_TARGET_FAILURE.ascq
        ),
    )
