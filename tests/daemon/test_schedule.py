"""Scheduled splits survive a restart; a late one is reported as missed, never taken late.

The scheduler is driven two ways: ``run_due()`` under a fake wall clock (the rules, exactly),
and its own timer thread inside a real :class:`Daemon` serving a real mirror behind a ring loop
(tests/daemon/splitrig.py), across a simulated restart (a second Daemon on the same state
directory), asserting the mirror's state.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path

import pytest

from targetmirror.daemon.main import Daemon
from targetmirror.daemon.schedule import GRACE, SplitScheduler
from targetmirror.errors import MirrorError
from targetmirror.mirror.state import StateStore
from tests.daemon.metricszoo import wait_until
from tests.daemon.splitrig import make_device


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Taker:
    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, names: list[str]) -> None:
        self.calls.append(names)
        if self.fail:
            raise MirrorError(self.fail)


def test_a_schedule_is_durable_and_re_armed(tmp_path: Path) -> None:
    path = str(tmp_path / "schedules.json")
    clock, take = Clock(), Taker()
    s1 = SplitScheduler(path, take, clock=clock)
    a = s1.add(clock.now + 600, ["db", "logs"])
    b = s1.add(clock.now + 60, ["db"])
    assert (a.id, b.id) == (1, 2)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # "restart": a new scheduler on the same file lists both, soonest first, and takes them
    s2 = SplitScheduler(path, take, clock=clock)
    assert [(e["id"], e["state"]) for e in s2.entries()] == [(2, "pending"), (1, "pending")]
    s2.run_due()
    assert take.calls == []
    clock.now += 61
    s2.run_due()
    assert take.calls == [["db"]]
    assert [e["id"] for e in s2.entries()] == [1]
    assert s2.outcomes == {"taken": 1, "failed": 0, "missed": 0}
    # ids are never reused, also across restarts
    assert SplitScheduler(path, take, clock=clock).add(clock.now + 5, ["x"]).id == 3


def test_overdue_at_start_is_missed_not_taken(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "schedules.json")
    clock, take = Clock(), Taker()
    s1 = SplitScheduler(path, take, clock=clock)
    s1.add(clock.now + 10, ["late"])
    s1.add(clock.now + 100, ["just"])
    # the daemon was down from before the first was due until 30 s after the second
    clock.now += 100 + 30
    with caplog.at_level(logging.ERROR, "targetmirror.schedule"):
        s2 = SplitScheduler(path, take, clock=clock)
    s2.run_due()
    assert take.calls == [["just"]]      # 30 s late: within the grace, taken (logged late)
    entries = s2.entries()
    assert [(e["names"], e["state"]) for e in entries] == [(["late"], "missed")]
    assert "120 s late" in entries[0]["note"] and "not running" in entries[0]["note"]
    assert "MISSED" in caplog.text
    assert s2.outcomes["missed"] == 1
    # it stays (also across a restart) until acknowledged
    s3 = SplitScheduler(path, take, clock=clock)
    assert [e["state"] for e in s3.entries()] == ["missed"]
    assert s3.outcomes["missed"] == 0    # counted once, when it was found
    s3.cancel(entries[0]["id"])
    assert s3.entries() == []
    assert SplitScheduler(path, take, clock=clock).entries() == []


def test_a_running_daemon_that_wakes_too_late_misses_it(tmp_path: Path) -> None:
    clock, take = Clock(), Taker()
    s = SplitScheduler(str(tmp_path / "s.json"), take, clock=clock)
    s.add(clock.now + 10, ["db"])
    clock.now += 10 + GRACE + 1         # a suspended host resumes
    s.run_due()
    assert take.calls == []
    assert s.entries()[0]["state"] == "missed" and "suspended" in s.entries()[0]["note"]


def test_a_split_being_taken_at_a_crash_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "schedules.json"
    clock = Clock()
    s1 = SplitScheduler(str(path), Taker(), clock=clock)
    s1.add(clock.now + 5, ["db"])
    data = json.loads(path.read_text())
    data["schedules"][0]["state"] = "taking"   # what a crash inside take() leaves
    path.write_text(json.dumps(data))
    s2 = SplitScheduler(str(path), Taker(), clock=clock)
    (e,) = s2.entries()
    assert e["state"] == "missed" and "stopped while taking it" in e["note"]


def test_a_refused_split_stays_as_failed(tmp_path: Path) -> None:
    clock, take = Clock(), Taker(fail="mirror db is split; rejoin it first")
    s = SplitScheduler(str(tmp_path / "s.json"), take, clock=clock)
    s.add(clock.now + 1, ["db"])
    clock.now += 1
    s.run_due()
    (e,) = s.entries()
    assert e["state"] == "failed" and "rejoin it first" in e["note"]
    assert s.outcomes["failed"] == 1
    s.run_due()
    assert len(take.calls) == 1        # never retried by itself


def test_a_bug_in_taking_it_is_logged_and_the_timer_goes_on(tmp_path: Path) -> None:
    clock = Clock()

    def take(names: list[str]) -> None:
        raise KeyError("a bug")

    s = SplitScheduler(str(tmp_path / "s.json"), take, clock=clock)
    s.add(clock.now + 1, ["db"])
    s.add(clock.now + 2, ["logs"])
    clock.now += 2
    s.run_due()
    assert [(e["names"], e["state"]) for e in s.entries()] == [(["db"], "failed"),
                                                               (["logs"], "failed")]
    assert "a bug" in s.entries()[0]["note"]


def test_bad_input_changes_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "s.json")
    clock = Clock()
    s = SplitScheduler(path, Taker(), clock=clock)
    with pytest.raises(MirrorError, match="in the past"):
        s.add(clock.now - 1, ["db"])
    with pytest.raises(MirrorError, match="no scheduled split 7"):
        s.cancel(7)
    assert not os.path.exists(path)


def test_an_unreadable_file_is_kept_aside_and_reported(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "schedules.json"
    path.write_text('{"schema": 1, "next_id": 3, "schedules": [{"id": "x"}]}')
    with caplog.at_level(logging.ERROR, "targetmirror.schedule"):
        s = SplitScheduler(str(path), Taker(), clock=Clock())
    assert s.entries() == []
    assert "malformed" in caplog.text and "schedule them again" in caplog.text
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("schedules.json.bad-")]
    assert len(kept) == 1 and '"id": "x"' in kept[0].read_text()


# -- in a daemon, with its timer thread -----------------------------------------------------------

def _daemon_with_mirror(tmp_path: Path, name: str = "m0"):  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    store = StateStore(str(state / "mirrors"))
    dev = make_device(str(tmp_path), name, 64, workers=2, store=store)
    d = Daemon(state_dir=str(state), control_socket=None)
    d.devices[dev.served.info.name] = dev.served
    return d, dev


def test_a_daemon_restart_keeps_the_schedule_and_takes_it(tmp_path: Path) -> None:
    d1, dev = _daemon_with_mirror(tmp_path)
    try:
        at = time.time() + 1.0
        res = d1.ops.split(names=["m0"], at=at)
        sid = res["scheduled"]["id"]
        assert [(s["id"], s["state"]) for s in d1.ops.status()["scheduled"]] == \
            [(sid, "pending")]
        d1.ops.scheduler.start()
        d1.ops.scheduler.stop()                                # the daemon stops before it is due
        assert dev.mirror.state == "mirrored"
        d2 = Daemon(state_dir=str(tmp_path / "state"), control_socket=None)
        d2.devices[dev.served.info.name] = dev.served      # the restarted daemon serves it
        assert [s["id"] for s in d2.ops.status()["scheduled"]] == [sid]
        d2.ops.scheduler.start()
        try:
            wait_until(lambda: dev.mirror.state in ("splitting", "split"), "the split")
            assert dev.mirror.split_complete.wait(10)
            sp = dev.mirror.status()["split"]
            assert at <= sp["instant_wall"] < at + 5
            wait_until(lambda: not d2.ops.status()["scheduled"], "the entry to go")
            assert d2.ops.scheduler.outcomes["taken"] == 1
        finally:
            d2.ops.scheduler.stop()
    finally:
        dev.close()


def test_a_schedule_due_while_no_daemon_ran_is_missed(tmp_path: Path) -> None:
    d1, dev = _daemon_with_mirror(tmp_path)
    try:
        d1.ops.split(names=["m0"], at=time.time() + 3600)
        path = tmp_path / "state" / "schedules.json"
        data = json.loads(path.read_text())
        data["schedules"][0]["at"] = time.time() - 2 * 3600  # due two hours ago
        path.write_text(json.dumps(data))
        d2 = Daemon(state_dir=str(tmp_path / "state"), control_socket=None)
        d2.devices[dev.served.info.name] = dev.served
        d2.ops.scheduler.start()
        d2.ops.scheduler.run_due()
        d2.ops.scheduler.stop()
        (s,) = d2.ops.status()["scheduled"]
        assert s["state"] == "missed" and "7200 s late" in s["note"]
        assert dev.mirror.state == "mirrored"
        assert d2.ops.cancel(s["id"]) == {"cancelled": s["id"], "state": "missed"}
        assert d2.ops.status()["scheduled"] == []
    finally:
        dev.close()
