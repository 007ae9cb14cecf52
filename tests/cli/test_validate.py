"""``targetmirror validate``: a YAML file checked completely with neither LIO nor the daemon."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from targetmirror import cli, protocol
from tests.config.test_loader import good, write


@pytest.fixture(autouse=True)
def no_lio_no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """validate must need neither: any use of them fails the test."""
    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("validate touched LIO or the daemon")

    monkeypatch.setattr(cli.common, "lio_seam", refuse)
    monkeypatch.setattr(protocol, "call", refuse)


def test_a_valid_file_is_one_line_and_exit_0(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, good(tmp_path))
    assert cli.main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == (f"{path}: valid: 2 mirrors, 1 group, 1 export (2 LUNs, 1 ACL); image_dirs "
                   f"{tmp_path}/images\n")


def test_every_problem_on_its_own_line_and_exit_1(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    doc = good(tmp_path)
    doc["mirrors"][0]["sise"] = doc["mirrors"][0].pop("size")
    del doc["mirrors"][1]["name"]
    doc["exports"][0]["portals"] = ["10.0.0.1"]
    doc["exports"][0]["luns"][0]["lun"] = 300
    path = write(tmp_path, doc)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli.main(["validate", str(path)]) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == ""
    assert all(line.startswith(f"{path}: ") and ": expected " in line for line in lines), lines
    keys = [line.split(": ")[1] for line in lines]
    assert keys == ["mirrors[0].sise", "mirrors[1].name", "groups[0].mirrors[1]",
                    "exports[0].portals[0]", "exports[0].luns[0].lun",
                    "exports[0].luns[1].mirror"], lines
    assert "did you mean size?" in lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing made or changed
    assert cli.main(["validate", "--json", str(path)]) == 1
    res = json.loads(capsys.readouterr().out)
    assert res["valid"] is False and res["problems"] == lines


def test_unreadable_and_not_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(tmp_path / "nope.yaml")]) == 1
    assert capsys.readouterr().err == (f"targetmirror: config: {tmp_path}/nope.yaml: cannot "
                                       "read the configuration file: No such file or "
                                       "directory\n")
    path = write(tmp_path, "mirrors: [\n")
    assert cli.main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: line 2, column 1: expected valid YAML") and \
        err.count("\n") == 1, err


def test_default_path_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, good(tmp_path))
    monkeypatch.setenv("TARGETMIRROR_CONFIG", str(path))
    assert cli.main(["validate"]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: valid: ")


def test_check_config_given_a_yaml_file_says_so_and_checks_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """issue 16: it used to answer "cfgstring item ...: expected key=value"."""
    path = write(tmp_path, good(tmp_path))
    assert cli.main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"{path} is a file, not a cfgstring" in err and "targetmirror validate" in err
    assert out.startswith(f"{path}: valid: ")
