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
    config, problem = restore.load(str(path))
    assert config is not None and problem is None
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


def test_bad_file_is_reported_not_applied(tmp_path: Path) -> None:
    doc = good(tmp_path)
    doc["mirrors"][0]["size"] = "huge"
    config, problem = restore.load(str(write(tmp_path, doc)))
    assert config is None and problem is not None
    assert "mirrors[0].size" in problem and "serving what exists" in problem


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
    assert restore.load(None) == (None, None)
    monkeypatch.setenv(loader.ENV_VAR, str(tmp_path / "absent.yaml"))
    config, problem = restore.load(None)
    assert config is None and problem is not None and "cannot read" in problem


def test_parser_has_config() -> None:
    args = build_parser().parse_args(["--config", "/x.yaml"])
    assert args.config == "/x.yaml" and args.state_dir is None
