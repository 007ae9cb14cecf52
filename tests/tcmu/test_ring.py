"""Ring behaviour against the in-process kernel double (tests/tcmu/producer.py)."""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

import pytest

from targetmirror.errors import RingError
from targetmirror.tcmu import layout as L
from targetmirror.tcmu.ring import Command, Ring, Tmr

from .producer import Producer

WRITE10 = bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 1, 0])
READ10 = bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0])
TUR = bytes(6)
GOOD, CHECK, BUSY = 0x00, 0x02, 0x08
SENSE = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, 0x24, 0x00, 0, 0, 0, 0])


def only_commands(entries: Sequence[object]) -> list[Command]:
    assert all(isinstance(e, Command) for e in entries), entries
    return [e for e in entries if isinstance(e, Command)]


def fill(cmd: Command, byte: int) -> None:
    for v in cmd.iov:
        v[:] = bytes([byte]) * len(v)


# -- happy paths ---------------------------------------------------------------------------


def test_write_command_is_copied_out_and_completed(producer: Producer) -> None:
    data = bytes(range(256)) * 16
    cmd_id = producer.queue(WRITE10, data_out=data)
    ring = Ring(producer.buf)
    (cmd,) = only_commands(ring.fetch())
    assert cmd.cmd_id == cmd_id
    assert cmd.cdb == WRITE10
    assert b"".join(bytes(v) for v in cmd.iov) == data
    assert cmd.bidi_iov == []
    assert ring.in_flight == 1
    ring.complete(cmd.cmd_id, GOOD)
    assert ring.in_flight == 0
    done = producer.reap()
    assert list(done) == [cmd_id]
    assert done[cmd_id].status == GOOD
    assert done[cmd_id].read_len is None
    assert producer.cmd_tail == producer.head


def test_read_data_lands_in_the_data_area(producer: Producer) -> None:
    cmd_id = producer.queue(READ10, data_in_len=3 * 4096 + 100)
    assert cmd_id is not None
    ring = Ring(producer.buf)
    (cmd,) = only_commands(ring.fetch())
    assert sum(len(v) for v in cmd.iov) == 3 * 4096 + 100
    assert len(cmd.iov) == 1  # adjacent blocks merged, as the kernel does
    fill(cmd, 0xAB)
    ring.complete(cmd.cmd_id, GOOD)
    assert producer.reap()[cmd_id].data_in == b"\xab" * (3 * 4096 + 100)


def test_fragmented_data_area_gives_several_iovecs(producer: Producer) -> None:
    a = producer.queue(READ10, data_in_len=4096)
    b = producer.queue(READ10, data_in_len=4096)
    ring = Ring(producer.buf)
    first = only_commands(ring.fetch())
    ring.complete(first[0].cmd_id, GOOD)  # frees block 0 only
    producer.reap()
    c = producer.queue(READ10, data_in_len=3 * 4096)
    (cmd,) = only_commands(ring.fetch())
    assert cmd.cmd_id == c
    assert [len(v) for v in cmd.iov] == [4096, 8192]
    fill(cmd, 7)
    ring.complete(c, GOOD)
    ring.complete(first[1].cmd_id, GOOD)
    done = producer.reap()
    assert set(done) == {b, c}
    assert done[c].data_in == b"\x07" * 3 * 4096
    assert a not in done


def test_bidi_command_splits_iovecs(producer: Producer) -> None:
    cmd_id = producer.queue(bytes([0x53]) + bytes(9), data_out=b"x" * 512, data_in_len=512)
    ring = Ring(producer.buf)
    (cmd,) = only_commands(ring.fetch())
    assert [bytes(v) for v in cmd.iov] == [b"x" * 512]
    assert [len(v) for v in cmd.bidi_iov] == [512]
    cmd.bidi_iov[0][:] = b"y" * 512
    ring.complete(cmd.cmd_id, GOOD)
    assert producer.reap()[cmd_id].data_in == b"y" * 512


