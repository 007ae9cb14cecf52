"""apply's planning and execution against the recording LIO seam: create, idempotence,
ownership (never remove what apply did not create), conflicts refused before any change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from targetmirror import cli
from targetmirror.config import apply as ap
from targetmirror.config import loader
from targetmirror.config.loader import Chap, Config
from targetmirror.config.plan import (
    AclState,
    BackstoreState,
    LioState,
    Manifest,
    TargetState,
    manifest_path,
    plan,
)
from targetmirror.errors import ConfigFileError
from tests.config.fakelio import FakeGroups, FakeLio
from tests.config.test_loader import MiB, good, write

IQN = "iqn.2026-01.org.example:t1"
HOST = "iqn.2026-01.org.example:host1"


def load(tmp: Path, doc: dict[str, Any]) -> Config:
    return loader.load(str(write(tmp, doc)))


def run(cfg: Config, lio: FakeLio, groups: FakeGroups, **kw: Any) -> ap.Result:
    lines: list[str] = []
    res = ap.apply(cfg, lio, groups, out=lines.append, **kw)
    res.lines = lines  # type: ignore[attr-defined]
    return res


def test_first_apply_builds_everything_second_changes_nothing(tmp_path: Path) -> None:
    cfg = load(tmp_path, good(tmp_path))
    lio, groups = FakeLio(), FakeGroups()
    first = run(cfg, lio, groups)
    ops = [op for op, _ in lio.calls]
    assert ops.count("create_backstore") == 2 and ops.count("create_target") == 1
    st = lio.state
    assert st.backstores["m1"].config == cfg.mirrors[0].cfgstring()
    assert st.backstores["m2"].config.endswith(";region=131072")
    t = st.targets[IQN]
    assert t.portals == {("127.0.0.1", 3260)} and t.luns == {0: "m1", 1: "m2"}
    assert t.acls[HOST].mapped == {0: 0, 1: 1} and t.enabled and not t.generate_node_acls
    assert groups.groups == {"g": ["m1", "m2"]}
    # the target exists before its LUNs are added, LUNs before the ACLs map them
    assert ops.index("create_target") < ops.index("add_lun") < ops.index("map_lun")
    assert first.lines[0].startswith("plan (") and first.lines[-1].startswith("applied ")
    man = json.loads(Path(manifest_path(cfg)).read_text())
    assert set(man["backstores"]) == {"m1", "m2"} and man["targets"] == [IQN]
    assert man["groups"] == ["g"]

    calls = len(lio.calls)
    second = run(cfg, lio, groups)
    assert not second.changed and second.actions == []
    assert len(lio.calls) == calls and groups.calls == [("create", "g")]
    assert second.lines == [f"nothing to change: LIO matches {cfg.path}"]


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    cfg = load(tmp_path, good(tmp_path))
    lio, groups = FakeLio(), FakeGroups()
    res = run(cfg, lio, groups, dry_run=True)
    assert res.actions and not res.done and lio.calls == [] and groups.calls == []
    assert res.lines[-1] == "dry run: nothing changed"
    assert not Path(manifest_path(cfg)).exists()


def test_removes_only_what_it_created(tmp_path: Path) -> None:
    doc = good(tmp_path)
    cfg = load(tmp_path, doc)
    lio, groups = FakeLio(), FakeGroups()
    # made by hand before apply ever ran: a backstore, a target, a group
    lio.state.backstores["hand"] = BackstoreState(MiB, "a=/h/a;b=/h/b", "hand-serial")
    lio.state.targets["iqn.2026-01.org.example:hand"] = TargetState(luns={0: "hand"})
    groups.groups["handgroup"] = ["hand", "x"]
    run(cfg, lio, groups)
    # drop m2 (and with it the group and LUN 1)
    doc["mirrors"].pop(1)
    doc["groups"] = []
    doc["exports"][0]["luns"].pop(1)
    cfg2 = load(tmp_path, doc)
    calls = len(lio.calls)
    res = run(cfg2, lio, groups)
    assert [op for op, _ in lio.calls[calls:]] == ["unmap_lun", "remove_lun", "delete_backstore"]
    assert groups.calls[-1] == ("delete", "g")
    assert "m2" not in lio.state.backstores and "m1" in lio.state.backstores
    assert lio.state.targets[IQN].luns == {0: "m1"}
    assert lio.state.targets[IQN].acls[HOST].mapped == {0: 0}
    assert "hand" in lio.state.backstores
    assert "iqn.2026-01.org.example:hand" in lio.state.targets
    assert groups.groups == {"handgroup": ["hand", "x"]}
    assert any("its images are kept" in line for line in res.lines)
    assert (tmp_path / "images" / "m2-a.img").exists()
    # an empty file removes everything apply made, and still nothing else
    cfg3 = load(tmp_path, {"daemon": doc["daemon"], "image_dirs": doc["image_dirs"]})
    run(cfg3, lio, groups)
    assert set(lio.state.backstores) == {"hand"}
    assert set(lio.state.targets) == {"iqn.2026-01.org.example:hand"}
    assert json.loads(Path(manifest_path(cfg)).read_text()) == {
        "backstores": {}, "targets": [], "groups": []}


def test_same_name_new_object_is_not_owned(tmp_path: Path) -> None:
    """A backstore apply made, deleted by hand and re-made by hand, is no longer apply's."""
    doc = good(tmp_path)
    cfg = load(tmp_path, doc)
    lio, groups = FakeLio(), FakeGroups()
    run(cfg, lio, groups)
    lio.state.targets.clear()
    lio.state.backstores["m2"] = BackstoreState(MiB, lio.state.backstores["m2"].config,
                                                "someone-elses-serial")
    doc["mirrors"].pop(1)
    doc["groups"] = []
    doc["exports"] = []
    run(load(tmp_path, doc), lio, groups)
    assert lio.state.backstores["m2"].wwn == "someone-elses-serial"


