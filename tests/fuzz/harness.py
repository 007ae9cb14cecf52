"""Fuzz targets for the two parsers that read bytes an initiator (or the kernel) controls.

Both targets take one ``bytes`` input and decode it with :class:`Source`, a tiny deterministic
reader of its own instead of atheris' ``FuzzedDataProvider``.  That is on purpose: the same input
means the same test case under atheris (coverage-guided, ``benchmarks/fuzz.py``), under
hypothesis (``st.binary()``, ``tests/fuzz/test_fuzz.py``) and as a committed seed file
(``tests/fuzz/corpus/<target>/``), and the replay of the corpus needs no atheris at all.

* :func:`run_cdb` — one CDB with a data buffer through the SCSI layer exactly as the daemon
  dispatches it (``scsi.fastpath.decode_rw`` first, else ``scsi.extent.classify`` and
  ``ScsiDevice.execute``), on an in-memory device of random geometry.
* :func:`run_ring` — a whole TCMU map (mailbox, command ring, data area) laid out from the
  input with entries of every kind and every defect (wrong lengths, iov counts, iovecs outside
  the data area, PAD where the kernel never puts one, unknown entry opcodes, DIF, duplicate
  ids), fetched by :class:`~targetmirror.tcmu.ring.Ring`, each command executed as above and
  completed in an input-chosen order.

Invariants, checked with ``assert`` (a failure is a finding):

* nothing raises except :class:`~targetmirror.errors.RingError` from the ring, which is the
  documented "this ring is unusable" answer (the daemon then stops serving that device);
* every iovec view the ring hands out lies inside the data area and is exactly the
  ``(base, len)`` its descriptor names, checked by address before the SCSI layer touches it;
* nothing in the map changes except the data-in bytes of the fetched commands' own iovecs,
  the response fields of completed slots and ``cmd_tail``;
* every command slot is answered exactly once, with GOOD and no sense or CHECK CONDITION with
  well-formed fixed-format sense (response code 70h, additional length, a sense key the
  command may give), and the response that lands in the ring carries that status and sense;
* every change the SCSI layer makes to the medium lies inside the write extent the daemon
  computed for the command (the mirror marks write-intent bits from that extent: a write
  outside it would be missed by a rejoin), and a fast-path command has the same outcome, data
  and medium as the general path would give it.
"""

from __future__ import annotations

import collections
import ctypes
import struct
from collections.abc import Sequence

from targetmirror.errors import RingError
from targetmirror.scsi import constants as C
from targetmirror.scsi.cdb import COMMANDS
from targetmirror.scsi.extent import classify
from targetmirror.scsi.fastpath import decode_rw
from targetmirror.scsi.handler import DeviceIdentity, ScsiDevice, ScsiResult
from targetmirror.scsi.sense import build_fixed_sense, parse_fixed_sense
from targetmirror.tcmu import layout as L
from targetmirror.tcmu.ring import BadEntry, Command, Ring, Tmr
from tests.scsi.memory_backend import MemoryBackend

__all__ = ["OUTCOMES", "TARGETS", "Source", "run_cdb", "run_ring"]

OUTCOMES: collections.Counter[str] = collections.Counter()
"""How the inputs ended (ring refused, bad entry, command status...): tells whether a fuzz run
reaches the interesting code at all.  ``benchmarks/fuzz.py`` prints it."""

_SPECS = list(COMMANDS)
_SMALL_FIELDS = {6: (3, 4), 10: (5, 8), 12: (5, 9), 16: (9, 13)}
"""Last byte of the LBA and of the transfer length field, by CDB length (READ/WRITE shape)."""
_MODIFYING_OPS = {"write", "unmap", "write_zeroes", "compare_and_write"}
_ALLOWED_KEYS = {
    C.SenseKey.ILLEGAL_REQUEST,
    C.SenseKey.MEDIUM_ERROR,
    C.SenseKey.MISCOMPARE,
    C.SenseKey.DATA_PROTECT,
}
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(256))
_BAD_ENTRY_SENSE = build_fixed_sense(C.SenseKey.ILLEGAL_REQUEST, *C.INVALID_FIELD_IN_CDB)
"""What the daemon's runner answers a BadEntry with (daemon/runner.py)."""


