"""Property: whatever the interleaving of queue / fetch / complete / reap, the kernel side sees
every queued command completed exactly once, with the status (and data) the handler gave it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from targetmirror.tcmu.ring import Command, Ring, Tmr

from .producer import Completion, Producer

STATUSES = (0x00, 0x02, 0x08, 0x28)
CDBS = (bytes(6), bytes([0x28]) + bytes(9), bytes([0xA8]) + bytes(11), bytes([0x88]) + bytes(15))


@settings(max_examples=150, deadline=None)
@given(
    cmdr_size=st.sampled_from([512, 1000, 2048]),
    data=st.data(),
)
def test_every_command_completed_exactly_once(cmdr_size: int, data: st.DataObject) -> None:
    p = Producer(cmdr_size=cmdr_size, data_size=12 * 512, block_size=512)
    ring = Ring(p.buf)
    expected: dict[int, tuple[int, int, bytes]] = {}  # cmd_id -> (status, data_in_len, fill)
    fetched: list[Command] = []
    completions = 0
    queued = 0

    def check(reaped: dict[int, Completion]) -> None:
        nonlocal completions
        for cmd_id, comp in reaped.items():
            status, in_len, fill = expected.pop(cmd_id)  # KeyError = unknown or twice
            assert comp.status == status
            assert comp.data_in == fill * in_len
            completions += 1

    for _ in range(data.draw(st.integers(10, 120), label="steps")):
        op = data.draw(st.sampled_from(["queue", "queue", "tmr", "fetch", "complete", "reap"]))
        if op == "queue":
            cdb = data.draw(st.sampled_from(CDBS))
            in_len = data.draw(st.integers(0, 4 * 512))
            cmd_id = p.queue_cmd(cdb, data_in_len=in_len)
            if cmd_id is not None:
                assert cmd_id not in expected
                status = data.draw(st.sampled_from(STATUSES))
                expected[cmd_id] = (status, in_len, bytes([cmd_id & 0xFF]))
                queued += 1
        elif op == "tmr":
            ids = data.draw(st.lists(st.integers(1, 0xFFFF), max_size=5))
            p.queue_tmr(1, ids)
        elif op == "fetch":
            for e in ring.fetch():
                if isinstance(e, Command):
                    fetched.append(e)
                else:
                    assert isinstance(e, Tmr), e
        elif op == "complete" and fetched:
            cmd = fetched.pop(data.draw(st.integers(0, len(fetched) - 1)))
            status, in_len, fill = expected[cmd.cmd_id]
            assert sum(len(v) for v in cmd.iov) == in_len
            for v in cmd.iov:
                v[:] = fill * len(v)
            ring.complete(cmd.cmd_id, status, sense=b"\x70" if status == 0x02 else None)
        elif op == "reap":
            check(p.reap())
    # drain: fetch and complete everything still outstanding
    for e in ring.fetch():
        if isinstance(e, Command):
            fetched.append(e)
    for cmd in fetched:
        status, in_len, fill = expected[cmd.cmd_id]
        for v in cmd.iov:
            v[:] = fill * len(v)
        ring.complete(cmd.cmd_id, status)
    check(p.reap())
    assert expected == {}
    assert completions == queued
    assert p.cmd_tail == p.head
    assert ring.in_flight == 0
    assert not any(p.block_used)
    ring.release()
    p.buf.close()
