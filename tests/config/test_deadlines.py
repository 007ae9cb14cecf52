"""The deadlines' configuration surface (issue 19): the file's ``deadlines:`` (daemon-wide and
per mirror), targetmirrord's flags, and how they meet in the mirror the daemon builds.

Bad values give one problem line each, naming the file, the key path and what was expected,
from ``targetmirror validate`` as from the loader; a mirror whose own deadlines are bad is
refused like any other bad entry; a bad flag is a usage error (exit 2) naming the flag.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from targetmirror import cli
from targetmirror.config import deadlines as dl
from targetmirror.config import loader
from targetmirror.daemon import main as daemon_main
from targetmirror.daemon import restore
from targetmirror.errors import ConfigError
from targetmirror.mirror.legs import Deadlines
from tests.daemon.test_bad_input import MiB, Rig, rig  # noqa: F401 - the fixture


def doc(images: Path, **extra: Any) -> dict[str, Any]:
    for n in ("m1-a", "m1-b", "m2-a", "m2-b"):
        p = images / f"{n}.img"
        if not p.exists():
            with open(p, "wb") as f:
                f.truncate(MiB)
    d: dict[str, Any] = {"image_dirs": [str(images)], "mirrors": [
        {"name": "m1", "size": "1M", "image_a": f"{images}/m1-a.img",
         "image_b": f"{images}/m1-b.img"},
        {"name": "m2", "size": "1M", "image_a": f"{images}/m2-a.img",
         "image_b": f"{images}/m2-b.img"}]}
    d.update(extra)
    return d


def test_the_reference_defaults_are_the_mirrors_own() -> None:
    """DEFAULTS (the docs' table, the man page) say what Deadlines() does."""
    built = Deadlines()
    for key, (default, _meaning) in dl.DEFAULTS.items():
        assert getattr(built, key) == dl.check_value(key, default), key
    assert set(dl.KEYS) == {f.name for f in dataclasses.fields(Deadlines)}
    assert dl.build({}) == Deadlines()


def test_values_and_their_forms() -> None:
    assert dl.check_value("write", 40) == 40.0
    assert dl.check_value("write", "2.5") == 2.5
    assert dl.check_value("write", "7s") == 7.0
    assert dl.check_value("flush", "never") is None
    assert dl.check_value("flush", "Never") is None
    assert dl.check_value("per_mib", 0) == 0.0
    assert dl.check_value("piece", "1M") == 1 << 20
    assert dl.check_value("piece", 8192) == 8192
    for key, bad in [("write", 0), ("write", -1), ("write", True), ("write", "soon"),
                     ("write", 3601), ("write", float("nan")), ("write", [1]),
                     ("slow", "never"), ("per_mib", "never"), ("per_mib", -0.5),
                     ("per_mib", 61), ("slow", 0), ("piece", "3K"), ("piece", 4097),
                     ("piece", "2G"), ("piece", "never"), ("piece", 1.5)]:
        with pytest.raises(ConfigError):
            dl.check_value(key, bad)


def test_file_sets_daemon_wide_and_per_mirror(tmp_path: Path) -> None:
    d = doc(tmp_path, deadlines={"write": 40, "flush": "never", "piece": "16M"})
    d["mirrors"][1]["deadlines"] = {"write": 5, "slow": 0.25}
    cfg = loader.validate(d, "F")
    assert dict(cfg.deadlines) == {"write": 40.0, "flush": None, "piece": 16 << 20}
    assert cfg.deadlines_of("m1") == {"write": 40.0, "flush": None, "piece": 16 << 20}
    assert cfg.deadlines_of("m2") == {"write": 5.0, "flush": None, "piece": 16 << 20,
                                      "slow": 0.25}
    # the flags replace the file's daemon-wide values; a mirror's own entry still wins
    flags = {"write": 9.0, "read": 9.0}
    assert cfg.deadlines_of("m1", flags) == {"write": 9.0, "read": 9.0, "flush": None,
                                             "piece": 16 << 20}
    assert cfg.deadlines_of("m2", flags)["write"] == 5.0
    assert dl.build(cfg.deadlines_of("m2", flags)) == Deadlines(
        read=9.0, write=5.0, flush=None, piece=16 << 20, slow=0.25)


def test_bad_deadlines_name_key_and_expectation_and_refuse_only_their_mirror(
        tmp_path: Path) -> None:
    d = doc(tmp_path, deadlines={"write": 0, "flsuh": 3, "piece": "3K"})
    d["mirrors"][1]["deadlines"] = {"read": "later"}
    checked = loader.check(d, "F")
    assert list(checked.problems) == [
        "F: deadlines.write: expected seconds (a number above 0, at most 3600) or never, "
        "got 0",
        "F: deadlines.flsuh: expected no such key (known keys here: read, write, per_mib, "
        "flush, discard, piece, slow)",
        "F: deadlines.piece: expected a size from 4K to 1G, a multiple of 4K (e.g. 64M), "
        "got '3K'",
        "F: mirrors[1].deadlines.read: expected seconds (a number above 0, at most 3600) or "
        "never, got 'later'"]
    # the valid part: m1 with the defaults in place of the bad daemon-wide values; m2 refused
    assert [m.name for m in checked.config.mirrors] == ["m1"]
    assert checked.config.deadlines == ()
    assert set(checked.refused) == {"m2"}
    d["deadlines"] = [1, 2]
    assert "F: deadlines: expected a mapping of read, write, per_mib, flush, discard, piece, " \
        "slow, got a list" in loader.check(d, "F").problems


def test_validate_reports_a_bad_deadline(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    d = doc(tmp_path)
    d["mirrors"][0]["deadlines"] = {"flush": -5}
    path = tmp_path / "tm.yaml"
    path.write_text(yaml.safe_dump(d))
    assert cli.main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: mirrors[0].deadlines.flush: expected seconds" in err
    d["mirrors"][0]["deadlines"] = {"flush": 90}
    path.write_text(yaml.safe_dump(d))
    assert cli.main(["validate", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["valid"] is True


def test_flags(tmp_path: Path) -> None:
    assert dl.from_flags({"leg_timeout": "12", "flush_timeout": "never",
                          "discard_timeout": None, "discard_piece": "8M"}) == {
        "read": 12.0, "write": 12.0, "flush": None, "piece": 8 << 20}
    with pytest.raises(ConfigError, match=r"^--discard-piece: expected a size .* got '5000'$"):
        dl.from_flags({"discard_piece": "5000"})
    with pytest.raises(ConfigError, match=r"^--leg-timeout: expected seconds"):
        dl.from_flags({"leg_timeout": "0"})


@pytest.mark.parametrize("argv,message", [
    (["--leg-timeout", "0"], "--leg-timeout: expected seconds"),
    (["--flush-timeout", "soon"], "--flush-timeout: expected seconds"),
    (["--discard-timeout", "-1"], "--discard-timeout: expected seconds"),
    (["--discard-piece", "1K"], "--discard-piece: expected a size from 4K to 1G")])
def test_a_bad_flag_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str], argv: list[str],
                                     message: str) -> None:
    monkeypatch.setattr(daemon_main.Daemon, "run", lambda self: pytest.fail("started"))
    monkeypatch.setattr(daemon_main.logs, "setup", lambda level: None)
    monkeypatch.delenv(loader.ENV_VAR, raising=False)
    monkeypatch.setattr(restore, "config_path", lambda arg: None)
    with pytest.raises(SystemExit) as exc:
        daemon_main.main([*argv, "--state-dir", str(tmp_path), "--no-dbus"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_the_daemon_opens_each_mirror_with_its_deadlines(
        rig: Rig, tmp_path: Path) -> None:  # noqa: F811
    """File (daemon-wide and per mirror) and flags meet in the Mirror that serve() builds."""
    i = rig.images
    d = doc(i, deadlines={"write": 40, "discard": 12, "piece": "1M"})
    d["mirrors"][1]["deadlines"] = {"write": 3, "flush": "never"}
    path = tmp_path / "tm.yaml"
    path.write_text(yaml.safe_dump(d))
    rig.daemon.flag_deadlines = {"read": 7.0, "write": 7.0}
    rig.daemon.loaded = restore.read(str(path))
    assert rig.daemon.loaded.ok, rig.daemon.loaded.problems
    for n in ("m1", "m2"):
        rig.add(n, f"a={i}/{n}-a.img;b={i}/{n}-b.img")
    rig.daemon.rescan()
    m1 = rig.daemon.registry.mirror("m1")
    m2 = rig.daemon.registry.mirror("m2")
    assert m1.deadlines == Deadlines(read=7.0, write=7.0, discard=12.0, piece=1 << 20)
    assert m2.deadlines == Deadlines(read=7.0, write=3.0, flush=None, discard=12.0,
                                     piece=1 << 20)
    assert rig.daemon.ops.status()["mirrors"][1]["deadlines"]["flush"] is None
    assert rig.write10("m2", 0)[0] == 0
