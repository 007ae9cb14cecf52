"""The stuck-command watchdog on a real runner whose leg blocks on an Event (no sleeps).

The watchdog's clock is the test's: "31 s later" is a clock offset, not a wait.  What the report
says is checked against where the command really is: gated inside leg A or leg B's write, or
queued behind an overlapping write on the range lock.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from targetmirror.daemon.watchdog import Watchdog
from tests.daemon.splitrig import BS, RigDevice, block, make_device, write10

NBLOCKS = 256


@pytest.fixture
def dev(tmp_path: Path) -> RigDevice:
    d = make_device(str(tmp_path), "w", NBLOCKS, workers=2, store=None)
    yield d
    d.close()


def _watchdog(dev: RigDevice, later: float) -> Watchdog:
    return Watchdog(lambda: [(dev.name, dev.runner)], threshold=30.0,
                    clock=lambda: time.monotonic() + later)


def _write(dev: RigDevice, lba: int, n: int = 2) -> int:
    data = b"".join(block(1, lba, i, lba + i) for i in range(n))
    return dev.uio.submit("write", write10(lba, n), lba, n, data).cmd_id


def test_a_write_stuck_in_leg_b_is_reported_once_with_its_details(
        dev: RigDevice, caplog: pytest.LogCaptureFixture) -> None:
    entered, release = dev.b.gate(16 * BS)
    cmd_id = _write(dev, 16)
    assert entered.wait(10)
    # young: nothing to say
    assert _watchdog(dev, 0.0).scan() == []
    wd = _watchdog(dev, 31.0)
    with caplog.at_level(logging.WARNING, "targetmirror.watchdog"):
        (stuck,) = wd.scan()
        assert wd.scan() == []  # once, not every pass
    assert (stuck.cmd_id, stuck.opcode, stuck.lba) == (cmd_id, 0x2A, 16)
    assert stuck.age >= 31.0
    # small writes go to A, then B: A is done, B is what it waits on
    assert stuck.waiting_on == "leg B"
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1
    assert f"command {cmd_id} (opcode 0x2a at LBA 16)" in msgs[0] and "leg B" in msgs[0]
    assert wd.stuck("w") == 1
    release.set()
    assert dev.uio.wait_reaped([cmd_id])
    caplog.clear()
    with caplog.at_level(logging.WARNING, "targetmirror.watchdog"):
        assert wd.scan() == []
    assert f"stuck command {cmd_id} was answered" in caplog.text
    assert wd.stuck("w") == 0


def test_a_write_stuck_in_leg_a_waits_on_both_legs(dev: RigDevice) -> None:
    entered, release = dev.a.gate(32 * BS)
    cmd_id = _write(dev, 32)
    assert entered.wait(10)
    (stuck,) = _watchdog(dev, 60.0).scan()
    assert stuck.cmd_id == cmd_id and stuck.waiting_on == "leg A and B"
    release.set()
    assert dev.uio.wait_reaped([cmd_id])


def test_an_overlapping_write_behind_a_stuck_one_names_the_range_lock(dev: RigDevice) -> None:
    entered, release = dev.b.gate(64 * BS)
    # both queued before the ring thread looks: one batch, registered before either runs
    with dev.uio.lock:
        first = dev.producer.queue(write10(64, 4), bytes(4 * BS))
        second = dev.producer.queue(write10(66, 2), bytes(2 * BS))
    os.eventfd_write(dev.uio.efd, 1)
    assert entered.wait(10)
    by_id = {s.cmd_id: s.waiting_on for s in _watchdog(dev, 45.0).scan()}
    assert by_id[first] == "leg B"
    # admitted after the first (ring order), so its ticket waits for the first to finish
    assert by_id[second].startswith("the range lock")
    release.set()
    assert dev.uio.wait_reaped([first, second])


# -- systemd's watchdog: WATCHDOG=1 only while every ring loop is healthy ------------------------


def test_keepalive_reaches_systemd_from_the_scanner_thread(
        dev: RigDevice, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        systemd.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WatchdogSec=0.2s: every 0.1 s
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        wd = Watchdog(lambda: [(dev.name, dev.runner)], threshold=30.0)
        assert wd.keepalive == 0.1 and wd.interval == 0.1
        wd.start()
        try:
            assert systemd.recv(64) == b"WATCHDOG=1"
            assert systemd.recv(64) == b"WATCHDOG=1"
        finally:
            wd.stop()


def test_no_keepalive_outside_systemd(dev: RigDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    wd = Watchdog(lambda: [(dev.name, dev.runner)], threshold=30.0)
    assert wd.keepalive is None and wd.interval == 5.0


def test_a_wedged_ring_loop_withholds_the_keepalive_until_it_recovers(
        dev: RigDevice, caplog: pytest.LogCaptureFixture) -> None:
    sent: list[str] = []
    wd = Watchdog(lambda: [(dev.name, dev.runner)], threshold=30.0, keepalive=1.0,
                  notify=lambda s: sent.append(s) is None, lock_timeout=0.05)
    assert wd.keep_alive() and sent == ["WATCHDOG=1"]
    # the ring thread would hold this lock for ever if it deadlocked inside a batch
    with dev.runner.lock, caplog.at_level(logging.WARNING, "targetmirror.watchdog"):
        assert not wd.keep_alive()
        assert not wd.keep_alive()
        assert sent == ["WATCHDOG=1"]
        assert "ring loop has held its lock" in wd.health()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "withholding systemd's watchdog keep-alive" in errors[0].message
    assert wd.keep_alive() and sent == ["WATCHDOG=1", "WATCHDOG=1"]
    assert "keep-alive resumed" in caplog.text
    # the ring loop really serves again: a write goes through
    cmd_id = _write(dev, 8)
    assert dev.uio.wait_reaped([cmd_id])


def test_a_slow_leg_is_not_a_wedged_daemon(dev: RigDevice) -> None:
    """A command stuck in a leg is reported, but systemd is still fed: a restart would not make
    the leg faster."""
    sent: list[str] = []
    entered, release = dev.b.gate(16 * BS)
    cmd_id = _write(dev, 16)
    assert entered.wait(10)
    wd = _watchdog(dev, 120.0)
    wd.notify = lambda s: sent.append(s) is None
    wd.lock_timeout = 1.0
    assert len(wd.scan()) == 1
    assert wd.health() is None and wd.keep_alive() and sent == ["WATCHDOG=1"]
    release.set()
    assert dev.uio.wait_reaped([cmd_id])


def test_a_ring_loop_that_ended_and_is_not_reaped_withholds_the_keepalive() -> None:
    import threading

    class Ended:
        inflight: dict[int, tuple[float, object]] = {}
        lock = threading.Lock()
        alive = False

    now = [100.0]
    ended = Ended()
    devices = [("gone", ended)]
    wd = Watchdog(lambda: devices, threshold=30.0, keepalive=1.0, clock=lambda: now[0],
                  notify=lambda s: True)
    assert wd.health() is None  # the main loop reaps it at its next rescan
    now[0] += 29.0
    assert wd.health() is None
    now[0] += 2.0
    assert "has not released the device" in (wd.health() or "")
    devices.clear()  # reaped
    assert wd.health() is None and wd._dead_since == {}
