"""What the ring does with a bad mailbox, corrupt entries and misuse by the caller."""

from __future__ import annotations

import struct

import pytest

from targetmirror.errors import RingError
from targetmirror.tcmu import layout as L
from targetmirror.tcmu.ring import BadEntry, Command, Ring

from .producer import Producer

WRITE10 = bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 1, 0])
TUR = bytes(6)
GOOD, CHECK = 0x00, 0x02


def req(p: Producer, cmd_id: int) -> int:
    """Offset of the req part of *cmd_id*'s entry."""
    return p.entry_offset(cmd_id) + 8


# -- mailbox --------------------------------------------------------------------------------


def test_version_mismatch() -> None:
    p = Producer(version=1)
    with pytest.raises(RingError, match="version 1"):
        Ring(p.buf)
    p.buf.close()  # the failed constructor exported nothing


def test_out_of_order_completion_is_required() -> None:
    with pytest.raises(RingError, match="out-of-order"):
        Ring(Producer(flags=L.FLAG_CAP_READ_LEN).buf)


def test_ring_larger_than_the_map() -> None:
    p = Producer()
    struct.pack_into("<I", p.buf, 8, p.map_size)  # cmdr_size
    with pytest.raises(RingError, match="overruns"):
        Ring(p.buf)


def test_map_smaller_than_mailbox() -> None:
    with pytest.raises(RingError, match="smaller than the mailbox"):
        Ring(bytearray(64))


def test_read_only_buffer() -> None:
    with pytest.raises(RingError, match="writable"):
        Ring(memoryview(bytes(8192)))


@pytest.mark.parametrize(("offset", "field"), [(12, "cmd_head"), (64, "cmd_tail")])
def test_unaligned_head_or_tail(offset: int, field: str) -> None:
    p = Producer()
    struct.pack_into("<I", p.buf, offset, 12)
    with pytest.raises(RingError, match=field):
        Ring(p.buf)


def test_bytearray_map_works() -> None:
    p = Producer()
    cmd_id = p.queue(TUR)
    copy = bytearray(p.buf)
    ring = Ring(copy)
    assert [e.cmd_id for e in ring.fetch() if isinstance(e, Command)] == [cmd_id]


# -- entries the ring refuses but can step over ----------------------------------------------


def _bad_then_good(p: Producer, corrupt: object) -> tuple[BadEntry, Command, int, int]:
    bad_id = p.queue(WRITE10, data_out=b"d" * 512)
    good_id = p.queue(TUR)
    assert bad_id is not None and good_id is not None
    assert callable(corrupt)
    corrupt(bad_id)
    ring = Ring(p.buf)
    bad, good = ring.fetch()
    assert isinstance(bad, BadEntry), bad
    assert isinstance(good, Command)
    assert bad.cmd_id == bad_id
    assert good.cmd_id == good_id
    # the caller completes the bad entry with CHECK CONDITION; the kernel is happy
    ring.complete(bad.cmd_id, CHECK, sense=bytes([0x70, 0, 5]))
    ring.complete(good.cmd_id, GOOD)
    done = p.reap()
    assert done[bad_id].status == CHECK
    assert done[good_id].status == GOOD
    return bad, good, bad_id, good_id


def test_iovec_before_the_data_area(producer: Producer) -> None:
    def corrupt(cmd_id: int) -> None:  # point the iovec at the mailbox
        struct.pack_into("<QQ", producer.buf, producer.entry_offset(cmd_id) + 48, 0, 512)

    bad, *_ = _bad_then_good(producer, corrupt)
    assert "outside the data area" in bad.reason


def test_iovec_past_the_end_of_the_map(producer: Producer) -> None:
    def corrupt(cmd_id: int) -> None:
        base = producer.map_size - 100
        struct.pack_into("<QQ", producer.buf, producer.entry_offset(cmd_id) + 48, base, 512)

    bad, *_ = _bad_then_good(producer, corrupt)
    assert "outside the data area" in bad.reason


def test_iovec_length_wrapping_64_bits(producer: Producer) -> None:
    def corrupt(cmd_id: int) -> None:
        off = producer.entry_offset(cmd_id) + 48
        struct.pack_into("<QQ", producer.buf, off, producer.data_off, 2**64 - 1)

    bad, *_ = _bad_then_good(producer, corrupt)
    assert "outside the data area" in bad.reason


def test_huge_iov_cnt(producer: Producer) -> None:
    def corrupt(cmd_id: int) -> None:
        struct.pack_into("<I", producer.buf, req(producer, cmd_id), 0xFFFFFFFF)

    bad, *_ = _bad_then_good(producer, corrupt)
    assert "overrun" in bad.reason