def test_recreated_backstore_keeps_its_serial(tmp_path: Path) -> None:
    """After a reboot (LIO empty) apply re-creates the backstores with their old unit serials."""
    cfg = load(tmp_path, good(tmp_path))
    lio, groups = FakeLio(), FakeGroups()
    run(cfg, lio, groups)
    serials = {n: b.wwn for n, b in lio.state.backstores.items()}
    lio2 = FakeLio()
    run(cfg, lio2, groups)
    assert {n: b.wwn for n, b in lio2.state.backstores.items()} == serials


def test_conflicts_refused_before_any_change(tmp_path: Path) -> None:
    cfg = load(tmp_path, good(tmp_path))
    lio, groups = FakeLio(), FakeGroups()
    lio.state.backstores["m1"] = BackstoreState(2 * MiB, "a=/other/a;b=/other/b", "s")
    lio.state.targets[IQN] = TargetState()
    groups.groups["g"] = ["m1", "zz"]
    with pytest.raises(ConfigFileError) as info:
        run(cfg, lio, groups)
    text = str(info.value)
    assert "3 problems" in text
    assert "backstore m1 exists as 2097152 bytes" in text and "never re-creates" in text
    assert f"target {IQN} exists and was not created by apply" in text
    assert "consistency group g exists with members m1, zz" in text
    assert lio.calls == [] and groups.calls == []


def test_hand_made_identical_backstore_is_used_not_adopted(tmp_path: Path) -> None:
    doc = good(tmp_path)
    cfg = load(tmp_path, doc)
    lio, groups = FakeLio(), FakeGroups()
    lio.state.backstores["m1"] = BackstoreState(MiB, cfg.mirrors[0].cfgstring(), "by-hand")
    run(cfg, lio, groups)
    assert "create_backstore" not in [op for op, kw in lio.calls if kw.get("name") == "m1"]
    assert "m1" not in Manifest.load(manifest_path(cfg)).backstores
    doc["mirrors"].pop(0)
    doc["groups"] = []
    doc["exports"][0]["luns"].pop(0)
    run(load(tmp_path, doc), lio, groups)
    assert lio.state.backstores["m1"].wwn == "by-hand"