@pytest.mark.parametrize(
    ("cdb", "length"),
    [
        (bytes([0x00]) + bytes(15), 6),  # TEST UNIT READY, group 0
        (bytes([0x28]) + bytes(15), 10),  # READ(10), group 1
        (bytes([0x42]) + bytes(15), 10),  # UNMAP, group 2
        (bytes([0xA8]) + bytes(15), 12),  # READ(12), group 5
        (bytes([0x88]) + bytes(15), 16),  # READ(16), group 4
        (bytes([0x7F, 0, 0, 0, 0, 0, 0, 24]) + bytes(24), 32),  # variable length
    ],
)
def test_cdb_length_follows_the_opcode_group(producer: Producer, cdb: bytes, length: int) -> None:
    producer.queue(cdb)
    ring = Ring(producer.buf)
    (cmd,) = only_commands(ring.fetch())
    assert cmd.cdb == cdb[:length]


def test_read_len_is_reported_when_offered() -> None:
    p = Producer(flags=0xF)
    cmd_id = p.queue(bytes([0x12, 0, 0, 0, 255, 0]), data_in_len=255)
    ring = Ring(p.buf)
    (cmd,) = only_commands(ring.fetch())
    cmd.iov[0][:36] = b"i" * 36
    ring.complete(cmd.cmd_id, GOOD, read_len=36)
    done = p.reap()[cmd_id]
    assert done.read_len == 36
    assert done.uflags & L.UFLAG_READ_LEN
    assert done.data_in == b"i" * 36


def test_read_len_is_not_set_without_the_capability() -> None:
    p = Producer(flags=L.FLAG_CAP_OOOC)
    cmd_id = p.queue(bytes([0x12, 0, 0, 0, 255, 0]), data_in_len=255)
    ring = Ring(p.buf)
    (cmd,) = only_commands(ring.fetch())
    ring.complete(cmd.cmd_id, GOOD, read_len=36)
    done = p.reap()[cmd_id]
    assert done.read_len is None
    assert done.uflags == 0
    assert len(done.data_in) == 255


def test_check_condition_carries_sense_padded_to_96(producer: Producer) -> None:
    cmd_id = producer.queue(WRITE10, data_out=b"z" * 512)
    ring = Ring(producer.buf)
    ring.fetch()
    ring.complete(cmd_id, CHECK, sense=SENSE)
    done = producer.reap()[cmd_id]
    assert done.status == CHECK
    assert done.sense == SENSE + bytes(96 - len(SENSE))


def test_check_condition_without_sense_zeroes_the_request_bytes(producer: Producer) -> None:
    cmd_id = producer.queue(WRITE10, data_out=b"z" * 512)
    ring = Ring(producer.buf)
    ring.fetch()
    # the request (iov_cnt, cdb_off, iovec) occupies the bytes the sense buffer reuses
    assert any(
        producer.buf[producer.entry_offset(cmd_id) + 16 : producer.entry_offset(cmd_id) + 112]
    )
    ring.complete(cmd_id, CHECK)
    assert producer.reap()[cmd_id].sense == bytes(96)


def test_views_are_released_on_completion(producer: Producer) -> None:
    producer.queue(WRITE10, data_out=b"q" * 512)
    ring = Ring(producer.buf)
    (cmd,) = only_commands(ring.fetch())
    view = cmd.iov[0]
    ring.complete(cmd.cmd_id, GOOD)
    with pytest.raises(ValueError, match="released"):
        bytes(view)


def test_release_lets_the_mapping_close(producer: Producer) -> None:
    producer.queue(WRITE10, data_out=b"q" * 512)
    producer.queue(READ10, data_in_len=512)
    ring = Ring(producer.buf)
    assert len(ring.fetch()) == 2
    ring.release()
    ring.release()  # idempotent
    producer.buf.close()  # would raise BufferError if any view were still exported
    with pytest.raises(RingError, match="released"):
        ring.fetch()


