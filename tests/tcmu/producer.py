"""An in-process stand-in for the kernel side of a TCMU device.

It lays out the shared map the way ``target_core_user`` does — mailbox, command ring, data
area — in an anonymous mmap, queues command and TMR entries at ``cmd_head``, and reaps
completions from its last-cleaned pointer up to ``cmd_tail`` like the kernel does when userspace
writes to the UIO fd.  The ring code under test never sees the difference.

Offsets and sizes are written out here with their own literals on purpose instead of importing
``targetmirror.tcmu.layout``: a mistake in the layout module must make the tests fail, not be
copied into the double.

Like the kernel, the producer is strict where the kernel is strict: a completion for a cmd_id
that is not in flight raises :class:`BrokenRing` (the kernel marks the device BROKEN and fails
everything afterwards), and so does a ``cmd_tail`` beyond ``cmd_head``.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field

OP_PAD, OP_CMD, OP_TMR = 0, 1, 2
UFLAG_UNKNOWN_OP, UFLAG_READ_LEN = 0x1, 0x2
CMDR_OFF = 128

_HDR = struct.Struct("<IHBB")
_REQ = struct.Struct("<IIIIQQQ")  # iov_cnt, bidi_cnt, dif_cnt, implicit pad, cdb_off, pads
_IOV = struct.Struct("<QQ")
_RSP = struct.Struct("<BBHI")
_U32 = struct.Struct("<I")


class BrokenRing(AssertionError):
    """What the kernel would do: set TCMU_DEV_BIT_BROKEN.  In a test it is always a bug."""


@dataclass
class Completion:
    """What the kernel took from one response entry."""

    status: int
    sense: bytes
    read_len: int | None
    """``rsp.read_len`` if userspace set UFLAG_READ_LEN, else None."""
    data_in: bytes
    """The Data-In bytes the kernel would copy to the initiator (truncated to read_len)."""
    uflags: int


@dataclass
class _Pending:
    entry_off: int
    blocks: list[int]
    data_in: list[tuple[int, int]] = field(default_factory=list)


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


class Producer:
    """Kernel side of one device.  ``buf`` is the map the ring under test wraps."""

    def __init__(
        self,
        cmdr_size: int = 4096 - CMDR_OFF,
        data_size: int = 64 * 1024,
        block_size: int = 4096,
        flags: int = 0xF,
        version: int = 2,
    ) -> None:
        assert cmdr_size % 8 == 0
        self.cmdr_size = cmdr_size
        self.data_off = CMDR_OFF + cmdr_size
        self.block_size = block_size
        self.nblocks = data_size // block_size
        self.map_size = self.data_off + data_size
        self.buf = mmap.mmap(-1, self.map_size)
        struct.pack_into("<HHIII", self.buf, 0, version, flags, CMDR_OFF, cmdr_size, 0)
        _U32.pack_into(self.buf, 64, 0)
        self.head = 0
        self.last_cleaned = 0
        self.block_used = [False] * self.nblocks
        self.inflight: dict[int, _Pending] = {}
        self._next_id = 1
        self.pads = 0
        """How many PAD entries were written (wrap tests assert they happened)."""
        self.expired: set[int] = set()
        """Commands the kernel timed out (``cmd_time_out``): the initiator was answered CHECK
        CONDITION; the entry and its data blocks stay until userspace completes it."""
        self.late: list[int] = []
        """cmd_ids of completions that arrived for expired commands (dropped, like the kernel)."""
        self.blocked = False

    # -- mailbox ------------------------------------------------------------------------------

    @property
    def cmd_tail(self) -> int:
        return int(_U32.unpack_from(self.buf, 64)[0])

    def _set_head(self, head: int) -> None:
        self.head = head
        _U32.pack_into(self.buf, 12, head)

    def _used(self, head: int, tail: int) -> int:
        return (head - tail) % self.cmdr_size

    def ring_free(self) -> int:
        """Free bytes, keeping one byte unused so that full and empty differ."""
        return self.cmdr_size - self._used(self.head, self.last_cleaned) - 1

    # -- queueing -----------------------------------------------------------------------------

    def _make_room(self, size: int) -> int | None:
        """Return the ring offset where an entry of *size* goes (padding if needed), or None."""
        if size > self.cmdr_size // 2:
            raise ValueError(f"entry of {size} bytes is larger than half the ring")
        pad = self.cmdr_size - self.head if self.head + size > self.cmdr_size else 0
        if self.ring_free() < size + pad:
            return None
        if pad:
            off = CMDR_OFF + self.head
            self.buf[off : off + pad] = bytes(pad)
            _HDR.pack_into(self.buf, off, pad | OP_PAD, 0, 0, 0)
            self.head = 0
            self.pads += 1
        return self.head

    def _alloc_blocks(self, nbytes: int) -> list[int] | None:
        need = -(-nbytes // self.block_size)
        free = [i for i, used in enumerate(self.block_used) if not used][:need]
        if len(free) < need:
            return None
        for i in free:
            self.block_used[i] = True
        return free

    def _iovecs(self, blocks: list[int], nbytes: int) -> list[tuple[int, int]]:
        """Map *nbytes* onto *blocks*, merging adjacent blocks into one iovec like the kernel."""
        iovs: list[tuple[int, int]] = []
        left = nbytes
        for b in blocks:
            take = min(self.block_size, left)
            base = self.data_off + b * self.block_size
            if iovs and iovs[-1][0] + iovs[-1][1] == base:
                iovs[-1] = (iovs[-1][0], iovs[-1][1] + take)
            else:
                iovs.append((base, take))
            left -= take
        return iovs

    def _alloc_id(self) -> int:
        for _ in range(0xFFFF):
            cmd_id = self._next_id
            self._next_id = cmd_id % 0xFFFF + 1
            if cmd_id not in self.inflight:
                return cmd_id
        raise RuntimeError("no free cmd_id")

    def queue_cmd(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> int | None:
        """Queue a command; returns its cmd_id, or None when the ring or data area is full
        (or the device is blocked: the kernel then fails the command with BUSY at once).

        Both *data_out* and *data_in_len* make a bidirectional command (Data-Out iovecs
        first, then ``iov_bidi_cnt`` Data-In iovecs), as the kernel does.
        """
        if self.blocked:
            return None
        out_blocks = self._alloc_blocks(len(data_out)) if data_out else []
        if out_blocks is None:
            return None
        in_blocks = self._alloc_blocks(data_in_len) if data_in_len else []
        if in_blocks is None:
            self._free_blocks(out_blocks)
            return None
        out_iovs = self._iovecs(out_blocks, len(data_out))
        in_iovs = self._iovecs(in_blocks, data_in_len)
        if data_out:
            iovs, bidi = out_iovs + in_iovs, len(in_iovs)
            iov_cnt = len(out_iovs)
        else:
            iovs, bidi = in_iovs, 0
            iov_cnt = len(in_iovs)
        base = max(48 + 16 * len(iovs), 112)
        size = base + _round_up(len(cdb), 8)
        pos = self._make_room(size)
        if pos is None:
            self._free_blocks(out_blocks + in_blocks)
            return None
        cmd_id = self._alloc_id()
        off = CMDR_OFF + pos
        self.buf[off : off + size] = bytes(size)
        _HDR.pack_into(self.buf, off, size | OP_CMD, cmd_id, 0, 0)
        _REQ.pack_into(self.buf, off + 8, iov_cnt, bidi, 0, 0, off + base, 0, 0)
        for i, (b, ln) in enumerate(iovs):
            _IOV.pack_into(self.buf, off + 48 + 16 * i, b, ln)
        self.buf[off + base : off + base + len(cdb)] = cdb
        done = 0
        for b, ln in out_iovs:
            self.buf[b : b + ln] = data_out[done : done + ln]
            done += ln
        self.inflight[cmd_id] = _Pending(off, out_blocks + in_blocks, in_iovs)
        self._set_head((pos + size) % self.cmdr_size)
        return cmd_id

    def queue(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> int:
        """:meth:`queue_cmd` for tests that know there is room."""
        cmd_id = self.queue_cmd(cdb, data_out, data_in_len)
        assert cmd_id is not None, "ring or data area unexpectedly full"
        return cmd_id

    def queue_tmr(self, tmr_type: int, cmd_ids: list[int] | tuple[int, ...]) -> bool:
        """Queue a TMR notification; False when the ring is full."""
        size = _round_up(32 + 2 * len(cmd_ids), 8)
        pos = self._make_room(size)
        if pos is None:
            return False
        off = CMDR_OFF + pos
        self.buf[off : off + size] = bytes(size)
        _HDR.pack_into(self.buf, off, size | OP_TMR, 0, 0, 0)
        struct.pack_into("<BBHI", self.buf, off + 8, tmr_type, 0, 0, len(cmd_ids))
        struct.pack_into(f"<{len(cmd_ids)}H", self.buf, off + 32, *cmd_ids)
        self._set_head((pos + size) % self.cmdr_size)
        return True

    def entry_offset(self, cmd_id: int) -> int:
        """Offset in ``buf`` of the entry queued for *cmd_id* (to corrupt it in tests)."""
        return self.inflight[cmd_id].entry_off

    # -- reaping ------------------------------------------------------------------------------

    def _free_blocks(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.block_used[b]
            self.block_used[b] = False

    def reap(self) -> dict[int, Completion]:
        """Consume responses from the last-cleaned pointer to ``cmd_tail`` (the kernel's job
        when userspace notifies); raise BrokenRing on anything the kernel would choke on."""
        tail = self.cmd_tail
        if tail >= self.cmdr_size or tail % 8:
            raise BrokenRing(f"cmd_tail {tail} is not a ring offset")
        if self._used(tail, self.last_cleaned) > self._used(self.head, self.last_cleaned):
            raise BrokenRing(f"cmd_tail {tail} is beyond cmd_head {self.head}")
        done: dict[int, Completion] = {}
        walk = self.last_cleaned
        while walk != tail:
            off = CMDR_OFF + walk
            len_op, cmd_id, _kflags, uflags = _HDR.unpack_from(self.buf, off)
            length, op = len_op & ~7, len_op & 7
            if length == 0 or length > self._used(tail, walk):
                raise BrokenRing(f"entry at {walk} of length {length} crosses cmd_tail {tail}")
            walk = (walk + length) % self.cmdr_size
            if op in (OP_PAD, OP_TMR):
                continue
            pending = self.inflight.pop(cmd_id, None)
            if pending is None:
                raise BrokenRing(f"completion for cmd_id {cmd_id}, which is not in flight")
            if cmd_id in self.expired:
                # like tcmu_handle_completion: an expired command's late answer only frees
                # its data blocks; the initiator already got its CHECK CONDITION
                self.expired.discard(cmd_id)
                self.late.append(cmd_id)
                self._free_blocks(pending.blocks)
                continue
            status, _p1, _p2, rsp_read_len = _RSP.unpack_from(self.buf, off + 8)
            sense = bytes(self.buf[off + 16 : off + 112])
            read_len = rsp_read_len if uflags & UFLAG_READ_LEN else None
            data = b"".join(bytes(self.buf[b : b + ln]) for b, ln in pending.data_in)
            if read_len is not None:
                data = data[:read_len]
            done[cmd_id] = Completion(status, sense, read_len, data, uflags)
            self._free_blocks(pending.blocks)
        self.last_cleaned = walk
        return done

    # -- recovery (the configfs action/ files and cmd_time_out) -------------------------------

    def expire(self, cmd_id: int) -> None:
        """``cmd_time_out`` passed for an in-flight command (tcmu_check_expired_ring_cmd)."""
        assert cmd_id in self.inflight
        self.expired.add(cmd_id)

    def block(self, blocked: bool) -> dict[int, Completion]:
        """``action/block_dev``: blocking first reaps what userspace already answered."""
        done = self.reap() if blocked and not self.blocked else {}
        self.blocked = blocked
        return done

    def reset_ring(self, mode: int) -> dict[int, int]:
        """``action/reset_ring``: fail every in-flight command (1: BUSY, 2: CHECK CONDITION;
        expired ones were answered already), free their blocks, head = tail = 0.  Returns
        the SCSI status each non-expired command got."""
        assert mode in (1, 2)
        failed = {}
        for cmd_id, pending in self.inflight.items():
            if cmd_id not in self.expired:
                failed[cmd_id] = 0x08 if mode == 1 else 0x02
            self._free_blocks(pending.blocks)
        self.inflight.clear()
        self.expired.clear()
        self._set_head(0)
        _U32.pack_into(self.buf, 64, 0)
        self.last_cleaned = 0
        return failed

    def close(self) -> None:
        self.buf.close()
