"""Daemon restart on the in-process kernel double: ring reset instead of replay, the fallback for
kernels without ``action/reset_ring``, and late completions of commands the kernel timed out.

The "previous daemon" is a plain :class:`Ring` that fetched commands and answered some of them
without notifying, then vanished (what kill -9 leaves behind).  The new daemon is the real
``reset_stale_ring`` plus a real runner, mirror and files (tests/daemon/splitrig.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from targetmirror.daemon.device import reset_stale_ring
from targetmirror.errors import DeviceError
from targetmirror.tcmu.ring import Command, Ring
from tests.daemon.splitrig import BS, RigDevice, block, initial_image, make_device, write10
from tests.tcmu.producer import BrokenRing, Completion, Producer

NBLOCKS = 256
SAM_STAT_BUSY = 0x08


class FakeActions:
    """``action/block_dev`` and ``action/reset_ring`` of the kernel double (or their absence)."""

    def __init__(self, producer: Producer, *, supported: bool = True) -> None:
        self.producer = producer
        self.supported = supported
        self.calls: list[str] = []
        self.reaped: dict[int, Completion] = {}
        self.failed: dict[int, int] = {}

    def block(self, blocked: bool = True) -> None:
        self.calls.append(f"block={int(blocked)}")
        if not self.supported:
            raise DeviceError("cannot write '1' to .../action/block_dev: No such file")
        self.reaped.update(self.producer.block(blocked))

    def reset_ring(self, mode: int = 1) -> None:
        self.calls.append(f"reset={mode}")
        self.failed.update(self.producer.reset_ring(mode))


def _answers(dev: RigDevice, ids: list[int]) -> dict[int, Completion]:
    assert dev.uio.wait_reaped(ids), f"unanswered: {[i for i in ids if i not in dev.uio.reaped]}"
    return {i: dev.uio.reaped[i][1] for i in ids}


def _payload(seq: int, lba: int, n: int) -> bytes:
    return b"".join(block(1, seq, i, lba + i) for i in range(n))


def _dead_daemon(producer: Producer) -> tuple[list[int], int]:
    """Queue four writes; a previous daemon fetched them, answered the third (out of order, so
    its response overwrote the first request's slot) and died before notifying."""
    ids = [producer.queue(write10(lba, 2), _payload(9, lba, 2)) for lba in (0, 8, 16, 24)]
    old = Ring(producer.buf)
    fetched = old.fetch()
    assert [e.cmd_id for e in fetched if isinstance(e, Command)] == ids
    old.complete(ids[2], 0)
    old.release()
    return ids, ids[2]


@pytest.fixture
def dev(tmp_path: Path) -> RigDevice:
    d = make_device(str(tmp_path), "r", NBLOCKS, workers=2, store=None, start=False)
    yield d
    if not d.runner.alive:
        d.runner.ring.release()  # a runner that never started never released its views
    d.close()


def test_replaying_the_ring_after_a_crash_would_answer_a_command_twice() -> None:
    """Why the daemon never replays: the slots between cmd_tail and cmd_head after a crash
    include a command that was already answered, and lack one that was not."""
    producer = Producer()
    ids, answered = _dead_daemon(producer)
    replay = Ring(producer.buf)
    seen = [e.cmd_id for e in replay.fetch() if isinstance(e, Command)]
    assert answered in seen and ids[0] not in seen
    for cmd_id in seen:
        replay.complete(cmd_id, 0)
    with pytest.raises(BrokenRing):
        producer.reap()
    replay.release()
    producer.close()


def test_restart_resets_the_ring_and_serves_new_commands(dev: RigDevice) -> None:
    ids, answered = _dead_daemon(dev.producer)
    ctl = FakeActions(dev.producer)
    assert reset_stale_ring("r", ctl, dev.runner.ring) == "reset"
    assert ctl.calls == ["block=1", "reset=1", "block=0"]
    # the answer the dead daemon wrote reached the initiator; every other command got BUSY
    assert set(ctl.reaped) == {answered} and ctl.reaped[answered].status == 0
    assert ctl.failed == {i: SAM_STAT_BUSY for i in ids if i != answered}
    dev.runner.start()
    new = dev.uio.queue(write10(40, 2), _payload(1, 40, 2))
    assert _answers(dev, [new])[new].status == 0
    # nothing stale was executed by the new daemon; the new write is on both legs
    init = initial_image(NBLOCKS)
    for leg in ("a", "b"):
        img = dev.image_bytes(leg)
        assert img[:32 * BS] == init[:32 * BS]
        assert img[40 * BS:42 * BS] == _payload(1, 40, 2)


def test_without_reset_ring_stale_commands_are_skipped_not_replayed(
        dev: RigDevice, caplog: pytest.LogCaptureFixture) -> None:
    ids, answered = _dead_daemon(dev.producer)
    ctl = FakeActions(dev.producer, supported=False)
    with caplog.at_level(logging.WARNING, "targetmirror.device"):
        assert reset_stale_ring("r", ctl, dev.runner.ring) == "skipped"
    assert "cmd_time_out" in caplog.text and "not replayed" in caplog.text
    dev.runner.start()
    # new commands complete; their responses steal the stale slots without breaking the ring
    new = [dev.uio.queue(write10(40 + 4 * i, 2), _payload(2, 40 + 4 * i, 2)) for i in range(6)]
    done = _answers(dev, new)
    assert all(c.status == 0 for c in done.values())
    # the stale commands stay open in the kernel until it times them out; none was executed
    assert set(dev.producer.inflight) >= {i for i in ids if i != answered}
    assert dev.image_bytes("a")[:32 * BS] == initial_image(NBLOCKS)[:32 * BS]


def test_idle_ring_needs_no_reset(dev: RigDevice, caplog: pytest.LogCaptureFixture) -> None:
    first = dev.producer.queue(write10(0, 1), _payload(3, 0, 1))
    old = Ring(dev.producer.buf)
    old.fetch()
    old.complete(first, 0)
    old.release()
    dev.producer.reap()
    ctl = FakeActions(dev.producer, supported=False)
    with caplog.at_level(logging.INFO, "targetmirror.device"):
        assert reset_stale_ring("r", ctl, dev.runner.ring) == "idle"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_late_completion_of_a_timed_out_write_is_dropped_and_ordered(dev: RigDevice) -> None:
    """cmd_time_out passes while a write is stuck in leg B; the kernel answers the initiator
    CHECK CONDITION and keeps the command's data blocks until our late answer, which it drops.
    The initiator's retry (here: a newer write to the same blocks) is queued after it on the
    ring, so the range lock applies the late write first: the newer data wins on both legs."""
    entered, release = dev.b.gate(8 * BS)
    dev.runner.start()
    old = dev.uio.queue(write10(8, 4), _payload(4, 8, 4))
    assert entered.wait(10)
    with dev.uio.lock:
        dev.producer.expire(old)
    newer = dev.uio.queue(write10(8, 4), _payload(5, 8, 4))
    release.set()
    assert _answers(dev, [newer])[newer].status == 0
    with dev.uio.lock:
        assert dev.uio.lock.wait_for(lambda: old in dev.producer.late, 10)
        assert old not in dev.uio.reaped
    for leg in ("a", "b"):
        assert dev.image_bytes(leg)[8 * BS:12 * BS] == _payload(5, 8, 4), leg