def test_owned_target_is_reconciled(tmp_path: Path) -> None:
    """Portal, ACL and CHAP changes inside a target apply owns; drift is put back."""
    doc = good(tmp_path)
    lio, groups = FakeLio(), FakeGroups()
    run(load(tmp_path, doc), lio, groups)
    doc["exports"][0]["portals"] = ["10.0.0.1:3260", "[2001:db8::1]:3261"]
    doc["exports"][0]["acls"] = [
        {"initiator": "iqn.2026-01.org.example:host2", "chap_user": "u2",
         "chap_password": "secret-secret-2", "mutual_chap_user": "t",
         "mutual_chap_password": "mutual-secret-2"}]
    res = run(load(tmp_path, doc), lio, groups)
    t = lio.state.targets[IQN]
    assert t.portals == {("10.0.0.1", 3260), ("2001:db8::1", 3261)}
    assert set(t.acls) == {"iqn.2026-01.org.example:host2"} and t.authentication
    assert t.acls["iqn.2026-01.org.example:host2"].chap == Chap(
        "u2", "secret-secret-2", "t", "mutual-secret-2")
    assert any("portal [2001:db8::1]:3261" in line for line in res.lines)
    assert not any("secret" in line for line in res.lines), "secrets never printed"
    # drift by hand: a LUN mapping removed, the TPG disabled -> apply puts it back
    t.acls["iqn.2026-01.org.example:host2"].mapped.pop(1)
    t.enabled = False
    res = run(load(tmp_path, doc), lio, groups)
    assert [a.op for a in res.done] == ["map_lun", "enable_tpg"]
    assert not run(load(tmp_path, doc), lio, groups).changed


def test_lun_moved_to_another_mirror(tmp_path: Path) -> None:
    doc = good(tmp_path)
    lio, groups = FakeLio(), FakeGroups()
    run(load(tmp_path, doc), lio, groups)
    doc["exports"][0]["luns"] = [{"lun": 0, "mirror": "m2"}, {"lun": 1, "mirror": "m1"}]
    run(load(tmp_path, doc), lio, groups)
    assert lio.state.targets[IQN].luns == {0: "m2", 1: "m1"}
    assert lio.state.targets[IQN].acls[HOST].mapped == {0: 0, 1: 1}
    assert not run(load(tmp_path, doc), lio, groups).changed


def test_images_created_only_when_asked(tmp_path: Path) -> None:
    doc = good(tmp_path)
    doc["mirrors"][1]["image_b"] = f"{tmp_path}/images/new-b.img"
    doc["mirrors"][1]["create_images"] = True
    lio, groups = FakeLio(), FakeGroups()
    run(load(tmp_path, doc), lio, groups)
    assert (tmp_path / "images" / "new-b.img").stat().st_size == MiB
    doc["mirrors"][1]["create_images"] = False
    doc["mirrors"][0]["image_b"] = f"{tmp_path}/images/other-b.img"
    with pytest.raises(ConfigFileError, match=r"mirrors\[0\]\.image_b: expected an existing"):
        load(tmp_path, doc)


def test_owned_backstore_exported_by_hand_is_not_deleted(tmp_path: Path) -> None:
    doc = good(tmp_path)
    lio, groups = FakeLio(), FakeGroups()
    run(load(tmp_path, doc), lio, groups)
    lio.state.targets["iqn.2026-01.org.example:hand"] = TargetState(luns={3: "m2"})
    doc["mirrors"].pop(1)
    doc["groups"] = []
    doc["exports"][0]["luns"].pop(1)
    calls = len(lio.calls)
    with pytest.raises(ConfigFileError, match=r"still exported by iqn\.2026-01\.org\.example:hand "
                                              r"LUN 3"):
        run(load(tmp_path, doc), lio, groups)
    assert len(lio.calls) == calls


def test_failure_half_way_keeps_manifest_true(tmp_path: Path) -> None:
    cfg = load(tmp_path, good(tmp_path))
    lio, groups = FakeLio(), FakeGroups()
    real = lio.create_target

    def broken(iqn: str) -> None:
        raise OSError(28, "No space left on device")

    lio.create_target = broken  # type: ignore[method-assign]
    with pytest.raises(Exception, match=r"2 of \d+ steps were done"):
        run(cfg, lio, groups)
    assert set(Manifest.load(manifest_path(cfg)).backstores) == {"m1", "m2"}
    lio.create_target = real  # type: ignore[method-assign]
    run(cfg, lio, groups)
    assert IQN in lio.state.targets and not run(cfg, lio, groups).changed


