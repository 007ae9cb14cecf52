"""``Ring.fetch(until=)``: the split instant's ring position divides the commands exactly."""

from __future__ import annotations

import pytest

from targetmirror.errors import RingError
from targetmirror.tcmu.ring import Command, Ring

from .producer import Producer

TUR = bytes(6)


def ids(entries: list[object]) -> list[int]:
    return [e.cmd_id for e in entries if isinstance(e, Command)]


def test_until_splits_at_the_recorded_head(producer: Producer) -> None:
    ring = Ring(producer.buf)
    before = [producer.queue(TUR) for _ in range(3)]
    head = ring.head()
    after = [producer.queue(TUR) for _ in range(2)]
    assert ids(ring.fetch(until=head)) == before
    assert ids(ring.fetch()) == after


def test_until_at_the_read_pointer_fetches_nothing(producer: Producer) -> None:
    ring = Ring(producer.buf)
    head = ring.head()
    queued = producer.queue(TUR)
    assert ring.fetch(until=head) == []
    assert ids(ring.fetch()) == [queued]


def test_until_across_a_wrap(producer: Producer) -> None:
    """The recorded head may lie after a PAD at the ring's end."""
    ring = Ring(producer.buf)
    # advance the ring close to its end, completing as we go so there is room
    while producer.head < producer.cmdr_size - 200:
        cmd_id = producer.queue(TUR)
        (cmd,) = ring.fetch()
        ring.complete(cmd.cmd_id, 0)
        producer.reap()
        assert cmd.cmd_id == cmd_id
    before = [producer.queue(TUR) for _ in range(4)]  # wraps with a PAD on the way
    head = ring.head()
    after = [producer.queue(TUR) for _ in range(2)]
    assert producer.pads >= 1
    assert ids(ring.fetch(until=head)) == before
    assert ids(ring.fetch()) == after


def test_until_beyond_head_or_off_boundary_is_refused(producer: Producer) -> None:
    ring = Ring(producer.buf)
    producer.queue(TUR)
    head = ring.head()
    with pytest.raises(RingError, match="not between"):
        ring.fetch(until=(head + 64) % producer.cmdr_size)
    with pytest.raises(RingError):
        ring.fetch(until=head + 3)  # not 8-byte aligned