class Source:
    """Deterministic draws from the fuzz input; an exhausted input reads as zeros."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        pos = self.pos
        if pos >= len(self.data):
            return 0
        self.pos = pos + 1
        return self.data[pos]

    def int(self, lo: int, hi: int) -> int:
        """An integer in ``[lo, hi]`` from as few bytes as the span needs."""
        span = hi - lo
        if span <= 0:
            return lo
        value = 0
        nbytes = (span.bit_length() + 7) // 8
        for _ in range(nbytes):
            value = (value << 8) | self.byte()
        return lo + value % (span + 1)

    def bool(self) -> bool:
        return bool(self.byte() & 1)

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out + bytes(n - len(out))

    def choice(self, seq: Sequence[int]) -> int:
        return seq[self.int(0, len(seq) - 1)]


# ------------------------------------------------------------------------------------------
# CDBs and the SCSI dispatch


def draw_cdb(s: Source) -> bytes:
    """Raw bytes (unknown opcodes, bad lengths), or a command from the table with random bits in
    the fields it evaluates, often with a small LBA and length so data commands get past the
    range checks and reach the backend."""
    kind = s.int(0, 3)
    if kind == 0:
        return s.take(s.int(0, 32))
    spec = _SPECS[s.int(0, len(_SPECS) - 1)]
    cdb = bytearray(spec.length)
    cdb[0] = spec.opcode
    for i in range(1, spec.length):
        cdb[i] = s.byte() & spec.usage[i]
    if spec.service_action is not None:
        cdb[1] = (cdb[1] & ~0x1F) | spec.service_action
    if kind >= 2:
        for i in range(2, spec.length - 1):
            cdb[i] = 0
        lba_last, len_last = _SMALL_FIELDS[spec.length]
        cdb[lba_last] = s.int(0, 70) & spec.usage[lba_last]
        cdb[len_last] = s.int(0, 9) & spec.usage[len_last]
    if kind == 3 and s.bool():  # one stray bit anywhere: reserved bits, control byte
        bit = s.int(0, 8 * spec.length - 1)
        cdb[bit // 8] ^= 1 << (bit % 8)
    return bytes(cdb)


def transfer_bytes(cdb: bytes, block_size: int) -> int | None:
    """The data length of a READ/WRITE(10/16), so a buffer can be made to match it exactly
    (what the fast path wants), else None."""
    if len(cdb) == 10 and cdb[0] in (0x28, 0x2A):
        return int.from_bytes(cdb[7:9], "big") * block_size
    if len(cdb) == 16 and cdb[0] in (0x88, 0x8A):
        return int.from_bytes(cdb[10:14], "big") * block_size
    return None


def make_device(s: Source) -> tuple[ScsiDevice, MemoryBackend]:
    bs = s.choice((512, 4096))
    backend = MemoryBackend(num_blocks=s.int(1, 64), block_size=bs, write_cache=s.bool())
    identity = DeviceIdentity(
        serial="fuzz",
        max_transfer_blocks=s.choice((8, 64, 1024)),
        max_compare_and_write_blocks=s.choice((1, 2)),
    )
    return ScsiDevice(backend, identity, write_protected=s.int(0, 7) == 0), backend


def _clone(dev: ScsiDevice, backend: MemoryBackend) -> tuple[ScsiDevice, MemoryBackend]:
    twin = MemoryBackend(backend.num_blocks, backend.block_size, backend.write_cache)
    twin.data[:] = backend.data
    return ScsiDevice(twin, dev.identity, write_protected=dev.write_protected), twin


def check_result(res: ScsiResult, data_in_len: int) -> None:
    """A valid SAM status and, with CHECK CONDITION, well-formed fixed-format sense."""
    assert res.status in (C.Status.GOOD, C.Status.CHECK_CONDITION), res
    if res.status == C.Status.GOOD:
        assert res.sense is None, res
    else:
        sense = res.sense
        assert sense is not None and 18 <= len(sense) <= L.SENSE_BUFFERSIZE, res
        assert sense[0] & 0x7F == 0x70 and sense[7] == len(sense) - 8, sense.hex()
        info = parse_fixed_sense(sense)
        assert info.key in _ALLOWED_KEYS, sense.hex()
        assert (info.asc, info.ascq) != (0, 0), sense.hex()
    if res.read_len is not None:
        assert 0 <= res.read_len < data_in_len, (res, data_in_len)


def dispatch(dev: ScsiDevice, backend: MemoryBackend, cdb: bytes,
             iov: list[memoryview]) -> ScsiResult:
    """Run one command the way ``daemon.device`` does and check everything it did."""
    total = sum(v.nbytes for v in iov)
    calls_before = len(backend.calls)
    bs = backend.block_size
    plain = decode_rw(cdb, iov, backend.num_blocks, bs, dev.identity.max_transfer_blocks)
    if plain is not None:
        write, offset, length, fua = plain
        twin, twin_backend = _clone(dev, backend)
        twin_bufs = [bytearray(v.tobytes()) for v in iov]
        res = dev.execute_plain(write, offset, iov, fua, backend)
        extent = (offset, offset + length) if write else None
        # The general path on a copy: same answer, same data-in, same medium.
        general = twin.execute(cdb, [memoryview(b) for b in twin_bufs])
        assert general == res, (cdb.hex(), general, res)
        assert twin_backend.data == backend.data, cdb.hex()
        if not write and res.status == C.Status.GOOD:
            assert b"".join(twin_bufs) == b"".join(v.tobytes() for v in iov), cdb.hex()
    else:
        parsed, extent = classify(cdb, iov, bs)
        res = dev.execute(cdb, iov, backend, parsed)
    check_result(res, total)
    OUTCOMES["fast path" if plain is not None else
             "GOOD" if res.status == C.Status.GOOD else "CHECK CONDITION"] += 1
    for call in backend.calls[calls_before:]:
        if call[0] in _MODIFYING_OPS:
            op, off, n = call[0], int(call[1]), int(call[2])  # type: ignore[call-overload]
            assert not dev.write_protected, (cdb.hex(), call)
            assert extent is not None and extent[0] <= off and off + n <= extent[1], (
                f"{op} [{off}, +{n}) outside the write extent {extent} of {cdb.hex()}")
    return res


def run_cdb(data: bytes) -> None:
    """Fuzz target: a device, then a few commands with random data buffers against it."""
    s = Source(data)
    dev, backend = make_device(s)
    for _ in range(s.int(1, 3)):
        cdb = draw_cdb(s)
        bufs = []
        for _ in range(s.int(0, 3)):
            size = s.choice((0, 1, 8, 24, 512, 1024, 4096, 8192)) + s.int(0, 1) * s.int(0, 64)
            fill = s.byte()
            bufs.append(bytearray([fill]) * size)
        want = transfer_bytes(cdb, backend.block_size)
        if want and want <= 1 << 20 and s.int(0, 1):  # exactly the transfer, 1 or 2 segments
            cut = s.int(0, want) if s.bool() else want
            bufs = [bytearray([s.byte()]) * cut, bytearray([s.byte()]) * (want - cut)]
            if not bufs[1]:
                del bufs[1]
        if bufs and s.int(0, 3) == 0:  # a real-looking UNMAP or MODE SELECT parameter list
            head = s.take(min(len(bufs[0]), 24))
            bufs[0][: len(head)] = head
        dispatch(dev, backend, cdb, [memoryview(b) for b in bufs])


# ------------------------------------------------------------------------------------------
# The ring


def _address(buf: memoryview) -> int:
    """Address of the first byte of a writable, non-empty byte view."""
    holder = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


class _Map:
    """A TCMU map laid out from the fuzz input, and what the producer put into it."""

    def __init__(self, s: Source, block_size: int) -> None:
        self.block_size = block_size
        self.cmdr_size = s.choice((256, 512, 1024, 2048))
        self.data_size = s.choice((0, 512, 4096, 16384))
        self.data_off = L.MAILBOX_SIZE + self.cmdr_size
        self.size = self.data_off + self.data_size
        self.buf = bytearray(self.size)
        flags = L.FLAG_CAP_OOOC | L.FLAG_CAP_READ_LEN | L.FLAG_CAP_TMR
        if s.int(0, 15) == 0:
            flags = s.int(0, 0xFFFF)
        version = L.MAILBOX_VERSION if s.int(0, 15) else s.int(0, 3)
        tail = s.int(0, self.cmdr_size // 8 - 1) * 8
        L.MAILBOX.pack_into(self.buf, 0, version, flags, L.MAILBOX_SIZE, self.cmdr_size, tail)
        L.U32.pack_into(self.buf, L.MB_CMD_TAIL_OFF, tail)
        self.tail = tail
        self.head = tail
        # Data area: a pattern, so that a stray write shows.
        reps = self.data_size // 256 + 1
        self.buf[self.data_off :] = (_PATTERN * reps)[: self.data_size]

    def free(self) -> int:
        return self.cmdr_size - 8 - (self.head - self.tail) % self.cmdr_size

    def put(self, entry: bytearray, rel_cdb: bool = False) -> bool:
        """Write *entry* at head the way the kernel does: PAD to the ring's end if it would wrap.

        With *rel_cdb* the entry's ``cdb_off`` is relative and made absolute (from the start of
        the map, as the kernel writes it) here, where the entry's place is known.
        """
        n = len(entry)
        to_end = self.cmdr_size - self.head
        need = n + (to_end if n > to_end else 0)
        if need > self.free() or n == 0:
            return False
        if n > to_end:
            L.U32.pack_into(self.buf, L.MAILBOX_SIZE + self.head, to_end | L.OP_PAD)
            self.head = 0
        if rel_cdb:
            off = L.REQ_OFF + 16  # req.cdb_off
            _U64.pack_into(entry, off, (_U64.unpack_from(entry, off)[0] + L.MAILBOX_SIZE
                                         + self.head) & (2**64 - 1))
        self.buf[L.MAILBOX_SIZE + self.head : L.MAILBOX_SIZE + self.head + n] = entry
        self.head = (self.head + n) % self.cmdr_size
        return True

    def iovec(self, s: Source) -> tuple[int, int]:
        kind = s.int(0, 7)
        if kind <= 4 and self.data_size:  # inside the data area
            base = self.data_off + s.int(0, self.data_size)
            return base, s.int(0, self.size - base)
        if kind == 5:  # in the mailbox or the ring
            return s.int(0, self.data_off - 1), s.int(0, 64)
        if kind == 6:  # straddling or past the end
            return self.size - s.int(0, 64), s.int(1, 4096)
        return s.int(0, 2**64 - 1), s.int(0, 2**64 - 1)

    def entry(self, s: Source, cmd_id: int) -> tuple[bytearray, bool]:
        """An entry for *cmd_id*, and whether its ``cdb_off`` is still relative to it."""
        kind = s.int(0, 9)
        if kind <= 5:  # a command, sometimes with defects
            iov_cnt = s.int(0, 3)
            bidi = s.int(0, 1) if s.int(0, 3) == 0 else 0
            dif = 1 if s.int(0, 31) == 0 else 0
            cdb = draw_cdb(s)
            cdb_rel, length = L.cmd_entry_size(iov_cnt + bidi, max(len(cdb), 1))
            if s.int(0, 7) == 0:
                length = s.int(1, 40) * 8
            relative = True
            if s.int(0, 7) == 0:
                cdb_rel = s.int(0, length + 16)
            elif s.int(0, 15) == 0:
                cdb_rel, relative = s.int(0, 2**64 - 1), False
            e = bytearray(max(length, 8))
            L.HDR.pack_into(e, 0, length | L.OP_CMD, cmd_id, 0, 0)
            if length >= L.REQ_OFF + L.REQ.size:
                cnt = iov_cnt if s.int(0, 7) else s.int(0, 2**32 - 1)
                L.REQ.pack_into(e, L.REQ_OFF, cnt, bidi, dif, cdb_rel, 0, 0)
            want = transfer_bytes(cdb, self.block_size)
            for i in range(iov_cnt + bidi):
                off = L.REQ_IOV_OFF + L.IOV_SIZE * i
                if off + L.IOV_SIZE <= len(e):
                    base, ln = self.iovec(s)
                    if want and iov_cnt == 1 and s.int(0, 1) and want <= self.data_size:
                        base, ln = self.data_off + s.int(0, self.data_size - want), want
                    L.IOV.pack_into(e, off, base, ln)
            if 0 <= cdb_rel < len(e):
                e[cdb_rel : cdb_rel + len(cdb)] = cdb[: len(e) - cdb_rel]
            return e, relative and length >= L.REQ_OFF + L.REQ.size
        if kind == 6:  # PAD in an odd place: mid-ring, of any length
            n = s.int(1, 8) * 8
            e = bytearray(n)
            L.HDR.pack_into(e, 0, n | L.OP_PAD, cmd_id, 0, 0)
            return e, False
        if kind == 7:  # TMR, with a count that may lie
            ids = [s.int(0, 0xFFFF) for _ in range(s.int(0, 4))]
            n = L.tmr_entry_size(len(ids)) if s.int(0, 3) else s.int(1, 6) * 8
            e = bytearray(n)
            L.HDR.pack_into(e, 0, n | L.OP_TMR, cmd_id, 0, 0)
            if n >= L.TMR_IDS_OFF:
                L.TMR.pack_into(e, L.TMR_OFF, s.int(0, 8), 0, s.choice((len(ids), 1000)))
                for i, cid in enumerate(ids):
                    if L.TMR_IDS_OFF + 2 * i + 2 <= n:
                        _U16.pack_into(e, L.TMR_IDS_OFF + 2 * i, cid)
            return e, False
        # an unknown entry opcode, or raw bytes with a plausible length
        n = s.int(1, 24) * 8
        e = bytearray(s.take(n))
        L.HDR.pack_into(e, 0, n | s.choice((3, 4, 5, 6, 7)) if kind == 8 else
                        L.U32.unpack_from(e, 0)[0] & ~0x7 | s.int(0, 7), cmd_id, 0, 0)
        if kind == 9 and L.U32.unpack_from(e, 0)[0] & ~0x7 == 0:
            L.U32.pack_into(e, 0, n | L.OP_CMD)
        return e, False


def _slots(m: _Map, start: int, stop: int) -> list[tuple[int, int]]:
    """(ring offset, length) of every command slot in ring order between two offsets."""
    out = []
    pos = start
    while pos != stop:
        (len_op,) = L.U32.unpack_from(m.buf, L.MAILBOX_SIZE + pos)
        length = len_op & ~L.OP_MASK
        assert length and pos + length <= m.cmdr_size, (pos, length)
        if len_op & L.OP_MASK not in (L.OP_PAD, L.OP_TMR):
            out.append((pos, length))
        pos = (pos + length) % m.cmdr_size
    return out


def run_ring(data: bytes) -> None:
    """Fuzz target: a map full of (mostly) plausible entries, fetched, executed, completed."""
    s = Source(data)
    dev, backend = make_device(s)
    m = _Map(s, backend.block_size)
    ids = [s.int(0, 0xFFFF) for _ in range(4)]
    for _ in range(s.int(0, 12)):
        cmd_id = ids[s.int(0, 3)] if s.int(0, 7) == 0 else s.int(0, 0xFFFF)
        if not m.put(*m.entry(s, cmd_id)):
            break
    if s.int(0, 15) == 0:  # a head the kernel would never write
        m.head = s.int(0, 2**32 - 1) if s.bool() else s.int(0, m.cmdr_size // 8) * 8
    L.U32.pack_into(m.buf, L.MB_CMD_HEAD_OFF, m.head & 0xFFFFFFFF)
    before = bytes(m.buf)
    try:
        ring = Ring(m.buf)
    except RingError:
        OUTCOMES["ring refused"] += 1
        assert bytes(m.buf) == before
        return
    left = _drive(s, m, ring, dev, backend, before)
    if s.int(0, 3) == 3:
        ring.release()
        assert ring.in_flight == 0, left


def _drive(s: Source, m: _Map, ring: Ring, dev: ScsiDevice, backend: MemoryBackend,
           before: bytes) -> bool:
    """Fetch, execute, complete and check; True if commands were left in flight."""
    mv = memoryview(m.buf)
    base_addr = _address(mv)
    writable = bytearray(len(before))  # 1 = the handler may legitimately change this byte
    writable[L.MB_CMD_TAIL_OFF : L.MB_CMD_TAIL_OFF + 4] = b"\1\1\1\1"
    tail0 = ring.tail()
    try:
        entries = ring.fetch()
    except RingError:  # the device is unusable; fetch wrote nothing
        OUTCOMES["fetch refused"] += 1
        assert bytes(m.buf) == before
        return True
    results: dict[int, list[tuple[int, bytes | None]]] = {}
    slots: list[int] = []
    for entry in entries:
        OUTCOMES[type(entry).__name__] += 1
        if isinstance(entry, Tmr):
            continue
        if isinstance(entry, BadEntry):
            res = ScsiResult(C.Status.CHECK_CONDITION, _BAD_ENTRY_SENSE)
        else:
            assert isinstance(entry, Command)
            for v in (*entry.iov, *entry.bidi_iov):
                assert v.readonly is False and v.ndim == 1 and v.itemsize == 1
                if v.nbytes:
                    start = _address(v) - base_addr
                    assert m.data_off <= start and start + v.nbytes <= m.size, (start, v.nbytes)
                    writable[start : start + v.nbytes] = b"\1" * v.nbytes
            data_in = entry.bidi_iov if entry.bidi_iov else entry.iov
            res = dispatch(dev, backend, entry.cdb, list(data_in))
        results.setdefault(entry.cmd_id, []).append((res.status, res.sense))
        slots.append(entry.cmd_id)
    # Complete in an order the input chooses; every slot exactly once.
    order = list(slots)
    for i in range(len(order) - 1, 0, -1):
        j = s.int(0, i)
        order[i], order[j] = order[j], order[i]
    for cmd_id in order:
        status, sense = results[cmd_id].pop()
        results.setdefault(-cmd_id - 1, []).append((status, sense))
        ring.complete(cmd_id, status, sense)
    assert ring.in_flight == 0
    for entry in entries:
        if isinstance(entry, Command):
            for v in (*entry.iov, *entry.bidi_iov):
                try:
                    v.tobytes()
                except ValueError:
                    continue
                raise AssertionError("a completed command's view was not released")
    # The slots between the old tail and the new one carry exactly the answers given.
    answered = _slots(m, tail0, ring.tail())
    assert len(answered) == len(slots), (answered, slots)
    got_ids = []
    for pos, length in answered:
        eoff = L.MAILBOX_SIZE + pos
        writable[eoff + 4 : eoff + min(length, L.CMD_ENTRY_SIZE)] = (
            b"\1" * (min(length, L.CMD_ENTRY_SIZE) - 4))
        cmd_id = L.HDR.unpack_from(m.buf, eoff)[1]
        got_ids.append(cmd_id)
        given = results[-cmd_id - 1]
        if length >= L.RSP_OFF + L.RSP.size:
            status = m.buf[eoff + L.RSP_OFF]
            assert any(st == status for st, _ in given), (cmd_id, status, given)
        if length >= L.CMD_ENTRY_SIZE and status == C.Status.CHECK_CONDITION:
            sense = bytes(m.buf[eoff + L.RSP_SENSE_OFF : eoff + L.RSP_SENSE_OFF + 96])
            assert any((sn or b"").ljust(96, b"\0") == sense for _, sn in given), cmd_id
    assert sorted(got_ids) == sorted(slots)
    after = bytes(m.buf)
    for chunk in range(0, len(after), 256):
        if after[chunk : chunk + 256] != before[chunk : chunk + 256]:
            for i in range(chunk, min(chunk + 256, len(after))):
                assert before[i] == after[i] or writable[i], f"map byte {i} changed"
    mv.release()
    return False


TARGETS = {"cdb": run_cdb, "ring": run_ring}