def test_huge_bidi_cnt(producer: Producer) -> None:
    def corrupt(cmd_id: int) -> None:
        struct.pack_into("<I", producer.buf, req(producer, cmd_id) + 4, 1000)

    bad, *_ = _bad_then_good(producer, corrupt)
    assert "overrun" in bad.reason


def test_dif_iovecs_are_refused(producer: Producer) -> None:
    def corrupt(cmd_id: int) -> None:
        struct.pack_into("<I", producer.buf, req(producer, cmd_id) + 8, 1)

    bad, *_ = _bad_then_good(producer, corrupt)
    assert "DIF" in bad.reason


@pytest.mark.parametrize("where", [0, 2**63, -1])
def test_cdb_off_outside_the_entry(producer: Producer, where: int) -> None:
    def corrupt(cmd_id: int) -> None:
        off = producer.entry_offset(cmd_id)
        value = off + 100000 if where == -1 else where
        struct.pack_into("<Q", producer.buf, req(producer, cmd_id) + 16, value)
        assert off  # keep the closure honest

    bad, *_ = _bad_then_good(producer, corrupt)
    assert "cdb_off" in bad.reason


def test_cdb_running_past_the_entry_end(producer: Producer) -> None:
    def corrupt(cmd_id: int) -> None:
        off = producer.entry_offset(cmd_id)
        # a READ(16) opcode in the last 8 bytes of the entry: 16 bytes would overrun
        struct.pack_into("<Q", producer.buf, req(producer, cmd_id) + 16, off + 112 + 8)
        producer.buf[off + 112 + 8] = 0x88

    bad, *_ = _bad_then_good(producer, corrupt)
    assert "overruns the entry" in bad.reason


def test_variable_length_cdb_overrunning(producer: Producer) -> None:
    def corrupt(cmd_id: int) -> None:
        off = producer.entry_offset(cmd_id) + 112  # where the CDB is
        producer.buf[off] = 0x7F
        producer.buf[off + 7] = 200

    bad, *_ = _bad_then_good(producer, corrupt)
    assert "0x7f" in bad.reason


def test_unknown_opcode_then_unknown_op_completion(producer: Producer) -> None:
    a = producer.queue(TUR)
    b = producer.queue(TUR)
    assert a is not None and b is not None
    off = producer.entry_offset(a)
    (len_op,) = struct.unpack_from("<I", producer.buf, off)
    struct.pack_into("<I", producer.buf, off, (len_op & ~7) | 5)
    ring = Ring(producer.buf)
    bad, good = ring.fetch()
    assert bad == BadEntry(a, "unknown entry opcode 5")
    assert isinstance(good, Command)
    ring.complete(b, GOOD)  # steals the unknown-op slot: the kernel sees every slot as a command
    ring.complete_unknown_op(a)
    done = producer.reap()
    assert done[b].status == GOOD
    assert done[a].uflags & L.UFLAG_UNKNOWN_OP
    assert done[a].status == CHECK


def test_bad_entry_creates_no_views(producer: Producer) -> None:
    cmd_id = producer.queue(WRITE10, data_out=b"d" * 1024)
    assert cmd_id is not None
    off = producer.entry_offset(cmd_id)
    # two iovecs: the first fine, the second outside; no view may be created at all
    struct.pack_into("<I", producer.buf, off + 8, 2)
    struct.pack_into("<QQ", producer.buf, off + 64, producer.map_size, 1)
    ring = Ring(producer.buf)
    (bad,) = ring.fetch()
    assert isinstance(bad, BadEntry)
    assert "iovec 1" in bad.reason
    ring.release()
    producer.buf.close()  # nothing exported


def test_duplicate_cmd_id_in_flight(producer: Producer) -> None:
    a = producer.queue(TUR)
    b = producer.queue(TUR)
    assert a is not None and b is not None
    struct.pack_into("<H", producer.buf, producer.entry_offset(b) + 4, a)
    ring = Ring(producer.buf)
    first, second = ring.fetch()
    assert isinstance(first, Command) and first.cmd_id == a
    assert second == BadEntry(a, f"cmd_id {a} is already in flight")
    assert ring.in_flight == 2


# -- entries the ring cannot walk -------------------------------------------------------------


def test_zero_length_entry(producer: Producer) -> None:
    cmd_id = producer.queue(TUR)
    assert cmd_id is not None
    struct.pack_into("<I", producer.buf, producer.entry_offset(cmd_id), 0 | 1)
    with pytest.raises(RingError, match="length 0"):
        Ring(producer.buf).fetch()


