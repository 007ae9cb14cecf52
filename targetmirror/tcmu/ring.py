"""The TCMU command ring as pure code over memory (no syscalls).

:class:`Ring` wraps the writable mapping of a ``/dev/uioN`` device — or, in tests, any writable
buffer laid out the same way — and speaks the consumer side of the protocol:

* :meth:`Ring.fetch` walks from a private read pointer to ``cmd_head`` and turns every entry into
  a :class:`Command`, a :class:`Tmr` or a :class:`BadEntry`.
* :meth:`Ring.complete` writes one response and advances ``cmd_tail``.  Completions may come in
  any order: the kernel (``CAP_OOOC``) matches a response by the ``cmd_id`` written into it, not
  by position, so we always write into the oldest not-yet-answered entry ("stealing" it).

Why it is built this way:

* The ring never trusts the kernel's numbers blindly.  A command's iovecs become memoryviews only
  after *every* ``(base, len)`` has been checked to lie inside the data area, and nothing is read
  or written outside the entry being handled.  Data pages of the real device are allocated
  lazily, so touching one that belongs to no command is a SIGBUS that kills the daemon; a
  Python exception is always better.
* ``req`` and ``rsp`` share the same bytes of an entry, and a completion may steal an entry other
  than its own, so everything of a request (CDB, iovec descriptors) is copied out in
  :meth:`fetch`, before any completion can overwrite it.
* The views handed out for a command are released in :meth:`complete`: after completion the
  kernel may free the command's data pages, and a stale view would turn a late access into a
  SIGBUS; a released view raises ``ValueError`` instead.  It also lets the mapping be closed.

Concurrency contract: a ``Ring`` is not thread-safe.  The caller serialises :meth:`fetch`,
:meth:`complete` and :meth:`release` (one ring thread, or one lock), and writes to the UIO fd once
per batch of completions (``UioDevice.notify``) — the notify is what makes the kernel look at
``cmd_tail``, and it is expensive, so it must not be done per command.  A fetch that returned a
:class:`Tmr` also moved ``cmd_tail`` and deserves a notify (see :meth:`Ring.fetch`).  Workers
may fill or read a command's iovecs concurrently with ring calls about *other* commands.

Memory ordering: Python has no barriers.  ``cmd_head`` is read right after the ``poll``/``read``
syscall that reported the event, and our stores to the response happen in program order before
the ``cmd_tail`` store, which is sufficient on x86 (TSO); see the protocol notes for aarch64.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from collections.abc import Callable
from typing import NamedTuple, TypeAlias

from targetmirror.errors import RingError
from targetmirror.tcmu import layout as L

__all__ = ["BadEntry", "Command", "Entry", "Ring", "Tmr", "WritableBuffer"]

WritableBuffer: TypeAlias = mmap.mmap | bytearray | memoryview
"""What a :class:`Ring` can wrap: the device's mmap, or a bytearray/memoryview in tests."""

_MAX_CMD_IDS = 1 << 16
_REQ_UNPACK = L.REQ.unpack_from
_IOV_UNPACK = L.IOV.unpack_from
_IOV_ITER = L.IOV.iter_unpack
_U32_UNPACK = L.U32.unpack_from
_U32_PACK = L.U32.pack_into
_HDR_RSP_PACK = struct.Struct("<HBBBBHI").pack_into
"""hdr.cmd_id, kflags, uflags + rsp.scsi_status, pads, read_len: one store from entry offset 4."""
_MARKER_OPS = frozenset((L.OP_PAD, L.OP_TMR))
_CDB_LEN = tuple(L.cdb_length(op, 0) if op != L.VARIABLE_LENGTH_CMD else 0 for op in range(256))
"""CDB length by opcode, 0 for the variable-length opcode (looked up per command)."""
_ZERO_SENSE = bytes(L.SENSE_BUFFERSIZE)


class Command(NamedTuple):
    """One SCSI command to execute; complete it exactly once with :meth:`Ring.complete`.

    ``iov`` are the Data-Out buffers of a write, or the Data-In buffers to fill for a read; for a
    bidirectional command ``iov`` is Data-Out and ``bidi_iov`` Data-In.  The views alias the
    shared mapping (zero copy) and are released by :meth:`Ring.complete`.
    """

    cmd_id: int
    cdb: bytes
    iov: list[memoryview]
    bidi_iov: list[memoryview]


