"""Leg failure, degraded mode and repair, with faults injected by FaultyImage.

Every test asserts outcomes: bytes on the image files, SCSI status and sense through a real
ScsiDevice, the persisted state document, and the bitmap."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from targetmirror.errors import MirrorError, StoreError
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import State, StateStore
from targetmirror.scsi.handler import DeviceIdentity, ScsiDevice
from targetmirror.store.faulty import Fault, FaultPlan, FaultyImage
from tests.mirror.test_rejoin import RS, SIZE, read_file, split, state_doc
from tests.scsi.scsi_util import READ_ERROR, WRITE_ERROR, cdb10, expect_check, expect_good, run

BS = 512
WRITE10, READ10, SYNC10 = 0x2A, 0x28, 0x35


class Rig:
    def __init__(self, tmp_path, **kw) -> None:
        self.pa, self.pb = str(tmp_path / "a.img"), str(tmp_path / "b.img")
        for p in (self.pa, self.pb):
            with open(p, "wb") as f:
                f.truncate(SIZE)
        self.dir = str(tmp_path / "state")
        self.plan_a, self.plan_b = FaultPlan(seed=1), FaultPlan(seed=2)
        kw.setdefault("wi_interval", None)
        kw.setdefault("leg_timeout", None)
        self.m = Mirror("m", FaultyImage(self.pa, self.plan_a), FaultyImage(self.pb, self.plan_b),
                        size=SIZE, block_size=BS, store=StateStore(self.dir), region_size=RS,
                        **{"wi_extent": RS, **kw})
        self.scsi = ScsiDevice(self.m, DeviceIdentity(serial="s", revision="0001"))

    def write(self, lba: int, data: bytes):
        return run(self.scsi, cdb10(WRITE10, lba, len(data) // BS), data_out=data)

    def read(self, lba: int, blocks: int):
        return run(self.scsi, cdb10(READ10, lba, blocks), data_in=blocks * BS)


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.plan_a.release()
    r.plan_b.release()
    r.m.close()


@pytest.mark.parametrize("kind", ["eio", "enospc", "short", "vanish"])
def test_a_failing_write_degrades_and_the_command_is_good(rig, kind, caplog):
    rig.plan_a.add(Fault("write", kind, nth=2, count=-1))
    expect_good(rig.write(0, b"1" * BS))
    with caplog.at_level(logging.ERROR, logger="targetmirror.mirror"):
        expect_good(rig.write(8, b"2" * BS))   # A fails here
        expect_good(rig.write(16, b"3" * BS))  # A is not even tried
    assert rig.plan_a.calls["write"] == 2
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "DEGRADED" in caplog.records[0].message and len(caplog.records) == 1
    doc = state_doc(StateStore(rig.dir))
    assert set(doc["failed"]) == {"a"}
    want = {"eio": "EIO", "enospc": "ENOSPC", "short": "EIO", "vanish": "ENODEV"}[kind]
    assert doc["failed"]["a"]["reason"].startswith(want)
    st = rig.m.status()
    assert st["health"] == "degraded" and "a" in st["failed_legs"]
    b = read_file(rig.pb)
    assert b[8 * BS:9 * BS] == b"2" * BS and b[16 * BS:17 * BS] == b"3" * BS
    assert rig.read(16, 1).returned == b"3" * BS
    # every write since (and including) the failing one is tracked for the repair
    assert {0} <= set(rig.m.bitmap.dirty_regions())  # type: ignore[union-attr]
    assert rig.m.clear_write_intent() == 0  # nothing is cleared while degraded


def test_b_read_error_retries_from_a_and_fails_b(rig):
    expect_good(rig.write(3, b"r" * BS))
    rig.plan_b.add(Fault("read", "eio"))
    r = rig.read(3, 1)
    expect_good(r)
    assert r.returned == b"r" * BS
    assert rig.m.health == "degraded" and set(rig.m.st.failed) == {"b"}
    expect_good(rig.write(4, b"s" * BS))  # now A only
    assert read_file(rig.pa)[4 * BS:5 * BS] == b"s" * BS
    assert read_file(rig.pb)[4 * BS:5 * BS] == bytes(BS)


def test_both_legs_failing_gives_medium_error_never_success(rig):
    rig.plan_a.add(Fault("write", "eio", count=-1))
    rig.plan_b.add(Fault("write", "eio", count=-1))
    expect_check(rig.write(0, b"x" * BS), WRITE_ERROR)
    assert rig.m.health == "failed"
    rig.plan_b.add(Fault("read", "eio", count=-1))
    expect_check(rig.read(0, 1), READ_ERROR)
    expect_check(rig.write(9, b"y" * BS), WRITE_ERROR)  # no leg left: not even tried


def test_the_only_live_leg_failing_after_a_split_is_an_error(rig):
    split(rig.m)
    rig.plan_b.add(Fault("write", "eio", count=-1))
    expect_check(rig.write(0, b"x" * BS), WRITE_ERROR)
    assert rig.m.health == "failed"
    with pytest.raises(MirrorError, match="nothing to repair"):
        rig.m.repair(leg="b")


def test_a_failing_while_the_split_drains_loses_the_split_copy(rig):
    rig.plan_a.add(Fault("write", "eio"))
    m = rig.m
    io = m.admit(m.epoch, (0, BS))     # a pre-split write still in flight at the instant
    m.prepare_split(["m"])
    m.begin_split()
    m.boundary_passed()
    io.write(0, [memoryview(b"p" * BS)], False)   # A fails under it: still GOOD via B
    io.finish()
    assert m.split_complete.wait(10)
    doc = state_doc(StateStore(rig.dir))
    assert doc["state"] == "split" and doc["split"]["a_status"].startswith("lost")
    assert m.status()["split"]["a_status"].startswith("lost")
    with pytest.raises(MirrorError, match="failed leg"):
        m.rejoin()


def test_repair_copies_only_the_regions_written_while_degraded(rig):
    m = rig.m
    for r in range(6):
        expect_good(rig.write(r * RS // BS, bytes([65 + r]) * RS))
    m.clear_write_intent()
    m.clear_write_intent()
    assert m.bitmap.count == 0  # type: ignore[union-attr]
    rig.plan_a.add(Fault("write", "eio", count=-1))
    for r in (1, 4, 7):
        expect_good(rig.write(r * RS // BS, b"D" * RS))
    assert m.health == "degraded" and m.bitmap.count == 3  # type: ignore[union-attr]
    rig.plan_a.faults.clear()          # the admin fixed the device
    with pytest.raises(MirrorError, match="not failed"):
        m.repair(leg="b")
    m.repair()
    assert m.rejoin_complete.wait(20)
    assert read_file(rig.pa) == read_file(rig.pb)
    doc = state_doc(StateStore(rig.dir))
    assert doc["failed"] == {} and doc["state"] == "mirrored"
    assert doc["last_repair"]["bytes_copied"] == 3 * RS
    assert m.health == "ok" and m.verify()["mismatches"] == 0
    expect_good(rig.write(2, b"z" * BS))
    assert read_file(rig.pa)[2 * BS:3 * BS] == b"z" * BS  # both legs again


def test_repair_of_b_copies_from_a(rig):
    m = rig.m
    rig.plan_b.add(Fault("write", "enospc", count=-1))
    expect_good(rig.write(0, b"q" * BS))
    assert set(m.st.failed) == {"b"}
    assert rig.read(0, 1).returned == b"q" * BS  # from A
    rig.plan_b.faults.clear()
    m.repair(rate=None)
    assert m.st.resync_from == "a" or m.state == State.MIRRORED
    assert m.rejoin_complete.wait(20)
    assert read_file(rig.pa) == read_file(rig.pb)
    assert m.verify()["mismatches"] == 0


def test_repair_replace_does_a_full_copy_to_a_new_image(rig, tmp_path):
    m = rig.m
    expect_good(rig.write(0, b"k" * BS))
    rig.plan_a.add(Fault("write", "vanish"))
    expect_good(rig.write(5, b"l" * BS))
    new = str(tmp_path / "a2.img")
    with open(new, "wb") as f:
        f.truncate(SIZE)
    m.repair(replace=new)
    assert m.rejoin_complete.wait(20)
    with open(new, "rb") as f:
        assert f.read() == read_file(rig.pb)
    assert m.st.last_repair is not None and m.st.last_repair["bytes_copied"] == SIZE
    assert state_doc(StateStore(rig.dir))["image_a"] == new
    assert m.verify()["mismatches"] == 0
    m.close()
    # a restart with the configured (old) path opens the replacement
    m2 = Mirror("m", FaultyImage(rig.pa), FaultyImage(rig.pb), size=SIZE, block_size=BS,
                store=StateStore(rig.dir), region_size=RS, wi_interval=None, leg_timeout=None,
                wi_extent=RS)
    try:
        assert m2.a.path == new and m2.health == "ok" and m2.state == State.MIRRORED
    finally:
        m2.close()


def test_a_hung_leg_is_failed_by_its_timeout_and_new_commands_complete(tmp_path):
    rig = Rig(tmp_path, leg_timeout=0.2)
    m = rig.m
    try:
        rig.plan_a.add(Fault("write", "delay", seconds=60))
        done = threading.Event()

        def stuck() -> None:
            rig.write(0, b"h" * BS)
            done.set()

        t = threading.Thread(target=stuck)
        t.start()
        deadline = time.monotonic() + 20
        while "a" not in m.st.failed and time.monotonic() < deadline:
            time.sleep(0.02)  # waiting for the watchdog under test; bounded
        assert m.health == "degraded"
        assert m.st.failed["a"]["kind"] == "timeout"
        assert not done.is_set()              # still inside the hung call
        expect_good(rig.write(40, b"n" * BS))  # a new command completes on B
        with pytest.raises(MirrorError, match="still not returned"):
            m.repair(timeout=0.1)
        rig.plan_a.release()
        t.join(10)
        assert done.is_set()
        rig.plan_a.faults.clear()
        m.repair()
        assert m.rejoin_complete.wait(20)
        assert read_file(rig.pa) == read_file(rig.pb)
    finally:
        rig.plan_a.release()
        m.close()


def test_failed_leg_survives_a_restart(tmp_path):
    rig = Rig(tmp_path)
    rig.plan_a.add(Fault("flush", "eio"))
    rig.m.flush()
    assert rig.m.health == "degraded"
    rig.m.close()
    m2 = Mirror("m", FaultyImage(rig.pa), FaultyImage(rig.pb), size=SIZE, block_size=BS,
                store=StateStore(rig.dir), region_size=RS, wi_interval=None, leg_timeout=None,
                wi_extent=RS)
    try:
        assert m2.health == "degraded" and set(m2.st.failed) == {"a"}
        m2.write(0, [memoryview(b"w" * BS)], False)
        assert read_file(rig.pa)[:BS] == bytes(BS)
    finally:
        m2.close()


def test_store_error_names_the_leg(rig):
    rig.plan_a.add(Fault("write", "eio", count=-1))
    rig.plan_b.add(Fault("write", "eio", count=-1))
    with pytest.raises(StoreError):
        rig.m.write(0, [memoryview(b"x" * BS)], False)
