"""DeviceRunner end to end on the in-process ring producer: real SCSI, real mirror, real files.

The kernel double (tests/tcmu/producer.py) queues CDBs with data; the runner's ring thread
fetches them, the workers execute them through ScsiDevice and Mirror onto two image files, and
completions come back through the ring.  Assertions are on the bytes in both image files and on
the statuses and data the "kernel" reaps.
"""

from __future__ import annotations

import os
import random
import struct
import threading

import pytest

from targetmirror.daemon.device import MirrorCommands
from targetmirror.daemon.runner import DeviceRunner
from targetmirror.mirror.mirror import Mirror
from targetmirror.scsi.identity import DeviceIdentity
from targetmirror.store.image import Image
from targetmirror.tcmu import layout as L
from targetmirror.tcmu.ring import Ring
from tests.tcmu.producer import Completion, Producer

SIZE = 4 << 20
BS = 512


class FakeUio:
    """The UIO fd seen from the runner: an eventfd the test kicks; notify reaps completions."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.efd = os.eventfd(0, os.EFD_NONBLOCK)
        self.lock = threading.Condition()
        self.completions: dict[int, Completion] = {}
        self.notifies = 0

    def fileno(self) -> int:
        return self.efd

    def wait(self, timeout: float | None = None) -> bool:
        try:
            os.eventfd_read(self.efd)
            return True
        except BlockingIOError:
            return False

    def ack(self) -> bool:
        return self.wait(0)

    def notify(self) -> None:
        with self.lock:
            self.notifies += 1
            self.completions.update(self.producer.reap())
            self.lock.notify_all()

    def queue(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> int:
        with self.lock:
            cmd_id = self.producer.queue(cdb, data_out, data_in_len)
        os.eventfd_write(self.efd, 1)
        return cmd_id

    def wait_for(self, ids: list[int], timeout: float = 30.0) -> dict[int, Completion]:
        with self.lock:
            ok = self.lock.wait_for(lambda: all(i in self.completions for i in ids), timeout)
            assert ok, f"missing completions: {[i for i in ids if i not in self.completions]}"
            return {i: self.completions.pop(i) for i in ids}


def write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, blocks, 0)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


@pytest.fixture(params=[0, 2], ids=["inline", "workers2"])
def rig(request, tmp_path):
    paths = []
    for name in ("a.img", "b.img"):
        p = tmp_path / name
        with open(p, "wb") as f:
            f.truncate(SIZE)
        paths.append(str(p))
    mirror = Mirror("t", Image(paths[0]), Image(paths[1]), size=SIZE)
    commands = MirrorCommands(
        mirror, lambda: DeviceIdentity(serial="test0001", max_transfer_blocks=2048))
    producer = Producer(cmdr_size=64 * 1024 - 128, data_size=1 << 20)
    uio = FakeUio(producer)
    ring = Ring(producer.buf)
    runner = DeviceRunner("t", uio, ring, commands.admit, before_dispatch=commands.commit,
                          workers=request.param)
    runner.start()
    yield uio, runner, paths
    runner.stop()
    runner.join(10)
    mirror.close()


def test_writes_reach_both_images_and_read_back(rig):
    uio, _runner, paths = rig
    rng = random.Random(7)
    expected = {}
    for _round in range(5):
        ids = []
        for _ in range(12):
            lba = rng.randrange(0, SIZE // BS - 16)
            n = rng.choice([1, 8, 16])
            data = rng.randbytes(n * BS)
            ids.append(uio.queue(write10(lba, n, fua=rng.random() < 0.2), data))
            for i in range(n):
                expected[lba + i] = data[i * BS:(i + 1) * BS]
            # keep writes to distinct blocks within a round so the order doesn't matter
        done = uio.wait_for(ids)
        assert all(c.status == 0 for c in done.values())
    for path in paths:
        with open(path, "rb") as f:
            image = f.read()
        for lba, block in expected.items():
            assert image[lba * BS:(lba + 1) * BS] == block, f"{path} lba {lba}"
    some = sorted(expected)[:10]
    ids = [uio.queue(read10(lba, 1), data_in_len=BS) for lba in some]
    done = uio.wait_for(ids)
    for lba, cmd_id in zip(some, ids, strict=True):
        assert done[cmd_id].status == 0
        assert done[cmd_id].data_in == expected[lba]


def test_errors_come_back_as_check_condition(rig):
    uio, _runner, _ = rig
    bad_lba = uio.queue(read10(SIZE // BS, 1), data_in_len=BS)
    unknown = uio.queue(bytes([0xC5]) + bytes(9))
    done = uio.wait_for([bad_lba, unknown])
    for cmd_id, (asc, ascq) in ((bad_lba, (0x21, 0x00)), (unknown, (0x20, 0x00))):
        c = done[cmd_id]
        assert c.status == L.SAM_STAT_CHECK_CONDITION
        assert c.sense[2] & 0x0F == 0x05  # ILLEGAL REQUEST
        assert (c.sense[12], c.sense[13]) == (asc, ascq)


def test_bad_entry_is_answered(rig):
    uio, runner, _ = rig
    with uio.lock:
        cmd_id = uio.producer.queue(read10(0, 1), data_in_len=BS)
        # point the iovec outside the data area, as a corrupt kernel entry would
        off = uio.producer.entry_offset(cmd_id)
        struct.pack_into("<QQ", uio.producer.buf, off + 48, uio.producer.map_size + 4096, BS)
    os.eventfd_write(uio.efd, 1)
    done = uio.wait_for([cmd_id])
    assert done[cmd_id].status == L.SAM_STAT_CHECK_CONDITION
    assert done[cmd_id].sense[12] == 0x24
    assert runner.alive


def test_completions_are_batched(rig):
    uio, _runner, _ = rig
    with uio.lock:
        ids = [uio.producer.queue(write10(i * 8, 8), bytes(8 * BS)) for i in range(20)]
    os.eventfd_write(uio.efd, 1)
    uio.wait_for(ids)
    # one batch of 20 commands must not cost 20 notifies
    assert uio.notifies < 20


def test_stop_answers_everything_fetched(rig):
    uio, runner, _ = rig
    ids = [uio.queue(write10(i * 8, 8), bytes(8 * BS)) for i in range(10)]
    runner.stop()
    runner.join(10)
    assert not runner.alive
    with uio.lock:
        uio.completions.update(uio.producer.reap())
        answered = [i for i in ids if i in uio.completions]
    # Whatever the ring thread fetched before the stop was answered; nothing was half done.
    assert all(uio.completions[i].status == 0 for i in answered)
    assert runner.error is None


def test_a_ring_thread_dying_between_admission_and_dispatch_leaks_nothing(tmp_path):
    """Issue 15, defect 6: the ring thread admits a batch, then fails before any of it runs
    (here the split boundary's callback raises; a failing notify does the same).  What the
    batch took at admission -- range tickets, in-flight counts, busy regions -- must be given
    back, and its commands answered (BUSY: they never ran, initiators retry), or every later
    overlapping write waits forever and a split never drains."""
    paths = []
    for name in ("a.img", "b.img"):
        p = tmp_path / name
        with open(p, "wb") as f:
            f.truncate(SIZE)
        paths.append(str(p))
    mirror = Mirror("t", Image(paths[0]), Image(paths[1]), size=SIZE)
    commands = MirrorCommands(
        mirror, lambda: DeviceIdentity(serial="test0001", max_transfer_blocks=2048))
    producer = Producer(cmdr_size=64 * 1024 - 128, data_size=1 << 20)
    uio = FakeUio(producer)
    runner = DeviceRunner("t", uio, Ring(producer.buf), commands.admit,
                          before_dispatch=commands.commit, workers=2)

    def boom() -> None:
        raise RuntimeError("injected: the ring thread dies after admitting its batch")

    with uio.lock:
        ids = [producer.queue(write10(0, 8), bytes(8 * BS)),
               producer.queue(write10(4, 8), bytes(8 * BS))]
    with runner.lock:
        runner.set_boundary(producer.head, 1, boom)
    os.eventfd_write(uio.efd, 1)
    runner.start()
    runner.join(10)
    try:
        assert not runner.alive and isinstance(runner.error, RuntimeError)
        with uio.lock:
            uio.completions.update(producer.reap())
        assert {i: uio.completions[i].status for i in ids} == dict.fromkeys(ids, 0x08)
        assert mirror.locks.held() == 0
        assert not mirror.flight.inflight and not mirror.flight.busy
        done = threading.Event()
        threading.Thread(target=lambda: (mirror.write(0, [memoryview(bytes(BS))], False),
                                         done.set()), daemon=True).start()
        assert done.wait(10), "an overlapping write waits on a leaked range ticket"
    finally:
        mirror.close()