def test_length_beyond_cmd_head(producer: Producer) -> None:
    cmd_id = producer.queue(TUR)
    assert cmd_id is not None
    struct.pack_into("<I", producer.buf, producer.entry_offset(cmd_id), 4096 | 1)
    with pytest.raises(RingError, match="bytes available"):
        Ring(producer.buf).fetch()


def test_length_beyond_ring_end_after_wrap() -> None:
    p = Producer(cmdr_size=512, data_size=4096, block_size=512)
    ring = Ring(p.buf)
    for _ in range(3):
        p.queue(TUR)
    for e in ring.fetch():
        assert isinstance(e, Command)
        ring.complete(e.cmd_id, GOOD)
    p.reap()
    a = p.queue(TUR)  # at 360
    p.queue(TUR)  # PAD at 480, then at 0: head (120) < read pointer (360)
    assert a is not None
    struct.pack_into("<I", p.buf, p.entry_offset(a), 400 | 1)  # would cross the ring end
    with pytest.raises(RingError, match="length 400"):
        ring.fetch()


def test_cmd_head_out_of_range_at_fetch(producer: Producer) -> None:
    ring = Ring(producer.buf)
    struct.pack_into("<I", producer.buf, 12, producer.cmdr_size + 8)
    with pytest.raises(RingError, match="cmd_head"):
        ring.fetch()


# -- misuse by the caller ---------------------------------------------------------------------


def test_completing_an_unknown_cmd_id_is_refused(producer: Producer) -> None:
    cmd_id = producer.queue(TUR)
    ring = Ring(producer.buf)
    with pytest.raises(RingError, match="not in flight"):
        ring.complete(1, GOOD)  # queued but not fetched yet
    ring.fetch()
    for wrong in (cmd_id + 1 if cmd_id else 2, -1, 70000):
        with pytest.raises(RingError, match="not in flight"):
            ring.complete(wrong, GOOD)
    assert producer.cmd_tail == 0  # nothing was written


def test_double_completion_is_refused(producer: Producer) -> None:
    a = producer.queue(TUR)
    producer.queue(TUR)
    assert a is not None
    ring = Ring(producer.buf)
    ring.fetch()
    ring.complete(a, GOOD)
    with pytest.raises(RingError, match="not in flight"):
        ring.complete(a, GOOD)
    assert list(producer.reap()) == [a]


def test_oversized_sense_and_status_are_refused(producer: Producer) -> None:
    cmd_id = producer.queue(TUR)
    assert cmd_id is not None
    ring = Ring(producer.buf)
    ring.fetch()
    with pytest.raises(RingError, match="sense"):
        ring.complete(cmd_id, CHECK, sense=bytes(97))
    with pytest.raises(RingError, match="status"):
        ring.complete(cmd_id, 256)
    with pytest.raises(RingError, match="read_len"):
        ring.complete(cmd_id, GOOD, read_len=-1)
    assert producer.cmd_tail == 0
    ring.complete(cmd_id, GOOD)
    assert list(producer.reap()) == [cmd_id]


def test_reset_forgets_in_flight_commands(producer: Producer) -> None:
    producer.queue(WRITE10, data_out=b"w" * 512)
    ring = Ring(producer.buf)
    (cmd,) = ring.fetch()
    assert isinstance(cmd, Command)
    view = cmd.iov[0]
    # what the kernel's reset_ring does: head = tail = 0, in-flight commands failed
    struct.pack_into("<I", producer.buf, 12, 0)
    struct.pack_into("<I", producer.buf, 64, 0)
    ring.reset()
    assert ring.in_flight == 0
    assert ring.fetch() == []
    with pytest.raises(ValueError, match="released"):
        len(view.tobytes())
    with pytest.raises(RingError, match="not in flight"):
        ring.complete(cmd.cmd_id, GOOD)


def test_short_command_slot_is_answered_without_writing_past_it(producer: Producer) -> None:
    a = producer.queue(TUR)  # a 120-byte entry at ring offset 0
    off = producer.entry_offset(a)
    # carve it into a 16-byte command entry followed by a 104-byte PAD
    struct.pack_into("<I", producer.buf, off, 16 | 1)
    struct.pack_into("<IHBB", producer.buf, off + 16, 104 | 0, 0, 0, 0)
    after = bytes(producer.buf[off + 16 : off + 120])
    ring = Ring(producer.buf)
    (bad,) = ring.fetch()
    assert bad == BadEntry(a, "command entry of 16 bytes is too short")
    ring.complete(a, CHECK, sense=bytes(range(18)))
    assert bytes(producer.buf[off + 16 : off + 120]) == after  # the PAD is untouched
    assert struct.unpack_from("<HBBB", producer.buf, off + 4) == (a, 0, 0, CHECK)
    assert producer.cmd_tail == 120 == producer.head