def test_new_ring_starts_at_cmd_tail(producer: Producer) -> None:
    ring = Ring(producer.buf)
    for _ in range(3):
        producer.queue(TUR)
    for cmd in only_commands(ring.fetch()):
        ring.complete(cmd.cmd_id, GOOD)
    producer.reap()
    new = [producer.queue(TUR) for _ in range(2)]
    ring.release()
    ring2 = Ring(producer.buf)
    assert ring2.has_entries()
    assert [c.cmd_id for c in only_commands(ring2.fetch())] == new
    assert not ring2.has_entries()


def test_fetch_on_empty_ring_returns_nothing(producer: Producer) -> None:
    ring = Ring(producer.buf)
    assert ring.fetch() == []
    assert not ring.has_entries()


# -- ordering, wrap-around, capacity ---------------------------------------------------------


def test_out_of_order_completion_in_random_order(producer: Producer) -> None:
    ring = Ring(producer.buf)
    rng = random.Random(1234)
    expected: dict[int, int] = {}
    for i in range(20):
        cmd_id = producer.queue(TUR)
        assert cmd_id is not None
        expected[cmd_id] = [GOOD, CHECK, BUSY][i % 3]
    cmds = only_commands(ring.fetch())
    rng.shuffle(cmds)
    seen: dict[int, int] = {}
    for n, cmd in enumerate(cmds):
        ring.complete(cmd.cmd_id, expected[cmd.cmd_id])
        if n % 4 == 3:  # the kernel reaps whenever we notify, mid-way too
            seen.update({k: c.status for k, c in producer.reap().items()})
    seen.update({k: c.status for k, c in producer.reap().items()})
    assert seen == expected
    assert producer.cmd_tail == producer.head
    assert producer.inflight == {}


def test_wrap_around_with_pad_entries() -> None:
    p = Producer(cmdr_size=1000, data_size=16 * 512, block_size=512)
    ring = Ring(p.buf)
    completed = 0
    start_tail = p.cmd_tail
    for round_ in range(60):
        ids = []
        for _ in range(1 + round_ % 4):
            cmd_id = p.queue(WRITE10, data_out=bytes([round_]) * 700)
            assert cmd_id is not None
            ids.append(cmd_id)
        cmds = only_commands(ring.fetch())
        assert [c.cmd_id for c in cmds] == ids
        for c in reversed(cmds):
            assert bytes(c.iov[0])[:1] == bytes([round_])
            ring.complete(c.cmd_id, GOOD)
        completed += len(p.reap())
    assert p.pads > 5
    assert p.cmd_tail == p.head != start_tail
    assert completed == sum(1 + r % 4 for r in range(60))


def test_completion_skips_pad_at_the_tail() -> None:
    p = Producer(cmdr_size=512, data_size=4 * 512, block_size=512)
    ring = Ring(p.buf)
    for _ in range(3):  # 3 x 120 bytes: head at 360
        p.queue(TUR)
    for c in only_commands(ring.fetch()):
        ring.complete(c.cmd_id, GOOD)
    p.reap()
    a = p.queue(TUR)  # 360 + 120 = 480
    b = p.queue(TUR)  # needs a PAD of 32 bytes, then goes to 0
    assert p.pads == 1
    cmds = only_commands(ring.fetch())
    assert [c.cmd_id for c in cmds] == [a, b]
    ring.complete(b, BUSY)
    ring.complete(a, GOOD)
    done = p.reap()
    assert {k: c.status for k, c in done.items()} == {a: GOOD, b: BUSY}


def test_full_ring_then_room_again() -> None:
    p = Producer(cmdr_size=1024, data_size=64 * 512, block_size=512)
    ring = Ring(p.buf)
    ids = []
    while (cmd_id := p.queue_cmd(TUR)) is not None:
        ids.append(cmd_id)
    assert len(ids) == (1024 - 1) // 120  # one byte is kept free
    cmds = only_commands(ring.fetch())  # full ring is not mistaken for an empty one
    assert [c.cmd_id for c in cmds] == ids
    assert p.queue_cmd(TUR) is None
    ring.complete(cmds[-1].cmd_id, GOOD)
    assert list(p.reap()) == [ids[-1]]
    assert p.queue_cmd(TUR) is None  # 120 bytes free, but the next entry needs a PAD too
    ring.complete(cmds[-2].cmd_id, GOOD)
    assert list(p.reap()) == [ids[-2]]
    again = p.queue_cmd(TUR)
    assert again is not None
    assert p.pads == 1
    assert [c.cmd_id for c in only_commands(ring.fetch())] == [again]
    for c in cmds[:-2]:
        ring.complete(c.cmd_id, GOOD)
    ring.complete(again, GOOD)
    assert set(p.reap()) == set(ids[:-2]) | {again}