class Tmr(NamedTuple):
    """A task-management notification (only if ``tmr_notification=1``); never completed.

    The kernel has already decided the outcome of the TMR; it tells us which in-flight command
    ids were aborted so that we may stop working on them.  Those commands must still be
    completed through the ring (the kernel only frees them then).
    """

    tmr_type: int
    cmd_ids: tuple[int, ...]


class BadEntry(NamedTuple):
    """An entry the ring refused to interpret (unknown opcode, iovecs outside the data area, ...).

    It still occupies a command slot: the caller must complete ``cmd_id`` exactly once, normally
    with CHECK CONDITION, so that the kernel can fail the command and free the slot.
    """

    cmd_id: int
    reason: str


Entry: TypeAlias = Command | Tmr | BadEntry


class Ring:
    """Consumer side of one device's command ring.  See the module docstring for the contract."""

    __slots__ = (
        "_cmdr_off",
        "_cmdr_size",
        "_data_off",
        "_flags",
        "_inflight",
        "_mv",
        "_pending",
        "_read_len_ok",
        "_rp",
        "_size",
        "_views",
    )

    def __init__(self, buf: WritableBuffer) -> None:
        """Check the mailbox of *buf* (the whole map) and start reading at ``cmd_tail``.

        Raises :class:`RingError` if the buffer is read-only, the mailbox version is not 2, the
        kernel does not offer out-of-order completion, or the ring does not fit the buffer.
        """
        mv = memoryview(buf)
        if mv.readonly:
            mv.release()
            raise RingError("the ring buffer must be writable")
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        self._mv: memoryview | None = mv
        try:
            self._check_mailbox(mv)
        except RingError:
            self._mv = None
            mv.release()
            raise
        self._inflight = bytearray(_MAX_CMD_IDS)
        """Per cmd_id count of fetched, not yet completed slots (a count, to survive a corrupt
        duplicate id without crashing the bookkeeping)."""
        self._views: list[list[memoryview] | None] = [None] * _MAX_CMD_IDS
        self._pending = 0

    def _check_mailbox(self, mv: memoryview) -> None:
        size = mv.nbytes
        if size < L.MAILBOX_SIZE:
            raise RingError(f"map of {size} bytes is smaller than the mailbox")
        version, flags, cmdr_off, cmdr_size, head = L.MAILBOX.unpack_from(mv, 0)
        if version != L.MAILBOX_VERSION:
            raise RingError(f"mailbox version {version}, expected {L.MAILBOX_VERSION}")
        if not flags & L.FLAG_CAP_OOOC:
            raise RingError(f"kernel does not offer out-of-order completion (flags {flags:#x})")
        if cmdr_off < L.MAILBOX_SIZE or cmdr_off % L.OP_ALIGN:
            raise RingError(f"bad command ring offset {cmdr_off}")
        if cmdr_size < L.CMD_ENTRY_SIZE or cmdr_size % L.OP_ALIGN:
            raise RingError(f"bad command ring size {cmdr_size}")
        if cmdr_off + cmdr_size > size:
            raise RingError(f"command ring [{cmdr_off}, +{cmdr_size}) overruns the {size}-byte map")
        (tail,) = L.U32.unpack_from(mv, L.MB_CMD_TAIL_OFF)
        for name, value in (("cmd_head", head), ("cmd_tail", tail)):
            if value >= cmdr_size or value % L.OP_ALIGN:
                raise RingError(f"{name} {value} is not a valid ring offset")
        self._flags: int = flags
        self._cmdr_off: int = cmdr_off
        self._cmdr_size: int = cmdr_size
        self._data_off: int = cmdr_off + cmdr_size
        self._size: int = size
        self._read_len_ok = bool(flags & L.FLAG_CAP_READ_LEN)
        self._rp: int = tail

    # ---------------------------------------------------------------------------------------
    # Introspection

    @property
    def flags(self) -> int:
        """The mailbox capability flags (``layout.FLAG_CAP_*``)."""
        return self._flags

    @property
    def cmdr_size(self) -> int:
        """Size of the command ring in bytes."""
        return self._cmdr_size

    @property
    def data_off(self) -> int:
        """Offset of the data area from the start of the map."""
        return self._data_off

    @property
    def map_size(self) -> int:
        """Size of the whole map; the data area is ``[data_off, map_size)``."""
        return self._size

    @property
    def in_flight(self) -> int:
        """Number of fetched command slots (Command or BadEntry) not yet completed."""
        return self._pending

    def has_entries(self) -> bool:
        """True if ``cmd_head`` has moved past our read pointer (cheap: one 4-byte load)."""
        mv = self._live()
        return bool(L.U32.unpack_from(mv, L.MB_CMD_HEAD_OFF)[0] != self._rp)

    def _live(self) -> memoryview:
        mv = self._mv
        if mv is None:
            raise RingError("ring has been released")
        return mv

    # ---------------------------------------------------------------------------------------
    # Fetching

    def head(self) -> int:
        """The kernel's ``cmd_head`` now: the ring position a split instant is defined by."""
        return int(L.U32.unpack_from(self._live(), L.MB_CMD_HEAD_OFF)[0])

    def fetch(self, until: int | None = None) -> list[Entry]:
        """Consume every entry up to ``cmd_head`` (or up to ring offset ``until``) in ring order.

        ``until`` is a ``cmd_head`` value read earlier with :meth:`head`: fetching stops exactly
        there, so the caller can treat the entries queued before that moment differently from
        those queued after it (the split instant).  It must lie between the read pointer and the
        current head; anything else raises :class:`RingError`.

        PAD entries are skipped.  PAD and TMR entries sitting at ``cmd_tail`` are stepped over
        (``cmd_tail`` advances), because nothing else would ever free their ring space: when the
        result contains a :class:`Tmr`, the caller should notify the kernel even if it has no
        completion to report, so that commands waiting for ring space get queued.

        Raises :class:`RingError` if ``cmd_head`` or an entry length is so corrupt that the ring
        cannot be walked; entries already consumed in this call are then lost, which is
        acceptable because the device is unusable anyway.
        """
        mv = self._live()
        cmdr_off = self._cmdr_off
        cmdr_size = self._cmdr_size
        (head,) = L.U32.unpack_from(mv, L.MB_CMD_HEAD_OFF)
        if head >= cmdr_size or head % L.OP_ALIGN:
            raise RingError(f"cmd_head {head} is not a valid ring offset")
        rp = self._rp
        if until is not None and until != head:
            if (until - rp) % cmdr_size > (head - rp) % cmdr_size or until % L.OP_ALIGN:
                raise RingError(f"fetch limit {until} is not between the read pointer {rp} "
                                f"and cmd_head {head}")
            head = until
        out: list[Entry] = []
        hdr_unpack = L.HDR.unpack_from
        inflight = self._inflight
        while rp != head:
            # An entry never wraps: it lies entirely before head, or before the ring's end.
            avail = head - rp if head > rp else cmdr_size - rp
            eoff = cmdr_off + rp
            len_op, cmd_id, _kflags, _uflags = hdr_unpack(mv, eoff)
            length = len_op & ~L.OP_MASK
            op = len_op & L.OP_MASK
            if length == 0 or length > avail:
                self._rp = rp
                raise RingError(
                    f"entry at ring offset {rp} has length {length}, {avail} bytes available"
                )
            rp += length
            if rp == cmdr_size:
                rp = 0
            if op == L.OP_PAD:
                continue
            if op == L.OP_TMR:
                out.append(self._parse_tmr(mv, eoff, length))
                continue
            # A command slot: it will be answered exactly once.
            entry: Entry
            if inflight[cmd_id]:
                entry = BadEntry(cmd_id, f"cmd_id {cmd_id} is already in flight")
            elif op == L.OP_CMD:
                entry = self._parse_cmd(mv, eoff, length, cmd_id)
            else:
                entry = BadEntry(cmd_id, f"unknown entry opcode {op}")
            if inflight[cmd_id] == 255:
                self._rp = rp
                raise RingError(f"cmd_id {cmd_id} is in flight 255 times")
            inflight[cmd_id] += 1
            self._pending += 1
            out.append(entry)
        self._rp = rp
        # PAD and TMR entries at the tail are never "completed"; step cmd_tail over them now,
        # or a ring whose tail is full of them would never free space for new commands.
        (tail,) = L.U32.unpack_from(mv, L.MB_CMD_TAIL_OFF)
        new_tail = self._skip_markers(mv, tail)
        if new_tail != tail:
            L.U32.pack_into(mv, L.MB_CMD_TAIL_OFF, new_tail)
        return out

    def express(self, lane: Callable[[memoryview, int, int, int], tuple[int, int]]) -> int:
        """Let a compiled lane serve commands in place; return how many it answered.

        ``lane(map, cmdr_off, cmdr_size, rp)`` walks from ``rp``, answers each command it can
        serve in its own slot, stores ``cmd_tail`` and returns ``(new rp, served)``; it stops
        at the first entry it leaves to :meth:`fetch` (see ``targetmirror/express``).  Offered
        only when no fetched command is unanswered and ``cmd_tail`` equals the read pointer:
        then answering in place, in ring order, is exactly what :meth:`complete` would do, and
        nothing here has to know about the lane's commands afterwards.  The caller notifies
        the kernel if anything was served.
        """
        if self._pending:
            return 0
        mv = self._live()
        rp = self._rp
        if _U32_UNPACK(mv, L.MB_CMD_TAIL_OFF)[0] != rp:
            return 0
        new_rp, served = lane(mv, self._cmdr_off, self._cmdr_size, rp)
        if new_rp >= self._cmdr_size or new_rp % L.OP_ALIGN:
            raise RingError(f"the express lane returned ring offset {new_rp}")
        self._rp = new_rp
        return served

    def _parse_cmd(self, mv: memoryview, eoff: int, length: int, cmd_id: int) -> Entry:
        if length < L.CMD_ENTRY_SIZE:
            return BadEntry(cmd_id, f"command entry of {length} bytes is too short")
        iov_cnt, bidi_cnt, dif_cnt, cdb_off, _p1, _p2 = _REQ_UNPACK(mv, eoff + L.REQ_OFF)
        if dif_cnt:
            return BadEntry(cmd_id, f"{dif_cnt} DIF iovecs are not supported")
        end = eoff + length
        n = iov_cnt + bidi_cnt
        iov_off = eoff + L.REQ_IOV_OFF
        iov_end = iov_off + L.IOV_SIZE * n
        if iov_end > end:
            return BadEntry(cmd_id, f"{n} iovecs overrun the {length}-byte entry")
        if not iov_end <= cdb_off < end:
            return BadEntry(cmd_id, f"cdb_off {cdb_off} lies outside the entry")
        opcode = mv[cdb_off]
        cdb_len = _CDB_LEN[opcode]
        if not cdb_len:  # variable length: 8 + additional length in byte 7
            cdb_len = 8 + mv[cdb_off + 7] if cdb_off + 8 <= end else end + 1
        if cdb_off + cdb_len > end:
            return BadEntry(cmd_id, f"CDB with opcode {opcode:#04x} overruns the entry")
        cdb = mv[cdb_off : cdb_off + cdb_len].tobytes()
        # Validate every descriptor before creating any view of the data area.
        data_off = self._data_off
        size = self._size
        if n == 1:  # the common case: one merged buffer
            base, ln = _IOV_UNPACK(mv, iov_off)
            if base < data_off or base + ln > size:
                return BadEntry(cmd_id, f"iovec 0 [{base}, +{ln}) lies outside the data area")
            views = [mv[base : base + ln]]
        elif n:
            descs = list(_IOV_ITER(mv[iov_off:iov_end]))
            for i, (base, ln) in enumerate(descs):
                if base < data_off or base + ln > size:
                    return BadEntry(cmd_id, f"iovec {i} [{base}, +{ln}) lies outside the data area")
            views = [mv[base : base + ln] for base, ln in descs]
        else:
            views = []
        self._views[cmd_id] = views
        if bidi_cnt:
            return Command(cmd_id, cdb, views[:iov_cnt], views[iov_cnt:])
        return Command(cmd_id, cdb, views, [])

    @staticmethod
    def _parse_tmr(mv: memoryview, eoff: int, length: int) -> Tmr:
        if length < L.TMR_ENTRY_SIZE:
            return Tmr(L.TMR_UNKNOWN, ())
        tmr_type, _pad2, cmd_cnt = L.TMR.unpack_from(mv, eoff + L.TMR_OFF)
        cnt = min(cmd_cnt, (length - L.TMR_ENTRY_SIZE) // 2)  # never read past the entry
        ids = struct.unpack_from(f"<{cnt}H", mv, eoff + L.TMR_IDS_OFF) if cnt else ()
        return Tmr(tmr_type, ids)

    # ---------------------------------------------------------------------------------------
    # Completing

    def complete(
        self,
        cmd_id: int,
        status: int,
        sense: bytes | None = None,
        read_len: int | None = None,
    ) -> None:
        """Write the response of *cmd_id* into the oldest unanswered entry; advance ``cmd_tail``.

        *sense* (at most 96 bytes, zero-padded) is written when given; with CHECK CONDITION and
        no sense, the sense buffer is zeroed so the kernel does not copy stale request bytes.
        *read_len* is reported (``UFLAG_READ_LEN``) only if the kernel offers ``CAP_READ_LEN``;
        otherwise the kernel assumes the full data-in length.

        Raises :class:`RingError` for a cmd_id that is not in flight (answering it would put
        the kernel's device into its BROKEN state) or if the ring's state is inconsistent.
        The caller must notify the kernel afterwards (once per batch).
        """
        self._respond(cmd_id, status, sense, read_len, 0)

    def complete_unknown_op(self, cmd_id: int) -> None:
        """Complete *cmd_id* with ``UFLAG_UNKNOWN_OP``: the kernel fails it with CHECK CONDITION.

        The kernel attaches no sense data in that case, so a proper CHECK CONDITION through
        :meth:`complete` is preferred for commands we can name; this is the protocol's own way
        to reject an entry we cannot interpret at all.
        """
        self._respond(cmd_id, L.SAM_STAT_CHECK_CONDITION, None, None, L.UFLAG_UNKNOWN_OP)

    def _respond(
        self,
        cmd_id: int,
        status: int,
        sense: bytes | None,
        read_len: int | None,
        uflags: int,
    ) -> None:
        mv = self._live()
        if not 0 <= cmd_id < _MAX_CMD_IDS or not self._inflight[cmd_id]:
            raise RingError(f"cmd_id {cmd_id} is not in flight")
        if sense is not None and len(sense) > L.SENSE_BUFFERSIZE:
            raise RingError(f"sense of {len(sense)} bytes exceeds {L.SENSE_BUFFERSIZE}")
        if not 0 <= status <= 0xFF:
            raise RingError(f"SCSI status {status} does not fit a byte")
        rl = 0
        if read_len is not None and self._read_len_ok:
            if not 0 <= read_len <= 0xFFFFFFFF:
                raise RingError(f"read_len {read_len} does not fit 32 bits")
            uflags |= L.UFLAG_READ_LEN
            rl = read_len
        cmdr_off = self._cmdr_off
        cmdr_size = self._cmdr_size
        rp = self._rp
        (tail,) = _U32_UNPACK(mv, L.MB_CMD_TAIL_OFF)
        if tail == rp:
            raise RingError("no fetched entry is left to carry a completion")
        if tail >= cmdr_size or tail % L.OP_ALIGN:
            raise RingError(f"cmd_tail {tail} is not a valid ring offset")
        (len_op,) = _U32_UNPACK(mv, cmdr_off + tail)
        if len_op & L.OP_MASK in _MARKER_OPS:
            # Skip PAD and TMR entries: the kernel ignores them when it reaps completions.
            tail = self._skip_markers(mv, tail)
            if tail == rp:
                raise RingError("no fetched entry is left to carry a completion")
            (len_op,) = _U32_UNPACK(mv, cmdr_off + tail)
        length = len_op & ~L.OP_MASK
        if length == 0 or tail + length > cmdr_size:
            raise RingError(f"entry at ring offset {tail} has a corrupt length {length}")
        eoff = cmdr_off + tail
        # Steal this entry: the kernel identifies the response by the cmd_id written here.
        if length >= L.CMD_ENTRY_SIZE:
            _HDR_RSP_PACK(mv, eoff + L.HDR_ID_FLAGS_OFF, cmd_id, 0, uflags, status, 0, 0, rl)
            s = eoff + L.RSP_SENSE_OFF
            if sense is not None:
                n = len(sense)
                mv[s : s + n] = sense
                if n < L.SENSE_BUFFERSIZE:
                    mv[s + n : s + L.SENSE_BUFFERSIZE] = _ZERO_SENSE[n:]
            elif status == L.SAM_STAT_CHECK_CONDITION:
                mv[s : s + L.SENSE_BUFFERSIZE] = _ZERO_SENSE
        elif length >= L.RSP_OFF + L.RSP.size:
            # A (corrupt) short slot: write what fits inside it and nothing beyond.
            _HDR_RSP_PACK(mv, eoff + L.HDR_ID_FLAGS_OFF, cmd_id, 0, uflags, status, 0, 0, rl)
        else:
            L.HDR_ID_FLAGS.pack_into(mv, eoff + L.HDR_ID_FLAGS_OFF, cmd_id, 0, uflags)
        tail += length
        if tail == cmdr_size:
            tail = 0
        if tail != rp and _U32_UNPACK(mv, cmdr_off + tail)[0] & L.OP_MASK in _MARKER_OPS:
            tail = self._skip_markers(mv, tail)
        _U32_PACK(mv, L.MB_CMD_TAIL_OFF, tail)
        self._inflight[cmd_id] -= 1
        self._pending -= 1
        views = self._views[cmd_id]
        if views is not None and not self._inflight[cmd_id]:
            self._views[cmd_id] = None
            _release(views)

    def _skip_markers(self, mv: memoryview, tail: int) -> int:
        """Return *tail* moved past the PAD/TMR entries that start at it (only fetched ones).

        Every entry between cmd_tail and our read pointer was validated by :meth:`fetch` and
        the kernel does not rewrite queued entries, but the lengths are checked again: a
        corrupt ``cmd_tail`` (or a buggy kernel) must raise, not make us write out of bounds.
        """
        cmdr_off = self._cmdr_off
        cmdr_size = self._cmdr_size
        rp = self._rp
        while tail != rp:
            if tail >= cmdr_size or tail % L.OP_ALIGN:
                raise RingError(f"cmd_tail {tail} is not a valid ring offset")
            (len_op,) = L.U32.unpack_from(mv, cmdr_off + tail)
            length = len_op & ~L.OP_MASK
            if length == 0 or tail + length > cmdr_size:
                raise RingError(f"entry at ring offset {tail} has a corrupt length {length}")
            op = len_op & L.OP_MASK
            if op != L.OP_PAD and op != L.OP_TMR:
                break
            tail += length
            if tail == cmdr_size:
                tail = 0
        return tail

    # ---------------------------------------------------------------------------------------
    # Lifecycle

    def reset(self) -> None:
        """Forget every in-flight command and restart reading at the current ``cmd_tail``.

        Only for after the kernel reset the ring (``action/reset_ring``), which fails all
        in-flight commands itself; their views are released here.
        """
        mv = self._live()
        self._release_views()
        (tail,) = L.U32.unpack_from(mv, L.MB_CMD_TAIL_OFF)
        if tail >= self._cmdr_size or tail % L.OP_ALIGN:
            raise RingError(f"cmd_tail {tail} is not a valid ring offset")
        self._rp = tail

    def tail(self) -> int:
        """The mailbox's ``cmd_tail`` now (``head() == tail()``: no unanswered command slot)."""
        return int(L.U32.unpack_from(self._live(), L.MB_CMD_TAIL_OFF)[0])

    def skip_to_head(self) -> None:
        """Start reading at the current ``cmd_head``, leaving older entries unanswered.

        Only for a kernel that cannot reset the ring: entries a previous process left between
        ``cmd_tail`` and ``cmd_head`` cannot be answered safely (out-of-order completion
        overwrote some requests with responses, so the slots no longer say which commands are
        still open).  The kernel times them out (``cmd_time_out``); their slots are reused as
        our completions steal them.
        """
        mv = self._live()
        self._release_views()
        (head,) = L.U32.unpack_from(mv, L.MB_CMD_HEAD_OFF)
        if head >= self._cmdr_size or head % L.OP_ALIGN:
            raise RingError(f"cmd_head {head} is not a valid ring offset")
        self._rp = head

    def release(self) -> None:
        """Release every view this ring created so the mapping can be closed.  Idempotent.

        Views the caller derived from a command's iovecs (slices of slices) keep the mapping
        exported; the owner of the mapping must cope with that (see ``UioDevice.close``).
        """
        mv = self._mv
        if mv is None:
            return
        self._release_views()
        self._mv = None
        # BufferError: someone holds a buffer taken from our base view; it dies with them
        with contextlib.suppress(BufferError):
            mv.release()

    def _release_views(self) -> None:
        if not self._pending:  # a view exists only for a fetched, unanswered command
            return
        views_by_id = self._views
        inflight = self._inflight
        for cmd_id in range(_MAX_CMD_IDS):
            if inflight[cmd_id]:
                views = views_by_id[cmd_id]
                if views is not None:
                    _release(views)
                views_by_id[cmd_id] = None
                inflight[cmd_id] = 0
        self._pending = 0

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _release(views: list[memoryview]) -> None:
    """Release a command's views; one still exported by the caller is left to the GC."""
    for v in views:
        try:  # noqa: SIM105 - contextlib.suppress costs more than the release on the hot path
            v.release()
        except BufferError:
            pass
