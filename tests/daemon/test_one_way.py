"""One-way cut-over (claim 4) in-process: one Mirror served by two rings, volume 1 and volume 2.

Real runners, SCSI, mirror and files (tests/daemon/splitrig.py); the split is the daemon's own
``split()`` with the volume-2 ring as a peer.  Assertions are on the bytes of A and B.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from targetmirror.daemon.device import MirrorCommands, ServedDevice
from targetmirror.daemon.runner import DeviceRunner
from targetmirror.daemon.split import split
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import State, StateStore
from targetmirror.scsi.identity import DeviceIdentity
from targetmirror.store.image import Image
from targetmirror.tcmu.ring import Ring
from targetmirror.tcmu.uio import UioInfo
from tests.daemon.splitrig import BS, RecordingUio, RigDevice, block, make_device, read10, write10
from tests.tcmu.producer import Completion, Producer

NBLOCKS = 4096  # 2 MiB: 32 regions of 64 KiB
REGION_BLOCKS = 128


@dataclass
class Volume2:
    served: ServedDevice
    uio: RecordingUio
    producer: Producer


@dataclass
class Rig:
    v1: RigDevice
    v2: Volume2

    def write(self, vol: int, lba: int, n: int, seq: int) -> int:
        uio = self.v1.uio if vol == 1 else self.v2.uio
        data = b"".join(block(vol, seq, i, lba + i) for i in range(n))
        return uio.submit("write", write10(lba, n), lba, n, data).cmd_id

    def answers(self, vol: int, ids: list[int]) -> dict[int, Completion]:
        uio = self.v1.uio if vol == 1 else self.v2.uio
        assert uio.wait_reaped(ids), f"unanswered on volume {vol}"
        return {i: uio.reaped[i][1] for i in ids}

    def split(self, one_way: bool = True) -> None:
        split([self.v1.served], {self.v1.name: [self.v2.served]}, one_way=one_way)


def expect(vol: int, seq: int, lba: int, n: int) -> bytes:
    return b"".join(block(vol, seq, i, lba + i) for i in range(n))


def add_volume2(mirror: Mirror, name: str) -> Volume2:
    producer = Producer(cmdr_size=256 * 1024, data_size=2 << 20)
    uio = RecordingUio(producer)
    commands = MirrorCommands(mirror, lambda: DeviceIdentity(serial="v2", max_transfer_blocks=2048),
                              volume=2)
    runner = DeviceRunner(name, uio, Ring(producer.buf), commands.admit,
                          before_dispatch=commands.commit, workers=2,
                          tag=mirror.epoch)
    runner.start()
    info = UioInfo(name=f"tcm-user/1/{name}/mirror/mirror={mirror.name};volume=2", minor=1,
                   hba=1, dev_name=name, subtype="mirror",
                   cfgstring=f"mirror={mirror.name};volume=2", map_size=producer.map_size,
                   dev_path="/dev/null")
    served = ServedDevice(info, uio, runner, mirror, volume=2)  # type: ignore[arg-type]
    return Volume2(served, uio, producer)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    store = StateStore(str(tmp_path / "state"))
    v1 = make_device(str(tmp_path), "ow", NBLOCKS, workers=2, store=store)
    v2 = add_volume2(v1.mirror, "ow2")
    yield Rig(v1, v2)
    v2.served.close()  # never closes the shared mirror
    assert not v1.mirror._closed
    v2.producer.close()
    os.close(v2.uio.efd)
    v1.close()


def test_after_a_one_way_split_volume_1_writes_both_legs_and_volume_2_only_b(rig: Rig) -> None:
    # mirrored: both volumes write both legs
    pre = rig.write(2, 0, 8, 1)
    assert rig.answers(2, [pre])[pre].status == 0
    rig.split()
    m = rig.v1.mirror
    assert m.split_complete.wait(10) and m.state == State.ONE_WAY
    assert not m.a.frozen
    w1 = rig.write(1, 10 * REGION_BLOCKS, 8, 2)
    w2 = rig.write(2, 20 * REGION_BLOCKS, 8, 3)
    assert rig.answers(1, [w1])[w1].status == 0
    assert rig.answers(2, [w2])[w2].status == 0
    a, b = rig.v1.image_bytes("a"), rig.v1.image_bytes("b")
    at = {lba: slice(lba * BS, (lba + 8) * BS) for lba in (0, 10 * REGION_BLOCKS,
                                                           20 * REGION_BLOCKS)}
    assert a[at[0]] == b[at[0]] == expect(2, 1, 0, 8)
    assert a[at[10 * REGION_BLOCKS]] == b[at[10 * REGION_BLOCKS]] == expect(1, 2, 1280, 8)
    assert b[at[20 * REGION_BLOCKS]] == expect(2, 3, 2560, 8)
    assert a[at[20 * REGION_BLOCKS]] != b[at[20 * REGION_BLOCKS]]
    # volume 2's change is tracked (volume 1's writes also left write-intent bits, which the
    # lazy clear pass only clears while mirrored: a rejoin copies them too, which is safe);
    # reads through volume 1 come from B
    assert m.bitmap is not None and m.bitmap.test(20)
    r = rig.v1.uio.submit("read", read10(20 * REGION_BLOCKS, 8), 2560, 8,
                          data_in_len=8 * BS).cmd_id
    assert rig.answers(1, [r])[r].data_in == expect(2, 3, 2560, 8)
    ver = m.verify()
    assert ver["mismatches"] == 0 and ver["regions_skipped_changed"] == m.bitmap.count >= 1
    # the end of a cut-over that is called off: rejoin, and both volumes mirror again
    m.rejoin()
    assert m.rejoin_complete.wait(10) and m.state == State.MIRRORED
    assert rig.v1.image_bytes("a") == rig.v1.image_bytes("b")
    after = rig.write(2, 30 * REGION_BLOCKS, 8, 4)
    assert rig.answers(2, [after])[after].status == 0
    assert rig.v1.image_bytes("a") == rig.v1.image_bytes("b")


def test_a_volume_2_write_queued_before_the_instant_reaches_both_legs(rig: Rig) -> None:
    """The instant covers both rings: volume 2's pre-split write goes to A too, and the split
    completes only after it has."""
    entered, release = rig.v1.a.gate(5 * REGION_BLOCKS * BS)
    pre = rig.write(2, 5 * REGION_BLOCKS, 8, 5)
    assert entered.wait(10)
    rig.split()
    post = rig.write(2, 6 * REGION_BLOCKS, 8, 6)
    assert rig.answers(2, [post])[post].status == 0
    m = rig.v1.mirror
    assert not m.split_complete.is_set() and m.state == State.SPLITTING
    release.set()
    assert rig.answers(2, [pre])[pre].status == 0
    assert m.split_complete.wait(10) and m.state == State.ONE_WAY
    a, b = rig.v1.image_bytes("a"), rig.v1.image_bytes("b")
    s5 = slice(5 * REGION_BLOCKS * BS, (5 * REGION_BLOCKS + 8) * BS)
    s6 = slice(6 * REGION_BLOCKS * BS, (6 * REGION_BLOCKS + 8) * BS)
    assert a[s5] == b[s5] == expect(2, 5, 640, 8)
    assert b[s6] == expect(2, 6, 768, 8) and a[s6] != b[s6]


def test_one_way_state_survives_a_restart_without_freezing_a(rig: Rig, tmp_path: Path) -> None:
    rig.split()
    m = rig.v1.mirror
    assert m.split_complete.wait(10)
    store = StateStore(str(tmp_path / "state"))
    saved = store.load("ow")
    assert saved is not None and saved.state == State.ONE_WAY and saved.split is not None
    assert saved.split.one_way
    a = Image(str(tmp_path / "ow.a.img"))
    b = Image(str(tmp_path / "ow.b.img"))
    again = Mirror("ow", a, b, size=NBLOCKS * BS, block_size=BS, store=store)
    try:
        assert again.state == State.ONE_WAY and not again.a.frozen
        # the admission rule after the restart: volume 1 both legs, volume 2 B only
        v1 = again.admit(again.epoch, (0, BS), volume=1)
        v2 = again.admit(again.epoch, (BS, 2 * BS), volume=2)
        assert v1.both and not v2.both
        v1.finish()
        v2.finish()
    finally:
        again.close()