def test_plan_is_pure() -> None:
    """plan() on hand-built states: an empty config against an unowned LIO plans nothing."""
    cfg = Config("x.yaml", loader.DaemonSettings("/run/s", "/var/lib/x", "", "info"), ())
    cur = LioState(backstores={"b": BackstoreState(1, "a=/a;b=/b")},
                   targets={IQN: TargetState(acls={HOST: AclState()})},
                   groups={"g": ["a", "b"]})
    assert plan(cfg, cur, Manifest()) == []


def test_cli_apply_json_and_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, good(tmp_path))
    lio, groups = FakeLio(), FakeGroups()
    monkeypatch.setattr(cli.common, "lio_seam", lambda: lio)
    monkeypatch.setattr(cli.ui_config, "DaemonGroups", lambda socket: groups)
    assert cli.main(["apply", "--config", str(path), "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] and out["plan"] and out["applied"] == []
    assert cli.main(["apply", "--config", str(path)]) == 0
    assert "applied" in capsys.readouterr().out
    assert cli.main(["apply", "--config", str(path)]) == 0
    assert "nothing to change" in capsys.readouterr().out


def test_cli_apply_groups_need_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    doc = good(tmp_path)
    lio = FakeLio()
    monkeypatch.setattr(cli.common, "lio_seam", lambda: lio)
    rc = cli.main(["apply", "--config", str(write(tmp_path, doc))])
    assert rc == 1 and "does not answer" in capsys.readouterr().err and lio.calls == []
    # a dry run needs no daemon (provisioning checks the file before it starts one)
    rc = cli.main(["apply", "--config", str(write(tmp_path, doc)), "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0 and "+ group g: m1, m2" in out and "dry run: nothing changed" in out
    assert "are planned as if it had none" in err and lio.calls == []
    doc["groups"] = []
    assert cli.main(["apply", "--config", str(write(tmp_path, doc))]) == 0
    assert "m1" in lio.state.backstores


def test_cli_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> None:
    """list shows every user:mirror backstore, who made it, and where it is exported."""
    path = write(tmp_path, good(tmp_path))
    lio, groups = FakeLio(), FakeGroups()
    lio.state.backstores["hand"] = BackstoreState(2 * MiB, "a=/h/a;b=/h/b", "hand-serial")
    monkeypatch.setattr(cli.common, "lio_seam", lambda: lio)
    monkeypatch.setattr(cli.ui_config, "DaemonGroups", lambda socket: groups)
    assert cli.main(["apply", "--config", str(path)]) == 0
    capsys.readouterr()
    assert cli.main(["list", "--config", str(path), "--json"]) == 0
    out = {m["name"]: m for m in json.loads(capsys.readouterr().out)["mirrors"]}
    assert set(out) == {"hand", "m1", "m2"}
    assert out["m1"]["managed_by_apply"] and not out["hand"]["managed_by_apply"]
    assert out["m2"]["exports"] == [{"target": IQN, "lun": 1}]
    assert out["m1"]["image_a"] == f"{tmp_path}/images/m1-a.img"
    assert out["hand"]["state"] == "unknown"  # no daemon answering in this test
    assert cli.main(["list", "--config", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "SIZE", "STATE"]
    hand = next(line for line in lines if line.startswith("hand"))
    assert "2M" in hand and " hand " in hand and "/h/a" in hand
    m2 = next(line for line in lines if line.startswith("m2"))
    assert f"{IQN} LUN 1" in m2 and " apply " in m2


def test_image_used_by_another_backstore_is_refused(tmp_path: Path) -> None:
    """A hand-made backstore (or a snapshot export) already on one of the file's images."""
    cfg = load(tmp_path, good(tmp_path))
    lio, groups = FakeLio(), FakeGroups()
    lio.state.backstores["hand"] = BackstoreState(
        MiB, f"a=/elsewhere/a;b={tmp_path}/images/m2-b.img", "s")
    lio.state.backstores["snap"] = BackstoreState(MiB, f"snapshot={tmp_path}/images/m1-a.img")
    with pytest.raises(ConfigFileError) as info:
        run(cfg, lio, groups)
    text = str(info.value)
    assert f"m2 would use an image another backstore already uses: {tmp_path}/images/m2-b.img " \
        "(backstore hand)" in text
    assert f"{tmp_path}/images/m1-a.img (backstore snap)" in text
    assert lio.calls == []