def test_many_commands_in_batches(producer: Producer) -> None:
    ring = Ring(producer.buf)
    total = 0
    for batch in range(300):
        queued: list[int] = []
        while len(queued) < 1 + batch % 7:
            cmd_id = producer.queue(READ10, data_in_len=512 * (1 + batch % 3))
            assert cmd_id is not None
            queued.append(cmd_id)
        for c in only_commands(ring.fetch()):
            fill(c, c.cmd_id & 0xFF)
            ring.complete(c.cmd_id, GOOD, read_len=len(c.iov[0]))
        done = producer.reap()
        assert set(done) == set(queued)
        for cmd_id, comp in done.items():
            assert comp.data_in == bytes([cmd_id & 0xFF]) * 512 * (1 + batch % 3)
        total += len(done)
    assert total == sum(1 + b % 7 for b in range(300))


# -- TMR ------------------------------------------------------------------------------------


def test_tmr_entries_are_reported_and_skipped_on_completion(producer: Producer) -> None:
    ring = Ring(producer.buf)
    assert producer.queue_tmr(L.TMR_LUN_RESET, [])
    a = producer.queue(TUR)
    b = producer.queue(TUR)
    assert a is not None and b is not None
    assert producer.queue_tmr(L.TMR_ABORT_TASK, [a])
    c = producer.queue(TUR)
    entries = ring.fetch()
    assert entries[0] == Tmr(L.TMR_LUN_RESET, ())
    assert entries[3] == Tmr(L.TMR_ABORT_TASK, (a,))
    assert [e.cmd_id for e in entries if isinstance(e, Command)] == [a, b, c]
    assert ring.in_flight == 3
    for cmd_id in (c, a, b):
        ring.complete(cmd_id, GOOD)
    assert set(producer.reap()) == {a, b, c}
    assert producer.cmd_tail == producer.head


def test_tmr_with_many_ids(producer: Producer) -> None:
    ring = Ring(producer.buf)
    ids = tuple(range(1, 40))
    assert producer.queue_tmr(L.TMR_ABORT_TASK_SET, ids)
    assert ring.fetch() == [Tmr(L.TMR_ABORT_TASK_SET, ids)]
    assert ring.in_flight == 0


def test_tmr_count_larger_than_entry_is_clipped(producer: Producer) -> None:
    ring = Ring(producer.buf)
    producer.queue_tmr(L.TMR_ABORT_TASK, [5, 6])
    struct.pack_into("<I", producer.buf, L.MAILBOX_SIZE + 12, 1_000_000)  # cmd_cnt
    (tmr,) = ring.fetch()
    # the 40-byte entry has room for 4 ids; nothing beyond the entry is read
    assert tmr == Tmr(L.TMR_ABORT_TASK, (5, 6, 0, 0))


def test_tmr_entries_alone_do_not_stall_the_ring() -> None:
    p = Producer(cmdr_size=512, data_size=4096, block_size=512)
    ring = Ring(p.buf)
    for round_ in range(10):
        queued = 0
        while p.queue_tmr(L.TMR_LUN_RESET, [round_ + 1]):
            queued += 1
        assert queued > 0
        assert ring.fetch() == [Tmr(L.TMR_LUN_RESET, (round_ + 1,))] * queued
        assert p.cmd_tail == p.head  # stepped over, so the kernel can reclaim the space
        assert p.reap() == {}
    cmd_id = p.queue(TUR)
    assert cmd_id is not None
    (cmd,) = only_commands(ring.fetch())
    ring.complete(cmd.cmd_id, GOOD)
    assert list(p.reap()) == [cmd_id]
