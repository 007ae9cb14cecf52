"""``status``: Cpy% and ETA of every running copy, ``--watch``, ``--check`` (exit 2 when a
mirror is degraded or NOT READY); ``sync``/``repair``/``verify`` progress bars -- against the
daemon's real control operations over real mirrors on image files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from targetmirror import cli
from targetmirror.cli import progress
from targetmirror.client import copy_percent, eta_text, status_rows, unhealthy
from targetmirror.daemon.control import ControlServer
from targetmirror.daemon.main import Daemon
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import StateStore
from targetmirror.store.faulty import Fault, FaultPlan, FaultyImage

SIZE = 8 << 20


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.daemon = Daemon(state_dir=str(tmp / "state"), stuck_after=0)
        self.store = StateStore(str(tmp / "state" / "mirrors"))
        self.sock = str(tmp / "run" / "control.sock")
        self.server = ControlServer(self.sock, self.daemon.handlers(),
                                    allowed_uids=(os.getuid(),))
        self.server.start()
        self.mirrors: list[Mirror] = []
        self.plans: dict[str, FaultPlan] = {}

    def mirror(self, name: str, data: bytes | None = None) -> Mirror:
        a, b = self.tmp / f"{name}-a.img", self.tmp / f"{name}-b.img"
        a.write_bytes(data if data is not None else bytes(SIZE))
        with open(b, "wb") as f:
            f.truncate(SIZE)
        plan = self.plans[name] = FaultPlan()
        m = Mirror(name, FaultyImage(str(a), plan), FaultyImage(str(b)), size=SIZE,
                   store=self.store, region_size=64 << 10, wi_interval=None,
                   leg_timeout=None)
        self.mirrors.append(m)
        self.daemon.devices[f"uio-{name}"] = SimpleNamespace(  # type: ignore[assignment]
            info=SimpleNamespace(dev_name=name), mirror=m, reason=None, reason_code=None,
            volume=1, snapshot=None, lane=None, runner=SimpleNamespace(commands=0))
        return m

    def close(self) -> None:
        self.server.close()
        for m in self.mirrors:
            m.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cpy_percent_and_eta_from_the_resync_numbers() -> None:
    sync = {"name": "s", "state": "syncing", "bitmap": {"region_size": 65536},
            "resync": {"kind": "sync", "bytes_total": 1000, "cursor": 250, "bytes_copied": 250,
                       "eta_seconds": 75.2}}
    rejoin = {"name": "r", "state": "rejoining", "bitmap": {"region_size": 65536},
              "resync": {"kind": "rejoin", "from": "b", "regions_total": 8, "regions_done": 6,
                         "bytes_copied": 6 * 65536, "eta_seconds": 3725}}
    counting = {"name": "c", "state": "rejoining", "bitmap": {"region_size": 65536},
                "resync": {"kind": "rejoin", "regions_total": None, "regions_done": 0,
                           "eta_seconds": None}}
    idle = {"name": "i", "state": "mirrored", "resync": None}
    assert [copy_percent(m) for m in (sync, rejoin, counting, idle)] == ["25.0", "75.0", "0.0",
                                                                         "-"]
    assert [eta_text(s) for s in (75.2, 3725, 4, None)] == ["1m15s", "1h02m", "4s", "-"]
    rows = status_rows([sync, rejoin, idle])
    assert rows[0].split()[-3:] == ["COPY", "CPY%", "ETA"]
    assert rows[1].split()[-3:] == ["sync", "25.0", "1m15s"]
    assert rows[2].split()[-3:] == ["rejoin", "75.0", "1h02m"]
    assert rows[3].split()[-3:] == ["-", "-", "-"]


def test_status_shows_a_running_sync_and_the_check_exit_status(
        rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    m = rig.mirror("m1", os.urandom(SIZE))
    rig.mirror("m2")
    m.initial_sync(rate=2e6)  # ~4 s: long enough to be seen running
    rc, out, err = run(capsys, "status", "--socket", rig.sock, "--check")
    assert rc == 0, err
    row = next(line for line in out.splitlines() if line.startswith("m1 "))
    kind, pct, eta = row.split()[-3:]
    assert kind == "sync" and 0.0 <= float(pct) < 100.0 and eta != "", row
    m.stop_resync()

    # a failed leg: status --check exits 2 (for monitoring), and says why under the table
    rig.plans["m2"].add(Fault("write", "eio"))
    rig.mirrors[1].write(0, [memoryview(b"x" * 512)], False)
    assert rig.mirrors[1].health == "degraded"
    rc, out, _ = run(capsys, "status", "--socket", rig.sock, "--check")
    assert rc == 2
    assert "m2: DEGRADED" in out and "leg A failed at" in out
    rc, out, _ = run(capsys, "status", "--socket", rig.sock, "--check", "--json", "m1")
    assert rc == 0 and '"name": "m1"' in out  # only the named mirrors count


def test_a_not_ready_lun_fails_the_check() -> None:
    bad = {"name": "m2", "state": "not-ready", "reason": "the configuration file refuses it",
           "reason_code": "config"}
    assert unhealthy([bad]) == ["m2"]
    assert status_rows([bad], {"path": "/etc/t.yaml", "problems": ["x"], "refused": ["m2"]})[
        -2:] == ["m2: NOT READY (config): the configuration file refuses it",
                 "configuration /etc/t.yaml: 1 problem, refusing m2 (targetmirror validate "
                 "/etc/t.yaml)"]


def test_status_watch_repeats_the_table(rig: Rig, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rig.mirror("m1")
    monkeypatch.setattr(cli.ui_mirror.time, "sleep", lambda s: None)
    rc, out, _ = run(capsys, "status", "--socket", rig.sock, "--watch", "0.5", "--count", "3")
    assert rc == 0
    assert out.count("every 0.5 s: targetmirror status") == 3
    assert out.count("\nm1 ") == 3


def test_sync_repair_verify_show_a_bar_on_a_terminal(
        rig: Rig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "wanted", lambda args, stream=None: not args.json)
    monkeypatch.setattr(progress, "POLL", 0.05)
    data = os.urandom(SIZE)
    m = rig.mirror("m1", data)
    rc, out, err = run(capsys, "sync", "m1", "--socket", rig.sock, "--rate", "16")
    assert rc == 0, err
    assert out.startswith("m1: initial sync complete")
    assert "sync: 100%" in err and "8.39M/8.39M" in err, err
    assert (rig.tmp / "m1-b.img").read_bytes() == data

    rig.plans["m1"].add(Fault("write", "eio"))
    m.write(0, [memoryview(b"y" * 512)], False)
    assert m.health == "degraded"
    rc, out, err = run(capsys, "repair", "m1", "--socket", rig.sock)
    assert rc == 0, err
    assert out.startswith("m1: repaired, mirrored again")
    assert "repair: " in err, err  # (a 64 KiB copy may end before the bar learns its size)

    rc, out, err = run(capsys, "verify", "m1", "--socket", rig.sock)
    assert rc == 0, err
    assert "0 mismatching" in out and "verify: " in err, err
    # off a terminal (or with --json) there is no bar at all
    rc, out, err = run(capsys, "verify", "m1", "--socket", rig.sock, "--json")
    assert rc == 0 and err == ""


def test_a_copy_that_fails_under_the_bar_is_one_line(
        rig: Rig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "wanted", lambda args, stream=None: True)
    monkeypatch.setattr(progress, "POLL", 0.05)
    rig.mirror("m1", os.urandom(SIZE))
    rig.plans["m1"].add(Fault("read", "eio", offset=(4 << 20, 8 << 20)))
    rc, _, err = run(capsys, "sync", "m1", "--socket", rig.sock, "--rate", "64")
    assert rc == 1
    assert err.splitlines()[-1].startswith("targetmirror: mirror: sync of m1 failed: ")

