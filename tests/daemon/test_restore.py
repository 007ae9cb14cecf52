"""targetmirrord --config: the file is applied at start with the daemon's own group registry;
a bad file is reported and changes nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from targetmirror.config import loader
from targetmirror.config.plan import Manifest, manifest_path
from targetmirror.daemon import restore
from targetmirror.daemon.groups import GroupStore
from targetmirror.daemon.main import build_parser
from targetmirror.lio import live
from tests.config.fakelio import FakeLio
from tests.config.test_loader import good, write


def test_apply_at_start_uses_group_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, good(tmp_path))
    loaded = restore.read(str(path))
    config = loaded.config
    assert config is not None and loaded.ok and loaded.problems == ()
    fake = FakeLio()
    monkeypatch.setattr(live, "RtslibLio", lambda: fake)
    state = tmp_path / "daemon-state"
    state.mkdir()
    groups = GroupStore(str(state / "groups.json"))
    with caplog.at_level(logging.INFO, logger="targetmirror.daemon"):
        assert restore.apply_at_start(config, groups, str(state))
    assert set(fake.state.backstores) == {"m1", "m2"}
    assert GroupStore(str(state / "groups.json")).all() == {"g": ["m1", "m2"]}
    # --state-dir wins over the file: the manifest lives next to the groups
    assert Manifest.load(str(state / "apply-manifest.json")).groups == ["g"]
    assert not Path(manifest_path(config)).exists()
    assert any("applied" in r.getMessage() for r in caplog.records)
    calls = len(fake.calls)
    assert restore.apply_at_start(config, groups, str(state))
    assert len(fake.calls) == calls, "a restart applies nothing new"


def test_bad_file_is_reported_and_only_its_valid_part_applied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = good(tmp_path)
    doc["mirrors"][0]["size"] = "huge"
    loaded = restore.read(str(write(tmp_path, doc)))
    assert not loaded.ok and loaded.config is not None
    assert len(loaded.problems) == 1 and "mirrors[0].size" in loaded.problems[0]
    assert loaded.refused == {"m1": "mirrors[0].size: expected a positive size in bytes or "
                                    "with a unit (512M, 10G), a multiple of 512, got 'huge'"}
    fake = FakeLio()
    monkeypatch.setattr(live, "RtslibLio", lambda: fake)
    groups = GroupStore(str(tmp_path / "groups.json"))
    assert restore.apply_config(loaded.config, groups, str(tmp_path / "st"), only_new=True)
    # m2 is new and valid: made; m1 is refused; the group and m1's LUN need m1: not made
    assert set(fake.state.backstores) == {"m2"} and groups.all() == {}
    assert fake.state.targets["iqn.2026-01.org.example:t1"].luns == {1: "m2"}


def test_conflict_is_logged_and_daemon_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    from targetmirror.config.plan import TargetState

    config = loader.load(str(write(tmp_path, good(tmp_path))))
    fake = FakeLio()
    fake.state.targets["iqn.2026-01.org.example:t1"] = TargetState()
    monkeypatch.setattr(live, "RtslibLio", lambda: fake)
    groups = GroupStore(str(tmp_path / "groups.json"))
    assert not restore.apply_at_start(config, groups, None)
    assert fake.calls == [] and groups.all() == {}
    assert "not created by apply" in caplog.text


def test_no_file_no_restore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(loader.ENV_VAR, raising=False)
    monkeypatch.setattr(loader, "DEFAULT_PATH", str(tmp_path / "absent.yaml"))
    assert restore.config_path(None) is None
    monkeypatch.setenv(loader.ENV_VAR, str(tmp_path / "absent.yaml"))
    loaded = restore.read(str(restore.config_path(None)))
    assert loaded.config is None and "cannot read" in loaded.problems[0]


def test_parser_has_config() -> None:
    args = build_parser().parse_args(["--config", "/x.yaml"])
    assert args.config == "/x.yaml" and args.state_dir is None
